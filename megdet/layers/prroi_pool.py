"""Precise RoI Pooling (Jiang et al. 2018, IoU-Net) in pure PyTorch, for CPU and CUDA.

Why our own: the reference implementations (vacancy/PreciseRoIPooling, mmcv.ops.PrRoIPool) are
CUDA-only extensions, torchvision and detectron2 have none, and we need CPU training and tests.

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
batched matmuls serve a whole chunk. The gather runs over a channels-last view (each window
element is one contiguous run of C values). A hand-written backward scatter-adds
``Ay^T @ dOut @ Ax`` into the window with ``index_add_`` and re-gathers the window only when
the RoI gradient is needed, so nothing of window size is kept between forward and backward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Padded-window waste tolerated inside one chunk (padded volume / real volume) before starting a
# new one, the smallest chunk worth a separate batched matmul, and a cap on the gathered window
# elements of one chunk (16 MiB in float32: small temporaries are reused by the allocator,
# large ones are fresh pages every time, which costs more than the arithmetic on CPU).
_CHUNK_SLACK = 1.3
_MIN_CHUNK = 8
_MAX_CHUNK_ELEMS = 1 << 22


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


def _plan_chunks(kx: list[int], ky: list[int], channels: int) -> list[tuple[int, int, int, int]]:
    """Split RoIs (already sorted by window area) into (start, end, Ky, Kx) chunks."""
    chunks = []
    n = len(kx)
    s = 0
    while s < n:
        mx, my, real = kx[s], ky[s], kx[s] * ky[s]
        e = s + 1
        while e < n:
            nx, ny = max(mx, kx[e]), max(my, ky[e])
            padded = (e - s + 1) * nx * ny
            if padded * channels > _MAX_CHUNK_ELEMS and e > s:
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
        # A 2-D transposed copy takes PyTorch's blocked-transpose path (about 3x faster on CPU
        # than copying the 4-D permuted view).
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
    """Per chunk of RoIs sharing one padded window: output rows, window row starts, window size."""

    def __init__(self) -> None:
        self.rows: list[Tensor] = []  # (n,) positions in the output
        self.starts: list[Tensor] = []  # (n, Ky) flat channels-last index of each window row's first cell
        self.kx: list[int] = []


class _WindowPool(torch.autograd.Function):
    """out[r] = Ay[r] @ window_r @ Ax[r]^T per channel, chunk by chunk.

    Inputs: features (N, C, H, W), a :class:`_Plan`, the number of RoIs, then per chunk the
    weights Ay (n, ph, Ky) and Ax (n, pw, Kx) (Ay already divided by the bin area). Output
    (R, C, ph, pw) in the feature dtype. Every temporary is per chunk and kept small: large fresh
    allocations cost page faults that dominate CPU time here.
    """

    @staticmethod
    def forward(ctx, features: Tensor, plan: _Plan, num_rois: int, *weights: Tensor) -> Tensor:  # type: ignore[override]
        acc = weights[0].dtype
        c = features.shape[1]
        ph, pw = weights[0].shape[1], weights[1].shape[1]
        flat = _to_channels_last(features)
        out = features.new_empty((num_rois, c, ph, pw))
        for rows, start, kx, ay, ax in zip(plan.rows, plan.starts, plan.kx, weights[0::2], weights[1::2]):
            n, _, ky = ay.shape
            g = _gather(flat, start, kx, acc).reshape(n, ky, kx * c)
            t = torch.bmm(ay, g).reshape(n, ph, kx, c)  # rows integrated first: (n, ph, Kx, C)
            o = torch.matmul(ax.unsqueeze(1), t)  # (n, ph, pw, C)
            out.index_copy_(0, rows, o.permute(0, 3, 1, 2).to(out.dtype))
        ctx.plan = plan
        ctx.feature_shape = features.shape
        ctx.feature_dtype = features.dtype
        # Keep the channels-last copy when the RoI gradient needs the windows again, and on CPU also
        # to reuse its memory as the gradient accumulator: fresh pages for a map-sized buffer cost
        # more than the scatter itself there (CUDA's caching allocator makes reallocation free).
        need_weights = any(wt.requires_grad for wt in weights)
        own_copy = flat.data_ptr() != features.data_ptr()
        reuse = features.requires_grad and features.device.type == "cpu" and own_copy and flat.dtype == acc
        ctx.reuse_flat = reuse and not need_weights
        ctx.save_for_backward(flat if (need_weights or ctx.reuse_flat) else None, *weights)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        # Accumulate in float32/float64 even when backward runs inside an autocast region.
        with torch.autocast(grad_out.device.type, enabled=False):
            return _WindowPool._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        flat, *weights = ctx.saved_tensors
        plan = ctx.plan
        acc = weights[0].dtype
        n_img, c, h, w = ctx.feature_shape
        need_feat = ctx.needs_input_grad[0]
        need_weights = any(ctx.needs_input_grad[3:])
        grad_flat = None
        if need_feat:
            if ctx.reuse_flat and not need_weights:
                grad_flat = flat.zero_()
            else:
                grad_flat = grad_out.new_zeros((n_img * h * w, c), dtype=acc)
        grad_weights: list[Tensor | None] = []
        for rows, start, kx, ay, ax in zip(plan.rows, plan.starts, plan.kx, weights[0::2], weights[1::2]):
            n, ph, ky = ay.shape
            d_o = grad_out.index_select(0, rows).permute(0, 2, 3, 1).to(acc).contiguous()  # (n, ph, pw, C)
            # dT[r, p, j, c] = sum_q Ax[r, q, j] dOut[r, p, q, c]
            d_t = torch.matmul(ax.transpose(1, 2).unsqueeze(1), d_o).reshape(n, ph, kx * c)
            if need_feat:
                d_g = torch.bmm(ay.transpose(1, 2), d_t)  # (n, Ky, Kx * C)
                grad_flat.index_add_(0, _window_index(start, kx), d_g.reshape(-1, c))
            if need_weights:
                g = _gather(flat, start, kx, acc).reshape(n, ky, kx * c)
                grad_ay = torch.bmm(d_t, g.transpose(1, 2))  # (n, ph, Ky)
                t = torch.bmm(ay, g).reshape(n, ph, kx, c)
                grad_ax = torch.einsum("npqc,npjc->nqj", d_o, t)
                grad_weights += [grad_ay, grad_ax]
            else:
                grad_weights += [None, None]
        grad_features = None
        if need_feat:
            grad_features = _from_channels_last(grad_flat, ctx.feature_shape, ctx.feature_dtype)
        return (grad_features, None, None, *grad_weights)


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
) -> Tensor:
    """Precise RoI Pooling: the exact average of the bilinearly interpolated map over each bin.

    ``features`` (N, C, H, W) float32/float64/bfloat16/float16; ``rois`` (K, 5) rows
    ``[batch_index, x1, y1, x2, y2]`` in image coordinates (multiplied by ``spatial_scale``).
    Returns (K, C, h, w) in the feature dtype (reduced precision accumulates in float32).
    Differentiable w.r.t. ``features`` and the RoI coordinates (the batch-index column gets zero
    gradient). Zero-area bins give 0 with zero gradients; negative RoI sizes are clamped to 0.
    """
    ph, pw = _pair(output_size)
    if features.dim() != 4:
        raise ValueError(f"prroi_pool: features must be (N, C, H, W), got shape {tuple(features.shape)}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(
            f"prroi_pool: rois must be (K, 5) [batch_index, x1, y1, x2, y2], got shape {tuple(rois.shape)}"
        )
    if not features.is_floating_point() or not rois.is_floating_point():
        raise ValueError(
            f"prroi_pool: features and rois must be floating point, got {features.dtype} and {rois.dtype}"
        )
    if rois.device != features.device:
        raise ValueError(f"prroi_pool: rois on {rois.device} but features on {features.device}")
    n_img, c, h, w = features.shape
    k = rois.shape[0]
    if k == 0:
        # A view of the features keeps the empty result attached to the graph.
        return features[:0].reshape(0, c, ph, pw)
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32

    with torch.autocast(features.device.type, enabled=False):
        r = rois.to(acc)
        bidx = r[:, 0].detach()
        x1, y1 = r[:, 1] * spatial_scale, r[:, 2] * spatial_scale
        rw = (r[:, 3] * spatial_scale - x1).clamp(min=0)
        rh = (r[:, 4] * spatial_scale - y1).clamp(min=0)

        # Window of touched cells: columns floor(x1) .. ceil(x1 + rw), clipped to the map.
        with torch.no_grad():
            fx, fy = torch.floor(x1), torch.floor(y1)
            x_lo = fx.clamp(0, w - 1)
            y_lo = fy.clamp(0, h - 1)
            kx = (torch.ceil(x1 + rw).clamp(max=w - 1) - x_lo + 1).clamp(1, w)
            ky = (torch.ceil(y1 + rh).clamp(max=h - 1) - y_lo + 1).clamp(1, h)
            order = torch.argsort(kx * ky)
            checks = torch.stack(
                [
                    (bidx != torch.round(bidx)).any().to(acc),
                    bidx.min(),
                    bidx.max(),
                    (~torch.isfinite(r[:, 1:].detach())).any().to(acc),
                ]
            )
            host = torch.cat([checks, kx[order], ky[order]]).cpu().tolist()
        if host[0] or host[3] or host[1] < 0 or host[2] > n_img - 1:
            if host[3]:
                raise ValueError("prroi_pool: rois contain NaN or infinite coordinates")
            raise ValueError(
                f"prroi_pool: rois[:, 0] must be integer batch indices in [0, {n_img - 1}], "
                f"got values in [{host[1]:g}, {host[2]:g}]" + (" (non-integer)" if host[0] else "")
            )
        kx_sorted = [int(v) for v in host[4 : 4 + k]]
        ky_sorted = [int(v) for v in host[4 + k :]]

        # Everything below runs on the RoIs sorted by window size.
        x1, y1, rw, rh = x1[order], y1[order], rw[order], rh[order]
        fx, fy, b = fx[order], fy[order], bidx[order].to(torch.int64)
        # 1 / bin area, or 0 for a zero-area bin (kills its output and all its gradients).
        area = (rw / pw) * (rh / ph)
        valid = area > 0
        inv_area = torch.where(valid, 1.0 / torch.where(valid, area, torch.ones_like(area)), torch.zeros_like(area))

        plan, weights = _Plan(), []
        for s, e, cky, ckx in _plan_chunks(kx_sorted, ky_sorted, c):
            # Window origin so that the padded window stays inside the map and covers every touched cell.
            xs = fx[s:e].clamp(0, w - ckx).to(torch.int64)
            ys = fy[s:e].clamp(0, h - cky).to(torch.int64)
            rows = (b[s:e, None] * h + ys[:, None] + torch.arange(cky, device=ys.device)) * w
            plan.rows.append(order[s:e])
            plan.starts.append(rows + xs[:, None])
            plan.kx.append(ckx)
            ay = _bin_weights(y1[s:e], rh[s:e], ph, ys, cky) * inv_area[s:e, None, None]
            ax = _bin_weights(x1[s:e], rw[s:e], pw, xs, ckx)
            weights += [ay, ax]
        return _WindowPool.apply(features, plan, k, *weights)


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
