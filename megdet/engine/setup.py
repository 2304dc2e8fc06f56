"""Setting up a training run: everything the loop needs, in one :class:`TrainState`.

:func:`build_train_state` builds, in this order (the order fixes the random streams): the newest
checkpoint when resuming; the model with ``train.seed``'s initial weights (identical on every rank),
the checkpoint's weights, moved to the device, with ``train.sublinear_memory``'s blocks recomputed;
the training data; the resolved schedule; optimizer, lr scheduler and gradient scaler (restored when
resuming); the DistributedDataParallel wrapper. :meth:`TrainState.start_streams` then starts the
data stream and every rank's RNG streams (restored when resuming). The benchmarks that time training
steps build their model with :func:`build_training_model` and :func:`wrap_ddp`, as a run does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from megdet.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointManager,
    rng_state,
    set_rng_state,
)
from megdet.config import Config, ConfigError, config_to_dict
from megdet.distributed import all_gather_object
from megdet.engine.lr_policy import LRScheduler, ScheduleInfo, build_optimizer, resolve_schedule
from megdet.layers.cross_device_bn import CrossDeviceBatchNorm2d
from megdet.layers.recompute import apply_recompute, recompute_names


@dataclass
class TrainState:
    """A set-up training run: what the loop and its hooks read and advance."""

    cfg: Config
    rank: int
    world_size: int
    device: torch.device
    model: nn.Module  # the detector; its state_dict is what checkpoints hold
    net: nn.Module  # what a step runs: the DistributedDataParallel wrapper of `model`, or `model`
    params: list[torch.Tensor]  # the trainable parameters (gradient clipping)
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler | None  # fp16 loss scaling only
    amp: str  # train.amp resolved for the device: off | bf16 | fp16
    schedule: ScheduleInfo
    loader: DataLoader
    categories: list[Mapping[str, Any]]  # the training set's, stored in checkpoints
    recomputed: list[str]  # the blocks recomputed in the backward pass
    checkpoints: CheckpointManager
    start_iter: int = 0
    iteration: int = 0  # iterations done
    resumed_from: Path | None = None
    skipped_checkpoints: list[str] = dataclasses.field(default_factory=list)  # unreadable ones --resume passed over
    last_checkpoint: Path | None = None  # the newest checkpoint written, or the one resumed from
    stop_signal: int | None = None  # set (from a signal handler) to stop after the current iteration
    interrupted: bool = False  # the loop stopped before total_iters on a stop request
    data_iter: Iterator[Any] | None = None
    resume_rng: list[Mapping[str, Any]] | None = None  # every rank's RNG states in the checkpoint

    @property
    def main(self) -> bool:
        """Rank 0, which writes everything a run saves."""
        return self.rank == 0

    @property
    def dataset(self) -> Any:
        """The training set (a :class:`~megdet.data.coco.CocoDetection`) inside the loader's seeding wrapper."""
        return getattr(self.loader.dataset, "dataset", self.loader.dataset)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.out_dir)

    @property
    def total_iters(self) -> int:
        return self.schedule.total_iters

    def start_streams(self) -> str | None:
        """Starts the data stream and this rank's RNG streams: the checkpoint's states when resuming with
        the same world size, else seeded from ``train.seed`` and the rank. Returns a note when a
        checkpoint's states could not be used."""
        self.data_iter = iter(self.loader)
        if isinstance(self.resume_rng, list) and len(self.resume_rng) == self.world_size:
            self.set_resume_rng()
            return None
        seed_everything(rank_seed(self.cfg.train.seed, self.rank))
        if self.resumed_from is not None:
            return "the checkpoint's RNG states are for another world size; reseeding"
        return None

    def set_resume_rng(self) -> None:
        with restoring(self.resumed_from, "rng"):
            set_rng_state(self.resume_rng[self.rank])

    def next_batches(self) -> list[Any]:
        """The micro-batches of the next iteration (``train.grad_accum_steps`` of them)."""
        assert self.data_iter is not None, "call start_streams() first"
        return [next(self.data_iter) for _ in range(self.cfg.train.grad_accum_steps)]

    def checkpoint(self) -> Checkpoint:
        """The resumable checkpoint of this moment. A collective: every rank must call it (RNG states)."""
        return Checkpoint(
            model=self.model.state_dict(),
            iteration=self.iteration,
            config=config_to_dict(self.cfg),
            categories=self.categories,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else {},
            sampler_position=self.iteration * self.cfg.train.grad_accum_steps,
            rng=all_gather_object(rng_state()),
            schedule=dataclasses.asdict(self.schedule),
            world_size=self.world_size,
        )

    def weights(self) -> Checkpoint:
        """The model, iteration, config and categories only (``model_final.pt``)."""
        return Checkpoint(self.model.state_dict(), self.iteration, config_to_dict(self.cfg), self.categories)

    def close(self) -> None:
        """Stops the loader's worker processes now. Left to garbage collection, a loader freed only at
        interpreter exit is not shut down (torch skips it then) and multiprocessing's exit handler
        waits forever for workers that ignore its SIGTERM (the loader's worker_init_fn)."""
        shutdown = getattr(self.data_iter, "_shutdown_workers", None)  # a multi-process iterator
        if shutdown is not None:
            shutdown()
        self.data_iter = None


