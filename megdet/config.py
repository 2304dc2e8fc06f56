"""The one config system: typed dataclasses, loaded from YAML, overridden as ``key.sub=value``.

A YAML file may name another with ``base: other.yaml`` (resolved relative to the file); the file's
own keys are merged over the base recursively. Unknown keys and values of the wrong type are
one-line :class:`ConfigError` s that name the key and suggest the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message is one line."""


# --------------------------------------------------------------------------------------------------
# The choices of the string-valued keys (the modules that implement them import these names)
# --------------------------------------------------------------------------------------------------

BACKBONES = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnext101_32x8d")
NORMS = ("FrozenBN", "BN", "GN", "CrossDeviceBN", "none")
POOLERS = ("roialign", "prroi")
BOX_HEADS = ("2fc", "4conv1fc")
OPTIMIZERS = ("sgd", "adamw", "lars", "lamb")
POLICIES = ("step", "cosine")
LR_SCALINGS = ("auto", "linear", "sqrt", "none")
DEVICES = ("auto", "cpu", "cuda")
AMP_MODES = ("off", "bf16", "fp16", "auto")
SUBLINEAR_MODES = ("off", "stages", "blocks", "nested")
CHANNELS_LAST_MODES = ("auto", "on", "off")
BOX_MERGES = ("nms", "vote")
SEMANTIC_STRIDES = (4, 8, 16, 32)  # model.context.semantic_stride: the FPN levels P2..P5 the branch fuses
# The label maps' "not labelled" value: semantic class ids lie below it (COCO-Stuff's 8-bit maps).
IGNORE_LABEL = 255


def semantic_num_classes(num_semantic_classes: int, num_thing_classes: int) -> int:
    """``model.context.num_semantic_classes``, or when 0 (labels from the instance masks) background +
    the ``num_thing_classes`` thing classes."""
    return num_semantic_classes if num_semantic_classes > 0 else num_thing_classes + 1


# --------------------------------------------------------------------------------------------------
# Validation helpers (shared with the constructors, which raise ValueErrors about their arguments)
# --------------------------------------------------------------------------------------------------


def check_choice(
    where: str, value: Any, options: Sequence[str], noun: str = "value", error: type[ValueError] = ValueError
) -> None:
    """Raises ``error("{where}: unknown {noun} '{value}'; choose one of ...")`` unless ``value`` is one of ``options``."""
    if value not in options:
        raise error(f"{where}: unknown {noun} '{value}'; choose one of {', '.join(options)}")


def require_choice(key: str, value: str, options: Sequence[str], noun: str = "value") -> None:
    """:func:`check_choice` for a config key: a ConfigError naming ``key``."""
    check_choice(key, value, options, noun, ConfigError)


def require_at_least(checks: Iterable[tuple[str, float, float]]) -> None:
    """ConfigError naming the first ``(key, value, low)`` whose value is below ``low``."""
    for key, value, low in checks:
        if value < low:
            raise ConfigError(f"{key}: expected >= {low}, got {value}")


def require(condition: bool, message: str) -> None:
    """ConfigError with ``message`` (which names the key) unless ``condition``."""
    if not condition:
        raise ConfigError(message)


def _require_unit_interval(checks: Iterable[tuple[str, float]]) -> None:
    for key, value in checks:
        require(0.0 <= value <= 1.0, f"{key}: expected a value in [0, 1], got {value}")


def _require_positive_list(key: str, values: Sequence[float], what: str = "numbers") -> None:
    require(bool(values) and min(values) > 0, f"{key}: expected a non-empty list of positive {what}, got {list(values)}")


class _YamlLoader(yaml.SafeLoader):
    """yaml.SafeLoader with YAML 1.2 booleans: only true / false.

    YAML 1.1 (PyYAML's default) also reads on / off / yes / no as booleans, which would turn the
    documented ``train.amp=off`` into False and then into a type error.
    """


