"""Fault injection: a tiny valid COCO dataset to break, and a memory-limited subprocess to break it in.

``write_dataset(root)`` writes two 32x40 PNGs and ``annotations.json`` with categories 1 ``shape`` and
2 ``person`` (3 keypoints) and annotations 1 (polygon), 2 (compressed RLE), 3 (uncompressed RLE) and 4 (a
person: polygon and keypoints). ``run_harness(cases)`` runs ``harness.py`` on them in a subprocess whose
address space is limited to what it uses after importing torch plus 1 GiB, so that pycocotools' C code
crashing (negative exit status) or exhausting memory shows up as a failed case, not a dead pytest.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

H, W = 32, 40
HARNESS = Path(__file__).with_name("harness.py")
REPO = Path(__file__).resolve().parents[2]


def _rle(x0: int, y0: int, x1: int, y1: int) -> tuple[dict[str, Any], dict[str, Any], int]:
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    compressed = mask_utils.encode(np.asfortranarray(m))
    flat = m.flatten(order="F")  # COCO runs go down columns and start with a (possibly empty) run of zeros
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = ([0] if flat[0] else []) + np.diff(bounds).tolist()
    return (
        {"size": [H, W], "counts": compressed["counts"].decode("ascii")},
        {"size": [H, W], "counts": runs},
        int(m.sum()),
    )


def base_coco() -> dict[str, Any]:
    """The valid dataset every case breaks one thing of."""
    compressed, _, a2 = _rle(20, 4, 30, 14)
    _, uncompressed, a3 = _rle(5, 10, 25, 20)
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "height": H, "width": W},
            {"id": 2, "file_name": "b.png", "height": H, "width": W},
        ],
        "categories": [
            {"id": 1, "name": "shape"},
            {"id": 2, "name": "person", "keypoints": ["head", "left_hand", "right_hand"], "skeleton": [[1, 2], [1, 3]]},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2.0, 2.0, 10.0, 8.0], "area": 80.0, "iscrowd": 0,
             "segmentation": [[2.0, 2.0, 12.0, 2.0, 12.0, 10.0, 2.0, 10.0]]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20.0, 4.0, 10.0, 10.0], "area": a2, "iscrowd": 0,
             "segmentation": compressed},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [5.0, 10.0, 20.0, 10.0], "area": a3, "iscrowd": 0,
             "segmentation": uncompressed},
            {"id": 4, "image_id": 2, "category_id": 2, "bbox": [28.0, 4.0, 8.0, 24.0], "area": 192.0, "iscrowd": 0,
             "segmentation": [[28.0, 4.0, 36.0, 4.0, 36.0, 28.0, 28.0, 28.0]],
             "keypoints": [32, 6, 2, 29, 16, 2, 35, 16, 1], "num_keypoints": 3},
        ],
    }  # fmt: skip


def write_images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(folder / name)
    return folder


def write_dataset(root: Path, data: dict[str, Any] | None = None, name: str = "annotations.json") -> Path:
    """``data`` (default: :func:`base_coco`) as ``root/name`` next to ``root/images/{a,b}.png``."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "images").is_dir():
        write_images(root / "images")
    path = root / name
    path.write_text(json.dumps(base_coco() if data is None else data))
    return path


def with_annotation(ann_id: int, **fields: Any) -> dict[str, Any]:
    """The base dataset with annotation ``ann_id``'s ``fields`` replaced."""
    data = copy.deepcopy(base_coco())
    ann = next(a for a in data["annotations"] if a["id"] == ann_id)
    ann.update(fields)
    return data


def perfect_results(data: dict[str, Any], task: str) -> list[dict[str, Any]]:
    """COCO results equal to the (valid) ground truth ``data`` for ``task``."""
    gt = {a["id"]: a for a in base_coco()["annotations"]}
    out = []
    for a in data["annotations"]:
        src = gt[a["id"]]
        r = {"image_id": src["image_id"], "category_id": src["category_id"], "score": 1.0, "bbox": src["bbox"]}
        if task == "segm":
            seg = src["segmentation"]
            if isinstance(seg, dict) and isinstance(seg["counts"], str):
                r["segmentation"] = seg
            else:
                rle = mask_utils.frPyObjects(seg, H, W)
                rle = mask_utils.merge(rle) if isinstance(rle, list) else rle
                r["segmentation"] = {"size": [H, W], "counts": rle["counts"].decode("ascii")}
            del r["bbox"]
        elif task == "keypoints":
            if "keypoints" not in src:
                continue
            r["keypoints"] = src["keypoints"]
        out.append(r)
    return out


def run_harness(
    cases: list[dict[str, Any]], tmp_path: Path, extra_gib: float = 1.0, timeout: float = 240, allow_death: bool = False
) -> dict[str, dict]:
    """Runs ``harness.py`` on ``cases`` in a memory-limited subprocess; returns name -> outcome.

    Fails the test, naming the case being run, if the subprocess dies (a segfault, an abort, the memory
    limit) or times out; with ``allow_death`` (the harness's own test) it returns ``"__death__"``:
    ``{"rc", "case"}`` instead.
    """
    manifest = tmp_path / "cases.json"
    manifest.write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MEGDET_HARNESS_EXTRA_GIB": str(extra_gib)}
    proc = subprocess.run(
        [sys.executable, str(HARNESS), str(manifest)], capture_output=True, text=True, timeout=timeout, env=env
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    started = [ln["name"] for ln in lines if ln.get("event") == "start"]
    outcomes = {ln["name"]: ln for ln in lines if ln.get("event") == "done"}
    if proc.returncode != 0:
        last = started[-1] if started else "(before the first case)"
        if not allow_death:
            pytest.fail(f"harness died with status {proc.returncode} in case {last!r}: {proc.stderr[-2000:]}")
        outcomes["__death__"] = {"rc": proc.returncode, "case": last}
    return outcomes


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path: Path, rows: Iterable[bytes], width: int, height: int, bit_depth: int, color_type: int) -> Path:
    """A PNG written by hand from raw scanlines (filter byte included), compressed as they stream by:
    for what Pillow does not write (48-bit RGB) and for images too big to hold (decompression bombs)."""
    z = zlib.compressobj(1)
    data = b"".join(z.compress(r) for r in rows) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))
    return path


def write_bomb(path: Path, side: int = 12_000) -> Path:
    """A valid all-black greyscale PNG of side x side pixels (144 M at the default: more than Pillow's
    MAX_IMAGE_PIXELS, less than twice it, so Pillow itself would only warn and decode it) in about 150 kB."""
    row = bytes(side + 1)
    return write_png(path, (row for _ in range(side)), side, side, 8, 0)
