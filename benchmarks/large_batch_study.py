"""The large mini-batch study: a small copy of MegDet's main table on the synthetic dataset.

Trains the same detector (configs/study.yaml: ResNet-18 FPN with box and mask heads, from scratch, on
160-pixel synthetic images) at global batch 8, 16, 32 and 64 for the SAME number of epochs, each with
the linearly scaled learning rate (``lr = solver.base_lr x global_batch / solver.reference_batch``;
configs/study.yaml: 0.06 at 16, see there why not COCO's 0.02) and the trainer's warmup rule
(megdet/engine/lr_policy.py: constant in images, capped at a quarter of the run -- on this small data
set the cap binds, so every batch warms up over the same quarter of its images). Then three ablations
at the largest batch:

* no warmup (``solver.warmup=false``): the full scaled lr from the first iteration;
* per-device BN (``model.norm=BN``): each device normalises over its own 2 images;
* frozen BN (``model.norm=FrozenBN``): fixed statistics and affine. The model is trained from
  scratch, so the frozen layers are identity-like and the network has no normalisation at all --
  MegDet's point that frozen BN cannot train a detector from scratch.

How devices are simulated on a 2-core machine
    2 real processes (gloo, ``megdet train --nproc 2``, cross-device BN across them) x
    ``data.images_per_device=2`` x ``train.grad_accum_steps=k``, so that global batch = 4k
    (8 -> k=2, 16 -> 4, 32 -> 8, 64 -> 16). Each accumulation micro-step is one simulated pair of
    devices (one per process), so a batch of B images stands for B/2 devices of 2 images each. The BN
    group of cross-device BN is the 2 processes' 4 images of a micro-step -- NOT all simulated devices
    as in MegDet, where the statistics of a batch-256 step come from all 128 GPUs; per-device BN
    normalises over 2 images. The gradient is that of the mean loss over the whole global batch (the
    trainer divides each micro-step's loss by k and DDP averages over the 2 processes), so the
    optimiser sees exactly what B/2 devices would give it; only the BN statistics differ.

Each configuration is a subprocess ``python -m megdet train --config configs/study.yaml --nproc 2
--out RUN_DIR key=value...``; the trainer evaluates the final model on the validation split (COCO AP
with pycocotools, sharded over the 2 processes) and writes ``RUN_DIR/eval/iter_N/eval.json``, which
this script reads. A run whose loss becomes NaN/inf stops with ``non-finite loss at iteration N``
(exit status 1) and is recorded as "diverged at iteration N". Wall and CPU time are measured per run
(CPU: user + system of the run's processes, the fair measure on a shared machine).

There is no torchvision equivalent of this study (torchvision's detection references have neither
gradient accumulation nor cross-device BN on CPU); the comparison that matters is against the
smallest batch (the validated recipe's regime), so the table reports each run's box AP relative to it.

    python benchmarks/large_batch_study.py            # the study: 7 runs, about 35 min on 2 quiet cores
    python benchmarks/large_batch_study.py --quick    # smoke check: 2 tiny runs

Prints a table, writes benchmarks/results/large_batch_study.json and large_batch_study.png (AP against
global batch, the ablations marked) next to it; the runs go to ``--out`` (runs/large_batch_study).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import RESULTS_DIR, print_table, write_results

from megdet.config import load_config

ROOT = Path(__file__).resolve().parent.parent
NAME = "large_batch_study"
DEFAULT_CONFIG = ROOT / "configs" / "study.yaml"
DEFAULT_BATCHES = (8, 16, 32, 64)
PROCESSES = 2
IMAGES_PER_DEVICE = 2
MAIN_NORM = "CrossDeviceBN"
# Step decays at the same fractions of the run as the 1x schedule (epochs 8 and 11 of 12).
DECAY_FRACTIONS = (8 / 12, 11 / 12)
# Measured on this project's 2-core machine with configs/study.yaml at 160 px: the batch-64 run (2240
# training images) took 579 CPU-s, and 4-iteration runs about 28 CPU-s (start-up, checkpoint, a small
# evaluation). CPU seconds per training image, and per run for start-up, final checkpoint and evaluation
# of 100 validation images; used only to print an estimate before the runs start.
CPU_S_PER_TRAIN_IMAGE = 0.24
CPU_S_PER_RUN = 40.0
# Trained from scratch, the study's detector made no detection at all after 35 steps at batch 64 (base
# lr 0.06 and 0.12 both measured); a run with fewer optimizer steps than this is flagged in the output.
MIN_USEFUL_STEPS = 100
TASKS = ("bbox", "segm", "keypoints")
TASK_LABELS = {"bbox": "box AP", "segm": "mask AP", "keypoints": "keypoint AP"}

SIMULATION_TEXT = (
    f"Simulated devices: {PROCESSES} real processes (gloo, `megdet train --nproc {PROCESSES}`, cross-device"
    f" BN across them) x data.images_per_device={IMAGES_PER_DEVICE} x train.grad_accum_steps=k, so global"
    f" batch = {PROCESSES * IMAGES_PER_DEVICE}k (8 -> k=2, 16 -> 4, 32 -> 8, 64 -> 16). Each accumulation"
    " micro-step is one simulated pair of devices. The BN group of cross-device BN is the 2 processes'"
    " 4 images of a micro-step (not all simulated devices as in MegDet); per-device BN normalises over"
    " 2 images."
)


# --------------------------------------------------------------------------------------------------
# The run matrix (pure)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceLayout:
    """How one global batch is laid out on real processes, images per device and accumulation steps."""

    global_batch: int
    processes: int
    images_per_device: int
    grad_accum_steps: int

    @property
    def images_per_micro_step(self) -> int:
        """Images forwarded at once by all processes together (one micro-step)."""
        return self.processes * self.images_per_device

    @property
    def simulated_devices(self) -> int:
        """Devices of ``images_per_device`` images each that the global batch stands for."""
        return self.global_batch // self.images_per_device

    def bn_group_images(self, norm: str) -> int | None:
        """Images whose batch statistics one normalisation uses; None when no batch statistics are used.

        Cross-device BN with ``model.bn_group_size=0`` shares statistics across all processes, but only
        within a micro-step (the k micro-steps run one after another); plain BN uses each process's own
        images; FrozenBN and GN use no batch statistics.
        """
        if norm == "CrossDeviceBN":
            return self.images_per_micro_step
        if norm == "BN":
            return self.images_per_device
        return None

    def describe(self) -> str:
        """One line: the batch as processes x images x accumulation steps."""
        return (
            f"global batch {self.global_batch} = {self.processes} processes x {self.images_per_device} images"
            f" x {self.grad_accum_steps} accumulation steps ({self.simulated_devices} simulated devices)"
        )


def device_layout(
    global_batch: int, processes: int = PROCESSES, images_per_device: int = IMAGES_PER_DEVICE
) -> DeviceLayout:
    """The layout of ``global_batch`` on ``processes`` x ``images_per_device`` x k accumulation steps.

    Raises:
        ValueError: the batch is not a positive multiple of ``processes x images_per_device``.
    """
    if processes < 1 or images_per_device < 1:
        raise ValueError(
            f"need processes >= 1 and images_per_device >= 1, got {processes}, {images_per_device}"
        )
    step = processes * images_per_device
    if global_batch < step or global_batch % step:
        raise ValueError(
            f"--batches: global batch {global_batch} is not a positive multiple of {step}"
            f" ({processes} processes x {images_per_device} images per device)"
        )
    return DeviceLayout(global_batch, processes, images_per_device, global_batch // step)


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study."""

    name: str
    layout: DeviceLayout
    norm: str = MAIN_NORM
    warmup: bool = True
    ablation: str = ""  # "" for the main series, else what the ablation changes (in words)

    @property
    def global_batch(self) -> int:
        return self.layout.global_batch

    def overrides(self) -> list[str]:
        """The ``key=value`` config overrides that make this run (data and schedule come separately)."""
        return [
            f"data.images_per_device={self.layout.images_per_device}",
            f"train.grad_accum_steps={self.layout.grad_accum_steps}",
            f"model.norm={self.norm}",
            "model.bn_group_size=0",
            f"solver.warmup={'true' if self.warmup else 'false'}",
        ]


