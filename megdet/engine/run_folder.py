"""The run folder (``train.out_dir``): one training at a time, and no finished run overwritten by accident.

:func:`prepare_run_folder` is what a training does before writing anything: it creates the folder
(one line when ``--out`` names a file), takes the folder's lock, and refuses to start a new run over
the checkpoints or the ``model_final.pt`` of an earlier one unless told to ``resume`` or ``overwrite``.

The lock is ``train.lock`` in the folder, held with ``fcntl.flock`` for the life of the run and
holding the holder's pid, host and start time. The kernel releases it when the holding process ends
however it ends (``kill -9`` included), so a dead run never leaves the folder locked; the file itself
stays. flock works between processes of one machine and, on Linux, across NFS clients (as a POSIX lock).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from megdet.checkpoint import LAST_CHECKPOINT, CheckpointManager
from megdet.config import ConfigError
from megdet.files import WriteError, ensure_dir

LOCK_NAME = "train.lock"
FINAL_NAME = "model_final.pt"
SUMMARY_NAME = "summary.json"
# What a training writes into its folder besides checkpoints (removed by overwrite=True).
_RUN_FILES = (LAST_CHECKPOINT, FINAL_NAME, SUMMARY_NAME, "metrics.jsonl", "config.yaml", "lr_schedule.png")
_RUN_DIRS = ("tb",)


class RunFolderError(ConfigError):
    """The run folder cannot be used as asked (locked, a file, an earlier run in it); one line."""


class RunLock:
    """An exclusive ``flock`` on ``out_dir/train.lock`` naming its holder; released by :meth:`release`
    or when the process ends."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Takes the lock or raises :class:`RunFolderError` naming the process that holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise WriteError(f"{self.path}: cannot create the run folder's lock ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(fd)
            os.close(fd)
            raise RunFolderError(
                f"{self.path.parent} is in use by another training run ({holder}); wait for it to end or"
                " stop it, or choose another --out"
            ) from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> RunLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {int(info['pid'])} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its pid"


def prepare_run_folder(out_dir: str | Path, resume: bool = False, overwrite: bool = False) -> RunLock:
    """Creates ``out_dir``, locks it and checks that this run may write there; returns the held lock.

    Without ``resume`` or ``overwrite``, a folder holding checkpoints, ``last_checkpoint``,
    ``model_final.pt`` or ``summary.json`` is refused; with ``overwrite`` those (and the earlier run's
    metrics, TensorBoard events and config) are deleted. With ``resume``, a folder holding a finished
    run's ``model_final.pt`` but no checkpoint to continue from is refused (starting afresh would
    replace it).

    Raises:
        RunFolderError: the folder is locked by another run, or holds a run that this one would
            overwrite; one line naming it and the option to pass.
        megdet.files.WriteError: ``out_dir`` is a file, or cannot be created.
    """
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other; pass one")
    ensure_dir(out_dir, "--out (train.out_dir)")
    lock = RunLock(out_dir).acquire()
    try:
        checkpoints = CheckpointManager(out_dir).checkpoints()
        found = [p for p in (*checkpoints[-1:], *(out_dir / n for n in (LAST_CHECKPOINT, FINAL_NAME, SUMMARY_NAME)))
                 if p.exists()]  # fmt: skip
        if found and overwrite:
            _remove_run_outputs(out_dir, checkpoints)
        elif found and not resume:
            raise RunFolderError(
                f"{out_dir} already holds a run ({found[0].name}); pass --resume to continue it, --overwrite"
                " to replace it, or choose another --out"
            )
        elif resume and not checkpoints and (out_dir / FINAL_NAME).exists():
            raise RunFolderError(
                f"{out_dir} holds a finished run's {FINAL_NAME} but no checkpoint to resume from; pass"
                " --overwrite to train again from scratch (replacing it), or choose another --out"
            )
    except BaseException:
        lock.release()
        raise
    return lock


def _remove_run_outputs(out_dir: Path, checkpoints: list[Path]) -> None:
    """Deletes an earlier run's outputs (not other files a user keeps in the folder)."""
    for path in [*checkpoints, *(out_dir / n for n in _RUN_FILES)]:
        path.unlink(missing_ok=True)
    for name in _RUN_DIRS:
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for folder in sorted((out_dir / "eval").glob("iter_*")):
        shutil.rmtree(folder, ignore_errors=True)
