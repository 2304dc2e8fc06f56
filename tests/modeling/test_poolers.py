"""Multi-level RoI pooler: FPN level assignment, order, both pooler types, empty inputs."""

from __future__ import annotations

import pytest
import torch
import torchvision

from megdet.layers import prroi_pool
from megdet.modeling.poolers import MultiLevelPooler, assign_levels

SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def _square(size: float, x: float = 10.0, y: float = 10.0) -> list[float]:
    return [x, y, x + size, y + size]


def _features(
    num_images: int = 2, channels: int = 3, size: int = 128, dtype=torch.float32
) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randn(num_images, channels, size // s, size // s, generator=gen).to(dtype)
        for s in (4, 8, 16, 32)
    ]


def test_assign_levels_hand_checked() -> None:
    # k = floor(4 + log2(sqrt(wh) / 224)), clamped to [2, 5]; returned relative to level 2.
    boxes = torch.tensor(
        [
            _square(224),  # exactly canonical -> P4
            _square(223),  # just below -> P3
            _square(112),  # half -> P3
            _square(111),  # -> P2
            _square(448),  # -> P5
            _square(2000),  # clamped to P5
            _square(8),  # clamped to P2
            [0, 0, 0, 0],  # degenerate -> finest
            [0, 0, 448, 112],  # sqrt(448 * 112) = 224 -> P4
        ]
    )
    levels = assign_levels(boxes, 2, 5, 224, 4)
    assert levels.dtype == torch.int64
    assert levels.tolist() == [2, 1, 1, 0, 3, 3, 0, 0, 2]
    # Other canonical settings shift the boundaries.
    assert assign_levels(boxes[:1], 3, 6, 112, 4).tolist() == [2]  # 224 = 2 x 112 -> level 5 -> index 2


@pytest.mark.parametrize("pooler_type", ["roialign", "prroi"])
def test_order_and_gradients_match_per_box_pooling(pooler_type: str) -> None:
    boxes = [
        torch.tensor([_square(100, 3, 4), _square(20, 50, 60), _square(120, 1, 2), _square(60, 30, 5)]),
        torch.tensor([_square(40, 5, 7), _square(127, 0, 0), _square(10, 80, 90)]),
    ]
    # canonical 32 spreads these boxes over all four levels; make sure that is the case.
    levels = assign_levels(torch.cat(boxes), 2, 5, 32, 4)
    assert set(levels.tolist()) == {0, 1, 2, 3}

    def pool_fn(feature, roi, scale):
        if pooler_type == "prroi":
            return prroi_pool(feature, roi, (5, 4), scale)
        return torchvision.ops.roi_align(feature, roi, (5, 4), scale, 2, True)

    features = [f.requires_grad_(True) for f in _features()]
    pooler = MultiLevelPooler(
        (5, 4), SCALES, sampling_ratio=2, pooler_type=pooler_type, canonical_box_size=32
    )
    out = pooler(features, boxes)
    assert out.shape == (7, 3, 5, 4)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * weights).sum(), features)

    # Reference: every box alone, at the level assign_levels picks, in the original order.
    rows = []
    for i, b in enumerate(boxes):
        for box in b:
            level = int(assign_levels(box[None], 2, 5, 32, 4)[0])
            roi = torch.cat([torch.tensor([float(i)]), box])[None]
            rows.append(pool_fn(features[level], roi, SCALES[level]))
    expected = torch.cat(rows)
    torch.testing.assert_close(out, expected)
    expected_grads = torch.autograd.grad((expected * weights).sum(), features)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_prroi_and_roialign_shapes_and_gradients() -> None:
    features = [f.requires_grad_(True) for f in _features()]
    # With canonical size 32 these land on P2, P3, P4 and P5.
    boxes = [
        torch.tensor([_square(10), _square(100, 5, 5)]),
        torch.tensor([_square(20, 20, 20), _square(40)]),
    ]
    for pooler_type in ("roialign", "prroi"):
        for f in features:
            f.grad = None
        pooler = MultiLevelPooler(7, SCALES, pooler_type=pooler_type, canonical_box_size=32)
        out = pooler(features, boxes)
        assert out.shape == (4, 3, 7, 7)
        assert out.dtype == torch.float32
        out.sum().backward()
        assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in features)


def test_zero_boxes() -> None:
    features = [f.requires_grad_(True) for f in _features()]
    for pooler_type in ("roialign", "prroi"):
        pooler = MultiLevelPooler(7, SCALES, pooler_type=pooler_type)
        out = pooler(features, [torch.zeros((0, 4)), torch.zeros((0, 4))])
        assert out.shape == (0, 3, 7, 7)
        out.sum().backward()  # an empty result must still be part of the graph
        # One image without boxes, the other with.
        out = pooler(features, [torch.zeros((0, 4)), torch.tensor([_square(50)])])
        assert out.shape == (1, 3, 7, 7)


def test_bfloat16_features_pool_in_feature_dtype() -> None:
    features32 = _features()
    features16 = [f.bfloat16() for f in features32]
    boxes = [torch.tensor([_square(30), _square(100, 5, 5)]), torch.tensor([_square(64, 20, 20)])]
    for pooler_type in ("roialign", "prroi"):
        pooler = MultiLevelPooler(7, SCALES, pooler_type=pooler_type)
        out16 = pooler(features16, boxes)
        assert out16.dtype == torch.bfloat16
        out32 = pooler([f.float() for f in features16], boxes)
        torch.testing.assert_close(out16.float(), out32, rtol=2e-2, atol=2e-2)


def test_single_level_and_errors() -> None:
    features = _features()
    pooler = MultiLevelPooler(3, [1 / 8], pooler_type="prroi")
    out = pooler([features[1]], [torch.tensor([_square(30)]), torch.tensor([_square(300)])])
    assert out.shape == (2, 3, 3, 3)
    with pytest.raises(ValueError, match="roialign, prroi"):
        MultiLevelPooler(7, SCALES, pooler_type="roipool")
    with pytest.raises(ValueError, match="consecutive"):
        MultiLevelPooler(7, [1 / 4, 1 / 16])
    with pytest.raises(ValueError, match="power of 2"):
        MultiLevelPooler(7, [1 / 3])
    pooler = MultiLevelPooler(7, SCALES)
    with pytest.raises(ValueError, match="feature maps"):
        pooler(features[:3], [torch.zeros((0, 4))] * 2)
    with pytest.raises(ValueError, match="images"):
        pooler(features, [torch.zeros((0, 4))])
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        pooler(features, [torch.zeros((2, 5)), torch.zeros((0, 4))])
