"""RoI heads: boxes, masks and keypoints as three small modules, composed by :class:`RoIHeads`.

torchvision's ``RoIHeads`` runs all three tasks in one monolithic forward; TTA and ensembles need
each stage alone (boxes for given proposals, masks / keypoints for given boxes), so the heads here
are separate modules with public stage methods. They reuse torchvision's head / predictor layers,
BoxCoder for inference and its Mask R-CNN loss. Training follows torchvision's matching, sampling
and Fast R-CNN / Keypoint R-CNN losses value for value, on padded per-image tensors
(:mod:`megdet.modeling.box_ops`): the RoI heads read one small tensor of counts on the host per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import heatmaps_to_keypoints as _tv_heatmaps_to_keypoints
from torchvision.models.detection.roi_heads import maskrcnn_loss
from torchvision.ops import (
    Conv2dNormActivation,
    batched_nms,
    clip_boxes_to_image,
    remove_small_boxes,
)

from megdet.config import BOX_HEADS, ModelConfig, check_choice
from megdet.layers.norm import norm_layer_or_none
from megdet.layers.recompute import RecomputeStage
from megdet.modeling.backbone import head_norm_of
from megdet.modeling.box_ops import (
    Proposals,
    encode,
    gather_rows,
    masked_mean,
    match,
    pad_boxes,
    pad_values,
    pairwise_iou,
    random_first,
    sample_balanced,
)
from megdet.modeling.poolers import MultiLevelPooler
from megdet.modeling.semantic import RoIContext, SemanticContext

# The pooled levels P2..P5 (P6 only feeds the RPN).
POOLER_SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)

ImageSizes = Sequence[Sequence[int]]


def _pooled_head_arguments(cfg: ModelConfig, in_channels: int, scales: Sequence[float]) -> dict[str, Any]:
    """The keyword arguments every RoI head takes alike: its input (``in_channels`` at ``scales``), how it
    pools (``model.roi.pooler``, ``sampling_ratio``, ``aligned``) and its norm (``model.head_norm``)."""
    roi = cfg.roi
    return {
        "in_channels": in_channels,
        "scales": scales,
        "pooler_type": roi.pooler,
        "sampling_ratio": roi.sampling_ratio,
        "aligned": roi.aligned,
        "norm": head_norm_of(cfg),
    }


def _make_pooler(
    pool_size: int, scales: Sequence[float], sampling_ratio: int, pooler_type: str, aligned: bool = True
) -> nn.Module:
    return MultiLevelPooler(
        pool_size, list(scales), sampling_ratio=sampling_ratio, pooler_type=pooler_type, aligned=aligned
    )


def _split(x: Tensor, boxes: Sequence[Tensor]) -> list[Tensor]:
    return list(x.split([len(b) for b in boxes], dim=0))


@dataclass
class RoISamples:
    """The RoIs sampled for one training step, per image."""

    proposals: list[Tensor]  # (Ri, 4) sampled proposals (the GT boxes took part as proposals)
    labels: list[Tensor]  # (Ri,) int64: 0 background, 1..num_classes foreground
    matched_idxs: list[Tensor]  # (Ri,) index of the matched GT box (0 for background RoIs)
    regression_targets: list[Tensor]  # (Ri, 4) encoded deltas towards the matched GT box (0 for background)

    def positives(self) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: the foreground RoIs and the index of their GT box."""
        keep = [torch.where(lab > 0)[0] for lab in self.labels]
        return (
            [p[k] for p, k in zip(self.proposals, keep)],
            [m[k] for m, k in zip(self.matched_idxs, keep)],
        )


@dataclass
class PaddedRoISamples:
    """The sampled RoIs of a batch, padded to (B, S, ...): the fields of :class:`RoISamples`, plus
    ``valid`` (B, S) with each image's sampled RoIs first (-1 labels in the unused slots)."""

    proposals: Tensor
    labels: Tensor
    matched_idxs: Tensor
    regression_targets: Tensor
    valid: Tensor

    def select(self, counts: Sequence[int]) -> RoISamples:
        """The first ``counts[i]`` slots of image i (the number of valid ones, read on the host)."""
        fields = (self.proposals, self.labels, self.matched_idxs, self.regression_targets)
        return RoISamples(*([x[:n] for x, n in zip(f, counts)] for f in fields))


