"""Greedy NMS of many independent groups at once (the RPN's per-image, per-level NMS).

torchvision's CUDA NMS builds an N x N suppression bitmask and walks it in one serial thread block,
then reads the kept count on the host. For the RPN's B x L groups that leaves two bad choices: one
call per image (B host syncs) or one call for everything, whose mask and serial walk grow with the
square of all B x L x top-n boxes (several times slower again). Here each group is one Triton
program that walks its own boxes in score order, suppressing with IoUs computed on the fly, and
writes a fixed-size keep mask: no host sync and no cross-group work. Without CUDA (or Triton) each
image is one call of torchvision's NMS with its groups shifted apart, the classic batched-NMS trick.

Semantics are torchvision's: within a group, a box is kept unless a kept box of higher score has
IoU > ``iou_threshold`` with it; boxes marked invalid are neither kept nor suppress others.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torchvision
from torch import Tensor

# Set (before the kernel's first use) to run the Triton kernel on CPU tensors, in tests.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_kernel = None


def _triton_kernel():
    """The Triton kernel, compiled on first use; None when Triton does not import."""
    global _kernel
    if _kernel is None:
        try:
            import triton
            import triton.language as tl
        except ImportError:
            _kernel = False
            return None

        @triton.jit
        def nms_groups(boxes, valid, keep, n, iou_threshold, BLOCK: tl.constexpr):
            # One program per group: boxes (G, n, 4) sorted by decreasing score within the group.
            g = tl.program_id(0).to(tl.int64)
            offs = tl.arange(0, BLOCK)
            inside = offs < n
            base = boxes + g * n * 4
            x1 = tl.load(base + offs * 4 + 0, mask=inside, other=0.0)
            y1 = tl.load(base + offs * 4 + 1, mask=inside, other=0.0)
            x2 = tl.load(base + offs * 4 + 2, mask=inside, other=0.0)
            y2 = tl.load(base + offs * 4 + 3, mask=inside, other=0.0)
            area = (x2 - x1) * (y2 - y1)
            alive = tl.load(valid + g * n + offs, mask=inside, other=0) != 0
            for i in range(0, n):
                if tl.sum(tl.where(offs == i, alive.to(tl.int32), 0)) > 0:
                    bx1 = tl.load(base + i * 4 + 0)
                    by1 = tl.load(base + i * 4 + 1)
                    bx2 = tl.load(base + i * 4 + 2)
                    by2 = tl.load(base + i * 4 + 3)
                    w = tl.maximum(tl.minimum(x2, bx2) - tl.maximum(x1, bx1), 0.0)
                    h = tl.maximum(tl.minimum(y2, by2) - tl.maximum(y1, by1), 0.0)
                    inter = w * h
                    iou = tl.math.div_rn(inter, (bx2 - bx1) * (by2 - by1) + area - inter)
                    alive = alive & ~((iou > iou_threshold) & (offs > i))
            tl.store(keep + g * n + offs, alive.to(tl.int8), mask=inside)

        _kernel = nms_groups
    return _kernel or None


def _float32_threshold(threshold: float) -> float:
    """The float32 t with ``iou > t`` (in float32) exactly when ``iou > threshold`` in double, as
    torchvision compares: the largest float32 not above the threshold."""
    t = np.float32(threshold)
    if float(t) > threshold:
        t = np.nextafter(t, np.float32(-np.inf))
    return float(t)


def grouped_nms(boxes: Tensor, valid: Tensor, iou_threshold: float) -> Tensor:
    """Keep mask (B, L, n) bool of greedy NMS within each of the B x L groups of ``boxes``
    (B, L, n, 4) xyxy, each group sorted by decreasing score; ``valid`` (B, L, n) bool."""
    if boxes.shape[-1] != 4 or valid.shape != boxes.shape[:-1] or boxes.dim() != 4:
        raise ValueError(
            f"grouped_nms: expected boxes (B, L, n, 4) and valid (B, L, n), got {boxes.shape}, {valid.shape}"
        )
    kernel = _triton_kernel() if (boxes.is_cuda or INTERPRET) else None
    if kernel is None:
        return _per_image_nms(boxes, valid, iou_threshold)
    b, lv, n = valid.shape
    flat = boxes.float().contiguous()
    keep = torch.empty(valid.shape, dtype=torch.int8, device=boxes.device)
    if flat.numel():
        block = max(16, 1 << (n - 1).bit_length())
        kernel[(b * lv,)](
            flat, valid.to(torch.int8).contiguous(), keep, n, _float32_threshold(iou_threshold),
            BLOCK=block, num_warps=4 if block <= 1024 else 8,
        )  # fmt: skip
    return keep.bool()


def _per_image_nms(boxes: Tensor, valid: Tensor, iou_threshold: float) -> Tensor:
    """One torchvision NMS call per image, each group shifted by a multiple of the image's largest
    coordinate so that groups never overlap (invalid boxes in a group of their own); float64 keeps
    the shifted coordinates exact. The group order inside a call does not matter: NMS sorts by score,
    and the scores are given as decreasing ranks within each group."""
    b, lv, n = valid.shape
    rank = torch.arange(n, 0, -1, device=boxes.device, dtype=torch.float64).expand(lv, n).reshape(-1)
    group = (torch.arange(lv * n, device=boxes.device) // n).to(torch.float64)
    keep = torch.zeros((b, lv * n), dtype=torch.bool, device=boxes.device)
    for i in range(b):
        bx = boxes[i].reshape(-1, 4).double()
        g = torch.where(valid[i].reshape(-1), group, float(lv))
        shifted = bx + (g * (bx.max() + 1))[:, None]
        keep[i].index_fill_(0, torchvision.ops.nms(shifted, rank, iou_threshold), True)
    return keep.view(b, lv, n) & valid
