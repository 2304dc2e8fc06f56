"""CocoDetection on the tiny hand-made dataset of conftest.py."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from megdet.data.coco import CocoDetection
from megdet.data.errors import DatasetError

COCO_FLIP = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]


def _dataset(tiny, split="train", *, train=True, keypoints=True, **kw) -> CocoDetection:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the degenerate-box warning; tested on its own below
        return CocoDetection(
            tiny.image_dirs[split],
            tiny.instances[split],
            tiny.keypoints[split] if keypoints else None,
            train=train,
            with_keypoints=keypoints,
            **kw,
        )


def _item(ds: CocoDetection, image_id: int):
    return ds[ds.image_ids.index(image_id)]


def test_attributes(tiny_coco):
    ds = _dataset(tiny_coco)
    assert ds.coco_category_ids == [1, 3, 5]
    assert ds.category_names == ["person", "car", "dog"]
    assert ds.num_keypoints == 17 and ds.keypoint_names[1] == "left_eye"
    assert ds.keypoint_flip_map == COCO_FLIP
    assert ds.image_ids == [1, 2, 4, 5, 6]
    assert ds.aspect_ratios() == pytest.approx([40 / 30, 30 / 40, 48 / 32, 24 / 40, 1.0])


def test_image_boxes_labels(tiny_coco):
    ds = _dataset(tiny_coco)
    image, target = _item(ds, 1)
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
    assert np.array_equal(image.permute(1, 2, 0).numpy(), tiny_coco.pixels[1])
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes)
    assert target["boxes"].format == tv_tensors.BoundingBoxFormat.XYXY
    assert target["boxes"].dtype == torch.float32
    # person 10 and car 11; crowd 12 is left out. Car (coco id 3) is label 2.
    torch.testing.assert_close(
        target["boxes"].as_subclass(torch.Tensor), torch.tensor([[5.0, 5, 15, 25], [20, 2, 36, 10]])
    )
    assert target["labels"].tolist() == [1, 2] and target["labels"].dtype == torch.int64
    assert target["image_id"] == 1 and target["orig_size"] == (30, 40)


def test_polygon_and_rle_masks_match_annotations(tiny_coco):
    ds = _dataset(tiny_coco)
    _, t1 = _item(ds, 1)
    assert isinstance(t1["masks"], tv_tensors.Mask) and t1["masks"].dtype == torch.uint8
    assert np.array_equal(t1["masks"][0].numpy(), tiny_coco.masks[10])  # polygon
    assert np.array_equal(t1["masks"][1].numpy(), tiny_coco.masks[11])  # compressed RLE
    _, t2 = _item(ds, 2)
    assert np.array_equal(t2["masks"][0].numpy(), tiny_coco.masks[20])  # uncompressed RLE
    assert np.array_equal(t2["masks"][1].numpy(), tiny_coco.masks[22])


def test_keypoints_joined_onto_person_instances(tiny_coco):
    ds = _dataset(tiny_coco)
    _, t1 = _item(ds, 1)
    kp = t1["keypoints"]
    assert kp.shape == (2, 17, 3) and kp.dtype == torch.float32
    assert kp[0].flatten().tolist() == tiny_coco.keypoints_of[10]
    assert not kp[1].any()  # the car has none
    _, t2 = _item(ds, 2)
    assert t2["labels"].tolist() == [2, 1]
    assert t2["keypoints"][1].flatten().tolist() == tiny_coco.keypoints_of[22]


def test_keypoint_annotation_missing_from_instances_is_added(tiny_coco, tmp_path):
    data = json.loads(tiny_coco.instances["train"].read_text())
    data["annotations"] = [a for a in data["annotations"] if a["id"] != 22]
    path = tmp_path / "inst.json"
    path.write_text(json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = CocoDetection(
            tiny_coco.image_dirs["train"], path, tiny_coco.keypoints["train"], train=True, with_keypoints=True
        )
    _, t2 = _item(ds, 2)
    assert t2["labels"].tolist() == [2, 1]
    assert t2["keypoints"][1].flatten().tolist() == tiny_coco.keypoints_of[22]


def test_crowd_ignored_and_empty_images_skipped_in_training_kept_in_eval(tiny_coco):
    train = _dataset(tiny_coco, train=True)
    assert 3 not in train.image_ids
    evaluation = _dataset(tiny_coco, "val", train=False)
    assert evaluation.image_ids == [1, 2, 3, 4, 5, 6]
    _, t1 = _item(evaluation, 1)
    assert len(t1["labels"]) == 2  # the crowd annotation is in neither
    image, t3 = _item(evaluation, 3)
    assert image.shape == (3, 32, 32)
    assert t3["boxes"].shape == (0, 4) and t3["labels"].shape == (0,)
    assert t3["masks"].shape == (0, 32, 32) and t3["keypoints"].shape == (0, 17, 3)


def test_optional_fields_and_transforms(tiny_coco):
    calls = []

    def transform(image, target):
        calls.append(target["image_id"])
        return image.flip(-1), target

    ds = _dataset(tiny_coco, keypoints=False, with_masks=False, transforms=transform)
    image, target = ds[0]
    assert "masks" not in target and "keypoints" not in target
    assert calls == [1]
    assert np.array_equal(image.permute(1, 2, 0).numpy(), tiny_coco.pixels[1][:, ::-1])


# ------------------------------------------------------------------------------------------------
# Bad input: one test each, every error one line naming the file
# ------------------------------------------------------------------------------------------------


def _write(tmp_path: Path, data, name="instances.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _assert_one_line(err: pytest.ExceptionInfo, *parts: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    for p in parts:
        assert p in msg, msg


def test_invalid_json(tiny_coco, tmp_path):
    path = _write(tmp_path, '{"images": [}')
    with pytest.raises(DatasetError) as err:
        CocoDetection(tiny_coco.image_dirs["train"], path, train=True)
    _assert_one_line(err, str(path), "invalid JSON", "line 1")


@pytest.mark.parametrize("field", ["images", "annotations", "categories"])
def test_missing_required_top_level_field(tiny_coco, tmp_path, field):
    data = dict(tiny_coco.instances_data)
    del data[field]
    path = _write(tmp_path, data)
    with pytest.raises(DatasetError) as err:
        CocoDetection(tiny_coco.image_dirs["train"], path, train=True)
    _assert_one_line(err, str(path), f"'{field}'")


@pytest.mark.parametrize("field", ["image_id", "category_id", "bbox"])
def test_missing_required_annotation_field(tiny_coco, tmp_path, field):
    data = json.loads(json.dumps(tiny_coco.instances_data))
    del data["annotations"][3][field]
    path = _write(tmp_path, data)
    with pytest.raises(DatasetError) as err:
        CocoDetection(tiny_coco.image_dirs["train"], path, train=True)
    _assert_one_line(err, str(path), "id 20", f"'{field}'")


def test_unknown_category_id(tiny_coco, tmp_path):
    data = json.loads(json.dumps(tiny_coco.instances_data))
    data["annotations"][0]["category_id"] = 99
    path = _write(tmp_path, data)
    with pytest.raises(DatasetError) as err:
        CocoDetection(tiny_coco.image_dirs["train"], path, train=True)
    _assert_one_line(err, str(path), "unknown category_id 99")


def test_unknown_image_id(tiny_coco, tmp_path):
    data = json.loads(json.dumps(tiny_coco.keypoints_data))
    data["annotations"][0]["image_id"] = 77
    path = _write(tmp_path, data, "kp.json")
    with pytest.raises(DatasetError) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        CocoDetection(tiny_coco.image_dirs["train"], tiny_coco.instances["train"], path, train=True)
    _assert_one_line(err, str(path), "unknown image_id 77")


def test_missing_image_file(tiny_coco):
    ds = _dataset(tiny_coco)
    ds.verify_images()  # all there
    missing = tiny_coco.image_dirs["train"] / "b.png"
    missing.unlink()
    with pytest.raises(DatasetError) as err:
        ds.verify_images()
    _assert_one_line(err, str(missing), "not found", "1 of 5")
    with pytest.raises(DatasetError) as err:
        _item(ds, 2)
    _assert_one_line(err, str(missing), "not found")
    _item(ds, 1)  # the others still load


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_undecodable_image_file(tiny_coco, damage):
    ds = _dataset(tiny_coco)
    broken = tiny_coco.image_dirs["train"] / "a.png"
    data = broken.read_bytes()
    broken.write_bytes(b"this is not an image" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(DatasetError) as err:
        _item(ds, 1)
    _assert_one_line(err, str(broken), "cannot decode image")


def test_degenerate_box_dropped_with_one_warning(tiny_coco):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDetection(
            tiny_coco.image_dirs["train"],
            tiny_coco.instances["train"],
            tiny_coco.keypoints["train"],
            train=True,
        )
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert str(tiny_coco.instances["train"]) in msg and "dropped 1 annotation" in msg
    _, t2 = _item(ds, 2)
    assert len(t2["labels"]) == 2  # car 20 and person 22, not the 0.5-pixel-wide person 21


def test_box_outside_the_image_counts_as_degenerate(tiny_coco, tmp_path):
    data = json.loads(json.dumps(tiny_coco.instances_data))
    outside = dict(data["annotations"][6], id=41, bbox=[60, 4, 10, 10])  # image 4 is 48 wide
    data["annotations"].append(outside)
    path = _write(tmp_path, data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDetection(tiny_coco.image_dirs["train"], path, train=True)
    assert len(caught) == 1 and "dropped 2 annotation" in str(caught[0].message)
    assert len(_item(ds, 4)[1]["labels"]) == 1
