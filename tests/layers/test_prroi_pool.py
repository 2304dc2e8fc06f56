"""Precise RoI Pooling: peer vectors, closed-form identities, brute-force integration, gradients."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megdet.layers import PrRoIPool, prroi_pool
from megdet.layers.prroi_pool import prroi_pool_levels

# The implementation module (megdet.layers re-exports a function of the same name).
_impl = sys.modules["megdet.layers.prroi_pool"]

# Copied from /work/shared/testdata/prroi_vacancy_tf_binaries_case.json: the binaries of
# vacancy/PreciseRoIPooling's TensorFlow test (produced by its PyTorch module), converted to JSON.
PEER_CASE = Path(__file__).resolve().parents[1] / "data" / "prroi_vacancy_tf_binaries_case.json"


def _bilinear(fmap: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Bilinear interpolation of (C, H, W) at points (ys, xs) from the four corners, zero outside."""
    c, h, w = fmap.shape
    y0, x0 = torch.floor(ys), torch.floor(xs)
    fy, fx = ys - y0, xs - x0
    val = fmap.new_zeros((c, *ys.shape))
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yi, xi = (y0 + dy).long(), (x0 + dx).long()
            inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
            corner = fmap[:, yi.clamp(0, h - 1), xi.clamp(0, w - 1)] * inside
            val = val + corner * (wy * wx)
    return val


def brute_force_prroi(
    features: torch.Tensor, rois: torch.Tensor, ph: int, pw: int, scale: float, samples: int = 100
) -> torch.Tensor:
    """Midpoint-rule average of the bilinear map over each bin (samples x samples points per bin)."""
    out = []
    offs = (torch.arange(samples, dtype=features.dtype) + 0.5) / samples
    for roi in rois:
        b = int(roi[0])
        x1, y1, x2, y2 = (float(v) * scale for v in roi[1:])
        bw, bh = max(x2 - x1, 0.0) / pw, max(y2 - y1, 0.0) / ph
        if bw == 0 or bh == 0:
            out.append(features.new_zeros((features.shape[1], ph, pw)))
            continue
        ys = y1 + (torch.arange(ph, dtype=features.dtype)[:, None] + offs).reshape(-1) * bh  # (ph * S,)
        xs = x1 + (torch.arange(pw, dtype=features.dtype)[:, None] + offs).reshape(-1) * bw  # (pw * S,)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        values = _bilinear(features[b], grid_y, grid_x)  # (C, ph * S, pw * S)
        out.append(values.reshape(-1, ph, samples, pw, samples).mean(dim=(2, 4)))
    return torch.stack(out)


def _edges_away_from_kinks(roi: torch.Tensor, ph: int, pw: int, scale: float, margin: float = 0.08) -> bool:
    """True if every bin edge is at least ``margin`` from an integer (the hat's kinks)."""
    x1, y1, x2, y2 = (float(v) * scale for v in roi[1:])
    edges = [x1 + (x2 - x1) * q / pw for q in range(pw + 1)] + [
        y1 + (y2 - y1) * p / ph for p in range(ph + 1)
    ]
    return all(abs(e - round(e)) > margin for e in edges)


