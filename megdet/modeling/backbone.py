"""ResNet / ResNeXt bodies with a feature pyramid: images -> [P2, P3, P4, P5, P6].

The body reuses torchvision's ResNet constructors (``weights=None``) and keeps each stage as a named
submodule (``body.stem``, ``body.layer1`` .. ``body.layer4``) next to the pyramid (``fpn``), so that
sublinear-memory recomputation can wrap any of them by name later. The norm layer of every part
comes from :func:`megdet.layers.norm.norm_layer_factory`, the one place a norm name becomes a class.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from megdet.config import NORMS, ModelConfig, check_choice
from megdet.layers.norm import norm_layer_factory, norm_layer_or_none
from megdet.layers.recompute import RecomputeStage


def resnet10(*, weights: None = None, **kwargs: object) -> torchvision.models.ResNet:
    """ResNet-10: torchvision's ResNet class with one BasicBlock per stage (half of ResNet-18's depth).

    torchvision has no ResNet smaller than ResNet-18; this one is for quick CPU runs (``megdet demo``).
    It has no published ImageNet weights: ``weights`` must be None (a local file goes through
    ``model.weights`` as for the other backbones).
    """
    if weights is not None:
        raise ValueError("resnet10 has no torchvision weights; pass a local state_dict through model.weights")
    return torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], **kwargs)


# The explicit name -> constructor map (no registry) of model.backbone's choices (config.BACKBONES):
# torchvision's ImageNet architectures.
RESNETS: dict[str, Callable[..., torchvision.models.ResNet]] = {
    "resnet10": resnet10,
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "resnext101_32x8d": torchvision.models.resnext101_32x8d,
}

# Stage names in the order `trainable_layers` counts them (from the top of the network down).
_STAGES_TOP_DOWN = ("layer4", "layer3", "layer2", "layer1", "stem")

def head_norm_of(cfg: ModelConfig) -> str:
    """The norm of the FPN, the RPN head and the RoI heads: ``model.head_norm``, or
    :func:`default_head_norm` of ``model.norm`` when it is empty."""
    return cfg.head_norm or default_head_norm(cfg.norm)


def default_head_norm(norm: str) -> str:
    """The norm used by the FPN and the heads when the model's norm is ``norm``.

    FrozenBN means "keep pretrained statistics"; newly initialised FPN / head layers have none to keep
    (a frozen identity affine would only cost time), so they get no norm -- torchvision's and
    detectron2's FrozenBN models do the same. Every other choice applies everywhere.
    """
    check_choice("default_head_norm", norm, NORMS, "norm")
    return "none" if norm == "FrozenBN" else norm


class FoldedFrozenBN(FrozenBatchNorm2d):
    """A FrozenBN whose affine map is applied by the conv before it (:class:`ConvFrozenBN`): identity.

    Same buffers, hence the same state_dict keys and weight loading, as the FrozenBN it replaces.
    """

    def forward(self, x: Tensor) -> Tensor:
        return x

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """The per-output-channel weight scale (shaped for a conv weight) and the bias.

        Computed from the buffers only when one of them changed (a state_dict load or a copy bumps the
        tensor's version, a move replaces it): a step would otherwise launch five small kernels per
        conv for values that never change while training, and on a GPU the launches are the cost.
        """
        buffers = (self.weight, self.bias, self.running_mean, self.running_var)
        key = tuple((id(t), t.data_ptr(), t._version, t.dtype) for t in buffers)
        cached = getattr(self, "_scale_shift", None)
        if cached is not None and cached[0] == key and (torch.is_inference_mode_enabled() or not cached[1].is_inference()):
            return cached[1], cached[2]
        with torch.no_grad():
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            shift = self.bias - self.running_mean * scale
        scale = scale.reshape(-1, 1, 1, 1)
        self._scale_shift = (key, scale, shift)
        return scale, shift


class ConvFrozenBN(nn.Conv2d):
    """A bias-free conv that applies the following FrozenBN by scaling its weight and adding a bias.

    torchvision's FrozenBatchNorm2d costs two full passes over the activation in the forward (a
    multiply, then an add) and one in the backward; folded into the conv it costs a per-channel
    scaling of the (much smaller) weight. The conv's own state_dict entries are unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self._folded_bn.scale_shift()
        return F.conv2d(x, self.weight * scale, shift, self.stride, self.padding,
                        self.dilation, self.groups)  # fmt: skip


