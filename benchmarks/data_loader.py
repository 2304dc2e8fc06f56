"""Training data-loader throughput (images/s): megdet's loader vs. a torchvision-style baseline.

Both read the same synthetic COCO-format dataset (generated once under benchmarks/results/ unless
``--data-dir`` names one) at the demo settings of the default Config: short side from
[224, 256, 288], long side <= 480, random flip, normalisation, padding to a multiple of 32,
2 images per batch. The baseline is ``torchvision.datasets.CocoDetection`` wrapped with
``wrap_dataset_for_transforms_v2`` and the equivalent v2 transforms, batched by a shuffling
DataLoader. Boxes and masks for both; megdet is also timed with keypoints on, and as ``megdet train``
builds it (``megdet-trainer``: uint8 images, normalised later on the training device, batches in
pinned memory where CUDA is available). ``--set`` changes the settings (e.g. the training step's image
size and batch), ``--target-images-per-s`` (the training step's rate, e.g. from train_step.py) says
whether the trainer's loader keeps up at each timed worker count and the fewest workers that do.

    python benchmarks/data_loader.py [--quick] [--data-dir DIR] [--workers 0 2]
    python benchmarks/data_loader.py --data-dir DIR --trainer-only --workers 2 4 8 --target-images-per-s 40 \
        --set data.min_size_train=[800] data.max_size_train=1216 data.images_per_device=8 model.mask_on=false

Prints a table, writes benchmarks/results/data_loader.json (or ``--out``).
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

from megdet.config import Config, load_config
from megdet.data.layout import split_files
from megdet.data.loader import build_train_loader

RESULTS = Path(__file__).resolve().parent / "results"


def ensure_dataset(data_dir: Path | None, num_train: int) -> Path:
    """The dataset to read: ``data_dir`` as given, or a synthetic one generated (once) for this benchmark."""
    if data_dir is not None:
        return data_dir
    from megdet.data.synthetic import generate_synthetic_coco

    root = RESULTS / f"data_loader_synth_{num_train}"
    if not split_files(root, "train").keypoints.is_file():
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
    files = split_files(d.root, d.train_split)
    dataset = TVCocoDetection(str(files.images), str(files.instances), transforms=transforms)
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


def _targets(cfg: Config) -> str:
    return "boxes" + ("+masks" if cfg.model.mask_on else "") + ("+keypoints" if cfg.model.keypoint_on else "")


def loader_makers(cfg: Config, workers: int, trainer_only: bool) -> dict[tuple[str, str], Any]:
    """The loaders to time at ``workers`` workers: the trainer's (uint8 batches, pinned where CUDA is), and
    unless ``trainer_only`` the normalising one, torchvision's baseline and ours with keypoints."""
    cfg = copy.deepcopy(cfg)
    cfg.data.num_workers = workers
    targets = _targets(cfg)
    makers: dict[tuple[str, str], Any] = {}
    if not trainer_only:
        cfg_kp = copy.deepcopy(cfg)
        cfg_kp.model.keypoint_on = True
        makers[("megdet", targets)] = functools.partial(build_train_loader, cfg, rank=0, world_size=1)
        makers[("torchvision", targets)] = functools.partial(torchvision_loader, cfg, workers)
        makers[("megdet", _targets(cfg_kp))] = functools.partial(build_train_loader, cfg_kp, rank=0, world_size=1)
    # What `megdet train` builds: uint8 images (normalised on the device), pinned when CUDA is available.
    makers[("megdet-trainer", targets)] = functools.partial(
        build_train_loader, cfg, rank=0, world_size=1, raw_images=True
    )
    return makers


