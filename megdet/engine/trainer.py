"""The training loop: data-parallel, large mini-batch, resumable, with evaluation during training.

One call, :func:`train`, runs a whole training job in every worker process (or the only process):
:func:`~megdet.engine.setup.build_train_state` sets the run up, :class:`Trainer` runs the loop and the
hooks of :mod:`megdet.engine.hooks` do everything around the steps (metrics, checkpoints, evaluation,
signals, the final weights).

Per iteration: ``grad_accum_steps`` micro-batches of ``data.images_per_device`` images are forwarded
and back-propagated, each micro-step loss divided by ``grad_accum_steps`` so that, with
DistributedDataParallel averaging over ranks, the gradient is that of the mean loss over the *global*
batch (MegDet: normalise by the global batch, not the per-device one). DDP's gradient all-reduce runs
only on the last micro-step (``no_sync`` before). The losses are averaged over the ranks on the
device and read one step later (logging and the non-finite-loss guard); a stop flag (SIGTERM /
SIGINT) is summed over the ranks on the host in every step. Either way every rank takes the same
decision at the same iteration, so no rank is left waiting in a collective.

Resuming (``resume=True``) restores the model, optimizer, lr scheduler, gradient scaler, iteration,
data position and every rank's RNG states from the newest checkpoint in ``train.out_dir``. Because the
data stream is a function of (seed, rank, iteration) and evaluation runs under a forked RNG, a run
stopped at a checkpoint and resumed ends, on CPU, with bit-identical weights to an uninterrupted run.

Rank 0 writes into ``train.out_dir``: ``config.yaml`` (resolved), ``lr_schedule.png``,
``metrics.jsonl`` (one JSON line per ``train.log_period`` iterations, plus ``{"iter", "eval"}``
lines), TensorBoard events in ``tb/``, ``model_XXXXXXX.pt`` checkpoints with ``last_checkpoint``,
``eval/iter_XXXXXXX/`` COCO results, and for a finished run ``model_final.pt`` and ``summary.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from megdet.config import Config, dump_config
from megdet.data.errors import DatasetError
from megdet.distributed import (
    all_gather_object,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    init_distributed,
)
from megdet.engine.hooks import (
    FinalWeights,
    Hook,
    MetricsWriter,
    PeriodicCheckpointer,
    PeriodicEvaluator,
    RunLog,
    StepResult,
    StepValues,
    StopOnSignal,
    StopReporter,
)
from megdet.engine.lagged import LaggedReader, Pending
from megdet.engine.lr_policy import plot_schedule
from megdet.engine.run_folder import RunFolderError, RunLock, prepare_run_folder
from megdet.engine.setup import TrainState, build_train_state
from megdet.files import WriteError, write_text_atomic


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the run stopped without saving. The message is one line."""


# --------------------------------------------------------------------------------------------------
# One iteration
# --------------------------------------------------------------------------------------------------


def _autocast(amp: str, device_type: str) -> contextlib.AbstractContextManager:
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)


def forward_backward(
    model: nn.Module,
    batches: Sequence[Any],
    *,
    device: torch.device,
    amp: str = "off",
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, torch.Tensor]:
    """Forward + backward of every micro-batch, gradients summed in ``.grad`` (not zeroed here).

    Each micro-step's total loss is divided by ``len(batches)``, so the accumulated gradient is that
    of the mean loss over all micro-batches. With a DDP-wrapped ``model`` the gradient all-reduce runs
    only on the last micro-step. Returns each loss term (and ``total_loss``) averaged over the
    micro-steps as detached float32 scalars on the device: nothing here waits for the device.
    """
    steps = len(batches)
    sums: dict[str, torch.Tensor] = {}
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
        for k, v in [*losses.items(), ("total_loss", total)]:
            v = v.detach().float()
            sums[k] = sums[k] + v if k in sums else v
    return sums if steps == 1 else {k: v / steps for k, v in sums.items()}


def accumulate_gradients(model: nn.Module, batches: Sequence[Any], **kwargs: Any) -> dict[str, float]:
    """:func:`forward_backward` (the same arguments) with the losses read as Python floats (on CUDA:
    after the device has finished the step)."""
    return {k: float(v) for k, v in forward_backward(model, batches, **kwargs).items()}


def apply_update(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    *,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float = 0.0,
) -> torch.Tensor | None:
    """Optional gradient clipping, then the optimizer step (through the scaler for fp16).

    Returns the gradient norm before clipping (a device scalar, not read here) when clipping is on,
    else None.
    """
    norm = None
    if grad_clip > 0:
        if scaler is not None:
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip).detach()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return norm


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def _format_losses(values: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.6g}" for k, v in values.items())


