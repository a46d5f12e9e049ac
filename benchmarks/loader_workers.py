"""Loader workers and torch threads for the extraction pass: which setting is fastest here.

The extraction pass decodes every image in DataLoader workers (processes) while the main
process runs the backbone on torch's intra-op threads; on a small machine both compete for
the same cores, so the default worker count (`dataset.default_workers`) was chosen from this
measurement, not assumed. Each setting (workers x threads) runs `extract` (features only,
as `train` would compute them) on the generated tree from a cold cache; the compute mode is
decided before any clock starts, so every setting runs the same mode. Settings run
interleaved, in an order that rotates round by round; each is the median [min, max] of
--repeats rounds, and `vs_default` its median against the default setting's (the default
worker count, torch's own thread count).

Backbones other than efficientnet_lite0 load a batch-norm-calibrated random init saved as a
weights file (`cached_vs_end_to_end.weights_file`), so no setting pays a calibration pass.

    python benchmarks/loader_workers.py --images 256 --workers 0,1,2 --threads 1,2 --repeats 5
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import torch
from cached_vs_end_to_end import spread, warm_dispatch, weights_file
from common import emit, machine, make_tree, parser, table, workdir

from breakhis_tl.dataset import default_workers
from breakhis_tl.runner import RunConfig, run_extraction


def timed_extract(data: Path, work: Path, arch: str, weights: str, device: str,
                  workers: int, threads: int) -> float:  # fmt: skip
    """Seconds of one cold-cache `extract` of every image with this setting."""
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
    return seconds


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--workers", type=ints, default=None, help="comma list (default 0,1,2)")
    p.add_argument("--threads", type=ints, default=None,
                   help="comma list of torch threads (default: torch's own count)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds (median of these)")
    args = p.parse_args()
    work = workdir(args.workdir, "loader_workers")
    data = make_tree(work / f"images{args.images}", args.images)
    own = torch.get_num_threads()
    lite0 = args.arch == "efficientnet_lite0"
    weights = "default" if lite0 else weights_file(args.arch, data, work)
    dispatch = warm_dispatch(args.arch, weights, args.device, work)  # outside the timing
    settings = [(w, t) for w in args.workers or [0, 1, 2] for t in args.threads or [own]]
    default = (default_workers(), own)
    if default not in settings:
        settings.append(default)
    times: dict[tuple[int, int], list[float]] = {s: [] for s in settings}
    for r in range(args.repeats):
        k = r % len(settings)
        for w, t in settings[k:] + settings[:k]:
            times[(w, t)].append(timed_extract(data, work, args.arch, weights, args.device, w, t))
    base = statistics.median(times[default])
    rows = [{"benchmark": "loader_workers", **machine(args.device), "arch": args.arch,
             "images": args.images, "repeats": args.repeats, "workers": w, "torch_threads": t,
             "default": (w, t) == default, "seconds": round(statistics.median(v), 2),
             "spread": spread(v), "images_per_s": round(args.images / statistics.median(v), 1),
             "vs_default": round(base / statistics.median(v), 3), **dispatch}
            for (w, t), v in times.items()]  # fmt: skip
    for row in rows:
        emit(row)
    table(rows, ["arch", "workers", "torch_threads", "default", "seconds", "images_per_s",
                 "vs_default"])  # fmt: skip


if __name__ == "__main__":
    main()
