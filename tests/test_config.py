"""The config system: YAML loading, `base:` inheritance, overrides, and its one-line errors."""

import re
from pathlib import Path

import pytest

from megdet.config import Config, ConfigError, config_from_dict, config_to_dict, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_round_trip_through_dict_and_yaml(tmp_path: Path) -> None:
    cfg = Config()
    assert config_from_dict(config_to_dict(cfg)) == cfg
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg


def test_base_inheritance_merges_recursively(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("model:\n  backbone: resnet50\n  rpn:\n    nms_thresh: 0.6\nsolver:\n  base_lr: 0.01\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel:\n  rpn:\n    head_convs: 2\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.model.backbone == "resnet50"
    assert cfg.model.rpn.nms_thresh == 0.6 and cfg.model.rpn.head_convs == 2
    assert cfg.solver.base_lr == 0.01


def test_overrides_convert_types(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "model.backbone=resnet101",
            "solver.base_lr=1e-3",
            "solver.epochs=3",
            "model.mask_on=true",
            "data.min_size_train=[200,300]",
            "data.min_size_test=320",
            "model.rpn.aspect_ratios=1",
        ],
    )
    assert cfg.model.backbone == "resnet101"
    assert cfg.solver.base_lr == pytest.approx(1e-3) and isinstance(cfg.solver.base_lr, float)
    assert cfg.solver.epochs == 3.0 and isinstance(cfg.solver.epochs, float)
    assert cfg.model.mask_on is True
    assert cfg.data.min_size_train == [200, 300]
    assert cfg.data.min_size_test == 320
    assert cfg.model.rpn.aspect_ratios == [1.0]


def test_off_on_yes_no_stay_strings(tmp_path: Path) -> None:
    # YAML 1.1 would read these as booleans: train.amp=off was a type error before.
    cfg = load_config(None, ["train.amp=off", "train.sublinear_memory=off", "solver.warmup=false"])
    assert cfg.train.amp == "off" and cfg.train.sublinear_memory == "off" and cfg.solver.warmup is False
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  amp: off\nmodel:\n  mask_on: True\n")
    cfg = load_config(path)
    assert cfg.train.amp == "off" and cfg.model.mask_on is True
    assert load_config(None, ["model.backbone=yes"]).model.backbone == "yes"
    with pytest.raises(ConfigError, match="'solver.warmup': expected true or false, got 'on'"):
        load_config(None, ["solver.warmup=on"])
    assert load_config(None, ["train.amp=off"]) == load_config(None, ["train.amp='off'"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.backbon=resnet50", "unknown config key 'model.backbon'; did you mean 'model.backbone'?"),
        ("model.rpn.nms_tresh=0.5", "did you mean 'model.rpn.nms_thresh'?"),
        ("modle.backbone=x", "did you mean 'model'?"),
        ("model.num_classes=abc", "config key 'model.num_classes': expected an integer, got 'abc'"),
        ("model.mask_on=3", "config key 'model.mask_on': expected true or false"),
        ("solver.base_lr=fast", "config key 'solver.base_lr': expected a number"),
        ("data.min_size_train=[a,b]", "config key 'data.min_size_train[0]': expected an integer"),
        ("model.backbone.depth=50", "'model.backbone' has no sub-keys"),
        ("noequals", "expected key.sub=value"),
    ],
)
def test_bad_overrides_are_one_line_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "unknown.yaml").write_text("model:\n  bakcbone: resnet50\n")
    with pytest.raises(ConfigError, match="did you mean 'model.backbone'"):
        load_config(tmp_path / "unknown.yaml")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_every_shipped_config_loads() -> None:
    files = sorted((REPO / "configs").glob("*.yaml"))
    for f in files:
        load_config(f)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.norm=none"], "model.norm: the ResNet body needs a norm"),
        (["model.rpn.anchor_sizes=[32,64,128]"], "model.rpn.anchor_sizes: expected 5 sizes, one per pyramid level"),
        (["model.rpn.bg_iou_thresh=0.8"], "model.rpn.bg_iou_thresh: 0.8 is above model.rpn.fg_iou_thresh 0.7"),
        (["model.keypoint_on=true", "model.roi.keypoint_loss_weight=-1"], "model.roi.keypoint_loss_weight: expected >= 0"),
        (["model.bn_group_images=3"], "model.bn_group_images=3 does not divide data.images_per_device=2"),
        (["train.channels_last=yes"], "train.channels_last: unknown mode 'yes'; choose one of auto, on, off"),
        (["train.max_iters=0"], "train.max_iters: expected -1 (from solver.epochs) or >= 1, got 0"),
    ],
)
def test_each_section_validates_itself(overrides: list[str], message: str) -> None:
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg.validate()
    load_config(None, []).validate(world_size=8)


def test_world_size_checks_and_the_shared_choice_helper() -> None:
    from megdet.config import BACKBONES, check_choice
    from megdet.modeling.backbone import RESNETS

    cfg = load_config(None, ["model.norm=CrossDeviceBN", "model.bn_group_size=4"])
    cfg.validate(world_size=8)
    with pytest.raises(ConfigError, match="model.bn_group_size=4: the world size 6 is not divisible"):
        cfg.validate(world_size=6)
    with pytest.raises(ValueError, match="^Thing: unknown colour 'red'; choose one of blue, green$") as e:
        check_choice("Thing", "red", ("blue", "green"), "colour")
    assert type(e.value) is ValueError
    assert tuple(RESNETS) == BACKBONES  # every backbone name the config accepts has a constructor
