"""The decoding alone: the loader extraction uses, over the real BreakHis images, with no
backbone: img/s of one decode per image resized to every input size of `--archs` (what
`extract` does) against one decode per input size (what it did), each with the PNG decoder
`data.images.load_rgb` uses (pyspng where installed) and with Pillow.

The four variants run interleaved in rotating order, `--repeats` rounds, with the loader's
workers (`--workers`, default: as extraction on `--device`; the Pillow rows need the fork
start method, Linux's, for the workers to see pyspng switched off); img/s is the median with
[min, max], ratios are of medians. With the most workers a machine has, this is the rate
extraction cannot beat however fast the backbones are.

    python benchmarks/decode_once.py --archs resnet50,inception_v3 --repeats 5
"""

from __future__ import annotations

import time
from pathlib import Path

from common import emit, machine, parser, spread

from breakhis_tl.data import images
from breakhis_tl.data.dataset import StainedImages, collate_hashed, make_loader
from breakhis_tl.data.stain import StainSetup
from breakhis_tl.data.transforms import DecodeSizes, decode_transform
from breakhis_tl.models.backbones import build_backbone

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "breakhis_real"


def one_pass(paths: list[str], transforms: list, workers: int, device: str) -> int:
    """Images through the loader once per transform; returns the decodes made."""
    n = len(paths)
    for t in transforms:
        ds = StainedImages(paths, t, StainSetup(), paths, [1] * n)
        for _ in make_loader(ds, 32, workers, collate_fn=collate_hashed, device=device):
            pass
    return n * len(transforms)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--archs", default="resnet50,inception_v3")
    p.add_argument("--images", type=int, default=148)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    paths = [str(q) for q in sorted(DATA.rglob("*.png"))[: args.images]]
    preps = list({build_backbone(a, "none").prep.decode_key(): build_backbone(a, "none").prep
                  for a in args.archs.split(",")}.values())  # fmt: skip
    variants = {
        "once": [DecodeSizes(preps)],
        "per_size": [decode_transform(q) for q in preps],
    }
    fast = images.pyspng
    times: dict[tuple[str, str], list[float]] = {}
    decodes: dict[tuple[str, str], int] = {}
    keys = [(v, d) for v in variants for d in (["pyspng"] if fast else []) + ["pillow"]]
    for r in range(args.repeats):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            images.pyspng = fast if key[1] == "pyspng" else None  # workers fork after this
            t = time.perf_counter()
            decodes[key] = one_pass(paths, variants[key[0]], args.workers, args.device)
            times.setdefault(key, []).append(len(paths) / (time.perf_counter() - t))
    images.pyspng = fast
    base = spread(times[("per_size", "pillow")])["median"]
    first = {"benchmark": "decode_once", **machine(args.device), "archs": args.archs,
             "input_sizes": sorted(q.input_size for q in preps), "images": len(paths)}  # fmt: skip
    for key, v in times.items():
        s = spread(v)
        emit({**first, "decode": key[0], "decoder": key[1], "decodes": decodes[key],
              "images_per_s": s, "vs_per_size_pillow": round(s["median"] / base, 2)})  # fmt: skip
        first = {}


if __name__ == "__main__":
    main()
