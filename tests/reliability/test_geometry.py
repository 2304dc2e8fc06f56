"""Hostile geometry (polygons, RLEs, boxes, keypoints, areas, ids) through every caller of the validator,
in a memory-limited subprocess: ``megdet data check`` reports it, the training dataset (with masks) and
``megdet eval`` (ground truth and results) refuse it with one line naming the file and the annotation,
and nothing reaches pycocotools' C code to crash it or exhaust memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from faults import H, W, base_coco, perfect_results, run_harness, with_annotation, write_dataset

NAN, INF = float("nan"), float("inf")
POLY = [2.0, 2.0, 12.0, 2.0, 12.0, 10.0, 2.0, 10.0]


def _zigzag(points: int) -> list[float]:
    """A polygon inside the image padded by its size whose boundary is ``points`` x 120 pixels."""
    xs = np.where(np.arange(points) % 2 == 0, -float(W), 2.0 * W)
    return np.stack([xs, np.linspace(0, H - 1, points)], 1).ravel().tolist()


def _compressed(mask_shape: tuple[int, int]) -> str:
    return mask_utils.encode(np.asfortranarray(np.ones(mask_shape, np.uint8)))["counts"].decode("ascii")


# (name, annotation id, fields, evaluated task, problem kind, words the message must contain)
CASES: list[tuple[str, int, dict[str, Any], str, str, str]] = [
    ("polygon_nan", 1, {"segmentation": [[NAN, *POLY[1:]]]}, "segm", "bad_segmentation", "polygon 0"),
    ("polygon_inf", 1, {"segmentation": [[*POLY[:3], INF, *POLY[4:]]]}, "segm", "bad_segmentation", "polygon 0"),
    ("polygon_1e9", 1, {"segmentation": [[0, 0, 1e9, 0, 1e9, 1e9, 0, 1e9]]}, "segm", "bad_segmentation", "outside"),
    ("polygon_1e7", 1, {"segmentation": [[0, 0, 1e7, 0, 1e7, 1e7]]}, "segm", "bad_segmentation", "outside"),
    ("polygon_huge_int", 1, {"segmentation": [[0, 0, 10**400, 0, 5, 5]]}, "segm", "bad_segmentation", "polygon 0"),
    ("polygon_boundary", 1, {"segmentation": [_zigzag(2**25 // 120)]}, "segm", "bad_segmentation", "boundary"),
    ("polygon_strings", 1, {"segmentation": [["2", "2", "12", "2", "12", "10"]]}, "segm", "bad_segmentation", "polygon 0"),
    ("polygon_odd", 1, {"segmentation": [POLY[:7]]}, "segm", "bad_segmentation", "odd number"),
    ("polygon_nested", 1, {"segmentation": [[[2, 2], [12, 2], [12, 10]]]}, "segm", "bad_segmentation", "polygon 0"),
    ("polygon_object", 1, {"segmentation": [{"x": 1}]}, "segm", "bad_segmentation", "polygon 0"),
    ("segmentation_number", 1, {"segmentation": 5}, "segm", "bad_segmentation", "neither"),
    ("rle_runs_too_long", 3, {"segmentation": {"size": [H, W], "counts": [5, 10**8, 3]}}, "segm", "bad_segmentation", "add up"),
    ("rle_runs_short", 3, {"segmentation": {"size": [H, W], "counts": [5, 10, 3]}}, "segm", "bad_segmentation", "add up"),
    ("rle_negative_run", 3, {"segmentation": {"size": [H, W], "counts": [H * W + 3, -3]}}, "segm", "bad_segmentation", "non-negative"),
    ("rle_fraction", 3, {"segmentation": {"size": [H, W], "counts": [H * W - 0.5, 0.5]}}, "segm", "bad_segmentation", "integers"),
    ("rle_size_other", 3, {"segmentation": {"size": [10, 10], "counts": [100]}}, "segm", "bad_segmentation", "RLE size"),
    ("rle_size_huge", 3, {"segmentation": {"size": [10**5, 10**5], "counts": [10**10]}}, "segm", "bad_segmentation", "RLE size"),
    ("rle_size_negative", 3, {"segmentation": {"size": [-1, W], "counts": [0]}}, "segm", "bad_segmentation", "RLE size"),
    ("rle_counts_number", 2, {"segmentation": {"size": [H, W], "counts": 5}}, "segm", "bad_segmentation", "counts"),
    ("rle_string_control", 2, {"segmentation": {"size": [H, W], "counts": "\x01\x02"}}, "segm", "bad_segmentation", "alphabet"),
    ("rle_string_unicode", 2, {"segmentation": {"size": [H, W], "counts": "0\u00e9"}}, "segm", "bad_segmentation", "ASCII"),
    ("rle_string_unfinished", 2, {"segmentation": {"size": [H, W], "counts": "0o"}}, "segm", "bad_segmentation", "ends inside"),
    ("rle_string_long_run", 2, {"segmentation": {"size": [H, W], "counts": "ooooooo0"}}, "segm", "bad_segmentation", "characters"),
    ("rle_string_negative", 2, {"segmentation": {"size": [H, W], "counts": "O"}}, "segm", "bad_segmentation", "negative"),
    ("rle_string_other_size", 2, {"segmentation": {"size": [H, W], "counts": _compressed((10, 10))}}, "segm", "bad_segmentation", "add up"),
    ("bbox_nan", 1, {"bbox": [NAN, 2.0, 10.0, 8.0]}, "bbox", "bad_value", "bbox"),
    ("bbox_inf_size", 1, {"bbox": [2.0, 2.0, INF, 8.0]}, "bbox", "bad_value", "bbox"),
    ("bbox_huge", 1, {"bbox": [0.0, 0.0, 1e30, 1e30]}, "bbox", "bad_value", "bbox"),
    ("bbox_cancelling", 1, {"bbox": [1e38, 0.0, -1e38, 8.0]}, "bbox", "bad_value", "bbox"),
    ("bbox_strings", 1, {"bbox": ["2", "2", "10", "8"]}, "bbox", "bad_value", "bbox"),
    ("bbox_three", 1, {"bbox": [2.0, 2.0, 10.0]}, "bbox", "bad_value", "bbox"),
    ("keypoints_nan", 4, {"keypoints": [32, NAN, 2, 29, 16, 2, 35, 16, 1]}, "keypoints", "bad_keypoints", "keypoint 0"),
    ("keypoints_string", 4, {"keypoints": "32 6 2"}, "keypoints", "bad_keypoints", "keypoint values"),
    ("keypoints_object", 4, {"keypoints": {"head": [32, 6, 2]}}, "keypoints", "bad_keypoints", "keypoint values"),
    ("keypoints_text_values", 4, {"keypoints": [32, 6, 2, 29, 16, 2, 35, 16, "1"]}, "keypoints", "bad_keypoints", "keypoint 2"),
    ("keypoints_length", 4, {"keypoints": [32, 6, 2, 29, 16, 2]}, "keypoints", "bad_keypoints", "expected 9"),
    ("keypoints_visibility_5", 4, {"keypoints": [32, 6, 5, 29, 16, 2, 35, 16, 1]}, "keypoints", "bad_keypoints", "visibility 5"),
    ("keypoints_visibility_neg", 4, {"keypoints": [32, 6, 2, 29, 16, -1, 35, 16, 1]}, "keypoints", "bad_keypoints", "visibility -1"),
    ("keypoints_far", 4, {"keypoints": [1e30, 6, 2, 29, 16, 2, 35, 16, 1]}, "keypoints", "bad_keypoints", "outside"),
    ("area_nan", 1, {"area": NAN}, "bbox", "bad_value", "area"),
    ("area_negative", 1, {"area": -5.0}, "bbox", "bad_value", "area"),
    ("area_text", 1, {"area": "80"}, "bbox", "bad_value", "area"),
    ("iscrowd_text", 1, {"iscrowd": "yes"}, "bbox", "bad_value", "iscrowd"),
    ("image_id_text", 1, {"image_id": "1"}, "bbox", "unknown_image_id", "image_id '1'"),
    ("image_id_list", 1, {"image_id": [1]}, "bbox", "unknown_image_id", "image_id [1]"),
    ("category_id_list", 1, {"category_id": [1]}, "bbox", "unknown_category_id", "category_id [1]"),
    ("category_id_float", 1, {"category_id": 1.5}, "bbox", "unknown_category_id", "category_id 1.5"),
]  # fmt: skip


def _bad_results(task: str) -> list[tuple[str, Any]]:
    """Segmentations of results that pycocotools would mis-decode (or loop on for minutes)."""
    return [
        ("results_rle_control", {"size": [H, W], "counts": "\x01\x02"}),
        ("results_rle_unfinished", {"size": [H, W], "counts": "0o"}),
        ("results_rle_negative", {"size": [H, W], "counts": "O"}),
        ("results_rle_other_size", {"size": [H, W], "counts": _compressed((10, 10))}),
        ("results_rle_big_run", {"size": [H, W], "counts": "0" + "ooooo5"}),
        ("results_rle_size", {"size": [H + 1, W], "counts": _compressed((H + 1, W))}),
        ("results_rle_uncompressed", {"size": [H, W], "counts": [H * W]}),
    ]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every case through every caller, in one memory-limited harness run."""
    tmp = tmp_path_factory.mktemp("geometry")
    images = tmp / "images"
    cases, paths = [], {}
    for name, ann_id, fields, task, _, _ in CASES:
        gt = write_dataset(tmp, with_annotation(ann_id, **fields), f"{name}.json")
        results = tmp / f"{name}_results.json"
        results.write_text(json.dumps(perfect_results(base_coco(), task)))
        paths[name] = gt
        cases += [
            {"name": f"{name}/check", "kind": "cli", "argv": ["data", "check", str(gt), "--images", str(images)]},
            {"name": f"{name}/dataset", "kind": "dataset", "image_dir": str(images), "instances": str(gt)},
            {"name": f"{name}/eval", "kind": "cli", "argv": ["eval", "--annotations", str(gt), "--results",
                                                              str(results), "--iou-type", task, "--out", str(tmp / "eval")]},
        ]  # fmt: skip
    gt = write_dataset(tmp, base_coco(), "valid.json")
    for name, segmentation in _bad_results("segm"):
        results = perfect_results(base_coco(), "segm")
        results[1]["segmentation"] = segmentation
        path = tmp / f"{name}.json"
        path.write_text(json.dumps(results))
        paths[name] = path
        cases.append({"name": name, "kind": "cli", "argv": ["eval", "--annotations", str(gt), "--results", str(path),
                                                             "--out", str(tmp / "eval")]})  # fmt: skip
    cases.append({"name": "valid/dataset", "kind": "dataset", "image_dir": str(images), "instances": str(gt)})
    cases += [{"name": f"valid/eval_{t}", "kind": "cli", "argv": ["eval", "--annotations", str(gt), "--results",
               str(_write(tmp / f"valid_{t}.json", perfect_results(base_coco(), t))), "--out", str(tmp / "eval")]}
              for t in ("bbox", "segm", "keypoints")]  # fmt: skip
    return {"results": run_harness(cases, tmp), "paths": paths}


