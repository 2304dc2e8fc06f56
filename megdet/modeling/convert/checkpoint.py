"""Foreign detector files -> megdet checkpoints (``megdet convert``, and ``--weights`` of eval / predict).

A converted checkpoint is what a finished megdet run leaves (``model``, ``config``, ``categories``) plus
``converted_from`` (the file, its source and the conversion report). Its config describes the source
model: :data:`SOURCE_SETTINGS` (how torchvision's and detectron2's R50-FPN models pre-process, pool,
decode and select detections, as far as megdet has a setting for it) with the architecture read from
the tensors (:func:`infer_model_settings`: backbone, widths, heads, classes, keypoints).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from megdet.checkpoint import Checkpoint
from megdet.config import Config, ConfigError, apply_overrides, config_from_dict, config_to_dict
from megdet.modeling.convert.convert import KEYPOINT_LOGITS, MASK_LOGITS, Conversion, convert_state
from megdet.modeling.convert.errors import WeightsError
from megdet.modeling.convert.files import WeightsFile, read_weights, recorded_input_format
from megdet.modeling.convert.load import BODY_PREFIX, WeightsReport, load_converted, resnet_name

# The settings of torchvision's v1 and detectron2's R50-FPN models that megdet's config expresses:
# what evaluation must reproduce (norm, anchors, RoIAlign, box coder, thresholds, pre-processing) and
# their training defaults. Images: megdet feeds RGB in [0, 1]; a BGR source's first conv is flipped by
# the conversion, so its pixel statistics are given here in RGB order (detectron2's MSRA models:
# mean [103.53, 116.28, 123.675] BGR, std 1, in 0-255 units).
SOURCE_SETTINGS: dict[str, dict[str, Any]] = {
    "torchvision": {
        "model": {
            "norm": "FrozenBN", "head_norm": "", "trainable_layers": 3, "stride_in_1x1": False,
            "rpn": {
                "anchor_sizes": [32, 64, 128, 256, 512], "aspect_ratios": [0.5, 1.0, 2.0], "round_anchors": True,
                "pre_nms_top_n_train": 2000, "post_nms_top_n_train": 2000,
                "pre_nms_top_n_test": 1000, "post_nms_top_n_test": 1000, "nms_thresh": 0.7,
                "fg_iou_thresh": 0.7, "bg_iou_thresh": 0.3, "batch_size_per_image": 256, "positive_fraction": 0.5,
            },
            "roi": {
                "pooler": "roialign", "aligned": False, "sampling_ratio": 2,
                "box_pool_size": 7, "mask_pool_size": 14, "keypoint_pool_size": 14,
                "fg_iou_thresh": 0.5, "bg_iou_thresh": 0.5, "batch_size_per_image": 512, "positive_fraction": 0.25,
                "score_thresh": 0.05, "nms_thresh": 0.5, "detections_per_img": 100,
                "bbox_reg_weights": [10.0, 10.0, 5.0, 5.0],
            },
        },
        "data": {
            "min_size_train": [800], "max_size_train": 1333, "min_size_test": 800, "max_size_test": 1333,
            "size_divisibility": 32, "pixel_mean": [0.485, 0.456, 0.406], "pixel_std": [0.229, 0.224, 0.225],
        },
    },
    "detectron2": {
        "model": {
            "norm": "FrozenBN", "head_norm": "", "trainable_layers": 3, "stride_in_1x1": True,
            "rpn": {
                "anchor_sizes": [32, 64, 128, 256, 512], "aspect_ratios": [0.5, 1.0, 2.0], "round_anchors": False,
                "pre_nms_top_n_train": 2000, "post_nms_top_n_train": 1000,
                "pre_nms_top_n_test": 1000, "post_nms_top_n_test": 1000, "nms_thresh": 0.7,
                "fg_iou_thresh": 0.7, "bg_iou_thresh": 0.3, "batch_size_per_image": 256, "positive_fraction": 0.5,
            },
            "roi": {
                "pooler": "roialign", "aligned": True, "sampling_ratio": 0,
                "box_pool_size": 7, "mask_pool_size": 14, "keypoint_pool_size": 14,
                "fg_iou_thresh": 0.5, "bg_iou_thresh": 0.5, "batch_size_per_image": 512, "positive_fraction": 0.25,
                "score_thresh": 0.05, "nms_thresh": 0.5, "detections_per_img": 100,
                "bbox_reg_weights": [10.0, 10.0, 5.0, 5.0],
            },
        },
        "data": {
            "min_size_train": [640, 672, 704, 736, 768, 800], "max_size_train": 1333,
            "min_size_test": 800, "max_size_test": 1333, "size_divisibility": 32,
            "pixel_mean": [0.485, 0.456, 0.406], "pixel_std": [1 / 255, 1 / 255, 1 / 255],
        },
    },
}  # fmt: skip
_FAMILY = {"torchvision": "torchvision", "detectron2": "detectron2"}
TORCHVISION_COCO_CLASSES = 91  # background + COCO's ids 1..90 (10 of them unused)


def coco_categories() -> list[dict[str, Any]]:
    """COCO's 80 categories (``id``, ``name``) in id order, from torchvision's COCO metadata (whose
    index is the COCO id; "N/A" marks the unused ids)."""
    from torchvision.models._meta import _COCO_CATEGORIES

    return [{"id": i, "name": n} for i, n in enumerate(_COCO_CATEGORIES) if n not in ("__background__", "N/A")]


def person_category() -> list[dict[str, Any]]:
    """COCO's person with its 17 keypoints and skeleton (a keypoint R-CNN's one class)."""
    from megdet.data.layout import COCO_KEYPOINT_NAMES, COCO_SKELETON

    return [{"id": 1, "name": "person", "keypoints": list(COCO_KEYPOINT_NAMES), "skeleton": [list(p) for p in COCO_SKELETON]}]


def _count(state: dict, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m[1] for k in state if (m := regex.fullmatch(k))})


def infer_model_settings(conv: Conversion, where: str = "") -> dict[str, Any]:
    """``model`` config values read from a converted detector's tensors."""
    s = conv.state
    body = {k[len(BODY_PREFIX):]: v for k, v in s.items() if k.startswith(BODY_PREFIX)}
    backbone = resnet_name(body)
    if backbone is None:
        raise WeightsError(f"{where}its ResNet body matches none of megdet's backbones")
    fpn = int(s["backbone.fpn.inner_blocks.0.0.weight"].shape[0])
    m: dict[str, Any] = {"backbone": backbone, "fpn_channels": fpn, "num_classes": conv.num_classes(), "rpn": {}}
    m["rpn"]["head_convs"] = _count(s, r"rpn\.rpn\.head\.convs\.(\d+)\.weight")
    roi: dict[str, Any] = {}
    if "roi_heads.box_head.head.fc6.weight" in s:
        fc6 = s["roi_heads.box_head.head.fc6.weight"]
        roi.update(box_head="2fc", box_head_dim=int(fc6.shape[0]), box_pool_size=round((fc6.shape[1] / fpn) ** 0.5))
    else:
        convs = [v for k, v in s.items() if re.fullmatch(r"roi_heads\.box_head\.head\.\d+\.0\.weight", k)]
        fcs = [v for k, v in s.items() if re.fullmatch(r"roi_heads\.box_head\.head\.\d+\.weight", k) and v.dim() == 2]
        if not convs or len(fcs) != 1:
            raise WeightsError(f"{where}its box head is neither torchvision's TwoMLPHead nor a 4conv1fc head")
        dim = int(convs[0].shape[0])
        roi.update(box_head="4conv1fc", box_conv_dim=dim, box_head_dim=int(fcs[0].shape[0]),
                   box_pool_size=round((fcs[0].shape[1] / dim) ** 0.5))  # fmt: skip
    m["mask_on"] = f"{MASK_LOGITS}.weight" in s
    if m["mask_on"]:
        roi["mask_head_convs"] = _count(s, r"roi_heads\.mask_head\.convs\.(\d+)\.0\.weight")
        roi["mask_head_dim"] = int(s["roi_heads.mask_head.predictor.conv5_mask.weight"].shape[1])
    m["keypoint_on"] = f"{KEYPOINT_LOGITS}.weight" in s
    if m["keypoint_on"]:
        m["num_keypoints"] = int(s[f"{KEYPOINT_LOGITS}.weight"].shape[1])
        roi["keypoint_head_convs"] = _count(s, r"roi_heads\.keypoint_head\.convs\.(\d+)\.0\.weight")
        if roi["keypoint_head_convs"]:
            roi["keypoint_head_dim"] = int(s["roi_heads.keypoint_head.convs.0.0.weight"].shape[0])
    m["roi"] = roi
    return m


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def source_config(conv: Conversion, where: str = "") -> Config:
    """The megdet config of a converted torchvision / detectron2 detector: :data:`SOURCE_SETTINGS`,
    the architecture of its tensors and the pixel statistics the file records."""
    family = _FAMILY.get(conv.source)
    if family is None:
        raise WeightsError(f"{where}a {conv.source} file carries no config: pass the model's config (--config)")
    data = _merge(SOURCE_SETTINGS[family], {"model": infer_model_settings(conv, where)})
    if conv.pixel_stats is not None:
        data["data"]["pixel_mean"], data["data"]["pixel_std"] = conv.pixel_stats
    return config_from_dict(data)


