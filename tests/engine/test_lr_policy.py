"""The large learning-rate policy: linear scaling, warmup rule, decays, optimizer parameter groups."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from megdet.config import ConfigError, SolverConfig, load_config
from megdet.engine.lr_policy import (
    MIN_WARMUP_ITERS,
    WARMUP_IMAGES,
    LRScheduler,
    build_optimizer,
    lr_at,
    param_groups,
    plot_schedule,
    resolve_schedule,
)
from megdet.layers.cross_device_bn import CrossDeviceBatchNorm2d

COCO_TRAIN = 118_287  # images in COCO train2017


def _info(
    world: int, ipd: int = 2, accum: int = 1, num_images: int = COCO_TRAIN, max_iters: int = -1, **solver
):
    return resolve_schedule(SolverConfig(**solver), world, ipd, accum, num_images, max_iters)


@pytest.mark.parametrize("world", [1, 2, 8, 32])
def test_linear_scaling_and_constant_epochs(world: int) -> None:
    info = _info(world)
    ref = _info(1)
    assert info.global_batch == 2 * world
    assert info.lr == pytest.approx(0.02 * 2 * world / 16)
    assert info.iters_per_epoch == math.ceil(COCO_TRAIN / (2 * world))
    assert info.total_iters == round(12 * info.iters_per_epoch)
    # Epochs stay (to within one iteration's worth of rounding); iterations scale as 1 / world.
    assert info.total_iters * info.global_batch == pytest.approx(
        12 * COCO_TRAIN, rel=2 * world / COCO_TRAIN + 1e-9
    )
    assert ref.total_iters / info.total_iters == pytest.approx(world, rel=1e-3)
    assert info.epochs == pytest.approx(12.0, rel=1e-4)
    # Decays at 8 and 11 epochs, whatever the device count.
    assert info.decay_iters == [round(8 * info.iters_per_epoch), round(11 * info.iters_per_epoch)]
    assert info.decay_factors == [0.1, 0.1]


def test_grad_accumulation_counts_in_the_global_batch() -> None:
    a = _info(4, ipd=2, accum=2)
    b = _info(8, ipd=2, accum=1)
    assert a.global_batch == b.global_batch == 16
    assert a.lr == b.lr == pytest.approx(0.02)
    assert a.total_iters == b.total_iters and a.warmup_iters == b.warmup_iters


@pytest.mark.parametrize("world", [1, 2, 8, 32])
def test_warmup_constant_in_images_monotone_and_exact_at_the_end(world: int) -> None:
    info = _info(world)
    w = info.warmup_iters
    assert w == max(math.ceil(WARMUP_IMAGES / info.global_batch), MIN_WARMUP_ITERS)
    assert WARMUP_IMAGES <= w * info.global_batch < WARMUP_IMAGES + info.global_batch
    if world == 8:  # batch 16: detectron2's 1000 iterations
        assert w == 1000
    lrs = [lr_at(info, i) for i in range(w + 1)]
    assert lrs[0] == pytest.approx(0.001 * info.lr)
    assert all(b > a for a, b in zip(lrs, lrs[1:]))  # raised every iteration
    steps = [b - a for a, b in zip(lrs, lrs[1:])]
    assert max(steps) == pytest.approx(min(steps), rel=1e-6)  # by a constant amount
    assert lrs[-1] == info.lr  # exactly the scaled lr at the end of warmup
    assert lr_at(info, w + 5) == info.lr


def test_warmup_floor_at_very_large_batch() -> None:
    info = _info(512, ipd=2)  # batch 1024: 16 iterations by images, floored
    assert info.warmup_iters == MIN_WARMUP_ITERS
    # A single step never raises the lr by more than 1 / MIN_WARMUP_ITERS of its peak.
    assert lr_at(info, 1) - lr_at(info, 0) <= info.lr / MIN_WARMUP_ITERS


def test_warmup_capped_for_short_runs_and_explicit_values() -> None:
    short = _info(1, num_images=100)  # 600 iterations in all, 8000 by the image rule
    assert short.total_iters == 600 and short.warmup_iters == 300 and "capped at 0.5" in short.warmup_rule
    assert _info(1, warmup_iters=37).warmup_iters == 37
    off = _info(8, warmup=False)
    assert off.warmup_iters == 0 and lr_at(off, 0) == off.lr
    assert lr_at(_info(8, warmup_iters=0), 0) == pytest.approx(0.02)


def test_step_decays_cumulative_megdet_factors() -> None:
    info = _info(8, decay_epochs=[8.0, 10.0, 11.0], decay_factors=[0.1, 0.1, 0.5])
    d1, d2, d3 = info.decay_iters
    assert lr_at(info, d1 - 1) == pytest.approx(info.lr)
    assert lr_at(info, d1) == pytest.approx(info.lr * 0.1)
    assert lr_at(info, d2 - 1) == pytest.approx(info.lr * 0.1)
    assert lr_at(info, d2) == pytest.approx(info.lr * 0.01)
    assert lr_at(info, d3) == pytest.approx(info.lr * 0.005)
    assert lr_at(info, info.total_iters + 10) == pytest.approx(info.lr * 0.005)
    # Fewer decay epochs than factors: the first factors.
    two = _info(8, decay_epochs=[8.0, 11.0], decay_factors=[0.1, 0.1, 0.5])
    assert two.decay_factors == [0.1, 0.1]


def test_max_iters_keeps_decays_at_the_same_fraction() -> None:
    info = _info(2, max_iters=1200)
    assert info.total_iters == 1200
    assert info.decay_iters == [800, 1100]
    assert info.warmup_iters == min(max(4000, MIN_WARMUP_ITERS), 600)  # capped at half of the run


def test_cosine_ends_at_the_floor() -> None:
    info = _info(8, policy="cosine", min_lr_factor=0.05)
    w, total = info.warmup_iters, info.total_iters
    assert lr_at(info, w) == pytest.approx(info.lr)
    assert lr_at(info, total) == pytest.approx(0.05 * info.lr)
    assert lr_at(info, (w + total) // 2) == pytest.approx(info.lr * (0.05 + 0.95 * 0.5), rel=1e-3)
    after = [lr_at(info, i) for i in range(w, total + 1, 997)]
    assert all(b <= a for a, b in zip(after, after[1:]))
    assert info.decay_iters == []


@pytest.mark.parametrize(
    ("solver", "key"),
    [
        ({"policy": "linear"}, "solver.policy"),
        ({"decay_epochs": [11.0, 8.0]}, "solver.decay_epochs"),
        ({"decay_epochs": [8.0, 13.0]}, "solver.decay_epochs"),
        ({"decay_epochs": [4.0, 8.0, 10.0, 11.0]}, "solver.decay_factors"),
        ({"warmup_factor": 0.0}, "solver.warmup_factor"),
        ({"base_lr": -1.0}, "solver.base_lr"),
        ({"momentum": 1.0}, "solver.momentum"),
        ({"weight_decay": -1e-4}, "solver.weight_decay"),
    ],
)
def test_bad_solver_values_name_the_key(solver: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        _info(8, **solver)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):  # the same, without any data set
        dataclasses.replace(SolverConfig(), **solver).validate()


def test_summary_lines_mention_everything() -> None:
    text = "\n".join(_info(8).summary_lines())
    for part in ("global batch 16", "0.02", "1000 iterations", "decay (step)"):
        assert part in text


def test_scheduler_sets_every_group_and_resumes() -> None:
    info = _info(8)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    opt = build_optimizer(model, SolverConfig(), info.lr)
    sched = LRScheduler(opt, info)
    for _ in range(10):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [lr_at(info, 10)] * len(opt.param_groups)
    other = LRScheduler(build_optimizer(model, SolverConfig(), info.lr), info)
    other.load_state_dict(sched.state_dict())
    assert other.get_last_lr() == sched.get_last_lr() and other.iteration == 10


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.gn = nn.GroupNorm(2, 8)
        self.cdbn = CrossDeviceBatchNorm2d(8)
        self.frozen = FrozenBatchNorm2d(8)
        self.fc = nn.Linear(8, 2)
        self.fixed = nn.Linear(2, 2)
        self.fixed.requires_grad_(False)


def test_no_weight_decay_on_norm_parameters_and_biases() -> None:
    model = _Net()
    groups = {g["name"]: g for g in param_groups(model, 1e-4, 0.0)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert groups["decay"]["weight_decay"] == 1e-4 and groups["no_decay"]["weight_decay"] == 0.0
    assert ids["decay"] == {id(model.conv.weight), id(model.fc.weight)}
    assert ids["no_decay"] == {
        id(p)
        for p in (
            model.conv.bias,
            model.fc.bias,
            model.bn.weight,
            model.bn.bias,
            model.gn.weight,
            model.gn.bias,
            model.cdbn.weight,
            model.cdbn.bias,
        )
    }
    opt = build_optimizer(model, SolverConfig(weight_decay=5e-4, weight_decay_norm=1e-5), 0.1)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [1e-5, 5e-4]
    assert opt.defaults["momentum"] == 0.9


def test_adamw_optimizer_keeps_the_groups_and_the_scaled_lr() -> None:
    model = _Net()
    opt = build_optimizer(model, SolverConfig(optimizer="adamw", weight_decay=0.05), 0.004)
    assert isinstance(opt, torch.optim.AdamW)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.05]
    assert all(g["lr"] == 0.004 for g in opt.param_groups)
    # The schedule drives AdamW exactly like SGD.
    info = _info(2, optimizer="adamw")
    sched = LRScheduler(opt, info)
    for _ in range(5):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [lr_at(info, 5)] * 2
    with pytest.raises(ConfigError, match="solver.optimizer: unknown optimizer 'adam'"):
        build_optimizer(model, SolverConfig(optimizer="adam"), 0.1)
    with pytest.raises(ConfigError, match="solver.optimizer"):
        _info(2, optimizer="adagrad")


def test_detector_norms_and_biases_are_not_decayed() -> None:
    from megdet.modeling.detector import build_model

    torch.manual_seed(0)
    model = build_model(
        load_config(None, ["model.fpn_channels=16", "model.roi.box_head_dim=32", "model.norm=GN"])
    )
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(model, 1e-4, 0.0)}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert groups["decay"] | groups["no_decay"] == trainable
    assert not groups["decay"] & groups["no_decay"]
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_norm = isinstance(model.get_submodule(name.rpartition(".")[0]), nn.GroupNorm)
        expected = "no_decay" if is_norm or name.endswith(".bias") else "decay"
        assert id(p) in groups[expected], name


def test_plot_schedule_writes_a_png(tmp_path) -> None:
    path = plot_schedule(_info(8, max_iters=300), tmp_path / "sub" / "lr.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# The demo recipe (configs/demo.yaml: AdamW, 0.004 at its batch of 8, 16 epochs of 1000 images) on 2
# devices at every global batch: (peak lr, iterations, warmup iterations). AdamW follows the square root
# of the batch ratio; warmup stays half of the run, i.e. 8 epochs (8,000 images) at every batch.
DEMO_POLICY = {
    8: (0.004, 2000, 1000),
    16: (0.004 * math.sqrt(2), 1008, 504),  # an epoch is ceil(1000 / batch) iterations (the sampler's)
    32: (0.008, 512, 256),
    64: (0.004 * math.sqrt(8), 256, 128),
    128: (0.016, 128, 64),
}


@pytest.mark.parametrize("batch", sorted(DEMO_POLICY))
def test_demo_policy_from_batch_8_to_128(batch: int) -> None:
    from megdet.engine.setup import bn_statistics_text, schedule_for

    cfg = load_config("configs/demo.yaml", [f"data.images_per_device={batch // 2}"])
    info = schedule_for(cfg, world_size=2, num_images=1000)
    lr, total, warmup = DEMO_POLICY[batch]
    assert info.global_batch == batch and info.lr_scaling == "sqrt"
    assert info.lr == pytest.approx(lr, rel=1e-12)
    assert (info.total_iters, info.warmup_iters) == (total, warmup)
    assert info.epochs == pytest.approx(16.0)
    assert info.betas == [0.9, 0.999]
    assert f"statistics over {batch} images (2 device(s) x {batch // 2}" in bn_statistics_text(cfg, 2)


@pytest.mark.parametrize(
    ("optimizer", "scaling", "factor"),
    [("sgd", "auto", 4.0), ("lars", "auto", 4.0), ("adamw", "auto", 2.0), ("lamb", "auto", 2.0),
     ("adamw", "linear", 4.0), ("sgd", "sqrt", 2.0), ("sgd", "none", 1.0), ("adamw", "none", 1.0)],
)  # fmt: skip
def test_lr_scaling_rules(optimizer: str, scaling: str, factor: float) -> None:
    info = _info(32, ipd=2, optimizer=optimizer, lr_scaling=scaling)  # batch 64 = 4 x the reference 16
    assert info.lr == pytest.approx(0.02 * factor)
    assert info.lr_scaling == (scaling if scaling != "auto" else ("sqrt" if factor == 2.0 else "linear"))
    line = info.summary_lines()[1]
    assert line.startswith("learning rate: 0.02 x ") and f"= {info.lr:.6g} ({optimizer}, " in line


def test_scaled_betas_follow_the_batch_ratio() -> None:
    plain = _info(32, ipd=2, optimizer="adamw")
    assert plain.betas == [0.9, 0.999]
    k4 = _info(32, ipd=2, optimizer="adamw", scale_betas=True)  # k = 64 / 16 = 4
    assert k4.betas == pytest.approx([0.6, 0.996])
    half = _info(4, ipd=2, optimizer="adamw", scale_betas=True)  # k = 0.5: longer averaging windows
    assert half.betas == pytest.approx([0.95, 0.9995])
    huge = _info(512, ipd=2, optimizer="adamw", scale_betas=True)  # k = 64: clamped, never negative
    assert huge.betas[0] == 0.0 and 0 < huge.betas[1] < 1
    assert _info(32, ipd=2, optimizer="sgd", scale_betas=True).betas == []
    assert "betas: 0.6, 0.996" in k4.summary_lines()


def test_optimizer_takes_the_schedule_betas_and_bad_values_are_one_line_errors() -> None:
    model = _Net()
    opt = build_optimizer(model, SolverConfig(optimizer="adamw"), 0.01, betas=[0.6, 0.996])
    assert all(g["betas"] == (0.6, 0.996) for g in opt.param_groups)
    with pytest.raises(ConfigError, match=r"solver.betas: expected two values in \[0, 1\)"):
        _info(2, optimizer="adamw", betas=[0.9, 1.0])
    with pytest.raises(ConfigError, match="solver.lr_scaling: unknown lr scaling rule 'cubic'"):
        _info(2, lr_scaling="cubic")


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_layerwise_optimizers_adapt_only_the_decayed_group(name: str) -> None:
    from megdet.engine.layerwise import LAMB, LARS

    model = _Net()
    opt = build_optimizer(model, SolverConfig(optimizer=name, weight_decay=1e-4), 0.1)
    assert isinstance(opt, LARS if name == "lars" else LAMB)
    assert {g["name"]: g["layerwise"] for g in opt.param_groups} == {"decay": True, "no_decay": False}
