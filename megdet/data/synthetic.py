"""The embedded synthetic dataset: a small, learnable stand-in for COCO 2017 in COCO's own format.

Six shape categories (ids 1..6) and a stick-figure ``person`` (id 7) with the 17 COCO keypoints are
drawn on cluttered backgrounds. Objects overlap: each annotation describes only what is visible
(mask = visible pixels, box = tight box of that mask, area = its pixel count) and objects less
than ~30% visible are left unannotated, as COCO annotators would. The layout and every field match
real COCO, so the same code trains and evaluates on either::

    out_dir/train/000000000001.png ...
    out_dir/val/000100000001.png ...
    out_dir/annotations/instances_{train,val}.json          # boxes + masks, all 7 categories
    out_dir/annotations/person_keypoints_{train,val}.json   # persons only, with keypoints

With ``stuff=True`` the background is made of "stuff" regions instead of one gradient: textured
ground, brick walls and sky gradients (categories 8..10), and every image gets a label map in
COCO-Stuff's layout (pixel = category id - 1: things 0..6, stuff 7..9; 255 where an object too
hidden to be annotated shows), next to a COCO-Stuff style stuff file::

    out_dir/stuffthingmaps/{train,val}/000000000001.png ...
    out_dir/annotations/stuff_{train,val}.json              # one RLE per (image, stuff class)

Generation is deterministic: image ``i`` of a split draws from its own RNG seeded by
``(seed, split, i)``, so the files are byte-identical whatever the number of worker processes.
"""

from __future__ import annotations

import json
import math
import multiprocessing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image, ImageDraw
from tqdm import tqdm

from megdet.data.layout import COCO_KEYPOINT_NAMES, COCO_SKELETON, SplitFiles, split_files
from megdet.files import write_json_atomic

SHAPE_NAMES: tuple[str, ...] = ("circle", "triangle", "rectangle", "star", "ring", "cross")
PERSON_CATEGORY_ID = 7
_SPLITS = ("train", "val")
# Image and annotation ids of the val split start here so that ids are unique across splits (as in
# COCO) while each split's ids stay independent of the other split's size.
_VAL_ID_OFFSET = 100_000_000
_MAX_IMAGES = 10_000_000

# COCO area thresholds; object size targets are defined at a 256-pixel long side and scaled.
_SMALL, _LARGE = 32**2, 96**2
_REF_SIZE = 256
_MIN_VISIBLE_FRACTION = 0.3
_MIN_VISIBLE_PIXELS = 20

# Background "stuff" classes of stuff=True datasets: category ids after the things, label id = id - 1.
STUFF_NAMES: tuple[str, ...] = ("ground", "wall", "sky")
_GROUND, _WALL, _SKY = (PERSON_CATEGORY_ID + 1 + i for i in range(len(STUFF_NAMES)))  # category ids 8, 9, 10
_UNLABELLED = 255

# Part labels of the per-object label canvas (0 = not the object).
_BODY, _HEAD, _TORSO, _ARMS, _LEGS, _EYES = 1, 2, 3, 4, 5, 6


def categories() -> list[dict[str, Any]]:
    """The seven categories as they appear in ``instances_*.json`` (person carries keypoint names/skeleton)."""
    cats: list[dict[str, Any]] = [
        {"supercategory": "shape", "id": i + 1, "name": name} for i, name in enumerate(SHAPE_NAMES)
    ]
    cats.append(_person_category())
    return cats


def stuff_categories() -> list[dict[str, Any]]:
    """The stuff categories of a ``stuff=True`` dataset as ``stuff_*.json`` lists them (ids 8, 9, 10)."""
    return [{"supercategory": name, "id": cat, "name": name} for cat, name in zip((_GROUND, _WALL, _SKY), STUFF_NAMES)]


def _person_category() -> dict[str, Any]:
    return {
        "supercategory": "person",
        "id": PERSON_CATEGORY_ID,
        "name": "person",
        "keypoints": list(COCO_KEYPOINT_NAMES),
        "skeleton": [list(p) for p in COCO_SKELETON],
    }


# ----------------------------------------------------------------------------------------------
# Object geometry: every object is rendered once into a small local label canvas; placement then
# only moves that canvas by whole pixels, and colours are chosen once the place is known.
# ----------------------------------------------------------------------------------------------


class _Obj:
    """One object to be composed: its local label canvas and, for persons, local keypoints."""

    __slots__ = ("category_id", "labels", "mask", "full_area", "keypoints", "hidden", "ox", "oy", "colour")

    def __init__(self, category_id: int, labels: np.ndarray, keypoints: np.ndarray | None = None,
                 hidden: np.ndarray | None = None) -> None:
        self.category_id = category_id
        self.labels = labels
        self.mask = labels > 0
        self.full_area = int(self.mask.sum())
        self.keypoints = keypoints  # (17, 2) continuous local coordinates
        self.hidden = hidden  # (17,) bool: self-occluded (the far ear of a turned head)
        self.ox = 0
        self.oy = 0
        self.colour = np.zeros(3, np.float32)


def _rot(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]])