def _resolve_classes(classes: str | Sequence[int] | None, conv: Conversion) -> list[int] | None:
    """``classes`` as the foreground indices to keep (None: all): "auto" keeps the 80 COCO categories
    of a torchvision COCO head (91 rows: its labels are COCO ids) and everything of any other head;
    "all" everything; else the given 1-based indices, in that order."""
    if classes is None or classes == "all" or conv.num_classes() is None:
        return None
    if classes == "auto":
        if conv.source == "torchvision" and conv.num_classes() == TORCHVISION_COCO_CLASSES - 1:
            return [c["id"] for c in coco_categories()]
        return None
    if isinstance(classes, str):
        raise WeightsError(f"classes '{classes}': expected auto, all or a list of class indices")
    return [int(c) for c in classes]


def _categories(conv: Conversion, wf: WeightsFile, num_classes: int) -> list[dict[str, Any]]:
    """The categories to store: the file's own (megdet), COCO's 80, or COCO's person for a keypoint
    R-CNN with one class; [] when unknown or when the model predicts another number of classes."""
    if conv.source == "megdet":
        stored = wf.meta.get("categories")
        cats = stored if isinstance(stored, list) else []
    elif conv.num_classes() == 80:
        cats = coco_categories()
    elif conv.num_classes() == 1 and f"{KEYPOINT_LOGITS}.weight" in conv.state:
        cats = person_category()
    else:
        cats = []
    return cats if len(cats) == num_classes else []


