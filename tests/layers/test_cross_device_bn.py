"""CrossDeviceBatchNorm2d against nn.BatchNorm2d on the concatenated batch of each device group.

Each rank runs the layer on its slice with loss ``sum(out * g_slice)`` for one fixed random ``g``; the
reference runs nn.BatchNorm2d on the whole group batch with ``sum(out * g)``. Outputs, input gradients
and running statistics must then match slice by slice, and the per-rank weight/bias gradients summed
over the group (what DDP's all-reduce does) must match the reference's.
"""

from __future__ import annotations

import copy
import os
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torch.testing import assert_close
from torchvision.ops.misc import FrozenBatchNorm2d

from megdet.layers import collectives, cross_device_bn
from megdet.layers.cross_device_bn import CrossDeviceBatchNorm2d, convert_cross_device_bn

C, H, W = 3, 5, 4
TOL = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
}


# ----------------------------------------------------------------------------- helpers (all ranks)


def _init_group(rank: int, world_size: int, run_dir: str, backend: str = "gloo") -> None:
    torch.set_num_threads(1)  # the test machine's cores are shared by all ranks
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        torch.cuda.set_device(rank)
        kwargs["device_id"] = torch.device("cuda", rank)
    dist.init_process_group(
        backend, init_method=f"file://{run_dir}/store", rank=rank, world_size=world_size,
        timeout=timedelta(seconds=60),  # a mismatched collective fails the test instead of hanging it
        **kwargs,
    )


def _save(result: Any, run_dir: str, rank: int) -> None:
    torch.save(result, os.path.join(run_dir, f"rank{rank}.pt"))


class _CountAllReduce:
    """Counts the layer's all-reduce calls (megdet.layers.collectives.all_reduce, looked up per call)
    made inside the block."""

    def __enter__(self) -> _CountAllReduce:
        self.calls = 0
        self._original = collectives.all_reduce

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return self._original(*args, **kwargs)

        collectives.all_reduce = counting
        return self

    def __exit__(self, *exc: object) -> None:
        collectives.all_reduce = self._original


