"""The training loop: data-parallel, large mini-batch, resumable, with evaluation during training.

One call, :func:`train`, runs a whole training job in every worker process (or the only process).
Per iteration: ``grad_accum_steps`` micro-batches of ``data.images_per_device`` images are forwarded
and back-propagated, each micro-step loss divided by ``grad_accum_steps`` so that, with
DistributedDataParallel averaging over ranks, the gradient is that of the mean loss over the *global*
batch (MegDet: normalise by the global batch, not the per-device one). DDP's gradient all-reduce runs
only on the last micro-step (``no_sync`` before). The losses and a stop flag are then summed across
ranks in one small all-reduce, which serves logging, the non-finite-loss guard and SIGTERM handling
at once (every rank takes the same decision at the same iteration, so no rank is left waiting in a
collective).

Resuming (``resume=True``) restores the model, optimizer, lr scheduler, gradient scaler, iteration,
data position and every rank's RNG states from the newest checkpoint in ``train.out_dir``. Because the
data stream is a function of (seed, rank, iteration) and evaluation runs under a forked RNG, a run
stopped at a checkpoint and resumed ends, on CPU, with bit-identical weights to an uninterrupted run.

Rank 0 writes into ``train.out_dir``: ``config.yaml`` (resolved), ``lr_schedule.png``,
``metrics.jsonl`` (one JSON line per ``train.log_period`` iterations, plus ``{"iter", "eval"}``
lines), TensorBoard events in ``tb/``, ``model_XXXXXXX.pt`` checkpoints with ``last_checkpoint``, and
``eval/iter_XXXXXXX/`` COCO results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import random
import resource
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from megdet.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointManager,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from megdet.config import Config, ConfigError, config_to_dict, dump_config
from megdet.data.layout import split_files
from megdet.distributed import (
    all_gather_object,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    init_distributed,
)
from megdet.engine.lr_policy import (
    LRScheduler,
    ScheduleInfo,
    build_optimizer,
    plot_schedule,
    resolve_schedule,
)
from megdet.files import write_text_atomic
from megdet.layers import CrossDeviceBatchNorm2d
from megdet.layers.recompute import apply_recompute, recompute_names


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the run stopped without saving. The message is one line."""


# --------------------------------------------------------------------------------------------------
# Configuration checks and the resolved schedule
# --------------------------------------------------------------------------------------------------


def schedule_for(cfg: Config, world_size: int, num_images: int) -> ScheduleInfo:
    """:func:`resolve_schedule` with this config's batch settings."""
    return resolve_schedule(
        cfg.solver,
        world_size=world_size,
        images_per_device=cfg.data.images_per_device,
        grad_accum_steps=cfg.train.grad_accum_steps,
        num_images=num_images,
        max_iters=cfg.train.max_iters,
    )


def resolved_schedule_text(cfg: Config, world_size: int, num_images: int | None = None) -> str:
    """What ``megdet train --print-config --nproc N`` adds after the config: the schedule for N devices.

    Every line is a YAML comment, so the printed config stays loadable. The number of training images
    per epoch is ``num_images`` when given (``--num-images``, for planning a run on a machine without
    the data set), else read from the training annotations. When neither is available, the lines that
    do not depend on it (global batch, learning rate) are still printed, and the reason.
    """
    lines = [f"# resolved for {world_size} device(s):"]
    problem = None
    if num_images is None:
        try:
            from megdet.data.loader import build_train_dataset

            num_images = len(build_train_dataset(cfg))
        except (OSError, ValueError) as e:
            problem = str(e).splitlines()[0]
    if num_images is None:
        # Global batch and lr do not depend on the data set's size: resolve with a stand-in for them.
        info = schedule_for(cfg, world_size, 1)
        lines += [f"#   {line}" for line in info.summary_lines()[:2]]
        lines.append(
            f"#   iterations, warmup and decay unavailable: cannot read the training split ({problem});"
            " pass --num-images N (images per epoch) or fix data.root"
        )
        return "\n".join(lines)
    info = schedule_for(cfg, world_size, num_images)
    lines += [f"#   {line}" for line in info.summary_lines()]
    lines.append(f"#   decay iterations: {info.decay_iters}")
    lines.append(f"#   {bn_statistics_text(cfg, world_size)}")
    return "\n".join(lines)


