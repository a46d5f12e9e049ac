"""PNG decoders side by side on the real images: Pillow (what `data.images.load_rgb` uses),
`torchvision.io.decode_png`, OpenCV and pyspng, each where it is installed.

Every decoder reads the same files (the 148 real BreakHis images, 700x460, and the first
`--idc` real IDC patches, 50x50) from the page cache, one core, to an RGB uint8 array; the
decoders run interleaved in rotating order, `--repeats` rounds; ms per image is the median
with [min, max], and every decoder's pixels are checked equal to Pillow's.

    python benchmarks/png_decoders.py --repeats 5
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from common import emit, machine, parser, spread
from PIL import Image

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _pillow(data: bytes, path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def decoders() -> dict:
    """Name -> decode(bytes, path) to an RGB uint8 [H, W, 3] array, for those installed."""
    out = {"pillow": _pillow}
    try:
        import torch
        from torchvision.io import ImageReadMode, decode_png

        def tv(data: bytes, path: Path) -> np.ndarray:
            t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return decode_png(t, mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()

        out["torchvision"] = tv
    except ImportError:
        pass
    try:
        import cv2

        cv2.setNumThreads(1)
        out["opencv"] = lambda data, path: cv2.cvtColor(
            cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
        )
    except ImportError:
        pass
    try:
        import pyspng

        out["pyspng"] = lambda data, path: pyspng.load(data)[..., :3]
    except ImportError:
        pass
    return out


def time_set(name: str, files: list[Path], repeats: int) -> list[dict]:
    blobs = [(p, p.read_bytes()) for p in files]
    fns = decoders()
    ref = [_pillow(b, p) for p, b in blobs]
    for k, fn in fns.items():
        if not all(np.array_equal(fn(b, p), r) for (p, b), r in zip(blobs, ref, strict=True)):
            raise SystemExit(f"{k} decodes {name} differently from Pillow")
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for r in range(repeats):
        for k in order[r % len(order) :] + order[: r % len(order)]:
            t = time.perf_counter()
            for p, b in blobs:
                fns[k](b, p)
            times[k].append(1000 * (time.perf_counter() - t) / len(blobs))
    return [{"images": name, "files": len(files), "decoder": k, "ms_per_image": spread(v)}
            for k, v in times.items()]  # fmt: skip


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--idc", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    emit({"machine": machine("cpu")})
    breakhis = sorted((DATA / "breakhis_real").rglob("*.png"))
    idc = sorted((DATA / "idc_real").rglob("*.png"))[: args.idc]
    for name, files in (("breakhis 700x460", breakhis), ("idc 50x50", idc)):
        for row in time_set(name, files, args.repeats):
            emit(row)


if __name__ == "__main__":
    main()
