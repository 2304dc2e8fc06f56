"""Atomic file writes: a reader, or a crash mid-write, never sees a partially written file.

The bytes go to a hidden temporary file in the target's directory, are fsync'ed, and the file is
renamed over the target with ``os.replace`` (atomic on POSIX); the directory is fsync'ed too, so the
rename itself is durable. A failed write removes the temporary file and leaves the target as it was.
The new file gets the permissions a plain ``open(path, "w")`` would give it (0666 less the umask).

A write the operating system refuses (a full disk, a quota, a read-only file system, a folder where a
file should be) raises :class:`WriteError`, one line naming the file and the reason, also when the
writer (``torch.save``) wrapped the ``OSError`` in an error of its own.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["WriteError", "atomic_write", "ensure_dir", "write_json_atomic", "write_text_atomic"]


class WriteError(OSError):
    """A file or folder could not be written; the message is one line naming it and the reason."""


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def ensure_dir(path: str | Path, what: str = "output folder") -> Path:
    """Creates folder ``path`` (and its parents) unless it exists; :class:`WriteError` when it cannot be
    one (a file of that name, a file among its parents, no permission)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise WriteError(f"{path}: is a file, not a folder; choose another {what}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"{path}: cannot create the {what} ({_reason(e)})") from None
    return path


class _Recording:
    """The temporary file as the writer sees it: remembers the first OSError its writes raised."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every file system allows opening a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Calls ``write(f)`` on a binary file that becomes ``path`` only once it is complete; returns ``path``."""
    path = Path(path)
    ensure_dir(path.parent, "folder")
    if path.is_dir():
        raise WriteError(f"{path}: is a folder; cannot write a file of that name")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise WriteError(f"{path}: cannot write ({_reason(e)}); the previous file, if any, is unchanged") from None
    recording = None
    try:
        with os.fdopen(fd, "wb") as f:
            recording = _Recording(f)
            write(recording)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        # torch.save reports a failed write as a RuntimeError of its own ("enforce fail ..."); the
        # OSError under it is the reason to give.
        cause = recording.error if recording is not None and recording.error is not None else e
        if isinstance(cause, OSError) and not isinstance(e, WriteError):
            raise WriteError(
                f"{path}: cannot write ({_reason(cause)}); the previous file, if any, is unchanged"
            ) from None
        raise
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def write_json_atomic(path: str | Path, data: Any, **dumps_kwargs: Any) -> Path:
    """Writes ``json.dumps(data, **dumps_kwargs)`` to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(data, **dumps_kwargs))