def _canvas(points: np.ndarray, margin: float, frac: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Shifts ``points`` into a local canvas with ``margin`` pixels around them; returns points and (h, w)."""
    lo = points.min(axis=0) - margin
    local = points - lo + frac
    w, h = (np.ceil(points.max(axis=0) - lo + margin + 1.0)).astype(int)
    return local, (int(h), int(w))


def _pil(points: np.ndarray) -> list[tuple[float, float]]:
    # COCO pixel (c, r) covers [c, c+1) x [r, r+1); PIL fills pixel (c, r) when its integer
    # coordinate (c, r) is inside, so shift by half a pixel to test pixel centres.
    return [(float(x) - 0.5, float(y) - 0.5) for x, y in points]


def _regular(n: int, radius: float, start: float = -math.pi / 2) -> np.ndarray:
    a = start + np.arange(n) * (2 * math.pi / n)
    return np.stack([np.cos(a), np.sin(a)], axis=1) * radius


def _shape_outline(rng: np.random.Generator, cat: int) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Outline (and hole) of a shape of circumradius 1, and the shape's area relative to that radius^2."""
    if cat == 1:  # circle
        return _regular(48, 1.0), None, math.pi
    if cat == 2:  # triangle: near-equilateral with a little jitter so triangles are not all identical
        a = -math.pi / 2 + np.arange(3) * (2 * math.pi / 3) + rng.uniform(-0.15, 0.15, 3)
        r = rng.uniform(0.85, 1.0, 3)
        pts = np.stack([np.cos(a) * r, np.sin(a) * r], axis=1)
        x, y = pts[:, 0], pts[:, 1]
        return pts, None, 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
    if cat == 3:  # rectangle: aspect 0.45..1 (a square is a rectangle too)
        t = math.atan(rng.uniform(0.45, 1.0))
        a, b = math.cos(t), math.sin(t)
        return np.array([[-a, -b], [a, -b], [a, b], [-a, b]]), None, 4 * a * b
    if cat == 4:  # five-pointed star
        inner = rng.uniform(0.38, 0.5)
        pts = _regular(10, 1.0)
        pts[1::2] *= inner
        return pts, None, 5 * inner * math.sin(math.pi / 5)
    if cat == 5:  # ring
        inner = rng.uniform(0.45, 0.62)
        return _regular(48, 1.0), _regular(48, inner), math.pi * (1 - inner**2)
    # cross (plus sign)
    w = rng.uniform(0.17, 0.24)
    e = 1.0 / math.hypot(1.0, w)  # arm ends inside the unit circle
    q = w * e
    pts = np.array([[-q, -e], [q, -e], [q, -q], [e, -q], [e, q], [q, q], [q, e], [-q, e], [-q, q],
                    [-e, q], [-e, -q], [-q, -q]])  # fmt: skip
    return pts, None, 4 * (2 * q * (e - q)) + (2 * q) ** 2


def _make_shape(rng: np.random.Generator, cat: int, area: float) -> _Obj:
    outline, hole, unit_area = _shape_outline(rng, cat)
    radius = math.sqrt(area / unit_area)
    rot = _rot(rng.uniform(0, 2 * math.pi))
    pts = outline @ rot.T * radius
    local, (h, w) = _canvas(pts, 2.0, rng.uniform(0, 1, 2))
    offset = local[0] - pts[0]
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    draw.polygon(_pil(local), fill=_BODY)
    if hole is not None:
        draw.polygon(_pil(hole @ rot.T * radius + offset), fill=0)
    return _Obj(cat, np.asarray(img))


def _make_person(rng: np.random.Generator, hgt: float) -> _Obj:
    """A stick figure ``hgt`` pixels tall, random pose, the 17 COCO keypoints placed anatomically.

    Body frame: hip centre at the origin, y pointing down, the person facing the viewer, so the
    person's left side (COCO ``left_*``) is at +x, on the image's right, as in a frontal photo.
    """
    rh = 0.085 * hgt  # head radius
    kp = np.zeros((17, 2))
    sh_y, sh_x, hip_x = -0.30 * hgt, 0.12 * hgt * rng.uniform(0.9, 1.1), 0.085 * hgt
    kp[5], kp[6] = (sh_x, sh_y), (-sh_x, sh_y)
    kp[11], kp[12] = (hip_x, 0.0), (-hip_x, 0.0)
    neck = np.array([0.0, sh_y])
    head = np.array([rng.uniform(-0.02, 0.02) * hgt, sh_y - 0.04 * hgt - rh])

    def limb(start: np.ndarray, a1: float, a2: float, l1: float, l2: float, side: int) -> tuple[np.ndarray, ...]:
        # Angles are measured from straight down, positive away from the body's midline.
        j1 = start + l1 * np.array([side * math.sin(a1), math.cos(a1)])
        j2 = j1 + l2 * np.array([side * math.sin(a2), math.cos(a2)])
        return j1, j2

    for side, (s, e, w) in ((1, (5, 7, 9)), (-1, (6, 8, 10))):
        a1 = rng.uniform(math.radians(8), math.radians(150))
        a2 = a1 + rng.uniform(math.radians(-100), math.radians(80))
        kp[e], kp[w] = limb(kp[s], a1, a2, 0.16 * hgt, 0.15 * hgt, side)
    for side, (hp, k, a) in ((1, (11, 13, 15)), (-1, (12, 14, 16))):
        b1 = rng.uniform(math.radians(-4), math.radians(40))
        b2 = b1 + rng.uniform(math.radians(-35), math.radians(35))
        kp[k], kp[a] = limb(kp[hp], b1, b2, 0.24 * hgt, 0.23 * hgt, side)

    # Face: turning the head (yaw) moves eyes and nose sideways and hides the far ear.
    yaw = rng.uniform(-0.6, 0.6)
    kp[0] = head + rh * np.array([0.5 * yaw, 0.2])
    kp[1] = head + rh * np.array([0.38 + 0.45 * yaw, -0.18])
    kp[2] = head + rh * np.array([-0.38 + 0.45 * yaw, -0.18])
    kp[3] = head + rh * np.array([0.88, 0.0])
    kp[4] = head + rh * np.array([-0.88, 0.0])
    hidden = np.zeros(17, bool)
    hidden[4] = yaw > 0.35  # facing towards its left: the right ear turns away
    hidden[3] = yaw < -0.35

    # Mostly upright; sometimes lying or tumbling. Rotation keeps left/right chirality intact.
    theta = rng.normal(0, math.radians(12)) if rng.random() < 0.9 else rng.choice([-1, 1]) * rng.uniform(1.0, 2.0)
    rot = _rot(theta)
    lw = max(2.0, 0.075 * hgt)  # limb thickness
    torso = np.array([kp[5] * [1.15, 1.0], kp[6] * [1.15, 1.0], kp[12] * [1.25, 1.0] + [0, 0.03 * hgt],
                      kp[11] * [1.25, 1.0] + [0, 0.03 * hgt]])  # fmt: skip
    head_ring = _regular(32, rh) + head
    pts = np.concatenate([kp, torso, head_ring, neck[None]]) @ rot.T
    local, (h, w) = _canvas(pts, lw + 2.0, rng.uniform(0, 1, 2))
    kpl, torso_l, head_l, neck_l = local[:17], local[17:21], local[21:53], local[53]
    head_c = head_l.mean(axis=0)

    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    width = int(round(lw))

    def stroke(chain: list[np.ndarray], label: int) -> None:
        draw.line(_pil(np.stack(chain)), fill=label, width=width)
        for p in chain:  # round joints and ends
            (x, y), r = _pil(p[None])[0], lw / 2
            draw.ellipse((x - r, y - r, x + r, y + r), fill=label)

    stroke([kpl[11], kpl[13], kpl[15]], _LEGS)
    stroke([kpl[12], kpl[14], kpl[16]], _LEGS)
    draw.polygon(_pil(torso_l), fill=_TORSO)
    stroke([neck_l, head_c], _TORSO)
    stroke([kpl[5], kpl[7], kpl[9]], _ARMS)
    stroke([kpl[6], kpl[8], kpl[10]], _ARMS)
    draw.polygon(_pil(head_l), fill=_HEAD)
    if rh >= 4:  # eyes as dots: they make the face orientation (and the eye keypoints) visible
        er = max(0.8, 0.14 * rh)
        for e in (kpl[1], kpl[2]):
            x, y = _pil(e[None])[0]
            draw.ellipse((x - er, y - er, x + er, y + er), fill=_EYES)
    return _Obj(PERSON_CATEGORY_ID, np.asarray(img), keypoints=kpl, hidden=hidden)


# ----------------------------------------------------------------------------------------------
# Colours, textures, background
# ----------------------------------------------------------------------------------------------


def _distinct_colour(rng: np.random.Generator, avoid: list[np.ndarray], camouflage: bool) -> np.ndarray:
    """A colour far from every colour in ``avoid``; with ``camouflage`` one close to the first of them."""
    if camouflage:
        d = rng.normal(size=3)
        return np.clip(avoid[0] + d / np.linalg.norm(d) * rng.uniform(30, 50), 0, 255).astype(np.float32)
    best, best_d = None, -1.0
    for _ in range(24):
        c = rng.uniform(0, 255, 3)
        d = min(float(np.linalg.norm(c - a)) for a in avoid)
        if d >= 100:
            return c.astype(np.float32)
        if d > best_d:
            best, best_d = c, d
    return np.asarray(best, np.float32)


def _texture(rng: np.random.Generator, h: int, w: int, colour: np.ndarray) -> np.ndarray:
    """An (h, w, 3) float fill around ``colour``: solid, stripes, gradient or speckle."""
    kind = rng.random()
    if kind < 0.55:
        return np.broadcast_to(colour, (h, w, 3))
    d = rng.normal(size=3)
    other = np.clip(colour + d / np.linalg.norm(d) * rng.uniform(35, 70), 0, 255)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, math.pi)
    t = xx * math.cos(a) + yy * math.sin(a)
    if kind < 0.75:  # stripes
        t = (np.floor(t / rng.uniform(3, 10)) % 2)[..., None]
    elif kind < 0.9:  # gradient
        t = ((t - t.min()) / max(float(t.max() - t.min()), 1.0))[..., None]
    else:  # speckle
        return np.clip(colour + rng.normal(0, 18, (h, w, 3)), 0, 255)
    return colour * (1 - t) + other * t


