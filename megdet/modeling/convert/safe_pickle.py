"""Reading ``.pkl`` weight files without running what they say.

A pickle is a program: unpickling may import and call anything its author named. detectron2's model
zoo and MSRA's ImageNet files are pickled dicts of numpy arrays, so :class:`RestrictedUnpickler`
resolves only what rebuilding those needs -- numpy's array, dtype and scalar reconstruction and
``OrderedDict`` -- and refuses every other global with a one-line error. Strings, numbers, lists,
tuples and dicts need no global. Python 2 files (MSRA's) are read with ``encoding="latin1"``.
"""

from __future__ import annotations

import codecs
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from megdet.modeling.convert.errors import WeightsError

# numpy >= 2 keeps its internals in numpy._core; files written by numpy 1.x name numpy.core.
_CORE = getattr(np, "_core", None) or np.core


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (latin-1 only; nothing else runs)."""
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"refused codec '{encoding}' (only latin-1 byte strings are read)")
    return codecs.encode(text, "latin1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
}
for _module in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_module}.multiarray", "_reconstruct")] = _CORE.multiarray._reconstruct
    _ALLOWED[(f"{_module}.multiarray", "scalar")] = _CORE.multiarray.scalar
    _ALLOWED[(f"{_module}.numeric", "_frombuffer")] = _CORE.numeric._frombuffer


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that rebuilds numpy arrays, numbers, strings and containers, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: a weights file may hold only numpy arrays, numbers, "
                "strings, lists and dicts"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent id (a legacy torch.save file is read with torch.load)")


def load_pickle(path: str | Path) -> Any:
    """The object pickled in ``path``, through :class:`RestrictedUnpickler`; any problem is a one-line
    :class:`~megdet.modeling.convert.errors.WeightsError` naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise WeightsError(f"{path}: {str(e).splitlines()[0] if str(e) else 'not a pickle'}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise WeightsError(f"{path}: not a readable pickle ({reason})") from None
