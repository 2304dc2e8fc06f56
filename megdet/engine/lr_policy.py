"""The large learning-rate policy: linear scaling, gradual warmup, step or cosine decay.

Everything is resolved once, by the pure function :func:`resolve_schedule`, into a
:class:`ScheduleInfo`; :func:`lr_at` then gives the learning rate of any iteration.

Scaling with the batch (``solver.lr_scaling``)
    ``global_batch = world_size x images_per_device x grad_accum_steps``, ``k = global_batch /
    solver.reference_batch`` and ``lr = solver.base_lr x s(k)``:

    - ``linear``, ``s(k) = k``: SGD (Goyal et al. 2017; MegDet derives it from keeping the variance of
      the weight update constant). k small steps of SGD move the weights by about the sum of k
      gradients times the lr, which one step of the k-times larger batch matches with k times the lr.
    - ``sqrt``, ``s(k) = sqrt(k)``: Adam-type optimizers (Malladi et al. 2022). Adam divides by the
      gradient's running RMS, so its step does not grow with the gradient's mean the way SGD's does;
      what a larger batch changes is the gradient *noise*, whose variance falls as 1/k. Keeping the
      noise that the update injects per image constant, as the stochastic differential equation
      argument of that paper does, gives the square root. Linear scaling of AdamW over-steps at large
      batches (BENCHMARKS.md, the large-batch study).
    - ``none``: ``s(k) = 1`` (the ablation).
    - ``auto`` (default): linear for ``sgd`` and ``lars``, sqrt for ``adamw`` and ``lamb``.

    ``solver.scale_betas`` completes Malladi et al.'s rule for Adam-type optimizers: ``1 - beta`` is
    multiplied by k as well (clamped to [0, 1)), so that the averaging windows span the same number of
    *images* at every batch.

Length in epochs
    ``solver.epochs`` and ``solver.decay_epochs`` are in passes over the training set, so running on
    more devices keeps the epochs and divides the iterations: ``total_iters = round(epochs x
    iters_per_epoch)`` with ``iters_per_epoch`` the data sampler's. A positive ``train.max_iters``
    replaces the total, and the decays keep their *fraction* of the run (``decay_epoch / epochs``).

Warmup (``solver.warmup = true``)
    The lr rises linearly, every iteration, from ``warmup_factor x lr`` at iteration 0 to exactly
    ``lr`` at iteration ``warmup_iters``. With ``solver.warmup_iters = -1`` the length follows the
    *images* rule::

        warmup_iters = min(max(ceil(WARMUP_IMAGES / global_batch), MIN_WARMUP_ITERS),
                           max(1, floor(MAX_WARMUP_FRACTION x total_iters)))

    with ``WARMUP_IMAGES = 16,000`` (detectron2's 1000 iterations at the reference batch of 16),
    ``MIN_WARMUP_ITERS = 50`` and ``MAX_WARMUP_FRACTION = 0.5``. Why this is safe at a large batch,
    where the peak lr is higher:

    - Warmup exists because the linear scaling rule ("one step of batch kn at lr k*eta ~= k steps of
      batch n at lr eta") holds only while the weights change little over those k small steps, which
      is false early in training. Holding the warmup constant in *images* (Goyal et al.'s "5 epochs at
      every batch size" is the same rule stated in epochs) means that after any number of images seen,
      the lr is the same fraction of its peak at every batch size. The lr per image
      (``lr / global_batch``, the quantity linear scaling keeps constant) therefore follows exactly the
      curve of the validated batch-16 recipe: a large-batch run takes fewer, proportionally larger
      steps, and is never more aggressive per image than the reference.
    - The floor of 50 iterations binds above a batch of 320 (16,000 / 50), where a fixed image count
      would leave so few steps that one step could raise the lr by more than 2% of its peak. There it
      lengthens the warmup in images (more conservative), never shortens it.
    - The cap of half the run binds only for runs shorter than two warmups (32,000 images; 100
      iterations where the floor applies): short runs and toy data sets, which would otherwise spend
      all of their iterations warming up. Half rather than a quarter: where the cap binds, the images
      rule asks for more warmup than the run has, and at a large batch such a run has few steps; on the
      demo recipe at batch 128 (128 steps) a warmup of 64 steps gave 28.8 box AP where 32 gave 17 and
      16 gave 8.6, and at batch 8 half cost nothing (BENCHMARKS.md, the large-batch study). A run that
      wants another warmup sets ``solver.warmup_iters`` explicitly; an explicit value >= 0 is used as
      is (0: no warmup).

Decay
    ``step``: at each ``decay_iters[i]`` the lr is multiplied by ``decay_factors[i]``, cumulatively
    (MegDet: /10, /10, /2). Fewer decay epochs than factors use the first factors. ``cosine``: after
    warmup, half a cosine from ``lr`` down to ``min_lr_factor x lr`` at ``total_iters``. Warmup and
    decay multiply, so a decay inside the warmup also applies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megdet.config import ConfigError, SolverConfig
from megdet.engine.layerwise import LAMB, LARS
from megdet.files import atomic_write

WARMUP_IMAGES = 16_000
MIN_WARMUP_ITERS = 50
MAX_WARMUP_FRACTION = 0.5
ADAPTIVE_OPTIMIZERS = ("adamw", "lamb")  # Adam-type: square-root scaling under lr_scaling=auto


@dataclass
class ScheduleInfo:
    """A fully resolved learning-rate schedule (plain numbers only, so it can go into checkpoints)."""

    world_size: int
    images_per_device: int
    grad_accum_steps: int
    global_batch: int
    base_lr: float
    reference_batch: int
    lr: float  # the scaled peak learning rate
    num_images: int
    iters_per_epoch: int
    epochs: float  # effective length of the run: total_iters / iters_per_epoch
    total_iters: int
    warmup_iters: int
    warmup_start_lr: float
    decay_iters: list[int] = field(default_factory=list)
    decay_factors: list[float] = field(default_factory=list)  # one per decay_iters entry
    policy: str = "step"
    min_lr: float = 0.0  # cosine end value
    warmup_rule: str = ""  # how warmup_iters was chosen, in words
    optimizer: str = "sgd"
    lr_scaling: str = "linear"  # the rule applied (auto resolved)
    betas: list[float] = field(default_factory=list)  # adamw / lamb: the betas used at this batch

    def summary_lines(self) -> list[str]:
        """Human-readable lines: what a run prints at start-up and ``--print-config`` shows."""
        decays = ", ".join(f"{i} (x{f:g})" for i, f in zip(self.decay_iters, self.decay_factors)) or "none"
        if self.policy == "cosine":
            decays = f"cosine to {self.min_lr:.6g} at iteration {self.total_iters}"
        ratio = f"{self.global_batch} / {self.reference_batch}"
        factor = {"linear": ratio, "sqrt": f"sqrt({ratio})", "none": "1"}[self.lr_scaling]
        why = {
            "linear": "linear scaling (Goyal et al. 2017)",
            "sqrt": "square-root scaling for Adam-type optimizers (Malladi et al. 2022)",
            "none": "solver.lr_scaling=none",
        }[self.lr_scaling]
        lines = [
            f"world size: {self.world_size} device(s) x {self.images_per_device} image(s)"
            f" x {self.grad_accum_steps} accumulation step(s) = global batch {self.global_batch}",
            f"learning rate: {self.base_lr:g} x {factor} = {self.lr:.6g} ({self.optimizer}, {why})",
        ]
        if self.betas:
            lines.append(f"betas: {', '.join(f'{b:.6g}' for b in self.betas)}")
        return lines + [
            f"iterations: {self.total_iters} total, {self.iters_per_epoch} per epoch"
            f" ({self.num_images} images, {self.epochs:.4g} epochs)",
            f"warmup: {self.warmup_iters} iterations from {self.warmup_start_lr:.6g} ({self.warmup_rule})",
            f"decay ({self.policy}): {decays}",
        ]


def _iters_per_epoch(num_images: int, global_batch: int) -> int:
    # The data sampler defines what an epoch is (how it shards and whether it drops a remainder).
    from megdet.data.sampler import iters_per_epoch

    return int(iters_per_epoch(num_images, global_batch))


def resolve_schedule(
    solver_cfg: SolverConfig,
    world_size: int,
    images_per_device: int,
    grad_accum_steps: int,
    num_images: int,
    max_iters: int = -1,
) -> ScheduleInfo:
    """Resolves the solver config for a given number of devices into concrete iterations and lrs.

    Args:
        solver_cfg: the ``solver`` section.
        world_size: number of data-parallel processes (devices).
        images_per_device: ``data.images_per_device``.
        grad_accum_steps: ``train.grad_accum_steps`` (micro-batches per optimizer step).
        num_images: training images per epoch (the training data set's length).
        max_iters: ``train.max_iters``; positive values replace the length derived from the epochs.

    Raises:
        ConfigError: a ``solver.*`` value no schedule can be built from (:meth:`SolverConfig.validate`),
            or a training split without images; one line naming the key.
        ValueError: a count below 1 (``max_iters``: -1 or >= 1).
    """
    s = solver_cfg
    _check_counts(world_size, images_per_device, grad_accum_steps, num_images, max_iters)
    s.validate()
    decay_epochs = list(s.decay_epochs) if s.policy == "step" else []
    global_batch = world_size * images_per_device * grad_accum_steps
    scaling = scaling_rule(s)
    lr = s.base_lr * batch_factor(scaling, global_batch / s.reference_batch)
    ipe = max(1, _iters_per_epoch(num_images, global_batch))
    total, decay_iters = _run_length(s, decay_epochs, ipe, max_iters)
    warmup, rule = _warmup_length(s, global_batch, total)
    return ScheduleInfo(
        world_size=world_size,
        images_per_device=images_per_device,
        grad_accum_steps=grad_accum_steps,
        global_batch=global_batch,
        base_lr=s.base_lr,
        reference_batch=s.reference_batch,
        lr=lr,
        num_images=num_images,
        iters_per_epoch=ipe,
        epochs=total / ipe,
        total_iters=total,
        warmup_iters=warmup,
        warmup_start_lr=lr * s.warmup_factor if warmup > 0 else lr,
        decay_iters=decay_iters,
        decay_factors=[float(f) for f in s.decay_factors[: len(decay_epochs)]],
        policy=s.policy,
        min_lr=lr * s.min_lr_factor if s.policy == "cosine" else 0.0,
        warmup_rule=rule,
        optimizer=s.optimizer,
        lr_scaling=scaling,
        betas=scaled_betas(s, global_batch) if s.optimizer in ADAPTIVE_OPTIMIZERS else [],
    )


def _check_counts(
    world_size: int, images_per_device: int, grad_accum_steps: int, num_images: int, max_iters: int
) -> None:
    """Raises the error of :func:`resolve_schedule` for the first count out of range."""
    for name, value in (("world_size", world_size), ("images_per_device", images_per_device),
                        ("grad_accum_steps", grad_accum_steps)):  # fmt: skip
        if value < 1:
            raise ValueError(f"resolve_schedule: {name} must be >= 1, got {value}")
    if max_iters != -1 and max_iters < 1:
        raise ValueError(f"resolve_schedule: max_iters must be -1 or >= 1, got {max_iters}")
    if num_images < 1:
        raise ConfigError("the training split has no images; check data.root and data.train_split")


def _run_length(
    s: SolverConfig, decay_epochs: list[float], ipe: int, max_iters: int
) -> tuple[int, list[int]]:
    """Total iterations and decay iterations: from the epochs, or ``max_iters`` with the decays at
    the same fraction of the run."""
    if max_iters > 0:
        return max_iters, [round(max_iters * d / s.epochs) for d in decay_epochs]
    return max(1, round(s.epochs * ipe)), [round(d * ipe) for d in decay_epochs]


def _warmup_length(s: SolverConfig, global_batch: int, total: int) -> tuple[int, str]:
    """Warmup iterations and, in words, the rule that chose them (the module docstring's images rule)."""
    if not s.warmup:
        return 0, "solver.warmup=false"
    if s.warmup_iters >= 0:
        return s.warmup_iters, "solver.warmup_iters"
    by_images = math.ceil(WARMUP_IMAGES / global_batch)
    floored = max(by_images, MIN_WARMUP_ITERS)
    cap = max(1, math.floor(MAX_WARMUP_FRACTION * total))
    warmup = min(floored, cap)
    if warmup == by_images:
        rule = f"{WARMUP_IMAGES} images / global batch {global_batch}"
    elif warmup == cap and cap < floored:
        rule = f"capped at {MAX_WARMUP_FRACTION:g} of a {total}-iteration run"
    else:
        rule = f"floor of {MIN_WARMUP_ITERS} iterations"
    return warmup, rule


def scaling_rule(solver_cfg: SolverConfig) -> str:
    """``solver.lr_scaling`` with ``auto`` resolved: sqrt for Adam-type optimizers, else linear."""
    if solver_cfg.lr_scaling != "auto":
        return solver_cfg.lr_scaling
    return "sqrt" if solver_cfg.optimizer in ADAPTIVE_OPTIMIZERS else "linear"


def batch_factor(scaling: str, ratio: float) -> float:
    """The lr multiplier of a resolved scaling rule for ``ratio = global_batch / reference_batch``."""
    if scaling == "linear":
        return ratio
    if scaling == "sqrt":
        return math.sqrt(ratio)
    return 1.0


def scaled_betas(solver_cfg: SolverConfig, global_batch: int) -> list[float]:
    """Adam's betas at ``global_batch``: ``solver.betas``, or with ``solver.scale_betas`` each
    ``1 - beta`` times the batch ratio (Malladi et al.), clamped to [0, 1 - 1e-6]."""
    betas = [float(b) for b in solver_cfg.betas]
    if not solver_cfg.scale_betas:
        return betas
    k = global_batch / solver_cfg.reference_batch
    return [min(max(1.0 - k * (1.0 - b), 0.0), 1.0 - 1e-6) for b in betas]


def lr_at(info: ScheduleInfo, it: int) -> float:
    """The learning rate used by the optimizer step of iteration ``it`` (0-based).

    Iterations past ``total_iters`` keep the final value.
    """
    it = max(0, min(it, info.total_iters))
    if it < info.warmup_iters:
        start = info.warmup_start_lr / info.lr
        warm = start + (1.0 - start) * it / info.warmup_iters
    else:
        warm = 1.0
    if info.policy == "cosine":
        span = info.total_iters - info.warmup_iters
        progress = 0.0 if span <= 0 else max(0, it - info.warmup_iters) / span
        floor = info.min_lr / info.lr
        decay = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0
        for d_it, f in zip(info.decay_iters, info.decay_factors):
            if it >= d_it:
                decay *= f
    return info.lr * warm * decay


class LRScheduler:
    """Sets every param group's lr to :func:`lr_at` of the current iteration.

    ``step()`` advances one iteration (call it after ``optimizer.step()``). The state is the iteration
    alone; the schedule itself is recomputed from the config, so it is never stored in a checkpoint.
    (A small class rather than ``LambdaLR``: ``LambdaLR`` multiplies a stored base lr, which would have
    to be kept in step with the resolved schedule on resume.)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, info: ScheduleInfo, start_iter: int = 0) -> None:
        self.optimizer = optimizer
        self.info = info
        self.iteration = start_iter
        self._apply()

    def _apply(self) -> None:
        lr = lr_at(self.info, self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.iteration += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        self._apply()


# Norm layers whose affine parameters get solver.weight_decay_norm (Goyal et al.: no decay on BN's
# scale and shift). Our FrozenBN and CrossDeviceBN are matched through their base classes when they
# derive from these; _is_norm also accepts any module from megdet.layers whose name says "Norm".
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, _NORM_TYPES):
        return True
    cls = type(module)
    return cls.__module__.startswith(("megdet.layers", "torchvision.ops")) and "Norm" in cls.__name__


def param_groups(model: nn.Module, weight_decay: float, weight_decay_norm: float) -> list[dict[str, Any]]:
    """Splits trainable parameters into a decayed group and a group of norm parameters and biases."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        norm = _is_norm(module)
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if norm or name == "bias" else decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": weight_decay_norm},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module, solver_cfg: SolverConfig, lr: float, betas: Sequence[float] | None = None
) -> torch.optim.Optimizer:
    """``solver.optimizer``: SGD with momentum (MegDet's), AdamW (decoupled weight decay), or their
    layer-wise adaptive forms LARS and LAMB (:mod:`megdet.engine.layerwise`); ``solver.weight_decay_norm``
    (default 0) for norm parameters and all biases. ``betas``: the schedule's (``ScheduleInfo.betas``,
    which :func:`scaled_betas` derives from the batch); default ``solver.betas``."""
    solver_cfg.validate_optimizer()
    groups = param_groups(model, solver_cfg.weight_decay, solver_cfg.weight_decay_norm)
    if not groups:
        raise ConfigError("the model has no trainable parameters; check model.trainable_layers")
    b1, b2 = (float(b) for b in (betas if betas else solver_cfg.betas))
    name = solver_cfg.optimizer
    if name in ("lars", "lamb"):
        for g in groups:  # only the decayed group's rates adapt; norm parameters and biases take plain steps
            g["layerwise"] = g["name"] == "decay"
    # fused: one kernel updates every tensor (PyTorch's default is a per-tensor loop on CPU and a
    # dozen multi-tensor launches on CUDA), and fp16 loss scaling skips a step without a host read.
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(b1, b2), fused=True)
    if name == "lamb":
        return LAMB(groups, lr=lr, betas=(b1, b2))
    if name == "lars":
        return LARS(groups, lr=lr, momentum=solver_cfg.momentum, trust_coefficient=solver_cfg.trust_coefficient)
    return torch.optim.SGD(groups, lr=lr, momentum=solver_cfg.momentum, fused=True)


