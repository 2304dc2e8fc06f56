"""Training-step time of our R50-FPN Faster / Mask R-CNN against torchvision's, at equal settings, CPU or CUDA.

One step = forward + backward + SGD step on a batch of random images with 6 random boxes each (box
masks for Mask R-CNN). Both implementations: ResNet-50 FPN with FrozenBN, stem and layer1 frozen
(trainable layers 3), the same RPN / RoI sampling sizes and proposal counts (512 RoIs per image), 80
foreground classes. torchvision's ``fasterrcnn_resnet50_fpn`` / ``maskrcnn_resnet50_fpn(weights=None,
weights_backbone=None)`` switches its body to trainable BatchNorm when no weights are given, so its BN
layers are converted to FrozenBN and its first stages frozen here to match. Ours runs as built by
``build_model`` (``model.mask_on=true`` for Mask R-CNN), with torchvision's initial weights copied in,
so both sample the same RoIs and do the same work.

The matrix: models (``--model faster,mask``) x images per step (``--batch``) x precisions
(``--precision fp32,bf16``; bf16 = ``torch.autocast(device, dtype=torch.bfloat16)`` around the forward
of ours and of torchvision alike) x the two implementations. Per (model, batch) both models are built
once; every (implementation, precision) run gets warm-up steps and one FLOP-counted step
(``FlopCounterMode``), then the runs alternate step by step (ours fp32, torchvision fp32, ours bf16,
...) so that load drifting on a shared machine hits all alike, and medians are reported. On CUDA
every step ends with ``torch.cuda.synchronize()`` inside the timed interval, peak memory is
``torch.cuda.max_memory_allocated`` with the peak reset before each step, and achieved FLOP/s are set
against a bf16 GEMM peak (8192^3 products, best of several) measured in the same run; on CPU against
the fp32 2048^3 product peak of this process's threads. ``--profile`` adds, per run, a torch.profiler
trace of a few steps (GPU kernel busy time against the step time, kernels per step, host
synchronisations per step) and one step under ``torch.cuda.set_sync_debug_mode("warn")`` counting the
synchronising calls and where they come from.

    python benchmarks/train_step.py [--quick] [--iters N] [--bf16-steps N]            # CPU, 2 x 512x512
    python benchmarks/train_step.py --device cuda [--profile]  # faster,mask x 2,8 x fp32,bf16 at 800x1216

Writes benchmarks/results/train_step.json (CPU) or train_step_cuda.json (CUDA), or ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from _common import machine_info
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import fasterrcnn_resnet50_fpn, maskrcnn_resnet50_fpn

from megdet.config import load_config
from megdet.layers.norm import convert_frozen_batchnorm
from megdet.modeling.convert import convert_state, load_converted
from megdet.modeling.detector import GeneralizedRCNN, build_model

RESULTS = Path(__file__).resolve().parent / "results"
# ours_prroi: ours with the Precise RoI Pooling pooler (same weights), timed against ours (RoIAlign).
IMPLS = ("ours", "torchvision", "ours_prroi")
PRECISIONS = ("fp32", "bf16")
MODELS = ("faster", "mask")
BOXES_PER_IMAGE = 6
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]

SETTINGS = {
    "num_classes": 80,
    "rpn_pre_nms_top_n_train": 2000,
    "rpn_post_nms_top_n_train": 1000,
    "rpn_batch_size_per_image": 256,
    "rpn_positive_fraction": 0.5,
    "box_batch_size_per_image": 512,
    "box_positive_fraction": 0.25,
    "trainable_layers": 3,
    "norm": "FrozenBN",
}

Run = Callable[[], None]


# --------------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------------


def ours_overrides(model: str, pooler: str = "roialign") -> list[str]:
    """The config overrides (on the default Config) of our model at the benchmark's settings."""
    s = SETTINGS
    return [
        "model.backbone=resnet50", f"model.norm={s['norm']}", f"model.trainable_layers={s['trainable_layers']}",
        "model.fpn_channels=256", f"model.num_classes={s['num_classes']}",
        "model.rpn.anchor_sizes=[32,64,128,256,512]",
        f"model.rpn.pre_nms_top_n_train={s['rpn_pre_nms_top_n_train']}",
        f"model.rpn.post_nms_top_n_train={s['rpn_post_nms_top_n_train']}",
        f"model.rpn.batch_size_per_image={s['rpn_batch_size_per_image']}",
        f"model.rpn.positive_fraction={s['rpn_positive_fraction']}",
        f"model.roi.batch_size_per_image={s['box_batch_size_per_image']}",
        f"model.roi.positive_fraction={s['box_positive_fraction']}",
        "model.roi.box_head=2fc", "model.roi.box_head_dim=1024", f"model.roi.pooler={pooler}",
        # torchvision's mask branch: 4 convs of 256, 14x14 RoIAlign, every foreground RoI.
        f"model.mask_on={'true' if model == 'mask' else 'false'}", "model.roi.mask_head_convs=4",
        "model.roi.mask_head_dim=256", "model.roi.mask_pool_size=14", "model.roi.max_mask_keypoint_rois=0",
    ]  # fmt: skip


