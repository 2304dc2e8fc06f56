"""Reading a step's scalars (losses, gradient norm) on the host without waiting for the device.

On CUDA, ``float(loss)`` or ``.tolist()`` waits until the device has run everything queued so far:
the host then queues the next step only after the GPU has drained, and a launch-bound step loses the
overlap of host and device. :class:`LaggedReader` instead copies each step's vector of scalars to
pinned host memory without blocking (in stream order) and records an event behind the copy; the
values are read one step later, when that event has long passed, so the wait is for the previous
step only while the current one keeps the device busy. On CPU the copy is immediate and the reading
order is the same, so CPU runs exercise the same logic.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class Pending:
    """One step's scalars on their way to the host, and what the reader of them needs to know."""

    iteration: int
    host: Tensor  # the values, in (pinned) host memory once ``event`` has passed
    event: Any  # a torch.cuda.Event recorded after the copy, or None on CPU
    info: Any  # the caller's context for these values (e.g. the step's lr and batches)


class LaggedReader:
    """A queue of device vectors copied to the host without blocking; read oldest first."""

    def __init__(self) -> None:
        self._queue: deque[Pending] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, iteration: int, values: Tensor, info: Any = None) -> None:
        """Starts the copy of ``values`` (a 1-d device tensor) to the host; returns at once."""
        values = values.detach()
        if values.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = values.clone(), None
        self._queue.append(Pending(iteration, host, event, info))

    def pop(self) -> list[tuple[Pending, list[float]]]:
        """Reads every entry, oldest first, waiting for each copy's event (only that step's work, not
        what was queued after it). Returns (entry, values) pairs."""
        out = []
        while self._queue:
            entry = self._queue.popleft()
            if entry.event is not None:
                entry.event.synchronize()
            out.append((entry, entry.host.tolist()))
        return out
