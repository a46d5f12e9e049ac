"""Full scale, with wall time and peak memory, and a projection of the whole extraction.

BreakHis (default): index + extract + train one architecture on a generated tree of N images
(7,909 at 700x460), then backbone-only throughput of each default architecture projected on
the full dataset. IDC (`--dataset idc`): a generated tree of 50x50 patches in the Kaggle
layout (277,524 from 279 patients, the real size), indexed; a sample of patches through the
real `extract` path with the feature cache; the cache filled for every other patch (features
written as extraction would, without the backbone) and one cached pass over all of them,
which is what every later run costs; then the projection in hours per backbone on this
machine and, from `--gpu-img-per-s` (measured by gpu_suite.sh), on one GPU. Peak resident
memory covers the whole run (must stay under 4 GiB). `--projection-only` measures only the
projection (gpu_suite.sh's section c).

    python benchmarks/scale.py --arch efficientnet_lite0 --images 7909
    python benchmarks/scale.py --dataset idc --images 20000 --patients 279
    python benchmarks/scale.py --projection-only --device cuda --probe-images 64
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    IDC_IMAGES,
    IDC_PATIENTS,
    emit,
    machine,
    make_idc_tree,
    make_tree,
    parser,
    peak_rss_mib,
    rss_mib,
    table,
    tree_bytes,
    workdir,
)

from breakhis_tl.data.identity import ImageStore
from breakhis_tl.data.index import build_index
from breakhis_tl.features.cache import FeatureCache
from breakhis_tl.features.extract import Request, extract, feature_space, pick_device, run_backbone
from breakhis_tl.models.backbones import DEFAULT_ARCHS, build_backbone
from breakhis_tl.models.compute import choose, fast_path, prepare

FULL = {"breakhis": 7909, "idc": IDC_IMAGES}
TARGET_RSS_MIB = 4096


def weights_of(arch: str) -> str:
    """ImageNet weights ship with efficientnet_lite0's package; the rest would download, and
    random weights cost the same per image."""
    return "default" if arch == "efficientnet_lite0" else "none"


def per_arch_seconds(
    device: torch.device, archs: list[str], images: int, dispatch: Path | None, rounds: int = 3
) -> dict[str, float]:
    """Backbone-only seconds per image of each architecture on the mode a run would use:
    measured by `choose` (cached in `dispatch`), or with `dispatch` None the unmeasured
    default (`fast_path`: no minutes of timing candidates, for a dry run). The median of
    `rounds` warm passes over one batch, synchronised on a GPU (kernels run asynchronously;
    an unsynchronised clock reads only the launch)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    out = {}
    for arch in archs:
        bb = build_backbone(arch, weights_of(arch))
        size = bb.prep.input_size
        x = torch.randn(images, 3, size, size, device=device)
        path = (
            choose(bb, device, cache_dir=dispatch, batch=x[: min(4, images)], rounds=2)
            if dispatch
            else fast_path(device)
        )
        ready = prepare(bb, device, path)
        run_backbone(ready, x, path)
        secs = []
        for _ in range(rounds):
            sync()
            t0 = time.perf_counter()
            run_backbone(ready, x, path)
            sync()
            secs.append(time.perf_counter() - t0)
        out[arch] = statistics.median(secs) / images
        del bb, ready, x
    return out


def dispatch_dir(default: Path) -> Path:
    """Where compute-mode decisions live: a test session or gpu_suite.sh shares one folder
    (BREAKHIS_TL_DISPATCH_DIR), so each backbone is measured once, not once per script."""
    return Path(os.environ.get("BREAKHIS_TL_DISPATCH_DIR") or default)


def parse_rates(text: str | None) -> dict[str, float]:
    """`arch=img/s,...` (gpu_suite.sh prints these) -> {arch: images per second}."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        arch, _, value = item.partition("=")
        out[arch.strip()] = float(value)
    return out


def projection(device, args, work: Path) -> list[dict]:
    """Hours (and minutes) for every image of each full dataset through each backbone, on
    this device from measured throughput and on one GPU from the rates given; the
    throughput is measured once for all datasets (it does not depend on the image count)."""
    dispatch = dispatch_dir(work / "dispatch") if args.compute == "measured" else None
    secs = per_arch_seconds(device, args.archs, args.probe_images, dispatch)
    return [project(device, args, dataset, secs) for dataset in args.project]


def project(device, args, dataset: str, secs: dict[str, float]) -> dict:
    """One dataset's projection row (and table) from seconds per image per architecture."""
    images, gpu = FULL[dataset], parse_rates(args.gpu_img_per_s)
    rows = []
    for arch, s in secs.items():
        row = {
            "arch": arch,
            "images_per_s": round(1 / s, 1),
            "projected_hours": round(s * images / 3600, 2),
            "projected_minutes": round(s * images / 60, 1),
        }
        if arch in gpu:
            row["gpu_images_per_s"] = gpu[arch]
            row["projected_gpu_hours"] = round(images / gpu[arch] / 3600, 3)
        rows.append(row)
    record = {
        "benchmark": "scale_projection",
        **machine(str(device)),
        "dataset": dataset,
        "images": images,
        "archs": args.archs,
        "probe_images": args.probe_images,
        "compute": args.compute,
        "per_arch": rows,
        "projected_total_hours": round(sum(r["projected_hours"] for r in rows), 2),
    }
    if gpu:
        record["gpu_rates_from"] = args.gpu_device or "given"
        record["projected_gpu_total_hours"] = round(
            sum(r.get("projected_gpu_hours", 0) for r in rows), 3
        )
    emit(record)
    table(
        rows,
        [
            "arch",
            "images_per_s",
            "projected_hours",
            "projected_minutes",
            "gpu_images_per_s",
            "projected_gpu_hours",
        ],
    )
    return record


