"""Atomic file writes: a reader, or a crash mid-write, never sees a partially written file.

The bytes go to a hidden temporary file in the target's directory, are fsync'ed, and the file is
renamed over the target with ``os.replace`` (atomic on POSIX); the directory is fsync'ed too, so the
rename itself is durable. A failed write removes the temporary file and leaves the target as it was.
The new file gets the permissions a plain ``open(path, "w")`` would give it (0666 less the umask).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "write_json_atomic", "write_text_atomic"]


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
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
