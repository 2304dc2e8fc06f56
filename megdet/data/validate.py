"""The one validator of COCO-format data: `megdet data check`, the training dataset and evaluation from
files all call it.

Every problem is a ``(kind, detail)`` pair (kinds in :data:`PROBLEM_KINDS`, each an error or a warning).
``data check`` reports them all; the loaders raise :class:`DatasetError` on the first *error* with
:func:`raise_first_error` and handle the warnings themselves (e.g. they drop boxes thinner than a pixel).

What is checked before any geometry reaches pycocotools' C code, which trusts its input (a polygon with a
non-finite or huge coordinate crashes the process or allocates memory in proportion to its perimeter; RLE
counts that do not add up to the image make ``iou`` loop for minutes and ``area`` / ``toBbox`` answer
nonsense):

- image ``height`` / ``width``: positive integers, at most ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (the
  size Pillow itself treats as a possible decompression bomb); ``file_name`` a string inside the image
  folder (:func:`image_path_problem`).
- ``bbox``: four finite numbers inside the image padded by its own width / height on every side (a box
  reaching further is no annotation of this image).
- polygons: lists of an even number of finite numbers, at least 3 points (shorter ones enclose nothing:
  a warning, the loaders skip them), every point inside the padded image, the boundary no longer than
  ``MAX_POLYGON_BOUNDARY`` pixels.
- RLE: ``size`` equal to the image's [height, width]; uncompressed ``counts`` non-negative integers, and
  compressed ``counts`` a string of pycocotools' alphabet whose decoded runs are non-negative, each run
  at most 6 characters; in both cases the runs add up to height x width.
- keypoints: 3 K finite numbers (K from the category), x and y inside the padded image, v in {0, 1, 2}.
- ``area`` (optional, as for pycocotools) a finite non-negative number; ``iscrowd`` 0 / 1 / true / false.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from megdet.data.errors import DatasetError

ERROR, WARNING = "error", "warning"
AREA_TOLERANCE = 0.01  # relative
KEYPOINT_BOX_TOLERANCE = 1.0  # pixels
# The boundary length pycocotools rasterises a polygon at (sum over its edges of max(|dx|, |dy|)); its
# memory grows by about 40 bytes per pixel of it, so this bounds one annotation's to about 170 MB.
MAX_POLYGON_BOUNDARY = 2**22
# pycocotools scales polygon coordinates by 5 into C ints: 15 x this (the padded image) stays below 2**31.
MAX_IMAGE_SIDE = 2**27
RLE_MAX_CHARS_PER_RUN = 6  # pycocotools decodes a run into 30 bits; a longer one overflows there
# kind -> (severity, what it means); the order is the order of the report.
PROBLEM_KINDS: dict[str, tuple[str, str]] = {
    "missing_field": (ERROR, "entries missing a required field"),
    "bad_value": (ERROR, "fields with a value of the wrong type, shape or range"),
    "duplicate_id": (ERROR, "ids used more than once"),
    "unknown_image_id": (ERROR, "annotations whose image_id is not in images"),
    "unknown_category_id": (ERROR, "annotations whose category_id is not in categories"),
    "bad_segmentation": (ERROR, "segmentations that are malformed, unsafe to decode or do not match the image size"),
    "area_mismatch": (ERROR, f"non-crowd masks whose area differs from 'area' by more than {AREA_TOLERANCE:.0%}"),
    "bad_keypoints": (ERROR, "keypoints that are not K finite (x, y, v) triplets with v in {0, 1, 2}"),
    "image_outside_folder": (ERROR, "image file names that are absolute or leave the images folder with '..'"),
    "missing_image_file": (ERROR, "images whose file is not in the images folder"),
    "undecodable_image": (ERROR, "image files that cannot be decoded (or exceed Pillow's decompression-bomb limit)"),
    "image_size_mismatch": (ERROR, "image files whose size differs from the height/width in the JSON"),
    "missing_label_map": (ERROR, "images without a label map in the label-map folder"),
    "bad_label_map": (ERROR, "label maps that cannot be decoded, have several channels or another size than their image"),
    "unknown_label_id": (ERROR, "label maps with pixel values that are no known class id (nor 255 = ignore)"),
    "missing_optional_field": (WARNING, "annotations without 'iscrowd', 'segmentation' or 'area'"),
    "short_polygon": (WARNING, "polygons of fewer than 3 points (they enclose nothing; the loaders skip them)"),
    "degenerate_box": (WARNING, "boxes narrower or shorter than 1 pixel (the loaders drop them)"),
    "box_outside_image": (WARNING, "boxes reaching more than 1 pixel outside their image"),
    "keypoint_outside_box": (WARNING, "labelled keypoints (v>0) more than 1 pixel outside their box"),
    "num_keypoints_mismatch": (WARNING, "num_keypoints differs from the number of keypoints with v>0"),
}

Issue = tuple[str, str]  # (kind, detail)


def is_error(kind: str) -> bool:
    """True when problems of ``kind`` make the data unusable (the loaders raise on them)."""
    return PROBLEM_KINDS[kind][0] == ERROR


def raise_first_error(path: str | Path, where: str, issues: Iterable[Issue]) -> None:
    """Raises a one-line :class:`DatasetError` for the first error among ``issues`` (warnings pass)."""
    for kind, detail in issues:
        if is_error(kind):
            raise DatasetError(f"{path}: {where}: {detail}")


# --------------------------------------------------------------------------------------------------
# Reading JSON
# --------------------------------------------------------------------------------------------------


def read_json(path: str | Path, what: str, hint: str = "check the path") -> Any:
    """The parsed JSON file, or a one-line :class:`DatasetError` naming ``path`` (missing, unreadable,
    invalid, not UTF-8, nested too deeply for Python's parser, numbers Python refuses to convert)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{path}: {what} file not found; {hint}") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a folder, not a {what} file; {hint}") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the {what} file ({e.strerror}); check its permissions") from None
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}; regenerate or re-download the file"
        ) from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: invalid JSON (not UTF-8 text); regenerate or re-download the file") from None
    except RecursionError:
        raise DatasetError(f"{path}: JSON nested too deeply to read; no COCO file nests more than a few levels") from None
    except ValueError as e:  # e.g. an integer literal of more digits than Python converts
        raise DatasetError(f"{path}: invalid JSON ({str(e).splitlines()[0]}); regenerate or re-download the file") from None