def fold_frozen_bn(module: nn.Module) -> int:
    """Folds every FrozenBN of a torchvision ResNet body into the conv that feeds it; returns the count.

    The pairs are ``convI`` -> ``bnI`` inside a block or the stem, and ``Sequential(conv, bn)`` of a
    downsample branch: in torchvision's BasicBlock / Bottleneck each ``bnI`` reads ``convI``'s output
    only. The modules stay where they are (the conv changes class, the norm becomes an identity).
    """
    pairs: list[tuple[nn.Module, str, str]] = []
    for parent in module.modules():
        if isinstance(parent, nn.Sequential) and len(parent) == 2:
            pairs.append((parent, "0", "1"))
        for i in (1, 2, 3):
            if hasattr(parent, f"conv{i}") and hasattr(parent, f"bn{i}"):
                pairs.append((parent, f"conv{i}", f"bn{i}"))
    count = 0
    for parent, conv_name, bn_name in pairs:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        if type(conv) is not nn.Conv2d or type(bn) is not FrozenBatchNorm2d or conv.bias is not None:
            continue
        folded_bn = FoldedFrozenBN(bn.weight.numel(), eps=bn.eps)
        for name, buf in bn.named_buffers():
            setattr(folded_bn, name, buf)
        conv.__class__ = ConvFrozenBN  # keeps the weight Parameter, its hooks and its requires_grad
        object.__setattr__(conv, "_folded_bn", folded_bn)  # a reference, not a second registration
        setattr(parent, bn_name, folded_bn)
        count += 1
    return count


def move_stride_to_1x1(net: torchvision.models.ResNet, name: str = "resnet") -> None:
    """Moves every bottleneck's stride from its 3x3 conv (``conv2``) to its first 1x1 conv (``conv1``)."""
    blocks = [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
    if not all(isinstance(b, torchvision.models.resnet.Bottleneck) for b in blocks):
        raise ValueError(f"move_stride_to_1x1: {name} has no bottleneck blocks; stride_in_1x1 needs resnet50 or deeper")
    for block in blocks:
        block.conv1.stride, block.conv2.stride = block.conv2.stride, block.conv1.stride


class ResNetStem(nn.Module):
    """conv1 (7x7, stride 2) + norm + ReLU + 3x3 max-pool: stride 4, the part before ``layer1``."""

    def __init__(self, conv1: nn.Module, bn1: nn.Module) -> None:
        super().__init__()
        # Attribute names match torchvision's ResNet so weight files map by a plain prefix.
        self.conv1 = conv1
        self.bn1 = bn1
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


class ResNetBody(nn.Module):
    """A torchvision ResNet without its classifier, returning the C2..C5 stage outputs.

    Args:
        name: one of :data:`RESNETS`.
        norm: norm of every ResNet layer ("FrozenBN" | "BN" | "GN" | "CrossDeviceBN").
        trainable_layers: how many stages, counted from ``layer4`` down to the stem, are trained
            (0-5). The others get ``requires_grad=False`` and stay in eval mode, so their norm
            statistics do not drift either.
        stride_in_1x1: a bottleneck that downsamples does it in its first 1x1 conv (the original
            MSRA / Caffe2 ResNet of detectron2's model zoo) instead of its 3x3 conv (torchvision's).
    """

    def __init__(self, name: str, norm: str, trainable_layers: int = 5, stride_in_1x1: bool = False) -> None:
        super().__init__()
        check_choice("ResNetBody", name, tuple(RESNETS), "name")
        check_choice("ResNetBody", norm, [n for n in NORMS if n != "none"], "norm")
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"ResNetBody: trainable_layers must be in 0..5, got {trainable_layers}")
        net = RESNETS[name](weights=None, norm_layer=norm_layer_factory(norm))
        if stride_in_1x1:
            move_stride_to_1x1(net, name)
        self.name = name
        self.stem = ResNetStem(net.conv1, net.bn1)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        c5 = net.fc.in_features
        self.out_channels_list = [c5 // 8, c5 // 4, c5 // 2, c5]
        self.frozen_stages = list(_STAGES_TOP_DOWN[trainable_layers:])
        for stage in self.frozen_stages:
            getattr(self, stage).requires_grad_(False)
        if norm == "FrozenBN":
            fold_frozen_bn(self)

    def train(self, mode: bool = True) -> ResNetBody:
        super().train(mode)
        # A frozen stage with BN must not update running statistics in training either.
        for stage in self.frozen_stages:
            getattr(self, stage).eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]


