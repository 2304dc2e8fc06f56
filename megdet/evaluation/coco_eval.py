"""COCO evaluation: model outputs -> COCO results lists -> pycocotools ``COCOeval`` -> ``eval.json``.

The metric itself is pycocotools' (the reference every COCO number is quoted in); this module only
converts predictions, validates inputs so that mistakes give one-line errors instead of pycocotools'
bare asserts, handles the cases pycocotools does not (empty results), and gathers predictions from
all ranks onto rank 0.

Conventions of the results lists (what ``loadRes`` expects):

- ``bbox``: ``{image_id, category_id, bbox: [x, y, w, h], score}`` in original-image pixels.
- ``segm``: ``{image_id, category_id, segmentation: {size: [h, w], counts: str}, score}`` (compressed
  RLE). No ``bbox`` field on purpose: with one, ``loadRes`` would set the detection's area to the box
  area; without, it uses the mask area, the quantity the GT ``area`` of a mask also measures.
- ``keypoints``: ``{image_id, category_id, keypoints: [x1, y1, s1, ...], bbox, score}``; the third
  value of each keypoint is the predicted keypoint score (pycocotools ignores it, OKS uses x and y),
  ``bbox`` is the detection box, so that the detection's area (used for the area ranges) is the
  object's rather than the extent of its keypoints.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import textwrap
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from megdet.config import check_choice
from megdet.data.validate import category_name
from megdet.distributed import all_gather_object, get_rank

IOU_TYPES = ("bbox", "segm", "keypoints")
STAT_NAMES: dict[str, list[str]] = {
    "bbox": ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"],
    "segm": ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"],
    "keypoints": ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"],
}
TABLE_COLUMNS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
COCO_OKS_SIGMAS = COCOeval(iouType="keypoints").params.kpt_oks_sigmas  # pycocotools' defaults: 17 keypoints
_RESULT_FIELD = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}


class EvaluationError(ValueError):
    """Bad evaluation input (ground truth, results, gathered predictions); the message is one line."""


# --------------------------------------------------------------------------------------------------
# Predictions -> COCO results
# --------------------------------------------------------------------------------------------------


def encode_masks(masks: Tensor, threshold: float = 0.5) -> list[dict[str, Any]]:
    """Compressed COCO RLEs (``counts`` as str, JSON-ready) of ``masks`` thresholded strictly above ``threshold``.

    ``masks``: (N, 1, H, W) or (N, H, W) probabilities (or 0/1 values).
    """
    if masks.dim() == 4:
        masks = masks[:, 0]
    if masks.dim() != 3:
        raise ValueError(f"masks must have shape (N, 1, H, W) or (N, H, W), got {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        return []
    binary = (masks.detach().cpu() > threshold).to(torch.uint8).numpy()
    # pycocotools wants (H, W, N) uint8 in column-major order.
    rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def predictions_to_coco_results(
    predictions: Mapping[int, Mapping[str, Tensor]],
    coco_category_ids: Sequence[int],
    mask_threshold: float = 0.5,
    keypoint_category_ids: Collection[int] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """COCO results lists from per-image model outputs (original-image coordinates).

    ``predictions`` maps an image id to the model's dict: ``boxes`` (N, 4) xyxy, ``scores`` (N,),
    ``labels`` (N,) contiguous 1..K (label ``i`` is COCO category ``coco_category_ids[i - 1]``), and
    optionally ``masks`` (N, 1, H, W) probabilities and ``keypoints`` (N, K, 3) as x, y, score.
    Returns ``{"bbox": [...]}`` plus ``"segm"`` / ``"keypoints"`` when any prediction has masks /
    keypoints (so a box-only model does not get a meaningless segm AP of 0). Keypoint results are
    made only for detections whose category is in ``keypoint_category_ids`` (None: every detection).
    """
    cat_ids = [int(c) for c in coco_category_ids]
    kp_cats = None if keypoint_category_ids is None else {int(c) for c in keypoint_category_ids}
    with_masks = any("masks" in p for p in predictions.values())
    with_kps = any("keypoints" in p for p in predictions.values())
    out: dict[str, list[dict[str, Any]]] = {"bbox": []}
    if with_masks:
        out["segm"] = []
    if with_kps:
        out["keypoints"] = []

    for image_id, pred in predictions.items():
        image_id = int(image_id)
        for key in ("boxes", "scores", "labels"):
            if key not in pred:
                raise ValueError(
                    f"prediction for image {image_id} has no '{key}'; expected boxes, scores, labels"
                )
        boxes = pred["boxes"].detach().cpu().double()
        scores = pred["scores"].detach().cpu().double().tolist()
        labels = pred["labels"].detach().cpu().long().tolist()
        n = len(scores)
        if boxes.shape != (n, 4) or len(labels) != n:
            raise ValueError(
                f"prediction for image {image_id}: boxes {tuple(boxes.shape)}, scores ({n},) and labels "
                f"({len(labels)},) disagree; expected (N, 4), (N,), (N,)"
            )
        bad = [lab for lab in labels if not 1 <= lab <= len(cat_ids)]
        if bad:
            raise ValueError(
                f"prediction for image {image_id}: label {bad[0]} outside 1..{len(cat_ids)} "
                f"(labels are contiguous 1..num_classes; 0 is background)"
            )
        categories = [cat_ids[lab - 1] for lab in labels]
        xywh = boxes.clone()
        xywh[:, 2:] -= xywh[:, :2]
        xywh_list = xywh.tolist()
        for box, cat, score in zip(xywh_list, categories, scores):
            out["bbox"].append({"image_id": image_id, "category_id": cat, "bbox": box, "score": score})

        if "masks" in pred:
            rles = encode_masks(pred["masks"], mask_threshold)
            if len(rles) != n:
                raise ValueError(f"prediction for image {image_id}: {len(rles)} masks for {n} boxes")
            for rle, cat, score in zip(rles, categories, scores):
                out["segm"].append(
                    {"image_id": image_id, "category_id": cat, "segmentation": rle, "score": score}
                )

        if "keypoints" in pred:
            kps = pred["keypoints"].detach().cpu().double()
            if kps.dim() != 3 or kps.shape[0] != n or kps.shape[2] != 3:
                raise ValueError(
                    f"prediction for image {image_id}: keypoints {tuple(kps.shape)}, expected ({n}, K, 3)"
                )
            for kp, box, cat, score in zip(kps.flatten(1).tolist(), xywh_list, categories, scores):
                if kp_cats is not None and cat not in kp_cats:
                    continue
                out["keypoints"].append(
                    {"image_id": image_id, "category_id": cat, "keypoints": kp, "bbox": box, "score": score}
                )
    return out


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> Any:
    from megdet.data.errors import DatasetError
    from megdet.data.validate import read_json

    try:
        return read_json(path, what)
    except DatasetError as e:
        raise EvaluationError(str(e)) from None


def load_coco_gt(gt: COCO | str | Path, quiet: bool = True) -> COCO:
    """A pycocotools ``COCO`` for a ground-truth annotation file (returned unchanged when already one).

    The file is validated as the training data is (``megdet/data/validate.py``: every geometry finite
    and safe for pycocotools' C code, ids unique; ids may be integers or strings, as pycocotools allows);
    the first error is a one-line :class:`EvaluationError`. What pycocotools accepts but ``COCOeval``
    needs is filled in: a missing ``iscrowd`` is 0, a missing ``area`` the mask's area (the box's
    without a segmentation).
    """
    if isinstance(gt, COCO):
        return gt
    path = Path(gt)
    data = _read_json(path, "ground-truth annotation")
    if not isinstance(data, dict):
        raise EvaluationError(
            f"{path}: ground truth must be a JSON object with images, annotations, categories"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise EvaluationError(
                f"{path}: ground truth has no '{key}' list; is this a COCO annotation file?"
            )
    _validate_gt(path, data)
    coco = COCO()
    coco.dataset = data
    with _maybe_quiet(quiet):
        coco.createIndex()
    coco.source_path = str(path)  # for error messages
    return coco


def _validate_gt(path: Path, data: dict[str, Any]) -> None:
    """One-line EvaluationErrors for the first error of a ground-truth file; fills in iscrowd and area."""
    from megdet.data.validate import (
        annotation_problems,
        annotation_where,
        category_problems,
        entries,
        image_problems,
        is_error,
        is_id,
        keypoint_counts,
    )

    def first_error(where: str, issues: Any) -> None:
        for kind, detail in issues:
            if is_error(kind):
                raise EvaluationError(f"{path}: {where}{detail}")

    cats, issues = entries(data["categories"], "category", ("id",), id_ok=is_id)
    first_error("", issues)
    for c in cats:
        first_error(f"category id {c['id']}: ", category_problems(c))
    images, issues = entries(data["images"], "image", ("id",), id_ok=is_id)
    first_error("", issues)
    for img in images:
        if "height" in img or "width" in img:  # pycocotools needs them for segm only
            first_error(f"image id {img['id']}: ", image_problems(img, need_file=False))
    anns, issues = entries(data["annotations"], "annotation", ("id",), id_ok=is_id)
    first_error("", issues)
    img_by_id = {im["id"]: im for im in images}
    keypoints_of = keypoint_counts(cats)
    for index, ann in enumerate(anns):
        first_error(f"{annotation_where(ann, index)}: ", annotation_problems(ann, img_by_id, keypoints_of))
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = _area(ann, img_by_id[ann["image_id"]])


def _area(ann: dict[str, Any], img: dict[str, Any]) -> float:
    """COCO's ``area`` of a (validated) annotation: its mask's pixels, or its box's area without a mask."""
    seg = ann.get("segmentation")
    if seg and "height" in img and "width" in img:
        h, w = img["height"], img["width"]
        if isinstance(seg, list):
            polygons = [p for p in seg if len(p) >= 6]
            rle = mask_util.merge(mask_util.frPyObjects(polygons, h, w)) if polygons else None
        else:
            rle = mask_util.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg
        if rle is not None:
            return float(mask_util.area(rle))
    return float(ann["bbox"][2] * ann["bbox"][3])


