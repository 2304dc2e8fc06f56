"""Checkpoints: their layout, atomic writes, last-K retention, safe loading.

:class:`Checkpoint` is the one definition of what a checkpoint file holds: the model's state dict, the
iteration, the config and the categories (all that ``model_final.pt`` has), and for a resumable
checkpoint the training state too. The trainer writes it, the trainer's resume and evaluation's
model loading read it; nothing else spells its keys.

On disk a checkpoint is a dict written by ``torch.save`` holding only what ``torch.load(..., weights_only=True)``
accepts: tensors, numbers, strings, booleans, None, lists, tuples and dicts. Anything else (a dataclass,
a numpy array) is refused at save time with the key path that holds it, rather than making the file
unloadable later. :func:`rng_state` / :func:`set_rng_state` convert the RNG states of torch, CUDA,
Python and numpy to and from that form.

Writes are atomic (:mod:`megdet.files`): a crash mid-write leaves the previous checkpoint untouched and
no partially written file under a checkpoint's name.

Integrity: :func:`save_checkpoint` stores a SHA-256 digest of the whole state (every tensor's dtype,
shape and bytes and every other value, in the dict's order) under ``checksum``; :func:`load_checkpoint`
recomputes it and refuses a file whose content changed after it was written (a flipped bit, a
hand edit), and checks the type of every :class:`Checkpoint` field, each with a one-line error. Files
without a checksum (other programs, older megdet versions) load unverified.
:meth:`CheckpointManager.load_latest` falls back to the newest readable checkpoint when the latest is
not, reporting which it skipped and why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from megdet.files import atomic_write, write_text_atomic

LAST_CHECKPOINT = "last_checkpoint"
CHECKSUM_KEY = "checksum"  # "sha256:<hex digest>" of the rest of the state (state_checksum)
_NAME = re.compile(r"^model_(\d{7,})\.pt$")
_SAFE_SCALARS = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (or state that cannot be written); the message is one line."""


@dataclass
class Checkpoint:
    """The layout of a checkpoint file (a dict of these fields; None fields are not stored)."""

    model: Mapping[str, torch.Tensor]  # the detector's state_dict
    iteration: int | None = None  # iterations done
    config: Mapping[str, Any] | None = None  # config_to_dict of the run's Config
    categories: list[Mapping[str, Any]] | None = None  # the training set's COCO categories, in label order
    # The training state: what a resumed run needs besides the weights (absent from model_final.pt).
    optimizer: Mapping[str, Any] | None = None
    scheduler: Mapping[str, Any] | None = None
    scaler: Mapping[str, Any] | None = None  # {} without fp16 loss scaling
    sampler_position: int | None = None  # micro-batches consumed: iteration x grad_accum_steps
    rng: list[Mapping[str, Any]] | None = None  # every rank's rng_state(), in rank order
    schedule: Mapping[str, Any] | None = None  # the resolved ScheduleInfo as a dict
    world_size: int | None = None
    # A checkpoint made by `megdet convert` from another program's weights: the file, its source and
    # the conversion report.
    converted_from: Mapping[str, Any] | None = None

    # The model and the optimizer, scheduler, scaler and RNG states; the other fields are metadata.
    STATE: ClassVar[tuple[str, ...]] = ("model", "optimizer", "scheduler", "scaler", "rng")
    # What each stored field must be (checked by load_checkpoint): types, and their name in errors.
    FIELD_TYPES: ClassVar[dict[str, tuple[tuple[type, ...], str]]] = {
        "model": ((Mapping,), "a dict of tensors"),
        "iteration": ((int,), "a non-negative integer"),
        "config": ((Mapping,), "a dict"),
        "categories": ((list,), "a list of dicts"),
        "optimizer": ((Mapping,), "a dict"),
        "scheduler": ((Mapping,), "a dict"),
        "scaler": ((Mapping,), "a dict"),
        "sampler_position": ((int,), "a non-negative integer"),
        "rng": ((list,), "a list of dicts"),
        "schedule": ((Mapping,), "a dict"),
        "world_size": ((int,), "a positive integer"),
    }

    def to_dict(self) -> dict[str, Any]:
        """What :func:`save_checkpoint` stores: every field that is not None."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> Checkpoint:
        """The fields of a loaded checkpoint dict (keys of other programs are ignored)."""
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls) if f.name in state})

    def metadata(self) -> dict[str, Any]:
        """The stored fields other than the model and the optimizer, scheduler, scaler and RNG states."""
        return {k: v for k, v in self.to_dict().items() if k not in self.STATE}


def _check_safe(obj: Any, where: str) -> None:
    """Raises CheckpointError naming the first value that ``weights_only`` loading would reject."""
    if isinstance(obj, (torch.Tensor, *_SAFE_SCALARS)):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, int | str):
                raise CheckpointError(f"checkpoint state {where}: key {k!r} is not a str or int")
            _check_safe(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _check_safe(v, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"checkpoint state {where}: a {type(obj).__name__} cannot be loaded with weights_only=True;"
        " store tensors, numbers, strings, lists and dicts only"
    )


def _hash_value(h: Any, obj: Any) -> None:
    """Feeds ``obj`` into hash ``h``: type tags, dict keys and tensors' dtype, shape and bytes, in order."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _hash_value(h, k)
            _hash_value(h, v)
    elif isinstance(obj, list | tuple):
        h.update(f"{type(obj).__name__[0]}{len(obj)}".encode())
        for v in obj:
            _hash_value(h, v)
    else:  # scalars (_SAFE_SCALARS): repr is exact for floats and distinguishes True from 1
        text = repr(obj).encode()
        h.update(f"S{type(obj).__name__}:{len(text)}:".encode() + text)


