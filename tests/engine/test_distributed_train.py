"""Two gloo processes started by launch_local train a tiny detector with cross-device BN."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest
import torch

from megdet.checkpoint import load_checkpoint
from megdet.config import dump_config
from megdet.distributed import all_gather_object, get_rank, get_world_size, launch_local, reduce_dict

WORKER = textwrap.dedent(
    """
    import json, os, sys
    from megdet.config import load_config
    from megdet.engine.trainer import train

    cfg = load_config(sys.argv[1], sys.argv[2:])
    die_at = int(os.environ.get("MEGDET_TEST_DIE_AT", "0"))
    hooks = []
    if die_at:  # every rank dies in that iteration (an exception stands in for a kill)
        from megdet.engine.hooks import Hook

        class Die(Hook):
            def before_step(self, state):
                if state.iteration + 1 == die_at:
                    raise RuntimeError("simulated kill")

        hooks.append(Die())
    summary = train(cfg, resume="--resume" in os.environ.get("MEGDET_TEST_FLAGS", ""), hooks=hooks)
    rank = int(os.environ["RANK"])
    with open(os.path.join(cfg.train.out_dir, f"summary_{rank}.json"), "w") as f:
        json.dump({"summary": summary, "world": os.environ["WORLD_SIZE"]}, f)
    """
)


def test_helpers_without_a_process_group() -> None:
    assert get_rank() == 0 and get_world_size() == 1
    assert all_gather_object({"a": 1}) == [{"a": 1}]
    assert reduce_dict({"x": torch.tensor(2.0), "y": 3}) == {"x": 2.0, "y": 3.0}


# The CUDA variant: NCCL chosen automatically, one GPU per worker, fp16 with loss scaling.
@pytest.mark.parametrize(
    "device_args",
    [[], pytest.param(["train.device=cuda", "train.amp=fp16"], marks=pytest.mark.cuda(gpus=2), id="cuda")],
)
def test_two_processes_train_and_the_loss_falls(tiny_cfg, tmp_path, monkeypatch, device_args) -> None:
    cfg = tiny_cfg(
        *device_args,
        "model.norm=CrossDeviceBN",
        "model.head_norm=BN",  # per-device statistics in FPN / heads: DDP syncs those buffers
        "test.eval_period=8",
        "test.max_images=4",
        "test.images_per_device=1",
        "data.images_per_device=1",
        "train.grad_accum_steps=2",  # global batch 2 x 1 x 2 = 4; no_sync on the first micro-step
        "train.max_iters=8",
        "train.checkpoint_period=4",
        "solver.warmup=false",
        "solver.base_lr=0.08",
        "solver.decay_epochs=[]",
    )
    config = tmp_path / "tiny.yaml"
    config.write_text(dump_config(cfg))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert launch_local(2, [str(config)], script=str(script)) == 0

    out = tmp_path / "run"
    summaries = [json.loads((out / f"summary_{r}.json").read_text()) for r in (0, 1)]
    for r, s in enumerate(summaries):
        assert s["world"] == "2"
        assert s["summary"]["iteration"] == 8 and not s["summary"]["interrupted"]
        assert s["summary"]["schedule"]["global_batch"] == 4
        assert s["summary"]["schedule"]["lr"] == pytest.approx(0.02)
        # Logged losses are averaged over ranks, so both ranks report the same numbers.
        assert s["summary"]["losses"] == summaries[0]["summary"]["losses"], r

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [line["total_loss"] for line in lines if "total_loss" in line]
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses

    state = load_checkpoint(out / "model_0000008.pt")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["sampler_position"] == 16
    # Per-rank RNG streams differ (each rank samples its own proposals).
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert [p.name for p in sorted(out.glob("model_*.pt"))] == ["model_0000004.pt", "model_0000008.pt", "model_final.pt"]

    # The evaluation at the end of the 2-process run (each rank one shard) is that of the saved model:
    # every rank evaluated with rank 0's BN statistics, not with its own last local update.
    if not device_args:
        from megdet.evaluation.inference import evaluate_model
        from megdet.evaluation.loading import load_model_from_checkpoint

        assert set(summaries[0]["summary"]["eval"]) == {"bbox"}
        model, model_cfg = load_model_from_checkpoint(out / "model_final.pt", None)
        evaluate_model(model, model_cfg, out_dir=tmp_path / "single", rank=0, world_size=1, progress=False)
        a = json.loads((out / "eval" / "iter_0000008" / "coco_results_bbox.json").read_text())
        b = json.loads((tmp_path / "single" / "coco_results_bbox.json").read_text())
        assert len(a) == len(b) > 0 and {r["image_id"] for r in a} == {r["image_id"] for r in b}
        assert [r["score"] for r in a] == pytest.approx([r["score"] for r in b], abs=1e-6)
        assert [v for r in a for v in r["bbox"]] == pytest.approx([v for r in b for v in r["bbox"]], abs=1e-4)


def test_two_processes_killed_and_resumed_end_bit_identical(tiny_cfg, tmp_path, monkeypatch) -> None:
    # Per-rank sampler shards, per-rank RNG streams, cross-device BN and DDP across a kill and a resume.
    common = ["model.norm=CrossDeviceBN", "data.images_per_device=1", "train.max_iters=4",
              "train.checkpoint_period=2"]  # fmt: skip
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("full", "resumed"):
        (tmp_path / f"{name}.yaml").write_text(dump_config(tiny_cfg(*common, f"train.out_dir={tmp_path / name}")))
    assert launch_local(2, [str(tmp_path / "full.yaml")], script=str(script)) == 0
    monkeypatch.setenv("MEGDET_TEST_DIE_AT", "3")
    assert launch_local(2, [str(tmp_path / "resumed.yaml")], script=str(script)) != 0
    assert sorted(p.name for p in (tmp_path / "resumed").glob("model_*.pt")) == ["model_0000002.pt"]
    monkeypatch.setenv("MEGDET_TEST_DIE_AT", "0")
    monkeypatch.setenv("MEGDET_TEST_FLAGS", "--resume")
    assert launch_local(2, [str(tmp_path / "resumed.yaml")], script=str(script)) == 0

    a = load_checkpoint(tmp_path / "full" / "model_0000004.pt")
    b = load_checkpoint(tmp_path / "resumed" / "model_0000004.pt")
    for key in ("model", "optimizer"):
        flat_a, flat_b = _flatten(a[key]), _flatten(b[key])
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            assert torch.equal(flat_a[k], flat_b[k]) if isinstance(flat_a[k], torch.Tensor) else flat_a[k] == flat_b[k], k
    assert a["sampler_position"] == b["sampler_position"] == 4
    for r in (0, 1):
        assert torch.equal(a["rng"][r]["torch"], b["rng"][r]["torch"]), r


def _flatten(d: object, prefix: str = "") -> dict[str, object]:
    if isinstance(d, dict):
        return {k: v for key, sub in d.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    if isinstance(d, list):
        return {k: v for i, sub in enumerate(d) for k, v in _flatten(sub, f"{prefix}{i}.").items()}
    return {prefix: d}


def test_launch_local_reports_a_failing_worker(tmp_path, capsys) -> None:
    script = tmp_path / "fail.py"
    script.write_text("import os, sys\nsys.exit(3 if os.environ['RANK'] == '1' else 0)\n")
    code = launch_local(2, [], script=str(script))
    assert code == 3
    assert "worker 1 of 2 failed with exit code 3" in capsys.readouterr().err
    # 143: what `megdet train` exits with after saving on SIGTERM -- not a failure to report as one.
    script.write_text("import os, sys\nsys.exit(143 if os.environ['RANK'] == '1' else 0)\n")
    assert launch_local(2, [], script=str(script)) == 143
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("megdet:")]
    assert ours == ["megdet: worker 1 of 2 stopped on SIGTERM (exit code 143); a training run saved a checkpoint:"
                    " continue with --resume"]


LAUNCHER = textwrap.dedent(
    """
    import sys
    from megdet.distributed import launch_local

    sys.exit(launch_local(2, sys.argv[1:2] + sys.argv[3:], script=sys.argv[2]))
    """
)

GRACEFUL_WORKER = textwrap.dedent(
    """
    import os, signal, sys, time

    def stop(signum, frame):
        time.sleep(1.0)  # stands in for the end of the iteration and the checkpoint write
        open(os.path.join(sys.argv[1], "saved_" + os.environ["RANK"]), "w").close()
        sys.exit(143)

    signal.signal(signal.SIGTERM, stop)
    open(os.path.join(sys.argv[1], "ready_" + os.environ["RANK"]), "w").close()
    while True:
        time.sleep(0.05)
    """
)


def test_sigterm_to_the_launcher_lets_workers_finish_and_is_one_line(tmp_path, signal_when_ready) -> None:
    import signal
    import subprocess

    (tmp_path / "launcher.py").write_text(LAUNCHER)
    (tmp_path / "worker.py").write_text(GRACEFUL_WORKER)
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "launcher.py"), str(tmp_path), str(tmp_path / "worker.py")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    ready = lambda: all((tmp_path / f"ready_{r}").exists() for r in (0, 1))  # noqa: E731
    _, stderr = signal_when_ready(proc, ready, lambda: proc.send_signal(signal.SIGTERM))
    assert proc.returncode == 143, stderr[-2000:]
    assert all((tmp_path / f"saved_{r}").exists() for r in (0, 1))  # the workers' handlers ran to the end
    lines = [line for line in stderr.splitlines() if line.startswith("megdet:")]
    assert lines == ["megdet: stopped by SIGTERM; the 2 workers were stopped (a training run saves a checkpoint"
                     " on SIGTERM or SIGINT: continue with --resume)"]
    assert "Traceback" not in stderr


PID_WORKER = textwrap.dedent(
    """
    import json, os, sys
    from megdet.config import load_config
    from megdet.engine.trainer import train

    out = sys.argv[2]
    with open(os.path.join(out, "pid_" + os.environ["RANK"]), "w") as f:
        f.write(str(os.getpid()))
    summary = train(load_config(sys.argv[1]))
    with open(os.path.join(out, "summary_" + os.environ["RANK"] + ".json"), "w") as f:
        json.dump({k: summary[k] for k in ("iteration", "interrupted", "checkpoint")}, f)
    """
)


def test_sigterm_to_one_worker_stops_every_rank_at_one_checkpoint(tiny_cfg, tmp_path, signal_when_ready) -> None:
    # A preempted node signals only its own processes: the stop flag is summed over the ranks in every
    # iteration, so every rank stops after the same iteration and they save one checkpoint together.
    import signal
    import subprocess

    cfg = tiny_cfg("model.norm=CrossDeviceBN", "data.images_per_device=1", "train.max_iters=500",
                   "train.checkpoint_period=1000")  # fmt: skip
    (tmp_path / "tiny.yaml").write_text(dump_config(cfg))
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    (tmp_path / "worker.py").write_text(PID_WORKER)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "launcher.py"), str(tmp_path / "tiny.yaml"), str(tmp_path / "worker.py"),
         str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    metrics = out / "metrics.jsonl"

    def started() -> bool:
        return (tmp_path / "pid_1").exists() and metrics.is_file() and bool(metrics.read_text().strip())

    _, stderr = signal_when_ready(proc, started, lambda: os.kill(int((tmp_path / "pid_1").read_text()), signal.SIGTERM))
    assert proc.returncode == 0, stderr[-2000:]
    summaries = [json.loads((tmp_path / f"summary_{r}.json").read_text()) for r in (0, 1)]
    k = summaries[0]["iteration"]
    assert all(s["interrupted"] and s["iteration"] == k for s in summaries) and 1 <= k < 500
    assert load_checkpoint(out / f"model_{k:07d}.pt")["iteration"] == k


def test_ctrl_c_on_a_two_process_run_saves_one_checkpoint_and_exits_130(tiny_cfg, tmp_path, signal_when_ready) -> None:
    # Ctrl-C in a terminal sends SIGINT to the whole foreground process group: `megdet train --nproc 2`
    # (the launcher) and both workers at once.
    import signal
    import subprocess

    cfg = tiny_cfg("model.norm=CrossDeviceBN", "data.images_per_device=1", "train.max_iters=500",
                   "train.checkpoint_period=1000")  # fmt: skip
    (tmp_path / "tiny.yaml").write_text(dump_config(cfg))
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "megdet", "train", "--config", str(tmp_path / "tiny.yaml"), "--nproc", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    metrics = out / "metrics.jsonl"
    started = lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2  # noqa: E731
    _, stderr = signal_when_ready(proc, started, lambda: os.killpg(proc.pid, signal.SIGINT))
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-2000:]
    checkpoints = sorted(out.glob("model_*.pt"))
    assert len(checkpoints) == 1 and not (out / "model_final.pt").exists()
    k = load_checkpoint(checkpoints[0])["iteration"]
    assert 2 <= k < 500 and checkpoints[0].name == f"model_{k:07d}.pt"
    ours = [line for line in stderr.splitlines() if line.startswith("megdet:")]
    assert len(ours) == 1 and "SIGINT" in ours[0] and "--resume" in ours[0], ours


def test_workers_get_a_long_grace_period_after_sigterm(monkeypatch) -> None:
    import torch.distributed.launcher.api as launcher_api

    from megdet.distributed import SHUTDOWN_GRACE_S

    if "shutdown_timeout" not in launcher_api.LaunchConfig.__dataclass_fields__:
        pytest.skip("this torch's launcher has no shutdown_timeout (fixed at 30 s)")
    seen = []
    monkeypatch.setattr(launcher_api, "elastic_launch", lambda config, entry: lambda *args: seen.append(config))
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    assert launch_local(2, ["x"]) == 0
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "45")
    assert launch_local(2, ["x"]) == 0
    assert [c.shutdown_timeout for c in seen] == [SHUTDOWN_GRACE_S, 45] and SHUTDOWN_GRACE_S > 30


@pytest.mark.skipif(sys.platform != "linux", reason="sched_getaffinity")
def test_worker_env_detection(monkeypatch) -> None:
    from megdet.distributed import in_worker, init_distributed

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert not in_worker()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert in_worker()
    rank, world, local, device = init_distributed(device="cpu")
    assert (rank, world, local, device.type) == (0, 1, 0, "cpu")
    assert not torch.distributed.is_initialized()  # a world of one needs no process group
    assert os.environ["LOCAL_RANK"] == "0"