def _random_rois(gen: torch.Generator, n: int, num_images: int, h: int, w: int, scale: float) -> torch.Tensor:
    """RoIs in image coordinates: inside, partly outside the map, and smaller than one cell."""
    rois = []
    for i in range(n):
        kind = i % 3
        if kind == 0:  # inside
            x1, y1 = torch.rand(2, generator=gen).tolist()
            x1, y1 = x1 * (w - 3), y1 * (h - 3)
            bw, bh = 0.5 + 2.5 * torch.rand(2, generator=gen)
        elif kind == 1:  # partly outside
            x1, y1 = (torch.rand(2, generator=gen) * 4 - 2).tolist()
            x1, y1 = x1 + (w - 2) * (i % 2), y1
            bw, bh = 1.5 + 3 * torch.rand(2, generator=gen)
        else:  # smaller than one cell
            x1, y1 = (torch.rand(2, generator=gen) * torch.tensor([w - 1.0, h - 1.0])).tolist()
            bw, bh = 0.1 + 0.6 * torch.rand(2, generator=gen)
        b = i % num_images
        rois.append([b, x1 / scale, y1 / scale, (x1 + float(bw)) / scale, (y1 + float(bh)) / scale])
    return torch.tensor(rois, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# Peer vectors and identities
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-6)])
def test_peer_vectors_vacancy(dtype: torch.dtype, tol: float) -> None:
    # Expected values are float32 results of the reference CUDA implementation; float64 here is
    # closer to the exact values, so it agrees to the float32 rounding of the reference.
    case = json.loads(PEER_CASE.read_text())
    ph, pw, scale = case["pooled_h"], case["pooled_w"], case["spatial_scale"]
    features = torch.tensor(case["input"], dtype=dtype, requires_grad=True)
    rois = torch.tensor(case["rois"], dtype=dtype, requires_grad=True)
    out = prroi_pool(features, rois, (ph, pw), scale)
    out.sum().backward()
    expected = torch.tensor(case["expected_output"], dtype=dtype)
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(
        features.grad, torch.tensor(case["expected_input_grad"], dtype=dtype), rtol=tol, atol=tol
    )
    torch.testing.assert_close(
        rois.grad, torch.tensor(case["expected_rois_grad"], dtype=dtype), rtol=tol, atol=tol
    )
    assert torch.all(rois.grad[:, 0] == 0)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_unit_bins_equal_avg_pool(scale: float) -> None:
    # 7x7 bins of one cell each with integer corners: each bin is the mean of its 4 corners,
    # i.e. avg_pool2d(kernel 2, stride 1) of the zero-padded map (RoIs may stick out of the map).
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 12, 13, generator=gen, dtype=torch.float64)
    m = 4
    pooled = F.avg_pool2d(
        F.pad(features, (m, m, m, m)), kernel_size=2, stride=1
    )  # [i + m, j + m]: cell (i, j)
    corners = [(0, 0, 0), (1, 3, 2), (0, -2, 4), (1, 8, -3), (0, 7, 7)]  # (b, x0, y0), some outside
    rois = torch.tensor(
        [[b, x0 / scale, y0 / scale, (x0 + 7) / scale, (y0 + 7) / scale] for b, x0, y0 in corners]
    )
    out = prroi_pool(features, rois.double(), 7, scale)
    for k, (b, x0, y0) in enumerate(corners):
        expected = pooled[b, :, y0 + m : y0 + m + 7, x0 + m : x0 + m + 7]
        torch.testing.assert_close(out[k], expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Brute-force numerical integration
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_size,scale", [((2, 3), 1.0), (3, 0.5)])
def test_matches_brute_force_integration(output_size: tuple[int, int] | int, scale: float) -> None:
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(2, 3, 9, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = _random_rois(gen, 9, 2, 9, 11, scale)
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    out = prroi_pool(features, rois, output_size, scale)
    ref = brute_force_prroi(features, rois, ph, pw, scale)
    # The midpoint rule is exact on each bilinear cell; only samples straddling a cell border err
    # (O(1/samples^2): about 6e-5 here with 100 x 100 samples per bin).
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    weights = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (grad_ours,) = torch.autograd.grad((out * weights).sum(), features)
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), features)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=0, atol=1e-4)


