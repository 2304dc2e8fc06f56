"""Cross-device BatchNorm: step time against per-device BN, and the collectives each step issues.

Two worker processes (gloo, CPU, ``--threads`` intra-op threads each, started with the project's own
``megdet.distributed.launch_local``) train the small synthetic detector of
``configs/synth_all_r18.yaml`` (ResNet-18 FPN with box, mask and keypoint heads; BN in backbone, FPN
and heads) on in-memory batches: ``--images`` random images of ``--size`` px per rank with 8 random
boxes, box masks and (for one "person" box per image) 17 keypoints -- different images on each rank.
Two otherwise identical models are built in each worker and trained alternately, step by step, so
load drifting on a shared machine hits both alike:

* ``BN``: ``model.norm=BN`` -- per-device statistics (DDP broadcasts rank 0's BN buffers before
  every forward, as the trainer has DDP do for plain BN);
* ``CrossDeviceBN``: ``model.norm=CrossDeviceBN`` -- statistics shared by both ranks (MegDet's CGBN;
  no buffer broadcast needed).

One step is the trainer's ``accumulate_gradients`` (forward + backward, DDP gradient all-reduce) and
``apply_update`` (SGD); the step time of a round is the slower rank's, and the median over the
measured rounds is reported with the ratio CrossDeviceBN / BN (the issue's goal: <= 1.15x). Each
rank also records its process CPU time per step: with one intra-op thread, the CPU-time ratio is the
extra compute of the layer itself (plus gloo's own CPU work), while wall time adds the waiting for
the other rank -- on a shared, oversubscribed machine mostly for it to be scheduled. The trainer's
per-iteration loss all-reduce (one small collective for logging) is not part of the step.

Collectives are COUNTED, not estimated, in a separate pass on copies of the two models (so the timed
models run exactly the trainer's code): ``megdet.layers.collectives.all_reduce`` is wrapped (that is
how CrossDeviceBatchNorm2d communicates: shared memory between the two local ranks, or gloo with
``--no-shm``, which sets ``MEGDET_SHM_COLLECTIVES=0`` for the workers) and the calls are attributed to the forward, backward or
optimizer phase; DDP's gradient buckets are counted by a communication hook that does what DDP's
default all-reduce does (average) and records each bucket's size; DDP's buffer broadcasts are counted
by wrapping its broadcast method. The second iteration is reported (DDP rebuilds its buckets after the
first), and the BN all-reduces are checked against the number of CrossDeviceBatchNorm2d calls. The
wall time spent inside the BN all-reduce calls of that iteration (rank 0; waiting for the other rank
included) separates their communication from the layer's own compute in the step-time difference.
Then one layer alone: forward + backward of CrossDeviceBatchNorm2d (its two all-reduces included)
against ``nn.BatchNorm2d`` for the shapes of LAYER_SHAPES, both ranks stepping together.
``torch.nn.SyncBatchNorm`` -- PyTorch's equivalent -- is tried on the same process group: it does not
run on CPU tensors, which is why this layer exists; the error is reported.

    python benchmarks/cross_device_bn.py [--quick] [--config configs/synth_all_r18.yaml] [--size 160]

Prints tables, writes benchmarks/results/cross_device_bn.json (cross_device_bn_gloo.json with --no-shm).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import print_table, synthetic_batch, write_results

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "synth_all_r18.yaml"
VARIANTS = ("BN", "CrossDeviceBN")
NPROC = 2
LR = 1e-3  # the cost of a step does not depend on it; small keeps random-data losses finite


# --------------------------------------------------------------------------------------------------
# Counting collectives
# --------------------------------------------------------------------------------------------------


class CollectiveCounter:
    """Counts torch.distributed.all_reduce calls by phase, DDP gradient buckets and buffer broadcasts."""

    def __init__(self) -> None:
        self.phase = "other"
        self.reset()

    def reset(self) -> None:
        self.all_reduce: dict[str, int] = {}
        self.all_reduce_bytes: dict[str, int] = {}
        self.all_reduce_seconds: dict[str, float] = {}  # wall time inside the (blocking) calls
        self.buckets: list[int] = []  # bytes of each gradient bucket all-reduced by DDP
        self.broadcast_calls = 0
        self.broadcast_bytes = 0
        self.bn_calls: dict[str, int] = {}

    def record_all_reduce(self, tensor: Any, seconds: float) -> None:
        self.all_reduce[self.phase] = self.all_reduce.get(self.phase, 0) + 1
        nbytes = tensor.numel() * tensor.element_size()
        self.all_reduce_bytes[self.phase] = self.all_reduce_bytes.get(self.phase, 0) + nbytes
        self.all_reduce_seconds[self.phase] = self.all_reduce_seconds.get(self.phase, 0.0) + seconds

    def summary(self) -> dict[str, Any]:
        return {
            "bn_all_reduce": dict(self.all_reduce),
            "bn_all_reduce_bytes": dict(self.all_reduce_bytes),
            "bn_all_reduce_seconds": dict(self.all_reduce_seconds),
            "ddp_gradient_buckets": len(self.buckets),
            "ddp_gradient_bytes": sum(self.buckets),
            "ddp_bucket_bytes": list(self.buckets),
            "ddp_buffer_broadcast_calls": self.broadcast_calls,
            "ddp_buffer_broadcast_bytes": self.broadcast_bytes,
            "cross_device_bn_calls": dict(self.bn_calls),
        }


def counting_allreduce_hook(original_all_reduce: Callable[..., Any], world: int) -> Callable[..., Any]:
    """A DDP comm hook equal to DDP's default (average the bucket) that records the bucket's bytes."""

    # No annotations: DDP rejects a hook whose annotations are not the GradBucket / Future classes
    # themselves, and with postponed evaluation they would be strings.
    def hook(counter, bucket):  # noqa: ANN001, ANN202
        buf = bucket.buffer()
        counter.buckets.append(buf.numel() * buf.element_size())
        buf.div_(world)
        fut = original_all_reduce(buf, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    return hook


def count_collectives(model: Any, norm: str, batch: Any, cfg: Any, iterations: int = 2) -> dict[str, Any]:
    """Runs ``iterations`` steps on a DDP copy of ``model`` with every collective counted; the last one's counts."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from megdet.engine.lr_policy import build_optimizer
    from megdet.engine.setup import ddp_buffer_kwargs
    from megdet.layers import collectives
    from megdet.layers.cross_device_bn import CrossDeviceBatchNorm2d

    counter = CollectiveCounter()
    copy_ = copy.deepcopy(model)
    ddp = DistributedDataParallel(copy_, find_unused_parameters=False, **ddp_buffer_kwargs(copy_))
    original_all_reduce = dist.all_reduce
    ddp.register_comm_hook(counter, counting_allreduce_hook(original_all_reduce, dist.get_world_size()))
    original_broadcast = ddp._distributed_broadcast_coalesced

    def broadcast(tensors: Any, buffer_size: Any, authoritative_rank: int = 0) -> Any:
        counter.broadcast_calls += 1
        counter.broadcast_bytes += sum(t.numel() * t.element_size() for t in tensors)
        return original_broadcast(tensors, buffer_size, authoritative_rank)

    ddp._distributed_broadcast_coalesced = broadcast  # DDP calls it through the instance

    original_bn_all_reduce = collectives.all_reduce

    def counting_all_reduce(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = original_bn_all_reduce(tensor, *args, **kwargs)
        counter.record_all_reduce(tensor, time.perf_counter() - t0)
        return out

    def bn_hook(module: Any, inputs: Any, output: Any) -> None:
        if module.training:
            counter.bn_calls[counter.phase] = counter.bn_calls.get(counter.phase, 0) + 1

    handles = [m.register_forward_hook(bn_hook) for m in copy_.modules() if isinstance(m, CrossDeviceBatchNorm2d)]
    optimizer = build_optimizer(copy_, cfg.solver, LR)
    collectives.all_reduce = counting_all_reduce  # CrossDeviceBatchNorm2d looks it up at call time
    try:
        for _ in range(iterations):
            counter.reset()
            optimizer.zero_grad(set_to_none=True)
            counter.phase = "forward"
            losses = ddp(batch.images, batch.image_sizes, batch.targets)
            total = sum(losses.values())
            counter.phase = "backward"
            total.backward()
            counter.phase = "optimizer"
            optimizer.step()
            counter.phase = "other"
    finally:
        collectives.all_reduce = original_bn_all_reduce
        for h in handles:
            h.remove()
    out = counter.summary()
    layers = [m for m in copy_.modules() if isinstance(m, CrossDeviceBatchNorm2d)]
    out["cross_device_bn_layers"] = len(layers)
    out["cross_device_bn_channels"] = sum(m.num_features for m in layers)
    del ddp, copy_
    torch.distributed.barrier()
    return out


def try_sync_batchnorm() -> str:
    """What torch.nn.SyncBatchNorm does on CPU tensors in this process group (every rank calls this)."""
    import torch

    layer = torch.nn.SyncBatchNorm(4)
    layer.train()
    try:
        layer(torch.randn(2, 4, 3, 3))
    except (ValueError, RuntimeError) as e:
        return f"does not run on CPU: {type(e).__name__}: {str(e).splitlines()[0]}"
    return "ran on CPU"


# Layer shapes (per rank) for the layer-alone timing: ResNet stages of a 2 x 160^2 batch and a RoI head.
LAYER_SHAPES = ((2, 64, 80, 80), (2, 128, 40, 40), (2, 256, 20, 20), (2, 512, 10, 10), (32, 64, 14, 14))


def layer_timing(reps: int = 20) -> list[dict[str, Any]]:
    """Forward + backward of one CrossDeviceBatchNorm2d (its collectives on this group included)
    against nn.BatchNorm2d in training mode, per shape of LAYER_SHAPES: median wall ms over ``reps``
    calls after 3 warm-ups, both ranks stepping together (every rank calls this)."""
    import torch
    import torch.distributed as dist

    from megdet.layers.cross_device_bn import CrossDeviceBatchNorm2d

    out = []
    for shape in LAYER_SHAPES:
        x = torch.randn(shape)
        g = torch.randn(shape)
        row: dict[str, Any] = {"shape": list(shape)}
        for name, layer in (("native_ms", torch.nn.BatchNorm2d(shape[1])),
                            ("cross_device_ms", CrossDeviceBatchNorm2d(shape[1]))):
            samples = []
            for i in range(3 + reps):
                dist.barrier()
                xi = x.clone().requires_grad_(True)
                t0 = time.perf_counter()
                layer(xi).backward(g)
                if i >= 3:
                    samples.append((time.perf_counter() - t0) * 1e3)
            row[name] = statistics.median(samples)
        row["ratio"] = row["cross_device_ms"] / row["native_ms"]
        out.append(row)
    return out


# --------------------------------------------------------------------------------------------------
# Worker
# --------------------------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    """One rank: builds both variants, times them alternately, counts their collectives."""
    import torch
    import torch.distributed as dist

    from megdet.config import load_config
    from megdet.distributed import all_gather_object, barrier, cleanup_distributed, init_distributed
    from megdet.engine.lr_policy import build_optimizer
    from megdet.engine.setup import build_training_model, wrap_ddp
    from megdet.engine.trainer import accumulate_gradients, apply_update

    rank, world, _, device = init_distributed(device="cpu")
    torch.set_num_threads(args.threads)  # init_distributed divides the cores; the benchmark fixes it
    try:
        models, ddps, optimizers, params, cfgs = {}, {}, {}, {}, {}
        for norm in VARIANTS:
            cfg = load_config(args.config, [f"model.norm={norm}", "train.device=cpu", "model.bn_group_size=0",
                                            f"train.sublinear_memory={args.sublinear_memory}"])  # fmt: skip
            cfgs[norm] = cfg
            # The trainer's model (identical initial weights on every rank) and DDP settings for each norm.
            model, _ = build_training_model(cfg, device)
            models[norm] = model
            ddps[norm] = wrap_ddp(model, device, 0, world)
            optimizers[norm] = build_optimizer(model, cfg.solver, LR)
            params[norm] = [p for p in model.parameters() if p.requires_grad]
        m = cfgs["BN"].model
        batch = synthetic_batch(
            num_images=args.images, height=args.size, width=args.size, num_classes=m.num_classes,
            size_divisibility=cfgs["BN"].data.size_divisibility, with_masks=m.mask_on,
            num_keypoints=m.num_keypoints if m.keypoint_on else 0,
            person_label=m.num_classes if m.keypoint_on else None,  # synthetic data: the last class is person
            seed=1000 + rank,
        )

        times: dict[str, list[float]] = {n: [] for n in VARIANTS}
        cpu: dict[str, list[float]] = {n: [] for n in VARIANTS}
        rounds = args.warmup + args.steps
        for r in range(rounds):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]  # neither variant always runs first
            for norm in order:
                barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                optimizers[norm].zero_grad(set_to_none=True)
                accumulate_gradients(ddps[norm], [batch], device=device)
                apply_update(optimizers[norm], params[norm])
                times[norm].append(time.perf_counter() - t0)
                cpu[norm].append(time.process_time() - c0)
            if rank == 0:
                print(f"  round {r + 1}/{rounds}{' (warm-up)' if r < args.warmup else ''}: "
                      + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in VARIANTS), flush=True)

        counts = {norm: count_collectives(models[norm], norm, batch, cfgs[norm]) for norm in VARIANTS}
        layers = layer_timing()
        sync_bn = try_sync_batchnorm()
        all_times = all_gather_object(times)
        all_cpu = all_gather_object(cpu)
        if rank == 0:
            result = {
                "world_size": world,
                "backend": dist.get_backend(),
                "threads_per_rank": torch.get_num_threads(),
                "trainable_params": {n: sum(p.numel() for p in params[n]) for n in VARIANTS},
                "times_per_rank": all_times,
                "cpu_times_per_rank": all_cpu,
                "counts": counts,
                "layer_alone": layers,
                "torch_sync_batchnorm": sync_bn,
            }
            Path(args.out).write_text(json.dumps(result))
    finally:
        cleanup_distributed()