def read_coco_json(path: str | Path, what: str = "annotation", hint: str = "check the path") -> dict[str, Any]:
    """:func:`read_json` of a COCO file: an object whose ``images``, ``annotations`` and ``categories`` are lists."""
    data = read_json(path, what, hint)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with images/annotations/categories, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DatasetError(f"{path}: missing required top-level key '{key}' (a COCO file needs images, annotations, categories)")
        if not isinstance(data[key], list):
            raise DatasetError(f"{path}: top-level key '{key}' must be a list, got {type(data[key]).__name__}")
    return data


# --------------------------------------------------------------------------------------------------
# Scalars
# --------------------------------------------------------------------------------------------------

_NUMBER_TYPES = (int, float, np.integer, np.floating)


def is_int(v: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float that is not a bool."""
    if not isinstance(v, _NUMBER_TYPES) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond any float
        return False


def is_id(v: Any) -> bool:
    """What pycocotools accepts as an id and JSON can hold: an integer or a string."""
    return is_int(v) or isinstance(v, str)


def _short(v: Any, limit: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 5] + "...]"


def _first_non_number(values: Sequence[Any]) -> int | None:
    """Index of the first value that is not a finite number, or None."""
    for i, v in enumerate(values):
        if not is_number(v):
            return i
    return None


def _all_finite_numbers(values: Sequence[Any]) -> bool:
    # Fast path for JSON data (exact int / float): a sum over finite values is finite unless it overflows,
    # which the range checks reject anyway.
    if all(type(v) is float or type(v) is int for v in values):
        try:
            return math.isfinite(sum(values))
        except OverflowError:  # an int too large for a float
            return False
    return _first_non_number(values) is None


def category_name(cat: Mapping[str, Any]) -> str:
    """A category's display name: its ``name``, or ``category ID`` for a category without one (pycocotools
    does not require names)."""
    return str(cat["name"]) if "name" in cat else f"category {cat.get('id')}"


# --------------------------------------------------------------------------------------------------
# Entries: categories, images
# --------------------------------------------------------------------------------------------------


def entries(
    items: list[Any], what: str, required: tuple[str, ...], id_ok: Callable[[Any], bool] = is_int
) -> tuple[list[dict[str, Any]], list[Issue]]:
    """The entries that are objects with every ``required`` field and a valid, unique id, and the
    problems of the others (an entry with a problem is left out)."""
    good: list[dict[str, Any]] = []
    issues: list[Issue] = []
    seen: set[Any] = set()
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            issues.append(("bad_value", f"{what} #{i} is a {type(it).__name__}, not an object"))
            continue
        missing = [f for f in required if f not in it]
        if missing:
            issues.append(("missing_field", f"{what} #{i} has no {', '.join(repr(m) for m in missing)}"))
            continue
        if not id_ok(it["id"]):
            kind = "an integer" if id_ok is is_int else "an integer or a string"
            issues.append(("bad_value", f"{what} #{i}: id {_short(it['id'])} is not {kind}"))
            continue
        if it["id"] in seen:
            issues.append(("duplicate_id", f"{what} id {it['id']!r} appears more than once"))
            continue
        seen.add(it["id"])
        good.append(it)
    return good, issues


def category_problems(cat: Mapping[str, Any]) -> Iterator[Issue]:
    """Problems of a category entry's optional ``keypoints`` (names) and ``skeleton`` (1-based pairs)."""
    names = cat.get("keypoints")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        yield "bad_value", f"keypoints {_short(names)} is not a list of names"
        return
    skeleton = cat.get("skeleton")
    if skeleton is not None:
        k = len(names) if isinstance(names, list) else None
        ok = isinstance(skeleton, list) and all(
            isinstance(p, list) and len(p) == 2 and all(is_int(j) and j >= 1 and (k is None or j <= k) for j in p)
            for p in skeleton
        )
        if not ok:
            yield "bad_value", f"skeleton {_short(skeleton)} is not a list of [i, j] keypoint pairs (1-based)"