def build_ours(model: str = "faster", pooler: str = "roialign") -> GeneralizedRCNN:
    """Our detector (``model``: faster | mask) at the benchmark's settings, with the ``pooler`` RoI pooler."""
    return build_model(load_config(None, ours_overrides(model, pooler)))


def build_torchvision(model: str = "faster", height: int = 512, width: int = 512) -> torch.nn.Module:
    """torchvision's detector at the same settings, FrozenBN, for ``height`` x ``width`` inputs (no resizing)."""
    s = SETTINGS
    make = maskrcnn_resnet50_fpn if model == "mask" else fasterrcnn_resnet50_fpn
    net = make(
        weights=None,
        weights_backbone=None,
        num_classes=s["num_classes"] + 1,
        min_size=min(height, width),
        max_size=max(height, width),
        rpn_pre_nms_top_n_train=s["rpn_pre_nms_top_n_train"],
        rpn_post_nms_top_n_train=s["rpn_post_nms_top_n_train"],
        rpn_batch_size_per_image=s["rpn_batch_size_per_image"],
        rpn_positive_fraction=s["rpn_positive_fraction"],
        box_batch_size_per_image=s["box_batch_size_per_image"],
        box_positive_fraction=s["box_positive_fraction"],
    )
    body = net.backbone.body
    convert_frozen_batchnorm(body)  # torchvision's default for a pretrained backbone
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][: s["trainable_layers"]]
    for name, p in body.named_parameters():
        if not any(name.startswith(t) for t in trainable):
            p.requires_grad_(False)
    return net


