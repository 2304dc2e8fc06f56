"""The FPN R-CNN detector (Faster / Mask / Keypoint R-CNN), its construction from the config, and
loading a state dict into it.

Unlike torchvision's ``GeneralizedRCNN`` there is no transform inside the model: the data pipeline
already resized, normalised and padded the images (``Batch`` in docs/ARCHITECTURE.md), so the
model only maps predictions back to the original image sizes when asked to.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import paste_masks_in_image

from megdet.config import Config
from megdet.layers.cross_device_bn import CrossDeviceBatchNorm2d
from megdet.layers.recompute import RecomputeStage
from megdet.modeling.backbone import ResNetFPN
from megdet.modeling.roi_heads import RoIHeads
from megdet.modeling.rpn import RPN
from megdet.modeling.semantic import SemanticBranch, SemanticContext, semantic_parts_from_config

ImageSizes = Sequence[Sequence[int]]


class GeneralizedRCNN(nn.Module):
    """Backbone (+FPN) -> RPN -> RoI heads.

    ``forward(images, image_sizes, targets=None, original_sizes=None)``:
    training returns a dict of scalar losses (``loss_objectness``, ``loss_rpn_box_reg``,
    ``loss_classifier``, ``loss_box_reg``, plus ``loss_mask`` / ``loss_keypoint`` when on); eval
    returns per image ``boxes`` (N, 4), ``scores``, ``labels`` and, when on, ``masks``
    (N, 1, H, W float probabilities pasted into the image) and ``keypoints`` (N, K, 3: x, y, score),
    in ``original_sizes`` coordinates when given, else in the resized image's.

    ``semantic_branch`` (MegDet's "+Context/Seg", :mod:`megdet.modeling.semantic`): trains on each
    target's ``sem_seg`` map (``loss_sem_seg``), gives its context to the RoI heads that take one, and
    adds ``sem_seg`` (H, W) int64 class ids to every eval output.

    ``channels_last`` stores every conv weight in NHWC order; convolutions then produce NHWC
    activations from the first layer on, whatever the input's layout. Results are the same up to
    float rounding and state_dicts do not change. Off by default: on CPU (oneDNN) a training step is
    slower in NHWC, whose backward loses more than its forward gains (BENCHMARKS.md); the trainer turns
    it on for mixed precision on GPUs (``train.channels_last``).
    """

    def __init__(
        self,
        backbone: ResNetFPN,
        rpn: RPN,
        roi_heads: RoIHeads,
        num_classes: int,
        channels_last: bool = False,
        semantic_branch: SemanticBranch | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.semantic_branch = semantic_branch
        self.num_classes = num_classes
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, cfg: Config, channels_last: bool = False) -> GeneralizedRCNN:
        """The freshly initialised detector of ``cfg.model`` (validated first: one-line ConfigErrors), each
        part built by its own ``from_config`` (:func:`build_model` also loads ``model.weights``).
        Cross-device BN layers get ``model.bn_group_size`` and ``model.bn_group_images`` (:func:`set_bn_groups`)."""
        cfg.validate_model()
        m = cfg.model
        backbone = ResNetFPN.from_config(m)
        c = backbone.out_channels
        rpn = RPN.from_config(m, in_channels=c, strides=backbone.strides)
        scales = [1.0 / s for s in backbone.strides[:4]]  # heads pool from P2..P5
        semantic, box_context, mask_context = semantic_parts_from_config(m, in_channels=c)
        roi_heads = RoIHeads.from_config(
            m, in_channels=c, scales=scales, box_context=box_context, mask_context=mask_context
        )
        model = cls(backbone, rpn, roi_heads, m.num_classes, channels_last=channels_last, semantic_branch=semantic)
        local_groups = cfg.data.images_per_device // m.bn_group_images if m.bn_group_images > 0 else 1
        set_bn_groups(model, m.bn_group_size or None, local_groups)
        return model

    def recompute_stages(self) -> list[RecomputeStage]:
        """The blocks sublinear memory may recompute (for :func:`~megdet.layers.recompute.recompute_names`):
        the backbone's, the RoI heads' and the semantic branch's."""
        parts = [("backbone.", self.backbone), ("roi_heads.", self.roi_heads), ("semantic_branch.", self.semantic_branch)]
        return [s.prefixed(prefix) for prefix, part in parts if part is not None for s in part.recompute_stages()]

    @property
    def device(self) -> torch.device:
        """Where the parameters are (CPU for a model without any)."""
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def rpn_proposals(self, images: Tensor, image_sizes: ImageSizes, features: list[Tensor]) -> list[Tensor]:
        """Inference proposals (one (Ni, 4) tensor per image) from already computed features."""
        if self.training:
            raise ValueError("rpn_proposals: call model.eval() first (training proposals need targets)")
        proposals, _ = self.rpn(images, image_sizes, features)
        return proposals

    def semantic_context(self, features: list[Tensor], image_sizes: ImageSizes) -> SemanticContext | None:
        """The semantic branch's output for already computed features (None without the branch)."""
        return self.semantic_branch(features, image_sizes) if self.semantic_branch is not None else None

    def forward(
        self,
        images: Tensor,
        image_sizes: ImageSizes,
        targets: list[dict[str, Tensor]] | None = None,
        original_sizes: ImageSizes | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if len(image_sizes) != len(images):
            raise ValueError(f"GeneralizedRCNN: {len(images)} images but {len(image_sizes)} image_sizes")
        if self.training:
            if targets is None or len(targets) != len(images):
                got = "none" if targets is None else len(targets)
                raise ValueError(f"GeneralizedRCNN: training needs one target dict per image, got {got}")
            features = self.backbone(images)
            context = self.semantic_context(features, image_sizes)
            # Padded proposals: the per-image counts stay on the device.
            proposals, rpn_losses = self.rpn(images, image_sizes, features, targets, padded=True)
            _, roi_losses = self.roi_heads(features, proposals, image_sizes, targets, context=context)
            losses = {**rpn_losses, **roi_losses}
            if self.semantic_branch is not None and context is not None:
                losses["loss_sem_seg"] = self.semantic_branch.loss(context.logits, targets, image_sizes)
            return losses
        features = self.backbone(images)
        context = self.semantic_context(features, image_sizes)
        proposals = self.rpn_proposals(images, image_sizes, features)
        detections, _ = self.roi_heads(features, proposals, image_sizes, context=context)
        if self.semantic_branch is not None and context is not None:
            sizes = original_sizes if original_sizes is not None else image_sizes
            for det, labels in zip(detections, self.semantic_branch.label_maps(context, image_sizes, sizes)):
                det["sem_seg"] = labels
        return postprocess_detections(detections, image_sizes, original_sizes)


def postprocess_detections(
    detections: list[dict[str, Tensor]], image_sizes: ImageSizes, original_sizes: ImageSizes | None = None
) -> list[dict[str, Tensor]]:
    """Rescales boxes / keypoints to ``original_sizes`` (when given) and pastes mask probabilities
    (``mask_probs``, box frame) into (N, 1, H, W) image-sized ``masks``; ``sem_seg`` (already at the
    output size) is passed on."""
    out = []
    for i, det in enumerate(detections):
        h, w = (int(v) for v in image_sizes[i])
        oh, ow = (int(v) for v in original_sizes[i]) if original_sizes is not None else (h, w)
        sx, sy = ow / w, oh / h
        res = {
            "boxes": det["boxes"] * det["boxes"].new_tensor([sx, sy, sx, sy]),
            "scores": det["scores"],
            "labels": det["labels"],
        }
        if "mask_probs" in det:
            res["masks"] = paste_masks_in_image(det["mask_probs"][:, None], res["boxes"], (oh, ow))
        if "keypoints" in det:
            kp = det["keypoints"].clone()
            kp[..., 0] *= sx
            kp[..., 1] *= sy
            res["keypoints"] = kp
        if "sem_seg" in det:
            res["sem_seg"] = det["sem_seg"]
        out.append(res)
    return out


def set_bn_groups(model: nn.Module, group_size: int | None, local_groups: int = 1) -> None:
    """MegDet's "BN size" on every cross-device BN layer: statistics shared within groups of
    ``group_size`` ranks (None: all), or over ``local_groups`` slices of each device's batch."""
    for m in model.modules():
        if isinstance(m, CrossDeviceBatchNorm2d):
            if group_size:
                m.group_size = group_size
            m.local_groups = local_groups


def build_model(cfg: Config, channels_last: bool = False) -> GeneralizedRCNN:
    """The detector described by ``cfg.model`` (:meth:`GeneralizedRCNN.from_config`), started from
    ``model.weights`` when set: ImageNet backbone weights or a whole detector (megdet, torchvision or
    detectron2; :mod:`megdet.modeling.convert`), whose class heads are re-initialised when they have
    another size. What was re-initialised or left unused is reported as a warning."""
    model = GeneralizedRCNN.from_config(cfg, channels_last=channels_last)
    if cfg.model.weights:
        from megdet.modeling.convert import load_weights

        report = load_weights(model, cfg.model.weights)
        if report.reinitialised or report.left:
            warnings.warn(f"model.weights={report.summary()}", stacklevel=2)
    return model


# --------------------------------------------------------------------------------------------------
# Whole-model checkpoint loading
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What :func:`load_model_state` did."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the state_dict
    unexpected: list[str] = field(default_factory=list)  # in the state_dict, not in the model

    def summary(self) -> str:
        return (
            f"loaded {len(self.loaded)} tensors; missing {len(self.missing)}; "
            f"unexpected {len(self.unexpected)}"
        )


def _names(keys: Sequence[str], limit: int = 5) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_model_state(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True) -> LoadReport:
    """Loads ``state_dict`` into ``model``, reporting every key that does not line up.

    A state_dict saved from a DistributedDataParallel wrapper (every key prefixed ``module.``) is
    accepted. Shape mismatches always raise a one-line ValueError naming the parameters; missing or
    unexpected keys raise when ``strict`` and produce a warning (and the report) otherwise.
    """
    state = dict(state_dict)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    own = model.state_dict()
    mismatched = [
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and isinstance(v, Tensor) and v.shape != own[k].shape
    ]
    if mismatched:
        raise ValueError(f"checkpoint does not fit the model: shape mismatch in {_names(mismatched)}")
    report = LoadReport(
        loaded=[k for k in state if k in own],
        missing=[k for k in own if k not in state],
        unexpected=[k for k in state if k not in own],
    )
    problems = []
    if report.missing:
        problems.append(f"missing {_names(report.missing)}")
    if report.unexpected:
        problems.append(f"unexpected {_names(report.unexpected)}")
    if problems:
        msg = f"checkpoint does not fit the model: {'; '.join(problems)}"
        if strict:
            raise ValueError(msg + " (load with strict=False to load the rest)")
        warnings.warn(msg, stacklevel=2)
    with torch.no_grad():
        model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    return report