def _background(rng: np.random.Generator, h: int, w: int, scale: float, base: np.ndarray | None = None) -> np.ndarray:
    """Gradient background (or ``base``, (h, w, 3) uint8) with clutter (thin strokes, irregular faint
    blobs) that is not an object."""
    if base is not None:
        bg = base
    else:
        ca = rng.uniform(0, 255, 3).astype(np.float32)
        cb = rng.uniform(0, 255, 3).astype(np.float32)
        if rng.random() < 0.5:  # many real backgrounds are fairly flat
            cb = np.clip(ca + rng.normal(0, 25, 3), 0, 255).astype(np.float32)
        a = rng.uniform(0, 2 * math.pi)
        tx = np.arange(w, dtype=np.float32) * np.float32(math.cos(a))
        ty = np.arange(h, dtype=np.float32) * np.float32(math.sin(a))
        t = ty[:, None, None] + tx[None, :, None]
        lo, hi = float(t.min()), float(t.max())
        t = (t - np.float32(lo)) * np.float32(1.0 / max(hi - lo, 1.0))
        bg = (ca + (cb - ca) * t).astype(np.uint8)
    img = Image.fromarray(bg)
    draw = ImageDraw.Draw(img)
    mean = bg.reshape(-1, 3).mean(axis=0)
    for _ in range(rng.integers(0, 4)):  # blobs: smooth irregular outlines, near the background colour
        n = 12
        r = rng.uniform(6, 30) * scale * (1 + 0.35 * np.sin(np.arange(n) * 2 * math.pi / n * rng.integers(2, 4)
                                                          + rng.uniform(0, 6)) + rng.uniform(-0.2, 0.2, n))
        ang = np.arange(n) * (2 * math.pi / n)
        c = rng.uniform([0, 0], [w, h])
        pts = c + np.stack([np.cos(ang) * r, np.sin(ang) * r], axis=1)
        col = np.clip(mean + rng.normal(0, 1, 3) * rng.uniform(20, 45), 0, 255)
        draw.polygon(_pil(pts), fill=tuple(int(v) for v in col))
    for _ in range(rng.integers(0, 6)):  # strokes: thin polylines
        pts = rng.uniform([0, 0], [w, h]) + np.cumsum(rng.normal(0, 0.25 * min(h, w), (rng.integers(2, 5), 2)), axis=0)
        if rng.random() < 0.5:
            col = np.clip(mean + rng.normal(0, 1, 3) * rng.uniform(30, 70), 0, 255)
        else:
            col = rng.uniform(0, 255, 3)
        draw.line(_pil(pts), fill=tuple(int(v) for v in col), width=int(rng.integers(1, 4)))
    return np.asarray(img).astype(np.float32)


