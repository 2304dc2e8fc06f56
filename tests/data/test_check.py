"""check_coco: statistics on a hand-made COCO file and every problem kind on broken copies of it."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from megdet.data import check
from megdet.data.check import check_coco, format_report
from megdet.data.errors import DatasetError

H, W = 40, 60


def _rle(x0: int, y0: int, x1: int, y1: int) -> tuple[dict[str, Any], int]:
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": [H, W], "counts": rle["counts"].decode("ascii")}, int(m.sum())


def _base() -> dict[str, Any]:
    """Two annotated images and one empty one; RLE, polygon, crowd and keypoint annotations."""
    seg1, a1 = _rle(2, 3, 12, 13)  # 10 x 10 = 100 px: small
    seg2, a2 = _rle(0, 0, 60, 40)  # 2400 px: medium
    crowd, a3 = _rle(30, 5, 50, 25)
    person, a4 = _rle(10, 5, 30, 35)  # 20 x 30 = 600 px: small
    kps = [15, 8, 2, 18, 9, 1, 0, 0, 0]  # three keypoints: visible, occluded, unlabelled
    poly = [[40.0, 10.0, 50.0, 10.0, 50.0, 30.0, 40.0, 30.0]]  # 10 x 20 rectangle, shoelace area 200
    return {
        "info": {"description": "test"},
        "licenses": [],
        "images": [
            {"id": 1, "file_name": "a.png", "height": H, "width": W},
            {"id": 2, "file_name": "b.png", "height": H, "width": W},
            {"id": 3, "file_name": "c.png", "height": H, "width": W},
        ],
        "categories": [
            {"id": 1, "name": "box", "supercategory": "shape"},
            {"id": 7, "name": "person", "supercategory": "person", "keypoints": ["a", "b", "c"], "skeleton": [[1, 2]]},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [2.0, 3.0, 10.0, 10.0], "area": a1, "segmentation": seg1, "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 60.0, 40.0], "area": a2, "segmentation": seg2, "iscrowd": 0},
            {"id": 12, "image_id": 2, "category_id": 1, "bbox": [30.0, 5.0, 20.0, 20.0], "area": a3, "segmentation": crowd, "iscrowd": 1},
            {"id": 13, "image_id": 2, "category_id": 7, "bbox": [10.0, 5.0, 20.0, 30.0], "area": a4, "segmentation": person,
             "iscrowd": 0, "keypoints": kps, "num_keypoints": 2},
            {"id": 14, "image_id": 2, "category_id": 1, "bbox": [40.0, 10.0, 10.0, 20.0], "area": 200.0, "segmentation": poly,
             "iscrowd": 0},
        ],
    }  # fmt: skip


def _write(tmp_path: Path, data: dict[str, Any], images: bool = True) -> tuple[Path, Path]:
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    if images:
        for name in ("a.png", "b.png", "c.png"):
            Image.new("RGB", (W, H), (10, 20, 30)).save(img_dir / name)
    return ann, img_dir


def test_valid_file_statistics(tmp_path: Path) -> None:
    ann, img_dir = _write(tmp_path, _base())
    r = check_coco(ann, img_dir)
    assert r.ok and r.num_problems == 0 and not r.problems, format_report(r)
    assert (r.num_images, r.num_annotations, r.num_categories, r.num_crowd) == (3, 5, 2, 1)
    assert r.annotations_per_category == {"box": 4, "person": 1}
    assert r.size_counts == {"small": 3, "medium": 1, "large": 0}  # the crowd region is not counted
    assert r.keypoint_visibility == {0: 1, 1: 1, 2: 1} and r.num_keypoint_annotations == 1
    assert r.images_without_annotations == 1
    assert (r.masks_total, r.masks_checked) == (4, 4)
    assert (r.image_files_checked, r.image_files_decoded) == (3, 3)
    text = format_report(r)
    assert "problems: none" in text and "result: OK" in text and "person" in text


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(d: dict[str, Any]) -> None:
        obj = d
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value

    return apply


def _dup_annotation(d: dict[str, Any]) -> None:
    d["annotations"].append(copy.deepcopy(d["annotations"][0]))


def _drop(path: tuple[Any, ...], key: str) -> Callable[[dict[str, Any]], None]:
    def apply(d: dict[str, Any]) -> None:
        obj = d
        for k in path:
            obj = obj[k]
        del obj[key]

    return apply


BROKEN = [
    ("unknown_category_id", True, _set(("annotations", 0, "category_id"), 99)),
    ("unknown_image_id", True, _set(("annotations", 0, "image_id"), 42)),
    ("degenerate_box", False, _set(("annotations", 1, "bbox"), [5.0, 5.0, 0.5, 10.0])),
    ("area_mismatch", True, _set(("annotations", 0, "area"), 120)),
    ("area_mismatch", True, _set(("annotations", 4, "area"), 260.0)),  # polygon
    ("bad_segmentation", True, _set(("annotations", 0, "segmentation"), {"size": [10, 10], "counts": "PP"})),
    ("short_polygon", False, _set(("annotations", 4, "segmentation"), [[1.0, 2.0]])),
    ("bad_segmentation", True, _set(("annotations", 4, "segmentation"), [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])),
    ("bad_keypoints", True, _set(("annotations", 3, "keypoints"), [1, 2, 2])),
    ("bad_keypoints", True, _set(("annotations", 3, "keypoints"), [15, 8, 2, 18, 9, 3, 0, 0, 0])),
    ("keypoint_outside_box", False, _set(("annotations", 3, "keypoints"), [55, 8, 2, 18, 9, 1, 0, 0, 0])),
    ("num_keypoints_mismatch", False, _set(("annotations", 3, "num_keypoints"), 3)),
    ("missing_field", True, _drop(("annotations", 0), "bbox")),
    ("missing_field", True, _drop(("images", 0), "file_name")),
    ("missing_optional_field", False, _drop(("annotations", 0), "iscrowd")),
    ("bad_value", True, _set(("annotations", 0, "bbox"), [1, 2, 3])),
    ("bad_value", True, _set(("images", 0, "height"), "40")),
    ("duplicate_id", True, _dup_annotation),
    ("box_outside_image", False, _set(("annotations", 0, "bbox"), [50.0, 3.0, 20.0, 10.0])),
]


@pytest.mark.parametrize(("kind", "is_error", "mutate"), BROKEN, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BROKEN)])
def test_each_problem_kind_is_flagged(tmp_path: Path, kind: str, is_error: bool, mutate: Callable) -> None:
    data = _base()
    mutate(data)
    ann, img_dir = _write(tmp_path, data)
    r = check_coco(ann, img_dir)
    assert kind in r.problems, format_report(r)
    p = r.problems[kind]
    assert p.count >= 1 and p.examples and p.severity == ("error" if is_error else "warning")
    assert r.ok is not is_error
    assert r.num_problems >= 1
    text = format_report(r)
    assert kind in text and ("FAILED" in text) == is_error


def test_image_file_problems(tmp_path: Path) -> None:
    ann, img_dir = _write(tmp_path, _base())
    (img_dir / "a.png").unlink()
    (img_dir / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    Image.new("RGB", (W + 1, H), 0).save(img_dir / "c.png")
    r = check_coco(ann, img_dir)
    assert {k: p.count for k, p in r.problems.items()} == {
        "missing_image_file": 1, "undecodable_image": 1, "image_size_mismatch": 1
    }  # fmt: skip
    assert not r.ok and "a.png" in r.problems["missing_image_file"].examples[0]
    # Without an images folder the files are not looked at.
    assert check_coco(ann).ok


def test_truncated_image_is_undecodable(tmp_path: Path) -> None:
    ann, img_dir = _write(tmp_path, _base())
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(img_dir / "a.png")
    raw = (img_dir / "a.png").read_bytes()
    (img_dir / "a.png").write_bytes(raw[: len(raw) // 2])
    r = check_coco(ann, img_dir)
    assert list(r.problems) == ["undecodable_image"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"images": [], "categories": []}), "'annotations'"),
        (json.dumps({"images": [], "annotations": {}, "categories": []}), "must be a list"),
    ],
)
def test_fatal_errors_raise_dataset_error(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=match) as e:
        check_coco(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_folder_raise(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        check_coco(tmp_path / "nope.json")
    ann, _ = _write(tmp_path, _base(), images=False)
    with pytest.raises(DatasetError, match="images folder not found"):
        check_coco(ann, tmp_path / "no_such_dir")


def test_mask_check_samples_big_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check, "MAX_MASK_CHECKS", 2)
    data = _base()
    data["annotations"][0]["area"] = 120  # only found if sampled: the first candidate is always sampled
    ann, _ = _write(tmp_path, data, images=False)
    r = check_coco(ann)
    assert (r.masks_total, r.masks_checked) == (4, 2)
    assert "area_mismatch" in r.problems
    assert "sample" in format_report(r)


def test_examples_are_capped(tmp_path: Path) -> None:
    data = _base()
    for i in range(4):
        data["annotations"].append({**data["annotations"][0], "id": 100 + i})
    for a in data["annotations"]:
        a["category_id"] = 99
    ann, _ = _write(tmp_path, data, images=False)
    r = check_coco(ann)
    p = r.problems["unknown_category_id"]
    assert p.count == 9 and len(p.examples) == check.MAX_EXAMPLES < p.count
    assert f"and {9 - check.MAX_EXAMPLES} more" in format_report(r)