def _batch(total: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch and the fixed loss weights g; identical on every rank (same seed)."""
    gen = torch.Generator().manual_seed(seed)
    # A mean large against the spread is where a naive float32 E[x^2] - E[x]^2 loses digits.
    x = torch.randn(total, C, H, W, generator=gen, dtype=torch.float64) + 20
    g = torch.randn(total, C, H, W, generator=gen, dtype=torch.float64)
    return x.to(dtype), g.to(dtype)


def _bn_pair(dtype: torch.dtype, momentum: float | None, group_size: int | None) -> tuple[nn.BatchNorm2d, nn.Module]:
    gen = torch.Generator().manual_seed(123)
    ref = nn.BatchNorm2d(C, momentum=momentum, dtype=dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.rand(C, generator=gen) + 0.5)
        ref.bias.copy_(torch.randn(C, generator=gen))
    return ref, convert_cross_device_bn(copy.deepcopy(ref), group_size)


def _compare_with_reference(
    rank: int, world_size: int, sizes: list[int], group_size: int | None, dtype: torch.dtype,
    momentum: float | None, steps: int = 2, device: str = "cpu",
) -> None:
    """`sizes[r]` images on rank r; every group is checked against BN on its own concatenated batch."""
    k = world_size if group_size is None else group_size
    group_ranks = list(range(rank - rank % k, rank - rank % k + k))
    group_offset = sum(sizes[: group_ranks[0]])
    start = sum(sizes[:rank])
    stop = start + sizes[rank]
    local = slice(start - group_offset, stop - group_offset)
    tol = TOL[dtype]
    ref, ours = _bn_pair(dtype, momentum, group_size)
    ref, ours = ref.to(device), ours.to(device)
    assert isinstance(ours, CrossDeviceBatchNorm2d)
    what = f"sizes={sizes} group_size={group_size} dtype={dtype} momentum={momentum} device={device}"
    for step in range(steps):
        x_all, g_all = (t.to(device) for t in _batch(sum(sizes), dtype, seed=step))
        x_group = x_all[group_offset: group_offset + sum(sizes[r] for r in group_ranks)]
        g_group = g_all[group_offset: group_offset + x_group.shape[0]]
        ref.zero_grad(set_to_none=True)
        ours.zero_grad(set_to_none=True)

        x_ref = x_group.clone().requires_grad_(True)
        out_ref = ref(x_ref)
        (out_ref * g_group).sum().backward()

        x_mine = x_group[local].clone().requires_grad_(True)
        out = ours(x_mine)
        (out * g_group[local]).sum().backward()

        what_step = f"{what} step {step}"
        assert_close(out, out_ref[local], **tol, msg=lambda m, w=what_step: f"output, {w}: {m}")
        assert_close(x_mine.grad, x_ref.grad[local], **tol, msg=lambda m: f"input grad, {what}: {m}")
        # DDP sums the per-rank parameter gradients: gather all ranks', sum those of my group.
        mine = torch.cat([ours.weight.grad, ours.bias.grad])
        gathered = [torch.empty_like(mine) for _ in range(world_size)]
        dist.all_gather(gathered, mine)
        summed = torch.stack([gathered[r] for r in group_ranks]).sum(0)
        assert_close(summed, torch.cat([ref.weight.grad, ref.bias.grad]), **tol,
                     msg=lambda m: f"weight/bias grad, {what}: {m}")
        assert_close(ours.running_mean, ref.running_mean, **tol, msg=lambda m: f"running_mean, {what}: {m}")
        assert_close(ours.running_var, ref.running_var, **tol, msg=lambda m: f"running_var, {what}: {m}")
        assert torch.equal(ours.num_batches_tracked, ref.num_batches_tracked)
        assert torch.isfinite(mine).all() and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- 2 ranks


def _two_rank_entry(rank: int, world_size: int, run_dir: str) -> None:
    _init_group(rank, world_size, run_dir)
    try:
        checked = 0
        for sizes in ([3, 3], [1, 4], [1, 1], [0, 3]):  # equal, unequal, one image each, one rank empty
            for dtype in (torch.float64, torch.float32):
                momentum = None if sizes == [1, 4] else 0.1  # cumulative average too
                _compare_with_reference(rank, world_size, sizes, None, dtype, momentum)
                checked += 1
        # The local statistics that non-CPU devices use (torch.var_mean), through the whole layer.
        cpu_moments = cross_device_bn._local_moments
        cross_device_bn._local_moments = cross_device_bn._var_mean
        try:
            for sizes, dtype in (([1, 4], torch.float32), ([0, 3], torch.float64)):
                _compare_with_reference(rank, world_size, sizes, None, dtype, 0.1)
                checked += 1
        finally:
            cross_device_bn._local_moments = cpu_moments

        # One fused all-reduce in the forward, one in the backward; none in eval mode.
        layer = CrossDeviceBatchNorm2d(C).double()
        x_all, g_all = _batch(4, torch.float64, seed=7)
        x = x_all[2 * rank: 2 * rank + 2].clone().requires_grad_(True)
        with _CountAllReduce() as count:
            out = layer(x)
            forward_calls = count.calls
            (out * g_all[2 * rank: 2 * rank + 2]).sum().backward()
        backward_calls = count.calls - forward_calls
        with _CountAllReduce() as count:
            layer(x.detach()).sum().backward()  # no input gradient needed: the backward reduce is skipped
        no_input_grad_calls = count.calls
        layer.eval()
        plain = nn.BatchNorm2d(C).double().eval()
        plain.load_state_dict(layer.state_dict())
        with _CountAllReduce() as count:
            eval_out = layer(x)
        assert torch.equal(eval_out, plain(x)), "eval mode must be plain BatchNorm with running statistics"

        # group_size=1 on 2 ranks: per-device BatchNorm, no communication.
        local_ref, local_ours = _bn_pair(torch.float64, 0.1, 1)
        with _CountAllReduce() as count1:
            local_out = local_ours(x.detach())
        assert torch.equal(local_out, local_ref(x.detach())) and count1.calls == 0

        # affine=False with a channels-last input (the layer uses ATen's fused kernels, which take
        # any memory format): output, input gradient and running statistics as BatchNorm2d's.
        plain_ref = nn.BatchNorm2d(C, affine=False).double()
        no_affine = convert_cross_device_bn(copy.deepcopy(plain_ref))
        x_all, g_all = _batch(4, torch.float64, seed=5)
        x_ref = x_all.clone().requires_grad_(True)
        out_ref = plain_ref(x_ref)
        (out_ref * g_all).sum().backward()
        mine = slice(2 * rank, 2 * rank + 2)
        x_cl = x_all[mine].contiguous(memory_format=torch.channels_last).requires_grad_(True)
        out_cl = no_affine(x_cl)
        (out_cl * g_all[mine]).sum().backward()
        tol = TOL[torch.float64]
        assert_close(out_cl, out_ref[mine], **tol)
        assert_close(x_cl.grad, x_ref.grad[mine], **tol)
        assert_close(no_affine.running_var, plain_ref.running_var, **tol)

        # World size 2 is not divisible by group_size 3.
        with pytest.raises(ValueError, match=r"world size 2 .*group_size 3"):
            CrossDeviceBatchNorm2d(C, group_size=3).double()(x.detach())

        # bf16 input with float32 parameters (mixed precision): bf16 output and input gradient,
        # float32 statistics computed from the exact bf16 values.
        x_all, g_all = _batch(5, torch.bfloat16, seed=11)
        sl = slice(0, 2) if rank == 0 else slice(2, 5)
        ref, ours = _bn_pair(torch.float32, 0.1, None)
        x_ref = x_all.float().requires_grad_(True)
        out_ref = ref(x_ref)
        (out_ref * g_all.float()).sum().backward()
        x_mine = x_all[sl].clone().requires_grad_(True)
        out = ours(x_mine)
        (out * g_all[sl]).sum().backward()
        assert out.dtype == torch.bfloat16 and x_mine.grad.dtype == torch.bfloat16
        assert ours.weight.grad.dtype == torch.float32
        assert_close(out.float(), out_ref[sl].detach(), rtol=1e-2, atol=2e-2)
        assert_close(x_mine.grad.float(), x_ref.grad[sl], rtol=2e-2, atol=2e-2)
        grads = torch.cat([ours.weight.grad, ours.bias.grad])
        dist.all_reduce(grads)
        assert_close(grads, torch.cat([ref.weight.grad, ref.bias.grad]), rtol=1e-4, atol=1e-4)
        assert_close(ours.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
        assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
        # Whole layer in bf16 (parameters too): runs, stays bf16, finite.
        whole = CrossDeviceBatchNorm2d(C).bfloat16()
        y = whole(x_all[sl].clone().requires_grad_(True))
        y.float().sum().backward()
        assert y.dtype == torch.bfloat16 and whole.weight.grad.dtype == torch.bfloat16
        assert torch.isfinite(y.float()).all() and torch.isfinite(whole.weight.grad.float()).all()

        # Every rank empty (a RoI head with no RoI on any device): an empty output, zero parameter
        # gradients, running statistics unchanged, and both collectives still run on every rank.
        empty = CrossDeviceBatchNorm2d(C).double()
        stats_before = (empty.running_mean.clone(), empty.running_var.clone())
        x_empty = torch.zeros(0, C, 3, 3, dtype=torch.float64, requires_grad=True)
        with _CountAllReduce() as count_empty:
            y_empty = empty(x_empty)
            y_empty.sum().backward()
        assert y_empty.shape == x_empty.shape and count_empty.calls == 2
        assert torch.equal(empty.weight.grad, torch.zeros_like(empty.weight))
        assert torch.equal(empty.running_mean, stats_before[0]) and torch.equal(empty.running_var, stats_before[1])

        _save({"checked": checked, "forward_calls": forward_calls, "backward_calls": backward_calls,
               "no_input_grad_calls": no_input_grad_calls, "eval_calls": count.calls}, run_dir, rank)
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_batchnorm_on_concatenated_batch(spawn_ranks) -> None:
    results = spawn_ranks(_two_rank_entry, 2)
    for r in results:
        assert r["checked"] == 10
        assert r["forward_calls"] == 1 and r["backward_calls"] == 1
        assert r["no_input_grad_calls"] == 1  # forward only
        assert r["eval_calls"] == 0


# ----------------------------------------------------------------------------- 4 ranks


def _four_rank_entry(rank: int, world_size: int, run_dir: str) -> None:
    _init_group(rank, world_size, run_dir)
    try:
        # BN groups {0, 1} and {2, 3}; rank 3 holds no image.
        for dtype in (torch.float64, torch.float32):
            _compare_with_reference(rank, world_size, [2, 1, 3, 0], 2, dtype, 0.1)
        group = cross_device_bn._statistics_group(2)
        assert group is cross_device_bn._statistics_group(2), "subgroups must be created once and cached"
        members = dist.get_process_group_ranks(group)
        # The whole world as one group, unequal slices.
        _compare_with_reference(rank, world_size, [1, 2, 0, 3], None, torch.float64, None)
        with pytest.raises(ValueError, match=r"world size 4 .*group_size 3"):
            CrossDeviceBatchNorm2d(C, group_size=3)(torch.randn(2, C, H, W))
        _save({"members": members}, run_dir, rank)
    finally:
        dist.destroy_process_group()


def test_four_ranks_group_size_two(spawn_ranks) -> None:
    results = spawn_ranks(_four_rank_entry, 4)
    assert [r["members"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]


# ----------------------------------------------------------------------------- CUDA / NCCL


def _one_rank_function_entry(rank: int, world_size: int, run_dir: str, device: str) -> None:
    """The layer's autograd Function over a 1-rank group (gloo on CPU, NCCL on CUDA) against
    BatchNorm2d: the module itself would skip communication on a world of one, the Function does not."""
    backend = "nccl" if device == "cuda" else "gloo"
    _init_group(rank, world_size, run_dir, backend)
    try:
        calls = 0
        for dtype in (torch.float64, torch.float32, torch.float16):
            param_dtype = torch.float32 if dtype == torch.float16 else dtype
            ref, _ = _bn_pair(param_dtype, 0.1, None)
            ref = ref.to(device)
            weight, bias = (p.detach().clone().requires_grad_(True) for p in (ref.weight, ref.bias))
            running_mean, running_var = ref.running_mean.clone(), ref.running_var.clone()
            x, g = (t.to(device) for t in _batch(4, dtype, seed=3))
            x_ref = x.to(param_dtype, copy=True).requires_grad_(True)
            out_ref = ref(x_ref)
            (out_ref * g.to(param_dtype)).sum().backward()
            x_mine = x.clone().requires_grad_(True)
            with _CountAllReduce() as count:
                out = cross_device_bn._CrossDeviceBatchNormFunction.apply(
                    x_mine, weight, bias, running_mean, running_var, ref.eps, 0.1, dist.group.WORLD
                )
                (out * g).sum().backward()
            calls += count.calls
            tol = TOL[dtype] if dtype != torch.float16 else {"rtol": 1e-2, "atol": 2e-2}
            assert out.dtype == dtype and out.device.type == device
            assert_close(out.to(param_dtype), out_ref.detach(), **tol)
            assert_close(x_mine.grad.to(param_dtype), x_ref.grad, **tol)
            assert_close(weight.grad, ref.weight.grad, **TOL[param_dtype])
            assert_close(bias.grad, ref.bias.grad, **TOL[param_dtype])
            assert_close(running_mean, ref.running_mean, **TOL[param_dtype])
            assert_close(running_var, ref.running_var, **TOL[param_dtype])
        _save({"calls": calls}, run_dir, rank)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_function_on_a_one_rank_group_matches_batchnorm(spawn_ranks, device: str) -> None:
    assert spawn_ranks(_one_rank_function_entry, 1, device) == [{"calls": 6}]


def _two_gpu_entry(rank: int, world_size: int, run_dir: str) -> None:
    _init_group(rank, world_size, run_dir, "nccl")
    try:
        for sizes in ([3, 3], [1, 4], [0, 3]):
            for dtype in (torch.float64, torch.float32):
                _compare_with_reference(rank, world_size, sizes, None, dtype, 0.1, device="cuda")
        _save({"done": True}, run_dir, rank)
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda(gpus=2)
def test_two_gpus_over_nccl_match_batchnorm_on_concatenated_batch(spawn_ranks) -> None:
    # The CPU counterpart, with the same helper, is test_two_ranks_match_batchnorm_on_concatenated_batch.
    assert spawn_ranks(_two_gpu_entry, 2) == [{"done": True}] * 2


# ----------------------------------------------------------------------------- single process


def test_without_process_group_is_batchnorm() -> None:
    assert not dist.is_initialized()
    for momentum in (0.1, None):
        ref, ours = _bn_pair(torch.float32, momentum, None)
        for seed in range(2):
            x, g = _batch(4, torch.float32, seed)
            x_ref = x.clone().requires_grad_(True)
            x_ours = x.clone().requires_grad_(True)
            out_ref, out = ref(x_ref), ours(x_ours)
            (out_ref * g).sum().backward()
            (out * g).sum().backward()
            assert torch.equal(out, out_ref)
            assert torch.equal(x_ours.grad, x_ref.grad)
        assert torch.equal(ours.weight.grad, ref.weight.grad) and torch.equal(ours.bias.grad, ref.bias.grad)
        for key, value in ref.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value), key
        ref.eval()
        ours.eval()
        assert torch.equal(ours(x), ref(x))


def test_invalid_group_size() -> None:
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="group_size"):
            CrossDeviceBatchNorm2d(4, group_size=bad)
    with pytest.raises(ValueError, match="group_size"):
        convert_cross_device_bn(nn.BatchNorm2d(4), group_size=0)


def test_convert_resnet18_keeps_state_and_leaves_frozen_bn() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.layer1[0].bn1 = FrozenBatchNorm2d(64)
    model.train()
    for m in model.modules():  # non-trivial statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(5)
    model.layer4[1].bn2.weight.requires_grad_(False)
    model.layer2.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = dict(model.named_parameters())
    x = torch.randn(1, 3, 32, 32)
    model.eval()
    out_before = model(x)
    model.train()
    model.layer2.eval()

    converted = convert_cross_device_bn(model, group_size=2)

    assert converted is model
    cdbn = [m for m in model.modules() if isinstance(m, CrossDeviceBatchNorm2d)]
    assert len(cdbn) == 19 and all(m.group_size == 2 for m in cdbn)  # resnet18 has 20 BNs, 1 frozen
    assert type(model.layer1[0].bn1) is FrozenBatchNorm2d
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value) and after[key].dtype == value.dtype, key
    for name, p in model.named_parameters():
        assert p is params_before[name], name  # optimizer references stay valid
    assert not model.layer4[1].bn2.weight.requires_grad and model.layer4[1].bn1.weight.requires_grad
    assert not model.layer2[0].bn1.training and model.layer3[0].bn1.training
    model.eval()
    assert torch.equal(model(x), out_before)


def test_convert_root_batchnorm_keeps_dtype_and_flags() -> None:
    bn = nn.BatchNorm2d(5, eps=1e-3, momentum=None, affine=False, dtype=torch.float64).eval()
    new = convert_cross_device_bn(bn)
    assert isinstance(new, CrossDeviceBatchNorm2d) and new is not bn
    assert new.eps == 1e-3 and new.momentum is None and not new.affine and not new.training
    assert new.running_mean is bn.running_mean and new.running_mean.dtype == torch.float64
    no_stats = convert_cross_device_bn(nn.BatchNorm2d(5, track_running_stats=False))
    assert no_stats.running_mean is None and not no_stats.track_running_stats
    x = torch.randn(3, 5, 2, 2)
    assert torch.equal(no_stats(x), nn.BatchNorm2d(5, track_running_stats=False)(x))


# ----------------------------------------------------------------------------- a whole detector step


def _detector_cfg(norm: str):  # noqa: ANN202 (Config; imported lazily in the spawned ranks too)
    from megdet.config import load_config

    return load_config(None, [
        f"model.norm={norm}", "model.backbone=resnet18", "model.fpn_channels=32", "model.num_classes=3",
        "model.rpn.anchor_sizes=[16,32,64,128,256]", "model.rpn.pre_nms_top_n_train=100",
        "model.rpn.post_nms_top_n_train=50", "model.rpn.batch_size_per_image=64",
        "model.roi.batch_size_per_image=16", "model.roi.box_head_dim=32",
    ])  # fmt: skip


def _detector_batch() -> tuple[torch.Tensor, list[tuple[int, int]], list[dict[str, torch.Tensor]]]:
    """Two different 64x64 images with different objects."""
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 64, 64, generator=gen)
    targets = [
        {"boxes": torch.tensor([[6.0, 4.0, 28.0, 30.0], [30.0, 30.0, 60.0, 58.0]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[10.0, 12.0, 50.0, 40.0]]), "labels": torch.tensor([3])},
    ]
    return images, [(64, 64), (64, 64)], targets


def _first_k_keys(shape: Any, device: Any) -> torch.Tensor:
    # The RPN and RoI samplers take the top-k of random keys; with keys falling along the candidates they
    # pick the same anchors / RoIs for an image whether it is sampled alone or next to another image.
    # Every image then has exactly batch_size_per_image samples, so the per-rank loss means average to
    # the global one.
    n = shape[-1]
    return (1.0 - torch.arange(n, dtype=torch.float64, device=device) / max(n, 1)).expand(shape).clone()


def _detector_step(model: nn.Module, images, sizes, targets) -> dict[str, torch.Tensor]:  # noqa: ANN001
    from megdet.modeling import box_ops

    original = box_ops.random_keys
    box_ops.random_keys = _first_k_keys
    try:
        losses = model(images, sizes, targets)
        sum(losses.values()).backward()
    finally:
        box_ops.random_keys = original
    return {k: v.detach() for k, v in losses.items()}


def _detector_entry(rank: int, world_size: int, run_dir: str, init_path: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from megdet.modeling.detector import build_model

    _init_group(rank, world_size, run_dir)
    try:
        model = build_model(_detector_cfg("CrossDeviceBN")).train()
        model.load_state_dict(torch.load(init_path, weights_only=True))
        ddp = DistributedDataParallel(model, broadcast_buffers=False)
        images, sizes, targets = _detector_batch()
        losses = _detector_step(ddp, images[rank: rank + 1], sizes[rank: rank + 1], targets[rank: rank + 1])
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}  # DDP-averaged
        _save({"grads": grads, "losses": losses, "state": model.state_dict()}, run_dir, rank)
    finally:
        dist.destroy_process_group()


def test_detector_step_on_two_ranks_equals_one_process_with_batchnorm(spawn_ranks, tmp_path) -> None:
    """A training step of the detector on 2 ranks x 1 image with cross-device BN gives the gradients of
    1 process x 2 images with plain BN (and different ones with per-device BN)."""
    from megdet.modeling.detector import build_model

    torch.manual_seed(0)
    reference = build_model(_detector_cfg("BN")).train()
    init = copy.deepcopy(reference.state_dict())
    images, sizes, targets = _detector_batch()
    losses = _detector_step(reference, images, sizes, targets)
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    # Per-device BN instead (each image normalised alone): the gradients the test must tell apart.
    alone = build_model(_detector_cfg("BN")).train()
    for i in range(2):
        alone.load_state_dict(init)
        _detector_step(alone, images[i: i + 1], sizes[i: i + 1], targets[i: i + 1])
    per_device = {n: p.grad / 2 for n, p in alone.named_parameters() if p.grad is not None}

    torch.save(init, tmp_path / "init.pt")
    ranks = spawn_ranks(_detector_entry, 2, str(tmp_path / "init.pt"))
    assert ranks[0]["grads"].keys() == ref_grads.keys() and len(ref_grads) > 50
    for name, g in ref_grads.items():
        torch.testing.assert_close(ranks[0]["grads"][name], g, rtol=1e-4, atol=1e-5, msg=name)
        assert torch.equal(ranks[1]["grads"][name], ranks[0]["grads"][name])
    mean_loss = {k: (ranks[0]["losses"][k] + ranks[1]["losses"][k]) / 2 for k in losses}
    for k, v in losses.items():
        torch.testing.assert_close(mean_loss[k], v, rtol=1e-5, atol=1e-6, msg=k)
    # Running statistics: those of BN over both images, on both ranks.
    for key, value in reference.state_dict().items():
        if "running" in key:
            torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    differs = [n for n in ref_grads if not torch.allclose(per_device[n], ref_grads[n], rtol=1e-3, atol=1e-5)]
    assert len(differs) > len(ref_grads) // 2


def test_local_groups_normalise_each_slice_on_its_own_statistics() -> None:
    torch.manual_seed(0)
    x = (torch.randn(8, 3, 5, 5, dtype=torch.float64) * 3 + 1).requires_grad_()
    layer = CrossDeviceBatchNorm2d(3, momentum=0.5).double()
    layer.local_groups = 4  # groups of 2 images
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        layer.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    y = layer(x)
    refs = [torch.nn.BatchNorm2d(3, momentum=0.5).double() for _ in range(4)]
    expected = []
    for ref, chunk in zip(refs, x.split(2)):
        ref.load_state_dict(layer.state_dict() | {"running_mean": torch.zeros(3), "running_var": torch.ones(3)})
        expected.append(ref(chunk))
    assert torch.allclose(y, torch.cat(expected), atol=1e-12)
    # Running statistics: halfway (momentum 0.5) to the mean of the slices' statistics.
    mean = torch.stack([r.running_mean for r in refs]).mean(0)
    var = torch.stack([r.running_var for r in refs]).mean(0)
    assert torch.allclose(layer.running_mean, mean, atol=1e-12)
    assert torch.allclose(layer.running_var, var, atol=1e-12)
    assert int(layer.num_batches_tracked) == 1
    # Gradients flow to the input and the affine parameters like per-slice BatchNorm's.
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    out = torch.cat([torch.nn.functional.batch_norm(c, None, None, w, b, True) for c in x2.split(2)])
    out.square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-10) and torch.allclose(layer.weight.grad, w.grad, atol=1e-10)
    # In eval mode the running statistics are used, as in any BatchNorm.
    layer.eval()
    assert torch.allclose(layer(x), torch.nn.functional.batch_norm(
        x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False))  # fmt: skip


def test_bn_group_images_reaches_every_layer_and_must_divide_the_device_batch() -> None:
    from megdet.config import ConfigError, load_config
    from megdet.modeling.detector import build_model

    cfg = load_config(None, ["model.norm=CrossDeviceBN", "model.bn_group_images=2", "data.images_per_device=8",
                             "model.fpn_channels=16", "model.roi.box_head_dim=32"])  # fmt: skip
    layers = [m for m in build_model(cfg).modules() if isinstance(m, CrossDeviceBatchNorm2d)]
    assert layers and all(m.local_groups == 4 for m in layers)
    cfg.data.images_per_device = 6
    cfg.model.bn_group_images = 4
    with pytest.raises(ConfigError, match="model.bn_group_images=4 does not divide data.images_per_device=6"):
        build_model(cfg)


@pytest.mark.parametrize("rows", [0, 1, 3])
def test_local_groups_take_any_batch_without_communicating(rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # A RoI head's batch may hold 0 or 1 RoIs on one rank: no collective may be issued for it.
    from megdet.layers import collectives, cross_device_bn

    def no_collectives(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a collective was issued with local groups on")

    monkeypatch.setattr(cross_device_bn, "_statistics_group", lambda size: object())
    monkeypatch.setattr(collectives, "all_reduce", no_collectives)
    layer = CrossDeviceBatchNorm2d(2)
    layer.local_groups = 4
    x = torch.randn(rows, 2, 3, 3, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == x.shape and layer.weight.grad is not None


@pytest.mark.parametrize("rows", [6, 7])
def test_local_groups_equal_and_unequal_slices_match_per_slice_batchnorm(rows: int) -> None:
    # 6 rows in 3 groups take the one-call path, 7 rows (slices of 3 / 2 / 2) the per-slice path: both
    # must equal BatchNorm over each slice and keep a channels_last input's layout.
    torch.manual_seed(1)
    x = torch.randn(rows, 4, 3, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    layer = CrossDeviceBatchNorm2d(4, momentum=1.0)
    layer.local_groups = 3
    y = layer(x)
    chunks = torch.tensor_split(x.detach(), 3)
    expected = torch.cat([torch.nn.functional.batch_norm(c, None, None, training=True) for c in chunks])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    means = torch.stack([c.mean(dim=(0, 2, 3)) for c in chunks]).mean(0)
    variances = torch.stack([c.var(dim=(0, 2, 3)) for c in chunks]).mean(0)
    torch.testing.assert_close(layer.running_mean, means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_var, variances, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