ABLATIONS: tuple[tuple[str, str, bool, str], ...] = (
    # (name suffix, norm, warmup, label)
    ("no_warmup", MAIN_NORM, False, "no warmup"),
    ("per_device_bn", "BN", True, "per-device BN (2 images)"),
    ("frozen_bn", "FrozenBN", True, "frozen BN"),
)


def parse_batches(text: str) -> list[int]:
    """``"8,16,32"`` -> [8, 16, 32] (sorted, duplicates removed); a one-line ValueError otherwise."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--batches: expected a comma list of integers, got '{text}'") from None
    if not values:
        raise ValueError("--batches: no batch sizes given")
    return sorted(set(values))


def build_run_matrix(
    batches: Sequence[int],
    *,
    ablations: bool = True,
    processes: int = PROCESSES,
    images_per_device: int = IMAGES_PER_DEVICE,
) -> list[RunSpec]:
    """The main series (cross-device BN with warmup at every batch, smallest first), then the
    ablations at the largest batch when ``ablations``."""
    if not batches:
        raise ValueError("--batches: no batch sizes given")
    ordered = sorted(set(batches))
    specs = [RunSpec(f"batch{b}", device_layout(b, processes, images_per_device)) for b in ordered]
    if ablations:
        largest = specs[-1].layout
        for suffix, norm, warmup, label in ABLATIONS:
            specs.append(RunSpec(f"batch{largest.global_batch}_{suffix}", largest, norm, warmup, label))
    return specs


def schedule_overrides(epochs: float) -> list[str]:
    """Length and step decays: ``epochs`` for every batch, decays at 8/12 and 11/12 of the run."""
    if epochs <= 0:
        raise ValueError(f"--epochs: expected > 0, got {epochs}")
    decays = ",".join(f"{epochs * f:.6g}" for f in DECAY_FRACTIONS)
    return [f"solver.epochs={epochs:g}", f"solver.decay_epochs=[{decays}]"]


def data_overrides(root: Path, image_size: int) -> list[str]:
    """The study's data set, used at its generated size (short side <= long side = ``image_size``)."""
    s = int(image_size)
    return [
        f"data.root={root}",
        f"data.min_size_train=[{s}]",
        f"data.max_size_train={s}",
        f"data.min_size_test={s}",
        f"data.max_size_test={s}",
    ]


