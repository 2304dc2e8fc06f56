"""Hostile config files and overrides, and `megdet data synth` over an existing dataset: one line each."""

from __future__ import annotations

from pathlib import Path

import pytest

from megdet.cli import main

LAUGHS = "\n".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *(f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")),
        "model:",
        "  backbone: *i",
    ]
)
FILES = {
    "int_key": (b"model:\n  3: resnet18\n", "key 3 under 'model' is not a string"),
    "top_level_int_key": (b"1: 2\n", "key 1 is not a string"),
    "not_utf8": (b"model:\n  backbone: r\xff\xfe\n", "not UTF-8 text (byte 0xff at offset 20)"),
    "billion_laughs": (LAUGHS.encode(), "more than 100000 values once YAML aliases"),
    "self_reference": (b"model: &m\n  rpn: *m\n", "more than 100000 values once YAML aliases"),
    "deep": (b"model: " + b"[" * 50_000 + b"]" * 50_000 + b"\n", "nested too deeply"),
    "long_integer": (b"train:\n  max_iters: 1" + b"0" * 5000 + b"\n", "invalid YAML (Exceeds the limit"),
    "huge_epochs": (b"solver:\n  epochs: 1.0e+308\n", "'solver.epochs': 1e+308 is out of range"),
    "huge_iterations": (b"train:\n  max_iters: 1.0e+308\n", "'train.max_iters': 1e+308 is out of range"),
    "inf_lr": (b"solver:\n  base_lr: .inf\n", "'solver.base_lr': expected a finite number, got inf"),
    "nan_epochs": (b"solver:\n  epochs: .nan\n", "'solver.epochs': expected a finite number, got nan"),
    "negative_size": (b"data:\n  min_size_train: [-5]\n", "data.min_size_train"),
    "negative_batch": (b"data:\n  images_per_device: -2\n", "data.images_per_device"),
    "list_document": (b"- model\n", "must be a mapping"),
}


@pytest.mark.parametrize("name", list(FILES))
def test_hostile_config_files_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, name: str) -> None:
    content, words = FILES[name]
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(content)
    # Loading fails for all but the negative sizes, which a run checks before reading any data.
    argv = ["train", "--config", str(path), "--out", str(tmp_path / "run"), f"data.root={tmp_path / 'none'}"]
    assert main(argv) == 2, capsys.readouterr()
    err = capsys.readouterr().err.strip()
    assert err.startswith("megdet: error: ") and "\n" not in err and words in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("solver.epochs=1.0e+308", "1e+308 is out of range"),
        ("train.seed=100000000000000000000", "~1e20 is out of range"),
        ("solver.base_lr=.nan", "expected a finite number"),
        ("model.backbone=&a [*a]", "values once YAML aliases"),
    ],
)
def test_hostile_overrides_are_one_line(capsys: pytest.CaptureFixture, override: str, words: str) -> None:
    assert main(["train", "--print-config", "--num-images", "10", override]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and words in err, err


def test_data_synth_does_not_overwrite_a_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "synth"
    (out / "annotations").mkdir(parents=True)
    marker = out / "annotations" / "instances_train.json"
    marker.write_text("{}")
    argv = ["data", "synth", "--out", str(out), "--train", "1", "--val", "1", "--image-size", "64", "--workers", "1", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "already exists" in err and "--overwrite" in err
    assert marker.read_text() == "{}"
    assert main([*argv, "--overwrite"]) == 0
    assert marker.read_text() != "{}"
    capsys.readouterr()
    assert main([*argv[:-1], "--force", "--quiet"]) == 0