def keypoint_counts(categories: Iterable[Mapping[str, Any]]) -> dict[Any, int | None]:
    """Category id -> number of keypoints it declares (None when it declares none)."""
    return {c["id"]: len(c["keypoints"]) if isinstance(c.get("keypoints"), list) else None for c in categories}


def image_problems(img: Mapping[str, Any], *, need_file: bool = True) -> Iterator[Issue]:
    """Problems of an image entry: its size (and ``file_name``'s type when ``need_file``)."""
    h, w = img.get("height"), img.get("width")
    if not (is_int(h) and is_int(w) and h > 0 and w > 0):
        yield "bad_value", f"height/width {_short(h)}/{_short(w)} are not positive integers"
    else:
        limit = PIL.Image.MAX_IMAGE_PIXELS
        if max(h, w) > MAX_IMAGE_SIDE:
            yield "bad_value", f"height/width {h}/{w}: a side above {MAX_IMAGE_SIDE} pixels"
        elif limit is not None and h * w > limit:
            yield "bad_value", (
                f"{w}x{h} is {h * w} pixels, more than Pillow's decompression-bomb limit "
                f"PIL.Image.MAX_IMAGE_PIXELS = {limit}"
            )
    if need_file:
        name = img.get("file_name")
        if not isinstance(name, str) or not name or "\x00" in name:
            yield "bad_value", f"file_name {_short(name)} is not a file name"


