"""Atomic writes: complete files only, the old file kept on failure, plain-open permissions."""

from __future__ import annotations

import json
import os

import pytest

from megdet.files import atomic_write, write_json_atomic, write_text_atomic


def test_writes_replace_and_leave_no_temporary_file(tmp_path) -> None:
    path = write_text_atomic(tmp_path / "sub" / "a.txt", "one\n")
    assert path.read_text() == "one\n"
    write_json_atomic(path, {"b": [1, 2]}, separators=(",", ":"))
    assert path.read_text() == '{"b":[1,2]}'
    assert [p.name for p in path.parent.iterdir()] == ["a.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_write_keeps_the_old_file(tmp_path) -> None:
    path = write_text_atomic(tmp_path / "a.txt", "old")

    def fail(f) -> None:
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    assert json.loads(write_json_atomic(tmp_path / "b.json", [1]).read_text()) == [1]
