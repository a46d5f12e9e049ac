"""Cached features against end to end: the same epoch head, data, epochs, seed and
selection (the best epoch by val balanced accuracy), trained from the feature cache (one
backbone pass, extraction included in the time) and with --no-cache (a backbone pass over
every image every epoch, online augmentation). The images are generated (`common.make_tree`:
700x460 PNGs of coloured noise, benign and malignant in two colours): their accuracies only
show that both runs learn.

The head defaults to `linear`: the comparison is about epochs, and the default `logreg` has
none (with --no-cache it makes the cached path's one pass in memory, so both sides would be
the same run). Patience equals --epochs, so every epoch runs on both sides.

The two sides run --repeats times, interleaved (their order alternating round by round), each
from a cold cache; times are the median with [min, max], the speedup is the ratio of the
medians. `end_to_end_epoch_seconds` is the median time of one end-to-end epoch (its backbone
passes over the training and validation images, the head step and the metrics), and
`cached_fixed_seconds` = cached - epochs x cached epoch is what the cached side spends
outside its epochs (index, pixel hashes, calibration, the one extraction pass, the outputs).
`speedup_extremes` pairs the slowest cached run with the fastest end-to-end one and the
reverse. `shared_seconds` (median over the cached runs) is what both sides pay alike
before any feature exists (index and split, building and calibrating the backbone, the
compute modes; per stage in `cached_stages`/`end_to_end_stages`), and
`speedup_beyond_shared` the ratio of the rest: what caching itself changes. (The duplicate
check's pixel hashes are in the rest on both sides: the cached side computes them in its
extraction's decode, end to end in a pass of their own.)

The compute-mode decision (`compute.choose`, which times every candidate mode on one batch
when the dispatch cache has none for this machine and backbone) is made before either run is
timed, into BREAKHIS_TL_DISPATCH_DIR (set to <workdir>/dispatch when unset, so `train` reads
the same file), and reported apart as `choose_seconds` (`choose_cached`: whether it was only
read). `cached_compute`/`end_to_end_compute` are the modes each run used (the same one:
--no-cache reads the same decision).

    python benchmarks/cached_vs_end_to_end.py --arch mobilenet_v2 --images 256 --epochs 10
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

from common import (
    emit,
    machine,
    make_tree,
    parser,
    pick_weights,
    positive,
    spread,
    table,
    warm_dispatch,
    weights_file,
    weights_label,
    workdir,
)

from breakhis_tl.heads.training import TrainConfig
from breakhis_tl.runner import RunConfig, run_training


def timed_run(args, data: Path, work: Path, weights: str, mode: str) -> dict:
    """One run of `mode` from a cold cache: its seconds, balanced accuracy on test (val
    selected the epoch), compute mode and median epoch time."""
    shutil.rmtree(work / "out", ignore_errors=True)  # a cold cache: extraction is timed
    cfg = RunConfig(
        data=str(data), archs=[args.arch], weights=weights, device=args.device,
        no_cache=mode == "end_to_end", run=mode, out=str(work / "out"), workers=args.workers,
        progress=False,
        train=TrainConfig(head=args.head, epochs=args.epochs, patience=args.epochs, seed=0),
    )  # fmt: skip
    t0 = time.perf_counter()
    res = run_training(cfg, command=f"benchmark {mode}")
    seconds = time.perf_counter() - t0
    val = res.results[res.results["split"] == "val"]
    test = res.results[res.results["split"] == "test"]
    shared = sum(v for k, v in res.seconds.items() if k.startswith(SHARED_STAGES))
    return {"seconds": seconds, "val_ba": float(val["balanced_accuracy"].iloc[0]),
            "test_ba": float(test["balanced_accuracy"].iloc[0]),
            "compute": str(val["compute"].iloc[0]), "best_epoch": int(val["best_epoch"].iloc[0]),
            "epoch": statistics.median(res.history["seconds"]), "shared": shared,
            "stages": res.seconds}  # fmt: skip


# Stages both sides run alike before any feature exists (`RunResult.seconds`). Not the
# duplicate check: the cached side hashes in its extraction's decode, end to end apart.
SHARED_STAGES = ("index and split", "backbones", "compute modes")


def stage_medians(runs: list[dict]) -> dict:
    return {k: round(statistics.median(r["stages"].get(k, 0.0) for r in runs), 2)
            for k in runs[0]["stages"]}  # fmt: skip


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--images", type=positive, default=96)
    p.add_argument("--epochs", type=positive, default=10)
    p.add_argument(
        "--head",
        default="linear",
        choices=("linear", "mlp"),
        help="an epoch head (logreg has none: both sides would be one run)",
    )
    p.add_argument(
        "--repeats", type=positive, default=1, help="interleaved rounds (median of these)"
    )
    p.add_argument("--workers", type=int, default=None)
    p.add_argument(
        "--weights",
        choices=("auto", "none", "file"),
        default="auto",
        help="auto: the ImageNet checkpoint where it is at hand (efficientnet_lite0's always, "
        "others' once downloaded into the torch hub cache), else as none; none: random init "
        "with batch-norm calibration in every run; file: a calibrated random init saved as a "
        "weights file (a checkpoint's compute, without its download)",
    )
    args = p.parse_args()
    if args.weights == "file" and args.arch == "efficientnet_lite0":
        p.error("--weights file stands in for a download; efficientnet_lite0 has its weights")
    work = workdir(args.workdir, "cached_vs_e2e")
    data = make_tree(work / f"images{args.images}", args.images)
    if args.weights == "file":
        weights = weights_file(args.arch, data, work)
    else:
        weights = pick_weights(args.arch, args.weights)
    dispatch = warm_dispatch(args.arch, weights, args.device, work)  # outside the timing
    runs = {"cached": [], "end_to_end": []}
    for r in range(args.repeats):
        for mode in ("cached", "end_to_end")[:: 1 if r % 2 == 0 else -1]:
            runs[mode].append(timed_run(args, data, work, weights, mode))
    c, e = ([x["seconds"] for x in runs[m]] for m in ("cached", "end_to_end"))
    c_epoch = statistics.median(x["epoch"] for x in runs["cached"])
    e_epoch = statistics.median(x["epoch"] for x in runs["end_to_end"])
    fixed = statistics.median(c) - args.epochs * c_epoch  # extraction included
    c_own = statistics.median(x["seconds"] - x["shared"] for x in runs["cached"])
    e_own = statistics.median(x["seconds"] - x["shared"] for x in runs["end_to_end"])
    record = {
        "benchmark": "cached_vs_end_to_end", **machine(args.device), "arch": args.arch,
        "weights": weights_label(weights),
        "head": args.head, "images": args.images, "epochs": args.epochs,
        "repeats": args.repeats,
        "cached_seconds": round(statistics.median(c), 2), "cached_spread": spread(c),
        "end_to_end_seconds": round(statistics.median(e), 2), "end_to_end_spread": spread(e),
        "speedup": round(statistics.median(e) / statistics.median(c), 2),
        "speedup_extremes": [round(min(e) / max(c), 2), round(max(e) / min(c), 2)],
        "target_speedup": round(0.8 * args.epochs, 1),
        "cached_epoch_seconds": round(c_epoch, 3), "end_to_end_epoch_seconds": round(e_epoch, 2),
        "cached_fixed_seconds": round(fixed, 2),
        "shared_seconds": round(statistics.median(x["shared"] for x in runs["cached"]), 2),
        "speedup_beyond_shared": round(e_own / c_own, 2),
        "cached_stages": stage_medians(runs["cached"]),
        "end_to_end_stages": stage_medians(runs["end_to_end"]),
        "cached_test_balanced_accuracy": runs["cached"][0]["test_ba"],
        "end_to_end_test_balanced_accuracy": runs["end_to_end"][0]["test_ba"],
        "cached_val_balanced_accuracy": runs["cached"][0]["val_ba"],  # selected the epoch
        "end_to_end_val_balanced_accuracy": runs["end_to_end"][0]["val_ba"],
        "cached_best_epoch": runs["cached"][0]["best_epoch"],
        "end_to_end_best_epoch": runs["end_to_end"][0]["best_epoch"],
        **dispatch,
        "cached_compute": runs["cached"][0]["compute"],
        "end_to_end_compute": runs["end_to_end"][0]["compute"],
    }  # fmt: skip
    emit(record)
    table([record], ["arch", "head", "images", "epochs", "repeats", "cached_seconds",
                     "end_to_end_seconds", "speedup", "end_to_end_epoch_seconds",
                     "cached_fixed_seconds", "shared_seconds", "speedup_beyond_shared",
                     "cached_test_balanced_accuracy",
                     "end_to_end_test_balanced_accuracy", "choose_seconds"])  # fmt: skip


if __name__ == "__main__":
    main()
