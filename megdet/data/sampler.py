"""Samplers for distributed training and inference.

:class:`TrainingBatchSampler` turns a dataset into an endless, fully deterministic stream of
per-rank batches: every epoch is one permutation shared by all ranks (seeded from the run's seed and
the epoch number), cut into equal disjoint shards, and each rank forms batches from its shard,
optionally grouping landscape and portrait images apart so padding is small. Images left over in
a group at the end of an epoch wait for the next epoch's images of the same orientation, so no
image is dropped and no batch mixes orientations. Because the stream depends only on the seed,
resuming at iteration k is a matter of arithmetic, not of replaying the data loading.

torch's DistributedSampler has no aspect-ratio grouping, is finite, and cannot resume mid-epoch;
hence our own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch


def iters_per_epoch(num_images: int, global_batch: int) -> int:
    """Iterations that cover ``num_images`` once at ``global_batch`` images per iteration (rounded up)."""
    if num_images <= 0 or global_batch <= 0:
        raise ValueError(
            f"iters_per_epoch: need positive num_images and global_batch, got {num_images}, {global_batch}"
        )
    return math.ceil(num_images / global_batch)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")


class TrainingBatchSampler:
    """Endless iterable of index lists: one batch of ``images_per_device`` indices per iteration for ``rank``.

    Args:
        aspect_ratios: width / height per dataset item (``CocoDetection.aspect_ratios()``).
        images_per_device: batch size of this rank.
        rank, world_size: this process and how many there are.
        seed: shared by all ranks; with the epoch number it fixes each epoch's permutation.
        group_by_aspect: batch landscape (w >= h) and portrait images separately.
        start_iter: begin with the batch an uninterrupted sampler would give at iteration ``start_iter``.
    """

    def __init__(
        self,
        aspect_ratios: Sequence[float],
        images_per_device: int,
        rank: int,
        world_size: int,
        seed: int,
        group_by_aspect: bool = True,
        start_iter: int = 0,
    ) -> None:
        if len(aspect_ratios) == 0:
            raise ValueError("TrainingBatchSampler: the dataset is empty")
        if images_per_device < 1:
            raise ValueError(f"TrainingBatchSampler: images_per_device must be >= 1, got {images_per_device}")
        if start_iter < 0:
            raise ValueError(f"TrainingBatchSampler: start_iter must be >= 0, got {start_iter}")
        _check_rank(rank, world_size)
        self.num_images = len(aspect_ratios)
        self.images_per_device = int(images_per_device)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.group_by_aspect = bool(group_by_aspect)
        self.start_iter = int(start_iter)
        ratios = np.asarray(aspect_ratios, dtype=np.float64)
        # Group key per image: 1 landscape (or square), 0 portrait; one group when not grouping.
        self._group = (ratios >= 1.0).astype(np.int64) if group_by_aspect else np.zeros(len(ratios), np.int64)

    @property
    def shard_size(self) -> int:
        """Images each rank sees per epoch (the dataset padded by wrapping to a multiple of world_size)."""
        return math.ceil(self.num_images / self.world_size)

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """The permutation of all indices for ``epoch``, identical on every rank."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed % 2**64, epoch]))
        return rng.permutation(self.num_images)

    def epoch_shard(self, epoch: int) -> np.ndarray:
        """This rank's indices for ``epoch``, in visiting order."""
        perm = self.epoch_permutation(epoch)
        per_rank = self.shard_size
        padded = perm[np.arange(per_rank * self.world_size) % self.num_images]
        return padded[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __iter__(self) -> Iterator[list[int]]:
        size = self.images_per_device
        pending: list[list[int]] = [[], []]  # per group: indices waiting for a full batch
        produced = 0
        epoch = 0
        # Skip whole epochs by counting the batches each would complete; only the carried-over
        # remainder of every group needs tracking.
        while True:
            shard = self.epoch_shard(epoch)
            groups = self._group[shard]
            queued = [pending[g] + shard[groups == g].tolist() for g in (0, 1)]
            batches = sum(len(q) // size for q in queued)
            if produced + batches > self.start_iter:
                break
            pending = [q[len(q) - len(q) % size :] for q in queued]
            produced += batches
            epoch += 1
        while True:
            for index, g in zip(shard.tolist(), groups.tolist()):
                bucket = pending[g]
                bucket.append(index)
                if len(bucket) == size:
                    if produced >= self.start_iter:
                        yield bucket
                    produced += 1
                    pending[g] = []
            epoch += 1
            shard = self.epoch_shard(epoch)
            groups = self._group[shard]


class InferenceSampler(torch.utils.data.Sampler[int]):
    """Every index of ``range(size)`` exactly once across ranks, in contiguous shards differing by at most one."""

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        if size < 0:
            raise ValueError(f"InferenceSampler: size must be >= 0, got {size}")
        _check_rank(rank, world_size)
        base, extra = divmod(size, world_size)
        self.start = rank * base + min(rank, extra)
        self.end = self.start + base + (1 if rank < extra else 0)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.end))

    def __len__(self) -> int:
        return self.end - self.start