def schedule_curve(info: ScheduleInfo, points: int = 2000) -> tuple[list[int], list[float]]:
    """(iterations, lrs) sampled over the run, every warmup and decay iteration included."""
    total = info.total_iters
    step = max(1, total // points)
    its: set[int] = set(range(0, total + 1, step)) | {total}
    its |= set(range(0, info.warmup_iters + 1, max(1, info.warmup_iters // 200)))
    its |= {info.warmup_iters}
    for d in info.decay_iters:
        its |= {max(0, d - 1), d}
    xs = sorted(i for i in its if 0 <= i <= total)
    return xs, [lr_at(info, i) for i in xs]


def plot_schedule(info: ScheduleInfo, path: str | Path) -> Path:
    """Writes a PNG of the lr over the run (x: iterations below, epochs above) to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    xs, ys = schedule_curve(info)
    # A Figure without pyplot: no global state, safe in any thread or backend.
    fig = Figure(figsize=(7, 3.5), dpi=100)
    ax = fig.subplots()
    ax.step(xs, ys, where="post", lw=1.5)  # the lr is constant within an iteration
    for d in info.decay_iters:
        ax.axvline(d, color="grey", lw=0.8, ls="--")
    if info.warmup_iters:
        ax.axvline(
            info.warmup_iters, color="tab:orange", lw=0.8, ls=":", label=f"warmup {info.warmup_iters} it"
        )
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("iteration")
    ax.set_ylabel("learning rate")
    ipe = info.iters_per_epoch
    top = ax.secondary_xaxis("top", functions=(lambda x: x / ipe, lambda e: e * ipe))
    top.set_xlabel("epoch")
    ax.set_title(
        f"{info.world_size} device(s), global batch {info.global_batch}, peak lr {info.lr:.4g}", fontsize=9
    )
    ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.14, top=0.8)  # fixed margins: tight_layout is slow
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))
