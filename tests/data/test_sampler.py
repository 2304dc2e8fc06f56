"""TrainingBatchSampler and InferenceSampler."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from megdet.data.sampler import InferenceSampler, TrainingBatchSampler, iters_per_epoch

# 11 images: 6 landscape (>= 1) and 5 portrait.
RATIOS = [1.5, 0.7, 1.0, 0.5, 1.33, 0.75, 2.0, 0.6, 1.2, 1.8, 0.9]


def _take(sampler, n):
    return [list(b) for b in itertools.islice(iter(sampler), n)]


def test_iters_per_epoch():
    assert iters_per_epoch(118287, 256) == 463
    assert iters_per_epoch(512, 256) == 2 and iters_per_epoch(1, 16) == 1
    with pytest.raises(ValueError):
        iters_per_epoch(10, 0)


@pytest.mark.parametrize(("n", "world_size"), [(12, 3), (11, 4), (3, 5)])
def test_shards_equal_disjoint_and_cover_the_dataset(n, world_size):
    samplers = [TrainingBatchSampler([1.0] * n, 2, r, world_size, seed=3) for r in range(world_size)]
    for epoch in range(3):
        shards = [s.epoch_shard(epoch) for s in samplers]
        assert len({len(s) for s in shards}) == 1  # equal lengths
        flat = np.concatenate(shards)
        assert set(flat.tolist()) == set(range(n))
        assert len(flat) - len(set(flat.tolist())) == len(flat) - n  # only the wrap-around padding repeats
        if n % world_size == 0:
            assert len(flat) == n
        assert all(
            np.array_equal(s.epoch_permutation(epoch), samplers[0].epoch_permutation(epoch)) for s in samplers
        )


def test_each_epoch_reshuffled_and_seed_matters():
    s = TrainingBatchSampler(RATIOS * 3, 2, 0, 1, seed=0)
    perms = [s.epoch_permutation(e).tolist() for e in range(4)]
    assert all(sorted(p) == list(range(33)) for p in perms)
    assert len({tuple(p) for p in perms}) == 4
    other = TrainingBatchSampler(RATIOS * 3, 2, 0, 1, seed=1)
    assert other.epoch_permutation(0).tolist() != perms[0]


@pytest.mark.parametrize("group", [True, False])
def test_grouping_and_nothing_dropped(group):
    ipd = 3
    s = TrainingBatchSampler(RATIOS, ipd, rank=1, world_size=2, seed=5, group_by_aspect=group)
    batches = _take(s, 40)
    assert all(len(b) == ipd for b in batches)
    orientations = [{RATIOS[i] >= 1 for i in b} for b in batches]
    if group:
        assert all(len(o) == 1 for o in orientations)
    else:
        assert any(len(o) == 2 for o in orientations)
    # The stream is the concatenated epoch shards, regrouped: every index of the first epochs appears,
    # in shard order within each orientation.
    stream = np.concatenate([s.epoch_shard(e) for e in range(30)]).tolist()
    flat = [i for b in batches for i in b]
    for landscape in (True, False):
        mine = [i for i in flat if (RATIOS[i] >= 1) == landscape or not group]
        ref = [i for i in stream if (RATIOS[i] >= 1) == landscape or not group]
        assert mine == ref[: len(mine)]


@pytest.mark.parametrize("group", [True, False])
def test_resume_at_iteration_k_gives_the_same_remaining_batches(group):
    full = _take(TrainingBatchSampler(RATIOS, 2, 1, 3, seed=7, group_by_aspect=group), 60)
    for k in (0, 1, 2, 5, 13, 41):  # within the first epoch and several epochs in
        resumed = _take(
            TrainingBatchSampler(RATIOS, 2, 1, 3, seed=7, group_by_aspect=group, start_iter=k), 60 - k
        )
        assert resumed == full[k:], k


def test_ranks_differ_and_iteration_is_repeatable():
    a = TrainingBatchSampler(RATIOS, 2, 0, 2, seed=1)
    b = TrainingBatchSampler(RATIOS, 2, 1, 2, seed=1)
    assert _take(a, 10) == _take(a, 10)
    assert _take(a, 10) != _take(b, 10)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        TrainingBatchSampler(RATIOS, 2, rank=2, world_size=2, seed=0)
    with pytest.raises(ValueError, match="empty"):
        TrainingBatchSampler([], 2, 0, 1, seed=0)


@pytest.mark.parametrize(("size", "world_size"), [(10, 3), (9, 3), (2, 4), (0, 2), (7, 1)])
def test_inference_sampler(size, world_size):
    shards = [list(InferenceSampler(size, r, world_size)) for r in range(world_size)]
    assert [i for s in shards for i in s] == list(range(size))  # contiguous, in order, each once
    lengths = [len(InferenceSampler(size, r, world_size)) for r in range(world_size)]
    assert lengths == [len(s) for s in shards]
    assert max(lengths) - min(lengths) <= 1
