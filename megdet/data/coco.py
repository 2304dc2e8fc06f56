"""COCO-format detection dataset: boxes, instance masks and person keypoints.

Reads a standard ``instances_*.json`` and, optionally, the matching ``person_keypoints_*.json``.
Both files are parsed once at construction; what an item needs (boxes, labels, segmentations,
keypoints, file name) is then packed into one flat byte buffer and the JSON is dropped. Images and
masks are decoded per item. The flat buffer matters on real COCO 2017 (118k images, 860k
annotations): DataLoader workers are forked and would otherwise copy millions of small Python
objects as soon as their reference counts are touched.
"""

from __future__ import annotations

import functools
import pickle
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch
from torchvision import tv_tensors

from megdet.config import semantic_num_classes
from megdet.data import semantic
from megdet.data.errors import DatasetError
from megdet.data.images import read_image_size, read_rgb
from megdet.data.layout import merge_keypoint_fields
from megdet.data.validate import (
    annotation_problems,
    annotation_where,
    category_name,
    category_problems,
    entries,
    image_path,
    image_problems,
    is_int,
    keypoint_counts,
    raise_first_error,
    read_coco_json,
)

Target = dict[str, Any]
Transform = Callable[[tv_tensors.Image, Target], tuple[Any, Target]]


def _load_json(path: Path, what: str) -> dict[str, Any]:
    return read_coco_json(path, what, hint="check the data root and split names")


