"""The whole detector: every task combination and pooler, norms, empty images, overfitting a few
drawn images, original-size outputs, stage methods, checkpoint loading and the shipped configs."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from drawn_targets import shape_and_person
from torchvision.ops import box_iou

from megdet.config import Config, ConfigError, load_config
from megdet.modeling.detector import GeneralizedRCNN, build_model, load_model_state

torch.set_num_threads(1)

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
K = 17


def _cfg(*overrides: str) -> Config:
    small = [
        "model.backbone=resnet18", "model.fpn_channels=32", "model.num_classes=3",
        "model.rpn.anchor_sizes=[16,32,64,128,256]",
        "model.rpn.pre_nms_top_n_train=100", "model.rpn.post_nms_top_n_train=50",
        "model.rpn.pre_nms_top_n_test=100", "model.rpn.post_nms_top_n_test=30",
        "model.rpn.batch_size_per_image=64", "model.roi.batch_size_per_image=32",
        "model.roi.box_head_dim=32", "model.roi.box_conv_dim=16",
        "model.roi.mask_head_convs=1", "model.roi.mask_head_dim=16",
        "model.roi.keypoint_head_convs=2", "model.roi.keypoint_head_dim=16",
    ]  # fmt: skip
    return load_config(None, small + list(overrides))


def _batch(size: int = 64) -> tuple[torch.Tensor, list[tuple[int, int]], list[dict[str, torch.Tensor]]]:
    """Two images: one with a shape and a person (keypoints), one without any object."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, size, size, generator=g)
    full = shape_and_person(size)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, size, size, dtype=torch.uint8), "keypoints": torch.zeros(0, K, 3)}  # fmt: skip
    return images, [(size, size), (size - 8, size - 4)], [full, empty]


TASKS = {"boxes": (False, False), "masks": (True, False), "keypoints": (False, True), "all": (True, True)}
NORMS = ["BN", "GN", "FrozenBN", "CrossDeviceBN"]


