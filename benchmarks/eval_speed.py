"""Evaluation speed (images/s): our inference + COCO evaluation, and our model forward against torchvision's.

Data: the embedded synthetic dataset (boxes, masks, person keypoints), generated for this run into a
temporary directory (``--num-val`` val images, default 24, long side ``--image-size`` 256; no train
images). Each image is resized to short side ``data.min_size_test`` (long side <= ``max_size_test``).

Ours: ``build_model`` from ``--config`` (default configs/synth_all_r18.yaml: ResNet-18 FPN with 128
channels, box + mask + keypoint heads) with ``model.norm=FrozenBN`` (torchvision's detection norm, so
that both models have the same layers; ours folds the FrozenBN affine into the convs), randomly
initialised, except that the box classifier is calibrated on the first batch so that the detections
spread over all categories, persons included (:func:`calibrate_class_scores`; otherwise the keypoint
evaluation would get no results). ``model.roi.score_thresh=0`` and ``model.roi.detections_per_img`` =
``--detections`` (default 20; the images hold up to ~8 objects): every image then gets exactly that
many detections (counted and reported), whose masks are pasted and keypoints decoded and encoded as
for a trained model. ``--set key=value`` overrides are applied last.

Everything runs in one process with ``--threads`` torch threads (default: all usable cores) and no
loader workers. Timed:

1. The forward, ours against torchvision (the ratio). torchvision's ``MaskRCNN`` is built from its
   public parts at our config's sizes: the same torchvision ResNet with FrozenBN in a
   ``BackboneWithFPN`` of ``model.fpn_channels`` channels with a max-pooled P6, the same anchors, RPN
   head depth, test-time pre/post-NMS proposal counts and NMS thresholds, the box head
   (``TwoMLPHead`` or ``FastRCNNConvFCHead``), mask head (``MaskRCNNHeads`` + ``MaskRCNNPredictor``)
   and keypoint head (``KeypointRCNNHeads`` + ``KeypointRCNNPredictor``, set on its ``roi_heads``,
   which then runs masks and keypoints in one model), RoIAlign poolers (also when our config says
   prroi), ``min_size`` / ``max_size`` = ``data.min_size_test`` / ``max_size_test``,
   ``box_score_thresh=0`` and ``box_detections_per_img`` = ``--detections``. Its weights are loaded
   into ours by megdet's torchvision name map (and ours' calibrated classifier into it), so both
   detect (nearly) the same boxes. Both get the same images in the same batches of
   ``test.images_per_device``: ours the data pipeline's batches (resized, normalised, padded: what
   ``evaluate_model`` feeds it; the loader is timed apart), torchvision the original images as float
   tensors (its in-model resize + normalise is counted for it). Both return original-image
   coordinates with masks pasted at image size, as float CPU tensors. Each forward is run stage by
   stage (resize + normalise, backbone + FPN, RPN, RoI heads incl. keypoint decoding, mask pasting +
   rescaling; the same calls as each model's own ``forward``), the two models alternating batch by
   batch, ``--passes`` times (default 2) after one warm-up batch each, so that load on a shared
   machine hits both alike. images/s = images / summed forward seconds of the median pass; ratio =
   ours / torchvision (> 1: ours is faster).
2. Our evaluation with ``megdet.evaluation.inference.evaluate_model`` (tta False, progress False):
   its ``timing.json`` gives the inference wall time, the model time and the COCO evaluation time.
   The data loading and the COCO-results encoding (boxes, RLE masks, keypoints;
   ``COCOEvaluator.process``, as evaluate_model calls it) are timed in step 1, and pycocotools'
   evaluation per task (bbox, segm, keypoints) on the results files evaluate_model wrote, with the
   ground truth loaded once beforehand.
3. ``evaluate_model`` with ``tta=True`` (the views of ``test.tta``) on the first ``--tta-images``
   images (default 8), and single scale on the same images: the TTA cost ratio.

On a machine whose cores are busy, torch's OpenMP threads get preempted and wait on each other: the
script prints a note when the load average says so (``--threads 1`` then measures more steadily).

    python benchmarks/eval_speed.py [--quick] [--threads N] [--num-val N] [--detections N]

Prints tables, writes benchmarks/results/eval_speed.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from _common import print_table, usable_cores, write_results
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from megdet.config import Config, load_config
from megdet.data.layout import split_files
from megdet.data.loader import Batch, build_test_dataset, build_test_loader
from megdet.data.synthetic import generate_synthetic_coco
from megdet.evaluation.coco_eval import IOU_TYPES, COCOEvaluator, evaluate_coco, load_coco_gt
from megdet.evaluation.inference import evaluate_model
from megdet.modeling.backbone import RESNETS
from megdet.modeling.convert import convert_state, load_converted
from megdet.modeling.detector import GeneralizedRCNN, build_model, postprocess_detections

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "synth_all_r18.yaml"
STAGES = ("resize+normalise", "backbone+fpn", "rpn", "roi_heads", "paste+rescale")


# --------------------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------------------


def benchmark_config(
    config: str | Path, data_root: str | Path, detections: int, overrides: Sequence[str] = ()
) -> Config:
    """``config`` with FrozenBN, ``data.root``, no loader workers, score threshold 0 and ``detections``
    detections per image, then ``overrides``."""
    fixed = [
        "model.norm=FrozenBN",
        f"data.root={data_root}",
        "data.num_workers=0",
        "model.roi.score_thresh=0.0",
        f"model.roi.detections_per_img={detections}",
    ]
    cfg = load_config(config, [*fixed, *overrides])
    cfg.model.weights = ""  # random initialisation: never read backbone weight files
    return cfg


def build_torchvision_twin(cfg: Config) -> FasterRCNN:
    """torchvision's Mask R-CNN with a keypoint head (without the heads ``cfg.model`` turns off), at the
    sizes of ``cfg.model`` (see the module doc), in eval mode."""
    m, roi, rpn = cfg.model, cfg.model.roi, cfg.model.rpn
    if roi.box_head not in ("2fc", "4conv1fc"):
        raise ValueError(f"model.roi.box_head: no torchvision equivalent for '{roi.box_head}'")
    body = RESNETS[m.backbone](weights=None, norm_layer=FrozenBatchNorm2d)
    c5 = body.fc.in_features
    backbone = BackboneWithFPN(
        body,
        return_layers={f"layer{i}": str(i - 1) for i in range(1, 5)},
        in_channels_list=[c5 // 8, c5 // 4, c5 // 2, c5],
        out_channels=m.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    c = m.fpn_channels
    levels = ["0", "1", "2", "3"]  # P2..P5 (P6 feeds the RPN only)
    anchors = AnchorGenerator(
        sizes=tuple((s,) for s in rpn.anchor_sizes),
        aspect_ratios=(tuple(rpn.aspect_ratios),) * len(rpn.anchor_sizes),
    )
    if roi.box_head == "2fc":
        box_head: nn.Module = TwoMLPHead(c * roi.box_pool_size**2, roi.box_head_dim)
    else:
        box_head = FastRCNNConvFCHead((c, roi.box_pool_size, roi.box_pool_size), [roi.box_conv_dim] * 4,
                                      [roi.box_head_dim])  # fmt: skip
    kwargs: dict[str, Any] = {
        "num_classes": None,  # given by the predictors
        "min_size": cfg.data.min_size_test,
        "max_size": cfg.data.max_size_test,
        "image_mean": list(cfg.data.pixel_mean),
        "image_std": list(cfg.data.pixel_std),
        "size_divisible": cfg.data.size_divisibility,
        "rpn_anchor_generator": anchors,
        "rpn_head": RPNHead(c, len(rpn.aspect_ratios), conv_depth=rpn.head_convs),
        "rpn_pre_nms_top_n_test": rpn.pre_nms_top_n_test,
        "rpn_post_nms_top_n_test": rpn.post_nms_top_n_test,
        "rpn_nms_thresh": rpn.nms_thresh,
        "box_roi_pool": MultiScaleRoIAlign(levels, roi.box_pool_size, roi.sampling_ratio),
        "box_head": box_head,
        "box_predictor": FastRCNNPredictor(roi.box_head_dim, m.num_classes + 1),
        "box_score_thresh": roi.score_thresh,
        "box_nms_thresh": roi.nms_thresh,
        "box_detections_per_img": roi.detections_per_img,
        "bbox_reg_weights": tuple(roi.bbox_reg_weights),
    }
    if m.mask_on:
        mask_width = roi.mask_head_dim if roi.mask_head_convs > 0 else c
        kwargs["mask_roi_pool"] = MultiScaleRoIAlign(levels, roi.mask_pool_size, roi.sampling_ratio)
        kwargs["mask_head"] = MaskRCNNHeads(c, [roi.mask_head_dim] * roi.mask_head_convs, 1)
        kwargs["mask_predictor"] = MaskRCNNPredictor(mask_width, roi.mask_head_dim, m.num_classes + 1)
    model = (MaskRCNN if m.mask_on else FasterRCNN)(backbone, **kwargs)
    if m.keypoint_on:
        heads = model.roi_heads
        heads.keypoint_roi_pool = MultiScaleRoIAlign(levels, roi.keypoint_pool_size, roi.sampling_ratio)
        heads.keypoint_head = KeypointRCNNHeads(c, [roi.keypoint_head_dim] * roi.keypoint_head_convs)
        heads.keypoint_predictor = KeypointRCNNPredictor(roi.keypoint_head_dim, m.num_keypoints)
    return model.eval()


def load_batches(cfg: Config) -> tuple[list[Batch], list[list[Tensor]], float, list[int]]:
    """The val split as evaluate_model's loader yields it, the same images at original size as float
    tensors in [0, 1] (torchvision's input), the seconds the loader took (decode, resize, normalise)
    and the dataset's COCO category ids (label i + 1 <-> id [i])."""
    split = cfg.data.val_split
    loader = build_test_loader(cfg, split, rank=0, world_size=1)
    loader.dataset.with_masks = False  # as evaluate_model: inference does not read the targets
    loader.dataset.with_keypoints = False
    batches: list[Batch] = []
    t0 = time.perf_counter()
    for batch in loader:
        batches.append(batch)
    load_s = time.perf_counter() - t0
    raw = build_test_dataset(cfg, split)
    raw.transforms, raw.with_masks, raw.with_keypoints = None, False, False
    position = {image_id: i for i, image_id in enumerate(raw.image_ids)}
    originals = []
    for batch in batches:
        images = []
        for image_id in batch.image_ids:
            image, _ = raw[position[image_id]]
            images.append(image.as_subclass(torch.Tensor).contiguous().float().div_(255))
        originals.append(images)
    return batches, originals, load_s, list(raw.coco_category_ids)


# --------------------------------------------------------------------------------------------------
# Timed runs
# --------------------------------------------------------------------------------------------------


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def ours_forward_by_stage(
    model: GeneralizedRCNN, batch: Batch, acc: dict[str, float]
) -> list[dict[str, Tensor]]:
    """Our eval forward on ``batch`` (as evaluate_model calls it), adding each stage's seconds to ``acc``.

    ``GeneralizedRCNN.forward``'s eval path one stage at a time (the stages docs/ARCHITECTURE.md lists);
    the outputs are made float CPU tensors as in evaluate_model.
    """
    images, sizes = batch.images, batch.image_sizes
    feats, dt = _timed(lambda: model.backbone(images))
    acc["backbone+fpn"] += dt
    props, dt = _timed(lambda: model.rpn_proposals(images, sizes, feats))
    acc["rpn"] += dt
    (dets, _), dt = _timed(lambda: model.roi_heads(feats, props, sizes))
    acc["roi_heads"] += dt
    preds, dt = _timed(lambda: _float_cpu(postprocess_detections(dets, sizes, batch.original_sizes)))
    acc["paste+rescale"] += dt
    return preds


def torchvision_forward_by_stage(
    model: FasterRCNN, images: list[Tensor], acc: dict[str, float]
) -> list[dict[str, Tensor]]:
    """torchvision's ``GeneralizedRCNN.forward`` in eval mode one stage at a time, adding each stage's
    seconds to ``acc``."""
    original_sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in images]
    (image_list, _), dt = _timed(lambda: model.transform(images))
    acc["resize+normalise"] += dt
    feats, dt = _timed(lambda: model.backbone(image_list.tensors))
    acc["backbone+fpn"] += dt
    (props, _), dt = _timed(lambda: model.rpn(image_list, feats))
    acc["rpn"] += dt
    (dets, _), dt = _timed(lambda: model.roi_heads(feats, props, image_list.image_sizes))
    acc["roi_heads"] += dt
    preds, dt = _timed(
        lambda: _float_cpu(model.transform.postprocess(dets, image_list.image_sizes, original_sizes))
    )
    acc["paste+rescale"] += dt
    return preds


