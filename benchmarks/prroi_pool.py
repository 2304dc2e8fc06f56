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

CUDA (``--device cuda``): the ``prroi`` pooler takes the fused Triton kernels
(megdet/layers/prroi_pool_triton.py); 800x1333 only by default, float32 and bfloat16 features
(``--dtypes``; ``roialign`` pools bfloat16 in float32, as the pooler does in training). Each call is
timed with CUDA events (GPU time from the first to the last kernel of the call) and with wall-clock
time between two ``torch.cuda.synchronize()`` (which also counts the host's launch overhead and
synchronisations); rounds are interleaved as on CPU, medians reported.

    python benchmarks/prroi_pool.py --device cuda [--dtypes fp32,bf16] [--repeats 20]

Prints a table, writes benchmarks/results/prroi_pool.json (CPU) or prroi_pool_cuda.json (CUDA).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

# Must precede the first import of torch (OpenMP reads it when the runtime starts).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from _common import print_table, write_results  # noqa: E402

from megdet.modeling.poolers import MultiLevelPooler, assign_levels  # noqa: E402

STRIDES = (4, 8, 16, 32)
IMPLS = ("prroi", "roialign")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def _rounds(poolers: dict[str, MultiLevelPooler], features: list[torch.Tensor], boxes: list[torch.Tensor],
            repeats: int, warmup: int) -> Iterator[str]:
    """Runs the warm-up calls, then yields the implementations of ``repeats`` interleaved rounds in call
    order: every implementation once per round, the order alternating between rounds."""
    for _ in range(warmup):
        for name in IMPLS:
            fwd_bwd(poolers[name], features, boxes)
    for r in range(repeats):
        yield from (IMPLS if r % 2 == 0 else IMPLS[::-1])


def measure(
    poolers: dict[str, MultiLevelPooler],
    features: list[torch.Tensor],
    boxes: list[torch.Tensor],
    repeats: int,
    warmup: int,
) -> dict[str, dict[str, list[float]]]:
    """Interleaved rounds; each round runs every implementation once, alternating the order."""
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in IMPLS}
    for name in _rounds(poolers, features, boxes, repeats, warmup):
        w0, c0 = time.perf_counter(), time.process_time()
        fwd_bwd(poolers[name], features, boxes)
        times[name]["cpu"].append(time.process_time() - c0)
        times[name]["wall"].append(time.perf_counter() - w0)
    return times


def measure_cuda(
    poolers: dict[str, MultiLevelPooler],
    features: list[torch.Tensor],
    boxes: list[torch.Tensor],
    repeats: int,
    warmup: int,
) -> dict[str, dict[str, list[float]]]:
    """As :func:`measure` on a GPU: per call the CUDA-event time ("gpu") and the wall-clock time
    between two synchronisations ("wall"), in seconds."""
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "gpu": []} for name in IMPLS}
    for name in _rounds(poolers, features, boxes, repeats, warmup):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        w0 = time.perf_counter()
        start.record()
        fwd_bwd(poolers[name], features, boxes)
        end.record()
        torch.cuda.synchronize()
        times[name]["wall"].append(time.perf_counter() - w0)
        times[name]["gpu"].append(start.elapsed_time(end) / 1e3)
    return times