_BOOL_TAG = "tag:yaml.org,2002:bool"
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


# Config values are a few hundred numbers and names. Both limits are far above any real config and far
# below what hurts: a YAML alias bomb ("billion laughs") is a few lines that expand to billions of values.
MAX_CONFIG_VALUES = 100_000
MAX_CONFIG_NUMBER = 1e15  # |int| and |float| (1e308 iterations or epochs overflow the schedule arithmetic)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (a SafeLoader subclass: plain data only)


def _check_plain(data: Any, where: str) -> None:
    """ConfigError unless ``data`` (just loaded from YAML) is plain nested data of a sane size: string keys,
    at most ``MAX_CONFIG_VALUES`` values with aliases expanded (which also stops self-referencing ones)."""
    seen = 0
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        node, key = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"{where}: more than {MAX_CONFIG_VALUES} values once YAML aliases (*name) are expanded; "
                "a config needs a few hundred (an alias bomb?)"
            )
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    under = f" under '{key}'" if key else ""
                    raise ConfigError(f"{where}: key {k!r}{under} is not a string; config keys are names such as 'model'")
                stack.append((v, f"{key}.{k}" if key else k))
        elif isinstance(node, list):
            stack.extend((v, f"{key}[{i}]") for i, v in enumerate(node))


def _load_yaml_text(text: str, where: str) -> Any:
    """YAML text -> plain data; every way it can fail is a one-line ConfigError naming ``where``."""
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        at = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"{where}: invalid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply to read; a config nests a few levels") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"{where}: invalid YAML ({str(e).splitlines()[0]})") from None
    _check_plain(data, where)
    return data


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class RPNConfig:
    """Region proposal network."""

    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # one per P2..P6
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    head_convs: int = 1
    round_anchors: bool = True  # cell anchor corners rounded to whole pixels (torchvision); false: detectron2
    pre_nms_top_n_train: int = 2000
    post_nms_top_n_train: int = 1000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5


@dataclass
class RoIConfig:
    """RoI heads (box, mask, keypoint) and their pooler."""

    pooler: str = "roialign"  # roialign | prroi
    box_head: str = "2fc"  # 2fc | 4conv1fc
    box_head_dim: int = 1024
    box_conv_dim: int = 256
    box_pool_size: int = 7
    mask_pool_size: int = 14
    mask_head_convs: int = 4
    mask_head_dim: int = 256
    keypoint_pool_size: int = 14
    keypoint_head_convs: int = 8
    keypoint_head_dim: int = 512
    # Scales loss_keypoint (a 56x56-way cross-entropy, ~8 at the start, the largest term when trained
    # from scratch; it shares the backbone with the box and mask losses).
    keypoint_loss_weight: float = 1.0
    # Foreground RoIs per image the mask and keypoint heads train on (random subset); 0 = all of them.
    max_mask_keypoint_rois: int = 0
    sampling_ratio: int = 2  # RoIAlign only; PrRoIPool integrates exactly
    aligned: bool = True  # RoIAlign's half-pixel offset (detectron2's ROIAlignV2); false: torchvision's
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    bbox_reg_weights: list[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])


