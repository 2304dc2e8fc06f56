"""A tiny hand-made COCO dataset written to tmp_path, shared by the data tests.

Layout: ``root/{train,val}/*.png``, ``root/annotations/{instances,person_keypoints}_{train,val}.json``
(both splits identical). Categories 1 ``person`` (17 COCO keypoints), 3 ``car``, 5 ``dog`` (unused),
so labels are person 1, car 2, dog 3. Images (width x height):

- 1 ``a.png`` 40x30: person 10 (polygon, keypoints), car 11 (compressed RLE), crowd person 12.
- 2 ``b.png`` 30x40: car 20 (uncompressed RLE), degenerate person 21 (box 0.5 wide), person 22
  (polygon, keypoints only in the keypoints file's copy).
- 3 ``c.png`` 32x32: no annotations.
- 4 ``d.png`` 48x32, 5 ``e.png`` 24x40, 6 ``f.png`` 36x36: one car each (polygons).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

KEYPOINT_NAMES = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
    "right_knee", "left_ankle", "right_ankle",
]  # fmt: skip
SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9],
            [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]  # fmt: skip


@dataclass
class TinyCoco:
    """Paths of the written dataset and what its items must decode to."""

    root: Path
    instances: dict[str, Path]  # split -> instances json
    keypoints: dict[str, Path]  # split -> person_keypoints json
    image_dirs: dict[str, Path]
    pixels: dict[int, np.ndarray] = field(default_factory=dict)  # image id -> (H, W, 3) uint8
    masks: dict[int, np.ndarray] = field(default_factory=dict)  # annotation id -> (H, W) uint8
    keypoints_of: dict[int, list[float]] = field(default_factory=dict)  # annotation id -> 51 values
    instances_data: dict[str, Any] = field(default_factory=dict)
    keypoints_data: dict[str, Any] = field(default_factory=dict)


def _block(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    flat = mask.flatten(order="F")  # COCO RLE runs go down columns, starting with zeros
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"counts": counts, "size": list(mask.shape)}


def _kps(points: dict[str, tuple[float, float, int]]) -> list[float]:
    out = [0.0] * (3 * len(KEYPOINT_NAMES))
    for name, (x, y, v) in points.items():
        i = KEYPOINT_NAMES.index(name)
        out[3 * i : 3 * i + 3] = [x, y, v]
    return out


def write_tiny_coco(root: Path, splits: tuple[str, ...] = ("train", "val")) -> TinyCoco:
    """Writes the dataset described in this module's docstring under ``root``."""
    rng = np.random.default_rng(0)
    sizes = {1: (30, 40), 2: (40, 30), 3: (32, 32), 4: (32, 48), 5: (40, 24), 6: (36, 36)}  # id -> (h, w)
    names = {1: "a.png", 2: "b.png", 3: "c.png", 4: "d.png", 5: "e.png", 6: "f.png"}
    pixels = {i: rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for i, (h, w) in sizes.items()}

    car_rle_mask = _block(30, 40, 2, 10, 20, 36)
    compressed = mask_utils.encode(np.asfortranarray(car_rle_mask))
    car2_mask = _block(40, 30, 20, 35, 4, 26)
    crowd_mask = _block(30, 40, 0, 30, 0, 40)
    kp10 = _kps(
        {"nose": (10, 8, 2), "left_eye": (12, 7, 2), "right_eye": (8, 7, 1), "left_ankle": (13, 24, 2)}
    )
    kp22 = _kps({"left_shoulder": (20, 6, 2), "right_shoulder": (12, 6, 2)})

    def poly_rect(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
        return [[x0, y0, x1, y0, x1, y1, x0, y1]]

    anns = [
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 20], "area": 200, "iscrowd": 0,
         "segmentation": poly_rect(5, 5, 15, 25)},
        {"id": 11, "image_id": 1, "category_id": 3, "bbox": [20, 2, 16, 8], "area": 128, "iscrowd": 0,
         "segmentation": {"counts": compressed["counts"].decode("ascii"), "size": [30, 40]}},
        {"id": 12, "image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 30], "area": 1200, "iscrowd": 1,
         "segmentation": _uncompressed_rle(crowd_mask)},
        {"id": 20, "image_id": 2, "category_id": 3, "bbox": [4, 20, 22, 15], "area": 330, "iscrowd": 0,
         "segmentation": _uncompressed_rle(car2_mask)},
        {"id": 21, "image_id": 2, "category_id": 1, "bbox": [3, 3, 0.5, 10], "area": 5, "iscrowd": 0,
         "segmentation": poly_rect(3, 3, 3.5, 13)},
        {"id": 22, "image_id": 2, "category_id": 1, "bbox": [10, 2, 12, 16], "area": 192, "iscrowd": 0,
         "segmentation": poly_rect(10, 2, 22, 18)},
        {"id": 40, "image_id": 4, "category_id": 3, "bbox": [8, 4, 30, 20], "area": 600, "iscrowd": 0,
         "segmentation": poly_rect(8, 4, 38, 24)},
        {"id": 50, "image_id": 5, "category_id": 3, "bbox": [2, 10, 18, 20], "area": 360, "iscrowd": 0,
         "segmentation": poly_rect(2, 10, 20, 30)},
        {"id": 60, "image_id": 6, "category_id": 3, "bbox": [6, 6, 24, 24], "area": 576, "iscrowd": 0,
         "segmentation": poly_rect(6, 6, 30, 30)},
    ]  # fmt: skip
    images = [{"id": i, "file_name": names[i], "height": h, "width": w} for i, (h, w) in sizes.items()]
    categories = [{"id": 1, "name": "person", "supercategory": "person"},
                  {"id": 3, "name": "car", "supercategory": "vehicle"},
                  {"id": 5, "name": "dog", "supercategory": "animal"}]  # fmt: skip
    instances = {
        "info": {"description": "tiny"},
        "images": images,
        "annotations": anns,
        "categories": categories,
    }

    kp_anns = []
    for a in anns:
        if a["category_id"] == 1 and a["id"] != 21:
            b = copy.deepcopy(a)
            b["keypoints"] = {10: kp10, 22: kp22}.get(a["id"], [0.0] * 51)
            b["num_keypoints"] = sum(1 for v in b["keypoints"][2::3] if v > 0)
            kp_anns.append(b)
    person = {
        "id": 1,
        "name": "person",
        "supercategory": "person",
        "keypoints": KEYPOINT_NAMES,
        "skeleton": SKELETON,
    }
    keypoints = {"images": images, "annotations": kp_anns, "categories": [person]}

    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    out = TinyCoco(root=root, instances={}, keypoints={}, image_dirs={}, pixels=pixels)
    for split in splits:
        img_dir = root / split
        img_dir.mkdir(parents=True, exist_ok=True)
        for i, arr in pixels.items():
            Image.fromarray(arr).save(img_dir / names[i])
        out.image_dirs[split] = img_dir
        out.instances[split] = ann_dir / f"instances_{split}.json"
        out.keypoints[split] = ann_dir / f"person_keypoints_{split}.json"
        out.instances[split].write_text(json.dumps(instances))
        out.keypoints[split].write_text(json.dumps(keypoints))
    out.masks = {
        11: car_rle_mask,
        20: car2_mask,
        10: _block(30, 40, 5, 25, 5, 15),
        22: _block(40, 30, 2, 18, 10, 22),
    }
    out.keypoints_of = {10: kp10, 22: kp22}
    out.instances_data = instances
    out.keypoints_data = keypoints
    return out


@pytest.fixture
def tiny_coco(tmp_path: Path) -> TinyCoco:
    """The tiny dataset, freshly written for each test."""
    return write_tiny_coco(tmp_path / "coco")
