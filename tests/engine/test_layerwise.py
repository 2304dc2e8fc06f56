"""LARS and LAMB: the trust ratio against hand-computed steps, and the plain steps they fall back to."""

from __future__ import annotations

import pytest
import torch

from megdet.engine.layerwise import LAMB, LARS


def _param(values: list[float], grad: list[float]) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.tensor(values, dtype=torch.float64))
    p.grad = torch.tensor(grad, dtype=torch.float64)
    return p


def test_lars_clips_a_layer_to_the_trust_ratio_and_keeps_sgd_below_it() -> None:
    big = _param([3.0, 4.0], [30.0, 40.0])  # |w| = 5, |g| = 50: ratio 0.02 * 5 / 50 = 0.002 < lr
    small = _param([3.0, 4.0], [0.003, 0.004])  # |g| = 0.005: ratio 20 > lr -> plain SGD
    LARS([big, small], lr=0.1, momentum=0.9, trust_coefficient=0.02).step()
    # Clipped: the step is trust * |w| in norm, along -g.
    assert torch.allclose(big.detach(), torch.tensor([3.0, 4.0], dtype=torch.float64) - 0.002 * torch.tensor([30.0, 40.0], dtype=torch.float64))
    assert (torch.tensor([3.0, 4.0], dtype=torch.float64) - big.detach()).norm().item() == pytest.approx(0.1)
    assert torch.allclose(small.detach(), torch.tensor([3.0 - 0.1 * 0.003, 4.0 - 0.1 * 0.004], dtype=torch.float64))


def test_lars_without_layerwise_is_torch_sgd() -> None:
    torch.manual_seed(0)
    w = torch.randn(5, dtype=torch.float64)
    grads = [torch.randn(5, dtype=torch.float64) for _ in range(3)]
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ours = LARS([{"params": [a], "layerwise": False}], lr=0.05, momentum=0.9, weight_decay=1e-3)
    ref = torch.optim.SGD([b], lr=0.05, momentum=0.9, weight_decay=1e-3)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.allclose(a, b, atol=1e-14)


def test_lamb_without_layerwise_is_adamw_up_to_eps_placement() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, dtype=torch.float64)
    grads = [torch.randn(6, dtype=torch.float64) for _ in range(4)]
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ours = LAMB([{"params": [a], "layerwise": False}], lr=0.01, betas=(0.8, 0.99), eps=1e-12, weight_decay=0.0)
    ref = torch.optim.AdamW([b], lr=0.01, betas=(0.8, 0.99), eps=1e-12, weight_decay=0.0)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.allclose(a, b, atol=1e-10)


def test_lamb_step_has_norm_lr_times_weight_norm() -> None:
    p = _param([1.0, 2.0, 2.0], [0.5, -1.0, 3.0])  # |w| = 3
    before = p.detach().clone()
    LAMB([p], lr=0.01, weight_decay=0.1).step()
    # Whatever the Adam direction, the layer moves by lr * |w|.
    assert (before - p.detach()).norm().item() == pytest.approx(0.03, rel=1e-9)


def test_zero_weights_take_the_unscaled_step() -> None:
    p = _param([0.0, 0.0], [1.0, 1.0])
    LAMB([p], lr=0.01).step()  # trust ratio 1 when |w| = 0: the plain Adam step of lr per element
    assert torch.allclose(p.detach(), torch.tensor([-0.01, -0.01], dtype=torch.float64), atol=1e-8)