@dataclass
class ContextConfig:
    """MegDet's "+Context/Seg": a semantic segmentation branch on the FPN and the context it gives the
    RoI heads (``megdet/modeling/semantic.py``). Everything is off by default."""

    semantic: bool = False  # the semantic segmentation branch and its loss (loss_sem_seg)
    # Classes of the per-pixel labels: with data.sem_seg_dir, more than the largest id in the label maps
    # (COCO-Stuff: 182); 0 = labels built from the instance masks: background + model.num_classes.
    num_semantic_classes: int = 0
    semantic_loss_weight: float = 0.2
    semantic_stride: int = 8  # the FPN levels are fused at 1/stride of the input (4 | 8 | 16 | 32)
    semantic_convs: int = 4  # 3x3 convs after the fusion
    semantic_dim: int = 128  # their channels
    roi_features: bool = False  # the branch's features pooled per RoI, added to the box and mask heads'
    global_context: bool = False  # the branch's features averaged over the image, added to the box head's

    def validate(self, num_classes: int, sem_seg_dir: str) -> None:
        """One-line ConfigErrors for ``model.context.*`` values no model can use, given ``model.num_classes``
        and ``data.sem_seg_dir``."""
        require(self.semantic or not (self.roi_features or self.global_context),
                "model.context.roi_features / global_context use the semantic branch's features; set"
                " model.context.semantic=true")  # fmt: skip
        if not self.semantic:
            return
        require(not sem_seg_dir or self.num_semantic_classes != 0,
                "model.context.num_semantic_classes: set it (more than the largest id in the label maps of"
                f" data.sem_seg_dir={sem_seg_dir}); 0 only works with labels built from instance masks")  # fmt: skip
        require(self.semantic_stride in SEMANTIC_STRIDES,
                f"model.context.semantic_stride: expected one of {list(SEMANTIC_STRIDES)}, got {self.semantic_stride}")  # fmt: skip
        require_at_least([
            ("model.context.num_semantic_classes", self.num_semantic_classes, 0),
            ("model.context.semantic_convs", self.semantic_convs, 0),
            ("model.context.semantic_dim", self.semantic_dim, 1),
            ("model.context.semantic_loss_weight", self.semantic_loss_weight, 0.0),
        ])  # fmt: skip
        classes = semantic_num_classes(self.num_semantic_classes, num_classes)
        require(2 <= classes <= IGNORE_LABEL,
                f"model.context.num_semantic_classes: expected 2..{IGNORE_LABEL} classes, got {classes}")  # fmt: skip