def planned_iterations(epochs: float, num_images: int, global_batch: int) -> int:
    """Iterations of a run as the trainer computes them: ``round(epochs x ceil(images / global_batch))``."""
    from megdet.data.sampler import iters_per_epoch

    return max(1, round(epochs * iters_per_epoch(num_images, global_batch)))


def estimate_cpu_seconds(specs: Sequence[RunSpec], epochs: float, num_images: int) -> float:
    """A rough CPU-time estimate of the study from :data:`CPU_S_PER_TRAIN_IMAGE` and :data:`CPU_S_PER_RUN`."""
    images = sum(planned_iterations(epochs, num_images, s.global_batch) * s.global_batch for s in specs)
    return images * CPU_S_PER_TRAIN_IMAGE + len(specs) * CPU_S_PER_RUN


def step_caveats(specs: Sequence[RunSpec], epochs: float, num_images: int,
                 min_steps: int = MIN_USEFUL_STEPS) -> list[str]:
    """One line per batch whose runs get fewer than ``min_steps`` optimizer steps.

    Equal epochs mean ``batch`` times fewer steps at ``batch`` times the lr; MegDet's runs had thousands
    of steps at every batch, this study's largest batch only tens, so a low AP there may say "too few
    steps from scratch" rather than "large batches train worse".
    """
    lines = []
    for batch in sorted({s.global_batch for s in specs}):
        steps = planned_iterations(epochs, num_images, batch)
        if steps < min_steps:
            needed = math.ceil(epochs * min_steps / steps)
            lines.append(
                f"caveat: batch {batch} gets only {steps} optimizer steps ({epochs:g} epochs of {num_images}"
                f" images); from scratch, fewer than {min_steps} steps may be too few to learn anything, so"
                f" its AP may reflect the step count, not the batch (--epochs {needed} gives {min_steps})"
            )
    return lines