def make_data(
    images: int = 2, height: int = 512, width: int = 512, masks: bool = False, seed: int = 0
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Random images in [0, 1] and 6 random boxes per image (24-160 px sides), with box masks if asked."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(images, 3, height, width, generator=g)
    max_side = min(160, min(height, width) // 2)
    room = torch.tensor([width - max_side, height - max_side], dtype=torch.float32)
    targets = []
    for _ in range(images):
        xy = torch.rand(BOXES_PER_IMAGE, 2, generator=g) * room
        wh = 24 + torch.rand(BOXES_PER_IMAGE, 2, generator=g) * (max_side - 24)
        boxes = torch.cat([xy, xy + wh], dim=1)
        labels = torch.randint(1, SETTINGS["num_classes"] + 1, (BOXES_PER_IMAGE,), generator=g)
        target = {"boxes": boxes, "labels": labels}
        if masks:
            m = torch.zeros(BOXES_PER_IMAGE, height, width, dtype=torch.uint8)
            for i, (x1, y1, x2, y2) in enumerate(boxes.round().long().tolist()):
                m[i, y1:y2, x1:x2] = 1
            target["masks"] = m
        targets.append(target)
    return pixels, targets


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The step's optimizer: SGD with momentum and weight decay over the trainable parameters."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9,
                           weight_decay=1e-4)  # fmt: skip


def step_fn(
    impl: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: list[dict[str, torch.Tensor]],
    precision: str = "fp32",
) -> Run:
    """A closure running one training step of ``model`` (``impl``: ours | torchvision) on the batch.

    ``images`` / ``targets`` are on the model's device. bf16: the forward under autocast, for either.
    """
    model.train()
    device_type = images.device.type
    bf16 = precision == "bf16"
    if impl == "torchvision":
        inputs: tuple[Any, ...] = (
            list(images),
            targets,
        )  # torchvision normalises and batches inside the model
    else:
        mean = torch.tensor(MEAN, device=images.device)[:, None, None]
        std = torch.tensor(STD, device=images.device)[:, None, None]
        # Our data pipeline hands the model normalised, padded images.
        inputs = ((images - mean) / std, [tuple(images.shape[-2:])] * len(images), targets)

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            losses = model(*inputs)
        sum(losses.values()).backward()
        optimizer.step()

    return run


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


def is_cuda(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA device: the switch for every CUDA-only measurement."""
    return device.type == "cuda"


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (CUDA); nothing on CPU."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


def count_flops(run: Run) -> int:
    """FLOPs of one call of ``run`` (matrix products and convolutions, as FlopCounterMode counts)."""
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def gemm_peak(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> float:
    """Best FLOP/s of repeated n^3 ``dtype`` matrix products on ``device`` over about ``seconds``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 10 if is_cuda(device) else 4
    for _ in range(3):
        torch.mm(a, b)
    sync(device)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        if is_cuda(device):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                torch.mm(a, b)
            stop.record()
            stop.synchronize()
            elapsed = start.elapsed_time(stop) / 1e3
        else:
            t = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b)
            elapsed = time.perf_counter() - t
        best = max(best, reps * 2 * n**3 / elapsed)
    return best


def measure_peaks(device: torch.device, quick: bool) -> dict[str, float]:
    """The GEMM peaks rows are set against (GFLOP/s): bf16 and fp32 on CUDA, fp32 on CPU."""
    if is_cuda(device):
        return {
            "bf16_gemm_gflops": gemm_peak(device, torch.bfloat16, 8192, 0.5 if quick else 1.0) / 1e9,
            "fp32_gemm_gflops": gemm_peak(device, torch.float32, 4096, 0.3 if quick else 0.5) / 1e9,
        }
    return {"fp32_gemm_gflops": gemm_peak(device, torch.float32, 2048, 2.0 if quick else 4.0) / 1e9}


def timed_step(run: Run, device: torch.device) -> tuple[float, float | None, float | None]:
    """(seconds, peak MiB, MiB added by the step) of one synchronised step; memory on CUDA only."""
    before = None
    if is_cuda(device):
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t = time.perf_counter()
    run()
    sync(device)
    seconds = time.perf_counter() - t
    if before is None:
        return seconds, None, None
    peak = torch.cuda.max_memory_allocated(device)
    return seconds, peak / 2**20, (peak - before) / 2**20


def _is_device_event(event: Any) -> bool:
    return str(getattr(event, "device_type", "")).endswith("CUDA")


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def trace_summary(events: Sequence[Any], steps: int, wall_s: float, top: int = 8) -> dict[str, Any]:
    """Per-step kernel count, kernel busy time (union of kernel intervals), host synchronisations and the
    ``top`` kernels by time, of a torch.profiler trace of ``steps`` steps, each ended by one
    ``torch.cuda.synchronize()``. Kernel fields are None when the trace has no device activity (CPU)."""
    kernels, copies_dtoh, intervals = 0, 0, []
    runtime: Counter[str] = Counter()
    by_name: Counter[str] = Counter()
    device_events = 0
    for e in events:
        name = e.name
        if _is_device_event(e):
            device_events += 1
            if name.startswith("Memcpy DtoH"):
                copies_dtoh += 1
            # Skip copies, fills, sync records and annotations spanning other kernels (record_function
            # ranges such as "Optimizer.step#SGD.step", mirrored on the GPU timeline).
            annotation = getattr(e, "is_user_annotation", False) or "annotation" in str(getattr(e, "activity_type", ""))
            if name.startswith(("Memcpy", "Memset")) or "Sync" in name or "#" in name or annotation:
                continue
            kernels += 1
            intervals.append((e.time_range.start, e.time_range.end))
            by_name[name[:100]] += e.time_range.end - e.time_range.start
        elif name == "cudaMemcpy" or (name.startswith("cu") and name.endswith("Synchronize")):
            runtime[name] += 1
    # Each step's own closing synchronize() is the benchmark's, not the model's.
    runtime["cudaDeviceSynchronize"] = max(0, runtime["cudaDeviceSynchronize"] - steps)
    busy_s = _union_us(intervals) / 1e6
    gpu = device_events > 0
    return {
        "steps": steps,
        "profiled_step_s": wall_s / steps,
        "kernels_per_step": kernels / steps if gpu else None,
        "kernel_busy_s_per_step": busy_s / steps if gpu else None,
        "kernel_sum_s_per_step": sum(by_name.values()) / 1e6 / steps if gpu else None,
        "kernel_busy_fraction_of_profiled_step": busy_s / wall_s if gpu and wall_s > 0 else None,
        "dtoh_copies_per_step": copies_dtoh / steps if gpu else None,
        "host_syncs_per_step": sum(runtime.values()) / steps if gpu else None,
        "host_sync_calls": {k: v for k, v in runtime.items() if v},
        "top_kernels_ms_per_step": [(n, t / 1e3 / steps) for n, t in by_name.most_common(top)],
    }


def profile_run(run: Run, device: torch.device, steps: int) -> dict[str, Any]:
    """``steps`` steps under torch.profiler (CPU and CUDA activity), summarised by :func:`trace_summary`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_cuda(device) else [])
    sync(device)
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            run()
            sync(device)
        wall = time.perf_counter() - t
    return trace_summary(prof.events(), steps, wall)


def count_sync_warnings(run: Run, top: int = 8) -> dict[str, Any]:
    """One step under ``torch.cuda.set_sync_debug_mode("warn")``: synchronising calls and where they are."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    where = Counter(f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}" for w in syncs)
    return {"count": len(syncs), "top": where.most_common(top)}


