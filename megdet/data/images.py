"""Reading image files with Pillow: the size from the header alone, and the pixels as 8-bit RGB from any mode.

Every failure is a one-line :class:`DatasetError` naming the file. Images above
``PIL.Image.MAX_IMAGE_PIXELS`` are refused as possible decompression bombs (Pillow itself only warns up to
twice that limit); a genuine larger image needs the limit raised in Python (``PIL.Image.MAX_IMAGE_PIXELS``).

Modes: 16-bit grey (``I;16*``, and ``I``, as which some formats hold 16-bit data) is scaled to 8 bits
(value x 255 / 65535, rounded; Pillow's own conversion clips everything above 255 to white); ``F``
(32-bit float) is read as 0..1 when all its values lie there, else as 0..255, clipped, NaN as 0; every
other mode (``1``, ``L``, ``LA``, ``P``, ``PA``, ``RGBA``, ``CMYK``, ``YCbCr``, 48-bit RGB, ...) goes through
Pillow's conversion to RGB, which drops alpha.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image

from megdet.data.errors import DatasetError

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[PIL.Image.Image]:
    """The image file opened (header only), with Pillow's errors as one-line DatasetErrors."""
    if not path.is_file():
        raise DatasetError(f"{path}: image file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)  # refused below instead
            im = PIL.Image.open(path)
    except PIL.Image.DecompressionBombError as e:
        raise DatasetError(f"{path}: {str(e).split('.')[0]} (a decompression bomb?); replace the file") from None
    except PIL.UnidentifiedImageError:
        raise DatasetError(f"{path}: cannot decode image (not a format Pillow reads); replace or remove the file") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"{path}: cannot decode image ({_reason(e)}); replace or remove the file") from None
    with im:
        w, h = im.size
        limit = PIL.Image.MAX_IMAGE_PIXELS
        if limit is not None and w * h > limit:
            raise DatasetError(
                f"{path}: image is {w}x{h} = {w * h} pixels, more than PIL.Image.MAX_IMAGE_PIXELS = {limit} "
                "(a decompression bomb?); replace the file or raise that limit"
            )
        yield im


def _reason(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def read_image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file, from its header (the pixels are not decoded)."""
    with _opened(Path(path)) as im:
        w, h = im.size
    return h, w


def to_rgb8(im: PIL.Image.Image) -> np.ndarray:
    """The pixels of an open image as a writable (H, W, 3) uint8 RGB array (modes as in the module doc)."""
    if im.mode == "RGB":
        return np.array(im)
    if im.mode in _SIXTEEN_BIT:
        grey = np.asarray(im).astype(np.int64).clip(0, 65535)
        grey = ((grey * 255 + 32767) // 65535).astype(np.uint8)
    elif im.mode == "F":
        values = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.min() >= 0 and values.max() <= 1:
            values = values * 255
        grey = np.rint(values.clip(0, 255)).astype(np.uint8)
    else:
        return np.array(im.convert("RGB"))
    return np.repeat(grey[:, :, None], 3, axis=2)


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file's pixels as a writable (H, W, 3) uint8 RGB array."""
    path = Path(path)
    with _opened(path) as im:
        try:
            return to_rgb8(im)
        except (OSError, ValueError, SyntaxError) as e:  # truncated data, unsupported conversions
            raise DatasetError(f"{path}: cannot decode image ({_reason(e)}); replace or remove the file") from None