def _stored_config(wf: WeightsFile, where: str) -> Config:
    stored = wf.meta.get("config")
    if not isinstance(stored, dict):
        raise WeightsError(f"{where}the checkpoint stores no config; pass the model's config (--config)")
    try:
        return config_from_dict(dict(stored))
    except ConfigError as e:
        raise WeightsError(f"{where}its stored config does not load ({e}); pass --config") from None


def converted_checkpoint(
    path: str | Path,
    cfg: Config | None = None,
    overrides: Sequence[str] = (),
    *,
    classes: str | Sequence[int] | None = "auto",
    input_format: str | None = None,
    allow_new_heads: bool = True,
) -> tuple[dict[str, Any], WeightsReport, Config]:
    """(checkpoint, report, config) of any detector file megdet knows.

    The model is built from ``cfg`` when given (its class heads re-initialised when they have another
    size and ``allow_new_heads``), else from the source's config (:func:`source_config`, or a megdet
    checkpoint's own), with ``overrides`` applied. ``classes``: see :func:`_resolve_classes`;
    ``input_format``: see :func:`~megdet.modeling.convert.convert.convert_state`.
    """
    from megdet.modeling.detector import build_model

    where = f"{path}: "
    wf = read_weights(path)
    input_format = input_format or recorded_input_format(wf)
    conv = convert_state(wf.state, input_format=input_format, where=where)
    keep = _resolve_classes(classes, conv)
    if keep is not None:
        conv = convert_state(wf.state, input_format=input_format, where=where, classes=keep)
    if conv.backbone_only:
        raise WeightsError(
            f"{where}ImageNet {conv.source} backbone weights, not a detector: train from them with model.weights={path}"
        )
    if cfg is None:
        cfg = _stored_config(wf, where) if conv.source == "megdet" else source_config(conv, where)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    build_cfg = copy.deepcopy(cfg)
    build_cfg.model.weights = ""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # re-initialised heads: the same file every time, the caller's RNG untouched
        model = build_model(build_cfg)
    report = load_converted(model, conv, allow_new_heads=allow_new_heads, where=where)
    ckpt = Checkpoint(
        model=model.state_dict(),
        config=config_to_dict(cfg),
        categories=_categories(conv, wf, cfg.model.num_classes),
        converted_from={"path": str(path), "source": conv.source, "report": report.lines()},
    )
    return ckpt.to_dict(), report, cfg


def is_converted_source(path: str | Path) -> bool:
    """True when ``path`` holds torchvision or detectron2 detector weights (to be converted), False for
    anything else (megdet checkpoints, and files that are not weights at all, which the checkpoint
    loader reports)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        wf = read_weights(path)
    except WeightsError:
        return path.suffix == ".pkl"  # a damaged or foreign pickle: the conversion's error names it
    from megdet.modeling.convert.names import detect_source

    return detect_source(wf.state) in _FAMILY
