"""The large mini-batch study: MegDet's main table, redone on the demo recipe and the synthetic dataset.

Trains the ``make demo`` recipe (configs/demo.yaml: ResNet-10 FPN with box, mask and keypoint heads
from scratch, cross-device BN, AdamW, cosine decay, 16 epochs of the 1,000-image synthetic training
set) at global batch 8, 16, 32, 64 and 128 (``--batches 8,...,256`` for more) for the SAME number of
epochs, changing nothing but the number of devices and the images per device. The learning rate,
warmup and iterations follow the global batch through the trainer's own policy
(megdet/engine/lr_policy.py: ``solver.lr_scaling=auto`` is the square root of ``batch / 8`` for AdamW,
warmup 16,000 images capped at half of the run, iterations = 16 x ceil(1000 / batch)). There is
no gradient accumulation: every device is a real process (CPU) or a real GPU batch.

Two modes
    ``--device cpu`` (default): ``megdet train --config configs/demo.yaml --nproc 2 --out RUN
    data.images_per_device=B/2``: 2 processes (gloo) with cross-device BN across them, i.e. BN
    statistics over the whole global batch of B images. One run at a time (each uses both cores).
    ``--device cuda``: one process per run holding the whole global batch on one GPU
    (``train.device=cuda data.images_per_device=B``): BN over all B images, which is exactly what
    cross-device BN over B/4 devices of 4 images computes. ``--parallel N`` runs N runs at once as
    concurrent subprocesses (the small model leaves a big GPU mostly idle), each with
    ``data.num_workers=2`` and ``OMP_NUM_THREADS=2``, longest runs (smallest batch) first.

Then ablations at the largest batch, each one config override on top of that batch's run (``--ablations
a,b`` for a subset, ``--no-ablations`` for none): ``no_warmup`` (``solver.warmup=false``),
``no_lr_scaling`` (``solver.lr_scaling=none``: the reference batch's lr), ``linear_lr``
(``solver.lr_scaling=linear``: AdamW's lr scaled linearly, the old policy), ``bn_groups_2``
(``model.bn_group_images=2``: BN statistics over groups of 2 images of each device, nothing shared),
``frozen_bn`` (``model.norm=FrozenBN``; trained from scratch, the frozen layers are identity maps, so
the backbone has no normalisation at all -- MegDet's "frozen BN cannot train from scratch". The FPN and
heads would follow to "none" by ``default_head_norm``; ``model.head_norm`` pins them to the main
series' norm so that only the backbone changes), ``lamb`` (``solver.optimizer=lamb``) and
``scale_betas`` (``solver.scale_betas=true``: AdamW's 1 - beta scaled with the batch).

Each run is a subprocess; the trainer evaluates the final model on the 200 validation images (COCO AP
with pycocotools) into ``RUN/eval/iter_N/eval.json``, which this script reads, with the schedule from
``RUN/summary.json`` and the training time from ``RUN/metrics.jsonl`` (images/s = training images /
training seconds, without start-up and evaluation). A run whose loss becomes NaN/inf is recorded as
"diverged at iteration N"; any other failure with its last error line (``--run-timeout MIN`` stops and
records as failed a run that takes longer).

The goals, after MegDet (ResNet-50 FPN on COCO: without cross-device BN batch 32+ trained unstably;
with it every batch from 16 to 256 converged at about the same accuracy): within 1.0 AP of batch 8 at
batch 32, 2.0 at 64 and 3.0 at 128, for boxes, masks and keypoints (checked at 4x, 8x, 16x the smallest
batch of the study).

How long: on CPU each run trains the demo's 16,000 images, about the demo's time: 15-22 minutes per run
on 2 cores, so the full study (5 batches + 7 ablations = 12 runs) takes several hours (3-4.5 h). On a
GPU machine with ``--parallel 4``, minutes.

    python benchmarks/large_batch_study.py                                 # CPU, 12 runs: hours
    python benchmarks/large_batch_study.py --no-ablations                  # CPU, the 5 batches only
    python benchmarks/large_batch_study.py --device cuda --parallel 4      # GPU: minutes
    python benchmarks/large_batch_study.py --batches 8,16,32,64,128,256 --ablations no_warmup,frozen_bn
    python benchmarks/large_batch_study.py --quick                         # smoke check: 1-2 min on CPU

``--quick`` goes through the whole pipeline at toy size: batches 2 and 8 plus the ``no_warmup`` ablation,
1 epoch of a generated 32-image dataset of 128 px (datasets/study_quick; the demo's datasets/synth is
left alone), 8 validation images.

Prints a table, writes benchmarks/results/large_batch_study.json (``--json``) and a PNG plot next to it
(AP against global batch, the ablations marked, and the change against the smallest batch with the
goals and MegDet's result); the runs go to ``--out`` (runs/large_batch_study).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import RESULTS_DIR, print_table, write_results

from megdet.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
NAME = "large_batch_study"
DEFAULT_CONFIG = ROOT / "configs" / "demo.yaml"
DEFAULT_BATCHES = (8, 16, 32, 64, 128)
DEVICES = ("cpu", "cuda")
CPU_PROCESSES = 2
# --device cuda: per run, so that N concurrent runs share the GPU machine's cores without oversubscribing.
CUDA_LOADER_WORKERS = 2
CUDA_THREADS = 2
TASKS = ("bbox", "segm", "keypoints")
TASK_LABELS = {"bbox": "box AP", "segm": "mask AP", "keypoints": "keypoint AP"}
TASK_SHORT = {"bbox": "box", "segm": "mask", "keypoints": "kp"}
# Allowed AP drop against the smallest batch, by batch ratio: batch 8 -> 32, 64, 128.
GOALS: dict[int, float] = {4: 1.0, 8: 2.0, 16: 3.0}
MEGDET_RESULT = (
    "MegDet (Peng et al., CVPR 2018), ResNet-50 FPN on COCO: without cross-device BN batch 32+ trained"
    " unstably; with it every batch from 16 to 256 converged at about the same accuracy"
)
# Fewer optimizer steps than this from scratch may be too few to learn anything (a run of the old study
# made no detection at all after 35 steps): such batches are flagged in the output.
MIN_USEFUL_STEPS = 100
# --quick: a tiny generated dataset of its own (the demo's datasets/synth is left alone), 1 epoch.
QUICK_BATCHES = "2,8"
QUICK_EPOCHS = 1.0
QUICK_ABLATIONS = ("no_warmup",)
QUICK_SYNTH = {"num_train": 32, "num_val": 8, "image_size": 128}
QUICK_RUN_TIMEOUT_MIN = 5.0
# A run stopped for its time limit: seconds its launcher gets to stop its workers (it kills them after
# this grace period), then seconds until the launcher itself is killed.
STOP_GRACE_S = 30
KILL_AFTER_S = 90


# --------------------------------------------------------------------------------------------------
# The run matrix (pure)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ablation:
    """A change at the largest batch: config overrides (``{head_norm}``: the main series' head norm)."""

    name: str
    label: str
    overrides: tuple[str, ...]


ABLATIONS: tuple[Ablation, ...] = (
    Ablation("no_warmup", "no warmup", ("solver.warmup=false",)),
    Ablation("no_lr_scaling", "lr not scaled", ("solver.lr_scaling=none",)),
    Ablation("linear_lr", "linear lr scaling", ("solver.lr_scaling=linear",)),
    Ablation("bn_groups_2", "BN over groups of 2 images", ("model.bn_group_images=2",)),
    Ablation("frozen_bn", "frozen BN backbone", ("model.norm=FrozenBN", "model.head_norm={head_norm}")),
    Ablation("lamb", "LAMB", ("solver.optimizer=lamb",)),
    Ablation("scale_betas", "betas scaled", ("solver.scale_betas=true",)),
)
ABLATION_NAMES = tuple(a.name for a in ABLATIONS)


@dataclass(frozen=True)
class RunSpec:
    """One training run: its global batch and, for an ablation, its name, label and extra overrides."""

    name: str
    global_batch: int
    ablation: str = ""  # "" for the main series
    label: str = ""
    overrides: tuple[str, ...] = ()


def parse_batches(text: str) -> list[int]:
    """``"8,16,32"`` -> [8, 16, 32] (sorted, duplicates removed); a one-line ValueError otherwise."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--batches: expected a comma list of integers, got '{text}'") from None
    if not values:
        raise ValueError("--batches: no batch sizes given")
    if min(values) < 1:
        raise ValueError(f"--batches: expected positive batch sizes, got '{text}'")
    return sorted(set(values))


def parse_ablations(text: str) -> list[str]:
    """``"lamb,no_warmup"`` -> the named ablations in the study's order; ValueError for unknown names."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in ABLATION_NAMES]
    if unknown:
        raise ValueError(f"--ablations: unknown {', '.join(unknown)}; choose from {', '.join(ABLATION_NAMES)}")
    return [n for n in ABLATION_NAMES if n in names]


def build_run_matrix(
    batches: Sequence[int], ablations: Sequence[str] = ABLATION_NAMES, head_norm: str = "CrossDeviceBN"
) -> list[RunSpec]:
    """The main series (smallest batch first), then the chosen ablations at the largest batch.

    That is also the launch order: the smallest batch has the most iterations, so it starts first.
    """
    if not batches:
        raise ValueError("--batches: no batch sizes given")
    ordered = sorted(set(batches))
    specs = [RunSpec(f"batch{b}", b) for b in ordered]
    largest = ordered[-1]
    for a in ABLATIONS:
        if a.name in ablations:
            extra = tuple(o.format(head_norm=head_norm) for o in a.overrides)
            specs.append(RunSpec(f"batch{largest}_{a.name}", largest, a.name, a.label, extra))
    return specs


def device_layout(global_batch: int, device: str, processes: int = CPU_PROCESSES) -> tuple[int, int]:
    """``(processes, images per process)`` of a global batch: ``processes`` x B/processes on CPU, one
    process with all B images on CUDA. ValueError when the batch does not split evenly."""
    if device not in DEVICES:
        raise ValueError(f"--device: expected one of {', '.join(DEVICES)}, got '{device}'")
    if device == "cuda":
        return 1, global_batch
    if processes < 1:
        raise ValueError(f"--processes: expected >= 1, got {processes}")
    if global_batch < processes or global_batch % processes:
        raise ValueError(f"--batches: global batch {global_batch} is not a positive multiple of"
                         f" {processes} processes")  # fmt: skip
    return processes, global_batch // processes


def device_overrides(global_batch: int, device: str, processes: int = CPU_PROCESSES) -> list[str]:
    """The overrides that put a global batch on the devices: images per device, device, loader workers."""
    _, per_device = device_layout(global_batch, device, processes)
    out = [f"data.images_per_device={per_device}", f"train.device={device}"]
    if device == "cuda":
        out.append(f"data.num_workers={CUDA_LOADER_WORKERS}")
    return out


def train_command(
    spec: RunSpec, *, device: str, processes: int, config: Path, run_dir: Path, common: Sequence[str]
) -> list[str]:
    """The ``python -m megdet train`` command line of one run (``common``: overrides of every run)."""
    nproc, _ = device_layout(spec.global_batch, device, processes)
    return [sys.executable, "-m", "megdet", "train", "--config", str(config), "--nproc", str(nproc),
            "--out", str(run_dir), *common, *device_overrides(spec.global_batch, device, processes),
            *spec.overrides]  # fmt: skip


def run_env(device: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a run: on CUDA ``OMP_NUM_THREADS=2``, so that parallel runs share the cores;
    a short launcher grace period, so that a run stopped for its time limit stops its workers soon."""
    env = dict(os.environ if base is None else base)
    # Study runs never resume, so a SIGTERM-ed worker need not be given time to write a checkpoint.
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(STOP_GRACE_S)
    if device == "cuda":
        env["OMP_NUM_THREADS"] = str(CUDA_THREADS)
    return env


def quick_overrides(root: Path) -> list[str]:
    """--quick: the tiny dataset (``data.synth``) in ``root``, trained and tested at its image size."""
    s = QUICK_SYNTH["image_size"]
    return [f"data.root={root}", *(f"data.synth.{k}={v}" for k, v in QUICK_SYNTH.items()),
            f"data.min_size_train=[{s}]", f"data.max_size_train={s}", f"data.min_size_test={s}",
            f"data.max_size_test={s}", f"test.tta.min_sizes=[{s}]"]  # fmt: skip


def main_head_norm(cfg: Config) -> str:
    """The FPN's and heads' norm of the main series (``model.head_norm``, or the default for ``model.norm``)."""
    from megdet.modeling.backbone import default_head_norm

    return cfg.model.head_norm or default_head_norm(cfg.model.norm)


def resolve_runs(
    config: Path, specs: Sequence[RunSpec], common: Sequence[str], device: str, processes: int, num_images: int
) -> dict[str, Any]:
    """Every run's config checked as the trainer checks it, and its schedule: ``{name: ScheduleInfo}``.

    Raises a ValueError (ConfigError) naming the first run that cannot work, before any run starts.
    """
    from megdet.engine.setup import schedule_for

    out = {}
    for s in specs:
        cfg = load_config(config, [*common, *device_overrides(s.global_batch, device, processes), *s.overrides])
        nproc, _ = device_layout(s.global_batch, device, processes)
        try:
            cfg.validate(nproc)
        except ValueError as e:
            raise ValueError(f"{s.name}: {e}") from None
        out[s.name] = schedule_for(cfg, nproc, num_images)
    return out


def step_caveats(schedules: Mapping[str, Any], min_steps: int = MIN_USEFUL_STEPS) -> list[str]:
    """One line per batch whose runs get fewer than ``min_steps`` optimizer steps (equal epochs mean
    ``batch`` times fewer steps: a low AP there may reflect the step count rather than the batch)."""
    lines, seen = [], set()
    for info in schedules.values():
        if info.global_batch in seen or info.total_iters >= min_steps:
            continue
        seen.add(info.global_batch)
        lines.append(f"caveat: batch {info.global_batch} gets only {info.total_iters} optimizer steps"
                     f" ({info.epochs:.3g} epoch(s)); from scratch, fewer than {min_steps} may be too few to"
                     " learn anything")  # fmt: skip
    return sorted(lines, key=lambda line: int(line.split()[2]))


# --------------------------------------------------------------------------------------------------
# Reading a run's outputs (pure, on files)
# --------------------------------------------------------------------------------------------------

_NON_FINITE = re.compile(r"non-finite loss at iteration (\d+)")
# The schedule lines every run prints at start-up (ScheduleInfo.summary_lines in megdet/engine/lr_policy.py):
# the fallback for runs that stopped before writing summary.json.
_LOG_PATTERNS: dict[str, tuple[re.Pattern[str], type]] = {
    "lr": (re.compile(r"learning rate: [^=\n]*= ([0-9.eE+-]+)"), float),
    "total_iters": (re.compile(r"iterations: (\d+) total"), int),
    "warmup_iters": (re.compile(r"warmup: (\d+) iterations"), int),
    "epochs": (re.compile(r"iterations: \d+ total, .*, ([0-9.eE+-]+) epochs\)"), float),
    "global_batch": (re.compile(r"= global batch (\d+)"), int),
}
_SCHEDULE_KEYS = ("total_iters", "lr", "warmup_iters", "epochs", "iters_per_epoch", "global_batch",
                  "world_size", "images_per_device", "optimizer", "lr_scaling", "betas")  # fmt: skip


def parse_divergence(text: str) -> int | None:
    """The iteration of the trainer's ``non-finite loss at iteration N`` message in ``text``, else None."""
    m = _NON_FINITE.search(text)
    return int(m.group(1)) if m else None


def parse_schedule_log(text: str) -> dict[str, Any]:
    """``lr``, ``total_iters``, ``warmup_iters``, ``epochs`` and ``global_batch`` from a training log's
    start-up lines (the keys found)."""
    out: dict[str, Any] = {}
    for key, (pattern, kind) in _LOG_PATTERNS.items():
        m = pattern.search(text)
        if m:
            try:
                out[key] = kind(m.group(1))
            except ValueError:
                continue
    return out


def last_error_line(text: str) -> str:
    """The last line of a log that mentions an error, else its last non-empty line (300 characters at most)."""
    # tqdm redraws its bar with carriage returns: only the last state of such a line counts.
    lines = [line.split("\r")[-1].strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [""])[-1][:300]


def ap_from_eval(eval_dict: Mapping[str, Any]) -> dict[str, float]:
    """``{task: AP in percent}`` from an ``eval.json`` dict (or a metrics.jsonl ``eval`` entry).

    Tasks the model does not predict are absent; an AP of -1 (no ground truth) is left out.
    """
    out: dict[str, float] = {}
    for task in TASKS:
        entry = eval_dict.get(task)
        if not isinstance(entry, Mapping):
            continue
        stats = entry.get("stats", entry)
        ap = stats.get("AP") if isinstance(stats, Mapping) else None
        if isinstance(ap, (int, float)) and ap >= 0:
            out[task] = 100.0 * float(ap)
    return out


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if isinstance(item, dict):
            lines.append(item)
    return lines


def read_run_outputs(run_dir: Path) -> dict[str, Any]:
    """What a finished (or stopped) training run left in ``run_dir``.

    Returns ``iterations`` (done), ``schedule`` (from summary.json; empty when the run did not finish),
    ``ap`` ({task: AP %} of the final evaluation, from ``eval/iter_N/eval.json``, else the last ``eval``
    line of metrics.jsonl at that iteration), ``eval_file``, ``final_loss`` (total loss of the last
    logged window) and ``train_s`` (the trainer's seconds from the first iteration to the last logged
    one, without start-up and evaluation; None when nothing was logged).
    """
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    metrics = _read_metrics(run_dir / "metrics.jsonl")
    losses = [m for m in metrics if "total_loss" in m]
    iterations = int(summary.get("iteration", losses[-1]["iter"] if losses else 0))
    ap: dict[str, float] = {}
    eval_file: str | None = None
    final_eval = run_dir / "eval" / f"iter_{iterations:07d}" / "eval.json"
    if final_eval.is_file():
        ap, eval_file = ap_from_eval(json.loads(final_eval.read_text())), str(final_eval)
    else:
        evals = [m for m in metrics if isinstance(m.get("eval"), Mapping) and m.get("iter") == iterations]
        if evals:
            ap, eval_file = ap_from_eval(evals[-1]["eval"]), str(run_dir / "metrics.jsonl")
    timed = [m for m in losses if isinstance(m.get("time"), (int, float))]
    return {
        "iterations": iterations,
        "schedule": {k: summary[k] for k in _SCHEDULE_KEYS if k in summary},
        "ap": ap,
        "eval_file": eval_file,
        "final_loss": float(losses[-1]["total_loss"]) if losses else None,
        "train_s": float(timed[-1]["time"]) if timed else None,
        "logged_iterations": int(timed[-1]["iter"]) if timed else 0,
    }


# --------------------------------------------------------------------------------------------------
# Results (pure)
# --------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """One run's outcome, as stored in the JSON."""

    name: str
    global_batch: int
    device: str
    processes: int
    images_per_device: int
    ablation: str
    label: str
    status: str  # "ok" | "diverged" | "failed"
    diverged_at: int | None = None
    iterations: int = 0  # optimizer steps applied
    total_iters: int | None = None
    warmup_iters: int | None = None
    lr: float | None = None  # the scaled peak learning rate
    lr_scaling: str | None = None
    epochs: float | None = None
    ap: dict[str, float] = field(default_factory=dict)  # task -> AP in percent
    final_loss: float | None = None
    wall_s: float = 0.0  # the whole subprocess: start-up, training, checkpoint, evaluation
    train_s: float | None = None  # training iterations only (the trainer's clock)
    images_per_s: float | None = None  # training images / train_s
    cpu_s: float = 0.0  # user + system of the run's processes
    exit_code: int = 0
    error: str = ""
    run_dir: str = ""
    eval_file: str | None = None
    command: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)

    def layout_text(self) -> str:
        """``"2 x 32"`` (processes x images on CPU) or ``"1 GPU x 64"``."""
        return f"{'1 GPU' if self.device == 'cuda' else self.processes} x {self.images_per_device}"

    def status_text(self) -> str:
        """"ok", "diverged at iteration N" or "failed (exit N): last error line"."""
        if self.status == "diverged":
            return f"diverged at iteration {self.diverged_at}"
        if self.status == "failed":
            return f"failed (exit {self.exit_code})" + (f": {self.error}" if self.error else "")
        return "ok"


def make_result(
    spec: RunSpec,
    outputs: Mapping[str, Any],
    *,
    device: str,
    processes: int,
    exit_code: int,
    log_text: str,
    wall_s: float,
    cpu_s: float = 0.0,
    run_dir: str = "",
    command: Sequence[str] = (),
    timed_out_s: float | None = None,
) -> RunResult:
    """Combines a spec, its run's outputs (:func:`read_run_outputs`), exit status and log into a result.

    A non-zero exit whose log holds ``non-finite loss at iteration N`` is a divergence; any other
    non-zero exit is a failure, with the log's last error line (else its last line) as ``error``; a run
    stopped after ``timed_out_s`` seconds is a failure whatever its exit status.
    """
    diverged_at = parse_divergence(log_text) if exit_code != 0 and timed_out_s is None else None
    status = "ok" if exit_code == 0 else "diverged" if diverged_at is not None else "failed"
    status = "failed" if timed_out_s is not None else status
    error = "" if status != "failed" else last_error_line(log_text)
    if timed_out_s is not None:
        error = f"stopped after its time limit of {timed_out_s / 60:g} min"
    sched = {**parse_schedule_log(log_text), **outputs.get("schedule", {})}
    nproc, per_device = device_layout(spec.global_batch, device, processes)
    train_s, logged = outputs.get("train_s"), int(outputs.get("logged_iterations", 0))
    rate = logged * spec.global_batch / train_s if train_s and logged else None
    ok = status == "ok"
    return RunResult(
        name=spec.name, global_batch=spec.global_batch, device=device, processes=nproc,
        images_per_device=per_device, ablation=spec.ablation, label=spec.label, status=status,
        diverged_at=diverged_at,
        # The loss of iteration N was non-finite, so N - 1 updates were applied.
        iterations=diverged_at - 1 if diverged_at is not None else int(outputs.get("iterations", 0)),
        total_iters=sched.get("total_iters"), warmup_iters=sched.get("warmup_iters"), lr=sched.get("lr"),
        lr_scaling=sched.get("lr_scaling"), epochs=sched.get("epochs"),
        ap=dict(outputs.get("ap", {})) if ok else {}, final_loss=outputs.get("final_loss"),
        wall_s=wall_s, train_s=train_s, images_per_s=rate, cpu_s=cpu_s, exit_code=exit_code,
        error=error,
        run_dir=run_dir, eval_file=outputs.get("eval_file") if ok else None, command=list(command),
        overrides=list(spec.overrides),
    )  # fmt: skip


def reference_run(results: Sequence[RunResult]) -> RunResult | None:
    """The main-series run with the smallest batch: what every run is compared with."""
    main = [r for r in results if not r.ablation]
    return min(main, key=lambda r: r.global_batch) if main else None


def ap_difference(result: RunResult, reference: RunResult | None, task: str) -> float | None:
    """``result``'s AP of ``task`` minus the reference's (AP points); None when either is missing."""
    if reference is None:
        return None
    a, b = result.ap.get(task), reference.ap.get(task)
    return None if a is None or b is None else a - b


def predicted_tasks(results: Sequence[RunResult]) -> list[str]:
    """The tasks (bbox, segm, keypoints) that at least one run reported an AP for, in that order."""
    return [t for t in TASKS if any(t in r.ap for r in results)]


def goals_check(results: Sequence[RunResult], goals: Mapping[int, float] = GOALS) -> list[dict[str, Any]]:
    """Pass / fail per main-series batch and task: at ``k`` times the reference batch (a key of
    ``goals``), the AP may be at most ``goals[k]`` points below the reference's. A run without AP fails."""
    ref = reference_run(results)
    if ref is None:
        return []
    tasks = predicted_tasks(results) or list(TASKS)
    rows = []
    for r in sorted((r for r in results if not r.ablation and r is not ref), key=lambda r: r.global_batch):
        ratio, rest = divmod(r.global_batch, ref.global_batch)
        if rest or ratio not in goals:
            continue
        for task in tasks:
            diff = ap_difference(r, ref, task)
            rows.append({
                "batch": r.global_batch, "task": task, "reference_batch": ref.global_batch,
                "ap": r.ap.get(task), "reference_ap": ref.ap.get(task), "difference": diff,
                "allowed_drop": goals[ratio], "pass": diff is not None and diff >= -goals[ratio],
            })  # fmt: skip
    return rows


def goals_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per batch of the goals check: each task's difference, the allowed drop, PASS / FAIL."""
    lines = []
    for batch in sorted({r["batch"] for r in rows}):
        mine = [r for r in rows if r["batch"] == batch]
        parts = [f"{TASK_SHORT[r['task']]} {'-' if r['difference'] is None else format(r['difference'], '+.1f')}"
                 for r in mine]  # fmt: skip
        verdict = "PASS" if all(r["pass"] for r in mine) else "FAIL"
        lines.append(f"goal at batch {batch}: within {mine[0]['allowed_drop']:g} AP of batch"
                     f" {mine[0]['reference_batch']} ({', '.join(parts)}): {verdict}")  # fmt: skip
    return lines


def table_rows(results: Sequence[RunResult]) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows of the printed table: AP in %, ``d X`` = the difference to the reference run."""
    tasks = predicted_tasks(results) or ["bbox"]
    ref = reference_run(results)
    headers = ["run", "batch", "devices x images", "iters", "peak lr", "warmup it"]
    for t in tasks:
        headers += [TASK_LABELS[t], f"d {TASK_SHORT[t]}"]
    headers += ["wall s", "img/s", "status"]
    rows = []
    for r in results:
        row: list[Any] = [r.name, r.global_batch, r.layout_text()]
        row += [f"{r.iterations}/{r.total_iters if r.total_iters is not None else '?'}", r.lr, r.warmup_iters]
        for t in tasks:
            ap, diff = r.ap.get(t), ap_difference(r, ref, t)
            row += [None if ap is None else f"{ap:.1f}", None if diff is None else f"{diff:+.1f}"]
        status = r.status_text()
        rate = None if r.images_per_s is None else f"{r.images_per_s:.1f}"
        row += [f"{r.wall_s:.0f}", rate, status if len(status) <= 90 else status[:87] + "..."]
        rows.append(row)
    return headers, rows


# --------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------

_COLORS = {"bbox": "tab:blue", "segm": "tab:orange", "keypoints": "tab:green"}
_ABLATION_MARKERS = ("s", "^", "D", "v", "P", "*", "X", "h")


def _mark_failure(ax: Any, x: float, r: RunResult) -> None:
    label = f"batch {r.global_batch}" + (f", {r.label}" if r.ablation else "") + f": {r.status}"
    ax.plot([x], [0.0], "x", color="tab:red", ms=9, mew=2, ls="none", label=label)
    text = r.status_text().replace(" at iteration ", " @ it ")[:24]
    ax.annotate(text, (x, 0.0), textcoords="offset points", xytext=(3, 5), fontsize=7, color="tab:red",
                rotation=45)  # fmt: skip


def _plot_ap(ax: Any, results: Sequence[RunResult], tasks: Sequence[str]) -> None:
    """Left panel: AP against global batch; ablations nudged right of the largest batch."""
    main = sorted((r for r in results if not r.ablation), key=lambda r: r.global_batch)
    for task in tasks:
        pts = [(r.global_batch, r.ap[task]) for r in main if task in r.ap]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "-o", color=_COLORS[task], label=TASK_LABELS[task])
    for r in main:
        if r.status != "ok":
            _mark_failure(ax, r.global_batch, r)
    for i, r in enumerate(r for r in results if r.ablation):
        x = r.global_batch * 2 ** (0.12 * (i + 1))  # several ablations share one batch
        marker = _ABLATION_MARKERS[i % len(_ABLATION_MARKERS)]
        if r.status == "ok":
            for task in tasks:
                if task in r.ap:
                    ax.plot([x], [r.ap[task]], marker, color=_COLORS[task], ms=7, ls="none")
            ax.plot([], [], marker, color="grey", ls="none", label=f"batch {r.global_batch}, {r.label}")
        else:
            _mark_failure(ax, x, r)
    top = max([1.0] + [v * 1.15 for r in results for v in r.ap.values()])
    ax.set_ylim(-0.04 * top, top)  # a little below 0 so that the crosses of failed runs show whole
    ax.set_ylabel("AP (%)")
    ax.set_title("AP against global batch (same epochs)", fontsize=9)


def _plot_goals(ax: Any, results: Sequence[RunResult], tasks: Sequence[str], goals: Mapping[int, float]) -> None:
    """Right panel: the main series' AP change against the reference batch, the goals and MegDet's result."""
    ref = reference_run(results)
    if ref is None:
        return
    main = sorted((r for r in results if not r.ablation), key=lambda r: r.global_batch)
    for task in tasks:
        pts = [(r.global_batch, d) for r in main if (d := ap_difference(r, ref, task)) is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "-o", color=_COLORS[task], label=TASK_LABELS[task])
    ratios = [k for k in sorted(goals) if any(r.global_batch == ref.global_batch * k for r in main)]
    if ratios:
        ax.plot([ref.global_batch * k for k in ratios], [-goals[k] for k in ratios], "_", color="black", ms=18,
                mew=2, ls="none", label="goal: at most this far below")  # fmt: skip
    ax.axhline(0.0, color="grey", lw=4, alpha=0.35,
               label="MegDet, R-50 FPN on COCO: batch 16-256\nconverged at about the same AP")  # fmt: skip
    ax.set_ylabel(f"AP - AP at batch {ref.global_batch} (points)")
    ax.set_title(f"change against batch {ref.global_batch}; goals after MegDet", fontsize=9)


def plot_study(results: Sequence[RunResult], path: Path, title: str = "",
               goals: Mapping[int, float] = GOALS) -> Path:  # fmt: skip
    """PNG of two panels with a log-2 batch axis: AP against global batch (the main series as one
    line per task, ablations as marked points, runs without AP as red crosses at 0), and the AP change
    against the smallest batch with the goals and MegDet's result as the reference."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    tasks = predicted_tasks(results) or ["bbox"]
    fig = Figure(figsize=(12, 4.8), dpi=100)  # a Figure without pyplot: no global state
    left, right = fig.subplots(1, 2)
    _plot_ap(left, results, tasks)
    _plot_goals(right, results, tasks, goals)
    batches = sorted({r.global_batch for r in results})
    for ax, room in ((left, 2.6), (right, 1.4)):  # room on the left panel for the ablations' markers
        ax.set_xscale("log", base=2)
        if batches:
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.set_xlim(batches[0] / 1.4, batches[-1] * room)
        ax.set_xlabel("global batch (images)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(title or "large mini-batch study", fontsize=9)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.11, top=0.86, wspace=0.22)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# --------------------------------------------------------------------------------------------------
# Running (subprocesses)
# --------------------------------------------------------------------------------------------------


def ensure_dataset(root: Path, synth: Any, workers: int = CPU_PROCESSES) -> bool:
    """The config's synthetic dataset (``data.synth``) in ``root``, generated unless the one there has the
    same settings (recorded in ``root/synth.json``, as ``megdet demo`` records them); True when it generated."""
    from megdet.data.synthetic import ensure_synthetic_coco

    return ensure_synthetic_coco(root, num_train=synth.num_train, num_val=synth.num_val,
                                 image_size=synth.image_size, seed=synth.seed, workers=workers,
                                 progress=False)  # fmt: skip


def _prepare_run_dir(run_dir: Path) -> None:
    if run_dir.exists():
        if not ((run_dir / "train.log").is_file() or (run_dir / "config.yaml").is_file()):
            raise SystemExit(f"error: {run_dir} exists and is not a run of this study; choose another --out")
        shutil.rmtree(run_dir)  # every run starts fresh: the trainer refuses a folder with checkpoints
    run_dir.mkdir(parents=True)


def _wait(proc: subprocess.Popen, timeout_s: float | None = None) -> tuple[int, float, bool]:
    """Waits for ``proc``: its exit status, the CPU seconds of it and its reaped descendants, and whether
    it was stopped after ``timeout_s`` (SIGTERM, which its launcher forwards to the workers, then SIGKILL).

    ``wait4`` gives one child's own resource usage, which stays right with several runs at once (the
    process-wide RUSAGE_CHILDREN would mix them).
    """
    deadline = None if not timeout_s else time.monotonic() + timeout_s
    timed_out = False
    while True:
        pid, status, usage = os.wait4(proc.pid, 0 if deadline is None else os.WNOHANG)
        if pid:
            break
        if time.monotonic() >= deadline:
            if timed_out:
                proc.kill()
                deadline = None
            else:
                timed_out = True
                proc.terminate()
                deadline = time.monotonic() + KILL_AFTER_S
        time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime, timed_out


RESULT_FILE = "study_result.json"  # a finished run's RunResult, next to its outputs


def finished_result(run_dir: Path, command: Sequence[str]) -> RunResult | None:
    """The recorded result of a run of the same command that finished ``ok`` in ``run_dir``, else None."""
    try:
        data = json.loads((run_dir / RESULT_FILE).read_text())
        result = RunResult(**data)
    except (OSError, ValueError, TypeError):
        return None
    return result if result.status == "ok" and list(result.command) == list(command) else None


def run_one(spec: RunSpec, *, device: str, processes: int, config: Path, out_dir: Path,
            common: Sequence[str], timeout_s: float | None = None, keep_finished: bool = False) -> RunResult:  # fmt: skip
    """Trains ``spec`` in a subprocess (its output in RUN_DIR/train.log) and collects its result; a run
    still going after ``timeout_s`` is stopped and recorded as failed. With ``keep_finished``, a run
    that already finished with the same command is read back instead of trained again (so a long CPU
    study can be run in pieces, across sessions)."""
    run_dir = out_dir / spec.name
    cmd = train_command(spec, device=device, processes=processes, config=config, run_dir=run_dir, common=common)
    if keep_finished and (done := finished_result(run_dir, cmd)) is not None:
        return done
    _prepare_run_dir(run_dir)
    log_path = run_dir / "train.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=run_env(device))
        try:
            rc, cpu_s, timed_out = _wait(proc, timeout_s)
        except BaseException:
            proc.terminate()  # e.g. Ctrl-C: do not leave a training run behind
            proc.wait()
            raise
    wall = time.perf_counter() - t0
    result = make_result(spec, read_run_outputs(run_dir), device=device, processes=processes, exit_code=rc,
                         log_text=log_path.read_text(errors="replace"), wall_s=wall, cpu_s=cpu_s,
                         run_dir=str(run_dir), command=cmd, timed_out_s=timeout_s if timed_out else None)  # fmt: skip
    (run_dir / RESULT_FILE).write_text(json.dumps(asdict(result), indent=1))
    return result


def _one_line(r: RunResult) -> str:
    ap = ", ".join(f"{TASK_LABELS[t]} {v:.1f}" for t, v in r.ap.items()) or "no AP"
    rate = f", {r.images_per_s:.1f} img/s" if r.images_per_s else ""
    return (f"  <- {r.name}: {r.status_text()}; {r.iterations}/{r.total_iters} iterations; {ap};"
            f" {r.wall_s:.0f} s wall{rate}")  # fmt: skip


def run_all(specs: Sequence[RunSpec], *, parallel: int, **kwargs: Any) -> list[RunResult]:
    """Runs ``specs`` with at most ``parallel`` at once, in their order (longest first); results in the
    order of ``specs``. ``kwargs``: those of :func:`run_one`."""
    results: dict[str, RunResult] = {}
    # One thread per concurrent run: each only starts its subprocess and waits for it.
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = {pool.submit(run_one, s, **kwargs): s for s in specs}
        for future in as_completed(futures):
            r = future.result()
            results[r.name] = r
            print(_one_line(r), flush=True)
    return [results[s.name] for s in specs]


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"smoke check: batches {QUICK_BATCHES}, {QUICK_EPOCHS:g} epoch of {QUICK_SYNTH['num_train']}"
                        f" generated images of {QUICK_SYNTH['image_size']} px, ablation {','.join(QUICK_ABLATIONS)}")
    p.add_argument("--device", choices=DEVICES, default="cpu", help="cpu (default): 2 processes per run; cuda:"
                   " one GPU process per run with the whole batch")
    p.add_argument("--processes", type=int, default=CPU_PROCESSES, help="--device cpu: processes per run (2)")
    p.add_argument("--parallel", type=int, default=1, help="--device cuda: runs at once (default 1)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides of every run (a policy variant: e.g. model.bn_group_images=8)")
    p.add_argument("--batches", default=None, help="global batches (default 8,16,32,64,128)")
    p.add_argument("--epochs", type=float, default=None, help="epochs of every run (default: the config's)")
    p.add_argument("--ablations", default=None,
                   help=f"ablations at the largest batch (default all: {','.join(ABLATION_NAMES)})")
    p.add_argument("--no-ablations", action="store_true", help="only the main series")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="base config (default configs/demo.yaml)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the config's data.root;"
                   " --quick: datasets/study_quick)")
    p.add_argument("--out", default=str(ROOT / "runs" / NAME), help="folder of the run folders")
    p.add_argument("--json", default=str(RESULTS_DIR / f"{NAME}.json"), help="results file (the PNG goes next to it)")
    p.add_argument("--seed", type=int, default=0, help="train.seed of every run")
    p.add_argument("--keep-finished", action="store_true", help="read back runs that already finished in"
                   " --out with the same command instead of training them again")
    p.add_argument("--run-timeout", type=float, default=None, help="minutes after which a run is stopped and"
                   f" recorded as failed (default: none; --quick: {QUICK_RUN_TIMEOUT_MIN:g})")
    args = p.parse_args(argv)  # fmt: skip
    if args.parallel < 1:
        p.error(f"--parallel: expected >= 1, got {args.parallel}")
    if args.parallel > 1 and args.device == "cpu":
        p.error("--parallel: only with --device cuda (on CPU one run uses all the cores it is given)")
    if args.run_timeout is not None and args.run_timeout <= 0:
        p.error(f"--run-timeout: expected > 0 minutes, got {args.run_timeout}")
    if args.epochs is not None and args.epochs <= 0:
        p.error(f"--epochs: expected > 0, got {args.epochs}")
    if not Path(args.config).is_file():
        p.error(f"--config: {args.config} not found")
    args.error = p.error
    return args


