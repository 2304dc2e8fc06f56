"""The large mini-batch study (benchmarks/large_batch_study.py): the run matrix, the overrides that put
a global batch on CPU processes or one GPU, the ablations' overrides as the trainer resolves them,
reading a run's outputs, the goals check, the table and the plot; then one tiny end-to-end run."""

from __future__ import annotations

import json
import os
import sys
import time
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
# Run matrix and overrides
# --------------------------------------------------------------------------------------------------


def test_default_matrix_is_the_main_series_then_every_ablation_at_the_largest_batch() -> None:
    specs = lbs.build_run_matrix(lbs.DEFAULT_BATCHES)
    assert [s.name for s in specs] == [
        "batch8", "batch16", "batch32", "batch64", "batch128",
        "batch128_no_warmup", "batch128_no_lr_scaling", "batch128_linear_lr", "batch128_bn_groups_2",
        "batch128_frozen_bn", "batch128_lamb", "batch128_scale_betas",
    ]  # fmt: skip
    assert all(not s.ablation and not s.overrides for s in specs[:5])
    assert all(s.global_batch == 128 and s.ablation and s.label for s in specs[5:])
    # Launch order = matrix order: most iterations (smallest batch) first.
    assert [s.global_batch for s in specs] == sorted(s.global_batch for s in specs)


def test_ablation_overrides() -> None:
    by = {s.ablation: s.overrides for s in lbs.build_run_matrix([8, 64], head_norm="CrossDeviceBN")[2:]}
    assert by == {
        "no_warmup": ("solver.warmup=false",),
        "no_lr_scaling": ("solver.lr_scaling=none",),
        "linear_lr": ("solver.lr_scaling=linear",),
        "bn_groups_2": ("model.bn_group_images=2",),
        "frozen_bn": ("model.norm=FrozenBN", "model.head_norm=CrossDeviceBN"),
        "lamb": ("solver.optimizer=lamb",),
        "scale_betas": ("solver.scale_betas=true",),
    }
    frozen = lbs.build_run_matrix([8], ["frozen_bn"], head_norm="GN")[1]
    assert frozen.overrides == ("model.norm=FrozenBN", "model.head_norm=GN")


def test_matrix_sorts_deduplicates_and_chooses_ablations() -> None:
    assert [s.name for s in lbs.build_run_matrix([32, 8, 32], [])] == ["batch8", "batch32"]
    specs = lbs.build_run_matrix([16, 8], ["lamb", "no_warmup"])
    assert [s.name for s in specs] == ["batch8", "batch16", "batch16_no_warmup", "batch16_lamb"]
    with pytest.raises(ValueError, match="no batch sizes"):
        lbs.build_run_matrix([])


def test_parse_batches_and_ablations() -> None:
    assert lbs.parse_batches("64, 8,16,8") == [8, 16, 64]
    with pytest.raises(ValueError, match="--batches: expected a comma list of integers"):
        lbs.parse_batches("8,x")
    with pytest.raises(ValueError, match="no batch sizes"):
        lbs.parse_batches(" , ")
    with pytest.raises(ValueError, match="positive"):
        lbs.parse_batches("0,8")
    assert lbs.parse_ablations("lamb, no_warmup") == ["no_warmup", "lamb"]  # the study's order
    assert lbs.parse_ablations("") == []
    with pytest.raises(ValueError, match="unknown bogus; choose from no_warmup, "):
        lbs.parse_ablations("lamb,bogus")


@pytest.mark.parametrize("device, batch, expected", [
    ("cpu", 8, ["data.images_per_device=4", "train.device=cpu"]),
    ("cpu", 64, ["data.images_per_device=32", "train.device=cpu"]),
    ("cuda", 64, ["data.images_per_device=64", "train.device=cuda", "data.num_workers=2"]),
    ("cuda", 8, ["data.images_per_device=8", "train.device=cuda", "data.num_workers=2"]),
])  # fmt: skip
def test_device_overrides(device: str, batch: int, expected: list[str]) -> None:
    assert lbs.device_overrides(batch, device) == expected