def bn_statistics_text(cfg: Config, world_size: int) -> str:
    """Over how many images the backbone's BatchNorm takes its training statistics, and why."""
    m, ipd = cfg.model, cfg.data.images_per_device
    if m.norm == "CrossDeviceBN":
        if m.bn_group_images > 0:
            return (f"batch norm: statistics over groups of {m.bn_group_images} image(s) of each device"
                    f" (model.bn_group_images; nothing shared across devices)")  # fmt: skip
        devices = m.bn_group_size or world_size
        return (f"batch norm: statistics over {devices * ipd} images ({devices} device(s) x {ipd}; "
                f"model.bn_group_size={m.bn_group_size}{': all devices' if not m.bn_group_size else ''})")  # fmt: skip
    if m.norm == "BN":
        return f"batch norm: statistics over each device's {ipd} image(s) (model.norm=BN: per device)"
    return f"batch norm: none with statistics (model.norm={m.norm})"


# --------------------------------------------------------------------------------------------------
# Model preparation
# --------------------------------------------------------------------------------------------------


def use_channels_last(mode: str, device_type: str, amp: str) -> bool:
    """``train.channels_last``: ``auto`` is on only for CUDA under bf16/fp16 autocast, where reduced-precision
    convolutions run NHWC and NCHW activations cost a layout conversion around each of them; on CPU
    (oneDNN) NHWC made the training step slower (BENCHMARKS.md)."""
    if mode == "auto":
        return device_type == "cuda" and amp in ("bf16", "fp16")
    return mode == "on"


def _autocast(amp: str, device_type: str) -> contextlib.AbstractContextManager:
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# One iteration
# --------------------------------------------------------------------------------------------------


def accumulate_gradients(
    model: nn.Module,
    batches: Sequence[Any],
    *,
    device: torch.device,
    amp: str = "off",
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """Forward + backward of every micro-batch, gradients summed in ``.grad`` (not zeroed here).

    Each micro-step's total loss is divided by ``len(batches)``, so the accumulated gradient is that
    of the mean loss over all micro-batches. With a DDP-wrapped ``model`` the gradient all-reduce runs
    only on the last micro-step. Returns each loss term (and ``total_loss``) averaged over the
    micro-steps, as Python floats.
    """
    steps = len(batches)
    sums: dict[str, float] = {}
    for i, batch in enumerate(batches):
        last = i == steps - 1
        sync = (
            contextlib.nullcontext()
            if last or not isinstance(model, DistributedDataParallel)
            else model.no_sync()
        )
        with sync:
            # A raw batch (uint8 pixels from the trainer's loader) is normalised after the copy, on the
            # device: a quarter of the bytes to transfer and no float work in the loader workers.
            batch = batch.to(device, non_blocking=True).normalized()
            with _autocast(amp, device.type):
                losses = model(batch.images, batch.image_sizes, batch.targets)
            total = sum(losses.values())
            scaled = total / steps
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach().float())
        sums["total_loss"] = sums.get("total_loss", 0.0) + float(total.detach().float())
    return {k: v / steps for k, v in sums.items()}


def apply_update(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    *,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float = 0.0,
) -> float | None:
    """Optional gradient clipping, then the optimizer step (through the scaler for fp16).

    Returns the gradient norm before clipping when clipping is on, else None.
    """
    norm = None
    if grad_clip > 0:
        if scaler is not None:
            scaler.unscale_(optimizer)
        norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return norm


# --------------------------------------------------------------------------------------------------
# Logging (rank 0)
# --------------------------------------------------------------------------------------------------


def memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocated on GPU, resident set size of this process on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20  # KiB on Linux, bytes on macOS


