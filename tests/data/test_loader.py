"""Batch, collate and the train/test DataLoaders on the tiny dataset of conftest.py."""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from megdet.config import Config
from megdet.data.loader import Batch, build_test_loader, build_train_dataset, build_train_loader, collate

pytestmark = pytest.mark.filterwarnings("ignore:.*narrower or shorter than 1 pixel:UserWarning")


def _cfg(tiny, workers: int = 0) -> Config:
    cfg = Config()
    cfg.data.root = str(tiny.root)
    cfg.data.num_workers = workers
    cfg.data.images_per_device = 2
    cfg.data.min_size_train = [24, 32, 40]
    cfg.data.max_size_train = 64
    cfg.data.min_size_test = 32
    cfg.data.max_size_test = 64
    cfg.model.mask_on = True
    cfg.model.keypoint_on = True
    cfg.model.num_classes = 3  # person, car, dog
    cfg.train.seed = 11
    cfg.test.images_per_device = 4
    return cfg


def _assert_same(a: Batch, b: Batch) -> None:
    assert a.image_ids == b.image_ids and a.image_sizes == b.image_sizes
    assert torch.equal(a.images, b.images)
    for ta, tb in zip(a.targets, b.targets, strict=True):
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), k


def test_collate_pads_to_a_multiple_of_32():
    samples = []
    for i, (h, w) in enumerate([(33, 40), (20, 70)]):
        target = {
            "image_id": i,
            "orig_size": (h // 2, w // 2),
            "boxes": torch.zeros(1, 4),
            "labels": torch.ones(1, dtype=torch.int64),
        }
        samples.append((torch.rand(3, h, w) + 1.0, target))
    batch = collate(samples, size_divisibility=32)
    assert batch.images.shape == (2, 3, 64, 96) and batch.images.dtype == torch.float32
    assert batch.image_sizes == [(33, 40), (20, 70)] and batch.original_sizes == [(16, 20), (10, 35)]
    assert batch.image_ids == [0, 1] and len(batch) == 2
    for img, (h, w), padded in zip((s[0] for s in samples), batch.image_sizes, batch.images):
        assert torch.equal(padded[:, :h, :w], img)
        assert not padded[:, h:, :].any() and not padded[:, :, w:].any()
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.images, batch.images)


def test_train_loader_batch_fields_and_dtypes(tiny_coco):
    loader = build_train_loader(_cfg(tiny_coco), rank=0, world_size=1)
    for batch in itertools.islice(iter(loader), 4):
        assert isinstance(batch, Batch) and len(batch) == 2
        assert batch.images.dtype == torch.float32 and batch.images.shape[:2] == (2, 3)
        assert batch.images.shape[-2] % 32 == 0 and batch.images.shape[-1] % 32 == 0
        for (h, w), (oh, ow), t, image_id in zip(
            batch.image_sizes, batch.original_sizes, batch.targets, batch.image_ids
        ):
            assert image_id != 3  # no annotations: skipped in training
            assert max(h, w) <= 64 and min(h, w) in (24, 32, 40) or max(h, w) == 64
            assert (oh, ow) == tuple(tiny_coco.pixels[image_id].shape[:2])
            n = len(t["labels"])
            assert n > 0 and t["labels"].dtype == torch.int64
            assert t["boxes"].shape == (n, 4) and t["boxes"].dtype == torch.float32
            assert type(t["boxes"]) is torch.Tensor
            assert t["masks"].shape == (n, h, w) and t["masks"].dtype == torch.uint8
            assert t["keypoints"].shape == (n, 17, 3) and t["keypoints"].dtype == torch.float32
            assert bool((t["boxes"][:, 2:] <= torch.tensor([w, h])).all()) and bool((t["boxes"] >= 0).all())


def test_same_augmented_batches_after_resume_and_with_workers(tiny_coco):
    cfg = _cfg(tiny_coco)
    before = torch.get_rng_state()
    full = list(itertools.islice(iter(build_train_loader(cfg, rank=0, world_size=1)), 8))
    assert torch.equal(torch.get_rng_state(), before)  # augmentation does not touch the caller's RNG
    # The augmentation really is random (so the comparisons below can fail).
    assert len({b.images.shape for b in full}) > 1
    resumed = list(itertools.islice(iter(build_train_loader(cfg, rank=0, world_size=1, start_iter=5)), 3))
    for a, b in zip(full[5:], resumed, strict=True):
        _assert_same(a, b)
    workers = list(
        itertools.islice(iter(build_train_loader(_cfg(tiny_coco, workers=2), rank=0, world_size=1)), 8)
    )
    for a, b in zip(full, workers, strict=True):
        _assert_same(a, b)


def test_ranks_get_different_batches_and_a_prebuilt_dataset_is_used(tiny_coco):
    cfg = _cfg(tiny_coco)
    dataset = build_train_dataset(cfg)
    loaders = [build_train_loader(cfg, rank=r, world_size=2, dataset=dataset) for r in range(2)]
    assert all(loader.dataset.dataset is dataset for loader in loaders)
    first = [next(iter(loader)).image_ids for loader in loaders]
    assert first[0] != first[1]


