"""Conversion of torchvision and detectron2 weights (megdet/modeling/convert): equal predictions for
torchvision's three R50-FPN detectors, tensor-by-tensor maps for detectron2 and MSRA files, safe
pickles, and one-line refusals. Every source tensor holds its own random values, so a tensor mapped to
the wrong place changes a prediction or fails an equality."""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from megdet.config import apply_overrides, load_config
from megdet.evaluation.predict import predict_image
from megdet.modeling.backbone import RESNETS, ResNetBody, load_backbone_weights
from megdet.modeling.convert import WeightsError, convert_state, load_converted, read_weights, resnet_name
from megdet.modeling.convert.checkpoint import SOURCE_SETTINGS, converted_checkpoint, source_config
from megdet.modeling.detector import build_model

H, W = 64, 128  # multiples of 64: torchvision infers P6's stride as 64 too
TV_SETTINGS = {"min_size": H, "max_size": W, "rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_test": 50,
               "box_detections_per_img": 10}  # fmt: skip
MEGDET_SETTINGS = [f"data.min_size_test={H}", f"data.max_size_test={W}", "model.rpn.pre_nms_top_n_test=200",
                   "model.rpn.post_nms_top_n_test=50", "model.roi.detections_per_img=10"]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Skips the random initialisation of modules built inside (every tensor is loaded afterwards)."""
    names = ("kaiming_normal_", "kaiming_uniform_", "normal_", "uniform_", "constant_", "zeros_", "ones_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda t, *args, **kwargs: t)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def _image(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _randomize(tv: torch.nn.Module, image: torch.Tensor) -> None:
    """Distinct values in every tensor: random BN affines and biases, and BN statistics measured on
    ``image`` (so that activations keep a sensible scale through the 50 layers)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.4 + 0.8)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
                m.momentum = None  # the running statistics become those of the one batch
                m.reset_running_stats()
            elif isinstance(getattr(m, "bias", None), torch.nn.Parameter):
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
        tv.backbone.body.train()
        tv.backbone.body(tv.transform([image.float() / 255])[0].tensors)
    tv.eval()


def _assert_same(ours: dict, theirs: dict, atol: float) -> None:
    assert len(theirs["boxes"]) > 0 and len(ours["boxes"]) == len(theirs["boxes"])
    assert torch.equal(ours["labels"], theirs["labels"])
    torch.testing.assert_close(ours["scores"].double(), theirs["scores"].double(), rtol=0, atol=atol)
    torch.testing.assert_close(ours["boxes"].double(), theirs["boxes"].double(), rtol=0, atol=atol * 100)
    if "masks" in theirs:
        torch.testing.assert_close(ours["masks"].double(), theirs["masks"].double(), rtol=0, atol=atol * 10)
    if "keypoints" in theirs:
        xy = ours["keypoints"][..., :2].double()
        torch.testing.assert_close(xy, theirs["keypoints"][..., :2].double(), rtol=0, atol=atol * 100)
        torch.testing.assert_close(ours["keypoints"][..., 2].double(), theirs["keypoints_scores"].double(),
                                   rtol=0, atol=atol * 10)  # fmt: skip


