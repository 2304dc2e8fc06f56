"""Sublinear memory: recompute chosen blocks in the backward pass instead of storing their activations.

A recomputed block keeps only its inputs during the forward pass and runs its forward again when the
backward pass needs the intermediate activations (Chen et al. 2016), trading about one extra forward of
the block for its activation memory. Built on ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``
with two guards of ours that checkpoint does not provide:

* BatchNorm running statistics. A recomputed BatchNorm would update ``running_mean``/``running_var``
  and ``num_batches_tracked`` a second time. During recomputation only, every training-mode BatchNorm
  inside the block (``nn.BatchNorm2d``, ``CrossDeviceBatchNorm2d``, any ``_BatchNorm``) gets
  ``momentum=0`` (``running = 1 * running + 0 * batch`` leaves the buffers bit-exact, also for the
  cumulative ``momentum=None`` mode) and its ``num_batches_tracked`` is restored afterwards, also when
  recomputation stops early. (Switching ``track_running_stats`` off instead would change which tensors
  BatchNorm saves for backward, which checkpoint's recomputation check rejects.)
* Cross-device BatchNorm collectives. Recomputation repeats the forward all-reduce of every
  ``CrossDeviceBatchNorm2d`` in the block; ranks stay matched because every rank recomputes the same
  blocks at the same point of the backward pass (same model, same graph).

RNG state (dropout, random sampling inside the block) is restored for the recomputation by checkpoint
itself (``preserve_rng_state=True``), so the recomputed forward sees the same random numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

__all__ = [
    "Recompute",
    "RecomputeStage",
    "apply_recompute",
    "checkpoint_module",
    "frozen_running_stats",
    "recompute_names",
]


@contextlib.contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Within the context, training-mode BatchNorms in `module` normalise with batch statistics as usual
    but leave their running statistics and ``num_batches_tracked`` unchanged; restored on exit."""
    saved: list[tuple[_BatchNorm, float | None, torch.Tensor | None]] = []
    for m in module.modules():
        if isinstance(m, _BatchNorm) and m.training and m.track_running_stats:
            count = None if m.num_batches_tracked is None else m.num_batches_tracked.clone()
            saved.append((m, m.momentum, count))
            m.momentum = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for m, momentum, count in saved:
                m.momentum = momentum
                if count is not None and m.num_batches_tracked is not None:
                    m.num_batches_tracked.copy_(count)


def _recompute_contexts(module: nn.Module) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    # checkpoint's context_fn: (context for the original forward, context for the recomputation).
    return contextlib.nullcontext(), frozen_running_stats(module)


def checkpoint_module(module: nn.Module, *args: Any, preserve_rng_state: bool = True, **kwargs: Any) -> Any:
    """``module(*args, **kwargs)``, recomputed in the backward pass when `module` is training and grad
    is enabled (a plain call otherwise), with BatchNorm running statistics updated once per step."""
    if not (module.training and torch.is_grad_enabled()):
        return module(*args, **kwargs)
    return checkpoint(
        module,
        *args,
        use_reentrant=False,
        preserve_rng_state=preserve_rng_state,
        context_fn=lambda: _recompute_contexts(module),
        **kwargs,
    )


def _strip_inner_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    # state_dict post-hook: the wrapper's own "inner." level disappears, so a Recompute-wrapped model
    # saves exactly the keys of the unwrapped one (and ImageNet / earlier checkpoints load either way).
    inner = prefix + "inner."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        inner_meta = inner[:-1]
        for key in [k for k in metadata if k == inner_meta or k.startswith(inner)]:
            new_key = prefix[:-1] if key == inner_meta else prefix + key[len(inner):]
            metadata[new_key] = metadata.pop(key)  # the inner module's entry replaces the wrapper's
    return None


def _add_inner_prefix(
    module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
    missing_keys: list, unexpected_keys: list, error_msgs: list,
) -> None:
    # load_state_dict pre-hook, the inverse of _strip_inner_prefix; keys already under "inner." stay.
    inner = prefix + "inner."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)


class Recompute(nn.Module):
    """Runs `inner` with recomputation (see :func:`checkpoint_module`) while training with grad enabled.

    Transparent for ``state_dict`` / ``load_state_dict``: keys are those of `inner` at the wrapper's
    place, without an ``inner.`` level (``named_parameters`` does show the ``inner.`` level).
    """

    def __init__(self, inner: nn.Module, *, preserve_rng_state: bool = True) -> None:
        super().__init__()
        self.inner = inner
        self.preserve_rng_state = preserve_rng_state
        self.register_state_dict_post_hook(_strip_inner_prefix)
        self.register_load_state_dict_pre_hook(_add_inner_prefix)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return checkpoint_module(self.inner, *args, preserve_rng_state=self.preserve_rng_state, **kwargs)


def apply_recompute(module: nn.Module, names: Iterable[str]) -> nn.Module:
    """Wrap the named submodules of `module` (dotted paths such as ``"body.layer1"`` or ``"layer2.0"``)
    in :class:`Recompute`, in place; already wrapped ones are left as they are. Returns `module`."""
    for name in names:
        if not name:
            raise ValueError("apply_recompute: empty submodule name; wrap the root with Recompute(module) instead")
        parent_name, _, child_name = name.rpartition(".")
        try:
            parent = module.get_submodule(parent_name) if parent_name else module
            child = parent.get_submodule(child_name)
        except AttributeError:
            raise ValueError(
                f"apply_recompute: {type(module).__name__} has no submodule {name!r} "
                f"(inside an already wrapped block, the path goes through '.inner')"
            ) from None
        if not isinstance(child, Recompute):
            setattr(parent, child_name, Recompute(child))
    return module


@dataclass(frozen=True)
class RecomputeStage:
    """A submodule a model offers for recomputation (``model.recompute_stages()``).

    ``blocks``: in mode "blocks" its children are recomputed one by one instead of the whole;
    ``nested``: in mode "nested" its children are recomputed inside its own recomputation.
    """

    name: str  # dotted path from the model
    blocks: bool = False
    nested: bool = False

    def prefixed(self, prefix: str) -> RecomputeStage:
        """The same stage seen from a parent module (``prefix`` ends with a dot)."""
        return replace(self, name=prefix + self.name)


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def recompute_names(module: nn.Module, stages: Sequence[RecomputeStage], mode: str) -> list[str]:
    """The submodules of `module` that sublinear memory mode `mode` recomputes, for :func:`apply_recompute`.

    "off": none. "stages": every stage as one block -- only stage outputs are kept. "blocks": the
    children of the stages marked ``blocks`` one by one, the other stages whole -- more stored
    activations, but a smaller peak while recomputing. "nested": "stages", and inside each stage marked
    ``nested`` every child recomputed again while its stage is recomputed (Chen et al.'s recursive
    scheme): the forward keeps only stage outputs like "stages", the backward holds one stage's child
    inputs plus one child's activations like "blocks", for one more forward of those stages. Inner
    names come before their stage's (the order :func:`apply_recompute` needs to nest them). Frozen
    parts are skipped: nothing of theirs is stored for backward anyway.
    """
    if mode == "off":
        return []
    names: list[str] = []
    for stage in stages:
        block = module.get_submodule(stage.name)
        if not _trainable(block):
            continue
        split = (mode == "blocks" and stage.blocks) or (mode == "nested" and stage.nested)
        if split:
            names.extend(f"{stage.name}.{c}" for c, m in block.named_children() if _trainable(m))
        if not split or mode == "nested":
            names.append(stage.name)
    return names

