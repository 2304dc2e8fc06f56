"""Image files: paths outside the image folder, decompression bombs, sizes that differ from the JSON, and
every Pillow mode read as proper 8-bit RGB (16-bit scaled, not clipped to white)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from faults import H, W, base_coco, run_harness, write_bomb, write_dataset, write_png

from megdet.config import load_config
from megdet.data.check import check_coco
from megdet.data.coco import CocoDetection
from megdet.data.errors import DatasetError
from megdet.data.images import read_image_size, read_rgb
from megdet.data.loader import build_train_dataset

# --------------------------------------------------------------------------------------------------
# Files outside the image folder
# --------------------------------------------------------------------------------------------------


def _named(file_name: str) -> dict:
    data = copy.deepcopy(base_coco())
    data["images"][1]["file_name"] = file_name
    return data


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "dotdot_inside"])
def test_file_names_outside_the_image_folder_are_refused_unless_allowed(tmp_path: Path, kind: str) -> None:
    outside = tmp_path / "secret"
    outside.mkdir()
    PIL.Image.new("RGB", (W, H)).save(outside / "b.png")
    name = {"absolute": str(outside / "b.png"), "dotdot": "../secret/b.png", "dotdot_inside": "sub/../../secret/b.png"}[kind]
    ann = write_dataset(tmp_path, _named(name))
    images = tmp_path / "images"
    (images / "sub").mkdir()
    with pytest.raises(DatasetError) as e:
        CocoDetection(images, ann, train=True)
    msg = str(e.value)
    assert "\n" not in msg and str(ann) in msg and "image id 2" in msg and repr(name) in msg
    assert "data.allow_outside_images=true" in msg
    report = check_coco(ann, images)
    assert not report.ok and report.problems["image_outside_folder"].count == 1

    # Opted in: read like any other file.
    ds = CocoDetection(images, ann, train=True, allow_outside_images=True)
    ds.verify_images()
    assert ds[1][0].shape == (3, H, W)
    assert check_coco(ann, images, allow_outside_images=True).ok


def test_a_dotdot_that_stays_inside_is_fine_and_the_config_opts_in(tmp_path: Path) -> None:
    ann = write_dataset(tmp_path, _named("sub/../b.png"))
    (tmp_path / "images" / "sub").mkdir()
    CocoDetection(tmp_path / "images", ann, train=True).verify_images()

    root = tmp_path / "root"
    (root / "annotations").mkdir(parents=True)
    (root / "train").symlink_to(tmp_path / "images")
    (root / "annotations" / "instances_train.json").write_text(json.dumps(_named("../images/b.png")))
    cfg = load_config(None, [f"data.root={root}", "model.num_classes=2", "model.mask_on=true"])
    with pytest.raises(DatasetError, match="outside|leaves the image folder"):
        build_train_dataset(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_train_dataset(load_config(None, [f"data.root={root}", "model.num_classes=2", "data.allow_outside_images=true"]))


# --------------------------------------------------------------------------------------------------
# Bombs and sizes, in the memory-limited harness (Pillow's decoders are native code)
# --------------------------------------------------------------------------------------------------


def test_bombs_and_wrong_sizes_are_caught_from_the_header(tmp_path: Path) -> None:
    bomb_dir = tmp_path / "bomb"
    ann = write_dataset(bomb_dir)
    write_bomb(bomb_dir / "images" / "b.png")
    big_json = copy.deepcopy(base_coco())
    big_json["images"][1].update(height=12_000, width=12_000)
    big = write_dataset(bomb_dir, big_json, "big.json")
    size_dir = tmp_path / "size"
    size_ann = write_dataset(size_dir)
    PIL.Image.new("RGB", (H, W)).save(size_dir / "images" / "b.png")  # transposed: W x H on disk
    cases = []
    for name, path, root in (("bomb", ann, bomb_dir), ("size", size_ann, size_dir), ("big", big, bomb_dir)):
        images = str(root / "images")
        cases += [
            {"name": f"{name}/check", "kind": "cli", "argv": ["data", "check", str(path), "--images", images]},
            {"name": f"{name}/dataset", "kind": "dataset", "image_dir": images, "instances": str(path), "verify": True},
        ]
    got = run_harness(cases, tmp_path, extra_gib=0.5)

    assert got["bomb/check"]["rc"] == 1 and "[error] undecodable_image" in got["bomb/check"]["out"]
    assert "decompression bomb" in got["bomb/check"]["out"]
    err = got["bomb/dataset"]
    assert err["rc"] == 2 and "b.png" in err["err"] and "MAX_IMAGE_PIXELS" in err["err"] and "\n" not in err["err"]
    assert err["where"] == "verify_images"  # before the first step, not when the loader reaches it

    assert got["size/check"]["rc"] == 1 and "[error] image_size_mismatch" in got["size/check"]["out"]
    err = got["size/dataset"]
    assert err["rc"] == 2 and err["where"] == "verify_images", err
    assert "b.png" in err["err"] and f"is {W}x{H} (HxW)" in err["err"] and f"says {H}x{W}" in err["err"]

    assert got["big/check"]["rc"] == 1 and "[error] bad_value" in got["big/check"]["out"]
    assert got["big/dataset"]["rc"] == 2 and "decompression-bomb limit" in got["big/dataset"]["err"]


# --------------------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------------------

GRADIENT16 = (np.arange(H * W, dtype=np.int64).reshape(H, W) * 65535 // (H * W - 1)).astype(np.uint16)


def _expected8(values16: np.ndarray) -> np.ndarray:
    return np.rint(values16.astype(np.float64) * 255 / 65535).astype(np.uint8)


def _grey(array: np.ndarray) -> np.ndarray:
    return np.repeat(array[:, :, None], 3, axis=2)


def test_sixteen_bit_and_other_modes_become_8_bit_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    grey8 = rgb[:, :, 0]
    floats = rng.random((H, W)).astype(np.float32)

    PIL.Image.fromarray(GRADIENT16).save(tmp_path / "i16.png")
    PIL.Image.fromarray(GRADIENT16.astype(np.int32)).save(tmp_path / "i32.tif")
    PIL.Image.fromarray(floats).save(tmp_path / "f01.tif")
    PIL.Image.fromarray(floats * 255).save(tmp_path / "f255.tif")
    PIL.Image.fromarray(grey8).convert("LA").save(tmp_path / "la.png")
    PIL.Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    PIL.Image.fromarray(grey8).convert("P").save(tmp_path / "p.png")
    PIL.Image.fromarray(grey8 > 127).save(tmp_path / "one.png")
    PIL.Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.tif")
    rgb16 = np.stack([GRADIENT16, 65535 - GRADIENT16, np.full_like(GRADIENT16, 257 * 7)], 2).astype(">u2")
    write_png(tmp_path / "rgb48.png", (b"\0" + row.tobytes() for row in rgb16), W, H, 16, 2)

    expected = {
        "i16.png": _grey(_expected8(GRADIENT16)),
        "i32.tif": _grey(_expected8(GRADIENT16)),
        "f01.tif": _grey(np.rint(floats.astype(np.float64) * 255).astype(np.uint8)),
        "f255.tif": _grey(np.rint((floats * 255).astype(np.float64)).astype(np.uint8)),
        "la.png": _grey(grey8),
        "rgba.png": rgb,
        "p.png": _grey(grey8),
        "one.png": _grey(np.where(grey8 > 127, 255, 0).astype(np.uint8)),
        "cmyk.tif": np.asarray(PIL.Image.fromarray(rgb).convert("CMYK").convert("RGB")),
        "rgb48.png": (rgb16.astype(np.int64) >> 8).astype(np.uint8),  # Pillow keeps the high byte
    }
    for name, want in expected.items():
        got = read_rgb(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (H, W, 3), name
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, name
        assert read_image_size(tmp_path / name) == (H, W)
    # The old reading (Pillow's convert) clipped 16-bit values to 255: nearly all white.
    clipped = np.asarray(PIL.Image.open(tmp_path / "i16.png").convert("RGB"))
    assert (clipped == 255).mean() > 0.99 and (read_rgb(tmp_path / "i16.png") == 255).mean() < 0.01


def test_the_dataset_reads_a_16_bit_png_scaled(tmp_path: Path) -> None:
    ann = write_dataset(tmp_path)
    PIL.Image.fromarray(GRADIENT16).save(tmp_path / "images" / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image, _ = CocoDetection(tmp_path / "images", ann, train=True)[0]
    assert np.array_equal(image[0].numpy(), _expected8(GRADIENT16))
