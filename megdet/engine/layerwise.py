"""Layer-wise adaptive optimizers for very large batches: LARS (You et al. 2017) and LAMB (You et al. 2020).

Why our own: PyTorch ships neither (``torch.optim`` has SGD and AdamW, whose updates these two rescale
per parameter tensor). Both multiply each tensor's update by a *trust ratio* ``|w| / |update|``, so that
no layer moves by more than a fixed fraction of its own norm in one step, whatever its gradient scale:
the failure they address is a few layers (often the first and the last) diverging at the high lr of a
large batch while the rest would tolerate it.

A param group with ``layerwise=False`` (the policy's norm parameters and biases, whose norms say
little about a safe step) takes the plain update: SGD with momentum, or AdamW.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def _trust_ratio(w_norm: torch.Tensor, u_norm: torch.Tensor) -> torch.Tensor:
    """``|w| / |u|``, and 1 where either norm is 0 (a fresh zero-initialised layer, or no update)."""
    ok = (w_norm > 0) & (u_norm > 0)
    return torch.where(ok, w_norm / u_norm.clamp_min(1e-30), torch.ones_like(w_norm))


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose per-tensor lr is ``min(lr, trust x |w| / |g + wd w|)`` (LARC's clipping
    form of LARS: never more than the plain SGD lr, so ``solver.base_lr`` keeps its meaning).

    Args:
        params: parameters or param groups (a group may set ``layerwise=False``).
        lr, momentum, weight_decay: as ``torch.optim.SGD`` (weight decay coupled, as in SGD).
        trust_coefficient: the largest step of a tensor as a fraction of its norm.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.02,
    ) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                    "trust_coefficient": trust_coefficient, "layerwise": True}  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None if closure is None else closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=wd) if wd else p.grad.clone()
                if group["layerwise"] and lr > 0:
                    ratio = _trust_ratio(p.norm(), d.norm()) * group["trust_coefficient"]
                    d.mul_(torch.clamp(ratio / lr, max=1.0))
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    state["momentum_buffer"] = buf = d
                else:
                    buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-lr)
        return loss


class LAMB(torch.optim.Optimizer):
    """AdamW whose per-tensor step is scaled by ``|w| / |adam_update + wd w|`` (You et al. 2020, with
    bias correction).

    Args:
        params: parameters or param groups (a group may set ``layerwise=False``).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay in the update).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "layerwise": True}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None if closure is None else closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                m_hat = m / (1 - b1**t)
                v_hat = v / (1 - b2**t)
                u = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    u.add_(p, alpha=group["weight_decay"])
                if group["layerwise"]:
                    u.mul_(_trust_ratio(p.norm(), u.norm()))
                p.add_(u, alpha=-group["lr"])
        return loss
