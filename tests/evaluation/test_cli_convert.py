"""`megdet convert`, and `megdet eval` / `predict` on converted and on foreign (torchvision) weights:
the synthetic set, TTA, ensembles, one-line errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from megdet.checkpoint import load_checkpoint
from megdet.cli import main
from megdet.data.synthetic import generate_synthetic_coco

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic_coco(root, num_train=1, num_val=3, image_size=96, seed=0, workers=1, progress=False)
    return root


def _settings(root: Path) -> list[str]:
    return [f"data.root={root}", "data.min_size_test=64", "data.max_size_test=96", "data.num_workers=0",
            "test.tta.min_sizes=[64,80]", "train.device=cpu"]  # fmt: skip


def _one_line_error(capsys: pytest.CaptureFixture, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("megdet: error: ") and "\n" not in err, err
    return err


def test_converted_weights_evaluate_and_predict_on_the_synthetic_set(
    synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture, torchvision_detector
) -> None:
    source = tmp_path / "maskrcnn_keypoints.pth"  # 7 synthetic classes + background, masks and keypoints
    torch.save(torchvision_detector(8, mask=True, keypoints=True).state_dict(), source)
    converted = tmp_path / "converted.pt"
    assert main(["convert", str(source), str(converted), *_settings(synth)]) == 0
    printed = capsys.readouterr().out
    assert "mask head 8, keypoint head 6" in printed and "7 classes, boxes + masks + 17 keypoints" in printed
    ckpt = load_checkpoint(converted)
    assert ckpt["converted_from"]["source"] == "torchvision" and ckpt["config"]["data"]["root"] == str(synth)

    assert main(["eval", "--weights", str(converted)]) == 0
    evals = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert set(evals) == {"bbox", "segm", "keypoints"}
    # The torchvision file itself: converted on the fly, the same model, the same numbers.
    assert main(["eval", "--weights", str(source), "--out", str(tmp_path / "direct"), *_settings(synth)]) == 0
    assert json.loads((tmp_path / "direct" / "eval.json").read_text()) == evals
    capsys.readouterr()

    image = sorted((synth / "val").glob("*.png"))[0]
    out = tmp_path / "pred"
    argv = ["predict", "--weights", str(converted), "--weights", str(source), "--tta", "--score-threshold", "0.0"]
    assert main([*argv, "--out", str(out), str(image)]) == 0
    entry = json.loads((out / "predictions.json").read_text())[0]
    dets = entry["detections"]
    assert dets and all({"box", "score", "mask"} <= set(d) for d in dets)
    assert all(("keypoints" in d) == (d["label"] == "person") for d in dets) and "keypoints" in str(dets)
    single = tmp_path / "single"
    assert main(["predict", "--weights", str(converted), "--score-threshold", "0.0", "--out", str(single), str(image)]) == 0
    assert json.loads((single / "predictions.json").read_text())[0]["detections"] != entry["detections"]


def test_convert_refuses_what_does_not_fit_in_one_line(
    synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture, torchvision_detector
) -> None:
    garbage = tmp_path / "model_final.pkl"
    garbage.write_bytes(b"\x80\x04garbage")
    err = _one_line_error(capsys, main(["convert", str(garbage), str(tmp_path / "out.pt")]))
    assert "model_final.pkl" in err and "pickle" in err
    evil = tmp_path / "evil.pkl"
    with open(evil, "wb") as f:
        pickle.dump({"model": {"w": np.zeros(2)}, "hook": print}, f)
    err = _one_line_error(capsys, main(["eval", "--weights", str(evil), *_settings(synth)]))
    assert "refused to load builtins.print" in err
    source = tmp_path / "faster.pth"
    torch.save(torchvision_detector(3).state_dict(), source)
    # eval never re-initialises: a config with other classes does not fit the file.
    err = _one_line_error(capsys, main(["eval", "--weights", str(source), *_settings(synth), "model.num_classes=7"]))
    assert "shape mismatch" in err and "cls_score" in err
    err = _one_line_error(capsys, main(["convert", str(source), str(tmp_path / "o.pt"), "--classes", "1,9"]))
    assert "classes 9 not in 1..2" in err
    assert not (tmp_path / "o.pt").exists()
