"""Predictions on loose image files: the categories to name them with, one image, a list of files."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from megdet.config import Config
from megdet.data.layout import COCO_KEYPOINT_NAMES, COCO_SKELETON, read_categories
from megdet.data.validate import category_name
from megdet.distributed import unwrap_model


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

    Looked up in order: a COCO ``categories`` list stored in the checkpoint (its metadata); the
    annotation files of ``cfg.data.root`` (:func:`~megdet.data.layout.read_categories` of the val
    split, then the train split); else generic names ``class_1..K`` with COCO's skeleton when the
    model predicts 17 keypoints.
    """
    k = cfg.model.num_classes
    candidates: list[tuple[str, list[Mapping[str, Any]]]] = []
    stored = checkpoint.get("categories") if checkpoint is not None else None
    if isinstance(stored, list) and stored:
        candidates.append(("the checkpoint", stored))
    found = read_categories(cfg.data.root, [cfg.data.val_split, cfg.data.train_split])
    if found is not None:
        candidates.append((str(found[0]), found[1]))
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

    model = unwrap_model(model)
    h, w = int(image.shape[-2]), int(image.shape[-1])
    transform = build_transforms(cfg.data, train=False)
    sample = transform(image, {"image_id": 0, "orig_size": (h, w)})
    batch = collate([sample], size_divisibility=cfg.data.size_divisibility).to(model.device)
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

    stored = checkpoint.get("categories") if checkpoint is not None else None
    for c in stored if isinstance(stored, list) else []:
        names = c.get("keypoints") if isinstance(c, Mapping) else None
        if isinstance(names, list) and len(names) == cfg.model.num_keypoints:
            return _flip_map([str(n) for n in names])
    return _flip_map(COCO_KEYPOINT_NAMES) if cfg.model.num_keypoints == len(COCO_KEYPOINT_NAMES) else None


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
    cfg.data.validate()  # the test transform's sizes and normalisation
    models = [unwrap_model(m) for m in model] if isinstance(model, Sequence) else [unwrap_model(model)]
    predict = _image_predictor(models, cfg, tta, keypoint_flip_map)
    _check_files_exist(image_paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    everything: list[dict[str, Any]] = []
    for path in map(Path, image_paths):
        image = read_image(path)
        pred = predict(image)
        name = _unique_name(path.stem, used)
        everything.append(_write_prediction(path, image, pred, out, name, categories, score_threshold))
    with open(out / "predictions.json", "w") as f:
        json.dump(everything, f)
    return everything


def _image_predictor(
    models: list[nn.Module], cfg: Config, tta: bool, flip_map: Sequence[int] | None
) -> Callable[[Tensor], dict[str, Tensor]]:
    """uint8 (3, H, W) image -> prediction on CPU: the one model, or the multi-view predictor of an
    ensemble or of ``tta``."""
    from megdet.data.transforms import Normalize
    from megdet.evaluation.tta import multiview_predictor

    if not (tta or len(models) > 1):
        return lambda image: predict_image(models[0], cfg, image)
    cfg.test.validate(tta)
    predictor = multiview_predictor([m.eval() for m in models], cfg, tta, flip_map)
    normalize = Normalize(cfg.data.pixel_mean, cfg.data.pixel_std)

    def predict(image: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            view = normalize(image, {})[0].to(models[0].device)
            return {k: v.float().cpu() for k, v in predictor([view])[0].items()}

    return predict


def _check_files_exist(image_paths: Sequence[str | Path]) -> None:
    """Raises a one-line DatasetError naming the first of ``image_paths`` that is not a file."""
    from megdet.data.errors import DatasetError

    missing = [Path(p) for p in image_paths if not Path(p).is_file()]
    if missing:
        raise DatasetError(
            f"{missing[0]}: image file not found ({len(missing)} of {len(image_paths)} inputs missing)"
        )


def _unique_name(stem: str, used: set[str]) -> str:
    """``stem``, or ``stem_1``, ``stem_2``... when taken; the name returned is added to ``used``."""
    name, n = stem, 0
    while name in used:
        n += 1
        name = f"{stem}_{n}"
    used.add(name)
    return name


def _write_prediction(
    path: Path, image: Tensor, pred: dict[str, Tensor], out: Path, name: str, categories: CategoryInfo,
    score_threshold: float,
) -> dict[str, Any]:  # fmt: skip
    """Writes ``out/NAME.png`` (drawn), ``out/NAME.json`` (and ``out/NAME_sem_seg.png``) for one image;
    returns its ``predictions.json`` entry."""
    from megdet.evaluation.visualize import draw_predictions, predictions_to_json, save_png

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
    return entry
