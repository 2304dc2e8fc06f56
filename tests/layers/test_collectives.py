"""The shared-memory all-reduce (megdet.layers.collectives) on spawned gloo ranks of this machine."""

from __future__ import annotations

import os
import random
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from megdet.layers import collectives


def _init(rank: int, world_size: int, run_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{run_dir}/store", rank=rank, world_size=world_size,
        timeout=timedelta(seconds=60),
    )


def _save(result: Any, run_dir: str, rank: int) -> None:
    torch.save(result, os.path.join(run_dir, f"rank{rank}.pt"))


def _count_gloo_calls() -> list[int]:
    calls = [0]
    original = dist.all_reduce

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    dist.all_reduce = counting
    return calls


def _exact_sums_entry(rank: int, world_size: int, run_dir: str) -> None:
    """Many calls of varying sizes with random delays: every result is the exact sum, equal on all ranks."""
    _init(rank, world_size, run_dir)
    try:
        first = torch.ones(4, dtype=torch.float64)
        collectives.all_reduce(first)  # sets the group up (itself a few gloo collectives)
        shared = collectives._GROUPS[dist.group.WORLD]
        assert shared is not None and not os.path.exists(shared.path)  # unlinked once all had mapped it
        calls = _count_gloo_calls()
        rng = random.Random(rank)  # each rank sleeps differently: slots are reused while others lag
        sizes = [1, 7, 129, 4097, collectives.SLOT_BYTES // 4]
        results = []
        for k in range(120):
            n = sizes[k % len(sizes)]
            dtype = torch.float32 if k % 3 == 0 else torch.float64
            if dtype == torch.float64:
                n = min(n, collectives.SLOT_BYTES // 8)
            # Small integers: every partial sum is exact, whatever the order of the additions.
            x = (torch.arange(n, dtype=dtype) % 50) * (rank + 1) + k
            expected = (torch.arange(n, dtype=dtype) % 50) * sum(r + 1 for r in range(world_size)) + k * world_size
            if rng.random() < 0.3:
                time.sleep(rng.random() * 0.003)
            out = collectives.all_reduce(x)
            assert out is x and torch.equal(x, expected), f"call {k} (n={n}, {dtype})"
            results.append(x[:5].clone())
        assert calls[0] == 0  # none of them went through gloo
        _save({"results": results, "ok": True}, run_dir, rank)
    finally:
        dist.destroy_process_group()


def test_shared_memory_all_reduce_two_and_four_ranks(spawn_ranks) -> None:
    for world in (2, 4):
        out = spawn_ranks(_exact_sums_entry, world)
        assert all(r["ok"] for r in out)
        for r in out[1:]:
            assert all(torch.equal(a, b) for a, b in zip(r["results"], out[0]["results"]))


def _fallback_entry(rank: int, world_size: int, run_dir: str) -> None:
    """Tensors the shared path does not take (too large, int64) and subgroups still reduce correctly."""
    _init(rank, world_size, run_dir)
    try:
        calls = _count_gloo_calls()
        big = torch.full((collectives.SLOT_BYTES // 4 + 1,), float(rank + 1))
        collectives.all_reduce(big)
        ints = torch.full((3,), rank + 1, dtype=torch.int64)
        collectives.all_reduce(ints)
        total = sum(r + 1 for r in range(world_size))
        assert torch.equal(big, torch.full_like(big, total)) and torch.equal(ints, torch.full_like(ints, total))
        gloo_calls = calls[0]
        # Two groups of two consecutive ranks: each sums within itself, through its own segment.
        group, _ = dist.new_subgroups(group_size=2)
        x = torch.full((5,), float(rank + 1), dtype=torch.float64)
        collectives.all_reduce(x, group=group)
        base = rank - rank % 2
        assert torch.equal(x, torch.full_like(x, float(base + 1 + base + 2)))
        assert collectives._GROUPS[group] is not None
        _save({"gloo_calls": gloo_calls}, run_dir, rank)
    finally:
        dist.destroy_process_group()


def test_fallback_and_subgroups(spawn_ranks) -> None:
    out = spawn_ranks(_fallback_entry, 4)
    assert [r["gloo_calls"] for r in out] == [2] * 4


def _switched_off_entry(rank: int, world_size: int, run_dir: str) -> None:
    os.environ["MEGDET_SHM_COLLECTIVES"] = "0"
    _init(rank, world_size, run_dir)
    try:
        x = torch.full((3,), float(rank + 1))
        collectives.all_reduce(x)
        assert torch.equal(x, torch.full_like(x, 3.0))
        _save({"entry": collectives._GROUPS[dist.group.WORLD]}, run_dir, rank)
    finally:
        dist.destroy_process_group()


def test_switched_off_uses_gloo(spawn_ranks) -> None:
    assert [r["entry"] for r in spawn_ranks(_switched_off_entry, 2)] == [None, None]
