"""Detection transforms on ``(image, target)`` pairs, built on torchvision.transforms.v2.

Boxes (``tv_tensors.BoundingBoxes``) and masks (``tv_tensors.Mask``) go through the v2 functional
kernels together with the image. Keypoints are a plain (N, K, 3) tensor of x, y, visibility: v2's
``KeyPoints`` has no visibility column and knows no left/right permutation, so they are moved here.
Keypoints with v = 0 (not labelled) are kept at (0, 0, 0).

Randomness comes from torch's global generator; the train loader seeds it per sample
(see ``megdet/data/loader.py``) so augmentations are reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision.transforms.v2.functional as F

from megdet.config import DataConfig

Target = dict[str, Any]


def _zero_unlabelled(keypoints: torch.Tensor) -> torch.Tensor:
    return keypoints * (keypoints[..., 2:3] > 0).to(keypoints.dtype)


class Compose:
    """Applies ``(image, target)`` transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Any, Target], tuple[Any, Target]]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class ResizeShortestEdge:
    """Resizes so the short side is one of ``min_sizes`` (drawn at random) and the long side at most ``max_size``.

    Boxes, masks, semantic label maps (``sem_seg``) and keypoints are scaled with the image; ``target['scale']`` records
    ``(sy, sx)`` = resized / original size actually used.
    """

    def __init__(self, min_sizes: Sequence[int], max_size: int) -> None:
        if not min_sizes or any(int(s) <= 0 for s in min_sizes):
            raise ValueError(
                f"ResizeShortestEdge: min_sizes must be a non-empty list of positive sizes, got {min_sizes}"
            )
        if max_size <= 0:
            raise ValueError(f"ResizeShortestEdge: max_size must be positive, got {max_size}")
        self.min_sizes = [int(s) for s in min_sizes]
        self.max_size = int(max_size)

    def output_size(self, height: int, width: int, short: int) -> tuple[int, int]:
        """(new_h, new_w) for an image of ``height`` x ``width`` and short-side target ``short``."""
        scale = short / min(height, width)
        if max(height, width) * scale > self.max_size:
            scale = self.max_size / max(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        h, w = image.shape[-2:]
        if len(self.min_sizes) == 1:
            short = self.min_sizes[0]
        else:
            short = self.min_sizes[int(torch.randint(len(self.min_sizes), ()))]
        nh, nw = self.output_size(h, w, short)
        image = F.resize(image, [nh, nw], antialias=True)
        target = dict(target)
        if "boxes" in target:
            boxes = F.resize(target["boxes"], [nh, nw])
            target["boxes"] = F.clamp_bounding_boxes(boxes, clamping_mode="hard")
        for key in ("masks", "sem_seg"):
            if key in target:
                # Pixel-centre nearest neighbour; the default "nearest" is shifted by half a source pixel.
                target[key] = F.resize(target[key], [nh, nw], interpolation=F.InterpolationMode.NEAREST_EXACT)
        sy, sx = nh / h, nw / w
        if "keypoints" in target:
            kp = target["keypoints"].clone()
            kp[..., 0] *= sx
            kp[..., 1] *= sy
            target["keypoints"] = _zero_unlabelled(kp)
        prev = target.get("scale", (1.0, 1.0))
        target["scale"] = (prev[0] * sy, prev[1] * sx)
        return image, target

    def __repr__(self) -> str:
        return f"ResizeShortestEdge(min_sizes={self.min_sizes}, max_size={self.max_size})"


class RandomHorizontalFlip:
    """With probability ``p`` mirrors image, boxes, masks, ``sem_seg`` and keypoints (x -> width - x).

    Keypoints are also re-ordered with ``flip_map`` (left_* <-> right_*); it is required only when
    targets carry keypoints.
    """

    def __init__(self, p: float = 0.5, flip_map: Sequence[int] | None = None) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be in [0, 1], got {p}")
        if flip_map is not None and sorted(flip_map) != list(range(len(flip_map))):
            raise ValueError(
                f"RandomHorizontalFlip: flip_map must be a permutation of 0..K-1, got {list(flip_map)}"
            )
        self.p = float(p)
        self.flip_map = list(flip_map) if flip_map is not None else None

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        if float(torch.rand(())) >= self.p:
            return image, target
        width = image.shape[-1]
        image = F.horizontal_flip(image)
        target = dict(target)
        if "boxes" in target:
            target["boxes"] = F.horizontal_flip(target["boxes"])
        for key in ("masks", "sem_seg"):
            if key in target:
                target[key] = F.horizontal_flip(target[key])
        if "keypoints" in target:
            kp = target["keypoints"]
            if self.flip_map is None or len(self.flip_map) != kp.shape[1]:
                raise ValueError(
                    f"RandomHorizontalFlip: targets have {kp.shape[1]} keypoints but flip_map is {self.flip_map}; "
                    "pass the dataset's keypoint_flip_map"
                )
            kp = kp[:, self.flip_map].clone()
            kp[..., 0] = width - kp[..., 0]
            target["keypoints"] = _zero_unlabelled(kp)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Normalize:
    """Converts a uint8 image to float32 in [0, 1], then subtracts ``mean`` and divides by ``std`` per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(
                f"Normalize: expected 3 means and 3 positive stds, got mean={list(mean)} std={list(std)}"
            )
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        image = F.to_dtype(image, torch.float32, scale=True)
        return F.normalize(image, self.mean, self.std), target

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


def build_transforms(
    data_cfg: DataConfig, train: bool, flip_map: Sequence[int] | None = None, normalize: bool = True
) -> Compose:
    """The train (random short side, flip) or test (fixed short side) pipeline for ``data_cfg``.

    ``flip_map`` is the dataset's ``keypoint_flip_map``; needed when targets carry keypoints.
    ``normalize=False`` leaves images uint8 (the trainer normalises on its device instead).
    """
    steps: list[Callable[[Any, Target], tuple[Any, Target]]]
    if train:
        steps = [ResizeShortestEdge(data_cfg.min_size_train, data_cfg.max_size_train)]
        if data_cfg.flip_prob > 0:
            steps.append(RandomHorizontalFlip(data_cfg.flip_prob, flip_map))
    else:
        steps = [ResizeShortestEdge([data_cfg.min_size_test], data_cfg.max_size_test)]
    if normalize:
        steps.append(Normalize(data_cfg.pixel_mean, data_cfg.pixel_std))
    return Compose(steps)
