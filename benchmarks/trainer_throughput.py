"""Images/s of ``megdet train`` against the training-step benchmark: is the trainer fed fast enough?

Runs ``python -m megdet train`` on the synthetic dataset (generated here unless ``--data-dir`` names
one: 640-px images, about COCO's size) with the model of ``benchmarks/train_step.py``
(``train_step.ours_overrides``: R50-FPN, FrozenBN, 3 trainable stages, 512 RoIs per image), images
resized to the step benchmark's size (short side H, long side <= W), ``--batch`` images per step,
``--workers`` loader workers, a small learning rate (random weights), no evaluation, for ``--iters``
iterations logged every ``--log-period``. Everything the trainer does per iteration counts: waiting
for the loader, the host-to-device copy, normalisation on the device, forward, backward, the
optimizer, loss logging. From ``metrics.jsonl``: the median images/s over the logged windows after the
first (which holds the warm-up), and the time per iteration spent waiting for the loader
(``data_time``). With ``--reference`` (train_step.py's JSON), the ratio to the step benchmark's
``ours`` images/s at the same model, batch, size and precision; the issue's goal is >= 0.9.

The synthetic images vary in aspect ratio (short side 0.6-1.0 of the long one), so after resizing
they are up to the benchmark's HxW and padded to the largest of their batch: the trainer's images have
at most the benchmark's pixels, about as many at a batch of 8.

    python benchmarks/trainer_throughput.py --device cuda --batch 8 --reference benchmarks/results/train_step_cuda.json

Writes benchmarks/results/trainer_throughput.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def ensure_data(data_dir: Path | None, work: Path, num_train: int, image_size: int) -> Path:
    """``data_dir`` as given, or a synthetic training split generated under ``work``."""
    if data_dir is not None:
        return data_dir
    from megdet.data.layout import split_files
    from megdet.data.synthetic import generate_synthetic_coco

    root = work / f"synth_{num_train}_{image_size}"
    if not split_files(root, "train").instances.is_file():
        t = time.perf_counter()
        workers = max(1, min(8, os.cpu_count() or 1))
        generate_synthetic_coco(root, num_train=num_train, num_val=0, image_size=image_size, seed=0,
                                workers=workers, progress=False)  # fmt: skip
        print(f"generated {num_train} synthetic {image_size}-px images in {root} ({time.perf_counter() - t:.1f} s)")
    return root


def train_overrides(args: argparse.Namespace, data: Path, out: Path) -> list[str]:
    """The ``megdet train`` overrides: the step benchmark's model, its image size and batch, a short run."""
    from train_step import ours_overrides

    h, w = args.hw
    return [
        *ours_overrides(args.model),
        f"data.root={data}", "data.train_split=train", f"data.images_per_device={args.batch}",
        f"data.min_size_train=[{h}]", f"data.max_size_train={w}", f"data.num_workers={args.workers}",
        f"train.device={args.device}", f"train.amp={'bf16' if args.precision == 'bf16' else 'off'}",
        f"train.max_iters={args.iters}", f"train.log_period={args.log_period}",
        f"train.checkpoint_period={args.iters}", "train.keep_checkpoints=1", f"train.out_dir={out}",
        # Random weights: a small lr keeps the losses finite (a non-finite loss stops the run).
        "solver.base_lr=0.0002", "test.eval_period=-1",
        *args.set,
    ]  # fmt: skip


def run_trainer(overrides: list[str], log: Path, timeout: float) -> tuple[int, float]:
    """(exit code, seconds) of ``python -m megdet train`` with ``overrides``, its output in ``log``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    t = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run([sys.executable, "-m", "megdet", "train", *overrides], stdout=f,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=timeout).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t


def read_windows(metrics: Path) -> list[dict[str, Any]]:
    """The training records of ``metrics.jsonl`` (one per logged window), in order."""
    if not metrics.is_file():
        return []
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in lines if "images_per_s" in r]


def reference_rate(path: Path, model: str, batch: int, hw: tuple[int, int], precision: str) -> float | None:
    """``ours`` images/s of train_step.py's JSON at this model, batch, size and precision (None: not there)."""
    data = json.loads(path.read_text())
    for c in data.get("configs", []):
        if (c["model"], c["batch"], c["height"], c["width"]) == (model, batch, *hw):
            for r in c["rows"]:
                if (r["impl"], r["precision"]) == ("ours", precision):
                    return float(r["images_per_s"])
    return None