def _labelled_keypoints(targets: list[dict[str, Tensor]]) -> Tensor:
    """(B, G) bool, padded: whether each GT instance has at least one labelled keypoint (v > 0)."""
    flags = [
        (t["keypoints"][..., 2] > 0).any(dim=1)
        if t["keypoints"].numel()
        else torch.zeros(len(t["boxes"]), dtype=torch.bool, device=t["boxes"].device)
        for t in targets
    ]
    return pad_values(flags, False)


class BoxHead(nn.Module):
    """Box classification + class-specific regression on pooled P2..P5 features.

    ``head_type`` "2fc": two fully connected layers (``fc_dim``); "4conv1fc": ``num_convs`` 3x3 convs
    (``conv_dim``, with ``norm``) then one fc. Training samples ``batch_size_per_image`` RoIs per
    image (``positive_fraction`` foreground, GT boxes added to the proposals); inference decodes,
    clips, drops scores <= ``score_thresh``, runs NMS per class and keeps ``detections_per_img``.
    ``context``: the semantic context it takes in (:class:`~megdet.modeling.semantic.RoIContext`), if any.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        head_type: str = "2fc",
        fc_dim: int = 1024,
        conv_dim: int = 256,
        num_convs: int = 4,
        pool_size: int = 7,
        pooler_type: str = "roialign",
        sampling_ratio: int = 2,
        aligned: bool = True,
        scales: Sequence[float] = POOLER_SCALES,
        norm: str = "none",
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        bbox_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        context: RoIContext | None = None,
    ) -> None:
        super().__init__()
        check_choice("BoxHead", head_type, BOX_HEADS, "head_type")
        if len(bbox_reg_weights) != 4:
            raise ValueError(f"BoxHead: bbox_reg_weights must be 4 numbers, got {list(bbox_reg_weights)}")
        self.num_classes = num_classes
        self.num_levels = len(scales)
        self.pooler = _make_pooler(pool_size, scales, sampling_ratio, pooler_type, aligned)
        if head_type == "2fc":
            self.head: nn.Module = TwoMLPHead(in_channels * pool_size**2, fc_dim)
        else:
            self.head = FastRCNNConvFCHead(
                (in_channels, pool_size, pool_size),
                [conv_dim] * num_convs,
                [fc_dim],
                norm_layer_or_none(norm),
            )
        self.predictor = FastRCNNPredictor(fc_dim, num_classes + 1)  # + background
        self.context = context
        # Small initial logits / deltas: training from scratch starts near uniform and unmoved boxes.
        nn.init.normal_(self.predictor.cls_score.weight, std=0.01)
        nn.init.normal_(self.predictor.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.predictor.cls_score.bias)
        nn.init.zeros_(self.predictor.bbox_pred.bias)

        if bg_iou_thresh > fg_iou_thresh:
            raise ValueError(f"BoxHead: bg_iou_thresh {bg_iou_thresh} > fg_iou_thresh {fg_iou_thresh}")
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.box_coder = det_utils.BoxCoder(tuple(float(w) for w in bbox_reg_weights))
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img

    @classmethod
    def from_config(
        cls, cfg: ModelConfig, *, in_channels: int, scales: Sequence[float], context: RoIContext | None = None
    ) -> BoxHead:
        """The box head of ``model.*`` on features of ``in_channels`` channels at ``scales``."""
        roi = cfg.roi
        return cls(
            **_pooled_head_arguments(cfg, in_channels, scales),
            num_classes=cfg.num_classes,
            head_type=roi.box_head,
            fc_dim=roi.box_head_dim,
            conv_dim=roi.box_conv_dim,
            pool_size=roi.box_pool_size,
            context=context,
            fg_iou_thresh=roi.fg_iou_thresh,
            bg_iou_thresh=roi.bg_iou_thresh,
            batch_size_per_image=roi.batch_size_per_image,
            positive_fraction=roi.positive_fraction,
            bbox_reg_weights=list(roi.bbox_reg_weights),
            score_thresh=roi.score_thresh,
            nms_thresh=roi.nms_thresh,
            detections_per_img=roi.detections_per_img,
        )

    @torch.no_grad()
    def sample(self, proposals: list[Tensor] | Proposals, targets: list[dict[str, Tensor]]) -> RoISamples:
        """Matches proposals (+ the GT boxes) to GT and samples the training RoIs of each image."""
        padded = self.sample_padded(proposals, targets)
        return padded.select(padded.valid.sum(dim=1).tolist())

    @torch.no_grad()
    def sample_padded(
        self, proposals: list[Tensor] | Proposals, targets: list[dict[str, Tensor]]
    ) -> PaddedRoISamples:
        """:meth:`sample` without reading anything on the host: (B, S) slots, S the sampling budget.

        torchvision's rules: the GT boxes join the proposals, IoU >= ``fg_iou_thresh`` is foreground,
        below ``bg_iou_thresh`` background; ``batch_size_per_image`` RoIs, at most
        ``positive_fraction`` of them foreground, each set a uniform random subset.
        """
        if not isinstance(proposals, Proposals):
            proposals = Proposals.from_list(list(proposals))
        gt, gt_valid = pad_boxes([t["boxes"].to(proposals.boxes.dtype) for t in targets])
        boxes = torch.cat([proposals.boxes, gt], dim=1)  # every object gets at least one positive RoI
        valid = torch.cat([proposals.valid, gt_valid], dim=1)
        if gt.shape[1] == 0:  # no object in the whole batch
            gt = boxes.new_zeros((len(targets), 1, 4))
            matches = torch.full(valid.shape, -1, dtype=torch.int64, device=valid.device)
            labels = torch.zeros_like(matches)
        else:
            matches = match(pairwise_iou(gt, boxes), gt_valid, self.fg_iou_thresh, self.bg_iou_thresh)
            gt_labels = pad_values([t["labels"].to(torch.int64) for t in targets], 0)
            labels = torch.where(matches >= 0, gt_labels.gather(1, matches.clamp(min=0)), 0)
        # Between the thresholds, or padding: never sampled.
        labels = torch.where((matches == -2) | ~valid, -1, labels)
        idx, sampled = sample_balanced(labels, self.batch_size_per_image, self.positive_fraction)
        labels = torch.where(sampled, labels.gather(1, idx), -1)
        matched = matches.gather(1, idx).clamp(min=0)
        rois = gather_rows(boxes, idx)
        regression = encode(gather_rows(gt, matched), rois, self.box_coder.weights)
        regression = torch.where((labels > 0)[..., None], regression, 0.0)
        return PaddedRoISamples(rois, labels, matched, regression, sampled)

    def forward(
        self,
        features: list[Tensor],
        boxes: list[Tensor],
        level_counts: Sequence[int] | None = None,
        context: SemanticContext | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Class logits (R, C+1) and per-class box deltas (R, (C+1)*4) for all images' boxes, float32.

        ``level_counts``: see :meth:`MultiLevelPooler.forward`; ``context``: the model's semantic
        context, required when the head takes one."""
        x = self.pooler(features[: self.num_levels], boxes, level_counts)
        if self.context is not None:
            x = self.context.add_roi_features(x, context, boxes)
        representation = self.head(x)
        if self.context is not None:
            representation = self.context.add_global(representation, context, boxes)
        logits, deltas = self.predictor(representation)
        return logits.float(), deltas.float()

    def loss(self, logits: Tensor, deltas: Tensor, samples: RoISamples) -> dict[str, Tensor]:
        """Cross-entropy over the sampled RoIs (mean) and smooth-L1 (beta 1/9) of each foreground RoI's
        own-class deltas, summed and divided by the number of RoIs (torchvision's ``fastrcnn_loss``)."""
        labels = torch.cat(samples.labels)
        targets = torch.cat(samples.regression_targets)
        loss_cls = F.cross_entropy(logits, labels)
        n = logits.shape[0]
        own = deltas.reshape(n, -1, 4)[torch.arange(n, device=labels.device), labels]
        box = F.smooth_l1_loss(own, targets, beta=1 / 9, reduction="none").sum(dim=1)
        loss_box = torch.where(labels > 0, box, 0.0).sum() / labels.numel()
        return {"loss_classifier": loss_cls, "loss_box_reg": loss_box}

    @torch.no_grad()
    def postprocess(
        self, logits: Tensor, deltas: Tensor, proposals: list[Tensor], image_sizes: ImageSizes
    ) -> list[dict[str, Tensor]]:
        """Final detections per image: ``boxes`` (N, 4), ``scores`` (N,), ``labels`` (N,) in 1..C."""
        num_fg = logits.shape[1] - 1
        boxes_all = self.box_coder.decode(deltas, proposals)  # (R, C+1, 4)
        probs_all = F.softmax(logits, dim=-1)
        results = []
        for boxes, probs, size in zip(
            _split(boxes_all, proposals), _split(probs_all, proposals), image_sizes
        ):
            boxes = clip_boxes_to_image(boxes, (int(size[0]), int(size[1])))[:, 1:].reshape(-1, 4)
            scores = probs[:, 1:].reshape(-1)
            labels = torch.arange(1, num_fg + 1, device=logits.device).repeat(len(probs))
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results


