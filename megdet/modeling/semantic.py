"""MegDet's "+Context/Seg": a semantic segmentation branch on the FPN, and the context it gives the RoI heads.

:class:`SemanticBranch` fuses the pyramid levels P2..P5 at one resolution (1/8 by default): a 1x1
conv per level, finer levels average-pooled and coarser ones bilinearly upsampled to the fusion size,
summed; then a few 3x3 convs and a per-pixel classifier over the semantic classes, trained with a
cross-entropy of its own weight that ignores label 255 (the padding of a batch too). The layout
follows the fused semantic head of Hybrid Task Cascade (Chen et al. 2019), the published form of
"segmentation as context" for detection.

With context on, the branch also produces an embedding with the FPN's channel count, and
:class:`RoIContext` gives it to the RoI heads: pooled for each RoI with the head's own pooler and
added to the head's pooled features (box and mask heads: ``roi_features``), and averaged over each
image into a global context vector, projected and added to the box head's representation before its
classifier (``global_context``). Both projections start at zero so a context model starts as the
plain one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation, roi_align

from megdet.config import IGNORE_LABEL, SEMANTIC_STRIDES, ModelConfig, semantic_num_classes
from megdet.layers.norm import norm_layer_or_none
from megdet.layers.recompute import RecomputeStage
from megdet.modeling.backbone import head_norm_of
from megdet.modeling.poolers import MultiLevelPooler

# The strides of the pyramid levels the branch fuses (P2..P5; P6 only feeds the RPN).
FUSED_STRIDES = SEMANTIC_STRIDES

ImageSizes = Sequence[Sequence[int]]


@dataclass
class SemanticContext:
    """What the branch computed for a batch: ``logits`` (B, K, h, w) at 1/``stride``; with context on
    ``features`` (B, C, h, w), C the FPN's channels, and with the global context ``global_features``
    (B, C), ``features`` averaged over each image's own (unpadded) area."""

    logits: Tensor
    stride: int
    features: Tensor | None = None
    global_features: Tensor | None = None


def _conv(in_channels: int, out_channels: int, kernel_size: int, norm: str) -> nn.Module:
    return Conv2dNormActivation(in_channels, out_channels, kernel_size=kernel_size, norm_layer=norm_layer_or_none(norm))


