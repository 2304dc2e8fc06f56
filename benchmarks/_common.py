"""Shared helpers for the benchmark scripts in this folder.

Timing (median of repeated calls), plain-text tables, the JSON results file
(``benchmarks/results/NAME.json``, with a description of the machine), Linux peak-RSS probes, and the
synthetic detection batch several benchmarks train on. The scripts run as ``python benchmarks/NAME.py``,
so this module is imported as ``_common`` (the script's folder is first on ``sys.path``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from megdet.files import write_text_atomic

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo ("unknown" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, load, memory, library versions, date (UTC)."""
    import torch
    import torchvision

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        info["load_average_1m_5m_15m"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    total = proc_meminfo_mb("MemTotal")
    if total is not None:
        info["memory_total_mb"] = round(total)
    return info


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def time_calls(fn: Callable[[], Any], *, repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    if repeats < 1:
        raise ValueError(f"time_calls: repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summarize_times(seconds: Sequence[float]) -> dict[str, float | int]:
    """Median, min, max and count of a list of durations (seconds)."""
    if not seconds:
        raise ValueError("summarize_times: no measurements")
    return {
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "n": len(seconds),
    }


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return "-" if value is None else str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: a header line, a rule, then one line per row (floats rounded for reading)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"format_table: a row has {len(row)} cells for {len(headers)} headers")
        widths = [max(w, len(c)) for w, c in zip(widths, row)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Prints ``title`` and the table under it."""
    print(f"\n{title}\n{format_table(headers, rows)}", flush=True)


def write_results(name: str, payload: dict[str, Any], results_dir: Path | None = None) -> Path:
    """Writes ``{"benchmark": name, "machine": machine_info(), **payload}`` to ``results/NAME.json``."""
    out_dir = results_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    data = {"benchmark": name, "machine": machine_info(), **payload}
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")  # a reader never sees half a file


# --------------------------------------------------------------------------------------------------
# Memory probes (Linux)
# --------------------------------------------------------------------------------------------------


def _proc_kb_field_mb(path: str, key: str) -> float | None:
    # "Key:   1234 kB" lines, as /proc/self/status and /proc/meminfo write them.
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def proc_status_mb(key: str) -> float | None:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``...) in MiB; None where unavailable."""
    return _proc_kb_field_mb("/proc/self/status", key)


def proc_meminfo_mb(key: str) -> float | None:
    """A ``kB`` field of /proc/meminfo (``MemTotal``, ``MemAvailable``...) in MiB; None where unavailable."""
    return _proc_kb_field_mb("/proc/meminfo", key)


def reset_peak_rss() -> bool:
    """Resets this process's peak resident set size (``VmHWM``) to its current RSS.

    Writing "5" to /proc/self/clear_refs does that (Linux >= 4.0), so ``VmHWM`` read afterwards is the
    exact peak (kept by the kernel, not sampled) since this call. Returns False where unsupported.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def return_freed_memory_to_os(threshold_bytes: int = 256 * 1024) -> bool:
    """Makes glibc malloc serve every allocation of at least ``threshold_bytes`` with its own mmap.

    By default glibc raises its mmap threshold dynamically, after which freed tensors stay in the heap
    and RSS no longer falls when they are freed: RSS before a step then includes dead memory and the
    peak RSS of a step says little about what the step needs. With a fixed threshold (setting it
    disables the dynamic raise), a freed tensor's pages go back to the OS at once, so RSS follows the
    live tensors. Returns False where glibc's ``mallopt`` is not available.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_mmap_threshold = -3  # from <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, threshold_bytes))
    except (OSError, AttributeError):
        return False


# --------------------------------------------------------------------------------------------------
# Synthetic training inputs
# --------------------------------------------------------------------------------------------------


def synthetic_batch(
    *,
    num_images: int,
    height: int,
    width: int,
    num_classes: int,
    boxes_per_image: int = 8,
    size_divisibility: int = 32,
    with_masks: bool = False,
    num_keypoints: int = 0,
    person_label: int | None = None,
    seed: int = 0,
) -> Any:
    """A :class:`megdet.data.loader.Batch` of random images with random boxes, made in memory.

    Images are normal noise of ``height`` x ``width`` zero-padded to a multiple of
    ``size_divisibility``; each has ``boxes_per_image`` boxes of 32 px to half the image side, labels
    uniform in 1..num_classes. With ``with_masks`` each box's mask is the box rectangle; with
    ``num_keypoints`` > 0 the instances labelled ``person_label`` get that many visible keypoints inside
    their box (the others all zeros, as the data pipeline gives them). Deterministic in ``seed``.
    """
    import torch

    from megdet.data.loader import Batch

    if num_images < 1 or height < 64 or width < 64:
        raise ValueError(f"synthetic_batch: need >= 1 image of >= 64x64 px, got {num_images} of {height}x{width}")
    g = torch.Generator().manual_seed(seed)
    ph = -(-height // size_divisibility) * size_divisibility
    pw = -(-width // size_divisibility) * size_divisibility
    images = torch.zeros(num_images, 3, ph, pw)
    images[:, :, :height, :width] = torch.randn(num_images, 3, height, width, generator=g)
    targets = []
    for _ in range(num_images):
        side = torch.empty(boxes_per_image, 2).uniform_(32, min(height, width) / 2, generator=g)
        x1 = torch.rand(boxes_per_image, generator=g) * (width - side[:, 0])
        y1 = torch.rand(boxes_per_image, generator=g) * (height - side[:, 1])
        boxes = torch.stack([x1, y1, x1 + side[:, 0], y1 + side[:, 1]], dim=1)
        labels = torch.randint(1, num_classes + 1, (boxes_per_image,), generator=g)
        if person_label is not None:
            labels[0] = person_label  # at least one person per image for the keypoint head
        target: dict[str, torch.Tensor] = {"boxes": boxes, "labels": labels}
        if with_masks:
            masks = torch.zeros(boxes_per_image, height, width, dtype=torch.uint8)
            for i, (a, b, c, d) in enumerate(boxes.round().long().tolist()):
                masks[i, b:d, a:c] = 1
            target["masks"] = masks
        if num_keypoints > 0:
            u = torch.rand(boxes_per_image, num_keypoints, 2, generator=g)
            kp = torch.zeros(boxes_per_image, num_keypoints, 3)
            kp[..., 0] = boxes[:, None, 0] + u[..., 0] * (boxes[:, None, 2] - boxes[:, None, 0])
            kp[..., 1] = boxes[:, None, 1] + u[..., 1] * (boxes[:, None, 3] - boxes[:, None, 1])
            kp[..., 2] = 2.0
            kp[labels != person_label] = 0.0
            target["keypoints"] = kp
        targets.append(target)
    return Batch(
        images=images,
        image_sizes=[(height, width)] * num_images,
        original_sizes=[(height, width)] * num_images,
        image_ids=list(range(num_images)),
        targets=targets,
    )