def _write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


def _one_line(outcome: dict[str, Any], *parts: str) -> str:
    assert outcome["rc"] == 2, outcome
    err = outcome["err"].removeprefix("megdet: error: ")
    assert "\n" not in err and "Traceback" not in err, err
    for p in parts:
        assert p in err, (p, err)
    return err


@pytest.mark.parametrize(("name", "ann_id", "kind", "words"), [(c[0], c[1], c[4], c[5]) for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_every_caller_refuses_it_in_one_line(outcomes: dict, name: str, ann_id: int, kind: str, words: str) -> None:
    results, path = outcomes["results"], str(outcomes["paths"][name])
    check = results[f"{name}/check"]
    assert check["rc"] == 1 and f"[error] {kind}:" in check["out"] and "result: FAILED" in check["out"], check
    where = f"annotation id {ann_id}"
    train = _one_line(results[f"{name}/dataset"], path, where, words)
    # One validator, two callers: the training error is the first example data check gives of this kind.
    assert f"e.g. {train.removeprefix(path + ': ')}" in check["out"], (train, check["out"])
    _one_line(results[f"{name}/eval"], path, where, words)


@pytest.mark.parametrize("name", [n for n, _ in _bad_results("segm")])
def test_eval_refuses_unsafe_result_masks(outcomes: dict, name: str) -> None:
    _one_line(outcomes["results"][name], str(outcomes["paths"][name]), "result 1", "'segmentation'")


def test_the_valid_dataset_passes_every_caller(outcomes: dict) -> None:
    results = outcomes["results"]
    assert results["valid/dataset"] == {**results["valid/dataset"], "rc": 0, "out": "2 items"}
    for task in ("bbox", "segm"):
        outcome = results[f"valid/eval_{task}"]
        assert outcome["rc"] == 0 and "100.0" in outcome["out"], outcome
    # pycocotools' OKS has sigmas for COCO's 17 keypoints only (the person here has 3): one line, no crash.
    _one_line(results["valid/eval_keypoints"], "declares 3 keypoints", "17")


def test_the_harness_reports_crashes_and_memory_exhaustion(tmp_path: Path) -> None:
    """The limit is real and a crash cannot pass unnoticed (what pycocotools does with a NaN polygon)."""
    got = run_harness(
        [{"name": "allocate", "kind": "code", "code": "import numpy; numpy.ones(2**31)"},
         {"name": "segfault", "kind": "code", "code": "import ctypes; ctypes.string_at(0)"},
         {"name": "never", "kind": "code", "code": "pass"}],
        tmp_path,
        allow_death=True,
    )  # fmt: skip
    assert got["allocate"]["rc"] == 3 and "MemoryError" in got["allocate"]["err"]
    assert got["__death__"] == {"rc": -11, "case": "segfault"} and "never" not in got
