"""Checks a COCO-format annotation file (ours or real COCO 2017) and summarises what is in it.

``check_coco`` never stops at the first problem: it counts every problem kind, keeps the first
few examples of each and gathers statistics (images, annotations per category, COCO size classes,
crowd regions, keypoint visibility). Only a file that cannot be read as COCO at all (missing,
invalid JSON, no ``images``/``annotations``/``categories``) raises :class:`DatasetError`.

Problems are errors (the data is wrong: an annotation pointing at an unknown image, a mask whose
area disagrees with ``area``, a missing image file) or warnings (legal but suspicious and handled by
the loaders, e.g. boxes thinner than a pixel, which real COCO 2017 contains and loaders drop).
``CheckReport.ok`` is true when there are no errors.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from megdet.data.errors import DatasetError

SMALL_AREA, LARGE_AREA = 32**2, 96**2  # COCO's area thresholds
MAX_MASK_CHECKS = 2000
MAX_IMAGE_DECODES = 200
MAX_EXAMPLES = 5
AREA_TOLERANCE = 0.01  # relative
KEYPOINT_BOX_TOLERANCE = 1.0  # pixels

ERROR, WARNING = "error", "warning"
# kind -> (severity, what it means); the order is the order of the report.
PROBLEM_KINDS: dict[str, tuple[str, str]] = {
    "missing_field": (ERROR, "entries missing a required field"),
    "bad_value": (ERROR, "fields with a value of the wrong type or shape"),
    "duplicate_id": (ERROR, "ids used more than once"),
    "unknown_image_id": (ERROR, "annotations whose image_id is not in images"),
    "unknown_category_id": (ERROR, "annotations whose category_id is not in categories"),
    "bad_segmentation": (ERROR, "segmentations that cannot be decoded or do not match the image size"),
    "area_mismatch": (ERROR, f"non-crowd masks whose area differs from 'area' by more than {AREA_TOLERANCE:.0%}"),
    "bad_keypoints": (ERROR, "keypoints that are not K (x, y, v) triplets with v in {0, 1, 2}"),
    "missing_image_file": (ERROR, "images whose file is not in the images folder"),
    "undecodable_image": (ERROR, "image files that cannot be decoded"),
    "image_size_mismatch": (ERROR, "image files whose size differs from the height/width in the JSON"),
    "missing_label_map": (ERROR, "images without a label map in the label-map folder"),
    "bad_label_map": (ERROR, "label maps that cannot be decoded, have several channels or another size than their image"),
    "unknown_label_id": (ERROR, "label maps with pixel values that are no known class id (nor 255 = ignore)"),
    "missing_optional_field": (WARNING, "annotations without 'iscrowd' or 'segmentation'"),
    "degenerate_box": (WARNING, "boxes narrower or shorter than 1 pixel (the loaders drop them)"),
    "box_outside_image": (WARNING, "boxes reaching more than 1 pixel outside their image"),
    "keypoint_outside_box": (WARNING, "labelled keypoints (v>0) more than 1 pixel outside their box"),
    "num_keypoints_mismatch": (WARNING, "num_keypoints differs from the number of keypoints with v>0"),
}


@dataclass
class Problem:
    """One kind of problem: how often it occurred and the first few examples."""

    kind: str
    severity: str
    description: str
    count: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class CheckReport:
    """What :func:`check_coco` found. ``problems`` maps a kind (see ``PROBLEM_KINDS``) to a :class:`Problem`."""

    path: str
    images_dir: str | None = None
    num_images: int = 0
    num_annotations: int = 0
    num_categories: int = 0
    annotations_per_category: dict[str, int] = field(default_factory=dict)
    size_counts: dict[str, int] = field(default_factory=lambda: {"small": 0, "medium": 0, "large": 0})
    num_crowd: int = 0
    num_keypoint_annotations: int = 0
    keypoint_visibility: dict[int, int] = field(default_factory=lambda: {0: 0, 1: 0, 2: 0})
    images_without_annotations: int = 0
    masks_total: int = 0  # non-crowd annotations with a segmentation
    masks_checked: int = 0  # of those, how many had their area checked
    image_files_checked: int = 0  # existence
    image_files_decoded: int = 0
    label_maps_dir: str | None = None
    label_maps_checked: int = 0  # existence, size and mode
    label_maps_decoded: int = 0  # class ids
    problems: dict[str, Problem] = field(default_factory=dict)

    @property
    def num_errors(self) -> int:
        return sum(p.count for p in self.problems.values() if p.severity == ERROR)

    @property
    def num_warnings(self) -> int:
        return sum(p.count for p in self.problems.values() if p.severity == WARNING)

    @property
    def num_problems(self) -> int:
        """All problems found, errors and warnings."""
        return self.num_errors + self.num_warnings

    @property
    def ok(self) -> bool:
        """True when no error was found (warnings allowed)."""
        return self.num_errors == 0

    def add(self, kind: str, example: str) -> None:
        """Counts one problem of ``kind`` and keeps ``example`` if it is among the first few."""
        severity, description = PROBLEM_KINDS[kind]
        p = self.problems.setdefault(kind, Problem(kind, severity, description))
        p.count += 1
        if len(p.examples) < MAX_EXAMPLES:
            p.examples.append(example)


def _load(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found; check the path") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the annotation file ({e.strerror}); check its permissions") from None
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}; regenerate or re-download the file"
        ) from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: invalid JSON (not UTF-8 text); regenerate or re-download the file") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with images/annotations/categories, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DatasetError(f"{path}: missing required top-level key '{key}' (a COCO file needs images, annotations, categories)")
        if not isinstance(data[key], list):
            raise DatasetError(f"{path}: top-level key '{key}' must be a list, got {type(data[key]).__name__}")
    return data


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _entries(report: CheckReport, items: list[Any], what: str, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """The entries that are objects with every required field and an integer id (others reported)."""
    good = []
    seen: set[int] = set()
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            report.add("bad_value", f"{what} #{i} is a {type(it).__name__}, not an object")
            continue
        missing = [f for f in required if f not in it]
        if missing:
            report.add("missing_field", f"{what} #{i} has no {', '.join(repr(m) for m in missing)}")
            continue
        if not _is_int(it["id"]):
            report.add("bad_value", f"{what} #{i}: id {it['id']!r} is not an integer")
            continue
        if it["id"] in seen:
            report.add("duplicate_id", f"{what} id {it['id']} appears more than once")
            continue
        seen.add(it["id"])
        good.append(it)
    return good


def _polygon_area(seg: list[list[float]]) -> float:
    total = 0.0
    for poly in seg:
        p = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        x, y = p[:, 0], p[:, 1]
        total += 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    return total


def _check_mask(report: CheckReport, ann: dict[str, Any], img: dict[str, Any], where: str) -> None:
    """Decodes the segmentation (pycocotools) and compares its area with the annotation's ``area``."""
    seg, h, w = ann["segmentation"], int(img["height"]), int(img["width"])
    area = float(ann["area"])
    try:
        if isinstance(seg, list):
            if not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg):
                raise ValueError("polygons must be lists of at least 3 (x, y) points")
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
            if list(seg["size"]) != [h, w]:
                report.add("bad_segmentation", f"{where}: mask size {seg['size']} but the image is {[h, w]}")
                return
            rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg
        else:
            raise ValueError("neither a polygon list nor an RLE with 'counts' and 'size'")
        decoded = float(mask_utils.area(rle))
    except (ValueError, TypeError, KeyError) as e:
        report.add("bad_segmentation", f"{where}: {e}")
        return
    tol = max(AREA_TOLERANCE * area, 1.0)
    if abs(decoded - area) <= tol:
        return
    # COCO's polygon areas are the polygons' exact (shoelace) areas, not rasterised pixel counts,
    # which differ a lot for small objects; accept either.
    if isinstance(seg, list) and abs(_polygon_area(seg) - area) <= tol:
        return
    report.add("area_mismatch", f"{where}: area {area:g} but the mask has {decoded:g} pixels")