# --------------------------------------------------------------------------------------------------
# One (model, batch) configuration
# --------------------------------------------------------------------------------------------------


def build_pair(
    model: str, height: int, width: int, device: torch.device, impls: Sequence[str] = ("ours", "torchvision")
) -> dict[str, torch.nn.Module]:
    """The ``impls`` of ``model`` (ours, torchvision, ours_prroi) with the same weights, on ``device``."""
    torch.manual_seed(0)
    nets = {"ours": build_ours(model), "torchvision": build_torchvision(model, height, width)}
    # torchvision's weights into ours by megdet's explicit torchvision name map
    conv = convert_state(nets["torchvision"].state_dict(), "torchvision")
    load_converted(nets["ours"], conv, allow_new_heads=False)
    if "ours_prroi" in impls:  # the poolers have no parameters: the same state_dict fits
        nets["ours_prroi"] = build_ours(model, pooler="prroi")
        nets["ours_prroi"].load_state_dict(nets["ours"].state_dict())
    return {name: nets[name].to(device) for name in impls}


def step_counts(args: argparse.Namespace, device: torch.device) -> tuple[int, int, int]:
    """(warm-up, timed fp32 steps, timed bf16 steps) per run for ``args`` on ``device``."""
    iters = args.iters if args.iters is not None else (3 if args.quick else 10) if is_cuda(device) else (
        2 if args.quick else 5)  # fmt: skip
    warmup = (
        args.warmup if args.warmup is not None else (1 if args.quick else 2) if is_cuda(device) else 0
    )
    bf16 = args.bf16_steps
    if bf16 < 0:
        # CPUs without native bf16 emulate it (several times slower): one step there by default.
        native = is_cuda(device) or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        bf16 = iters if native else 1
    return warmup, iters, bf16


