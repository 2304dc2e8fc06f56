"""What happens around the training loop's steps, as hooks (detectron2's pattern).

:class:`~megdet.engine.trainer.Trainer` calls, on every hook in order, ``before_train(state)``, then per
iteration ``before_step(state)`` and ``after_step(state, step)``, then ``after_train(state)`` when the
loop ends without an exception, and ``close()`` always. A step's losses reach the hooks through
``after_values(state, values)`` (:class:`StepValues`) once they have been read from the device: one
step later, or earlier when a hook calls ``step.settle()`` (every hook that saves or evaluates does,
so that what it saves has passed the non-finite-loss guard). The default hooks, in their order:

- :class:`StopOnSignal`: SIGTERM or SIGINT (Ctrl-C) sets ``state.stop_signal``; the loop turns it into a
  decision every rank takes at the same iteration (a host all-reduce in every step). Later signals,
  e.g. during the checkpoint write, change nothing.
- :class:`MetricsWriter`: the progress bar, ``metrics.jsonl`` and TensorBoard (rank 0).
- :class:`PeriodicCheckpointer`: a checkpoint every ``train.checkpoint_period`` iterations, at the end
  and when stopping.
- :class:`StopReporter`: says where a stopped run saved.
- :class:`FinalWeights`: ``model_final.pt`` and ``summary.json`` of a finished run, before the final
  evaluation (a crash in it loses no weights).
- :class:`PeriodicEvaluator`: evaluation every ``test.eval_period`` iterations and at the end.

Everything a run writes comes from rank 0 (:class:`RunLog` is a no-op elsewhere).
"""

from __future__ import annotations

import dataclasses
import json
import resource
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megdet.config import Config
from megdet.data.layout import split_files
from megdet.distributed import barrier
from megdet.engine.setup import TrainState
from megdet.files import WriteError, write_text_atomic

__all__ = [
    "FinalWeights",
    "Hook",
    "MetricsWriter",
    "PeriodicCheckpointer",
    "PeriodicEvaluator",
    "RunLog",
    "StepResult",
    "StepValues",
    "StopOnSignal",
    "StopReporter",
    "memory_mb",
]


@dataclass
class StepResult:
    """What one iteration of the loop produced (the same on every rank, except ``data_time``)."""

    lr: float  # the learning rate the step used
    data_time: float  # seconds this rank waited for its batches
    stop: bool  # some rank asked to stop: every rank stops after this iteration
    # Reads (and checks) the losses of every step so far now: call it before saving or evaluating.
    settle: Callable[[], None] = lambda: None


@dataclass
class StepValues:
    """One iteration's values once read from the device (one step late, or at a settle)."""

    iteration: int
    lr: float  # the learning rate the step used
    losses: dict[str, float]  # each term and total_loss, averaged over the micro-batches and ranks; finite
    grad_norm: float | None  # before clipping, with train.grad_clip


class Hook:
    """Does nothing at every point; subclasses override what they need."""

    def before_train(self, state: TrainState) -> None:
        pass

    def before_step(self, state: TrainState) -> None:
        pass

    def after_step(self, state: TrainState, step: StepResult) -> None:
        pass

    def after_values(self, state: TrainState, values: StepValues) -> None:
        """An iteration's losses and gradient norm, read from the device."""

    def after_train(self, state: TrainState) -> None:
        pass

    def close(self) -> None:
        """Called last, also when the loop raised."""


def _finished(state: TrainState) -> bool:
    return state.iteration >= state.total_iters


# --------------------------------------------------------------------------------------------------
# Rank 0's outputs
# --------------------------------------------------------------------------------------------------


def memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocated on GPU, resident set size of this process on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20  # KiB on Linux, bytes on macOS


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


class RunLog:
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
        scalars = {
            k if k.startswith("loss") or k == "total_loss" else f"train/{k}": v
            for k, v in values.items()
            if isinstance(v, (int, float)) and k != "time"
        }
        self._write(iteration, {"iter": iteration, **values}, scalars)

    def record_eval(self, iteration: int, results: Mapping[str, Any]) -> None:
        if not self.main:
            return
        stats = {task: r.get("stats", r) for task, r in results.items()}
        scalars = {
            f"eval/{task}/{k}": v
            for task, values in stats.items()
            for k, v in values.items()
            if isinstance(v, (int, float)) and v >= 0
        }
        self._write(iteration, {"iter": iteration, "eval": stats}, scalars)

    def _write(self, iteration: int, line: Mapping[str, Any], scalars: Mapping[str, float]) -> None:
        """One metrics.jsonl line and its TensorBoard scalars; a failed write (a full disk) is a
        :class:`WriteError` naming the file, not a traceback."""
        target = self.metrics_path
        try:
            self.metrics.write(json.dumps(line) + "\n")
            self.metrics.flush()
            target = self.metrics_path.parent / "tb"
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, iteration)
            self.tb.flush()
        except OSError as e:
            raise WriteError(
                f"{target}: {e.strerror or e} (iteration {iteration}); free space, then continue with --resume"
            ) from None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.main:
            self.metrics.close()
            self.tb.close()