def image_size(img: Mapping[str, Any] | None) -> tuple[int, int] | None:
    """(height, width) of a valid image entry, else None."""
    if img is None:
        return None
    h, w = img.get("height"), img.get("width")
    return (int(h), int(w)) if is_int(h) and is_int(w) and h > 0 and w > 0 else None


def image_path_problem(file_name: str) -> str | None:
    """Why ``file_name`` is not a path inside the image folder (absolute, or ``..`` leaving it), or None."""
    if os.path.isabs(file_name):
        return f"file_name {file_name!r} is an absolute path"
    norm = os.path.normpath(file_name)
    if norm == os.pardir or norm.startswith(os.pardir + os.sep):
        return f"file_name {file_name!r} leaves the image folder with '..'"
    return None


def image_path(root: str | Path, file_name: str, *, allow_outside: bool = False, source: str | Path = "") -> Path:
    """``root / file_name``; a :class:`DatasetError` when it points outside ``root`` and ``allow_outside``
    is off. Checked on the name, not the file system: a symlink someone placed inside the folder is
    that folder's owner's choice, a name in a downloaded JSON is not."""
    problem = None if allow_outside else image_path_problem(file_name)
    if problem is not None:
        raise DatasetError(
            f"{source or root}: {problem}; images are read only from inside {root} "
            "(set data.allow_outside_images=true to allow it)"
        )
    return Path(root) / file_name


# --------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------


def _inside_padded(xs: Sequence[float], ys: Sequence[float], size: tuple[int, int]) -> bool:
    h, w = size
    return -w <= min(xs) and max(xs) <= 2 * w and -h <= min(ys) and max(ys) <= 2 * h


def _padded_text(size: tuple[int, int]) -> str:
    h, w = size
    return f"x in [{-w}, {2 * w}], y in [{-h}, {2 * h}] (the {w}x{h} image padded by its size)"


def bbox_problems(box: Any, size: tuple[int, int] | None) -> Iterator[Issue]:
    """Problems of a ``[x, y, width, height]`` box on an image of ``size`` (h, w; None when unknown)."""
    if not (isinstance(box, list) and len(box) == 4 and _all_finite_numbers(box)):
        yield "bad_value", f"bbox {_short(box)} is not [x, y, width, height] of finite numbers"
        return
    x, y, bw, bh = box
    if size is not None and not _inside_padded((x, x + bw), (y, y + bh), size):
        yield "bad_value", f"bbox {_short(box)} reaches outside {_padded_text(size)}"
        return
    if bw < 1 or bh < 1:
        yield "degenerate_box", f"bbox {box} is {bw:g} x {bh:g} pixels"
    if size is not None:
        h, w = size
        if x < -1 or y < -1 or x + bw > w + 1 or y + bh > h + 1:
            yield "box_outside_image", f"bbox {box} outside the {w}x{h} image"


def _boundary(poly: Sequence[float]) -> float:
    """The boundary length pycocotools rasterises: the sum over the closed polygon's edges of max(|dx|, |dy|)."""
    p = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    d = np.abs(p - np.roll(p, -1, axis=0))
    return float(d.max(axis=1).sum())


