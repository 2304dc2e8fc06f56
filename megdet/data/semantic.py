"""Per-pixel semantic labels: label maps read from disk, or built from the instance masks.

On disk the layout is COCO-Stuff's ``stuffthingmaps``: one single-channel PNG per image, named as the
image with the ``.png`` suffix, whose pixel values are class ids; 255 means "not labelled" (ignored by
the loss and the metric). COCO-Stuff's ids are the COCO category ids minus one (things 0..90, stuff
91..181), its category names in ``instances_*.json`` and ``stuff_*.json``; :func:`label_names` reads
them from there. Without label maps, :func:`label_map_from_instances` paints the instance masks: 0
background, each instance's contiguous label (1..num_classes) on its pixels.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import PIL.Image

from megdet.config import IGNORE_LABEL
from megdet.data.errors import DatasetError
from megdet.data.layout import stuff_json_for
from megdet.data.validate import category_name

# Pillow modes whose pixel values are the stored integers (P: palette indices, as written by
# save_label_map; the palette only colours the file for viewing).
_INTEGER_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")


def label_map_path(label_dir: str | Path, file_name: str) -> Path:
    """Where the label map of the image ``file_name`` is: ``label_dir/<file_name with .png>``."""
    return Path(label_dir) / Path(file_name).with_suffix(".png")


def _id_list(ids: Sequence[int], limit: int = 5) -> str:
    more = f" (+{len(ids) - limit} more)" if len(ids) > limit else ""
    return ", ".join(str(i) for i in ids[:limit]) + more


def check_label_values(array: np.ndarray, num_classes: int) -> list[int]:
    """The distinct ids of ``array`` that are neither a class (0..num_classes-1) nor 255, ascending."""
    bad = (array >= num_classes) & (array != IGNORE_LABEL)
    return np.unique(array[bad]).tolist() if bad.any() else []


def read_label_map(path: str | Path, size: tuple[int, int], num_classes: int) -> np.ndarray:
    """The label map at ``path`` as a (H, W) uint8 array, checked against its image's ``size`` (h, w) and
    the ``num_classes`` ids 0..num_classes-1 (255 = ignore). Every problem is a one-line
    :class:`DatasetError` naming the file."""
    path = Path(path)
    h, w = size
    if not path.is_file():
        raise DatasetError(f"{path}: label map not found (data.sem_seg_dir: one PNG per image, named as the image)")
    try:
        with PIL.Image.open(path) as pil:
            mode, (pw, ph) = pil.mode, pil.size
            if mode not in _INTEGER_MODES:
                raise DatasetError(
                    f"{path}: label map has mode {mode}; expected one channel of class ids (PNG mode L or P)"
                )
            if (ph, pw) != (h, w):
                raise DatasetError(f"{path}: label map is {ph}x{pw} (HxW) but its image is {h}x{w}")
            array = np.array(pil)  # a writable copy for torch
    except PIL.UnidentifiedImageError:
        raise DatasetError(f"{path}: cannot decode label map (not a PNG Pillow reads)") from None
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DatasetError(f"{path}: cannot decode label map ({reason})") from None
    bad = check_label_values(array, num_classes)
    if bad:
        raise DatasetError(
            f"{path}: class id(s) {_id_list(bad)} outside 0..{num_classes - 1} (255 = ignore); "
            "fix the map or raise model.context.num_semantic_classes"
        )
    return array.astype(np.uint8, copy=False)


def label_map_from_instances(masks: np.ndarray, labels: Sequence[int], size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 labels from instance masks (N, H, W) and their contiguous labels (N,): 0 where no
    instance is, else the label of the smallest instance covering the pixel (larger ones are painted
    first, so an object in front of a bigger one keeps its pixels, as in COCO's overlapping masks)."""
    h, w = size
    out = np.zeros((h, w), dtype=np.uint8)
    if len(labels) == 0:
        return out
    if masks.shape != (len(labels), h, w):
        raise ValueError(f"label_map_from_instances: masks {masks.shape} for {len(labels)} labels of a {h}x{w} image")
    if max(labels) >= IGNORE_LABEL:
        raise ValueError(f"label_map_from_instances: labels must be below {IGNORE_LABEL}, got {max(labels)}")
    areas = masks.reshape(len(labels), -1).sum(axis=1)
    for i in np.argsort(-areas, kind="stable"):
        out[masks[i] > 0] = labels[i]
    return out


