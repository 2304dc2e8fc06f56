"""Semantic segmentation evaluation: the metrics on hand-made maps, the table, TTA / ensembles of
models with a semantic branch, and evaluate_model's mIoU next to the COCO AP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megdet.data.loader import build_test_dataset
from megdet.data.synthetic import generate_synthetic_coco
from megdet.data.transforms import Compose, Normalize, ResizeShortestEdge
from megdet.evaluation.coco_eval import EvaluationError, format_eval_table
from megdet.evaluation.inference import evaluate_model
from megdet.evaluation.report import sem_seg_table
from megdet.evaluation.sem_seg_eval import SemSegEvaluator, semantic_metrics
from megdet.evaluation.tta import MultiViewPredictor, View
from megdet.modeling import build_model

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
CONTEXT = ["model.context.semantic=true", "model.context.roi_features=true", "model.context.global_context=true",
           "model.context.semantic_convs=1", "model.context.semantic_dim=16"]  # fmt: skip


def test_metrics_of_hand_made_maps() -> None:
    ev = SemSegEvaluator(4, ["a", "b", "c", "d"])
    gt = np.array([[0, 0, 1], [1, 255, 2]], np.uint8)
    pred = torch.tensor([[0, 1, 1], [1, 3, 3]])  # the prediction at the 255 pixel does not count
    ev.process(pred, gt)
    ev.process(np.zeros((1, 2), np.int64), np.zeros((1, 2), np.uint8))
    out = ev.summarize()
    # Confusion [gt, pred]: (0,0) 3, (0,1) 1, (1,1) 2, (2,3) 1. IoU a 3/4, b 2/3, c 0 (in gt), d 0
    # (only predicted); 7 labelled pixels, 5 right.
    iou = out["per_class_iou"]
    assert iou == pytest.approx({"a": 0.75, "b": 2 / 3, "c": 0.0, "d": 0.0})
    assert out["stats"]["mIoU"] == pytest.approx((0.75 + 2 / 3) / 4)
    assert out["stats"]["pixel_accuracy"] == pytest.approx(5 / 7)
    assert out["stats"]["mean_accuracy"] == pytest.approx((3 / 4 + 1 + 0) / 3)
    assert out["stats"]["fwIoU"] == pytest.approx(4 / 7 * 0.75 + 2 / 7 * 2 / 3)
    # A class neither in the ground truth nor predicted is left out of the mean (-1).
    assert semantic_metrics(np.diag([2, 0, 1]), ["x", "y", "z"])["per_class_iou"]["y"] == -1
    table = format_eval_table({"sem_seg": out})
    assert "sem_seg mIoU 35.4" in table and "d 0.0" in table
    assert "| run | mIoU |" in sem_seg_table({"TTA": {"sem_seg": out}}) and sem_seg_table({"x": {}}) == ""
    with pytest.raises(ValueError, match="outside 0..3"):
        ev.process(np.array([[4]]), np.array([[0]], np.uint8))
    with pytest.raises(ValueError, match="differ in size"):
        ev.process(np.zeros((2, 2)), np.zeros((2, 3), np.uint8))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_config) -> dict:
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic_coco(root, num_train=2, num_val=3, image_size=96, seed=0, workers=1, progress=False)
    cfg = tiny_config(root, *CONTEXT, "test.tta.min_sizes=[64]", "test.images_per_device=2")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    dataset = build_test_dataset(cfg, "val")
    dataset.transforms = Compose([Normalize(cfg.data.pixel_mean, cfg.data.pixel_std)])
    image = dataset[0][0].as_subclass(torch.Tensor)
    return {"root": root, "cfg": cfg, "model": model, "image": image, "flip_map": dataset.keypoint_flip_map}


def test_single_view_and_self_ensemble_give_the_models_label_map(setup: dict) -> None:
    model, image = setup["model"], setup["image"]
    h, w = image.shape[-2:]
    view = View(80, 200, False)
    got = MultiViewPredictor([model], [view], size_divisibility=32).predict(image)
    resized, _ = ResizeShortestEdge([view.min_size], view.max_size)(image, {})
    rh, rw = resized.shape[-2:]
    batch = torch.zeros((1, 3, -(-rh // 32) * 32, -(-rw // 32) * 32))
    batch[0, :, :rh, :rw] = resized
    with torch.no_grad():
        ref = model(batch, [(rh, rw)], original_sizes=[(h, w)])[0]
    assert got["sem_seg"].shape == ref["sem_seg"].shape == (h, w)
    assert torch.equal(got["sem_seg"], ref["sem_seg"])
    assert torch.allclose(got["scores"], ref["scores"], atol=1e-4)  # the box head got the context too

    views = [View(64, 200, False), View(64, 200, True)]
    alone = MultiViewPredictor([model], views, setup["flip_map"]).predict(image)
    twice = MultiViewPredictor([model, model], views, setup["flip_map"]).predict(image)
    assert torch.equal(alone["sem_seg"], twice["sem_seg"])


def test_a_flipped_view_is_mirrored_back(setup: dict) -> None:
    model, image, flip_map = setup["model"], setup["image"], setup["flip_map"]
    flipped = MultiViewPredictor([model], [View(64, 200, True)], flip_map).predict(image)["sem_seg"]
    mirrored = MultiViewPredictor([model], [View(64, 200, False)]).predict(image.flip(-1))["sem_seg"].flip(-1)
    assert len(torch.unique(flipped)) > 1  # a map with some structure, so that a missing mirror shows
    assert (flipped == mirrored).float().mean() > 0.99


def test_ensembles_with_and_without_a_branch(setup: dict, tiny_config) -> None:
    model, image = setup["model"], setup["image"]
    plain = build_model(tiny_config(setup["root"])).eval()
    views = [View(64, 200, False)]
    out = MultiViewPredictor([plain, model], views).predict(image)
    assert out["sem_seg"].shape == image.shape[-2:]
    assert "sem_seg" not in MultiViewPredictor([plain], views).predict(image)
    other = build_model(tiny_config(setup["root"], *CONTEXT, "model.context.num_semantic_classes=5")).eval()
    with pytest.raises(ValueError, match="numbers of semantic classes"):
        MultiViewPredictor([model, other], views)


def test_evaluate_model_reports_miou_next_to_the_ap(setup: dict, tmp_path: Path, capsys) -> None:
    model, cfg = setup["model"], setup["cfg"]
    results = evaluate_model(model, cfg, out_dir=tmp_path / "plain", tta=False)
    assert {"bbox", "segm", "keypoints", "sem_seg"} <= set(results)
    assert json.loads((tmp_path / "plain" / "eval.json").read_text())["sem_seg"] == results["sem_seg"]
    assert list(results["sem_seg"]["per_class_iou"])[:2] == ["background", "circle"]
    assert "sem_seg mIoU" in capsys.readouterr().out
    tta = evaluate_model(model, cfg, tta=True, progress=False)
    assert 0 <= tta["sem_seg"]["stats"]["mIoU"] <= 1

    # A model of other semantic classes than the dataset's labels: one line.
    other = build_model(cfg).eval()
    other.semantic_branch.num_classes = 5  # as if trained on other labels
    with pytest.raises(EvaluationError, match="predicts \\[5\\] classes but the dataset's labels have 8") as e:
        evaluate_model(other, cfg, progress=False)
    assert "\n" not in str(e.value)
