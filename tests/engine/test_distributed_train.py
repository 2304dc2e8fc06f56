"""Two gloo processes started by launch_local train a tiny detector with cross-device BN."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest
import torch

from megdet.config import dump_config
from megdet.engine.checkpoint import load_checkpoint
from megdet.engine.distributed import all_gather_object, get_rank, get_world_size, launch_local, reduce_dict

WORKER = textwrap.dedent(
    """
    import json, os, sys
    from megdet.config import load_config
    from megdet.engine.trainer import train

    cfg = load_config(sys.argv[1], sys.argv[2:])
    summary = train(cfg)
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


def test_launch_local_reports_a_failing_worker(tmp_path, capsys) -> None:
    script = tmp_path / "fail.py"
    script.write_text("import os, sys\nsys.exit(3 if os.environ['RANK'] == '1' else 0)\n")
    code = launch_local(2, [], script=str(script))
    assert code == 3
    assert "worker 1 of 2 failed with exit code 3" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform != "linux", reason="sched_getaffinity")
def test_worker_env_detection(monkeypatch) -> None:
    from megdet.engine.distributed import in_worker, init_distributed

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