# --------------------------------------------------------------------------------------------------
# Reading a run's outputs (pure, on files)
# --------------------------------------------------------------------------------------------------

_NON_FINITE = re.compile(r"non-finite loss at iteration (\d+)")
# The schedule lines every run prints at start-up (ScheduleInfo.summary_lines in megdet/engine/lr_policy.py):
# the fallback for runs that stopped before writing summary.json.
_LOG_PATTERNS: dict[str, tuple[re.Pattern[str], type]] = {
    "lr": (re.compile(r"learning rate: .* = ([0-9.eE+-]+)"), float),
    "total_iters": (re.compile(r"iterations: (\d+) total"), int),
    "warmup_iters": (re.compile(r"warmup: (\d+) iterations"), int),
    "epochs": (re.compile(r"iterations: \d+ total, .*, ([0-9.eE+-]+) epochs\)"), float),
}


def parse_divergence(text: str) -> int | None:
    """The iteration of the trainer's ``non-finite loss at iteration N`` message in ``text``, else None."""
    m = _NON_FINITE.search(text)
    return int(m.group(1)) if m else None


def parse_schedule_log(text: str) -> dict[str, Any]:
    """``lr``, ``total_iters``, ``warmup_iters`` and ``epochs`` from a training log's start-up lines
    (the keys found)."""
    out: dict[str, Any] = {}
    for key, (pattern, kind) in _LOG_PATTERNS.items():
        m = pattern.search(text)
        if m:
            try:
                out[key] = kind(m.group(1))
            except ValueError:
                continue
    return out


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


_SCHEDULE_KEYS = ("total_iters", "lr", "warmup_iters", "epochs", "iters_per_epoch", "global_batch",
                  "grad_accum_steps", "world_size", "decay_iters")


def read_run_outputs(run_dir: Path) -> dict[str, Any]:
    """What a finished (or stopped) training run left in ``run_dir``.

    Returns ``iterations`` (done), ``schedule`` (from summary.json: total_iters, lr, warmup_iters,
    epochs, ...; empty when the run did not finish), ``ap`` ({task: AP %} of the final evaluation, from
    ``eval/iter_N/eval.json``, else the last ``eval`` line of metrics.jsonl at that iteration),
    ``eval_file`` and ``final_loss`` (total loss of the last logged window).
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
    return {
        "iterations": iterations,
        "schedule": {k: summary[k] for k in _SCHEDULE_KEYS if k in summary},
        "ap": ap,
        "eval_file": eval_file,
        "final_loss": float(losses[-1]["total_loss"]) if losses else None,
    }


# --------------------------------------------------------------------------------------------------
# Results (pure)
# --------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """One run's outcome, as stored in the JSON."""

    name: str
    global_batch: int
    grad_accum_steps: int
    simulated_devices: int
    norm: str
    bn_group_images: int | None
    warmup: bool
    ablation: str
    status: str  # "ok" | "diverged" | "failed"
    diverged_at: int | None = None
    iterations: int = 0  # optimizer steps applied
    total_iters: int | None = None
    warmup_iters: int | None = None
    lr: float | None = None  # the scaled peak learning rate
    epochs: float | None = None
    ap: dict[str, float] = field(default_factory=dict)  # task -> AP in percent
    final_loss: float | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0
    exit_code: int = 0
    error: str = ""
    run_dir: str = ""
    eval_file: str | None = None
    command: list[str] = field(default_factory=list)

    def status_text(self) -> str:
        """"ok", "diverged at iteration N" or "failed (exit N)"."""
        if self.status == "diverged":
            return f"diverged at iteration {self.diverged_at}"
        if self.status == "failed":
            return f"failed (exit {self.exit_code})"
        return "ok"


