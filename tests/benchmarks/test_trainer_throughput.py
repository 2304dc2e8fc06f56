"""benchmarks/trainer_throughput.py: `megdet train` on 8 generated images with a tiny model on CPU, its
metrics read back and compared with a made-up step-benchmark JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their helpers as `_common`

import trainer_throughput  # noqa: E402

TINY = [
    "model.backbone=resnet10", "model.fpn_channels=16", "model.roi.box_head_dim=32",
    "model.roi.batch_size_per_image=16", "model.rpn.pre_nms_top_n_train=100", "model.rpn.post_nms_top_n_train=50",
]  # fmt: skip


def _reference(path: Path, images_per_s: float) -> Path:
    rows = [{"impl": i, "precision": p, "images_per_s": images_per_s} for i in ("ours", "torchvision") for p in ("fp32",)]
    config = {"model": "faster", "batch": 1, "height": 64, "width": 96, "rows": rows}
    path.write_text(json.dumps({"configs": [config]}))
    return path


def test_trainer_run_against_a_reference(tmp_path: Path) -> None:
    out = tmp_path / "trainer_throughput.json"
    result = trainer_throughput.main(
        ["--device", "cpu", "--batch", "1", "--size", "64x96", "--iters", "4", "--log-period", "2",
         "--workers", "0", "--num-train", "4", "--image-size", "96", "--work-dir", str(tmp_path / "work"),
         "--reference", str(_reference(tmp_path / "ref.json", 1e-3)), "--out", str(out), "--set", *TINY]
    )  # fmt: skip
    assert result["exit_code"] == 0, result["log_tail"]
    assert json.loads(out.read_text())["ratio_to_step_benchmark"] == result["ratio_to_step_benchmark"]
    assert result["windows"] == 1 and len(result["window_images_per_s"]) == 2  # the first window is warm-up
    assert result["images_per_s"] == result["window_images_per_s"][1]
    assert result["reference_images_per_s"] == 1e-3 and result["meets_goal"] is True
    assert 0 <= result["data_fraction"] < 1
    assert "train.device=cpu" in result["overrides"] and "model.backbone=resnet10" in result["overrides"]


def test_reference_rate_matches_model_batch_size_and_precision(tmp_path: Path) -> None:
    ref = _reference(tmp_path / "ref.json", 12.5)
    assert trainer_throughput.reference_rate(ref, "faster", 1, (64, 96), "fp32") == 12.5
    assert trainer_throughput.reference_rate(ref, "faster", 2, (64, 96), "fp32") is None
    assert trainer_throughput.reference_rate(ref, "mask", 1, (64, 96), "fp32") is None
    assert trainer_throughput.reference_rate(ref, "faster", 1, (64, 96), "bf16") is None


def test_summarise_skips_the_warm_up_window() -> None:
    windows = [{"images_per_s": 1.0, "data_time": 0.5}, {"images_per_s": 4.0, "data_time": 0.1},
               {"images_per_s": 6.0, "data_time": 0.3}]  # fmt: skip
    s = trainer_throughput.summarise(windows, log_period=10, batch=2)
    assert s["images_per_s"] == 5.0 and s["data_time_s"] == pytest.approx(0.2)
    assert s["data_fraction"] == pytest.approx(0.2 / (2 / 5.0))
    assert trainer_throughput.summarise([], 10, 2)["images_per_s"] is None
