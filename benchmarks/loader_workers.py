"""Loader workers and torch threads for the extraction pass: which setting is fastest here.

The extraction pass decodes every image in DataLoader workers (processes) while the main
process runs the backbone on torch's intra-op threads; on a small machine both compete for
the same cores, so the best setting depends on the machine and the backbone (the default
worker count, `dataset.default_workers`, came from an earlier sweep of this kind). Each
setting (workers x threads) runs `extract` (features only, as `train` computes them) on the
generated tree from a cold cache, the whole `run_extraction` call (what `extract` runs) timed
in this process (index, backbone load and pixel hashes included: `run_images_per_s` is
images over those seconds). The compute mode is
decided before any clock starts and each row reports the mode its runs used; one untimed
extract at the default setting warms the process first. Settings run interleaved, in an
order that rotates round by round; each row is the median [min, max] of its runs, and
`vs_default` the default setting's median over its own (the default worker count, torch's
own thread count).

Backbones other than efficientnet_lite0 load their ImageNet checkpoint where it is in the
torch hub cache, else a batch-norm-calibrated random init saved as a weights file
(`common.weights_file`), so no setting pays a calibration pass.

    python benchmarks/loader_workers.py --images 256 --workers 0,1,2 --threads 1,2 --repeats 5
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch
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

from breakhis_tl.data.dataset import default_workers
from breakhis_tl.models.backbones import REGISTRY
from breakhis_tl.runner import RunConfig, run_extraction


def timed_extract(data: Path, work: Path, arch: str, weights: str, device: str,
                  workers: int, threads: int) -> tuple[float, str]:  # fmt: skip
    """Seconds of one cold-cache `extract` of every image with this setting, and its mode."""
    shutil.rmtree(work / "out", ignore_errors=True)
    cfg = RunConfig(data=str(data), archs=[arch], weights=weights, device=device,
                    out=str(work / "out"), workers=workers, progress=False)  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        info = run_extraction(cfg)
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    if info["extracted"] != info["images"]:
        raise SystemExit(f"extracted {info['extracted']} of {info['images']} images")
    return seconds, info["modes"][arch]


def counts(text: str, least: int) -> list[int]:
    """A comma list of distinct whole numbers >= `least`, for argparse."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of numbers") from None
    if not values or min(values) < least or len(set(values)) < len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct numbers >= {least}")
    return values


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--images", type=positive, default=96)
    p.add_argument("--workers", type=lambda t: counts(t, 0), default=[0, 1, 2],
                   help="comma list of loader worker counts (default 0,1,2)")  # fmt: skip
    p.add_argument("--threads", type=lambda t: counts(t, 1), default=None,
                   help="comma list of torch threads (default: torch's own count)")  # fmt: skip
    p.add_argument(
        "--repeats", type=positive, default=3, help="interleaved rounds (median of these)"
    )
    args = p.parse_args()
    if args.arch not in REGISTRY:
        p.error(f"{args.arch}: a registry backbone ({', '.join(REGISTRY)})")
    work = workdir(args.workdir, "loader_workers")
    data = make_tree(work / f"images{args.images}", args.images)
    own = torch.get_num_threads()
    weights = pick_weights(args.arch, "auto")
    if weights == "none":  # no checkpoint at hand: a stand-in, so no run calibrates
        weights = weights_file(args.arch, data, work)
    dispatch = warm_dispatch(args.arch, weights, args.device, work)  # outside the timing
    default = (default_workers(), own)
    settings = [(w, t) for w in args.workers for t in args.threads or [own]]
    settings += [default] if default not in settings else []
    timed_extract(data, work, args.arch, weights, args.device, *default)  # warm-up, untimed
    times: dict[tuple[int, int], list[float]] = {s: [] for s in settings}
    modes: dict[tuple[int, int], set[str]] = {s: set() for s in settings}
    for r in range(args.repeats):
        k = r % len(settings)
        for w, t in settings[k:] + settings[:k]:
            seconds, mode = timed_extract(data, work, args.arch, weights, args.device, w, t)
            times[(w, t)].append(seconds)
            modes[(w, t)].add(mode)
    emit_rows(args, times, modes, default, {"weights": weights_label(weights), **dispatch})


def emit_rows(args, times: dict, modes: dict, default: tuple[int, int], dispatch: dict) -> None:
    """One row per setting; `compute` lists every mode its runs used (one, normally)."""
    base, med = statistics.median(times[default]), statistics.median
    rows = [{"benchmark": "loader_workers", **machine(args.device), "arch": args.arch,
             "images": args.images, "repeats": args.repeats, "workers": w, "torch_threads": t,
             "default": (w, t) == default, "runs": len(v), "seconds": round(med(v), 2),
             "spread": spread(v), "run_images_per_s": round(args.images / med(v), 1),
             "vs_default": round(base / med(v), 3),
             "compute": " | ".join(sorted(modes[(w, t)])), **dispatch}
            for (w, t), v in times.items()]  # fmt: skip
    for row in rows:
        emit(row)
    table(rows, ["arch", "workers", "torch_threads", "default", "seconds", "run_images_per_s",
                 "vs_default", "compute"])  # fmt: skip


if __name__ == "__main__":
    main()
