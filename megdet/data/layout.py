"""The COCO 2017 folder layout, the categories it lists and COCO's person keypoints: spelled here only.

A data root holds, per split (``train2017``, ``val``, ...)::

    root/SPLIT/FILE_NAME                                  the images named in the annotation files
    root/annotations/instances_SPLIT.json                 boxes, masks, categories
    root/annotations/person_keypoints_SPLIT.json          person keypoints (keypoint names, skeleton)
    root/annotations/stuff_SPLIT.json                     COCO-Stuff's stuff categories (optional)
    root/stuffthingmaps/SPLIT/IMAGE.png                   COCO-Stuff's per-pixel label maps (optional;
                                                          the folder is data.sem_seg_dir)

Real COCO 2017 (with COCO-Stuff) and the synthetic dataset (:mod:`megdet.data.synthetic`) share it.
Nothing here needs torch or pycocotools.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ANNOTATIONS_DIR = "annotations"
STUFF_MAPS_DIR = "stuffthingmaps"  # COCO-Stuff's label map folder

# The 17 COCO keypoints in the order of person_keypoints_val2017.json.
COCO_KEYPOINT_NAMES: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip
# COCO's limb pairs, 1-based keypoint indices, in the order of person_keypoints_val2017.json.
COCO_SKELETON: tuple[tuple[int, int], ...] = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9),
    (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)  # fmt: skip
# The fields a person_keypoints file adds to a category.
_KEYPOINT_FIELDS = ("keypoints", "skeleton")


@dataclass(frozen=True)
class SplitFiles:
    """Where one split's images and annotation files are."""

    images: Path  # folder of the image files
    instances: Path  # instances_SPLIT.json
    keypoints: Path  # person_keypoints_SPLIT.json
    stuff: Path  # stuff_SPLIT.json
    label_maps: Path  # folder of the per-pixel label maps


def split_files(root: str | Path, split: str, label_maps_dir: str = STUFF_MAPS_DIR) -> SplitFiles:
    """The files of ``split`` under the data root ``root`` (whether they exist or not); the label maps
    in ``root/label_maps_dir/split``."""
    root = Path(root)
    annotations = root / ANNOTATIONS_DIR
    return SplitFiles(
        images=root / split,
        instances=annotations / f"instances_{split}.json",
        keypoints=annotations / f"person_keypoints_{split}.json",
        stuff=stuff_json_for(annotations / f"instances_{split}.json"),
        label_maps=root / label_maps_dir / split,
    )


def stuff_json_for(instances_json: str | Path) -> Path:
    """COCO-Stuff's stuff file next to an instances file: ``instances_S.json`` -> ``stuff_S.json``."""
    path = Path(instances_json)
    name = path.name[len("instances_"):] if path.name.startswith("instances_") else path.name
    return path.with_name(f"stuff_{name}")


def merge_keypoint_fields(
    categories: Iterable[Mapping[str, Any]], keypoint_categories: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Copies of ``categories`` with the keypoint names and skeleton of the same-id entries of
    ``keypoint_categories`` (a person_keypoints file's) that define keypoints; order kept."""
    merged = {int(c["id"]): dict(c) for c in categories}
    for c in keypoint_categories:
        if c.get("keypoints") and int(c["id"]) in merged:
            merged[int(c["id"])].update({k: c[k] for k in _KEYPOINT_FIELDS if k in c})
    return list(merged.values())


def _file_categories(path: Path) -> list[Mapping[str, Any]] | None:
    try:
        with open(path, encoding="utf-8") as f:
            categories = json.load(f).get("categories")
    except (OSError, ValueError, AttributeError):
        return None
    return categories if isinstance(categories, list) and categories else None


def read_categories(root: str | Path, splits: Sequence[str]) -> tuple[Path, list[dict[str, Any]]] | None:
    """The categories of the first of ``splits`` whose instances file lists any, with its keypoints
    file's keypoint names and skeleton merged in, and that instances file; None when there is none.

    Lenient, for naming predictions: unreadable files are skipped (the dataset reports them when read).
    """
    for split in dict.fromkeys(splits):
        files = split_files(root, split)
        categories = _file_categories(files.instances)
        if categories is None:
            continue
        try:
            categories = merge_keypoint_fields(categories, _file_categories(files.keypoints) or [])
        except (KeyError, TypeError, ValueError, AttributeError):
            pass  # malformed entries: returned as they are, for the caller's checks
        return files.instances, list(categories)
    return None