def parse_size(text: str) -> tuple[int, int]:
    """Parses "800x1333" into (800, 1333)."""
    h, w = text.lower().split("x")
    return int(h), int(w)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line; per-device defaults are filled in (sizes, dtypes, rounds)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) | cuda | cuda:N")
    parser.add_argument(
        "--quick", action="store_true", help="one measured round (CUDA: two), minimal warm-up"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--rois-per-image", type=int, default=512)
    parser.add_argument("--sizes", default=None, help="image sizes HxW, comma-separated "
                        "(CPU: 800x1333,512x512; CUDA: 800x1333)")  # fmt: skip
    parser.add_argument(
        "--dtypes", default=None, help="feature dtypes fp32,bf16,fp16 (CPU: fp32; CUDA: fp32,bf16)"
    )
    parser.add_argument("--output-sizes", default="7,14", help="pooled sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=None, help="measured rounds (CPU 5, CUDA 20)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (CPU 1, CUDA 3)")
    parser.add_argument(
        "--results-dir", default=None, help="where the JSON goes (default benchmarks/results)"
    )
    args = parser.parse_args(argv)
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device must be cpu or cuda[:N], got {args.device}")
    if args.device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:N], got {args.device}")
    cuda = args.device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    args.sizes = [
        parse_size(t) for t in (args.sizes or ("800x1333" if cuda else "800x1333,512x512")).split(",")
    ]
    names = (args.dtypes or ("fp32,bf16" if cuda else "fp32")).split(",")
    unknown = [n for n in names if n not in DTYPES]
    if unknown:
        parser.error(f"--dtypes: unknown {unknown}; choose from {list(DTYPES)}")
    args.dtypes = names
    args.output_sizes = [int(t) for t in args.output_sizes.split(",")]
    quick_repeats, quick_warmup = (2, 1) if cuda else (1, 0)
    default_repeats, default_warmup = (20, 3) if cuda else (5, 1)
    if args.repeats is None:
        args.repeats = quick_repeats if args.quick else default_repeats
    if args.warmup is None:
        args.warmup = quick_warmup if args.quick else default_warmup
    return args


def run_setting(
    args: argparse.Namespace,
    label: str,
    size: tuple[int, int],
    dtype_name: str,
    measure_fn: Callable[..., Any],
) -> tuple[list[list[Any]], list[dict[str, Any]]]:
    """Table rows and JSON records of one image size and dtype, for every output size."""
    height, width = size
    features, boxes = make_inputs(height, width, 2, args.rois_per_image, 256, seed=0)
    dtype = DTYPES[dtype_name]
    features = [f.detach().to(args.device, dtype).requires_grad_(True) for f in features]
    boxes = [b.to(args.device) for b in boxes]
    scales = [1.0 / s for s in STRIDES]
    per_level = torch.bincount(assign_levels(torch.cat(boxes).cpu(), 2, 5), minlength=4).tolist()
    cuda = args.device.type == "cuda"
    second = "gpu" if cuda else "cpu"
    rows, results = [], []
    for out_size in args.output_sizes:
        poolers = {
            name: MultiLevelPooler(out_size, scales, sampling_ratio=2, pooler_type=name) for name in IMPLS
        }
        times = measure_fn(poolers, features, boxes, args.repeats, args.warmup)
        med = {name: {k: statistics.median(v) for k, v in times[name].items()} for name in IMPLS}
        ratio_wall = med["prroi"]["wall"] / med["roialign"]["wall"]
        ratio_second = med["prroi"][second] / med["roialign"][second]
        row = [label, dtype_name, f"{out_size}x{out_size}", "/".join(map(str, per_level))]
        if cuda:  # GPU time first: the number the goal is stated in
            row += [med["prroi"]["gpu"] * 1e3, med["roialign"]["gpu"] * 1e3, ratio_second]
            row += [med["prroi"]["wall"] * 1e3, med["roialign"]["wall"] * 1e3, ratio_wall]
        else:
            row += [med["prroi"]["wall"] * 1e3, med["roialign"]["wall"] * 1e3, ratio_wall]
            row += [med["prroi"]["cpu"] * 1e3, med["roialign"]["cpu"] * 1e3, ratio_second]
        rows.append(row)
        results.append(
            {
                "setting": label,
                "image_size": [height, width],
                "dtype": dtype_name,
                "output_size": out_size,
                "rois_per_level_p2_p5": per_level,
                "times_s": times,
                "median_wall_s": {name: med[name]["wall"] for name in IMPLS},
                f"median_{second}_s": {name: med[name][second] for name in IMPLS},
                "ratio_wall_prroi_over_roialign": ratio_wall,
                f"ratio_{second}_prroi_over_roialign": ratio_second,
            }
        )
        print(
            f"{label} {dtype_name} {out_size}x{out_size}: ratio wall {ratio_wall:.2f}, {second} {ratio_second:.2f}",
            flush=True,
        )
    return rows, results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cuda = args.device.type == "cuda"
    torch.set_num_threads(args.threads)
    if cuda:
        if args.device.index is not None:
            torch.cuda.set_device(args.device)
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name(args.device)}, {args.repeats} rounds "
              f"(+{args.warmup} warm-up)", flush=True)  # fmt: skip
    else:
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} rounds "
            f"(+{args.warmup} warm-up), "
            f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY'] or '(empty: runtime default)'}",
            flush=True,
        )

    rows: list[list[Any]] = []
    results: list[dict[str, Any]] = []
    for height, width in args.sizes:
        for dtype_name in args.dtypes:
            r, res = run_setting(
                args, f"{height}x{width}", (height, width), dtype_name, measure_cuda if cuda else measure
            )
            rows += r
            results += res

    head = ["images (2 x, 256 ch)", "dtype", "out", "RoIs P2/P3/P4/P5"]
    if cuda:
        headers = head + ["prroi gpu ms", "roi_align gpu ms", "ratio", "prroi wall ms", "roi_align wall ms",
                          "wall ratio"]  # fmt: skip
        title = (
            f"Forward + backward on {torch.cuda.get_device_name(args.device)}, medians of {args.repeats} "
            "interleaved rounds (gpu: CUDA events; wall: between synchronisations; ratio = prroi / roi_align)"
        )
    else:
        headers = head + [
            "prroi ms",
            "roi_align ms",
            "ratio",
            "prroi cpu ms",
            "roi_align cpu ms",
            "cpu ratio",
        ]
        title = (
            f"Forward + backward, medians of {args.repeats} interleaved rounds, torch threads = "
            f"{torch.get_num_threads()} (ratio = prroi / roi_align; < 1 means PrRoIPool is faster)"
        )
    print_table(title, headers, rows)
    payload: dict[str, Any] = {
        "description": "MultiLevelPooler forward+backward: prroi (megdet.layers.prroi_pool; on CUDA its Triton "
        "kernels) vs roialign (torchvision.ops.roi_align aligned=True, sampling_ratio=2); loss = sum of output",
        "device": str(args.device),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "rois_per_image": args.rois_per_image,
        "channels": 256,
        "results": results,
    }
    if cuda:
        payload["gpu"] = torch.cuda.get_device_name(args.device)
        payload["cuda_version"] = torch.version.cuda
        try:
            import triton

            payload["triton_version"] = triton.__version__
        except ImportError:
            pass
    else:
        payload["threads"] = torch.get_num_threads()
        payload["omp_wait_policy"] = os.environ["OMP_WAIT_POLICY"]
    results_dir = Path(args.results_dir) if args.results_dir else None
    path = write_results("prroi_pool_cuda" if cuda else "prroi_pool", payload, results_dir)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
