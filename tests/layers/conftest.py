"""Shared fixture for tests that run a function on several gloo ranks (CPU processes on this machine)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

_RUN_IDS = itertools.count()
_PRELOAD = ["megdet.layers.cross_device_bn", "megdet.layers.norm", "megdet.layers.recompute"]


@pytest.fixture
def spawn_ranks(tmp_path: Path) -> Callable[..., list[Any]]:
    """``spawn_ranks(entry, world_size, *args) -> [result of rank 0, ..., rank world_size - 1]``.

    `entry(rank, world_size, run_dir, *args)` must be a module-level function of the test file
    (spawned processes import it by name). It initialises the gloo process group with
    ``init_method=f"file://{run_dir}/store"`` (a file store: no TCP port to find, so no port race),
    runs its checks and ``torch.save``s a result to
    ``f"{run_dir}/rank{rank}.pt"``. An exception in any rank fails the test with that rank's traceback.
    """

    def run(entry: Callable[..., None], world_size: int, *args: Any) -> list[Any]:
        run_dir = tmp_path / f"run{next(_RUN_IDS)}"
        run_dir.mkdir()
        # A fork server imports torch, torchvision and the test module once; every rank is then a cheap
        # fork of it instead of a fresh interpreter importing them again (tens of seconds on a busy
        # 2-core machine). Unlike forking pytest itself, the server is single-threaded and never ran ops.
        # The preload list only takes effect before the server's first start (later calls reuse it).
        mp.set_forkserver_preload(["torch", "torch.distributed", "torchvision", *_PRELOAD, entry.__module__])
        mp.start_processes(entry, args=(world_size, str(run_dir), *args), nprocs=world_size, join=True,
                           start_method="forkserver")
        return [torch.load(run_dir / f"rank{r}.pt", weights_only=True) for r in range(world_size)]

    return run
