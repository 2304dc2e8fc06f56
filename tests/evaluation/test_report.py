"""The run report: plots from metrics.jsonl and the Markdown AP tables."""

import json
from pathlib import Path

from megdet.evaluation.report import ap_table, plot_training_curves, read_metrics, write_report


def _metrics(path: Path) -> None:
    lines = [
        {"iter": i, "lr": 0.01 * i, "loss_classifier": 1.0 / i, "loss_mask": 0.5 / i, "total_loss": 1.5 / i}
        for i in (1, 2, 3)
    ]
    lines.append({"iter": 3, "eval": {"bbox": {"AP": 0.5, "AP50": 0.7}, "keypoints": {"AP": 0.25}}})
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")


def test_plots_and_report(tmp_path: Path) -> None:
    _metrics(tmp_path / "metrics.jsonl")
    train, evals = read_metrics(tmp_path / "metrics.jsonl")
    assert len(train) == 3 and len(evals) == 1
    plots = plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "out")
    assert [p.name for p in plots] == ["loss.png", "lr.png", "ap.png"]
    assert all(p.stat().st_size > 1000 for p in plots)
    results = {"single-scale": {"bbox": {"stats": {"AP": 0.5, "AP50": 0.75, "AP75": 0.5, "APs": -1.0,
                                                   "APm": 0.4, "APl": 0.6}}}}
    report = write_report(tmp_path / "out" / "report.md", "demo", results, plots, [], {"processes": 2})
    text = report.read_text()
    assert "| single-scale | bbox | 50.0 | 75.0 | 50.0 | - | 40.0 | 60.0 |" in text
    assert "![loss](loss.png)" in text and "| processes | 2 |" in text


def test_ap_table_skips_missing_tasks() -> None:
    table = ap_table({"a": {"keypoints": {"stats": {"AP": 0.123, "AP50": 0.5, "AP75": 0.1, "APm": 0.2, "APl": 0.3}}}})
    assert "| a | keypoints | 12.3 | 50.0 | 10.0 | - | 20.0 | 30.0 |" in table and "bbox" not in table
