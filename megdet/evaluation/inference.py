"""Inference: a split evaluated over all ranks (plain, TTA or ensemble), checkpoints -> models, and
predictions on loose image files.

:func:`evaluate_model` is the one evaluation entry point (the trainer's periodic evaluation, ``megdet
eval`` and the benchmarks call it). Every rank runs the images of its contiguous shard
(:class:`~megdet.data.sampler.InferenceSampler`: every image exactly once, also when the count does
not divide by the number of ranks); :class:`~megdet.evaluation.coco_eval.COCOEvaluator` converts the
predictions as they come, gathers them on rank 0 and runs pycocotools there.

Two inference paths:

- plain: the test loader's resized batches go through ``model(images, image_sizes,
  original_sizes=...)``, exactly what training-time evaluation measures;
- TTA and ensembles: the loader yields ORIGINAL-size normalised images (the data module's
  ``Normalize`` alone) and :class:`~megdet.evaluation.tta.MultiViewPredictor` resizes them per view.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from megdet.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    require_at_least,
    require_choice,
)

# COCO's person skeleton, 1-based keypoint pairs as in person_keypoints_*.json; the fallback for
# drawing when neither the checkpoint nor the dataset names one.
from megdet.data.synthetic import SKELETON as COCO_SKELETON
from megdet.data.validate import category_name

if TYPE_CHECKING:
    from megdet.evaluation.tta import MultiViewPredictor

_ANNOTATIONS = "annotations"


# --------------------------------------------------------------------------------------------------
# Checkpoints -> models
# --------------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def load_model_and_metadata(
    path: str | Path,
    cfg: Config | None = None,
    device: str | torch.device = "cpu",
    overrides: Sequence[str] = (),
) -> tuple[nn.Module, Config, dict[str, Any]]:
    """Like :func:`load_model_from_checkpoint`, also returning the checkpoint's other entries
    (``config``, ``iteration``, ``categories`` when stored, ...; not the training state)."""
    from megdet.checkpoint import Checkpoint, CheckpointError, load_checkpoint
    from megdet.modeling.convert.checkpoint import converted_checkpoint, is_converted_source
    from megdet.modeling.detector import build_model, load_model_state

    path = Path(path)
    if is_converted_source(path):  # torchvision / detectron2 weights: converted here, nothing re-initialised
        raw, _, cfg = converted_checkpoint(path, cfg, overrides, allow_new_heads=False)
        overrides = ()
    else:
        raw = load_checkpoint(path)
    ckpt = Checkpoint.from_dict(raw)
    if cfg is None:
        stored = ckpt.config
        if not isinstance(stored, Mapping):
            raise CheckpointError(
                f"{path}: the checkpoint stores no config; pass the training config with --config"
            )
        try:
            cfg = config_from_dict(dict(stored))
        except ConfigError as e:
            raise CheckpointError(f"{path}: its stored config does not load ({e}); pass --config") from None
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    # The backbone's ImageNet weights are overwritten by the checkpoint; do not require their file.
    build_cfg = copy.deepcopy(cfg)
    build_cfg.model.weights = ""
    model = build_model(build_cfg)
    try:
        load_model_state(model, ckpt.model, strict=True)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model.to(device).eval()
    return model, cfg, ckpt.metadata()


def load_model_from_checkpoint(
    path: str | Path,
    cfg: Config | None = None,
    device: str | torch.device = "cpu",
    overrides: Sequence[str] = (),
) -> tuple[nn.Module, Config]:
    """The detector stored in checkpoint ``path``, in eval mode on ``device``, and its config.

    The model is built from ``cfg`` when given, else from the config the checkpoint stores, with the
    ``key.sub=value`` ``overrides`` applied. torchvision and detectron2 detector files are converted
    on the way (:mod:`megdet.modeling.convert.checkpoint`; their config is the source model's). A missing, corrupt or non-matching checkpoint (a
    parameter missing, unexpected or of another shape) raises a one-line
    :class:`~megdet.checkpoint.CheckpointError` naming the file.
    """
    model, cfg, _ = load_model_and_metadata(path, cfg, device, overrides)
    return model, cfg


# --------------------------------------------------------------------------------------------------
# Categories (names, COCO ids, skeleton) for drawing
# --------------------------------------------------------------------------------------------------


@dataclass
class CategoryInfo:
    """What drawing and JSON export need to know about the categories a model predicts."""

    names: list[str]  # label i + 1 <-> names[i]
    coco_ids: list[int]  # label i + 1 <-> coco_ids[i]
    skeleton: list[tuple[int, int]] | None  # 0-based keypoint index pairs, or None
    source: str  # where this came from (for messages)
    # Labels (1-based) whose category defines keypoints (COCO: person); None = unknown, every label.
    keypoint_labels: frozenset[int] | None = None


def _skeleton_of(categories: Sequence[Mapping[str, Any]]) -> list[tuple[int, int]] | None:
    for c in categories:
        if c.get("keypoints") and c.get("skeleton"):
            return [(int(a) - 1, int(b) - 1) for a, b in c["skeleton"]]  # COCO pairs are 1-based
    return None


def category_info(cfg: Config, checkpoint: Mapping[str, Any] | None = None) -> CategoryInfo:
    """Category names, COCO ids and the person skeleton for a model trained with ``cfg``.

    Looked up in order: a COCO ``categories`` list stored in the checkpoint; the annotation files of
    ``cfg.data.root`` (val split, then train split; the skeleton also from ``person_keypoints_*``);
    else generic names ``class_1..K`` with COCO's skeleton when the model predicts 17 keypoints.
    """
    k = cfg.model.num_classes
    candidates: list[tuple[str, list[Mapping[str, Any]]]] = []
    stored = checkpoint.get("categories") if checkpoint is not None else None
    if isinstance(stored, list) and stored:
        candidates.append(("the checkpoint", stored))
    ann = Path(cfg.data.root) / _ANNOTATIONS
    for split in dict.fromkeys([cfg.data.val_split, cfg.data.train_split]):
        path = ann / f"instances_{split}.json"
        if path.is_file():
            try:
                with open(path) as f:
                    cats = json.load(f).get("categories")
            except (OSError, ValueError, AttributeError, RecursionError):
                continue
            if isinstance(cats, list) and cats:
                kp_path = ann / f"person_keypoints_{split}.json"
                if _skeleton_of(cats) is None and kp_path.is_file():
                    with contextlib.suppress(OSError, ValueError, AttributeError, KeyError, TypeError, RecursionError):
                        with open(kp_path) as f:
                            kp_cats = {c["id"]: c for c in json.load(f).get("categories", [])}
                        cats = [{**c, **kp_cats.get(c.get("id"), {})} for c in cats]
                candidates.append((str(path), cats))
                break
    for source, cats in candidates:
        try:
            ordered = sorted(cats, key=lambda c: int(c["id"]))
            names = [category_name(c) for c in ordered]
        except (KeyError, TypeError, ValueError):
            continue
        if len(names) == k:  # categories of another dataset would mislabel everything
            skeleton = _skeleton_of(ordered) if cfg.model.keypoint_on else None
            kp_labels = frozenset(i + 1 for i, c in enumerate(ordered) if c.get("keypoints"))
            return CategoryInfo(
                names, [int(c["id"]) for c in ordered], skeleton, source, kp_labels or None
            )
    skeleton = (
        [(a - 1, b - 1) for a, b in COCO_SKELETON]
        if cfg.model.keypoint_on and cfg.model.num_keypoints == 17
        else None
    )
    return CategoryInfo(
        [f"class_{i}" for i in range(1, k + 1)], list(range(1, k + 1)), skeleton, "generic names"
    )


# --------------------------------------------------------------------------------------------------
# Evaluation over a split
# --------------------------------------------------------------------------------------------------


def _keypoint_category_ids(path: Path) -> list[int]:
    with open(path) as f:
        cats = json.load(f).get("categories", [])
    return [int(c["id"]) for c in cats if isinstance(c, dict) and c.get("keypoints")]


def _build_loader(cfg: Config, split: str, rank: int, world_size: int, original_size: bool) -> DataLoader:
    from megdet.data.loader import build_test_dataset, build_test_loader, collate
    from megdet.data.sampler import InferenceSampler
    from megdet.data.transforms import Compose, Normalize

    if original_size:
        dataset = build_test_dataset(cfg, split)
        # Convert + normalise only: each TTA view resizes the original image itself.
        dataset.transforms = Compose([Normalize(cfg.data.pixel_mean, cfg.data.pixel_std)])
        size = len(dataset) if cfg.test.max_images <= 0 else min(len(dataset), cfg.test.max_images)
        loader = DataLoader(
            dataset,
            batch_size=cfg.test.images_per_device,
            sampler=InferenceSampler(size, rank, world_size),
            num_workers=cfg.data.num_workers,
            collate_fn=functools.partial(collate, size_divisibility=1),
            pin_memory=torch.cuda.is_available(),
        )
    else:
        loader = build_test_loader(cfg, split, rank, world_size)
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


def check_test_config(cfg: Config, tta: bool = False) -> None:
    """One-line ConfigErrors for ``test.*`` values (``test.tta.*`` when ``tta``) evaluation cannot use."""
    from megdet.evaluation.tta import BOX_MERGES

    t = cfg.test
    require_at_least([("test.images_per_device", t.images_per_device, 1)])
    if tta:
        if not t.tta.min_sizes or min(t.tta.min_sizes) < 1:
            raise ConfigError(f"test.tta.min_sizes: expected a non-empty list of positive sizes, got {list(t.tta.min_sizes)}")
        require_choice("test.tta.box_merge", t.tta.box_merge, BOX_MERGES)


def multiview_predictor(
    models: Sequence[nn.Module], cfg: Config, tta: bool, keypoint_flip_map: Sequence[int] | None = None
) -> MultiViewPredictor:
    """The TTA / ensemble predictor of ``cfg``: the views of ``test.tta`` when ``tta``, else the single
    test view; ``test.tta.box_merge`` at the model's NMS threshold and detections per image."""
    from megdet.evaluation.tta import MultiViewPredictor, View, tta_views

    t = cfg.test.tta
    views = (
        tta_views(t.min_sizes, cfg.data.max_size_test, t.flip)
        if tta
        else [View(cfg.data.min_size_test, cfg.data.max_size_test, False)]
    )
    return MultiViewPredictor(
        models,
        views,
        keypoint_flip_map=keypoint_flip_map,
        box_merge=t.box_merge,
        iou_thresh=cfg.model.roi.nms_thresh,
        detections_per_img=cfg.model.roi.detections_per_img,
        size_divisibility=cfg.data.size_divisibility,
    )


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
    from megdet.data.loader import check_data_config
    from megdet.distributed import all_gather_object
    from megdet.evaluation.coco_eval import COCOEvaluator, EvaluationError, format_eval_table
    from megdet.evaluation.sem_seg_eval import semantic_evaluator

    check_test_config(cfg, tta)
    check_data_config(cfg)

    models = [
        _unwrap(m) for m in (model_or_models if isinstance(model_or_models, Sequence) else [model_or_models])
    ]
    if not models:
        raise ValueError("evaluate_model: no model given")
    split = split or cfg.data.val_split
    use_predictor = tta or len(models) > 1
    keypoints_on = any(m.roi_heads.keypoint_head is not None for m in models)
    device = _device_of(models[0])

    loader = _build_loader(cfg, split, rank, world_size, original_size=use_predictor)
    dataset = loader.dataset
    size = len(dataset) if cfg.test.max_images <= 0 else min(len(dataset), cfg.test.max_images)
    ann = Path(cfg.data.root) / _ANNOTATIONS
    gt_keypoints = ann / f"person_keypoints_{split}.json" if keypoints_on else None
    evaluator = COCOEvaluator(
        gt_instances=ann / f"instances_{split}.json",
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


# --------------------------------------------------------------------------------------------------
# Predictions on image files
# --------------------------------------------------------------------------------------------------


def read_image(path: str | Path) -> Tensor:
    """An image file as a uint8 (3, H, W) RGB tensor (any Pillow mode, 16-bit scaled to 8); a missing or
    undecodable file is a one-line DatasetError."""
    from megdet.data.images import read_rgb

    return torch.from_numpy(read_rgb(path)).permute(2, 0, 1).contiguous()


def predict_image(model: nn.Module, cfg: Config, image: Tensor) -> dict[str, Tensor]:
    """The model's prediction (on CPU, original-image coordinates) for one uint8 (3, H, W) image,
    resized and normalised with the test transform of ``cfg.data``."""
    from megdet.data.loader import collate
    from megdet.data.transforms import build_transforms

    model = _unwrap(model)
    h, w = int(image.shape[-2]), int(image.shape[-1])
    transform = build_transforms(cfg.data, train=False)
    sample = transform(image, {"image_id": 0, "orig_size": (h, w)})
    batch = collate([sample], size_divisibility=cfg.data.size_divisibility).to(_device_of(model))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            pred = model(batch.images, batch.image_sizes, original_sizes=batch.original_sizes)[0]
    finally:
        model.train(was_training)
    return {k: v.float().cpu() for k, v in pred.items()}


def keypoint_flip_map(cfg: Config, checkpoint: Mapping[str, Any] | None = None) -> list[int] | None:
    """The left/right keypoint permutation flipped views need: from the keypoint names of the
    checkpoint's categories, else COCO's when the model predicts 17 keypoints; None otherwise."""
    from megdet.data.coco import _flip_map
    from megdet.data.synthetic import KEYPOINT_NAMES

    stored = checkpoint.get("categories") if checkpoint is not None else None
    for c in stored if isinstance(stored, list) else []:
        names = c.get("keypoints") if isinstance(c, Mapping) else None
        if isinstance(names, list) and len(names) == cfg.model.num_keypoints:
            return _flip_map([str(n) for n in names])
    return _flip_map(KEYPOINT_NAMES) if cfg.model.num_keypoints == len(KEYPOINT_NAMES) else None


def predict_files(
    model: nn.Module | Sequence[nn.Module],
    cfg: Config,
    image_paths: Sequence[str | Path],
    out_dir: str | Path,
    categories: CategoryInfo,
    score_threshold: float = 0.5,
    tta: bool = False,
    keypoint_flip_map: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Predicts every image file, writes ``out_dir/NAME.png`` (drawn boxes, labels, scores, masks,
    keypoint skeletons), ``out_dir/NAME.json`` (its detections) and ``out_dir/predictions.json``
    (all of them); returns what ``predictions.json`` holds. A model with a semantic branch also writes
    ``out_dir/NAME_sem_seg.png``, its label map (pixel = class id; a palette PNG,
    :func:`~megdet.data.semantic.save_label_map`), named in the entry as ``sem_seg``.

    Several models (an ensemble) or ``tta`` (the views of ``test.tta``) predict through
    :func:`multiview_predictor`, as ``megdet eval`` does; ``keypoint_flip_map`` is needed for flipped
    views of a keypoint model. Every path is checked before the first prediction; two inputs with the
    same file name get ``NAME_1``, ``NAME_2``... outputs.
    """
    from megdet.data.errors import DatasetError
    from megdet.data.loader import check_data_config
    from megdet.data.transforms import Normalize
    from megdet.evaluation.visualize import draw_predictions, predictions_to_json, save_png

    check_data_config(cfg)  # the test transform's sizes and normalisation
    models = [_unwrap(m) for m in model] if isinstance(model, Sequence) else [_unwrap(model)]
    predictor = None
    if tta or len(models) > 1:
        check_test_config(cfg, tta)
        predictor = multiview_predictor([m.eval() for m in models], cfg, tta, keypoint_flip_map)
        normalize = Normalize(cfg.data.pixel_mean, cfg.data.pixel_std)
    missing = [Path(p) for p in image_paths if not Path(p).is_file()]
    if missing:
        raise DatasetError(
            f"{missing[0]}: image file not found ({len(missing)} of {len(image_paths)} inputs missing)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    everything: list[dict[str, Any]] = []
    for path in map(Path, image_paths):
        image = read_image(path)
        if predictor is None:
            pred = predict_image(models[0], cfg, image)
        else:
            with torch.no_grad():
                view = normalize(image, {})[0].to(_device_of(models[0]))
                pred = {k: v.float().cpu() for k, v in predictor([view])[0].items()}
        name, n = path.stem, 0
        while name in used:
            n += 1
            name = f"{path.stem}_{n}"
        used.add(name)
        drawn = draw_predictions(
            image, pred, categories.names, score_threshold, categories.skeleton,
            keypoint_labels=categories.keypoint_labels,
        )  # fmt: skip
        png = save_png(drawn, out / f"{name}.png")
        detections = predictions_to_json(
            pred, categories.names, categories.coco_ids, score_threshold,
            keypoint_labels=categories.keypoint_labels,
        )  # fmt: skip
        entry = {
            "image": str(path),
            "height": int(image.shape[-2]),
            "width": int(image.shape[-1]),
            "drawn": str(png),
            "detections": detections,
        }
        if "sem_seg" in pred:
            from megdet.data.semantic import save_label_map

            entry["sem_seg"] = str(save_label_map(pred["sem_seg"], out / f"{name}_sem_seg.png"))
        with open(out / f"{name}.json", "w") as f:
            json.dump(entry, f)
        everything.append(entry)
    with open(out / "predictions.json", "w") as f:
        json.dump(everything, f)
    return everything