class Trainer:
    """Runs the loop of a set-up run: step, reduce, stop decision; everything else is ``hooks``.

    A step's losses stay on the device: they are averaged over the ranks there and read on the host
    one step later (:class:`~megdet.engine.lagged.LaggedReader`), after the next step's forward and
    backward have been queued, so that on a GPU reading them never drains the queue. The non-finite
    loss guard therefore acts before the *next* update; before anything is saved or evaluated the
    hooks call ``step.settle()``, which reads every pending value, so no checkpoint or evaluation
    ever holds an unchecked step. The stop flag is summed on the host, in the step itself.
    """

    def __init__(self, state: TrainState, hooks: Sequence[Hook]) -> None:
        self.state = state
        self.hooks = list(hooks)
        self.reader = LaggedReader()
        self._loss_keys: list[str] | None = None

    def train(self) -> None:
        """Iterates until ``total_iters`` or a stop decision, calling the hooks around every step."""
        state = self.state
        try:
            for hook in self.hooks:
                hook.before_train(state)
            while state.iteration < state.total_iters:
                for hook in self.hooks:
                    hook.before_step(state)
                step = self.run_step()
                for hook in self.hooks:
                    hook.after_step(state, step)
                if step.stop:
                    state.interrupted = True
                    break
            self.settle()
            for hook in self.hooks:
                hook.after_train(state)
        finally:
            for hook in reversed(self.hooks):
                hook.close()

    def next_batches(self) -> list[Any]:
        """The next micro-batches. An unreadable image (DatasetError, also re-raised from a loader worker
        with its traceback) first saves a checkpoint of the iterations done since the last one, then
        stops the run with one line; with several ranks all learn of it (a small all-reduce) and stop
        together."""
        s = self.state
        batches, error = [], None
        try:
            batches = s.next_batches()
        except DatasetError as e:
            lines = [line for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
            error = lines[-1].split("DatasetError: ", 1)[-1]  # a worker's traceback ends with the message
        if s.world_size > 1 and all_reduce_sum([0.0 if error is None else 1.0])[0] > 0 and error is None:
            error = "another rank met an unreadable image (see its message)"
        if error is None:
            return batches
        saved_now = s.iteration != s.start_iter and s.last_checkpoint != s.checkpoints.path_for(s.iteration)
        if saved_now:
            self.settle()
            PeriodicCheckpointer.save(s)
        kept = f"the last checkpoint is {s.last_checkpoint}" if s.last_checkpoint else "no checkpoint was written"
        if saved_now:
            kept = f"saved {s.last_checkpoint}"
        raise DatasetError(
            f"{error} (at iteration {s.iteration + 1}; {kept}: fix or remove the image, then continue with --resume)"
        )

    def run_step(self) -> StepResult:
        """One optimizer step over ``train.grad_accum_steps`` micro-batches. Before its update, the
        previous step's values are read (raising :class:`NonFiniteLossError` for a non-finite loss);
        this step's are queued for the next one."""
        s, t = self.state, self.state.cfg.train
        lr = s.optimizer.param_groups[0]["lr"]
        s.optimizer.zero_grad(set_to_none=True)
        data_start = time.perf_counter()
        batches = self.next_batches()
        data_time = time.perf_counter() - data_start
        losses = forward_backward(s.net, batches, device=s.device, amp=s.amp, scaler=s.scaler)
        stop = all_reduce_sum([1.0 if s.stop_signal else 0.0])[0] > 0
        self.settle()  # only the previous step is pending: its work is done, this step's is queued
        grad_norm = apply_update(s.optimizer, s.params, scaler=s.scaler, grad_clip=t.grad_clip)
        self._loss_keys = self._loss_keys or sorted(losses)
        values = [losses[k] for k in self._loss_keys] + ([grad_norm.float()] if grad_norm is not None else [])
        self.reader.push(s.iteration + 1, all_reduce_mean(torch.stack(values)), info=(lr, batches))
        s.scheduler.step()
        s.iteration += 1
        return StepResult(lr, data_time, stop=stop, settle=self.settle)

    def settle(self) -> None:
        """Reads every step's pending values now (waiting for the device), checks and delivers them."""
        self._deliver(self.reader.pop())

    def _deliver(self, entries: Sequence[tuple[Pending, list[float]]]) -> None:
        """Checks read values for non-finite losses, then hands them to the hooks (``after_values``)."""
        keys = self._loss_keys or []
        for entry, values in entries:
            losses = dict(zip(keys, values))
            grad_norm = values[len(keys)] if len(values) > len(keys) else None
            if not all(math.isfinite(v) for v in losses.values()):
                self._raise_non_finite(entry, losses)
            step_values = StepValues(entry.iteration, entry.info[0], losses, grad_norm)
            for hook in self.hooks:
                hook.after_values(self.state, step_values)

    def _raise_non_finite(self, entry: Pending, losses: Mapping[str, float]) -> None:
        from megdet.data.validate import describe_batch_data

        s = self.state
        lr, batches = entry.info
        good = f"last good checkpoint: {s.last_checkpoint}" if s.last_checkpoint else "no checkpoint was written"
        raise NonFiniteLossError(
            f"non-finite loss at iteration {entry.iteration}: {_format_losses(losses)};"
            f" {describe_batch_data(batches, s.dataset)}; lr={lr:.6g}; stopped without saving ({good});"
            " lower solver.base_lr, lengthen the warmup or set train.grad_clip"
        )


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def open_run_log(state: TrainState, resume: bool = False) -> RunLog:
    """Rank 0 writes ``config.yaml`` and ``lr_schedule.png``; every rank gets the run's log (a no-op
    except on rank 0), which says what the run is about to do."""
    cfg, t, out_dir = state.cfg, state.cfg.train, state.out_dir
    if state.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "config.yaml", dump_config(cfg))
        plot_schedule(state.schedule, out_dir / "lr_schedule.png")
    barrier()
    log = RunLog(out_dir, state.main, state.start_iter, state.total_iters)
    log.info(
        f"megdet train: {state.device.type} x {state.world_size}, norm {cfg.model.norm}, amp {state.amp}"
        f"{' (train.amp=auto)' if t.amp == 'auto' else ''}, "
        f"sublinear memory {t.sublinear_memory} ({len(state.recomputed)} recomputed blocks), out_dir {out_dir}"
    )
    for line in state.schedule.summary_lines():
        log.info(f"  {line}")
    if state.amp == "fp16" and state.device.type == "cpu":
        log.info("  note: fp16 on CPU runs on slow fallback kernels on most CPUs; train.amp=bf16 is the fast choice")
    for problem in state.skipped_checkpoints:
        log.info(f"  --resume: skipped an unreadable checkpoint: {problem}")
    if state.resumed_from is not None:
        fallback = " (the newest readable checkpoint)" if state.skipped_checkpoints else ""
        log.info(f"  resumed from {state.resumed_from}{fallback} at iteration {state.start_iter}")
    elif resume:
        log.info(f"  --resume: no checkpoint in {out_dir}; starting from scratch")
    return log