def summarise(windows: list[dict[str, Any]], log_period: int, batch: int) -> dict[str, Any]:
    """Median images/s and mean loader wait over the windows after the first (the warm-up's)."""
    measured = windows[1:] if len(windows) > 1 else windows
    if not measured:
        return {"windows": 0, "images_per_s": None, "data_time_s": None, "data_fraction": None}
    ips = statistics.median(w["images_per_s"] for w in measured)
    data_time = statistics.mean(w.get("data_time", 0.0) for w in measured)
    iteration_s = batch / ips
    return {
        "windows": len(measured), "window_iters": log_period, "images_per_s": ips,
        "window_images_per_s": [w["images_per_s"] for w in windows], "iteration_s": iteration_s,
        "data_time_s": data_time, "data_fraction": data_time / iteration_s,
        "memory_mb": max(w.get("memory_mb", 0.0) for w in measured),
    }  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--device", default="cuda", help="train.device (cuda | cpu)")
    ap.add_argument("--model", default="faster", choices=["faster", "mask"])
    ap.add_argument("--batch", type=int, default=8, help="data.images_per_device")
    ap.add_argument("--size", default="800x1216", help="HxW: short side H, long side <= W")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: train.amp=bf16")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--log-period", type=int, default=10)
    ap.add_argument("--workers", type=int, default=8, help="data.num_workers")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--num-train", type=int, default=128, help="synthetic images to generate")
    ap.add_argument("--image-size", type=int, default=640, help="their long side")
    ap.add_argument("--work-dir", type=Path, default=None, help="data and run folder (default: a temporary one)")
    ap.add_argument("--reference", type=Path, default=None, help="train_step.py's JSON")
    ap.add_argument("--goal", type=float, default=0.9, help="trainer / step images/s to reach")
    ap.add_argument("--timeout", type=float, default=600, help="seconds the training run may take")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more megdet train overrides")
    ap.add_argument("--out", type=Path, default=RESULTS / "trainer_throughput.json")
    args = ap.parse_args(argv)
    h, _, w = args.size.lower().partition("x")
    args.hw = (int(h), int(w or h))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Generates data if needed, runs the trainer, compares with the reference; writes and returns the JSON."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="megdet_trainer_throughput_") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = ensure_data(args.data_dir, work, args.num_train, args.image_size)
        out_dir = work / "run"
        overrides = train_overrides(args, data, out_dir)
        log = work / "train.log"
        print(f"megdet train {' '.join(overrides)}", flush=True)
        rc, seconds = run_trainer(overrides, log, args.timeout)
        tail = log.read_text().splitlines()[-15:]
        print("\n".join(f"  | {line}" for line in tail), flush=True)
        summary = summarise(read_windows(out_dir / "metrics.jsonl"), args.log_period, args.batch)
    ref = reference_rate(args.reference, args.model, args.batch, args.hw, args.precision) if args.reference else None
    ratio = summary["images_per_s"] / ref if ref and summary["images_per_s"] else None
    result = {
        "benchmark": "trainer_throughput", "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "model": args.model, "batch": args.batch, "height": args.hw[0], "width": args.hw[1],
        "precision": args.precision, "device": args.device, "workers": args.workers, "iters": args.iters,
        "overrides": overrides, "exit_code": rc, "train_s": seconds, "log_tail": tail, **summary,
        "reference": str(args.reference) if args.reference else None, "reference_images_per_s": ref,
        "ratio_to_step_benchmark": ratio, "goal": args.goal,
        "meets_goal": None if ratio is None else ratio >= args.goal,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    ips, dt = summary["images_per_s"], summary["data_fraction"]
    print(f"megdet train (exit {rc}, {seconds:.0f} s): "
          f"{'-' if ips is None else f'{ips:.2f}'} images/s over {summary['windows']} windows, waiting for data "
          f"{'-' if dt is None else f'{dt:.1%}'} of the time; step benchmark {'-' if ref is None else f'{ref:.2f}'} "
          f"images/s; ratio {'-' if ratio is None else f'{ratio:.3f}'} (goal >= {args.goal}); wrote {args.out}")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