# --------------------------------------------------------------------------------------------------
# The hooks
# --------------------------------------------------------------------------------------------------


class StopOnSignal(Hook):
    """Turns SIGTERM and SIGINT (Ctrl-C) into ``state.stop_signal``, read by the loop after every step
    (main thread only). The first signal decides; later ones (a second Ctrl-C, a scheduler's repeated
    SIGTERM while the checkpoint is written) change nothing, so the save completes."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}

    def before_train(self, state: TrainState) -> None:
        def handle(signum: int, frame: Any) -> None:
            if state.stop_signal is None:
                state.stop_signal = signum

        try:
            self._previous = {s: signal.signal(s, handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread: leave signals alone
            self._previous = {}

    def close(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}


class MetricsWriter(Hook):
    """Every iteration the progress bar (showing the newest losses read, one step old); every
    ``train.log_period`` iterations (and the last) a line of window averages in ``metrics.jsonl`` and
    TensorBoard: losses, lr, gradient norm, images/s, the time spent waiting for data (more than a
    few % means data.num_workers is too low), peak memory. A line is written when its iteration's
    losses have been read."""

    def __init__(self, log: RunLog) -> None:
        self.log = log
        self.last_logged: dict[str, float] = {}
        self._latest: dict[str, float] = {}
        self._window: dict[str, float] = {}
        self._values = 0  # iterations whose losses are in the window
        self._steps, self._data_s, self._ips = 0, 0.0, 0.0  # timing window, by steps run
        self._window_start = self._run_start = time.perf_counter()

    def before_train(self, state: TrainState) -> None:
        self._window_start = self._run_start = time.perf_counter()

    def after_step(self, state: TrainState, step: StepResult) -> None:
        self._steps += 1
        self._data_s += step.data_time
        self._ips = self._steps * state.schedule.global_batch / max(time.perf_counter() - self._window_start, 1e-9)
        mem = memory_mb(state.device)
        self.log.progress({**self._latest, "lr": step.lr, "img/s": self._ips, "mem_mb": mem})

    def after_values(self, state: TrainState, values: StepValues) -> None:
        self._latest = dict(values.losses)
        grad_norm = [("grad_norm", values.grad_norm)] if values.grad_norm is not None else []
        for k, v in [*values.losses.items(), *grad_norm]:
            self._window[k] = self._window.get(k, 0.0) + v
        self._values += 1
        iteration = values.iteration
        if iteration % state.cfg.train.log_period == 0 or iteration >= state.total_iters:
            self.last_logged = {k: v / self._values for k, v in self._window.items()}
            record = {
                "lr": values.lr,
                **self.last_logged,
                "images_per_s": self._ips,
                "data_time": self._data_s / max(self._steps, 1),
                "memory_mb": memory_mb(state.device),
                "time": time.perf_counter() - self._run_start,
            }
            try:
                self.log.record(iteration, record)
            except WriteError as e:
                raise WriteError(f"{e}; the last good checkpoint is {state.last_checkpoint or 'none yet'}") from None
            self._window, self._values, self._steps, self._data_s = {}, 0, 0, 0.0
            self._window_start = time.perf_counter()

    def losses(self) -> dict[str, float]:
        """The last logged window's averages, else those of the window so far."""
        if not self.last_logged and self._values:
            return {k: v / self._values for k, v in self._window.items()}
        return self.last_logged


