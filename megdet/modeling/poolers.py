"""Multi-level RoI pooling over FPN feature maps (RoIAlign or Precise RoI Pooling)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torchvision
from torch import Tensor, nn

from megdet.config import POOLERS, check_choice
from megdet.layers.prroi_pool import prroi_pool, prroi_pool_levels


def assign_levels(
    boxes_cat: Tensor,
    min_level: int,
    max_level: int,
    canonical_box_size: int = 224,
    canonical_level: int = 4,
) -> Tensor:
    """FPN level of each box (Lin et al. 2017, eq. 1), as an index into the list of levels.

    ``k = floor(canonical_level + log2(sqrt(w * h) / canonical_box_size))`` clamped to
    ``[min_level, max_level]``; returns ``k - min_level`` (int64, shape (N,)), i.e. 0 for the
    highest-resolution map. ``boxes_cat`` is (N, 4) xyxy in input-image coordinates.
    """
    if boxes_cat.dim() != 2 or boxes_cat.shape[1] != 4:
        raise ValueError(f"assign_levels: boxes must be (N, 4) xyxy, got shape {tuple(boxes_cat.shape)}")
    if min_level > max_level:
        raise ValueError(f"assign_levels: min_level {min_level} > max_level {max_level}")
    boxes = boxes_cat.float()
    area = ((boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)).sqrt()
    # The epsilon keeps degenerate (zero-area) boxes finite; they land on the finest level.
    k = torch.floor(canonical_level + torch.log2(area / canonical_box_size + 1e-8))
    return (k.clamp(min=min_level, max=max_level) - min_level).to(torch.int64)


def _levels_from_scales(scales: Sequence[float]) -> tuple[int, int]:
    """Map scales 1/4, 1/8, ... to FPN levels 2, 3, ... and check they are consecutive powers of 2."""
    if len(scales) == 0:
        raise ValueError("MultiLevelPooler: scales is empty; give one scale per feature map, e.g. [1/4, 1/8]")
    levels = []
    for s in scales:
        if s <= 0:
            raise ValueError(f"MultiLevelPooler: scale {s} must be positive (e.g. 0.25 for stride 4)")
        lvl = -math.log2(s)
        if abs(lvl - round(lvl)) > 1e-3:
            raise ValueError(f"MultiLevelPooler: scale {s} is not a power of 2 (expected 1/4, 1/8, ...)")
        levels.append(round(lvl))
    if levels != list(range(levels[0], levels[0] + len(levels))):
        raise ValueError(
            f"MultiLevelPooler: scales {list(scales)} must be consecutive FPN levels, finest first"
        )
    return levels[0], levels[-1]


class _Unpermute(torch.autograd.Function):
    """``x.index_select(0, inverse)`` whose backward is the gather ``grad.index_select(0, perm)``.

    Autograd's generic index_select backward scatter-adds into a fresh zero tensor; for a
    permutation a plain gather is exact and saves a pass over the (large) pooled output.
    """

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(perm)
        return x.index_select(0, inverse)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (perm,) = ctx.saved_tensors
        return grad.index_select(0, perm), None, None


class MultiLevelPooler(nn.Module):
    """Pools each box from the FPN level its size selects, into a fixed-size feature.

    ``forward(features, boxes)``: ``features`` are the FPN maps, highest resolution first, each
    (B, C, H_l, W_l) with scale ``scales[l]``; ``boxes`` is a list of B tensors (N_i, 4) xyxy in
    input-image coordinates. Returns (sum N_i, C, h, w) in the order of the concatenated boxes,
    in the feature dtype.
    """

    def __init__(
        self,
        output_size: int | tuple[int, int],
        scales: Sequence[float],
        sampling_ratio: int = 2,
        pooler_type: str = "roialign",
        canonical_box_size: int = 224,
        canonical_level: int = 4,
        aligned: bool = True,
    ) -> None:
        super().__init__()
        check_choice("MultiLevelPooler", pooler_type, POOLERS, "pooler_type")
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.output_size = (int(output_size[0]), int(output_size[1]))
        self.scales = [float(s) for s in scales]
        self.min_level, self.max_level = _levels_from_scales(self.scales)
        self.sampling_ratio = sampling_ratio
        self.pooler_type = pooler_type
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level
        # RoIAlign only: True shifts box coordinates by half a pixel (detectron2's ROIAlignV2); False
        # is torchvision's MultiScaleRoIAlign (what its Faster / Mask / Keypoint R-CNN models use).
        self.aligned = aligned

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, scales={self.scales}, pooler_type={self.pooler_type!r}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )

    def _pool(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        if self.pooler_type == "prroi":
            # prroi_pool accumulates in float32 itself and returns the feature dtype.
            return prroi_pool(feature, rois, self.output_size, scale)
        if feature.dtype in (torch.float16, torch.bfloat16):
            # Box coordinates in half precision would be off by several pixels at 800+ px, so
            # pool in float32 (what torchvision's own autocast wrapper does) and cast back.
            out = torchvision.ops.roi_align(
                feature.float(), rois.float(), self.output_size, scale, self.sampling_ratio, self.aligned
            )
            return out.to(feature.dtype)
        return torchvision.ops.roi_align(
            feature, rois.to(feature.dtype), self.output_size, scale, self.sampling_ratio, self.aligned
        )

    def levels(self, boxes: Tensor) -> Tensor:
        """The level index (int64, shape ``boxes.shape[:-1]``) each of ``boxes`` (..., 4) is pooled from."""
        flat = assign_levels(
            boxes.reshape(-1, 4),
            self.min_level,
            self.max_level,
            self.canonical_box_size,
            self.canonical_level,
        )
        return flat.view(boxes.shape[:-1])

    def count_levels(self, levels: Tensor, mask: Tensor) -> Tensor:
        """How many of the boxes where ``mask`` is set fall on each level: (num_levels,) int64."""
        ids = torch.arange(len(self.scales), device=levels.device)
        return ((levels[..., None] == ids) & mask[..., None]).flatten(0, -2).sum(dim=0)

    def forward(
        self, features: list[Tensor], boxes: list[Tensor], level_counts: Sequence[int] | None = None
    ) -> Tensor:
        """``level_counts``: how many of the boxes fall on each level (see :meth:`levels`), when the
        caller already read them on the host; otherwise RoIAlign reads them here (one host sync)."""
        if len(features) != len(self.scales):
            raise ValueError(
                f"MultiLevelPooler: got {len(features)} feature maps but {len(self.scales)} scales"
            )
        num_images = features[0].shape[0]
        if len(boxes) != num_images:
            raise ValueError(
                f"MultiLevelPooler: got boxes for {len(boxes)} images but a batch of {num_images}"
            )
        ref = features[0]
        for b in boxes:
            if b.dim() != 2 or b.shape[1] != 4:
                raise ValueError(
                    f"MultiLevelPooler: boxes must be (N, 4) xyxy per image, got {tuple(b.shape)}"
                )
        # float64 boxes stay float64 for float64 features; otherwise coordinates are float32.
        box_dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        rois = torch.cat(
            [torch.zeros((0, 5), dtype=box_dtype, device=ref.device)]
            + [
                torch.cat(
                    [torch.full((len(b), 1), i, dtype=box_dtype, device=ref.device), b.to(box_dtype)], 1
                )
                for i, b in enumerate(boxes)
            ]
        )
        if len(self.scales) == 1 or rois.shape[0] == 0:
            # One level (or nothing to pool): no assignment needed; an empty result stays attached
            # to the graph because both poolers return it from their own op.
            return self._pool(ref, rois, self.scales[0])
        levels = self.levels(rois[:, 1:])
        if self.pooler_type == "prroi":
            # One call over all levels writes every RoI straight to its row (no per-level outputs
            # to concatenate and reorder).
            return prroi_pool_levels(features, rois, levels, self.output_size, self.scales)
        return self._pool_by_level(features, rois, levels, level_counts)

    def _pool_by_level(
        self, features: list[Tensor], rois: Tensor, levels: Tensor, level_counts: Sequence[int] | None
    ) -> Tensor:
        """RoIAlign of each level's RoIs (sorted by level, stably), back in the RoIs' order."""
        if level_counts is None:
            level_counts = self.count_levels(levels, torch.ones_like(levels, dtype=torch.bool)).tolist()
        counts = [int(c) for c in level_counts]
        if len(counts) != len(self.scales) or sum(counts) != rois.shape[0]:
            raise ValueError(
                f"MultiLevelPooler: level_counts {counts} do not add up to {rois.shape[0]} RoIs over "
                f"{len(self.scales)} levels"
            )
        perm = torch.sort(levels, stable=True).indices
        pooled = [
            self._pool(feature, part, scale).to(features[0].dtype)
            for feature, scale, part, n in zip(features, self.scales, rois[perm].split(counts), counts)
            if n > 0
        ]
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return _Unpermute.apply(torch.cat(pooled), perm, inverse)
