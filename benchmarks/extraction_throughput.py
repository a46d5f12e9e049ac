"""Extraction throughput per architecture: plain fp32 NCHW against the project's fast path.

The fast path is bf16 autocast + channels_last on CPUs with bf16 kernels, fp32 +
channels_last on CPUs without them, autocast + channels_last on CUDA. Images are decoded
once up front, so only the backbone pass is timed; features are compared by cosine.

    python benchmarks/extraction_throughput.py --archs resnet50,densenet121,mobilenet_v2 --images 64
"""

from __future__ import annotations

import time

import torch
from common import emit, machine, make_tree, parser, table, workdir

from breakhis_tl.backbones import build_backbone
from breakhis_tl.features import FastPath, fast_path, pick_device, prepare, run_backbone
from breakhis_tl.images import load_rgb
from breakhis_tl.transforms import decode_transform, normalize


def throughput(bb, x, path, batch):
    """Images per second over `x` (one warm-up batch first) and the features."""
    run_backbone(bb, x[:batch], path)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    feats = [run_backbone(bb, x[i : i + batch], path) for i in range(0, len(x), batch)]
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return len(x) / (time.perf_counter() - t0), torch.cat(feats).float().cpu()


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--archs", default="resnet50,densenet121,mobilenet_v2")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument(
        "--bf16",
        action="store_true",
        help="also time bf16 autocast + channels_last, even where the fast path skips it",
    )
    args = p.parse_args()
    device = pick_device(args.device)
    root = make_tree(workdir(args.workdir, "images"), max(args.images, 8))
    paths = sorted(root.rglob("*.png"))[: args.images]
    rows = []
    for arch in args.archs.split(","):
        bb = build_backbone(arch, "none" if arch != "efficientnet_lite0" else "default")
        decode = decode_transform(bb.prep)
        x = torch.stack([normalize(decode(load_rgb(q)), bb.prep) for q in paths]).to(device)
        plain, fast = fast_path(device, optimised=False), fast_path(device)
        prepare(bb, device, plain)
        ips_plain, f_plain = throughput(bb, x, plain, args.batch)
        prepare(bb, device, fast)
        ips_fast, f_fast = throughput(bb, x, fast, args.batch)
        cos = torch.nn.functional.cosine_similarity(f_plain, f_fast, dim=1)
        extra = {}
        if args.bf16:
            bf16 = FastPath(torch.bfloat16, True)
            ips_bf16, f_bf16 = throughput(bb, x, bf16, args.batch)
            extra = {
                "bf16_images_per_s": round(ips_bf16, 2),
                "bf16_cosine_min": float(
                    torch.nn.functional.cosine_similarity(f_plain, f_bf16, dim=1).min()
                ),
            }
        record = {
            "benchmark": "extraction_throughput",
            **machine(str(device)),
            "arch": arch,
            "images": len(paths),
            "fast_path": fast.describe(),
            "fp32_images_per_s": round(ips_plain, 2),
            "fast_images_per_s": round(ips_fast, 2),
            "speedup": round(ips_fast / ips_plain, 3),
            "cosine_min": float(cos.min()),
            "cosine_mean": float(cos.mean()),
            **extra,
        }
        emit(record)
        rows.append(record)
    table(
        rows,
        [
            "arch",
            "fast_path",
            "fp32_images_per_s",
            "fast_images_per_s",
            "speedup",
            "cosine_min",
            *(["bf16_images_per_s"] if args.bf16 else []),
        ],
    )


if __name__ == "__main__":
    main()
