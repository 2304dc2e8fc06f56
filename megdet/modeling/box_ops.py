"""Box coding, IoU, matching and balanced sampling on padded per-image tensors, without host syncs.

torchvision's Matcher, BalancedPositiveNegativeSampler and BoxCoder work one image at a time with
data-dependent shapes (``nonzero``, boolean-mask indexing, ``torch.tensor`` of Python numbers), each
of which makes the host wait for the device. The functions here take a batch padded to a common
length with a validity mask, keep static shapes, and give the same values: the box arithmetic is
torchvision's, operation for operation; sampling draws the same distribution (a uniform subset
without replacement of the same size) by taking the top-k of random keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

BBOX_XFORM_CLIP = math.log(1000.0 / 16)
BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2

Weights = tuple[float, float, float, float]


@dataclass
class Proposals:
    """Per image up to P boxes, padded: ``boxes`` (B, P, 4) xyxy and ``valid`` (B, P) bool, the
    valid ones of each image first (in decreasing score order when they come from the RPN)."""

    boxes: Tensor
    valid: Tensor

    @staticmethod
    def from_list(boxes: list[Tensor]) -> Proposals:
        padded, valid = pad_boxes(boxes)
        return Proposals(padded, valid)

    def to_list(self) -> list[Tensor]:
        """One (Ni, 4) tensor per image; reads the counts on the host (one sync for the batch)."""
        counts = self.valid.sum(dim=1).tolist()
        return [b[:n] for b, n in zip(self.boxes, counts)]


def pad_boxes(boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(B, N, 4) boxes zero-padded to the longest image and their (B, N) validity mask.

    The mask comes from NaN padding rather than from the lengths, so no Python number is copied to
    the device; a NaN box in the input would count as padding.
    """
    if len(boxes) == 0:
        raise ValueError("pad_boxes: no images")
    padded = pad_sequence(list(boxes), batch_first=True, padding_value=math.nan)
    valid = ~padded[..., 0].isnan()
    return padded.nan_to_num(0.0), valid


def pad_values(values: list[Tensor], fill: float) -> Tensor:
    """Per-image tensors (Ni, ...) padded with ``fill`` to (B, N, ...)."""
    return pad_sequence(list(values), batch_first=True, padding_value=fill)


def encode(gt: Tensor, boxes: Tensor, weights: Weights) -> Tensor:
    """Regression targets (..., 4) from ``boxes`` towards ``gt`` (torchvision's ``encode_boxes``)."""
    wx, wy, ww, wh = weights
    ex_w = boxes[..., 2] - boxes[..., 0]
    ex_h = boxes[..., 3] - boxes[..., 1]
    ex_x = boxes[..., 0] + 0.5 * ex_w
    ex_y = boxes[..., 1] + 0.5 * ex_h
    gt_w = gt[..., 2] - gt[..., 0]
    gt_h = gt[..., 3] - gt[..., 1]
    gt_x = gt[..., 0] + 0.5 * gt_w
    gt_y = gt[..., 1] + 0.5 * gt_h
    dx = wx * (gt_x - ex_x) / ex_w
    dy = wy * (gt_y - ex_y) / ex_h
    dw = ww * torch.log(gt_w / ex_w)
    dh = wh * torch.log(gt_h / ex_h)
    return torch.stack((dx, dy, dw, dh), dim=-1)