class MaskHead(nn.Module):
    """FCN mask head: ``num_convs`` 3x3 convs (+ norm), a 2x deconv and a 1x1 predictor per class.

    Outputs (R, C+1, 2*pool_size, 2*pool_size) logits; training uses torchvision's ``maskrcnn_loss``
    (GT masks cropped to each RoI with RoIAlign, binary cross-entropy on the RoI's own class).
    ``context``: the semantic context it takes in (:class:`~megdet.modeling.semantic.RoIContext`), if any.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        num_convs: int = 4,
        conv_dim: int = 256,
        pool_size: int = 14,
        pooler_type: str = "roialign",
        sampling_ratio: int = 2,
        aligned: bool = True,
        scales: Sequence[float] = POOLER_SCALES,
        norm: str = "none",
        context: RoIContext | None = None,
    ) -> None:
        super().__init__()
        self.num_levels = len(scales)
        self.context = context
        self.pooler = _make_pooler(pool_size, scales, sampling_ratio, pooler_type, aligned)
        self.convs = MaskRCNNHeads(in_channels, [conv_dim] * num_convs, 1, norm_layer_or_none(norm))
        width = conv_dim if num_convs > 0 else in_channels
        self.predictor = MaskRCNNPredictor(width, conv_dim, num_classes + 1)
        self.mask_size = 2 * pool_size

    @classmethod
    def from_config(
        cls, cfg: ModelConfig, *, in_channels: int, scales: Sequence[float], context: RoIContext | None = None
    ) -> MaskHead:
        """The mask head of ``model.*`` on features of ``in_channels`` channels at ``scales``."""
        roi = cfg.roi
        return cls(
            **_pooled_head_arguments(cfg, in_channels, scales),
            num_classes=cfg.num_classes,
            num_convs=roi.mask_head_convs,
            conv_dim=roi.mask_head_dim,
            pool_size=roi.mask_pool_size,
            context=context,
        )

    def forward(
        self,
        features: list[Tensor],
        boxes: list[Tensor],
        level_counts: Sequence[int] | None = None,
        context: SemanticContext | None = None,
    ) -> Tensor:
        x = self.pooler(features[: self.num_levels], boxes, level_counts)
        if self.context is not None:
            x = self.context.add_roi_features(x, context, boxes)
        return self.predictor(self.convs(x)).float().contiguous()

    def loss(
        self,
        logits: Tensor,
        boxes: list[Tensor],
        matched_idxs: list[Tensor],
        targets: list[dict[str, Tensor]],
    ) -> Tensor:
        gt_masks = [t["masks"] for t in targets]
        gt_labels = [t["labels"] for t in targets]
        return maskrcnn_loss(logits, boxes, gt_masks, gt_labels, matched_idxs)

    @staticmethod
    def probs(logits: Tensor, labels: list[Tensor]) -> list[Tensor]:
        """Per image (N, M, M) sigmoid probabilities of each box's own label."""
        flat = torch.cat(labels) if labels else logits.new_zeros((0,), dtype=torch.int64)
        idx = torch.arange(len(flat), device=logits.device)
        return _split(logits[idx, flat].sigmoid(), labels)


