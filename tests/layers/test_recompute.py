"""Recompute / checkpoint_module / apply_recompute: same gradients, running statistics updated once."""

from __future__ import annotations

import copy
import os
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

from megdet.layers import collectives
from megdet.layers.cross_device_bn import convert_cross_device_bn
from megdet.layers.recompute import Recompute, apply_recompute, checkpoint_module, frozen_running_stats


def _block(cin: int, cout: int, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def _net(dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(_block(3, 4, dropout), _block(4, 5), nn.Conv2d(5, 2, 1)).double()
    net[1][1].momentum = None  # cumulative average as well
    return net


def _step(net: nn.Module, x: torch.Tensor, g: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)  # the same dropout masks in both runs
    x = x.clone().requires_grad_(True)
    out = net(x)
    (out * g).sum().backward()
    return out.detach(), x.grad


def _count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_recompute_matches_plain_run_and_updates_stats_once() -> None:
    plain = _net(dropout=0.3).train()
    wrapped = apply_recompute(copy.deepcopy(plain), ["0", "1"])
    assert isinstance(wrapped[0], Recompute) and isinstance(wrapped[1], Recompute)
    calls = _count_calls(wrapped[0].inner)
    gen = torch.Generator().manual_seed(1)
    for step in range(2):
        x = torch.randn(3, 3, 6, 6, generator=gen, dtype=torch.float64)
        g = torch.randn(3, 2, 6, 6, generator=gen, dtype=torch.float64)
        out_p, gx_p = _step(plain, x, g, seed=step)
        out_w, gx_w = _step(wrapped, x, g, seed=step)
        assert_close(out_w, out_p, rtol=0, atol=0)
        assert_close(gx_w, gx_p, rtol=1e-12, atol=1e-12)  # dropout masks replayed by preserve_rng_state
    assert calls[0] == 4, "the block must run twice per step (forward + recomputation)"
    for (name, p), q in zip(plain.named_parameters(), wrapped.parameters()):
        assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-12, msg=name)
    plain_state, wrapped_state = plain.state_dict(), wrapped.state_dict()
    assert plain_state.keys() == wrapped_state.keys()
    for key, value in plain_state.items():
        assert torch.equal(wrapped_state[key], value), key  # running stats updated once per step, not twice
    assert wrapped_state["0.1.num_batches_tracked"].item() == 2
    assert wrapped[1].inner[1].momentum is None and wrapped[0].inner[1].momentum == 0.1  # restored


def test_eval_and_no_grad_run_plain_forward() -> None:
    net = apply_recompute(_net(), ["0"])
    calls = _count_calls(net[0].inner)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        net.train()(x)
    assert calls[0] == 1 and net[0].inner[1].num_batches_tracked.item() == 1
    net.eval()(x).sum()
    assert calls[0] == 2 and net[0].inner[1].num_batches_tracked.item() == 1
    # The functional form recomputes as well.
    block = _net()[0].train()
    calls = _count_calls(block)
    checkpoint_module(block, x.requires_grad_(True)).sum().backward()
    assert calls[0] == 2 and block[1].num_batches_tracked.item() == 1


def test_frozen_running_stats_restores_on_error() -> None:
    bn = nn.BatchNorm2d(3, momentum=None).train()
    bn.num_batches_tracked.fill_(7)
    eval_bn = nn.BatchNorm2d(3).eval()
    x = torch.randn(4, 3, 2, 2) + 5
    with pytest.raises(RuntimeError, match="boom"), frozen_running_stats(nn.Sequential(bn, eval_bn)):
        out = bn(x)
        assert bn.momentum == 0.0 and eval_bn.momentum == 0.1  # eval-mode layers are left alone
        raise RuntimeError("boom")
    assert_close(out, nn.BatchNorm2d(3).train()(x))  # normalised with batch statistics
    assert bn.momentum is None and bn.num_batches_tracked.item() == 7
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))


