"""Batches for the model and the DataLoaders that produce them.

Train loader determinism: the batch sampler is deterministic from the seed (see ``sampler.py``),
and every sample's augmentation draws from torch's generator re-seeded from
``(seed, rank, iteration, position in batch)`` just for that sample. So which worker loads a sample,
and when, does not matter, and a run resumed at iteration k sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import functools
import signal
from collections.abc import Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from megdet.config import Config, ConfigError
from megdet.data.layout import split_files
from megdet.data.sampler import InferenceSampler, TrainingBatchSampler
from megdet.data.transforms import Compose, Normalize, build_transforms

if TYPE_CHECKING:
    # Imported where a dataset is built: Batch and collate (benchmarks, the trainer's step) must not
    # need pycocotools, which megdet.data.coco imports.
    from megdet.data.coco import CocoDetection

_TARGET_KEYS = ("boxes", "labels", "masks", "keypoints", "sem_seg")


@dataclass
class Batch:
    """What the model consumes (docs/ARCHITECTURE.md).

    ``images`` (B, 3, H, W) float32, normalised and zero-padded; ``image_sizes`` each image after
    resizing, before padding; ``original_sizes`` as stored on disk; ``targets`` in resized
    coordinates with ``boxes`` (N, 4) float32 xyxy, ``labels`` (N,) int64 and optionally ``masks``
    (N, h, w) uint8, ``keypoints`` (N, K, 3) float32 and ``sem_seg`` (h, w) uint8 class ids (255 = ignore).

    A raw batch (the trainer's loader, ``raw_images=True``) holds ``images`` as zero-padded uint8
    pixels and the normalisation in ``pixel_mean`` / ``pixel_std``; :meth:`normalized` turns it into
    the float batch above, on whatever device the batch is on by then.
    """

    images: torch.Tensor
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]
    image_ids: list[int]
    targets: list[dict[str, torch.Tensor]]
    pixel_mean: tuple[float, ...] | None = None
    pixel_std: tuple[float, ...] | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def _map(self, fn: Any) -> Batch:
        return Batch(
            images=fn(self.images),
            image_sizes=list(self.image_sizes),
            original_sizes=list(self.original_sizes),
            image_ids=list(self.image_ids),
            targets=[{k: fn(v) for k, v in t.items()} for t in self.targets],
            pixel_mean=self.pixel_mean,
            pixel_std=self.pixel_std,
        )

    @property
    def raw(self) -> bool:
        """True while ``images`` are uint8 pixels still to be normalised."""
        return self.pixel_mean is not None

    def normalized(self) -> Batch:
        """The batch with float32 images normalised as the ``Normalize`` transform does, padding zero.

        A raw batch is converted where its images are (on the GPU after ``to``: a quarter of the bytes
        cross the bus and the loader workers skip the float work); any other batch is returned as is.
        The arithmetic is the transform's, operation for operation, so on CPU the result is bitwise
        the batch a normalising loader gives.
        """
        if self.pixel_mean is None or self.pixel_std is None:
            return self
        images = normalize_images(self.images, self.pixel_mean, self.pixel_std)
        height, width = images.shape[-2:]
        for i, (h, w) in enumerate(self.image_sizes):
            # The loader pads with zeros after normalising; padding must stay zero here too.
            if h < height:
                images[i, :, h:].zero_()
            if w < width:
                images[i, :, :h, w:].zero_()
        return Batch(
            images=images,
            image_sizes=list(self.image_sizes),
            original_sizes=list(self.original_sizes),
            image_ids=list(self.image_ids),
            targets=self.targets,
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """A copy in pinned memory (called by DataLoader when ``pin_memory=True``)."""
        return self._map(lambda t: t.pin_memory())


def normalize_images(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 images (..., 3, H, W) to float32: scaled to [0, 1], minus ``mean``, divided by ``std``.

    The same operations, in the same order and precision, as torchvision's ``to_dtype(scale=True)``
    and ``normalize``, which the ``Normalize`` transform calls.
    """
    out = images.to(torch.float32).mul_(1.0 / 255)
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return out.sub_(m).div_(s)


def collate(
    samples: Sequence[tuple[torch.Tensor, dict[str, Any]]],
    size_divisibility: int = 32,
    pixel_stats: tuple[Sequence[float], Sequence[float]] | None = None,
) -> Batch:
    """Stacks transformed ``(image, target)`` samples into a :class:`Batch`, zero-padding bottom/right
    to a common size that is a multiple of ``size_divisibility``.

    ``pixel_stats``: ``(mean, std)`` when the samples are uint8 images not yet normalised; the batch
    then stays uint8 (a raw :class:`Batch`) and carries them for :meth:`Batch.normalized`.
    """
    if not samples:
        raise ValueError("collate: no samples")
    images = [img for img, _ in samples]
    if pixel_stats is not None and images[0].dtype != torch.uint8:
        raise ValueError(f"collate: pixel_stats given for {images[0].dtype} images; expected uint8")
    max_h = max(int(img.shape[-2]) for img in images)
    max_w = max(int(img.shape[-1]) for img in images)
    if size_divisibility > 1:
        max_h = -(-max_h // size_divisibility) * size_divisibility
        max_w = -(-max_w // size_divisibility) * size_divisibility
    dtype = torch.uint8 if pixel_stats is not None else torch.float32
    padded = torch.zeros((len(images), images[0].shape[0], max_h, max_w), dtype=dtype)
    for i, img in enumerate(images):
        padded[i, :, : img.shape[-2], : img.shape[-1]].copy_(img)
    targets = []
    for _, t in samples:
        # Plain tensors: the model must not depend on tv_tensors' metadata or dispatch.
        targets.append({k: t[k].as_subclass(torch.Tensor) for k in _TARGET_KEYS if k in t})
    return Batch(
        images=padded,
        image_sizes=[(int(img.shape[-2]), int(img.shape[-1])) for img in images],
        original_sizes=[(int(t["orig_size"][0]), int(t["orig_size"][1])) for _, t in samples],
        image_ids=[int(t["image_id"]) for _, t in samples],
        targets=targets,
        pixel_mean=tuple(float(v) for v in pixel_stats[0]) if pixel_stats is not None else None,
        pixel_std=tuple(float(v) for v in pixel_stats[1]) if pixel_stats is not None else None,
    )


def sample_seed(seed: int, rank: int, iteration: int, position: int) -> int:
    """The seed of one sample's augmentation: a hash of where it sits in the training stream."""
    state = np.random.SeedSequence([seed % 2**64, rank, iteration, position]).generate_state(1, np.uint64)
    return int(state[0])


class SeededBatchSampler:
    """Wraps a :class:`TrainingBatchSampler`: yields ``(index, sample_seed)`` pairs instead of indices."""

    def __init__(self, batch_sampler: TrainingBatchSampler) -> None:
        self.batch_sampler = batch_sampler

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        s = self.batch_sampler
        for iteration, batch in enumerate(s, start=s.start_iter):
            yield [(index, sample_seed(s.seed, s.rank, iteration, pos)) for pos, index in enumerate(batch)]


class SeededDataset(Dataset):
    """Loads ``dataset[index]`` with torch's generator seeded to ``sample_seed``, restoring it afterwards."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also queue seeds for every accelerator.
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


def _build_dataset(cfg: Config, split: str, train: bool, normalize: bool = True) -> CocoDetection:
    from megdet.data.coco import CocoDetection

    files = split_files(cfg.data.root, split, cfg.data.sem_seg_dir)
    semantic = cfg.model.context.semantic
    dataset = CocoDetection(
        files.images,
        files.instances,
        files.keypoints if cfg.model.keypoint_on else None,
        train=train,
        with_masks=cfg.model.mask_on,
        with_keypoints=cfg.model.keypoint_on,
        with_sem_seg=semantic,
        sem_seg_dir=files.label_maps if semantic and cfg.data.sem_seg_dir else None,
        num_semantic_classes=cfg.model.context.num_semantic_classes,
        allow_outside_images=cfg.data.allow_outside_images,
    )
    check_dataset_fits_model(dataset, cfg, train=train)
    flip_map = dataset.keypoint_flip_map if cfg.model.keypoint_on else None
    dataset.transforms = build_transforms(cfg.data, train=train, flip_map=flip_map, normalize=normalize)
    return dataset


def check_dataset_fits_model(dataset: CocoDetection, cfg: Config, train: bool = False) -> None:
    """ConfigError when the model's outputs and the dataset disagree. Label i is the i-th category by sorted
    id, so a dataset may not have more categories than ``model.num_classes`` (labels would index past the
    classifier). Fewer are allowed only to train without evaluation (``train`` and ``test.eval_period <
    0``: the extra outputs stay background, as in a benchmark of a COCO-sized head): evaluating maps every
    output to a category. With keypoints on, exactly ``model.num_keypoints`` keypoint names."""
    n, k = len(dataset.coco_category_ids), cfg.model.num_classes
    if n > k or (n < k and not (train and cfg.test.eval_period < 0)):
        unless = "" if n > k else " or, to train without evaluation, test.eval_period=-1"
        raise ConfigError(
            f"{dataset.instances_json}: {n} categories but model.num_classes={k}; "
            f"set model.num_classes={n} (one output per category){unless}"
        )
    if cfg.model.keypoint_on and dataset.num_keypoints != cfg.model.num_keypoints:
        src = dataset.keypoints_json or dataset.instances_json
        raise ConfigError(
            f"{src}: {dataset.num_keypoints} keypoints per instance but model.num_keypoints="
            f"{cfg.model.num_keypoints}; set model.num_keypoints={dataset.num_keypoints}"
        )


def build_train_dataset(cfg: Config, raw_images: bool = False) -> CocoDetection:
    """The training split ``cfg.data.train_split`` with training transforms.

    ``raw_images``: the transforms stop before normalisation (uint8 images), for
    ``build_train_loader(raw_images=True)``.
    """
    return _build_dataset(cfg, cfg.data.train_split, train=True, normalize=not raw_images)


def _normalizes(dataset: Any) -> bool:
    transforms = getattr(dataset, "transforms", None)
    return any(isinstance(t, Normalize) for t in getattr(transforms, "transforms", []))


def build_test_dataset(cfg: Config, split: str) -> CocoDetection:
    """Split ``split`` (all images kept) with test transforms."""
    return _build_dataset(cfg, split, train=False)


def _ignore_sigterm(worker_id: int) -> None:
    """worker_init_fn: data-loader workers outlive SIGTERM and SIGINT.

    A job scheduler's SIGTERM reaches every process of the job, as Ctrl-C's SIGINT reaches every process
    of the terminal's foreground group. The training process turns either into a checkpoint and then
    shuts its loader down itself; a worker killed by it first would make the trainer fail with
    "DataLoader worker ... is killed by signal: Terminated" instead of saving. Workers still end with
    their parent (PyTorch's worker watchdog), when their loader shuts them down (the trainer does so
    explicitly at the end of a run) or with SIGKILL.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_train_loader(
    cfg: Config,
    rank: int,
    world_size: int,
    start_iter: int = 0,
    dataset: CocoDetection | None = None,
    raw_images: bool = False,
    pin_memory: bool | None = None,
) -> DataLoader:
    """Endless loader of :class:`Batch` es for ``rank``, starting at iteration ``start_iter``.

    ``dataset``: an already built :func:`build_train_dataset` (saves reading the JSON twice when the
    caller needed it first, e.g. for ``verify_images``), built with the same ``raw_images``.
    ``loader.dataset.dataset`` is the CocoDetection. ``raw_images``: yield raw batches (uint8 images;
    call :meth:`Batch.normalized` after moving them to the device), as the trainer does. The stream is
    otherwise the same: same samples, same augmentation. ``pin_memory``: page-locked batches, for
    asynchronous host-to-GPU copies; None = when CUDA is available.
    """
    dataset = dataset if dataset is not None else build_train_dataset(cfg, raw_images=raw_images)
    if raw_images and _normalizes(dataset):
        raise ValueError("build_train_loader: raw_images=True needs a dataset from "
                         "build_train_dataset(cfg, raw_images=True)")  # fmt: skip
    sampler = TrainingBatchSampler(
        dataset.aspect_ratios(),
        images_per_device=cfg.data.images_per_device,
        rank=rank,
        world_size=world_size,
        seed=cfg.train.seed,
        group_by_aspect=cfg.data.aspect_ratio_grouping,
        start_iter=start_iter,
    )
    workers = cfg.data.num_workers
    stats = (tuple(cfg.data.pixel_mean), tuple(cfg.data.pixel_std)) if raw_images else None
    return DataLoader(
        SeededDataset(dataset),
        batch_sampler=SeededBatchSampler(sampler),
        num_workers=workers,
        collate_fn=functools.partial(collate, size_divisibility=cfg.data.size_divisibility, pixel_stats=stats),
        persistent_workers=workers > 0,
        worker_init_fn=_ignore_sigterm,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        # Own generator: creating worker iterators must not consume the caller's global RNG.
        generator=torch.Generator().manual_seed(cfg.train.seed + rank),
    )


def num_test_images(cfg: Config, dataset: Sized) -> int:
    """How many images of a test split are evaluated: its first ``cfg.test.max_images`` (all when <= 0)."""
    return len(dataset) if cfg.test.max_images <= 0 else min(len(dataset), cfg.test.max_images)


def build_test_loader(
    cfg: Config,
    split: str,
    rank: int,
    world_size: int,
    dataset: CocoDetection | None = None,
    original_size: bool = False,
) -> DataLoader:
    """Loader over this rank's contiguous shard of ``split`` (:func:`num_test_images` images in all).

    ``dataset``: an already built :func:`build_test_dataset` of ``split`` to reuse. ``original_size``:
    images are only converted and normalised, not resized or padded (for test-time augmentation,
    whose views resize each image themselves).
    """
    dataset = dataset if dataset is not None else build_test_dataset(cfg, split)
    if original_size:
        dataset.transforms = Compose([Normalize(cfg.data.pixel_mean, cfg.data.pixel_std)])
    return DataLoader(
        dataset,
        batch_size=cfg.test.images_per_device,
        sampler=InferenceSampler(num_test_images(cfg, dataset), rank, world_size),
        num_workers=cfg.data.num_workers,
        collate_fn=functools.partial(collate, size_divisibility=1 if original_size else cfg.data.size_divisibility),
        worker_init_fn=_ignore_sigterm,  # evaluation inside a training run that gets SIGTERM
        pin_memory=torch.cuda.is_available(),
    )
