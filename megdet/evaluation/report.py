"""The run report: loss/lr/AP plots from ``metrics.jsonl`` and a Markdown summary with AP tables."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TASK_KEYS = {
    "bbox": ["AP", "AP50", "AP75", "APs", "APm", "APl"],
    "segm": ["AP", "AP50", "AP75", "APs", "APm", "APl"],
    "keypoints": ["AP", "AP50", "AP75", "APm", "APl"],
}


def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Splits ``metrics.jsonl`` into training records and evaluation records (those with ``eval``)."""
    train, evals = [], []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        (evals if "eval" in rec else train).append(rec)
    return train, evals


def plot_training_curves(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Writes ``loss.png``, ``lr.png`` and (when evaluations were logged) ``ap.png``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, evals = read_metrics(metrics_path)
    written: list[Path] = []
    if train:
        iters = [r["iter"] for r in train]
        fig, ax = plt.subplots(figsize=(7, 4))
        loss_keys = sorted({k for r in train for k in r if k.startswith("loss")})
        for k in loss_keys:
            ax.plot(iters, [r.get(k, float("nan")) for r in train], label=k, linewidth=1.2)
        if "total_loss" in train[0]:
            ax.plot(iters, [r["total_loss"] for r in train], label="total_loss", color="black", linewidth=2)
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        written.append(out_dir / "loss.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
        if "lr" in train[0]:
            fig, ax = plt.subplots(figsize=(7, 3))
            ax.plot(iters, [r["lr"] for r in train], color="tab:red")
            ax.set_xlabel("iteration")
            ax.set_ylabel("learning rate")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            written.append(out_dir / "lr.png")
            fig.savefig(written[-1], dpi=110)
            plt.close(fig)
    if evals:
        fig, ax = plt.subplots(figsize=(7, 4))
        for task in TASK_KEYS:
            # metrics.jsonl holds each task's stats flat; eval.json nests them under "stats"
            pts = [
                (r["iter"], r["eval"][task].get("stats", r["eval"][task])["AP"]) for r in evals if task in r["eval"]
            ]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{task} AP")
        ax.set_xlabel("iteration")
        ax.set_ylabel("AP")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(out_dir / "ap.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def ap_table(results: dict[str, dict[str, Any]]) -> str:
    """A Markdown table, one row per (run, task): ``results`` maps a run name to its ``eval.json``."""
    lines = ["| run | task | AP | AP50 | AP75 | APs | APm | APl |", "|---|---|---|---|---|---|---|---|"]
    for name, ev in results.items():
        for task, keys in TASK_KEYS.items():
            if task not in ev:
                continue
            stats = ev[task]["stats"]
            cells = []
            for k in ["AP", "AP50", "AP75", "APs", "APm", "APl"]:
                v = stats.get(k) if k in keys else None
                cells.append("-" if v is None or v < 0 else f"{100 * v:.1f}")
            lines.append(f"| {name} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sem_seg_table(results: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of the semantic segmentation metrics, one row per run that has them ("" if none)."""
    from megdet.evaluation.sem_seg_eval import STAT_NAMES

    rows = [(name, ev["sem_seg"]["stats"]) for name, ev in results.items() if "sem_seg" in ev]
    if not rows:
        return ""
    lines = ["| run | " + " | ".join(STAT_NAMES) + " |", "|---|" + "---|" * len(STAT_NAMES)]
    for name, stats in rows:
        lines.append(f"| {name} | " + " | ".join(f"{100 * stats[k]:.1f}" for k in STAT_NAMES) + " |")
    return "\n".join(lines)


def write_report(
    out_path: str | Path,
    title: str,
    results: dict[str, dict[str, Any]],
    plots: Sequence[str | Path] = (),
    images: Sequence[str | Path] = (),
    facts: dict[str, Any] | None = None,
) -> Path:
    """Writes a Markdown report with the AP tables, the plots and example images (paths made relative)."""
    out_path = Path(out_path)
    base = out_path.parent

    def rel(p: str | Path) -> str:
        p = Path(p)
        try:
            return str(p.resolve().relative_to(base.resolve()))
        except ValueError:
            return str(p)

    parts = [f"# {title}", ""]
    if facts:
        parts += ["| setting | value |", "|---|---|"]
        parts += [f"| {k} | {v} |" for k, v in facts.items()]
        parts.append("")
    parts += ["## COCO metrics (percent)", "", ap_table(results), ""]
    semantic = sem_seg_table(results)
    if semantic:
        parts += ["## Semantic segmentation (percent)", "", semantic, ""]
    if plots:
        parts += ["## Training curves", ""]
        parts += [f"![{Path(p).stem}]({rel(p)})" for p in plots]
        parts.append("")
    if images:
        parts += ["## Example predictions", ""]
        parts += [f"![{Path(p).stem}]({rel(p)})" for p in images]
        parts.append("")
    out_path.write_text("\n".join(parts))
    return out_path
