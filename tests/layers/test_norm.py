"""get_norm / norm_layer_factory / convert_frozen_batchnorm."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.misc import FrozenBatchNorm2d

from megdet.config import NORMS
from megdet.layers.cross_device_bn import CrossDeviceBatchNorm2d
from megdet.layers.norm import (
    convert_frozen_batchnorm,
    get_norm,
    group_norm_groups,
    norm_layer_factory,
)


def test_get_norm_builds_each_kind() -> None:
    frozen = get_norm("FrozenBN", 8)
    assert type(frozen) is FrozenBatchNorm2d and frozen.weight.shape == (8,)
    bn = get_norm("BN", 8)
    assert type(bn) is nn.BatchNorm2d and bn.num_features == 8
    gn = get_norm("GN", 256)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 32 and gn.num_channels == 256
    cd = get_norm("CrossDeviceBN", 8)
    assert isinstance(cd, CrossDeviceBatchNorm2d) and cd.num_features == 8 and cd.group_size is None
    assert isinstance(get_norm("none", 8), nn.Identity)
    x = torch.randn(2, 8, 3, 3)
    for name in ("FrozenBN", "BN", "CrossDeviceBN"):
        assert get_norm(name, 8)(x).shape == x.shape


@pytest.mark.parametrize(("channels", "groups"), [(256, 32), (64, 32), (32, 32), (100, 25), (48, 24), (7, 7), (1, 1)])
def test_group_norm_groups_is_largest_divisor_up_to_32(channels: int, groups: int) -> None:
    assert group_norm_groups(channels) == groups
    assert get_norm("GN", channels).num_groups == groups


def test_unknown_names_are_rejected_with_the_valid_list() -> None:
    for bad in ("bn", "SyncBN", "LN"):
        with pytest.raises(ValueError, match=f"get_norm: unknown norm '{bad}'; choose one of FrozenBN, BN, GN"):
            get_norm(bad, 8)
        with pytest.raises(ValueError, match="norm_layer_factory: unknown norm"):
            norm_layer_factory(bad)  # fails when the model is built, not at the first layer
    with pytest.raises(ValueError, match="positive"):
        group_norm_groups(0)
    assert set(NORMS) == {"FrozenBN", "BN", "GN", "CrossDeviceBN", "none"}


def test_factory_plugs_into_torchvision_norm_layer_arguments() -> None:
    model = torchvision.models.resnet18(norm_layer=norm_layer_factory("GN"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == 20
    assert model.layer4[0].bn1.num_groups == 32
    model = torchvision.models.resnet18(norm_layer=norm_layer_factory("CrossDeviceBN"))
    assert sum(isinstance(m, CrossDeviceBatchNorm2d) and m.group_size is None for m in model.modules()) == 20
    fpn = FeaturePyramidNetwork([16, 32], 24, norm_layer=norm_layer_factory("GN"))
    assert sum(isinstance(m, nn.GroupNorm) and m.num_groups == 24 for m in fpn.modules()) == 4
    outs = fpn({"a": torch.randn(1, 16, 8, 8), "b": torch.randn(1, 32, 4, 4)})
    assert outs["a"].shape == (1, 24, 8, 8)


def _randomise_stats(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen))
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(n, generator=gen))
                m.bias.data.copy_(torch.randn(n, generator=gen))


def test_convert_frozen_batchnorm_matches_eval_batchnorm() -> None:
    for affine in (True, False):
        bn = nn.BatchNorm2d(6, eps=1e-3, affine=affine, dtype=torch.float64)
        _randomise_stats(bn)
        bn.eval()
        frozen = convert_frozen_batchnorm(bn)
        assert type(frozen) is FrozenBatchNorm2d and frozen.eps == 1e-3
        assert frozen.running_var.dtype == torch.float64
        x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
        torch.testing.assert_close(frozen(x), bn(x), rtol=1e-12, atol=1e-12)
        assert not any(p.requires_grad for p in frozen.parameters())  # frozen: buffers only
        frozen.running_mean.add_(1)  # a copy, not shared with the source layer
        assert not torch.equal(frozen.running_mean, bn.running_mean)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        convert_frozen_batchnorm(nn.BatchNorm2d(4, track_running_stats=False))


def test_convert_frozen_batchnorm_on_resnet18() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    _randomise_stats(model)
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    expected = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    assert convert_frozen_batchnorm(model) is model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == 20
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    after = model.state_dict()
    assert set(after) == {k for k in before if not k.endswith("num_batches_tracked")}
    for key, value in after.items():
        assert torch.equal(value, before[key]), key
    # The frozen model loads a BatchNorm state dict (ImageNet weights) directly.
    model.load_state_dict(before)
