"""Precise RoI Pooling as fused Triton kernels (the CUDA path of :mod:`megdet.layers.prroi_pool`).

Why our own kernels: PyTorch and torchvision have no PrRoIPool, and the reference implementations
(vacancy/PreciseRoIPooling, mmcv.ops.PrRoIPool) are CUDA-C extensions that need a CUDA toolkit to
build, which this project's installs don't have. The pure-PyTorch path (gathered windows + batched
matmuls) is right for CPU but on a GPU spends its time in gathers, index bookkeeping and many small
launches; these kernels read the touched cells once per bin row and write each output once.

Semantics are exactly those of :func:`megdet.layers.prroi_pool.prroi_pool` (see its module
docstring): the map is the bilinear interpolant, a bin pools to the exact integral over the bin
divided by its area, no -0.5 offset, RoI sizes clamped at 0, a zero-area bin gives 0 and zero
gradients, the batch-index column gets zero gradient.

Layout. All pyramid levels are copied (tiled transposes) into one channels-last buffer
``(sum_l N * H_l * W_l, C)`` so that every kernel reads (and the backward atomically adds)
contiguous runs of a channel block, and a single launch serves every level: per RoI the kernel
looks up its level's row offset, H, W and spatial scale in two tiny cached tables. The float32
feature gradient is transposed back to each level's layout and dtype at the end.

Host cost. A training step pays the host's time per call, not only the kernels': the forward also
reports what the host must check (batch indices, levels, finite coordinates) through a 6-value
status buffer, read once after the launch, instead of a dozen small ops before it.

Kernels (all accumulate in float32; features may be float32, bfloat16 or float16):

* forward, one program per (RoI, bin row p, channel block): for each touched column j it sums the
  touched rows of bin row p weighted by ``Ay[p, i]`` (the integral of the hat function over the
  bin's y-range, a difference of its piecewise-quadratic antiderivative), then adds that column
  times ``Ax[q, j]`` to all bins q of the row at once.
* feature gradient, one program per (RoI, channel block): for each cell of the RoI's window it
  atomically adds ``sum_pq Ay[p, i] Ax[q, j] dOut[p, q] / area`` (each cell once per RoI).
* RoI gradient (only when the RoIs require grad), one program per (RoI, bin row, channel block):
  the exact derivative of the separable weights, i.e. the edge formulas
  ``d out / d x_edge = +-(integral of f along the edge) / area`` plus the area term
  ``-out / width`` (or height), chained to the RoI corners and times the spatial scale.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

# Set by the test-suite (before this module is imported) to run the kernels on CPU tensors.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Launch shapes, chosen by a sweep over benchmarks/prroi_pool.py's inputs (BENCHMARKS.md). Channels per
# program (a warp's 32 threads take one channel each, so the sum over the bins of a row stays inside a
# thread; the backward takes one warp of 32 channels) and,
# for the feature gradient, how many programs share one RoI's window rows (a large RoI's window is
# many times a small one's: splitting its rows evens out the programs' lengths).
FWD_BLOCK_C, FWD_WARPS = 64, 2
BWD_BLOCK_C, BWD_WARPS = 32, 1
FEAT_ROW_SPLIT = 4
TRANSPOSE_BLOCK = 64
CACHE_TABLES = True
_TABLES: dict[tuple, tuple[Tensor, Tensor]] = {}
_STATUS_INIT: dict[tuple, Tensor] = {}


def _device_function(fn):
    """``triton.jit`` for the kernels' helper functions, except under the interpreter: there a
    call to a jitted helper re-patches the language module (milliseconds per call, inside the
    loops), while a plain function runs the same code on the already-patched module."""
    return fn if INTERPRET else triton.jit(fn)


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@_device_function
def _hat_prim(t):
    """Integral of hat(s) = max(0, 1 - |s|) from -inf to t (piecewise quadratic, C1)."""
    c = tl.minimum(tl.maximum(t, -1.0), 1.0)
    return 0.5 + c - 0.5 * c * tl.abs(c)


@_device_function
def _hat(t):
    return tl.maximum(1.0 - tl.abs(t), 0.0)


@_device_function
def _roi_geometry(rois_ptr, levels_ptr, meta_ptr, scales_ptr, r, N, L, HAS_LEVELS: tl.constexpr):
    """Row offset of the RoI's image in the flat buffer, map H and W, scaled x1, y1, width and
    height, and the spatial scale of RoI ``r``. The batch index and level are clamped to [0, N)
    and [0, L): the host checks them after the launch, and a bad value must not read outside."""
    if HAS_LEVELS:
        lvl = tl.minimum(tl.maximum(tl.load(levels_ptr + r).to(tl.int32), 0), L - 1)
    else:
        lvl = 0
    scale = tl.load(scales_ptr + lvl)
    h = tl.load(meta_ptr + lvl * 3 + 1)
    w = tl.load(meta_ptr + lvl * 3 + 2)
    b = tl.minimum(tl.maximum(tl.load(rois_ptr + r * 5), 0.0), N - 1.0).to(tl.int64)
    base = tl.load(meta_ptr + lvl * 3) + b * h * w
    x1 = tl.load(rois_ptr + r * 5 + 1) * scale
    y1 = tl.load(rois_ptr + r * 5 + 2) * scale
    rw = tl.maximum(tl.load(rois_ptr + r * 5 + 3) * scale - x1, 0.0)
    rh = tl.maximum(tl.load(rois_ptr + r * 5 + 4) * scale - y1, 0.0)
    return base, h, w, x1, y1, rw, rh, scale


@_device_function
def _cell_range(lo, hi, n):
    """First and last cell index in [0, n) whose hat function overlaps [lo, hi]: floor(lo) ..
    ceil(hi), clipped. Clamping before the integer cast keeps huge coordinates from overflowing."""
    nf = n.to(tl.float32)
    first = tl.maximum(tl.floor(tl.minimum(tl.maximum(lo, -1.0), nf)), 0.0).to(tl.int32)
    last = tl.minimum(tl.ceil(tl.minimum(tl.maximum(hi, -1.0), nf)), nf - 1.0).to(tl.int32)
    return first, last


@_device_function
def _bin_row(x1, y1, rw, rh, h, w, p, cb, C, PH: tl.constexpr, PW: tl.constexpr, BLOCK_PW: tl.constexpr,
             BLOCK_C: tl.constexpr):  # fmt: skip
    """The bins of output row ``p`` and channel block ``cb``: whether the RoI has an area, 1 / bin area
    (0 for an empty RoI), the row's y-range, bin and channel offsets with the channel mask, each bin's
    x-range, and the cells to visit (none for an empty RoI)."""
    area = (rw / PW) * (rh / PH)
    valid = area > 0.0
    inv_area = tl.where(valid, 1.0 / tl.where(valid, area, 1.0), 0.0)
    ya = y1 + rh * (tl.cast(p, tl.float32) / PH)
    yb = y1 + rh * (tl.cast((p + 1), tl.float32) / PH)
    offs_q = tl.arange(0, BLOCK_PW)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    xa = x1 + rw * (offs_q.to(tl.float32) / PW)
    xb = x1 + rw * ((offs_q + 1).to(tl.float32) / PW)
    i_lo, i_hi = _cell_range(ya, yb, h)
    j_lo, j_hi = _cell_range(x1, x1 + rw, w)
    j_hi = tl.where(valid, j_hi, j_lo - 1)  # an empty bin reads nothing
    return valid, inv_area, ya, yb, offs_q, offs_c, mask_c, xa, xb, i_lo, i_hi, j_lo, j_hi


@triton.jit
def _prroi_fwd_kernel(
    feat_ptr, rois_ptr, levels_ptr, meta_ptr, scales_ptr, out_ptr, status_ptr, C, N, L,
    PH: tl.constexpr, PW: tl.constexpr, HAS_LEVELS: tl.constexpr,
    BLOCK_PW: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0)
    p = tl.program_id(1)
    cb = tl.program_id(2)
    base, h, w, x1, y1, rw, rh, _ = _roi_geometry(
        rois_ptr, levels_ptr, meta_ptr, scales_ptr, r, N, L, HAS_LEVELS
    )
    _, inv_area, ya, yb, offs_q, offs_c, mask_c, xa, xb, i_lo, i_hi, j_lo, j_hi = _bin_row(
        x1, y1, rw, rh, h, w, p, cb, C, PH, PW, BLOCK_PW, BLOCK_C
    )
    acc = tl.zeros([BLOCK_PW, BLOCK_C], dtype=tl.float32)
    for j in range(j_lo, j_hi + 1):
        fj = tl.cast(j, tl.float32)
        col = tl.zeros([BLOCK_C], dtype=tl.float32)
        for i in range(i_lo, i_hi + 1):
            fi = tl.cast(i, tl.float32)
            wy = _hat_prim(yb - fi) - _hat_prim(ya - fi)
            v = tl.load(feat_ptr + (base + i * w + j) * C + offs_c, mask=mask_c, other=0.0)
            col += wy * v.to(tl.float32)
        wx = _hat_prim(xb - fj) - _hat_prim(xa - fj)
        acc += wx[:, None] * col[None, :]
    acc = acc * inv_area
    out_offs = r.to(tl.int64) * C * PH * PW + offs_c[None, :] * (PH * PW) + p * PW + offs_q[:, None]
    mask = (offs_q < PW)[:, None] & mask_c[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    _report_values(rois_ptr, levels_ptr, status_ptr, r, (p == 0) & (cb == 0), HAS_LEVELS)


@_device_function
def _report_values(rois_ptr, levels_ptr, status_ptr, r, report, HAS_LEVELS: tl.constexpr):
    """What the host checks after the launch, in place of a dozen small ops before it: status =
    [any non-integer batch index, min and max batch index, any non-finite coordinate, min and max
    level], reduced over the RoIs with atomics (``report``: one program per RoI)."""
    b = tl.load(rois_ptr + r * 5)
    coords = tl.load(rois_ptr + r * 5 + 1 + tl.arange(0, 4))
    # NaN compares unequal to itself; the largest finite float32 bounds the rest.
    non_finite = tl.max(((coords != coords) | (tl.abs(coords) > 3.4028234e38)).to(tl.float32), axis=0)
    tl.atomic_max(status_ptr, (b != tl.floor(b)).to(tl.float32), mask=report, sem="relaxed")
    tl.atomic_min(status_ptr + 1, b, mask=report, sem="relaxed")
    tl.atomic_max(status_ptr + 2, b, mask=report, sem="relaxed")
    tl.atomic_max(status_ptr + 3, non_finite, mask=report, sem="relaxed")
    if HAS_LEVELS:
        lvl = tl.load(levels_ptr + r).to(tl.float32)
        tl.atomic_min(status_ptr + 4, lvl, mask=report, sem="relaxed")
        tl.atomic_max(status_ptr + 5, lvl, mask=report, sem="relaxed")


@triton.jit
def _prroi_bwd_feat_kernel(
    grad_out_ptr, rois_ptr, levels_ptr, meta_ptr, scales_ptr, grad_feat_ptr, C, N, L,
    stride_r, stride_c, stride_p, stride_q, ROW_SPLIT,
    PH: tl.constexpr, PW: tl.constexpr, HAS_LEVELS: tl.constexpr,
    BLOCK_PW: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0)
    cb = tl.program_id(1)
    row0 = tl.program_id(2)  # this program takes every ROW_SPLIT-th row of the window
    base, h, w, x1, y1, rw, rh, _ = _roi_geometry(
        rois_ptr, levels_ptr, meta_ptr, scales_ptr, r, N, L, HAS_LEVELS
    )
    bin_h = rh / PH
    area = (rw / PW) * bin_h
    valid = area > 0.0
    inv_area = tl.where(valid, 1.0 / tl.where(valid, area, 1.0), 0.0)
    inv_bin_h = 1.0 / tl.where(valid, bin_h, 1.0)
    offs_q = tl.arange(0, BLOCK_PW)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask_go = (offs_q < PW)[:, None] & mask_c[None, :]
    go_ptrs = (
        grad_out_ptr + r.to(tl.int64) * stride_r + offs_c[None, :] * stride_c + offs_q[:, None] * stride_q
    )
    xa = x1 + rw * (offs_q.to(tl.float32) / PW)
    xb = x1 + rw * ((offs_q + 1).to(tl.float32) / PW)
    i_lo, i_hi = _cell_range(y1, y1 + rh, h)
    j_lo, j_hi = _cell_range(x1, x1 + rw, w)
    i_hi = tl.where(valid, i_hi, i_lo - 1)
    for i in range(i_lo + row0, i_hi + 1, ROW_SPLIT):
        fi = tl.cast(i, tl.float32)
        # Bin rows whose hat weight on row i can be nonzero (one extra on each side against
        # rounding; a bin that does not touch the row gets weight 0).
        p_lo = tl.floor(tl.minimum(tl.maximum((fi - 1.0 - y1) * inv_bin_h, -2.0), PH + 1.0)) - 1.0
        p_hi = tl.floor(tl.minimum(tl.maximum((fi + 1.0 - y1) * inv_bin_h, -2.0), PH + 1.0)) + 1.0
        p_lo = tl.maximum(p_lo, 0.0).to(tl.int32)
        p_hi = tl.minimum(p_hi, PH - 1.0).to(tl.int32)
        u = tl.zeros([BLOCK_PW, BLOCK_C], dtype=tl.float32)
        for p in range(p_lo, p_hi + 1):
            ya = y1 + rh * (tl.cast(p, tl.float32) / PH)
            yb = y1 + rh * (tl.cast((p + 1), tl.float32) / PH)
            wy = _hat_prim(yb - fi) - _hat_prim(ya - fi)
            d = tl.load(go_ptrs + p * stride_p, mask=mask_go, other=0.0)
            u += wy * d.to(tl.float32)
        u = u * inv_area
        row = base + i * w
        for j in range(j_lo, j_hi + 1):
            fj = tl.cast(j, tl.float32)
            wx = _hat_prim(xb - fj) - _hat_prim(xa - fj)
            g = tl.sum(wx[:, None] * u, axis=0)
            tl.atomic_add(grad_feat_ptr + (row + j) * C + offs_c, g, mask=mask_c, sem="relaxed")


@triton.jit
def _nchw_to_rows_kernel(src_ptr, dst_ptr, C, HW, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """(N, C, HW) contiguous -> (N, HW, C) contiguous, in tiles (a strided copy moves a fraction
    of the bandwidth)."""
    n = tl.program_id(2).to(tl.int64)
    offs_hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_c[:, None] < C) & (offs_hw[None, :] < HW)
    x = tl.load(src_ptr + n * C * HW + offs_c[:, None] * HW + offs_hw[None, :], mask=mask)
    tl.store(dst_ptr + n * C * HW + offs_hw[None, :] * C + offs_c[:, None], x, mask=mask)


@triton.jit
def _rows_to_nchw_kernel(src_ptr, dst_ptr, C, HW, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """(N, HW, C) float32 -> (N, C, HW) contiguous in the destination's dtype, in tiles."""
    n = tl.program_id(2).to(tl.int64)
    offs_hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_hw[:, None] < HW) & (offs_c[None, :] < C)
    x = tl.load(src_ptr + n * C * HW + offs_hw[:, None] * C + offs_c[None, :], mask=mask)
    tl.store(
        dst_ptr + n * C * HW + offs_c[None, :] * HW + offs_hw[:, None],
        x.to(dst_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _prroi_bwd_roi_kernel(
    feat_ptr, grad_out_ptr, rois_ptr, levels_ptr, meta_ptr, scales_ptr, grad_rois_ptr, C, N, L,
    stride_r, stride_c, stride_p, stride_q,
    PH: tl.constexpr, PW: tl.constexpr, HAS_LEVELS: tl.constexpr,
    BLOCK_PW: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0)
    p = tl.program_id(1)
    cb = tl.program_id(2)
    base, h, w, x1, y1, rw, rh, scale = _roi_geometry(
        rois_ptr, levels_ptr, meta_ptr, scales_ptr, r, N, L, HAS_LEVELS
    )
    valid, inv_area, ya, yb, offs_q, offs_c, mask_c, xa, xb, i_lo, i_hi, j_lo, j_hi = _bin_row(
        x1, y1, rw, rh, h, w, p, cb, C, PH, PW, BLOCK_PW, BLOCK_C
    )
    fp = tl.cast(p, tl.float32)
    fq = offs_q.to(tl.float32)
    # Per bin q of this row (times the area): the integral of f over the bin, of f along its left
    # and right edges (over the bin's y-range) and along its top and bottom edges (x-range).
    acc_o = tl.zeros([BLOCK_PW, BLOCK_C], dtype=tl.float32)
    acc_l = tl.zeros([BLOCK_PW, BLOCK_C], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_PW, BLOCK_C], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_PW, BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_PW, BLOCK_C], dtype=tl.float32)
    for j in range(j_lo, j_hi + 1):
        fj = tl.cast(j, tl.float32)
        col = tl.zeros([BLOCK_C], dtype=tl.float32)
        col_t = tl.zeros([BLOCK_C], dtype=tl.float32)
        col_b = tl.zeros([BLOCK_C], dtype=tl.float32)
        for i in range(i_lo, i_hi + 1):
            fi = tl.cast(i, tl.float32)
            v = tl.load(feat_ptr + (base + i * w + j) * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            col += (_hat_prim(yb - fi) - _hat_prim(ya - fi)) * v
            col_t += _hat(ya - fi) * v
            col_b += _hat(yb - fi) * v
        wx = (_hat_prim(xb - fj) - _hat_prim(xa - fj))[:, None]
        acc_o += wx * col[None, :]
        acc_l += _hat(xa - fj)[:, None] * col[None, :]
        acc_r += _hat(xb - fj)[:, None] * col[None, :]
        acc_t += wx * col_t[None, :]
        acc_b += wx * col_b[None, :]
    mask = (offs_q < PW)[:, None] & mask_c[None, :]
    go_offs = (
        r.to(tl.int64) * stride_r + offs_c[None, :] * stride_c + p * stride_p + offs_q[:, None] * stride_q
    )
    d = tl.load(grad_out_ptr + go_offs, mask=mask, other=0.0).to(tl.float32)
    s_out = tl.sum(tl.sum(d * acc_o, axis=1), axis=0)
    # Edges: x_q = x1 + q * rw / PW, y_p = y1 + p * rh / PH; 1 / area = PH * PW / (rw * rh).
    g_x1 = tl.sum(tl.sum(d * (acc_r - acc_l), axis=1), axis=0)
    g_rw = tl.sum(tl.sum(d * ((fq[:, None] + 1.0) * acc_r - fq[:, None] * acc_l), axis=1), axis=0) / PW
    g_rw -= s_out / tl.where(valid, rw, 1.0)
    g_y1 = tl.sum(tl.sum(d * (acc_b - acc_t), axis=1), axis=0)
    s_t = tl.sum(tl.sum(d * acc_t, axis=1), axis=0)
    s_b = tl.sum(tl.sum(d * acc_b, axis=1), axis=0)
    g_rh = ((fp + 1.0) * s_b - fp * s_t) / PH - s_out / tl.where(valid, rh, 1.0)
    k = inv_area * scale
    # rw = x2 * scale - x1 * scale (clamping only matters for empty RoIs, which get k = 0).
    tl.atomic_add(grad_rois_ptr + r * 5 + 1, (g_x1 - g_rw) * k, sem="relaxed")
    tl.atomic_add(grad_rois_ptr + r * 5 + 2, (g_y1 - g_rh) * k, sem="relaxed")
    tl.atomic_add(grad_rois_ptr + r * 5 + 3, g_rw * k, sem="relaxed")
    tl.atomic_add(grad_rois_ptr + r * 5 + 4, g_rh * k, sem="relaxed")


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------


def _blocks(channels: int, pw: int, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_PW, BLOCK_C, num_warps): the warps' threads span the channel block, so loads and
    atomics are contiguous runs of channels."""
    block_c, warps = (BWD_BLOCK_C, BWD_WARPS) if backward else (FWD_BLOCK_C, FWD_WARPS)
    block_c = min(block_c, triton.next_power_of_2(channels))
    return triton.next_power_of_2(pw), block_c, max(1, min(warps, block_c // 32))


def _to_flat_channels_last(features: Sequence[Tensor]) -> tuple[Tensor, list[int]]:
    """All maps in one (sum_l N * H_l * W_l, C) buffer; returns it and each level's first row."""
    n_img, c = features[0].shape[:2]
    starts, rows = [], 0
    for f in features:
        starts.append(rows)
        rows += n_img * f.shape[2] * f.shape[3]
    if len(features) == 1:
        nhwc = features[0].permute(0, 2, 3, 1)
        if nhwc.is_contiguous():  # channels_last input: no copy
            return nhwc.reshape(rows, c), starts
    flat = features[0].new_empty((rows, c))
    for f, s in zip(features, starts):
        n, _, h, w = f.shape
        dst = flat[s : s + n * h * w]
        if f.is_contiguous():
            blk = TRANSPOSE_BLOCK
            grid = (triton.cdiv(h * w, blk), triton.cdiv(c, blk), n)
            _nchw_to_rows_kernel[grid](f, dst, c, h * w, blk, blk, num_warps=4)
        else:
            # Copy straight into the slice (reshaping the permuted view would copy twice).
            dst.view(n, h, w, c).copy_(f.permute(0, 2, 3, 1))
    return flat, starts


class _PrRoIPoolTriton(torch.autograd.Function):
    """Forward and backward through the kernels; inputs (meta, levels, rois, *features)."""

    @staticmethod
    def forward(ctx, meta: dict, levels: Tensor | None, rois: Tensor, *features: Tensor) -> Tensor:  # type: ignore[override]
        ph, pw = meta["output_size"]
        dev = features[0].device
        n_img, c = features[0].shape[:2]
        flat, starts = _to_flat_channels_last(features)
        level_meta, scales = _level_tables(starts, [f.shape[2:] for f in features], meta["scales"], dev)
        rois32 = rois.detach().to(torch.float32).contiguous()
        lv = levels.contiguous() if levels is not None else rois32  # unused without levels
        k = rois.shape[0]
        out = features[0].new_empty((k, c, ph, pw))
        block_pw, block_c, warps = _blocks(c, pw)
        grid = (k, ph, triton.cdiv(c, block_c))
        _prroi_fwd_kernel[grid](
            flat, rois32, lv, level_meta, scales, out, meta["status"], c, n_img, len(features), ph, pw,
            levels is not None, block_pw, block_c, num_warps=warps,
        )  # fmt: skip
        ctx.meta = meta
        ctx.has_levels = levels is not None
        ctx.feature_meta = [(f.shape, f.dtype, _memory_format(f)) for f in features]
        ctx.starts = starts
        ctx.num_rows = flat.shape[0]
        ctx.rois_dtype = rois.dtype
        ctx.sizes = (n_img, len(features))
        # The features themselves are needed again only for the RoI gradient.
        keep = flat if ctx.needs_input_grad[2] else None
        ctx.save_for_backward(keep, rois32, lv, level_meta, scales)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        flat, rois32, lv, level_meta, scales = ctx.saved_tensors
        ph, pw = ctx.meta["output_size"]
        k, c = grad_out.shape[:2]
        n_img, n_levels = ctx.sizes
        # grad_out is read in place with its strides (an expanded gradient such as that of
        # out.sum() included): per bin row a program reads a few (bins x channels) tiles only.
        go, strides = grad_out, grad_out.stride()
        need_feat = ctx.needs_input_grad[3:]
        grad_features: list[Tensor | None] = [None] * len(need_feat)
        if any(need_feat):
            grad_flat = torch.zeros((ctx.num_rows, c), dtype=torch.float32, device=go.device)
            block_pw, block_c, warps = _blocks(c, pw, backward=True)
            _prroi_bwd_feat_kernel[(k, triton.cdiv(c, block_c), FEAT_ROW_SPLIT)](
                go, rois32, lv, level_meta, scales, grad_flat, c, n_img, n_levels, *strides,
                FEAT_ROW_SPLIT, ph, pw, ctx.has_levels, block_pw, block_c, num_warps=warps,
            )  # fmt: skip
            for lvl, ((shape, dtype, fmt), start) in enumerate(zip(ctx.feature_meta, ctx.starts)):
                if need_feat[lvl]:
                    grad_features[lvl] = _level_gradient(grad_flat, start, shape, dtype, fmt)
        grad_rois = None
        if ctx.needs_input_grad[2]:
            g = torch.zeros((k, 5), dtype=torch.float32, device=go.device)
            block_pw, block_c, warps = _blocks(c, pw)
            _prroi_bwd_roi_kernel[(k, ph, triton.cdiv(c, block_c))](
                flat, go, rois32, lv, level_meta, scales, g, c, n_img, n_levels, *strides, ph, pw,
                ctx.has_levels, block_pw, block_c, num_warps=warps,
            )  # fmt: skip
            grad_rois = g.to(ctx.rois_dtype)
        return (None, None, grad_rois, *grad_features)


def _level_gradient(
    grad_flat: Tensor, start: int, shape: torch.Size, dtype: torch.dtype, fmt: torch.memory_format
) -> Tensor:
    """One level's rows of the float32 channels-last gradient as an (N, C, H, W) tensor of the
    feature's dtype and memory format."""
    n, c, h, w = shape
    rows = grad_flat[start : start + n * h * w]
    if fmt == torch.channels_last:
        return rows.to(dtype).view(n, h, w, c).permute(0, 3, 1, 2)
    out = torch.empty(shape, dtype=dtype, device=grad_flat.device)
    blk = TRANSPOSE_BLOCK
    _rows_to_nchw_kernel[(triton.cdiv(h * w, blk), triton.cdiv(c, blk), n)](
        rows, out, c, h * w, blk, blk, num_warps=4
    )
    return out


def _level_tables(
    starts: list[int], sizes: list[torch.Size], scales: list[float], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Per level (first row in the flat buffer, H, W) int64 and the spatial scales float32, on
    ``device``; cached, since a run sees few distinct padded batch shapes."""
    key = (device, tuple(starts), tuple(tuple(s) for s in sizes), tuple(scales))
    tables = _TABLES.get(key) if CACHE_TABLES else None
    if tables is None:
        meta = [[s, int(hw[0]), int(hw[1])] for s, hw in zip(starts, sizes)]
        tables = (_device_table(meta, torch.int64, device), _device_table(scales, torch.float32, device))
        if len(_TABLES) >= 64:
            _TABLES.pop(next(iter(_TABLES)))
        _TABLES[key] = tables
    return tables


def _device_table(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small tensor of Python values on ``device``; on CUDA copied from pinned memory without
    blocking (a pageable copy would wait for the whole stream)."""
    table = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table


def _memory_format(t: Tensor) -> torch.memory_format:
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def prroi_pool_triton(
    features: Sequence[Tensor],
    rois: Tensor,
    levels: Tensor | None,
    output_size: tuple[int, int],
    scales: Sequence[float],
) -> tuple[Tensor, Tensor]:
    """PrRoIPool of RoI k from ``features[levels[k]]`` (all of ``features[0]`` when ``levels`` is
    None) through the Triton kernels, shapes already checked by the caller
    (:func:`megdet.layers.prroi_pool.prroi_pool_levels`). Differentiable w.r.t. the features and
    the RoIs. Returns the output and, on the device, the values the caller must check (see
    ``megdet.layers.prroi_pool._raise_on_bad_values``): bad batch indices or levels are clamped
    by the kernels, so they cannot read out of bounds before the check."""
    if features[0].dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"prroi_pool: the Triton path takes float32/bfloat16/float16 features, got {features[0].dtype}"
        )
    if features[0].device.type == "cpu" and not INTERPRET:
        raise ValueError(
            "prroi_pool: the Triton path needs CUDA tensors (or TRITON_INTERPRET=1 for CPU ones)"
        )
    dev = features[0].device
    status = _status_init(dev, levels is not None).clone()
    meta = {"output_size": tuple(output_size), "scales": [float(s) for s in scales], "status": status}
    with torch.autocast(dev.type, enabled=False):
        return _PrRoIPoolTriton.apply(meta, levels, rois, *features), status


def _status_init(device: torch.device, has_levels: bool) -> Tensor:
    """The identity of the status reduction (levels reported as 0 when there are none), cached."""
    key = (device, has_levels)
    if key not in _STATUS_INIT:
        inf = float("inf")
        lv = [inf, -inf] if has_levels else [0.0, 0.0]
        _STATUS_INIT[key] = _device_table([0.0, inf, -inf, 0.0, *lv], torch.float32, device)
    return _STATUS_INIT[key]
