"""Fault injection on the run side: full disks, hand-edited and bit-flipped checkpoints, a run folder
that is a file, locked or holding a finished run, signals, a crash in the final evaluation and a
corrupt image mid-run. Every case is a one-line error naming the file or field, or loses nothing."""

from __future__ import annotations

import errno
import json
import os
import signal
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


def _error_line(stderr: str, *parts: str) -> str:
    """The one ``megdet: error:`` line of a command's stderr (a progress bar may precede it)."""
    lines = [line for line in stderr.splitlines() if line.startswith("megdet: error:")]
    assert len(lines) == 1, stderr
    return _one_line(lines[0], *parts)


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


@pytest.mark.parametrize("config", [{1: 2}, {"model": "resnet50"}, {"model": {"num_classes": "seven"}}])
def test_a_mistyped_stored_config_is_one_line_for_eval(tmp_path, config) -> None:
    from megdet.evaluation.loading import load_model_and_metadata

    path = save_checkpoint(tmp_path / "model_final.pt", {**_state(1.0, 3), "config": config})
    with pytest.raises(CheckpointError) as e:
        load_model_and_metadata(path)
    _one_line(str(e.value), str(path), "stored config does not load")


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
    assert main(["eval", "--weights", "w.pt", "--out", str(a_file)]) == 2
    _one_line(capsys.readouterr().err, str(a_file), "is a file")
    assert main(["data", "synth", "--out", str(a_file), "--quiet"]) == 2
    _one_line(capsys.readouterr().err, str(a_file), "is a file")
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


# --------------------------------------------------------------------------------------------------
# training runs (items 3, 6, 7, 8): a tiny detector on a tiny synthetic set, a few iterations
# --------------------------------------------------------------------------------------------------

TINY = [
    "model.backbone=resnet10", "model.fpn_channels=16", "model.roi.box_head_dim=32", "model.num_classes=7",
    "model.rpn.pre_nms_top_n_train=50", "model.rpn.post_nms_top_n_train=20", "model.rpn.pre_nms_top_n_test=50",
    "model.rpn.post_nms_top_n_test=20", "model.rpn.batch_size_per_image=32", "model.roi.batch_size_per_image=16",
    "data.images_per_device=1", "data.num_workers=0", "data.min_size_train=[48]", "data.max_size_train=64",
    "data.min_size_test=48", "data.max_size_test=64", "train.log_period=1", "test.eval_period=-1",
    "train.device=cpu", "train.checkpoint_period=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from megdet.data.synthetic import generate_synthetic_coco

    root = tmp_path_factory.mktemp("synth")
    generate_synthetic_coco(root, num_train=4, num_val=2, image_size=64, seed=0, workers=1, progress=False)
    return root


@pytest.fixture
def tiny(synth, tmp_path):
    """``tiny(*overrides) -> Config`` training into ``tmp_path/run``."""
    from megdet.config import load_config

    torch.set_num_threads(1)
    return lambda *o: load_config(None, [*TINY, f"data.root={synth}", f"train.out_dir={tmp_path / 'run'}", *o])


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_locked_folder_stops_a_second_training(tiny, tmp_path) -> None:
    from megdet.engine.trainer import train

    (tmp_path / "run").mkdir()
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunFolderError) as e:
            train(tiny())
    _one_line(str(e.value), str(tmp_path / "run"), f"pid {os.getpid()}")
    assert _files(tmp_path / "run") == [LOCK_NAME]  # nothing written


def test_a_crash_in_the_final_evaluation_keeps_model_final(tiny, tmp_path, monkeypatch) -> None:
    import megdet.evaluation.inference as inference
    from megdet.engine.trainer import train

    def crash(*args, **kwargs):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(inference, "evaluate_model", crash)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        train(tiny("train.max_iters=2", "test.eval_period=0"))
    final = load_checkpoint(tmp_path / "run" / "model_final.pt")
    assert final["iteration"] == 2 and "optimizer" not in final
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["iteration"] == 2


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_mid_run_saves_first(tiny, tmp_path, monkeypatch, workers: int) -> None:
    from megdet.data.coco import CocoDetection
    from megdet.data.errors import DatasetError
    from megdet.engine.trainer import train

    real = CocoDetection.__getitem__
    calls = {"n": 0}

    def corrupt_fourth(self, index):
        calls["n"] += 1
        if calls["n"] == 4:
            raise DatasetError(f"{self.image_path(index)}: cannot read image (truncated file)")
        return real(self, index)

    monkeypatch.setattr(CocoDetection, "__getitem__", corrupt_fourth)
    with pytest.raises(DatasetError) as e:
        train(tiny("train.max_iters=8", "train.checkpoint_period=100", f"data.num_workers={workers}"))
    run = tmp_path / "run"
    _one_line(str(e.value), "cannot read image", "at iteration 4", f"saved {run / 'model_0000003.pt'}", "--resume")
    assert load_checkpoint(run / "model_0000003.pt")["iteration"] == 3
    monkeypatch.undo()
    again = train(tiny("train.max_iters=4", "train.checkpoint_period=100"), resume=True)
    assert again["iteration"] == 4 and load_checkpoint(again["checkpoint"])["iteration"] == 4


