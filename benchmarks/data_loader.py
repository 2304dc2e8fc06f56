"""Training data-loader throughput (images/s): megdet's loader vs. a torchvision-style baseline.

Both read the same synthetic COCO-format dataset (generated once under benchmarks/results/ unless
``--data-dir`` names one) at the demo settings of the default Config: short side from
[224, 256, 288], long side <= 480, random flip, normalisation, padding to a multiple of 32,
2 images per batch. The baseline is ``torchvision.datasets.CocoDetection`` wrapped with
``wrap_dataset_for_transforms_v2`` and the equivalent v2 transforms, batched by a shuffling
DataLoader. Boxes and masks for both; megdet is also timed with keypoints on.

    python benchmarks/data_loader.py [--quick] [--data-dir DIR]

Prints a table, writes benchmarks/results/data_loader.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision.datasets import CocoDetection as TVCocoDetection
from torchvision.datasets import wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

from megdet.config import Config
from megdet.data.loader import build_train_loader

RESULTS = Path(__file__).resolve().parent / "results"


def ensure_dataset(data_dir: Path | None, num_train: int) -> Path:
    """The dataset to read: ``data_dir`` as given, or a synthetic one generated (once) for this benchmark."""
    if data_dir is not None:
        return data_dir
    from megdet.data.synthetic import generate_synthetic_coco

    root = RESULTS / f"data_loader_synth_{num_train}"
    if not (root / "annotations" / "person_keypoints_train.json").is_file():
        print(f"generating {num_train} synthetic training images in {root} ...")
        generate_synthetic_coco(
            root, num_train=num_train, num_val=0, image_size=256, seed=0, workers=2, progress=False
        )
    return root


def _pad_collate(samples: list[tuple[torch.Tensor, dict[str, Any]]], size_divisibility: int = 32):
    """The baseline's batching: zero-pad to a common size divisible by ``size_divisibility``."""
    h = max(img.shape[-2] for img, _ in samples)
    w = max(img.shape[-1] for img, _ in samples)
    h, w = -(-h // size_divisibility) * size_divisibility, -(-w // size_divisibility) * size_divisibility
    images = torch.zeros(len(samples), 3, h, w)
    for i, (img, _) in enumerate(samples):
        images[i, :, : img.shape[-2], : img.shape[-1]] = img
    return images, [t for _, t in samples]


def torchvision_loader(cfg: Config, workers: int) -> DataLoader:
    """torchvision's own COCO dataset and v2 transforms, set up to do the same work as ours."""
    d = cfg.data
    transforms = v2.Compose(
        [
            v2.ToImage(),
            v2.RandomShortestSize(min_size=d.min_size_train, max_size=d.max_size_train),
            v2.RandomHorizontalFlip(d.flip_prob),
            v2.ClampBoundingBoxes(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(d.pixel_mean, d.pixel_std),
        ]
    )
    root = Path(d.root)
    dataset = TVCocoDetection(str(root / d.train_split), str(root / "annotations" / f"instances_{d.train_split}.json"),
                              transforms=transforms)  # fmt: skip
    dataset = wrap_dataset_for_transforms_v2(dataset, target_keys=("image_id", "boxes", "labels", "masks"))
    return DataLoader(
        dataset,
        batch_size=d.images_per_device,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        collate_fn=_pad_collate,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0),
    )


def _endless(loader: DataLoader) -> Iterator[Any]:
    while True:  # the baseline loader is finite; ours is endless already
        yield from loader


def _count(batch: Any) -> int:
    return len(batch) if not isinstance(batch, tuple) else int(batch[0].shape[0])


def time_loaders(
    makers: dict[Any, Any], batches: int, warmup: int, repeats: int
) -> dict[Any, dict[str, Any]]:
    """For ``repeats`` rounds, and each loader in turn: builds it (timed as setup: reads the JSON), runs
    ``warmup`` batches (worker start-up), times ``batches`` batches, and shuts it down. Rounds alternate
    the loaders so that load drifting on a shared machine hits them alike; the median round is reported."""
    out: dict[Any, dict[str, Any]] = {key: {"setup_s": [], "rounds_images_per_s": []} for key in makers}
    for _ in range(repeats):
        for key, make in makers.items():
            t0 = time.perf_counter()
            it = _endless(make())
            out[key]["setup_s"].append(time.perf_counter() - t0)
            for _ in range(warmup):
                next(it)
            t0 = time.perf_counter()
            images = sum(_count(next(it)) for _ in range(batches))
            out[key]["rounds_images_per_s"].append(images / (time.perf_counter() - t0))
            it.close()  # ends the worker processes before the next loader is timed
            del it
    for r in out.values():
        r["setup_s"] = statistics.median(r["setup_s"])
        r["images_per_s"] = statistics.median(r["rounds_images_per_s"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (fewer images, batches and rounds)")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="an existing COCO-layout dataset root (split 'train')"
    )
    parser.add_argument(
        "--num-train", type=int, default=None, help="synthetic images to generate (default 256, quick 64)"
    )
    parser.add_argument(
        "--batches", type=int, default=None, help="timed batches per round (default 40, quick 10)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed rounds per loader (default 3, quick 2)"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="num_workers settings to time")
    args = parser.parse_args()
    num_train = args.num_train or (64 if args.quick else 256)
    batches = args.batches or (10 if args.quick else 40)
    repeats = args.repeats or (2 if args.quick else 3)
    warmup = 2 if args.quick else 5

    root = ensure_dataset(args.data_dir, num_train)
    cfg = Config()
    cfg.data.root = str(root)
    cfg.model.mask_on = True

    rows: list[dict[str, Any]] = []
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # e.g. dropped-box notes; they are not what is measured
        # (stdout: pycocotools' "loading annotations..." lines from the baseline)
        for workers in args.workers:
            cfg.data.num_workers = workers
            cfg_kp = copy.deepcopy(cfg)
            cfg_kp.model.keypoint_on = True
            makers = {
                ("megdet", "boxes+masks"): functools.partial(build_train_loader, cfg, rank=0, world_size=1),
                ("torchvision", "boxes+masks"): functools.partial(torchvision_loader, cfg, workers),
                ("megdet", "boxes+masks+keypoints"): functools.partial(
                    build_train_loader, cfg_kp, rank=0, world_size=1
                ),
            }
            for (name, targets), r in time_loaders(makers, batches, warmup, repeats).items():
                rows.append({"loader": name, "workers": workers, "targets": targets, **r})

    ratios = {}
    for workers in args.workers:
        ours, theirs = (
            next(
                r for r in rows if (r["loader"], r["targets"], r["workers"]) == (name, "boxes+masks", workers)
            )
            for name in ("megdet", "torchvision")
        )
        ratios[f"workers={workers}"] = ours["images_per_s"] / theirs["images_per_s"]

    print()
    print(f"data loader throughput, {root} ({'quick' if args.quick else 'full'}: median of {repeats} rounds of "
          f"{batches} batches of {cfg.data.images_per_device} images, after {warmup} warm-up batches)")  # fmt: skip
    print(f"{'loader':<12} {'targets':<22} {'workers':>7} {'setup s':>8} {'images/s':>9}")
    for r in rows:
        print(
            f"{r['loader']:<12} {r['targets']:<22} {r['workers']:>7} {r['setup_s']:>8.2f} {r['images_per_s']:>9.1f}"
        )
    for k, v in ratios.items():
        print(f"megdet / torchvision images/s, {k}: {v:.2f}x")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "data_loader.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "data_loader",
                "quick": args.quick,
                "dataset": str(root),
                "batches": batches,
                "repeats": repeats,
                "warmup": warmup,
                "images_per_batch": cfg.data.images_per_device,
                "rows": rows,
                "ratio_megdet_over_torchvision": ratios,
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
                "python": platform.python_version(),
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
