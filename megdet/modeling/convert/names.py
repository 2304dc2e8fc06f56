"""Explicit name maps from torchvision's, detectron2's and MSRA's (Caffe2) weight names to megdet's.

Every source key is renamed by the first rule whose pattern matches the WHOLE key, or dropped when the
map's ``ignored`` pattern matches it (classifier layers of ImageNet files, BN step counters, buffers
that hold no learnt value); a key that neither matches is an error, never a guess. Nothing depends on
the order of the keys. Value changes that go with a rename (class order, BGR input) are
:mod:`megdet.modeling.convert.convert`'s.

Sources:

- ``torchvision``: ``fasterrcnn / maskrcnn / keypointrcnn_resnet50_fpn`` (v1) state_dicts, current
  names and those of torchvision < 0.13 (``rpn.head.conv.weight``, ``mask_head.mask_fcn1``, FPN convs
  without the ``.0``);
- ``detectron2``: R50-FPN GeneralizedRCNN checkpoints (``backbone.bottom_up.res2.0.conv1.norm.weight``,
  ``proposal_generator.rpn_head.objectness_logits``, ``roi_heads.box_predictor.cls_score``, ...);
- ImageNet ResNets: torchvision's (``layer1.0.conv1.weight``), detectron2's (``res2.0.conv1.weight``)
  and MSRA's Caffe2 names (``res2_0_branch2a_w``, ``res2_0_branch2a_bn_s``) of ``R-50.pkl``;
- ``megdet``: megdet's own names (a checkpoint or a ResNetBody state_dict).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

Rename = Callable[[re.Match[str]], str]

# Caffe2 BN blob suffixes: scale, bias, running mean, running inverse... variance (as detectron2 reads it).
_C2_BN = {"s": "weight", "b": "bias", "rm": "running_mean", "riv": "running_var"}
_C2_CONV = {"a": 1, "b": 2, "c": 3}


def _stage(m: re.Match[str]) -> str:
    """detectron2 / Caffe2 stage ``res2`` .. ``res5`` -> torchvision ``layer1`` .. ``layer4``."""
    return f"layer{int(m['stage']) - 1}.{m['block']}"


def _template(text: str) -> Rename:
    return lambda m: m.expand(text)


@dataclass(frozen=True)
class NameMap:
    """Rules ``(pattern, rename)`` tried in order on each whole key, and the keys dropped on purpose."""

    source: str
    rules: tuple[tuple[re.Pattern[str], Rename], ...]
    ignored: re.Pattern[str]
    backbone_only: bool = False

    def rename(self, key: str) -> str | None:
        """megdet's name for ``key``, or None when no rule matches."""
        for pattern, rename in self.rules:
            m = pattern.fullmatch(key)
            if m is not None:
                return rename(m)
        return None


def _rules(pairs: Iterable[tuple[str, str | Rename]], src_prefix: str = "", dst_prefix: str = "") -> list:
    out = []
    for pattern, rename in pairs:
        fn = _template(rename) if isinstance(rename, str) else rename
        out.append((re.compile(re.escape(src_prefix) + pattern), (lambda f: lambda m: dst_prefix + f(m))(fn)))
    return out


# ---- ResNet bodies, in the names of megdet's ResNetBody (torchvision's, with the stem moved) ---------