def _check_keypoints(
    report: CheckReport, ann: dict[str, Any], num_kp: int | None, box: list[float] | None, where: str
) -> None:
    kps = ann["keypoints"]
    if not isinstance(kps, list) or len(kps) % 3 or (num_kp and len(kps) != 3 * num_kp) or not all(map(_is_num, kps)):
        n = len(kps) if isinstance(kps, list) else type(kps).__name__
        report.add("bad_keypoints", f"{where}: {n} keypoint values, expected {3 * num_kp if num_kp else '3*K'} numbers")
        return
    report.num_keypoint_annotations += 1
    labelled = 0
    for j in range(0, len(kps), 3):
        x, y, v = kps[j : j + 3]
        if v not in (0, 1, 2):
            report.add("bad_keypoints", f"{where}: keypoint {j // 3} has visibility {v}")
            continue
        report.keypoint_visibility[int(v)] += 1
        if v == 0:
            continue
        labelled += 1
        if box is not None:
            bx, by, bw, bh = box
            t = KEYPOINT_BOX_TOLERANCE
            if not (bx - t <= x <= bx + bw + t and by - t <= y <= by + bh + t):
                report.add("keypoint_outside_box", f"{where}: keypoint {j // 3} at ({x:g}, {y:g}) outside box {box}")
    if "num_keypoints" in ann and ann["num_keypoints"] != labelled:
        report.add("num_keypoints_mismatch", f"{where}: num_keypoints {ann['num_keypoints']} but {labelled} have v>0")