def _gt_name(coco: COCO) -> str:
    return getattr(coco, "source_path", "the ground truth")


@contextlib.contextmanager
def _maybe_quiet(quiet: bool):
    # pycocotools reports progress and the summary with print(); quiet mode swallows it.
    if quiet:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    else:
        yield


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_gt_for_task(gt: COCO, iou_type: str, kp_cats: Mapping[Any, int]) -> None:
    """What ``COCOeval`` reads from the ground truth for ``iou_type`` beyond what every task needs."""
    if iou_type == "segm":
        for img in gt.dataset["images"]:
            if "height" not in img or "width" not in img:
                raise EvaluationError(
                    f"{_gt_name(gt)}: image id {img['id']!r} has no height/width; segm evaluation needs both"
                )
        for ann in gt.dataset["annotations"]:
            if not ann.get("segmentation"):
                raise EvaluationError(
                    f"{_gt_name(gt)}: annotation id {ann['id']!r} has no segmentation; segm evaluation needs "
                    "a mask for every ground-truth annotation (evaluate bbox instead)"
                )
    elif iou_type == "keypoints":
        for ann in gt.dataset["annotations"]:
            if ann["category_id"] in kp_cats and "keypoints" not in ann:
                raise EvaluationError(
                    f"{_gt_name(gt)}: annotation id {ann['id']!r} of keypoint category {ann['category_id']!r} "
                    "has no keypoints; keypoint evaluation needs them"
                )


