"""FPN R-CNN detectors: backbone + FPN, RPN, RoI heads (boxes, masks, keypoints), the whole model."""

from megdet.modeling.backbone import ResNetBody, ResNetFPN, build_backbone, load_backbone_weights
from megdet.modeling.detector import (
    GeneralizedRCNN,
    LoadReport,
    build_model,
    build_model_from_kwargs,
    load_model_state,
    model_kwargs_from_config,
)
from megdet.modeling.roi_heads import BoxHead, KeypointHead, MaskHead, RoIHeads, heatmaps_to_keypoints
from megdet.modeling.rpn import RPN, RPNHead

__all__ = [
    "RPN",
    "BoxHead",
    "GeneralizedRCNN",
    "KeypointHead",
    "LoadReport",
    "MaskHead",
    "RPNHead",
    "ResNetBody",
    "ResNetFPN",
    "RoIHeads",
    "build_backbone",
    "build_model",
    "build_model_from_kwargs",
    "heatmaps_to_keypoints",
    "load_backbone_weights",
    "load_model_state",
    "model_kwargs_from_config",
]