@pytest.mark.parametrize(
    ("name", "num_classes", "detections"),
    # The keypoint head (8 convs of 512 channels per box) dominates the time: fewer boxes there.
    [("fasterrcnn_resnet50_fpn", 5, 10), ("maskrcnn_resnet50_fpn", 5, 10), ("keypointrcnn_resnet50_fpn", 2, 3)],
)
def test_torchvision_detector_predicts_the_same_after_conversion(name: str, num_classes: int, detections: int) -> None:
    torch.manual_seed(0)
    image = _image()
    tv = getattr(torchvision.models.detection, name)(
        weights=None, weights_backbone=None, num_classes=num_classes,
        **{**TV_SETTINGS, "box_detections_per_img": detections},
    )  # fmt: skip
    _randomize(tv, image)
    conv = convert_state(tv.state_dict())
    assert conv.source == "torchvision" and all(k.endswith("num_batches_tracked") for k in conv.ignored)
    cfg = apply_overrides(source_config(conv), [*MEGDET_SETTINGS, f"model.roi.detections_per_img={detections}"])
    m = cfg.model
    assert (m.backbone, m.num_classes, m.mask_on, m.keypoint_on) == (
        "resnet50", num_classes - 1, "mask" in name, "keypoint" in name
    )
    assert (m.norm, m.roi.aligned, m.rpn.round_anchors, m.stride_in_1x1) == ("FrozenBN", False, True, False)
    with _no_init():
        model = build_model(cfg).eval()
    report = load_converted(model, conv, allow_new_heads=False)
    assert not (report.reinitialised or report.initialised or report.left)

    if not name.startswith("keypoint"):  # the same transform for all three: checked twice is enough
        # The whole pipeline in float32: megdet's test transform and model against torchvision's.
        with torch.no_grad():
            _assert_same(predict_image(model, cfg, image), tv([image.float() / 255])[0], atol=1e-3)
    # The model alone in float64 on torchvision's transformed batch: tight.
    tv.double()
    model.double()
    x = image.double() / 255
    with torch.no_grad():
        batch, _ = tv.transform([x])
        theirs = tv([x])[0]
        ours = model(batch.tensors, batch.image_sizes, original_sizes=[(H, W)])[0]
        _assert_same(ours, theirs, atol=1e-6)
        if name.startswith("faster"):
            # The check catches one tensor in the wrong place: swap two of the same shape.
            state = model.state_dict()
            a, b = "backbone.body.layer3.2.bn1.running_var", "backbone.body.layer3.2.bn2.running_var"
            model.load_state_dict({a: state[b].clone(), b: state[a].clone()}, strict=False)
            wrong = model(batch.tensors, batch.image_sizes, original_sizes=[(H, W)])[0]
            with pytest.raises(AssertionError):
                _assert_same(wrong, theirs, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# detectron2
# --------------------------------------------------------------------------------------------------

R50_BLOCKS = (3, 4, 6, 3)


def detectron2_r50_fpn(
    num_classes: int = 3, fpn: int = 32, fc: int = 64, mask_dim: int = 16, kp_dim: int = 16
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A detectron2 R50-FPN Mask + Keypoint R-CNN state_dict in detectron2's names and layout (narrow
    heads), every tensor its own random values, and what each megdet tensor must hold after
    conversion (written out here, independently of megdet's name maps)."""
    g = torch.Generator().manual_seed(3)
    d2: dict[str, torch.Tensor] = {}
    expect: dict[str, torch.Tensor] = {}

    def put(d2_name: str, shape: tuple[int, ...], ours: str | None, change=lambda t: t) -> None:
        t = torch.randn(shape, generator=g)
        if d2_name.endswith("running_var"):
            t = t.abs() + 0.5
        d2[d2_name] = t
        if ours is not None:
            expect[ours] = change(t)

    def conv_norm(d2_prefix: str, ours_conv: str, ours_norm: str, shape: tuple[int, ...]) -> None:
        put(f"{d2_prefix}.weight", shape, f"{ours_conv}.weight")
        for p in ("weight", "bias", "running_mean", "running_var"):
            put(f"{d2_prefix}.norm.{p}", (shape[0],), f"{ours_norm}.{p}")

    bgr_to_rgb = lambda t: t.flip(1)  # noqa: E731
    put("backbone.bottom_up.stem.conv1.weight", (64, 3, 7, 7), "backbone.body.stem.conv1.weight", bgr_to_rgb)
    for p in ("weight", "bias", "running_mean", "running_var"):
        put(f"backbone.bottom_up.stem.conv1.norm.{p}", (64,), f"backbone.body.stem.bn1.{p}")
    channels, in_ch = [], 64
    for stage, blocks in zip(range(2, 6), R50_BLOCKS):
        width = 64 * 2 ** (stage - 2)
        for b in range(blocks):
            src, dst = f"backbone.bottom_up.res{stage}.{b}", f"backbone.body.layer{stage - 1}.{b}"
            cin = in_ch if b == 0 else 4 * width
            for j, shape in ((1, (width, cin, 1, 1)), (2, (width, width, 3, 3)), (3, (4 * width, width, 1, 1))):
                conv_norm(f"{src}.conv{j}", f"{dst}.conv{j}", f"{dst}.bn{j}", shape)
            if b == 0:
                conv_norm(f"{src}.shortcut", f"{dst}.downsample.0", f"{dst}.downsample.1", (4 * width, cin, 1, 1))
        in_ch = 4 * width
        channels.append(in_ch)
    for level, c in zip(range(2, 6), channels):
        for p, shape in (("weight", (fpn, c, 1, 1)), ("bias", (fpn,))):
            put(f"backbone.fpn_lateral{level}.{p}", shape, f"backbone.fpn.inner_blocks.{level - 2}.0.{p}")
        for p, shape in (("weight", (fpn, fpn, 3, 3)), ("bias", (fpn,))):
            put(f"backbone.fpn_output{level}.{p}", shape, f"backbone.fpn.layer_blocks.{level - 2}.0.{p}")
    rpn = "proposal_generator.rpn_head"
    for src, dst, out, k in (("conv", "convs.0", fpn, 3), ("objectness_logits", "cls_logits", 3, 1),
                             ("anchor_deltas", "bbox_pred", 12, 1)):  # fmt: skip
        put(f"{rpn}.{src}.weight", (out, fpn, k, k), f"rpn.rpn.head.{dst}.weight")
        put(f"{rpn}.{src}.bias", (out,), f"rpn.rpn.head.{dst}.bias")
    for src, dst, shape in (("fc1", "fc6", (fc, fpn * 49)), ("fc2", "fc7", (fc, fc))):
        put(f"roi_heads.box_head.{src}.weight", shape, f"roi_heads.box_head.head.{dst}.weight")
        put(f"roi_heads.box_head.{src}.bias", shape[:1], f"roi_heads.box_head.head.{dst}.bias")
    k = num_classes
    background_first = lambda t: torch.cat([t[k:], t[:k]])  # noqa: E731  (detectron2: background last)
    zero_background = lambda n: lambda t: torch.cat([torch.zeros(n, *t.shape[1:]), t])  # noqa: E731
    pred = "roi_heads.box_head.predictor"
    put("roi_heads.box_predictor.cls_score.weight", (k + 1, fc), f"{pred}.cls_score.weight", background_first)
    put("roi_heads.box_predictor.cls_score.bias", (k + 1,), f"{pred}.cls_score.bias", background_first)
    put("roi_heads.box_predictor.bbox_pred.weight", (4 * k, fc), f"{pred}.bbox_pred.weight", zero_background(4))
    put("roi_heads.box_predictor.bbox_pred.bias", (4 * k,), f"{pred}.bbox_pred.bias", zero_background(4))
    for i in range(4):
        put(f"roi_heads.mask_head.mask_fcn{i + 1}.weight", (mask_dim, fpn if i == 0 else mask_dim, 3, 3),
            f"roi_heads.mask_head.convs.{i}.0.weight")  # fmt: skip
        put(f"roi_heads.mask_head.mask_fcn{i + 1}.bias", (mask_dim,), f"roi_heads.mask_head.convs.{i}.0.bias")
    put("roi_heads.mask_head.deconv.weight", (mask_dim, mask_dim, 2, 2), "roi_heads.mask_head.predictor.conv5_mask.weight")
    put("roi_heads.mask_head.deconv.bias", (mask_dim,), "roi_heads.mask_head.predictor.conv5_mask.bias")
    logits = "roi_heads.mask_head.predictor.mask_fcn_logits"
    put("roi_heads.mask_head.predictor.weight", (k, mask_dim, 1, 1), f"{logits}.weight", zero_background(1))
    put("roi_heads.mask_head.predictor.bias", (k,), f"{logits}.bias", zero_background(1))
    for i in range(8):
        put(f"roi_heads.keypoint_head.conv_fcn{i + 1}.weight", (kp_dim, fpn if i == 0 else kp_dim, 3, 3),
            f"roi_heads.keypoint_head.convs.{i}.0.weight")  # fmt: skip
        put(f"roi_heads.keypoint_head.conv_fcn{i + 1}.bias", (kp_dim,), f"roi_heads.keypoint_head.convs.{i}.0.bias")
    kps = "roi_heads.keypoint_head.predictor.kps_score_lowres"
    put("roi_heads.keypoint_head.score_lowres.weight", (kp_dim, 17, 4, 4), f"{kps}.weight")
    put("roi_heads.keypoint_head.score_lowres.bias", (17,), f"{kps}.bias")
    # Buffers older detectron2 versions saved with the weights: used (pixel statistics) or recomputed.
    d2["pixel_mean"] = torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1)
    d2["pixel_std"] = torch.tensor([1.0, 1.0, 1.0]).view(3, 1, 1)
    d2["proposal_generator.anchor_generator.cell_anchors.0"] = torch.randn(3, 4, generator=g)
    return d2, expect


@pytest.mark.parametrize("fmt", ["pkl", "pth"])
def test_detectron2_checkpoint_maps_tensor_by_tensor(fmt: str, tmp_path: Path) -> None:
    d2, expect = detectron2_r50_fpn()
    path = tmp_path / f"model_final.{fmt}"
    if fmt == "pkl":  # the model zoo's layout: numpy arrays under "model"
        with open(path, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in d2.items()}, "__author__": "Detectron2 Model Zoo"}, f)
    else:  # detectron2's Checkpointer: tensors under "model", next to its training state
        torch.save({"model": d2, "iteration": 89999, "scheduler": {"last_epoch": 89999}}, path)
    ckpt, report, cfg = converted_checkpoint(path)
    state = ckpt["model"]
    assert set(state) == set(expect)  # every megdet tensor comes from the file, none is left over
    wrong = [k for k, v in expect.items() if not torch.equal(state[k], v)]
    assert not wrong, wrong[:5]
    assert not (report.reinitialised or report.initialised or report.left)
    assert sorted(report.ignored) == ["pixel_mean", "pixel_std", "proposal_generator.anchor_generator.cell_anchors.0"]
    m, d = cfg.model, cfg.data
    assert (m.backbone, m.num_classes, m.mask_on, m.keypoint_on, m.fpn_channels) == ("resnet50", 3, True, True, 32)
    assert (m.stride_in_1x1, m.rpn.round_anchors, m.roi.aligned, m.roi.sampling_ratio) == (True, False, True, 0)
    # detectron2's BGR pixel statistics in 0-255 units, as megdet's RGB in [0, 1] (its conv1 was flipped).
    np.testing.assert_allclose(d.pixel_mean, [123.675 / 255, 116.28 / 255, 103.53 / 255])
    np.testing.assert_allclose(d.pixel_std, [1 / 255] * 3)
    assert ckpt["converted_from"]["source"] == "detectron2"


