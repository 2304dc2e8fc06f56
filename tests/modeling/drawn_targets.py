"""The small drawn training targets the modeling tests share: a shape and a person with keypoints."""

from __future__ import annotations

import torch

K = 17  # COCO keypoints


def shape_and_person(size: int = 64) -> dict[str, torch.Tensor]:
    """Targets of one ``size`` x ``size`` image: a shape (label 1) and a person (label 3) with a mask
    each and the person's 17 visible keypoints along a diagonal."""
    masks = torch.zeros(2, size, size, dtype=torch.uint8)
    masks[0, 4:30, 6:28] = 1
    masks[1, 30:62, 34:60] = 1
    kps = torch.zeros(2, K, 3)
    kps[1, :, 0] = torch.linspace(36, 58, K)
    kps[1, :, 1] = torch.linspace(32, 60, K)
    kps[1, :, 2] = 2
    return {"boxes": torch.tensor([[6.0, 4.0, 28.0, 30.0], [34.0, 30.0, 60.0, 62.0]]),
            "labels": torch.tensor([1, 3]), "masks": masks, "keypoints": kps}  # fmt: skip
