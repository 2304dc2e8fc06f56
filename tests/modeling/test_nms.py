"""Grouped NMS (the RPN's per-image, per-level NMS) against torchvision's NMS run group by group.

The Triton kernel runs on CPU tensors under Triton's interpreter, in a child process (TRITON_INTERPRET=1
must be set before Triton is imported); on a GPU machine the cuda-marked test runs it compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision

from megdet.modeling import nms


def _case(seed: int, b: int = 2, lv: int = 2, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(b, lv, n, 2, generator=g) * 60
    boxes = torch.cat([xy, xy + torch.rand(b, lv, n, 2, generator=g) * 30 + 1], dim=-1)
    boxes[0, 0, 5] = boxes[0, 0, 2]  # duplicates: IoU exactly 1
    boxes[0, 0, 7] = boxes[0, 0, 2] + torch.tensor([0.0, 0.0, 10.0, 0.0])
    valid = torch.rand(b, lv, n, generator=g) > 0.15
    valid[1, 1] = False  # an empty group
    return boxes, valid


def _reference(boxes: torch.Tensor, valid: torch.Tensor, threshold: float) -> torch.Tensor:
    keep = torch.zeros(valid.shape, dtype=torch.bool)
    b, lv, n = valid.shape
    rank = torch.arange(n, 0, -1, dtype=torch.float32)  # each group is sorted by decreasing score
    for i in range(b):
        for j in range(lv):
            idx = torch.where(valid[i, j])[0]
            keep[i, j, idx[torchvision.ops.nms(boxes[i, j, idx], rank[idx], threshold)]] = True
    return keep


CASES = ((0, 0.5), (1, 0.7), (2, 0.3))  # (seed, IoU threshold)


def _kernel_results() -> dict[str, list[bool]]:
    assert nms.INTERPRET and nms._triton_kernel() is not None
    return {f"{seed}-{t}": nms.grouped_nms(*_case(seed), t).flatten().tolist() for seed, t in CASES}


def test_cpu_path_equals_torchvision_per_group() -> None:
    for seed, t in CASES:
        boxes, valid = _case(seed)
        assert torch.equal(nms.grouped_nms(boxes, valid, t), _reference(boxes, valid, t))


def test_triton_kernel_equals_torchvision_per_group() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for seed, t in CASES:
        assert got[f"{seed}-{t}"] == _reference(*_case(seed), t).flatten().tolist(), (seed, t)


def test_threshold_compares_like_torchvision_in_double() -> None:
    for t in (0.3, 0.5, 0.7, 0.1):
        t32 = nms._float32_threshold(t)
        above = torch.tensor(t32, dtype=torch.float32).nextafter(torch.tensor(1.0))
        assert t32 <= t and float(above) > t


@pytest.mark.cuda
def test_cuda_kernel_equals_torchvision_per_group() -> None:
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(0)
    b, lv, n = 4, 5, 2000
    xy = torch.rand(b, lv, n, 2, generator=g) * 1200
    boxes = torch.cat([xy, xy + torch.rand(b, lv, n, 2, generator=g) * 300 + 2], dim=-1)
    valid = torch.rand(b, lv, n, generator=g) > 0.05
    got = nms.grouped_nms(boxes.cuda(), valid.cuda(), 0.7).cpu()
    # Fused multiply-adds may round an IoU differently from torchvision's CPU loop: a decision can
    # flip where an IoU is within an ulp of the threshold, so allow a few.
    mismatch = (got != _reference(boxes, valid, 0.7)).float().mean().item()
    assert mismatch < 1e-3, mismatch


if __name__ == "__main__":
    print(json.dumps(_kernel_results()))


def test_kernel_compiles_for_sm90() -> None:
    from triton_compile import compile_for_sm90

    kernel = nms._triton_kernel()
    if kernel is None:
        pytest.skip("Triton is not installed")
    types = {"boxes": "*fp32", "valid": "*i8", "keep": "*i8", "iou_threshold": "fp32"}
    assert "cubin" in compile_for_sm90(kernel, types, {"BLOCK": 2048}).asm
