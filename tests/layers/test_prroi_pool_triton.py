"""The Triton PrRoIPool kernels against the pure-PyTorch path and the float64 reference.

Without a GPU the kernels run on CPU tensors under Triton's interpreter. ``TRITON_INTERPRET=1`` must
be set before ``@triton.jit`` runs, i.e. before megdet.layers.prroi_pool_triton is first imported,
so the interpreted cases run in a child process (this file run as a script) that saves its results;
the tests here compare them. ``@pytest.mark.cuda`` tests compile and run the kernels on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megdet.layers.prroi_pool import prroi_pool, prroi_pool_levels

PEER_CASE = Path(__file__).resolve().parents[1] / "data" / "prroi_vacancy_tf_binaries_case.json"
SCALES = [0.5, 0.25, 0.125]
# One map per level of 2 images; sizes chosen so RoIs reach past every border.
MAP_SIZES = [(12, 14), (6, 7), (3, 4)]


def make_case(channels: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """float64 maps of 3 levels, RoIs (image coordinates) of every kind, and their levels."""
    gen = torch.Generator().manual_seed(seed)
    maps = [torch.randn(2, channels, h, w, generator=gen, dtype=torch.float64) for h, w in MAP_SIZES]
    rois = [
        [0, 2.3, 3.1, 17.6, 13.9],  # inside, fractional
        [1, -6.0, -3.5, 9.0, 30.2],  # partly outside (top-left)
        [0, 20.0, 16.0, 36.4, 31.7],  # partly outside (bottom-right)
        [1, 5.5, 5.5, 5.5, 12.0],  # zero width
        [0, 9.0, 4.0, 3.0, 2.0],  # negative size: clamped to 0
        [1, 60.0, 1.0, 75.0, 9.0],  # entirely outside
        [0, 7.13, 9.41, 8.02, 9.88],  # smaller than one cell
        [1, 0.0, 0.0, 32.0, 24.0],  # integer corners
        [0, -1.7, 20.2, 31.1, 47.3],  # tall, past the bottom
    ]
    rois += [[i % 2, *(torch.rand(2, generator=gen) * 20).tolist(), 0.0, 0.0] for i in range(3)]
    rois_t = torch.tensor(rois, dtype=torch.float64)
    rois_t[9:, 3:] = rois_t[9:, 1:3] + 1.0 + torch.rand(3, 2, generator=gen, dtype=torch.float64) * 25
    levels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    return maps, rois_t, levels


def run_levels(
    maps: list[torch.Tensor],
    rois: torch.Tensor,
    levels: torch.Tensor,
    output_size: tuple[int, int],
    impl: str,
    upstream: torch.Tensor,
    roi_grad: bool = True,
) -> dict[str, torch.Tensor]:
    """Output, feature gradients (float64) and RoI gradient of sum(upstream * output)."""
    maps = [m.detach().requires_grad_(True) for m in maps]
    rois = rois.detach().requires_grad_(roi_grad)
    out = prroi_pool_levels(maps, rois, levels, output_size, SCALES[: len(maps)], impl=impl)
    (out.double() * upstream.to(out.device)).sum().backward()
    result = {"out": out.detach().double().cpu()}
    for i, m in enumerate(maps):
        result[f"grad{i}"] = m.grad.double().cpu()
    if roi_grad:
        result["grad_rois"] = rois.grad.double().cpu()
    return result


# --------------------------------------------------------------------------------------------------
# The interpreted cases (child process)
# --------------------------------------------------------------------------------------------------


def interpreted_cases() -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Per case, ``{"got": Triton path, "ref": reference}``; runs under TRITON_INTERPRET=1."""
    import megdet.layers.prroi_pool_triton as kernels

    assert kernels.INTERPRET, "TRITON_INTERPRET=1 must be set before the kernels are imported"
    cases: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    gen = torch.Generator().manual_seed(0)

    # Three levels, every kind of RoI, 5 channels (one partial channel block), 2x3 bins.
    maps, rois, levels = make_case(5, seed=1)
    maps[1] = maps[1].contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(len(rois), 5, 2, 3, generator=gen, dtype=torch.float64)
    ref = run_levels(maps, rois, levels, (2, 3), "torch", upstream)
    cases["fp32"] = {
        "got": run_levels([m.float() for m in maps], rois.float(), levels, (2, 3), "triton", upstream),
        "ref": ref,
    }
    # Bad values raise after the launch; the kernels clamp them, so nothing is read out of bounds.
    # The same messages as the PyTorch path.
    for row, col, value, lvl_shift, match in [
        (1, 0, 7.0, 0, "batch indices in [0, 1], got values in [0, 7]"),
        (0, 0, 0.5, 0, "(non-integer)"),
        (1, 2, float("nan"), 0, "NaN or infinite"),
        (0, 3, float("inf"), 0, "NaN or infinite"),
        (0, 1, 1.0, 3, "levels must be in [0, 2], got [3, 4]"),
    ]:
        bad = rois[:2].float().clone()
        bad[row, col] = value
        try:
            prroi_pool_levels(
                [m.float() for m in maps], bad, levels[:2] + lvl_shift, 2, SCALES, impl="triton"
            )
        except ValueError as exc:
            assert match in str(exc), (match, str(exc))
        else:
            raise AssertionError(f"{match!r} was not raised")
    # bfloat16 features (float32 RoIs) against float64 on the same rounded values; fewer RoIs
    # (the interpreter is slow).
    maps16 = [m.bfloat16() for m in maps]
    sub = [0, 1, 6, 8]
    cases["bf16"] = {
        "got": run_levels(maps16, rois[sub].float(), levels[sub], (2, 3), "triton", upstream[sub]),
        "ref": run_levels(
            [m.double() for m in maps16], rois[sub], levels[sub], (2, 3), "torch", upstream[sub]
        ),
    }
    # 70 channels (two channel blocks), 3x5 bins, one level without levels (prroi_pool), float16
    # features, no RoI gradient.
    f = torch.randn(2, 70, 9, 10, generator=gen, dtype=torch.float64).half()
    r = rois[[0, 3, 6]].clone()
    up = torch.randn(len(r), 70, 3, 5, generator=gen, dtype=torch.float64)
    got, want = {}, {}
    for impl, feats, res in (("triton", f, got), ("torch", f.double(), want)):
        x = feats.detach().requires_grad_(True)
        out = prroi_pool(
            x, r.to(torch.float32 if impl == "triton" else torch.float64), (3, 5), 0.5, impl=impl
        )
        (out.double() * up).sum().backward()
        res.update(out=out.detach().double(), grad0=x.grad.double())
    cases["fp16_single_level"] = {"got": got, "ref": want}

    # The peer vectors of vacancy/PreciseRoIPooling (float32 CUDA reference results).
    peer = json.loads(PEER_CASE.read_text())
    feats = torch.tensor(peer["input"], dtype=torch.float32, requires_grad=True)
    peer_rois = torch.tensor(peer["rois"], dtype=torch.float32, requires_grad=True)
    out = prroi_pool(
        feats, peer_rois, (peer["pooled_h"], peer["pooled_w"]), peer["spatial_scale"], impl="triton"
    )
    out.sum().backward()
    cases["peer"] = {
        "got": {
            "out": out.detach().double(),
            "grad0": feats.grad.double(),
            "grad_rois": peer_rois.grad.double(),
        },
        "ref": {
            "out": torch.tensor(peer["expected_output"], dtype=torch.float64),
            "grad0": torch.tensor(peer["expected_input_grad"], dtype=torch.float64),
            "grad_rois": torch.tensor(peer["expected_rois_grad"], dtype=torch.float64),
        },
    }
    return cases