# --------------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seeds Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of a rank's training-time randomness (proposal / RoI sampling): different per rank,
    reproducibly."""
    return int(np.random.SeedSequence([seed % 2**63, rank, 1]).generate_state(1, np.uint32)[0])


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (CUDA with bf16 support; a CPU whose oneDNN has
    bf16 kernels: AVX512-BF16 or AMX). Elsewhere bf16 autocast runs on slow emulation."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_amp(mode: str, device: torch.device) -> str:
    """``train.amp`` as the run uses it: ``auto`` becomes ``bf16`` where :func:`native_bf16`, else ``off``."""
    if mode == "auto":
        return "bf16" if native_bf16(device) else "off"
    return mode


def use_channels_last(mode: str, device_type: str, amp: str) -> bool:
    """``train.channels_last``: ``auto`` is on only for CUDA under bf16/fp16 autocast, where reduced-precision
    convolutions run NHWC and NCHW activations cost a layout conversion around each of them; on CPU
    (oneDNN) NHWC made the training step slower (BENCHMARKS.md)."""
    if mode == "auto":
        return device_type == "cuda" and amp in ("bf16", "fp16")
    return mode == "on"


def _initial_model(cfg: Config) -> nn.Module:
    from megdet.modeling.detector import build_model

    seed_everything(cfg.train.seed)  # identical initial weights on every rank
    return build_model(cfg)


def prepare_for_training(model: nn.Module, cfg: Config, device: torch.device, amp: str | None = None) -> list[str]:
    """Moves the detector to ``device`` (channels-last when ``train.channels_last`` says so), wraps the
    blocks ``train.sublinear_memory`` recomputes and switches to train mode; returns those blocks."""
    t = cfg.train
    model.to(device)
    if use_channels_last(t.channels_last, device.type, amp or resolve_amp(t.amp, device)):
        model.to(memory_format=torch.channels_last)
        model.channels_last = True
    recomputed = recompute_names(model, model.recompute_stages(), t.sublinear_memory)
    if recomputed:
        apply_recompute(model, recomputed)
    model.train()
    return recomputed


def build_training_model(cfg: Config, device: torch.device) -> tuple[nn.Module, list[str]]:
    """The detector as a run starts training it (:func:`prepare_for_training` of ``train.seed``'s initial
    weights), and the blocks it recomputes."""
    model = _initial_model(cfg)
    return model, prepare_for_training(model, cfg, device)


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


def wrap_ddp(model: nn.Module, device: torch.device, local_rank: int, world_size: int) -> nn.Module:
    """The DistributedDataParallel wrapper a run trains through (``model`` itself in a world of one)."""
    if world_size <= 1:
        return model
    return DistributedDataParallel(
        model,
        device_ids=[local_rank] if device.type == "cuda" else None,
        find_unused_parameters=False,
        **ddp_buffer_kwargs(model),
    )


# --------------------------------------------------------------------------------------------------
# The schedule
# --------------------------------------------------------------------------------------------------


def schedule_for(cfg: Config, world_size: int, num_images: int) -> ScheduleInfo:
    """:func:`~megdet.engine.lr_policy.resolve_schedule` with this config's batch settings."""
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
# The whole state
# --------------------------------------------------------------------------------------------------


def _resume_checkpoint(
    manager: CheckpointManager, resume: bool
) -> tuple[Path | None, Checkpoint | None, list[str]]:
    """The newest readable checkpoint of the run folder when resuming, and the unreadable ones passed
    over (:meth:`CheckpointManager.load_latest`). A folder holding an earlier run without ``resume`` was
    refused by :func:`megdet.engine.run_folder.prepare_run_folder`."""
    if not resume:
        return None, None, []
    path, state, skipped = manager.load_latest()
    if path is None or state is None:
        return None, None, skipped
    ckpt = Checkpoint.from_dict(state)
    if ckpt.iteration is None:
        raise CheckpointError(f"{path}: stores no iteration; it is not a checkpoint of a training run")
    return path, ckpt, skipped


