"""The data-loader benchmark (benchmarks/data_loader.py) on 8 generated 64-px images: the trainer's
loader row and the keeps-up check against a target rate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their helpers as `_common`

import data_loader  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from megdet.data.synthetic import generate_synthetic_coco

    root = tmp_path_factory.mktemp("synth")
    generate_synthetic_coco(root, num_train=8, num_val=0, image_size=64, seed=0, workers=1, progress=False)
    return root


def test_trainer_loader_and_target(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "data_loader.json"
    result = data_loader.main(
        ["--quick", "--data-dir", str(data_dir), "--workers", "0", "--batches", "2", "--repeats", "1",
         "--trainer-only", "--target-images-per-s", "0.001", "--out", str(out),
         "--set", "data.min_size_train=[64]", "data.max_size_train=96", "model.mask_on=false"]
    )  # fmt: skip
    assert json.loads(out.read_text())["target"] == json.loads(json.dumps(result["target"]))
    (row,) = result["rows"]
    assert (row["loader"], row["workers"], row["targets"]) == ("megdet-trainer", 0, "boxes")
    assert result["min_size_train"] == [64] and result["max_size_train"] == 96
    assert result["target"]["fewest_workers"] == 0
    assert result["target"]["per_workers"][0] == {"images_per_s": row["images_per_s"], "keeps_up": True}


def test_keeps_up_picks_the_fewest_workers() -> None:
    rows = [{"loader": "megdet-trainer", "workers": w, "images_per_s": v} for w, v in ((8, 90.0), (2, 30.0), (4, 60.0))]
    rows.append({"loader": "megdet", "workers": 0, "images_per_s": 1000.0})
    check = data_loader.keeps_up(rows, 50.0)
    assert check["fewest_workers"] == 4 and list(check["per_workers"]) == [2, 4, 8]
    assert not check["per_workers"][2]["keeps_up"]
    assert data_loader.keeps_up(rows, 100.0)["fewest_workers"] is None