@dataclass
class ModelConfig:
    """Detector architecture."""

    backbone: str = "resnet18"  # resnet10 | resnet18 | resnet34 | resnet50 | resnet101 | resnext101_32x8d
    # Local weights file, never downloaded: ImageNet ResNet weights for the backbone (torchvision, MSRA /
    # detectron2 .pkl) or a whole detector to start from (megdet, torchvision or detectron2; class heads
    # of another size are re-initialised). See megdet/modeling/convert.
    weights: str = ""
    norm: str = "BN"  # FrozenBN | BN | GN | CrossDeviceBN: backbone, FPN, heads (FrozenBN: backbone only)
    head_norm: str = ""  # the FPN's, RPN head's and RoI heads' norm ("none" too); "" = as model.norm
    bn_group_size: int = 0  # CrossDeviceBN: ranks that share statistics (MegDet's "BN size"); 0 = all
    # CrossDeviceBN: > 0 normalises groups of this many images of each device on their own statistics
    # (nothing shared across devices); must divide data.images_per_device. 0 = off.
    bn_group_images: int = 0
    trainable_layers: int = 5  # ResNet stages trained (0-5); frozen stages have no gradient
    stride_in_1x1: bool = False  # bottlenecks downsample in the 1x1 conv (MSRA / detectron2 R-50), not the 3x3
    fpn_channels: int = 256
    num_classes: int = 7  # foreground categories, background excluded
    mask_on: bool = False
    keypoint_on: bool = False
    num_keypoints: int = 17
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi: RoIConfig = field(default_factory=RoIConfig)
    context: ContextConfig = field(default_factory=ContextConfig)

    def validate(self) -> None:
        """One-line ConfigErrors for ``model.*`` values no detector can be built from (values of a head
        that is off are not checked)."""
        r, roi = self.rpn, self.roi
        require_choice("model.norm", self.norm, NORMS, "norm")
        require(self.norm != "none", "model.norm: the ResNet body needs a norm; choose FrozenBN, BN, GN or"
                " CrossDeviceBN (model.head_norm=none leaves the FPN and heads without one)")  # fmt: skip
        if self.head_norm:
            require_choice("model.head_norm", self.head_norm, NORMS, "norm")
        require_choice("model.backbone", self.backbone, BACKBONES)
        require_choice("model.roi.pooler", roi.pooler, POOLERS)
        require_choice("model.roi.box_head", roi.box_head, BOX_HEADS)
        at_least = [
            ("model.num_classes", self.num_classes, 1),
            ("model.bn_group_size", self.bn_group_size, 0),
            ("model.bn_group_images", self.bn_group_images, 0),
            ("model.fpn_channels", self.fpn_channels, 1),
            ("model.rpn.head_convs", r.head_convs, 1),
            ("model.rpn.batch_size_per_image", r.batch_size_per_image, 1),
            ("model.rpn.pre_nms_top_n_train", r.pre_nms_top_n_train, 1),
            ("model.rpn.post_nms_top_n_train", r.post_nms_top_n_train, 1),
            ("model.rpn.pre_nms_top_n_test", r.pre_nms_top_n_test, 1),
            ("model.rpn.post_nms_top_n_test", r.post_nms_top_n_test, 1),
            ("model.roi.box_head_dim", roi.box_head_dim, 1),
            ("model.roi.box_conv_dim", roi.box_conv_dim, 1),
            ("model.roi.box_pool_size", roi.box_pool_size, 1),
            ("model.roi.batch_size_per_image", roi.batch_size_per_image, 1),
            ("model.roi.detections_per_img", roi.detections_per_img, 1),
            ("model.roi.max_mask_keypoint_rois", roi.max_mask_keypoint_rois, 0),
            ("model.roi.sampling_ratio", roi.sampling_ratio, 0),
        ]
        if self.mask_on:
            at_least += [("model.roi.mask_pool_size", roi.mask_pool_size, 1),
                         ("model.roi.mask_head_convs", roi.mask_head_convs, 0),
                         ("model.roi.mask_head_dim", roi.mask_head_dim, 1)]  # fmt: skip
        if self.keypoint_on:
            at_least += [("model.num_keypoints", self.num_keypoints, 1),
                         ("model.roi.keypoint_pool_size", roi.keypoint_pool_size, 1),
                         ("model.roi.keypoint_head_convs", roi.keypoint_head_convs, 0),
                         ("model.roi.keypoint_head_dim", roi.keypoint_head_dim, 1),
                         ("model.roi.keypoint_loss_weight", roi.keypoint_loss_weight, 0)]  # fmt: skip
        require_at_least(at_least)
        require(0 <= self.trainable_layers <= 5, f"model.trainable_layers: expected 0..5, got {self.trainable_layers}")
        _require_positive_list("model.rpn.anchor_sizes", r.anchor_sizes)
        _require_positive_list("model.rpn.aspect_ratios", r.aspect_ratios)
        require(len(r.anchor_sizes) == 5, "model.rpn.anchor_sizes: expected 5 sizes, one per pyramid level"
                f" P2..P6, got {list(r.anchor_sizes)}")  # fmt: skip
        _require_unit_interval((
            ("model.rpn.nms_thresh", r.nms_thresh),
            ("model.rpn.fg_iou_thresh", r.fg_iou_thresh),
            ("model.rpn.bg_iou_thresh", r.bg_iou_thresh),
            ("model.rpn.positive_fraction", r.positive_fraction),
            ("model.roi.fg_iou_thresh", roi.fg_iou_thresh),
            ("model.roi.bg_iou_thresh", roi.bg_iou_thresh),
            ("model.roi.positive_fraction", roi.positive_fraction),
            ("model.roi.score_thresh", roi.score_thresh),
            ("model.roi.nms_thresh", roi.nms_thresh),
        ))  # fmt: skip
        for part in ("rpn", "roi"):
            fg, bg = getattr(self, part).fg_iou_thresh, getattr(self, part).bg_iou_thresh
            require(bg <= fg, f"model.{part}.bg_iou_thresh: {bg} is above model.{part}.fg_iou_thresh {fg}")
        weights = roi.bbox_reg_weights
        require(len(weights) == 4 and min(weights) > 0,
                f"model.roi.bbox_reg_weights: expected 4 positive numbers, got {list(weights)}")  # fmt: skip


