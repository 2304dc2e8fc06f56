"""Weight files -> a flat ``{name: tensor}`` state and the file's other entries.

Three containers are read: ``torch.save`` zip files (``torch.load(..., weights_only=True)``: tensors,
numbers, strings and containers only), legacy ``torch.save`` pickles (the same loader) and plain
pickles such as detectron2's ``model_final_*.pkl`` and MSRA's ``R-50.pkl`` (through
:mod:`~megdet.modeling.convert.safe_pickle`: numpy arrays, numbers, strings and containers only).
The state is the file itself when it is a state_dict, else its ``model`` entry (megdet, detectron2),
``state_dict`` entry or ``blobs`` entry (Caffe2).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from megdet.modeling.convert.errors import WeightsError
from megdet.modeling.convert.safe_pickle import load_pickle

_ZIP_MAGIC = b"PK\x03\x04"
# Wrappers around a state_dict, in the order they are looked for.
_STATE_ENTRIES = ("model", "state_dict", "blobs")


@dataclass
class WeightsFile:
    """What :func:`read_weights` found: ``state`` (name -> tensor) and the file's other entries (``meta``:
    e.g. ``config`` and ``categories`` of a megdet checkpoint, ``__author__`` of a detectron2 file)."""

    path: Path
    state: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_container(path: str | Path) -> Any:
    """The object stored in ``path`` (torch zip or legacy file, or a pickle), never running code from it."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found (weights are read from a local file, never downloaded)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if path.suffix == ".pkl" and magic != _ZIP_MAGIC:
        return load_pickle(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a foreign or damaged file: one line for all
        if magic[:1] == b"\x80":
            return load_pickle(path)  # a plain pickle under another suffix
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise WeightsError(
                f"{path}: holds objects other than tensors, numbers and strings ({_first_line(e)}); "
                "save its state_dict alone"
            ) from None
        raise WeightsError(f"{path}: not a weights file megdet can read ({_first_line(e)})") from None


def _as_tensor(value: Any, key: str, path: Path) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray | np.generic) and value.dtype.kind in "biuf":
        return torch.from_numpy(np.array(value))  # a writable copy
    kind = f"a numpy {value.dtype} array" if isinstance(value, np.ndarray) else f"a {type(value).__name__}"
    raise WeightsError(f"{path}: entry '{key}' is {kind}, not a tensor")


def split_state(obj: Any, path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state, meta) of a loaded container: its state_dict as tensors (numpy arrays converted, Caffe2's
    ``*_momentum`` optimizer blobs dropped) and its other entries."""
    path = Path(path)
    meta: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for entry in _STATE_ENTRIES:
            if isinstance(obj.get(entry), Mapping):
                meta = {k: v for k, v in obj.items() if k != entry}
                obj = obj[entry]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(
            f"{path}: expected a state_dict (names -> tensors) or a checkpoint with a 'model' state_dict, "
            f"got {type(obj).__name__ if not isinstance(obj, Mapping) else 'an empty mapping'}"
        )
    state = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise WeightsError(f"{path}: state_dict key {key!r} is not a string")
        if key.endswith("_momentum"):
            continue
        state[key] = _as_tensor(value, key, path)
    return state, meta


def recorded_input_format(wf: WeightsFile) -> str | None:
    """The channel order a file says its model reads, or None: detectron2's converter of torchvision
    ResNets marks its files ``"__author__": "torchvision"`` (RGB models in detectron2's names)."""
    return "RGB" if wf.meta.get("__author__") == "torchvision" else None


def read_weights(path: str | Path) -> WeightsFile:
    """Reads a weights file (see the module doc); every problem is a one-line WeightsError."""
    state, meta = split_state(load_container(path), path)
    return WeightsFile(Path(path), state, meta)