def keeps_up(rows: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """Whether the trainer's loader delivers ``target`` images/s, per worker count, and the fewest that do."""
    trainer = sorted((r for r in rows if r["loader"] == "megdet-trainer"), key=lambda r: r["workers"])
    per_workers = {r["workers"]: {"images_per_s": r["images_per_s"], "keeps_up": r["images_per_s"] >= target}
                   for r in trainer}  # fmt: skip
    enough = [w for w, v in per_workers.items() if v["keeps_up"]]
    return {"target_images_per_s": target, "per_workers": per_workers, "fewest_workers": min(enough) if enough else None}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (fewer images, batches and rounds)")
    parser.add_argument("--data-dir", type=Path, default=None, help="an existing COCO-layout dataset root (split 'train')")
    parser.add_argument("--num-train", type=int, default=None, help="synthetic images to generate (default 256, quick 64)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches per round (default 40, quick 10)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per loader (default 3, quick 2)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="num_workers settings to time")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. data.min_size_train=[800] data.max_size_train=1216 "
                             "data.images_per_device=8 model.mask_on=false")  # fmt: skip
    parser.add_argument("--trainer-only", action="store_true", help="time only the loader `megdet train` builds")
    parser.add_argument("--target-images-per-s", type=float, default=None,
                        help="the training step's rate: report whether the trainer's loader keeps up with it")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS / "data_loader.json")
    return parser.parse_args(argv)


def _print(rows: list[dict[str, Any]], ratios: dict[str, float], target: dict[str, Any] | None, title: str) -> None:
    print(f"\n{title}")
    print(f"{'loader':<15} {'targets':<22} {'workers':>7} {'setup s':>8} {'images/s':>9}")
    for r in rows:
        print(f"{r['loader']:<15} {r['targets']:<22} {r['workers']:>7} {r['setup_s']:>8.2f} {r['images_per_s']:>9.1f}")
    for k, v in ratios.items():
        print(f"megdet / torchvision images/s, {k}: {v:.2f}x")
    if target is not None:
        for w, v in target["per_workers"].items():
            print(f"trainer's loader, {w} workers: {v['images_per_s']:.1f} images/s vs target "
                  f"{target['target_images_per_s']:.1f}: {'keeps up' if v['keeps_up'] else 'TOO SLOW'}")  # fmt: skip
        fewest = target["fewest_workers"]
        print(f"fewest workers that keep up: {fewest if fewest is not None else 'none of those timed'}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Times the loaders, prints the table (and the target check), writes the JSON and returns it."""
    args = _parse_args(argv)
    num_train = args.num_train or (64 if args.quick else 256)
    batches = args.batches or (10 if args.quick else 40)
    repeats = args.repeats or (2 if args.quick else 3)
    warmup = 2 if args.quick else 5

    root = ensure_dataset(args.data_dir, num_train)
    cfg = load_config(None, ["model.mask_on=true", *args.set])
    cfg.data.root = str(root)

    rows: list[dict[str, Any]] = []
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # e.g. dropped-box notes; they are not what is measured
        # (stdout: pycocotools' "loading annotations..." lines from the baseline)
        for workers in args.workers:
            makers = loader_makers(cfg, workers, args.trainer_only)
            for (name, targets), r in time_loaders(makers, batches, warmup, repeats).items():
                rows.append({"loader": name, "workers": workers, "targets": targets, **r})

    ratios = {}
    for workers in args.workers:
        pair = [next((r for r in rows if (r["loader"], r["targets"], r["workers"]) == (name, _targets(cfg), workers)),
                     None) for name in ("megdet", "torchvision")]  # fmt: skip
        if pair[0] is not None and pair[1] is not None:
            ratios[f"workers={workers}"] = pair[0]["images_per_s"] / pair[1]["images_per_s"]
    target = keeps_up(rows, args.target_images_per_s) if args.target_images_per_s else None
    d = cfg.data
    _print(rows, ratios, target, f"data loader throughput, {root} ({'quick' if args.quick else 'full'}: median of "
           f"{repeats} rounds of {batches} batches of {d.images_per_device} images, after {warmup} warm-up "
           f"batches; short side {list(d.min_size_train)}, long side <= {d.max_size_train})")  # fmt: skip

    result = {
        "benchmark": "data_loader",
        "quick": args.quick,
        "dataset": str(root),
        "overrides": args.set,
        "batches": batches,
        "repeats": repeats,
        "warmup": warmup,
        "images_per_batch": d.images_per_device,
        "min_size_train": list(d.min_size_train),
        "max_size_train": d.max_size_train,
        "pin_memory": torch.cuda.is_available(),
        "rows": rows,
        "ratio_megdet_over_torchvision": ratios,
        "target": target,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
