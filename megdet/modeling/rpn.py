"""Region proposal network over P2..P6: anchors, head, proposal selection, matching, sampling, losses.

The anchor bookkeeping follows torchvision's ``RegionProposalNetwork`` value for value, but runs
on the whole batch with static shapes so that a training step does not wait on the device: top-k
per level, NMS of all images and levels in one launch (:mod:`megdet.modeling.nms`), and matching,
sampling and the losses as masked tensor operations (:mod:`megdet.modeling.box_ops`). The head is
our own because torchvision's ``RPNHead`` has no norm argument.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from megdet.config import NORMS, ModelConfig, check_choice
from megdet.layers.norm import get_norm
from megdet.modeling.backbone import head_norm_of
from megdet.modeling.box_ops import (
    Proposals,
    decode,
    encode,
    gather_rows,
    masked_mean,
    match,
    pad_boxes,
    pairwise_iou,
    sample_balanced,
)
from megdet.modeling.nms import grouped_nms


class RPNHead(nn.Module):
    """``conv_depth`` shared 3x3 convs (+ norm + ReLU), then objectness and box-delta 1x1 convs.

    With a norm, each conv's outputs of all pyramid levels are normalised in ONE call over the
    levels laid side by side: BN statistics then describe the shared head's input (one set for all
    levels, identical in training and eval), and a cross-device BN issues one collective per layer
    rather than one per level.
    """

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1, norm: str = "none") -> None:
        super().__init__()
        check_choice("RPNHead", norm, NORMS, "norm")
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=norm == "none") for _ in range(conv_depth)
        )
        self.norms = (
            nn.ModuleList(get_norm(norm, in_channels) for _ in range(conv_depth)) if norm != "none" else None
        )
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @staticmethod
    def _norm_levels(norm: nn.Module, xs: list[Tensor]) -> list[Tensor]:
        n, c = xs[0].shape[:2]
        flat = torch.cat([x.reshape(n, c, 1, -1) for x in xs], dim=3)
        y = norm(flat)
        sizes = [x.shape[-2] * x.shape[-1] for x in xs]
        return [p.reshape(x.shape) for p, x in zip(y.split(sizes, dim=3), xs)]

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        xs = features
        for i, conv in enumerate(self.convs):
            xs = [conv(x) for x in xs]
            if self.norms is not None:
                xs = self._norm_levels(self.norms[i], xs)
            xs = [F.relu(x) for x in xs]
        # float32 outputs: torchvision's BoxCoder casts anchors to the deltas' dtype, which under
        # bf16/fp16 autocast would quantise proposal coordinates to a few pixels.
        logits = [self.cls_logits(x).float() for x in xs]
        deltas = [self.bbox_pred(x).float() for x in xs]
        return logits, deltas



def exact_cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """Cell anchors (len(ratios) x len(sizes), 4) xyxy centred on 0, in torchvision's order (ratio-major),
    of area size^2 and height / width = ratio, without torchvision's rounding to whole pixels."""
    scales = torch.as_tensor(sizes, dtype=torch.float64)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float64)
    h = ratios.sqrt()
    ws = (scales[None, :] / h[:, None]).reshape(-1)
    hs = (scales[None, :] * h[:, None]).reshape(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).float()


