"""Inference over a split: evaluated over all ranks, plain, with TTA or as an ensemble.

:func:`evaluate_model` is the one evaluation entry point (the trainer's periodic evaluation, ``megdet
eval`` and the benchmarks call it). Every rank runs the images of its contiguous shard
(:class:`~megdet.data.sampler.InferenceSampler`: every image exactly once, also when the count does
not divide by the number of ranks); :class:`~megdet.evaluation.coco_eval.COCOEvaluator` converts the
predictions as they come, gathers them on rank 0 and runs pycocotools there.

Two inference paths:

- plain: the test loader's resized batches go through ``model(images, image_sizes,
  original_sizes=...)``, exactly what training-time evaluation measures;
- TTA and ensembles: the loader yields ORIGINAL-size normalised images
  (``build_test_loader(original_size=True)``) and :class:`~megdet.evaluation.tta.MultiViewPredictor`
  resizes them per view.

Checkpoint files become models in :mod:`megdet.evaluation.loading`; image files are predicted in
:mod:`megdet.evaluation.predict`.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from megdet.config import Config
from megdet.data.layout import split_files
from megdet.distributed import all_gather_object, unwrap_model


def _keypoint_category_ids(path: Path) -> list[int]:
    with open(path) as f:
        cats = json.load(f).get("categories", [])
    return [int(c["id"]) for c in cats if isinstance(c, dict) and c.get("keypoints")]


def _build_loader(cfg: Config, split: str, rank: int, world_size: int, original_size: bool) -> DataLoader:
    from megdet.data.loader import build_test_loader

    loader = build_test_loader(cfg, split, rank, world_size, original_size=original_size)
    # Every image this rank reads (its shard) must exist before the first one is predicted.
    loader.dataset.verify_images(loader.sampler)
    # Inference never reads the targets; skip decoding the ground-truth masks, keypoints and label maps
    # (the semantic evaluator reads the label maps at their original size itself).
    loader.dataset.with_masks = False
    loader.dataset.with_keypoints = False
    loader.dataset.with_sem_seg = False
    return loader


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _preserved_rng(device: torch.device) -> Iterator[None]:
    # Evaluation during training must not shift the training run's random streams.
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def evaluate_model(
    model_or_models: nn.Module | Sequence[nn.Module],
    cfg: Config,
    split: str | None = None,
    out_dir: str | Path | None = None,
    tta: bool = False,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """COCO evaluation of one model (or an ensemble) on ``split`` (default ``cfg.data.val_split``).

    Every rank must call this with its ``rank`` / ``world_size`` (inside an initialised process group
    when ``world_size > 1``); each runs its shard of the split's first ``cfg.test.max_images`` images
    (all when <= 0) on the device of the (first) model. Several models, or ``tta=True``, use
    :class:`~megdet.evaluation.tta.MultiViewPredictor` with the views of ``cfg.test.tta`` (without
    ``tta``: the single test view ``data.min_size_test``). DistributedDataParallel wrappers are
    unwrapped; models are switched to eval mode and back. The caller's RNG streams are left untouched.

    Returns on rank 0 the ``eval.json`` dict ``{task: {"stats": ..., "per_category_ap": ...}}`` for
    ``bbox`` and, when predicted, ``segm`` / ``keypoints``, plus ``sem_seg`` (``{"stats": {"mIoU", ...},
    "per_class_iou": ...}``, :mod:`~megdet.evaluation.sem_seg_eval`) for models with a semantic branch;
    ``{}`` on the other ranks. With
    ``out_dir``, rank 0 writes ``coco_results_{task}.json``, ``eval.json`` and ``timing.json`` there.
    With ``progress``, rank 0 shows a progress bar and prints the timing and the AP table.
    """
    from megdet.data.loader import num_test_images
    from megdet.evaluation.coco_eval import COCOEvaluator, EvaluationError, format_eval_table
    from megdet.evaluation.sem_seg_eval import semantic_evaluator
    from megdet.evaluation.tta import multiview_predictor

    cfg.test.validate(tta)
    cfg.data.validate()

    models = [
        unwrap_model(m) for m in (model_or_models if isinstance(model_or_models, Sequence) else [model_or_models])
    ]
    if not models:
        raise ValueError("evaluate_model: no model given")
    split = split or cfg.data.val_split
    use_predictor = tta or len(models) > 1
    keypoints_on = any(m.roi_heads.keypoint_head is not None for m in models)
    device = models[0].device

    loader = _build_loader(cfg, split, rank, world_size, original_size=use_predictor)
    dataset = loader.dataset
    size = num_test_images(cfg, dataset)
    files = split_files(cfg.data.root, split)
    gt_keypoints = files.keypoints if keypoints_on else None
    evaluator = COCOEvaluator(
        gt_instances=files.instances,
        coco_category_ids=dataset.coco_category_ids,
        gt_keypoints=gt_keypoints,
        # Only the categories that have keypoints get keypoint results: the rest would be dropped on
        # rank 0 anyway, after costing memory on every rank.
        keypoint_category_ids=_keypoint_category_ids(gt_keypoints) if gt_keypoints is not None else None,
        image_ids=list(dataset.image_ids[:size]),
    )
    sem_seg = semantic_evaluator(models, dataset)

    predictor = None
    if use_predictor:
        try:
            predictor = multiview_predictor(models, cfg, tta, dataset.keypoint_flip_map if keypoints_on else None)
        except ValueError as e:  # models that cannot form an ensemble: bad input, one line
            raise EvaluationError(str(e)) from None

    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    show = progress and rank == 0
    num_images, model_s = 0, 0.0
    start = time.perf_counter()
    try:
        with torch.no_grad(), _preserved_rng(device):
            batches: Any = loader
            if show:
                from tqdm import tqdm

                batches = tqdm(loader, total=len(loader), desc=f"eval {split}", unit="batch", leave=False)
            for batch in batches:
                t0 = time.perf_counter()
                if predictor is not None:
                    images = [batch.images[i, :, :h, :w] for i, (h, w) in enumerate(batch.image_sizes)]
                    preds = predictor(images)
                else:
                    b = batch.to(device, non_blocking=True)
                    preds = models[0](b.images, b.image_sizes, original_sizes=b.original_sizes)
                preds = [{k: v.float().cpu() for k, v in p.items()} for p in preds]
                _sync(device)
                model_s += time.perf_counter() - t0
                num_images += len(batch)
                evaluator.process(batch.image_ids, preds)
                if sem_seg is not None:
                    sem_seg.process_batch(batch.image_ids, preds)
    finally:
        for m, mode in zip(models, was_training):
            m.train(mode)
    infer_s = time.perf_counter() - start

    shards = all_gather_object((num_images, infer_s, model_s))
    t0 = time.perf_counter()
    results = evaluator.summarize(out_dir if rank == 0 else None)
    if sem_seg is not None:
        sem_results = sem_seg.summarize()  # a collective: every rank
        if rank == 0:
            results["sem_seg"] = sem_results
            if out_dir is not None:
                with open(Path(out_dir) / "eval.json", "w") as f:
                    json.dump(results, f, indent=2)
    eval_s = time.perf_counter() - t0
    if rank != 0:
        return {}
    total = sum(s[0] for s in shards)
    wall = max(s[1] for s in shards)
    timing = {
        "images": total,
        "ranks": len(shards),
        "inference_s": wall,
        "images_per_s": total / wall if wall > 0 else 0.0,
        "model_s": max(s[2] for s in shards),
        "coco_eval_s": eval_s,
        "tta": bool(tta),
        "models": len(models),
    }
    if out_dir is not None:
        with open(Path(out_dir) / "timing.json", "w") as f:
            json.dump(timing, f, indent=2)
    if progress:
        mode = ("TTA " if tta else "") + (f"ensemble of {len(models)}" if len(models) > 1 else "")
        print(
            f"inference{' (' + mode.strip() + ')' if mode else ''}: {total} images in {wall:.1f} s "
            f"({timing['images_per_s']:.1f} img/s on {len(shards)} rank(s)); COCO eval {eval_s:.1f} s"
        )
        print(format_eval_table(results))
    return results
