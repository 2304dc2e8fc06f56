"""Region proposal network over P2..P6: torchvision's anchors, matching, sampling, losses and NMS.

torchvision's ``RegionProposalNetwork`` does the anchor bookkeeping; :class:`RPN` adapts it to our
calling convention (a padded image tensor, image sizes and a list of feature maps). The head is our
own because torchvision's ``RPNHead`` has no norm argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork

from megdet.layers.norm import get_norm
from megdet.modeling.backbone import check_norm


class RPNHead(nn.Module):
    """``conv_depth`` shared 3x3 convs (+ norm + ReLU), then objectness and box-delta 1x1 convs.

    With a norm, each conv's outputs of all pyramid levels are normalised in ONE call over the
    levels laid side by side: BN statistics then describe the shared head's input (one set for all
    levels, identical in training and eval), and a cross-device BN issues one collective per layer
    rather than one per level.
    """

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1, norm: str = "none") -> None:
        super().__init__()
        check_norm(norm, "rpn norm")
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=norm == "none") for _ in range(conv_depth)
        )
        self.norms = (
            nn.ModuleList(get_norm(norm, in_channels) for _ in range(conv_depth)) if norm != "none" else None
        )
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @staticmethod
    def _norm_levels(norm: nn.Module, xs: list[Tensor]) -> list[Tensor]:
        n, c = xs[0].shape[:2]
        flat = torch.cat([x.reshape(n, c, 1, -1) for x in xs], dim=3)
        y = norm(flat)
        sizes = [x.shape[-2] * x.shape[-1] for x in xs]
        return [p.reshape(x.shape) for p, x in zip(y.split(sizes, dim=3), xs)]

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        xs = features
        for i, conv in enumerate(self.convs):
            xs = [conv(x) for x in xs]
            if self.norms is not None:
                xs = self._norm_levels(self.norms[i], xs)
            xs = [F.relu(x) for x in xs]
        # float32 outputs: torchvision's BoxCoder casts anchors to the deltas' dtype, which under
        # bf16/fp16 autocast would quantise proposal coordinates to a few pixels.
        logits = [self.cls_logits(x).float() for x in xs]
        deltas = [self.bbox_pred(x).float() for x in xs]
        return logits, deltas


class FixedStrideAnchorGenerator(AnchorGenerator):
    """torchvision's AnchorGenerator with each level's stride given rather than inferred.

    torchvision infers a level's stride as ``padded_size // grid_size``; for P6 (a stride-2 pool of
    P5) on images padded to a multiple of 32 whose P5 grid is odd, that gives e.g. 96 // 2 = 48
    instead of 64, so the P6 anchors would not line up with their feature cells.
    """

    def __init__(
        self,
        sizes: tuple[tuple[int, ...], ...],
        aspect_ratios: tuple[tuple[float, ...], ...],
        strides: Sequence[int],
    ) -> None:
        super().__init__(sizes, aspect_ratios)
        if len(strides) != len(sizes):
            raise ValueError(
                f"model.rpn.anchor_sizes: {len(sizes)} sizes but the backbone has {len(strides)} levels "
                "(give one size per level, P2..P6)"
            )
        self.strides = [int(s) for s in strides]

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        grid_sizes = [list(f.shape[-2:]) for f in feature_maps]
        strides = [[torch.tensor(s, device=device), torch.tensor(s, device=device)] for s in self.strides]
        self.set_cell_anchors(dtype, device)
        per_level = self.grid_anchors(grid_sizes, strides)
        flat = torch.cat(per_level)
        return [flat for _ in image_list.image_sizes]


class RPN(nn.Module):
    """Anchors (one size per level, shared aspect ratios) + :class:`RPNHead` + torchvision's RPN logic.

    ``forward(images, image_sizes, features, targets=None) -> (proposals, losses)``: proposals is one
    (Ni, 4) xyxy tensor per image (detached); losses holds ``loss_objectness`` and
    ``loss_rpn_box_reg`` in training and is empty in eval.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        strides: Sequence[int] = (4, 8, 16, 32, 64),
        anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        head_convs: int = 1,
        norm: str = "none",
        pre_nms_top_n_train: int = 2000,
        post_nms_top_n_train: int = 1000,
        pre_nms_top_n_test: int = 1000,
        post_nms_top_n_test: int = 1000,
        nms_thresh: float = 0.7,
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
    ) -> None:
        super().__init__()
        self.num_levels = len(anchor_sizes)
        anchors = FixedStrideAnchorGenerator(
            sizes=tuple((int(s),) for s in anchor_sizes),
            aspect_ratios=(tuple(float(a) for a in aspect_ratios),) * len(anchor_sizes),
            strides=strides,
        )
        head = RPNHead(in_channels, len(aspect_ratios), conv_depth=head_convs, norm=norm)
        self.rpn = RegionProposalNetwork(
            anchors,
            head,
            fg_iou_thresh=fg_iou_thresh,
            bg_iou_thresh=bg_iou_thresh,
            batch_size_per_image=batch_size_per_image,
            positive_fraction=positive_fraction,
            pre_nms_top_n={"training": pre_nms_top_n_train, "testing": pre_nms_top_n_test},
            post_nms_top_n={"training": post_nms_top_n_train, "testing": post_nms_top_n_test},
            nms_thresh=nms_thresh,
        )

    @property
    def head(self) -> RPNHead:
        return self.rpn.head

    def forward(
        self,
        images: Tensor,
        image_sizes: Sequence[Sequence[int]],
        features: list[Tensor],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        if len(features) != self.num_levels:
            raise ValueError(
                f"RPN: got {len(features)} feature maps but model.rpn.anchor_sizes has "
                f"{self.num_levels} entries"
            )
        if self.training and targets is None:
            raise ValueError("RPN: targets are required in training mode (call model.eval() for inference)")
        image_list = ImageList(images, [(int(h), int(w)) for h, w in image_sizes])
        feats = {str(i): f for i, f in enumerate(features)}
        return self.rpn(image_list, feats, targets)
