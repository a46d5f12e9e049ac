"""Decode count: one decode per image per input size, whatever the number of backbones.

python benchmarks/decode_once.py --archs resnet50,densenet121,mobilenet_v2,inception_v3 --images 32
"""

from __future__ import annotations

import time

import numpy as np
from common import emit, machine, make_tree, parser, table, workdir

import breakhis_tl.data.dataset as dataset
from breakhis_tl.features.extract import Request, extract, pick_device
from breakhis_tl.models.backbones import build_backbone


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--archs", default="resnet50,densenet121,mobilenet_v2,inception_v3")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--views", type=int, default=2)
    args = p.parse_args()
    device = pick_device(args.device)
    root = make_tree(workdir(args.workdir, "images"), max(args.images, 8))
    paths = [str(q) for q in sorted(root.rglob("*.png"))[: args.images]]
    decodes = {"n": 0}
    real = dataset.load_rgb

    def counting(path):
        decodes["n"] += 1
        return real(path)

    dataset.load_rgb = counting  # workers=0 below, so every decode happens in this process
    backbones = [
        build_backbone(a, "none" if a != "efficientnet_lite0" else "default")
        for a in args.archs.split(",")
    ]
    rows = np.arange(len(paths))
    reqs = [Request(bb, v, rows) for bb in backbones for v in range(args.views)]
    t0 = time.perf_counter()
    _, report = extract(paths, reqs, None, device, workers=0, progress=False)
    sizes = sorted({bb.prep.input_size for bb in backbones})
    record = {
        "benchmark": "decode_once",
        **machine(str(device)),
        "archs": args.archs,
        "images": len(paths),
        "views": args.views,
        "input_sizes": sizes,
        "decodes": decodes["n"],
        "decodes_per_image": decodes["n"] / len(paths),
        "target_decodes": len(paths) * len(sizes),
        "per_architecture_decodes": len(paths) * len(backbones) * args.views,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    emit(record)
    table(
        [record], ["images", "input_sizes", "decodes", "target_decodes", "per_architecture_decodes"]
    )


if __name__ == "__main__":
    main()