def make_result(
    spec: RunSpec,
    outputs: Mapping[str, Any],
    *,
    exit_code: int,
    log_text: str,
    wall_s: float,
    cpu_s: float,
    run_dir: str = "",
    command: Sequence[str] = (),
) -> RunResult:
    """Combines a spec, its run's outputs (:func:`read_run_outputs`), exit status and log into a result.

    A non-zero exit whose log holds ``non-finite loss at iteration N`` is a divergence; any other
    non-zero exit is a failure, with the last error-looking line of the log as ``error``.
    """
    diverged_at = parse_divergence(log_text) if exit_code != 0 else None
    if exit_code == 0:
        status, error = "ok", ""
    elif diverged_at is not None:
        status, error = "diverged", ""
    else:
        status = "failed"
        lines = [line.strip() for line in log_text.splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        error = (errors or lines or [""])[-1][:300]
    sched = {**parse_schedule_log(log_text), **outputs.get("schedule", {})}
    ok = status == "ok"
    return RunResult(
        name=spec.name,
        global_batch=spec.global_batch,
        grad_accum_steps=spec.layout.grad_accum_steps,
        simulated_devices=spec.layout.simulated_devices,
        norm=spec.norm,
        bn_group_images=spec.layout.bn_group_images(spec.norm),
        warmup=spec.warmup,
        ablation=spec.ablation,
        status=status,
        diverged_at=diverged_at,
        # The loss of iteration N was non-finite, so N - 1 updates were applied.
        iterations=diverged_at - 1 if diverged_at is not None else int(outputs.get("iterations", 0)),
        total_iters=sched.get("total_iters"),
        warmup_iters=sched.get("warmup_iters"),
        lr=sched.get("lr"),
        epochs=sched.get("epochs"),
        ap=dict(outputs.get("ap", {})) if ok else {},
        final_loss=outputs.get("final_loss"),
        wall_s=wall_s,
        cpu_s=cpu_s,
        exit_code=exit_code,
        error=error,
        run_dir=run_dir,
        eval_file=outputs.get("eval_file") if ok else None,
        command=list(command),
    )


def reference_run(results: Sequence[RunResult]) -> RunResult | None:
    """The main-series run with the smallest batch: what every run is compared with."""
    main = [r for r in results if not r.ablation]
    return min(main, key=lambda r: r.global_batch) if main else None


def relative_ap(result: RunResult, reference: RunResult | None, task: str = "bbox") -> float | None:
    """``result``'s AP of ``task`` divided by the reference's; None when either is missing or zero."""
    if reference is None:
        return None
    a, b = result.ap.get(task), reference.ap.get(task)
    if a is None or b is None or b <= 0:
        return None
    return a / b


def predicted_tasks(results: Sequence[RunResult]) -> list[str]:
    """The tasks (bbox, segm, keypoints) that at least one run reported an AP for, in that order."""
    return [t for t in TASKS if any(t in r.ap for r in results)]


def table_rows(results: Sequence[RunResult]) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows of the printed table (AP in percent, box AP relative to the reference run)."""
    tasks = predicted_tasks(results) or ["bbox"]
    ref = reference_run(results)
    headers = ["run", "batch", "k", "sim. devices", "norm", "BN images", "warmup it", "peak lr", "iters"]
    headers += [TASK_LABELS[t] for t in tasks]
    headers += [f"box AP / batch {ref.global_batch}" if ref else "box AP / ref", "status", "wall s", "CPU s"]
    rows = []
    for r in results:
        row: list[Any] = [r.name, r.global_batch, r.grad_accum_steps, r.simulated_devices, r.norm]
        row += ["none" if r.bn_group_images is None else r.bn_group_images, r.warmup_iters, r.lr]
        row += [f"{r.iterations}/{r.total_iters if r.total_iters is not None else '?'}"]
        row += [r.ap.get(t) for t in tasks]
        row += [relative_ap(r, ref), r.status_text(), r.wall_s, r.cpu_s]
        rows.append(row)
    return headers, rows


_COLORS = {"bbox": "tab:blue", "segm": "tab:orange", "keypoints": "tab:green"}
_ABLATION_MARKERS = ("s", "^", "D", "v", "P", "*")


def _mark_failure(ax: Any, x: float, r: RunResult) -> None:
    label = f"batch {r.global_batch}" + (f", {r.ablation}" if r.ablation else "") + f": {r.status}"
    ax.plot([x], [0.0], "x", color="tab:red", ms=9, mew=2, ls="none", label=label)
    ax.annotate(r.status_text().replace(" at iteration ", " @ it "), (x, 0.0), textcoords="offset points",
                xytext=(3, 5), fontsize=7, color="tab:red", rotation=45)


def plot_study(results: Sequence[RunResult], path: Path, title: str = "") -> Path:
    """PNG of AP (%) against global batch (log-2 axis): the main series as one line per task, the
    ablations as marked points at their batch (nudged apart), runs without AP as red crosses at 0."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    tasks = predicted_tasks(results) or ["bbox"]
    fig = Figure(figsize=(7.5, 4.5), dpi=100)  # a Figure without pyplot: no global state
    ax = fig.subplots()
    main = sorted((r for r in results if not r.ablation), key=lambda r: r.global_batch)
    for task in tasks:
        pts = [(r.global_batch, r.ap[task]) for r in main if task in r.ap]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "-o", color=_COLORS[task], label=f"{TASK_LABELS[task]}: cross-device BN + warmup")
    for r in main:
        if r.status != "ok":
            _mark_failure(ax, r.global_batch, r)
    for i, r in enumerate(r for r in results if r.ablation):
        x = r.global_batch * 2 ** (0.1 * (i + 1))  # nudged right: several ablations share one batch
        marker = _ABLATION_MARKERS[i % len(_ABLATION_MARKERS)]
        if r.status == "ok":
            for task in tasks:
                if task in r.ap:
                    ax.plot([x], [r.ap[task]], marker, color=_COLORS[task], ms=8, ls="none")
            ax.plot([], [], marker, color="grey", ls="none", label=f"batch {r.global_batch}, {r.ablation}")
        else:
            _mark_failure(ax, x, r)
    batches = sorted({r.global_batch for r in results})
    ax.set_xscale("log", base=2)
    if batches:
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlim(batches[0] / 1.4, batches[-1] * 1.8)
    top = max([1.0] + [v * 1.15 for r in results for v in r.ap.values()])
    ax.set_ylim(-0.04 * top, top)  # a little below 0 so that the crosses of failed runs show whole
    ax.set_xlabel("global batch (images)")
    ax.set_ylabel("AP (%)")
    ax.set_title(title or "large mini-batch study", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=7, loc="best")
    fig.subplots_adjust(left=0.09, right=0.97, bottom=0.12, top=0.9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# --------------------------------------------------------------------------------------------------
# Running (subprocesses)
# --------------------------------------------------------------------------------------------------


def ensure_dataset(root: Path, num_train: int, num_val: int, image_size: int, seed: int = 0) -> bool:
    """Generates the synthetic data set into ``root`` unless the one there has the same settings
    (recorded in ``root/synth.json``, as ``megdet demo`` records them); True when it generated."""
    from megdet.data.synthetic import ensure_synthetic_coco

    return ensure_synthetic_coco(root, num_train=num_train, num_val=num_val, image_size=image_size, seed=seed,
                                 workers=PROCESSES, progress=False)  # fmt: skip


def _children_cpu_s() -> float:
    # Finished, reaped children and their reaped descendants (the launcher reaps the workers, they
    # reap their data-loader workers): the CPU time of a whole run.
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _prepare_run_dir(run_dir: Path) -> None:
    if run_dir.exists():
        if not ((run_dir / "train.log").is_file() or (run_dir / "config.yaml").is_file()):
            raise SystemExit(f"error: {run_dir} exists and is not a run of this study; choose another --out")
        shutil.rmtree(run_dir)  # every run starts fresh: the trainer refuses a folder with checkpoints
    run_dir.mkdir(parents=True)


def train_command(spec: RunSpec, *, config: Path, run_dir: Path, extra: Sequence[str]) -> list[str]:
    """The ``python -m megdet train`` command line of one run."""
    return [sys.executable, "-m", "megdet", "train", "--config", str(config),
            "--nproc", str(spec.layout.processes), "--out", str(run_dir), *extra, *spec.overrides()]


def run_one(spec: RunSpec, *, config: Path, out_dir: Path, extra: Sequence[str]) -> RunResult:
    """Trains ``spec`` in a subprocess (its output in RUN_DIR/train.log) and collects its result."""
    run_dir = out_dir / spec.name
    _prepare_run_dir(run_dir)
    cmd = train_command(spec, config=config, run_dir=run_dir, extra=extra)
    log_path = run_dir / "train.log"
    cpu0, t0 = _children_cpu_s(), time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    wall, cpu = time.perf_counter() - t0, _children_cpu_s() - cpu0
    return make_result(spec, read_run_outputs(run_dir), exit_code=rc,
                       log_text=log_path.read_text(errors="replace"), wall_s=wall, cpu_s=cpu,
                       run_dir=str(run_dir), command=cmd)


def _one_line(r: RunResult) -> str:
    ap = ", ".join(f"{TASK_LABELS[t]} {v:.1f}" for t, v in r.ap.items()) or "no AP"
    line = (f"  -> {r.status_text()}; {r.iterations}/{r.total_iters} iterations; {ap};"
            f" {r.wall_s:.0f} s wall, {r.cpu_s:.0f} s CPU")
    return line + (f"\n     {r.error}" if r.error else "")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the study; exit status 1 when a run failed for another reason than divergence."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke check: the first 2 batches, 1 epoch, 32/8 images of 128 px, no ablations")
    p.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)),
                   help="global batches, multiples of 4 (default 8,16,32,64)")
    p.add_argument("--epochs", type=float, default=None, help="epochs of every run (default 5; --quick 1)")
    p.add_argument("--train-images", type=int, default=None, help="synthetic training images (default 400)")
    p.add_argument("--val-images", type=int, default=None, help="synthetic validation images (default 100)")
    p.add_argument("--image-size", type=int, default=None, help="long side of the images in px (default 160)")
    p.add_argument("--skip-ablations", action="store_true", help="only the main series")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="base config (default configs/study.yaml)")
    p.add_argument("--data-root", default=None,
                   help="synthetic data set folder (default datasets/study; --quick: datasets/study_quick)")
    p.add_argument("--out", default=str(ROOT / "runs" / NAME), help="folder of the run folders")
    p.add_argument("--seed", type=int, default=0, help="train.seed of every run")
    args = p.parse_args(argv)

    quick = args.quick
    epochs = args.epochs if args.epochs is not None else (1.0 if quick else 5.0)
    num_train = args.train_images if args.train_images is not None else (32 if quick else 400)
    num_val = args.val_images if args.val_images is not None else (8 if quick else 100)
    image_size = args.image_size if args.image_size is not None else (128 if quick else 160)
    for flag, value, low in (("--train-images", num_train, 1), ("--val-images", num_val, 1),
                             ("--image-size", image_size, 64)):
        if value < low:
            p.error(f"{flag}: expected >= {low}, got {value}")
    data_root = Path(args.data_root or ROOT / "datasets" / ("study_quick" if quick else "study"))
    data_root = data_root if data_root.is_absolute() else Path.cwd() / data_root
    config = Path(args.config).resolve()
    if not config.is_file():
        p.error(f"--config: {config} not found")
    out_dir = Path(args.out).resolve()
    try:
        batches = parse_batches(args.batches)[: 2 if quick else None]
        specs = build_run_matrix(batches, ablations=not (args.skip_ablations or quick))
        common = [*data_overrides(data_root, image_size), *schedule_overrides(epochs)]
        common.append(f"train.seed={args.seed}")
        # Every run's config is checked before the first one starts (ConfigError is a ValueError).
        solver = [load_config(config, [*common, *s.overrides()]).solver for s in specs][0]
    except ValueError as e:
        p.error(str(e))

    print(SIMULATION_TEXT, flush=True)
    started = time.perf_counter()
    generated = ensure_dataset(data_root, num_train, num_val, image_size)
    print(f"data set {data_root}: {num_train} train / {num_val} val images of {image_size} px"
          f" ({'generated' if generated else 'already there'})")
    estimate = estimate_cpu_seconds(specs, epochs, num_train)
    print(f"{len(specs)} runs of {epochs:g} epochs each; estimated {estimate / 60:.0f} CPU-minutes, about"
          f" {estimate / 60 / PROCESSES:.0f} min on {PROCESSES} otherwise idle cores", flush=True)
    caveats = step_caveats(specs, epochs, num_train)
    for line in caveats:
        print(line, flush=True)

    results: list[RunResult] = []
    for i, spec in enumerate(specs, 1):
        what = f"{spec.norm}, warmup {'on' if spec.warmup else 'off'}"
        what += f" [ablation: {spec.ablation}]" if spec.ablation else ""
        print(f"[{i}/{len(specs)}] {spec.name}: {spec.layout.describe()}; {what}", flush=True)
        print(f"  log: {out_dir / spec.name / 'train.log'}", flush=True)
        results.append(run_one(spec, config=config, out_dir=out_dir, extra=common))
        print(_one_line(results[-1]), flush=True)
    total_wall = time.perf_counter() - started

    title = (f"{num_train} synthetic images of {image_size} px, {epochs:g} epochs at every batch,"
             f" lr = {solver.base_lr:g} x batch / {solver.reference_batch}")
    png = plot_study(results, RESULTS_DIR / f"{NAME}.png", title=title)
    ref = reference_run(results)
    total_cpu = sum(r.cpu_s for r in results)
    payload = {
        "quick": quick,
        "simulation": SIMULATION_TEXT,
        "settings": {
            "config": str(config), "epochs": epochs, "train_images": num_train, "val_images": num_val,
            "image_size": image_size, "data_root": str(data_root), "batches": batches,
            "processes": PROCESSES, "images_per_device": IMAGES_PER_DEVICE, "seed": args.seed,
            "common_overrides": common, "base_lr": solver.base_lr, "reference_batch": solver.reference_batch,
        },
        "caveats": caveats,
        "reference_run": ref.name if ref else None,
        "runs": [{**asdict(r), "status_text": r.status_text(),
                  "box_ap_relative_to_reference": relative_ap(r, ref)} for r in results],
        "plot": str(png),
        "total_wall_s": total_wall,
        "total_cpu_s": total_cpu,
    }
    path = write_results(NAME, payload)
    headers, rows = table_rows(results)
    print_table(f"Large mini-batch study: {num_train} synthetic training images of {image_size} px,"
                f" {epochs:g} epochs at every batch; AP in % on {num_val} validation images", headers, rows)
    print(f"\n{SIMULATION_TEXT}")
    for line in caveats:
        print(line)
    print(f"total {total_wall / 60:.1f} min wall, {total_cpu / 60:.1f} CPU-min; wrote {path} and {png}")
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
