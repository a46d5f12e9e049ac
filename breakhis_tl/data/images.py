"""Opening an image file as RGB, with one clear sentence for every way a file can be bad."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)


class ImageError(ValueError):
    """A file that cannot be used as an image; the message names it and says why."""


def _to_rgb(im: Image.Image) -> Image.Image:
    # convert("RGB") clips 16-bit values at 255 (a white image); scale them down instead.
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif im.mode in ("P", "PA") and "transparency" in im.info:
        im = im.convert("RGBA")
    return im if im.mode == "RGB" else im.convert("RGB")


try:
    import pyspng
except ImportError:  # optional: Pillow decodes everything, only slower
    pyspng = None

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunks_intact(data: bytes) -> bool:
    """Every chunk up to IEND whole and with its CRC right: pyspng passes a bad ancillary
    chunk that Pillow refuses, and which files a run reads must not depend on the decoder."""
    pos = len(PNG_SIGNATURE)
    while pos + 12 <= len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        end = pos + 8 + size
        if end + 4 > len(data):
            return False
        if zlib.crc32(data[pos + 4 : end]) != int.from_bytes(data[end : end + 4], "big"):
            return False
        if data[pos + 4 : pos + 8] == b"IEND":
            return True
        pos = end + 4
    return False


def _fast_png(path: Path) -> Image.Image | None:
    """A PNG that pyspng decodes to 8-bit RGB (libspng: the same pixels as Pillow, in less
    time; benchmarks/png_decoders.py); None for any other file, or one with a damaged chunk,
    so Pillow reads it and words its error."""
    if pyspng is None or path.suffix.lower() != ".png":
        return None
    data = path.read_bytes()
    if not data.startswith(PNG_SIGNATURE) or len(data) < 24:
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if width * height > (Image.MAX_IMAGE_PIXELS or float("inf")):  # Pillow's bomb check
        return None
    if not _chunks_intact(data):
        return None
    try:
        arr = pyspng.load(data)
    except Exception:  # noqa: BLE001 - Pillow decodes it again and says what is wrong
        return None
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        return None
    return Image.fromarray(arr)


def load_rgb(path: str | Path) -> Image.Image:
    """Decode fully now, so a truncated file fails here and not inside a transform."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"Image {path} is empty (0 bytes).")
        fast = _fast_png(path)
        if fast is not None:
            return fast
        with Image.open(path) as im:
            im.load()
            return _to_rgb(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(
            f"Image {path} is too large to decode safely ({exc}); Pillow refuses images over "
            f"{2 * Image.MAX_IMAGE_PIXELS:,} pixels."
        ) from None
    except UnidentifiedImageError:
        raise ImageError(f"File {path} is not an image that Pillow can read.") from None
    except FileNotFoundError:
        raise ImageError(f"Image {path} does not exist.") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"Image {path} is truncated or corrupt ({exc}).") from None


def as_rgb(item: str | Path | Image.Image) -> Image.Image:
    """A path (opened with `load_rgb`) or an image already in memory, as RGB."""
    return _to_rgb(item) if isinstance(item, Image.Image) else load_rgb(item)


def usable_cores() -> int:
    """Cores this process may run on (a container or taskset can allow fewer than exist)."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
