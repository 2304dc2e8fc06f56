"""Drawn predictions (boxes with "name score" labels, masks, keypoint skeletons) and their JSON form.

Drawing is torchvision's ``draw_bounding_boxes`` / ``draw_segmentation_masks`` / ``draw_keypoints``;
this module picks what to draw (score threshold, visible keypoints), the colours and the labels.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_keypoints, draw_segmentation_masks

from megdet.evaluation.coco_eval import encode_masks

# Distinct, saturated colours (one per category, cycling); fixed so a category keeps its colour
# across images and runs.
PALETTE: list[tuple[int, int, int]] = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (128, 0, 0), (170, 255, 195), (128, 128, 0), (0, 0, 128), (255, 215, 180),
]  # fmt: skip


def _color(label: int) -> tuple[int, int, int]:
    return PALETTE[(label - 1) % len(PALETTE)]


def _select(prediction: Mapping[str, Tensor], score_threshold: float) -> dict[str, Tensor]:
    for key in ("boxes", "scores", "labels"):
        if key not in prediction:
            raise ValueError(
                f"prediction has no '{key}'; expected boxes, scores, labels (and masks, keypoints)"
            )
    keep = prediction["scores"].detach().cpu() >= score_threshold
    # sem_seg (a per-pixel label map, not per detection) is written by megdet predict as its own PNG.
    return {k: v.detach().cpu()[keep] for k, v in prediction.items() if isinstance(v, Tensor) and k != "sem_seg"}


def _names(labels: Tensor, category_names: Sequence[str]) -> list[str]:
    out = []
    for lab in labels.tolist():
        if not 1 <= lab <= len(category_names):
            raise ValueError(
                f"label {lab} outside 1..{len(category_names)} (labels are contiguous; 0 is background)"
            )
        out.append(category_names[lab - 1])
    return out


def draw_predictions(
    image: Tensor,
    prediction: Mapping[str, Tensor],
    category_names: Sequence[str],
    score_threshold: float = 0.5,
    skeleton: Sequence[tuple[int, int]] | None = None,
    *,
    mask_threshold: float = 0.5,
    keypoint_threshold: float = 0.0,
    keypoint_labels: Collection[int] | None = None,
    mask_alpha: float = 0.45,
    box_width: int = 2,
) -> Tensor:
    """Draws the detections scoring at least ``score_threshold`` on a copy of ``image``.

    ``image``: uint8 (3, H, W) in the prediction's coordinates. ``prediction``: ``boxes`` (N, 4) xyxy,
    ``scores``, ``labels`` (1..len(category_names)), optional ``masks`` (N, 1, H, W) probabilities
    (drawn where > ``mask_threshold``) and ``keypoints`` (N, K, 3) x, y, score (a keypoint is drawn when
    its score > ``keypoint_threshold``; ``skeleton`` pairs are 0-based keypoint indices). Keypoints are
    drawn only for detections whose label is in ``keypoint_labels`` (None: every detection) -- the
    keypoint head predicts them for every box, but only persons have any.
    Returns a uint8 (3, H, W) tensor.
    """
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be a uint8 (3, H, W) tensor, got {image.dtype} {tuple(image.shape)}")
    height, width = image.shape[1:]
    out = image.detach().cpu().clone()
    det = _select(prediction, score_threshold)
    if det["scores"].numel() == 0:
        return out
    labels = det["labels"].long()
    names = _names(labels, category_names)
    colors = [_color(lab) for lab in labels.tolist()]

    if "masks" in det:
        masks = det["masks"]
        masks = masks[:, 0] if masks.dim() == 4 else masks
        if tuple(masks.shape[1:]) != (height, width):
            raise ValueError(f"masks are {tuple(masks.shape[1:])} but the image is {(height, width)} (h, w)")
        out = draw_segmentation_masks(out, masks > mask_threshold, alpha=mask_alpha, colors=colors)

    boxes = det["boxes"].float().clone()
    # draw_bounding_boxes rejects x2 < x1; clamp into the image so boxes partly outside still show.
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height - 1)
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2])
    captions = [f"{name} {score:.2f}" for name, score in zip(names, det["scores"].tolist())]
    out = draw_bounding_boxes(out, boxes, labels=captions, colors=colors, width=box_width)

    if "keypoints" in det:
        kps = det["keypoints"].float()
        connectivity = None if skeleton is None else [(int(a), int(b)) for a, b in skeleton]
        for i in range(kps.shape[0]):  # one call per instance: draw_keypoints takes a single colour
            if not _has_keypoints(int(labels[i]), keypoint_labels):
                continue
            visible = kps[i : i + 1, :, 2] > keypoint_threshold
            if visible.any():
                out = draw_keypoints(
                    out, kps[i : i + 1, :, :2], connectivity=connectivity, colors=colors[i], radius=2, width=2,
                    visibility=visible,
                )  # fmt: skip
    return out


def _has_keypoints(label: int, keypoint_labels: Collection[int] | None) -> bool:
    return keypoint_labels is None or label in keypoint_labels


def save_png(image: Tensor, path: str | Path) -> Path:
    """Writes a uint8 (3, H, W) image as PNG (creating parent folders); returns the path."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be a uint8 (3, H, W) tensor, got {image.dtype} {tuple(image.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Pillow rather than torchvision.io.write_png, whose encoders are deprecated since torchvision 0.29.
    Image.fromarray(image.detach().cpu().permute(1, 2, 0).contiguous().numpy()).save(path, format="PNG")
    return path


def predictions_to_json(
    prediction: Mapping[str, Tensor],
    category_names: Sequence[str],
    coco_category_ids: Sequence[int],
    score_threshold: float = 0.5,
    *,
    mask_threshold: float = 0.5,
    keypoint_labels: Collection[int] | None = None,
) -> list[dict[str, Any]]:
    """The detections scoring at least ``score_threshold`` as JSON-ready dicts (what ``megdet predict`` writes).

    Each: ``box`` [x1, y1, x2, y2], ``label`` (category name), ``category_id`` (COCO id), ``score``,
    and when present ``mask`` (compressed RLE, counts as str) and ``keypoints`` [[x, y, score], ...]
    (only for labels in ``keypoint_labels``; None: every detection). Sorted by decreasing score.
    """
    det = _select(prediction, score_threshold)
    order = torch.argsort(det["scores"], descending=True)
    det = {k: v[order] for k, v in det.items()}
    labels = det["labels"].long()
    names = _names(labels, category_names)
    rles = encode_masks(det["masks"], mask_threshold) if "masks" in det else None
    items: list[dict[str, Any]] = []
    for i, (name, lab) in enumerate(zip(names, labels.tolist())):
        item: dict[str, Any] = {
            "box": [float(v) for v in det["boxes"][i].tolist()],
            "label": name,
            "category_id": int(coco_category_ids[lab - 1]),
            "score": float(det["scores"][i]),
        }
        if rles is not None:
            item["mask"] = rles[i]
        if "keypoints" in det and _has_keypoints(lab, keypoint_labels):
            item["keypoints"] = [[float(v) for v in kp] for kp in det["keypoints"][i].tolist()]
        items.append(item)
    return items
