"""Process groups, local multi-process launch, and small collective helpers.

The one low-level home of these helpers: the engine and evaluation both import them from here (the
BatchNorm layers' own all-reduce is :mod:`megdet.layers.collectives`).

Workers are started by torch.distributed's elastic launcher (``torchrun`` on a cluster, or
:func:`launch_local` on one machine); each reads its place from the environment variables the
launcher sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``). Without them the process is a world of one and no process group is created; every
helper here then degrades to the single-process answer.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from megdet.config import DEVICES, ConfigError, check_choice, require_choice

SHUTDOWN_GRACE_S = 300  # seconds local workers get to stop after SIGTERM before the launcher kills them


def in_worker() -> bool:
    """True inside a process started by torchrun / the elastic launcher."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r}: expected an integer") from None


def resolve_device(device: str = "auto") -> str:
    """``train.device`` -> "cpu" or "cuda"; "cuda" without a usable GPU is a one-line ConfigError."""
    require_choice("train.device", device, DEVICES, "device")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; use train.device=cpu or auto")
    return device


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def init_distributed(backend: str = "auto", device: str = "auto") -> tuple[int, int, int, torch.device]:
    """Joins the process group described by the launcher's environment variables.

    Args:
        backend: "auto" (NCCL on CUDA, gloo on CPU), "gloo" or "nccl".
        device: ``train.device`` ("auto" | "cpu" | "cuda").

    Returns:
        ``(rank, world_size, local_rank, device)``. Outside a launcher: ``(0, 1, 0, device)`` and no
        process group. On CPU each of the local workers gets ``cpu_count // local_world_size``
        intra-op threads so that the workers do not oversubscribe the cores.
    """
    kind = resolve_device(device)
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible;"
                " start at most one process per GPU"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        if local_world > 1:
            torch.set_num_threads(max(1, _cpu_count() // local_world))
    check_choice("init_distributed", backend, ("auto", "gloo", "nccl"), "backend", ConfigError)
    if backend == "auto":
        backend = "nccl" if kind == "cuda" else "gloo"
    if backend == "nccl" and kind != "cuda":
        raise ConfigError("the nccl backend needs CUDA devices; use gloo (or backend=auto) on CPU")
    if world > 1 and not dist.is_initialized():
        kwargs: dict[str, Any] = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
    return rank, world, local_rank, dev


def cleanup_distributed() -> None:
    """Destroys the default process group if there is one."""
    global _HOST_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _HOST_GROUP = None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Waits for every rank (no-op in a single process)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper; any other module as it is."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


_HOST_GROUP: Any = None


def _host_group() -> Any:
    """The group for small host-side collectives: the default one under gloo; with NCCL a gloo group
    made on first use (every rank reaches it at the same collective), so that summing a few Python
    numbers never copies them to the GPU and back (a host synchronisation per call)."""
    global _HOST_GROUP
    if dist.get_backend() == "gloo":
        return None
    if _HOST_GROUP is None:
        _HOST_GROUP = dist.new_group(backend="gloo")
    return _HOST_GROUP


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks of a list of floats (one collective, on the host)."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_host_group())
    return t.tolist()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The element-wise mean over ranks of a tensor, on its device (NCCL: queued, no host wait);
    ``t`` itself in a single process."""
    if not is_distributed():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


def reduce_dict(values: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """Averages a dict of scalars over ranks (same keys on every rank), for logging."""
    keys = sorted(values)
    raw = [
        float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)
        for v in (values[k] for k in keys)
    ]
    summed = all_reduce_sum(raw)
    n = get_world_size()
    return {k: s / n for k, s in zip(keys, summed)}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_local(nproc: int, argv: Sequence[str], script: str | None = None) -> int:
    """Runs ``nproc`` workers on this machine with torch.distributed's elastic launcher.

    Each worker runs ``python -m megdet <argv>`` (or ``python <script> <argv>``) with the usual
    ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_*`` variables, so the CLI re-enters the same
    code path and :func:`in_worker` tells it that it is a worker. Rendezvous is c10d on a free local
    port; no restarts.

    Returns:
        0 when every worker succeeded, else the exit code of the first failed worker (after printing
        one line naming it).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise ConfigError(f"--nproc: expected >= 1, got {nproc}")
    extra: dict[str, Any] = {}
    if "shutdown_timeout" in LaunchConfig.__dataclass_fields__:  # recent torch (2.14 has it); older: 30 s
        # On SIGTERM the launcher forwards it to the workers and kills them after this grace period; a
        # worker stops at the end of its iteration and then writes a checkpoint, which can take longer
        # than torch's default 30 s on CPU with a large model. TORCH_ELASTIC_SHUTDOWN_TIMEOUT overrides.
        extra["shutdown_timeout"] = _env_int("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_GRACE_S)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"megdet-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        monitor_interval=0.1,
        **extra,
    )
    args = ("-m", "megdet", *argv) if script is None else (script, *argv)
    try:
        elastic_launch(config, sys.executable)(*args)
    except SignalException as e:
        # The workers have had the signal and their grace period by now (a training run saved its
        # checkpoint); torch's own traceback of the launcher says nothing more.
        name = signal.Signals(e.sigval).name
        print(f"megdet: stopped by {name}; the {nproc} workers were stopped (a training run saves a checkpoint"
              " on SIGTERM or SIGINT: continue with --resume)", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode in (128 + signal.SIGTERM, 128 + signal.SIGINT):  # `megdet train` after saving
            name = signal.Signals(failure.exitcode - 128).name
            print(f"megdet: worker {rank} of {nproc} stopped on {name} (exit code {failure.exitcode}); a"
                  " training run saved a checkpoint: continue with --resume", file=sys.stderr)
        else:
            print(f"megdet: worker {rank} of {nproc} failed with exit code {failure.exitcode}", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0