class KeypointHead(nn.Module):
    """``num_convs`` 3x3 convs (+ norm), a 2x deconv and a 2x bilinear upsample: K heatmaps.

    With ``pool_size`` 14 the heatmaps are 56x56. Our conv stack instead of torchvision's
    ``KeypointRCNNHeads`` because that one has no norm argument; the predictor is torchvision's.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_keypoints: int = 17,
        num_convs: int = 8,
        conv_dim: int = 512,
        pool_size: int = 14,
        pooler_type: str = "roialign",
        sampling_ratio: int = 2,
        aligned: bool = True,
        scales: Sequence[float] = POOLER_SCALES,
        norm: str = "none",
        loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if not loss_weight >= 0:
            raise ValueError(f"KeypointHead: loss_weight must be a number >= 0, got {loss_weight}")
        self.num_levels = len(scales)
        self.num_keypoints = num_keypoints
        self.loss_weight = loss_weight
        self.pooler = _make_pooler(pool_size, scales, sampling_ratio, pooler_type, aligned)
        norm_layer = norm_layer_or_none(norm)
        layers: list[nn.Module] = []
        width = in_channels
        for _ in range(num_convs):
            layers.append(Conv2dNormActivation(width, conv_dim, kernel_size=3, norm_layer=norm_layer))
            width = conv_dim
        self.convs = nn.Sequential(*layers)
        for m in self.convs.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.predictor = KeypointRCNNPredictor(width, num_keypoints)
        self.heatmap_size = 4 * pool_size

    @classmethod
    def from_config(cls, cfg: ModelConfig, *, in_channels: int, scales: Sequence[float]) -> KeypointHead:
        """The keypoint head of ``model.*`` on features of ``in_channels`` channels at ``scales``."""
        roi = cfg.roi
        return cls(
            **_pooled_head_arguments(cfg, in_channels, scales),
            num_keypoints=cfg.num_keypoints,
            num_convs=roi.keypoint_head_convs,
            conv_dim=roi.keypoint_head_dim,
            pool_size=roi.keypoint_pool_size,
            loss_weight=roi.keypoint_loss_weight,
        )

    def forward(
        self, features: list[Tensor], boxes: list[Tensor], level_counts: Sequence[int] | None = None
    ) -> Tensor:
        x = self.pooler(features[: self.num_levels], boxes, level_counts)
        # contiguous: with channels-last weights the maps come out NHWC, and torchvision's loss uses .view
        return self.predictor(self.convs(x)).float().contiguous()

    def loss(
        self,
        logits: Tensor,
        boxes: list[Tensor],
        matched_idxs: list[Tensor],
        targets: list[dict[str, Tensor]],
    ) -> Tensor:
        """torchvision's softmax-over-the-heatmap loss, averaged over the labelled keypoints (v > 0)
        that fall inside their RoI, times ``loss_weight``; 0 (finite, attached to the graph) when
        there are none."""
        n, k, h, w = logits.shape
        if h != w:
            raise ValueError(f"keypoint heatmaps must be square, got {h}x{w}")
        kps = torch.cat([t["keypoints"][m] for t, m in zip(targets, matched_idxs)])
        heat, valid = keypoints_to_heatmap(kps, torch.cat(boxes), h)
        ce = F.cross_entropy(logits.reshape(n * k, h * w), heat.reshape(-1), reduction="none")
        return self.loss_weight * masked_mean(ce, valid.reshape(-1))


def keypoints_to_heatmap(keypoints: Tensor, rois: Tensor, heatmap_size: int) -> tuple[Tensor, Tensor]:
    """torchvision's ``keypoints_to_heatmap`` without boolean-mask writes: for keypoints (N, K, 3) of
    RoIs (N, 4), the flat heatmap index of each (0 where invalid) and whether it is labelled (v > 0)
    and inside the RoI's heatmap."""
    x0, y0 = rois[:, 0, None], rois[:, 1, None]
    scale_x = heatmap_size / (rois[:, 2] - rois[:, 0])[:, None]
    scale_y = heatmap_size / (rois[:, 3] - rois[:, 1])[:, None]
    x, y = keypoints[..., 0], keypoints[..., 1]
    # A keypoint exactly on the RoI's right / bottom edge goes to the last heatmap cell.
    on_x_edge = x == rois[:, 2, None]
    on_y_edge = y == rois[:, 3, None]
    x = torch.where(on_x_edge, heatmap_size - 1, ((x - x0) * scale_x).floor().long())
    y = torch.where(on_y_edge, heatmap_size - 1, ((y - y0) * scale_y).floor().long())
    valid = (x >= 0) & (y >= 0) & (x < heatmap_size) & (y < heatmap_size) & (keypoints[..., 2] > 0)
    return (y * heatmap_size + x) * valid, valid


