"""Source state_dicts -> megdet names and values, what a file's model looks like, and loading into a model.

:func:`convert_state` renames every tensor with the explicit maps of
:mod:`~megdet.modeling.convert.names` and makes the value changes that come with the names:

- detectron2's box classifier has the background LAST (``num_classes + 1`` rows); megdet's (and
  torchvision's) FIRST: its rows are rotated. detectron2's class-specific box deltas (``4 x
  num_classes``) and mask logits (``num_classes``) have no background entry; megdet's have one at
  index 0, which inference never reads: it is filled with zeros.
- Models that read BGR images (detectron2's model zoo, MSRA's ImageNet ResNets) get the input channels
  of their first conv reversed, so they read megdet's RGB images with the same result.
- Caffe2 BN blobs are an affine map (scale, bias) without statistics: they become BN weight and bias
  with running mean 0 and running variance ``1 - eps``, so that the normalisation is exactly that map.
- ``classes`` keeps a subset of the classifier's classes, in the given order (e.g. the 80 COCO
  categories of torchvision's 91-way COCO heads, whose labels are COCO ids with gaps).

:func:`load_converted` loads the result into a model, reporting what was loaded, re-initialised (class
heads of another size, when fine-tuning), initialised (parts the file does not have) and left unused,
and refusing anything else that does not fit in one line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from megdet.config import check_choice
from megdet.modeling.convert.errors import WeightsError
from megdet.modeling.convert.names import NAME_MAPS, detect_source

# BN eps of every megdet norm layer (torch's BatchNorm2d, torchvision's FrozenBatchNorm2d).
BN_EPS = 1e-5

CLS_SCORE = "roi_heads.box_head.predictor.cls_score"
BBOX_PRED = "roi_heads.box_head.predictor.bbox_pred"
MASK_LOGITS = "roi_heads.mask_head.predictor.mask_fcn_logits"
KEYPOINT_LOGITS = "roi_heads.keypoint_head.predictor.kps_score_lowres"
# Tensors whose size follows the number of classes (or keypoints): re-initialised when fine-tuning to
# another number; everything else must fit exactly.
SEMANTIC_LOGITS = "semantic_branch.predictor"
CLASS_TENSORS = tuple(
    f"{p}.{s}" for p in (CLS_SCORE, BBOX_PRED, MASK_LOGITS, KEYPOINT_LOGITS, SEMANTIC_LOGITS) for s in ("weight", "bias")
)
# Whole parts a model may have and a file may lack (or the other way round), first match wins: the
# semantic branch and the context it adds to the RoI heads exist in megdet models only.
HEADS = {
    "semantic branch": "semantic_branch.",
    "box head context": "roi_heads.box_head.context.",
    "mask head context": "roi_heads.mask_head.context.",
    "mask head": "roi_heads.mask_head.",
    "keypoint head": "roi_heads.keypoint_head.",
}
FIRST_CONV = "stem.conv1.weight"
SOURCES_BGR = ("detectron2", "detectron2-resnet", "msra-resnet")
_BN_WEIGHT = re.compile(r"(?:.+\.)?(?:bn[1-3]|downsample\.1)\.weight")


@dataclass
class Conversion:
    """megdet-named ``state`` of a source file, and how it was obtained.

    ``backbone_only``: ``state`` holds a ResNetBody's tensors (names relative to it), else a whole
    GeneralizedRCNN's. ``ignored``: source keys dropped on purpose. ``notes``: value changes made.
    ``pixel_stats``: the (mean, std) the file records for RGB images in [0, 1] (detectron2 may), or None.
    """

    source: str
    state: dict[str, Tensor]
    backbone_only: bool
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pixel_stats: tuple[list[float], list[float]] | None = None

    def num_classes(self) -> int | None:
        """Foreground classes of the box classifier, or None (a backbone)."""
        w = self.state.get(f"{CLS_SCORE}.weight")
        return None if w is None else int(w.shape[0]) - 1


def _short(names: Sequence[str], limit: int = 4) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def rename_state(state: Mapping[str, Tensor], source: str, where: str = "") -> tuple[dict[str, Tensor], list[str]]:
    """``state`` in megdet's names with the :data:`NAME_MAPS` entry ``source`` (values untouched), and
    the keys dropped on purpose. A key no rule matches is a one-line WeightsError."""
    name_map = NAME_MAPS[source]
    out: dict[str, Tensor] = {}
    ignored, unknown = [], []
    for key, value in state.items():
        if name_map.ignored.fullmatch(key):
            ignored.append(key)
            continue
        new = name_map.rename(key)
        if new is None:
            unknown.append(key)
        elif new in out:
            raise WeightsError(f"{where}two {source} tensors map to {new} (one is {key}); the file is not one model")
        else:
            out[new] = value
    if unknown:
        raise WeightsError(
            f"{where}{len(unknown)} {source} tensor(s) megdet has no counterpart for: {_short(unknown)}"
            " (only R-CNN FPN models with a ResNet body convert)"
        )
    return out, ignored


def _detectron2_class_layout(state: dict[str, Tensor], notes: list[str], where: str) -> None:
    """detectron2's classifier rows (background last) and background-free deltas / mask logits ->
    megdet's (background first)."""
    if f"{CLS_SCORE}.weight" not in state:
        return
    for suffix in ("weight", "bias"):
        key = f"{CLS_SCORE}.{suffix}"
        if key in state:
            w = state[key]
            state[key] = torch.cat([w[-1:], w[:-1]])
    k = state[f"{CLS_SCORE}.weight"].shape[0] - 1
    for prefix, per_class in ((BBOX_PRED, 4), (MASK_LOGITS, 1)):
        for suffix in ("weight", "bias"):
            key = f"{prefix}.{suffix}"
            if key not in state:
                continue
            w = state[key]
            if w.shape[0] != per_class * k:
                raise WeightsError(
                    f"{where}{key} has {w.shape[0]} outputs for {k} classes: class-agnostic "
                    f"{'box regression' if per_class == 4 else 'masks'} do not convert"
                )
            state[key] = torch.cat([w.new_zeros((per_class, *w.shape[1:])), w])
    notes.append("box classifier: background moved from the last row to the first; box deltas and mask "
                 "logits got a zero background entry")  # fmt: skip