def _valid_entries(path: Path, items: list[Any], what: str, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """The entries of ``items``; a one-line DatasetError for the first without a required field, with an id
    that is not an integer, or with a duplicate id."""
    good, issues = entries(items, what, required)
    for _, detail in issues:
        raise DatasetError(f"{path}: {detail}")
    return good


def _flip_map(names: Sequence[str]) -> list[int]:
    """Index permutation that swaps every ``left_*`` keypoint with its ``right_*`` partner."""
    position = {n: i for i, n in enumerate(names)}
    out = []
    for i, name in enumerate(names):
        if name.startswith("left_"):
            out.append(position.get("right_" + name[5:], i))
        elif name.startswith("right_"):
            out.append(position.get("left_" + name[6:], i))
        else:
            out.append(i)
    return out


class CocoDetection(torch.utils.data.Dataset):
    """A COCO dataset yielding ``(image, target)`` pairs as described in docs/ARCHITECTURE.md.

    Args:
        image_dir: folder holding the images named by each image's ``file_name``.
        instances_json: COCO instances file (boxes, categories, polygon or RLE segmentations).
        keypoints_json: optional COCO person-keypoints file; its annotations are joined onto the
            instance annotations with the same id (others are added as new instances).
        train: training set-up: images without a usable annotation are skipped.
        with_masks: decode instance masks into ``target['masks']``.
        with_keypoints: put ``target['keypoints']`` (N, K, 3) into targets.
        transforms: ``callable(image, target) -> (image, target)`` applied last.
        with_sem_seg: put ``target['sem_seg']`` (H, W) uint8 per-pixel class ids (255 = ignore) into
            targets: read from ``sem_seg_dir`` (:mod:`megdet.data.semantic`), or built from the instance
            masks when it is None (0 background, the contiguous labels on their instances' pixels).
        num_semantic_classes: the label maps' classes (ids 0..n-1); 0 = background + the categories.
        allow_outside_images: read image files whose ``file_name`` is absolute or leaves ``image_dir``
            with ``..`` (refused by default: the JSON, not the user, would choose what is read).

    Every category, image and annotation goes through ``megdet/data/validate.py`` (what ``megdet data
    check`` reports); the first error is a one-line :class:`DatasetError` naming the file and the entry.
    Crowd annotations (``iscrowd=1``) never enter targets; annotations whose box is narrower or
    shorter than one pixel are dropped with one warning per file.
    """

    def __init__(
        self,
        image_dir: str | Path,
        instances_json: str | Path,
        keypoints_json: str | Path | None = None,
        *,
        train: bool,
        with_masks: bool = True,
        with_keypoints: bool = False,
        transforms: Transform | None = None,
        with_sem_seg: bool = False,
        sem_seg_dir: str | Path | None = None,
        num_semantic_classes: int = 0,
        allow_outside_images: bool = False,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.allow_outside_images = allow_outside_images
        self.instances_json = Path(instances_json)
        self.keypoints_json = Path(keypoints_json) if keypoints_json is not None else None
        self.train = train
        self.with_masks = with_masks
        self.with_keypoints = with_keypoints
        self.transforms = transforms
        self.with_sem_seg = with_sem_seg
        self.sem_seg_dir = Path(sem_seg_dir) if sem_seg_dir is not None else None
        # The records keep the segmentations when masks or instance-built semantic labels need them.
        self._keep_segms = with_masks or (with_sem_seg and self.sem_seg_dir is None)

        inst = _load_json(self.instances_json, "instances annotation")
        kp = (
            _load_json(self.keypoints_json, "keypoints annotation")
            if self.keypoints_json is not None
            else None
        )
        self._read_categories(inst, kp)
        self.num_semantic_classes = semantic_num_classes(num_semantic_classes, len(self.coco_category_ids))
        images = self._read_images(inst)

        # Annotations per image (crowd and degenerate ones left out), keypoints joined by id.
        anns_by_id: dict[Any, dict[str, Any]] = {}
        per_image: dict[int, list[dict[str, Any]]] = {}
        dropped = self._add_annotations(
            self.instances_json, inst["annotations"], images, anns_by_id, per_image
        )
        if dropped:
            warnings.warn(
                f"{self.instances_json}: dropped {dropped} annotation(s) whose box is narrower or shorter than 1 pixel inside the image",
                stacklevel=2,
            )
        if kp is not None:
            dropped = self._join_keypoints(kp["annotations"], images, anns_by_id, per_image)
            if dropped:
                warnings.warn(
                    f"{self.keypoints_json}: dropped {dropped} annotation(s) whose box is narrower or shorter than 1 pixel inside the image",
                    stacklevel=2,
                )

        ids, sizes, blobs = [], [], []
        for image_id, im in images.items():
            anns = per_image.get(image_id, [])
            if train and not anns:
                continue
            ids.append(image_id)
            h, w = int(im["height"]), int(im["width"])
            sizes.append((h, w))
            blobs.append(
                pickle.dumps(self._record(str(im["file_name"]), h, w, anns), pickle.HIGHEST_PROTOCOL)
            )
        if train and not ids:
            crowd = sum(1 for a in inst["annotations"] if a.get("iscrowd", 0))
            raise DatasetError(
                f"{self.instances_json}: no image has an annotation to train on ({len(images)} image(s), "
                f"{len(inst['annotations'])} annotation(s), {crowd} of them crowd regions, which are never trained on)"
            )
        self.image_ids: list[int] = ids
        self._sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        self._offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    # ---------------------------------------------------------------------------------------------
    # Construction helpers
    # ---------------------------------------------------------------------------------------------

    def _read_categories(self, inst: dict[str, Any], kp: dict[str, Any] | None) -> None:
        """Categories from the instances file (label i + 1 <-> coco id [i]; 0 is background), keypoint names
        from the categories that define them (the person category in COCO), in either file."""
        valid = _valid_entries(self.instances_json, inst["categories"], "category", ("id",))
        sources = [(self.instances_json, c) for c in valid]
        if kp is not None:
            sources += [(self.keypoints_json, c) for c in _valid_entries(self.keypoints_json, kp["categories"], "category", ("id",))]
        for src, c in sources:
            raise_first_error(src, f"category id {c['id']}", category_problems(c))
        cats = {c["id"]: c for c in valid}
        self.coco_category_ids: list[int] = sorted(cats)
        self.category_names: list[str] = [category_name(cats[c]) for c in self.coco_category_ids]
        self._label_of = {cid: i + 1 for i, cid in enumerate(self.coco_category_ids)}

        kp_cats = [(src, c) for src, c in sources if c.get("keypoints")]
        for src, c in sources:
            if src == self.keypoints_json and c["id"] not in cats:
                raise DatasetError(
                    f"{src}: category id {c['id']} ({category_name(c)}) is not in {self.instances_json}; "
                    "use the keypoints file of the same split"
                )
        # The categories as the files list them, the keypoint file's keypoints/skeleton merged in:
        # checkpoints store this so that predictions can be named and drawn without the dataset.
        merged = {c["id"]: c for c in merge_keypoint_fields(cats.values(), [c for _, c in kp_cats])}
        self.categories: list[dict[str, Any]] = [merged[cid] for cid in self.coco_category_ids]
        self._keypoints_of = keypoint_counts(self.categories)
        self.keypoint_names: list[str] = []
        if kp_cats:
            self.keypoint_names = list(kp_cats[-1][1]["keypoints"])
            for src, c in kp_cats:
                if list(c["keypoints"]) != self.keypoint_names:
                    raise DatasetError(
                        f"{src}: category {c['id']} defines different keypoint names than the others"
                    )
        if self.with_keypoints and not self.keypoint_names:
            src = self.keypoints_json or self.instances_json
            raise DatasetError(
                f"{src}: with_keypoints=True but no category defines 'keypoints'; pass a person_keypoints file"
            )
        self.num_keypoints: int = len(self.keypoint_names)
        self.keypoint_flip_map: list[int] = _flip_map(self.keypoint_names)

    def _read_images(self, inst: dict[str, Any]) -> dict[int, dict[str, Any]]:
        """Image id -> entry: ids unique integers, sizes valid, every file inside the image folder (unless
        ``allow_outside_images``)."""
        images: dict[int, dict[str, Any]] = {}
        for im in _valid_entries(self.instances_json, inst["images"], "image", ("id", "file_name", "width", "height")):
            raise_first_error(self.instances_json, f"image id {im['id']}", image_problems(im))
            image_path(self.image_dir, im["file_name"], allow_outside=self.allow_outside_images,
                       source=f"{self.instances_json}: image id {im['id']}")  # fmt: skip
            images[im["id"]] = im
        return images


    def _check_ann(self, path: Path, ann: Any, index: int, images: dict[int, Any], seen: set[int]) -> None:
        """A one-line DatasetError for the annotation's first error (what `megdet data check` reports)."""
        where = annotation_where(ann, index)
        raise_first_error(path, where, annotation_problems(ann, images, self._keypoints_of))
        if "id" in ann:
            if not is_int(ann["id"]):
                raise DatasetError(f"{path}: {where}: id is not an integer")
            if ann["id"] in seen:
                raise DatasetError(f"{path}: {where}: the id appears more than once in this file")
            seen.add(ann["id"])

    def _add_annotations(
        self,
        path: Path,
        anns: list[Any],
        images: dict[int, Any],
        anns_by_id: dict[Any, dict[str, Any]],
        per_image: dict[int, list[dict[str, Any]]],
        validated: bool = False,
    ) -> int:
        dropped = 0
        seen: set[int] = set()
        for index, ann in enumerate(anns):
            if not validated:
                self._check_ann(path, ann, index, images, seen)
            if "id" in ann:
                anns_by_id[ann["id"]] = ann
            if ann.get("iscrowd", 0):
                continue
            # Degenerate: narrower or shorter than a pixel once clipped to the image.
            x, y, w, h = ann["bbox"]
            im = images[int(ann["image_id"])]
            if min(x + w, im["width"]) - max(x, 0) < 1 or min(y + h, im["height"]) - max(y, 0) < 1:
                dropped += 1
                continue
            if self._keep_segms and "segmentation" not in ann:
                raise DatasetError(
                    f"{path}: {annotation_where(ann, index)} has no 'segmentation'; masks were requested (set with_masks=False?)"
                )
            per_image.setdefault(int(ann["image_id"]), []).append(ann)
        return dropped

    def _join_keypoints(
        self,
        anns: list[Any],
        images: dict[int, Any],
        anns_by_id: dict[Any, dict[str, Any]],
        per_image: dict[int, list[dict[str, Any]]],
    ) -> int:
        assert self.keypoints_json is not None
        path = self.keypoints_json
        new = []
        seen: set[int] = set()
        for index, ann in enumerate(anns):
            self._check_ann(path, ann, index, images, seen)
            if "keypoints" not in ann:
                continue
            base = anns_by_id.get(ann["id"]) if "id" in ann else None
            if base is None:
                new.append(ann)
                continue
            if int(base["image_id"]) != int(ann["image_id"]):
                raise DatasetError(
                    f"{path}: {annotation_where(ann, index)} has image_id {ann['image_id']} but {base['image_id']} in "
                    f"{self.instances_json}; use the keypoints file of the same split"
                )
            base["keypoints"] = ann["keypoints"]
        return self._add_annotations(path, new, images, {}, per_image, validated=True)

    def _record(self, file_name: str, h: int, w: int, anns: list[dict[str, Any]]) -> dict[str, Any]:
        """The compact per-image record packed into the byte buffer."""
        n = len(anns)
        boxes = np.asarray([a["bbox"] for a in anns], dtype=np.float32).reshape(n, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        labels = np.asarray([self._label_of[int(a["category_id"])] for a in anns], dtype=np.int64)
        ann_ids = np.asarray([a.get("id", -1) for a in anns], dtype=np.int64)
        rec: dict[str, Any] = {"file_name": file_name, "boxes": boxes, "labels": labels, "ann_ids": ann_ids}
        if self._keep_segms:
            rec["segms"] = [self._compact_segm(a, h, w) for a in anns]
        if self.with_keypoints:
            k = self.num_keypoints
            kps = np.zeros((n, k, 3), dtype=np.float32)
            for j, a in enumerate(anns):
                if "keypoints" in a:
                    values = a["keypoints"]
                    if len(values) != 3 * k:
                        src = self.keypoints_json or self.instances_json
                        raise DatasetError(
                            f"{src}: annotation id {a.get('id')} has {len(values)} keypoint values; expected {3 * k}"
                        )
                    kps[j] = np.asarray(values, dtype=np.float32).reshape(k, 3)
            rec["keypoints"] = kps
        return rec

    def _compact_segm(self, ann: dict[str, Any], h: int, w: int) -> Any:
        """A validated segmentation as the record stores it: polygons as float64 arrays (those of at
        least 3 points: frPyObjects reads a 4-number polygon as a box), RLEs compressed."""
        segm = ann["segmentation"]
        if isinstance(segm, list):
            return [np.asarray(p, dtype=np.float64) for p in segm if len(p) >= 6]
        if isinstance(segm["counts"], list):  # uncompressed RLE -> compressed, once
            return mask_utils.frPyObjects(segm, h, w)
        counts = segm["counts"]
        return {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}

    # ---------------------------------------------------------------------------------------------
    # Public API
    # ---------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.image_ids)

    def _get_record(self, index: int) -> dict[str, Any]:
        start, end = int(self._offsets[index]), int(self._offsets[index + 1])
        return pickle.loads(self._buffer[start:end].tobytes())

    def image_path(self, index: int) -> Path:
        """Path of the image file of item ``index``."""
        return image_path(self.image_dir, self._get_record(index)["file_name"], allow_outside=True)

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) of item ``index`` as recorded in the annotation file."""
        h, w = self._sizes[index]
        return int(h), int(w)

    def aspect_ratios(self) -> list[float]:
        """Width / height of every item, from the annotation file (no image is decoded)."""
        return (self._sizes[:, 1] / self._sizes[:, 0]).tolist()

    def annotation_ids(self, index: int) -> list[int]:
        """The annotation ids of item ``index``'s target rows, in order (-1 where an annotation has none)."""
        return self._get_record(index)["ann_ids"].tolist()

    def verify_images(self, indices: Iterable[int] | None = None) -> None:
        """Raises :class:`DatasetError` naming the first image file, among the items ``indices`` (all when
        None), that does not exist (and how many are missing), cannot be read, is a decompression bomb or
        whose size differs from the JSON's. Reads each file's header only (tens of microseconds): a run
        checks before it starts rather than failing when the loader reaches the file."""
        checked = list(range(len(self)) if indices is None else indices)
        paths = [self.image_path(i) for i in checked]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise DatasetError(
                f"{missing[0]}: image file not found ({len(missing)} of {len(checked)} images listed in "
                f"{self.instances_json} are missing from {self.image_dir})"
            )
        if self.with_sem_seg and self.sem_seg_dir is not None:
            maps = [semantic.label_map_path(self.sem_seg_dir, self._get_record(i)["file_name"]) for i in checked]
            missing = [p for p in maps if not p.is_file()]
            if missing:
                raise DatasetError(
                    f"{missing[0]}: label map not found ({len(missing)} of {len(checked)} images have none in "
                    f"{self.sem_seg_dir}; data.sem_seg_dir holds one PNG per image, named as the image)"
                )
        for i, path in zip(checked, paths):
            self._check_size(path, read_image_size(path), self.image_size(i))

    def _check_size(self, path: Path, actual: tuple[int, int], expected: tuple[int, int]) -> None:
        if tuple(actual) != tuple(expected):
            raise DatasetError(
                f"{path}: image is {actual[0]}x{actual[1]} (HxW) but {self.instances_json} says "
                f"{expected[0]}x{expected[1]}; fix the JSON or the file"
            )

    def _load_image(self, path: Path, h: int, w: int) -> tv_tensors.Image:
        if not path.is_file():
            raise DatasetError(f"{path}: image file not found (listed in {self.instances_json})")
        # Pillow rather than torchvision.io: the latter's decoders are deprecated since 0.29.
        array = read_rgb(path)
        self._check_size(path, array.shape[:2], (h, w))
        # (3, H, W) view of the HWC array (channels-last memory): torch resizes uint8 faster in this layout.
        return tv_tensors.Image(torch.from_numpy(array).permute(2, 0, 1))

    def _decode_masks(self, segms: list[Any], h: int, w: int) -> np.ndarray:
        rles = []
        for s in segms:
            if isinstance(s, dict):
                rles.append(s)
            elif s:
                rles.append(mask_utils.merge(mask_utils.frPyObjects([p.tolist() for p in s], h, w)))
            else:
                rles.append(mask_utils.encode(np.zeros((h, w, 1), dtype=np.uint8, order="F"))[0])
        if not rles:
            return np.zeros((0, h, w), dtype=np.uint8)
        with warnings.catch_warnings():
            # pycocotools' compiled decode trips a NumPy 2 DeprecationWarning on every call; harmless.
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            masks = mask_utils.decode(rles)
        return np.ascontiguousarray(masks.transpose(2, 0, 1))

    def _semantic_labels(self, rec: dict[str, Any], h: int, w: int, masks: np.ndarray | None) -> np.ndarray:
        if self.sem_seg_dir is not None:
            path = semantic.label_map_path(self.sem_seg_dir, rec["file_name"])
            return semantic.read_label_map(path, (h, w), self.num_semantic_classes)
        if masks is None:
            masks = self._decode_masks(rec["segms"], h, w)
        return semantic.label_map_from_instances(masks, rec["labels"].tolist(), (h, w))

    @functools.cached_property
    def semantic_class_names(self) -> list[str]:
        """A name per semantic class id (for the per-class IoU): background + the categories for labels
        built from the instance masks; COCO-Stuff's names (:func:`megdet.data.semantic.label_names`)
        for label maps on disk. Read when first asked for: COCO-Stuff's stuff file is large."""
        if self.sem_seg_dir is None:
            return ["background", *self.category_names]
        names = semantic.label_names(self.instances_json, self.categories)
        return semantic.class_names(self.num_semantic_classes, names)

    def semantic_label_map(self, index: int) -> np.ndarray:
        """The per-pixel class ids (H, W) uint8 of item ``index`` at its original size (255 = ignore):
        what ``target['sem_seg']`` holds before the transforms, whatever ``with_sem_seg`` is."""
        h, w = self.image_size(index)
        return self._semantic_labels(self._get_record(index), h, w, None)

    def __getitem__(self, index: int) -> tuple[Any, Target]:
        rec = self._get_record(index)
        h, w = self.image_size(index)
        image = self._load_image(image_path(self.image_dir, rec["file_name"], allow_outside=True), h, w)
        target: Target = {
            "image_id": self.image_ids[index],
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(rec["boxes"]), format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(h, w)
            ),
            "labels": torch.from_numpy(rec["labels"]),
        }
        masks = self._decode_masks(rec["segms"], h, w) if self.with_masks else None
        if masks is not None:
            target["masks"] = tv_tensors.Mask(torch.from_numpy(masks))
        if self.with_sem_seg:
            target["sem_seg"] = tv_tensors.Mask(torch.from_numpy(self._semantic_labels(rec, h, w, masks)))
        if self.with_keypoints:
            target["keypoints"] = torch.from_numpy(rec["keypoints"])
        target["orig_size"] = (h, w)
        if self.transforms is not None:
            return self.transforms(image, target)
        return image, target
