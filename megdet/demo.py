"""`megdet demo`: the main job on the embedded default dataset, from nothing to a report.

1. generate the synthetic COCO-format dataset (skipped when the same one is already there);
2. train one boxes + masks + keypoints model with N local processes (cross-device BN across them,
   the linear-scaled learning rate with warmup); the trainer's own final evaluation, sharded over the
   N processes, is the single-scale result;
3. evaluate it with test-time augmentation (and single-scale, if training did not);
4. draw predictions on 8 validation images;
5. write ``OUT/report.md`` with the AP tables, the loss / lr / AP plots, the example images and the
   time (wall clock and CPU) of every phase.

The default config, ``configs/demo.yaml``, is sized to finish within 15 minutes on two CPU cores.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megdet.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from torch import nn

DEFAULT_CONFIG = "configs/demo.yaml"
# What run_demo writes into OUT (and removes first, so that a second demo starts from scratch).
_OUTPUTS = ("train", "eval", "eval_tta", "examples")


def ensure_synthetic_dataset(root: str | Path, synth_cfg: Any, workers: int = 2, progress: bool = True) -> bool:
    """The config's synthetic dataset (``data.synth``) in ``root``, generated unless already there with
    the same settings (:func:`megdet.data.synthetic.ensure_synthetic_coco`); True when it generated."""
    from megdet.data.synthetic import ensure_synthetic_coco

    return ensure_synthetic_coco(root, **asdict(synth_cfg), workers=workers, progress=progress)


def resolve_demo_config(config: str | Path | None) -> Path:
    """``config``, or ``configs/demo.yaml`` (in the working directory, else in the source checkout)."""
    if config is not None:
        return Path(config)
    local = Path(DEFAULT_CONFIG)
    if local.is_file():
        return local
    packaged = Path(__file__).resolve().parent.parent / DEFAULT_CONFIG
    if packaged.is_file():
        return packaged
    raise ConfigError(f"{DEFAULT_CONFIG}: demo config not found; run from the megdet checkout or pass --config")


class _PhaseClock:
    """Wall-clock and CPU seconds per phase; CPU counts this process and its finished children
    (the training workers), user + system."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._start = time.perf_counter()
        self._cpu_start = self._cpu_now()

    @staticmethod
    def _cpu_now() -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    def start(self) -> tuple[float, float]:
        return time.perf_counter(), self._cpu_now()

    def stop(self, name: str, started: tuple[float, float]) -> None:
        self.wall[name] = time.perf_counter() - started[0]
        self.cpu[name] = self._cpu_now() - started[1]

    def finish(self) -> None:
        self.wall["total"] = time.perf_counter() - self._start
        self.cpu["total"] = self._cpu_now() - self._cpu_start


def _final_eval_dir(train_dir: Path, iteration: int) -> Path:
    # Where the trainer's evaluation at the end of training wrote its results (megdet/engine/trainer.py).
    return train_dir / "eval" / f"iter_{iteration:07d}"


def run_demo(
    out_dir: str | Path = "runs/demo",
    config: str | Path | None = None,
    nproc: int = 2,
    overrides: Sequence[str] = (),
    num_examples: int = 8,
    score_threshold: float = 0.3,
) -> dict[str, Any]:
    """Runs the whole demo and returns what the report shows.

    Args:
        out_dir: output folder; its ``train``, ``eval``, ``eval_tta`` and ``examples`` subfolders are
            replaced.
        config: the demo config (default :data:`DEFAULT_CONFIG`).
        nproc: training processes (local, elastic launcher); 1 trains in this process.
        overrides: ``key.sub=value`` config overrides, applied to every phase.
        num_examples: validation images to draw predictions on.
        score_threshold: the example images show detections scoring at least this (lower than
            ``megdet predict``'s 0.5 default: a model trained for minutes scores its hits lower).

    Returns:
        ``{"single": eval.json dict, "tta": eval.json dict, "times": {phase: s}, "cpu_times": {phase: s},
        "report": path}``; the same is written to ``OUT/demo.json``.
    """
    from megdet.evaluation.report import plot_training_curves, write_report

    if nproc < 1:
        raise ConfigError(f"--nproc: expected >= 1, got {nproc}")
    config = resolve_demo_config(config)
    out = Path(out_dir)
    train_dir = out / "train"
    overrides = list(overrides)
    cfg = load_config(config, [*overrides, f"train.out_dir={train_dir}"])
    cfg.validate(nproc)  # before deleting the last demo's outputs or generating data
    _remove_outputs(out)
    clock = _PhaseClock()

    _make_dataset(cfg, nproc, clock)
    _train(cfg, config, overrides, nproc, train_dir, clock)
    model, cfg, meta, summary = _load_trained(train_dir)
    final_eval = _final_eval_dir(train_dir, int(meta.get("iteration", summary.get("iteration", -1))))
    single, tta = _evaluate(model, cfg, final_eval, out, clock)
    images = _draw_examples(model, cfg, meta, out / "examples", num_examples, score_threshold, clock)

    print("[demo 5/5] report", flush=True)
    plots = plot_training_curves(train_dir / "metrics.jsonl", out)
    clock.finish()
    facts = _facts(cfg, config, overrides, nproc, summary, clock)
    title = "megdet demo: boxes + masks + keypoints on the synthetic dataset"
    tables = {"single-scale": single, "TTA": tta}
    report = write_report(out / "report.md", title, tables, plots, images, facts)
    result = {"single": single, "tta": tta, "times": clock.wall, "cpu_times": clock.cpu,
              "report": str(report)}  # fmt: skip
    (out / "demo.json").write_text(json.dumps(result, indent=2, default=float))
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in clock.wall.items())
    print(f"[demo] done ({phases}): {report}", flush=True)
    return result