def _msra_bn(state: dict[str, Tensor], notes: list[str]) -> None:
    """Caffe2 scale / bias pairs -> BN with mean 0 and variance 1 - eps (the same affine map)."""
    added = 0
    for key in [k for k in state if _BN_WEIGHT.fullmatch(k)]:
        prefix = key[: -len("weight")]
        if prefix + "running_mean" not in state:
            w = state[key]
            state[prefix + "running_mean"] = torch.zeros_like(w)
            state[prefix + "running_var"] = torch.full_like(w, 1.0 - BN_EPS)
            added += 1
    if added:
        notes.append(f"{added} Caffe2 BN scale/bias pairs: running mean 0, running variance 1 - {BN_EPS:g}")


def select_classes(state: dict[str, Tensor], classes: Sequence[int], where: str = "") -> None:
    """Keeps the background and the foreground classes ``classes`` (1-based, megdet's layout, in this
    order) in the classifier, box-delta and mask-logit tensors."""
    k = state[f"{CLS_SCORE}.weight"].shape[0] - 1
    bad = [c for c in classes if not 1 <= c <= k]
    if bad or not classes:
        raise WeightsError(f"{where}classes {_short([str(c) for c in bad]) or '(none)'} not in 1..{k}")
    rows = torch.tensor([0, *classes])
    for prefix, per_class in ((CLS_SCORE, 1), (BBOX_PRED, 4), (MASK_LOGITS, 1)):
        for suffix in ("weight", "bias"):
            key = f"{prefix}.{suffix}"
            if key in state:
                idx = (rows[:, None] * per_class + torch.arange(per_class)).reshape(-1)
                state[key] = state[key][idx].clone()


def convert_state(
    state: Mapping[str, Tensor],
    source: str | None = None,
    *,
    input_format: str | None = None,
    classes: Sequence[int] | None = None,
    where: str = "",
) -> Conversion:
    """Converts a source ``state`` (see the module doc). ``source`` is one of :data:`NAME_MAPS`
    (None: recognised from the keys); ``input_format`` the channel order the source model reads
    ("RGB" | "BGR"; None: BGR for detectron2 and MSRA files, else RGB); ``where`` prefixes messages."""
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    source = source or detect_source(state)
    if source is None:
        raise WeightsError(
            f"{where}not a checkpoint megdet knows (expected megdet, torchvision or detectron2 R-CNN FPN "
            f"weights, or ImageNet ResNet weights); its first keys: {_short(list(state), 3)}"
        )
    check_choice(f"{where}convert_state", source, tuple(NAME_MAPS), "source", WeightsError)
    recorded = _pixel_stats(state) if source == "detectron2" else None
    out, ignored = rename_state(state, source, where)
    conv = Conversion(source, out, NAME_MAPS[source].backbone_only, ignored)
    if source == "detectron2":
        _detectron2_class_layout(out, conv.notes, where)
    if source == "msra-resnet":
        _msra_bn(out, conv.notes)
    fmt = (input_format or ("BGR" if source in SOURCES_BGR else "RGB")).upper()
    if fmt not in ("RGB", "BGR"):
        raise WeightsError(f"{where}input format '{input_format}': expected RGB or BGR")
    first = FIRST_CONV if conv.backbone_only else f"backbone.body.{FIRST_CONV}"
    if fmt == "BGR" and first in out:
        out[first] = out[first].flip(1).contiguous()
        conv.notes.append("first conv: input channels reversed (the source reads BGR images, megdet RGB)")
    if recorded is not None:
        mean, std = recorded
        conv.pixel_stats = (mean[::-1], std[::-1]) if fmt == "BGR" else (mean, std)
    if classes is not None:
        if conv.num_classes() is None:
            raise WeightsError(f"{where}a backbone file has no classes to select")
        total = conv.num_classes()
        select_classes(out, classes, where)
        conv.notes.append(f"classes: kept {len(classes)} of the source's {total} ({_short([str(c) for c in classes], 6)})")
    return conv


def _pixel_stats(state: Mapping[str, Tensor]) -> tuple[list[float], list[float]] | None:
    """detectron2's recorded pixel_mean / pixel_std (0-255 units, the model's channel order) as
    megdet's [0, 1] units, when the file holds them."""
    if "pixel_mean" not in state or "pixel_std" not in state:
        return None
    mean, std = state["pixel_mean"].reshape(-1), state["pixel_std"].reshape(-1)
    if mean.numel() != 3 or std.numel() != 3:
        return None
    return [float(v) / 255 for v in mean], [float(v) / 255 for v in std]