def test_resume_skips_a_corrupt_latest_checkpoint_and_says_so(tiny, tmp_path, capsys) -> None:
    from megdet.checkpoint import state_checksum
    from megdet.engine.trainer import train

    run = tmp_path / "run"
    train(tiny("train.max_iters=4"))
    data = bytearray((run / "model_0000004.pt").read_bytes())
    data[len(data) // 2] ^= 0x10  # in the middle of the tensors' bytes
    (run / "model_0000004.pt").write_bytes(bytes(data))
    capsys.readouterr()
    summary = train(tiny("train.max_iters=4"), resume=True)
    out = capsys.readouterr().out
    assert "skipped an unreadable checkpoint" in out and "model_0000004.pt" in out
    assert f"resumed from {run / 'model_0000002.pt'} (the newest readable checkpoint) at iteration 2" in out
    assert summary["iteration"] == 4 and load_checkpoint(run / "model_0000004.pt")["iteration"] == 4

    # A field of the right type whose content does not fit (hand-edited, checksum recomputed).
    state = torch.load(run / "model_0000004.pt", weights_only=True)
    state["scheduler"] = {"iter": 4}
    state["checksum"] = state_checksum(state)
    torch.save(state, run / "model_0000004.pt")
    with pytest.raises(CheckpointError) as e:
        train(tiny("train.max_iters=6"), resume=True)
    _one_line(str(e.value), str(run / "model_0000004.pt"), "'scheduler'")


def test_a_full_disk_during_training_is_one_line_and_keeps_the_last_checkpoint(
    tiny, tmp_path, full_disk, monkeypatch, capsys
) -> None:
    import megdet.checkpoint as checkpoint
    from megdet.config import dump_config

    real = checkpoint.atomic_write
    calls = {"n": 0}

    def fill_on_second(path, write):
        calls["n"] += 1
        if calls["n"] == 2:
            full_disk(after=1000)
        return real(path, write)

    monkeypatch.setattr(checkpoint, "atomic_write", fill_on_second)
    config = tmp_path / "tiny.yaml"
    config.write_text(dump_config(tiny("train.max_iters=6")))
    run = tmp_path / "run"
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    _error_line(err, str(run / "model_0000004.pt"), "No space left on device", f"last good checkpoint is {run / 'model_0000002.pt'}")
    assert not [n for n in _files(run) if n.endswith(".tmp")]
    assert CheckpointManager(run).latest() == run / "model_0000002.pt"
    assert load_checkpoint(run / "model_0000002.pt")["iteration"] == 2

    # The config write of a new run on a full disk.
    monkeypatch.undo()
    full_disk(after=10)
    assert main(["train", "--config", str(config), "--overwrite"]) == 2
    _error_line(capsys.readouterr().err, str(run / "config.yaml"), "No space left on device")


def test_a_full_disk_under_the_metrics_stops_with_one_line(tiny, tmp_path, monkeypatch, capsys) -> None:
    from megdet.config import dump_config
    from megdet.engine import hooks

    real_init = hooks.RunLog.__init__

    class FillsUp:
        """metrics.jsonl on a disk that fills up after its third line."""

        def __init__(self, f) -> None:
            self._f, self._lines = f, 0

        def write(self, data: str) -> int:
            self._lines += 1
            if self._lines > 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self._f.write(data)

        def __getattr__(self, name):
            return getattr(self._f, name)

    def init(self, *args, **kwargs) -> None:
        real_init(self, *args, **kwargs)
        if self.main:
            self.metrics = FillsUp(self.metrics)

    monkeypatch.setattr(hooks.RunLog, "__init__", init)
    config = tmp_path / "tiny.yaml"
    config.write_text(dump_config(tiny("train.max_iters=8", "train.checkpoint_period=2", "train.log_period=1")))
    assert main(["train", "--config", str(config)]) == 2
    run = tmp_path / "run"
    line = _error_line(capsys.readouterr().err, str(run / "metrics.jsonl"), "No space left on device",
                       "iteration 4", "--resume")  # fmt: skip
    # Iteration 4's line is written before its checkpoint: the run stops with iteration 2's.
    assert f"the last good checkpoint is {run / 'model_0000002.pt'}" in line
    assert CheckpointManager(run).latest() == run / "model_0000002.pt"


@pytest.mark.parametrize(("signum", "workers", "code"), [(signal.SIGINT, 1, 130), (signal.SIGTERM, 0, 143)])
def test_a_signal_saves_then_exits_and_a_second_signal_does_not_kill_the_save(
    tiny, tmp_path, monkeypatch, capsys, signum: int, workers: int, code: int
) -> None:
    import multiprocessing

    import megdet.engine.trainer as trainer
    from megdet.config import dump_config

    real_update, real_save = trainer.apply_update, CheckpointManager.save
    updates = {"n": 0}

    def update_then_signal(*args, **kwargs):
        updates["n"] += 1
        if updates["n"] == 3:  # seen at the end of the next iteration (the stop flag is summed before the update)
            # Ctrl-C reaches the terminal's whole foreground group: the loader workers too.
            for worker in multiprocessing.active_children():
                os.kill(worker.pid, signum)
            os.kill(os.getpid(), signum)
        return real_update(*args, **kwargs)

    def save_while_signalled(self, iteration, state):
        # The scheduler (or an impatient user) signals again while the checkpoint is written.
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        return real_save(self, iteration, state)

    monkeypatch.setattr(trainer, "apply_update", update_then_signal)
    monkeypatch.setattr(CheckpointManager, "save", save_while_signalled)
    config = tmp_path / "tiny.yaml"
    config.write_text(dump_config(tiny("train.max_iters=500", "train.checkpoint_period=1000", f"data.num_workers={workers}")))
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert main(["train", "--config", str(config)]) == code
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    run = tmp_path / "run"
    assert CheckpointManager(run).latest() == run / "model_0000004.pt"
    assert load_checkpoint(run / "model_0000004.pt")["iteration"] == 4
    captured = capsys.readouterr()
    assert f"{signal.Signals(signum).name}: saved {run / 'model_0000004.pt'} at iteration 4" in captured.out
    assert "Traceback" not in captured.err and "KeyboardInterrupt" not in captured.err
