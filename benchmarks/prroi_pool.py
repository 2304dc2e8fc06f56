"""Precise RoI Pooling against torchvision RoIAlign: forward + backward time on FPN-realistic inputs.

Both run through :class:`megdet.modeling.poolers.MultiLevelPooler` on the SAME inputs -- the
``prroi`` pooler (our pure-PyTorch ``prroi_pool``) and the ``roialign`` pooler
(``torchvision.ops.roi_align(aligned=True, sampling_ratio=2)``) -- so both pay the same FPN level
assignment and reordering. One call is: forward, ``loss = output.sum()``, backward to the features.

Settings: 256-channel P2..P5 maps (strides 4..32) of a batch of 2 images at 800x1333 (padded to a
multiple of 32, as the data pipeline does) and at 512x512; 512 RoIs per image drawn like real
proposals (square-root area log-uniform in 16..512 px, aspect ratio log-uniform in 0.5..2, centres
uniform, clipped to the image); 7x7 (box head) and 14x14 (mask/keypoint head) outputs.

The machine is shared, so the two implementations are interleaved (the order alternates every
round) and the medians of wall-clock and process CPU time are reported. Threads: ``--threads``
(default 2); torchvision's CPU RoIAlign kernel itself is single-threaded. OpenMP's default
busy-waiting makes every parallel op of an oversubscribed machine wait for a descheduled thread
(measured here: 2-4x the CPU time of PrRoIPool's parallel ops at a load average of 6-9 on 2 cores,
while the single-threaded RoIAlign is unaffected), so unless OMP_WAIT_POLICY is already set this
script sets it to PASSIVE; run ``OMP_WAIT_POLICY= python benchmarks/prroi_pool.py`` (empty: the
OpenMP runtime's default) or ``OMP_WAIT_POLICY=ACTIVE ...`` to see the busy-wait numbers. The
policy used is printed and recorded.

    python benchmarks/prroi_pool.py [--quick] [--threads 2]

Prints a table, writes benchmarks/results/prroi_pool.json.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from typing import Any

# Must precede the first import of torch (OpenMP reads it when the runtime starts).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from _common import print_table, write_results  # noqa: E402

from megdet.modeling.poolers import MultiLevelPooler, assign_levels  # noqa: E402

STRIDES = (4, 8, 16, 32)
IMPLS = ("prroi", "roialign")


def make_inputs(
    height: int, width: int, num_images: int, rois_per_image: int, channels: int, seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """FPN feature maps (leaves that require grad) and proposal-like boxes per image."""
    g = torch.Generator().manual_seed(seed)
    ph, pw = -(-height // 32) * 32, -(-width // 32) * 32
    features = [
        torch.randn(num_images, channels, ph // s, pw // s, generator=g).requires_grad_(True) for s in STRIDES
    ]
    boxes = []
    for _ in range(num_images):
        n = rois_per_image
        size = torch.exp(torch.empty(n).uniform_(math.log(16), math.log(512), generator=g))
        ratio = torch.exp(torch.empty(n).uniform_(math.log(0.5), math.log(2.0), generator=g))
        bw, bh = size * ratio.sqrt(), size / ratio.sqrt()
        cx, cy = torch.rand(n, generator=g) * width, torch.rand(n, generator=g) * height
        b = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=1)
        b[:, 0::2] = b[:, 0::2].clamp(0, width)
        b[:, 1::2] = b[:, 1::2].clamp(0, height)
        boxes.append(b)
    return features, boxes


def fwd_bwd(pooler: MultiLevelPooler, features: list[torch.Tensor], boxes: list[torch.Tensor]) -> None:
    for f in features:
        f.grad = None
    pooler(features, boxes).sum().backward()


def measure(
    poolers: dict[str, MultiLevelPooler],
    features: list[torch.Tensor],
    boxes: list[torch.Tensor],
    repeats: int,
    warmup: int,
) -> dict[str, dict[str, list[float]]]:
    """Interleaved rounds; each round runs every implementation once, alternating the order."""
    for _ in range(warmup):
        for name in IMPLS:
            fwd_bwd(poolers[name], features, boxes)
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in IMPLS}
    for r in range(repeats):
        for name in IMPLS if r % 2 == 0 else IMPLS[::-1]:
            w0, c0 = time.perf_counter(), time.process_time()
            fwd_bwd(poolers[name], features, boxes)
            times[name]["cpu"].append(time.process_time() - c0)
            times[name]["wall"].append(time.perf_counter() - w0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one measured round, no warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--rois-per-image", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats, warmup = (1, 0) if args.quick else (5, 1)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {repeats} rounds (+{warmup} warm-up), "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY'] or '(empty: runtime default)'}",
        flush=True,
    )

    settings = [("800x1333", 800, 1333), ("512x512", 512, 512)]
    rows: list[list[Any]] = []
    results: list[dict[str, Any]] = []
    for label, height, width in settings:
        features, boxes = make_inputs(height, width, 2, args.rois_per_image, 256, seed=0)
        scales = [1.0 / s for s in STRIDES]
        per_level = torch.bincount(assign_levels(torch.cat(boxes), 2, 5), minlength=4).tolist()
        for out_size in (7, 14):
            poolers = {
                name: MultiLevelPooler(out_size, scales, sampling_ratio=2, pooler_type=name) for name in IMPLS
            }
            times = measure(poolers, features, boxes, repeats, warmup)
            med = {name: {k: statistics.median(v) for k, v in times[name].items()} for name in IMPLS}
            ratio_wall = med["prroi"]["wall"] / med["roialign"]["wall"]
            ratio_cpu = med["prroi"]["cpu"] / med["roialign"]["cpu"]
            rows.append(
                [
                    label,
                    f"{out_size}x{out_size}",
                    "/".join(map(str, per_level)),
                    med["prroi"]["wall"] * 1e3,
                    med["roialign"]["wall"] * 1e3,
                    ratio_wall,
                    med["prroi"]["cpu"] * 1e3,
                    med["roialign"]["cpu"] * 1e3,
                    ratio_cpu,
                ]
            )
            results.append(
                {
                    "setting": label,
                    "image_size": [height, width],
                    "output_size": out_size,
                    "rois_per_level_p2_p5": per_level,
                    "times_s": times,
                    "median_wall_s": {name: med[name]["wall"] for name in IMPLS},
                    "median_cpu_s": {name: med[name]["cpu"] for name in IMPLS},
                    "ratio_wall_prroi_over_roialign": ratio_wall,
                    "ratio_cpu_prroi_over_roialign": ratio_cpu,
                }
            )
            print(
                f"{label} {out_size}x{out_size}: ratio wall {ratio_wall:.2f}, cpu {ratio_cpu:.2f}", flush=True
            )
        del features, boxes

    headers = [
        "images (2 x, 256 ch)",
        "out",
        "RoIs P2/P3/P4/P5",
        "prroi ms",
        "roi_align ms",
        "ratio",
        "prroi cpu ms",
        "roi_align cpu ms",
        "cpu ratio",
    ]
    print_table(
        f"Forward + backward, medians of {repeats} interleaved rounds, torch threads = {torch.get_num_threads()} "
        "(ratio = prroi / roi_align; < 1 means PrRoIPool is faster)",
        headers,
        rows,
    )
    path = write_results(
        "prroi_pool",
        {
            "description": "MultiLevelPooler forward+backward: prroi (megdet.layers.prroi_pool) vs "
            "roialign (torchvision.ops.roi_align aligned=True, sampling_ratio=2); loss = sum of output",
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
            "repeats": repeats,
            "warmup": warmup,
            "rois_per_image": args.rois_per_image,
            "channels": 256,
            "results": results,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
