"""Shared fixtures of the engine tests: a tiny synthetic dataset and a tiny, fast detector config."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from megdet.config import Config, load_config

# resnet18 + 32-channel FPN + small heads on 64-96 px images: about a second per iteration on one
# busy CPU core.
TINY = [
    "model.backbone=resnet18",
    "model.fpn_channels=32",
    "model.roi.box_head_dim=64",
    "model.rpn.batch_size_per_image=64",
    "model.rpn.pre_nms_top_n_train=200",
    "model.rpn.post_nms_top_n_train=100",
    "model.rpn.pre_nms_top_n_test=100",
    "model.rpn.post_nms_top_n_test=50",
    "model.roi.batch_size_per_image=64",
    "data.images_per_device=2",
    "data.num_workers=0",
    "data.min_size_train=[64,80]",
    "data.max_size_train=96",
    "data.min_size_test=80",
    "data.max_size_test=96",
    "train.log_period=1",
    "test.eval_period=-1",
]


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from megdet.data.synthetic import generate_synthetic_coco

    root = tmp_path_factory.mktemp("synth")
    generate_synthetic_coco(root, num_train=8, num_val=4, image_size=96, seed=0, workers=1, progress=False)
    return root


@pytest.fixture
def tiny_cfg(synth_root: Path, tmp_path: Path):
    """``tiny_cfg(*overrides) -> Config`` writing into ``tmp_path/run`` unless overridden."""

    def make(*overrides: str) -> Config:
        return load_config(
            None, [*TINY, f"data.root={synth_root}", f"train.out_dir={tmp_path / 'run'}", *overrides]
        )

    return make


@pytest.fixture(autouse=True)
def one_thread():
    # Two intra-op threads on a shared two-core machine are slower than one; restore afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _signal_when_ready(
    proc: subprocess.Popen, ready: Callable[[], bool], send: Callable[[], None], timeout: float = 120.0
) -> tuple[str, str]:
    """Waits for ``ready()`` (failing if ``proc`` exits first or ``timeout`` passes), calls ``send()``
    and returns ``proc``'s (stdout, stderr); ``proc`` is killed if anything fails on the way."""
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the process never became ready"
            time.sleep(0.1)
        send()
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def signal_when_ready() -> Callable[..., tuple[str, str]]:
    """``signal_when_ready(proc, ready, send) -> (stdout, stderr)``, for the SIGTERM tests."""
    return _signal_when_ready


@pytest.fixture
def die_in() -> Callable[[int], Any]:
    """``die_in(k)``: a trainer hook raising RuntimeError("simulated kill") in iteration k (1-based),
    before its step -- an exception standing in for a kill."""
    from megdet.engine.hooks import Hook

    class DieIn(Hook):
        def __init__(self, iteration: int) -> None:
            self.iteration = iteration

        def before_step(self, state: Any) -> None:
            if state.iteration + 1 == self.iteration:
                raise RuntimeError("simulated kill")

    return DieIn