def _sky(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth vertical gradient: a saturated colour at the top, paler towards the horizon."""
    if rng.random() < 0.75:  # day
        top = np.array([rng.uniform(30, 120), rng.uniform(90, 170), rng.uniform(180, 255)])
    else:  # dusk
        top = np.array([rng.uniform(150, 230), rng.uniform(70, 140), rng.uniform(60, 150)])
    bottom = top + (255 - top) * rng.uniform(0.35, 0.75)
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None] ** np.float32(rng.uniform(0.6, 1.6))
    return np.broadcast_to(top * (1 - t) + bottom * t, (h, w, 3)).astype(np.float32)


def _wall(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Bricks in staggered rows, each a little different, with mortar lines between them."""
    palettes = ([150, 60, 45], [170, 160, 150], [200, 180, 140], [110, 110, 120])
    base = np.asarray(palettes[int(rng.integers(len(palettes)))], np.float32) + rng.normal(0, 12, 3)
    mortar = np.clip(base + rng.choice([-1, 1]) * rng.uniform(45, 80), 0, 255)
    bh = rng.uniform(5, 11) * scale
    bw = bh * rng.uniform(1.8, 2.8)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    row = np.floor(yy / bh)
    shifted = xx + (row % 2) * (bw / 2)
    col = np.floor(shifted / bw)
    jitter = rng.normal(0, 10, (int(row.max()) + 1, int(col.max()) + 2)).astype(np.float32)
    bricks = base + jitter[row.astype(int), col.astype(int)][..., None]
    line = max(1.0, 0.15 * bh)
    joints = ((yy - row * bh) < line) | ((shifted - col * bw) < line)
    return np.clip(np.where(joints[..., None], mortar, bricks), 0, 255).astype(np.float32)


def _ground(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Grass, earth or gravel: a base colour with blotchy low-frequency and grainy high-frequency noise."""
    palettes = ([70, 120, 50], [120, 90, 60], [130, 125, 115], [160, 140, 100])
    base = np.asarray(palettes[int(rng.integers(len(palettes)))], np.float32) + rng.normal(0, 10, 3)
    coarse = rng.normal(0, 1, (max(2, h // 24), max(2, w // 24), 3)).astype(np.float32)
    blotches = np.asarray(Image.fromarray(coarse[..., 0]).resize((w, h), Image.Resampling.BICUBIC))
    grain = rng.normal(0, 1, (h, w, 3)).astype(np.float32)
    return np.clip(base + 22 * blotches[..., None] + 14 * grain, 0, 255).astype(np.float32)


def _stuff(rng: np.random.Generator, h: int, w: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """A background of stuff regions and its labels: ground under a tilted horizon and sky or a wall
    above it (sometimes a building-like wall in front of the sky); some images are all ground or all wall."""
    labels = np.full((h, w), _GROUND - 1, np.uint8)
    layout = rng.random()
    if layout < 0.1:
        labels[:] = _WALL - 1
    elif layout >= 0.2:
        xx = np.arange(w, dtype=np.float32)
        horizon = h * rng.uniform(0.3, 0.7) + rng.uniform(-0.15, 0.15) * (xx - w / 2)
        above = np.arange(h, dtype=np.float32)[:, None] < horizon[None, :]
        labels[above] = (_SKY if rng.random() < 0.7 else _WALL) - 1
        if labels[above].size and labels[above][0] == _SKY - 1 and rng.random() < 0.5:
            x0, x1 = np.sort(rng.uniform(0, w, 2))
            top = h * rng.uniform(0.05, 0.5)
            building = above & (xx[None, :] >= x0) & (xx[None, :] < x1) & (np.arange(h)[:, None] >= top)
            labels[building] = _WALL - 1
    image = np.empty((h, w, 3), np.float32)
    for cat, fill in ((_GROUND, lambda: _ground(rng, h, w)), (_WALL, lambda: _wall(rng, h, w, scale)),
                      (_SKY, lambda: _sky(rng, h, w))):  # fmt: skip
        region = labels == cat - 1
        if region.any():
            image[region] = fill()[region]
    return image, labels


def _stuff_annotations(labels: np.ndarray) -> list[dict[str, Any]]:
    """COCO-Stuff style annotations of a label map: one RLE per stuff class present (ids without ``id``)."""
    anns = []
    for cat in (_GROUND, _WALL, _SKY):
        region = labels == cat - 1
        if not region.any():
            continue
        rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
        rle = mask_utils.encode(np.asfortranarray(region.view(np.uint8)))
        anns.append({
            "category_id": cat,
            "bbox": [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)],
            "area": int(region.sum()),
            "segmentation": {"size": list(labels.shape), "counts": rle["counts"].decode("ascii")},
            "iscrowd": 0,
        })  # fmt: skip
    return anns


# ----------------------------------------------------------------------------------------------
# One image
# ----------------------------------------------------------------------------------------------


def _sample_objects(rng: np.random.Generator, h: int, w: int, scale: float) -> list[_Obj]:
    n = int(rng.integers(1, 9))
    n_person = 0
    if rng.random() < 0.45:
        n_person = 1 + int(rng.random() < 0.2 and n > 1)
    s2 = scale * scale
    # Crowded images: once the objects would cover most of the image, further ones are made to fit
    # what is left, so that most objects stay visible.
    budget = 1.0 * h * w * (1 - 0.2 * n_person)
    objs = []
    for _ in range(n - n_person):
        u = rng.random()  # most objects medium or large so that the data is learnable quickly
        lo, hi = (150, _SMALL) if u < 0.12 else ((_SMALL, _LARGE) if u < 0.5 else (_LARGE, 28000))
        area = min(math.exp(rng.uniform(math.log(lo), math.log(hi))) * s2, 0.35 * h * w)
        if area > budget:
            area = max(budget * rng.uniform(0.4, 0.9), 400 * s2)
        budget -= area
        objs.append(_make_shape(rng, int(rng.integers(1, 7)), area))
    for _ in range(n_person):
        lo, hi = (32, 60) if rng.random() < 0.08 else (64, 210)
        height = min(math.exp(rng.uniform(math.log(lo), math.log(hi))) * scale, 0.95 * max(h, w))
        objs.append(_make_person(rng, height))
    # Larger objects tend to be drawn first (behind), with enough randomness that small ones and
    # persons are occluded too.
    keys = [o.full_area * rng.uniform(0.4, 1.6) for o in objs]
    return [objs[i] for i in np.argsort(keys, kind="stable")[::-1]]


def _place(rng: np.random.Generator, obj: _Obj, idmap: np.ndarray, visible: list[int], full: list[int]) -> None:
    """Picks a position: mostly inside the image, not hiding too much of the objects already there."""
    h, w = idmap.shape
    lh, lw = obj.mask.shape
    best, best_score = (0, 0), -1.0
    for _ in range(16):
        ox = int(rng.integers(-lw // 4, max(w - 3 * lw // 4, -lw // 4 + 1)))
        oy = int(rng.integers(-lh // 4, max(h - 3 * lh // 4, -lh // 4 + 1)))
        x0, y0, x1, y1 = max(ox, 0), max(oy, 0), min(ox + lw, w), min(oy + lh, h)
        if x1 <= x0 or y1 <= y0:
            continue
        m = obj.mask[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
        inside = int(m.sum()) / max(obj.full_area, 1)
        covered = np.bincount(idmap[y0:y1, x0:x1][m], minlength=len(visible) + 1)[1:]
        ratios = [(v - c) / f for v, c, f in zip(visible, covered, full)]
        score = min([inside / 0.85] + [r / 0.75 for r in ratios])
        if score >= 1.0:
            best = (ox, oy)
            break
        if score > best_score:
            best, best_score = (ox, oy), score
    obj.ox, obj.oy = best


_Job = tuple[int, int, int, int, str, str | None]
_Rendered = tuple[int, int, list[dict[str, Any]], list[dict[str, Any]]]


def _render_one(job: _Job) -> _Rendered:
    """Draws image ``idx`` of split ``split_id``, writes its PNG (and, with a ``label_path``, its stuff
    background and label map) and returns (h, w, annotations, stuff annotations), without ids."""
    seed, split_id, idx, image_size, path, label_path = job
    rng = np.random.default_rng([seed, split_id, idx])
    short = int(round(image_size * rng.uniform(0.6, 1.0)))
    h, w = (short, image_size) if rng.random() < 0.5 else (image_size, short)
    scale = image_size / _REF_SIZE
    img, stuff_labels = _start_image(rng, h, w, scale, with_stuff=label_path is not None)
    objs = _sample_objects(rng, h, w, scale)
    idmap, visible = _compose(rng, img, objs)
    _save_noisy(rng, img, path)
    annotated = [_is_annotated(v, obj.full_area) for v, obj in zip(visible, objs)]
    anns = [_annotation(obj, k, idmap, visible[k - 1])
            for k, obj in enumerate(objs, start=1) if annotated[k - 1]]  # fmt: skip
    if stuff_labels is None:
        return h, w, anns, []
    assert label_path is not None
    labels = _label_map(objs, annotated, idmap, stuff_labels)
    Image.fromarray(labels).save(label_path, compress_level=1)
    return h, w, anns, _stuff_annotations(labels)


def _start_image(
    rng: np.random.Generator, h: int, w: int, scale: float, with_stuff: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """The background to draw objects on and, ``with_stuff``, the stuff label map under it."""
    if not with_stuff:
        return _background(rng, h, w, scale), None
    stuff_image, stuff_labels = _stuff(rng, h, w, scale)
    img = _background(rng, h, w, scale, base=np.clip(stuff_image + 0.5, 0, 255).astype(np.uint8))
    return img, stuff_labels


def _compose(rng: np.random.Generator, img: np.ndarray, objs: list[_Obj]) -> tuple[np.ndarray, list[int]]:
    """Places and paints ``objs`` into ``img`` back to front; returns the id map (object ``k`` = k,
    0 = background) and each object's visible pixel count."""
    h, w = img.shape[:2]
    idmap = np.zeros((h, w), np.int16)
    visible: list[int] = []
    full: list[int] = []
    for k, obj in enumerate(objs, start=1):
        _place(rng, obj, idmap, visible, full)
        lh, lw = obj.mask.shape
        x0, y0, x1, y1 = max(obj.ox, 0), max(obj.oy, 0), min(obj.ox + lw, w), min(obj.oy + lh, h)
        ys, xs = slice(y0, y1), slice(x0, x1)
        lab = obj.labels[y0 - obj.oy : y1 - obj.oy, x0 - obj.ox : x1 - obj.ox]
        m = lab > 0
        under = idmap[ys, xs][m]
        # Avoid the colour of what the object covers (background and overlapped objects), except
        # for a minority of camouflaged objects.
        avoid = [img[ys, xs][m].mean(axis=0) if m.any() else img.mean(axis=(0, 1))]
        avoid += [objs[j - 1].colour for j in np.unique(under) if j > 0]
        fill = _paint(rng, obj, lab, avoid)
        img[ys, xs][m] = fill[m]
        counts = np.bincount(under, minlength=len(visible) + 1)[1:]
        visible = [v - int(c) for v, c in zip(visible, counts)]
        idmap[ys, xs][m] = k
        visible.append(int(m.sum()))
        full.append(obj.full_area)
    return idmap, visible


def _paint(rng: np.random.Generator, obj: _Obj, lab: np.ndarray, avoid: list[np.ndarray]) -> np.ndarray:
    """Picks ``obj.colour`` (and a person's part colours) away from ``avoid``; returns the fill of ``lab``."""
    camo = rng.random() < 0.12
    obj.colour = _distinct_colour(rng, avoid, camo)
    if obj.category_id != PERSON_CATEGORY_ID:
        return _texture(rng, *lab.shape, obj.colour)
    fill = np.empty((*lab.shape, 3), np.float32)
    skin = _distinct_colour(rng, avoid, camo)
    legs = _distinct_colour(rng, avoid, camo)
    arms = obj.colour if rng.random() < 0.5 else skin
    eyes = np.full(3, 20.0 if skin.mean() > 110 else 235.0, np.float32)
    for part, col in ((_HEAD, skin), (_TORSO, obj.colour), (_ARMS, arms), (_LEGS, legs), (_EYES, eyes)):
        fill[lab == part] = col
    return fill


def _save_noisy(rng: np.random.Generator, img: np.ndarray, path: str) -> None:
    """Adds sensor noise to ``img`` (in place) and writes it as an 8-bit PNG."""
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(1.5, 6.0))
    np.clip(img + np.float32(0.5), 0, 255, out=img)
    # Z_RLE (compress_type 3) skips most of zlib's match search: several times faster than the
    # default on noisy images and no larger.
    Image.fromarray(img.astype(np.uint8)).save(path, compress_level=1, compress_type=3)


def _is_annotated(visible: int, full: int) -> bool:
    """Whether an object with ``visible`` of its ``full`` pixels showing is annotated (not mostly hidden)."""
    return visible >= max(_MIN_VISIBLE_PIXELS, _MIN_VISIBLE_FRACTION * full)


def _annotation(obj: _Obj, k: int, idmap: np.ndarray, visible: int) -> dict[str, Any]:
    """The COCO annotation (without ids) of object ``k``: visible mask, tight box, a person's keypoints."""
    h, w = idmap.shape
    vis = idmap == k
    rows, cols = np.flatnonzero(vis.any(axis=1)), np.flatnonzero(vis.any(axis=0))
    bx, by, bw, bh = int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)
    rle = mask_utils.encode(np.asfortranarray(vis.view(np.uint8)))
    ann: dict[str, Any] = {
        "category_id": obj.category_id,
        "bbox": [float(bx), float(by), float(bw), float(bh)],
        "area": int(visible),
        "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
        "iscrowd": 0,
    }
    if obj.keypoints is not None:
        ann["keypoints"], ann["num_keypoints"] = _keypoints(obj, k, idmap, (bx, by, bw, bh))
    return ann