def test_detectron2_classes_and_class_agnostic_heads() -> None:
    d2, expect = detectron2_r50_fpn(num_classes=3)
    conv = convert_state(d2, classes=[3, 1])
    w = conv.state["roi_heads.box_head.predictor.cls_score.weight"]
    full = expect["roi_heads.box_head.predictor.cls_score.weight"]
    assert torch.equal(w, full[[0, 3, 1]])
    deltas = conv.state["roi_heads.box_head.predictor.bbox_pred.weight"]
    assert torch.equal(deltas, expect["roi_heads.box_head.predictor.bbox_pred.weight"][[0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7]])
    agnostic = dict(d2, **{"roi_heads.box_predictor.bbox_pred.weight": torch.zeros(4, 64),
                           "roi_heads.box_predictor.bbox_pred.bias": torch.zeros(4)})  # fmt: skip
    with pytest.raises(WeightsError, match="class-agnostic box regression"):
        convert_state(agnostic)


# --------------------------------------------------------------------------------------------------
# ImageNet backbones
# --------------------------------------------------------------------------------------------------


def _random_resnet50() -> torchvision.models.ResNet:
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.75)
    return net.eval()


def _msra_names(net: torchvision.models.ResNet) -> dict[str, np.ndarray]:
    """MSRA's R-50.pkl layout: Caffe2 names, BN as an affine scale / bias, BGR first conv."""

    @torch.no_grad()
    def affine(bn: torch.nn.BatchNorm2d, name: str) -> dict[str, np.ndarray]:
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        return {f"{name}_s": scale.numpy(), f"{name}_b": (bn.bias - bn.running_mean * scale).numpy()}

    net = net.requires_grad_(False)
    out = {"conv1_w": net.conv1.weight.flip(1).numpy(), **affine(net.bn1, "res_conv1_bn")}
    for stage, layer in zip(range(2, 6), (net.layer1, net.layer2, net.layer3, net.layer4)):
        for b, block in enumerate(layer):
            for letter, conv, bn in (("a", block.conv1, block.bn1), ("b", block.conv2, block.bn2),
                                     ("c", block.conv3, block.bn3)):  # fmt: skip
                out[f"res{stage}_{b}_branch2{letter}_w"] = conv.weight.numpy()
                out.update(affine(bn, f"res{stage}_{b}_branch2{letter}_bn"))
            if block.downsample is not None:
                out[f"res{stage}_{b}_branch1_w"] = block.downsample[0].weight.numpy()
                out.update(affine(block.downsample[1], f"res{stage}_{b}_branch1_bn"))
    out["pred_w"], out["pred_b"] = net.fc.weight.numpy(), net.fc.bias.numpy()
    out["res2_0_branch2a_w_momentum"] = np.zeros(1, dtype=np.float32)  # optimizer state: dropped
    return out