def polygon_problems(seg: list[Any], size: tuple[int, int] | None) -> Iterator[Issue]:
    """Problems of a list of polygons ``[[x1, y1, x2, y2, ...], ...]`` on an image of ``size``."""
    kept = []
    for j, poly in enumerate(seg):
        if not isinstance(poly, list):
            yield "bad_segmentation", f"polygon {j} is a {type(poly).__name__}, not a list of x, y numbers"
            return
        if len(poly) % 2:
            yield "bad_segmentation", f"polygon {j} has an odd number of values ({len(poly)}); expected x, y pairs"
            return
        if not _all_finite_numbers(poly):
            bad = _first_non_number(poly)
            yield "bad_segmentation", f"polygon {j} value {bad} is {_short(poly[bad])}, not a finite number"
            return
        if len(poly) < 6:
            yield "short_polygon", f"polygon {j} has {len(poly) // 2} point(s)"
            continue
        if size is not None and not _inside_padded(poly[0::2], poly[1::2], size):
            yield "bad_segmentation", f"polygon {j} has points outside {_padded_text(size)}"
            return
        kept.append(poly)
    # Inside the padded image no edge is longer than 3 x its long side: measure only when that could add up.
    bound = sum(len(p) // 2 for p in kept) * 3 * max(size) if size is not None else math.inf
    if bound > MAX_POLYGON_BOUNDARY and sum(_boundary(p) for p in kept) > MAX_POLYGON_BOUNDARY:
        yield "bad_segmentation", (
            f"the polygons' boundary is longer than {MAX_POLYGON_BOUNDARY} pixels "
            "(pycocotools' memory grows with it; simplify the polygons)"
        )


def compressed_rle_runs(counts: str | bytes) -> np.ndarray | str:
    """The run lengths a compressed COCO RLE string decodes to (int64), or why pycocotools cannot decode
    it safely. The format: each run is a signed little-endian number in 5-bit groups, a character
    ``48 + group`` with 0x20 marking that more groups follow; from the fourth run on, each is stored as
    the difference to the run two before."""
    if isinstance(counts, str):
        if not counts.isascii():
            return "counts has non-ASCII characters"
        counts = counts.encode("ascii")
    c = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, dtype=np.int64)
    if c.min() < 0 or c.max() > 63:
        return "counts has characters outside pycocotools' alphabet '0'..'o'"
    more = (c & 0x20) != 0
    if more[-1]:
        return "counts ends inside a run"
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > RLE_MAX_CHARS_PER_RUN:
        return f"counts has a run of more than {RLE_MAX_CHARS_PER_RUN} characters"
    shift = 5 * (np.arange(c.size) - np.repeat(starts, lengths))
    values = np.add.reduceat((c & 0x1F) << shift, starts)
    negative = (c[ends] & 0x10) != 0
    values = np.where(negative, values - (np.int64(1) << (5 * lengths)), values)
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def rle_problem(seg: Mapping[str, Any], size: tuple[int, int] | None, *, compressed_only: bool = False) -> str | None:
    """Why an RLE ``{size: [h, w], counts}`` cannot be decoded safely on an image of ``size``, or None."""
    rle_size = seg["size"]
    if not (isinstance(rle_size, list) and len(rle_size) == 2 and all(is_int(v) and v > 0 for v in rle_size)):
        return f"RLE size {_short(rle_size)} is not [height, width]"
    h, w = rle_size
    if size is not None and (h, w) != tuple(size):
        return f"RLE size {rle_size} but the image is {list(size)} (height, width)"
    limit = PIL.Image.MAX_IMAGE_PIXELS
    if limit is not None and h * w > limit:
        return f"RLE size {rle_size} is more than PIL.Image.MAX_IMAGE_PIXELS = {limit} pixels"
    counts = seg["counts"]
    if isinstance(counts, str | bytes):
        runs = compressed_rle_runs(counts)
        if isinstance(runs, str):
            return runs
        if runs.size and runs.min() < 0:
            return "counts decodes to a negative run"
        total = int(runs.sum())
    elif isinstance(counts, list) and not compressed_only:
        if not all(is_int(v) or (isinstance(v, float) and v.is_integer()) for v in counts) or (counts and min(counts) < 0):
            return "uncompressed counts must be non-negative integers"
        total = int(sum(counts))
    else:
        want = "a compressed string" if compressed_only else "a compressed string or a list of run lengths"
        return f"RLE counts is a {type(counts).__name__}, not {want}"
    if total != h * w:
        return f"RLE runs add up to {total} pixels, not height x width = {h * w}"
    return None