@dataclass
class SynthConfig:
    """The embedded synthetic dataset (``megdet data synth``)."""

    num_train: int = 1000
    num_val: int = 200
    image_size: int = 256
    seed: int = 0
    # Background "stuff" regions (ground, wall, sky) under the objects, with COCO-Stuff style label maps
    # in stuffthingmaps/{split}/ and annotations/stuff_{split}.json; off: the original dataset.
    stuff: bool = False


@dataclass
class DataConfig:
    """Where the COCO-format data is and how it is loaded.

    Images of split S are read from ``root/S`` (or ``image_dir_S``-style overrides below) and
    annotations from ``root/annotations/instances_S.json`` and ``person_keypoints_S.json``
    (:mod:`megdet.data.layout`).
    Real COCO 2017: ``root=/data/coco train_split=train2017 val_split=val2017``.
    """

    root: str = "datasets/synth"
    train_split: str = "train"
    val_split: str = "val"
    images_per_device: int = 2
    num_workers: int = 2
    min_size_train: list[int] = field(default_factory=lambda: [224, 256, 288])
    max_size_train: int = 480
    min_size_test: int = 256
    max_size_test: int = 480
    flip_prob: float = 0.5
    size_divisibility: int = 32
    aspect_ratio_grouping: bool = True
    pixel_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    pixel_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # Per-pixel labels for model.context.semantic, one PNG per image in root/sem_seg_dir/SPLIT/ named
    # as the image with .png (COCO-Stuff's stuffthingmaps layout: pixel = class id, 255 = ignore);
    # empty: built from the instance masks (background 0, thing labels 1..num_classes).
    sem_seg_dir: str = ""
    # Read image files whose JSON file_name is absolute or leaves the split's image folder with '..'
    # (refused by default: the annotation file, not the user, would choose which files are read).
    allow_outside_images: bool = False
    synth: SynthConfig = field(default_factory=SynthConfig)

    def validate(self) -> None:
        """One-line ConfigErrors for ``data.*`` values no loader or transform can work with."""
        _require_positive_list("data.min_size_train", self.min_size_train, "sizes")
        require_at_least((
            ("data.images_per_device", self.images_per_device, 1),
            ("data.num_workers", self.num_workers, 0),
            ("data.max_size_train", self.max_size_train, 1),
            ("data.min_size_test", self.min_size_test, 1),
            ("data.max_size_test", self.max_size_test, 1),
            ("data.size_divisibility", self.size_divisibility, 0),
        ))  # fmt: skip
        _require_unit_interval([("data.flip_prob", self.flip_prob)])
        for key, values in (("data.pixel_mean", self.pixel_mean), ("data.pixel_std", self.pixel_std)):
            require(len(values) == 3, f"{key}: expected 3 values (R, G, B), got {list(values)}")
        require(min(self.pixel_std) > 0, f"data.pixel_std: expected positive values, got {list(self.pixel_std)}")


