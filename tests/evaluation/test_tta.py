"""Test-time augmentation and ensembles: box merging, flip consistency, equality with the plain model.

The model is a tiny randomly initialised Mask+Keypoint R-CNN: the checks are consistency checks
(geometry, equal computations), which hold for any weights.
"""

from __future__ import annotations

import pytest
import torch

from megdet.data.loader import build_test_dataset
from megdet.data.synthetic import generate_synthetic_coco
from megdet.data.transforms import Compose, Normalize, ResizeShortestEdge
from megdet.evaluation.tta import MultiViewPredictor, View, merge_boxes, tta_views
from megdet.modeling import build_model

# pycocotools' decode trips a numpy 2 deprecation inside its Cython code; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_config) -> dict:
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic_coco(root, num_train=4, num_val=4, image_size=96, seed=0, workers=1, progress=False)
    cfg = tiny_config(root)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    dataset = build_test_dataset(cfg, "val")
    dataset.transforms = Compose([Normalize(cfg.data.pixel_mean, cfg.data.pixel_std)])
    image = dataset[0][0].as_subclass(torch.Tensor)  # normalised, original size
    return {"cfg": cfg, "model": model, "image": image, "flip_map": dataset.keypoint_flip_map}


def _close(a: dict, b: dict, keys: tuple[str, ...], atol: float = 1e-4) -> None:
    for k in keys:
        assert a[k].shape == b[k].shape, k
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol), (
            k,
            (a[k].float() - b[k].float()).abs().max(),
        )


# --------------------------------------------------------------------------------------------------
# merge_boxes on hand-made boxes
# --------------------------------------------------------------------------------------------------


def test_merge_boxes_nms_keeps_best_box_vote_averages_its_cluster() -> None:
    boxes = torch.tensor(
        [
            [10.0, 10.0, 50.0, 50.0],  # best of cluster A
            [14.0, 10.0, 54.0, 50.0],  # overlaps it by IoU 36/44 = 0.82
            [100.0, 100.0, 120.0, 120.0],  # alone
            [12.0, 12.0, 52.0, 52.0],  # overlaps the first, but another class
        ]
    )
    scores = torch.tensor([0.9, 0.3, 0.5, 0.8])
    labels = torch.tensor([1, 1, 1, 2])

    b, s, lab = merge_boxes(boxes, scores, labels, "nms", iou_thresh=0.5)
    assert s.tolist() == pytest.approx([0.9, 0.8, 0.5])
    assert lab.tolist() == [1, 2, 1]
    assert torch.equal(b, boxes[[0, 3, 2]])

    b, s, lab = merge_boxes(boxes, scores, labels, "vote", iou_thresh=0.5)
    assert s.tolist() == pytest.approx([0.9, 0.8, 0.5])  # the kept scores
    assert lab.tolist() == [1, 2, 1]
    expected_a = (0.9 * boxes[0] + 0.3 * boxes[1]) / 1.2  # score-weighted mean of cluster A
    assert torch.allclose(b[0], expected_a)
    assert torch.allclose(b[1], boxes[3])  # the other class does not vote
    assert torch.allclose(b[2], boxes[2])


def test_merge_boxes_vote_ignores_boxes_below_the_threshold_and_caps_detections() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [6.0, 0.0, 16.0, 10.0], [0.0, 0.0, 10.0, 11.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    labels = torch.tensor([1, 1, 1])
    # box 1 overlaps box 0 by IoU 40/160 = 0.25: kept by NMS, no vote; box 2 by 100/110: merged.
    b, s, _ = merge_boxes(boxes, scores, labels, "vote", iou_thresh=0.5)
    assert s.tolist() == pytest.approx([0.9, 0.8])
    assert torch.allclose(b[0], (0.9 * boxes[0] + 0.7 * boxes[2]) / 1.6)
    assert torch.allclose(b[1], boxes[1])
    b, s, _ = merge_boxes(boxes, scores, labels, "vote", iou_thresh=0.5, max_detections=1)
    assert len(b) == 1 and s.item() == pytest.approx(0.9)
    empty = merge_boxes(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.int64), "vote")
    assert all(t.shape[0] == 0 for t in empty)
    with pytest.raises(ValueError, match="unknown method 'mean'; choose one of nms, vote"):
        merge_boxes(boxes, scores, labels, "mean")