def _check_images(report: CheckReport, images: list[dict[str, Any]], images_dir: Path) -> None:
    """Existence of every file; a decode (and size check) of an evenly spread sample."""
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir}: images folder not found; check the path or leave it out")
    listing = {e.name for e in os.scandir(images_dir)}  # one directory read instead of 100k stats
    present = []
    for img in images:
        name = str(img["file_name"])
        report.image_files_checked += 1
        if name in listing or ("/" in name and (images_dir / name).is_file()):
            present.append(img)
        else:
            report.add("missing_image_file", f"image id {img['id']}: {images_dir / name} not found")
    step = max(1, math.ceil(len(present) / MAX_IMAGE_DECODES))
    for img in present[::step]:
        path = images_dir / str(img["file_name"])
        report.image_files_decoded += 1
        try:
            with Image.open(path) as im:
                size = im.size
                im.verify()  # checksums and structure
            with Image.open(path) as im:
                im.load()  # the pixel data itself, which verify() does not decode
        except Exception as e:  # PIL raises many unrelated exception types for broken files
            report.add("undecodable_image", f"image id {img['id']}: {path}: {type(e).__name__}: {e}")
            continue
        if _is_int(img["width"]) and _is_int(img["height"]) and size != (img["width"], img["height"]):
            report.add(
                "image_size_mismatch",
                f"image id {img['id']}: {path} is {size[0]}x{size[1]} but the JSON says {img['width']}x{img['height']}",
            )


def check_coco(
    annotation_json: str | Path,
    images_dir: str | Path | None = None,
    label_maps_dir: str | Path | None = None,
    num_label_classes: int | None = None,
) -> CheckReport:
    """Validates a COCO-format annotation file (and, with ``images_dir``, its image files; with
    ``label_maps_dir``, the semantic label maps of its images: :func:`megdet.data.semantic.check_label_maps`,
    ids known when below ``num_label_classes``, or by default COCO-Stuff's category id - 1 of the
    file's categories and of the ``stuff_*.json`` next to it).

    Mask areas are checked on at most ``MAX_MASK_CHECKS`` non-crowd annotations (an evenly spread
    sample on big files; ``report.masks_checked`` says how many) and images are decoded for at most
    ``MAX_IMAGE_DECODES`` files; existence is checked for every image. Raises :class:`DatasetError`
    when the file cannot be read as COCO at all.
    """
    path = Path(annotation_json)
    data = _load(path)
    report = CheckReport(path=str(path), images_dir=str(images_dir) if images_dir is not None else None)

    cats = _entries(report, data["categories"], "category", ("id", "name"))
    cat_by_id = {c["id"]: c for c in cats}
    report.num_categories = len(cats)
    report.annotations_per_category = {str(c["name"]): 0 for c in cats}
    num_kp_of = {c["id"]: len(c["keypoints"]) for c in cats if isinstance(c.get("keypoints"), list)}

    images = _entries(report, data["images"], "image", ("id", "file_name", "height", "width"))
    for img in images:
        if not (_is_int(img["height"]) and _is_int(img["width"]) and img["height"] > 0 and img["width"] > 0):
            report.add("bad_value", f"image id {img['id']}: height/width {img['height']!r}/{img['width']!r} are not positive integers")
    img_by_id = {im["id"]: im for im in images}
    report.num_images = len(data["images"])

    anns = _entries(report, data["annotations"], "annotation", ("id", "image_id", "category_id", "bbox", "area"))
    report.num_annotations = len(data["annotations"])
    annotated: set[Any] = set()
    mask_candidates: list[tuple[dict[str, Any], dict[str, Any], str]] = []
    for ann in anns:
        where = f"annotation id {ann['id']} (image {ann['image_id']})"
        img = img_by_id.get(ann["image_id"])
        if img is None:
            report.add("unknown_image_id", f"{where}: image_id {ann['image_id']!r} is not in images")
        else:
            annotated.add(ann["image_id"])
        cat = cat_by_id.get(ann["category_id"])
        if cat is None:
            report.add("unknown_category_id", f"{where}: category_id {ann['category_id']!r} is not in categories")
        else:
            report.annotations_per_category[str(cat["name"])] += 1
        missing = [f for f in ("iscrowd", "segmentation") if f not in ann]
        if missing:
            report.add("missing_optional_field", f"{where}: no {', '.join(repr(m) for m in missing)}")
        crowd = bool(ann.get("iscrowd", 0))
        report.num_crowd += crowd

        area = ann["area"]
        if not _is_num(area) or area < 0:
            report.add("bad_value", f"{where}: area {area!r} is not a non-negative number")
            area = None
        elif not crowd:
            report.size_counts["small" if area < SMALL_AREA else "medium" if area < LARGE_AREA else "large"] += 1

        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(map(_is_num, box))):
            report.add("bad_value", f"{where}: bbox {box!r} is not [x, y, width, height]")
            box = None
        else:
            if box[2] < 1 or box[3] < 1:
                report.add("degenerate_box", f"{where}: bbox {box} is {box[2]:g} x {box[3]:g} pixels")
            if img is not None and _is_num(img["width"]) and _is_num(img["height"]) and (
                box[0] < -1 or box[1] < -1 or box[0] + box[2] > img["width"] + 1 or box[1] + box[3] > img["height"] + 1
            ):
                report.add("box_outside_image", f"{where}: bbox {box} outside the {img['width']}x{img['height']} image")

        if "keypoints" in ann:
            _check_keypoints(report, ann, num_kp_of.get(ann["category_id"]), box, where)
        if not crowd and area is not None and img is not None and "segmentation" in ann:
            seg = ann["segmentation"]
            if seg not in ([], None):  # box-only datasets leave the segmentation empty
                mask_candidates.append((ann, img, where))

    report.masks_total = len(mask_candidates)
    if len(mask_candidates) > MAX_MASK_CHECKS:
        pick = np.linspace(0, len(mask_candidates) - 1, MAX_MASK_CHECKS).round().astype(int)
        mask_candidates = [mask_candidates[i] for i in pick]
    for ann, img, where in mask_candidates:
        if _is_int(img["height"]) and _is_int(img["width"]):
            _check_mask(report, ann, img, where)
            report.masks_checked += 1

    report.images_without_annotations = sum(1 for im in images if im["id"] not in annotated)
    if images_dir is not None:
        _check_images(report, images, Path(images_dir))
    if label_maps_dir is not None:
        from megdet.data.semantic import check_label_maps, label_names

        report.label_maps_dir = str(label_maps_dir)
        known = set(range(num_label_classes)) if num_label_classes else set(label_names(path, cats))
        valid = [im for im in images if _is_int(im["height"]) and _is_int(im["width"])]
        check_label_maps(report, valid, label_maps_dir, known, MAX_IMAGE_DECODES)
    report.problems = {k: report.problems[k] for k in PROBLEM_KINDS if k in report.problems}
    return report