# --------------------------------------------------------------------------------------------------
# Tests (CPU, interpreter)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    out = tmp_path_factory.mktemp("prroi_triton") / "cases.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, f"interpreted cases failed:\n{proc.stdout}\n{proc.stderr}"
    return torch.load(out, weights_only=True)


def _assert_close_rel(got: torch.Tensor, ref: torch.Tensor, tol: float, name: str) -> None:
    """Max error relative to the largest reference value (sums of many terms of either sign)."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
    assert err <= tol, f"{name}: max error {err:.2e} of the largest value (allowed {tol:.0e})"


@pytest.mark.parametrize("case,tol", [("fp32", 1e-5), ("bf16", 2e-2), ("fp16_single_level", 2e-3)])
def test_interpreted_matches_torch_path(interpreted: dict, case: str, tol: float) -> None:
    got, ref = interpreted[case]["got"], interpreted[case]["ref"]
    assert got.keys() == ref.keys()
    for key in ref:
        _assert_close_rel(got[key], ref[key], tol, f"{case} {key}")


def test_interpreted_zero_area_and_outside_rois_are_exactly_zero(interpreted: dict) -> None:
    got = interpreted["fp32"]["got"]
    # RoIs 3 and 4 have zero area, RoI 5 lies outside its map: zero output, zero RoI gradient.
    assert torch.all(got["out"][3:6] == 0)
    assert torch.all(got["grad_rois"][3:6] == 0)
    assert torch.all(got["grad_rois"][:, 0] == 0)  # the batch-index column
    assert torch.all(got["out"][[0, 1, 2, 6, 7, 8]].abs().amax(dim=(1, 2, 3)) > 0)


def test_interpreted_peer_vectors(interpreted: dict) -> None:
    got, ref = interpreted["peer"]["got"], interpreted["peer"]["ref"]
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-5, msg=f"peer {key}")


def test_impl_argument() -> None:
    features = torch.randn(1, 2, 6, 6)
    rois = torch.tensor([[0, 1.0, 1.0, 4.0, 5.0]])
    with pytest.raises(ValueError, match="unknown impl 'cuda'"):
        prroi_pool(features, rois, 2, impl="cuda")
    # auto on CPU tensors is the PyTorch path (no Triton import needed).
    torch.testing.assert_close(prroi_pool(features, rois, 2), prroi_pool(features, rois, 2, impl="torch"))
    kernels = pytest.importorskip("megdet.layers.prroi_pool_triton")
    if not kernels.INTERPRET:
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            prroi_pool(features, rois, 2, impl="triton")
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        prroi_pool(features.double(), rois.double(), 2, impl="triton")


# --------------------------------------------------------------------------------------------------
# CUDA: the compiled kernels
# --------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)], ids=str
)
def test_cuda_triton_matches_float64(dtype: torch.dtype, tol: float) -> None:
    # Features rounded to ``dtype`` first: the reference sees the same values, so the remaining
    # error is float32 accumulation and the final rounding to ``dtype``.
    maps, rois, levels = make_case(80, seed=2)
    maps = [m.to(dtype) for m in maps]
    maps[0] = maps[0].contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(
        len(rois), 80, 7, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    ref = run_levels([m.double() for m in maps], rois, levels, (7, 7), "torch", upstream)
    cuda = [m.cuda() for m in maps]
    got = run_levels(cuda, rois.float().cuda(), levels.cuda(), (7, 7), "auto", upstream)
    for key in ref:
        _assert_close_rel(got[key], ref[key], 5 * tol if key == "grad_rois" else tol, f"{dtype} {key}")
    assert torch.all(got["out"][3:6] == 0) and torch.all(got["grad_rois"][3:6] == 0)


@pytest.mark.cuda
def test_cuda_auto_uses_triton_and_gradients_are_exact() -> None:
    maps, rois, levels = make_case(16, seed=4)
    keep = [0, 1, 2, 6, 7, 8, 9, 10, 11]
    maps32 = [m.float().cuda().requires_grad_(True) for m in maps]
    out = prroi_pool_levels(maps32, rois[keep].float().cuda(), levels[keep].cuda(), (3, 4), SCALES)
    assert "Triton" in type(out.grad_fn).__name__, f"auto took {type(out.grad_fn).__name__}"
    # The output is linear in the features: sum(w * out) equals sum(feature grad * features).
    w = torch.randn_like(out)
    grads = torch.autograd.grad((w * out).sum(), maps32)
    lhs = float((w.double() * out.double()).sum())
    rhs = sum(float((g.double() * m.double()).sum()) for g, m in zip(grads, maps32))
    assert abs(lhs - rhs) <= 1e-5 * max(1.0, abs(lhs))

    # RoI gradient against central differences of the exact (float64) function; RoIs with edges
    # away from the hat's kinks, where the function is smooth.
    coords = torch.tensor([[0, 3.3, 5.1, 17.9, 15.3], [1, 6.7, 2.3, 20.2, 29.1]], dtype=torch.float64)
    lv = torch.tensor([0, 1])
    upstream = torch.randn(2, 16, 3, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    maps_cuda = [m.float().cuda() for m in maps]
    got = run_levels(maps_cuda, coords.float().cuda(), lv.cuda(), (3, 4), "auto", upstream)["grad_rois"]
    eps = 1e-4
    numeric = torch.zeros_like(coords)
    for k in range(2):
        for col in range(1, 5):
            plus, minus = coords.clone(), coords.clone()
            plus[k, col] += eps
            minus[k, col] -= eps
            f_plus = (prroi_pool_levels(maps, plus, lv, (3, 4), SCALES, impl="torch") * upstream).sum()
            f_minus = (prroi_pool_levels(maps, minus, lv, (3, 4), SCALES, impl="torch") * upstream).sum()
            numeric[k, col] = (f_plus - f_minus) / (2 * eps)
    _assert_close_rel(got, numeric, 1e-4, "roi grad vs central differences")


@pytest.mark.cuda
@pytest.mark.parametrize("output_size", [7, 14])
def test_cuda_realistic_sizes_match_torch_path(output_size: int) -> None:
    # FPN-sized maps (2 images, 256 channels, P2..P5 of a 800x1344 batch) and 256 proposal-like RoIs:
    # int64 offsets, many programs, channel blocks; the PyTorch path on the same GPU is the reference.
    gen = torch.Generator().manual_seed(6)
    maps = [torch.randn(2, 256, 800 // s, 1344 // s, generator=gen).cuda() for s in (4, 8, 16, 32)]
    size = torch.exp(torch.empty(256).uniform_(2.8, 6.2, generator=gen))
    cx, cy = torch.rand(256, generator=gen) * 1344, torch.rand(256, generator=gen) * 800
    boxes = torch.stack([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2], 1)
    rois = torch.cat([(torch.arange(256) % 2)[:, None].float(), boxes], 1).cuda()
    levels = (torch.log2(size / 224) + 4).floor().clamp(2, 5).long().cuda() - 2
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    upstream = torch.randn(256, 256, output_size, output_size, generator=gen, dtype=torch.float64)
    results = []
    for impl in ("triton", "torch"):
        ms = [m.detach().requires_grad_(True) for m in maps]
        r = rois.detach().requires_grad_(True)
        out = prroi_pool_levels(ms, r, levels, output_size, scales, impl=impl)
        (out.double() * upstream.cuda()).sum().backward()
        results.append([out.detach(), *(m.grad for m in ms), r.grad])
    for i, (g, ref) in enumerate(zip(*results)):
        _assert_close_rel(g.double().cpu(), ref.double().cpu(), 1e-4, f"tensor {i}")


if __name__ == "__main__":
    # Child process of the `interpreted` fixture: TRITON_INTERPRET=1 is already in the environment.
    torch.set_num_threads(1)
    torch.save(interpreted_cases(), sys.argv[1])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kernels_compile_for_sm90(dtype: str) -> None:
    from triton_compile import compile_for_sm90

    from megdet.layers import prroi_pool_triton as pt

    if pt.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1: the helpers are plain functions, not compilable")
    tables = {"rois_ptr": "*fp32", "levels_ptr": "*i64", "meta_ptr": "*i64", "scales_ptr": "*fp32"}
    pool = {"PH": 7, "PW": 7, "HAS_LEVELS": True, "BLOCK_PW": 8, "BLOCK_C": 64}
    kernels = [
        (pt._prroi_fwd_kernel, {"feat_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "status_ptr": "*fp32"}, pool),
        (pt._prroi_bwd_roi_kernel, {"feat_ptr": f"*{dtype}", "grad_out_ptr": f"*{dtype}", "grad_rois_ptr": "*fp32"},
         pool),
        (pt._prroi_bwd_feat_kernel, {"grad_out_ptr": f"*{dtype}", "grad_feat_ptr": "*fp32"},
         dict(pool, PH=14, PW=14, BLOCK_PW=16)),
        (pt._nchw_to_rows_kernel, {"src_ptr": f"*{dtype}", "dst_ptr": "*fp32"}, {"BLOCK_HW": 64, "BLOCK_C": 64}),
        (pt._rows_to_nchw_kernel, {"src_ptr": "*fp32", "dst_ptr": f"*{dtype}"}, {"BLOCK_HW": 64, "BLOCK_C": 64}),
    ]  # fmt: skip
    for kernel, types, constexprs in kernels:
        assert "cubin" in compile_for_sm90(kernel, {**tables, **types}, constexprs).asm, kernel.fn.__name__
