"""The training loop on a tiny detector: resume equivalence, SIGTERM, non-finite guard, accumulation."""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from megdet.checkpoint import CheckpointManager, load_checkpoint
from megdet.config import ConfigError, config_to_dict, dump_config, load_config
from megdet.data.loader import Batch, build_train_loader
from megdet.engine.hooks import Hook
from megdet.engine.setup import ddp_buffer_kwargs, resolved_schedule_text
from megdet.engine.trainer import NonFiniteLossError, accumulate_gradients, apply_update, train


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_state(a: dict, b: dict, where: str = "") -> None:
    assert a.keys() == b.keys(), where
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), f"{where}{k}"
        elif isinstance(a[k], dict):
            _assert_same_state(a[k], b[k], f"{where}{k}.")
        elif isinstance(a[k], list):
            assert len(a[k]) == len(b[k]), f"{where}{k}"
            for i, (x, y) in enumerate(zip(a[k], b[k])):
                if isinstance(x, dict):
                    _assert_same_state(x, y, f"{where}{k}[{i}].")
                else:
                    assert x == y, f"{where}{k}[{i}]"
        else:
            assert a[k] == b[k], f"{where}{k}"


# Both optimizers: AdamW's state (step counts, two moments) must resume exactly too. fp16 (on CPU here:
# the same GradScaler code as on CUDA) adds the scaler's state, whose scale must survive the kill.
@pytest.mark.parametrize(("workers", "optimizer", "amp"), [(0, "sgd", "off"), (2, "adamw", "off"), (0, "sgd", "fp16")])
def test_killed_and_resumed_run_is_bit_identical(
    tiny_cfg, tmp_path, die_in, workers: int, optimizer: str, amp: str
) -> None:
    # Evaluation (with workers=0 in fp32 only, to save time) must not disturb the training stream either.
    evals = ["test.eval_period=2", "test.max_images=2"] if workers == 0 and amp == "off" else []
    common = ["train.max_iters=4", "train.checkpoint_period=2", f"data.num_workers={workers}", *evals]
    common += [f"solver.optimizer={optimizer}", f"train.amp={amp}"]
    full = train(tiny_cfg(*common, f"train.out_dir={tmp_path / 'full'}"))
    assert full["iteration"] == 4 and (not evals or "bbox" in full["eval"])

    # The second run dies in iteration 3, after the checkpoint at 2.
    cfg = tiny_cfg(*common, f"train.out_dir={tmp_path / 'resumed'}")
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(cfg, hooks=[die_in(3)])
    assert CheckpointManager(tmp_path / "resumed").latest().name == "model_0000002.pt"
    resumed = train(cfg, resume=True)
    assert resumed["iteration"] == 4

    a = load_checkpoint(tmp_path / "full" / "model_0000004.pt")
    b = load_checkpoint(tmp_path / "resumed" / "model_0000004.pt")
    _assert_same_state(a["model"], b["model"], "model.")
    _assert_same_state(a["optimizer"], b["optimizer"], "optimizer.")
    first_state = next(iter(a["optimizer"]["state"].values()))
    assert ("exp_avg" in first_state) == (optimizer == "adamw")  # the optimizer asked for was used
    _assert_same_state(a["rng"][0], b["rng"][0], "rng.")
    assert a["scheduler"] == b["scheduler"] == {"iteration": 4}
    assert a["scaler"] == b["scaler"]
    if amp == "fp16":
        # The scaler ran (a scale, and the count of steps since its last change) and resumed exactly.
        assert a["scaler"]["scale"] > 0 and "_growth_tracker" in a["scaler"]
    else:
        assert a["scaler"] == {}
    assert a["sampler_position"] == b["sampler_position"] == 4

    # metrics.jsonl of the resumed run: every iteration once (the dead run's extra lines dropped),
    # and the very same losses and evaluation as the uninterrupted run.
    ma, mb = _metrics(tmp_path / "full"), _metrics(tmp_path / "resumed")
    assert [m["iter"] for m in mb if "total_loss" in m] == [1, 2, 3, 4]
    for x, y in zip([m for m in ma if "total_loss" in m], [m for m in mb if "total_loss" in m]):
        assert x["total_loss"] == y["total_loss"] and x["lr"] == y["lr"]
    eval_a = [m for m in ma if "eval" in m]
    eval_b = [m for m in mb if "eval" in m]
    assert [m["iter"] for m in eval_a] == [m["iter"] for m in eval_b] == ([2, 4] if evals else [])
    assert eval_a == eval_b