class PeriodicCheckpointer(Hook):
    """A resumable checkpoint every ``train.checkpoint_period`` iterations, at the last iteration and
    when the run stops early; a run resumed at (or past) its end still leaves its final checkpoint.
    Writing is a collective (every rank's RNG states); rank 0 writes the file."""

    def after_step(self, state: TrainState, step: StepResult) -> None:
        if state.iteration % state.cfg.train.checkpoint_period == 0 or _finished(state) or step.stop:
            step.settle()
            self.save(state)

    def after_train(self, state: TrainState) -> None:
        if _finished(state) and state.last_checkpoint != state.checkpoints.path_for(state.iteration):
            self.save(state)

    @staticmethod
    def save(state: TrainState) -> Path:
        checkpoint = state.checkpoint()  # a collective: every rank builds it
        path = state.checkpoints.path_for(state.iteration)
        if state.main:
            try:
                path = state.checkpoints.save(state.iteration, checkpoint.to_dict())
            except WriteError as e:
                raise WriteError(f"{e}; the last good checkpoint is {state.last_checkpoint or 'none yet'}") from None
        barrier()
        state.last_checkpoint = path
        return path


class StopReporter(Hook):
    """Says which checkpoint a stopped run left (after :class:`PeriodicCheckpointer` wrote it)."""

    def __init__(self, log: RunLog) -> None:
        self.log = log

    def after_step(self, state: TrainState, step: StepResult) -> None:
        if step.stop:
            name = signal.Signals(state.stop_signal or signal.SIGTERM).name
            self.log.info(f"{name}: saved {state.last_checkpoint} at iteration {state.iteration}; stopping")


def evaluation_unavailable(cfg: Config) -> str | None:
    """None when evaluation during training can run, else why not (one line)."""
    if cfg.test.eval_period < 0:
        return "test.eval_period < 0"
    ann = split_files(cfg.data.root, cfg.data.val_split).instances
    if not ann.is_file():
        return f"{ann} not found"
    return None


class PeriodicEvaluator(Hook):
    """COCO evaluation of ``data.val_split`` every ``test.eval_period`` iterations (0: only at the end) and
    at the last iteration, not when stopping early; results in ``eval/iter_XXXXXXX/``, the table in the
    log and the stats in ``metrics.jsonl``.

    Every rank evaluates its shard with rank 0's buffers, i.e. exactly the model that rank 0
    checkpoints. Otherwise plain-BN replicas differ by their last local statistics update (DDP syncs
    buffers before a forward, not after), as do cross-device BN groups smaller than the world. Only
    evaluation reads running statistics, so training is unaffected; it also runs under a forked RNG.
    """

    def __init__(self, log: RunLog) -> None:
        self.log = log
        self.results: dict[str, Any] | None = None
        self.unavailable: str | None = None

    def before_train(self, state: TrainState) -> None:
        self.unavailable = evaluation_unavailable(state.cfg)

    def after_step(self, state: TrainState, step: StepResult) -> None:
        if step.stop:
            return
        period = state.cfg.test.eval_period
        due = (period > 0 and state.iteration % period == 0) or _finished(state)
        if due and self.unavailable is None:
            step.settle()
            self.results = self.evaluate(state)
        elif _finished(state) and self.unavailable is not None:
            self.log.info(f"evaluation skipped: {self.unavailable}")

    def evaluate(self, state: TrainState) -> dict[str, Any]:
        from megdet.evaluation.coco_eval import format_eval_table
        from megdet.evaluation.inference import evaluate_model

        if state.world_size > 1:
            for buffer in state.model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        results = evaluate_model(
            state.model,
            state.cfg,
            out_dir=state.out_dir / "eval" / f"iter_{state.iteration:07d}",
            rank=state.rank,
            world_size=state.world_size,
            progress=False,
        )
        if state.main and results:
            self.log.info(f"evaluation at iteration {state.iteration}:\n{format_eval_table(results)}")
            self.log.record_eval(state.iteration, results)
        return results


class FinalWeights(Hook):
    """A finished run's ``model_final.pt`` (the model, its config and categories only: what ``megdet
    eval/predict --weights`` take, under a stable name) and ``summary.json``; rank 0. Written after the
    last step, before the final evaluation (:class:`PeriodicEvaluator` comes after this hook), and at the
    end of a run resumed at its end."""

    def __init__(self) -> None:
        self.written = False

    def after_step(self, state: TrainState, step: StepResult) -> None:
        if _finished(state) and not step.stop:
            step.settle()
            self.after_train(state)

    def after_train(self, state: TrainState) -> None:
        if self.written or not state.main or state.interrupted or state.last_checkpoint is None:
            return
        self.written = True
        from megdet.checkpoint import save_checkpoint

        save_checkpoint(state.out_dir / "model_final.pt", state.weights().to_dict())
        summary = {"iteration": state.iteration, "checkpoint": str(state.last_checkpoint),
                   **dataclasses.asdict(state.schedule)}  # fmt: skip
        write_text_atomic(state.out_dir / "summary.json", json.dumps(summary, indent=2, default=str))