class FixedStrideAnchorGenerator(AnchorGenerator):
    """torchvision's AnchorGenerator with each level's stride given rather than inferred.

    torchvision infers a level's stride as ``padded_size // grid_size``; for P6 (a stride-2 pool of
    P5) on images padded to a multiple of 32 whose P5 grid is odd, that gives e.g. 96 // 2 = 48
    instead of 64, so the P6 anchors would not line up with their feature cells.

    Anchors are float32 (float64 for float64 features) whatever the features' dtype: in bf16 an
    anchor corner at x = 1000 would be off by up to 4 pixels. They are built on the device from a
    per-device copy of the cell anchors and kept for the last few feature-map sizes.

    ``round_anchors``: torchvision rounds the cell anchors' corners to whole pixels; detectron2 keeps
    them exact (e.g. 45.25 x 22.63 instead of 46 x 22 for size 32, ratio 0.5). Models trained with
    one convention are evaluated with it.
    """

    def __init__(
        self,
        sizes: tuple[tuple[int, ...], ...],
        aspect_ratios: tuple[tuple[float, ...], ...],
        strides: Sequence[int],
        cache_size: int = 8,
        round_anchors: bool = True,
    ) -> None:
        super().__init__(sizes, aspect_ratios)
        if not round_anchors:
            self.cell_anchors = [exact_cell_anchors(s, a) for s, a in zip(sizes, aspect_ratios)]
        if len(strides) != len(sizes):
            raise ValueError(
                f"FixedStrideAnchorGenerator: {len(sizes)} sizes for {len(strides)} strides (one size per level)"
            )
        self.strides = [int(s) for s in strides]
        self.cache_size = cache_size
        self._cells: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        self._grids: OrderedDict[tuple, Tensor] = OrderedDict()

    def grid(self, feature_maps: list[Tensor]) -> Tensor:
        """All levels' anchors (A, 4) xyxy, level by level, each in (row, column, cell anchor)
        order: the order of the RPN head's flattened outputs."""
        ref = feature_maps[0]
        dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        sizes = tuple((int(f.shape[-2]), int(f.shape[-1])) for f in feature_maps)
        key = (ref.device, dtype, sizes)
        anchors = self._grids.get(key)
        if anchors is None:
            anchors = self._make_grid(sizes, ref.device, dtype)
            self._grids[key] = anchors
            if len(self._grids) > self.cache_size:
                self._grids.popitem(last=False)
        return anchors

    def _make_grid(
        self, sizes: tuple[tuple[int, int], ...], device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        cells = self._cells.get((device, dtype))
        if cells is None:  # a host-to-device copy, once per device
            cells = [c.to(device=device, dtype=dtype) for c in self.cell_anchors]
            self._cells[(device, dtype)] = cells
        per_level = []
        for (h, w), stride, base in zip(sizes, self.strides, cells):
            shifts_x = torch.arange(0, w, dtype=torch.int32, device=device) * stride
            shifts_y = torch.arange(0, h, dtype=torch.int32, device=device) * stride
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
            per_level.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
        return torch.cat(per_level)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        flat = self.grid(feature_maps)
        return [flat for _ in image_list.image_sizes]


class _RPNParts(nn.Module):
    """The anchor generator and head under the attribute names of torchvision's
    RegionProposalNetwork, so that checkpoints keep their ``rpn.rpn.head.*`` keys."""

    def __init__(self, anchor_generator: FixedStrideAnchorGenerator, head: RPNHead) -> None:
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head


def _flatten_levels(logits: list[Tensor], deltas: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-level head outputs -> objectness (B, A) and deltas (B, A, 4) in anchor order."""
    n = logits[0].shape[0]
    obj = torch.cat([x.permute(0, 2, 3, 1).reshape(n, -1) for x in logits], dim=1)
    reg = torch.cat(
        [d.view(n, -1, 4, d.shape[-2], d.shape[-1]).permute(0, 3, 4, 1, 2).reshape(n, -1, 4) for d in deltas],
        dim=1,
    )
    return obj, reg


class RPN(nn.Module):
    """Anchors (one size per level, shared aspect ratios) + :class:`RPNHead` + proposal selection and losses.

    ``forward(images, image_sizes, features, targets=None, padded=False) -> (proposals, losses)``:
    proposals is one (Ni, 4) xyxy tensor per image (detached), or with ``padded`` a
    :class:`~megdet.modeling.box_ops.Proposals` (no host sync for the per-image counts); losses holds
    ``loss_objectness`` and ``loss_rpn_box_reg`` in training and is empty in eval.

    Per image: the ``pre_nms_top_n`` best-scoring anchors of each level are decoded and clipped, boxes
    narrower or lower than 1e-3 dropped, NMS run within each level and the ``post_nms_top_n`` best kept
    (torchvision's rules). Training samples ``batch_size_per_image`` anchors per image
    (``positive_fraction`` of them foreground at most) for the losses.
    """

    min_size = 1e-3
    score_thresh = 0.0

    def __init__(
        self,
        *,
        in_channels: int,
        strides: Sequence[int] = (4, 8, 16, 32, 64),
        anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        head_convs: int = 1,
        round_anchors: bool = True,
        norm: str = "none",
        pre_nms_top_n_train: int = 2000,
        post_nms_top_n_train: int = 1000,
        pre_nms_top_n_test: int = 1000,
        post_nms_top_n_test: int = 1000,
        nms_thresh: float = 0.7,
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
    ) -> None:
        super().__init__()
        if bg_iou_thresh > fg_iou_thresh:
            raise ValueError(f"RPN: bg_iou_thresh {bg_iou_thresh} > fg_iou_thresh {fg_iou_thresh}")
        self.num_levels = len(anchor_sizes)
        anchors = FixedStrideAnchorGenerator(
            sizes=tuple((int(s),) for s in anchor_sizes),
            aspect_ratios=(tuple(float(a) for a in aspect_ratios),) * len(anchor_sizes),
            strides=strides,
            round_anchors=round_anchors,
        )
        head = RPNHead(in_channels, len(aspect_ratios), conv_depth=head_convs, norm=norm)
        self.rpn = _RPNParts(anchors, head)
        self.pre_nms_top_n = {"training": pre_nms_top_n_train, "testing": pre_nms_top_n_test}
        self.post_nms_top_n = {"training": post_nms_top_n_train, "testing": post_nms_top_n_test}
        self.nms_thresh = nms_thresh
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    @classmethod
    def from_config(cls, cfg: ModelConfig, *, in_channels: int, strides: Sequence[int]) -> RPN:
        """The RPN of ``model.*`` on pyramid levels of ``in_channels`` channels at ``strides``."""
        r = cfg.rpn
        return cls(
            in_channels=in_channels,
            strides=strides,
            anchor_sizes=list(r.anchor_sizes),
            aspect_ratios=list(r.aspect_ratios),
            head_convs=r.head_convs,
            round_anchors=r.round_anchors,
            norm=head_norm_of(cfg),
            pre_nms_top_n_train=r.pre_nms_top_n_train,
            post_nms_top_n_train=r.post_nms_top_n_train,
            pre_nms_top_n_test=r.pre_nms_top_n_test,
            post_nms_top_n_test=r.post_nms_top_n_test,
            nms_thresh=r.nms_thresh,
            fg_iou_thresh=r.fg_iou_thresh,
            bg_iou_thresh=r.bg_iou_thresh,
            batch_size_per_image=r.batch_size_per_image,
            positive_fraction=r.positive_fraction,
        )

    @property
    def head(self) -> RPNHead:
        return self.rpn.head

    def forward(
        self,
        images: Tensor,
        image_sizes: Sequence[Sequence[int]],
        features: list[Tensor],
        targets: list[dict[str, Tensor]] | None = None,
        padded: bool = False,
    ) -> tuple[list[Tensor] | Proposals, dict[str, Tensor]]:
        if len(features) != self.num_levels:
            raise ValueError(f"RPN: got {len(features)} feature maps for {self.num_levels} anchor sizes (one per level)")
        if self.training and targets is None:
            raise ValueError("RPN: targets are required in training mode (call model.eval() for inference)")
        if len(image_sizes) != features[0].shape[0]:
            raise ValueError(f"RPN: {features[0].shape[0]} images but {len(image_sizes)} image_sizes")
        logits, deltas = self.rpn.head(features)
        anchors = self.rpn.anchor_generator.grid(features)
        level_sizes = [x.shape[1] * x.shape[2] * x.shape[3] for x in logits]
        obj, reg = _flatten_levels(logits, deltas)
        # The losses first: their kernels are queued before NMS makes the host wait for the device.
        losses = self._losses(obj, reg, anchors, targets) if targets is not None and self.training else {}
        sizes = [(int(h), int(w)) for h, w in image_sizes]
        proposals = self._proposals(obj.detach(), reg.detach(), anchors, level_sizes, sizes)
        return (proposals if padded else proposals.to_list()), losses

    def _top_per_level(self, obj: Tensor, level_sizes: list[int], top_n: int) -> tuple[Tensor, Tensor]:
        """Each level's ``top_n`` best anchors per image in decreasing score order, as indices
        (B, L, n) with n = the most any level has, and which slots hold one (L, n) (a level with fewer
        anchors than n is padded)."""
        n = min(top_n, max(level_sizes))
        slots = torch.arange(n, device=obj.device)
        idx, filled, start = [], [], 0
        for size in level_sizes:
            k = min(top_n, size)
            top = obj[:, start : start + size].topk(k, dim=1).indices + start
            idx.append(F.pad(top, (0, n - k), value=start))
            filled.append(slots < k)
            start += size
        return torch.stack(idx, dim=1), torch.stack(filled)

    @torch.no_grad()
    def _proposals(
        self, obj: Tensor, reg: Tensor, anchors: Tensor, level_sizes: list[int], sizes: list[tuple[int, int]]
    ) -> Proposals:
        mode = "training" if self.training else "testing"
        idx, filled = self._top_per_level(obj, level_sizes, self.pre_nms_top_n[mode])  # (B, L, n)
        flat = idx.flatten(1)
        scores = obj.gather(1, flat).sigmoid().view(idx.shape)
        boxes = decode(gather_rows(reg, flat), anchors[flat], (1.0, 1.0, 1.0, 1.0)).view(*idx.shape, 4)
        for i, (h, w) in enumerate(sizes):
            boxes[i, ..., 0::2].clamp_(min=0, max=w)
            boxes[i, ..., 1::2].clamp_(min=0, max=h)
        widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        valid = filled & (widths >= self.min_size) & (heights >= self.min_size)
        valid &= scores >= self.score_thresh
        kept = grouped_nms(boxes, valid, self.nms_thresh).flatten(1)
        ranked = torch.where(kept, scores.flatten(1), -1.0)
        top, order = ranked.topk(min(self.post_nms_top_n[mode], ranked.shape[1]), dim=1)
        return Proposals(gather_rows(boxes.flatten(1, 2), order), top >= 0)

    def _losses(
        self, obj: Tensor, reg: Tensor, anchors: Tensor, targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Binary cross-entropy over the sampled anchors (mean) and smooth-L1 (beta 1/9) on the sampled
        positives, summed and divided by the number sampled (torchvision's RPN losses)."""
        gt, gt_valid = pad_boxes([t["boxes"] for t in targets])
        if gt.shape[1] == 0:  # no object in the whole batch: every anchor is background
            gt = anchors.new_zeros((len(targets), 1, 4))
            matches = torch.full(obj.shape, -1, dtype=torch.int64, device=obj.device)
        else:
            iou = pairwise_iou(gt, anchors.to(gt.dtype)[None])
            matches = match(iou, gt_valid, self.fg_iou_thresh, self.bg_iou_thresh, True)
        # 1 foreground, 0 background, -1 between the thresholds (never sampled)
        labels = torch.where(matches >= 0, 1.0, torch.where(matches == -1, 0.0, -1.0))
        idx, valid = sample_balanced(labels, self.batch_size_per_image, self.positive_fraction)
        sampled_labels = labels.gather(1, idx)
        positive = valid & (sampled_labels > 0)
        bce = F.binary_cross_entropy_with_logits(
            obj.gather(1, idx), sampled_labels.clamp(min=0), reduction="none"
        )
        matched = gather_rows(gt, matches.gather(1, idx).clamp(min=0)).to(reg.dtype)
        target = encode(matched, anchors[idx].to(reg.dtype), (1.0, 1.0, 1.0, 1.0))
        target = torch.where(positive[..., None], target, 0.0)
        box = F.smooth_l1_loss(gather_rows(reg, idx), target, beta=1 / 9, reduction="none").sum(dim=-1)
        loss_box = torch.where(positive, box, 0.0).sum() / valid.sum().clamp(min=1)
        return {"loss_objectness": masked_mean(bce, valid), "loss_rpn_box_reg": loss_box}