def test_device_layout() -> None:
    assert lbs.device_layout(64, "cpu") == (2, 32)
    assert lbs.device_layout(64, "cpu", processes=4) == (4, 16)
    assert lbs.device_layout(64, "cuda") == (1, 64)
    with pytest.raises(ValueError, match="global batch 6 is not a positive multiple of 4 processes"):
        lbs.device_layout(6, "cpu", processes=4)
    with pytest.raises(ValueError, match="--device"):
        lbs.device_layout(8, "tpu")


def test_train_command_and_environment(tmp_path: Path) -> None:
    spec = lbs.build_run_matrix([64], ["bn_groups_2"])[1]
    common = ["data.root=/d", "train.seed=0"]
    cpu = lbs.train_command(spec, device="cpu", processes=2, config=Path("c.yaml"), run_dir=tmp_path, common=common)
    assert cpu[1:] == ["-m", "megdet", "train", "--config", "c.yaml", "--nproc", "2", "--out", str(tmp_path),
                       *common, "data.images_per_device=32", "train.device=cpu", "model.bn_group_images=2"]
    gpu = lbs.train_command(spec, device="cuda", processes=2, config=Path("c.yaml"), run_dir=tmp_path, common=common)
    assert gpu[6:8] == ["--nproc", "1"] and "data.images_per_device=64" in gpu and "train.device=cuda" in gpu
    base = {"OMP_NUM_THREADS": "1", "X": "y"}
    grace = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(lbs.STOP_GRACE_S)}
    assert lbs.run_env("cuda", base) == {"OMP_NUM_THREADS": "2", "X": "y", **grace}
    assert lbs.run_env("cpu", base) == {**base, **grace}  # the launcher gives each process its share of the cores


