"""The COCO folder layout and the lenient category lookup, on the tiny dataset of conftest.py."""

from __future__ import annotations

import pytest

from megdet.data.layout import read_categories, split_files

pytestmark = pytest.mark.filterwarnings("ignore:.*narrower or shorter than 1 pixel:UserWarning")


def test_split_files_are_the_coco_2017_layout(tiny_coco) -> None:
    files = split_files(tiny_coco.root, "val")
    assert files.images == tiny_coco.image_dirs["val"]
    assert files.instances == tiny_coco.instances["val"] and files.keypoints == tiny_coco.keypoints["val"]


def test_read_categories_merges_the_keypoint_file_as_the_dataset_does(tiny_coco) -> None:
    from megdet.data.coco import CocoDetection

    path, categories = read_categories(tiny_coco.root, ["absent", "val", "train"])
    assert path == tiny_coco.instances["val"]
    dataset = CocoDetection(
        tiny_coco.image_dirs["val"], tiny_coco.instances["val"], tiny_coco.keypoints["val"], train=False
    )
    assert sorted(categories, key=lambda c: c["id"]) == dataset.categories
    person = next(c for c in categories if c["name"] == "person")
    assert len(person["keypoints"]) == 17 and person["skeleton"]  # from the keypoints file
    tiny_coco.instances["val"].write_text("{not json")
    assert read_categories(tiny_coco.root, ["val", "train"])[0] == tiny_coco.instances["train"]
    assert read_categories(tiny_coco.root, ["val"]) is None
