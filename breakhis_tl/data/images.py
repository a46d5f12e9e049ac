"""Opening an image file as RGB, with one clear sentence for every way a file can be bad."""

from __future__ import annotations

import logging
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


def load_rgb(path: str | Path) -> Image.Image:
    """Decode fully now, so a truncated file fails here and not inside a transform."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"Image {path} is empty (0 bytes).")
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
