"""Split evaluation (plain, TTA, ensemble), checkpoint loading, categories and image-file prediction.

A tiny randomly initialised Mask+Keypoint R-CNN on a 5-image synthetic validation split: these are
plumbing and consistency checks, not accuracy checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megdet.checkpoint import CheckpointError, save_checkpoint
from megdet.config import config_to_dict
from megdet.data.errors import DatasetError
from megdet.data.synthetic import generate_synthetic_coco
from megdet.evaluation.inference import evaluate_model
from megdet.evaluation.loading import load_model_and_metadata, load_model_from_checkpoint
from megdet.evaluation.predict import category_info, predict_image, read_image
from megdet.modeling import build_model

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
PERSON = 7


@pytest.fixture(scope="session")
def tiny_inference_config(tiny_config):
    """The shared tiny config with this file's test batch and TTA size."""
    return lambda root, *extra: tiny_config(root, "test.images_per_device=2", "test.tta.min_sizes=[64]", *extra)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_inference_config) -> dict:
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic_coco(root, num_train=4, num_val=5, image_size=96, seed=0, workers=1, progress=False)
    cfg = tiny_inference_config(root)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ckpt = root / "run" / "model_0000010.pt"
    save_checkpoint(ckpt, {"model": model.state_dict(), "config": config_to_dict(cfg), "iteration": 10})
    return {"root": root, "cfg": cfg, "model": model, "ckpt": ckpt}


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def test_load_model_from_checkpoint_uses_the_stored_config_and_overrides(setup: dict) -> None:
    model, cfg = load_model_from_checkpoint(setup["ckpt"])
    assert cfg == setup["cfg"]
    assert not model.training
    ref = setup["model"].state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    model, cfg = load_model_from_checkpoint(setup["ckpt"], overrides=["model.roi.score_thresh=0.2"])
    assert cfg.model.roi.score_thresh == 0.2 and model.roi_heads.box_head.score_thresh == 0.2
    _, _, meta = load_model_and_metadata(setup["ckpt"])
    assert meta["iteration"] == 10 and "model" not in meta


def test_checkpoint_problems_are_one_line_errors_naming_the_file(
    setup: dict, tmp_path: Path, tiny_inference_config
) -> None:
    other = tiny_inference_config(setup["root"], "model.fpn_channels=16")
    with pytest.raises(CheckpointError, match="shape mismatch") as e:
        load_model_from_checkpoint(setup["ckpt"], other)
    assert str(setup["ckpt"]) in str(e.value) and "\n" not in str(e.value)
    bare = tmp_path / "bare.pt"
    save_checkpoint(bare, {"model": setup["model"].state_dict()})
    with pytest.raises(CheckpointError, match="stores no config; pass the training config"):
        load_model_from_checkpoint(bare)
    model, _ = load_model_from_checkpoint(bare, setup["cfg"])  # fine with the config given
    with pytest.raises(CheckpointError, match="not found"):
        load_model_from_checkpoint(tmp_path / "missing.pt")


# --------------------------------------------------------------------------------------------------
# Evaluation over the split
# --------------------------------------------------------------------------------------------------


def _val_ids(root: Path) -> set[int]:
    return {
        im["id"] for im in json.loads((root / "annotations" / "instances_val.json").read_text())["images"]
    }


