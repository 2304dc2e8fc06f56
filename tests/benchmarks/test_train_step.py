"""The training-step benchmark (benchmarks/train_step.py) end to end on CPU at a tiny setting (64x96
images, few proposals and RoIs), both models and precisions with a profile; and its trace summary on a
made-up CUDA trace (the CUDA path itself runs on a GPU machine: scripts/gpu_bench.sh)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their helpers as `_common`

import train_step  # noqa: E402

SMALL = {"rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 100, "box_batch_size_per_image": 32}


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("train_step") / "train_step.json"
    saved, threads = dict(train_step.SETTINGS), torch.get_num_threads()
    train_step.SETTINGS.update(SMALL)
    try:
        returned = train_step.main(
            ["--quick", "--size", "64x96", "--batch", "1", "--model", "faster,mask", "--iters", "1",
             "--bf16-steps", "1", "--profile", "--profile-steps", "1", "--threads", "1", "--out", str(out)]
        )  # fmt: skip
    finally:
        train_step.SETTINGS.clear()
        train_step.SETTINGS.update(saved)
        torch.set_num_threads(threads)
    written = json.loads(out.read_text())
    assert written["configs"] == json.loads(json.dumps(returned["configs"]))
    return written


def test_matrix_rows_and_ratios(result: dict) -> None:
    assert [(c["model"], c["batch"], c["height"], c["width"]) for c in result["configs"]] == [
        ("faster", 1, 64, 96),
        ("mask", 1, 64, 96),
    ]
    assert result["settings"]["box_batch_size_per_image"] == 32 and result["device"]["device"] == "cpu"
    for c in result["configs"]:
        rows = {(r["impl"], r["precision"]): r for r in c["rows"]}
        assert set(rows) == {(i, p) for i in ("ours", "torchvision") for p in ("fp32", "bf16")}
        assert rows[("torchvision", "fp32")]["ratio_vs_torchvision_fp32"] == 1.0
        for (impl, prec), r in rows.items():
            assert r["steps"] == 1 and r["median_s"] > 0 and r["images_per_s"] == pytest.approx(1 / r["median_s"])
            assert r["ratio_vs_torchvision_fp32"] == pytest.approx(r["median_s"] / rows[("torchvision", "fp32")]["median_s"])
            assert r["ratio_vs_torchvision_same_precision"] == pytest.approx(
                r["median_s"] / rows[("torchvision", prec)]["median_s"]
            )
            assert r["gflop_per_step"] == rows[(impl, "fp32")]["gflop_per_step"] > 0
            assert r["peak_mb"] is None  # CUDA only
            assert r["profile"]["steps"] == 1 and r["profile"]["kernels_per_step"] is None
        # Same weights, same settings: the same work to within the RoIs sampled.
        ours, tv = rows[("ours", "fp32")]["gflop_per_step"], rows[("torchvision", "fp32")]["gflop_per_step"]
        assert 0.8 < ours / tv < 1.25
    assert result["ratio_fp32"] == result["configs"][0]["rows"][0]["ratio_vs_torchvision_fp32"]
    assert result["peak_gflops"]["fp32_gemm_gflops"] > 0


def test_mask_weights_are_shared_by_name() -> None:
    from megdet.modeling.convert import convert_state

    torch.manual_seed(0)
    nets = train_step.build_pair("mask", 64, 96, torch.device("cpu"))
    ours = nets["ours"].state_dict()
    theirs = convert_state(nets["torchvision"].state_dict(), "torchvision").state  # in megdet's names
    assert set(theirs) == set(ours) and any("mask_head" in k for k in ours)
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())


def _event(name: str, start: float, end: float, cuda: bool = True, annotation: bool = False) -> SimpleNamespace:
    device = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end),
                           is_user_annotation=annotation)  # fmt: skip


def test_trace_summary_of_a_cuda_trace() -> None:
    events = [
        _event("conv_kernel", 0, 100),
        _event("relu_kernel", 50, 150),  # overlaps the conv: counted once in busy time
        _event("Optimizer.step#SGD.step", 0, 1000, annotation=True),
        _event("Optimizer.zero_grad#SGD.zero_grad", 0, 1000),  # an annotation without the flag (older torch)
        _event("Memcpy DtoH (Device -> Pinned)", 160, 170),
        _event("Memset (Device)", 170, 171),
        _event("gemm_kernel", 400, 500),
        _event("cudaLaunchKernel", 0, 1, cuda=False),
        _event("cudaStreamSynchronize", 160, 180, cuda=False),
        _event("cudaDeviceSynchronize", 500, 510, cuda=False),
        _event("cudaDeviceSynchronize", 990, 1000, cuda=False),
    ]
    s = train_step.trace_summary(events, steps=2, wall_s=0.001)
    assert s["kernels_per_step"] == 1.5 and s["dtoh_copies_per_step"] == 0.5
    assert s["kernel_busy_s_per_step"] == pytest.approx(250e-6 / 2)
    assert s["kernel_sum_s_per_step"] == pytest.approx(300e-6 / 2)
    assert s["kernel_busy_fraction_of_profiled_step"] == pytest.approx(0.25)
    # The two closing cudaDeviceSynchronize calls are the benchmark's own.
    assert s["host_syncs_per_step"] == 0.5 and s["host_sync_calls"] == {"cudaStreamSynchronize": 1}
    assert s["top_kernels_ms_per_step"][0] == ("conv_kernel", pytest.approx(0.05))


def test_parse_size() -> None:
    assert train_step.parse_size("800x1216") == (800, 1216) and train_step.parse_size("512") == (512, 512)


def test_a_failing_configuration_is_recorded_and_the_rest_still_runs(monkeypatch, tmp_path: Path) -> None:
    def row(impl: str, seconds: float) -> dict:
        return {"impl": impl, "precision": "fp32", "steps": 1, "times_s": [seconds], "gflop_per_step": 2.0,
                "peak_mb": None, "step_mb": None}  # fmt: skip

    def fake_config(model, batch, height, width, device, args, log) -> dict:
        if batch == 2:
            raise RuntimeError("CUDA out of memory")
        return {"model": model, "batch": batch, "height": height, "width": width,
                "rows": [row("ours", 0.5), row("torchvision", 1.0)]}  # fmt: skip

    monkeypatch.setattr(train_step, "measure_peaks", lambda device, quick: {"fp32_gemm_gflops": 8.0})
    monkeypatch.setattr(train_step, "bench_config", fake_config)
    out = tmp_path / "t.json"
    result = train_step.main(["--batch", "2,4", "--precision", "fp32", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text())["complete"] is True
    failed, ok = result["configs"]
    assert failed["error"] == "RuntimeError: CUDA out of memory" and "rows" not in failed
    assert result["ratio_fp32"] == 0.5 and ok["rows"][0]["images_per_s"] == 8.0
    assert ok["rows"][0]["fraction_of_peak"] == pytest.approx(4.0 / 8.0)
