"""Fine-tuning from converted torchvision weights on the synthetic data: another number of classes, so
the class heads start fresh and everything else starts from the file, then a short training run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megdet.checkpoint import load_checkpoint
from megdet.cli import main
from megdet.engine.trainer import train
from megdet.modeling.detector import build_model

CLASS_HEADS = ("roi_heads.box_head.predictor.cls_score", "roi_heads.box_head.predictor.bbox_pred")


def test_fine_tuning_from_a_converted_torchvision_detector(
    tiny_cfg, torchvision_detector, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = tmp_path / "fasterrcnn.pth"
    torch.save(torchvision_detector(5).state_dict(), source)  # 4 classes; the synthetic data has 7
    converted = tmp_path / "converted.pt"
    assert main(["convert", str(source), str(converted)]) == 0
    printed = capsys.readouterr().out
    assert "loaded 130: backbone 100, FPN 16, RPN 6, box head 8" in printed and f"wrote {converted}" in printed

    settings = ["model.norm=FrozenBN", "model.trainable_layers=3", "model.roi.aligned=false", "train.max_iters=2"]
    cfg = tiny_cfg(*settings, f"model.weights={converted}")
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="re-initialised 4 class-sized \\(box head 4\\)"):
        model = build_model(cfg)
    start, stored = model.state_dict(), load_checkpoint(converted)["model"]
    fresh = [k for k in start if k.startswith(CLASS_HEADS)]
    assert len(fresh) == 4 and all(start[k].shape[0] != stored[k].shape[0] for k in fresh)
    assert all(torch.equal(v, stored[k]) for k, v in start.items() if k not in fresh)
    # model.weights may name the torchvision file itself: converted on the fly, the same start.
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="re-initialised"):
        direct = build_model(tiny_cfg(*settings, f"model.weights={source}")).state_dict()
    assert all(torch.equal(v, start[k]) for k, v in direct.items())

    with pytest.warns(UserWarning, match="re-initialised"):
        summary = train(cfg)
    assert summary["iteration"] == 2 and (Path(cfg.train.out_dir) / "model_final.pt").is_file()
    assert summary["losses"] and all(math.isfinite(v) for v in summary["losses"].values())