# --------------------------------------------------------------------------------------------------
# Every run as the trainer resolves it
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def schedules() -> dict:
    specs = lbs.build_run_matrix(lbs.DEFAULT_BATCHES)
    return {dev: lbs.resolve_runs(lbs.DEFAULT_CONFIG, specs, ["data.root=/nowhere"], dev, 2, 1000)
            for dev in ("cpu", "cuda")}  # fmt: skip


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_main_series_changes_only_the_batch(schedules: dict, device: str) -> None:
    base = load_config(lbs.DEFAULT_CONFIG)
    for batch in lbs.DEFAULT_BATCHES:
        info = schedules[device][f"batch{batch}"]
        assert info.global_batch == batch
        assert (info.world_size, info.images_per_device) == ((2, batch // 2) if device == "cpu" else (1, batch))
        assert info.grad_accum_steps == 1
        assert info.epochs == pytest.approx(base.solver.epochs)  # the same epochs at every batch
        assert info.total_iters == base.solver.epochs * -(-1000 // batch)
        # AdamW under lr_scaling=auto: the square root of the batch ratio (engine/lr_policy.py).
        assert info.lr == pytest.approx(base.solver.base_lr * (batch / base.solver.reference_batch) ** 0.5)
        assert info.warmup_iters > 0
    assert schedules[device]["batch8"].total_iters == 2000  # the demo's schedule


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_ablations_resolve_to_their_change(schedules: dict, device: str) -> None:
    s, main = schedules[device], schedules[device]["batch128"]
    base = load_config(lbs.DEFAULT_CONFIG)
    assert s["batch128_no_warmup"].warmup_iters == 0 and s["batch128_no_warmup"].lr == main.lr
    assert s["batch128_no_lr_scaling"].lr == pytest.approx(base.solver.base_lr)
    assert s["batch128_linear_lr"].lr == pytest.approx(base.solver.base_lr * 128 / 8)
    assert s["batch128_lamb"].optimizer == "lamb" and s["batch128_lamb"].lr == pytest.approx(main.lr)
    assert s["batch128_scale_betas"].betas != main.betas == [0.9, 0.999]
    for name in ("bn_groups_2", "frozen_bn", "scale_betas", "lamb"):
        assert s[f"batch128_{name}"].total_iters == main.total_iters


def test_bn_ablations_configure_the_model() -> None:
    specs = {s.ablation: s for s in lbs.build_run_matrix([128], head_norm="CrossDeviceBN")}
    cfg = load_config(lbs.DEFAULT_CONFIG, [*lbs.device_overrides(128, "cpu"), *specs["bn_groups_2"].overrides])
    assert cfg.model.bn_group_images == 2 and cfg.model.norm == "CrossDeviceBN"
    cfg = load_config(lbs.DEFAULT_CONFIG, list(specs["frozen_bn"].overrides))
    # Only the backbone loses its normalisation: the FPN and heads keep the main series' norm.
    assert (cfg.model.norm, cfg.model.head_norm) == ("FrozenBN", "CrossDeviceBN")
    assert lbs.main_head_norm(load_config(lbs.DEFAULT_CONFIG)) == "CrossDeviceBN"


def test_resolve_runs_names_a_run_that_cannot_work() -> None:
    specs = lbs.build_run_matrix([6], ["bn_groups_2"])  # 3 images per process: groups of 2 do not fit
    with pytest.raises(ValueError, match=r"^batch6_bn_groups_2: model.bn_group_images=2 does not divide"):
        lbs.resolve_runs(lbs.DEFAULT_CONFIG, specs, [], "cpu", 2, 1000)


def test_step_caveats(schedules: dict) -> None:
    assert lbs.step_caveats(schedules["cpu"]) == []  # 128 steps at batch 128
    lines = lbs.step_caveats(schedules["cpu"], min_steps=300)
    assert [line.split(" gets")[0] for line in lines] == ["caveat: batch 64", "caveat: batch 128"]
    assert "only 128 optimizer steps (16 epoch(s))" in lines[1]  # the ablations share it: one line


def test_quick_overrides(tmp_path: Path) -> None:
    cfg = load_config(lbs.DEFAULT_CONFIG, lbs.quick_overrides(tmp_path))
    assert cfg.data.root == str(tmp_path)
    assert (cfg.data.synth.num_train, cfg.data.synth.num_val, cfg.data.synth.image_size) == (32, 8, 128)
    assert (cfg.data.min_size_train, cfg.data.max_size_train, cfg.data.max_size_test) == ([128], 128, 128)


# --------------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------------

NON_FINITE_LOG = (
    "train: 40%|...\n"
    "megdet: error: non-finite loss at iteration 7: loss_classifier=nan, total_loss=nan; lr=0.08;"
    " stopped without saving (no checkpoint was written); lower solver.base_lr\n"
    "megdet: worker 0 of 2 failed with exit code 1\n"
)


def test_parse_divergence_and_last_error_line() -> None:
    assert lbs.parse_divergence(NON_FINITE_LOG) == 7
    assert lbs.parse_divergence("megdet: error: data.root: not found") is None
    log = "a\n[rank1]: TypeError: bad\rtrain: 5%\nE1204 failed (exitcode: 1)\nmegdet: worker 1 of 2 failed\n"
    assert lbs.last_error_line(log) == "[rank1]: TypeError: bad"
    assert lbs.last_error_line("one\ntwo\n\n") == "two"  # no error line: the last line
    assert lbs.last_error_line("") == ""


@pytest.mark.parametrize("scaling", ["auto", "linear", "none"])
def test_parse_schedule_log_reads_the_trainers_start_up_lines(scaling: str) -> None:
    cfg = load_config(lbs.DEFAULT_CONFIG, [f"solver.lr_scaling={scaling}"])
    info = resolve_schedule(cfg.solver, world_size=2, images_per_device=32, grad_accum_steps=1, num_images=1000)
    text = "megdet train: cpu x 2\n" + "\n".join(f"  {line}" for line in info.summary_lines())
    parsed = lbs.parse_schedule_log(text)
    assert parsed["total_iters"] == info.total_iters == 256
    assert parsed["warmup_iters"] == info.warmup_iters
    assert parsed["lr"] == pytest.approx(info.lr, rel=1e-5)
    assert parsed["epochs"] == pytest.approx(16)
    assert parsed["global_batch"] == 64
    assert lbs.parse_schedule_log("nothing here") == {}


def _stats(ap: float) -> dict:
    return {"AP": ap, "AP50": min(1.0, ap * 2), "APl": -1.0}


def test_ap_from_eval_reads_eval_json_and_metrics_entries() -> None:
    eval_json = {"bbox": {"stats": _stats(0.25), "per_category_ap": {}},
                 "segm": {"stats": _stats(0.125), "per_category_ap": {}},
                 "keypoints": {"stats": _stats(-1.0), "per_category_ap": {}}}  # fmt: skip
    assert lbs.ap_from_eval(eval_json) == {"bbox": 25.0, "segm": 12.5}  # -1: no ground truth
    assert lbs.ap_from_eval({"keypoints": _stats(0.5)}) == {"keypoints": 50.0}  # metrics.jsonl form
    assert lbs.ap_from_eval({}) == {}


def _fake_run(run_dir: Path, *, finished: bool, iterations: int = 10, eval_json: bool = True) -> None:
    run_dir.mkdir(parents=True)
    lines = [{"iter": i, "lr": 0.01, "total_loss": 3.0 - 0.1 * i, "time": 2.0 * i}
             for i in range(5, iterations + 1, 5)]  # fmt: skip
    if finished:
        lines.append({"iter": iterations, "eval": {"bbox": _stats(0.3)}})
        summary = {"iteration": iterations, "total_iters": iterations, "lr": 0.01, "warmup_iters": 2,
                   "epochs": 1.0, "global_batch": 8, "lr_scaling": "sqrt", "checkpoint": "x", "policy": "cosine"}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        if eval_json:
            ev = run_dir / "eval" / f"iter_{iterations:07d}"
            ev.mkdir(parents=True)
            (ev / "eval.json").write_text(json.dumps({"bbox": {"stats": _stats(0.4)},
                                                      "segm": {"stats": _stats(0.2)}}))  # fmt: skip
    text = "\n".join(json.dumps(line) for line in lines) + '\n{"iter": 1'  # a line cut short
    (run_dir / "metrics.jsonl").write_text(text)


def test_read_run_outputs_of_a_finished_run(tmp_path: Path) -> None:
    _fake_run(tmp_path / "r", finished=True)
    out = lbs.read_run_outputs(tmp_path / "r")
    assert out["iterations"] == 10
    assert out["ap"] == {"bbox": 40.0, "segm": 20.0}  # eval.json wins over the metrics line
    assert out["eval_file"].endswith("eval/iter_0000010/eval.json")
    assert out["schedule"] == {"total_iters": 10, "lr": 0.01, "warmup_iters": 2, "epochs": 1.0,
                               "global_batch": 8, "lr_scaling": "sqrt"}  # fmt: skip
    assert out["final_loss"] == pytest.approx(2.0)
    assert (out["train_s"], out["logged_iterations"]) == (20.0, 10)  # the trainer's clock at the last log


def test_read_run_outputs_falls_back_to_metrics_and_handles_stopped_runs(tmp_path: Path) -> None:
    _fake_run(tmp_path / "m", finished=True, eval_json=False)
    out = lbs.read_run_outputs(tmp_path / "m")
    assert out["ap"] == {"bbox": 30.0} and out["eval_file"].endswith("metrics.jsonl")
    _fake_run(tmp_path / "d", finished=False, iterations=15)
    out = lbs.read_run_outputs(tmp_path / "d")
    assert out["iterations"] == 15 and out["ap"] == {} and out["schedule"] == {} and out["eval_file"] is None
    empty = lbs.read_run_outputs(tmp_path / "missing")
    assert empty["iterations"] == 0 and empty["final_loss"] is None and empty["train_s"] is None


# --------------------------------------------------------------------------------------------------
# Results, goals, table, plot
# --------------------------------------------------------------------------------------------------


def _result(batch: int, ap: dict, *, ablation: str = "", log: str = "", rc: int = 0,
            device: str = "cpu") -> lbs.RunResult:  # fmt: skip
    spec = lbs.RunSpec(f"batch{batch}" + (f"_{ablation}" if ablation else ""), batch, ablation, ablation.upper())
    outputs = {"iterations": 20, "ap": ap, "train_s": 10.0, "logged_iterations": 20,
               "schedule": {"total_iters": 20, "lr": 0.004 * (batch / 8) ** 0.5, "warmup_iters": 5}}
    return lbs.make_result(spec, outputs, device=device, processes=2, exit_code=rc, log_text=log, wall_s=60.0)


def test_make_result_classifies_ok_diverged_and_failed() -> None:
    ok = _result(64, {"bbox": 20.0})
    assert (ok.status, ok.status_text(), ok.iterations, ok.ap) == ("ok", "ok", 20, {"bbox": 20.0})
    assert (ok.processes, ok.images_per_device, ok.layout_text()) == (2, 32, "2 x 32")
    assert ok.images_per_s == pytest.approx(20 * 64 / 10.0)  # training images / training seconds
    assert _result(64, {}, device="cuda").layout_text() == "1 GPU x 64"

    log = "  iterations: 128 total, 8 per epoch (1000 images, 16 epochs)\n" + NON_FINITE_LOG
    div = lbs.make_result(lbs.RunSpec("b", 128, "frozen_bn", "frozen"), {"iterations": 5, "ap": {"bbox": 1.0}},
                          device="cpu", processes=2, exit_code=1, log_text=log, wall_s=1.0)  # fmt: skip
    assert (div.status, div.status_text(), div.diverged_at) == ("diverged", "diverged at iteration 7", 7)
    assert div.iterations == 6 and div.ap == {} and div.total_iters == 128 and div.error == ""

    failed = _result(8, {}, rc=2, log="Traceback\nmegdet: error: data.root: datasets/x not found\nbye\n")
    assert failed.status_text() == "failed (exit 2): megdet: error: data.root: datasets/x not found"
    spec = lbs.RunSpec("b", 8)
    late = lbs.make_result(spec, {}, device="cpu", processes=2, exit_code=-15, log_text=NON_FINITE_LOG,
                           wall_s=600.0, timed_out_s=300.0)  # fmt: skip
    assert late.status_text() == "failed (exit -15): stopped after its time limit of 5 min"
    # A non-finite message in a successful run's log (impossible, but) does not make it diverged.
    assert _result(8, {"bbox": 1.0}, log=NON_FINITE_LOG).status == "ok"


def _study() -> list[lbs.RunResult]:
    return [
        _result(8, {"bbox": 50.0, "segm": 40.0, "keypoints": 60.0}),
        _result(16, {"bbox": 50.5, "segm": 40.0, "keypoints": 59.0}),
        _result(32, {"bbox": 49.5, "segm": 38.5, "keypoints": 59.2}),
        _result(64, {"bbox": 48.1, "segm": 38.0, "keypoints": 58.0}),
        _result(128, {"bbox": 47.5, "segm": 36.0, "keypoints": 57.5}),
        _result(128, {"bbox": 30.0, "segm": 20.0, "keypoints": 40.0}, ablation="no_warmup"),
        _result(128, {"bbox": 45.0}, ablation="lamb"),
        _result(128, {}, ablation="frozen_bn", log=NON_FINITE_LOG, rc=1),
    ]


def test_reference_and_difference() -> None:
    results = _study()
    ref = lbs.reference_run(results)
    assert ref is not None and ref.global_batch == 8
    assert lbs.ap_difference(results[1], ref, "bbox") == pytest.approx(0.5)
    assert lbs.ap_difference(results[6], ref, "segm") is None  # not predicted
    assert lbs.ap_difference(results[7], ref, "bbox") is None  # diverged: no AP
    assert lbs.reference_run(results[5:]) is None  # ablations only


def test_goals_check_per_batch_and_task() -> None:
    rows = lbs.goals_check(_study())
    verdict = {(r["batch"], r["task"]): r["pass"] for r in rows}
    assert verdict == {
        (32, "bbox"): True, (32, "segm"): False, (32, "keypoints"): True,  # -0.5, -1.5, -0.8 vs 1.0
        (64, "bbox"): True, (64, "segm"): True, (64, "keypoints"): True,  # -1.9, -2.0, -2.0 vs 2.0
        (128, "bbox"): True, (128, "segm"): False, (128, "keypoints"): True,  # -2.5, -4.0, -2.5 vs 3.0
    }  # batch 16 has no goal; ablations are not checked
    assert {r["allowed_drop"] for r in rows if r["batch"] == 64} == {2.0}
    assert all(r["reference_batch"] == 8 for r in rows)
    lines = lbs.goals_lines(rows)
    assert lines[0] == "goal at batch 32: within 1 AP of batch 8 (box -0.5, mask -1.5, kp -0.8): FAIL"
    assert lines[1].endswith(": PASS")
    # A run without AP fails its goals; goals key on the ratio to the smallest batch.
    failed = lbs.goals_check([_result(2, {"bbox": 5.0}), _result(8, {}, rc=1, log="boom")])
    assert [(r["batch"], r["pass"], r["difference"]) for r in failed] == [(8, False, None)]
    assert lbs.goals_check([]) == []


def test_table_rows() -> None:
    headers, rows = lbs.table_rows(_study())
    assert headers == ["run", "batch", "devices x images", "iters", "peak lr", "warmup it", "box AP", "d box",
                       "mask AP", "d mask", "keypoint AP", "d kp", "wall s", "img/s", "status"]  # fmt: skip
    by = {row[0]: dict(zip(headers, row)) for row in rows}
    assert by["batch64"]["devices x images"] == "2 x 32" and by["batch64"]["iters"] == "20/20"
    assert (by["batch64"]["box AP"], by["batch64"]["d box"], by["batch8"]["d mask"]) == ("48.1", "-1.9", "+0.0")
    assert by["batch128"]["peak lr"] == pytest.approx(0.016) and by["batch128"]["warmup it"] == 5
    assert by["batch128_frozen_bn"]["status"] == "diverged at iteration 7"
    assert by["batch128_frozen_bn"]["box AP"] is None and by["batch128_lamb"]["mask AP"] is None
    assert by["batch8"]["img/s"] == "16.0" and by["batch8"]["wall s"] == "60"
    text = format_table(headers, rows)  # the shared printer accepts every cell
    assert "diverged at iteration 7" in text


def test_plot_study_writes_a_png(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. matplotlib's "no artists with labels" would fail here
        path = lbs.plot_study(_study(), tmp_path / "sub" / "study.png", title="t")
        only_failures = lbs.plot_study([_result(8, {}, log=NON_FINITE_LOG, rc=1)], tmp_path / "f.png")
    for p in (path, only_failures):
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# --------------------------------------------------------------------------------------------------
# Running (no training)
# --------------------------------------------------------------------------------------------------


def test_ensure_dataset_generates_once_per_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import megdet.data.synthetic as synthetic
    from megdet.config import SynthConfig

    calls = []
    monkeypatch.setattr(synthetic, "generate_synthetic_coco", lambda root, **kw: calls.append(kw))
    assert lbs.ensure_dataset(tmp_path, SynthConfig(num_train=40, num_val=10, image_size=160)) is True
    assert lbs.ensure_dataset(tmp_path, SynthConfig(num_train=40, num_val=10, image_size=160)) is False
    assert lbs.ensure_dataset(tmp_path, SynthConfig(num_train=40, num_val=10, image_size=128)) is True
    assert [c["image_size"] for c in calls] == [160, 128] and calls[0]["num_train"] == 40


def test_wait_gives_the_exit_status_and_cpu_time_of_one_child() -> None:
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "import sys; sum(range(10**6)); sys.exit(3)"])
    rc, cpu_s, timed_out = lbs._wait(proc)
    assert rc == 3 and proc.returncode == 3 and cpu_s > 0 and not timed_out


def test_wait_stops_a_run_after_its_time_limit() -> None:
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    t0 = time.monotonic()
    rc, _, timed_out = lbs._wait(proc, timeout_s=0.5)
    assert timed_out and rc == -15 and time.monotonic() - t0 < 10  # SIGTERM was enough


def test_run_all_starts_the_longest_runs_first_and_keeps_the_order(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[str] = []

    def fake_run_one(spec: lbs.RunSpec, **kwargs) -> lbs.RunResult:
        started.append(spec.name)
        time.sleep(0.05 * (128 // spec.global_batch))  # the smallest batch runs longest
        return _result(spec.global_batch, {"bbox": 1.0}, ablation=spec.ablation)

    monkeypatch.setattr(lbs, "run_one", fake_run_one)
    specs = lbs.build_run_matrix([32, 64, 128], ["lamb"])
    results = lbs.run_all(specs, parallel=2)
    assert set(started[:2]) == {"batch32", "batch64"} and started[2] == "batch128"
    assert [r.name for r in results] == [s.name for s in specs]


@pytest.mark.parametrize("argv, message", [
    (["--batches", "8,7"], "global batch 7 is not a positive multiple of 2 processes"),
    (["--batches", "6", "--ablations", "bn_groups_2"], "batch6_bn_groups_2: model.bn_group_images=2"),
    (["--epochs", "0"], "--epochs: expected > 0"),
    (["--parallel", "2"], "--parallel: only with --device cuda"),
    (["--ablations", "bogus"], "--ablations: unknown bogus"),
    (["--run-timeout", "0"], "--run-timeout: expected > 0"),
    (["--config", "nowhere.yaml"], "nowhere.yaml not found"),
])  # fmt: skip
def test_bad_arguments_fail_before_any_work(argv: list, message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        lbs.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_quick_study_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """--quick through runs, evaluation, table, JSON and plot; smaller than its default (1 process, 2 runs
    of 2 iterations) to keep the suite short."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out, res = tmp_path / "runs", tmp_path / "res" / "study.json"
    argv = ["--quick", "--processes", "1", "--batches", "4", "--ablations", "bn_groups_2", "--epochs", "0.25",
            "--out", str(out), "--json", str(res), "--data-root", str(tmp_path / "data")]  # fmt: skip
    assert lbs.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Large mini-batch study" in printed and "batch4_bn_groups_2" in printed
    data = json.loads(res.read_text())
    runs = {r["name"]: r for r in data["runs"]}
    assert list(runs) == ["batch4", "batch4_bn_groups_2"]
    for r in runs.values():
        assert r["status"] == "ok" and r["iterations"] == r["total_iters"] == 2
        assert r["eval_file"] and os.path.isfile(r["eval_file"]) and r["images_per_s"] > 0
        assert r["command"][r["command"].index("--nproc") + 1] == "1"
    assert "bn_group_images: 2" in (out / "batch4_bn_groups_2" / "config.yaml").read_text()
    assert data["settings"]["quick"] and data["goals"]["checks"] == []  # one batch: nothing to compare
    assert Path(data["plot"]).read_bytes()[:4] == b"\x89PNG"


def test_keep_finished_reads_back_only_an_ok_run_of_the_same_command(tmp_path: Path) -> None:
    import dataclasses

    ok = dataclasses.replace(_result(32, {"bbox": 50.0}), command=["megdet", "train", "a=1"])
    (tmp_path / lbs.RESULT_FILE).write_text(json.dumps(dataclasses.asdict(ok)))
    back = lbs.finished_result(tmp_path, ["megdet", "train", "a=1"])
    assert back is not None and back.ap == {"bbox": 50.0} and back.global_batch == 32
    assert lbs.finished_result(tmp_path, ["megdet", "train", "a=2"]) is None  # another run in that folder
    failed = dataclasses.replace(ok, status="failed")
    (tmp_path / lbs.RESULT_FILE).write_text(json.dumps(dataclasses.asdict(failed)))
    assert lbs.finished_result(tmp_path, ok.command) is None
    (tmp_path / lbs.RESULT_FILE).write_text("{not json")
    assert lbs.finished_result(tmp_path, ok.command) is None