@pytest.mark.parametrize("pooler", ["roialign", "prroi"])
@pytest.mark.parametrize("task", list(TASKS))
def test_train_and_eval_outputs(task: str, pooler: str) -> None:
    mask_on, kp_on = TASKS[task]
    # Each norm choice runs twice over the eight cases (trainable_layers 5: from scratch).
    norm = NORMS[(list(TASKS).index(task) * 2 + (pooler == "prroi")) % len(NORMS)]
    torch.manual_seed(0)
    cfg = _cfg(f"model.mask_on={mask_on}", f"model.keypoint_on={kp_on}", f"model.roi.pooler={pooler}",
               f"model.norm={norm}")  # fmt: skip
    model = build_model(cfg)
    assert isinstance(model, GeneralizedRCNN)
    images, sizes, targets = _batch()

    model.train()
    losses = model(images, sizes, targets)
    expected = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    expected |= {"loss_mask"} if mask_on else set()
    expected |= {"loss_keypoint"} if kp_on else set()
    assert set(losses) == expected
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    sum(losses.values()).backward()
    grads = [p.grad for p in model.roi_heads.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    model.eval()
    with torch.no_grad():
        out = model(images, sizes)
    assert len(out) == 2
    keys = (
        {"boxes", "scores", "labels"}
        | ({"masks"} if mask_on else set())
        | ({"keypoints"} if kp_on else set())
    )
    for det, (h, w) in zip(out, sizes):
        assert set(det) == keys
        n = len(det["boxes"])
        assert (
            det["boxes"].shape == (n, 4)
            and det["scores"].shape == (n,)
            and det["labels"].dtype == torch.int64
        )
        assert n <= cfg.model.roi.detections_per_img
        if n:
            assert det["labels"].min() >= 1 and det["labels"].max() <= 3
            assert det["boxes"][:, 2].max() <= w and det["boxes"][:, 3].max() <= h
        if mask_on:
            assert det["masks"].shape == (n, 1, h, w) and det["masks"].dtype == torch.float32
            assert n == 0 or (det["masks"].min() >= 0 and det["masks"].max() <= 1)
        if kp_on:
            assert det["keypoints"].shape == (n, K, 3)


def test_batch_without_any_object_trains() -> None:
    torch.manual_seed(0)
    model = build_model(_cfg("model.mask_on=true", "model.keypoint_on=true")).train()
    images, sizes, targets = _batch()
    losses = model(images, sizes, [targets[1], targets[1]])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_box_reg"] == 0 and losses["loss_mask"] == 0 and losses["loss_keypoint"] == 0
    assert losses["loss_keypoint"].requires_grad
    sum(losses.values()).backward()


def test_eval_rescales_to_original_sizes_and_stage_methods_agree() -> None:
    torch.manual_seed(0)
    model = build_model(_cfg("model.mask_on=true", "model.keypoint_on=true", "model.roi.score_thresh=0.0"))
    model.eval()
    images, sizes, _ = _batch()
    with torch.no_grad():
        plain = model(images, sizes)
        scaled = model(images, sizes, original_sizes=[(128, 32), (112, 60)])
        # The stages used by TTA / ensembles reproduce the forward pass.
        features = model.backbone(images)
        proposals = model.rpn_proposals(images, sizes, features)
        dets = model.roi_heads.detect_boxes(features, proposals, sizes)
        boxes = [d["boxes"] for d in dets]
        probs = model.roi_heads.mask_probs(features, boxes, [d["labels"] for d in dets])
        heat = model.roi_heads.keypoint_heatmaps(features, boxes)
    assert len(plain[0]["boxes"]) > 0
    for p, s, d, pr, ht, (h, w), (oh, ow) in zip(
        plain, scaled, dets, probs, heat, sizes, [(128, 32), (112, 60)]
    ):
        torch.testing.assert_close(d["boxes"], p["boxes"])
        torch.testing.assert_close(d["scores"], p["scores"])
        factor = torch.tensor([ow / w, oh / h, ow / w, oh / h])
        torch.testing.assert_close(s["boxes"], p["boxes"] * factor)
        torch.testing.assert_close(s["keypoints"][..., :2], p["keypoints"][..., :2] * factor[:2])
        torch.testing.assert_close(s["keypoints"][..., 2], p["keypoints"][..., 2])
        assert s["masks"].shape == (len(p["boxes"]), 1, oh, ow)
        assert pr.shape == (len(p["boxes"]), 28, 28) and ht.shape == (len(p["boxes"]), K, 56, 56)
    model.train()
    with pytest.raises(ValueError, match="call model.eval"):
        model.rpn_proposals(images, sizes, features)


@pytest.mark.parametrize("pooler", ["roialign", "prroi"])
def test_channels_last_layout_gives_the_same_results(pooler: str) -> None:
    cfg = _cfg("model.mask_on=true", "model.keypoint_on=true", "model.roi.score_thresh=0.0", "model.norm=GN",
               f"model.roi.pooler={pooler}")  # fmt: skip
    torch.manual_seed(0)
    nchw = build_model(cfg)
    nhwc = GeneralizedRCNN.from_config(cfg, channels_last=True)
    nhwc.load_state_dict(nchw.state_dict())
    assert nchw.backbone.body.layer1[0].conv1.weight.is_contiguous()
    conv = nhwc.backbone.body.layer1[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    images, sizes, targets = _batch()
    losses = []
    for model in (nhwc, nchw):
        torch.manual_seed(1)  # the same RoI sampling
        losses.append(model.train()(images, sizes, targets))
    for k in losses[0]:
        torch.testing.assert_close(losses[0][k], losses[1][k], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        a, b = nhwc.eval()(images, sizes), nchw.eval()(images, sizes)
    for x, y in zip(a, b):
        n = min(len(x["scores"]), len(y["scores"]), 10)  # the top detections; ties further down may reorder
        assert n > 0
        for k in ("boxes", "scores", "masks", "keypoints"):
            torch.testing.assert_close(x[k][:n], y[k][:n], rtol=1e-3, atol=1e-3)


def _toy_images(size: int = 64) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Three images with drawn red rectangles (label 1) and green discs (label 2) on a noisy background."""
    g = torch.Generator().manual_seed(0)
    f = size / 96
    layouts = [
        [("rect", (10, 12, 50, 44)), ("disc", (70, 70, 16))],
        [("disc", (30, 60, 20))],
        [("rect", (40, 10, 90, 40)), ("rect", (8, 56, 36, 90))],
    ]
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, targets = [], []
    for layout in layouts:
        img = torch.rand(3, size, size, generator=g) * 0.3
        boxes, labels = [], []
        for kind, params in layout:
            p = [round(v * f) for v in params]
            if kind == "rect":
                x1, y1, x2, y2 = p
                inside = (xx >= x1) & (xx < x2) & (yy >= y1) & (yy < y2)
                color, label, box = (1.0, 0.2, 0.2), 1, (x1, y1, x2, y2)
            else:
                cx, cy, r = p
                inside = (xx - cx + 0.5) ** 2 + (yy - cy + 0.5) ** 2 <= r * r
                color, label, box = (0.2, 1.0, 0.3), 2, (cx - r, cy - r, cx + r, cy + r)
            for c in range(3):
                img[c][inside] = color[c]
            boxes.append(box)
            labels.append(label)
        images.append((img - 0.4) / 0.3)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return torch.stack(images), targets


def test_overfits_a_few_drawn_images() -> None:
    torch.manual_seed(0)
    # GN: no train/eval statistics gap after a few steps. Frozen random stem + layer1 (trainable_layers 3)
    # make each step cheaper and still give features enough for drawn shapes.
    cfg = _cfg("model.num_classes=2", "model.norm=GN", "model.trainable_layers=3", "model.roi.box_head_dim=64",
               "model.roi.batch_size_per_image=64", "model.rpn.pre_nms_top_n_train=200",
               "model.rpn.post_nms_top_n_train=100", "model.rpn.pre_nms_top_n_test=200",
               "model.rpn.post_nms_top_n_test=50")  # fmt: skip
    model = build_model(cfg).train()
    images, targets = _toy_images()
    sizes = [tuple(images.shape[-2:])] * len(images)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.04, momentum=0.9)
    history = []
    # 100 steps: 50 were enough on the earlier sessions' AVX2 CPU, but on an AVX-512 one (other rounding)
    # an object was still missed after 50 (loss 1.24; 0.33 after 100, every object found at IoU >= 0.77).
    for _ in range(100):
        losses = model(images, sizes, targets)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert sum(history[-5:]) / 5 < 0.6 * sum(history[:3]) / 3, history
    model.eval()
    with torch.no_grad():
        out = model(images, sizes)
    for det, target in zip(out, targets):
        confident = det["scores"] > 0.5
        iou = box_iou(target["boxes"], det["boxes"][confident])
        same_label = target["labels"][:, None] == det["labels"][confident][None, :]
        best = (iou * same_label).amax(dim=1) if confident.any() else torch.zeros(len(target["boxes"]))
        assert (best > 0.5).all(), (best, det["scores"][:5], det["labels"][:5])


# --------------------------------------------------------------------------------------------------
# Checkpoints and configs
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model() -> GeneralizedRCNN:
    torch.manual_seed(0)
    return build_model(_cfg("model.mask_on=true"))


def test_load_model_state_round_trip_and_ddp_prefix(small_model: GeneralizedRCNN) -> None:
    state = {
        k: v.clone() + 1 if v.is_floating_point() else v.clone() for k, v in small_model.state_dict().items()
    }
    torch.manual_seed(1)
    other = build_model(_cfg("model.mask_on=true"))
    report = load_model_state(other, {f"module.{k}": v for k, v in state.items()})
    assert report.missing == [] and report.unexpected == [] and len(report.loaded) == len(state)
    for k, v in other.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_load_model_state_shape_mismatch_names_the_parameter(small_model: GeneralizedRCNN) -> None:
    state = dict(small_model.state_dict())
    state["roi_heads.box_head.predictor.cls_score.weight"] = torch.zeros(9, 32)
    with pytest.raises(ValueError, match=r"shape mismatch in roi_heads\.box_head\.predictor\.cls_score\.weight "
                                         r"\(checkpoint \(9, 32\), model \(4, 32\)\)") as e:  # fmt: skip
        load_model_state(small_model, state, strict=False)
    assert "\n" not in str(e.value)


def test_load_model_state_missing_and_unexpected_keys(small_model: GeneralizedRCNN) -> None:
    state = dict(small_model.state_dict())
    mask_keys = [k for k in state if k.startswith("roi_heads.mask_head.")]
    for k in mask_keys:
        del state[k]
    state["roi_heads.extra.weight"] = torch.zeros(3)
    with pytest.raises(
        ValueError, match=r"missing roi_heads\.mask_head\..*; unexpected roi_heads\.extra\.weight"
    ):
        load_model_state(small_model, state, strict=True)
    before = small_model.roi_heads.box_head.predictor.cls_score.weight.clone()
    state["roi_heads.box_head.predictor.cls_score.weight"] = before + 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = load_model_state(small_model, state, strict=False)
    assert any("missing roi_heads.mask_head" in str(w.message) for w in caught)
    assert sorted(report.missing) == sorted(mask_keys) and report.unexpected == ["roi_heads.extra.weight"]
    torch.testing.assert_close(small_model.roi_heads.box_head.predictor.cls_score.weight, before + 1)


def _norms(module: torch.nn.Module) -> set[str]:
    kinds = (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torchvision.ops.misc.FrozenBatchNorm2d)
    return {type(m).__name__ for m in module.modules() if isinstance(m, kinds)}


def test_each_part_is_built_from_its_config_section() -> None:
    model = build_model(_cfg("model.norm=FrozenBN", "model.mask_on=true", "model.roi.pooler=prroi"))
    assert _norms(model.backbone.body) == {"FoldedFrozenBN"} and not _norms(model.backbone.fpn)
    assert not _norms(model.rpn) and not _norms(model.roi_heads)  # FrozenBN: no norm in new layers
    box = model.roi_heads.box_head
    assert box.pooler.pooler_type == "prroi" and box.num_classes == 3 and model.roi_heads.keypoint_head is None
    assert model.rpn.pre_nms_top_n == {"training": 100, "testing": 100} and model.rpn.fg_iou_thresh == 0.7
    model = build_model(_cfg("model.norm=GN", "model.mask_on=true"))
    assert _norms(model.rpn) == _norms(model.roi_heads) == {"GroupNorm"} == _norms(model.backbone.fpn)
    with pytest.raises(ConfigError, match="model.norm: unknown norm 'SyncBN'"):
        build_model(_cfg("model.norm=SyncBN"))
    # model.head_norm: the FPN / RPN / RoI heads apart from the backbone's norm.
    model = build_model(_cfg("model.norm=CrossDeviceBN", "model.head_norm=GN", "model.mask_on=true"))
    assert _norms(model.backbone.body) == {"CrossDeviceBatchNorm2d"}
    assert _norms(model.backbone.fpn) == _norms(model.rpn) == _norms(model.roi_heads) == {"GroupNorm"}
    with pytest.raises(ConfigError, match="model.head_norm: unknown norm 'LN'"):
        build_model(_cfg("model.head_norm=LN"))
    with pytest.raises(ConfigError, match="model.bn_group_size: expected >= 0, got -2"):
        build_model(_cfg("model.bn_group_size=-2"))
    with pytest.raises(ValueError, match="model.roi.pooler: unknown value 'roipool'"):
        build_model(_cfg("model.roi.pooler=roipool"))
    with pytest.raises(ValueError, match="model.roi.box_head: unknown value '3fc'"):
        build_model(_cfg("model.roi.box_head=3fc"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.num_classes=0", "model.num_classes: expected >= 1, got 0"),
        ("model.fpn_channels=0", "model.fpn_channels: expected >= 1, got 0"),
        ("model.backbone=resnet7", "model.backbone: unknown value 'resnet7'; choose one of resnet10"),
        ("model.rpn.aspect_ratios=[]", "model.rpn.aspect_ratios: expected a non-empty list of positive numbers"),
        ("model.rpn.anchor_sizes=[32,0]", "model.rpn.anchor_sizes: expected a non-empty list"),
        ("model.roi.nms_thresh=1.5", "model.roi.nms_thresh: expected a value in [0, 1], got 1.5"),
        ("model.trainable_layers=6", "model.trainable_layers: expected 0..5, got 6"),
        ("model.roi.bbox_reg_weights=[1,1]", "model.roi.bbox_reg_weights: expected 4 positive numbers"),
        ("model.roi.mask_head_dim=0", "model.roi.mask_head_dim: expected >= 1"),
    ],
)
def test_impossible_model_configs_are_config_errors(override: str, message: str) -> None:
    # ConfigError (one line on the command line), raised before any layer is built.
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_model(_cfg("model.mask_on=true", override))
    # Values only the disabled keypoint head would use are not checked.
    build_model(_cfg("model.num_keypoints=0", "model.keypoint_on=false"))


def test_head_norm_and_bn_group_size_reach_the_layers() -> None:
    from megdet.layers.cross_device_bn import CrossDeviceBatchNorm2d

    model = build_model(_cfg("model.norm=CrossDeviceBN", "model.head_norm=GN", "model.bn_group_size=2",
                             "model.mask_on=true"))
    xbn = [m for m in model.modules() if isinstance(m, CrossDeviceBatchNorm2d)]
    assert xbn and all(m.group_size == 2 for m in xbn)
    assert not any(isinstance(m, CrossDeviceBatchNorm2d) for m in model.backbone.fpn.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.roi_heads.mask_head.modules())
    everywhere = build_model(_cfg("model.norm=CrossDeviceBN", "model.mask_on=true"))
    heads = [m for m in everywhere.roi_heads.modules() if isinstance(m, CrossDeviceBatchNorm2d)]
    assert heads and all(m.group_size is None for m in heads)


def test_4conv1fc_box_head_runs() -> None:
    torch.manual_seed(0)
    model = build_model(_cfg("model.roi.box_head=4conv1fc", "model.norm=GN")).train()
    images, sizes, targets = _batch()
    losses = model(images, sizes, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    convs = [m for m in model.roi_heads.box_head.head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_loads_and_builds(path: Path) -> None:
    cfg = load_config(path)
    model = build_model(cfg)
    assert model.num_classes == cfg.model.num_classes
    assert (model.roi_heads.mask_head is not None) == cfg.model.mask_on
    assert (model.roi_heads.keypoint_head is not None) == cfg.model.keypoint_on
    assert model.backbone.out_channels == cfg.model.fpn_channels
    if path.name.startswith("coco_"):
        assert (
            cfg.model.num_classes == 80
            and cfg.data.root == "/data/coco"
            and cfg.model.norm == "CrossDeviceBN"
        )
        assert cfg.data.min_size_train == [800] and cfg.data.max_size_train == 1333
        assert cfg.solver.decay_factors == [0.1, 0.1, 0.5] and cfg.solver.base_lr == 0.02
    if path.name.startswith("synth_"):
        assert cfg.model.backbone == "resnet18" and cfg.model.norm == "BN" and cfg.model.weights == ""
        assert cfg.model.num_classes == 7