def _label_map(
    objs: list[_Obj], annotated: list[bool], idmap: np.ndarray, stuff_labels: np.ndarray
) -> np.ndarray:
    """The COCO-Stuff style label map: things by category (annotated objects), 255 where an
    unannotated, mostly hidden object shows, the stuff labels elsewhere."""
    thing = [obj.category_id - 1 if ok else _UNLABELLED for obj, ok in zip(objs, annotated)]
    lut = np.array([0, *thing], np.uint8)
    return np.where(idmap > 0, lut[idmap], stuff_labels).astype(np.uint8)


def _keypoints(obj: _Obj, k: int, idmap: np.ndarray, box: tuple[int, int, int, int]) -> tuple[list[float], int]:
    """COCO keypoint triplets: v=2 visible, v=1 hidden under a later object (or the far ear), v=0 not labelled."""
    h, w = idmap.shape
    bx, by, bw, bh = box
    assert obj.keypoints is not None and obj.hidden is not None
    out: list[float] = []
    n = 0
    for (lx, ly), hid in zip(obj.keypoints, obj.hidden):
        x, y = float(lx + obj.ox), float(ly + obj.oy)
        v = 0
        if 0 <= x < w and 0 <= y < h:
            v = 1 if hid or idmap[int(y), int(x)] > k else 2
            if not (bx <= x <= bx + bw and by <= y <= by + bh):
                # Outside the visible extent: a visible point just off a rasterised edge is snapped
                # in; a hidden one beyond the box is not labelled (v=0), keeping v>0 inside the box.
                cx, cy = min(max(x, bx), bx + bw), min(max(y, by), by + bh)
                if v == 2 and math.hypot(cx - x, cy - y) <= 1.5:
                    x, y = cx, cy
                else:
                    v = 0
        if v == 0:
            x = y = 0.0
        else:
            n += 1
        out += [round(x, 2), round(y, 2), v]
    return out, n


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_json_atomic(path, data, separators=(",", ":"))


