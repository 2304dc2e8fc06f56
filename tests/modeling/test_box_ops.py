"""The static-shape box coding, matching, sampling and losses against torchvision's per-image originals."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import fastrcnn_loss, keypointrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import box_iou

from megdet.modeling.box_ops import (
    decode,
    encode,
    match,
    pad_boxes,
    pairwise_iou,
    random_first,
    sample_balanced,
)
from megdet.modeling.roi_heads import BoxHead, KeypointHead, RoISamples
from megdet.modeling.rpn import RPN

torch.set_num_threads(1)


def _boxes(n: int, g: torch.Generator, size: float = 100.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * size
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * size / 2 + 1], dim=1)


def test_box_coding_and_iou_equal_torchvision() -> None:
    g = torch.Generator().manual_seed(0)
    gt, boxes = _boxes(50, g), _boxes(50, g)
    weights = (10.0, 10.0, 5.0, 5.0)
    coder = det_utils.BoxCoder(weights)
    assert torch.equal(encode(gt, boxes, weights), coder.encode_single(gt, boxes))
    deltas = torch.randn(50, 4, generator=g)
    assert torch.equal(decode(deltas, boxes, weights), coder.decode_single(deltas, boxes))
    a, b = _boxes(6, g)[None].expand(3, -1, -1), _boxes(40, g)[None].expand(3, -1, -1)
    assert torch.equal(pairwise_iou(a, b)[1], box_iou(a[1], b[1]))


@pytest.mark.parametrize("low_quality", [False, True])
def test_batched_match_equals_torchvision_matcher_per_image(low_quality: bool) -> None:
    g = torch.Generator().manual_seed(1)
    gts = [_boxes(3, g), _boxes(1, g), torch.zeros(0, 4)]
    boxes = _boxes(200, g)
    gt, gt_valid = pad_boxes(gts)
    ours = match(pairwise_iou(gt, boxes[None]), gt_valid, 0.5, 0.3, low_quality)
    matcher = det_utils.Matcher(0.5, 0.3, allow_low_quality_matches=low_quality)
    for i, one in enumerate(gts[:2]):
        assert torch.equal(ours[i], matcher(box_iou(one, boxes)))
    assert (ours[2] == -1).all()  # no GT: all background


def test_balanced_sampling_counts_and_uniform_subsets() -> None:
    torch.manual_seed(0)
    # Image 0: 10 positives, 30 negatives, 10 ignored; image 1: 2 positives, 3 negatives.
    labels = torch.full((2, 50), -1)
    labels[0, :10], labels[0, 10:40] = 1, 0
    labels[1, :2], labels[1, 2:5] = 1, 0
    hits = torch.zeros(2, 50)
    draws = 2000
    for _ in range(draws):
        idx, valid = sample_balanced(labels, batch_size_per_image=16, positive_fraction=0.25)
        picked = [idx[i][valid[i]] for i in range(2)]
        for i, p in enumerate(picked):
            assert len(set(p.tolist())) == len(p)  # without replacement
            hits[i, p] += 1
        # torchvision's counts: min(#pos, 4) positives, min(#neg, 16 - that) negatives, positives first
        assert (labels[0, picked[0]] == 1).sum() == 4 and (labels[0, picked[0]] == 0).sum() == 12
        assert labels[0, picked[0][:4]].eq(1).all()
        assert sorted(picked[1].tolist()) == [0, 1, 2, 3, 4]
    freq = hits[0] / draws
    # Every candidate equally likely: 4 of 10 positives, 12 of 30 negatives (binomial sd ~0.011).
    assert torch.allclose(freq[:10], torch.full((10,), 0.4), atol=0.05)
    assert torch.allclose(freq[10:40], torch.full((30,), 0.4), atol=0.05)
    assert freq[40:].sum() == 0


def test_random_first_caps_to_a_uniform_subset() -> None:
    torch.manual_seed(0)
    cand = torch.tensor([[True, False, True, True, False, True], [False, True, False, False, False, False]])
    hits = torch.zeros(6)
    for _ in range(1000):
        order, count = random_first(cand, cap=2)
        assert count.tolist() == [2, 1] and order[1, 0] == 1
        assert cand[0, order[0, :2]].all()
        hits[order[0, :2]] += 1
    assert torch.allclose(hits[cand[0]] / 1000, torch.full((4,), 0.5), atol=0.06)
    order, count = random_first(cand, cap=0)
    assert count.tolist() == [4, 1] and order[0, :4].tolist() == [0, 2, 3, 5]


def _rpn_pair(**kw) -> tuple[RPN, RegionProposalNetwork]:
    torch.manual_seed(0)
    ours = RPN(in_channels=8, anchor_sizes=(8, 16, 32, 64, 128), **kw)
    for p in ours.parameters():  # spread-out scores: few exact ties to reorder
        torch.nn.init.normal_(p, std=0.5)
    ref = RegionProposalNetwork(
        ours.rpn.anchor_generator,
        ours.rpn.head,
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=kw["batch_size_per_image"],
        positive_fraction=0.5,
        pre_nms_top_n={"training": kw["pre_nms_top_n_train"], "testing": kw["pre_nms_top_n_test"]},
        post_nms_top_n={"training": kw["post_nms_top_n_train"], "testing": kw["post_nms_top_n_test"]},
        nms_thresh=0.7,
    )
    return ours, ref


def test_rpn_equals_torchvision_when_everything_is_sampled() -> None:
    # A sampling budget above the anchor count takes every anchor: no random draw left to differ.
    top = {"pre_nms_top_n_train": 60, "post_nms_top_n_train": 500, "pre_nms_top_n_test": 40}
    ours, ref = _rpn_pair(**top, post_nms_top_n_test=30, batch_size_per_image=10**6)
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(3, 8, math.ceil(96 / s), math.ceil(64 / s), generator=g) for s in (4, 8, 16, 32, 64)]
    sizes = [(96, 64), (90, 60), (80, 64)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 50.0], [30.0, 40.0, 60.0, 90.0]])},
               {"boxes": torch.zeros(0, 4)}, {"boxes": torch.tensor([[2.0, 3.0, 20.0, 12.0]])}]  # fmt: skip
    images = ImageList(torch.zeros(3, 3, 96, 64), sizes)
    for training in (True, False):
        ours.train(training), ref.train(training)
        with torch.no_grad():
            mine, losses = ours(images.tensors, sizes, feats, targets if training else None)
            named = {str(i): f for i, f in enumerate(feats)}
            theirs, ref_losses = ref(images, named, targets if training else None)
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for k in ref_losses:
            torch.testing.assert_close(losses[k], ref_losses[k], rtol=1e-6, atol=1e-7)


def test_box_and_keypoint_losses_equal_torchvision() -> None:
    g = torch.Generator().manual_seed(0)
    labels = [torch.tensor([0, 2, 1, 0, 3]), torch.tensor([1, 0])]
    targets = [torch.randn(5, 4, generator=g), torch.randn(2, 4, generator=g)]
    logits, deltas = torch.randn(7, 4, generator=g), torch.randn(7, 16, generator=g)
    head = BoxHead(in_channels=4, num_classes=3, fc_dim=8, pool_size=2)
    ours = head.loss(logits, deltas, RoISamples([], labels, [], targets))
    cls, box = fastrcnn_loss(logits, deltas, labels, targets)
    torch.testing.assert_close(ours["loss_classifier"], cls)
    torch.testing.assert_close(ours["loss_box_reg"], box)

    kp_head = KeypointHead(in_channels=4, num_keypoints=5, num_convs=0, pool_size=2)
    boxes = [_boxes(3, g, 40), _boxes(2, g, 40)]
    gt = [torch.cat([torch.rand(2, 5, 2, generator=g) * 60, torch.randint(0, 3, (2, 5, 1), generator=g)], 2)
          for _ in range(2)]  # fmt: skip
    gt[0][0, 0, :2] = boxes[0][1, 2:]  # a keypoint on a RoI's far corner goes to the last heatmap cell
    matched = [torch.tensor([1, 0, 1]), torch.tensor([0, 1])]
    heat = torch.randn(5, 5, 8, 8, generator=g)
    ours = kp_head.loss(heat, boxes, matched, [{"keypoints": k} for k in gt])
    torch.testing.assert_close(ours, keypointrcnn_loss(heat, boxes, gt, matched))
