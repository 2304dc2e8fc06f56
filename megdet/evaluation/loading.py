"""Checkpoint files -> detectors in eval mode, with the config they were trained with."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megdet.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from megdet.config import Config, ConfigError, apply_overrides, config_from_dict


def load_model_and_metadata(
    path: str | Path,
    cfg: Config | None = None,
    device: str | torch.device = "cpu",
    overrides: Sequence[str] = (),
) -> tuple[nn.Module, Config, dict[str, Any]]:
    """Like :func:`load_model_from_checkpoint`, also returning the checkpoint's metadata
    (:meth:`Checkpoint.metadata`: ``config``, ``iteration``, ``categories`` when stored, ...)."""
    from megdet.modeling.convert.checkpoint import converted_checkpoint, is_converted_source
    from megdet.modeling.detector import build_model, load_model_state

    path = Path(path)
    if is_converted_source(path):  # torchvision / detectron2 weights: converted here, nothing re-initialised
        raw, _, cfg = converted_checkpoint(path, cfg, overrides, allow_new_heads=False)
        overrides = ()
    else:
        raw = load_checkpoint(path)
    ckpt = Checkpoint.from_dict(raw)
    if cfg is None:
        if not isinstance(ckpt.config, Mapping):
            raise CheckpointError(
                f"{path}: the checkpoint stores no config; pass the training config with --config"
            )
        try:
            cfg = config_from_dict(dict(ckpt.config))
        except (ConfigError, TypeError) as e:  # TypeError: a hand-edited config, e.g. a non-string key
            raise CheckpointError(f"{path}: its stored config does not load ({e}); pass --config") from None
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    # The backbone's ImageNet weights are overwritten by the checkpoint; do not require their file.
    build_cfg = copy.deepcopy(cfg)
    build_cfg.model.weights = ""
    model = build_model(build_cfg)
    try:
        load_model_state(model, ckpt.model, strict=True)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model.to(device).eval()
    return model, cfg, ckpt.metadata()


def load_model_from_checkpoint(
    path: str | Path,
    cfg: Config | None = None,
    device: str | torch.device = "cpu",
    overrides: Sequence[str] = (),
) -> tuple[nn.Module, Config]:
    """The detector stored in checkpoint ``path``, in eval mode on ``device``, and its config.

    The model is built from ``cfg`` when given, else from the config the checkpoint stores, with the
    ``key.sub=value`` ``overrides`` applied. torchvision and detectron2 detector files are converted
    on the way (:mod:`megdet.modeling.convert.checkpoint`; their config is the source model's). A
    missing, corrupt or non-matching checkpoint (a
    parameter missing, unexpected or of another shape) raises a one-line
    :class:`~megdet.checkpoint.CheckpointError` naming the file.
    """
    model, cfg, _ = load_model_and_metadata(path, cfg, device, overrides)
    return model, cfg
