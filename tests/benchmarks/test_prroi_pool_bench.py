"""The PrRoIPool benchmark (benchmarks/prroi_pool.py): per-device argument defaults, and the CPU
path end to end on a tiny setting (the CUDA path runs on a GPU machine only)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their helpers as `_common`

import prroi_pool as bench  # noqa: E402


def test_cpu_defaults_unchanged() -> None:
    args = bench.parse_args([])
    assert args.device == torch.device("cpu")
    assert args.sizes == [(800, 1333), (512, 512)]
    assert args.dtypes == ["fp32"] and args.output_sizes == [7, 14]
    assert (args.repeats, args.warmup) == (5, 1)
    assert (bench.parse_args(["--quick"]).repeats, bench.parse_args(["--quick"]).warmup) == (1, 0)


def test_cuda_arguments() -> None:
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.parse_args(["--device", "cuda"])
        return
    args = bench.parse_args(["--device", "cuda"])
    assert args.device.type == "cuda"
    assert args.sizes == [(800, 1333)] and args.dtypes == ["fp32", "bf16"]
    assert (args.repeats, args.warmup) == (20, 3)


def test_bad_arguments() -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "tpu"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--dtypes", "fp8"])


def test_cpu_run_writes_json(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        payload = bench.main(
            [
                "--quick",
                "--threads",
                "1",
                "--sizes",
                "64x96",
                "--rois-per-image",
                "6",
                "--results-dir",
                str(tmp_path),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    written = json.loads((tmp_path / "prroi_pool.json").read_text())
    assert written["device"] == "cpu" and written["threads"] == 1
    assert [r["output_size"] for r in written["results"]] == [7, 14]
    for record in written["results"]:
        assert record["dtype"] == "fp32" and record["image_size"] == [64, 96]
        assert sum(record["rois_per_level_p2_p5"]) == 12
        assert set(record["median_wall_s"]) == {"prroi", "roialign"}
        assert record["ratio_cpu_prroi_over_roialign"] > 0
    assert len(payload["results"]) == 2