def state_checksum(state: Mapping[str, Any]) -> str:
    """``"sha256:<hex>"`` over every value of ``state`` except its ``checksum`` key."""
    h = hashlib.sha256()
    _hash_value(h, {k: v for k, v in state.items() if k != CHECKSUM_KEY})
    return f"sha256:{h.hexdigest()}"


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Writes ``state`` and its checksum to ``path`` atomically; refuses values that weights_only
    loading would reject.

    Raises:
        CheckpointError: a value weights_only loading would refuse.
        megdet.files.WriteError: the file system refused the write (e.g. a full disk); the previous
            file of that name is unchanged and no temporary file is left.
    """
    path = Path(path)
    _check_safe(state, "")
    stored = {k: v for k, v in state.items() if k != CHECKSUM_KEY}
    stored[CHECKSUM_KEY] = state_checksum(stored)
    atomic_write(path, lambda f: torch.save(stored, f))
    return path


def _check_fields(path: Path, state: Mapping[str, Any]) -> None:
    """One line naming the first field of :class:`Checkpoint` whose stored value has the wrong type."""
    for name, (types, expected) in Checkpoint.FIELD_TYPES.items():
        if state.get(name) is None:
            continue
        value = state[name]
        bad = not isinstance(value, types) or isinstance(value, bool)
        if not bad and isinstance(value, int):
            bad = value < (1 if name == "world_size" else 0)
        if not bad and expected.startswith("a list of dicts"):
            bad = not all(isinstance(v, Mapping) for v in value)
        if not bad and name == "model":
            wrong = next((k for k, v in value.items() if not isinstance(v, torch.Tensor)), None)
            if wrong is not None:
                raise CheckpointError(
                    f"{path}: field 'model' entry {wrong!r} is a {type(value[wrong]).__name__}, not a tensor;"
                    " the file was edited or was not written by megdet"
                )
        if bad:
            raise CheckpointError(
                f"{path}: field '{name}' should be {expected}, found {type(value).__name__} {_short(value)};"
                " the file was edited or was not written by megdet"
            )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Loads a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``, verifies its
    checksum (when it has one) and the types of its fields; returns the state without the checksum.

    Raises:
        CheckpointError: one line for a missing file, a file that is not a checkpoint, a corrupt (e.g.
            truncated or bit-flipped) one, or a field of the wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive; anything else was not written by it.
    if magic != b"PK\x03\x04":
        raise CheckpointError(f"{path}: not a checkpoint (not a file written by torch.save)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path}: not a megdet checkpoint (it holds objects other than tensors, numbers and"
                f" strings: {first})"
            ) from None
        raise CheckpointError(
            f"{path}: corrupt or truncated checkpoint ({first}); use an earlier one"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), Mapping):
        raise CheckpointError(f"{path}: not a megdet checkpoint (no 'model' state dict in it)")
    stored = state.pop(CHECKSUM_KEY, None)
    if stored is not None:
        if stored != state_checksum(state):
            raise CheckpointError(
                f"{path}: checksum mismatch (the file changed after it was written: a corrupted disk or"
                " copy, or an edit); use an earlier checkpoint"
            )
    _check_fields(path, state)
    return state


def checkpoint_iteration(path: str | Path) -> int | None:
    """The iteration in a ``model_XXXXXXX.pt`` file name, or None for another name."""
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


class CheckpointManager:
    """Writes ``out_dir/model_{iteration:07d}.pt``, records it in ``out_dir/last_checkpoint`` and keeps
    the newest ``keep`` checkpoint files (``keep <= 0`` keeps all)."""

    def __init__(self, out_dir: str | Path, keep: int = 3) -> None:
        self.out_dir = Path(out_dir)
        self.keep = keep

    def path_for(self, iteration: int) -> Path:
        return self.out_dir / f"model_{iteration:07d}.pt"

    def checkpoints(self) -> list[Path]:
        """Checkpoint files in ``out_dir``, oldest (lowest iteration) first; a link that leads out of the
        folder is not one."""
        if not self.out_dir.is_dir():
            return []
        found = [(checkpoint_iteration(p), p) for p in self.out_dir.iterdir() if p.is_file() and self._inside(p)]
        return [p for it, p in sorted((it, p) for it, p in found if it is not None)]

    def _inside(self, path: Path) -> bool:
        return path.resolve().parent == self.out_dir.resolve()

    def save(self, iteration: int, state: Mapping[str, Any]) -> Path:
        """Saves, then points ``last_checkpoint`` at it, then prunes; each step leaves a loadable state."""
        path = save_checkpoint(self.path_for(iteration), state)
        write_text_atomic(self.out_dir / LAST_CHECKPOINT, path.name + "\n")
        if self.keep > 0:
            others = [p for p in self.checkpoints() if p != path]
            for old in others[: max(0, len(others) - (self.keep - 1))]:
                old.unlink(missing_ok=True)
        return path

    def latest(self) -> Path | None:
        """The checkpoint named by ``last_checkpoint``, else the highest-iteration file, else None.

        Raises:
            CheckpointError: ``last_checkpoint`` names a file outside ``out_dir`` (a path, ``..``, or a
                link that leads out of it).
        """
        marker = self.out_dir / LAST_CHECKPOINT
        if marker.is_file():
            name = marker.read_text(errors="replace").strip()
            target = self.out_dir / name
            if name and (Path(name).name != name or name in (".", "..") or not self._inside(target)):
                raise CheckpointError(
                    f"{marker}: names {_short(name)}, which is not a file of this run folder; write the name"
                    " of a checkpoint in it (model_XXXXXXX.pt) or delete the file"
                )
            if name and target.is_file():
                return target
        found = self.checkpoints()
        return found[-1] if found else None

    def load_latest(
        self, map_location: str | torch.device = "cpu"
    ) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
        """Loads :meth:`latest`, or when it is unreadable (corrupt, truncated, checksum mismatch, a field
        of the wrong type) the newest earlier checkpoint that loads. Returns ``(path, state, skipped)``,
        ``skipped`` one line per checkpoint passed over and why; ``(None, None, [])`` when there is none.

        Raises:
            CheckpointError: no checkpoint loads (naming each and why), or ``last_checkpoint`` points
                outside ``out_dir``.
        """
        first = self.latest()
        if first is None:
            return None, None, []
        first_iter = checkpoint_iteration(first)
        older = [
            p for p in reversed(self.checkpoints())
            if p != first and (first_iter is None or checkpoint_iteration(p) < first_iter)
        ]  # fmt: skip
        skipped: list[str] = []
        for path in [first, *older]:
            try:
                return path, load_checkpoint(path, map_location), skipped
            except CheckpointError as e:
                skipped.append(str(e))
        raise CheckpointError(f"no readable checkpoint in {self.out_dir}: {'; '.join(skipped)}")


# --------------------------------------------------------------------------------------------------
# RNG states in weights_only-safe form
# --------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The torch (CPU and current CUDA device), Python and numpy RNG states as tensors/lists/numbers."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restores what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