@contextlib.contextmanager
def restoring(path: Path | None, name: str) -> Iterator[None]:
    """Turns the errors of restoring checkpoint field ``name`` (hand-edited, or of another program) into
    one CheckpointError naming the file and the field."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        if isinstance(e, (ConfigError, CheckpointError)):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"{path}: field '{name}' cannot be restored ({type(e).__name__}: {first}); the file was edited or"
            " was not written by megdet train"
        ) from None


def _restore_training_state(state: TrainState, path: Path, ckpt: Checkpoint) -> None:
    """The optimizer, scheduler and scaler of the checkpoint, after checking that they fit this run."""
    cfg, config_yaml = state.cfg, state.out_dir / "config.yaml"
    with restoring(path, "schedule"):
        saved = (ckpt.schedule or {}).get("global_batch")
        saved = int(saved) if saved is not None else None
    if saved is not None and saved != state.schedule.global_batch:
        raise ConfigError(
            f"{path}: was trained with global batch {saved}, this run has {state.schedule.global_batch};"
            " resume with the same number of devices x data.images_per_device x train.grad_accum_steps"
        )
    saved_optimizer = (ckpt.config or {}).get("solver", {}).get("optimizer", cfg.solver.optimizer)
    if saved_optimizer != cfg.solver.optimizer:
        raise ConfigError(
            f"{path}: was trained with solver.optimizer={saved_optimizer}, this run has"
            f" {cfg.solver.optimizer}; resume with the same optimizer"
        )
    try:
        if ckpt.optimizer is None:
            raise KeyError("optimizer")
        state.optimizer.load_state_dict(ckpt.optimizer)
    except (ValueError, KeyError, TypeError, IndexError) as e:  # e.g. other trainable parameters
        raise CheckpointError(
            f"{path}: its optimizer state does not fit this run ({e}); resume with the settings it"
            f" was trained with ({config_yaml})"
        ) from None
    with restoring(path, "scheduler"):
        state.scheduler.load_state_dict(ckpt.scheduler)
    if state.scaler is not None and ckpt.scaler:
        with restoring(path, "scaler"):
            state.scaler.load_state_dict(ckpt.scaler)


def build_train_state(
    cfg: Config, *, rank: int, world_size: int, local_rank: int, device: torch.device, resume: bool = False
) -> TrainState:
    """Everything a training run needs, in the order of the module docstring (every rank calls this).

    Raises:
        ConfigError / CheckpointError: one line, e.g. a checkpoint that does not fit this run or a
            hand-edited field of it.
        DatasetError: a training image that is missing (checked before the first step).
    """
    from megdet.data.loader import build_train_dataset, build_train_loader
    from megdet.modeling.detector import load_model_state

    t = cfg.train
    cfg.validate_world_size(world_size)
    manager = CheckpointManager(t.out_dir, keep=t.keep_checkpoints)
    ckpt_path, ckpt, skipped = _resume_checkpoint(manager, resume)
    start_iter = int(ckpt.iteration) if ckpt is not None and ckpt.iteration is not None else 0

    model = _initial_model(cfg)
    if ckpt is not None:
        try:
            load_model_state(model, ckpt.model, strict=True)
        except ValueError as e:
            raise CheckpointError(
                f"{ckpt_path}: {e}; resume with the model settings it was trained with ({Path(t.out_dir) / 'config.yaml'})"
            ) from None
    amp = resolve_amp(t.amp, device)
    recomputed = prepare_for_training(model, cfg, device, amp)

    dataset = build_train_dataset(cfg, raw_images=True)
    if local_rank == 0:
        # A missing file fails now, not when the loader reaches it hours later. Every rank reads every
        # image over the epochs, so one full check per machine (its file system) is enough; the
        # launcher stops the other workers when this one fails.
        dataset.verify_images()
    loader = build_train_loader(
        cfg,
        rank,
        world_size,
        start_iter=start_iter * t.grad_accum_steps,
        dataset=dataset,
        raw_images=True,
        pin_memory=device.type == "cuda",  # page-locked: the copies of a step are asynchronous
    )
    schedule = schedule_for(cfg, world_size, len(loader.dataset))
    optimizer = build_optimizer(model, cfg.solver, schedule.lr, betas=schedule.betas)
    state = TrainState(
        cfg=cfg,
        rank=rank,
        world_size=world_size,
        device=device,
        model=model,
        net=model,
        params=[p for p in model.parameters() if p.requires_grad],
        optimizer=optimizer,
        scheduler=LRScheduler(optimizer, schedule, start_iter=start_iter),
        # fp16 needs loss scaling on any device (CPU too: how the scaler's path is tested without a GPU).
        scaler=torch.amp.GradScaler(device.type) if amp == "fp16" else None,
        amp=amp,
        schedule=schedule,
        loader=loader,
        categories=list(dataset.categories),
        recomputed=recomputed,
        checkpoints=manager,
        start_iter=start_iter,
        iteration=start_iter,
        resumed_from=ckpt_path,
        skipped_checkpoints=skipped,
        last_checkpoint=ckpt_path,
        resume_rng=ckpt.rng if ckpt is not None else None,
    )
    if ckpt is not None and ckpt_path is not None:
        _restore_training_state(state, ckpt_path, ckpt)
    state.net = wrap_ddp(model, device, local_rank, world_size)
    return state
