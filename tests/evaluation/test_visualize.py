"""Drawn predictions and their JSON form."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from megdet.evaluation.visualize import draw_predictions, predictions_to_json, save_png

NAMES = ["square", "disk", "person"]
COCO_IDS = [2, 5, 9]
# pycocotools' own decode trips a numpy 2 deprecation inside its Cython code; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
H, W = 64, 80


def _prediction() -> dict[str, torch.Tensor]:
    masks = torch.zeros(3, 1, H, W)
    masks[0, 0, 12:28, 12:30] = 0.9  # inside box 0
    masks[2, 0, 40:60, 50:70] = 0.9  # the low-score detection: must not be drawn
    keypoints = torch.zeros(3, 17, 3)
    keypoints[1, :, 0], keypoints[1, :, 1] = 60.0, 10.0  # every keypoint of det 1 at (60, 10)...
    keypoints[1, 0] = torch.tensor([70.0, 30.0, 0.8])  # ...but only these two are visible
    keypoints[1, 1] = torch.tensor([72.0, 40.0, 0.6])
    return {
        "boxes": torch.tensor([[10.0, 10.0, 40.0, 30.0], [55.0, 5.0, 78.0, 45.0], [45.0, 35.0, 75.0, 62.0]]),
        "scores": torch.tensor([0.93, 0.81, 0.2]),
        "labels": torch.tensor([1, 3, 2]),
        "masks": masks,
        "keypoints": keypoints,
    }


def test_draw_predictions_draws_what_passes_the_threshold() -> None:
    image = torch.full((3, H, W), 40, dtype=torch.uint8)
    before = image.clone()
    drawn = draw_predictions(image, _prediction(), NAMES, score_threshold=0.5, skeleton=[(0, 1), (1, 2)])
    assert drawn.shape == image.shape and drawn.dtype == torch.uint8
    assert torch.equal(image, before)  # the input is not drawn on
    changed = (drawn != image).any(0)
    assert changed[10, 10:41].all() and changed[10:31, 40].all()  # box 0 outline
    assert changed[20, 20]  # box 0's mask interior, blended
    assert not changed[50, 60]  # inside the low-score detection's box and mask
    assert changed[30, 70] and changed[40, 72]  # visible keypoints of det 1
    assert changed[35, 71]  # the skeleton edge between them
    assert not changed[10, 60]  # invisible keypoints (score 0) are not drawn
    # Keypoints alone, away from the boxes: an invisible keypoint stays undrawn.
    no_box = {k: v[1:2] for k, v in _prediction().items()}
    no_box["boxes"] = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    only = (draw_predictions(image, no_box, NAMES) != image).any(0)
    assert only[30, 70] and not only[10, 60]


def test_draw_predictions_without_detections() -> None:
    image = torch.randint(0, 255, (3, H, W), dtype=torch.uint8)
    empty = {
        "boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, 1, H, W), "keypoints": torch.zeros(0, 17, 3),
    }  # fmt: skip
    assert torch.equal(draw_predictions(image, empty, NAMES), image)
    assert torch.equal(draw_predictions(image, _prediction(), NAMES, score_threshold=0.99), image)
    boxes_only = {k: _prediction()[k] for k in ("boxes", "scores", "labels")}
    assert draw_predictions(image, boxes_only, NAMES).shape == (3, H, W)


def test_draw_predictions_bad_inputs() -> None:
    with pytest.raises(ValueError, match="uint8"):
        draw_predictions(torch.zeros(3, H, W), _prediction(), NAMES)
    with pytest.raises(ValueError, match="label 3 outside 1..2"):
        draw_predictions(torch.zeros(3, H, W, dtype=torch.uint8), _prediction(), NAMES[:2])
    wrong = dict(_prediction(), masks=torch.zeros(3, 1, 10, 10))
    with pytest.raises(ValueError, match="masks are"):
        draw_predictions(torch.zeros(3, H, W, dtype=torch.uint8), wrong, NAMES)


def test_save_png_round_trip(tmp_path: Path) -> None:
    image = draw_predictions(torch.zeros(3, H, W, dtype=torch.uint8), _prediction(), NAMES)
    path = save_png(image, tmp_path / "sub" / "x.png")
    assert torch.equal(torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1), image)


def test_predictions_to_json() -> None:
    items = predictions_to_json(_prediction(), NAMES, COCO_IDS, score_threshold=0.5)
    assert [it["label"] for it in items] == ["square", "person"]
    assert [it["category_id"] for it in items] == [2, 9]
    assert items[0]["score"] == pytest.approx(0.93) and items[0]["box"] == [10.0, 10.0, 40.0, 30.0]
    mask = mask_util.decode({"size": items[0]["mask"]["size"], "counts": items[0]["mask"]["counts"].encode()})
    expected = np.zeros((H, W), np.uint8)
    expected[12:28, 12:30] = 1
    assert np.array_equal(mask, expected)
    assert len(items[1]["keypoints"]) == 17 and items[1]["keypoints"][0] == pytest.approx([70.0, 30.0, 0.8])
    json.dumps(items)  # JSON-ready
    low_first = dict(_prediction(), scores=torch.tensor([0.6, 0.9, 0.7]))
    assert [it["score"] for it in predictions_to_json(low_first, NAMES, COCO_IDS)] == pytest.approx(
        [0.9, 0.7, 0.6]
    )
    boxes_only = {k: _prediction()[k] for k in ("boxes", "scores", "labels")}
    assert set(predictions_to_json(boxes_only, NAMES, COCO_IDS)[0]) == {
        "box",
        "label",
        "category_id",
        "score",
    }


def test_keypoints_only_for_keypoint_categories() -> None:
    """The keypoint head predicts keypoints for every box; only persons' are drawn and exported."""
    image = torch.full((3, H, W), 40, dtype=torch.uint8)
    pred = _prediction()
    # A visible keypoint of the "square", inside its box but outside its mask.
    pred["keypoints"][0, 0] = torch.tensor([34.0, 28.0, 0.9])
    drawn = (draw_predictions(image, pred, NAMES, keypoint_labels={3}) != image).any(0)
    assert drawn[30, 70] and drawn[40, 72]  # the person's (label 3) keypoints
    assert not drawn[28, 34]
    everything = (draw_predictions(image, pred, NAMES) != image).any(0)
    assert everything[28, 34]  # without the filter, the square's keypoint is drawn too
    items = predictions_to_json(pred, NAMES, COCO_IDS, keypoint_labels={3})
    assert "keypoints" not in items[0] and len(items[1]["keypoints"]) == 17
    assert "keypoints" in predictions_to_json(pred, NAMES, COCO_IDS)[0]