def _lock_run_folder(cfg: Config, resume: bool, overwrite: bool, rank: int, world: int) -> RunLock | None:
    """Rank 0 prepares and locks the run folder (:func:`prepare_run_folder`); every rank fails alike."""
    lock, problem = None, None
    if rank == 0:
        try:
            lock = prepare_run_folder(cfg.train.out_dir, resume=resume, overwrite=overwrite)
        except (RunFolderError, WriteError) as e:
            if world == 1:
                raise
            problem = str(e)
    if world > 1:
        problem = all_gather_object(problem)[0]
        if problem is not None:
            if lock is not None:
                lock.release()
            raise RunFolderError(problem)
    return lock


def train(cfg: Config, resume: bool = False, hooks: Sequence[Hook] = (), overwrite: bool = False) -> dict[str, Any]:
    """Trains the detector described by ``cfg`` in this process (one rank of a launcher's world, or alone).

    Args:
        cfg: the resolved config.
        resume: continue from the newest readable checkpoint in ``cfg.train.out_dir`` (start fresh if
            there is none). Without it (or ``overwrite``), an ``out_dir`` that holds an earlier run is refused.
        hooks: more hooks, called after the default ones (:mod:`megdet.engine.hooks`).
        overwrite: delete the earlier run's checkpoints, ``model_final.pt`` and logs in ``out_dir`` first.

    Returns:
        A summary: ``iteration``, ``total_iters``, ``losses`` (last logged window, averaged over ranks),
        ``checkpoint`` (path of the last checkpoint written), ``eval`` (rank 0's last results or None),
        ``interrupted`` (True when SIGTERM or SIGINT stopped the run early, after saving), ``signal``
        (that signal's number, else None), ``out_dir`` and ``schedule``.

    Raises:
        ConfigError: bad configuration, or a run folder locked by another run or holding one (one line).
        DatasetError: an unreadable image met during training, after saving a checkpoint.
        megdet.files.WriteError: a checkpoint or config write failed (e.g. a full disk); the previous
            checkpoint is intact.
        NonFiniteLossError: a loss became NaN/inf; nothing was saved for that iteration.
    """
    created_group = not torch.distributed.is_initialized()
    cfg.validate()
    rank, world, local_rank, device = init_distributed(device=cfg.train.device)
    lock: RunLock | None = None
    try:
        cfg.validate_world_size(world)  # before the run folder is created
        lock = _lock_run_folder(cfg, resume, overwrite, rank, world)
        state = build_train_state(cfg, rank=rank, world_size=world, local_rank=local_rank, device=device,
                                  resume=resume)  # fmt: skip
        try:
            log = open_run_log(state, resume)
            metrics, evaluator = MetricsWriter(log), PeriodicEvaluator(log)
            default = [StopOnSignal(), metrics, PeriodicCheckpointer(), StopReporter(log), FinalWeights(), evaluator]
            note = state.start_streams()
            if note:
                log.info(f"  ({note})")
            try:
                Trainer(state, [*default, *hooks]).train()
            finally:
                log.close()
        finally:
            state.close()
        return {
            "iteration": state.iteration,
            "total_iters": state.total_iters,
            "losses": metrics.losses(),
            "checkpoint": str(state.last_checkpoint) if state.last_checkpoint is not None else None,
            "eval": evaluator.results if state.main else None,
            "interrupted": state.interrupted,
            "signal": (state.stop_signal or signal.SIGTERM) if state.interrupted else None,
            "out_dir": str(state.out_dir),
            "schedule": dataclasses.asdict(state.schedule),
        }
    finally:
        if lock is not None:
            lock.release()
        if created_group:
            cleanup_distributed()
