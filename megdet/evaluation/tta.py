"""Test-time augmentation and model ensembles for boxes, masks AND keypoints.

detectron2's TTA refuses keypoints and MMDetection's refuses masks, so this is our own. One piece of
machinery serves both: a *run* is one (model, view) pair, a view being (short side, flip). Every run
detects boxes; the boxes of all runs, mapped back to the original image, are merged (per-class NMS,
or NMS followed by box voting); then every run predicts masks and keypoint heatmaps for the
*merged* boxes (mapped into its view), and those box-relative maps are averaged (flipped views
mirrored back, keypoint channels swapped with the flip map) before the masks are pasted at image
resolution and the heatmaps decoded. Averaging in box-relative space is averaging at image
resolution, because every run sees the same merged box. An ensemble is the same with several models.
Models with a semantic branch give their semantic context to their own RoI heads in every run, and
their per-pixel class probabilities, resampled to the original image (flipped views mirrored back),
are averaged like the mask probabilities before the arg-max gives the ``sem_seg`` label map.

Resizing is the data pipeline's own :class:`~megdet.data.transforms.ResizeShortestEdge`, applied to
the normalised image (the pipeline resizes before normalising; both are linear per pixel, so the two
orders differ only by uint8 rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import batched_nms, box_iou

from megdet.config import BOX_MERGES, Config, check_choice
from megdet.data.transforms import ResizeShortestEdge
from megdet.modeling.semantic import SemanticContext, resize_logits

Size = tuple[int, int]


@dataclass(frozen=True)
class View:
    """One test-time view: resize so the short side is ``min_size`` (long side <= ``max_size``), maybe flip."""

    min_size: int
    max_size: int
    flip: bool = False


def tta_views(min_sizes: Sequence[int], max_size: int, flip: bool) -> list[View]:
    """Every short side, unflipped and (when ``flip``) flipped."""
    views = [View(int(s), int(max_size), False) for s in min_sizes]
    if flip:
        views += [View(int(s), int(max_size), True) for s in min_sizes]
    return views


def _flip_boxes(boxes: Tensor, width: float) -> Tensor:
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def _to_view(boxes: Tensor, orig: Size, size: Size, flip: bool) -> Tensor:
    """Original-image boxes -> boxes in the (resized, maybe flipped) view of ``size``."""
    sy, sx = size[0] / orig[0], size[1] / orig[1]
    out = boxes * boxes.new_tensor([sx, sy, sx, sy])
    return _flip_boxes(out, size[1]) if flip else out


def _from_view(boxes: Tensor, orig: Size, size: Size, flip: bool) -> Tensor:
    """Boxes in a view of ``size`` -> original-image boxes (the model's own rescaling: times orig/size)."""
    if flip:
        boxes = _flip_boxes(boxes, size[1])
    sx, sy = orig[1] / size[1], orig[0] / size[0]
    return boxes * boxes.new_tensor([sx, sy, sx, sy])


def merge_boxes(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    method: str = "vote",
    iou_thresh: float = 0.5,
    max_detections: int = 100,
) -> tuple[Tensor, Tensor, Tensor]:
    """Merges the detections of several runs into one set, best score first.

    ``nms``: per-class NMS (a box is dropped when it overlaps a better one of its class by IoU >
    ``iou_thresh``), keeping at most ``max_detections``. ``vote`` (box voting): the same NMS decides
    which detections survive and their scores; each survivor's box becomes the score-weighted mean of
    itself and the same-class boxes it suppressed or could have suppressed (IoU > ``iou_thresh``).
    """
    check_choice("merge_boxes", method, BOX_MERGES, "method")
    keep = batched_nms(boxes, scores, labels, iou_thresh)[:max_detections]
    kept_boxes, kept_scores, kept_labels = boxes[keep], scores[keep], labels[keep]
    if method == "vote" and keep.numel():
        iou = box_iou(kept_boxes, boxes)
        member = (kept_labels[:, None] == labels[None, :]) & (iou > iou_thresh)
        member[torch.arange(len(keep), device=keep.device), keep] = True  # itself, even if degenerate
        w = member.to(scores.dtype) * scores[None, :]
        kept_boxes = (w @ boxes) / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return kept_boxes, kept_scores, kept_labels


@dataclass
class _Run:
    model: nn.Module
    view: View
    features: list[Tensor]
    sizes: list[Size]  # per image, the resized size in this view
    boxes: list[Tensor]  # per image, the run's own detections in its frame
    context: SemanticContext | None = None  # the model's semantic context in this view, if it has a branch


class MultiViewPredictor:
    """Predicts with several (model, view) runs and merges them (TTA and ensembles).

    Images are normalised float tensors (3, H, W) at their ORIGINAL size; each view resizes them. The
    output matches a model's eval output in original-image coordinates: ``boxes``, ``scores``,
    ``labels``, plus ``masks`` (N, 1, H, W) probabilities when a model has a mask head and
    ``keypoints`` (N, K, 3: x, y, score) when one has a keypoint head (averaged over the models that
    have it), and ``sem_seg`` (H, W) class ids when one has a semantic branch. Models must be in eval mode and share their categories (and keypoints).

    Args:
        models: detectors with the stage methods of :class:`~megdet.modeling.GeneralizedRCNN`.
        views: the views every model runs on.
        keypoint_flip_map: the dataset's left/right keypoint permutation; required when a flipped
            view meets a keypoint model.
        box_merge: ``"nms"`` or ``"vote"`` (see :func:`merge_boxes`).
        iou_thresh: the merge's IoU threshold (the model's ``roi.nms_thresh`` is the natural choice).
        detections_per_img: at most this many merged detections per image.
        size_divisibility: the views' batches are zero-padded to a multiple of this.

    All runs' pyramid features of a batch are kept until its masks and keypoints are done, so peak
    memory grows with models x views x images per call.
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        views: Sequence[View],
        keypoint_flip_map: Sequence[int] | None = None,
        box_merge: str = "vote",
        iou_thresh: float = 0.5,
        detections_per_img: int = 100,
        size_divisibility: int = 32,
    ) -> None:
        if not models or not views:
            raise ValueError("MultiViewPredictor needs at least one model and one view")
        check_choice("MultiViewPredictor", box_merge, BOX_MERGES, "box_merge")
        self.models = list(models)
        self.views = list(views)
        self.resizers = [ResizeShortestEdge([v.min_size], v.max_size) for v in self.views]
        self.flip_map = [int(i) for i in keypoint_flip_map] if keypoint_flip_map is not None else None
        self.box_merge = box_merge
        self.iou_thresh = float(iou_thresh)
        self.detections_per_img = int(detections_per_img)
        self.size_divisibility = max(1, int(size_divisibility))

        classes = {getattr(m, "num_classes", None) for m in self.models}
        if len(classes) > 1:
            raise ValueError(
                f"ensemble models predict different numbers of classes {sorted(map(str, classes))}"
            )
        mask_heads = [m.roi_heads.mask_head for m in self.models if m.roi_heads.mask_head is not None]
        kp_heads = [m.roi_heads.keypoint_head for m in self.models if m.roi_heads.keypoint_head is not None]
        self.mask_on = bool(mask_heads)
        self.keypoint_on = bool(kp_heads)
        if len({h.mask_size for h in mask_heads}) > 1:
            raise ValueError(
                "ensemble models have mask heads of different resolutions (model.roi.mask_pool_size)"
            )
        if len({h.heatmap_size for h in kp_heads}) > 1:
            raise ValueError(
                "ensemble models have keypoint heads of different resolutions (model.roi.keypoint_pool_size)"
            )
        if len({h.num_keypoints for h in kp_heads}) > 1:
            raise ValueError("ensemble models predict different numbers of keypoints (model.num_keypoints)")
        self.num_keypoints = kp_heads[0].num_keypoints if kp_heads else 0
        branches = [b for b in (getattr(m, "semantic_branch", None) for m in self.models) if b is not None]
        self.sem_seg_on = bool(branches)
        if len({b.num_classes for b in branches}) > 1:
            raise ValueError(
                "ensemble models predict different numbers of semantic classes (model.context.num_semantic_classes)"
            )
        if self.keypoint_on and any(v.flip for v in self.views):
            if self.flip_map is None:
                raise ValueError("flipped views of a keypoint model need keypoint_flip_map (the dataset's)")
            if sorted(self.flip_map) != list(range(self.num_keypoints)):
                raise ValueError(
                    f"keypoint_flip_map must be a permutation of 0..{self.num_keypoints - 1}, got {self.flip_map}"
                )

    def _prepare(
        self, images: Sequence[Tensor], view_index: int, device: torch.device
    ) -> tuple[Tensor, list[Size]]:
        """The view of every image, zero-padded bottom/right into one batch (as the data loader does)."""
        view = self.views[view_index]
        resized = []
        for image in images:
            img, _ = self.resizers[view_index](image, {})
            resized.append(img.flip(-1) if view.flip else img)
        sizes = [(int(r.shape[-2]), int(r.shape[-1])) for r in resized]
        d = self.size_divisibility
        ph = -(-max(s[0] for s in sizes) // d) * d
        pw = -(-max(s[1] for s in sizes) // d) * d
        batch = torch.zeros((len(resized), 3, ph, pw), dtype=torch.float32, device=device)
        for i, r in enumerate(resized):
            batch[i, :, : r.shape[-2], : r.shape[-1]].copy_(r)
        return batch, sizes

    def predict(self, image: Tensor, paste_masks: bool = True) -> dict[str, Tensor]:
        """The merged prediction for one normalised image (3, H, W) at its original size."""
        return self([image], paste_masks)[0]

    @torch.no_grad()
    def __call__(self, images: Sequence[Tensor], paste_masks: bool = True) -> list[dict[str, Tensor]]:
        """Merged predictions for normalised images (3, H, W) at their original sizes, one dict each.

        With ``paste_masks=False`` the masks stay in each box's frame: ``mask_probs`` (N, M, M)
        instead of image-sized ``masks`` (as :class:`~megdet.modeling.RoIHeads` returns them).
        """
        if not images:
            return []
        for i, img in enumerate(images):
            if img.dim() != 3 or img.shape[0] != 3 or not img.is_floating_point():
                raise ValueError(
                    f"image {i}: expected a normalised float (3, H, W) tensor, got {img.dtype} {tuple(img.shape)}"
                )
        out_device = self.models[0].device
        origs = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        n = len(images)
        runs: list[_Run] = []
        found: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(n)]
        for model in self.models:
            if model.training:
                raise ValueError("MultiViewPredictor: call model.eval() on every model first")
            device = model.device
            on_device = [img.to(device) for img in images]
            for v, view in enumerate(self.views):
                batch, sizes = self._prepare(on_device, v, device)
                features = model.backbone(batch)
                context = model.semantic_context(features, sizes) if hasattr(model, "semantic_context") else None
                proposals = model.rpn_proposals(batch, sizes, features)
                dets = model.roi_heads.detect_boxes(features, proposals, sizes, context)
                run = _Run(model, view, features, sizes, [d["boxes"] for d in dets], context)
                runs.append(run)
                for i, det in enumerate(dets):
                    boxes = _from_view(det["boxes"].float(), origs[i], sizes[i], view.flip)
                    found[i].append(
                        (boxes.to(out_device), det["scores"].to(out_device), det["labels"].to(out_device))
                    )

        # One run: its detections already went through the model's own per-class NMS at the same
        # threshold, so they are kept as they are, and its boxes in its own frame are reused below
        # (no round trip through the original frame); a single plain view then reproduces the model.
        single = len(runs) == 1
        merged: list[dict[str, Tensor]] = []
        for i in range(n):
            if single:
                boxes, scores, labels = found[i][0]
            else:
                boxes, scores, labels = merge_boxes(
                    torch.cat([b for b, _, _ in found[i]]),
                    torch.cat([s for _, s, _ in found[i]]),
                    torch.cat([lab for _, _, lab in found[i]]),
                    self.box_merge,
                    self.iou_thresh,
                    self.detections_per_img,
                )
                h, w = origs[i]
                boxes = torch.stack(
                    [
                        boxes[:, 0].clamp(0, w),
                        boxes[:, 1].clamp(0, h),
                        boxes[:, 2].clamp(0, w),
                        boxes[:, 3].clamp(0, h),
                    ],
                    dim=1,
                )
            merged.append({"boxes": boxes, "scores": scores, "labels": labels})

        if self.mask_on:
            for det, probs, orig in zip(merged, self._mask_probs(runs, merged, origs), origs):
                if paste_masks:
                    det["masks"] = paste_masks_in_image(probs[:, None], det["boxes"], orig)
                else:
                    det["mask_probs"] = probs
        if self.keypoint_on:
            self._keypoints(runs, merged, origs)
        if self.sem_seg_on:
            for det, probs in zip(merged, self._semantic_probs(runs, origs)):
                det["sem_seg"] = probs.argmax(dim=0).to(det["boxes"].device)
        return merged

    def _view_boxes(
        self, run: _Run, merged: list[dict[str, Tensor]], origs: list[Size], flip: bool, single: bool
    ) -> list[Tensor]:
        """The merged boxes of every image in ``run``'s frame (mirrored when ``flip``); with a ``single``
        run they are its own detections, so its frame's boxes are taken as they are."""
        if single and flip == run.view.flip:
            return run.boxes
        device = run.model.device
        return [
            _to_view(det["boxes"], orig, size, flip).to(device)
            for det, orig, size in zip(merged, origs, run.sizes)
        ]

    def _mask_probs(
        self, runs: list[_Run], merged: list[dict[str, Tensor]], origs: list[Size]
    ) -> list[Tensor]:
        """Per image (N, M, M): the box-frame mask probabilities averaged over the runs with a mask head."""
        acc: list[Tensor | None] = [None] * len(merged)
        count = 0
        for run in runs:
            if run.model.roi_heads.mask_head is None:
                continue
            count += 1
            labels = [det["labels"].to(run.model.device) for det in merged]
            boxes = self._view_boxes(run, merged, origs, run.view.flip, len(runs) == 1)
            for i, p in enumerate(run.model.roi_heads.mask_probs(run.features, boxes, labels, run.context)):
                p = p.float().to(merged[i]["boxes"].device)
                if run.view.flip:
                    p = p.flip(-1)
                acc[i] = p if acc[i] is None else acc[i] + p
        return [a / count for a in acc]  # type: ignore[operator]

    @staticmethod
    def _semantic_probs(runs: list[_Run], origs: list[Size]) -> list[Tensor]:
        """Per image (K, H, W): the class probabilities of the runs with a semantic branch, resampled to
        the original image (flipped views mirrored back) and averaged."""
        acc: list[Tensor | None] = [None] * len(origs)
        sem_runs = [r for r in runs if r.context is not None]
        for run in sem_runs:
            assert run.context is not None
            for i, (logits, size) in enumerate(zip(run.context.logits, run.sizes)):
                p = resize_logits(logits, run.context.stride, size, origs[i]).softmax(dim=0)
                if run.view.flip:
                    p = p.flip(-1)
                p = p.to(runs[0].model.device)
                acc[i] = p if acc[i] is None else acc[i] + p
        return [a / len(sem_runs) for a in acc]  # type: ignore[operator]

    def _keypoints(self, runs: list[_Run], merged: list[dict[str, Tensor]], origs: list[Size]) -> None:
        """Adds ``keypoints`` (N, K, 3) to every merged detection.

        The heatmap logits of the runs with a keypoint head are averaged (flipped runs mirrored back,
        their left/right channels swapped) and decoded in the unflipped frame of the largest view,
        then scaled to the original image, as the model itself decodes in its input frame: the
        arg-max grid is then at least as fine as the original image's.
        """
        from megdet.modeling.roi_heads import heatmaps_to_keypoints

        kp_runs = [r for r in runs if r.model.roi_heads.keypoint_head is not None]
        acc: list[Tensor | None] = [None] * len(merged)
        for run in kp_runs:
            boxes = self._view_boxes(run, merged, origs, run.view.flip, len(runs) == 1)
            for i, m in enumerate(run.model.roi_heads.keypoint_heatmaps(run.features, boxes)):
                m = m.float().to(merged[i]["boxes"].device)
                if run.view.flip:
                    # Mirror back; the flipped view's "left" channels then describe the right side.
                    m = m.flip(-1)[:, self.flip_map]
                acc[i] = m if acc[i] is None else acc[i] + m
        for i, det in enumerate(merged):
            frame = max(kp_runs, key=lambda r: r.sizes[i][0] * r.sizes[i][1])  # the first on ties
            size = frame.sizes[i]
            boxes = self._view_boxes(frame, merged, origs, False, len(runs) == 1)[i].to(det["boxes"].device)
            kps = heatmaps_to_keypoints(acc[i] / len(kp_runs), boxes)  # type: ignore[operator]
            kps[..., 0] *= origs[i][1] / size[1]
            kps[..., 1] *= origs[i][0] / size[0]
            det["keypoints"] = kps


def multiview_predictor(
    models: Sequence[nn.Module], cfg: Config, tta: bool, keypoint_flip_map: Sequence[int] | None = None
) -> MultiViewPredictor:
    """The TTA / ensemble predictor of ``cfg``: the views of ``test.tta`` when ``tta``, else the single
    test view; ``test.tta.box_merge`` at the model's NMS threshold and detections per image."""
    t = cfg.test.tta
    views = (
        tta_views(t.min_sizes, cfg.data.max_size_test, t.flip)
        if tta
        else [View(cfg.data.min_size_test, cfg.data.max_size_test, False)]
    )
    return MultiViewPredictor(
        models,
        views,
        keypoint_flip_map=keypoint_flip_map,
        box_merge=t.box_merge,
        iou_thresh=cfg.model.roi.nms_thresh,
        detections_per_img=cfg.model.roi.detections_per_img,
        size_divisibility=cfg.data.size_divisibility,
    )