def test_state_dict_is_transparent() -> None:
    plain = _net()
    plain[0][1].running_mean.uniform_()
    wrapped = apply_recompute(copy.deepcopy(plain), ["0", "1.1"])
    plain_state, wrapped_state = plain.state_dict(), wrapped.state_dict()
    assert list(wrapped_state) == list(plain_state)
    assert wrapped_state._metadata.keys() == plain_state._metadata.keys()
    assert wrapped_state._metadata["1.1"] == plain_state._metadata["1.1"]  # BatchNorm's version entry
    fresh_wrapped = apply_recompute(_net(), ["0", "1.1"])
    fresh_wrapped.load_state_dict(plain_state)
    fresh_plain = _net()
    fresh_plain.load_state_dict(wrapped_state)
    for key, value in plain_state.items():
        assert torch.equal(fresh_wrapped.state_dict()[key], value)
        assert torch.equal(fresh_plain.state_dict()[key], value)
    # A state dict saved with the wrapper's own "inner." level loads too.
    legacy = {k.replace("0.", "0.inner.", 1) if k.startswith("0.") else k: v for k, v in plain_state.items()}
    fresh_wrapped.load_state_dict(legacy)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh_wrapped.load_state_dict({**plain_state, "0.extra": torch.zeros(1)})


def test_apply_recompute_errors_and_idempotence() -> None:
    net = _net()
    apply_recompute(net, ["0"])
    wrapper = net[0]
    apply_recompute(net, ["0"])
    assert net[0] is wrapper
    with pytest.raises(ValueError, match=r"no submodule '0\.1'.*inner"):
        apply_recompute(net, ["0.1"])
    with pytest.raises(ValueError, match="no submodule 'body'"):
        apply_recompute(net, ["body"])
    with pytest.raises(ValueError, match="empty"):
        apply_recompute(net, [""])


# ----------------------------------------------------------------------------- 2 ranks, cross-device BN


def _two_rank_entry(rank: int, world_size: int, run_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{run_dir}/store", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        plain = convert_cross_device_bn(_net()).train()
        wrapped = apply_recompute(copy.deepcopy(plain), ["0", "1"])
        sizes = [1, 3]  # unequal slices
        start = sum(sizes[:rank])
        sl = slice(start, start + sizes[rank])
        calls = {"plain": 0, "wrapped": 0}
        original = collectives.all_reduce  # the layer's transport, looked up per call
        gen = torch.Generator().manual_seed(5)
        for _step_index in range(2):
            x = torch.randn(sum(sizes), 3, 5, 5, generator=gen, dtype=torch.float64)
            g = torch.randn(sum(sizes), 2, 5, 5, generator=gen, dtype=torch.float64)
            results = {}
            for name, net in (("plain", plain), ("wrapped", wrapped)):
                def counting(*args: Any, _name: str = name, **kwargs: Any) -> Any:
                    calls[_name] += 1
                    return original(*args, **kwargs)

                collectives.all_reduce = counting
                try:
                    results[name] = _step(net, x[sl], g[sl], seed=0)
                finally:
                    collectives.all_reduce = original
            assert_close(results["wrapped"][0], results["plain"][0], rtol=1e-12, atol=1e-12)
            assert_close(results["wrapped"][1], results["plain"][1], rtol=1e-12, atol=1e-12)
        for (name, p), q in zip(plain.named_parameters(), wrapped.parameters()):
            assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-12, msg=name)
        for (key, value), other in zip(plain.state_dict().items(), wrapped.state_dict().values()):
            assert_close(other, value, rtol=1e-12, atol=1e-12, msg=key)
        torch.save({"calls": calls, "tracked": wrapped.state_dict()["1.1.num_batches_tracked"].item()},
                   os.path.join(run_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_cross_device_bn_inside_recompute(spawn_ranks) -> None:
    results = spawn_ranks(_two_rank_entry, 2)
    for r in results:
        # Per step: 2 layers x (1 forward + 1 backward) all-reduce; recomputation repeats the 2 forward ones.
        assert r["calls"] == {"plain": 2 * 4, "wrapped": 2 * 6}
        assert r["tracked"] == 2
