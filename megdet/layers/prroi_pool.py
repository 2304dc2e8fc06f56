"""Precise RoI Pooling (Jiang et al. 2018, IoU-Net): pure PyTorch here, fused Triton kernels on CUDA.

Why our own: the reference implementations (vacancy/PreciseRoIPooling, mmcv.ops.PrRoIPool) are
CUDA-only extensions, torchvision and detectron2 have none, and we need CPU training and tests.
``impl="auto"`` (the default) takes :mod:`megdet.layers.prroi_pool_triton` for float32 / bfloat16 /
float16 CUDA features when Triton imports, and the pure-PyTorch path below otherwise (CPU,
float64); ``impl="torch"`` / ``"triton"`` force one. Both compute the same numbers.

Semantics. The feature map is a continuous function by bilinear interpolation,
``f(x, y) = sum_ij w[i, j] * hat(x - j) * hat(y - i)`` with ``hat(t) = max(0, 1 - |t|)``, element
(i, j) at coordinate (x=j, y=i) and ``w = 0`` outside the map. A bin pools to the exact integral of
``f`` over the bin divided by the bin area (no -0.5 offset, no sampling points). Because ``f`` is
separable, for a RoI ``r`` and bin ``(p, q)``

    out[r, c, p, q] = sum_i sum_j Ay[r, p, i] * w[b_r, c, i, j] * Ax[r, q, j] / area_r

where ``Ax[r, q, j]`` is the integral of ``hat(x - j)`` over the q-th bin's x-range: a difference
of the hat's antiderivative (piecewise quadratic) at the two bin edges, which is differentiable
in the edges, so the RoI-coordinate gradient comes from autograd through ``Ax`` / ``Ay``.

Cost. Only the feature cells a RoI touches matter, so each RoI reads a window of the map (its
touched cells, plus one for the interpolation support) rather than the whole map. RoIs are sorted
by window size and processed in chunks that share one padded window size, so one gather and two
batched matmuls serve a whole chunk. The gather reads a channels-last copy of the map (each window
element is then one contiguous run of C values; gathering from NCHW directly is slower per element on
CPU by more than the copy costs, BENCHMARKS.md). A hand-written backward scatter-adds
``Ay^T @ dOut @ Ax`` into a channels-last gradient with ``index_add_`` and re-gathers the windows
only when the RoI gradient is needed, so no window-sized tensor lives between forward and backward.
:func:`prroi_pool_levels` does all FPN levels in one call, writing each RoI straight to its row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from megdet.config import check_choice

# Chunking: the padded-window waste tolerated inside one chunk (padded volume / real volume)
# before starting a new one; the smallest chunk worth its own batched matmuls (few chunks means
# few parallel regions, which matters on a busy machine); and a cap on the bytes of one chunk's
# gathered windows. Below ~32 MiB glibc serves and reuses temporaries from its heap; above it every
# allocation is fresh pages, whose faults cost more than the arithmetic on CPU.
_CHUNK_SLACK = 2.0
_MIN_CHUNK = 16
_MAX_CHUNK_BYTES = 24 << 20


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        h = w = size
    else:
        if len(size) != 2:
            raise ValueError(f"prroi_pool: output_size must be an int or (h, w), got {size!r}")
        h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"prroi_pool: output_size must be positive, got {size!r}")
    return h, w


def _hat_antiderivative(t: Tensor) -> Tensor:
    """Integral of hat(s) = max(0, 1 - |s|) from -inf to t: 0, (t+1)^2/2, 1-(1-t)^2/2, 1."""
    c = t.clamp(-1.0, 1.0)
    return 0.5 + c - 0.5 * c * c.abs()


def _bin_weights(lo: Tensor, size: Tensor, bins: int, start: Tensor, k: int) -> Tensor:
    """(R, bins, k): integral of hat(x - (start + j)) over each of ``bins`` equal bins of [lo, lo+size]."""
    frac = torch.arange(bins + 1, device=lo.device, dtype=lo.dtype) / bins
    edges = lo[:, None] + size[:, None] * frac  # (R, bins + 1)
    cols = start[:, None].to(lo.dtype) + torch.arange(k, device=lo.device, dtype=lo.dtype)  # (R, k)
    prim = _hat_antiderivative(edges[:, :, None] - cols[:, None, :])
    return prim[:, 1:] - prim[:, :-1]


def _plan_chunks(
    kx: list[int], ky: list[int], channels: int, max_elems: int
) -> list[tuple[int, int, int, int]]:
    """Split RoIs (sorted by window area) into (start, end, Ky, Kx) chunks of at most ``max_elems``
    gathered elements (a single RoI may exceed it), each padded to its largest window."""
    chunks = []
    n = len(kx)
    s = 0
    while s < n:
        mx, my, real = kx[s], ky[s], kx[s] * ky[s]
        e = s + 1
        while e < n:
            nx, ny = max(mx, kx[e]), max(my, ky[e])
            padded = (e - s + 1) * nx * ny
            if padded * channels > max_elems:
                break
            if e - s >= _MIN_CHUNK and padded > _CHUNK_SLACK * (real + kx[e] * ky[e]):
                break
            mx, my, real = nx, ny, real + kx[e] * ky[e]
            e += 1
        chunks.append((s, e, my, mx))
        s = e
    return chunks


def _to_channels_last(features: Tensor) -> Tensor:
    """(N, C, H, W) -> (N * H * W, C) contiguous, without a copy when already channels-last."""
    n_img, c, h, w = features.shape
    nhwc = features.permute(0, 2, 3, 1)
    if nhwc.is_contiguous():
        return nhwc.reshape(n_img * h * w, c)
    out = features.new_empty((n_img, h * w, c))
    for i in range(n_img):
        # A 2-D transposed copy takes PyTorch's blocked-transpose path, faster on CPU than copying the
        # 4-D permuted view (BENCHMARKS.md).
        out[i].copy_(features[i].reshape(c, h * w).t())
    return out.reshape(n_img * h * w, c)


def _from_channels_last(flat: Tensor, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """(N * H * W, C) -> contiguous (N, C, H, W) in ``dtype`` (the inverse of _to_channels_last)."""
    n_img, c, h, w = shape
    out = flat.new_empty((n_img, c, h, w), dtype=dtype)
    src = flat.reshape(n_img, h * w, c)
    for i in range(n_img):
        out[i].view(c, h * w).copy_(src[i].t())
    return out


class _Plan:
    """The chunks of one call: per chunk, its pyramid level, output rows, window row starts, width."""

    def __init__(self, num_levels: int) -> None:
        self.num_levels = num_levels
        self.level: list[int] = []
        self.rows: list[Tensor] = []  # (n,) positions in the output
        self.starts: list[Tensor] = []  # (n, Ky) flat channels-last index of each window row's first cell
        self.kx: list[int] = []

    def chunks(self, weights: tuple[Tensor, ...] | list[Tensor]):
        """(level, rows, starts, Kx, Ay, Ax) per chunk."""
        return zip(self.level, self.rows, self.starts, self.kx, weights[0::2], weights[1::2])


class _WindowPool(torch.autograd.Function):
    """out[r] = Ay[r] @ window_r @ Ax[r]^T per channel, chunk by chunk, over one or more maps.

    Inputs: a :class:`_Plan`, the number of RoIs, the feature maps (one per level, each
    (N, C, H_l, W_l)), then per chunk the weights Ay (n, ph, Ky) and Ax (n, pw, Kx) (Ay already
    divided by the bin area). Output (R, C, ph, pw) in the feature dtype, each RoI written straight
    to its row. Every temporary is per chunk and kept small: large fresh allocations cost page
    faults that dominate CPU time here.
    """

    @staticmethod
    def forward(ctx, plan: _Plan, num_rois: int, *tensors: Tensor) -> Tensor:  # type: ignore[override]
        features, weights = tensors[: plan.num_levels], tensors[plan.num_levels :]
        acc = weights[0].dtype
        c = features[0].shape[1]
        ph, pw = weights[0].shape[1], weights[1].shape[1]
        used = set(plan.level)
        flats = [_to_channels_last(f) if lvl in used else None for lvl, f in enumerate(features)]
        out = features[0].new_empty((num_rois, c, ph, pw))
        for lvl, rows, start, kx, ay, ax in plan.chunks(weights):
            n, _, ky = ay.shape
            g = _gather(flats[lvl], start, kx, acc).reshape(n, ky, kx * c)
            t = torch.bmm(ay, g).reshape(n, ph, kx, c)  # rows integrated first: (n, ph, Kx, C)
            o = torch.matmul(ax.unsqueeze(1), t)  # (n, ph, pw, C)
            out.index_copy_(0, rows, o.permute(0, 3, 1, 2).to(out.dtype))
        ctx.plan = plan
        ctx.feature_meta = [(f.shape, f.dtype) for f in features]
        # Keep the channels-last copies when the RoI gradient needs the windows again, and on CPU
        # also to reuse their memory as the gradient accumulators: fresh pages for a map-sized
        # buffer cost more than the scatter itself there (CUDA's caching allocator makes
        # reallocation free).
        need_weights = any(wt.requires_grad for wt in weights)
        ctx.scratch = [None] * len(features)
        if not need_weights:
            for lvl, (f, flat) in enumerate(zip(features, flats)):
                own_copy = flat is not None and flat.data_ptr() != f.data_ptr()
                if own_copy and f.requires_grad and f.device.type == "cpu" and flat.dtype == acc:
                    # A plain attribute, not a saved tensor: backward overwrites it, which must not
                    # trip autograd's version check when backward runs twice (retain_graph).
                    ctx.scratch[lvl] = flat
        ctx.save_for_backward(*(flats if need_weights else [None] * len(flats)), *weights)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        # Accumulate in float32/float64 even when backward runs inside an autocast region.
        with torch.autocast(grad_out.device.type, enabled=False):
            return _WindowPool._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        plan = ctx.plan
        saved = ctx.saved_tensors
        flats, weights = saved[: plan.num_levels], saved[plan.num_levels :]
        acc = weights[0].dtype
        need_feat = ctx.needs_input_grad[2 : 2 + plan.num_levels]
        need_weights = any(ctx.needs_input_grad[2 + plan.num_levels :])
        used = set(plan.level)
        grad_flats: list[Tensor | None] = []
        for lvl, (shape, _) in enumerate(ctx.feature_meta):
            if not (need_feat[lvl] and lvl in used):
                grad_flats.append(None)
            elif ctx.scratch[lvl] is not None:
                grad_flats.append(ctx.scratch[lvl].zero_())
            else:
                n_img, c, h, w = shape
                grad_flats.append(grad_out.new_zeros((n_img * h * w, c), dtype=acc))
        grad_weights: list[Tensor | None] = []
        for lvl, rows, start, kx, ay, ax in plan.chunks(weights):
            n, ph, ky = ay.shape
            c = grad_out.shape[1]
            d_o = grad_out.index_select(0, rows).permute(0, 2, 3, 1).to(acc).contiguous()  # (n, ph, pw, C)
            # dT[r, p, j, c] = sum_q Ax[r, q, j] dOut[r, p, q, c]
            d_t = torch.matmul(ax.transpose(1, 2).unsqueeze(1), d_o).reshape(n, ph, kx * c)
            if grad_flats[lvl] is not None:
                d_g = torch.bmm(ay.transpose(1, 2), d_t)  # (n, Ky, Kx * C)
                grad_flats[lvl].index_add_(0, _window_index(start, kx), d_g.reshape(-1, c))
            if need_weights:
                g = _gather(flats[lvl], start, kx, acc).reshape(n, ky, kx * c)
                grad_ay = torch.bmm(d_t, g.transpose(1, 2))  # (n, ph, Ky)
                t = torch.bmm(ay, g).reshape(n, ph, kx, c)
                grad_ax = torch.einsum("npqc,npjc->nqj", d_o, t)
                grad_weights += [grad_ay, grad_ax]
            else:
                grad_weights += [None, None]
        grad_features = [
            None if gf is None else _from_channels_last(gf, shape, dtype)
            for gf, (shape, dtype) in zip(grad_flats, ctx.feature_meta)
        ]
        return (None, None, *grad_features, *grad_weights)


def _window_index(start: Tensor, kx: int) -> Tensor:
    """Flat channels-last row index of every window element: (n * Ky * Kx,)."""
    return (start.unsqueeze(-1) + torch.arange(kx, device=start.device, dtype=start.dtype)).reshape(-1)


def _gather(flat: Tensor, start: Tensor, kx: int, acc: torch.dtype) -> Tensor:
    """Window elements (n * Ky * Kx, C) in the accumulation dtype."""
    return flat.index_select(0, _window_index(start, kx)).to(acc)


def prroi_pool(
    features: Tensor,
    rois: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    *,
    impl: str = "auto",
) -> Tensor:
    """Precise RoI Pooling: the exact average of the bilinearly interpolated map over each bin.

    ``features`` (N, C, H, W) float32/float64/bfloat16/float16; ``rois`` (K, 5) rows
    ``[batch_index, x1, y1, x2, y2]`` in image coordinates (multiplied by ``spatial_scale``).
    Returns (K, C, h, w) in the feature dtype (reduced precision accumulates in float32).
    Differentiable w.r.t. ``features`` and the RoI coordinates (the batch-index column gets zero
    gradient). Zero-area bins give 0 with zero gradients; negative RoI sizes are clamped to 0.

    ``impl``: ``"auto"`` (the fused Triton kernels for float32/bfloat16/float16 CUDA tensors when
    Triton imports, else pure PyTorch), ``"triton"`` or ``"torch"`` to force one (``"triton"`` on
    CPU tensors needs ``TRITON_INTERPRET=1`` set before the kernels' module is imported).
    """
    return _pool([features], rois, None, output_size, [spatial_scale], impl)


def prroi_pool_levels(
    features: Sequence[Tensor],
    rois: Tensor,
    levels: Tensor,
    output_size: int | tuple[int, int],
    spatial_scales: Sequence[float],
    *,
    impl: str = "auto",
) -> Tensor:
    """:func:`prroi_pool` of RoI k from ``features[levels[k]]`` at ``spatial_scales[levels[k]]``.

    The same numbers as pooling each level separately and putting the rows back in RoI order,
    without the per-level outputs and the reordering copies (FPN poolers). ``features`` share
    N, C, dtype and device; ``levels`` is (K,) integer. ``impl`` as in :func:`prroi_pool`.
    """
    if len(features) != len(spatial_scales) or len(features) == 0:
        raise ValueError(
            f"prroi_pool_levels: need one spatial scale per feature map, got {len(features)} maps "
            f"and {len(spatial_scales)} scales"
        )
    if levels.shape != (rois.shape[0],) or levels.is_floating_point():
        raise ValueError(
            f"prroi_pool_levels: levels must be an integer tensor of shape ({rois.shape[0]},), "
            f"got {levels.dtype} {tuple(levels.shape)}"
        )
    return _pool(list(features), rois, levels, output_size, list(spatial_scales), impl)


def _pool(
    features: list[Tensor],
    rois: Tensor,
    levels: Tensor | None,
    output_size: int | tuple[int, int],
    scales: list[float],
    impl: str = "auto",
) -> Tensor:
    ph, pw = _pair(output_size)
    _check_inputs(features, rois)
    ref = features[0]
    use_triton = _use_triton(impl, ref)
    n_img, c = ref.shape[:2]
    if rois.shape[0] == 0:
        # A view of the features keeps the empty result attached to the graph.
        return ref[:0].reshape(0, c, ph, pw)
    if use_triton:
        lvl = None if levels is None else levels.to(ref.device, torch.int64)
        out, status = _triton_module().prroi_pool_triton(features, rois, lvl, (ph, pw), scales)
        # The forward kernel reports what _value_checks computes; its one host sync comes after
        # the launch, so the GPU is not idle while the host prepares it.
        _raise_on_bad_values(status.tolist(), n_img, len(features))
        return out
    return _pool_torch(features, rois, levels, ph, pw, scales)


_IMPLS = ("auto", "triton", "torch")


def _triton_module():
    """megdet.layers.prroi_pool_triton, imported on first use (Triton is slow to import and absent
    from CPU-only installs)."""
    from megdet.layers import prroi_pool_triton

    return prroi_pool_triton


def _triton_available() -> bool:
    try:
        _triton_module()
    except ImportError:
        return False
    return True


def _use_triton(impl: str, ref: Tensor) -> bool:
    """Whether ``impl`` selects the Triton kernels for features like ``ref``."""
    check_choice("prroi_pool", impl, _IMPLS, "impl")
    if impl == "torch":
        return False
    if impl == "triton":
        return True
    return ref.is_cuda and ref.dtype in (torch.float32, torch.bfloat16, torch.float16) and _triton_available()


def _check_inputs(features: list[Tensor], rois: Tensor) -> None:
    """Shapes, dtypes and devices (no host sync)."""
    ref = features[0]
    for f in features:
        if f.dim() != 4:
            raise ValueError(f"prroi_pool: features must be (N, C, H, W), got shape {tuple(f.shape)}")
        if f.shape[2] == 0 or f.shape[3] == 0:
            raise ValueError(f"prroi_pool: features have an empty spatial size {f.shape[2]}x{f.shape[3]}")
        if f.shape[:2] != ref.shape[:2] or f.dtype != ref.dtype or f.device != ref.device:
            raise ValueError(
                "prroi_pool_levels: all feature maps must share N, C, dtype and device, got "
                f"{tuple(ref.shape)} {ref.dtype} {ref.device} and {tuple(f.shape)} {f.dtype} {f.device}"
            )
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(
            f"prroi_pool: rois must be (K, 5) [batch_index, x1, y1, x2, y2], got shape {tuple(rois.shape)}"
        )
    if not ref.is_floating_point() or not rois.is_floating_point():
        raise ValueError(
            f"prroi_pool: features and rois must be floating point, got {ref.dtype} and {rois.dtype}"
        )
    if rois.device != ref.device:
        raise ValueError(f"prroi_pool: rois on {rois.device} but features on {ref.device}")


def _value_checks(r: Tensor, lvl: Tensor | None) -> Tensor:
    """(6,) on the device: any non-integer batch index, min and max batch index, any non-finite
    coordinate, min and max level (0 without levels); read by :func:`_raise_on_bad_values`."""
    bidx = r[:, 0]
    lvl = torch.zeros(1, dtype=r.dtype, device=r.device) if lvl is None else lvl.to(r.dtype)
    return torch.stack(
        [
            (bidx != torch.round(bidx)).any().to(r.dtype),
            bidx.min(),
            bidx.max(),
            (~torch.isfinite(r[:, 1:])).any().to(r.dtype),
            lvl.min(),
            lvl.max(),
        ]
    )


def _raise_on_bad_values(host: list[float], n_img: int, n_levels: int) -> None:
    if host[3]:
        raise ValueError("prroi_pool: rois contain NaN or infinite coordinates")
    if host[0] or host[1] < 0 or host[2] > n_img - 1:
        raise ValueError(
            f"prroi_pool: rois[:, 0] must be integer batch indices in [0, {n_img - 1}], "
            f"got values in [{host[1]:g}, {host[2]:g}]" + (" (non-integer)" if host[0] else "")
        )
    if host[4] < 0 or host[5] > n_levels - 1:
        raise ValueError(
            f"prroi_pool_levels: levels must be in [0, {n_levels - 1}], got [{host[4]:g}, {host[5]:g}]"
        )


def _pool_torch(
    features: list[Tensor], rois: Tensor, levels: Tensor | None, ph: int, pw: int, scales: list[float]
) -> Tensor:
    """The pure-PyTorch path: windows of touched cells gathered in chunks, two batched matmuls."""
    ref = features[0]
    n_img, c = ref.shape[:2]
    k = rois.shape[0]
    acc = torch.float64 if ref.dtype == torch.float64 else torch.float32
    dev = ref.device

    with torch.autocast(dev.type, enabled=False):
        r = rois.to(acc)
        bidx = r[:, 0].detach()
        lvl = torch.zeros(k, dtype=torch.int64, device=dev) if levels is None else levels.to(dev, torch.int64)
        safe_lvl = lvl.clamp(0, len(features) - 1)  # checked below, after one host sync
        scale = torch.tensor(scales, dtype=acc, device=dev)[safe_lvl]
        map_h = torch.tensor([f.shape[2] for f in features], dtype=acc, device=dev)[safe_lvl]
        map_w = torch.tensor([f.shape[3] for f in features], dtype=acc, device=dev)[safe_lvl]
        x1, y1 = r[:, 1] * scale, r[:, 2] * scale
        rw = (r[:, 3] * scale - x1).clamp(min=0)
        rh = (r[:, 4] * scale - y1).clamp(min=0)

        # Window of touched cells: columns floor(x1) .. ceil(x1 + rw), clipped to the map.
        with torch.no_grad():
            fx, fy = torch.floor(x1), torch.floor(y1)
            x_lo = torch.minimum(fx.clamp(min=0), map_w - 1)
            y_lo = torch.minimum(fy.clamp(min=0), map_h - 1)
            kx = torch.minimum((torch.minimum(torch.ceil(x1 + rw), map_w - 1) - x_lo + 1).clamp(min=1), map_w)
            ky = torch.minimum((torch.minimum(torch.ceil(y1 + rh), map_h - 1) - y_lo + 1).clamp(min=1), map_h)
            kx, ky = kx.to(torch.int64), ky.to(torch.int64)
            # Sort by level, then window area: chunks never mix levels and pad little.
            key = safe_lvl * int(max(f.shape[2] * f.shape[3] for f in features) + 1) + kx * ky
            order = torch.argsort(key)
            checks = _value_checks(r.detach(), lvl)
            host = torch.cat([checks, safe_lvl[order].to(acc), kx[order].to(acc), ky[order].to(acc)]).tolist()
        _raise_on_bad_values(host[:6], n_img, len(features))
        n_checks = 6
        lvl_sorted = [int(v) for v in host[n_checks : n_checks + k]]
        kx_sorted = [int(v) for v in host[n_checks + k : n_checks + 2 * k]]
        ky_sorted = [int(v) for v in host[n_checks + 2 * k :]]

        # Everything below runs on the RoIs sorted by (level, window size).
        x1, y1, rw, rh = x1[order], y1[order], rw[order], rh[order]
        fx, fy, b = fx[order], fy[order], bidx[order].to(torch.int64)
        # 1 / bin area, or 0 for a zero-area bin (kills its output and all its gradients).
        area = (rw / pw) * (rh / ph)
        valid = area > 0
        inv_area = torch.where(
            valid, 1.0 / torch.where(valid, area, torch.ones_like(area)), torch.zeros_like(area)
        )

        plan, weights = _Plan(len(features)), []
        max_elems = _MAX_CHUNK_BYTES // torch.empty((), dtype=acc).element_size()
        seg_start = 0
        while seg_start < k:
            level = lvl_sorted[seg_start]
            seg_end = seg_start
            while seg_end < k and lvl_sorted[seg_end] == level:
                seg_end += 1
            h, w = features[level].shape[2:]
            chunks = _plan_chunks(kx_sorted[seg_start:seg_end], ky_sorted[seg_start:seg_end], c, max_elems)
            for s0, e0, cky, ckx in chunks:
                s, e = seg_start + s0, seg_start + e0
                # Window origin so that the padded window stays inside the map and covers every
                # touched cell.
                xs = fx[s:e].clamp(0, w - ckx).to(torch.int64)
                ys = fy[s:e].clamp(0, h - cky).to(torch.int64)
                row0 = (b[s:e, None] * h + ys[:, None] + torch.arange(cky, device=dev)) * w
                plan.level.append(level)
                plan.rows.append(order[s:e])
                plan.starts.append(row0 + xs[:, None])
                plan.kx.append(ckx)
                ay = _bin_weights(y1[s:e], rh[s:e], ph, ys, cky) * inv_area[s:e, None, None]
                ax = _bin_weights(x1[s:e], rw[s:e], pw, xs, ckx)
                weights += [ay, ax]
            seg_start = seg_end
        return _WindowPool.apply(plan, k, *features, *weights)


class PrRoIPool(nn.Module):
    """Module form of :func:`prroi_pool`: ``forward(features, rois) -> (K, C, h, w)``."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float = 1.0) -> None:
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"

    def forward(self, features: Tensor, rois: Tensor) -> Tensor:
        return prroi_pool(features, rois, self.output_size, self.spatial_scale)