def test_float32_matches_float64() -> None:
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(2, 4, 15, 17, generator=gen, dtype=torch.float64)
    rois = _random_rois(gen, 12, 2, 15, 17, 0.5)
    ref = prroi_pool(features, rois, 4, 0.5)
    out = prroi_pool(features.float(), rois.float(), 4, 0.5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------


def _gradcheck_rois(gen: torch.Generator, ph: int, pw: int, scale: float) -> torch.Tensor:
    rois = []
    while len(rois) < 4:
        cand = _random_rois(gen, 3, 2, 6, 7, scale)
        rois += [r for r in cand if _edges_away_from_kinks(r, ph, pw, scale)]
    return torch.stack(rois[:4])


@pytest.mark.parametrize("rois_grad", [True, False])
def test_gradcheck(rois_grad: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(2, 2, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = _gradcheck_rois(gen, 2, 3, 0.5)
    batch_index, coords = rois[:, :1], rois[:, 1:].clone().requires_grad_(rois_grad)

    def fn(f: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return prroi_pool(f, torch.cat([batch_index, c], dim=1), (2, 3), 0.5)

    assert torch.autograd.gradcheck(fn, (features, coords))


def test_roi_gradient_is_boundary_integral() -> None:
    # d out / d x2 = (integral over the bin's y-range of f(x2, y) / area) - out / width, for one bin.
    gen = torch.Generator().manual_seed(4)
    features = torch.randn(1, 1, 6, 6, generator=gen, dtype=torch.float64)
    rois = torch.tensor([[0.0, 1.3, 0.7, 3.6, 4.2]], dtype=torch.float64, requires_grad=True)
    out = prroi_pool(features, rois, 1)
    (grad,) = torch.autograd.grad(out.sum(), rois)
    width, height = 3.6 - 1.3, 4.2 - 0.7
    ys = 0.7 + (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000 * height
    line = _bilinear(features[0], ys, torch.full_like(ys, 3.6)).mean() * height
    expected = line / (width * height) - out.item() / width
    assert math.isclose(grad[0, 3].item(), expected.item(), abs_tol=1e-6)
    assert grad[0, 0].item() == 0.0


def test_zero_area_rois_give_zero_output_and_gradients() -> None:
    gen = torch.Generator().manual_seed(5)
    features = torch.randn(1, 3, 8, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [
            [0, 2.5, 2.5, 2.5, 5.5],  # zero width
            [0, 1.5, 4.0, 6.5, 4.0],  # zero height
            [0, 5.0, 5.0, 3.0, 2.0],  # negative size, clamped to 0
            [0, 3.0, 3.0, 3.0, 3.0],  # a point
        ],
        dtype=torch.float64,
        requires_grad=True,
    )
    out = prroi_pool(features, rois, 2)
    assert torch.all(out == 0)
    out.sum().backward()
    assert torch.all(features.grad == 0)
    assert torch.all(rois.grad == 0)


def test_rois_entirely_outside_the_map_pool_zero() -> None:
    features = torch.randn(1, 2, 6, 8, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [[0, 9.5, 1.0, 12.0, 4.0], [0, -6.0, -5.0, -1.5, -1.2], [0, 2.0, 7.1, 5.0, 9.0]],
        dtype=torch.float64,
        requires_grad=True,
    )
    out = prroi_pool(features, rois, 2)
    assert torch.all(out == 0)
    out.sum().backward()
    assert torch.all(features.grad == 0) and torch.all(rois.grad == 0)


def test_empty_rois() -> None:
    features = torch.randn(2, 5, 8, 8, requires_grad=True)
    out = prroi_pool(features, torch.zeros((0, 5)), (3, 4), 0.25)
    assert out.shape == (0, 5, 3, 4)
    assert out.dtype == features.dtype
    out.sum().backward()
    assert features.grad is not None and torch.all(features.grad == 0)


def test_batch_index_column_gets_zero_gradient_and_other_images_none() -> None:
    features = torch.randn(3, 2, 7, 7, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[1, 0.6, 0.7, 4.4, 5.2]], dtype=torch.float64, requires_grad=True)
    prroi_pool(features, rois, 2).sum().backward()
    assert rois.grad[0, 0] == 0
    assert torch.all(features.grad[0] == 0) and torch.all(features.grad[2] == 0)
    assert features.grad[1].abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# Errors, dtypes, layouts, chunking
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch_index,match",
    [(2.0, r"batch indices in \[0, 1\]"), (-1.0, r"batch indices in \[0, 1\]"), (0.5, "non-integer")],
)
def test_bad_batch_index(batch_index: float, match: str) -> None:
    features = torch.randn(2, 3, 8, 8)
    rois = torch.tensor([[0, 1.0, 1.0, 4.0, 4.0], [batch_index, 1.0, 1.0, 4.0, 4.0]])
    with pytest.raises(ValueError, match=match):
        prroi_pool(features, rois, 2)


def test_bad_shapes_and_values() -> None:
    features = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"\(K, 5\)"):
        prroi_pool(features, torch.zeros(3, 4), 2)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        prroi_pool(features[0], torch.zeros(1, 5), 2)
    with pytest.raises(ValueError, match="NaN or infinite"):
        prroi_pool(features, torch.tensor([[0, 1.0, float("nan"), 3.0, 3.0]]), 2)
    with pytest.raises(ValueError, match="output_size"):
        prroi_pool(features, torch.zeros(1, 5), 0)


def test_bfloat16_close_to_float32() -> None:
    gen = torch.Generator().manual_seed(6)
    features = torch.randn(2, 8, 16, 20, generator=gen).bfloat16()
    rois = _random_rois(gen, 10, 2, 16, 20, 0.5).float()
    f16 = features.clone().requires_grad_(True)
    f32 = features.float().requires_grad_(True)
    out16 = prroi_pool(f16, rois, 3, 0.5)
    out32 = prroi_pool(f32, rois, 3, 0.5)
    assert out16.dtype == torch.bfloat16
    # Accumulation is float32, so the only difference is the final rounding to bfloat16.
    torch.testing.assert_close(out16.float(), out32, rtol=1e-2, atol=1e-2)
    weights = torch.randn(out32.shape, generator=gen)
    (out16.float() * weights).sum().backward()
    (out32 * weights).sum().backward()
    assert f16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(f16.grad.float(), f32.grad, rtol=2e-2, atol=2e-2)


def test_channels_last_input_and_many_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(7)
    features = torch.randn(2, 4, 20, 24, generator=gen, dtype=torch.float64)
    rois = _random_rois(gen, 40, 2, 20, 24, 0.5)
    rois[::4, 3:] += 10.0  # some much larger windows, so chunks get different sizes
    f_a = features.clone().requires_grad_(True)
    r_a = rois.clone().requires_grad_(True)
    out_a = prroi_pool(f_a, r_a, 3, 0.5)
    weights = torch.randn(out_a.shape, generator=gen, dtype=torch.float64)
    (out_a * weights).sum().backward()

    # Force one chunk per few RoIs and a channels-last input: same numbers, same order.
    monkeypatch.setattr(_impl, "_MAX_CHUNK_BYTES", 200 * 8)
    monkeypatch.setattr(_impl, "_MIN_CHUNK", 1)
    f_b = features.clone().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    r_b = rois.clone().requires_grad_(True)
    out_b = prroi_pool(f_b, r_b, 3, 0.5)
    (out_b * weights).sum().backward()
    torch.testing.assert_close(out_b, out_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f_b.grad, f_a.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r_b.grad, r_a.grad, rtol=1e-10, atol=1e-10)


def test_plan_chunks_bounds_padding() -> None:
    kx = [2, 2, 3, 3, 5, 9, 9, 30]
    ky = [2, 3, 2, 3, 5, 9, 8, 30]
    chunks = _impl._plan_chunks(kx, ky, channels=1, max_elems=100)
    assert [c[0] for c in chunks][0] == 0 and chunks[-1][1] == len(kx)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    for s, e, cky, ckx in chunks:
        assert cky == max(ky[s:e]) and ckx == max(kx[s:e])
        assert (e - s) * cky * ckx <= 100 or e - s == 1  # the cap holds unless one RoI alone exceeds it
    assert len(chunks) > 1


def test_module_and_autocast() -> None:
    gen = torch.Generator().manual_seed(8)
    features = torch.randn(1, 3, 10, 10, generator=gen)
    rois = torch.tensor([[0, 1.2, 2.3, 14.5, 12.1]])
    pool = PrRoIPool((2, 2), spatial_scale=0.5)
    expected = prroi_pool(features, rois, 2, 0.5)
    torch.testing.assert_close(pool(features, rois), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pool(features, rois)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def test_levels_match_per_level_calls() -> None:
    gen = torch.Generator().manual_seed(9)
    maps = [
        torch.randn(2, 3, 16, 18, generator=gen, dtype=torch.float64),
        torch.randn(2, 3, 8, 9, generator=gen, dtype=torch.float64),
    ]
    maps = [m.requires_grad_(True) for m in maps]
    rois = _random_rois(gen, 10, 2, 8, 9, 0.25)
    levels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 1])
    out = prroi_pool_levels(maps, rois, levels, (2, 3), [0.5, 0.25])
    expected = torch.zeros_like(out)
    for lvl, scale in enumerate([0.5, 0.25]):
        sel = levels == lvl
        expected[sel] = prroi_pool(maps[lvl], rois[sel], (2, 3), scale)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((out * weights).sum(), maps)
    expected_grads = torch.autograd.grad((expected * weights).sum(), maps)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"levels must be in \[0, 1\]"):
        prroi_pool_levels(maps, rois, levels + 1, 2, [0.5, 0.25])
    with pytest.raises(ValueError, match="one spatial scale per feature map"):
        prroi_pool_levels(maps, rois, levels, 2, [0.5])
    with pytest.raises(ValueError, match="share N, C"):
        prroi_pool_levels([maps[0], maps[1][:, :2]], rois, levels, 2, [0.5, 0.25])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-4), (torch.bfloat16, 3e-2)])