class ResNetFPN(nn.Module):
    """ResNet body + torchvision's FeaturePyramidNetwork; P6 is a stride-2 max-pool of P5 (RPN only).

    ``forward(images) -> [P2, P3, P4, P5, P6]``, each with ``out_channels`` channels, at strides
    ``strides`` = (4, 8, 16, 32, 64).
    """

    strides = (4, 8, 16, 32, 64)

    def __init__(self, body: ResNetBody, fpn_channels: int, fpn_norm: str = "none") -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            body.out_channels_list,
            fpn_channels,
            extra_blocks=LastLevelMaxPool(),
            norm_layer=norm_layer_or_none(fpn_norm),
        )
        self.out_channels = fpn_channels

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> ResNetFPN:
        """The freshly initialised backbone of ``model.*`` (``build_model`` loads ``model.weights``)."""
        return build_backbone(
            name=cfg.backbone,
            norm=cfg.norm,
            fpn_channels=cfg.fpn_channels,
            trainable_layers=cfg.trainable_layers,
            fpn_norm=head_norm_of(cfg),
            stride_in_1x1=cfg.stride_in_1x1,
        )

    def recompute_stages(self) -> list[RecomputeStage]:
        """What sublinear memory may recompute, in forward order (names relative to this module): the
        stem, the four residual stages (each a sequence of residual blocks) and the FPN."""
        residual = [RecomputeStage(f"body.{n}", blocks=True, nested=True) for n in ("layer1", "layer2", "layer3", "layer4")]
        return [RecomputeStage("body.stem"), *residual, RecomputeStage("fpn")]

    def forward(self, images: Tensor) -> list[Tensor]:
        c = self.body(images)
        out = self.fpn(OrderedDict((f"c{i + 2}", x) for i, x in enumerate(c)))
        return list(out.values())


def load_backbone_weights(body: ResNetBody, path: str | Path, input_format: str | None = None) -> None:
    """Loads ImageNet (or a detector's) ResNet weights from a local file into ``body``; never downloads.

    Any file :mod:`megdet.modeling.convert` reads: a torchvision ResNet / ResNeXt ``state_dict``,
    detectron2's or MSRA's ``R-50.pkl`` (BGR models: the first conv's input channels are reversed for
    megdet's RGB images; ``input_format`` overrides), or the body of a megdet / torchvision / detectron2
    detector. Classifier weights and BN step counters are ignored; BN statistics go into whatever norm
    the body has (FrozenBN folds them into the convs). Any tensor missing, unexpected or of another
    shape is a one-line :class:`~megdet.modeling.convert.WeightsError` (a ValueError) naming it.
    """
    from megdet.modeling.convert import load_backbone_file

    load_backbone_file(body, path, input_format=input_format)


def build_backbone(
    name: str,
    norm: str,
    fpn_channels: int,
    trainable_layers: int,
    weights_path: str = "",
    fpn_norm: str | None = None,
    stride_in_1x1: bool = False,
) -> ResNetFPN:
    """Builds ResNet/ResNeXt + FPN; loads ``weights_path`` (a local ImageNet ResNet file, see
    :func:`load_backbone_weights`) if given.

    ``fpn_norm`` defaults to :func:`default_head_norm` of ``norm``.
    """
    body = ResNetBody(name, norm, trainable_layers, stride_in_1x1=stride_in_1x1)
    if weights_path:
        load_backbone_weights(body, weights_path)
    return ResNetFPN(body, fpn_channels, default_head_norm(norm) if fpn_norm is None else fpn_norm)