def test_test_loader_covers_split_and_respects_max_images(tiny_coco):
    cfg = _cfg(tiny_coco)
    ids = [
        [i for b in build_test_loader(cfg, "val", rank=r, world_size=2) for i in b.image_ids]
        for r in range(2)
    ]
    assert ids == [[1, 2, 3], [4, 5, 6]]  # the empty image 3 is kept for evaluation
    batch = next(iter(build_test_loader(cfg, "val", rank=0, world_size=1)))
    assert len(batch) == 4 and all(min(s) == 32 or max(s) == 64 for s in batch.image_sizes)
    cfg.test.max_images = 3
    ids = [i for b in build_test_loader(cfg, "val", rank=0, world_size=1) for i in b.image_ids]
    assert ids == [1, 2, 3]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.min_size_train=[]", "data.min_size_train: expected a non-empty list of positive sizes, got []"),
        ("data.min_size_train=[256,0]", "data.min_size_train: expected a non-empty list of positive sizes"),
        ("data.images_per_device=0", "data.images_per_device: expected >= 1, got 0"),
        ("data.size_divisibility=-1", "data.size_divisibility: expected >= 0, got -1"),
        ("data.flip_prob=1.5", "data.flip_prob: expected a value in [0, 1], got 1.5"),
        ("data.pixel_mean=[0.5]", "data.pixel_mean: expected 3 values (R, G, B), got [0.5]"),
        ("data.pixel_std=[1,0,1]", "data.pixel_std: expected positive values"),
    ],
)
def test_impossible_data_configs_are_config_errors(override: str, message: str) -> None:
    from megdet.config import ConfigError, load_config

    load_config(None, []).data.validate()
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override]).data.validate()


def test_raw_batches_normalised_are_bitwise_the_normalising_loaders(tiny_coco):
    # The trainer's loader yields uint8 images and normalises after the copy to its device; on CPU that
    # must give exactly the batches of the normalising loader (CPU training stays bit-identical).
    cfg = _cfg(tiny_coco)
    float_batches = list(itertools.islice(iter(build_train_loader(cfg, rank=0, world_size=1)), 6))
    raw_loader = build_train_loader(_cfg(tiny_coco, workers=2), rank=0, world_size=1, raw_images=True)
    raw_batches = list(itertools.islice(iter(raw_loader), 6))
    assert len({b.images.shape for b in raw_batches}) > 1
    for f, r in zip(float_batches, raw_batches, strict=True):
        assert r.raw and r.images.dtype == torch.uint8 and r.pixel_mean == tuple(cfg.data.pixel_mean)
        moved = r.to("cpu")
        assert moved.raw and moved.pixel_std == tuple(cfg.data.pixel_std)
        n = moved.normalized()
        assert not n.raw and n.images.dtype == torch.float32
        _assert_same(f, n)
        assert n.normalized() is n  # a float batch is returned as is
    with pytest.raises(ValueError, match="raw_images=True"):
        build_train_loader(cfg, rank=0, world_size=1, dataset=build_train_dataset(cfg), raw_images=True)


def test_normalized_zeroes_the_padding_of_each_image():
    samples = []
    for i, (h, w) in enumerate([(33, 40), (20, 70)]):
        target = {"image_id": i, "orig_size": (h, w), "boxes": torch.zeros(1, 4), "labels": torch.ones(1, dtype=torch.int64)}
        samples.append((torch.randint(0, 256, (3, h, w), dtype=torch.uint8), target))
    stats = ([0.5, 0.4, 0.3], [0.2, 0.25, 0.5])
    raw = collate(samples, size_divisibility=32, pixel_stats=stats)
    assert raw.images.dtype == torch.uint8 and raw.images.shape == (2, 3, 64, 96)
    out = raw.pin_memory().normalized() if torch.cuda.is_available() else raw.normalized()
    for (img, _), (h, w), padded in zip(samples, out.image_sizes, out.images):
        expected = (img.float() / 255 - torch.tensor(stats[0])[:, None, None]) / torch.tensor(stats[1])[:, None, None]
        torch.testing.assert_close(padded[:, :h, :w], expected)
        assert not padded[:, h:, :].any() and not padded[:, :, w:].any()
    with pytest.raises(ValueError, match="expected uint8"):
        collate([(img.float(), t) for img, t in samples], pixel_stats=stats)


def test_original_size_test_loader_normalises_only(tiny_coco) -> None:
    from megdet.data.loader import _ignore_sigterm, build_test_dataset

    cfg = _cfg(tiny_coco)
    loader = build_test_loader(cfg, "val", rank=0, world_size=1, original_size=True)
    assert loader.worker_init_fn is _ignore_sigterm  # as every loader's: workers outlive SIGTERM
    batch = next(iter(loader))
    dataset = build_test_dataset(cfg, "val")
    assert batch.image_sizes == batch.original_sizes == [dataset.image_size(i) for i in range(len(batch))]
    h, w = batch.image_sizes[0]
    assert batch.images.shape[-2:] == tuple(max(s[i] for s in batch.image_sizes) for i in (0, 1))
    pixels = torch.from_numpy(tiny_coco.pixels[batch.image_ids[0]]).permute(2, 0, 1).float() / 255
    mean = torch.tensor(cfg.data.pixel_mean).view(3, 1, 1)
    std = torch.tensor(cfg.data.pixel_std).view(3, 1, 1)
    torch.testing.assert_close(batch.images[0, :, :h, :w], (pixels - mean) / std)