class SemanticBranch(nn.Module):
    """Per-pixel classification from the FPN levels ``P2..P5``, fused at 1/``stride``.

    ``forward(features, image_sizes) -> SemanticContext``. ``context_channels`` > 0 adds the 1x1
    embedding the RoI heads pool (it must equal their input channels); ``global_context`` also
    averages it over every image. ``norm`` is the heads' norm (``model.head_norm``): BN, GN, the
    cross-device BN or none.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        stride: int = 8,
        num_convs: int = 4,
        conv_dim: int = 128,
        norm: str = "none",
        loss_weight: float = 0.2,
        context_channels: int = 0,
        global_context: bool = False,
        in_strides: Sequence[int] = FUSED_STRIDES,
    ) -> None:
        super().__init__()
        if stride not in in_strides:
            raise ValueError(f"SemanticBranch: stride must be one of {list(in_strides)}, got {stride}")
        if num_classes < 2 or num_classes > IGNORE_LABEL:
            raise ValueError(f"SemanticBranch: num_classes must be in 2..{IGNORE_LABEL}, got {num_classes}")
        if not loss_weight >= 0:
            raise ValueError(f"SemanticBranch: loss_weight must be >= 0, got {loss_weight}")
        if global_context and context_channels < 1:
            raise ValueError("SemanticBranch: global_context needs context_channels (the embedding it averages)")
        self.num_classes = num_classes
        self.stride = stride
        self.in_strides = tuple(int(s) for s in in_strides)
        self.loss_weight = loss_weight
        self.global_context = global_context
        self.laterals = nn.ModuleList(_conv(in_channels, conv_dim, 1, norm) for _ in self.in_strides)
        self.convs = nn.Sequential(*(_conv(conv_dim, conv_dim, 3, norm) for _ in range(num_convs)))
        self.predictor = nn.Conv2d(conv_dim, num_classes, kernel_size=1)
        self.embedding = _conv(conv_dim, context_channels, 1, norm) if context_channels > 0 else None

    def fuse(self, features: Sequence[Tensor]) -> Tensor:
        """The levels (finest first, one per ``in_strides``) through their 1x1 convs, brought to the size
        of the level at ``stride`` and summed: (B, conv_dim, H/stride, W/stride)."""
        if len(features) < len(self.in_strides):
            raise ValueError(f"SemanticBranch: {len(features)} feature maps for strides {list(self.in_strides)}")
        size = features[self.in_strides.index(self.stride)].shape[-2:]
        fused = None
        for lateral, x in zip(self.laterals, features):
            y = lateral(x)
            if y.shape[-2] > size[0]:
                y = F.adaptive_avg_pool2d(y, size)
            elif y.shape[-2] < size[0]:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            fused = y if fused is None else fused + y
        assert fused is not None
        return fused

    def forward(self, features: Sequence[Tensor], image_sizes: ImageSizes) -> SemanticContext:
        x = self.convs(self.fuse(features))
        context = SemanticContext(logits=self.predictor(x), stride=self.stride)
        if self.embedding is not None:
            context.features = self.embedding(x)
            if self.global_context:
                context.global_features = masked_image_mean(context.features, image_sizes, self.stride)
        return context

    def recompute_stages(self) -> list[RecomputeStage]:
        """What sublinear memory may recompute (names relative to this module): the conv tower after the
        fusion, whose convs "blocks" recomputes alone."""
        return [RecomputeStage("convs", blocks=True)]

    def loss(self, logits: Tensor, targets: Sequence[dict[str, Tensor]], image_sizes: ImageSizes) -> Tensor:
        """Cross-entropy of the logits against each target's ``sem_seg`` (h, w) map at the input size,
        sampled at the centre pixel of every 1/stride cell; label 255 and the batch's padding are
        ignored. The mean over the labelled cells (0, attached to the graph, when none), times
        ``loss_weight``."""
        labels = logits.new_full((len(targets), *logits.shape[-2:]), IGNORE_LABEL, dtype=torch.int64)
        s = self.stride
        for i, (t, (h, w)) in enumerate(zip(targets, image_sizes)):
            if "sem_seg" not in t:
                raise ValueError(f"targets[{i}] has no 'sem_seg' (model.context.semantic needs per-pixel labels)")
            sem = t["sem_seg"]
            if tuple(sem.shape) != (int(h), int(w)):
                raise ValueError(f"targets[{i}]['sem_seg'] is {tuple(sem.shape)} but the image is {(int(h), int(w))}")
            rows = torch.arange(s // 2, int(h), s, device=sem.device)[: labels.shape[1]]
            cols = torch.arange(s // 2, int(w), s, device=sem.device)[: labels.shape[2]]
            labels[i, : len(rows), : len(cols)] = sem.index_select(0, rows).index_select(1, cols).long()
        ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_LABEL, reduction="sum")
        count = (labels != IGNORE_LABEL).sum().clamp(min=1)
        return self.loss_weight * ce / count

    def label_maps(self, context: SemanticContext, image_sizes: ImageSizes, out_sizes: ImageSizes) -> list[Tensor]:
        """Per image the (H, W) int64 arg-max class at ``out_sizes`` (e.g. the original image sizes)."""
        return [
            resize_logits(logits, self.stride, size, out).argmax(dim=0)
            for logits, size, out in zip(context.logits, image_sizes, out_sizes)
        ]


def resize_logits(logits: Tensor, stride: int, image_size: Sequence[int], out_size: Sequence[int]) -> Tensor:
    """(K, h, w) logits at 1/``stride`` of an input whose image covers ``image_size`` (the rest is padding)
    -> (K, H, W) float32 at ``out_size``: the image's area bilinearly resampled at the centres of the
    output pixels (one RoIAlign sample each), i.e. crop and resize in one step."""
    h, w = (int(v) for v in image_size)
    oh, ow = (int(v) for v in out_size)
    box = torch.tensor([[0.0, 0.0, 0.0, float(w), float(h)]], device=logits.device)
    return roi_align(logits[None].float(), box, (oh, ow), spatial_scale=1.0 / stride, sampling_ratio=1, aligned=True)[0]


def masked_image_mean(features: Tensor, image_sizes: ImageSizes, stride: int) -> Tensor:
    """(B, C): each image's features averaged over the cells its unpadded area reaches."""
    # Filled by slices rather than built from a list: no host-to-device copy (a sync on CUDA).
    weights = features.new_zeros((features.shape[0], 1, *features.shape[-2:]))
    for i, (h, w) in enumerate(image_sizes):
        weights[i, :, : -(-int(h) // stride), : -(-int(w) // stride)].fill_(1.0)
    return (features * weights).sum(dim=(2, 3)) / weights.sum(dim=(2, 3)).clamp(min=1)


class RoIContext(nn.Module):
    """The semantic context one RoI head takes in (owned by the head, called from its forward).

    ``roi_features``: the branch's embedding pooled for each RoI (a one-level pooler of the head's
    type and size at the branch's stride), added to the head's pooled FPN features.
    ``global_channels`` > 0: the image's global context vector projected to ``representation_dim``
    and added to each of its RoIs' representation (the box head's fc output).
    """

    def __init__(
        self,
        *,
        pool_size: int,
        stride: int,
        pooler_type: str = "roialign",
        sampling_ratio: int = 2,
        roi_features: bool = True,
        global_channels: int = 0,
        representation_dim: int = 0,
    ) -> None:
        super().__init__()
        self.pooler = (
            MultiLevelPooler(pool_size, [1.0 / stride], sampling_ratio=sampling_ratio, pooler_type=pooler_type)
            if roi_features
            else None
        )
        self.global_proj = nn.Linear(global_channels, representation_dim) if global_channels > 0 else None
        if self.global_proj is not None:
            # Zero at first: a context model starts from the plain head's function.
            nn.init.zeros_(self.global_proj.weight)
            nn.init.zeros_(self.global_proj.bias)

    @staticmethod
    def _require(context: SemanticContext | None, what: str) -> Any:
        value = getattr(context, what, None) if context is not None else None
        if value is None:
            raise ValueError(
                f"this RoI head takes semantic context ({what}); pass the model's semantic_context(...) output"
            )
        return value

    def add_roi_features(self, pooled: Tensor, context: SemanticContext | None, boxes: list[Tensor]) -> Tensor:
        """``pooled`` (R, C, S, S) plus the embedding pooled for the same RoIs (unchanged without ``roi_features``)."""
        if self.pooler is None:
            return pooled
        features = self._require(context, "features")
        return pooled + self.pooler([features], boxes).to(pooled.dtype)

    def add_global(self, representation: Tensor, context: SemanticContext | None, boxes: list[Tensor]) -> Tensor:
        """``representation`` (R, D) plus each RoI's image's projected global context (unchanged without it)."""
        if self.global_proj is None:
            return representation
        vector = self.global_proj(self._require(context, "global_features")).to(representation.dtype)
        # Each image's vector once per RoI, by expansion: no tensor of counts to copy to the device.
        per_roi = torch.cat([vector[i].expand(len(b), -1) for i, b in enumerate(boxes)])
        return representation + per_roi


# --------------------------------------------------------------------------------------------------
# Config -> parts
# --------------------------------------------------------------------------------------------------


def semantic_parts_from_config(
    cfg: ModelConfig, *, in_channels: int
) -> tuple[SemanticBranch | None, RoIContext | None, RoIContext | None]:
    """The branch of ``model.context`` on pyramid levels of ``in_channels`` channels, and the box / mask
    heads' :class:`RoIContext` (None where the branch is off or that head takes no context)."""
    c, roi = cfg.context, cfg.roi
    if not c.semantic:
        return None, None, None
    with_context = c.roi_features or c.global_context
    branch = SemanticBranch(
        in_channels=in_channels,
        num_classes=semantic_num_classes(c.num_semantic_classes, cfg.num_classes),
        stride=c.semantic_stride,
        num_convs=c.semantic_convs,
        conv_dim=c.semantic_dim,
        norm=head_norm_of(cfg),
        loss_weight=c.semantic_loss_weight,
        context_channels=in_channels if with_context else 0,
        global_context=c.global_context,
    )
    box_context = mask_context = None
    if with_context:
        box_context = RoIContext(
            pool_size=roi.box_pool_size,
            stride=branch.stride,
            pooler_type=roi.pooler,
            sampling_ratio=roi.sampling_ratio,
            roi_features=c.roi_features,
            global_channels=in_channels if c.global_context else 0,
            representation_dim=roi.box_head_dim,
        )
    if c.roi_features and cfg.mask_on:
        mask_context = RoIContext(
            pool_size=roi.mask_pool_size, stride=branch.stride, pooler_type=roi.pooler, sampling_ratio=roi.sampling_ratio
        )
    return branch, box_context, mask_context
