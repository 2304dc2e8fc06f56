"""RoI heads and the RPN: sampling, inference post-processing, keypoint selection, losses, stage methods."""

from __future__ import annotations

import math

import pytest
import torch

from megdet.modeling.roi_heads import BoxHead, KeypointHead, MaskHead, RoIHeads, heatmaps_to_keypoints
from megdet.modeling.rpn import RPN, RPNHead

torch.set_num_threads(1)

C = 16  # feature channels


def _features(batch: int = 2, size: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, C, size // s, size // s, generator=g) for s in (4, 8, 16, 32, 64)]


def _box_head(**kw) -> BoxHead:
    args = {
        "in_channels": C,
        "num_classes": 3,
        "fc_dim": 32,
        "batch_size_per_image": 16,
        "positive_fraction": 0.25,
    }
    return BoxHead(**{**args, **kw})


def test_box_sampling_adds_gt_and_respects_the_budget() -> None:
    torch.manual_seed(0)
    head = _box_head()
    gt = torch.tensor([[10.0, 10.0, 40.0, 40.0]])
    proposals = [
        torch.cat(
            [torch.tensor([[11.0, 11.0, 41.0, 41.0], [0.0, 0.0, 8.0, 8.0]]), torch.rand(40, 4) * 20 + 40]
        ),
        torch.tensor([[0.0, 0.0, 20.0, 20.0], [30.0, 30.0, 60.0, 60.0]]),
    ]
    proposals[0][2:, 2:] += 5
    targets = [
        {"boxes": gt, "labels": torch.tensor([2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    s = head.sample(proposals, targets)
    # Image 0: at most 16 RoIs with at most 4 positives; both positives (GT + near copy) have label 2.
    assert len(s.proposals[0]) == 16
    pos = s.labels[0] > 0
    assert pos.sum() == 2 and set(s.labels[0][pos].tolist()) == {2}
    assert any(torch.equal(p, gt[0]) for p in s.proposals[0][pos])
    # The GT-as-proposal regresses to zero deltas.
    gt_row = [i for i in range(len(s.proposals[0])) if torch.equal(s.proposals[0][i], gt[0])][0]
    assert torch.allclose(s.regression_targets[0][gt_row], torch.zeros(4))
    # Image 1 (no objects): all background, still sampled.
    assert len(s.proposals[1]) == 2 and (s.labels[1] == 0).all()
    boxes, matched = s.positives()
    assert [len(b) for b in boxes] == [2, 0] and (matched[0] == 0).all()


def test_box_postprocess_threshold_nms_clip_and_topk() -> None:
    head = _box_head(score_thresh=0.3, nms_thresh=0.5, detections_per_img=2)
    proposals = [torch.tensor([[10.0, 10.0, 30.0, 30.0], [11.0, 11.0, 31.0, 31.0], [50.0, 40.0, 90.0, 70.0]])]
    logits = torch.full((3, 4), -10.0)
    logits[0, 1] = 5.0  # class 1, strong
    logits[1, 1] = 4.0  # class 1, duplicate of box 0 -> suppressed by NMS
    logits[2, 3] = 4.5  # class 3, box partly outside a 64x64 image -> clipped
    deltas = torch.zeros(3, 16)
    (det,) = head.postprocess(logits, deltas, proposals, [(64, 64)])
    assert det["labels"].tolist() == [1, 3]
    assert torch.allclose(det["boxes"][0], proposals[0][0])
    assert torch.allclose(det["boxes"][1], torch.tensor([50.0, 40.0, 64.0, 64.0]))
    assert (det["scores"] > 0.9).all()


def test_heatmaps_to_keypoints_finds_the_peak() -> None:
    heat = torch.zeros(1, 2, 56, 56)
    heat[0, 0, 14, 42] = 9.0  # keypoint 0 at heatmap (x=42, y=14)
    heat[0, 1, 50, 3] = 7.0
    box = torch.tensor([[100.0, 200.0, 156.0, 312.0]])  # 56 wide, 112 high: x scale 1, y scale 2
    kp = heatmaps_to_keypoints(heat, box)
    assert kp.shape == (1, 2, 3)
    assert abs(kp[0, 0, 0] - (100 + 42.5)) <= 1.0 and abs(kp[0, 0, 1] - (200 + 14.5 * 2)) <= 2.0
    assert abs(kp[0, 1, 0] - (100 + 3.5)) <= 1.0 and abs(kp[0, 1, 1] - (200 + 50.5 * 2)) <= 2.0
    assert kp[0, 0, 2] > kp[0, 1, 2] > 0
    assert heatmaps_to_keypoints(torch.zeros(0, 5, 56, 56), torch.zeros(0, 4)).shape == (0, 5, 3)


def _roi_heads(norm: str = "none", max_mask_keypoint_rois: int = 0) -> RoIHeads:
    common = {"in_channels": C, "pool_size": 4, "conv_dim": 8, "num_convs": 1, "norm": norm}
    return RoIHeads(
        _box_head(batch_size_per_image=32, positive_fraction=0.5),
        MaskHead(num_classes=3, **common),
        KeypointHead(num_keypoints=5, **common),
        max_mask_keypoint_rois=max_mask_keypoint_rois,
    )


def _person_targets() -> list[dict[str, torch.Tensor]]:
    kps = torch.zeros(2, 5, 3)
    kps[1, :, 0] = torch.tensor([40.0, 44, 48, 52, 56])
    kps[1, :, 1] = 45.0
    kps[1, :3, 2] = 2.0  # person: three labelled keypoints
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 5:20, 5:25] = 1
    masks[1, 35:60, 35:60] = 1
    return [
        {"boxes": torch.tensor([[5.0, 5.0, 25.0, 20.0], [35.0, 35.0, 60.0, 60.0]]), "labels": torch.tensor([1, 3]),
         "masks": masks, "keypoints": kps},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
         "masks": torch.zeros(0, 64, 64, dtype=torch.uint8), "keypoints": torch.zeros(0, 5, 3)},
    ]  # fmt: skip


def test_keypoints_train_only_on_rois_of_instances_with_labelled_keypoints(monkeypatch) -> None:
    torch.manual_seed(0)
    heads = _roi_heads().train()
    seen: list[list[torch.Tensor]] = []
    original = heads.keypoint_head.forward

    def spy(features, boxes, **kw):
        seen.append([b.clone() for b in boxes])
        return original(features, boxes, **kw)

    monkeypatch.setattr(heads.keypoint_head, "forward", spy)
    targets = _person_targets()
    proposals = [targets[0]["boxes"] + 1.0, torch.tensor([[0.0, 0.0, 30.0, 30.0]])]
    _, losses = heads(_features(), proposals, [(64, 64), (64, 64)], targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_keypoint"}
    (kp_boxes,) = seen
    assert len(kp_boxes[1]) == 0 and len(kp_boxes[0]) >= 1
    person = targets[0]["boxes"][1]
    for b in kp_boxes[0]:  # every keypoint RoI overlaps the person, none the shape
        assert b[0] >= 30 and b[1] >= 30, (b, person)
    assert losses["loss_keypoint"] > 0
    sum(losses.values()).backward()
    assert heads.keypoint_head.predictor.kps_score_lowres.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cap", [0, 2])
def test_mask_and_keypoint_rois_are_capped_per_image(monkeypatch, cap: int) -> None:
    torch.manual_seed(0)
    heads = _roi_heads(max_mask_keypoint_rois=cap).train()
    seen: dict[str, list[list[torch.Tensor]]] = {"mask": [], "keypoint": []}
    for name in seen:
        head = getattr(heads, f"{name}_head")

        def spy(features, boxes, _name=name, _orig=head.forward, **kw):
            seen[_name].append([b.clone() for b in boxes])
            return _orig(features, boxes, **kw)

        monkeypatch.setattr(head, "forward", spy)
    targets = _person_targets()
    # Six proposals around each object: all of them are foreground RoIs.
    jitter = torch.arange(6.0)[:, None] * torch.tensor([0.5, 0.5, -0.5, -0.5])
    proposals = [torch.cat([b + jitter for b in targets[0]["boxes"]]), torch.tensor([[0.0, 0.0, 30.0, 30.0]])]
    _, losses = heads(_features(), proposals, [(64, 64), (64, 64)], targets)
    (mask_boxes,), (kp_boxes,) = seen["mask"], seen["keypoint"]
    if cap == 0:  # 12 proposals + 2 GT boxes are foreground; 7 of them on the person
        assert len(mask_boxes[0]) == 14 and len(kp_boxes[0]) == 7
    else:
        assert len(mask_boxes[0]) == cap and len(kp_boxes[0]) == cap
        assert all(b[0] >= 30 for b in kp_boxes[0])  # the cap subsamples the person's RoIs only
    assert len(mask_boxes[1]) == 0 and len(kp_boxes[1]) == 0
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="max_mask_keypoint_rois"):
        _roi_heads(max_mask_keypoint_rois=-1)


def test_keypoint_loss_weight_scales_the_loss_only() -> None:
    targets = _person_targets()
    boxes = [targets[0]["boxes"][1:] + 1.0, torch.zeros(0, 4)]
    matched = [torch.tensor([0]), torch.zeros(0, dtype=torch.int64)]
    matched[0] += 1  # the person is GT 1 of image 0
    common = {"in_channels": C, "num_keypoints": 5, "pool_size": 4, "conv_dim": 8, "num_convs": 1}
    torch.manual_seed(0)
    plain = KeypointHead(**common)
    torch.manual_seed(0)
    weighted = KeypointHead(**common, loss_weight=0.25)
    feats = _features()
    a = plain.loss(plain(feats, boxes), boxes, matched, targets)
    b = weighted.loss(weighted(feats, boxes), boxes, matched, targets)
    assert a > 0 and torch.allclose(b, 0.25 * a)
    with pytest.raises(ValueError, match="KeypointHead: loss_weight must be a number >= 0"):
        KeypointHead(**common, loss_weight=-1.0)


def test_no_labelled_keypoint_gives_zero_finite_loss_with_graph() -> None:
    torch.manual_seed(0)
    heads = _roi_heads(norm="BN").train()
    targets = _person_targets()
    targets[0]["keypoints"] = torch.zeros(2, 5, 3)
    proposals = [targets[0]["boxes"] + 1.0, torch.tensor([[0.0, 0.0, 30.0, 30.0]])]
    _, losses = heads(_features(), proposals, [(64, 64), (64, 64)], targets)
    loss = losses["loss_keypoint"]
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    grad = heads.keypoint_head.predictor.kps_score_lowres.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() == 0


def test_all_empty_images_still_give_finite_losses() -> None:
    torch.manual_seed(0)
    heads = _roi_heads(norm="GN").train()
    targets = [_person_targets()[1], _person_targets()[1]]
    proposals = [torch.tensor([[0.0, 0.0, 30.0, 30.0]]), torch.tensor([[5.0, 5.0, 20.0, 40.0]])]
    _, losses = heads(_features(), proposals, [(64, 64), (64, 64)], targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"] == 0 and losses["loss_keypoint"] == 0 and losses["loss_box_reg"] == 0
    sum(losses.values()).backward()


def test_stage_methods_shapes_and_label_selection() -> None:
    torch.manual_seed(0)
    heads = _roi_heads().eval()
    feats = _features()
    boxes = [torch.tensor([[4.0, 4.0, 30.0, 30.0], [10.0, 20.0, 50.0, 60.0]]), torch.zeros(0, 4)]
    labels = [torch.tensor([1, 3]), torch.zeros(0, dtype=torch.int64)]
    with torch.no_grad():
        probs = heads.mask_probs(feats, boxes, labels)
        logits = heads.mask_head(feats, boxes)
        heat = heads.keypoint_heatmaps(feats, boxes)
        dets = heads.detect_boxes(feats, boxes, [(64, 64), (64, 64)])
    assert [tuple(p.shape) for p in probs] == [(2, 8, 8), (0, 8, 8)]
    torch.testing.assert_close(probs[0][1], logits[1, 3].sigmoid())
    assert [tuple(h.shape) for h in heat] == [(2, 5, 16, 16), (0, 5, 16, 16)]
    assert len(dets) == 2 and set(dets[0]) == {"boxes", "scores", "labels"}
    with pytest.raises(ValueError, match="no mask head"):
        RoIHeads(_box_head()).mask_probs(feats, boxes, labels)


def test_missing_target_field_is_a_one_line_error() -> None:
    heads = _roi_heads().train()
    targets = _person_targets()
    del targets[1]["masks"]
    with pytest.raises(ValueError, match=r"targets\[1\] has no 'masks'"):
        heads(_features(), [t["boxes"] for t in targets], [(64, 64)] * 2, targets)


@pytest.mark.parametrize("norm", ["none", "BN", "GN"])
def test_rpn_head_norm_is_shared_across_levels(norm: str) -> None:
    torch.manual_seed(0)
    head = RPNHead(C, num_anchors=3, conv_depth=2, norm=norm).train()
    feats = _features()
    logits, deltas = head(feats)
    assert [tuple(x.shape) for x in logits] == [(2, 3, s, s) for s in (16, 8, 4, 2, 1)]
    assert [x.shape[1] for x in deltas] == [12] * 5
    if norm == "BN":  # one set of statistics over all levels: the mean of the concatenated conv outputs
        with torch.no_grad():
            conv = [head.convs[0](f) for f in feats]
            flat = torch.cat([c.transpose(0, 1).reshape(C, -1) for c in conv], dim=1)
        bn = head.norms[0]
        torch.testing.assert_close(bn.running_mean, 0.1 * flat.mean(dim=1), rtol=1e-4, atol=1e-6)


def test_rpn_p6_anchors_use_stride_64_and_losses() -> None:
    torch.manual_seed(0)
    rpn = RPN(in_channels=C, anchor_sizes=(8, 16, 32, 64, 128), pre_nms_top_n_train=50, post_nms_top_n_train=20,
              pre_nms_top_n_test=50, post_nms_top_n_test=10, batch_size_per_image=32)  # fmt: skip
    images = torch.zeros(2, 3, 96, 64)
    feats = [torch.randn(2, C, math.ceil(96 / s), math.ceil(64 / s)) for s in (4, 8, 16, 32)]
    feats.append(feats[-1][:, :, ::2, ::2])  # 96 / 32 = 3 rows -> 2 rows of P6
    anchors = rpn.rpn.anchor_generator(
        type("L", (), {"tensors": images, "image_sizes": [(96, 64)] * 2})(), feats
    )[0]
    p6 = anchors[-feats[4].shape[-2] * feats[4].shape[-1] * 3 :]
    centres_y = ((p6[:, 1] + p6[:, 3]) / 2).unique()
    assert centres_y.tolist() == [0.0, 64.0]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 50.0]])}, {"boxes": torch.zeros(0, 4)}]
    proposals, losses = rpn.train()(images, [(96, 64), (90, 60)], feats, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert [len(p) <= 20 for p in proposals] == [True, True]
    assert proposals[1][:, 2].max() <= 60 and proposals[1][:, 3].max() <= 90  # clipped to the image size
    rpn.eval()
    with torch.no_grad():
        proposals, losses = rpn(images, [(96, 64), (96, 64)], feats)
    assert losses == {} and all(len(p) <= 10 for p in proposals)
    with pytest.raises(ValueError, match="got 4 feature maps"):
        rpn(images, [(96, 64)] * 2, feats[:4])
