"""ResNet + FPN backbone: shapes, norms, frozen stages, weight files, recomputation names."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from megdet.layers.recompute import Recompute, apply_recompute
from megdet.modeling.backbone import (
    ConvFrozenBN,
    FoldedFrozenBN,
    ResNetBody,
    build_backbone,
    default_head_norm,
    load_backbone_weights,
)

torch.set_num_threads(1)


@pytest.mark.parametrize("norm", ["FrozenBN", "BN", "GN", "CrossDeviceBN"])
def test_pyramid_shapes_and_backward_for_each_norm(norm: str) -> None:
    torch.manual_seed(0)
    bb = build_backbone("resnet18", norm, fpn_channels=32, trainable_layers=5, fpn_norm=None).train()
    x = torch.randn(2, 3, 64, 96)
    feats = bb(x)
    assert bb.out_channels == 32
    assert [tuple(f.shape) for f in feats] == [
        (2, 32, 16, 24), (2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3), (2, 32, 1, 2),
    ]  # fmt: skip
    assert all(torch.isfinite(f).all() for f in feats)
    sum(f.mean() for f in feats).backward()
    conv1 = bb.body.stem.conv1.weight
    assert conv1.grad is not None and conv1.grad.abs().sum() > 0
    # FrozenBN keeps the FPN norm-free (nothing to freeze in new layers); other norms apply there too.
    fpn_norms = [
        m for m in bb.fpn.modules() if not isinstance(m, (nn.Conv2d, nn.Sequential)) and m is not bb.fpn
    ]
    has_norm = any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, FrozenBatchNorm2d)) for m in fpn_norms)
    assert has_norm == (norm != "FrozenBN")
    names = {type(m).__name__ for m in bb.body.modules()}
    body_norm_types = {n for n in names if ("Norm" in n or "BN" in n) and n != "ConvFrozenBN"}
    expected = {"FrozenBN": "FoldedFrozenBN", "BN": "BatchNorm2d", "GN": "GroupNorm",
                "CrossDeviceBN": "CrossDeviceBatchNorm2d"}[norm]  # fmt: skip
    assert body_norm_types == {expected}


def test_resnet50_channels_and_p6_is_subsampled_p5() -> None:
    bb = build_backbone("resnet50", "FrozenBN", fpn_channels=16, trainable_layers=3).eval()
    assert bb.body.out_channels_list == [256, 512, 1024, 2048]
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, 96, 64))
    assert torch.equal(feats[4], feats[3][:, :, ::2, ::2])
    assert bb.strides == (4, 8, 16, 32, 64)


def test_trainable_layers_freeze_stem_and_early_stages() -> None:
    torch.manual_seed(0)
    bb = build_backbone("resnet18", "BN", fpn_channels=16, trainable_layers=2).train()
    body = bb.body
    assert body.frozen_stages == ["layer2", "layer1", "stem"]
    for stage in ("stem", "layer1", "layer2"):
        mod = getattr(body, stage)
        assert not any(p.requires_grad for p in mod.parameters())
        assert not mod.training  # frozen BN statistics do not drift in training
    assert all(p.requires_grad for p in body.layer3.parameters())
    before = body.stem.bn1.running_mean.clone()
    before_l3 = body.layer3[0].bn1.running_mean.clone()
    sum(f.sum() for f in bb(torch.randn(2, 3, 64, 64))).backward()
    assert torch.equal(body.stem.bn1.running_mean, before)
    assert not torch.equal(body.layer3[0].bn1.running_mean, before_l3)
    assert body.layer1[0].conv1.weight.grad is None
    assert body.layer3[0].conv1.weight.grad is not None


def test_trainable_layers_zero_and_bad_values() -> None:
    body = ResNetBody("resnet18", "BN", trainable_layers=0)
    assert not any(p.requires_grad for p in body.parameters())
    with pytest.raises(ValueError, match="ResNetBody: trainable_layers must be in 0..5, got 6"):
        ResNetBody("resnet18", "BN", trainable_layers=6)
    with pytest.raises(ValueError, match="ResNetBody: unknown name 'resnet19'; choose one of resnet10"):
        build_backbone("resnet19", "BN", 16, 5)
    with pytest.raises(ValueError, match="ResNetBody: unknown norm 'LN'"):
        build_backbone("resnet18", "LN", 16, 5)
    with pytest.raises(ValueError, match="ResNetBody: unknown norm 'none'"):
        build_backbone("resnet18", "none", 16, 5)


def test_load_backbone_weights_from_torchvision_file(tmp_path) -> None:
    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # non-trivial statistics, to see them arrive
        ref.bn1.running_mean.uniform_(-1, 1)
        ref.layer4[1].bn2.running_var.uniform_(0.5, 2)
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)

    for norm in ("BN", "FrozenBN"):
        bb = build_backbone("resnet18", norm, fpn_channels=16, trainable_layers=5, weights_path=str(path))
        body = bb.body
        assert torch.equal(body.stem.conv1.weight, ref.conv1.weight)
        assert torch.equal(body.stem.bn1.running_mean, ref.bn1.running_mean)
        assert torch.equal(body.layer4[1].bn2.running_var, ref.layer4[1].bn2.running_var)
        assert torch.equal(body.layer3[0].downsample[0].weight, ref.layer3[0].downsample[0].weight)

    # Same network, same outputs: the C5 map equals torchvision's forward up to the pooling.
    ref.eval()
    body = ResNetBody("resnet18", "BN").eval()
    load_backbone_weights(body, path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        c5 = body(x)[-1]
        expected = torch.nn.Sequential(*list(ref.children())[:-2])(x)
    torch.testing.assert_close(c5, expected)


def test_frozen_bn_folded_into_convs_matches_torchvision_frozen_bn(tmp_path) -> None:
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "frozen.pth"
    torch.save(ref.state_dict(), path)
    body = ResNetBody("resnet18", "FrozenBN", trainable_layers=3)
    # Every conv -> FrozenBN pair (stem, 2 per block, 3 downsamples) is folded; the keys stay torchvision's.
    assert sum(isinstance(m, ConvFrozenBN) for m in body.modules()) == 20
    assert sum(isinstance(m, FoldedFrozenBN) for m in body.modules()) == 20
    assert not any(type(m) is FrozenBatchNorm2d for m in body.modules())
    load_backbone_weights(body, path)
    assert not body.layer1[0].conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad

    x = torch.randn(1, 3, 64, 64)
    trunk = torch.nn.Sequential(*list(ref.children())[:-2])
    for p in trunk[:5].parameters():  # the same frozen stem + layer1
        p.requires_grad_(False)
    ours, theirs = body(x)[-1], trunk(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    ours.square().mean().backward()
    theirs.square().mean().backward()
    for name in ("layer2.0.conv1.weight", "layer3.0.downsample.0.weight", "layer4.1.conv2.weight"):
        torch.testing.assert_close(
            body.get_parameter(name).grad, ref.get_parameter(name).grad, rtol=1e-3, atol=1e-5
        )


def _folded_reference(conv: ConvFrozenBN, x: torch.Tensor) -> torch.Tensor:
    bn = conv._folded_bn
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    shift = bn.bias - bn.running_mean * scale
    return torch.nn.functional.conv2d(x, conv.weight * scale.reshape(-1, 1, 1, 1), shift, conv.stride, conv.padding)


def test_folded_frozen_bn_scale_is_computed_once_until_its_buffers_change() -> None:
    from sync_counting import SyncCounter

    torch.manual_seed(0)
    body = ResNetBody("resnet18", "FrozenBN", trainable_layers=5)
    conv = body.layer1[0].conv1
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(conv._folded_bn, name).uniform_(0.5, 1.5)
    x = torch.randn(2, 64, 8, 8)
    counters = [SyncCounter(), SyncCounter()]
    for counter in counters:
        with counter:
            out = conv(x)
    assert torch.equal(out, _folded_reference(conv, x))
    # The second forward reuses the scale and bias: the eps add, rsqrt and three products are not run.
    assert counters[1].ops <= counters[0].ops - 4, (counters[0].ops, counters[1].ops)
    out.sum().backward()  # the weight still trains through the cached scale
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0

    # A state_dict load copies into the buffers in place: the next forward sees the new values.
    state = body.state_dict()
    state["layer1.0.bn1.running_var"] = torch.full_like(state["layer1.0.bn1.running_var"], 4.0)
    body.load_state_dict(state)
    assert torch.equal(conv(x), _folded_reference(conv, x))
    body.double()  # a move replaces the buffers
    assert conv(x.double()).dtype == torch.float64
    assert torch.equal(conv(x.double()), _folded_reference(conv, x.double()))
    with torch.inference_mode():  # an inference-mode forward's cache is not reused under autograd
        conv(x.double())
    conv(x.double()).sum().backward()


def test_load_backbone_weights_errors_name_the_parameter(tmp_path) -> None:
    state = torchvision.models.resnet18(weights=None).state_dict()
    bad = dict(state)
    bad["layer2.0.conv1.weight"] = torch.zeros(1, 1, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    body = ResNetBody("resnet18", "BN")
    with pytest.raises(ValueError, match=r"shape mismatch: layer2\.0\.conv1\.weight \(file \(1, 1, 3, 3\)") as e:
        load_backbone_weights(body, path)
    assert "\n" not in str(e.value)

    missing = {k: v for k, v in state.items() if not k.startswith("layer4.1.")}
    torch.save(missing, path)
    with pytest.raises(ValueError, match=r"missing: layer4\.1\.conv1\.weight"):
        load_backbone_weights(body, path)

    # A ResNet-50 file does not fit a ResNet-18 body.
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit backbone resnet18: shape mismatch"):
        load_backbone_weights(body, path)

    with pytest.raises(ValueError, match="nope.pth: weights file not found"):
        load_backbone_weights(body, tmp_path / "nope.pth")


def test_default_head_norm() -> None:
    assert default_head_norm("FrozenBN") == "none"
    assert default_head_norm("GN") == "GN"
    with pytest.raises(ValueError, match="default_head_norm: unknown norm 'batchnorm'"):
        default_head_norm("batchnorm")


def test_recompute_stage_names_wrap_and_keep_results() -> None:
    torch.manual_seed(0)
    bb = build_backbone("resnet18", "GN", fpn_channels=16, trainable_layers=5).train()
    x = torch.randn(1, 3, 64, 64)
    ref = bb(x)
    sum(f.sum() for f in ref).backward()
    grads = {n: p.grad.clone() for n, p in bb.named_parameters()}
    keys = list(bb.state_dict())

    names = [s.name for s in bb.recompute_stages()]
    assert names == ["body.stem", "body.layer1", "body.layer2", "body.layer3", "body.layer4", "fpn"]
    apply_recompute(bb, names)
    assert isinstance(bb.body.layer2, Recompute) and isinstance(bb.fpn, Recompute)
    assert list(bb.state_dict()) == keys
    bb.zero_grad()
    out = bb(x)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
    sum(f.sum() for f in out).backward()
    for n, p in bb.named_parameters():
        torch.testing.assert_close(p.grad, grads[n.replace(".inner.", ".", 1)], rtol=1e-4, atol=1e-5)