@dataclass
class SolverConfig:
    """Optimiser and the large learning-rate policy.

    The lr used is ``base_lr`` scaled by ``global_batch / reference_batch`` (linearly for SGD, by
    its square root for Adam-type optimizers: ``lr_scaling``), where
    global_batch = world size x data.images_per_device x train.grad_accum_steps.
    """

    optimizer: str = "sgd"  # sgd (momentum) | adamw | lars (layer-wise SGD) | lamb (layer-wise AdamW)
    base_lr: float = 0.02  # the lr at reference_batch images per step
    reference_batch: int = 16
    # How the lr follows global_batch / reference_batch: linear | sqrt | none | auto (linear for sgd and
    # lars, sqrt for adamw and lamb; engine/lr_policy.py says why).
    lr_scaling: str = "auto"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw / lamb, at reference_batch
    # adamw / lamb: also scale 1 - beta by the batch ratio (Malladi et al.'s square-root SDE rule).
    scale_betas: bool = False
    trust_coefficient: float = 0.02  # lars: a layer's lr is at most this x |w| / |update| (LARC clipping)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0  # norm weights and all biases (Goyal et al.)
    epochs: float = 12.0
    policy: str = "step"  # step | cosine
    decay_epochs: list[float] = field(default_factory=lambda: [8.0, 11.0])
    decay_factors: list[float] = field(default_factory=lambda: [0.1, 0.1, 0.5])  # MegDet: /10, /10, /2
    warmup: bool = True
    warmup_factor: float = 0.001  # warmup starts at this fraction of the scaled lr
    warmup_iters: int = -1  # -1: derived from the global batch (engine/lr_policy.py documents the rule)
    min_lr_factor: float = 0.0  # cosine floor, as a fraction of the scaled lr

    def validate(self) -> None:
        """One-line ConfigErrors for ``solver.*`` values no schedule or optimizer can be built from
        (needs neither the data set nor the device count)."""
        require(self.base_lr > 0, f"solver.base_lr: expected > 0, got {self.base_lr}")
        require(self.reference_batch >= 1, f"solver.reference_batch: expected >= 1, got {self.reference_batch}")
        require_choice("solver.policy", self.policy, POLICIES, "policy")
        require_choice("solver.lr_scaling", self.lr_scaling, LR_SCALINGS, "lr scaling rule")
        self.validate_optimizer()
        require(0 < self.warmup_factor <= 1, f"solver.warmup_factor: expected in (0, 1], got {self.warmup_factor}")
        require(self.warmup_iters >= -1,
                f"solver.warmup_iters: expected -1 (automatic) or >= 0, got {self.warmup_iters}")  # fmt: skip
        require(0 <= self.min_lr_factor <= 1, f"solver.min_lr_factor: expected in [0, 1], got {self.min_lr_factor}")
        require(self.epochs > 0, f"solver.epochs: expected > 0, got {self.epochs}")
        decay = list(self.decay_epochs) if self.policy == "step" else []
        require(all(0 < d < self.epochs for d in decay),
                f"solver.decay_epochs: each must lie strictly between 0 and solver.epochs={self.epochs:g}, got {decay}")  # fmt: skip
        require(decay == sorted(decay), f"solver.decay_epochs: must be in increasing order, got {decay}")
        require(len(decay) <= len(self.decay_factors),
                f"solver.decay_factors: {len(self.decay_factors)} factor(s) for {len(decay)} decay epoch(s);"
                " give at least one factor per entry of solver.decay_epochs")  # fmt: skip
        require(all(f > 0 for f in self.decay_factors[: len(decay)]),
                f"solver.decay_factors: expected positive factors, got {self.decay_factors}")  # fmt: skip

    def validate_optimizer(self) -> None:
        """The part of :meth:`validate` that building the optimizer needs."""
        require_choice("solver.optimizer", self.optimizer, OPTIMIZERS, "optimizer")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                f"solver.betas: expected two values in [0, 1), got {self.betas}")  # fmt: skip
        require(self.trust_coefficient > 0, f"solver.trust_coefficient: expected > 0, got {self.trust_coefficient}")
        require(0 <= self.momentum < 1, f"solver.momentum: expected a value in [0, 1), got {self.momentum}")
        require(self.weight_decay >= 0, f"solver.weight_decay: expected >= 0, got {self.weight_decay}")
        require(self.weight_decay_norm >= 0, f"solver.weight_decay_norm: expected >= 0, got {self.weight_decay_norm}")


