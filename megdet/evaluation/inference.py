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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from megdet.config import Config
from megdet.data.layout import split_files
from megdet.distributed import all_gather_object, unwrap_model

if TYPE_CHECKING:
    from megdet.data.loader import Batch
    from megdet.evaluation.coco_eval import COCOEvaluator
    from megdet.evaluation.sem_seg_eval import SemSegEvaluator


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
    from megdet.evaluation.sem_seg_eval import semantic_evaluator

    cfg.test.validate(tta)
    cfg.data.validate()
    models = [
        unwrap_model(m) for m in (model_or_models if isinstance(model_or_models, Sequence) else [model_or_models])
    ]
    if not models:
        raise ValueError("evaluate_model: no model given")
    split = split or cfg.data.val_split
    keypoints_on = any(m.roi_heads.keypoint_head is not None for m in models)

    loader = _build_loader(cfg, split, rank, world_size, original_size=tta or len(models) > 1)
    evaluator = _coco_evaluator(cfg, split, loader.dataset, keypoints_on)
    sem_seg = semantic_evaluator(models, loader.dataset)
    predict = _batch_predictor(models, cfg, tta, loader.dataset, keypoints_on)
    desc = f"eval {split}" if progress and rank == 0 else None
    measured = _run_inference(models, loader, predict, evaluator, sem_seg, desc)

    shards = all_gather_object(measured)
    results, eval_s = _summarize(evaluator, sem_seg, rank, out_dir)
    if rank != 0:
        return {}
    timing = _timing(shards, eval_s, tta, len(models))
    if out_dir is not None:
        with open(Path(out_dir) / "timing.json", "w") as f:
            json.dump(timing, f, indent=2)
    if progress:
        _print_summary(results, timing)
    return results


def _coco_evaluator(cfg: Config, split: str, dataset: Any, keypoints_on: bool) -> COCOEvaluator:
    """The COCO evaluator of ``split``'s annotation files, for the images this evaluation runs."""
    from megdet.data.loader import num_test_images
    from megdet.evaluation.coco_eval import COCOEvaluator

    size = num_test_images(cfg, dataset)
    files = split_files(cfg.data.root, split)
    gt_keypoints = files.keypoints if keypoints_on else None
    return COCOEvaluator(
        gt_instances=files.instances,
        coco_category_ids=dataset.coco_category_ids,
        gt_keypoints=gt_keypoints,
        # Only the categories that have keypoints get keypoint results: the rest would be dropped on
        # rank 0 anyway, after costing memory on every rank.
        keypoint_category_ids=_keypoint_category_ids(gt_keypoints) if gt_keypoints is not None else None,
        image_ids=list(dataset.image_ids[:size]),
    )


_Predictions = list[dict[str, torch.Tensor]]


def _batch_predictor(
    models: list[nn.Module], cfg: Config, tta: bool, dataset: Any, keypoints_on: bool
) -> Callable[[Batch], _Predictions]:
    """Test batch -> float CPU predictions: the model on the loader's resized images, or (TTA, an
    ensemble) the multi-view predictor on the original-size ones."""
    from megdet.evaluation.coco_eval import EvaluationError
    from megdet.evaluation.tta import multiview_predictor

    device = models[0].device
    if not (tta or len(models) > 1):

        def plain(batch: Batch) -> _Predictions:
            b = batch.to(device, non_blocking=True)
            preds = models[0](b.images, b.image_sizes, original_sizes=b.original_sizes)
            return [{k: v.float().cpu() for k, v in p.items()} for p in preds]

        return plain
    try:
        predictor = multiview_predictor(models, cfg, tta, dataset.keypoint_flip_map if keypoints_on else None)
    except ValueError as e:  # models that cannot form an ensemble: bad input, one line
        raise EvaluationError(str(e)) from None

    def multiview(batch: Batch) -> _Predictions:
        images = [batch.images[i, :, :h, :w] for i, (h, w) in enumerate(batch.image_sizes)]
        return [{k: v.float().cpu() for k, v in p.items()} for p in predictor(images)]

    return multiview


def _run_inference(
    models: list[nn.Module],
    loader: DataLoader,
    predict: Callable[[Batch], _Predictions],
    evaluator: COCOEvaluator,
    sem_seg: SemSegEvaluator | None,
    desc: str | None,
) -> tuple[int, float, float]:
    """Feeds the predictions of every batch to the evaluators, the models in eval mode (restored after)
    and the caller's RNG untouched; a progress bar titled ``desc`` unless None. Returns (images,
    wall seconds, seconds in the models)."""
    device = models[0].device
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    num_images, model_s = 0, 0.0
    start = time.perf_counter()
    try:
        with torch.no_grad(), _preserved_rng(device):
            batches: Any = loader
            if desc is not None:
                from tqdm import tqdm

                batches = tqdm(loader, total=len(loader), desc=desc, unit="batch", leave=False)
            for batch in batches:
                t0 = time.perf_counter()
                preds = predict(batch)
                _sync(device)
                model_s += time.perf_counter() - t0
                num_images += len(batch)
                evaluator.process(batch.image_ids, preds)
                if sem_seg is not None:
                    sem_seg.process_batch(batch.image_ids, preds)
    finally:
        for m, mode in zip(models, was_training):
            m.train(mode)
    return num_images, time.perf_counter() - start, model_s


def _summarize(
    evaluator: COCOEvaluator, sem_seg: SemSegEvaluator | None, rank: int, out_dir: str | Path | None
) -> tuple[dict[str, Any], float]:
    """Runs the COCO (and semantic) evaluation, collectives on every rank; returns rank 0's results
    (writing them to ``out_dir``) and the seconds it took."""
    t0 = time.perf_counter()
    results = evaluator.summarize(out_dir if rank == 0 else None)
    if sem_seg is not None:
        sem_results = sem_seg.summarize()  # a collective: every rank
        if rank == 0:
            results["sem_seg"] = sem_results
            if out_dir is not None:
                with open(Path(out_dir) / "eval.json", "w") as f:
                    json.dump(results, f, indent=2)
    return results, time.perf_counter() - t0


def _timing(
    shards: list[tuple[int, float, float]], eval_s: float, tta: bool, num_models: int
) -> dict[str, Any]:
    """``timing.json``: images and throughput over all ranks (their slowest), evaluation seconds."""
    total = sum(s[0] for s in shards)
    wall = max(s[1] for s in shards)
    return {
        "images": total,
        "ranks": len(shards),
        "inference_s": wall,
        "images_per_s": total / wall if wall > 0 else 0.0,
        "model_s": max(s[2] for s in shards),
        "coco_eval_s": eval_s,
        "tta": bool(tta),
        "models": num_models,
    }


def _print_summary(results: dict[str, Any], timing: dict[str, Any]) -> None:
    """Prints the throughput line and the AP table."""
    from megdet.evaluation.coco_eval import format_eval_table

    n = timing["models"]
    mode = ("TTA " if timing["tta"] else "") + (f"ensemble of {n}" if n > 1 else "")
    print(
        f"inference{' (' + mode.strip() + ')' if mode else ''}: {timing['images']} images in "
        f"{timing['inference_s']:.1f} s ({timing['images_per_s']:.1f} img/s on {timing['ranks']} rank(s)); "
        f"COCO eval {timing['coco_eval_s']:.1f} s"
    )
    print(format_eval_table(results))
