"""Cached features against end to end: the same head, data, epochs and seed, trained from the
feature cache (one backbone pass, extraction included in the time) and with --no-cache (a
backbone pass over every image every epoch, online augmentation).

The compute-mode decision (`fastpath.choose`, which times every candidate mode on one batch
when the dispatch cache has none for this machine and backbone) is made before either run is
timed, into BREAKHIS_TL_DISPATCH_DIR (set to <workdir>/dispatch when unset, so `train` reads
the same file), and reported apart as `choose_seconds` (`choose_cached`: whether it was only
read). `cached_compute`/`end_to_end_compute` are the modes each run used (the same one:
--no-cache reads the same decision).

    python benchmarks/cached_vs_end_to_end.py --arch efficientnet_lite0 --images 96 --epochs 10
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from common import emit, machine, make_tree, parser, table, workdir

from breakhis_tl import fastpath as F
from breakhis_tl.backbones import build_backbone
from breakhis_tl.features import pick_device
from breakhis_tl.runner import RunConfig, run_training
from breakhis_tl.training import TrainConfig


def warm_dispatch(arch: str, weights: str, device: str, work: Path) -> dict:
    """The measured compute-mode decision for `arch`, made now (or read), so that neither
    timed run pays for it: its seconds, whether it was cached already, and the mode."""
    folder = Path(os.environ.setdefault("BREAKHIS_TL_DISPATCH_DIR", str(work / "dispatch")))
    dev = pick_device(device)
    bb = build_backbone(arch, weights, seed=0)  # the seed train uses; random inits share a key
    key = F.dispatch_key(bb, dev, "auto")
    try:
        cached = key in json.loads((folder / F.DISPATCH_FILE).read_text())
    except (OSError, ValueError):
        cached = False
    t0 = time.perf_counter()
    path = F.choose(bb, dev, "auto", cache_dir=folder)
    return {"choose_seconds": round(time.perf_counter() - t0, 2), "choose_cached": cached,
            "dispatch_mode": path.describe()}  # fmt: skip


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
    dispatch = warm_dispatch(args.arch, weights, args.device, work)  # outside the timing
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
        seconds = time.perf_counter() - t0
        out[mode] = (seconds, float(val["balanced_accuracy"].iloc[0]), str(val["compute"].iloc[0]))
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
        **dispatch,
        "cached_compute": out["cached"][2],
        "end_to_end_compute": out["end_to_end"][2],
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
            "choose_seconds",
            "choose_cached",
        ],
    )


if __name__ == "__main__":
    main()