def _remove_outputs(out: Path) -> None:
    """Removes the last demo's outputs from ``out`` (other files stay) and creates ``out``."""
    for name in _OUTPUTS:
        if (out / name).exists():
            shutil.rmtree(out / name)
    out.mkdir(parents=True, exist_ok=True)


def _make_dataset(cfg: Config, nproc: int, clock: _PhaseClock) -> None:
    """Phase 1: the config's synthetic dataset, unless already there."""
    print(f"[demo 1/5] synthetic dataset in {cfg.data.root}", flush=True)
    t = clock.start()
    generated = ensure_synthetic_dataset(cfg.data.root, cfg.data.synth, workers=max(1, nproc))
    clock.stop("data", t)
    if not generated:
        print(f"[demo] {cfg.data.root} already holds this dataset; not regenerated", flush=True)


def _train(
    cfg: Config, config: Path, overrides: list[str], nproc: int, train_dir: Path, clock: _PhaseClock
) -> None:
    """Phase 2: training into ``train_dir``, in ``nproc`` local processes or in this one."""
    from megdet.distributed import launch_local

    print(f"[demo 2/5] training with {nproc} process(es)", flush=True)
    t = clock.start()
    if nproc > 1:
        args = ["train", "--config", str(config), "--out", str(train_dir), *overrides]
        rc = launch_local(nproc, args)
        if rc:
            raise RuntimeError(f"training failed (exit status {rc}); see {train_dir}")
    else:
        from megdet.engine.trainer import train

        train(cfg)
    clock.stop("train", t)


def _load_trained(train_dir: Path) -> tuple[nn.Module, Config, dict[str, Any], dict[str, Any]]:
    """The latest checkpoint's model, config and metadata, and the run's ``summary.json`` ({} when absent)."""
    from megdet.checkpoint import CheckpointManager
    from megdet.evaluation.loading import load_model_and_metadata

    ckpt = CheckpointManager(train_dir).latest()
    if ckpt is None:
        raise RuntimeError(f"{train_dir}: training wrote no checkpoint")
    model, cfg, meta = load_model_and_metadata(ckpt)
    summary_file = train_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return model, cfg, meta, summary


def _evaluate(
    model: nn.Module, cfg: Config, trained_eval: Path, out: Path, clock: _PhaseClock
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Phase 3: the single-scale results (the trainer's final evaluation in ``trained_eval`` when it
    made one) into ``out/eval`` and the TTA results into ``out/eval_tta``."""
    from megdet.evaluation.coco_eval import format_eval_table
    from megdet.evaluation.inference import evaluate_model

    print("[demo 3/5] evaluation, single scale and with test-time augmentation", flush=True)
    t = clock.start()
    if (trained_eval / "eval.json").is_file():
        # The trainer already evaluated the final model, sharded over its processes: reuse it.
        shutil.copytree(trained_eval, out / "eval")
        single = json.loads((out / "eval" / "eval.json").read_text())
        print(f"single scale (evaluated at the end of training, {trained_eval}):\n{format_eval_table(single)}")
    else:
        single = evaluate_model(model, cfg, out_dir=out / "eval")
    clock.stop("eval", t)
    t = clock.start()
    tta = evaluate_model(model, cfg, out_dir=out / "eval_tta", tta=True)
    clock.stop("eval_tta", t)
    return single, tta


def _draw_examples(
    model: nn.Module, cfg: Config, meta: dict[str, Any], out: Path, num_examples: int, score_threshold: float,
    clock: _PhaseClock,
) -> list[Path]:  # fmt: skip
    """Phase 4: predictions drawn on the first ``num_examples`` validation images; returns the drawings."""
    from megdet.data.loader import build_test_dataset
    from megdet.evaluation.predict import category_info, predict_files

    print(f"[demo 4/5] drawing predictions on {num_examples} validation images", flush=True)
    t = clock.start()
    val = build_test_dataset(cfg, cfg.data.val_split)
    paths = [val.image_path(i) for i in range(min(num_examples, len(val)))]
    predict_files(model, cfg, paths, out, category_info(cfg, meta), score_threshold=score_threshold)
    images = [out / f"{Path(p).stem}.png" for p in paths]
    clock.stop("examples", t)
    return images


def _facts(
    cfg: Config, config: Path, overrides: list[str], nproc: int, summary: dict[str, Any], clock: _PhaseClock
) -> dict[str, Any]:
    """The report's table of facts: config, model, data, schedule, TTA views and phase times."""
    tta_cfg = cfg.test.tta
    return {
        "config": str(config) + (" " + " ".join(overrides) if overrides else ""),
        "processes": nproc,
        "model": f"{cfg.model.backbone} FPN ({cfg.model.fpn_channels} ch), norm {cfg.model.norm}, "
        f"pooler {cfg.model.roi.pooler}",
        "train / val images": f"{cfg.data.synth.num_train} / {cfg.data.synth.num_val} "
        f"({cfg.data.synth.image_size} px)",
        **{k: v for k, v in summary.items() if k in ("global_batch", "lr", "warmup_iters", "total_iters")},
        "TTA": f"short sides {tta_cfg.min_sizes}, flip {tta_cfg.flip}, merge {tta_cfg.box_merge}",
        **{f"time {k} (s, wall / CPU)": f"{clock.wall[k]:.0f} / {clock.cpu[k]:.0f}" for k in clock.wall},
    }
