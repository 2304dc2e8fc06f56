"""The semantic branch (fused features, loss ignoring 255, label maps at any size) and the context it
gives the RoI heads (pooled RoI features, global vector), alone and inside the detector."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from drawn_targets import shape_and_person

from megdet.config import ConfigError, load_config
from megdet.data.semantic import label_map_from_instances
from megdet.modeling.detector import build_model
from megdet.modeling.semantic import (
    RoIContext,
    SemanticBranch,
    SemanticContext,
    masked_image_mean,
    resize_logits,
)

torch.set_num_threads(1)

CONTEXT = ["model.context.semantic=true", "model.context.roi_features=true", "model.context.global_context=true"]


def _pyramid(b: int, c: int, h: int, w: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, c, h // s, w // s, generator=g) for s in (4, 8, 16, 32, 64)]


@pytest.mark.parametrize("stride", [4, 8, 16])
def test_fused_features_shapes(stride: int) -> None:
    branch = SemanticBranch(in_channels=16, num_classes=5, stride=stride, num_convs=2, conv_dim=8,
                            context_channels=16, global_context=True)  # fmt: skip
    feats = _pyramid(2, 16, 128, 96)
    assert branch.fuse(feats).shape == (2, 8, 128 // stride, 96 // stride)
    ctx = branch(feats, [(128, 96), (100, 70)])
    assert ctx.stride == stride
    assert ctx.logits.shape == (2, 5, 128 // stride, 96 // stride)
    assert ctx.features is not None and ctx.features.shape == (2, 16, 128 // stride, 96 // stride)
    assert ctx.global_features is not None and ctx.global_features.shape == (2, 16)
    # Without context: no embedding (DDP would find it unused), logits only.
    plain = SemanticBranch(in_channels=16, num_classes=5, stride=stride, num_convs=0, conv_dim=8)
    out = plain(feats, [(128, 96)] * 2)
    assert plain.embedding is None and out.features is None and out.global_features is None


def test_loss_ignores_255_and_the_padding() -> None:
    torch.manual_seed(0)
    branch = SemanticBranch(in_channels=4, num_classes=3, stride=8, loss_weight=0.5)
    logits = torch.randn(2, 3, 6, 5, requires_grad=True)
    sizes = [(48, 40), (30, 21)]  # the second image pads the batch beyond its 4 x 3 cells
    labels = [torch.randint(0, 3, s, dtype=torch.uint8) for s in sizes]
    labels[0][:16] = 255  # the first two rows of cells of image 0 are unlabelled
    loss = branch.loss(logits, [{"sem_seg": lab} for lab in labels], sizes)

    # The reference: each cell's centre pixel (4 + 8 i), only labelled cells inside the image, averaged.
    terms = []
    for b, lab in enumerate(labels):
        for i in range(4, lab.shape[0], 8):
            for j in range(4, lab.shape[1], 8):
                if lab[i, j] != 255:
                    terms.append(F.cross_entropy(logits[b, :, i // 8, j // 8][None], lab[i, j].long()[None]))
    assert torch.allclose(loss, 0.5 * torch.stack(terms).mean())
    loss.backward()
    grad = logits.grad.abs().sum(dim=1)
    assert (grad[0, :2] == 0).all() and (grad[0, 2:] > 0).all()  # ignored rows of cells
    assert (grad[1, 4:] == 0).all() and (grad[1, :, 3:] == 0).all() and (grad[1, :4, :3] > 0).all()  # padding

    # Nothing labelled: 0, finite and attached to the graph.
    empty = branch.loss(logits, [{"sem_seg": torch.full(s, 255, dtype=torch.uint8)} for s in sizes], sizes)
    assert empty.item() == 0 and empty.requires_grad
    with pytest.raises(ValueError, match="has no 'sem_seg'"):
        branch.loss(logits, [{}, {}], sizes)
    with pytest.raises(ValueError, match=r"\(30, 21\) but the image is \(30, 20\)"):
        branch.loss(logits, [{"sem_seg": lab} for lab in labels], [(48, 40), (30, 20)])


def test_resize_logits_is_bilinear_resampling_of_the_image_area() -> None:
    logits = torch.randn(3, 5, 7)
    # The whole map is image: an integer upscale equals torch's bilinear interpolation (half-pixel centres).
    ref = F.interpolate(logits[None], scale_factor=8, mode="bilinear", align_corners=False)[0]
    assert torch.allclose(resize_logits(logits, 8, (40, 56), (40, 56)), ref, atol=1e-5)
    # Only the image's part of a padded map is resampled (here its top-left 2 x 3 cells, to 10 x 9).
    part = resize_logits(logits, 8, (16, 24), (10, 9))
    ref = F.interpolate(logits[None, :, :2, :3], size=(10, 9), mode="bilinear", align_corners=False)[0]
    assert part.shape == (3, 10, 9)
    assert torch.allclose(part[:, 2:-2, 2:-2], ref[:, 2:-2, 2:-2], atol=1e-5)  # the border sees the padding


def test_global_mean_covers_each_image_only() -> None:
    x = torch.zeros(2, 1, 4, 4)
    x[:, :, :2, :2] = 1.0
    x[1, :, 3, 3] = 100.0  # padding of image 1 (its 10 x 12 pixels reach 2 x 2 cells at stride 8)
    out = masked_image_mean(x, [(32, 32), (10, 12)], 8)
    assert torch.allclose(out[:, 0], torch.tensor([0.25, 1.0]))


def test_roi_context_adds_pooled_features_and_the_global_vector() -> None:
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 8.0, 40.0, 32.0]]), torch.tensor([[4.0, 4.0, 20.0, 12.0]])]
    pooled = torch.randn(3, 4, 7, 7)
    features = torch.full((2, 4, 6, 6), 2.0)
    features[1] = -1.0
    ctx = SemanticContext(logits=torch.zeros(2, 3, 6, 6), stride=8, features=features,
                          global_features=torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))  # fmt: skip
    for pooler_type in ("roialign", "prroi"):
        rc = RoIContext(pool_size=7, stride=8, pooler_type=pooler_type, global_channels=4, representation_dim=5)
        # A constant map pools to its value: each RoI gets its own image's.
        out = rc.add_roi_features(pooled, ctx, boxes)
        assert torch.allclose(out - pooled, torch.tensor([2.0, 2.0, -1.0]).view(3, 1, 1, 1).expand_as(pooled))
    rep = torch.randn(3, 5)
    assert torch.equal(rc.add_global(rep, ctx, boxes), rep)  # the projection starts at zero
    with torch.no_grad():
        rc.global_proj.weight.copy_(torch.arange(20.0).view(5, 4))
    expected = rep + torch.stack([torch.arange(0.0, 20, 4)] * 2 + [torch.arange(1.0, 20, 4)])
    assert torch.allclose(rc.add_global(rep, ctx, boxes), expected)
    with pytest.raises(ValueError, match="semantic context"):
        rc.add_roi_features(pooled, None, boxes)


def _cfg(*overrides: str):
    small = [
        "model.backbone=resnet18", "model.fpn_channels=32", "model.num_classes=3",
        "model.rpn.pre_nms_top_n_train=100", "model.rpn.post_nms_top_n_train=50",
        "model.rpn.pre_nms_top_n_test=100", "model.rpn.post_nms_top_n_test=30",
        "model.roi.batch_size_per_image=32", "model.roi.box_head_dim=32",
        "model.roi.mask_head_convs=1", "model.roi.mask_head_dim=16", "model.mask_on=true",
        "model.context.semantic_convs=1", "model.context.semantic_dim=16",
    ]  # fmt: skip
    return load_config(None, small + list(overrides))


def _targets(size: int = 64) -> list[dict[str, torch.Tensor]]:
    full = shape_and_person(size)
    full = {k: v for k, v in full.items() if k != "keypoints"}
    full["labels"] = full["labels"].clamp(max=3)
    full["sem_seg"] = torch.from_numpy(label_map_from_instances(full["masks"].numpy(), full["labels"].tolist(), (size, size)))
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, size - 8, size - 4, dtype=torch.uint8),
             "sem_seg": torch.zeros(size - 8, size - 4, dtype=torch.uint8)}  # fmt: skip
    return [full, empty]


@pytest.mark.parametrize("norm", ["BN", "CrossDeviceBN"])
def test_detector_with_context_trains_and_predicts_label_maps(norm: str) -> None:
    torch.manual_seed(0)
    model = build_model(_cfg(*CONTEXT, f"model.norm={norm}", "model.roi.pooler=prroi"))
    assert model.roi_heads.box_head.context is not None and model.roi_heads.mask_head.context is not None
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    sizes = [(64, 64), (56, 60)]
    losses = model.train()(images, sizes, _targets())
    assert "loss_sem_seg" in losses and torch.isfinite(losses["loss_sem_seg"])
    sum(losses.values()).backward()
    # Every parameter takes part (DDP's find_unused_parameters=False), the branch's and the context's too.
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    model.eval()
    with torch.no_grad():
        out = model(images, sizes, original_sizes=[(128, 120), (28, 30)])
    assert out[0]["sem_seg"].shape == (128, 120) and out[1]["sem_seg"].shape == (28, 30)
    assert out[0]["sem_seg"].dtype == torch.int64 and 0 <= int(out[0]["sem_seg"].min()) <= int(out[0]["sem_seg"].max()) < 4


def test_context_reaches_the_box_and_mask_heads() -> None:
    torch.manual_seed(0)
    model = build_model(_cfg(*CONTEXT)).eval()
    with torch.no_grad():
        model.roi_heads.box_head.context.global_proj.weight.normal_()
        images = torch.randn(2, 3, 64, 64)
        sizes = [(64, 64), (64, 64)]
        features = model.backbone(images)
        ctx = model.semantic_context(features, sizes)
        boxes = [torch.tensor([[4.0, 4.0, 40.0, 36.0]]), torch.tensor([[10.0, 0.0, 60.0, 30.0]])]
        logits, _ = model.roi_heads.box_head(features, boxes, context=ctx)
        masks = model.roi_heads.mask_probs(features, boxes, [torch.tensor([1]), torch.tensor([2])], ctx)
        for change in ("features", "global_features"):
            other = copy.copy(ctx)
            setattr(other, change, getattr(ctx, change) + 1.0)
            changed, _ = model.roi_heads.box_head(features, boxes, context=other)
            assert not torch.allclose(changed, logits), change
        other = copy.copy(ctx)
        other.features = ctx.features + 1.0
        assert not torch.allclose(model.roi_heads.mask_probs(features, boxes, [torch.tensor([1]), torch.tensor([2])], other)[0], masks[0])
        with pytest.raises(ValueError, match="semantic context"):
            model.roi_heads.detect_boxes(features, [b.repeat(3, 1) for b in boxes], sizes)

    # The branch alone (no context): no RoI context, no embedding; the heads are the plain ones.
    plain = build_model(_cfg("model.context.semantic=true"))
    assert plain.semantic_branch is not None and plain.semantic_branch.embedding is None
    assert plain.roi_heads.box_head.context is None and plain.roi_heads.mask_head.context is None
    assert build_model(_cfg()).semantic_branch is None


def test_context_adds_no_host_sync_to_a_training_step(monkeypatch: pytest.MonkeyPatch) -> None:
    import test_host_sync as hs

    torch.manual_seed(0)
    model = build_model(hs._cfg("model.mask_on=true", *CONTEXT))
    images, sizes, targets = hs._batch()
    for t, (h, w) in zip(targets, sizes):
        t["sem_seg"] = torch.from_numpy(label_map_from_instances(t["masks"][:, :h, :w].numpy(), t["labels"].tolist(), (h, w)))
    model.train()
    model(images, sizes, targets)
    with hs.count_syncs(monkeypatch) as counter:
        sum(model(images, sizes, targets).values()).backward()
    summary = f"{counter.total_syncs} syncs {dict(counter.syncs)}"
    assert counter.syncs.pop("torchvision.nms.default") == len(images), summary
    assert counter.total_syncs <= hs.SYNC_BUDGET, summary


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.context.roi_features=true"], "set model.context.semantic=true"),
        (["model.context.semantic=true", "data.sem_seg_dir=maps"], "model.context.num_semantic_classes: set it"),
        (["model.context.semantic=true", "model.context.semantic_stride=64"], "semantic_stride"),
        (["model.context.semantic=true", "model.context.num_semantic_classes=300"], "expected 2..255"),
        (["model.context.semantic=true", "model.context.semantic_loss_weight=-1"], "semantic_loss_weight"),
    ],
)
def test_impossible_context_configs_are_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model(_cfg(*overrides))
