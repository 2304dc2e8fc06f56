"""Fault injection on the run side: full disks, hand-edited and bit-flipped checkpoints, a run folder
that is a file, locked or holding a finished run, signals, a crash in the final evaluation and a
corrupt image mid-run. Every case is a one-line error naming the file or field, or loses nothing."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megdet.checkpoint import (
    LAST_CHECKPOINT,
    CheckpointError,
    CheckpointManager,
    load_checkpoint,
    save_checkpoint,
)
from megdet.cli import main
from megdet.engine.run_folder import LOCK_NAME, RunFolderError, RunLock, prepare_run_folder
from megdet.files import WriteError, write_text_atomic

REPO = Path(__file__).resolve().parents[2]


def _one_line(message: str, *parts: str) -> str:
    assert "\n" not in message.strip(), message
    for p in parts:
        assert p in message, (p, message)
    return message


def _state(value: float, iteration: int) -> dict:
    return {
        "model": {"w": torch.full((64,), value), "n": torch.tensor(iteration)},
        "iteration": iteration,
        "config": {"train": {"out_dir": "x"}},
        "optimizer": {"state": {0: {"momentum_buffer": torch.ones(2)}}, "param_groups": [{"lr": 0.1}]},
        "rng": [{"torch": torch.zeros(3, dtype=torch.uint8)}],
        "world_size": 1,
    }


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(after=N)``: every file opened for writing from now on fails with ENOSPC once N bytes
    went to it (what a file system does when it fills up mid-write)."""
    real_fdopen = os.fdopen

    class Filling:
        def __init__(self, f, after: int) -> None:
            self._f, self._left = f, after

        def write(self, data) -> int:
            if len(data) > self._left:
                self._f.write(bytes(memoryview(data)[: self._left]))
                self._left = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self._left -= len(data)
            return self._f.write(data)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def install(after: int = 0) -> None:
        monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: Filling(real_fdopen(fd, mode, *a, **k), after))

    return install


# --------------------------------------------------------------------------------------------------
# full disk (item 6)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("after", [0, 300])
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, full_disk, after: int) -> None:
    manager = CheckpointManager(tmp_path, keep=2)
    first = manager.save(2, _state(1.0, 2))
    before = first.read_bytes()
    full_disk(after)
    with pytest.raises(WriteError) as e:
        manager.save(4, _state(2.0, 4))
    _one_line(str(e.value), str(tmp_path / "model_0000004.pt"), "No space left on device", "unchanged")
    assert isinstance(e.value, OSError)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST_CHECKPOINT, first.name]  # no temporary file
    assert first.read_bytes() == before and manager.latest() == first


def test_full_disk_during_a_config_write_and_no_inodes(tmp_path, full_disk, monkeypatch) -> None:
    config = write_text_atomic(tmp_path / "config.yaml", "old: 1\n")
    full_disk(3)
    with pytest.raises(WriteError) as e:
        write_text_atomic(config, "model:\n  backbone: resnet50\n")
    _one_line(str(e.value), str(config), "No space left on device")
    assert config.read_text() == "old: 1\n" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    monkeypatch.undo()

    real_open = os.open

    def no_inodes(path, flags, *args):
        if flags & os.O_CREAT:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_inodes)
    with pytest.raises(WriteError) as e:
        save_checkpoint(tmp_path / "model_0000001.pt", _state(1.0, 1))
    _one_line(str(e.value), "model_0000001.pt", "No space left on device")


def test_a_full_disk_in_the_cli_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    from megdet import cli

    def fill(args):  # e.g. a metrics line written on a full disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "metrics.jsonl"))

    monkeypatch.setattr(cli, "_cmd_data_check", fill)
    assert main(["data", "check", "x.json"]) == 2
    _one_line(capsys.readouterr().err, "metrics.jsonl", "No space left on device")


# --------------------------------------------------------------------------------------------------
# checkpoint integrity (item 8) and hand-edited checkpoints (item 6)
# --------------------------------------------------------------------------------------------------


def _flip_a_bit_in_tensor_data(path: Path, value: float) -> None:
    data = bytearray(path.read_bytes())
    run = torch.full((64,), value).numpy().tobytes()
    at = data.find(run)
    assert at >= 0
    data[at + 130] ^= 0x04
    path.write_bytes(bytes(data))


def test_a_bit_flip_is_a_one_line_error(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "model_0000003.pt", _state(2.5, 3))
    assert load_checkpoint(path)["iteration"] == 3 and "checksum" not in load_checkpoint(path)
    _flip_a_bit_in_tensor_data(path, 2.5)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    _one_line(str(e.value), str(path), "checksum mismatch")

    # An edit that keeps the file loadable but changes a value (here the stored iteration).
    edited = tmp_path / "edited.pt"
    raw = torch.load(save_checkpoint(edited, _state(1.0, 5)), weights_only=True)
    raw["iteration"] = 6
    torch.save(raw, edited)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(edited)
    _one_line(str(e.value), str(edited), "checksum mismatch")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("iteration", "12"),
        ("iteration", -1),
        ("iteration", True),
        ("world_size", 0),
        ("rng", {"torch": 1}),
        ("categories", ["person"]),
        ("optimizer", [1, 2]),
        ("config", "train: {}"),
        ("model", {"w": [1.0, 2.0]}),
    ],
)
def test_mistyped_fields_are_one_line_errors(tmp_path, field: str, value) -> None:
    state = _state(1.0, 3)
    state[field] = value
    path = tmp_path / "hand_edited.pt"
    torch.save(state, path)  # edited by hand: no checksum
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    _one_line(str(e.value), str(path), f"'{field}'")