def _float_cpu(preds: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    return [{k: v.float().cpu() for k, v in p.items()} for p in preds]


def compare_forward(
    ours: GeneralizedRCNN,
    tv: FasterRCNN,
    batches: Sequence[Batch],
    originals: Sequence[list[Tensor]],
    evaluator: COCOEvaluator,
    passes: int,
) -> dict[str, Any]:
    """Forward timing of both models over every batch, alternating batch by batch, ``passes`` times
    after one warm-up batch each. Pass 1 also times ``evaluator.process`` (COCO-results encoding) on
    our outputs and counts both models' detections."""
    if passes < 1 or not batches:
        raise ValueError(f"compare_forward: need >= 1 pass and >= 1 batch, got {passes} and {len(batches)}")
    num_images = sum(len(b) for b in batches)
    names = ("ours", "torchvision")
    stage_s = {name: [dict.fromkeys(STAGES, 0.0) for _ in range(passes)] for name in names}
    detections: dict[str, list[int]] = {name: [] for name in names}
    by_label: dict[str, dict[int, int]] = {name: {} for name in names}
    encode_s = 0.0
    with torch.no_grad():
        scratch = dict.fromkeys(STAGES, 0.0)
        ours_forward_by_stage(ours, batches[0], scratch)
        torchvision_forward_by_stage(tv, originals[0], scratch)
        for p in range(passes):
            for i, (batch, images) in enumerate(zip(batches, originals)):
                runs = [("ours", lambda b=batch, a=stage_s["ours"][p]: ours_forward_by_stage(ours, b, a)),
                        ("torchvision", lambda x=images, a=stage_s["torchvision"][p]:
                            torchvision_forward_by_stage(tv, x, a))]  # fmt: skip
                for name, run in runs if i % 2 == 0 else runs[::-1]:  # alternate who goes first
                    preds = run()
                    if p == 0:
                        detections[name].extend(len(d["boxes"]) for d in preds)
                        for d in preds:
                            for label in d["labels"].tolist():
                                by_label[name][int(label)] = by_label[name].get(int(label), 0) + 1
                        if name == "ours":
                            _, dt = _timed(lambda ids=batch.image_ids, pr=preds: evaluator.process(ids, pr))
                            encode_s += dt
    out: dict[str, Any] = {"images": num_images, "passes": passes}
    for name in names:
        per_pass = [sum(s.values()) for s in stage_s[name]]
        med = statistics.median(per_pass)
        best = per_pass.index(sorted(per_pass)[(len(per_pass) - 1) // 2])  # the (lower) median pass
        out[name] = {
            "forward_s_per_pass": per_pass,
            "images_per_s": num_images / med,
            "ms_per_image": 1000 * med / num_images,
            "stages_ms_per_image": {k: 1000 * v / num_images for k, v in stage_s[name][best].items()},
            "detections_per_image_mean": statistics.fmean(detections[name]),
            "detections_per_image_min": min(detections[name]),
            "detections_per_image_max": max(detections[name]),
            "detections_by_label": dict(sorted(by_label[name].items())),
        }
    out["ratio_images_per_s_ours_over_torchvision"] = (
        out["ours"]["images_per_s"] / out["torchvision"]["images_per_s"]
    )
    out["encode_s"] = encode_s
    return out


def run_evaluation(model: nn.Module, cfg: Config, out_dir: Path, tta: bool) -> dict[str, Any]:
    """``evaluate_model`` on the val split; returns the ``timing.json`` it wrote into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    evaluate_model(model, cfg, out_dir=out_dir, tta=tta, progress=False)
    return json.loads((out_dir / "timing.json").read_text())


def time_coco_tasks(cfg: Config, results_dir: Path) -> dict[str, Any]:
    """pycocotools seconds per task on the results files in ``results_dir`` (ground truth loaded once,
    timed apart), and the number of results of each task."""
    files = split_files(cfg.data.root, cfg.data.val_split)
    gt_files = {"bbox": files.instances, "segm": files.instances, "keypoints": files.keypoints}
    gts: dict[Path, Any] = {}
    t0 = time.perf_counter()
    for task in IOU_TYPES:
        if (results_dir / f"coco_results_{task}.json").is_file() and gt_files[task] not in gts:
            gts[gt_files[task]] = load_coco_gt(gt_files[task])
    out: dict[str, Any] = {"gt_load_s": time.perf_counter() - t0, "tasks": {}}
    for task in IOU_TYPES:
        path = results_dir / f"coco_results_{task}.json"
        if not path.is_file():
            continue
        results = json.loads(path.read_text())
        gt = gts[gt_files[task]]
        stats, dt = _timed(lambda g=gt, r=results, t=task: evaluate_coco(g, r, t, image_ids=g.getImgIds()))
        out["tasks"][task] = {"seconds": dt, "results": len(results), "AP": stats["stats"]["AP"]}
    return out


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------


def share_weights(tv: nn.Module, ours: GeneralizedRCNN, batch: Batch) -> int:
    """Loads the twin's weights into ours by megdet's torchvision name map (megdet.modeling.convert),
    calibrates ours' classifier on ``batch`` (:func:`calibrate_class_scores`) and gives the twin the
    same classifier (the same torchvision module class on both sides); returns the tensors shared."""
    report = load_converted(ours, convert_state(tv.state_dict(), "torchvision"), allow_new_heads=False)
    calibrate_class_scores(ours, batch)
    tv.roi_heads.box_predictor.load_state_dict(ours.roi_heads.box_head.predictor.state_dict())
    return len(report.loaded)


def calibrate_class_scores(model: GeneralizedRCNN, batch: Batch, seed: int = 0) -> None:
    """Gives the box classifier random weights that spread the top detections over every category.

    A randomly initialised classifier favours one or two classes on every box (its logits follow the
    mean box feature, which all boxes share), so the keypoint evaluation, which scores persons only,
    would get no results. Here each class logit is a random projection of the box feature MINUS its
    mean over ``batch``'s proposals, scaled to unit spread: every class, person included, is then the
    top class of a similar share of the boxes, as in a trained detector's output on this data.
    """
    predictor = model.roi_heads.box_head.predictor
    captured: list[Tensor] = []
    handle = predictor.register_forward_pre_hook(lambda _module, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(batch.images, batch.image_sizes)
    finally:
        handle.remove()
    x = torch.cat(captured).flatten(1).float()
    mean = x.mean(dim=0)
    w = torch.randn(
        predictor.cls_score.out_features, x.shape[1], generator=torch.Generator().manual_seed(seed)
    )
    w /= ((x - mean) @ w.T).std(dim=0).clamp(min=1e-6)[:, None]
    with torch.no_grad():
        predictor.cls_score.weight.copy_(w)
        predictor.cls_score.bias.copy_(-(w @ mean))


def run_benchmark(
    *,
    config: str | Path = DEFAULT_CONFIG,
    overrides: Sequence[str] = (),
    num_val: int = 24,
    image_size: int = 256,
    detections: int = 20,
    passes: int = 2,
    tta_images: int = 8,
    work_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Generates the data, builds both models, runs every timing; returns the JSON payload (without the
    machine description). ``tta_images`` 0 skips the TTA timing."""
    if num_val < 1 or detections < 1 or tta_images < 0:
        raise ValueError(f"run_benchmark: need num_val, detections >= 1 and tta_images >= 0, got "
                         f"{num_val}, {detections}, {tta_images}")  # fmt: skip
    tta_images = min(tta_images, num_val)
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="megdet_eval_speed_"))
        work = Path(work_dir)
        data_root = work / "synth"
        _, gen_s = _timed(lambda: generate_synthetic_coco(data_root, num_train=0, num_val=num_val,
                                                          image_size=image_size, seed=0, workers=1,
                                                          progress=False))  # fmt: skip
        cfg = benchmark_config(config, data_root, detections, overrides)
        log(f"generated {num_val} val images ({image_size} px) in {gen_s:.1f} s")

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the dataset's note on dropped degenerate boxes
            batches, originals, load_s, category_ids = load_batches(cfg)
            torch.manual_seed(0)
            ours = build_model(cfg).eval()
            tv = build_torchvision_twin(cfg)
            copied = share_weights(tv, ours, batches[0])
            params = {"ours": sum(p.numel() for p in ours.parameters()),
                      "torchvision": sum(p.numel() for p in tv.parameters())}  # fmt: skip
            evaluator = _coco_evaluator(cfg, batches, category_ids)
            compare = compare_forward(ours, tv, batches, originals, evaluator, passes)
            log(f"forward: ours {compare['ours']['images_per_s']:.2f} img/s, torchvision "
                f"{compare['torchvision']['images_per_s']:.2f} img/s")  # fmt: skip
            single = run_evaluation(ours, cfg, work / "eval_single", tta=False)
            log(f"evaluate_model: {single['images']} images, {single['images_per_s']:.2f} img/s")
            coco = time_coco_tasks(cfg, work / "eval_single")
            tta_pair = None
            if tta_images:
                # TTA costs views x single scale: it runs on the first tta_images images only, and the
                # single-scale reference for its cost ratio on the same images.
                sub = copy.deepcopy(cfg)
                sub.test.max_images = tta_images
                tta_pair = (run_evaluation(ours, sub, work / "eval_sub", tta=False),
                            run_evaluation(ours, sub, work / "eval_tta", tta=True))  # fmt: skip
                log(f"evaluate_model (TTA, {tta_images} images): {tta_pair[1]['images_per_s']:.2f} img/s")

    images = single["images"]
    evaluation: dict[str, Any] = {
        "single": {
            **single,
            "model_images_per_s": images / single["model_s"],
            "data_loading_s": load_s,
            "encode_s": compare["encode_s"],
            "encode_ms_per_image": 1000 * compare["encode_s"] / images,
            "coco_eval_per_task": coco,
            "end_to_end_images_per_s": images / (single["inference_s"] + single["coco_eval_s"]),
        },
    }
    if tta_pair is not None:
        ref, tta = tta_pair
        t = cfg.test.tta
        evaluation["tta"] = {
            "views": len(t.min_sizes) * (2 if t.flip else 1),
            "min_sizes": list(t.min_sizes),
            "flip": t.flip,
            "box_merge": t.box_merge,
            "single_scale": ref,
            "tta": tta,
            "cost_ratio_inference_s": tta["inference_s"] / ref["inference_s"],
            "cost_ratio_model_s": tta["model_s"] / ref["model_s"],
            "cost_ratio_end_to_end": (tta["inference_s"] + tta["coco_eval_s"])
            / (ref["inference_s"] + ref["coco_eval_s"]),
        }
    return {
        "settings": {
            "config": str(config),
            "overrides": list(overrides),
            "num_val": num_val,
            "image_size": image_size,
            "detections_per_img": detections,
            "score_thresh": cfg.model.roi.score_thresh,
            "images_per_batch": cfg.test.images_per_device,
            "min_size_test": cfg.data.min_size_test,
            "max_size_test": cfg.data.max_size_test,
            "backbone": cfg.model.backbone,
            "fpn_channels": cfg.model.fpn_channels,
            "norm": cfg.model.norm,
            "pooler": cfg.model.roi.pooler,
            "passes": passes,
            "tta_images": tta_images,
            "threads": torch.get_num_threads(),
        },
        "params": params,
        "weights_copied": copied,
        "forward": compare,
        "evaluation": evaluation,
    }


def _coco_evaluator(cfg: Config, batches: Sequence[Batch], category_ids: Sequence[int]) -> COCOEvaluator:
    # Set up as evaluate_model sets up its own, so that process() does the same encoding work.
    files = split_files(cfg.data.root, cfg.data.val_split)
    kp_gt = files.keypoints if cfg.model.keypoint_on else None
    kp_ids = None
    if kp_gt is not None:
        cats = json.loads(kp_gt.read_text())["categories"]
        kp_ids = [int(c["id"]) for c in cats if c.get("keypoints")]
    return COCOEvaluator(
        gt_instances=files.instances,
        coco_category_ids=category_ids,
        gt_keypoints=kp_gt,
        keypoint_category_ids=kp_ids,
        image_ids=[i for b in batches for i in b.image_ids],
    )


def print_report(payload: dict[str, Any]) -> None:
    """The tables: forward ours vs torchvision (with stages), our evaluation breakdown, TTA."""
    f, s = payload["forward"], payload["settings"]
    ours, tv = f["ours"], f["torchvision"]
    print_table(
        f"Forward, {f['images']} images x {f['passes']} pass(es), {s['detections_per_img']} detections/image, "
        f"{s['threads']} thread(s); ms per image by stage",
        ["model", "images/s", "ms/image", *STAGES, "dets/image"],
        [[name, r["images_per_s"], r["ms_per_image"], *(r["stages_ms_per_image"][k] for k in STAGES),
          r["detections_per_image_mean"]] for name, r in (("ours", ours), ("torchvision", tv))],
    )  # fmt: skip
    print(f"ratio ours / torchvision images/s: {f['ratio_images_per_s_ours_over_torchvision']:.3f}")
    e = payload["evaluation"]["single"]
    n = e["images"]
    rows: list[list[Any]] = [
        ["data loading (decode, resize, normalise)", e["data_loading_s"], 1000 * e["data_loading_s"] / n],
        ["model forward (evaluate_model model_s)", e["model_s"], 1000 * e["model_s"] / n],
        ["COCO results encoding (boxes, RLE, keypoints)", e["encode_s"], 1000 * e["encode_s"] / n],
        ["inference wall (evaluate_model inference_s)", e["inference_s"], 1000 * e["inference_s"] / n],
        ["pycocotools: load ground truth", e["coco_eval_per_task"]["gt_load_s"], None],
    ]
    for task, r in e["coco_eval_per_task"]["tasks"].items():
        rows.append([f"pycocotools: {task} ({r['results']} results)", r["seconds"], 1000 * r["seconds"] / n])
    rows.append(
        ["COCO evaluation (evaluate_model coco_eval_s)", e["coco_eval_s"], 1000 * e["coco_eval_s"] / n]
    )
    print_table(f"evaluate_model, {n} images: model {e['model_images_per_s']:.2f} img/s, inference "
                f"{e['images_per_s']:.2f} img/s, end to end {e['end_to_end_images_per_s']:.2f} img/s",
                ["part", "seconds", "ms/image"], rows)  # fmt: skip
    t = payload["evaluation"].get("tta")
    if t is not None:
        rows = [[mode, r["images"], r["inference_s"], r["images_per_s"], r["model_s"], r["coco_eval_s"]]
                for mode, r in (("single scale", t["single_scale"]), ("TTA", t["tta"]))]  # fmt: skip
        print_table(
            f"TTA ({t['views']} views: short sides {t['min_sizes']}, flip {t['flip']}, {t['box_merge']}), "
            f"first {t['tta']['images']} images",
            ["mode", "images", "inference s", "images/s", "model s", "COCO eval s"],
            rows,
        )
        print(f"TTA cost: {t['cost_ratio_inference_s']:.2f}x single-scale inference wall time "
              f"({t['cost_ratio_model_s']:.2f}x model time, {t['cost_ratio_end_to_end']:.2f}x with COCO eval)")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line entry: runs the benchmark, prints the tables, writes the JSON; returns the payload."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 val images, TTA on 2")
    ap.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="our model's config (boxes+masks+keypoints)"
    )
    ap.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, applied last"
    )
    ap.add_argument(
        "--threads", type=int, default=usable_cores(), help="torch threads (default: usable cores)"
    )
    ap.add_argument("--num-val", type=int, default=None, help="val images (default 24, quick 8)")
    ap.add_argument("--image-size", type=int, default=256, help="long side of the synthetic images")
    ap.add_argument("--detections", type=int, default=20, help="detections per image (score threshold 0)")
    ap.add_argument(
        "--passes", type=int, default=None, help="alternating forward passes (default 2, quick 1)"
    )
    ap.add_argument(
        "--tta-images",
        type=int,
        default=None,
        help="images for the TTA timing (default 8, quick 2; 0 skips it)",
    )
    ap.add_argument("--results-dir", type=Path, default=None, help="where eval_speed.json goes")
    args = ap.parse_args(argv)  # fmt: skip
    if args.threads < 1 or args.detections < 1 or (args.passes is not None and args.passes < 1):
        ap.error("--threads, --detections and --passes must be >= 1")
    torch.set_num_threads(args.threads)
    with contextlib.suppress(OSError):
        load = os.getloadavg()[0]
        if args.threads > 1 and load + args.threads > usable_cores() + 0.5:
            print(f"note: 1-min load average {load:.1f} on {usable_cores()} usable cores: {args.threads} "
                  f"torch threads will be preempted and wait on each other; --threads 1 measures more "
                  f"steadily")  # fmt: skip
    num_val = args.num_val or (8 if args.quick else 24)
    passes = args.passes or (1 if args.quick else 2)
    tta_images = args.tta_images if args.tta_images is not None else (2 if args.quick else 8)
    t0 = time.perf_counter()
    payload = run_benchmark(config=args.config, overrides=args.set, num_val=num_val, image_size=args.image_size,
                            detections=args.detections, passes=passes, tta_images=tta_images)  # fmt: skip
    payload["settings"]["quick"] = args.quick
    payload["wall_s"] = time.perf_counter() - t0
    print_report(payload)
    path = write_results("eval_speed", payload, args.results_dir)
    print(f"\nwrote {path} ({payload['wall_s']:.0f} s)")
    return payload


if __name__ == "__main__":
    main()
