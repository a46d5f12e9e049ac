"""Backbone throughput at several input sizes (`--input-size`), on real IDC patches.

IDC patches are 50x50; the ImageNet default upscales them to 224, which costs (224/96)^2 = 5.4x
the pixels of 96. Each (architecture, size) runs its own measured fast path (`compute.choose`
at that size, as `train --input-size` would) over the same patches, decoded and resized once
before the clock starts (the backbone pass is what the size changes). All pairs are timed
interleaved in rotating order and repeated; a row is the median [min, max] img/s, and the
ratio to 224 px comes from medians. Accuracy at each size: README, "Input size for small
patches" (train runs on ../shared/data/idc_real).

    python benchmarks/input_size.py --sizes 64,96,112,224 --images 256 --repeats 5
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import torch
from common import emit, machine, parser, table, workdir

from breakhis_tl.data.images import load_rgb
from breakhis_tl.data.transforms import decode_transform, normalize
from breakhis_tl.features.extract import pick_device
from breakhis_tl.models import compute as F
from breakhis_tl.models.backbones import build_backbone, with_input_size

SHARED = Path(
    os.environ.get(
        "BREAKHIS_TL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"
    )
)


def patches(folder: Path, n: int) -> list[Path]:
    found = sorted(folder.rglob("*.png"))
    if not found:
        raise SystemExit(f"No PNG patches under {folder}.")
    step = max(1, len(found) // n)  # spread over patients, not the first few folders
    return found[::step][:n]


def setup(archs, sizes, paths, device, args) -> tuple[dict, dict]:
    """Per (arch, size): a function over all patches, and what it runs."""
    fns, info = {}, {}
    images = [load_rgb(p) for p in paths]
    for arch in archs:
        for size in sizes:
            # a fresh module per size: compute.prepare memoises its prepared copies per module
            base = build_backbone(arch, "default" if arch == "efficientnet_lite0" else "none")
            bb = with_input_size(base, size)
            decode = decode_transform(bb.prep)
            x = torch.stack([normalize(decode(im), bb.prep) for im in images]).to(device)
            path = F.choose(bb, device, args.precision, args.cache, batch=x[:8])
            prepared = F.prepare(bb, device, path)

            def fn(p=prepared, x=x, q=path):
                return [F.run_backbone(p, x[i : i + args.batch], q)
                        for i in range(0, len(x), args.batch)]  # fmt: skip

            fn()  # warm-up
            fns[(arch, size)] = fn
            info[(arch, size)] = {"arch": arch, "input_size": size, "mode": path.describe(),
                                  "images": len(x)}  # fmt: skip
    return fns, info


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--data", default=str(SHARED / "idc_real"), help="folder of IDC patches")
    p.add_argument("--archs", default="efficientnet_lite0,mobilenet_v2")
    p.add_argument("--sizes", default="64,96,112,224")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median of these)")
    p.add_argument("--precision", default="auto", choices=F.PRECISIONS)
    args = p.parse_args()
    device = pick_device(args.device)
    args.cache = workdir(args.workdir, "input_size") / "dispatch"
    archs = [a for a in args.archs.split(",") if a]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    paths = patches(Path(args.data), args.images)
    fns, info = setup(archs, sizes, paths, device, args)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    times = F.time_interleaved(fns, args.repeats, sync)
    host = machine(str(device))
    rows = []
    for key, secs in times.items():
        n = info[key]["images"]
        rows.append({
            "benchmark": "input_size", **host, **info[key],
            "images_per_s": round(n / statistics.median(secs), 2),
            "min_images_per_s": round(n / max(secs), 2),
            "max_images_per_s": round(n / min(secs), 2), "repeats": len(secs),
        })  # fmt: skip
    for r in rows:
        base = next((b for b in rows if b["arch"] == r["arch"] and b["input_size"] == 224), None)
        r["vs_224"] = round(r["images_per_s"] / base["images_per_s"], 2) if base else None
        emit(r)
    table(rows, ["arch", "input_size", "mode", "images_per_s", "min_images_per_s",
                 "max_images_per_s", "vs_224"])  # fmt: skip


if __name__ == "__main__":
    main()