def segmentation_problems(seg: Any, size: tuple[int, int] | None) -> Iterator[Issue]:
    """Problems of a segmentation: polygons, or an RLE (compressed or not). ``[]`` / ``None`` (box-only
    data) are fine."""
    if seg is None or seg == []:
        return
    if isinstance(seg, list):
        yield from polygon_problems(seg, size)
    elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
        problem = rle_problem(seg, size)
        if problem:
            yield "bad_segmentation", problem
    else:
        yield "bad_segmentation", f"segmentation {_short(seg)} is neither a polygon list nor an RLE with 'counts' and 'size'"


def keypoint_problems(
    kps: Any, num_keypoints: int | None, size: tuple[int, int] | None, box: Sequence[float] | None
) -> Iterator[Issue]:
    """Problems of a keypoints list ``[x1, y1, v1, ...]`` (``num_keypoints``: K of its category, when known)."""
    expected = f"{3 * num_keypoints}" if num_keypoints else "3 K"
    if not isinstance(kps, list) or len(kps) % 3 or (num_keypoints and len(kps) != 3 * num_keypoints):
        n = len(kps) if isinstance(kps, list) else type(kps).__name__
        yield "bad_keypoints", f"{n} keypoint values, expected {expected} numbers"
        return
    if not _all_finite_numbers(kps):
        bad = _first_non_number(kps)
        yield "bad_keypoints", f"keypoint {bad // 3} value {_short(kps[bad])} is not a finite number"
        return
    xs, ys, vs = kps[0::3], kps[1::3], kps[2::3]
    bad_v = next((j for j, v in enumerate(vs) if v not in (0, 1, 2)), None)
    if bad_v is not None:
        yield "bad_keypoints", f"keypoint {bad_v} has visibility {vs[bad_v]!r}; expected 0, 1 or 2"
        return
    if size is not None and xs and not _inside_padded(xs, ys, size):
        yield "bad_keypoints", f"keypoints outside {_padded_text(size)}"
        return
    if box is not None:
        bx, by, bw, bh = box
        t = KEYPOINT_BOX_TOLERANCE
        for j, (x, y, v) in enumerate(zip(xs, ys, vs)):
            if v > 0 and not (bx - t <= x <= bx + bw + t and by - t <= y <= by + bh + t):
                yield "keypoint_outside_box", f"keypoint {j} at ({x:g}, {y:g}) outside box {list(box)}"


def _lookup(mapping: Mapping[Any, Any], key: Any) -> Any:
    try:
        return mapping.get(key)
    except TypeError:  # unhashable (a list or object as an id)
        return None


def annotation_where(ann: Any, index: int) -> str:
    """How messages name an annotation: by its id, else by its position."""
    if isinstance(ann, dict) and "id" in ann:
        return f"annotation id {_short(ann['id'])}" + (f" (image {_short(ann['image_id'])})" if "image_id" in ann else "")
    return f"annotation #{index}"


