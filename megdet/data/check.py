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

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from megdet.data.errors import DatasetError
from megdet.data.images import read_image_size, read_rgb
from megdet.data.validate import (
    AREA_TOLERANCE,
    ERROR,
    PROBLEM_KINDS,
    WARNING,
    annotation_problems,
    annotation_where,
    category_name,
    category_problems,
    entries,
    image_path_problem,
    image_problems,
    image_size,
    is_number,
    keypoint_counts,
    read_coco_json,
)

SMALL_AREA, LARGE_AREA = 32**2, 96**2  # COCO's area thresholds
MAX_MASK_CHECKS = 2000
MAX_IMAGE_DECODES = 200
MAX_EXAMPLES = 5
__all__ = ["ERROR", "PROBLEM_KINDS", "WARNING", "CheckReport", "Problem", "check_coco", "format_report"]


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


def _polygon_area(seg: list[list[float]]) -> float:
    total = 0.0
    for poly in seg:
        p = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        x, y = p[:, 0], p[:, 1]
        total += 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    return total


def _check_mask(report: CheckReport, ann: dict[str, Any], size: tuple[int, int], where: str) -> None:
    """Decodes the (validated) segmentation with pycocotools and compares its area with ``area``."""
    seg, (h, w) = ann["segmentation"], size
    area = float(ann["area"])
    if isinstance(seg, list):
        polygons = [p for p in seg if len(p) >= 6]
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
    else:
        rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg
    report.masks_checked += 1
    decoded = float(mask_utils.area(rle))
    tol = max(AREA_TOLERANCE * area, 1.0)
    if abs(decoded - area) <= tol:
        return
    # COCO's polygon areas are the polygons' exact (shoelace) areas, not rasterised pixel counts,
    # which differ a lot for small objects; accept either.
    if isinstance(seg, list) and abs(_polygon_area(polygons) - area) <= tol:
        return
    report.add("area_mismatch", f"{where}: area {area:g} but the mask has {decoded:g} pixels")


def _keypoint_statistics(report: CheckReport, kps: list[float]) -> None:
    report.num_keypoint_annotations += 1
    for v in kps[2::3]:
        report.keypoint_visibility[int(v)] += 1


def _check_images(report: CheckReport, images: list[dict[str, Any]], images_dir: Path) -> None:
    """Existence and the header's size of every file; a full decode of an evenly spread sample."""
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir}: images folder not found; check the path or leave it out")
    listing = {e.name for e in os.scandir(images_dir)}  # one directory read instead of 100k stats
    present = []
    for img in images:
        name = img["file_name"]
        report.image_files_checked += 1
        if name in listing or ("/" in name and (images_dir / name).is_file()):
            present.append(img)
        else:
            report.add("missing_image_file", f"image id {img['id']}: {images_dir / name} not found")
    readable = []
    for img in present:  # the header only (a few tens of microseconds a file)
        path = images_dir / img["file_name"]
        try:
            h, w = read_image_size(path)
        except DatasetError as e:
            report.add("undecodable_image", f"image id {img['id']}: {e}")
            continue
        readable.append(img)
        if (h, w) != image_size(img):
            report.add(
                "image_size_mismatch",
                f"image id {img['id']}: {path} is {w}x{h} but the JSON says {img['width']}x{img['height']}",
            )
    step = max(1, math.ceil(len(readable) / MAX_IMAGE_DECODES))
    for img in readable[::step]:
        path = images_dir / img["file_name"]
        report.image_files_decoded += 1
        try:
            with Image.open(path) as im:
                im.verify()  # checksums and structure
            read_rgb(path)  # the pixel data itself, which verify() does not decode
        except DatasetError as e:
            report.add("undecodable_image", f"image id {img['id']}: {e}")
        except Exception as e:  # PIL raises many unrelated exception types for broken files
            report.add("undecodable_image", f"image id {img['id']}: {path}: {type(e).__name__}: {e}")


def _check_categories(report: CheckReport, items: list[Any]) -> list[dict[str, Any]]:
    cats, issues = entries(items, "category", ("id",))
    for kind, detail in issues:
        report.add(kind, detail)
    for c in cats:
        for kind, detail in category_problems(c):
            report.add(kind, f"category id {c['id']}: {detail}")
    report.num_categories = len(cats)
    report.annotations_per_category = {category_name(c): 0 for c in cats}
    return cats