def _results(pool: Any, workers: int, jobs: list[_Job]) -> Iterator[_Rendered]:
    if pool is None:
        return map(_render_one, jobs)
    # Ordered imap: results arrive in image order whatever the worker count, keeping ids stable.
    return pool.imap(_render_one, jobs, chunksize=max(1, min(16, len(jobs) // (8 * workers))))


def generate_synthetic_coco(
    out_dir: str | Path,
    num_train: int = 1000,
    num_val: int = 200,
    image_size: int = 256,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
    stuff: bool = False,
) -> dict[str, Any]:
    """Writes the synthetic dataset in COCO 2017 layout under ``out_dir`` and returns per-split statistics.

    ``image_size`` is the long side of every image; the short side is 0.6..1.0 of it, in either
    orientation. The same ``seed`` gives byte-identical files for any ``workers``; files of the
    same names are overwritten, other files in ``out_dir`` are left alone. Returns
    ``{"train": {...}, "val": {...}}`` with ``images``, ``annotations``, ``persons``,
    ``per_category`` (name -> count) and ``sizes`` (small/medium/large by COCO area thresholds).
    ``stuff``: stuff backgrounds and label maps (module docstring); the summary then also has
    ``stuff_fraction`` (stuff name -> fraction of all pixels).
    """
    _check_arguments(num_train=num_train, num_val=num_val, image_size=image_size, workers=workers, seed=seed)
    header = _header(seed, image_size)
    summary: dict[str, Any] = {}
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        for split_id, split in enumerate(_SPLITS):
            num = num_train if split == "train" else num_val
            files = split_files(Path(out_dir), split)
            images, anns, stuff_anns = _render_split(
                pool, workers, files, split_id, split, num, seed=seed, image_size=image_size, stuff=stuff,
                progress=progress,
            )  # fmt: skip
            _write_split(files, header, images, anns, stuff_anns if stuff else None)
            summary[split] = _split_summary(num, images, anns, stuff_anns if stuff else None)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return summary


def _check_arguments(num_train: Any, num_val: Any, image_size: Any, workers: Any, seed: Any) -> None:
    """Raises ValueError naming the first argument of :func:`generate_synthetic_coco` out of range."""
    for name, value in (("num_train", num_train), ("num_val", num_val)):
        if not isinstance(value, int) or value < 0 or value > _MAX_IMAGES:
            raise ValueError(f"generate_synthetic_coco: {name} must be an integer in 0..{_MAX_IMAGES}, got {value!r}")
    if not isinstance(image_size, int) or image_size < 64:
        raise ValueError(f"generate_synthetic_coco: image_size must be an integer >= 64 (the long side), got {image_size!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"generate_synthetic_coco: workers must be an integer >= 1, got {workers!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"generate_synthetic_coco: seed must be a non-negative integer, got {seed!r}")


def _header(seed: int, image_size: int) -> dict[str, Any]:
    """The ``info`` and ``licenses`` fields every annotation file of the dataset starts with."""
    info = {
        "description": f"megdet synthetic COCO-format dataset (seed {seed}, long side {image_size})",
        "url": "",
        "version": "1.0",
        "year": 2017,
        "contributor": "megdet",
        "date_created": "2017/09/01",
    }
    return {"info": info, "licenses": [{"url": "", "id": 1, "name": "generated data, no restrictions"}]}


def _render_split(
    pool: Any, workers: int, files: SplitFiles, split_id: int, split: str, num: int, *, seed: int,
    image_size: int, stuff: bool, progress: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Renders the ``num`` images of ``split`` into ``files``; returns their image entries, annotations
    and stuff annotations, with COCO ids (val ids start at ``_VAL_ID_OFFSET + 1``)."""
    offset = _VAL_ID_OFFSET if split == "val" else 0
    files.images.mkdir(parents=True, exist_ok=True)
    if stuff:
        files.label_maps.mkdir(parents=True, exist_ok=True)
    image_ids = [offset + i + 1 for i in range(num)]
    jobs: list[_Job] = [
        (seed, split_id, i, image_size, str(files.images / f"{iid:012d}.png"),
         str(files.label_maps / f"{iid:012d}.png") if stuff else None)
        for i, iid in enumerate(image_ids)
    ]  # fmt: skip
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    stuff_anns: list[dict[str, Any]] = []
    results = tqdm(_results(pool, workers, jobs), total=num, desc=f"synthetic {split}", disable=not progress,
                   unit="img")  # fmt: skip
    for iid, (h, w, img_anns, img_stuff) in zip(image_ids, results):
        images.append({"license": 1, "file_name": f"{iid:012d}.png", "height": h, "width": w, "id": iid})
        for a in img_anns:
            anns.append({"id": offset + len(anns) + 1, "image_id": iid, **a})
        for a in img_stuff:
            stuff_anns.append({"id": offset + len(stuff_anns) + 1, "image_id": iid, **a})
    return images, anns, stuff_anns


def _write_split(
    files: SplitFiles, header: dict[str, Any], images: list[dict[str, Any]], anns: list[dict[str, Any]],
    stuff_anns: list[dict[str, Any]] | None,
) -> None:
    """Writes a split's instances and person_keypoints files and, and, with ``stuff_anns``, the stuff file."""
    persons = [a for a in anns if a["category_id"] == PERSON_CATEGORY_ID]
    instances = [{k: v for k, v in a.items() if k not in ("keypoints", "num_keypoints")} for a in anns]
    base = {**header, "images": images}
    _write_json(files.instances, {**base, "annotations": instances, "categories": categories()})
    _write_json(files.keypoints, {**base, "annotations": persons, "categories": [_person_category()]})
    if stuff_anns is not None:
        _write_json(files.stuff, {**base, "annotations": stuff_anns, "categories": stuff_categories()})


def _split_summary(
    num: int,
    images: list[dict[str, Any]],
    anns: list[dict[str, Any]],
    stuff_anns: list[dict[str, Any]] | None,
) -> dict[str, Any]:
    """A split's statistics as :func:`generate_synthetic_coco` returns them."""
    names = {c["id"]: c["name"] for c in categories()}
    persons = [a for a in anns if a["category_id"] == PERSON_CATEGORY_ID]
    sizes = {"small": 0, "medium": 0, "large": 0}
    for a in anns:
        sizes["small" if a["area"] < _SMALL else "medium" if a["area"] < _LARGE else "large"] += 1
    per_cat = {n: 0 for n in names.values()}
    for a in anns:
        per_cat[names[a["category_id"]]] += 1
    summary: dict[str, Any] = {
        "images": num,
        "annotations": len(anns),
        "persons": len(persons),
        "images_with_person": len({a["image_id"] for a in persons}),
        "per_category": per_cat,
        "sizes": sizes,
    }
    if stuff_anns is not None:
        pixels = max(1, sum(im["height"] * im["width"] for im in images))
        summary["stuff_fraction"] = {
            c["name"]: sum(a["area"] for a in stuff_anns if a["category_id"] == c["id"]) / pixels
            for c in stuff_categories()
        }
    return summary


def ensure_synthetic_coco(
    out_dir: str | Path,
    num_train: int = 1000,
    num_val: int = 200,
    image_size: int = 256,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
    stuff: bool = False,
) -> bool:
    """:func:`generate_synthetic_coco` into ``out_dir`` unless the dataset there was made with the same
    settings (recorded in ``out_dir/synth.json``); returns True when it generated."""
    out_dir = Path(out_dir)
    stamp = out_dir / "synth.json"
    want = {"generator": "megdet.data.synthetic", "num_train": num_train, "num_val": num_val,
            "image_size": image_size, "seed": seed}  # fmt: skip
    if stuff:  # only then: the stamps of datasets made before stuff existed stay valid
        want["stuff"] = True
    if stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == want:
                return False
        except ValueError:
            pass  # unreadable stamp: regenerate
    generate_synthetic_coco(out_dir, num_train=num_train, num_val=num_val, image_size=image_size, seed=seed,
                            workers=workers, progress=progress, stuff=stuff)  # fmt: skip
    _write_json(stamp, want)  # atomic: a stamp exists only for a finished dataset
    return True
