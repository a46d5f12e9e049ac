"""Full scale: index + extract + train one architecture on a generated tree of N images
(BreakHis size: 7,909 at 700x460), with wall time and peak memory; then a projection of the
default architecture set on the full dataset from measured per-architecture throughput.

    python benchmarks/scale.py --arch efficientnet_lite0 --images 7909
"""

from __future__ import annotations

import time

import torch
from common import emit, machine, make_tree, parser, peak_rss_mib, table, workdir

from breakhis_tl.backbones import DEFAULT_ARCHS, build_backbone
from breakhis_tl.features import fast_path, pick_device, prepare, run_backbone
from breakhis_tl.index import build_index
from breakhis_tl.runner import RunConfig, run_training
from breakhis_tl.training import TrainConfig

FULL = 7909


def per_arch_seconds(device, images: int) -> dict[str, float]:
    """Backbone seconds per image of each default architecture, on the fast path."""
    out = {}
    for arch in DEFAULT_ARCHS:
        bb = build_backbone(arch, "default" if arch == "efficientnet_lite0" else "none")
        path = fast_path(device)
        prepare(bb, device, path)
        size = bb.prep.input_size
        x = torch.randn(images, 3, size, size, device=device)
        run_backbone(bb, x[:4], path)
        t0 = time.perf_counter()
        run_backbone(bb, x, path)
        out[arch] = (time.perf_counter() - t0) / images
        del bb
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--images", type=int, default=FULL)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument(
        "--probe-images", type=int, default=16, help="images per arch for the projection"
    )
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args()
    device = pick_device(args.device)
    work = workdir(args.workdir, "scale")
    t0 = time.perf_counter()
    data = make_tree(
        work / f"images{args.images}", args.images, patients=82 if args.images >= 82 * 4 else None
    )
    generate = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = build_index(data)
    index_s = time.perf_counter() - t0
    weights = "default" if args.arch == "efficientnet_lite0" else "none"
    cfg = RunConfig(
        data=str(data),
        archs=[args.arch],
        weights=weights,
        device=args.device,
        run="scale",
        out=str(work / "out"),
        cache_dir=str(work / f"cache{args.images}"),
        workers=args.workers,
        progress=False,
        train=TrainConfig(epochs=args.epochs, seed=0),
    )
    import shutil

    shutil.rmtree(work / f"cache{args.images}", ignore_errors=True)
    t0 = time.perf_counter()
    res = run_training(cfg, command="benchmark scale")
    run_s = time.perf_counter() - t0
    train_s = float(res.results["train_seconds"].iloc[0])
    record = {
        "benchmark": "scale",
        **machine(str(device)),
        "arch": args.arch,
        "images": len(index),
        "generate_seconds": round(generate, 1),
        "index_seconds": round(index_s, 3),
        "extract_and_train_seconds": round(run_s, 1),
        "train_seconds": round(train_s, 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "target_peak_rss_mib": 4096,
    }
    emit(record)
    table(
        [record],
        [
            "arch",
            "images",
            "index_seconds",
            "extract_and_train_seconds",
            "train_seconds",
            "peak_rss_mib",
        ],
    )
    per_image = per_arch_seconds(device, args.probe_images)
    rows = [
        {
            "arch": a,
            "images_per_s": round(1 / s, 1),
            "projected_full_minutes": round(s * FULL / 60, 1),
        }
        for a, s in per_image.items()
    ]
    total = sum(per_image.values()) * FULL / 60
    emit(
        {
            "benchmark": "scale_projection",
            **machine(str(device)),
            "images": FULL,
            "archs": DEFAULT_ARCHS,
            "per_arch": rows,
            "projected_total_minutes": round(total, 1),
        }
    )
    table(
        rows + [{"arch": "all 7", "projected_full_minutes": round(total, 1)}],
        ["arch", "images_per_s", "projected_full_minutes"],
    )


if __name__ == "__main__":
    main()
