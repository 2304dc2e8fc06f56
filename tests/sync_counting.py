"""Counting a piece of code's host-synchronising ops on CPU (shared by the modeling and engine tests).

On CUDA every op whose output size or value the host must read (``nonzero``, boolean-mask indexing,
``.item()``, ``.tolist()``, a tensor built from Python data, NMS's variable-size result) stalls the
host until the device has caught up. :func:`count_syncs` runs code under a dispatch mode that counts
those ops (also inside autograd's backward) and every op dispatched.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

_BOOL_INDEX_OPS = {"aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default",
                   "aten._index_put_impl_.default"}  # fmt: skip
# Ops whose result size or value depends on the data: the host waits for the device.
_SYNC_OPS = {"aten.nonzero.default", "aten._local_scalar_dense.default", "aten.masked_select.default",
             "aten.bincount.default", "aten.equal.default", "aten.allclose.default",
             "torchvision.nms.default"}  # fmt: skip
# Python data copied into a tensor: on CUDA a blocking host-to-device copy.
_HOST_DATA_OPS = {"aten.lift_fresh.default"}


def _is_bool_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype in (torch.bool, torch.uint8)


class SyncCounter(TorchDispatchMode):
    """Counts every dispatched op, and separately the host-synchronising ones by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs: Counter[str] = Counter()
        self.paused = False  # while True nothing is counted (code the caller accounts for itself)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        self.ops += 1
        name = str(func)
        if name in _SYNC_OPS or name in _HOST_DATA_OPS or name.startswith(("aten.unique", "aten._unique")):
            self.syncs[name] += 1
        elif name in _BOOL_INDEX_OPS and any(_is_bool_tensor(i) for i in args[1] if i is not None):
            self.syncs[f"{name} (bool index)"] += 1
        elif name.startswith("aten.repeat_interleave") and isinstance(
            kwargs.get("repeats", args[1:2] and args[1]), torch.Tensor
        ):
            self.syncs[f"{name} (tensor repeats)"] += 1
        return func(*args, **kwargs)

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())


@contextmanager
def count_syncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[SyncCounter]:
    """A :class:`SyncCounter` that also sees ``tolist`` / ``numpy`` / ``cpu``, which on CPU dispatch
    no op but on CUDA copy to the host."""
    counter = SyncCounter()
    for method in ("tolist", "numpy", "cpu"):
        original: Callable[..., Any] = getattr(torch.Tensor, method)

        def wrapped(self, *a, _orig=original, _name=method, **kw):
            if not counter.paused:
                counter.syncs[f"Tensor.{_name}"] += 1
            return _orig(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, method, wrapped)
    with counter:
        yield counter
    monkeypatch.undo()


