"""FPN R-CNN detectors: backbone + FPN, RPN, RoI heads (boxes, masks, keypoints), the whole model."""

from megdet.modeling.backbone import ResNetBody, ResNetFPN, build_backbone, load_backbone_weights
from megdet.modeling.detector import GeneralizedRCNN, LoadReport, build_model, load_model_state
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
    "heatmaps_to_keypoints",
    "load_backbone_weights",
    "load_model_state",
]