class _Log:
    """Rank 0's outputs: tqdm bar, metrics.jsonl, TensorBoard. Every method is a no-op elsewhere."""

    def __init__(self, out_dir: Path, main: bool, start_iter: int, total_iters: int) -> None:
        self.main = main
        self.bar = None
        self.tb = None
        self.metrics_path = out_dir / "metrics.jsonl"
        if not main:
            return
        from tqdm import tqdm

        _truncate_metrics(self.metrics_path, start_iter)
        self.metrics = open(self.metrics_path, "a")
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_iter if start_iter > 0 else None)
        # Created at the first update, so that the start-up lines print above it.
        self._new_bar = lambda: tqdm(
            total=total_iters, initial=start_iter, desc="train", dynamic_ncols=True, mininterval=1.0
        )

    def info(self, msg: str) -> None:
        if self.main:
            from tqdm import tqdm

            tqdm.write(msg)
            sys.stdout.flush()

    def progress(self, values: Mapping[str, float]) -> None:
        if self.main:
            if self.bar is None:
                self.bar = self._new_bar()
            short = {k.removeprefix("loss_"): f"{v:.3g}" for k, v in values.items()}
            self.bar.set_postfix(short, refresh=False)
            self.bar.update(1)

    def record(self, iteration: int, values: Mapping[str, Any]) -> None:
        if not self.main:
            return
        self.metrics.write(json.dumps({"iter": iteration, **values}) + "\n")
        self.metrics.flush()
        for k, v in values.items():
            if isinstance(v, (int, float)) and k != "time":
                self.tb.add_scalar(
                    k if k.startswith("loss") or k == "total_loss" else f"train/{k}", v, iteration
                )
        self.tb.flush()

    def record_eval(self, iteration: int, results: Mapping[str, Any]) -> None:
        if not self.main:
            return
        stats = {task: r.get("stats", r) for task, r in results.items()}
        self.metrics.write(json.dumps({"iter": iteration, "eval": stats}) + "\n")
        self.metrics.flush()
        for task, values in stats.items():
            for k, v in values.items():
                if isinstance(v, (int, float)) and v >= 0:
                    self.tb.add_scalar(f"eval/{task}/{k}", v, iteration)
        self.tb.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.main:
            self.metrics.close()
            self.tb.close()


def _truncate_metrics(path: Path, start_iter: int) -> None:
    """Drops lines beyond ``start_iter`` (left by a run that went on past its last checkpoint)."""
    if not path.is_file():
        return
    if start_iter == 0:
        path.unlink()
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line).get("iter", 0)) <= start_iter:
                kept.append(line)
        except (ValueError, AttributeError):
            continue
    path.write_text("".join(line + "\n" for line in kept))


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def _eval_available(cfg: Config) -> str | None:
    """None when evaluation can run, else why not (one line)."""
    if cfg.test.eval_period < 0:
        return "test.eval_period < 0"
    ann = split_files(cfg.data.root, cfg.data.val_split).instances
    if not ann.is_file():
        return f"{ann} not found"
    return None


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


