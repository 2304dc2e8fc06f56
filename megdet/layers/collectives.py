"""A same-host all-reduce through shared memory for the small CPU tensors of cross-device BatchNorm.

Why not only ``torch.distributed``: on CPU the only backend is gloo, which moves every collective
through loopback TCP and its own I/O threads. For the few-KiB tensors that cross-device BatchNorm
reduces twice per layer, that latency adds up to more than the arithmetic of the layers themselves
(``benchmarks/cross_device_bn.py`` measures both transports; BENCHMARKS.md). When every rank of a group runs on the same machine, this module reduces instead through a small
shared-memory segment: each rank copies its tensor into its own slot, publishes a sequence number,
waits for the others' and sums the slots in rank order. The sum is computed by every rank in the
same order from the same bytes, so all ranks get bit-identical results (as with gloo).

Used only where it is correct and sure to help: CPU tensors, contiguous, at most
:data:`SLOT_BYTES` bytes, float32 / float64, on x86-64 (whose store order makes the
publish-after-copy protocol safe with one cheap fence), with all ranks of the group on one host.
Everything else goes to ``torch.distributed.all_reduce`` -- the decision depends only on facts that
are the same on every rank (tensor size and dtype, the gathered host names), so ranks never disagree
on the path. ``MEGDET_SHM_COLLECTIVES=0`` turns the shared-memory path off.

Protocol (per group, ``n`` ranks): two buffers of ``n`` slots, used alternately by the parity of the
call's sequence number. A rank writes call ``k+2`` into the buffer of call ``k`` only after every
rank published ``k+1``, and a rank publishes ``k+1`` only after it finished reading call ``k``, so
no slot is overwritten while someone still reads it.
"""

from __future__ import annotations

import mmap
import os
import platform
import socket
import threading
import time
import uuid

import torch
import torch.distributed as dist

__all__ = ["SLOT_BYTES", "all_reduce", "shared_memory_enabled"]

SLOT_BYTES = 64 * 1024  # per rank and buffer: BatchNorm's 2C+1 float64 values up to C = 4095
_FLAG_STRIDE = 8  # int64s between two ranks' sequence numbers: one 64-byte cache line each
_SPIN_CHECKS = 2000  # busy checks (~1-2 us each) before sleeping, which frees the core
_TIMEOUT_S = 1800.0  # torch.distributed's default collective timeout
_DTYPES = (torch.float32, torch.float64)
_STORE_FENCE = threading.Lock()


def shared_memory_enabled() -> bool:
    """Whether this process may use the shared-memory path (x86-64, /dev/shm, not switched off)."""
    if os.environ.get("MEGDET_SHM_COLLECTIVES", "1") == "0":
        return False
    return platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir("/dev/shm")


class _SharedMemoryGroup:
    """The shared segment of one process group whose ranks all run on this machine."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        ranks = dist.get_process_group_ranks(group)
        self.size = len(ranks)
        self.index = dist.get_rank(group)
        self.seq = 0
        flags_bytes = self.size * _FLAG_STRIDE * 8
        total = flags_bytes + 2 * self.size * SLOT_BYTES
        name = [f"/dev/shm/megdet-collectives-{uuid.uuid4().hex}" if self.index == 0 else None]
        dist.broadcast_object_list(name, src=ranks[0], group=group)
        path = self.path = name[0]
        if self.index == 0:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            os.ftruncate(fd, total)  # zero-filled: every sequence number starts at 0
        dist.barrier(group=group)
        if self.index != 0:
            fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, total)
        finally:
            os.close(fd)
        dist.barrier(group=group)
        if self.index == 0:
            os.unlink(path)  # every rank holds the mapping; nothing is left in /dev/shm, even after a crash
        raw = torch.frombuffer(self._map, dtype=torch.uint8)
        self.flags = raw[:flags_bytes].view(torch.int64)
        self.slots = raw[flags_bytes:].view(2, self.size, SLOT_BYTES)

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums ``tensor`` over the group in place."""
        self.seq += 1
        seq = self.seq
        buf = self.slots[seq % 2]
        flat = tensor.view(-1)
        nbytes = flat.numel() * flat.element_size()
        buf[self.index, :nbytes].view(tensor.dtype).copy_(flat)
        # x86 keeps ordinary stores in order, so the sequence number cannot become visible before the data;
        # the lock's atomic instruction also orders any non-temporal stores a copy routine might use.
        with _STORE_FENCE:
            pass
        self.flags[self.index * _FLAG_STRIDE] = seq
        self._wait(seq)
        flat.copy_(buf[0, :nbytes].view(tensor.dtype))
        for r in range(1, self.size):  # rank order on every rank: identical bits everywhere
            flat.add_(buf[r, :nbytes].view(tensor.dtype))
        return tensor

    def _wait(self, seq: int) -> None:
        checks = 0
        deadline = None
        for r in range(self.size):
            while int(self.flags[r * _FLAG_STRIDE]) < seq:
                checks += 1
                if checks <= _SPIN_CHECKS:
                    continue
                # Past the spin budget the other ranks are far behind, or need this core: sleep, which
                # frees it. os.sched_yield() does not when ranks and their threads outnumber the cores
                # (BENCHMARKS.md, cross-device BatchNorm).
                time.sleep(20e-6)
                now = time.monotonic()
                if deadline is None:
                    deadline = now + _TIMEOUT_S
                elif now > deadline:
                    raise RuntimeError(
                        f"megdet shared-memory all_reduce: rank {r} of the group did not arrive within"
                        f" {_TIMEOUT_S:.0f} s (call {seq}); it may have died -- check its log"
                    )


# group -> _SharedMemoryGroup, or None where the group cannot use shared memory. Keyed by the group
# object itself (held here), so a destroyed and re-created world gets new segments.
_GROUPS: dict[object, _SharedMemoryGroup | None] = {}


def _shared_group(group: dist.ProcessGroup | None) -> _SharedMemoryGroup | None:
    key = group if group is not None else dist.group.WORLD
    if key in _GROUPS:
        return _GROUPS[key]
    hosts: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, (socket.gethostname(), shared_memory_enabled()), group=group)
    usable = all(h == hosts[0] for h in hosts) and bool(hosts[0][1])  # type: ignore[index]
    entry = _SharedMemoryGroup(key) if usable else None
    _GROUPS[key] = entry
    return entry


def all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sums ``tensor`` in place over ``group`` (None: the world), like ``dist.all_reduce``.

    Through shared memory where the module docstring says it applies, else ``dist.all_reduce``.
    The first call on a group is itself a collective (host names are gathered), so every rank of the
    group must make it, as with any collective.
    """
    small = (
        tensor.device.type == "cpu"
        and tensor.dtype in _DTYPES
        and tensor.is_contiguous()
        and tensor.numel() * tensor.element_size() <= SLOT_BYTES
    )
    if small and "gloo" in str(dist.get_backend(group)):
        shared = _shared_group(group)
        if shared is not None:
            return shared.all_reduce_(tensor)
    dist.all_reduce(tensor, group=group)
    return tensor