def _features(body: torch.nn.Module, net: torchvision.models.ResNet) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return body.eval()(x)[-1], torch.nn.Sequential(*list(net.children())[:-2])(x)


def test_msra_r50_pkl_loads_with_stride_in_1x1_and_folded_bn(tmp_path: Path) -> None:
    net = _random_resnet50()
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump(_msra_names(net), f)
    with torch.no_grad():  # the reference MSRA network: every downsampling bottleneck strides in its 1x1 conv
        for layer in (net.layer2, net.layer3, net.layer4):
            layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
    for norm in ("FrozenBN", "BN"):
        body = ResNetBody("resnet50", norm, stride_in_1x1=True)
        load_backbone_weights(body, path)
        ours, theirs = _features(body, net)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    plain = ResNetBody("resnet50", "FrozenBN")  # torchvision's strides: another network
    load_backbone_weights(plain, path)
    assert not torch.allclose(*_features(plain, net), atol=1e-2)


def test_detectron2_named_resnet_and_torchvision_resnet_load(tmp_path: Path) -> None:
    net = _random_resnet50()
    tv_path = tmp_path / "resnet50.pth"
    torch.save(net.state_dict(), tv_path)
    # detectron2's convert-torchvision-to-d2 layout: res2.0.conv1.norm.*, marked as a torchvision (RGB) model.
    d2 = {}
    for key, value in net.state_dict().items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        key = key.replace("conv1.weight", "stem.conv1.weight", 1) if key == "conv1.weight" else key
        key = key.replace("bn1.", "stem.conv1.norm.", 1) if key.startswith("bn1.") else key
        if key.startswith("layer"):
            stage, rest = key.split(".", 1)
            rest = rest.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
            for j in (1, 2, 3):
                rest = rest.replace(f"bn{j}.", f"conv{j}.norm.")
            key = f"res{int(stage[-1]) + 1}.{rest}"
        d2[key] = value.detach().numpy()
    d2_path = tmp_path / "R-50-torchvision.pkl"
    with open(d2_path, "wb") as f:
        pickle.dump({"model": d2, "__author__": "torchvision", "matching_heuristics": True}, f, protocol=5)
    for path in (tv_path, d2_path):
        body = ResNetBody("resnet50", "FrozenBN")
        load_backbone_weights(body, path)
        torch.testing.assert_close(*_features(body, net), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(RESNETS))
