"""The synthetic COCO-format dataset: format, geometry, determinism and content."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image
from pycocotools.coco import COCO

from megdet.data.check import check_coco, format_report
from megdet.data.synthetic import generate_synthetic_coco

# Written out here (not imported) so that a wrong constant in the generator cannot pass.
COCO_KEYPOINTS = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
]  # fmt: skip
COCO_SKELETON = [
    [16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9],
    [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7],
]  # fmt: skip
# pycocotools' own decode warns under NumPy 2; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

FILES = [f"{kind}_{split}.json" for kind in ("instances", "person_keypoints") for split in ("train", "val")]


def _load(root: Path, name: str) -> dict:
    return json.loads((root / "annotations" / name).read_text())


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth_small")
    generate_synthetic_coco(root, num_train=12, num_val=6, image_size=128, seed=0, workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def larger(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth_larger")
    summary = generate_synthetic_coco(root, num_train=60, num_val=0, image_size=256, seed=5, workers=2, progress=False)
    return root, summary


def test_layout_and_pycocotools_loads_every_file(small: Path) -> None:
    for split, n in (("train", 12), ("val", 6)):
        assert len(list((small / split).glob("*.png"))) == n
    for name in FILES:
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress
            coco = COCO(str(small / "annotations" / name))
        assert coco.getImgIds(), name
        data = _load(small, name)
        assert set(data) == {"info", "licenses", "images", "annotations", "categories"}
        for img in data["images"]:
            assert set(img) >= {"id", "file_name", "height", "width"}
        for ann in data["annotations"]:
            assert set(ann) >= {"id", "image_id", "category_id", "bbox", "area", "segmentation", "iscrowd"}
            assert ann["iscrowd"] == 0
            assert isinstance(ann["segmentation"]["counts"], str)


def test_categories_are_coco_style(small: Path) -> None:
    cats = _load(small, "instances_train.json")["categories"]
    assert [(c["id"], c["name"]) for c in cats] == [
        (1, "circle"), (2, "triangle"), (3, "rectangle"), (4, "star"), (5, "ring"), (6, "cross"), (7, "person")
    ]  # fmt: skip
    assert all("supercategory" in c for c in cats)
    for split in ("train", "val"):
        (person,) = _load(small, f"person_keypoints_{split}.json")["categories"]
        assert person["id"] == 7 and person["name"] == "person" and person["supercategory"] == "person"
        assert person["keypoints"] == COCO_KEYPOINTS
        assert person["skeleton"] == COCO_SKELETON


def test_both_files_share_images_and_person_annotations(small: Path) -> None:
    for split in ("train", "val"):
        inst, kp = _load(small, f"instances_{split}.json"), _load(small, f"person_keypoints_{split}.json")
        assert inst["images"] == kp["images"]
        persons = {a["id"]: a for a in inst["annotations"] if a["category_id"] == 7}
        assert {a["id"] for a in kp["annotations"]} == set(persons)
        for a in kp["annotations"]:
            same = persons[a["id"]]
            for key in ("image_id", "bbox", "area", "segmentation", "category_id"):
                assert a[key] == same[key]
            assert "keypoints" not in same
    train_ids = {im["id"] for im in _load(small, "instances_train.json")["images"]}
    val_ids = {im["id"] for im in _load(small, "instances_val.json")["images"]}
    assert not train_ids & val_ids


def test_masks_areas_boxes_and_images_agree(small: Path) -> None:
    for split in ("train", "val"):
        data = _load(small, f"instances_{split}.json")
        images = {im["id"]: im for im in data["images"]}
        for im in data["images"]:
            with Image.open(small / split / im["file_name"]) as f:
                assert f.size == (im["width"], im["height"]) and f.mode == "RGB"
            assert max(im["width"], im["height"]) == 128
            assert 0.6 * 128 - 1 <= min(im["width"], im["height"]) <= 128
        assert data["annotations"]
        for ann in data["annotations"]:
            im = images[ann["image_id"]]
            m = mask_utils.decode(ann["segmentation"])
            assert m.shape == (im["height"], im["width"])
            assert abs(int(m.sum()) - ann["area"]) <= 0.01 * ann["area"]
            rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
            tight = [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
            np.testing.assert_allclose(ann["bbox"], tight, atol=1.0)


def test_keypoints_are_valid_and_inside_their_box(small: Path) -> None:
    n_persons = 0
    for split in ("train", "val"):
        data = _load(small, f"person_keypoints_{split}.json")
        for ann in data["annotations"]:
            n_persons += 1
            kp = np.asarray(ann["keypoints"], dtype=float).reshape(17, 3)
            x, y, w, h = ann["bbox"]
            v = kp[:, 2]
            assert set(v.tolist()) <= {0, 1, 2}
            assert ann["num_keypoints"] == int((v > 0).sum())
            assert np.all(kp[v == 0, :2] == 0)
            lab = kp[v > 0]
            assert np.all((lab[:, 0] >= x) & (lab[:, 0] <= x + w) & (lab[:, 1] >= y) & (lab[:, 1] <= y + h))
    assert n_persons > 0


def test_same_seed_same_bytes_for_any_worker_count(tmp_path: Path, small: Path) -> None:
    generate_synthetic_coco(tmp_path / "a", num_train=12, num_val=6, image_size=128, seed=0, workers=2, progress=False)
    for name in FILES:
        assert (tmp_path / "a" / "annotations" / name).read_bytes() == (small / "annotations" / name).read_bytes()
    for png in sorted((small / "train").glob("*.png"))[:4]:
        assert (tmp_path / "a" / "train" / png.name).read_bytes() == png.read_bytes()
    generate_synthetic_coco(tmp_path / "b", num_train=12, num_val=6, image_size=128, seed=1, workers=1, progress=False)
    for name in FILES:
        assert (tmp_path / "b" / "annotations" / name).read_bytes() != (small / "annotations" / name).read_bytes()


def test_generated_set_passes_check_coco(small: Path) -> None:
    for name in FILES:
        split = name.rsplit("_", 1)[1][: -len(".json")]
        report = check_coco(small / "annotations" / name, small / split)
        assert report.ok and report.num_problems == 0, format_report(report)
        assert report.image_files_decoded == report.num_images


def test_content_sizes_categories_and_poses(larger: tuple[Path, dict]) -> None:
    root, summary = larger
    data = _load(root, "instances_train.json")
    kps = _load(root, "person_keypoints_train.json")
    sizes = summary["train"]["sizes"]
    assert sizes["small"] > 0 and sizes["medium"] > 0 and sizes["large"] > 0
    assert sizes["small"] < 0.35 * sum(sizes.values())  # most objects medium or large: learnable
    assert all(n > 0 for n in summary["train"]["per_category"].values())
    per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=61)[1:]
    assert per_image.max() <= 8 and per_image.mean() >= 2
    with_person = {a["image_id"] for a in kps["annotations"]}
    assert 0.25 <= len(with_person) / 60 <= 0.65
    shapes = {(im["height"] > im["width"]) for im in data["images"]}
    assert shapes == {True, False}  # both orientations

    kp = np.asarray([a["keypoints"] for a in kps["annotations"]], dtype=float).reshape(-1, 17, 3)
    vis = kp[..., 2]
    assert {0, 1, 2} <= set(vis.ravel().tolist())
    assert (vis == 2).mean() > 0.7
    # Anatomy: the nose above the ankles and, facing the viewer, left shoulder/hip on the image's
    # right, for (nearly all of) the mostly upright figures.
    both = (vis[:, 0] > 0) & (vis[:, 15] > 0)
    assert np.mean(kp[both, 0, 1] < kp[both, 15, 1]) > 0.7
    for left, right in ((5, 6), (11, 12)):
        both = (vis[:, left] > 0) & (vis[:, right] > 0)
        assert np.mean(kp[both, left, 0] > kp[both, right, 0]) > 0.7


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 32}, "image_size"),
        ({"num_train": -1}, "num_train"),
        ({"num_val": -5}, "num_val"),
        ({"workers": 0}, "workers"),
        ({"seed": -1}, "seed"),
    ],
)
def test_impossible_arguments_raise(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        generate_synthetic_coco(tmp_path, **{"num_train": 1, "num_val": 1, "progress": False, **kwargs})
    assert not (tmp_path / "annotations").exists()