def _check_image_entries(
    report: CheckReport, items: list[Any], allow_outside: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The image entries with a valid id, and those of them whose files can be looked at (valid name and
    size, inside the folder)."""
    images, issues = entries(items, "image", ("id", "file_name", "height", "width"))
    for kind, detail in issues:
        report.add(kind, detail)
    usable = []
    for img in images:
        problems = list(image_problems(img))
        for kind, detail in problems:
            report.add(kind, f"image id {img['id']}: {detail}")
        outside = None if allow_outside or problems else image_path_problem(img["file_name"])
        if outside:
            report.add("image_outside_folder", f"image id {img['id']}: {outside}")
        if not problems and not outside:
            usable.append(img)
    report.num_images = len(items)
    return images, usable


def check_coco(
    annotation_json: str | Path,
    images_dir: str | Path | None = None,
    label_maps_dir: str | Path | None = None,
    num_label_classes: int | None = None,
    *,
    allow_outside_images: bool = False,
) -> CheckReport:
    """Validates a COCO-format annotation file (and, with ``images_dir``, its image files; with
    ``label_maps_dir``, the semantic label maps of its images: :func:`megdet.data.semantic.check_label_maps`,
    ids known when below ``num_label_classes``, or by default COCO-Stuff's category id - 1 of the
    file's categories and of the ``stuff_*.json`` next to it).

    Every annotation goes through the validator the loaders use (``megdet/data/validate.py``). Mask areas
    are checked on at most ``MAX_MASK_CHECKS`` non-crowd annotations (an evenly spread sample on big
    files; ``report.masks_checked`` says how many); every image file's header is read (existence, size,
    decompression bombs) and at most ``MAX_IMAGE_DECODES`` files are decoded. An image ``file_name``
    outside ``images_dir`` is an error unless ``allow_outside_images``. Raises :class:`DatasetError` when
    the file cannot be read as COCO at all.
    """
    path = Path(annotation_json)
    data = read_coco_json(path)
    report = CheckReport(path=str(path), images_dir=str(images_dir) if images_dir is not None else None)
    cats = _check_categories(report, data["categories"])
    images, usable = _check_image_entries(report, data["images"], allow_outside_images)
    annotated, mask_candidates = _check_annotations(report, data["annotations"], cats, images)
    _check_masks(report, mask_candidates)
    report.images_without_annotations = sum(1 for im in images if im["id"] not in annotated)
    if images_dir is not None:
        _check_images(report, usable, Path(images_dir))
    if label_maps_dir is not None:
        from megdet.data.semantic import check_label_maps, label_names

        report.label_maps_dir = str(label_maps_dir)
        known = set(range(num_label_classes)) if num_label_classes else set(label_names(path, cats))
        check_label_maps(report, usable, label_maps_dir, known, MAX_IMAGE_DECODES)
    report.problems = {k: report.problems[k] for k in PROBLEM_KINDS if k in report.problems}
    return report


# An annotation whose mask area can be checked: the annotation, its image's (height, width), where it is.
_MaskCandidate = tuple[dict[str, Any], tuple[int, int], str]


def _check_annotations(
    report: CheckReport, items: list[Any], cats: list[dict[str, Any]], images: list[dict[str, Any]]
) -> tuple[set[Any], list[_MaskCandidate]]:
    """Validates every annotation and counts it in ``report``; returns the ids of the images that have
    annotations and the annotations whose mask area can be checked."""
    cat_by_id = {c["id"]: c for c in cats}
    keypoints_of = keypoint_counts(cats)
    img_by_id = {im["id"]: im for im in images}
    anns, issues = entries(items, "annotation", ("id",))
    for kind, detail in issues:
        report.add(kind, detail)
    report.num_annotations = len(items)
    annotated: set[Any] = set()
    mask_candidates: list[_MaskCandidate] = []
    for index, ann in enumerate(anns):
        where = annotation_where(ann, index)
        problems = list(annotation_problems(ann, img_by_id, keypoints_of))
        for kind, detail in problems:
            report.add(kind, f"{where}: {detail}")
        kinds = {k for k, _ in problems}
        if "missing_field" in kinds:
            continue
        img = img_by_id.get(ann["image_id"]) if "unknown_image_id" not in kinds else None
        if img is not None:
            annotated.add(ann["image_id"])
        _count_annotation(report, ann, kinds, cat_by_id)
        size = image_size(img)
        if size is not None and _has_checkable_mask(ann, kinds):
            mask_candidates.append((ann, size, where))
    return annotated, mask_candidates


def _count_annotation(
    report: CheckReport, ann: dict[str, Any], kinds: set[str], cat_by_id: dict[Any, dict[str, Any]]
) -> None:
    """Adds ``ann`` (with problem kinds ``kinds``) to the category, crowd, size and keypoint statistics."""
    if "unknown_category_id" not in kinds:
        report.annotations_per_category[category_name(cat_by_id[ann["category_id"]])] += 1
    crowd = ann.get("iscrowd", 0) == 1
    report.num_crowd += crowd
    area = ann.get("area")
    if is_number(area) and area >= 0 and not crowd:
        report.size_counts["small" if area < SMALL_AREA else "medium" if area < LARGE_AREA else "large"] += 1
    if "keypoints" in ann and "bad_keypoints" not in kinds:
        _keypoint_statistics(report, ann["keypoints"])


def _has_checkable_mask(ann: dict[str, Any], kinds: set[str]) -> bool:
    """Whether ``ann`` is a non-crowd annotation with a valid area and a mask that encloses something."""
    area = ann.get("area")
    if "bad_segmentation" in kinds or ann.get("iscrowd", 0) == 1 or not (is_number(area) and area >= 0):
        return False
    seg = ann.get("segmentation")
    # Box-only datasets leave the segmentation empty; polygons of fewer than 3 points enclose nothing.
    return isinstance(seg, dict) or (isinstance(seg, list) and any(len(p) >= 6 for p in seg))


def _check_masks(report: CheckReport, mask_candidates: list[_MaskCandidate]) -> None:
    """Checks the mask areas of at most ``MAX_MASK_CHECKS`` candidates, evenly spread."""
    report.masks_total = len(mask_candidates)
    if len(mask_candidates) > MAX_MASK_CHECKS:
        pick = np.linspace(0, len(mask_candidates) - 1, MAX_MASK_CHECKS).round().astype(int)
        mask_candidates = [mask_candidates[i] for i in pick]
    for ann, size, where in mask_candidates:
        _check_mask(report, ann, size, where)


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
