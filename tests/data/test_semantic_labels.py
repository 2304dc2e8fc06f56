"""Semantic labels: the label-map reader and its one-line errors, labels from instance masks, the
dataset's ``sem_seg`` targets (disk and instances), ``megdet data check`` on label maps, and the
synthetic dataset's stuff."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from megdet.config import load_config
from megdet.data.check import check_coco, format_report
from megdet.data.coco import CocoDetection
from megdet.data.errors import DatasetError
from megdet.data.loader import build_train_loader
from megdet.data.semantic import (
    label_map_from_instances,
    label_map_path,
    label_names,
    read_label_map,
    save_label_map,
)
from megdet.data.synthetic import ensure_synthetic_coco, generate_synthetic_coco
from megdet.data.transforms import Compose, RandomHorizontalFlip, ResizeShortestEdge

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*dropped 1 annotation:UserWarning"),  # the tiny set's degenerate box
]


def _one_line(excinfo: pytest.ExceptionInfo, *parts: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert p in msg, msg
    return msg


# --------------------------------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------------------------------


def test_read_label_map_and_its_one_line_errors(tmp_path: Path) -> None:
    labels = np.array([[0, 1, 2, 9, 9], [255, 3, 3, 0, 1], [4, 4, 4, 4, 4], [0, 0, 255, 255, 7]], np.uint8)
    Image.fromarray(labels).save(tmp_path / "ok.png")
    assert np.array_equal(read_label_map(tmp_path / "ok.png", (4, 5), 10), labels)
    # The palette PNG megdet predict writes reads back as the same ids.
    save_label_map(torch.from_numpy(labels), tmp_path / "palette.png")
    assert Image.open(tmp_path / "palette.png").mode == "P"
    assert np.array_equal(read_label_map(tmp_path / "palette.png", (4, 5), 10), labels)

    with pytest.raises(DatasetError) as e:
        read_label_map(tmp_path / "ok.png", (5, 4), 10)  # the image is 5x4, the map 4x5
    _one_line(e, "ok.png", "is 4x5 (HxW) but its image is 5x4")
    with pytest.raises(DatasetError) as e:
        read_label_map(tmp_path / "ok.png", (4, 5), 8)  # ids 9 (and 255: fine) in a map of 8 classes
    _one_line(e, "ok.png", "class id(s) 9 outside 0..7", "num_semantic_classes")
    Image.fromarray(np.stack([labels] * 3, axis=-1)).save(tmp_path / "rgb.png")
    with pytest.raises(DatasetError) as e:
        read_label_map(tmp_path / "rgb.png", (4, 5), 10)
    _one_line(e, "rgb.png", "mode RGB")
    with pytest.raises(DatasetError) as e:
        read_label_map(tmp_path / "missing.png", (4, 5), 10)
    _one_line(e, "missing.png", "not found")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError) as e:
        read_label_map(tmp_path / "broken.png", (4, 5), 10)
    _one_line(e, "broken.png", "cannot decode")
    assert label_map_path(tmp_path, "sub/000000000009.jpg") == tmp_path / "sub" / "000000000009.png"


def test_label_map_from_instance_masks() -> None:
    big = np.zeros((6, 8), np.uint8)
    big[1:6, 1:7] = 1
    small = np.zeros((6, 8), np.uint8)
    small[2:4, 2:4] = 1
    # The smaller instance is in front whatever the order; background is 0.
    for masks, labels in (((big, small), [2, 5]), ((small, big), [5, 2])):
        out = label_map_from_instances(np.stack(masks), labels, (6, 8))
        assert out.dtype == np.uint8
        assert (out[2:4, 2:4] == 5).all()
        assert ((out == 2) == (big.astype(bool) & ~small.astype(bool))).all()
        assert (out[big == 0] == 0).all()
    assert not label_map_from_instances(np.zeros((0, 6, 8), np.uint8), [], (6, 8)).any()


# --------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------


def test_sem_seg_targets_from_instance_masks(tiny_coco) -> None:
    ds = CocoDetection(tiny_coco.image_dirs["train"], tiny_coco.instances["train"], train=False,
                       with_masks=False, with_sem_seg=True)  # fmt: skip
    assert ds.num_semantic_classes == 4 and ds.semantic_class_names == ["background", "person", "car", "dog"]
    index = ds.image_ids.index(1)
    _, target = ds[index]
    sem = target["sem_seg"].as_subclass(torch.Tensor).numpy()
    # Image 1: person 10 (label 1), car 11 (label 2); the crowd person 12 is not an instance.
    expected = np.zeros((30, 40), np.uint8)
    expected[tiny_coco.masks[10] > 0] = 1
    expected[tiny_coco.masks[11] > 0] = 2
    assert "masks" not in target
    assert np.array_equal(sem, expected)
    assert np.array_equal(ds.semantic_label_map(index), expected)

    # Resized and flipped with the image, exactly as the instance masks are.
    ds.with_masks = True
    ds.transforms = Compose([ResizeShortestEdge([45], 200), RandomHorizontalFlip(1.0)])
    _, t = ds[index]
    masks, labels = t["masks"].numpy(), t["labels"].tolist()
    assert t["sem_seg"].shape == masks.shape[1:] == (45, 60)
    assert np.array_equal(t["sem_seg"].numpy(), label_map_from_instances(masks, labels, masks.shape[1:]))


def _write_maps(root: Path, ds: CocoDetection, value: int = 3) -> Path:
    folder = root / "maps"
    folder.mkdir(parents=True)
    for i in range(len(ds)):
        h, w = ds.image_size(i)
        labels = np.full((h, w), value, np.uint8)
        labels[0] = 255
        Image.fromarray(labels).save(label_map_path(folder, ds.image_path(i).name))
    return folder


def test_sem_seg_targets_from_label_maps_on_disk(tiny_coco, tmp_path: Path) -> None:
    plain = CocoDetection(tiny_coco.image_dirs["val"], tiny_coco.instances["val"], train=False, with_masks=False)
    folder = _write_maps(tmp_path, plain)
    ds = CocoDetection(tiny_coco.image_dirs["val"], tiny_coco.instances["val"], train=False, with_masks=False,
                       with_sem_seg=True, sem_seg_dir=folder, num_semantic_classes=5)  # fmt: skip
    ds.verify_images()
    _, target = ds[0]
    h, w = ds.image_size(0)
    assert target["sem_seg"].shape == (h, w) and (target["sem_seg"][1:] == 3).all() and (target["sem_seg"][0] == 255).all()
    # COCO-Stuff names: category id - 1, from the instances file and the stuff file next to it.
    assert ds.semantic_class_names == ["person", "class_1", "car", "class_3", "dog"]
    stuff = tiny_coco.instances["val"].with_name("stuff_val.json")
    stuff.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 2, "name": "grass"}]}))
    assert label_names(tiny_coco.instances["val"])[1] == "grass"

    # A map of another size, with an unknown id, or missing: one line naming the file.
    bad = label_map_path(folder, ds.image_path(0).name)
    Image.fromarray(np.zeros((h + 1, w), np.uint8)).save(bad)
    with pytest.raises(DatasetError) as e:
        ds[0]
    _one_line(e, bad.name, f"but its image is {h}x{w}")
    Image.fromarray(np.full((h, w), 7, np.uint8)).save(bad)
    with pytest.raises(DatasetError) as e:
        ds[0]
    _one_line(e, bad.name, "class id(s) 7 outside 0..4")
    bad.unlink()
    with pytest.raises(DatasetError) as e:
        ds.verify_images()
    _one_line(e, bad.name, "label map not found", "1 of 6")


def test_train_loader_batches_carry_the_label_maps(tiny_coco) -> None:
    cfg = load_config(None, [f"data.root={tiny_coco.root}", "data.num_workers=0", "model.context.semantic=true",
                             "data.min_size_train=[48]", "data.max_size_train=64", "model.num_classes=3"])  # fmt: skip
    batch = next(iter(build_train_loader(cfg, rank=0, world_size=1)))
    for target, (h, w) in zip(batch.targets, batch.image_sizes):
        assert target["sem_seg"].dtype == torch.uint8 and tuple(target["sem_seg"].shape) == (h, w)
        assert int(target["sem_seg"].max()) <= 3


# --------------------------------------------------------------------------------------------------
# megdet data check
# --------------------------------------------------------------------------------------------------


def test_check_coco_reports_label_map_problems(tiny_coco, tmp_path: Path) -> None:
    ds = CocoDetection(tiny_coco.image_dirs["val"], tiny_coco.instances["val"], train=False, with_masks=False)
    folder = _write_maps(tmp_path, ds, value=2)  # id 2 = category 3 "car" (COCO-Stuff: id - 1)
    report = check_coco(tiny_coco.instances["val"], label_maps_dir=folder)
    assert report.ok, format_report(report)
    assert report.label_maps_checked == report.label_maps_decoded == 6
    assert "label maps in" in format_report(report)

    Image.fromarray(np.zeros((5, 5), np.uint8)).save(label_map_path(folder, "a.png"))  # a.png is 30x40
    Image.fromarray(np.full((40, 30), 1, np.uint8)).save(label_map_path(folder, "b.png"))  # no category 2
    label_map_path(folder, "c.png").unlink()
    report = check_coco(tiny_coco.instances["val"], label_maps_dir=folder)
    assert not report.ok
    kinds = {k: p.count for k, p in report.problems.items() if p.severity == "error"}
    assert kinds == {"bad_label_map": 1, "unknown_label_id": 1, "missing_label_map": 1}, format_report(report)
    assert "is 5x5 (HxW) but the image is 30x40" in report.problems["bad_label_map"].examples[0]
    assert "id(s) 1 that name no class" in report.problems["unknown_label_id"].examples[0]
    # With an explicit class count, id 1 is a class.
    report = check_coco(tiny_coco.instances["val"], label_maps_dir=folder, num_label_classes=3)
    assert {k for k, p in report.problems.items() if p.severity == "error"} == {"bad_label_map", "missing_label_map"}


# --------------------------------------------------------------------------------------------------
# The synthetic dataset's stuff
# --------------------------------------------------------------------------------------------------


def test_synthetic_stuff_label_maps_agree_with_the_annotations(tmp_path: Path) -> None:
    root = tmp_path / "stuff"
    summary = generate_synthetic_coco(root, num_train=6, num_val=2, image_size=96, seed=3, workers=1,
                                      progress=False, stuff=True)  # fmt: skip
    assert set(summary["train"]["stuff_fraction"]) == {"ground", "wall", "sky"}
    assert sum(summary["train"]["stuff_fraction"].values()) > 0.2
    coco = COCO(str(root / "annotations" / "instances_train.json"))
    stuff = COCO(str(root / "annotations" / "stuff_train.json"))
    assert [c["id"] for c in stuff.loadCats(stuff.getCatIds())] == [8, 9, 10]
    seen: set[int] = set()
    for image in coco.loadImgs(coco.getImgIds()):
        labels = read_label_map(root / "stuffthingmaps" / "train" / image["file_name"],
                                (image["height"], image["width"]), 10)  # fmt: skip
        seen |= set(np.unique(labels).tolist())
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
            assert (labels[coco.annToMask(ann) > 0] == ann["category_id"] - 1).all()
        for ann in stuff.loadAnns(stuff.getAnnIds(imgIds=image["id"])):
            assert np.array_equal(stuff.annToMask(ann) > 0, labels == ann["category_id"] - 1)
    assert {7, 8, 9} & seen and seen <= set(range(10)) | {255}
    for split in ("train", "val"):
        report = check_coco(root / "annotations" / f"instances_{split}.json", root / split,
                            root / "stuffthingmaps" / split)  # fmt: skip
        assert report.ok and report.num_problems == 0, format_report(report)

    # The default dataset has no stuff; the stamp tells the two apart.
    plain = tmp_path / "plain"
    assert ensure_synthetic_coco(plain, num_train=2, num_val=1, image_size=64, workers=1, progress=False)
    assert not (plain / "stuffthingmaps").exists() and not (plain / "annotations" / "stuff_train.json").exists()
    assert "stuff" not in json.loads((plain / "synth.json").read_text())
    assert ensure_synthetic_coco(plain, num_train=2, num_val=1, image_size=64, workers=1, progress=False, stuff=True)
    assert json.loads((plain / "synth.json").read_text())["stuff"] is True
    assert (plain / "stuffthingmaps" / "val").is_dir()