SIGTERM_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from megdet.config import load_config
    from megdet.engine.trainer import train

    s = train(load_config(sys.argv[1]))
    print("SUMMARY " + json.dumps({k: s[k] for k in ("iteration", "interrupted", "checkpoint")}), flush=True)
    """
)


# "group": a job scheduler's SIGTERM reaches every process of the job, data-loader workers included.
@pytest.mark.parametrize("target", ["process", "group"])
def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tiny_cfg, tmp_path, signal_when_ready, target: str) -> None:
    workers = 2 if target == "group" else 0
    cfg = tiny_cfg("train.max_iters=500", "train.checkpoint_period=1000", f"data.num_workers={workers}")
    config = tmp_path / "tiny.yaml"
    config.write_text(dump_config(cfg))
    script = tmp_path / "worker.py"
    script.write_text(SIGTERM_WORKER)
    out = Path(cfg.train.out_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, to signal as a whole
    )
    metrics = out / "metrics.jsonl"
    if target == "group":
        send = lambda: os.killpg(proc.pid, signal.SIGTERM)  # noqa: E731
    else:
        send = lambda: proc.send_signal(signal.SIGTERM)  # noqa: E731
    stdout, stderr = signal_when_ready(proc, lambda: metrics.is_file() and metrics.read_text().strip(), send)
    assert proc.returncode == 0, stderr[-2000:]
    summary = json.loads(stdout.split("SUMMARY ", 1)[1])
    k = summary["iteration"]
    assert summary["interrupted"] and 1 <= k < 500
    assert summary["checkpoint"] == str(out / f"model_{k:07d}.pt")
    assert CheckpointManager(out).latest() == out / f"model_{k:07d}.pt"
    assert load_checkpoint(out / f"model_{k:07d}.pt")["iteration"] == k
    assert "SIGTERM" in stderr + stdout

    again = train(
        tiny_cfg(f"train.max_iters={k + 1}", "train.checkpoint_period=1000", f"data.num_workers={workers}"),
        resume=True,
    )
    assert again["iteration"] == k + 1 and not again["interrupted"]
    assert load_checkpoint(again["checkpoint"])["iteration"] == k + 1


class _PoisonFrom(Hook):
    """Makes the model's classifier loss NaN from its ``call``-th forward on."""

    def __init__(self, call: int) -> None:
        self.call, self.calls = call, 0

    def before_train(self, state) -> None:
        state.model.register_forward_hook(self.poison)

    def poison(self, module, args, output):
        self.calls += 1
        if self.calls >= self.call:
            output = dict(output)
            output["loss_classifier"] = output["loss_classifier"] * float("nan")
        return output


def test_non_finite_loss_stops_without_touching_the_last_checkpoint(tiny_cfg) -> None:
    cfg = tiny_cfg("train.max_iters=6", "train.checkpoint_period=2")
    with pytest.raises(NonFiniteLossError) as e:
        train(cfg, hooks=[_PoisonFrom(3)])
    msg = str(e.value)
    assert "\n" not in msg
    assert "iteration 3" in msg and "loss_classifier=nan" in msg and "lr=" in msg
    assert "loss_objectness=" in msg and "model_0000002.pt" in msg
    assert "have finite, non-empty targets" in msg  # the data is not to blame here
    out = Path(cfg.train.out_dir)
    assert [p.name for p in CheckpointManager(out).checkpoints()] == ["model_0000002.pt"]
    assert CheckpointManager(out).latest() == out / "model_0000002.pt"
    assert load_checkpoint(out / "model_0000002.pt")["iteration"] == 2