# --------------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------------


def summarize(per_rank: list[dict[str, list[float]]], warmup: int) -> dict[str, Any]:
    """Per variant: the median over measured rounds of the slowest rank's time; the CrossDeviceBN / BN
    ratio of those medians and the median of the per-round ratios (less sensitive to load drift)."""
    out: dict[str, Any] = {}
    for norm in VARIANTS:
        rounds = [max(rank[norm][i] for rank in per_rank) for i in range(len(per_rank[0][norm]))]
        measured = rounds[warmup:]
        out[norm] = {"step_seconds": measured, "median_step_s": statistics.median(measured),
                     "min_step_s": min(measured), "max_step_s": max(measured)}
    out["ratio_cross_device_over_bn"] = out["CrossDeviceBN"]["median_step_s"] / out["BN"]["median_step_s"]
    pairs = [c / b for c, b in zip(out["CrossDeviceBN"]["step_seconds"], out["BN"]["step_seconds"])]
    out["median_paired_ratio"] = statistics.median(pairs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (2 warm-up + 6 measured)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="detector config (model.norm is overridden)")
    parser.add_argument("--size", type=int, default=160, help="image side in px")
    parser.add_argument("--images", type=int, default=2, help="images per rank")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 3, quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="measured rounds (default 15, quick 6)")
    parser.add_argument("--sublinear-memory", default="off", choices=("off", "stages", "blocks", "nested"),
                        help="train.sublinear_memory for both variants (recomputation repeats BN collectives)")
    parser.add_argument("--no-shm", action="store_true",
                        help="BN all-reduces through gloo instead of shared memory (MEGDET_SHM_COLLECTIVES=0)")
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    args.steps = args.steps if args.steps is not None else (6 if args.quick else 15)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")

    from megdet.distributed import in_worker, launch_local

    if in_worker():
        worker(args)
        return

    if args.no_shm:
        os.environ["MEGDET_SHM_COLLECTIVES"] = "0"  # inherited by the workers
    transport = "gloo" if args.no_shm else "shared memory"
    started = time.perf_counter()
    print(f"{NPROC} ranks (gloo, {args.threads} thread(s) each; BN all-reduces through {transport}), {args.images} x {args.size}^2 per rank, "
          f"{Path(args.config).name}, {args.warmup} warm-up + {args.steps} measured rounds", flush=True)
    with tempfile.TemporaryDirectory(prefix="cross_device_bn_") as tmp:
        out = Path(tmp) / "result.json"
        argv = [*sys.argv[1:], "--out", str(out)]
        rc = launch_local(NPROC, argv, script=str(Path(__file__).resolve()))
        if rc != 0 or not out.is_file():
            sys.exit(f"cross_device_bn: the workers failed (exit code {rc}); see their output above")
        raw = json.loads(out.read_text())

    timing = summarize(raw["times_per_rank"], args.warmup)
    cpu_timing = summarize(raw["cpu_times_per_rank"], args.warmup)
    rows = [[n, timing[n]["median_step_s"], timing[n]["min_step_s"], timing[n]["max_step_s"],
             timing[n]["median_step_s"] / timing["BN"]["median_step_s"], cpu_timing[n]["median_step_s"],
             cpu_timing[n]["median_step_s"] / cpu_timing["BN"]["median_step_s"]] for n in VARIANTS]
    print_table(f"Step time, slowest of {NPROC} ranks per round ({args.steps} rounds; CPU = process CPU time)",
                ["norm", "wall median s", "min s", "max s", "x BN", "CPU median s", "x BN"], rows)
    goal = timing["ratio_cross_device_over_bn"] <= 1.15
    print(f"CrossDeviceBN / BN wall time: {timing['ratio_cross_device_over_bn']:.3f} (ratio of medians), "
          f"{timing['median_paired_ratio']:.3f} (median of per-round ratios); goal <= 1.15: {'yes' if goal else 'NO'}")
    print(f"CrossDeviceBN / BN CPU time: {cpu_timing['ratio_cross_device_over_bn']:.3f} (ratio of medians), "
          f"{cpu_timing['median_paired_ratio']:.3f} (per-round): the layer's own compute (and gloo's CPU work)")

    crow = []
    for n in VARIANTS:
        c = raw["counts"][n]
        bn = c["bn_all_reduce"]
        crow.append([n, bn.get("forward", 0), bn.get("backward", 0), bn.get("optimizer", 0),
                     sum(c["bn_all_reduce_bytes"].values()) / 1024,
                     sum(c["bn_all_reduce_seconds"].values()) * 1e3, c["ddp_gradient_buckets"],
                     c["ddp_gradient_bytes"] / 2**20, c["ddp_buffer_broadcast_calls"],
                     c["ddp_buffer_broadcast_bytes"] / 1024])
    print_table("Collectives per step (counted on rank 0, second iteration)",
                ["norm", "all-reduce fwd", "bwd", "optim", "their KiB", "their ms", "DDP grad buckets", "grad MiB",
                 "buffer bcasts", "bcast KiB"], crow)
    cd = raw["counts"]["CrossDeviceBN"]
    calls = cd["cross_device_bn_calls"]
    print(f"CrossDeviceBN: {cd['cross_device_bn_layers']} layers ({cd['cross_device_bn_channels']} channels), "
          f"{sum(calls.values())} training calls per step {calls}; forward all-reduces == calls in the forward: "
          f"{'yes' if cd['bn_all_reduce'].get('forward', 0) == calls.get('forward', 0) else 'NO'}")
    print_table("One layer, forward + backward (rank 0, median of 20 calls; its all-reduces included)",
                ["shape per rank", "BatchNorm2d ms", "CrossDeviceBN ms", "x BN"],
                [["x".join(map(str, r["shape"])), r["native_ms"], r["cross_device_ms"], r["ratio"]]
                 for r in raw["layer_alone"]])
    print(f"torch.nn.SyncBatchNorm (PyTorch's equivalent) on this gloo/CPU group: {raw['torch_sync_batchnorm']}")

    path = write_results("cross_device_bn_gloo" if args.no_shm else "cross_device_bn", {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "quick": args.quick,
        "config": args.config,
        "image_size": args.size,
        "images_per_rank": args.images,
        "warmup_rounds": args.warmup,
        "measured_rounds": args.steps,
        "sublinear_memory": args.sublinear_memory,
        "bn_all_reduce_transport": transport,
        "world_size": raw["world_size"],
        "backend": raw["backend"],
        "threads_per_rank": raw["threads_per_rank"],
        "trainable_params": raw["trainable_params"],
        "timing": timing,
        "cpu_timing": cpu_timing,
        "goal_ratio_le_1.15": goal,
        "collectives_per_step": raw["counts"],
        "layer_alone": raw["layer_alone"],
        "torch_sync_batchnorm": raw["torch_sync_batchnorm"],
        "wall_s": time.perf_counter() - started,
    })
    print(f"\nwrote {path} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