@dataclass
class Plan:
    """Everything the runs need, resolved and checked from the command line."""

    config: Path
    specs: list[RunSpec]
    common: list[str]
    data_root: Path
    synth: Any
    schedules: dict[str, Any]
    settings: dict[str, Any]


def make_plan(args: argparse.Namespace) -> Plan:
    """The runs, their common overrides and data, every run's config checked; ValueError when one cannot work."""
    config = Path(args.config).resolve()
    batches = parse_batches(args.batches or (QUICK_BATCHES if args.quick else ",".join(map(str, DEFAULT_BATCHES))))
    if args.no_ablations:
        ablations: list[str] = []
    elif args.ablations is not None:
        ablations = parse_ablations(args.ablations)
    else:
        ablations = list(QUICK_ABLATIONS if args.quick else ABLATION_NAMES)
    default_root = ROOT / "datasets" / "study_quick" if args.quick else load_config(config).data.root
    data_root = Path(args.data_root or default_root)
    data_root = (data_root if data_root.is_absolute() else ROOT / data_root).resolve()
    common = quick_overrides(data_root) if args.quick else [f"data.root={data_root}"]
    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else None)
    common += [f"solver.epochs={epochs:g}"] if epochs is not None else []
    common.append(f"train.seed={args.seed}")
    common += args.set
    base = load_config(config, common)
    specs = build_run_matrix(batches, ablations, head_norm=main_head_norm(base))
    schedules = resolve_runs(config, specs, common, args.device, args.processes, base.data.synth.num_train)
    settings = {
        "config": str(config), "device": args.device, "processes": args.processes, "parallel": args.parallel,
        "quick": args.quick, "batches": batches, "ablations": ablations, "epochs": base.solver.epochs
        if epochs is None else epochs, "data_root": str(data_root), "synth": asdict(base.data.synth),
        "common_overrides": common, "optimizer": base.solver.optimizer, "base_lr": base.solver.base_lr,
        "reference_batch": base.solver.reference_batch, "lr_scaling": base.solver.lr_scaling, "seed": args.seed,
    }  # fmt: skip
    return Plan(config, specs, common, data_root, base.data.synth, schedules, settings)