TORCHVISION_BODY = [
    (r"(conv1|bn1)\.(\w+)", r"stem.\1.\2"),
    (r"(layer[1-4]\.\d+\.(?:conv[1-3]|bn[1-3]|downsample\.[01])\.\w+)", r"\1"),
]
MEGDET_BODY = [(r"((?:stem|layer[1-4])\..+)", r"\1")]
DETECTRON2_BODY = [
    (r"stem\.conv1\.weight", "stem.conv1.weight"),
    (r"stem\.conv1\.norm\.(\w+)", r"stem.bn1.\1"),
    (r"res(?P<stage>[2-5])\.(?P<block>\d+)\.conv(?P<i>[1-3])\.weight", lambda m: f"{_stage(m)}.conv{m['i']}.weight"),
    (r"res(?P<stage>[2-5])\.(?P<block>\d+)\.conv(?P<i>[1-3])\.norm\.(?P<p>\w+)", lambda m: f"{_stage(m)}.bn{m['i']}.{m['p']}"),
    (r"res(?P<stage>[2-5])\.(?P<block>\d+)\.shortcut\.weight", lambda m: f"{_stage(m)}.downsample.0.weight"),
    (r"res(?P<stage>[2-5])\.(?P<block>\d+)\.shortcut\.norm\.(?P<p>\w+)", lambda m: f"{_stage(m)}.downsample.1.{m['p']}"),
]  # fmt: skip
MSRA_BODY = [
    (r"conv1_w", "stem.conv1.weight"),
    (r"res_conv1_bn_(?P<p>s|b|rm|riv)", lambda m: f"stem.bn1.{_C2_BN[m['p']]}"),
    (r"res(?P<stage>[2-5])_(?P<block>\d+)_branch2(?P<c>[abc])_w", lambda m: f"{_stage(m)}.conv{_C2_CONV[m['c']]}.weight"),
    (r"res(?P<stage>[2-5])_(?P<block>\d+)_branch2(?P<c>[abc])_bn_(?P<p>s|b|rm|riv)",
     lambda m: f"{_stage(m)}.bn{_C2_CONV[m['c']]}.{_C2_BN[m['p']]}"),
    (r"res(?P<stage>[2-5])_(?P<block>\d+)_branch1_w", lambda m: f"{_stage(m)}.downsample.0.weight"),
    (r"res(?P<stage>[2-5])_(?P<block>\d+)_branch1_bn_(?P<p>s|b|rm|riv)", lambda m: f"{_stage(m)}.downsample.1.{_C2_BN[m['p']]}"),
]  # fmt: skip

_BN_COUNTER = r"(?:.+\.)?num_batches_tracked"

# ---- whole detectors, in the names of megdet's GeneralizedRCNN ------------------------------------

TORCHVISION_HEADS = [
    (r"backbone\.fpn\.((?:inner|layer)_blocks\.\d+)\.0\.(weight|bias)", r"backbone.fpn.\1.0.\2"),
    (r"backbone\.fpn\.((?:inner|layer)_blocks\.\d+)\.(weight|bias)", r"backbone.fpn.\1.0.\2"),  # < 0.13
    (r"rpn\.head\.conv\.(\d+)\.0\.(weight|bias)", r"rpn.rpn.head.convs.\1.\2"),
    (r"rpn\.head\.conv\.(weight|bias)", r"rpn.rpn.head.convs.0.\1"),  # torchvision < 0.13
    (r"rpn\.head\.(cls_logits|bbox_pred)\.(weight|bias)", r"rpn.rpn.head.\1.\2"),
    # TwoMLPHead (fc6, fc7) and FastRCNNConvFCHead (a Sequential) keep their own names under .head
    (r"roi_heads\.box_head\.(.+)", r"roi_heads.box_head.head.\1"),
    (r"roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)", r"roi_heads.box_head.predictor.\1.\2"),
    (r"roi_heads\.mask_head\.(\d+)\.0\.(weight|bias)", r"roi_heads.mask_head.convs.\1.0.\2"),
    (r"roi_heads\.mask_head\.mask_fcn(?P<i>\d+)\.(?P<p>weight|bias)",
     lambda m: f"roi_heads.mask_head.convs.{int(m['i']) - 1}.0.{m['p']}"),  # torchvision < 0.13
    (r"roi_heads\.mask_predictor\.(conv5_mask|mask_fcn_logits)\.(weight|bias)", r"roi_heads.mask_head.predictor.\1.\2"),
    # KeypointRCNNHeads is Sequential(conv, relu, conv, relu, ...): the convs are the even entries
    (r"roi_heads\.keypoint_head\.(?P<i>\d*[02468])\.(?P<p>weight|bias)",
     lambda m: f"roi_heads.keypoint_head.convs.{int(m['i']) // 2}.0.{m['p']}"),
    (r"roi_heads\.keypoint_predictor\.kps_score_lowres\.(weight|bias)",
     r"roi_heads.keypoint_head.predictor.kps_score_lowres.\1"),
]  # fmt: skip

