"""Normalisation layers by config name: the one place where ``model.norm`` strings become modules.

Names (:data:`megdet.config.NORMS`): ``"FrozenBN"`` (torchvision's FrozenBatchNorm2d: fixed statistics
and affine, no gradients), ``"BN"`` (nn.BatchNorm2d, per-device statistics), ``"GN"`` (nn.GroupNorm with
32 groups, or the largest divisor of the channel count not above 32), ``"CrossDeviceBN"`` (statistics
shared across devices, see :mod:`megdet.layers.cross_device_bn`; all ranks share them until the
detector sets its groups) and ``"none"`` (nn.Identity).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from megdet.config import NORMS, check_choice
from megdet.layers.cross_device_bn import CrossDeviceBatchNorm2d

__all__ = ["convert_frozen_batchnorm", "get_norm", "group_norm_groups", "norm_layer_factory"]

_MAX_GROUPS = 32


def group_norm_groups(num_channels: int) -> int:
    """Number of GroupNorm groups: 32, or the largest divisor of `num_channels` not above 32."""
    if num_channels < 1:
        raise ValueError(f"group_norm_groups: num_channels must be positive, got {num_channels}")
    return max(g for g in range(1, min(_MAX_GROUPS, num_channels) + 1) if num_channels % g == 0)


def get_norm(name: str, num_channels: int) -> nn.Module:
    """A normalisation layer for `num_channels` channels of an (N, C, H, W) tensor.

    Args:
        name: one of :data:`megdet.config.NORMS` (see the module docstring).
        num_channels: channels of the normalised tensor.
    """
    check_choice("get_norm", name, NORMS, "norm")
    if name == "FrozenBN":
        return FrozenBatchNorm2d(num_channels)
    if name == "BN":
        return nn.BatchNorm2d(num_channels)
    if name == "GN":
        return nn.GroupNorm(group_norm_groups(num_channels), num_channels)
    if name == "CrossDeviceBN":
        return CrossDeviceBatchNorm2d(num_channels)
    return nn.Identity()


def norm_layer_factory(name: str) -> Callable[[int], nn.Module]:
    """``num_channels -> norm module`` for `name`, as torchvision's ``norm_layer=`` arguments take it.

    The name is checked here, so a bad name fails when the model is built, not at the first layer.
    """
    check_choice("norm_layer_factory", name, NORMS, "norm")
    return functools.partial(get_norm, name)


def norm_layer_or_none(name: str) -> Callable[[int], nn.Module] | None:
    """``norm_layer=`` argument for torchvision modules: ``None`` for "none", so that convs keep their bias."""
    return None if name == "none" else norm_layer_factory(name)


def convert_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in `module` (subclasses included) by ``FrozenBatchNorm2d``.

    The frozen layer takes copies of the weight, bias, running mean and running variance (device and
    dtype kept; affine-free layers get weight 1 and bias 0) and the eps, so ImageNet BatchNorm weights
    load into a FrozenBN backbone unchanged. Returns the converted module (a new object only when
    `module` itself is a BatchNorm2d).
    """
    if isinstance(module, nn.BatchNorm2d):
        if module.running_mean is None or module.running_var is None:
            raise ValueError(
                f"convert_frozen_batchnorm: {type(module).__name__}({module.num_features}) has "
                f"track_running_stats=False, so there are no statistics to freeze"
            )
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        mean = module.running_mean.detach()
        frozen.running_mean = mean.clone()
        frozen.running_var = module.running_var.detach().clone()
        frozen.weight = module.weight.detach().clone() if module.weight is not None else mean.new_ones(mean.shape)
        frozen.bias = module.bias.detach().clone() if module.bias is not None else mean.new_zeros(mean.shape)
        return frozen
    for name, child in module.named_children():
        converted = convert_frozen_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module
