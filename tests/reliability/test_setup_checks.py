"""Data checked against the model before the first step, a non-finite loss that names its data, and
one-line errors (or acceptance, where pycocotools accepts) for whole-file problems."""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from faults import base_coco, perfect_results, write_dataset

from megdet.cli import main
from megdet.config import ConfigError, load_config
from megdet.data.check import check_coco
from megdet.data.coco import CocoDetection
from megdet.data.errors import DatasetError
from megdet.data.loader import build_train_dataset

TINY = [
    "model.backbone=resnet10", "model.fpn_channels=16", "model.roi.box_head_dim=32", "model.mask_on=true",
    "model.roi.mask_head_dim=16", "model.roi.mask_head_convs=1", "model.rpn.pre_nms_top_n_train=50",
    "model.rpn.post_nms_top_n_train=20", "model.rpn.batch_size_per_image=32", "model.roi.batch_size_per_image=16",
    "data.num_workers=0", "data.min_size_train=[32]", "data.max_size_train=64", "train.log_period=1",
    "test.eval_period=-1", "train.device=cpu",
]  # fmt: skip


def _root(tmp_path: Path, data: dict | None = None) -> Path:
    """``data`` as the train split of a data root (root/train/*.png, root/annotations/instances_train.json)."""
    root = tmp_path / "root"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    src = write_dataset(tmp_path / "src", data)
    shutil.copytree(tmp_path / "src" / "images", root / "train", dirs_exist_ok=True)
    shutil.copy(src, root / "annotations" / "instances_train.json")
    shutil.copy(src, root / "annotations" / "person_keypoints_train.json")
    return root


def _cfg(root: Path, tmp_path: Path, *overrides: str):
    return load_config(None, [*TINY, f"data.root={root}", f"train.out_dir={tmp_path / 'run'}", *overrides])


def _one_line(e: pytest.ExceptionInfo, *parts: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert p in msg, (p, msg)
    return msg


@pytest.mark.parametrize(("num_classes", "extra"), [(1, []), (5, []), (2, ["model.keypoint_on=true", "model.num_keypoints=17"])])
def test_categories_and_keypoints_must_match_the_model(tmp_path: Path, num_classes: int, extra: list[str]) -> None:
    root = _root(tmp_path)
    cfg = _cfg(root, tmp_path, f"model.num_classes={num_classes}", *extra, "test.eval_period=0")
    with pytest.raises(ConfigError) as e:
        build_train_dataset(cfg)
    if extra:
        _one_line(e, "3 keypoints per instance", "model.num_keypoints=17", "set model.num_keypoints=3")
    else:
        _one_line(e, "instances_train.json", "2 categories", f"model.num_classes={num_classes}", "set model.num_classes=2")
    # The rule for fewer categories than outputs: only without evaluation (a benchmark of a COCO-sized head).
    if num_classes == 5:
        assert "test.eval_period=-1" in str(e.value)
        build_train_dataset(_cfg(root, tmp_path, "model.num_classes=5", "test.eval_period=-1"))
    elif not extra:
        with pytest.raises(ConfigError):
            build_train_dataset(_cfg(root, tmp_path, "model.num_classes=1", "test.eval_period=-1"))


def test_a_non_finite_loss_names_the_image_and_annotation_it_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from megdet.engine.trainer import NonFiniteLossError, train
    from megdet.modeling import detector

    original = CocoDetection.__getitem__

    def poisoned(self, index):  # a box that became NaN after validation: what the message must find
        image, target = original(self, index)
        if target["image_id"] == 2:
            target["boxes"][1, 2] = float("nan")
        return image, target

    def nan_loss_from_nan_targets(module, args, output):
        # The detector happens to ignore a NaN box (it never matches); a loss it poisons is what the
        # message is for, so make the bad box poison the loss.
        if any(not bool(t["boxes"].isfinite().all()) for t in args[2]):
            output = {**output, "loss_box_reg": output["loss_box_reg"] * float("nan")}
        return output

    real_build = detector.build_model
    monkeypatch.setattr(detector, "build_model", lambda cfg: _hooked(real_build(cfg), nan_loss_from_nan_targets))
    monkeypatch.setattr(CocoDetection, "__getitem__", poisoned)
    torch.manual_seed(0)
    cfg = _cfg(_root(tmp_path), tmp_path, "model.num_classes=2", "train.max_iters=2")
    with pytest.raises(NonFiniteLossError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg)
    _one_line(e, "non-finite loss at iteration 1", "image id 2", "b.png", "annotation id 4", "is not finite", "lr=")


def _hooked(model: torch.nn.Module, hook) -> torch.nn.Module:
    model.register_forward_hook(hook)
    return model


# --------------------------------------------------------------------------------------------------
# Whole files
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["empty", "all_crowd", "no_images"])
def test_nothing_to_train_on_is_one_line(tmp_path: Path, kind: str) -> None:
    data = copy.deepcopy(base_coco())
    if kind == "empty":
        data["annotations"] = []
    elif kind == "all_crowd":
        for a in data["annotations"]:
            a["iscrowd"] = 1
    else:
        data["images"], data["annotations"] = [], []
    ann = write_dataset(tmp_path, data)
    with pytest.raises(DatasetError) as e:
        CocoDetection(tmp_path / "images", ann, train=True)
    _one_line(e, str(ann), "no image has an annotation to train on")
    CocoDetection(tmp_path / "images", ann, train=False)  # evaluation keeps every image


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda d: d["images"].append(dict(d["images"][0], file_name="b.png")), "image id 1 appears more than once"),
        (lambda d: d["images"][0].update(id="1"), "image #0: id '1' is not an integer"),
        (lambda d: d["images"][0].update(id=1.0), "image #0: id 1.0 is not an integer"),
        (lambda d: d["categories"][0].update(id="1"), "category #0: id '1' is not an integer"),
        (lambda d: d["categories"].append(dict(d["categories"][0])), "category id 1 appears more than once"),
        (lambda d: d["categories"][1].update(keypoints="head"), "keypoints 'head' is not a list of names"),
        (lambda d: d["categories"][1].update(skeleton=[[1, 9]]), "skeleton [[1, 9]]"),
        (lambda d: d["images"][0].update(file_name=7), "file_name 7 is not a file name"),
        (lambda d: d["images"][0].update(height=-32), "height/width -32/40"),
    ],
    ids=["duplicate_image", "image_id_text", "image_id_float", "category_id_text", "duplicate_category",
         "keypoint_names", "skeleton", "file_name_number", "negative_height"],  # fmt: skip
)
def test_entries_of_the_wrong_type_or_duplicated(tmp_path: Path, mutate, words: str) -> None:
    data = copy.deepcopy(base_coco())
    mutate(data)
    ann = write_dataset(tmp_path, data)
    with pytest.raises(DatasetError) as e:
        CocoDetection(tmp_path / "images", ann, train=True)
    _one_line(e, str(ann), words)
    assert not check_coco(ann).ok