def _categories_of(path: Path) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            cats = json.load(f).get("categories", [])
    except (OSError, ValueError, AttributeError, RecursionError) as e:
        raise DatasetError(f"{path}: cannot read its categories ({type(e).__name__}); fix or remove the file") from None
    return [c for c in cats if isinstance(c, dict) and isinstance(c.get("id"), int) and "name" in c]


def label_names(instances_json: str | Path, categories: Sequence[Mapping[str, Any]] | None = None) -> dict[int, str]:
    """COCO-Stuff ids -> names: every category of the instances file (``categories``, else read from it)
    and of the stuff file next to it (:func:`stuff_json_for`, when it exists) at ``id - 1``."""
    cats = list(categories) if categories is not None else _categories_of(Path(instances_json))
    stuff = stuff_json_for(instances_json)
    if stuff.is_file():
        cats += _categories_of(stuff)
    return {int(c["id"]) - 1: category_name(c) for c in cats if 1 <= int(c["id"]) <= IGNORE_LABEL}


def class_names(num_classes: int, names: Mapping[int, str]) -> list[str]:
    """One name per class id 0..num_classes-1, ``class_K`` where ``names`` has none."""
    return [names.get(k, f"class_{k}") for k in range(num_classes)]


def save_label_map(labels: Any, path: str | Path) -> Path:
    """Writes a (H, W) label map (tensor or array of ids 0..255) as a palette PNG: the pixel values are
    the ids (:func:`read_label_map` reads them back), the palette only colours them for viewing."""
    array = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels)
    if array.ndim != 2 or array.min(initial=0) < 0 or array.max(initial=0) > 255:
        raise ValueError(f"save_label_map: expected a (H, W) map of ids 0..255, got shape {array.shape}")
    image = PIL.Image.fromarray(array.astype(np.uint8)).convert("P")  # L -> P keeps the values
    rng = np.random.default_rng(0)
    palette = rng.integers(40, 256, (256, 3), dtype=np.uint8)
    palette[0] = 0
    palette[IGNORE_LABEL] = 255
    image.putpalette(palette.reshape(-1).tolist())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def check_label_maps(
    report: Any,
    images: Sequence[Mapping[str, Any]],
    label_dir: str | Path,
    known_ids: set[int],
    max_decodes: int,
) -> None:
    """The label-map part of ``megdet data check`` (:func:`megdet.data.check.check_coco`): every image of
    ``images`` (COCO image entries) must have a label map in ``label_dir`` of its own size with one
    channel; an evenly spread sample of at most ``max_decodes`` maps is decoded and its ids checked
    against ``known_ids`` (and 255). Problems go to ``report.add(kind, one line)``; counts to
    ``report.label_maps_checked`` / ``report.label_maps_decoded``."""
    label_dir = Path(label_dir)
    if not label_dir.is_dir():
        raise DatasetError(f"{label_dir}: label map folder not found; check the path or leave it out")
    present = []
    for img in images:
        path = label_map_path(label_dir, str(img["file_name"]))
        report.label_maps_checked += 1
        if not path.is_file():
            report.add("missing_label_map", f"image id {img['id']}: {path} not found")
            continue
        try:
            with PIL.Image.open(path) as pil:  # the header only: mode and size
                mode, (w, h) = pil.mode, pil.size
        except Exception as e:  # PIL raises many unrelated exception types for broken files
            report.add("bad_label_map", f"image id {img['id']}: {path}: cannot decode ({type(e).__name__}: {e})")
            continue
        if mode not in _INTEGER_MODES:
            report.add("bad_label_map", f"image id {img['id']}: {path} has mode {mode}; expected one channel (L or P)")
        elif (h, w) != (img.get("height"), img.get("width")):
            report.add(
                "bad_label_map",
                f"image id {img['id']}: {path} is {h}x{w} (HxW) but the image is {img.get('height')}x{img.get('width')}",
            )
        else:
            present.append((img, path))
    known = np.zeros(256, dtype=bool)
    known[[i for i in known_ids if 0 <= i < 256]] = True
    known[IGNORE_LABEL] = True
    step = max(1, -(-len(present) // max(1, max_decodes)))
    for img, path in present[::step]:
        report.label_maps_decoded += 1
        try:
            with PIL.Image.open(path) as pil:
                values = np.unique(np.asarray(pil))
        except Exception as e:
            report.add("bad_label_map", f"image id {img['id']}: {path}: cannot decode ({type(e).__name__}: {e})")
            continue
        unknown = [int(v) for v in values if v > 255 or not known[int(v)]]
        if unknown:
            report.add("unknown_label_id", f"image id {img['id']}: {path} has id(s) {_id_list(unknown)} that name no class")
