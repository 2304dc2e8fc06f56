"""Checkpoints: atomic writes, last-K retention, safe loading and clear errors, RNG round trips."""

from __future__ import annotations

import dataclasses
import pickle
import random

import numpy as np
import pytest
import torch

from megdet import checkpoint as ckpt_mod
from megdet.checkpoint import (
    LAST_CHECKPOINT,
    CheckpointError,
    CheckpointManager,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _state(value: float, iteration: int = 1) -> dict:
    return {
        "model": {"w": torch.full((3, 3), value), "n": torch.tensor(iteration)},
        "optimizer": {
            "state": {0: {"momentum_buffer": torch.ones(2)}},
            "param_groups": [{"lr": 0.1, "foreach": None}],
        },
        "iteration": iteration,
        "config": {"train": {"out_dir": "x", "grad_accum_steps": 1}, "data": {"min_size_train": [1, 2]}},
        "rng": [rng_state()],
    }


def test_round_trip_with_weights_only(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "a.pt", _state(2.5, 7))
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], torch.full((3, 3), 2.5))
    assert loaded["iteration"] == 7
    assert loaded["config"]["data"]["min_size_train"] == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temporary file left


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    manager = CheckpointManager(tmp_path, keep=3)
    first = manager.save(10, _state(1.0, 10))
    before = first.read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)  # half-written bytes on disk, then the process "dies"
        raise OSError("simulated crash during write")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated crash"):
        manager.save(20, _state(2.0, 20))
    monkeypatch.setattr(torch, "save", real_save)

    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST_CHECKPOINT, first.name]
    assert first.read_bytes() == before
    assert manager.latest() == first
    assert load_checkpoint(manager.latest())["iteration"] == 10


def test_crash_overwriting_the_same_name_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    path = save_checkpoint(tmp_path / "model_0000005.pt", _state(1.0, 5))

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _state(9.0, 5))
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((3, 3), 1.0))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_keep_last_k_and_latest(tmp_path) -> None:
    manager = CheckpointManager(tmp_path / "run", keep=2)
    assert manager.latest() is None
    for it in (100, 200, 300, 400):
        written = manager.save(it, _state(float(it), it))
        assert written.is_file() and manager.latest() == written
    assert [p.name for p in manager.checkpoints()] == ["model_0000300.pt", "model_0000400.pt"]
    assert (tmp_path / "run" / LAST_CHECKPOINT).read_text().strip() == "model_0000400.pt"
    # keep=1 never deletes the file it has just written, even one with a lower iteration.
    single = CheckpointManager(tmp_path / "run", keep=1)
    written = single.save(50, _state(0.5, 50))
    assert [p.name for p in single.checkpoints()] == ["model_0000050.pt"] and single.latest() == written
    # keep <= 0 keeps everything.
    every = CheckpointManager(tmp_path / "all", keep=0)
    for it in range(1, 6):
        every.save(it, _state(float(it), it))
    assert len(every.checkpoints()) == 5


def test_latest_falls_back_when_the_marker_is_stale(tmp_path) -> None:
    manager = CheckpointManager(tmp_path, keep=5)
    manager.save(1, _state(1.0, 1))
    manager.save(2, _state(2.0, 2))
    (tmp_path / LAST_CHECKPOINT).write_text("model_0000099.pt\n")
    assert manager.latest() == tmp_path / "model_0000002.pt"
    (tmp_path / LAST_CHECKPOINT).unlink()
    assert manager.latest() == tmp_path / "model_0000002.pt"


class _Opaque:
    pass


def test_load_errors_are_one_line(tmp_path) -> None:
    cases = {}
    cases["found"] = tmp_path / "missing.pt"
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    cases["not a checkpoint"] = text
    good = save_checkpoint(tmp_path / "good.pt", _state(1.0))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    cases["corrupt"] = truncated
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.ones(2)}, plain)
    cases["no 'model'"] = plain
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": {}, "obj": _Opaque()}, pickled)
    cases["other than tensors"] = pickled
    for expected, path in cases.items():
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        msg = str(e.value)
        assert expected in msg and str(path) in msg and "\n" not in msg, msg
    assert issubclass(CheckpointError, ValueError)


def test_save_refuses_values_weights_only_cannot_load(tmp_path) -> None:
    @dataclasses.dataclass
    class Info:
        lr: float = 0.1

    with pytest.raises(CheckpointError, match=r"\['schedule'\]\['info'\].*Info"):
        save_checkpoint(tmp_path / "x.pt", {"model": {}, "schedule": {"info": Info()}})
    with pytest.raises(CheckpointError, match="ndarray"):
        save_checkpoint(tmp_path / "x.pt", {"model": {}, "arr": np.zeros(2)})
    assert not list(tmp_path.iterdir())


def test_rng_state_round_trip_through_a_checkpoint(tmp_path) -> None:
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    save_checkpoint(tmp_path / "r.pt", {"model": {}, "rng": [rng_state()]})
    expected = (torch.rand(4), random.random(), np.random.rand(3), random.gauss(0, 1))
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"][0])
    got = (torch.rand(4), random.random(), np.random.rand(3), random.gauss(0, 1))
    assert torch.equal(expected[0], got[0])
    assert expected[1] == got[1] and expected[3] == got[3]
    assert np.array_equal(expected[2], got[2])
    # What was stored is plain data: it survives a pickle-free weights_only load (checked above) and
    # contains no numpy objects.
    assert not any(isinstance(v, np.ndarray) for v in rng_state()["numpy"].values())
    assert pickle.dumps(ckpt_mod.rng_state())  # and is an ordinary picklable dict for all_gather_object


def test_checkpoint_layout_round_trip(tmp_path) -> None:
    from megdet.checkpoint import Checkpoint

    weights = Checkpoint(model={"w": torch.ones(2)}, iteration=3, config={"a": 1}, categories=[])
    assert set(weights.to_dict()) == {"model", "iteration", "config", "categories"}  # model_final.pt
    full = Checkpoint(**{**vars(weights), "optimizer": {"state": {}}, "scaler": {}, "rng": [], "world_size": 2})
    path = save_checkpoint(tmp_path / "a.pt", {**full.to_dict(), "from_elsewhere": 1})
    loaded = Checkpoint.from_dict(load_checkpoint(path))
    assert loaded.scaler == {} and loaded.world_size == 2 and loaded.scheduler is None
    assert loaded.metadata() == {"iteration": 3, "config": {"a": 1}, "categories": [], "world_size": 2}