class _Toy(nn.Module):
    """Mimics the detector's interface; its losses are means over the images of the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, images, image_sizes, targets):
        pred = self.fc(self.gn(self.conv(images)).mean((2, 3)))
        y = torch.stack([t["y"] for t in targets])
        return {"loss_a": ((pred - y) ** 2).sum(1).mean(), "loss_b": pred.abs().sum(1).mean()}


def _toy_batch(images: torch.Tensor, ys: torch.Tensor) -> Batch:
    n = len(images)
    return Batch(images, [(8, 8)] * n, [(8, 8)] * n, list(range(n)), [{"y": y} for y in ys])


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulation_equals_the_large_batch_gradient() -> None:
    torch.manual_seed(0)
    images, ys = torch.randn(4, 3, 8, 8), torch.randn(4, 2)
    a = _Toy()
    b = copy.deepcopy(a)
    cpu = torch.device("cpu")
    micro = [_toy_batch(images[i : i + 1], ys[i : i + 1]) for i in range(4)]
    la = accumulate_gradients(a, micro, device=cpu)
    lb = accumulate_gradients(b, [_toy_batch(images, ys)], device=cpu)
    assert la.keys() == lb.keys() == {"loss_a", "loss_b", "total_loss"}
    for k in la:
        assert la[k] == pytest.approx(lb[k], rel=1e-5)
    ga, gb = _grads(a), _grads(b)
    assert ga.keys() == gb.keys() and len(ga) == 6
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-7)


def test_ddp_syncs_buffers_only_for_plain_batchnorm() -> None:
    from megdet.layers import CrossDeviceBatchNorm2d

    def sync(*layers: nn.Module) -> bool:
        (value,) = ddp_buffer_kwargs(nn.Sequential(*layers)).values()
        return value

    assert sync(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    assert not sync(CrossDeviceBatchNorm2d(4), nn.GroupNorm(2, 4), nn.BatchNorm2d(4, track_running_stats=False))
    assert sync(CrossDeviceBatchNorm2d(4), nn.BatchNorm2d(4))  # cross-device backbone, BN heads
    (name,) = ddp_buffer_kwargs(nn.Sequential()).keys()
    assert name in inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters


@pytest.mark.parametrize("fused", [False, True])  # build_optimizer's optimizers are fused
def test_fp16_loss_scaling_clips_unscaled_gradients_and_skips_overflow(fused: bool) -> None:
    # The trainer's GradScaler path (device-independent code; a CPU scaler here, CUDA's in fp16 runs).
    torch.manual_seed(0)
    images, ys = torch.randn(2, 3, 8, 8), torch.randn(2, 2)
    plain, scaled = _Toy(), _Toy()
    scaled.load_state_dict(plain.state_dict())
    cpu = torch.device("cpu")
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1, fused=fused)
    opt_scaled = torch.optim.SGD(scaled.parameters(), lr=0.1, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    accumulate_gradients(plain, [_toy_batch(images, ys)], device=cpu)
    accumulate_gradients(scaled, [_toy_batch(images, ys)], device=cpu, scaler=scaler)
    assert scaled.fc.bias.grad.abs().sum() > 100 * plain.fc.bias.grad.abs().sum()  # really scaled
    norm_plain = apply_update(opt_plain, list(plain.parameters()), grad_clip=0.01)
    norm_scaled = apply_update(opt_scaled, list(scaled.parameters()), scaler=scaler, grad_clip=0.01)
    assert float(norm_scaled) == pytest.approx(float(norm_plain), rel=1e-5) and norm_plain > 0.01  # clipped, unscaled
    for (n, a), b in zip(plain.named_parameters(), scaled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=n)

    # An overflowing gradient: the step is skipped (weights unchanged) and the scale halves.
    before = copy.deepcopy(scaled.state_dict())
    scaled.zero_grad()
    accumulate_gradients(scaled, [_toy_batch(images, ys)], device=cpu, scaler=scaler)
    scaled.fc.bias.grad[0] = float("inf")
    apply_update(opt_scaled, list(scaled.parameters()), scaler=scaler)
    assert scaler.get_scale() == 2.0**9
    _assert_same_state(scaled.state_dict(), before)


def test_detector_accumulation_2x1_equals_1x2_with_group_norm(tiny_cfg) -> None:
    from megdet.modeling.detector import build_model

    # Every anchor / RoI sampled: no randomness in what the loss sees. Two copies of one image:
    # the batch of two has exactly the per-image loss, so accumulation must reproduce its gradient.
    cfg = tiny_cfg(
        "model.norm=GN",
        "model.rpn.batch_size_per_image=100000",
        "model.roi.batch_size_per_image=100000",
        "data.images_per_device=1",
    )
    one = next(iter(build_train_loader(cfg, 0, 1)))
    two = Batch(
        torch.cat([one.images, one.images]),
        one.image_sizes * 2,
        one.original_sizes * 2,
        one.image_ids * 2,
        one.targets * 2,
    )
    torch.manual_seed(0)
    a = build_model(cfg).train()
    b = copy.deepcopy(a)
    cpu = torch.device("cpu")
    la = accumulate_gradients(a, [one, one], device=cpu)
    lb = accumulate_gradients(b, [two], device=cpu)
    for k in la:
        assert la[k] == pytest.approx(lb[k], rel=1e-4), k
    ga, gb = _grads(a), _grads(b)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-3, atol=1e-6, msg=n)


@pytest.mark.parametrize("mode", ["blocks", "nested"])
def test_recompute_names_and_equal_gradients(tiny_cfg, mode) -> None:
    from megdet.layers.recompute import Recompute, apply_recompute, recompute_names
    from megdet.modeling.detector import build_model

    cfg = tiny_cfg("model.trainable_layers=3")
    torch.manual_seed(0)
    model = build_model(cfg).train()
    stages = recompute_names(model, model.recompute_stages(), "stages")
    assert stages == [
        "backbone.body.layer2",
        "backbone.body.layer3",
        "backbone.body.layer4",
        "backbone.fpn",
        "roi_heads.box_head.head",
    ]
    blocks = recompute_names(model, model.recompute_stages(), "blocks")
    assert "backbone.body.layer2.0" in blocks and "backbone.body.layer4.1" in blocks
    assert "backbone.fpn" in blocks and "roi_heads.box_head.head.fc6" in blocks
    assert not any(n.startswith(("backbone.body.stem", "backbone.body.layer1")) for n in blocks)
    assert "backbone.body.layer2" not in blocks
    nested = recompute_names(model, model.recompute_stages(), "nested")
    # Every stage of "stages", with the residual stages' blocks listed before their stage.
    assert [n for n in nested if n in stages] == stages
    for stage in ("backbone.body.layer2", "backbone.body.layer4"):
        inner = [i for i, n in enumerate(nested) if n.startswith(stage + ".")]
        assert len(inner) == len(model.get_submodule(stage)) and max(inner) < nested.index(stage)
    assert "roi_heads.box_head.head.fc6" not in nested
    assert recompute_names(model, model.recompute_stages(), "off") == []

    batch = next(iter(build_train_loader(cfg, 0, 1)))
    wrapped = apply_recompute(copy.deepcopy(model), blocks if mode == "blocks" else nested)
    if mode == "nested":
        stage = wrapped.backbone.body.layer3
        assert isinstance(stage, Recompute) and all(isinstance(b, Recompute) for b in stage.inner)
    cpu = torch.device("cpu")
    torch.manual_seed(1)
    la = accumulate_gradients(model, [batch], device=cpu)
    torch.manual_seed(1)
    lb = accumulate_gradients(wrapped, [batch], device=cpu)
    assert la == pytest.approx(lb, rel=1e-6)
    ga = _grads(model)
    gb = {n.replace(".inner.", "."): g for n, g in _grads(wrapped).items()}
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-7, msg=n)
    # BatchNorm running statistics were updated once, not twice (or three times when nested).
    _assert_same_state(model.state_dict(), wrapped.state_dict())


def test_bf16_autocast_on_cpu(tiny_cfg) -> None:
    from megdet.modeling.detector import build_model

    cfg = tiny_cfg("data.images_per_device=1")
    batch = next(iter(build_train_loader(cfg, 0, 1)))
    torch.manual_seed(0)
    model = build_model(cfg).train()
    cpu = torch.device("cpu")
    torch.manual_seed(1)
    fp32 = accumulate_gradients(model, [batch], device=cpu)
    model.zero_grad()
    torch.manual_seed(1)
    bf16 = accumulate_gradients(model, [batch], device=cpu, amp="bf16")
    assert bf16["total_loss"] != fp32["total_loss"]  # autocast really ran in bf16
    assert bf16["total_loss"] == pytest.approx(fp32["total_loss"], rel=2e-2)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_sublinear_clip_accumulation_and_outputs(tiny_cfg, tmp_path) -> None:
    cfg = tiny_cfg(
        "train.sublinear_memory=stages",
        "train.grad_clip=1.0",
        "train.grad_accum_steps=2",
        "data.images_per_device=1",
        "train.max_iters=2",
        "train.checkpoint_period=1",
        "train.keep_checkpoints=1",
        "test.eval_period=0",
        "test.max_images=2",
    )
    summary = train(cfg)
    out = tmp_path / "run"
    assert summary["iteration"] == 2 and summary["checkpoint"] == str(out / "model_0000002.pt")
    assert [p.name for p in CheckpointManager(out).checkpoints()] == ["model_0000002.pt"]
    assert summary["schedule"]["global_batch"] == 2
    assert set(summary["eval"]) == {"bbox"} and "AP" in summary["eval"]["bbox"]["stats"]
    lines = _metrics(out)
    train_lines = [m for m in lines if "total_loss" in m]
    assert [m["iter"] for m in train_lines] == [1, 2]
    for m in train_lines:
        assert {"lr", "grad_norm", "images_per_s", "memory_mb", "time", "loss_objectness"} <= m.keys()
        assert m["memory_mb"] > 0 and m["images_per_s"] > 0
    assert [m["iter"] for m in lines if "eval" in m] == [2]
    assert load_config(out / "config.yaml") == cfg
    assert (out / "lr_schedule.png").stat().st_size > 0
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert (out / "eval" / "iter_0000002" / "eval.json").is_file()
    # The checkpoint has plain keys (the Recompute wrappers are invisible in the state dict).
    state = load_checkpoint(out / "model_0000002.pt")
    assert not any(".inner." in k for k in state["model"])
    assert state["config"] == config_to_dict(cfg)


def test_config_errors(tiny_cfg, tmp_path) -> None:
    with pytest.raises(ConfigError, match="train.amp: unknown mode 'fp8'"):
        train(tiny_cfg("train.amp=fp8"))
    with pytest.raises(ConfigError, match="train.sublinear_memory"):
        train(tiny_cfg("train.sublinear_memory=all"))
    with pytest.raises(ConfigError, match="model.bn_group_size=2: the world size 1 is not divisible"):
        train(tiny_cfg("model.norm=CrossDeviceBN", "model.bn_group_size=2"))
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": {}}, out / "model_0000010.pt")
    with pytest.raises(ConfigError, match="already holds a run.*--resume"):
        train(tiny_cfg())


def test_a_missing_training_image_fails_before_the_first_step(tiny_cfg, synth_root, tmp_path) -> None:
    import shutil

    from megdet.data.errors import DatasetError

    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    gone = sorted((root / "train").glob("*.png"))[-1]
    gone.unlink()
    with pytest.raises(DatasetError, match=f"{gone}: image file not found \\(1 of 8 images"):
        train(tiny_cfg(f"data.root={root}", "train.max_iters=2"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resume_with_another_global_batch_model_or_optimizer_is_refused(tiny_cfg) -> None:
    from megdet.checkpoint import CheckpointError

    first = train(tiny_cfg("train.max_iters=1"))
    with pytest.raises(ConfigError, match="global batch 2.*this run has 1"):
        train(tiny_cfg("train.max_iters=2", "data.images_per_device=1"), resume=True)
    # One-line errors naming the checkpoint (they were a ValueError and a KeyError traceback).
    ckpt = first["checkpoint"]
    with pytest.raises(CheckpointError, match=f"{re.escape(ckpt)}: checkpoint does not fit the model: shape"):
        train(tiny_cfg("train.max_iters=2", "model.fpn_channels=16"), resume=True)
    with pytest.raises(ConfigError, match="solver.optimizer=sgd, this run has adamw"):
        train(tiny_cfg("train.max_iters=2", "solver.optimizer=adamw"), resume=True)
    with pytest.raises(CheckpointError, match="its optimizer state does not fit this run"):
        train(tiny_cfg("train.max_iters=2", "model.trainable_layers=3"), resume=True)
    assert load_checkpoint(ckpt)["iteration"] == 1


def test_resolved_schedule_text_without_the_data(tiny_cfg, tmp_path) -> None:
    cfg = tiny_cfg(f"data.root={tmp_path / 'nowhere'}", "data.images_per_device=2")
    text = resolved_schedule_text(cfg, world_size=64)
    assert "global batch 128" in text and "= 0.16" in text
    assert "iterations, warmup and decay unavailable" in text and "--num-images" in text
    assert str(tmp_path / "nowhere") in text
    planned = resolved_schedule_text(cfg, world_size=64, num_images=117266)
    assert "iterations: 11004 total, 917 per epoch (117266 images, 12 epochs)" in planned
    assert all(line.startswith("#") for line in text.splitlines() + planned.splitlines())


def test_resolved_schedule_text(tiny_cfg) -> None:
    text = resolved_schedule_text(tiny_cfg("data.images_per_device=2", "train.max_iters=-1"), world_size=8)
    lines = text.splitlines()
    assert lines[0] == "# resolved for 8 device(s):" and all(line.startswith("#") for line in lines)
    assert "global batch 16" in text and "0.02 x 16 / 16 = 0.02" in text
    assert "iterations: 12 total, 1 per epoch (8 images" in text
    assert "decay iterations: [8, 11]" in text


def test_finished_run_leaves_model_final_with_categories(tiny_cfg) -> None:
    from megdet.checkpoint import load_checkpoint

    cfg = tiny_cfg("train.max_iters=2", "train.checkpoint_period=100")
    train(cfg)
    out = Path(cfg.train.out_dir)
    final = load_checkpoint(out / "model_final.pt")
    assert set(final) == {"model", "iteration", "config", "categories"} and final["iteration"] == 2
    names = [c["name"] for c in final["categories"]]
    assert names[-1] == "person" and final["categories"][-1]["skeleton"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iteration"] == 2 and summary["global_batch"] >= 1


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["off", "fp16", "bf16"])
def test_trains_and_resumes_on_cuda(tiny_cfg, amp: str) -> None:
    common = ["train.device=cuda", f"train.amp={amp}", "train.checkpoint_period=1", "test.max_images=2"]
    first = train(tiny_cfg(*common, "train.max_iters=2"))
    assert first["iteration"] == 2
    state = load_checkpoint(first["checkpoint"])
    assert ("scale" in state["scaler"]) == (amp == "fp16")
    resumed = train(tiny_cfg(*common, "train.max_iters=3", "test.eval_period=3"), resume=True)
    assert resumed["iteration"] == 3 and "bbox" in resumed["eval"]
    lines = [m for m in _metrics(Path(first["out_dir"])) if "total_loss" in m]
    assert [m["iter"] for m in lines] == [1, 2, 3]
    assert all(m["memory_mb"] > 0 and torch.isfinite(torch.tensor(m["total_loss"])) for m in lines)


def test_channels_last_auto_only_for_reduced_precision_on_cuda() -> None:
    from megdet.engine.setup import use_channels_last

    assert use_channels_last("auto", "cuda", "bf16") and use_channels_last("auto", "cuda", "fp16")
    assert not use_channels_last("auto", "cuda", "off") and not use_channels_last("auto", "cpu", "bf16")
    assert use_channels_last("on", "cpu", "off") and not use_channels_last("off", "cuda", "bf16")


@pytest.mark.parametrize("native", [True, False])
def test_amp_auto_is_bf16_only_where_the_device_computes_it_natively(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from megdet.config import load_config
    from megdet.engine import setup

    monkeypatch.setattr(setup, "native_bf16", lambda device: native)
    cpu = torch.device("cpu")
    assert setup.resolve_amp("auto", cpu) == ("bf16" if native else "off")
    assert [setup.resolve_amp(m, cpu) for m in ("off", "bf16", "fp16")] == ["off", "bf16", "fp16"]
    assert load_config(None, ["train.amp=auto"]).train.amp == "auto"
