"""Evaluation: COCO metrics (pycocotools), drawn predictions, inference, TTA, ensembles, reports.

The public names below are imported lazily so that importing a light submodule (e.g. ``report``)
does not pull in torch and pycocotools.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "COCOEvaluator": "coco_eval",
    "EvaluationError": "coco_eval",
    "encode_masks": "coco_eval",
    "evaluate_all": "coco_eval",
    "evaluate_coco": "coco_eval",
    "format_eval_table": "coco_eval",
    "gather_predictions": "coco_eval",
    "predictions_to_coco_results": "coco_eval",
    "draw_predictions": "visualize",
    "predictions_to_json": "visualize",
    "save_png": "visualize",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"megdet.evaluation.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'megdet.evaluation' has no attribute {name!r}")