@dataclass
class TrainConfig:
    """The training run."""

    out_dir: str = "runs/train"
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    # off | bf16 | fp16 | auto: bf16 autocast where the device computes bf16 natively (CUDA with bf16, CPUs
    # with AVX512-BF16 or AMX), else off
    amp: str = "off"
    sublinear_memory: str = "off"  # off | stages | blocks | nested: granularity of activation recomputation
    grad_clip: float = 0.0  # max gradient norm; 0 disables
    # NHWC activations: auto = on for CUDA with bf16/fp16 autocast (faster there: BENCHMARKS.md), else off
    channels_last: str = "auto"  # auto | on | off
    grad_accum_steps: int = 1
    checkpoint_period: int = 500  # iterations
    keep_checkpoints: int = 3
    log_period: int = 20
    max_iters: int = -1  # -1: from solver.epochs; a positive value overrides (for short runs)

    def validate(self) -> None:
        """One-line ConfigErrors for ``train.*`` values no run can work with (``train.device`` is
        checked where it is resolved: :func:`megdet.distributed.resolve_device`)."""
        require(self.max_iters == -1 or self.max_iters >= 1,
                f"train.max_iters: expected -1 (from solver.epochs) or >= 1, got {self.max_iters}")  # fmt: skip
        require_choice("train.amp", self.amp, AMP_MODES, "mode")
        require_choice("train.sublinear_memory", self.sublinear_memory, SUBLINEAR_MODES, "mode")
        require_choice("train.channels_last", self.channels_last, CHANNELS_LAST_MODES, "mode")
        require_at_least((
            ("train.grad_accum_steps", self.grad_accum_steps, 1),
            ("train.checkpoint_period", self.checkpoint_period, 1),
            ("train.log_period", self.log_period, 1),
        ))  # fmt: skip
        require(self.grad_clip >= 0, f"train.grad_clip: expected >= 0 (0 disables), got {self.grad_clip}")


@dataclass
class TTAConfig:
    """Test-time augmentation."""

    min_sizes: list[int] = field(default_factory=lambda: [224, 256, 320])
    flip: bool = True
    box_merge: str = "vote"  # nms | vote


@dataclass
class TestConfig:
    """Evaluation and inference."""

    eval_period: int = 0  # iterations; 0: only at the end
    images_per_device: int = 4
    tta: TTAConfig = field(default_factory=TTAConfig)
    max_images: int = -1  # -1: the whole split

    def validate(self, tta: bool = False) -> None:
        """One-line ConfigErrors for ``test.*`` values evaluation cannot use (``test.tta.*`` when ``tta``)."""
        require_at_least([("test.images_per_device", self.images_per_device, 1)])
        if tta:
            _require_positive_list("test.tta.min_sizes", self.tta.min_sizes, "sizes")
            require_choice("test.tta.box_merge", self.tta.box_merge, BOX_MERGES)