def decode(deltas: Tensor, boxes: Tensor, weights: Weights, clip: float = BBOX_XFORM_CLIP) -> Tensor:
    """Boxes (..., 4) from ``deltas`` (..., 4) applied to ``boxes`` (torchvision's ``decode_single``,
    computed in the deltas' dtype)."""
    boxes = boxes.to(deltas.dtype)
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    ctr_x = boxes[..., 0] + 0.5 * widths
    ctr_y = boxes[..., 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = (deltas[..., 2] / ww).clamp(max=clip)
    dh = (deltas[..., 3] / wh).clamp(max=clip)
    pred_x = dx * widths + ctr_x
    pred_y = dy * heights + ctr_y
    half_w = 0.5 * (torch.exp(dw) * widths)
    half_h = 0.5 * (torch.exp(dh) * heights)
    return torch.stack((pred_x - half_w, pred_y - half_h, pred_x + half_w, pred_y + half_h), dim=-1)


def pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU (..., N, M) of boxes ``a`` (..., N, 4) and ``b`` (..., M, 4); torchvision's ``box_iou``
    batched over the leading dimensions."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    a, b = a[..., :, None, :], b[..., None, :, :]
    w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = w * h
    return inter / (area_a[..., :, None] + area_b[..., None, :] - inter)


def match(
    iou: Tensor, gt_valid: Tensor, high: float, low: float, allow_low_quality_matches: bool = False
) -> Tensor:
    """torchvision's ``Matcher`` over a batch: ``iou`` (B, G, N) of padded GT rows against N boxes.

    Returns (B, N) int64: the matched GT index, ``BELOW_LOW_THRESHOLD`` (-1) or ``BETWEEN_THRESHOLDS``
    (-2). Padding rows (``gt_valid`` False) never match; an image without GT is all -1.
    """
    iou = torch.where(gt_valid[..., None], iou, -1.0)
    vals, matches = iou.max(dim=1)
    below = vals < low
    between = (vals >= low) & (vals < high)
    out = torch.where(below, BELOW_LOW_THRESHOLD, torch.where(between, BETWEEN_THRESHOLDS, matches))
    if allow_low_quality_matches:
        # Every box tied for the best IoU of some GT keeps its own best match, however low.
        best_per_gt = iou.max(dim=2, keepdim=True).values
        low_quality = ((iou == best_per_gt) & gt_valid[..., None]).any(dim=1)
        out = torch.where(low_quality, matches, out)
    return out


def random_keys(shape: torch.Size | tuple[int, ...], device: torch.device) -> Tensor:
    """Uniform keys in [0, 1) whose top-k among candidates is a uniform random k-subset; float64 so
    that ties (which topk breaks by position) are negligible even over 10^5 anchors."""
    return torch.rand(shape, dtype=torch.float64, device=device)


def sample_balanced(
    labels: Tensor, batch_size_per_image: int, positive_fraction: float
) -> tuple[Tensor, Tensor]:
    """torchvision's ``BalancedPositiveNegativeSampler`` for (B, N) ``labels`` (>= 1 positive, 0
    negative, < 0 ignored), with a static shape.

    Per image min(#pos, int(batch_size_per_image * positive_fraction)) positives and min(#neg,
    batch_size_per_image - that) negatives, each a uniform random subset. Returns ``idx`` (B, S)
    into N and ``valid`` (B, S): the sampled positives, then the sampled negatives, then unused slots.
    """
    n = labels.shape[1]
    keys = random_keys(labels.shape, labels.device)
    num_pos = int(batch_size_per_image * positive_fraction)
    pos_keys, pos_idx = torch.where(labels >= 1, keys, -1.0).topk(min(num_pos, n), dim=1)
    pos_ok = pos_keys >= 0
    neg_keys, neg_idx = torch.where(labels == 0, keys, -1.0).topk(min(batch_size_per_image, n), dim=1)
    rank = torch.arange(neg_idx.shape[1], device=labels.device)
    neg_ok = (neg_keys >= 0) & (rank < batch_size_per_image - pos_ok.sum(dim=1, keepdim=True))
    return valid_first(torch.cat([pos_idx, neg_idx], dim=1), torch.cat([pos_ok, neg_ok], dim=1))


def valid_first(idx: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Reorders each row of ``idx`` / ``valid`` (B, S) so that its valid entries come first, in order."""
    order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices
    return idx.gather(1, order), valid.gather(1, order)


def random_first(candidates: Tensor, cap: int) -> tuple[Tensor, Tensor]:
    """Per row of ``candidates`` (B, S) bool: an order of the S positions with the candidates first and
    how many of them to take, min(#candidates, cap) (cap 0: all). Past the cap the candidates come in
    uniform random order, so the first ``cap`` are a uniform random subset."""
    count = candidates.sum(dim=1)
    if cap <= 0:
        order = torch.sort((~candidates).to(torch.uint8), dim=1, stable=True).indices
        return order, count
    keys = torch.where(candidates, random_keys(candidates.shape, candidates.device), -1.0)
    return keys.argsort(dim=1, descending=True), count.clamp(max=cap)


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x`` (B, N, ...) indexed per row by ``idx`` (B, S): (B, S, ...)."""
    if x.dim() == 2:
        return x.gather(1, idx)
    expanded = idx.reshape(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:])
    return x.gather(1, expanded)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` (0 where there is none), without reading the count on the host.

    ``torch.where`` rather than a product: a non-finite value outside the mask stays out of the result.
    """
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)
