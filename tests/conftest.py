"""The ``cuda`` marker: tests that need CUDA devices, skipped on machines without them (CI has none).

``@pytest.mark.cuda`` needs one CUDA device, ``@pytest.mark.cuda(gpus=2)`` two. ``make test-cuda`` runs
only these (on a GPU machine); their CPU counterparts run everywhere with the same helpers.

Also :func:`build_torchvision_detector` (fixture ``torchvision_detector``): a small detector in
torchvision's layout, the source of the conversion, fine-tuning and ``megdet convert`` tests.
"""

from __future__ import annotations

import pytest
import torch
import torchvision


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda(gpus=1): needs that many CUDA devices; skipped without them")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        marker = item.get_closest_marker("cuda")
        if marker is None:
            continue
        needed = int(marker.kwargs.get("gpus", 1))
        if available < needed:
            item.add_marker(pytest.mark.skip(reason=f"needs {needed} CUDA device(s), {available} visible"))


def build_torchvision_detector(
    num_classes: int, mask: bool = False, keypoints: bool = False, fpn_channels: int = 32, seed: int = 0
) -> torch.nn.Module:
    """A small torchvision R-CNN in torchvision's own layout and names: ResNet-18 FrozenBN body, FPN of
    ``fpn_channels``, 64-wide box head, 2-conv mask / keypoint heads of width 16; distinct random values
    in every tensor (BN statistics and biases included), eval mode. ``num_classes`` counts the background.
    """
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(seed)
    body = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = BackboneWithFPN(body, {f"layer{i}": str(i - 1) for i in range(1, 5)}, [64, 128, 256, 512],
                               fpn_channels, extra_blocks=LastLevelMaxPool())  # fmt: skip
    c = fpn_channels
    kwargs = {"box_head": TwoMLPHead(c * 49, 64), "box_predictor": FastRCNNPredictor(64, num_classes)}
    if mask:
        kwargs["mask_head"] = MaskRCNNHeads(c, [16, 16], 1)
        kwargs["mask_predictor"] = MaskRCNNPredictor(16, 16, num_classes)
        model = MaskRCNN(backbone, num_classes=None, **kwargs)
    else:
        model = FasterRCNN(backbone, num_classes=None, **kwargs)
    if keypoints:
        model.roi_heads.keypoint_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2)
        model.roi_heads.keypoint_head = KeypointRCNNHeads(c, [16, 16])
        model.roi_heads.keypoint_predictor = KeypointRCNNPredictor(16, 17)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith(("running_var", "bn1.weight", "bn2.weight", ".1.weight")) and t.dim() == 1:
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
            elif name.endswith(("running_mean", "bias")) or t.dim() == 1:
                t.copy_(torch.rand(t.shape, generator=g) * 0.2 - 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def torchvision_detector():
    """:func:`build_torchvision_detector`."""
    return build_torchvision_detector