def _pct(n: int, total: int) -> str:
    return f"{n} ({100.0 * n / total:.1f}%)" if total else str(n)


def format_report(report: CheckReport) -> str:
    """A human-readable multi-line summary of ``report``: statistics, then problems, then the verdict."""
    r = report
    lines = [f"COCO check: {r.path}"]
    lines.append(f"  images: {r.num_images} ({r.images_without_annotations} without annotations)")
    if r.images_dir is not None:
        lines.append(
            f"  image files in {r.images_dir}: existence checked for {r.image_files_checked}, "
            f"decoded {r.image_files_decoded}"
        )
    if r.label_maps_dir is not None:
        lines.append(
            f"  label maps in {r.label_maps_dir}: existence, size and mode checked for {r.label_maps_checked}, "
            f"class ids for {r.label_maps_decoded}"
        )
    lines.append(f"  annotations: {r.num_annotations} ({r.num_crowd} crowd)")
    non_crowd = sum(r.size_counts.values())
    lines.append(
        "  sizes by area (non-crowd): "
        + ", ".join(f"{k} {_pct(v, non_crowd)}" for k, v in r.size_counts.items())
        + f"  [small < {SMALL_AREA} <= medium < {LARGE_AREA} <= large]"
    )
    lines.append(f"  categories: {r.num_categories}")
    width = max((len(n) for n in r.annotations_per_category), default=0)
    for name, n in r.annotations_per_category.items():
        lines.append(f"    {name:<{width}}  {n}")
    if r.num_keypoint_annotations:
        vis = r.keypoint_visibility
        total = sum(vis.values())
        lines.append(
            f"  keypoints: {r.num_keypoint_annotations} annotations; v=2 visible {_pct(vis[2], total)}, "
            f"v=1 occluded {_pct(vis[1], total)}, v=0 unlabelled {_pct(vis[0], total)}"
        )
    sampled = " (an evenly spread sample)" if r.masks_checked < r.masks_total else ""
    lines.append(f"  mask areas checked: {r.masks_checked} of {r.masks_total} non-crowd segmentations{sampled}")
    if not r.problems:
        lines.append("  problems: none")
    else:
        lines.append(f"  problems: {r.num_errors} error(s), {r.num_warnings} warning(s)")
        for p in r.problems.values():
            lines.append(f"    [{p.severity}] {p.kind}: {p.count} - {p.description}")
            for ex in p.examples:
                lines.append(f"        e.g. {ex}")
            if p.count > len(p.examples):
                lines.append(f"        ... and {p.count - len(p.examples)} more")
    lines.append("  result: " + ("OK" if r.ok else "FAILED") + (" (with warnings)" if r.ok and r.num_warnings else ""))
    return "\n".join(lines)