def heatmaps_to_keypoints(heatmaps: Tensor, boxes: Tensor) -> Tensor:
    """(N, K, S, S) heatmap logits of N boxes (N, 4) -> (N, K, 3) keypoints as image x, y, score.

    The location is the heatmap's arg-max after a bicubic resize to the box size (torchvision's
    ``heatmaps_to_keypoints``); the score is the logit there.
    """
    if len(boxes) == 0:
        return heatmaps.new_zeros((0, heatmaps.shape[1], 3), dtype=torch.float32)
    xy, scores = _tv_heatmaps_to_keypoints(heatmaps.float(), boxes.float())
    xy = xy.clone()
    xy[..., 2] = scores
    return xy


class RoIHeads(nn.Module):
    """The box head, plus an optional mask head and keypoint head, over shared pyramid features.

    Training: ``forward(features, proposals, image_sizes, targets) -> ([], losses)``. The mask head
    trains on the foreground RoIs; the keypoint head only on foreground RoIs whose matched GT
    instance has at least one labelled keypoint (in the data, only persons carry keypoints).
    ``max_mask_keypoint_rois`` > 0 caps each of those two RoI sets per image at a random subset.
    Eval: ``-> (detections, {})`` with per image ``boxes``, ``scores``, ``labels`` and, when the heads
    are on, ``mask_probs`` (N, M, M) in each box's frame and ``keypoints`` (N, K, 3), all in the
    coordinates of ``image_sizes``. ``context`` (every method): the model's semantic context, passed on
    to the box and mask heads (those built with a :class:`~megdet.modeling.semantic.RoIContext` need it).
    """

    def __init__(
        self,
        box_head: BoxHead,
        mask_head: MaskHead | None = None,
        keypoint_head: KeypointHead | None = None,
        max_mask_keypoint_rois: int = 0,
    ) -> None:
        super().__init__()
        if max_mask_keypoint_rois < 0:
            raise ValueError(
                f"RoIHeads: max_mask_keypoint_rois must be 0 (all) or a positive count, got {max_mask_keypoint_rois}"
            )
        self.box_head = box_head
        self.mask_head = mask_head
        self.keypoint_head = keypoint_head
        self.max_mask_keypoint_rois = max_mask_keypoint_rois

    @classmethod
    def from_config(
        cls,
        cfg: ModelConfig,
        *,
        in_channels: int,
        scales: Sequence[float],
        box_context: RoIContext | None = None,
        mask_context: RoIContext | None = None,
    ) -> RoIHeads:
        """The box head and, when ``model.mask_on`` / ``model.keypoint_on``, the mask / keypoint head;
        the box and mask heads take the semantic context given (``semantic_parts_from_config``)."""
        box_head = BoxHead.from_config(cfg, in_channels=in_channels, scales=scales, context=box_context)
        mask_head = (
            MaskHead.from_config(cfg, in_channels=in_channels, scales=scales, context=mask_context)
            if cfg.mask_on
            else None
        )
        keypoint_head = (
            KeypointHead.from_config(cfg, in_channels=in_channels, scales=scales) if cfg.keypoint_on else None
        )
        return cls(box_head, mask_head, keypoint_head, cfg.roi.max_mask_keypoint_rois)

    def recompute_stages(self) -> list[RecomputeStage]:
        """What sublinear memory may recompute (names relative to this module): each head's tower, the
        conv / fc stack between its pooler and its predictor, whose layers "blocks" recomputes alone."""
        towers = ["box_head.head"]
        towers += ["mask_head.convs"] if self.mask_head is not None else []
        towers += ["keypoint_head.convs"] if self.keypoint_head is not None else []
        return [RecomputeStage(name, blocks=True) for name in towers]

    def _choose(
        self, samples: PaddedRoISamples, targets: list[dict[str, Tensor]]
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """The mask and keypoint heads' RoIs among the sampled slots, chosen on the device: per head an
        order of the (B, S) slots with its RoIs first, and how many to take per image (B,).

        The mask head takes the foreground RoIs, the keypoint head those whose GT instance has a
        labelled keypoint; ``max_mask_keypoint_rois`` > 0 keeps a uniform random subset of each set,
        drawn independently. The foreground RoIs of one object overlap heavily (IoU >= 0.5) while
        the heads' cost follows the RoI count, so a small cap saves most of it.
        """
        cap = self.max_mask_keypoint_rois
        foreground = samples.valid & (samples.labels > 0)
        chosen = {}
        if self.mask_head is not None:
            chosen["mask"] = random_first(foreground, cap)
        if self.keypoint_head is not None:
            labelled = _labelled_keypoints(targets)
            if labelled.shape[1] == 0:  # no object in the whole batch
                labelled = torch.zeros_like(foreground)
            else:
                labelled = labelled.gather(1, samples.matched_idxs)
            chosen["keypoint"] = random_first(foreground & labelled, cap)
        return chosen

    def _read_counts(
        self, samples: PaddedRoISamples, chosen: dict[str, tuple[Tensor, Tensor]]
    ) -> list[list[int]]:
        """The RoI heads' one host sync per step, for every count the heads need, in one small tensor:
        ``[sampled RoIs per image, their RoIs per pooler level]`` and the same pair for each chosen
        set (mask, keypoint) in order."""
        pooler = self.box_head.pooler
        levels = pooler.levels(samples.proposals)
        parts = [samples.valid.sum(dim=1), pooler.count_levels(levels, samples.valid)]
        rank = torch.arange(samples.valid.shape[1], device=samples.valid.device)
        for name, (order, count) in chosen.items():
            pooler = getattr(self, f"{name}_head").pooler
            levels = pooler.levels(gather_rows(samples.proposals, order))
            parts += [count, pooler.count_levels(levels, rank < count[:, None])]
        values = torch.cat(parts).tolist()
        out, start = [], 0
        for part in parts:
            out.append(values[start : start + len(part)])
            start += len(part)
        return out

    def _check_targets(self, targets: list[dict[str, Tensor]] | None) -> list[dict[str, Tensor]]:
        if targets is None:
            raise ValueError(
                "RoIHeads: targets are required in training mode (call model.eval() for inference)"
            )
        needed = ["boxes", "labels"]
        needed += ["masks"] if self.mask_head is not None else []
        needed += ["keypoints"] if self.keypoint_head is not None else []
        for i, t in enumerate(targets):
            for key in needed:
                if key not in t:
                    raise ValueError(f"targets[{i}] has no '{key}' (needed by the configured heads)")
        return targets

    def forward(
        self,
        features: list[Tensor],
        proposals: list[Tensor] | Proposals,
        image_sizes: ImageSizes,
        targets: list[dict[str, Tensor]] | None = None,
        context: SemanticContext | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if not self.training:
            if isinstance(proposals, Proposals):
                proposals = proposals.to_list()
            return self.predict(features, proposals, image_sizes, context), {}
        targets = self._check_targets(targets)
        padded = self.box_head.sample_padded(proposals, targets)
        chosen = self._choose(padded, targets)
        counts = self._read_counts(padded, chosen)
        samples = padded.select(counts[0])
        logits, deltas = self.box_head(features, samples.proposals, level_counts=counts[1], context=context)
        losses = self.box_head.loss(logits, deltas, samples)
        # The mask / keypoint heads run even on zero RoIs: a cross-device BN inside them must take
        # part in its collectives on every device, and every parameter gets a (zero) gradient.
        for i, (name, (order, _)) in enumerate(chosen.items()):
            per_image, level_counts = counts[2 + 2 * i], counts[3 + 2 * i]
            keep = [o[:n] for o, n in zip(order, per_image)]
            boxes = [p[k] for p, k in zip(padded.proposals, keep)]
            matched = [m[k] for m, k in zip(padded.matched_idxs, keep)]
            head = getattr(self, f"{name}_head")
            extra = {"context": context} if name == "mask" else {}
            head_logits = head(features, boxes, level_counts=level_counts, **extra)
            losses[f"loss_{name}"] = head.loss(head_logits, boxes, matched, targets)
        return [], losses

    @torch.no_grad()
    def predict(
        self,
        features: list[Tensor],
        proposals: list[Tensor],
        image_sizes: ImageSizes,
        context: SemanticContext | None = None,
    ) -> list[dict[str, Tensor]]:
        """Boxes, then masks and keypoints for the detected boxes (the eval forward)."""
        detections = self.detect_boxes(features, proposals, image_sizes, context)
        boxes = [d["boxes"] for d in detections]
        if self.mask_head is not None:
            for d, probs in zip(
                detections, self.mask_probs(features, boxes, [d["labels"] for d in detections], context)
            ):
                d["mask_probs"] = probs
        if self.keypoint_head is not None:
            for d, heat, b in zip(detections, self.keypoint_heatmaps(features, boxes), boxes):
                d["keypoints"] = heatmaps_to_keypoints(heat, b)
        return detections

    def detect_boxes(
        self,
        features: list[Tensor],
        proposals: list[Tensor],
        image_sizes: ImageSizes,
        context: SemanticContext | None = None,
    ) -> list[dict[str, Tensor]]:
        """Per image ``boxes`` (N, 4), ``scores`` (N,), ``labels`` (N,) for the given proposals."""
        logits, deltas = self.box_head(features, proposals, context=context)
        return self.box_head.postprocess(logits, deltas, proposals, image_sizes)

    def mask_probs(
        self,
        features: list[Tensor],
        boxes: list[Tensor],
        labels: list[Tensor],
        context: SemanticContext | None = None,
    ) -> list[Tensor]:
        """Per image (N, M, M) mask probabilities (box frame) of each box's own label."""
        if self.mask_head is None:
            raise ValueError("mask_probs: this model has no mask head (model.mask_on is false)")
        return MaskHead.probs(self.mask_head(features, boxes, context=context), labels)

    def keypoint_heatmaps(self, features: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """Per image (N, K, S, S) keypoint heatmap logits for the given boxes."""
        if self.keypoint_head is None:
            raise ValueError(
                "keypoint_heatmaps: this model has no keypoint head (model.keypoint_on is false)"
            )
        return _split(self.keypoint_head(features, boxes), boxes)