def _print_plan(plan: Plan, args: argparse.Namespace) -> None:
    for s in plan.specs:
        info = plan.schedules[s.name]
        nproc, per_device = device_layout(s.global_batch, args.device, args.processes)
        where = f"1 GPU x {per_device} images" if args.device == "cuda" else f"{nproc} processes x {per_device}"
        extra = f" + {' '.join(s.overrides)}" if s.overrides else ""
        print(f"  {s.name}: {where}{extra}; {info.total_iters} iterations, lr {info.lr:.4g}"
              f" ({info.lr_scaling}), warmup {info.warmup_iters}", flush=True)  # fmt: skip


def report(plan: Plan, results: Sequence[RunResult], json_path: Path, total_wall: float) -> Path:
    """Prints the table and the goals, writes the JSON and the PNG; returns the JSON's path."""
    s = plan.settings
    title = (f"{plan.config.name} on {plan.synth.num_train} synthetic images of {plan.synth.image_size} px,"
             f" {s['epochs']:g} epoch(s) at every batch, {s['device']}; AP in % on {plan.synth.num_val} validation"
             " images")  # fmt: skip
    png = plot_study(results, json_path.with_suffix(".png"), title=title)
    goals = goals_check(results)
    ref = reference_run(results)
    payload = {
        "settings": s,
        "megdet_reference": MEGDET_RESULT,
        "goals": {"allowed_drop_by_batch_ratio": {str(k): v for k, v in GOALS.items()},
                  "reference_batch": ref.global_batch if ref else None, "checks": goals,
                  "all_pass": bool(goals) and all(g["pass"] for g in goals)},
        "caveats": step_caveats(plan.schedules),
        "runs": [{**asdict(r), "status_text": r.status_text()} for r in results],
        "plot": str(png),
        "total_wall_s": total_wall,
    }  # fmt: skip
    path = write_results(json_path.stem, payload, results_dir=json_path.parent)
    headers, rows = table_rows(results)
    print_table(f"Large mini-batch study: {title}; d = difference to the smallest batch", headers, rows)
    for line in [*goals_lines(goals), *payload["caveats"]]:
        print(line)
    print(f"MegDet's result: {MEGDET_RESULT}")
    print(f"total {total_wall / 60:.1f} min wall; wrote {path} and {png}", flush=True)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the study; exit status 1 when a run failed for another reason than divergence."""
    args = parse_args(argv)
    try:
        plan = make_plan(args)
    except ValueError as e:  # ConfigError is a ValueError
        args.error(str(e))
    started = time.perf_counter()
    # On a GPU machine the runs wait for the dataset: generate it with every core there.
    workers = CPU_PROCESSES if args.device == "cpu" else max(1, os.cpu_count() or 1)
    generated = ensure_dataset(plan.data_root, plan.synth, workers=workers)
    print(f"dataset {plan.data_root}: {plan.synth.num_train} train / {plan.synth.num_val} val images of"
          f" {plan.synth.image_size} px ({'generated' if generated else 'already there'})")  # fmt: skip
    how = f"{args.parallel} at a time" if args.parallel > 1 else "one at a time"
    print(f"{len(plan.specs)} runs on {args.device}, {how}; logs in {Path(args.out).resolve()}/RUN/train.log")
    _print_plan(plan, args)
    minutes = args.run_timeout if args.run_timeout is not None else (QUICK_RUN_TIMEOUT_MIN if args.quick else None)
    plan.settings["run_timeout_min"] = minutes
    results = run_all(plan.specs, parallel=args.parallel, device=args.device, processes=args.processes,
                      config=plan.config, out_dir=Path(args.out).resolve(), common=plan.common,
                      timeout_s=None if minutes is None else 60.0 * minutes,
                      keep_finished=args.keep_finished)  # fmt: skip
    report(plan, results, Path(args.json).resolve(), time.perf_counter() - started)
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
