"""The `megdet` command line: help texts, the data commands, and one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megdet.cli import build_parser, main


def test_help_lists_only_working_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("data", "train", "eval", "predict", "demo", "bench"):
        assert command in out
    actions = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name, sub in actions.items():
        assert sub.format_help(), name


def test_console_entry_point_runs_without_torch_import() -> None:
    code = "import sys; from megdet.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_data_synth_then_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out), "--train", "3", "--val", "2", "--image-size", "96",
                 "--workers", "1", "--quiet"]) == 0
    assert (out / "annotations" / "instances_train.json").is_file()
    assert (out / "annotations" / "person_keypoints_val.json").is_file()
    capsys.readouterr()
    assert main(["data", "check", str(out / "annotations" / "instances_val.json"), "--images", str(out / "val")]) == 0
    report = capsys.readouterr().out
    assert "images" in report.lower()


def test_data_synth_stuff_then_check_label_maps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "stuff"
    assert main(["data", "synth", "--out", str(out), "--train", "2", "--val", "2", "--image-size", "64",
                 "--workers", "1", "--quiet", "--stuff"]) == 0  # fmt: skip
    assert "label maps in" in capsys.readouterr().out
    check = ["data", "check", str(out / "annotations" / "instances_val.json"),
             "--label-maps", str(out / "stuffthingmaps" / "val")]  # fmt: skip
    assert main(check) == 0
    capsys.readouterr()
    assert main([*check, "--label-classes", "7"]) == 1  # the stuff ids 7..9 are then unknown
    assert "unknown_label_id" in capsys.readouterr().out
    assert main([*check, "--label-classes", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megdet: error: --label-classes") and "\n" not in err


def test_data_check_fails_on_a_broken_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["data", "check", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megdet: error:") and "bad.json" in err and "\n" not in err

    missing_image = tmp_path / "ann.json"
    missing_image.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "nowhere.png", "height": 10, "width": 10}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25,
                         "iscrowd": 0, "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]}],
        "categories": [{"id": 1, "name": "thing", "supercategory": "thing"}],
    }))
    assert main(["data", "check", str(missing_image), "--images", str(tmp_path)]) == 1
    assert "nowhere.png" in capsys.readouterr().out


def test_config_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--print-config", "model.backbon=resnet50"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "megdet: error: unknown config key 'model.backbon'; did you mean 'model.backbone'?"


def test_impossible_model_and_solver_values_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Checked before any data is read or layer built: one line, exit status 2, no traceback.
    for override, message in (
        ("model.fpn_channels=0", "megdet: error: model.fpn_channels: expected >= 1, got 0"),
        ("solver.momentum=2", "megdet: error: solver.momentum: expected a value in [0, 1), got 2.0"),
    ):
        assert main(["train", f"train.out_dir={tmp_path / 'run'}", "data.root=nowhere", override]) == 2
        assert capsys.readouterr().err.strip() == message


def test_nproc_checks_the_config_before_starting_workers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import megdet.distributed as distributed

    monkeypatch.setattr(distributed, "launch_local", lambda *a, **k: pytest.fail("workers were started"))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    argv = ["train", "--nproc", "3", f"train.out_dir={tmp_path}", "model.norm=CrossDeviceBN", "model.bn_group_size=2"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "megdet: error: model.bn_group_size=2: the world size 3 is not divisible by it; choose a divisor of 3"
        " (0 = all ranks)"
    )


def test_overrides_before_and_after_options(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "model.backbone=resnet34", "--print-config", "--nproc", "4", "solver.base_lr=0.01",
            "--out", "runs/x", "model.backbone=resnet50"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "backbone: resnet50" in out and "base_lr: 0.01" in out  # in order: the later one wins
    assert "global batch 8" in out  # --nproc 4 after an override still counts
    assert main(["train", "--print-config", "--num-images", "0"]) == 2
    assert "--num-images: expected >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--print-config", "a=1", "--nproc", "2", "stray"])
    assert "unrecognized arguments: stray" in capsys.readouterr().err


def test_bench_names_the_available_benchmarks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "no_such_benchmark"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'no_such_benchmark'" in err and "train_step" in err
