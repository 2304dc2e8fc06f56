"""The demo's plumbing end to end on a tiny dataset: data -> train -> eval (single + TTA) -> report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megdet.config import SynthConfig, load_config
from megdet.demo import DEFAULT_CONFIG, ensure_synthetic_dataset, resolve_demo_config, run_demo

REPO = Path(__file__).resolve().parents[1]

# The demo config at toy size: 8 training images of 96 px, 3 iterations, small test views.
TINY = [
    "data.synth.num_train=8",
    "data.synth.num_val=3",
    "data.synth.image_size=96",
    "data.min_size_train=[80]",
    "data.max_size_train=96",
    "data.min_size_test=96",
    "data.max_size_test=96",
    "test.tta.min_sizes=[80,96]",
    "train.max_iters=3",
    "train.log_period=1",
    "solver.warmup_iters=1",
    # An untrained classifier may score below the usual threshold; keep every detection so that
    # masks and keypoints are predicted and evaluated.
    "model.roi.score_thresh=0.0",
]


@pytest.fixture(autouse=True)
def one_thread():
    # Two intra-op threads on a shared two-core machine are slower than one; restore afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_demo_config_loads_and_trains_all_three_tasks() -> None:
    cfg = load_config(REPO / DEFAULT_CONFIG)
    assert cfg.model.mask_on and cfg.model.keypoint_on
    assert cfg.model.norm == "CrossDeviceBN"
    assert cfg.data.synth.num_val >= 200
    default = resolve_demo_config(None)
    assert default.is_file() and default.read_text() == (REPO / DEFAULT_CONFIG).read_text()
    assert resolve_demo_config("other.yaml") == Path("other.yaml")


def test_dataset_is_generated_once_per_setting(tmp_path: Path) -> None:
    small = SynthConfig(num_train=2, num_val=1, image_size=64, seed=3)
    assert ensure_synthetic_dataset(tmp_path / "d", small, workers=1, progress=False)
    assert not ensure_synthetic_dataset(tmp_path / "d", small, workers=1, progress=False)
    stamp = json.loads((tmp_path / "d" / "synth.json").read_text())
    assert stamp["num_train"] == 2 and stamp["image_size"] == 64
    # Another setting regenerates.
    other = SynthConfig(num_train=3, num_val=1, image_size=64, seed=3)
    assert ensure_synthetic_dataset(tmp_path / "d", other, workers=1, progress=False)
    assert len(list((tmp_path / "d" / "train").glob("*.png"))) == 3


def test_run_demo_writes_report_plots_examples_and_evaluations(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    overrides = [*TINY, f"data.root={tmp_path / 'synth'}"]
    result = run_demo(out, REPO / DEFAULT_CONFIG, nproc=1, overrides=overrides, num_examples=2)

    for name in ("eval", "eval_tta"):
        ev = json.loads((out / name / "eval.json").read_text())
        assert set(ev) == {"bbox", "segm", "keypoints"}, name
        for task in ev.values():
            assert 0.0 <= task["stats"]["AP"] <= 1.0 or task["stats"]["AP"] == -1.0
    assert json.loads((out / "eval_tta" / "timing.json").read_text())["tta"] is True
    assert set(result["single"]) == {"bbox", "segm", "keypoints"}

    report = (out / "report.md").read_text()
    for row in ("| single-scale | bbox |", "| single-scale | segm |", "| single-scale | keypoints |",
                "| TTA | bbox |", "| TTA | segm |", "| TTA | keypoints |"):
        assert row in report, row
    for plot in ("loss.png", "lr.png"):
        assert (out / plot).stat().st_size > 0
        assert f"]({plot})" in report
    examples = sorted((out / "examples").glob("*.png"))
    assert len(examples) == 2
    for png in examples:
        assert f"](examples/{png.name})" in report

    times = result["times"]
    assert {"data", "train", "eval", "eval_tta", "examples", "total"} <= set(times)
    assert times["total"] >= times["train"] > 0
    assert result["cpu_times"]["train"] > 0
    assert "time train (s, wall / CPU)" in report
    assert json.loads((out / "demo.json").read_text())["report"] == str(out / "report.md")

    # A second demo in the same folder starts afresh (the trainer refuses a folder with checkpoints)
    # and reuses the dataset.
    stamp = tmp_path / "synth" / "synth.json"
    made = stamp.stat().st_mtime_ns
    run_demo(out, REPO / DEFAULT_CONFIG, nproc=1, overrides=[*overrides, "train.max_iters=1"], num_examples=1)
    assert stamp.stat().st_mtime_ns == made
    assert len(list((out / "examples").glob("*.png"))) == 1
    assert (out / "train" / "model_0000001.pt").is_file()
    assert not (out / "train" / "model_0000003.pt").exists()


def test_a_bad_override_stops_the_demo_before_it_touches_anything(tmp_path: Path) -> None:
    from megdet.config import ConfigError

    (tmp_path / "out" / "eval").mkdir(parents=True)  # a previous demo's output stays
    with pytest.raises(ConfigError, match="model.bn_group_size=2: the world size 3 is not divisible"):
        run_demo(out_dir=tmp_path / "out", nproc=3, overrides=[f"data.root={tmp_path / 'data'}", "model.bn_group_size=2"])
    assert (tmp_path / "out" / "eval").is_dir() and not (tmp_path / "data").exists()