def annotation_problems(
    ann: Any,
    images: Mapping[Any, Mapping[str, Any]],
    keypoints_of: Mapping[Any, int | None],
    required: Sequence[str] = ("image_id", "category_id", "bbox"),
) -> Iterator[Issue]:
    """Every problem of one annotation: required fields, references to ``images`` / categories
    (``keypoints_of``: category id -> K), box, area, iscrowd, segmentation, keypoints."""
    if not isinstance(ann, dict):
        yield "bad_value", f"is a {type(ann).__name__}, not an object"
        return
    missing = [f for f in required if f not in ann]
    if missing:
        yield "missing_field", f"has no {', '.join(repr(m) for m in missing)}"
        return
    img = _lookup(images, ann["image_id"])
    if img is None:
        yield "unknown_image_id", f"unknown image_id {_short(ann['image_id'])}; it is not in 'images'"
    cat_id = ann["category_id"]
    if not _has(keypoints_of, cat_id):
        known = sorted(keypoints_of, key=str)
        shown = ", ".join(map(str, known[:20])) + (", ..." if len(known) > 20 else "")
        yield "unknown_category_id", f"unknown category_id {_short(cat_id)}; known ids: {shown}"
    size = image_size(img)
    missing = [f for f in ("iscrowd", "segmentation", "area") if f not in ann]
    if missing:
        yield "missing_optional_field", f"no {', '.join(repr(m) for m in missing)}"
    crowd = ann.get("iscrowd", 0)
    if crowd not in (0, 1):
        yield "bad_value", f"iscrowd {_short(crowd)} is not 0 or 1"
    box_issues = list(bbox_problems(ann["bbox"], size))
    yield from box_issues
    box = ann["bbox"] if not any(is_error(k) for k, _ in box_issues) else None
    if "area" in ann and not (is_number(ann["area"]) and ann["area"] >= 0):
        yield "bad_value", f"area {_short(ann['area'])} is not a finite non-negative number"
    if "segmentation" in ann:
        yield from segmentation_problems(ann["segmentation"], size)
    if "keypoints" in ann:
        yield from keypoint_problems(ann["keypoints"], _lookup(keypoints_of, cat_id), size, box)
        labelled = _labelled(ann["keypoints"])
        n = ann.get("num_keypoints")
        if labelled is not None and n is not None and n != labelled:
            yield "num_keypoints_mismatch", f"num_keypoints {_short(n)} but {labelled} have v>0"


def _has(mapping: Mapping[Any, Any], key: Any) -> bool:
    try:
        return key in mapping
    except TypeError:
        return False


def _labelled(kps: Any) -> int | None:
    if not (isinstance(kps, list) and len(kps) % 3 == 0 and _all_finite_numbers(kps)):
        return None
    return sum(1 for v in kps[2::3] if v > 0)


# --------------------------------------------------------------------------------------------------
# After the fact: the data behind a non-finite loss
# --------------------------------------------------------------------------------------------------


def _bad_rows(target: Mapping[str, Any]) -> Iterator[tuple[int, str]]:
    """(row, what) of a training target's instances with non-finite or empty geometry."""
    boxes = target.get("boxes")
    if boxes is not None and len(boxes):
        b = np.asarray(boxes.detach().cpu().double() if hasattr(boxes, "detach") else boxes, dtype=np.float64)
        for j in np.flatnonzero(~np.isfinite(b).all(axis=1)):
            yield int(j), f"box {b[j].tolist()} is not finite"
        for j in np.flatnonzero((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])):
            yield int(j), f"box {b[j].tolist()} is empty after resizing"
    kps = target.get("keypoints")
    if kps is not None and len(kps):
        k = np.asarray(kps.detach().cpu().double() if hasattr(kps, "detach") else kps, dtype=np.float64)
        for j in np.flatnonzero(~np.isfinite(k.reshape(len(k), -1)).all(axis=1)):
            yield int(j), "keypoints are not finite"


def describe_batch_data(batches: Sequence[Any], dataset: Any) -> str:
    """What a non-finite loss can blame on the data of ``batches`` (``Batch`` es of ``dataset``, a
    ``CocoDetection``): the first image, file and annotation id whose target geometry is not finite or
    empty, or, when every target is sound, which images the batch held."""
    ids: list[int] = []
    for batch in batches:
        images = batch.images
        for i, (image_id, target) in enumerate(zip(batch.image_ids, batch.targets)):
            ids.append(int(image_id))
            index = dataset.image_ids.index(image_id)
            found = next(_bad_rows(target), None)
            if found is None and images.is_floating_point() and not bool(images[i].isfinite().all()):
                found = (-1, "its pixels are not finite")
            if found is not None:
                row, what = found
                ann = f" annotation id {dataset.annotation_ids(index)[row]}" if row >= 0 else ""
                return f"data: image id {image_id} ({dataset.image_path(index)}){ann}: {what}"
    return f"the batch's images (ids {ids}) have finite, non-empty targets"