def test_resnet_name_recognises_every_backbone(name: str) -> None:
    with torch.device("meta"):
        state = RESNETS[name](weights=None).state_dict()
    body = convert_state(state, "torchvision-resnet").state
    assert resnet_name(body) == name


# --------------------------------------------------------------------------------------------------
# Files that are not weights, or not megdet's kind
# --------------------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _one_line(excinfo: pytest.ExceptionInfo, *needles: str) -> None:
    text = str(excinfo.value)
    assert "\n" not in text and all(n in text for n in needles), text


def test_pickles_are_read_without_running_anything(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    for i, payload in enumerate([{"model": {"w": _Evil(marker)}}, {"model": {"w": np.array([_Evil(marker)])}}]):
        path = tmp_path / f"evil{i}.pkl"
        with open(path, "wb") as f:
            pickle.dump(payload, f)
        with pytest.raises(WeightsError) as e:
            read_weights(path)
        _one_line(e, str(path), "refused to load", "system")
    assert not marker.exists()
    # Python 3's protocol 2 writes bytes through _codecs.encode(text, "latin1"): read, but no other codec.
    old = tmp_path / "protocol2.pkl"
    with open(old, "wb") as f:
        pickle.dump({"model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.int64(3)}}, f, protocol=2)
    assert torch.equal(read_weights(old).state["w"], torch.arange(6.0).reshape(2, 3))
    objects = tmp_path / "objects.pkl"
    with open(objects, "wb") as f:
        pickle.dump({"model": {"w": np.array([1, "a"], dtype=object)}}, f)
    with pytest.raises(WeightsError) as e:
        read_weights(objects)
    _one_line(e, "entry 'w' is a numpy object array, not a tensor")


def test_foreign_and_broken_files_are_one_line_errors(tmp_path: Path, torchvision_detector) -> None:
    cases = {
        "random.pth": os.urandom(256),
        "text.pkl": b"hello, not a pickle",
        "truncated.pkl": pickle.dumps({"model": {"w": np.zeros(3)}})[:-5],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(WeightsError) as e:
            read_weights(tmp_path / name)
        _one_line(e, name)
    with pytest.raises(WeightsError) as e:
        read_weights(tmp_path / "missing.pth")
    _one_line(e, "not found")

    linear = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), linear)
    with pytest.raises(WeightsError) as e:
        converted_checkpoint(linear)
    _one_line(e, "not a checkpoint megdet knows", "weight")

    tv = torchvision_detector(5).state_dict()
    v2 = dict(tv, **{"rpn.head.conv.0.1.weight": torch.ones(32)})  # a v2 RPN head has a norm
    with pytest.raises(WeightsError) as e:
        convert_state(v2)
    _one_line(e, "no counterpart", "rpn.head.conv.0.1.weight")

    # A ResNet-18 detector into a ResNet-50 model: refused, with both backbones named.
    path = tmp_path / "tv18.pth"
    torch.save(tv, path)
    cfg = source_config(convert_state(tv))
    with pytest.raises(WeightsError) as e:
        converted_checkpoint(path, cfg, ["model.backbone=resnet50"])
    _one_line(e, "does not fit the model: shape mismatch", "resnet18 backbone, model.backbone is resnet50")
    imagenet = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d).state_dict(), imagenet)
    with pytest.raises(WeightsError) as e:
        converted_checkpoint(imagenet)
    _one_line(e, "ImageNet torchvision-resnet backbone weights, not a detector", "model.weights=")


