"""The large mini-batch study's pure parts (benchmarks/large_batch_study.py): the run matrix, how
simulated devices map onto processes / accumulation steps / BN groups, the config overrides each run
gets, reading a run's outputs, result aggregation and the plot. No training here."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their helpers as `_common`

import large_batch_study as lbs  # noqa: E402
from _common import format_table  # noqa: E402

from megdet.config import load_config  # noqa: E402
from megdet.engine.lr_policy import resolve_schedule  # noqa: E402

# --------------------------------------------------------------------------------------------------
# Simulated devices
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch, k", [(8, 2), (16, 4), (32, 8), (64, 16)])
def test_layout_of_each_study_batch(batch: int, k: int) -> None:
    layout = lbs.device_layout(batch)
    assert (layout.processes, layout.images_per_device, layout.grad_accum_steps) == (2, 2, k)
    assert layout.processes * layout.images_per_device * layout.grad_accum_steps == batch
    assert layout.simulated_devices == batch // 2  # devices of 2 images each
    assert layout.images_per_micro_step == 4  # one simulated pair of devices per micro-step


def test_bn_group_is_one_micro_step_not_all_simulated_devices() -> None:
    layout = lbs.device_layout(64)
    assert layout.bn_group_images("CrossDeviceBN") == 4  # 2 processes x 2 images, whatever the batch
    assert layout.bn_group_images("BN") == 2  # per device
    assert layout.bn_group_images("FrozenBN") is None  # no batch statistics
    assert layout.bn_group_images("GN") is None
    assert lbs.device_layout(24, processes=3, images_per_device=4).bn_group_images("CrossDeviceBN") == 12


@pytest.mark.parametrize("batch", [0, 2, 6, 10, -8])
def test_batches_that_do_not_fit_the_layout_are_refused(batch: int) -> None:
    with pytest.raises(ValueError, match=f"global batch {batch} is not a positive multiple of 4"):
        lbs.device_layout(batch)


def test_describe_names_every_factor() -> None:
    text = lbs.device_layout(32).describe()
    assert text == "global batch 32 = 2 processes x 2 images x 8 accumulation steps (16 simulated devices)"


def test_simulation_text_states_the_bn_group_caveat() -> None:
    text = lbs.SIMULATION_TEXT
    for fragment in ("2 real processes", "--nproc 2", "data.images_per_device=2", "train.grad_accum_steps=k",
                     "8 -> k=2, 16 -> 4, 32 -> 8, 64 -> 16", "4 images of a micro-step",
                     "not all simulated devices as in MegDet", "per-device BN normalises over 2 images"):
        assert fragment in text
    assert lbs.__doc__ is not None and "NOT all simulated devices" in lbs.__doc__


# --------------------------------------------------------------------------------------------------
# Run matrix and overrides
# --------------------------------------------------------------------------------------------------


def test_default_matrix_is_the_main_series_then_three_ablations_at_the_largest_batch() -> None:
    specs = lbs.build_run_matrix(lbs.DEFAULT_BATCHES)
    assert [s.name for s in specs] == [
        "batch8", "batch16", "batch32", "batch64",
        "batch64_no_warmup", "batch64_per_device_bn", "batch64_frozen_bn",
    ]
    main, ablations = specs[:4], specs[4:]
    assert all(s.norm == "CrossDeviceBN" and s.warmup and not s.ablation for s in main)
    assert all(s.global_batch == 64 and s.layout.grad_accum_steps == 16 and s.ablation for s in ablations)
    assert [(s.norm, s.warmup) for s in ablations] == [
        ("CrossDeviceBN", False), ("BN", True), ("FrozenBN", True)
    ]


def test_matrix_sorts_deduplicates_and_can_skip_ablations() -> None:
    specs = lbs.build_run_matrix([32, 8, 32], ablations=False)
    assert [s.global_batch for s in specs] == [8, 32]
    with_ablations = lbs.build_run_matrix([16, 8])
    assert {s.global_batch for s in with_ablations if s.ablation} == {16}
    with pytest.raises(ValueError, match="no batch sizes"):
        lbs.build_run_matrix([])


def test_parse_batches() -> None:
    assert lbs.parse_batches("64, 8,16,8") == [8, 16, 64]
    with pytest.raises(ValueError, match="--batches: expected a comma list of integers"):
        lbs.parse_batches("8,x")
    with pytest.raises(ValueError, match="no batch sizes"):
        lbs.parse_batches(" , ")


def test_schedule_overrides_keep_the_decays_at_fixed_fractions() -> None:
    assert lbs.schedule_overrides(12) == ["solver.epochs=12", "solver.decay_epochs=[8,11]"]
    assert lbs.schedule_overrides(5) == ["solver.epochs=5", "solver.decay_epochs=[3.33333,4.58333]"]
    with pytest.raises(ValueError, match="--epochs"):
        lbs.schedule_overrides(0)


@pytest.mark.parametrize("name", ["batch8", "batch64", "batch64_no_warmup", "batch64_per_device_bn",
                                  "batch64_frozen_bn"])
def test_each_run_resolves_to_its_batch_lr_norm_and_warmup(name: str, tmp_path: Path) -> None:
    spec = {s.name: s for s in lbs.build_run_matrix(lbs.DEFAULT_BATCHES)}[name]
    overrides = [*lbs.data_overrides(tmp_path / "data", 160), *lbs.schedule_overrides(5), *spec.overrides()]
    cfg = load_config(lbs.DEFAULT_CONFIG, overrides)
    assert cfg.model.norm == spec.norm and cfg.model.bn_group_size == 0
    assert cfg.data.root == str(tmp_path / "data")
    assert (cfg.data.min_size_train, cfg.data.max_size_train, cfg.data.min_size_test) == ([160], 160, 160)
    # The engine's own rule, for the 2 real processes: global batch, linear scaling, warmup.
    info = resolve_schedule(cfg.solver, world_size=2, images_per_device=cfg.data.images_per_device,
                            grad_accum_steps=cfg.train.grad_accum_steps, num_images=400)
    assert info.global_batch == spec.global_batch
    assert info.lr == pytest.approx(cfg.solver.base_lr * spec.global_batch / cfg.solver.reference_batch)
    assert info.total_iters == lbs.planned_iterations(5, 400, spec.global_batch)
    assert info.epochs == pytest.approx(5)  # the same epochs at every batch
    assert (info.warmup_iters > 0) == spec.warmup


def test_planned_iterations_and_estimate() -> None:
    assert lbs.planned_iterations(5, 400, 8) == 250
    assert lbs.planned_iterations(5, 400, 64) == 35  # ceil(400 / 64) = 7 per epoch
    specs = lbs.build_run_matrix([8, 64], ablations=False)
    images = 250 * 8 + 35 * 64
    expected = images * lbs.CPU_S_PER_TRAIN_IMAGE + 2 * lbs.CPU_S_PER_RUN
    assert lbs.estimate_cpu_seconds(specs, 5, 400) == pytest.approx(expected)


def test_step_caveats_flag_batches_with_too_few_steps() -> None:
    specs = lbs.build_run_matrix(lbs.DEFAULT_BATCHES)  # ablations share batch 64: one line for it
    lines = lbs.step_caveats(specs, 5, 400)
    assert [line.split(" gets")[0] for line in lines] == ["caveat: batch 32", "caveat: batch 64"]  # 65, 35
    assert "only 35 optimizer steps" in lines[1] and "(--epochs 15 gives 100)" in lines[1]
    assert lbs.planned_iterations(15, 400, 64) >= lbs.MIN_USEFUL_STEPS  # the advice is enough
    assert lbs.step_caveats(specs, 15, 400) == []
    assert lbs.step_caveats(specs, 5, 400, min_steps=10) == []


# --------------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------------

NON_FINITE_LOG = (
    "train: 40%|...\n"
    "megdet: error: non-finite loss at iteration 7: loss_classifier=nan, total_loss=nan; lr=0.08;"
    " stopped without saving (no checkpoint was written); lower solver.base_lr\n"
    "megdet: worker 0 of 2 failed with exit code 1\n"
)


def test_parse_divergence() -> None:
    assert lbs.parse_divergence(NON_FINITE_LOG) == 7
    assert lbs.parse_divergence("megdet: error: data.root: not found") is None


def test_parse_schedule_log_reads_the_trainers_start_up_lines() -> None:
    cfg = load_config(lbs.DEFAULT_CONFIG, lbs.schedule_overrides(5))
    info = resolve_schedule(cfg.solver, world_size=2, images_per_device=2, grad_accum_steps=16,
                            num_images=400)
    text = "megdet train: cpu x 2\n" + "\n".join(f"  {line}" for line in info.summary_lines())
    parsed = lbs.parse_schedule_log(text)
    assert parsed["total_iters"] == info.total_iters == 35
    assert parsed["warmup_iters"] == info.warmup_iters
    assert parsed["lr"] == pytest.approx(info.lr)
    assert parsed["epochs"] == pytest.approx(5)
    assert lbs.parse_schedule_log("nothing here") == {}


def _stats(ap: float) -> dict:
    return {"AP": ap, "AP50": min(1.0, ap * 2), "APl": -1.0}


def test_ap_from_eval_reads_eval_json_and_metrics_entries() -> None:
    eval_json = {"bbox": {"stats": _stats(0.25), "per_category_ap": {}},
                 "segm": {"stats": _stats(0.125), "per_category_ap": {}},
                 "keypoints": {"stats": _stats(-1.0), "per_category_ap": {}}}
    assert lbs.ap_from_eval(eval_json) == {"bbox": 25.0, "segm": 12.5}  # -1: no ground truth
    assert lbs.ap_from_eval({"keypoints": _stats(0.5)}) == {"keypoints": 50.0}  # metrics.jsonl form
    assert lbs.ap_from_eval({}) == {}


def _fake_run(run_dir: Path, *, finished: bool, iterations: int = 10, eval_json: bool = True) -> None:
    run_dir.mkdir(parents=True)
    lines = [{"iter": i, "lr": 0.01, "total_loss": 3.0 - 0.1 * i} for i in range(5, iterations + 1, 5)]
    if finished:
        lines.append({"iter": iterations, "eval": {"bbox": _stats(0.3)}})
        summary = {"iteration": iterations, "total_iters": iterations, "lr": 0.01, "warmup_iters": 2,
                   "epochs": 1.0, "global_batch": 8, "checkpoint": "x", "policy": "step"}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        if eval_json:
            ev = run_dir / "eval" / f"iter_{iterations:07d}"
            ev.mkdir(parents=True)
            (ev / "eval.json").write_text(json.dumps({"bbox": {"stats": _stats(0.4)},
                                                      "segm": {"stats": _stats(0.2)}}))
    text = "\n".join(json.dumps(line) for line in lines) + '\n{"iter": 1'  # a line cut short
    (run_dir / "metrics.jsonl").write_text(text)


def test_read_run_outputs_of_a_finished_run(tmp_path: Path) -> None:
    _fake_run(tmp_path / "r", finished=True)
    out = lbs.read_run_outputs(tmp_path / "r")
    assert out["iterations"] == 10
    assert out["ap"] == {"bbox": 40.0, "segm": 20.0}  # eval.json wins over the metrics line
    assert out["eval_file"].endswith("eval/iter_0000010/eval.json")
    expected = {"total_iters": 10, "lr": 0.01, "warmup_iters": 2, "epochs": 1.0, "global_batch": 8}
    assert out["schedule"] == expected
    assert out["final_loss"] == pytest.approx(2.0)


def test_read_run_outputs_falls_back_to_metrics_and_handles_stopped_runs(tmp_path: Path) -> None:
    _fake_run(tmp_path / "m", finished=True, eval_json=False)
    out = lbs.read_run_outputs(tmp_path / "m")
    assert out["ap"] == {"bbox": 30.0} and out["eval_file"].endswith("metrics.jsonl")
    _fake_run(tmp_path / "d", finished=False, iterations=15)
    out = lbs.read_run_outputs(tmp_path / "d")
    assert out["iterations"] == 15 and out["ap"] == {} and out["schedule"] == {} and out["eval_file"] is None
    empty = lbs.read_run_outputs(tmp_path / "missing")
    assert empty["iterations"] == 0 and empty["final_loss"] is None


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


def _result(name: str, batch: int, ap: dict, *, norm: str = "CrossDeviceBN", warmup: bool = True,
            ablation: str = "", log: str = "", rc: int = 0) -> lbs.RunResult:
    spec = lbs.RunSpec(name, lbs.device_layout(batch), norm, warmup, ablation)
    outputs = {"iterations": 20, "ap": ap, "schedule": {"total_iters": 20, "lr": 0.02 * batch / 16,
                                                        "warmup_iters": 5 if warmup else 0}}
    return lbs.make_result(spec, outputs, exit_code=rc, log_text=log, wall_s=60.0, cpu_s=100.0)


def test_make_result_classifies_ok_diverged_and_failed() -> None:
    ok = _result("batch8", 8, {"bbox": 20.0})
    assert (ok.status, ok.status_text(), ok.iterations, ok.ap) == ("ok", "ok", 20, {"bbox": 20.0})
    assert (ok.grad_accum_steps, ok.simulated_devices, ok.bn_group_images) == (2, 4, 4)

    log = "  iterations: 35 total, 7 per epoch (400 images, 5 epochs)\n" + NON_FINITE_LOG
    div = lbs.make_result(lbs.RunSpec("b64", lbs.device_layout(64), "FrozenBN", True, "frozen BN"),
                          {"iterations": 5, "ap": {"bbox": 1.0}, "schedule": {}},
                          exit_code=1, log_text=log, wall_s=1.0, cpu_s=2.0)
    assert (div.status, div.status_text(), div.diverged_at) == ("diverged", "diverged at iteration 7", 7)
    assert div.iterations == 6 and div.ap == {} and div.total_iters == 35  # total from the log
    assert div.bn_group_images is None

    failed = _result("x", 8, {}, rc=2, log="Traceback\nmegdet: error: data.root: datasets/x not found\n")
    assert failed.status_text() == "failed (exit 2)"
    assert failed.error == "megdet: error: data.root: datasets/x not found"
    # A non-finite message in a successful run's log (impossible, but) does not make it diverged.
    assert _result("y", 8, {"bbox": 1.0}, log=NON_FINITE_LOG).status == "ok"


def _study() -> list[lbs.RunResult]:
    return [
        _result("batch8", 8, {"bbox": 20.0, "segm": 15.0}),
        _result("batch16", 16, {"bbox": 22.0, "segm": 16.0}),
        _result("batch64", 64, {"bbox": 10.0, "segm": 8.0}),
        _result("batch64_no_warmup", 64, {"bbox": 5.0, "segm": 4.0}, warmup=False, ablation="no warmup"),
        _result("batch64_per_device_bn", 64, {"bbox": 9.0}, norm="BN", ablation="per-device BN"),
        _result("batch64_frozen_bn", 64, {}, norm="FrozenBN", ablation="frozen BN", log=NON_FINITE_LOG, rc=1),
    ]


def test_reference_and_relative_ap() -> None:
    results = _study()
    ref = lbs.reference_run(results)
    assert ref is not None and ref.name == "batch8"
    assert lbs.relative_ap(results[1], ref) == pytest.approx(1.1)
    assert lbs.relative_ap(results[3], ref, "segm") == pytest.approx(4 / 15)
    assert lbs.relative_ap(results[5], ref) is None  # diverged: no AP
    assert lbs.relative_ap(results[1], _result("z", 8, {"bbox": 0.0})) is None  # reference at 0
    assert lbs.reference_run(results[3:]) is None  # ablations only


def test_table_rows() -> None:
    headers, rows = lbs.table_rows(_study())
    assert headers[9:12] == ["box AP", "mask AP", "box AP / batch 8"]
    by_name = {row[0]: dict(zip(headers, row)) for row in rows}
    assert by_name["batch16"]["box AP / batch 8"] == pytest.approx(1.1)
    assert by_name["batch64"]["k"] == 16 and by_name["batch64"]["sim. devices"] == 32
    assert by_name["batch64"]["BN images"] == 4 and by_name["batch64_per_device_bn"]["BN images"] == 2
    assert by_name["batch64_frozen_bn"]["BN images"] == "none"
    assert by_name["batch64_frozen_bn"]["status"] == "diverged at iteration 7"
    assert by_name["batch64_frozen_bn"]["box AP"] is None
    assert by_name["batch64_no_warmup"]["warmup it"] == 0
    assert by_name["batch64_per_device_bn"]["mask AP"] is None
    assert by_name["batch8"]["iters"] == "20/20"
    text = format_table(headers, rows)  # the shared printer accepts every cell
    assert "diverged at iteration 7" in text and "none" in text


def test_plot_study_writes_a_png(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. matplotlib's "no artists with labels" would fail here
        path = lbs.plot_study(_study(), tmp_path / "sub" / "study.png", title="t")
        only_failures = lbs.plot_study([_result("b8", 8, {}, log=NON_FINITE_LOG, rc=1)], tmp_path / "f.png")
    for p in (path, only_failures):
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# --------------------------------------------------------------------------------------------------
# Data set and command line (no training)
# --------------------------------------------------------------------------------------------------


def test_ensure_dataset_generates_once_per_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import megdet.data.synthetic as synthetic

    calls = []
    monkeypatch.setattr(synthetic, "generate_synthetic_coco", lambda root, **kw: calls.append(kw))
    assert lbs.ensure_dataset(tmp_path, 40, 10, 160) is True
    assert lbs.ensure_dataset(tmp_path, 40, 10, 160) is False  # same stamp: reused
    assert lbs.ensure_dataset(tmp_path, 40, 10, 128) is True  # another size: regenerated
    assert [c["image_size"] for c in calls] == [160, 128] and calls[0]["num_train"] == 40


def test_train_command(tmp_path: Path) -> None:
    spec = lbs.build_run_matrix([32])[0]
    cmd = lbs.train_command(spec, config=Path("configs/study.yaml"), run_dir=tmp_path / "r", extra=["a=1"])
    assert cmd[1:8] == ["-m", "megdet", "train", "--config", "configs/study.yaml", "--nproc", "2"]
    assert cmd[8:10] == ["--out", str(tmp_path / "r")]
    assert cmd[10] == "a=1" and "train.grad_accum_steps=8" in cmd and "model.norm=CrossDeviceBN" in cmd


@pytest.mark.parametrize("argv, message", [
    (["--batches", "8,6"], "global batch 6 is not a positive multiple of 4"),
    (["--epochs", "0"], "--epochs: expected > 0"),
    (["--image-size", "32"], "--image-size: expected >= 64"),
    (["--config", "nowhere.yaml"], "nowhere.yaml not found"),
])
def test_bad_arguments_fail_before_any_work(argv: list, message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        lbs.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
