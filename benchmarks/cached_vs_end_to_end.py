"""Cached features against end to end: the same head, data, epochs and seed, trained from the
feature cache (one backbone pass, extraction included in the time) and with --no-cache (a
backbone pass over every image every epoch, online augmentation).

    python benchmarks/cached_vs_end_to_end.py --arch efficientnet_lite0 --images 96 --epochs 10
"""

from __future__ import annotations

import shutil
import time

from common import emit, machine, make_tree, parser, table, workdir

from breakhis_tl.runner import RunConfig, run_training
from breakhis_tl.training import TrainConfig


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args()
    work = workdir(args.workdir, "cached_vs_e2e")
    data = make_tree(work / f"images{args.images}", args.images)
    weights = "default" if args.arch == "efficientnet_lite0" else "none"
    out = {}
    for mode in ("cached", "end_to_end"):
        shutil.rmtree(work / "out", ignore_errors=True)  # a cold cache: extraction is timed
        cfg = RunConfig(
            data=str(data),
            archs=[args.arch],
            weights=weights,
            device=args.device,
            no_cache=mode == "end_to_end",
            run=mode,
            out=str(work / "out"),
            workers=args.workers,
            progress=False,
            train=TrainConfig(epochs=args.epochs, patience=args.epochs, seed=0),
        )
        t0 = time.perf_counter()
        res = run_training(cfg, command=f"benchmark {mode}")
        val = res.results[res.results["split"] == "val"]
        out[mode] = (time.perf_counter() - t0, float(val["balanced_accuracy"].iloc[0]))
    record = {
        "benchmark": "cached_vs_end_to_end",
        **machine(args.device),
        "arch": args.arch,
        "images": args.images,
        "epochs": args.epochs,
        "cached_seconds": round(out["cached"][0], 2),
        "end_to_end_seconds": round(out["end_to_end"][0], 2),
        "speedup": round(out["end_to_end"][0] / out["cached"][0], 2),
        "target_speedup": round(0.8 * args.epochs, 1),
        "cached_val_balanced_accuracy": out["cached"][1],
        "end_to_end_val_balanced_accuracy": out["end_to_end"][1],
    }
    emit(record)
    table(
        [record],
        [
            "arch",
            "images",
            "epochs",
            "cached_seconds",
            "end_to_end_seconds",
            "speedup",
            "cached_val_balanced_accuracy",
            "end_to_end_val_balanced_accuracy",
        ],
    )


if __name__ == "__main__":
    main()