def test_fine_tuning_reinitialises_class_heads_and_keeps_the_rest(torchvision_detector) -> None:
    tv = torchvision_detector(5, mask=True, keypoints=True).state_dict()
    conv = convert_state(tv)
    cfg = apply_overrides(source_config(conv), ["model.num_classes=2"])
    model = build_model(cfg)
    with pytest.raises(WeightsError, match="shape mismatch.*cls_score"):
        load_converted(model, conv, allow_new_heads=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_converted(model, conv)
    heads = {f"roi_heads.{p}.{s}" for s in ("weight", "bias") for p in
             ("box_head.predictor.cls_score", "box_head.predictor.bbox_pred", "mask_head.predictor.mask_fcn_logits")}  # fmt: skip
    assert set(report.reinitialised) == heads
    state = model.state_dict()
    assert all(torch.equal(state[k], before[k]) for k in heads)
    assert all(torch.equal(state[k], conv.state[k]) for k in report.loaded) and len(report.loaded) == len(conv.state) - 6
    assert "re-initialised 6 class-sized (box head 4, mask head 2)" in report.summary()

    # A Faster R-CNN file into a Mask R-CNN: the mask head is initialised; the other way it is left.
    faster = convert_state(torchvision_detector(5).state_dict())
    report = load_converted(build_model(apply_overrides(cfg, ["model.num_classes=4"])), faster)
    assert {k.split(".")[1] for k in report.initialised} == {"mask_head", "keypoint_head"}
    no_heads = apply_overrides(cfg, ["model.num_classes=4", "model.mask_on=false", "model.keypoint_on=false"])
    report = load_converted(build_model(no_heads), conv)
    assert {k.split(".")[1] for k in report.left} == {"mask_head", "keypoint_head"} and not report.initialised


# --------------------------------------------------------------------------------------------------
# Fine-tuning presets
# --------------------------------------------------------------------------------------------------

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _check_settings(expected: dict, actual: object, where: str) -> None:
    for key, value in expected.items():
        got = getattr(actual, key)
        if isinstance(value, dict):
            _check_settings(value, got, f"{where}{key}.")
        elif not (where == "data." and "size" in key):  # image sizes are the recipe's choice
            assert got == pytest.approx(value), f"{where}{key}: {got} != {value}"


@pytest.mark.parametrize("family", ["torchvision", "detectron2"])
def test_fine_tuning_presets_describe_the_source_models(family: str) -> None:
    cfg = load_config(CONFIGS / f"finetune_{family}_mask_r50_fpn.yaml")
    _check_settings(SOURCE_SETTINGS[family], cfg, "")
    if family == "torchvision":  # the real architecture: only the 91-way COCO class heads start fresh
        with _no_init():
            coco = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
            model = build_model(cfg)
        report = load_converted(model, convert_state(coco.state_dict()))
        assert len(report.reinitialised) == 6 and not (report.initialised or report.left)
        assert len(report.loaded) == len(model.state_dict()) - 6


def test_torchvision_coco_head_keeps_the_80_coco_categories(tmp_path: Path, torchvision_detector) -> None:
    tv = torchvision_detector(91).state_dict()  # torchvision's COCO layout: label = COCO category id
    path = tmp_path / "coco.pth"
    torch.save(tv, path)
    ckpt, report, cfg = converted_checkpoint(path)
    ids = [c["id"] for c in ckpt["categories"]]
    assert cfg.model.num_classes == 80 and len(ids) == 80 and ids[:12] == [*range(1, 12), 13]
    assert [c["name"] for c in ckpt["categories"]][:3] == ["person", "bicycle", "car"]
    rows = ckpt["model"]["roi_heads.box_head.predictor.cls_score.weight"]
    assert torch.equal(rows, tv["roi_heads.box_predictor.cls_score.weight"][[0, *ids]])
    assert any("classes: kept 80 of the source's 90" in line for line in report.lines())
    ckpt, _, cfg = converted_checkpoint(path, classes="all")
    assert cfg.model.num_classes == 90 and ckpt["categories"] == []


def test_model_weights_takes_an_imagenet_backbone(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    cfg = load_config(None, ["model.backbone=resnet18", "model.norm=FrozenBN", f"model.weights={path}"])
    model = build_model(cfg)
    body = model.backbone.body.state_dict()
    expected = convert_state(net.state_dict()).state
    assert all(torch.equal(body[k], v) for k, v in expected.items()) and len(expected) == len(body)
    assert not [w for w in recwarn if "model.weights" in str(w.message)]  # new FPN and heads: nothing to report


def test_fine_tuning_into_a_model_with_semantic_context(torchvision_detector) -> None:
    conv = convert_state(torchvision_detector(5, mask=True).state_dict())
    context = ["model.context.semantic=true", "model.context.roi_features=true", "model.context.global_context=true"]
    cfg = apply_overrides(source_config(conv), context)
    report = load_converted(build_model(cfg), conv)
    assert {k.split(".")[0] for k in report.initialised} == {"semantic_branch", "roi_heads"}
    assert all(".context." in k for k in report.initialised if k.startswith("roi_heads"))
    assert not report.reinitialised and len(report.loaded) == len(conv.state)
    with pytest.raises(WeightsError, match="missing: roi_heads.box_head.context.global_proj.weight"):
        load_converted(build_model(cfg), conv, allow_new_heads=False)
