"""Detection transforms: flips, resizing, normalisation and their effect on boxes, masks, keypoints."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from megdet.config import DataConfig
from megdet.data.transforms import Normalize, RandomHorizontalFlip, ResizeShortestEdge, build_transforms

COCO_FLIP = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
NOSE, LEFT_EYE, RIGHT_EYE, LEFT_ANKLE = 0, 1, 2, 15


def _sample(h: int = 30, w: int = 40):
    g = torch.Generator().manual_seed(0)
    image = tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor([[5.0, 5, 15, 25], [20, 2, 36, 10]]), format="XYXY", canvas_size=(h, w)
    )
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    masks[0, 5:25, 5:15] = 1
    masks[1, 2:10, 20:36] = 1
    masks[1, 3, 21] = 0  # asymmetric, so a wrong flip shows
    kp = torch.zeros(2, 17, 3)
    kp[0, NOSE] = torch.tensor([10.0, 8, 2])
    kp[0, LEFT_EYE] = torch.tensor([12.0, 7, 2])
    kp[0, RIGHT_EYE] = torch.tensor([8.0, 7, 1])
    kp[0, LEFT_ANKLE] = torch.tensor([13.0, 24, 2])
    target = {
        "image_id": 1,
        "boxes": boxes,
        "labels": torch.tensor([1, 2]),
        "masks": tv_tensors.Mask(masks),
        "keypoints": kp,
    }
    return image, target


def test_flip_twice_is_identity():
    image, target = _sample()
    flip = RandomHorizontalFlip(1.0, COCO_FLIP)
    once_image, once = flip(image, target)
    twice_image, twice = flip(once_image, once)
    assert not torch.equal(once_image, image)
    assert torch.equal(twice_image, image)
    torch.testing.assert_close(twice["boxes"], target["boxes"])
    assert torch.equal(twice["masks"], target["masks"])
    torch.testing.assert_close(twice["keypoints"], target["keypoints"])


def test_flip_hand_checked():
    image, target = _sample(30, 40)
    out_image, out = RandomHorizontalFlip(1.0, COCO_FLIP)(image, target)
    assert torch.equal(out_image, image.flip(-1))
    torch.testing.assert_close(
        out["boxes"].as_subclass(torch.Tensor), torch.tensor([[25.0, 5, 35, 25], [4, 2, 20, 10]])
    )
    assert torch.equal(out["masks"], target["masks"].flip(-1))
    kp = out["keypoints"][0]
    torch.testing.assert_close(kp[NOSE], torch.tensor([30.0, 8, 2]))
    # The old right eye (8, 7, v=1) mirrored to x = 32 is now the left eye, and vice versa.
    torch.testing.assert_close(kp[LEFT_EYE], torch.tensor([32.0, 7, 1]))
    torch.testing.assert_close(kp[RIGHT_EYE], torch.tensor([28.0, 7, 2]))
    torch.testing.assert_close(kp[16], torch.tensor([27.0, 24, 2]))  # right_ankle <- left_ankle
    assert not kp[LEFT_ANKLE].any()  # v = 0 stays (0, 0, 0), not (40, 0, 0)
    assert not out["keypoints"][1].any()


def test_flip_probability_zero_and_missing_flip_map():
    image, target = _sample()
    same_image, same = RandomHorizontalFlip(0.0, COCO_FLIP)(image, target)
    assert same_image is image and same is target
    with pytest.raises(ValueError, match="flip_map"):
        RandomHorizontalFlip(1.0)(image, target)


@pytest.mark.parametrize(
    ("h", "w", "short", "max_size", "expected"),
    [
        (30, 40, 60, 1000, (60, 80)),
        (40, 30, 60, 1000, (80, 60)),
        (30, 40, 60, 70, (52, 70)),
        (10, 100, 20, 150, (15, 150)),
    ],
)
def test_resize_honours_min_and_max_size(h, w, short, max_size, expected):
    image, target = _sample(h, w)
    target["boxes"] = tv_tensors.BoundingBoxes(
        torch.tensor([[0.0, 0, w, h]]), format="XYXY", canvas_size=(h, w)
    )
    target["masks"] = tv_tensors.Mask(torch.ones(1, h, w, dtype=torch.uint8))
    target["keypoints"] = torch.tensor([[[w / 2, h / 2, 2.0]] + [[0.0, 0, 0]] * 16])
    out_image, out = ResizeShortestEdge([short], max_size)(image, target)
    nh, nw = expected
    assert tuple(out_image.shape[-2:]) == expected
    assert min(nh, nw) == short or max(nh, nw) == max_size
    assert out["scale"] == pytest.approx((nh / h, nw / w))
    torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), torch.tensor([[0.0, 0, nw, nh]]))
    assert out["masks"].shape == (1, nh, nw) and bool(out["masks"].all())
    torch.testing.assert_close(out["keypoints"][0, 0], torch.tensor([w / 2 * nw / w, h / 2 * nh / h, 2.0]))
    assert not out["keypoints"][0, 1:].any()


def test_resize_draws_every_short_side():
    image, target = _sample()
    resize = ResizeShortestEdge([20, 24, 28], 1000)
    torch.manual_seed(0)
    seen = {int(resize(image, target)[0].shape[-2]) for _ in range(40)}
    assert seen == {20, 24, 28}


def test_boxes_stay_inside_image_after_resize_and_flip():
    image, target = _sample(30, 40)
    target["boxes"] = tv_tensors.BoundingBoxes(
        torch.tensor([[-3.0, -2, 45, 31], [38, 28, 41, 33]]), format="XYXY", canvas_size=(30, 40)
    )
    cfg = DataConfig(min_size_train=[45], max_size_train=100, flip_prob=1.0)
    _, out = build_transforms(cfg, train=True, flip_map=COCO_FLIP)(image, target)
    boxes = out["boxes"]
    h, w = boxes.canvas_size
    assert (h, w) == (45, 60)
    assert (
        bool((boxes >= 0).all()) and bool((boxes[:, 0::2] <= w).all()) and bool((boxes[:, 1::2] <= h).all())
    )
    torch.testing.assert_close(boxes[0].as_subclass(torch.Tensor), torch.tensor([0.0, 0, 60, 45]))


def test_normalize():
    image, target = _sample()
    out, same = Normalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.5])(image, target)
    assert out.dtype == torch.float32 and same is target
    expected = (image.float() / 255 - torch.tensor([0.5, 0.4, 0.3])[:, None, None]) / torch.tensor(
        [0.2, 0.25, 0.5]
    )[:, None, None]
    torch.testing.assert_close(out.as_subclass(torch.Tensor), expected)


def test_build_transforms_test_pipeline_is_deterministic():
    cfg = DataConfig(min_size_test=36, max_size_test=100, flip_prob=1.0)
    image, target = _sample(30, 40)
    pipeline = build_transforms(cfg, train=False)
    a_image, a = pipeline(image, target)
    b_image, _ = pipeline(image, target)
    assert tuple(a_image.shape) == (3, 36, 48) and torch.equal(a_image, b_image)
    # No flip at test time: the first box only scales.
    torch.testing.assert_close(a["boxes"][0].as_subclass(torch.Tensor), torch.tensor([6.0, 6, 18, 30]))