def test_missing_fields_are_one_line_errors(tmp_path) -> None:
    state = _state(1.0, 3)
    del state["model"]
    torch.save(state, tmp_path / "no_model.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "no_model.pt")
    _one_line(str(e.value), "no_model.pt", "'model'")


@pytest.mark.parametrize("pointer", ["../elsewhere/model_0000009.pt", "/etc/passwd", "sub/model_0000009.pt", "link"])
def test_last_checkpoint_cannot_point_outside_the_run_folder(tmp_path, pointer: str) -> None:
    run = tmp_path / "run"
    manager = CheckpointManager(run, keep=3)
    manager.save(1, _state(1.0, 1))
    outside = save_checkpoint(tmp_path / "elsewhere" / "model_0000009.pt", _state(9.0, 9))
    (run / "sub").mkdir()
    if pointer == "link":
        (run / "link").symlink_to(outside)
    (run / LAST_CHECKPOINT).write_text(pointer + "\n")
    with pytest.raises(CheckpointError) as e:
        manager.latest()
    _one_line(str(e.value), str(run / LAST_CHECKPOINT), "not a file of this run folder")


def test_a_checkpoint_link_leading_out_of_the_folder_is_not_a_checkpoint(tmp_path) -> None:
    run = tmp_path / "run"
    manager = CheckpointManager(run, keep=3)
    good = manager.save(1, _state(1.0, 1))
    outside = save_checkpoint(tmp_path / "model_0000009.pt", _state(9.0, 9))
    (run / "model_0000009.pt").symlink_to(outside)
    (run / LAST_CHECKPOINT).unlink()
    assert manager.checkpoints() == [good] and manager.latest() == good


def test_resume_falls_back_to_the_newest_readable_checkpoint(tmp_path) -> None:
    manager = CheckpointManager(tmp_path, keep=3)
    for it in (2, 4, 6):
        manager.save(it, _state(float(it), it))
    _flip_a_bit_in_tensor_data(tmp_path / "model_0000006.pt", 6.0)
    (tmp_path / "model_0000004.pt").write_bytes((tmp_path / "model_0000004.pt").read_bytes()[:500])  # truncated
    path, state, skipped = manager.load_latest()
    assert path == tmp_path / "model_0000002.pt" and state["iteration"] == 2
    assert len(skipped) == 2 and "model_0000006.pt" in skipped[0] and "checksum" in skipped[0]
    assert "model_0000004.pt" in skipped[1]
    _flip_a_bit_in_tensor_data(tmp_path / "model_0000002.pt", 2.0)
    with pytest.raises(CheckpointError) as e:
        manager.load_latest()
    _one_line(str(e.value), "no readable checkpoint", "model_0000002.pt", "model_0000006.pt")
    assert CheckpointManager(tmp_path / "empty").load_latest() == (None, None, [])


# --------------------------------------------------------------------------------------------------
# the run folder: a file, locked, a finished run (items 3 and 6)
# --------------------------------------------------------------------------------------------------


def test_out_naming_a_file_is_one_line(tmp_path, capsys) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(WriteError) as e:
        prepare_run_folder(a_file)
    _one_line(str(e.value), str(a_file), "is a file, not a folder")
    assert main(["train", "--out", str(a_file), "train.device=cpu"]) == 2
    _one_line(capsys.readouterr().err, str(a_file), "is a file")
    assert main(["predict", "--weights", "w.pt", "--out", str(a_file), "x.png"]) == 2
    _one_line(capsys.readouterr().err, str(a_file), "is a file")
    assert main(["eval", "--weights", str(a_file), "--out", str(a_file)]) == 2
    _one_line(capsys.readouterr().err, str(a_file))
    assert a_file.read_text() == "mine"


def test_a_second_run_on_the_same_folder_is_refused(tmp_path) -> None:
    run = tmp_path / "run"
    with prepare_run_folder(run):
        with pytest.raises(RunFolderError) as e:
            prepare_run_folder(run)
        _one_line(str(e.value), str(run), f"pid {os.getpid()}", "in use by another training run")
    with prepare_run_folder(run):  # released
        pass


def test_a_killed_runs_lock_is_released_by_the_os(tmp_path) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from megdet.engine.run_folder import RunLock
            lock = RunLock({str(run)!r}).acquire()
            print("locked", flush=True)
            time.sleep(120)
        """)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        run.mkdir()
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError) as e:
            RunLock(run).acquire()
        _one_line(str(e.value), f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    RunLock(run).acquire().release()
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_finished_run_is_not_overwritten_without_being_told(tmp_path) -> None:
    run = tmp_path / "run"
    save_checkpoint(run / "model_final.pt", _state(1.0, 9))
    (run / "metrics.jsonl").write_text('{"iter": 9}\n')
    (run / "my_notes.txt").write_text("keep")
    for resume, expected in ((False, "--overwrite"), (True, "no checkpoint to resume from")):
        with pytest.raises(RunFolderError) as e:
            prepare_run_folder(run, resume=resume)
        _one_line(str(e.value), str(run), "model_final.pt", expected)
    with pytest.raises(RunFolderError, match="contradict"):
        prepare_run_folder(run, resume=True, overwrite=True)
    assert (run / "model_final.pt").is_file()
    prepare_run_folder(run, overwrite=True).release()
    assert sorted(p.name for p in run.iterdir()) == ["my_notes.txt", LOCK_NAME]
