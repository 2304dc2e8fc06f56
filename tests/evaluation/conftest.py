"""Shared pieces of the evaluation tests: one intra-op thread, and the tiny detector they evaluate."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from megdet.config import Config, load_config

# ResNet-18 FPN with 32 channels, narrow heads, few proposals; boxes, masks and keypoints; small test
# images. Random weights: the evaluation code is what these tests check, not the detections.
TINY_MODEL = [
    "model.backbone=resnet18",
    "model.fpn_channels=32",
    "model.mask_on=true",
    "model.keypoint_on=true",
    "model.rpn.pre_nms_top_n_test=100",
    "model.rpn.post_nms_top_n_test=50",
    "model.roi.box_head_dim=64",
    "model.roi.mask_head_convs=1",
    "model.roi.mask_head_dim=16",
    "model.roi.keypoint_head_convs=1",
    "model.roi.keypoint_head_dim=16",
    "model.roi.detections_per_img=10",
    "data.min_size_test=64",
    "data.max_size_test=96",
    "data.num_workers=0",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Two intra-op threads on a loaded 2-core machine spin against each other (20x slower here).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_overrides() -> list[str]:
    """The tiny detector's config overrides (``key=value``), as the command line takes them."""
    return list(TINY_MODEL)


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., Config]:
    """``tiny_config(data_root, *extra_overrides) -> Config`` of the tiny detector."""

    def make(root: Path, *extra: str) -> Config:
        return load_config(None, [f"data.root={root}", *TINY_MODEL, *extra])

    return make