@dataclass
class Config:
    """The whole configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    test: TestConfig = field(default_factory=TestConfig)

    def validate(self, world_size: int | None = None) -> None:
        """Every section, and what two sections decide together: the one-line ConfigErrors a training run
        raises before any data is read or layer built; with ``world_size``, also what cannot work on that
        many devices (the local launcher checks it before it starts any worker)."""
        self.validate_model()
        self.data.validate()
        self.solver.validate()
        self.test.validate()
        if world_size is not None:
            self.validate_world_size(world_size)
        self.train.validate()

    def validate_model(self) -> None:
        """``model.*`` (:meth:`ModelConfig.validate`, :meth:`ContextConfig.validate`) and its fit with the
        data section."""
        self.model.validate()
        m, ipd = self.model, self.data.images_per_device
        require(m.bn_group_images == 0 or ipd % m.bn_group_images == 0,
                f"model.bn_group_images={m.bn_group_images} does not divide data.images_per_device={ipd};"
                " choose a divisor")  # fmt: skip
        m.context.validate(m.num_classes, self.data.sem_seg_dir)

    def validate_world_size(self, world_size: int) -> None:
        """What cannot work on ``world_size`` devices: cross-device BN groups that do not divide it."""
        group_size = self.model.bn_group_size
        cross_device = "CrossDeviceBN" in (self.model.norm, self.model.head_norm)
        require(not (cross_device and group_size > 0 and world_size % group_size),
                f"model.bn_group_size={group_size}: the world size {world_size} is not divisible by it;"
                f" choose a divisor of {world_size} (0 = all ranks)")  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Loading, merging, overriding
# --------------------------------------------------------------------------------------------------


def _suggest(name: str, options: typing.Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _brief(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def _sane(value: int | float, key: str) -> Any:
    """``value`` when finite and within +-MAX_CONFIG_NUMBER, else a ConfigError naming ``key``."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{key}': expected a finite number, got {value}")
    if abs(value) > MAX_CONFIG_NUMBER:
        shown = f"{value:.3g}" if isinstance(value, float) else f"~1e{int(math.log10(abs(value)))}"
        raise ConfigError(f"config key '{key}': {shown} is out of range (at most {MAX_CONFIG_NUMBER:g} in magnitude)")
    return value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks ``value`` against the annotation ``tp`` and converts what converts without loss."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {_brief(value)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            value = [value] if not isinstance(value, (dict, str)) or item_tp is str else value
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list of {_type_name(item_tp)}, got {_brief(value)}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true or false, got {_brief(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return _sane(value, key)
        if isinstance(value, float) and value.is_integer():
            return int(_sane(value, key))
        raise ConfigError(f"config key '{key}': expected an integer, got {_brief(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(_sane(value, key))
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return _sane(float(value), key)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {_brief(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {_brief(value)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping of {tp.__name__} fields, got {_brief(value)}")
        return _build(tp, value, prefix=f"{key}.")
    raise ConfigError(f"config key '{key}': unsupported type {tp!r}")  # pragma: no cover


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        if k not in names:
            raise ConfigError(f"unknown config key '{prefix}{k}'{_suggest(k, names, prefix)}")
        kwargs[k] = _coerce(v, hints[k], prefix + k)
    return cls(**kwargs)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save the config as UTF-8"
        ) from None
    data = _load_yaml_text(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        data = _merge(_read_yaml(path.parent / str(base), seen + (path,)), data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Splits ``key.sub=value`` into its key path and its YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = _load_yaml_text(raw, f"override '{key}'") if raw.strip() else ""
    except ConfigError as e:
        if "invalid YAML" not in str(e):
            raise
        value = raw  # not YAML: the plain string
    return key.split("."), value


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    cur = data
    for p in path[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[path[-1]] = value


def config_from_dict(data: dict[str, Any]) -> Config:
    """Builds a validated :class:`Config` from a (possibly partial) nested mapping."""
    return _build(Config, data)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Loads a YAML config (following ``base:``), applies ``key.sub=value`` overrides, validates."""
    data: dict[str, Any] = _read_yaml(Path(path)) if path else {}
    for text in overrides:
        keys, value = parse_override(text)
        _check_path(keys)
        _set_path(data, keys, value)
    return config_from_dict(data)


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    """A copy of ``cfg`` (e.g. a checkpoint's config) with ``key.sub=value`` overrides applied and validated."""
    data = config_to_dict(cfg)
    for text in overrides:
        keys, value = parse_override(text)
        _check_path(keys)
        _set_path(data, keys, value)
    return config_from_dict(data)


def _check_path(keys: list[str]) -> None:
    cls: Any = Config
    for i, k in enumerate(keys):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"unknown config key '{'.'.join(keys)}': '{'.'.join(keys[:i])}' has no sub-keys")
        names = [f.name for f in dataclasses.fields(cls)]
        if k not in names:
            prefix = ".".join(keys[:i]) + "." if i else ""
            raise ConfigError(f"unknown config key '{'.'.join(keys)}'{_suggest(k, names, prefix)}")
        cls = typing.get_type_hints(cls)[k]


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts/lists (YAML- and checkpoint-safe)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
