"""Extraction throughput per architecture: every candidate compute mode against the fast path.

The fast path is what `breakhis_tl.fastpath.choose` picks on this machine (measured on one
batch, cached under the work folder). Every (architecture, mode) pair runs over the same
decoded images, all pairs interleaved in rotating order and repeated, so the load drift of a
shared machine falls on all alike; throughput is the median with min and max, and ratios are
taken from medians. Features are compared with fp32 NCHW by cosine. "unfolded" is the fast
path without folding (and without the TorchScript/compiled graph). `warmup_s` is this run's
prepare + first pass (a mode `choose` already built is not built again; its setup time is in
the dispatch file). `--compile` adds torch.compile modes (30-90 s to compile each).

    python benchmarks/extraction_throughput.py --images 64 --repeats 5
    python benchmarks/extraction_throughput.py --archs vgg16,inception_v3,efficientnet_b0
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch
from common import emit, machine, make_tree, parser, table, workdir

from breakhis_tl import fastpath as F
from breakhis_tl.backbones import build_backbone
from breakhis_tl.features import pick_device
from breakhis_tl.images import load_rgb
from breakhis_tl.transforms import decode_transform, normalize

DEFAULT_ARCHS = "resnet50,densenet121,mobilenet_v2,efficientnet_lite0"


def modes(bb, device, x, args) -> tuple[dict[str, F.FastPath], F.FastPath, float]:
    """Every candidate, the chosen fast path, and its unfolded twin; choose's own time."""
    t0 = time.perf_counter()
    fast = F.choose(bb, device, args.precision, args.cache, batch=x[: args.choose_batch],
                    compile=args.compile)  # fmt: skip
    choose_s = time.perf_counter() - t0
    paths = {p.describe(): p for p in F.candidates(device, args.compile)}
    unfolded = dataclasses.replace(fast, folded=False, jit=False)
    paths.setdefault(fast.describe(), fast)
    paths.setdefault(unfolded.describe(), unfolded)
    return paths, fast, choose_s


def runner(bb, x, path, batch):
    prepared = F.prepare(bb, x.device, path)
    return lambda: [F.run_backbone(prepared, x[i : i + batch], path)
                    for i in range(0, len(x), batch)]  # fmt: skip


def load(arch, paths, device):
    bb = build_backbone(arch, "default" if arch == "efficientnet_lite0" else "none")
    decode = decode_transform(bb.prep)
    x = torch.stack([normalize(decode(load_rgb(q)), bb.prep) for q in paths]).to(device)
    return bb, x


def setup(archs, paths, device, args) -> tuple[dict, dict]:
    """Per (arch, mode): a function over all images, its setup seconds, its cosine to fp32."""
    fns, info = {}, {}
    for arch in archs:
        bb, x = load(arch, paths, device)
        all_paths, fast, choose_s = modes(bb, device, x, args)
        ref = torch.cat(runner(bb, x, F.PLAIN, args.batch)())
        unfolded = dataclasses.replace(fast, folded=False, jit=False)
        for name, path in all_paths.items():
            t0 = time.perf_counter()
            fn = runner(bb, x, path, args.batch)
            feats = torch.cat(fn())  # warm-up: first-call optimisation belongs to setup
            cos = torch.nn.functional.cosine_similarity(ref, feats, dim=1)
            fns[(arch, name)] = fn
            info[(arch, name)] = {
                "arch": arch, "mode": name, "warmup_s": round(time.perf_counter() - t0, 3),
                "cosine_min": float(cos.min()), "fast_path": path == fast,
                "unfolded_fast_path": path == unfolded, "choose_s": round(choose_s, 2),
                "images": len(x),
            }  # fmt: skip
    return fns, info


def summarise(arch, rows) -> dict:
    """Ratios from medians: fast path against the best candidate, fp32 NCHW and unfolded."""
    mine = [r for r in rows if r["arch"] == arch]
    fast = next(r for r in mine if r["fast_path"])
    fp32 = next(r for r in mine if r["mode"] == "fp32")
    unfolded = next(r for r in mine if r["unfolded_fast_path"])
    best = max(mine, key=lambda r: r["images_per_s"] if r["cosine_min"] >= F.MIN_COSINE else 0)
    return {
        "benchmark": "extraction_throughput", "summary": True, "arch": arch,
        "fast_path": fast["mode"], "fp32_images_per_s": fp32["images_per_s"],
        "fast_images_per_s": fast["images_per_s"],
        "fast_range": f"[{fast['min_images_per_s']:.2f}, {fast['max_images_per_s']:.2f}]",
        "unfolded_images_per_s": unfolded["images_per_s"], "best_mode": best["mode"],
        "best_images_per_s": best["images_per_s"],
        "speedup": round(fast["images_per_s"] / fp32["images_per_s"], 3),
        "vs_best": round(fast["images_per_s"] / best["images_per_s"], 3),
        "vs_unfolded": round(fast["images_per_s"] / unfolded["images_per_s"], 3),
        "cosine_min": fast["cosine_min"], "choose_s": fast["choose_s"],
    }  # fmt: skip


def row(host: dict, info: dict, secs: list[float]) -> dict:
    n = info["images"]
    return {"benchmark": "extraction_throughput", **host, **info,
            "images_per_s": round(n / statistics.median(secs), 2),
            "min_images_per_s": round(n / max(secs), 2),
            "max_images_per_s": round(n / min(secs), 2), "repeats": len(secs)}  # fmt: skip


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--archs", default=DEFAULT_ARCHS)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median of these)")
    p.add_argument("--precision", default="auto", choices=F.PRECISIONS)
    p.add_argument("--choose-batch", type=int, default=8, help="images choose() times on")
    p.add_argument("--compile", action="store_true", help="also time torch.compile modes")
    args = p.parse_args()
    device = pick_device(args.device)
    work = workdir(args.workdir, "images")
    args.cache = work / "dispatch"  # a second run reuses the decisions (delete to re-measure)
    root = make_tree(work, max(args.images, 8))
    paths = sorted(root.rglob("*.png"))[: args.images]
    archs = [a for a in args.archs.split(",") if a]
    fns, info = setup(archs, paths, device, args)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    times = F.time_interleaved(fns, args.repeats, sync)
    host = machine(str(device))
    rows = [row(host, info[key], secs) for key, secs in times.items()]
    summaries = [{**host, **summarise(a, rows)} for a in archs]
    for r in summaries + rows:  # summaries first: one line per architecture to read
        emit(r)
    table(rows, ["arch", "mode", "images_per_s", "min_images_per_s", "max_images_per_s",
                 "warmup_s", "cosine_min", "fast_path"])  # fmt: skip
    print()
    table(summaries, ["arch", "fast_path", "fp32_images_per_s", "fast_images_per_s",
                      "fast_range", "unfolded_images_per_s", "best_images_per_s", "speedup",
                      "vs_best", "vs_unfolded", "cosine_min"])  # fmt: skip
    cross(summaries)


def cross(summaries: list[dict]) -> None:
    """efficientnet_lite0's fast path against mobilenet_v2's, measured in the same rounds."""
    by = {s["arch"]: s for s in summaries}
    if "efficientnet_lite0" in by and "mobilenet_v2" in by:
        lite0, mobile = by["efficientnet_lite0"], by["mobilenet_v2"]
        ratio = lite0["fast_images_per_s"] / mobile["fast_images_per_s"]
        emit({"benchmark": "extraction_throughput", "lite0_vs_mobilenet_v2": round(ratio, 3)})


if __name__ == "__main__":
    main()