def bench_config(
    model: str,
    batch: int,
    height: int,
    width: int,
    device: torch.device,
    args: argparse.Namespace,
    log: Callable,
) -> dict[str, Any]:
    """Every (implementation, precision) run of one model at one batch size: timings, FLOPs, memory, profile."""
    warmup, iters, bf16_steps = step_counts(args, device)
    nets = build_pair(model, height, width, device, args.impls)
    images, targets = make_data(batch, height, width, masks=model == "mask")
    images = images.to(device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    optimizers = {impl: sgd(nets[impl]) for impl in args.impls}
    keys = [(impl, p) for p in args.precisions for impl in args.impls]
    runs = {k: step_fn(k[0], nets[k[0]], optimizers[k[0]], images, targets, k[1]) for k in keys}
    steps = {k: bf16_steps if k[1] == "bf16" else iters for k in keys}

    flops: dict[str, int] = {}
    for key, run in runs.items():
        for _ in range(warmup):
            run()
        if key[0] not in flops and (key[1] == "fp32" or "fp32" not in args.precisions):
            t = time.perf_counter()
            flops[key[0]] = count_flops(run)  # also a warm-up step (oneDNN primitives, allocator, autotuning)
            sync(device)
            log(f"  warm-up + FLOP count {key[0]} {key[1]}: {flops[key[0]] / 1e9:.1f} GFLOP "
                f"({time.perf_counter() - t:.2f} s)")  # fmt: skip
    times: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    peak_mb: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    step_mb: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    for i in range(max(steps.values(), default=0)):
        for key, run in runs.items():
            if i >= steps[key]:
                continue
            seconds, peak, added = timed_step(run, device)
            times[key].append(seconds)
            if peak is not None:
                peak_mb[key].append(peak)
                step_mb[key].append(added)
        log(
            f"  step {i + 1}: "
            + ", ".join(f"{k[0]} {k[1]} {v[-1]:.3f} s" for k, v in times.items() if len(v) > i)
        )
    rows = [
        {
            "impl": impl, "precision": prec, "steps": len(times[(impl, prec)]), "times_s": times[(impl, prec)],
            "gflop_per_step": flops.get(impl, 0) / 1e9,
            "peak_mb": max(peak_mb[(impl, prec)], default=None), "step_mb": max(step_mb[(impl, prec)], default=None),
        }
        for impl, prec in keys if times[(impl, prec)]
    ]  # fmt: skip
    if args.profile:
        for row in rows:
            row["profile"] = profile_config_run(
                runs[(row["impl"], row["precision"])], device, args.profile_steps
            )
            log(f"  profiled {row['impl']} {row['precision']}: {_profile_text(row['profile'])}")
    del runs, optimizers, nets, images, targets
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()
    return {"model": model, "batch": batch, "height": height, "width": width, "rows": rows}


def profile_config_run(run: Run, device: torch.device, steps: int) -> dict[str, Any]:
    """The trace summary and, on CUDA, the sync-debug count of one run; an error is recorded, not raised."""
    out: dict[str, Any] = {}
    try:
        out.update(profile_run(run, device, steps))
    except Exception as e:  # a profiler problem must not cost the timings already taken
        out["error"] = f"{type(e).__name__}: {e}"
    if is_cuda(device):
        try:
            out["sync_debug"] = count_sync_warnings(run)
        except Exception as e:
            out["sync_debug_error"] = f"{type(e).__name__}: {e}"
    return out


def _profile_text(p: dict[str, Any]) -> str:
    if "error" in p:
        return p["error"]
    if p["kernels_per_step"] is None:
        return f"{p['profiled_step_s']:.2f} s per profiled step"
    text = (f"{p['kernels_per_step']:.0f} kernels/step, busy {p['kernel_busy_s_per_step'] * 1e3:.1f} ms of "
            f"{p['profiled_step_s'] * 1e3:.1f} ms, {p['host_syncs_per_step']:.1f} host syncs/step")  # fmt: skip
    if "sync_debug" in p:
        text += f", {p['sync_debug']['count']} sync-debug warnings/step"
    return text


# --------------------------------------------------------------------------------------------------
# Summary and command line
# --------------------------------------------------------------------------------------------------


def add_ratios(config: dict[str, Any], peak_gflops: float) -> None:
    """Medians, images/s, ratios to torchvision, achieved FLOP/s and share of ``peak_gflops``, in place."""
    rows = config["rows"]
    for r in rows:
        r["median_s"] = statistics.median(r["times_s"])
        r["min_s"] = min(r["times_s"])
        r["images_per_s"] = config["batch"] / r["median_s"]
        r["achieved_gflops"] = r["gflop_per_step"] / r["median_s"]
        r["fraction_of_peak"] = r["achieved_gflops"] / peak_gflops if peak_gflops else None
        busy = r.get("profile", {}).get("kernel_busy_s_per_step")
        if busy is not None:
            r["profile"]["kernel_busy_fraction_of_median_step"] = busy / r["median_s"]
    med = {(r["impl"], r["precision"]): r["median_s"] for r in rows}
    for r in rows:
        tv_fp32, tv_same = med.get(("torchvision", "fp32")), med.get(("torchvision", r["precision"]))
        r["ratio_vs_torchvision_fp32"] = r["median_s"] / tv_fp32 if tv_fp32 else None
        r["ratio_vs_torchvision_same_precision"] = r["median_s"] / tv_same if tv_same else None
        roialign = med.get(("ours", r["precision"]))
        if r["impl"] == "ours_prroi" and roialign:
            r["ratio_vs_ours_roialign_same_precision"] = r["median_s"] / roialign


def print_summary(configs: list[dict[str, Any]], peak_name: str) -> None:
    """One table line per (model, batch, implementation, precision)."""
    cols = (f"{'model':<6} {'batch':>5} {'size':>9} {'impl':<11} {'prec':<4} {'median ms':>9} {'img/s':>7} "
            f"{'/tv fp32':>8} {'/tv same':>8} {'GFLOP/s':>9} {'of peak':>7} {'peak MB':>8} {'step MB':>8} "
            f"{'busy':>5} {'kern/st':>7} {'sync/st':>7}")  # fmt: skip
    print(f"\n{cols}")

    def f(v: Any, spec: str) -> str:
        return "-".rjust(int(spec.split(".")[0])) if v is None else format(v, spec)

    for c in configs:
        for r in c["rows"]:
            p = r.get("profile", {})
            print(f"{c['model']:<6} {c['batch']:>5} {c['height']}x{c['width']:<5} {r['impl']:<11} {r['precision']:<4} "
                  f"{r['median_s'] * 1e3:9.1f} {r['images_per_s']:7.2f} {f(r['ratio_vs_torchvision_fp32'], '8.3f')} "
                  f"{f(r['ratio_vs_torchvision_same_precision'], '8.3f')} {r['achieved_gflops']:9.1f} "
                  f"{f(r['fraction_of_peak'], '7.1%')} {f(r['peak_mb'], '8.0f')} {f(r['step_mb'], '8.0f')} "
                  f"{f(p.get('kernel_busy_fraction_of_median_step'), '5.0%')} {f(p.get('kernels_per_step'), '7.0f')} "
                  f"{f(p.get('host_syncs_per_step'), '7.1f')}")  # fmt: skip
    print(f"(of peak: achieved FLOP/s / {peak_name}; busy: GPU kernel time per profiled step / median step)")
    for c in configs:
        for r in c["rows"]:
            if "ratio_vs_ours_roialign_same_precision" in r:
                print(f"prroi step / roialign step, {c['model']} batch {c['batch']} {r['precision']}: "
                      f"{r['ratio_vs_ours_roialign_same_precision']:.3f}")


def parse_size(text: str) -> tuple[int, int]:
    """``"800x1216"`` -> (800, 1216); ``"512"`` -> (512, 512)."""
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; defaults depend on ``--device`` (CPU: faster, 2 x 512x512; CUDA: the matrix)."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument(
        "--model", default=None, help="faster, mask or both comma-separated (CPU: faster; CUDA: both)"
    )
    ap.add_argument("--batch", default=None, help="images per step, comma-separated (CPU: 2; CUDA: 2,8)")
    ap.add_argument("--size", default=None, help="image HxW (CPU: 512x512; CUDA: 800x1216)")
    ap.add_argument("--precision", default="fp32,bf16", help="fp32, bf16 or both (bf16: autocast)")
    ap.add_argument("--impls", default="ours,torchvision", help="implementations to run")
    ap.add_argument(
        "--quick", action="store_true", help="fewer timed steps (CPU 2, CUDA 3) and shorter peaks"
    )
    ap.add_argument("--iters", type=int, default=None, help="timed fp32 steps per run (CPU 5, CUDA 10)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per run before the FLOP count "
                    "(CPU 0, CUDA 2)")  # fmt: skip
    ap.add_argument("--bf16-steps", type=int, default=-1,
                    help="timed bf16 steps per run (-1: as --iters where bf16 is native, else 1)")  # fmt: skip
    ap.add_argument("--profile", action="store_true", help="profile each run (kernels, busy time, syncs)")
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (CPU device only)")
    ap.add_argument("--out", default=None, help="JSON path (default results/train_step[_cuda].json)")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.models = (args.model or ("faster,mask" if cuda else "faster")).split(",")
    args.batches = [int(b) for b in (args.batch or ("2,8" if cuda else "2")).split(",")]
    args.hw = parse_size(args.size or ("800x1216" if cuda else "512x512"))
    args.precisions = args.precision.split(",")
    args.impls = args.impls.split(",")
    for name, values, allowed in (("--model", args.models, MODELS), ("--precision", args.precisions, PRECISIONS),
                                  ("--impls", args.impls, IMPLS)):  # fmt: skip
        if not values or any(v not in allowed for v in values):
            ap.error(
                f"{name}: expected a comma-separated subset of {', '.join(allowed)}, got {','.join(values)}"
            )
    if min(args.batches) < 1 or min(args.hw) < 64:
        ap.error("--batch must be >= 1 and --size >= 64x64")
    if cuda and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available here")
    args.out = Path(args.out or RESULTS / ("train_step_cuda.json" if cuda else "train_step.json"))
    return args