def test_cuda_matches_cpu_float64(dtype: torch.dtype, tol: float) -> None:
    # Output, feature gradient and RoI gradient on the GPU against the float64 CPU result.
    gen = torch.Generator().manual_seed(8)
    features = torch.randn(2, 16, 24, 30, generator=gen, dtype=torch.float64)
    rois = _random_rois(gen, 64, 2, 24, 30, 0.5)
    weights = torch.randn(64, 16, 7, 7, generator=gen, dtype=torch.float64)

    def run(f: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
        f = f.detach().requires_grad_(True)
        coords = r[:, 1:].detach().requires_grad_(True)
        out = prroi_pool(f, torch.cat([r[:, :1], coords], dim=1), 7, 0.5)
        (out.float() * w).sum().backward()
        return [out.detach(), f.grad, coords.grad]

    ref = run(features, rois, weights)
    roi_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    got = run(features.cuda().to(dtype), rois.cuda().to(roi_dtype), weights.cuda().to(roi_dtype))
    assert got[0].dtype == dtype and got[0].is_cuda
    for name, g, r in zip(("output", "feature grad", "roi grad"), got, ref):
        # Relative to the tensor's largest value: the RoI gradient sums thousands of terms.
        err = float((g.cpu().double() - r).abs().max() / r.abs().max())
        assert err <= tol, f"{name}: max error {err:.2e} of the largest value (allowed {tol:.0e})"