class _StopOnSignal:
    """Turns SIGTERM into a flag checked at the end of every iteration (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: Any = None

    def __enter__(self) -> _StopOnSignal:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def ddp_buffer_kwargs(model: nn.Module) -> dict[str, bool]:
    """DDP's keyword for syncing buffers from rank 0 at every forward, and whether to.

    Plain BN layers (``model.norm`` or ``model.head_norm`` BN) keep per-device running statistics:
    broadcasting rank 0's keeps the replicas equal. Cross-device BN statistics are equal across a group
    already (and differ between groups on purpose), FrozenBN / GN have none that change. torch 2.14
    renamed ``broadcast_buffers`` to ``forward_sync_buffers`` (the old name warns on every rank).
    """
    sync = any(
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        and not isinstance(m, CrossDeviceBatchNorm2d)
        and m.track_running_stats
        for m in model.modules()
    )
    new_name = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers" if new_name else "broadcast_buffers": sync}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rank_seed(seed: int, rank: int) -> int:
    # Training-time randomness (proposal / RoI sampling) differs per rank, reproducibly.
    return int(np.random.SeedSequence([seed % 2**63, rank, 1]).generate_state(1, np.uint32)[0])


def _stop_workers(data_iter: Iterator[Any]) -> None:
    """Stops the loader's worker processes now. Left to garbage collection, a loader freed only at
    interpreter exit is not shut down (torch skips it then) and multiprocessing's exit handler waits
    forever for workers that ignore its SIGTERM (the loader's worker_init_fn)."""
    shutdown = getattr(data_iter, "_shutdown_workers", None)  # a multi-process iterator
    if shutdown is not None:
        shutdown()


def _format_losses(values: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.6g}" for k, v in values.items())


def train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Trains the detector described by ``cfg`` in this process (one rank of a launcher's world, or alone).

    Args:
        cfg: the resolved config.
        resume: continue from the newest checkpoint in ``cfg.train.out_dir`` (start fresh if there is
            none). Without it, an ``out_dir`` that already holds checkpoints is refused.

    Returns:
        A summary: ``iteration``, ``total_iters``, ``losses`` (last logged window, averaged over ranks),
        ``checkpoint`` (path of the last checkpoint written), ``eval`` (rank 0's last results or None),
        ``interrupted`` (True when SIGTERM stopped the run early), ``out_dir`` and ``schedule``.

    Raises:
        ConfigError: bad configuration (one line).
        NonFiniteLossError: a loss became NaN/inf; nothing was saved for that iteration.
    """
    created_group = not torch.distributed.is_initialized()
    cfg.validate()
    rank, world, local_rank, device = init_distributed(device=cfg.train.device)
    try:
        return _run(cfg, resume, rank, world, local_rank, device)
    finally:
        if created_group:
            cleanup_distributed()


def _run(
    cfg: Config, resume: bool, rank: int, world: int, local_rank: int, device: torch.device
) -> dict[str, Any]:
    from megdet.data.loader import build_train_dataset, build_train_loader
    from megdet.modeling.detector import build_model, load_model_state

    t = cfg.train
    main = rank == 0
    out_dir = Path(t.out_dir)
    cfg.validate_world_size(world)  # the rest of cfg.validate() ran before the group was set up
    manager = CheckpointManager(out_dir, keep=t.keep_checkpoints)

    # ---- where to start -------------------------------------------------------------------------
    ckpt: Checkpoint | None = None
    ckpt_path = manager.latest() if resume else None
    if ckpt_path is not None:
        ckpt = Checkpoint.from_dict(load_checkpoint(ckpt_path))
        if ckpt.iteration is None:
            raise CheckpointError(f"{ckpt_path}: stores no iteration; it is not a checkpoint of a training run")
    elif not resume and manager.checkpoints():
        raise ConfigError(
            f"{out_dir} already holds checkpoints ({manager.checkpoints()[-1].name}); pass --resume to"
            " continue that run or choose another train.out_dir"
        )
    start_iter = int(ckpt.iteration) if ckpt is not None and ckpt.iteration is not None else 0

    # ---- model ------------------------------------------------------------------------------------
    _seed_everything(t.seed)  # identical initial weights on every rank
    model = build_model(cfg)
    if ckpt is not None:
        try:
            load_model_state(model, ckpt.model, strict=True)
        except ValueError as e:
            raise CheckpointError(
                f"{ckpt_path}: {e}; resume with the model settings it was trained with ({out_dir / 'config.yaml'})"
            ) from None
    model.to(device)
    if use_channels_last(t.channels_last, device.type, t.amp):
        model.to(memory_format=torch.channels_last)
        model.channels_last = True
    recompute = recompute_names(model, model.recompute_stages(), t.sublinear_memory)
    if recompute:
        apply_recompute(model, recompute)
    model.train()

    # ---- data and schedule ------------------------------------------------------------------------
    dataset = build_train_dataset(cfg, raw_images=True)
    if local_rank == 0:
        # A missing file fails now, not when the loader reaches it hours later. Every rank reads every
        # image over the epochs, so one full check per machine (its file system) is enough; the
        # launcher stops the other workers when this one fails.
        dataset.verify_images()
    loader = build_train_loader(
        cfg,
        rank,
        world,
        start_iter=start_iter * t.grad_accum_steps,
        dataset=dataset,
        raw_images=True,
        pin_memory=device.type == "cuda",  # page-locked: the copies in accumulate_gradients are asynchronous
    )
    info = schedule_for(cfg, world, len(loader.dataset))
    categories = list(getattr(getattr(loader.dataset, "dataset", loader.dataset), "categories", []))
    if ckpt is not None:
        saved = (ckpt.schedule or {}).get("global_batch")
        if saved is not None and int(saved) != info.global_batch:
            raise ConfigError(
                f"{ckpt_path}: was trained with global batch {saved}, this run has {info.global_batch};"
                " resume with the same number of devices x data.images_per_device x train.grad_accum_steps"
            )

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, cfg.solver, info.lr, betas=info.betas)
    scheduler = LRScheduler(optimizer, info, start_iter=start_iter)
    # fp16 needs loss scaling on any device. On CPU it runs too (torch's CPU autocast and GradScaler),
    # which is how the scaler's path is tested without a GPU, but most CPUs have no fp16 kernels: a
    # tiny detector step took 0.9 s in fp16 against 0.065 s in fp32 and 0.06 s in bf16 here.
    scaler = torch.amp.GradScaler(device.type) if t.amp == "fp16" else None
    if ckpt is not None:
        saved_optimizer = (ckpt.config or {}).get("solver", {}).get("optimizer", cfg.solver.optimizer)
        if saved_optimizer != cfg.solver.optimizer:
            raise ConfigError(
                f"{ckpt_path}: was trained with solver.optimizer={saved_optimizer}, this run has"
                f" {cfg.solver.optimizer}; resume with the same optimizer"
            )
        try:
            optimizer.load_state_dict(ckpt.optimizer)
        except (ValueError, KeyError) as e:  # e.g. other trainable parameters (model.trainable_layers)
            raise CheckpointError(
                f"{ckpt_path}: its optimizer state does not fit this run ({e}); resume with the settings it"
                f" was trained with ({out_dir / 'config.yaml'})"
            ) from None
        scheduler.load_state_dict(ckpt.scheduler)
        if scaler is not None and ckpt.scaler:
            scaler.load_state_dict(ckpt.scaler)

    if world > 1:
        ddp = DistributedDataParallel(
            model,
            device_ids=[local_rank] if device.type == "cuda" else None,
            find_unused_parameters=False,
            **ddp_buffer_kwargs(model),
        )
        net: nn.Module = ddp
    else:
        net = model

    # ---- outputs ----------------------------------------------------------------------------------
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "config.yaml", dump_config(cfg))
        plot_schedule(info, out_dir / "lr_schedule.png")
    barrier()
    log = _Log(out_dir, main, start_iter, info.total_iters)
    log.info(
        f"megdet train: {device.type} x {world}, norm {cfg.model.norm}, amp {t.amp}, "
        f"sublinear memory {t.sublinear_memory} ({len(recompute)} recomputed blocks), out_dir {out_dir}"
    )
    for line in info.summary_lines():
        log.info(f"  {line}")
    if t.amp == "fp16" and device.type == "cpu":
        log.info("  note: fp16 on CPU runs on slow fallback kernels on most CPUs; train.amp=bf16 is the fast choice")
    if ckpt is not None:
        log.info(f"  resumed from {ckpt_path} at iteration {start_iter}")
    elif resume:
        log.info(f"  --resume: no checkpoint in {out_dir}; starting from scratch")
    eval_skip = _eval_available(cfg)

    # ---- RNG for the training stream ----------------------------------------------------------------
    data_iter: Iterator[Any] = iter(loader)
    saved_rng = ckpt.rng if ckpt is not None else None
    if isinstance(saved_rng, list) and len(saved_rng) == world:
        set_rng_state(saved_rng[rank])
    else:
        if ckpt is not None:
            log.info("  (the checkpoint's RNG states are for another world size; reseeding)")
        _seed_everything(_rank_seed(t.seed, rank))

    def checkpoint_state(iteration: int) -> Checkpoint:
        rngs = all_gather_object(rng_state())
        return Checkpoint(
            model=model.state_dict(),
            iteration=iteration,
            config=config_to_dict(cfg),
            categories=categories,
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict() if scaler is not None else {},
            sampler_position=iteration * t.grad_accum_steps,
            rng=rngs,
            schedule=dataclasses.asdict(info),
            world_size=world,
        )

    def save(iteration: int) -> Path:
        state = checkpoint_state(iteration)  # a collective: every rank builds it
        path = manager.path_for(iteration)
        if main:
            path = manager.save(iteration, state.to_dict())
        barrier()
        return path

    def run_eval(iteration: int) -> dict[str, Any]:
        from megdet.evaluation.inference import evaluate_model

        if world > 1:
            # Every rank evaluates its shard with rank 0's buffers, i.e. exactly the model that rank 0
            # checkpoints. Otherwise plain-BN replicas differ by their last local statistics update (DDP
            # syncs buffers before a forward, not after), as do cross-device BN groups smaller than
            # the world. Only evaluation reads running statistics, so training is unaffected.
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        # Runs every rank's shard in eval mode under a forked RNG: the training stream is unaffected.
        results = evaluate_model(
            model,
            cfg,
            out_dir=out_dir / "eval" / f"iter_{iteration:07d}",
            rank=rank,
            world_size=world,
            progress=False,
        )
        if main and results:
            from megdet.evaluation.coco_eval import format_eval_table

            log.info(f"evaluation at iteration {iteration}:\n{format_eval_table(results)}")
            log.record_eval(iteration, results)
        return results

    # ---- loop ---------------------------------------------------------------------------------------
    iteration = start_iter
    last_path = ckpt_path
    last_logged: dict[str, float] = {}
    eval_results: dict[str, Any] | None = None
    window: dict[str, float] = {}
    window_iters = 0
    window_data_s = 0.0  # waiting for the loader: > a few % of the time means data.num_workers is too low
    window_start = time.perf_counter()
    run_start = time.perf_counter()
    loss_keys: list[str] | None = None
    interrupted = False
    try:
        with _StopOnSignal() as stop:
            while iteration < info.total_iters:
                lr = optimizer.param_groups[0]["lr"]
                optimizer.zero_grad(set_to_none=True)
                data_start = time.perf_counter()
                batches = [next(data_iter) for _ in range(t.grad_accum_steps)]
                window_data_s += time.perf_counter() - data_start
                local = accumulate_gradients(net, batches, device=device, amp=t.amp, scaler=scaler)
                if loss_keys is None:
                    loss_keys = sorted(local)
                summed = all_reduce_sum([local[k] for k in loss_keys] + [1.0 if stop.signum else 0.0])
                values = {k: v / world for k, v in zip(loss_keys, summed)}
                if not all(math.isfinite(v) for v in values.values()):
                    from megdet.data.validate import describe_batch_data

                    good = f"last good checkpoint: {last_path}" if last_path else "no checkpoint was written"
                    raise NonFiniteLossError(
                        f"non-finite loss at iteration {iteration + 1}: {_format_losses(values)};"
                        f" {describe_batch_data(batches, dataset)}; lr={lr:.6g};"
                        f" stopped without saving ({good}); lower solver.base_lr, lengthen the warmup or"
                        " set train.grad_clip"
                    )
                grad_norm = apply_update(optimizer, params, scaler=scaler, grad_clip=t.grad_clip)
                scheduler.step()
                iteration += 1

                for k, v in values.items():
                    window[k] = window.get(k, 0.0) + v
                if grad_norm is not None:
                    window["grad_norm"] = window.get("grad_norm", 0.0) + grad_norm
                window_iters += 1
                elapsed = time.perf_counter() - window_start
                ips = window_iters * info.global_batch / max(elapsed, 1e-9)
                mem = memory_mb(device)
                log.progress({**values, "lr": lr, "img/s": ips, "mem_mb": mem})
                if iteration % t.log_period == 0 or iteration == info.total_iters:
                    last_logged = {k: v / window_iters for k, v in window.items()}
                    log.record(
                        iteration,
                        {
                            "lr": lr,
                            **last_logged,
                            "images_per_s": ips,
                            "data_time": window_data_s / window_iters,
                            "memory_mb": mem,
                            "time": time.perf_counter() - run_start,
                        },
                    )
                    window, window_iters, window_start = {}, 0, time.perf_counter()
                    window_data_s = 0.0

                stop_now = summed[-1] > 0
                final = iteration == info.total_iters
                if iteration % t.checkpoint_period == 0 or final or stop_now:
                    last_path = save(iteration)
                if stop_now:
                    interrupted = True
                    log.info(f"SIGTERM: saved {last_path} at iteration {iteration}; stopping")
                    break
                periodic = cfg.test.eval_period > 0 and iteration % cfg.test.eval_period == 0
                if eval_skip is None and (periodic or final):
                    eval_results = run_eval(iteration)
                elif final and eval_skip is not None:
                    log.info(f"evaluation skipped: {eval_skip}")
            if iteration >= info.total_iters and (
                last_path is None or manager.path_for(iteration) != last_path
            ):
                # Resumed at (or past) the end: still leave the final checkpoint in place.
                last_path = save(iteration)
        if main and not interrupted and last_path is not None:
            # A stable name for the finished model (what `megdet eval/predict --weights` take): the model,
            # its config and categories only, without the training state.
            weights = Checkpoint(model.state_dict(), iteration, config_to_dict(cfg), categories)
            save_checkpoint(out_dir / "model_final.pt", weights.to_dict())
            write_text_atomic(
                out_dir / "summary.json",
                json.dumps({"iteration": iteration, "checkpoint": str(last_path), **dataclasses.asdict(info)},
                           indent=2, default=str),
            )
    finally:
        log.close()
        _stop_workers(data_iter)
        del data_iter
    if not last_logged and window_iters:
        last_logged = {k: v / window_iters for k, v in window.items()}
    return {
        "iteration": iteration,
        "total_iters": info.total_iters,
        "losses": last_logged,
        "checkpoint": str(last_path) if last_path is not None else None,
        "eval": eval_results if main else None,
        "interrupted": interrupted,
        "out_dir": str(out_dir),
        "schedule": dataclasses.asdict(info),
    }