def device_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on, beyond machine_info(): the GPU and the numerics settings."""
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    if is_cuda(device):
        props = torch.cuda.get_device_properties(device)
        info.update({
            "gpu": props.name, "gpu_memory_mb": props.total_memory / 2**20, "capability": list(
                torch.cuda.get_device_capability(device)), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        })  # fmt: skip
    else:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["native_bf16"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return info


def build_result(
    args: argparse.Namespace, device: torch.device, configs: list[dict[str, Any]], peaks: list[dict[str, float]],
    started: float, argv: Sequence[str] | None,
) -> dict[str, Any]:
    """The JSON payload of the configurations measured so far, ratios filled in with the best peaks."""
    peak = {k: max(p[k] for p in peaks) for k in peaks[0]}
    peak_key = "bf16_gemm_gflops" if is_cuda(device) else "fp32_gemm_gflops"
    for c in configs:
        if "rows" in c:
            add_ratios(c, peak[peak_key])
    warmup, iters, bf16_steps = step_counts(args, device)
    settings = {
        **SETTINGS, "boxes_per_image": BOXES_PER_IMAGE, "height": args.hw[0], "width": args.hw[1],
        "models": args.models, "batches": args.batches, "precisions": args.precisions, "impls": args.impls,
        "warmup_steps": warmup, "timed_steps": iters, "bf16_steps": bf16_steps, "quick": args.quick,
        "threads": args.threads if not is_cuda(device) else None,
    }  # fmt: skip
    first = next((c["rows"] for c in configs if "rows" in c), [])
    ratio = {(r["impl"], r["precision"]): r["ratio_vs_torchvision_fp32"] for r in first}
    return {
        "benchmark": "train_step",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "complete": len(configs) == len(args.models) * len(args.batches) and len(peaks) == 2,
        "settings": settings,
        "machine": machine_info(),
        "device": device_info(device),
        "peak_gflops": peak,
        "peak_gflops_before_after": peaks,
        "fraction_of_peak_against": peak_key,
        "configs": configs,
        "wall_s": time.perf_counter() - started,
        # The headline ratios of the first configuration, under the keys earlier versions wrote.
        "ratio_fp32": ratio.get(("ours", "fp32")),
        "ratio_bf16_vs_torchvision_fp32": ratio.get(("ours", "bf16")),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the matrix, prints the table, writes the JSON (after every configuration) and returns it."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if not is_cuda(device):
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, flush=True)

    def write(result: dict[str, Any]) -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    started = time.perf_counter()
    peaks = [measure_peaks(device, args.quick)]
    configs: list[dict[str, Any]] = []
    for model in args.models:
        for batch in args.batches:
            log(f"{model} R-CNN, {batch} x {args.hw[0]}x{args.hw[1]} on {device}:")
            try:
                configs.append(bench_config(model, batch, *args.hw, device, args, log))
            except Exception as e:  # e.g. out of memory: the other configurations still run
                log(f"  FAILED: {type(e).__name__}: {e}")
                configs.append({"model": model, "batch": batch, "height": args.hw[0], "width": args.hw[1],
                                "error": f"{type(e).__name__}: {e}"})  # fmt: skip
            gc.collect()  # after the except block: the traceback no longer holds the failed step's tensors
            if is_cuda(device):
                torch.cuda.empty_cache()
            write(build_result(args, device, configs, peaks, started, argv))  # a timeout keeps what was measured
    peaks.append(measure_peaks(device, args.quick))
    result = build_result(args, device, configs, peaks, started, argv)
    write(result)
    peak_key = result["fraction_of_peak_against"]
    print_summary([c for c in configs if "rows" in c],
                  f"{peak_key.split('_')[0]} GEMM peak {result['peak_gflops'][peak_key]:.0f} GFLOP/s")  # fmt: skip
    log(f"ratio ours/torchvision fp32 {_fmt(result['ratio_fp32'])} (goal <= 1.0); ours bf16 / torchvision fp32 "
        f"{_fmt(result['ratio_bf16_vs_torchvision_fp32'])} (goal <= 0.6); wrote {args.out} "
        f"({result['wall_s']:.0f} s)")  # fmt: skip
    return result


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    main()