def run_breakhis(device, args, work: Path) -> dict:
    """Index + extract + train one architecture end to end through `run_training`."""
    from breakhis_tl.heads.training import TrainConfig
    from breakhis_tl.runner import RunConfig, run_training

    t0 = time.perf_counter()
    patients = 82 if args.images >= 82 * 4 else None
    data = make_tree(work / f"images{args.images}", args.images, patients=patients)
    generate = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = build_index(data)
    index_s = time.perf_counter() - t0
    cache = work / f"cache{args.images}"
    shutil.rmtree(cache, ignore_errors=True)
    cfg = RunConfig(
        data=str(data),
        archs=[args.arch],
        weights=weights_of(args.arch),
        device=args.device,
        run="scale",
        out=str(work / "out"),
        cache_dir=str(cache),
        workers=args.workers,
        progress=False,
        train=TrainConfig(epochs=args.epochs, seed=0),
    )
    t0 = time.perf_counter()
    res = run_training(cfg, command="benchmark scale")
    record = {
        "benchmark": "scale",
        **machine(str(device)),
        "dataset": "breakhis",
        "arch": args.arch,
        "images": len(index),
        "generate_seconds": round(generate, 1),
        "index_seconds": round(index_s, 3),
        "extract_and_train_seconds": round(time.perf_counter() - t0, 1),
        "train_seconds": round(float(res.results["train_seconds"].iloc[0]), 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "target_peak_rss_mib": TARGET_RSS_MIB,
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
    return record


def fill_cache(
    cache: FeatureCache, space: str, ids: list[str], dim: int, meta: dict, chunk: int = 4096
) -> None:
    """Cache entries for `ids` as extraction writes them (fp16 chunks of 4,096 images),
    with stand-in features: what a finished extraction leaves, without the backbone."""
    g = torch.Generator().manual_seed(0)
    for i in range(0, len(ids), chunk):
        part = ids[i : i + chunk]
        feats = torch.randn(len(part), dim, generator=g).half()
        cache.save(space, part, feats, torch.ones(len(part), dtype=torch.bool), {}, meta)


def idc_data(args, work: Path) -> tuple[Path, dict]:
    """The generated tree, with how long it took and what it takes on disk."""
    root = work / f"idc{args.images}_{args.patients}"
    t0 = time.perf_counter()
    make_idc_tree(root, args.images, args.patients)
    generate = time.perf_counter() - t0
    size, disk = tree_bytes(root)
    return root, {
        "generate_seconds": round(generate, 1),
        "tree_mib": round(size / 2**20, 1),
        "disk_mib": round(disk / 2**20, 1),
    }


def timed_extract(paths: list[str], bb, path, cache, store, device, args):
    """`extract` of view 0 over every path in the list, with its wall time."""
    t0 = time.perf_counter()
    got, rep = extract(
        paths,
        [Request(bb, 0, np.arange(len(paths)), path)],
        cache,
        device,
        store,
        batch_size=args.batch,
        workers=args.workers,
        progress=False,
    )
    return got, rep, time.perf_counter() - t0


def idc_extraction(device, args, paths: list[str], cache_root: Path) -> dict:
    """A cold sample through `extract` (images/s: decode, upscale, backbone, cache write);
    only the sample's files are hashed here, every other patch in `cached_pass`."""
    bb = build_backbone(args.arch, weights_of(args.arch))
    path = choose(bb, device, cache_dir=dispatch_dir(cache_root))
    store, cache = ImageStore(cache_root / "images.sqlite"), FeatureCache(cache_root / "features")
    n = min(args.sample, len(paths))
    sample = np.sort(np.random.default_rng(0).choice(len(paths), n, replace=False))
    _, rep, secs = timed_extract([paths[i] for i in sample], bb, path, cache, store, device, args)
    out = {
        "sample_images": rep.images_extracted,
        "sample_seconds": round(secs, 2),
        "extract_images_per_s": round(rep.images_extracted / secs, 2),
        "extract_path": path.describe(),
        "rss_after_sample_mib": round(rss_mib(), 1),
    }
    if not args.no_fill:
        out.update(cached_pass(device, args, paths, (bb, path, cache, store, sample)))
    return out


def cached_pass(device, args, paths: list[str], setup: tuple) -> dict:
    """Every patch's content id (a first run hashes all files), the cache filled for the
    patches not extracted, then one `extract` over all of them: what each later run pays,
    and the memory of a 277k-row lookup (fp16 features of every patch at once)."""
    bb, path, cache, store, sample = setup
    t0 = time.perf_counter()
    ids = store.content_ids(paths)
    hashed = time.perf_counter() - t0
    known = {ids[i] for i in sample}  # extracted for real: already cached
    space = feature_space(bb, 0, path)
    meta = {"arch": bb.name, "weights": bb.weights_id, "prep": bb.prep.to_dict(), "view": 0}
    t0 = time.perf_counter()
    fill_cache(cache, space, [i for i in ids if i not in known], bb.feature_dim, meta)
    filled = time.perf_counter() - t0
    got, rep, secs = timed_extract(paths, bb, path, cache, store, device, args)
    return {
        "content_ids_seconds": round(hashed, 1),
        "cache_fill_seconds": round(filled, 1),
        "cached_pass_seconds": round(secs, 1),
        "cached_pass_extracted": rep.images_extracted,  # 0: every patch came from the cache
        "cached_pass_ok": int(got[0][1].sum()),
        "rss_after_cached_pass_mib": round(rss_mib(), 1),
    }


def run_idc(device, args, work: Path) -> dict:
    """Generate, index, extract a sample, fill and read the cache for every patch."""
    root, disk = idc_data(args, work)
    t0 = time.perf_counter()
    index = build_index(root, "idc")
    index_s = time.perf_counter() - t0
    rss_index = rss_mib()
    cache_root = work / f"idc_cache{args.images}"
    shutil.rmtree(cache_root, ignore_errors=True)
    ext = idc_extraction(device, args, index["path"].tolist(), cache_root)
    record = {
        "benchmark": "scale_idc",
        **machine(str(device)),
        "dataset": "idc",
        "arch": args.arch,
        "images": len(index),
        "patients": index["patient"].nunique(),
        "idc_share": round(float((index["label"] == "idc").mean()), 3),
        **disk,
        "index_seconds": round(index_s, 2),
        "rss_after_index_mib": round(rss_index, 1),
        **ext,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "target_peak_rss_mib": TARGET_RSS_MIB,
    }
    emit(record)
    table(
        [record],
        [
            "images",
            "patients",
            "generate_seconds",
            "disk_mib",
            "index_seconds",
            "extract_images_per_s",
            "content_ids_seconds",
            "cached_pass_seconds",
            "peak_rss_mib",
        ],
    )
    return record


def arguments() -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--dataset", default="breakhis", choices=sorted(FULL))
    p.add_argument("--arch", default="efficientnet_lite0", help="the architecture run for real")
    p.add_argument("--images", type=int, default=None, help="7,909 (BreakHis) / 277,524 (IDC)")
    p.add_argument("--patients", type=int, default=IDC_PATIENTS, help="IDC patients")
    p.add_argument("--epochs", type=int, default=30, help="BreakHis: head epochs")
    p.add_argument("--sample", type=int, default=256, help="IDC: patches extracted for real")
    p.add_argument("--batch", type=int, default=32, help="IDC: extraction batch")
    p.add_argument("--no-fill", action="store_true", help="IDC: skip the full cached pass")
    p.add_argument("--archs", default=",".join(DEFAULT_ARCHS), help="projected architectures")
    p.add_argument("--probe-images", type=int, default=16, help="batch per arch (projection)")
    p.add_argument(
        "--compute",
        default="measured",
        choices=["measured", "default"],
        help="projection: the mode choose() measures, or the unmeasured default",
    )
    p.add_argument("--gpu-img-per-s", default=None, help="arch=img/s,... measured on a GPU")
    p.add_argument("--gpu-device", default=None, help="which GPU gave --gpu-img-per-s")
    p.add_argument("--projection-only", action="store_true", help="only the projection")
    p.add_argument("--project", default=None, help="datasets projected (default: --dataset)")
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args()
    args.images = args.images or FULL[args.dataset]
    args.archs = [a for a in args.archs.split(",") if a]
    args.project = [d for d in (args.project or args.dataset).split(",") if d]
    if unknown := set(args.project) - set(FULL):
        p.error(f"--project: unknown dataset(s) {', '.join(sorted(unknown))}")
    return args


def main() -> None:
    args = arguments()
    device = pick_device(args.device)
    work = workdir(args.workdir, "scale")
    if not args.projection_only:
        (run_idc if args.dataset == "idc" else run_breakhis)(device, args, work)
    projection(device, args, work)
    emit(
        {
            "benchmark": "scale_peak",
            **machine(str(device)),
            "dataset": args.dataset,
            "peak_rss_mib": round(peak_rss_mib(), 1),
            "target_peak_rss_mib": TARGET_RSS_MIB,
        }
    )


if __name__ == "__main__":
    main()