def test_evaluate_model_writes_results_eval_and_timing(setup: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    # More detections per image, so that some are persons (whose keypoints are kept) and some are not.
    model, cfg = load_model_from_checkpoint(setup["ckpt"], overrides=["model.roi.detections_per_img=40"])
    model.train()  # evaluate_model switches to eval and back
    results = evaluate_model(model, cfg, out_dir=out, progress=True)
    assert model.training
    model.eval()

    assert set(results) == {"bbox", "segm", "keypoints"}
    assert json.loads((out / "eval.json").read_text()) == results
    for task in results:
        assert -1.0 <= results[task]["stats"]["AP"] <= 1.0
    boxes = json.loads((out / "coco_results_bbox.json").read_text())
    assert {r["image_id"] for r in boxes} == _val_ids(setup["root"])  # every image, detections on all
    keypoints = json.loads((out / "coco_results_keypoints.json").read_text())
    assert {r["category_id"] for r in boxes} > {PERSON}
    assert keypoints and {r["category_id"] for r in keypoints} == {PERSON}  # only the person has keypoints
    timing = json.loads((out / "timing.json").read_text())
    assert timing["images"] == 5 and timing["ranks"] == 1 and timing["images_per_s"] > 0
    printed = capsys.readouterr().out
    assert "5 images" in printed and "img/s" in printed and "keypoints" in printed


def test_evaluate_model_tta_ensemble_of_itself_equals_tta_alone(
    setup: dict, tmp_path: Path, tiny_inference_config
) -> None:
    cfg = tiny_inference_config(setup["root"], "test.max_images=2", "test.tta.flip=true")
    model = setup["model"]
    alone = evaluate_model(model, cfg, out_dir=tmp_path / "a", tta=True, progress=False)
    twice = evaluate_model([model, model], cfg, out_dir=tmp_path / "b", tta=True, progress=False)
    assert set(alone) == {"bbox", "segm", "keypoints"}
    for task in alone:
        assert alone[task]["stats"] == pytest.approx(twice[task]["stats"], abs=1e-9)
    ids = {r["image_id"] for r in json.loads((tmp_path / "a" / "coco_results_bbox.json").read_text())}
    assert len(ids) == 2  # test.max_images


# --------------------------------------------------------------------------------------------------
# Categories and image files
# --------------------------------------------------------------------------------------------------


def test_category_info_from_checkpoint_dataset_or_generic(
    setup: dict, tmp_path: Path, tiny_inference_config
) -> None:
    cfg = setup["cfg"]
    info = category_info(cfg)
    assert info.names[:3] == ["circle", "triangle", "rectangle"] and info.names[-1] == "person"
    assert info.coco_ids == list(range(1, 8))
    assert info.skeleton is not None and (15, 13) in info.skeleton  # COCO's (16, 14), 0-based
    assert info.keypoint_labels == {7}  # only persons get keypoints drawn and exported
    stored = [{"id": 10 + i, "name": f"thing{i}"} for i in range(7)]
    info = category_info(cfg, {"categories": stored})
    assert info.names[0] == "thing0" and info.coco_ids[0] == 10 and info.source == "the checkpoint"
    assert info.keypoint_labels is None  # no category says it has keypoints: every label
    elsewhere = tiny_inference_config(tmp_path / "nowhere")
    info = category_info(elsewhere)
    assert info.names == [f"class_{i}" for i in range(1, 8)] and info.skeleton is not None
    assert info.keypoint_labels is None


def test_predict_image_returns_original_coordinates(setup: dict, tmp_path: Path) -> None:
    path = next((setup["root"] / "val").glob("*.png"))
    image = read_image(path)
    pred = predict_image(setup["model"], setup["cfg"], image)
    h, w = image.shape[-2:]
    assert pred["masks"].shape[-2:] == (h, w)
    assert pred["boxes"][:, 2].max() <= w + 1e-3 and pred["boxes"][:, 3].max() <= h + 1e-3
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot decode image"):
        read_image(bad)
    with pytest.raises(DatasetError, match="not found"):
        read_image(tmp_path / "none.png")


def test_impossible_test_configs_are_config_errors() -> None:
    from megdet.config import ConfigError, load_config

    bad_tta = load_config(None, ["test.tta.min_sizes=[]", "test.tta.box_merge=mean"]).test
    bad_tta.validate()  # the TTA settings matter only with tta=True
    with pytest.raises(ConfigError, match=r"test\.tta\.min_sizes: expected a non-empty list"):
        bad_tta.validate(tta=True)
    with pytest.raises(ConfigError, match=r"test\.tta\.box_merge: unknown value 'mean'; choose one of nms, vote"):
        load_config(None, ["test.tta.box_merge=mean"]).test.validate(tta=True)
    with pytest.raises(ConfigError, match=r"test\.images_per_device: expected >= 1, got 0"):
        load_config(None, ["test.images_per_device=0"]).test.validate()


@pytest.mark.parametrize("tta", [False, True])
def test_a_missing_image_fails_before_any_prediction(setup: dict, tmp_path: Path, tiny_inference_config, tta) -> None:
    import shutil

    root = tmp_path / "data"
    shutil.copytree(setup["root"], root, ignore=shutil.ignore_patterns("run"))
    last = sorted((root / "val").glob("*.png"))[-1]
    last.unlink()
    cfg = tiny_inference_config(root)
    with pytest.raises(DatasetError, match=f"{last}: image file not found \\(1 of 5 images"):
        evaluate_model(setup["model"], cfg, tta=tta, progress=False)
    # Evaluating only the images that exist is fine.
    assert "bbox" in evaluate_model(setup["model"], tiny_inference_config(root, "test.max_images=4"), progress=False)