DETECTRON2_HEADS = [
    (r"backbone\.fpn_lateral(?P<l>[2-5])\.(?P<p>weight|bias)", lambda m: f"backbone.fpn.inner_blocks.{int(m['l']) - 2}.0.{m['p']}"),
    (r"backbone\.fpn_output(?P<l>[2-5])\.(?P<p>weight|bias)", lambda m: f"backbone.fpn.layer_blocks.{int(m['l']) - 2}.0.{m['p']}"),
    (r"proposal_generator\.rpn_head\.conv\.(weight|bias)", r"rpn.rpn.head.convs.0.\1"),
    (r"proposal_generator\.rpn_head\.conv\.conv(\d+)\.(weight|bias)", r"rpn.rpn.head.convs.\1.\2"),
    (r"proposal_generator\.rpn_head\.objectness_logits\.(weight|bias)", r"rpn.rpn.head.cls_logits.\1"),
    (r"proposal_generator\.rpn_head\.anchor_deltas\.(weight|bias)", r"rpn.rpn.head.bbox_pred.\1"),
    (r"roi_heads\.box_head\.fc1\.(weight|bias)", r"roi_heads.box_head.head.fc6.\1"),
    (r"roi_heads\.box_head\.fc2\.(weight|bias)", r"roi_heads.box_head.head.fc7.\1"),
    (r"roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)", r"roi_heads.box_head.predictor.\1.\2"),
    (r"roi_heads\.mask_head\.mask_fcn(?P<i>\d+)\.(?P<p>weight|bias)",
     lambda m: f"roi_heads.mask_head.convs.{int(m['i']) - 1}.0.{m['p']}"),
    (r"roi_heads\.mask_head\.deconv\.(weight|bias)", r"roi_heads.mask_head.predictor.conv5_mask.\1"),
    (r"roi_heads\.mask_head\.predictor\.(weight|bias)", r"roi_heads.mask_head.predictor.mask_fcn_logits.\1"),
    (r"roi_heads\.keypoint_head\.conv_fcn(?P<i>\d+)\.(?P<p>weight|bias)",
     lambda m: f"roi_heads.keypoint_head.convs.{int(m['i']) - 1}.0.{m['p']}"),
    (r"roi_heads\.keypoint_head\.score_lowres\.(weight|bias)", r"roi_heads.keypoint_head.predictor.kps_score_lowres.\1"),
]  # fmt: skip

NAME_MAPS: dict[str, NameMap] = {
    "megdet": NameMap("megdet", tuple(_rules([(r"(.+)", r"\1")])), re.compile(_BN_COUNTER)),
    "torchvision": NameMap(
        "torchvision",
        tuple(_rules(TORCHVISION_BODY, "backbone.body.", "backbone.body.") + _rules(TORCHVISION_HEADS)),
        re.compile(_BN_COUNTER),
    ),
    "detectron2": NameMap(
        "detectron2",
        tuple(_rules(DETECTRON2_BODY, "backbone.bottom_up.", "backbone.body.") + _rules(DETECTRON2_HEADS)),
        # The normalisation (used for the data config instead) and cached anchors (recomputed).
        re.compile(rf"pixel_mean|pixel_std|proposal_generator\.anchor_generator\.cell_anchors\.\d+|{_BN_COUNTER}"),
    ),
    "megdet-resnet": NameMap("megdet-resnet", tuple(_rules(MEGDET_BODY)), re.compile(_BN_COUNTER), True),
    "torchvision-resnet": NameMap(
        "torchvision-resnet", tuple(_rules(TORCHVISION_BODY)), re.compile(rf"fc\.(weight|bias)|{_BN_COUNTER}"), True
    ),
    "detectron2-resnet": NameMap(
        "detectron2-resnet", tuple(_rules(DETECTRON2_BODY)), re.compile(rf"linear\.(weight|bias)|{_BN_COUNTER}"), True
    ),
    "msra-resnet": NameMap("msra-resnet", tuple(_rules(MSRA_BODY)), re.compile(r"(pred|fc1000)_[wb]"), True),
}

# A source is recognised by keys only it has (checked in this order).
_SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("megdet", ("rpn.rpn.head.cls_logits.weight", "backbone.body.stem.conv1.weight")),
    ("torchvision", ("rpn.head.cls_logits.weight", "backbone.body.conv1.weight")),
    ("detectron2", ("proposal_generator.rpn_head.objectness_logits.weight", "backbone.bottom_up.stem.conv1.weight")),
    ("megdet-resnet", ("stem.conv1.weight", "layer1.0.conv1.weight")),
    ("torchvision-resnet", ("conv1.weight", "layer1.0.conv1.weight")),
    ("detectron2-resnet", ("stem.conv1.weight", "res2.0.conv1.weight")),
    ("msra-resnet", ("conv1_w", "res2_0_branch2a_w")),
)  # fmt: skip


def detect_source(keys: Iterable[str]) -> str | None:
    """The :data:`NAME_MAPS` entry whose signature keys ``keys`` has (any one of a detector's two keys,
    both of a backbone's), or None."""
    present = set(keys)
    for source, signature in _SIGNATURES:
        needed = any if source in ("megdet", "torchvision", "detectron2") else all
        if needed(k in present for k in signature):
            return source
    return None