def _known(key: Any, mapping: Mapping[Any, Any]) -> bool:
    try:
        return key in mapping
    except TypeError:  # unhashable: a list or an object
        return False


def _validate_results(
    results: Any, coco_gt: COCO, iou_type: str, source: str, kp_cats: dict[int, int]
) -> None:
    """Checks what ``loadRes`` and ``COCOeval`` assume, so that a mistake is one readable line."""
    from megdet.data.validate import rle_problem

    if not isinstance(results, list):
        raise EvaluationError(
            f"{source}: COCO results must be a JSON list of objects, got {type(results).__name__}"
        )
    field = _RESULT_FIELD[iou_type]
    need = f"COCO {iou_type} results need image_id, category_id, score, {field}"
    images = coco_gt.imgs
    cats = coco_gt.cats
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise EvaluationError(f"{source}: result {i} is a {type(r).__name__}, not an object; {need}")
        for key in ("image_id", "category_id", "score", field):
            if key not in r:
                raise EvaluationError(f"{source}: result {i} has no field '{key}'; {need}")
        if not _known(r["image_id"], images):
            raise EvaluationError(
                f"{source}: result {i} field 'image_id' = {r['image_id']!r} is not an image of {_gt_name(coco_gt)}"
            )
        if not _known(r["category_id"], cats):
            known = sorted(cats, key=str)
            shown = ", ".join(map(str, known[:20])) + (", ..." if len(known) > 20 else "")
            raise EvaluationError(
                f"{source}: result {i} field 'category_id' = {r['category_id']!r} is not a category of "
                f"{_gt_name(coco_gt)} (known ids: {shown})"
            )
        if not _is_number(r["score"]):
            raise EvaluationError(
                f"{source}: result {i} field 'score' = {r['score']!r} is not a finite number"
            )
        value = r[field]
        if iou_type == "bbox" or "bbox" in r:
            box = r["bbox"]
            if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
                raise EvaluationError(
                    f"{source}: result {i} field 'bbox' must be 4 finite numbers [x, y, w, h]"
                )
        if iou_type == "segm":
            if not (
                isinstance(value, dict) and "size" in value and isinstance(value.get("counts"), (str, bytes))
            ):
                raise EvaluationError(
                    f"{source}: result {i} field 'segmentation' must be a compressed RLE "
                    f"{{'size': [h, w], 'counts': str}} (pycocotools.mask.encode)"
                )
            img = images[r["image_id"]]
            problem = rle_problem(value, (img["height"], img["width"]), compressed_only=True)
            if problem is not None:
                raise EvaluationError(
                    f"{source}: result {i} field 'segmentation': {problem}; masks must be compressed RLEs "
                    "(pycocotools.mask.encode) in original-image pixels"
                )
        elif iou_type == "keypoints":
            if r["category_id"] not in kp_cats:
                raise EvaluationError(
                    f"{source}: result {i} field 'category_id' = {r['category_id']} has no keypoints in "
                    f"{_gt_name(coco_gt)}; make keypoint results only for {sorted(kp_cats)}"
                )
            k = kp_cats[r["category_id"]]
            if not (isinstance(value, list) and len(value) == 3 * k and all(_is_number(v) for v in value)):
                raise EvaluationError(
                    f"{source}: result {i} field 'keypoints' must be {3 * k} finite numbers [x, y, v] * {k}"
                )


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def evaluate_coco(
    coco_gt: COCO | str | Path,
    results: list[dict[str, Any]] | str | Path,
    iou_type: str,
    quiet: bool = True,
    *,
    image_ids: Collection[int] | None = None,
) -> dict[str, Any]:
    """Runs pycocotools ``COCOeval`` on one task; returns ``{"stats": {...}, "per_category_ap": {...}}``.

    ``stats`` holds the 12 bbox/segm stats (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm,
    ARl) or the 10 keypoint stats (AP, AP50, AP75, APm, APl, AR, AR50, AR75, ARm, ARl), as fractions;
    -1 where pycocotools gives -1 (no GT in that area range). ``per_category_ap`` maps category name
    to AP over IoU .50:.95 (-1 when the category has no GT). Empty results evaluate as "nothing
    detected" (0 where there is GT). Keypoint evaluation uses only the categories that declare
    ``keypoints`` in the GT file, with pycocotools' default OKS sigmas. ``image_ids`` restricts the
    evaluation to those images (default: all images of the GT file).
    """
    check_choice("evaluate_coco", iou_type, IOU_TYPES, "iou_type", EvaluationError)
    gt = load_coco_gt(coco_gt, quiet)
    if isinstance(results, (str, Path)):
        source = str(results)
        results = _read_json(Path(results), f"{iou_type} results")
    else:
        source = f"{iou_type} results"

    kp_cats = {c["id"]: len(c["keypoints"]) for c in gt.dataset["categories"] if c.get("keypoints")}
    if iou_type == "keypoints" and not kp_cats:
        raise EvaluationError(
            f"{_gt_name(gt)}: no category declares 'keypoints'; keypoint evaluation needs a person_keypoints file"
        )
    other = {c: k for c, k in kp_cats.items() if k != len(COCO_OKS_SIGMAS)}
    if iou_type == "keypoints" and other:
        cat, k = next(iter(other.items()))
        raise EvaluationError(
            f"{_gt_name(gt)}: category {cat!r} declares {k} keypoints; keypoint AP (OKS) is defined with COCO's "
            f"{len(COCO_OKS_SIGMAS)} per-keypoint sigmas"
        )
    _check_gt_for_task(gt, iou_type, kp_cats)
    _validate_results(results, gt, iou_type, source, kp_cats)

    with _maybe_quiet(quiet):
        if results:
            # Shallow copies: loadRes adds id/area/segmentation fields to each result it is given.
            dt = gt.loadRes([dict(r) for r in results])
        else:
            # loadRes indexes results[0]; an empty results set is "nothing detected", which COCOeval
            # handles fine when given an empty COCO object over the same images.
            dt = COCO()
            dt.dataset = {
                "images": list(gt.dataset["images"]),
                "categories": copy.deepcopy(gt.dataset["categories"]),
                "annotations": [],
            }
            dt.createIndex()
        evaluator = COCOeval(gt, dt, iou_type)
        if iou_type == "keypoints":
            evaluator.params.catIds = sorted(kp_cats)
        if image_ids is not None:
            unknown = sorted(set(image_ids) - set(gt.imgs))
            if unknown:
                raise EvaluationError(f"image_ids {unknown[:5]} are not images of {_gt_name(gt)}")
            evaluator.params.imgIds = sorted(set(image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()

    stats = {name: float(v) for name, v in zip(STAT_NAMES[iou_type], evaluator.stats)}
    # precision: [IoU thresholds, recall points, categories, area ranges, max dets]; area "all" is
    # index 0 and the largest maxDets the last, as in the headline AP.
    precision = evaluator.eval["precision"]
    per_category: dict[str, float] = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        valid = p[p > -1]
        per_category[category_name(gt.cats[cat_id])] = float(valid.mean()) if valid.size else -1.0
    return {"stats": stats, "per_category_ap": per_category}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return obj.decode("ascii")  # RLE counts from pycocotools.mask.encode
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def evaluate_all(
    gt_instances: COCO | str | Path,
    gt_keypoints: COCO | str | Path | None,
    results: Mapping[str, list[dict[str, Any]]],
    out_dir: str | Path | None = None,
    *,
    image_ids: Collection[int] | None = None,
    quiet: bool = True,
) -> dict[str, dict[str, Any]]:
    """Evaluates every task in ``results`` (``bbox``/``segm`` on ``gt_instances``, ``keypoints`` on
    ``gt_keypoints``); writes ``out_dir/coco_results_{task}.json`` and ``out_dir/eval.json``.

    Returns ``{task: {"stats": ..., "per_category_ap": ...}}`` (what ``eval.json`` holds).
    """
    unknown = sorted(set(results) - set(IOU_TYPES))
    if unknown:
        raise EvaluationError(f"results has unknown task(s) {unknown}; tasks are {', '.join(IOU_TYPES)}")
    if "keypoints" in results and gt_keypoints is None:
        raise EvaluationError(
            "results include keypoints but no keypoint ground truth was given (gt_keypoints: person_keypoints_*.json)"
        )
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        # Written before evaluating so that a failed evaluation still leaves the results to inspect.
        for task in IOU_TYPES:
            if task in results:
                with open(out / f"coco_results_{task}.json", "w") as f:
                    json.dump(results[task], f, default=_json_default)

    evals: dict[str, dict[str, Any]] = {}
    instances = None
    for task in IOU_TYPES:
        if task not in results:
            continue
        if task == "keypoints":
            gt = load_coco_gt(gt_keypoints, quiet)  # type: ignore[arg-type]
        else:
            if instances is None:  # loaded once for bbox and segm
                instances = load_coco_gt(gt_instances, quiet)
            gt = instances
        evals[task] = evaluate_coco(gt, results[task], task, quiet, image_ids=image_ids)
    if out is not None:
        with open(out / "eval.json", "w") as f:
            json.dump(evals, f, indent=2)
    return evals


def _pct(v: float | None) -> str:
    return "-" if v is None or v < 0 else f"{100 * v:.1f}"


def format_eval_table(eval_dict: Mapping[str, Mapping[str, Any]]) -> str:
    """A plain-text table (rows: tasks; columns: AP, AP50, AP75, APs, APm, APl, in percent) followed by
    per-category AP lines, and the semantic segmentation metrics when ``eval_dict`` has ``sem_seg``.
    ``-`` marks a value that does not exist (no GT, or APs for keypoints)."""
    tasks = [t for t in IOU_TYPES if t in eval_dict]
    width = max([len("task")] + [len(t) for t in tasks])
    lines = [f"{'task':<{width}}" + "".join(f"{c:>7}" for c in TABLE_COLUMNS)]
    for task in tasks:
        stats = eval_dict[task]["stats"]
        lines.append(f"{task:<{width}}" + "".join(f"{_pct(stats.get(c)):>7}" for c in TABLE_COLUMNS))
    for task in tasks:
        per_cat = eval_dict[task].get("per_category_ap") or {}
        if per_cat:
            body = ", ".join(f"{name} {_pct(ap)}" for name, ap in per_cat.items())
            lines.extend(
                textwrap.wrap(f"{task} AP per category: {body}", width=100, subsequent_indent="    ")
            )
    if "sem_seg" in eval_dict:
        from megdet.evaluation.sem_seg_eval import format_sem_seg

        lines.extend(format_sem_seg(eval_dict["sem_seg"]))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Accumulating over batches and ranks
# --------------------------------------------------------------------------------------------------


def _check_coverage(merged: Mapping[int, Any], expected_image_ids: Collection[int]) -> None:
    expected = {int(i) for i in expected_image_ids}
    missing = sorted(expected - set(merged))
    extra = sorted(set(merged) - expected)
    if missing:
        raise EvaluationError(
            f"no predictions for {len(missing)} of {len(expected)} expected images (e.g. ids {missing[:5]}); "
            f"every image must be processed exactly once across ranks"
        )
    if extra:
        raise EvaluationError(
            f"predictions for {len(extra)} images that are not expected (e.g. ids {extra[:5]}); "
            f"check that the loader and the ground-truth file are the same split"
        )


def gather_predictions(
    local: Mapping[int, Any], expected_image_ids: Collection[int] | None = None
) -> dict[int, Any] | None:
    """Merges per-image entries of every rank onto rank 0 (``all_gather_object``); other ranks get None.

    Without an initialised process group (or with one rank) it returns ``local`` as a dict. Raises
    :class:`EvaluationError` on rank 0 when an image id comes from two ranks or, with
    ``expected_image_ids``, when an expected image is missing or an unexpected one is present.
    """
    shards = all_gather_object(dict(local))
    if get_rank() != 0:
        return None
    merged: dict[int, Any] = {}
    owner: dict[int, int] = {}
    for rank, shard in enumerate(shards):
        for image_id, value in shard.items():
            if image_id in merged:
                raise EvaluationError(
                    f"image id {image_id} was predicted on rank {owner[image_id]} and rank {rank}; "
                    f"inference shards must be disjoint"
                )
            merged[image_id] = value
            owner[image_id] = rank
    if expected_image_ids is not None:
        _check_coverage(merged, expected_image_ids)
    return merged


class COCOEvaluator:
    """Accumulates predictions batch by batch (on every rank) and evaluates them on rank 0.

    Masks are RLE-encoded as they arrive, so memory holds compact results, not (N, 1, H, W) tensors.
    Keypoint results are kept only for categories that declare keypoints in ``gt_keypoints`` (or for
    ``keypoint_category_ids`` when given). ``image_ids``: the images that must be covered exactly
    once across ranks (default: every image of ``gt_instances``).
    """

    def __init__(
        self,
        *,
        gt_instances: str | Path,
        coco_category_ids: Sequence[int],
        gt_keypoints: str | Path | None = None,
        keypoint_category_ids: Collection[int] | None = None,
        image_ids: Collection[int] | None = None,
        mask_threshold: float = 0.5,
        quiet: bool = True,
    ) -> None:
        self.gt_instances = gt_instances
        self.gt_keypoints = gt_keypoints
        self.coco_category_ids = list(coco_category_ids)
        self.keypoint_category_ids = None if keypoint_category_ids is None else set(keypoint_category_ids)
        self.image_ids = None if image_ids is None else [int(i) for i in image_ids]
        self.mask_threshold = mask_threshold
        self.quiet = quiet
        self._results: dict[int, dict[str, list[dict[str, Any]]]] = {}

    def reset(self) -> None:
        """Forgets everything processed so far."""
        self._results = {}

    def __len__(self) -> int:
        return len(self._results)

    def process(self, image_ids: Sequence[int], predictions: Sequence[Mapping[str, Tensor]]) -> None:
        """Adds one batch: ``predictions[i]`` is the model output for image ``image_ids[i]``."""
        if len(image_ids) != len(predictions):
            raise ValueError(f"{len(image_ids)} image ids for {len(predictions)} predictions")
        for image_id, pred in zip(image_ids, predictions):
            image_id = int(image_id)
            if image_id in self._results:
                raise EvaluationError(f"image id {image_id} was processed twice on this rank")
            self._results[image_id] = predictions_to_coco_results(
                {image_id: pred}, self.coco_category_ids, self.mask_threshold, self.keypoint_category_ids
            )

    def summarize(self, out_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
        """Gathers onto rank 0 and evaluates there (writing ``out_dir`` files); other ranks return {}."""
        merged = gather_predictions(self._results, self.image_ids)
        if merged is None:
            return {}
        instances = load_coco_gt(self.gt_instances, self.quiet)
        if self.image_ids is None:
            _check_coverage(merged, instances.getImgIds())
        tasks = [t for t in IOU_TYPES if any(t in r for r in merged.values())] or ["bbox"]
        results: dict[str, list[dict[str, Any]]] = {t: [] for t in tasks}
        for image_id in sorted(merged):
            for task, items in merged[image_id].items():
                results[task].extend(items)
        keypoints_gt = None
        if "keypoints" in results and self.gt_keypoints is not None:
            keypoints_gt = load_coco_gt(self.gt_keypoints, self.quiet)
            kp_cats = {c["id"] for c in keypoints_gt.dataset["categories"] if c.get("keypoints")}
            results["keypoints"] = [r for r in results["keypoints"] if r["category_id"] in kp_cats]
        return evaluate_all(
            instances, keypoints_gt, results, out_dir, image_ids=sorted(merged), quiet=self.quiet
        )