def test_duplicate_image_ids_fail_evaluation_too(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = copy.deepcopy(base_coco())
    data["images"].append(dict(data["images"][0], file_name="b.png"))
    gt = write_dataset(tmp_path, data)
    results = tmp_path / "results.json"
    results.write_text(json.dumps(perfect_results(base_coco(), "bbox")))
    assert main(["eval", "--annotations", str(gt), "--results", str(results), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(gt) in err and "image id 1 appears more than once" in err


def test_what_pycocotools_accepts_is_accepted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Categories without ``name``, annotations without ``area`` and ``iscrowd``, string ids (evaluation)."""
    data = copy.deepcopy(base_coco())
    for c in data["categories"]:
        del c["name"]
    for a in data["annotations"]:
        del a["area"], a["iscrowd"]
    ann = write_dataset(tmp_path, data)
    report = check_coco(ann, tmp_path / "images")
    assert report.ok and report.problems["missing_optional_field"].count == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = CocoDetection(tmp_path / "images", ann, train=True)
    assert ds.category_names == ["category 1", "category 2"] and len(ds) == 2
    for task in ("bbox", "segm"):
        results = tmp_path / f"{task}.json"
        results.write_text(json.dumps(perfect_results(base_coco(), task)))
        assert main(["eval", "--annotations", str(ann), "--results", str(results), "--out", str(tmp_path / task)]) == 0
        evals = json.loads((tmp_path / task / "eval.json").read_text())
        assert evals[task]["stats"]["AP"] == pytest.approx(1.0)
        assert set(evals[task]["per_category_ap"]) == {"category 1", "category 2"}
    # String ids: pycocotools takes any hashable id, so evaluation does too.
    data = copy.deepcopy(base_coco())
    for img in data["images"]:
        img["id"] = f"img{img['id']}"
    for a in data["annotations"]:
        a["image_id"] = f"img{a['image_id']}"
    strings = write_dataset(tmp_path, data, "strings.json")
    results = [dict(r, image_id=f"img{r['image_id']}") for r in perfect_results(base_coco(), "bbox")]
    (tmp_path / "sr.json").write_text(json.dumps(results))
    assert main(["eval", "--annotations", str(strings), "--results", str(tmp_path / "sr.json"), "--out", str(tmp_path / "s")]) == 0
    capsys.readouterr()


def test_segm_evaluation_without_gt_masks_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = copy.deepcopy(base_coco())
    for a in data["annotations"]:
        del a["segmentation"]
    gt = write_dataset(tmp_path, data)
    results = tmp_path / "segm.json"
    results.write_text(json.dumps(perfect_results(base_coco(), "segm")))
    assert main(["eval", "--annotations", str(gt), "--results", str(results), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(gt) in err and "has no segmentation" in err and "evaluate bbox" in err


def test_deeply_nested_json_is_one_line_everywhere(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    nested = tmp_path / "nested.json"  # nested inside a field of an otherwise valid file
    data = base_coco()
    nested.write_text(json.dumps(data)[:-1] + ', "info": ' + "[" * 100_000 + "]" * 100_000 + "}")
    gt = write_dataset(tmp_path)
    results = tmp_path / "bbox.json"
    results.write_text(json.dumps(perfect_results(base_coco(), "bbox")))
    for bad in (deep, nested):
        for argv in (["data", "check", str(bad)],
                     ["eval", "--annotations", str(bad), "--results", str(results), "--out", str(tmp_path / "e")],
                     ["eval", "--annotations", str(gt), "--results", str(bad), "--out", str(tmp_path / "e")]):  # fmt: skip
            assert main(argv) == 2, argv
            err = capsys.readouterr().err.strip()
            assert "\n" not in err and str(bad) in err and "nested too deeply" in err, err
        with pytest.raises(DatasetError) as e:
            CocoDetection(tmp_path / "images", bad, train=True)
        _one_line(e, str(bad), "nested too deeply")
