"""Semantic segmentation metrics (mean IoU) for models with a semantic branch, next to the COCO AP.

The predicted and ground-truth label maps of every image, both at the original image size, fill one
confusion matrix per rank; the matrices are summed on rank 0 (the counts do not depend on how the
images are split over ranks). The metrics are detectron2's ``SemSegEvaluator``'s: per class
IoU = TP / (TP + FP + FN) over the pixels whose ground truth is not 255; mIoU averages the classes
that occur in the ground truth or in the predictions (a class only predicted counts with IoU 0), and
a class absent from both is left out (-1 in ``per_class_iou``). Pixel accuracy, mean class
accuracy and frequency-weighted IoU complete the ``stats``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from megdet.data.semantic import IGNORE_LABEL

STAT_NAMES = ("mIoU", "fwIoU", "pixel_accuracy", "mean_accuracy")


class SemSegEvaluator:
    """Accumulates ``(prediction, ground truth)`` label maps and computes the metrics on rank 0.

    Args:
        num_classes: the model's semantic classes (ids 0..num_classes-1; 255 in the ground truth is ignored).
        class_names: one name per class, for ``per_class_iou`` (default ``class_K``).
        ground_truth: ``image_id -> (H, W)`` ground-truth map at the original size, used by
            :meth:`process_batch`.
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        ground_truth: Callable[[int], np.ndarray] | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"SemSegEvaluator: num_classes must be >= 1, got {num_classes}")
        names = list(class_names) if class_names is not None else [f"class_{k}" for k in range(num_classes)]
        if len(names) != num_classes:
            raise ValueError(f"SemSegEvaluator: {len(names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.class_names = names
        self.ground_truth = ground_truth
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)  # [ground truth, prediction]

    def process(self, prediction: Tensor | np.ndarray, ground_truth: np.ndarray) -> None:
        """Adds one image: ``prediction`` (H, W) class ids, ``ground_truth`` (H, W) ids or 255."""
        pred = prediction.detach().cpu().numpy() if isinstance(prediction, Tensor) else np.asarray(prediction)
        gt = np.asarray(ground_truth)
        if pred.shape != gt.shape:
            raise ValueError(f"semantic prediction {pred.shape} and ground truth {gt.shape} differ in size")
        pred = pred.astype(np.int64).reshape(-1)
        gt = gt.astype(np.int64).reshape(-1)
        labelled = gt != IGNORE_LABEL
        if (gt[labelled] >= self.num_classes).any() or (pred < 0).any() or (pred >= self.num_classes).any():
            raise ValueError(f"semantic label ids outside 0..{self.num_classes - 1} (and 255 in the ground truth)")
        k = self.num_classes
        self.confusion += np.bincount(gt[labelled] * k + pred[labelled], minlength=k * k).reshape(k, k)

    def process_batch(self, image_ids: Sequence[int], predictions: Sequence[Mapping[str, Tensor]]) -> None:
        """:meth:`process` of each prediction's ``sem_seg`` against ``ground_truth(image_id)``."""
        if self.ground_truth is None:
            raise ValueError("SemSegEvaluator.process_batch needs the ground_truth callable")
        for image_id, pred in zip(image_ids, predictions):
            if "sem_seg" not in pred:
                raise ValueError(f"prediction for image {image_id} has no 'sem_seg'")
            self.process(pred["sem_seg"], self.ground_truth(int(image_id)))

    def summarize(self) -> dict[str, Any]:
        """Sums the confusion matrices of all ranks (a collective when a process group is set up) and
        returns ``{"stats": {mIoU, fwIoU, pixel_accuracy, mean_accuracy}, "per_class_iou": {name: iou}}``
        as fractions on rank 0; ``{}`` on the other ranks."""
        from megdet.distributed import all_gather_object, get_rank

        shards = all_gather_object(self.confusion)
        if get_rank() != 0:
            return {}
        confusion = self.confusion if len(shards) == 1 else np.sum(shards, axis=0)
        return semantic_metrics(confusion, self.class_names)


def semantic_metrics(confusion: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """The metrics of a (K, K) confusion matrix ``[ground truth, prediction]`` (module docstring)."""
    c = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(c)
    pos_gt, pos_pred = c.sum(axis=1), c.sum(axis=0)
    union = pos_gt + pos_pred - tp
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), -1.0)
    in_gt = pos_gt > 0
    total = max(float(pos_gt.sum()), 1.0)
    stats = {
        "mIoU": float(iou[present].mean()) if present.any() else 0.0,
        "fwIoU": float((pos_gt[present] / total * iou[present]).sum()),
        "pixel_accuracy": float(tp.sum() / total),
        "mean_accuracy": float((tp[in_gt] / pos_gt[in_gt]).mean()) if in_gt.any() else 0.0,
    }
    return {"stats": stats, "per_class_iou": {name: float(v) for name, v in zip(class_names, iou)}}


def _pct(v: float) -> str:
    return "-" if v < 0 else f"{100 * v:.1f}"


def format_sem_seg(result: Mapping[str, Any]) -> list[str]:
    """Lines for the evaluation table: the stats in percent, then the IoU of every class."""
    stats = result["stats"]
    lines = ["sem_seg " + ", ".join(f"{k} {_pct(stats[k])}" for k in STAT_NAMES if k in stats)]
    per_class = result.get("per_class_iou") or {}
    if per_class:
        body = ", ".join(f"{name} {_pct(v)}" for name, v in per_class.items())
        lines += textwrap.wrap(f"sem_seg IoU per class: {body}", width=100, subsequent_indent="    ")
    return lines


def semantic_evaluator(models: Sequence[torch.nn.Module], dataset: Any) -> SemSegEvaluator | None:
    """The evaluator for models of which at least one has a semantic branch (None otherwise), reading
    the ground truth from ``dataset`` (``semantic_label_map``, at the original size). A model of another
    number of classes than the dataset's labels is a one-line ``EvaluationError``."""
    from megdet.evaluation.coco_eval import EvaluationError

    branches = [b for b in (getattr(m, "semantic_branch", None) for m in models) if b is not None]
    if not branches:
        return None
    classes = {int(b.num_classes) for b in branches}
    expected = int(getattr(dataset, "num_semantic_classes", 0))
    if len(classes) > 1 or expected not in classes:
        raise EvaluationError(
            f"the semantic branch predicts {sorted(classes)} classes but the dataset's labels have {expected}; "
            "evaluate with the model.context.num_semantic_classes and data.sem_seg_dir it was trained with"
        )
    index = {int(image_id): i for i, image_id in enumerate(dataset.image_ids)}
    return SemSegEvaluator(
        expected,
        getattr(dataset, "semantic_class_names", None),
        ground_truth=lambda image_id: dataset.semantic_label_map(index[image_id]),
    )