def test_tta_views() -> None:
    assert tta_views([64, 80], 100, flip=False) == [View(64, 100), View(80, 100)]
    assert tta_views([64], 100, flip=True) == [View(64, 100, False), View(64, 100, True)]


# --------------------------------------------------------------------------------------------------
# With a model
# --------------------------------------------------------------------------------------------------


def test_flip_views_give_flip_consistent_predictions(setup: dict) -> None:
    model, image, flip_map = setup["model"], setup["image"], setup["flip_map"]
    width = image.shape[-1]
    # One short side that differs from the image's, so the views also resize.
    views = [View(80, 200, False), View(80, 200, True)]
    predictor = MultiViewPredictor([model], views, flip_map)
    a = predictor.predict(image, paste_masks=False)
    b = predictor.predict(image.flip(-1), paste_masks=False)

    assert len(a["boxes"]) > 0
    assert torch.equal(a["labels"], b["labels"])
    assert torch.allclose(a["scores"], b["scores"], atol=1e-5)
    mirrored = torch.stack(
        [width - b["boxes"][:, 2], b["boxes"][:, 1], width - b["boxes"][:, 0], b["boxes"][:, 3]], 1
    )
    assert torch.allclose(a["boxes"], mirrored, atol=1e-3)
    kb = b["keypoints"][:, flip_map].clone()
    kb[..., 0] = width - kb[..., 0]
    assert torch.allclose(a["keypoints"], kb, atol=1e-3)
    assert torch.allclose(a["mask_probs"], b["mask_probs"].flip(-1), atol=1e-4)
    # The keypoint check is not vacuous: without the left/right swap the mirrored points disagree.
    unswapped = b["keypoints"].clone()
    unswapped[..., 0] = width - unswapped[..., 0]
    assert not torch.allclose(a["keypoints"], unswapped, atol=1e-3)


def test_single_view_equals_the_model_on_the_same_resized_input(setup: dict) -> None:
    model, image, cfg = setup["model"], setup["image"], setup["cfg"]
    h, w = image.shape[-2:]
    view = View(80, 200, False)
    got = MultiViewPredictor([model], [view], size_divisibility=cfg.data.size_divisibility).predict(image)

    resized, _ = ResizeShortestEdge([view.min_size], view.max_size)(image, {})
    rh, rw = resized.shape[-2:]
    assert (rh, rw) != (h, w)
    batch = torch.zeros((1, 3, -(-rh // 32) * 32, -(-rw // 32) * 32))
    batch[0, :, :rh, :rw] = resized
    with torch.no_grad():
        ref = model(batch, [(rh, rw)], original_sizes=[(h, w)])[0]
    assert len(ref["boxes"]) > 0
    assert torch.equal(got["labels"], ref["labels"])
    _close(got, ref, ("boxes", "scores", "masks", "keypoints"), atol=1e-4)
    assert got["masks"].shape[-2:] == (h, w)


def test_ensemble_of_a_model_with_itself_equals_the_model(setup: dict) -> None:
    model, image, flip_map = setup["model"], setup["image"], setup["flip_map"]
    views = [View(64, 200, False), View(64, 200, True)]
    alone = MultiViewPredictor([model], views, flip_map, box_merge="vote").predict(image)
    twice = MultiViewPredictor([model, model], views, flip_map, box_merge="vote").predict(image)
    assert len(alone["boxes"]) > 0
    assert torch.equal(alone["labels"], twice["labels"])
    _close(alone, twice, ("boxes", "scores", "masks", "keypoints"), atol=1e-5)


def test_predictor_rejects_bad_set_ups(setup: dict) -> None:
    model = setup["model"]
    with pytest.raises(ValueError, match="keypoint_flip_map"):
        MultiViewPredictor([model], [View(64, 96, True)])
    with pytest.raises(ValueError, match="permutation"):
        MultiViewPredictor([model], [View(64, 96, True)], keypoint_flip_map=[0, 1])
    with pytest.raises(ValueError, match="at least one model"):
        MultiViewPredictor([], [View(64, 96)])
    model.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            MultiViewPredictor([model], [View(64, 96)]).predict(setup["image"])
    finally:
        model.eval()
