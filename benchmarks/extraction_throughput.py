"""Extraction throughput per architecture: every candidate compute mode against the fast path.

The fast path is what `breakhis_tl.models.compute.choose` picks on this machine (measured on one
batch, cached under the work folder). Every (architecture, mode) pair runs over the same
decoded images, all pairs interleaved in rotating order and repeated, so the load drift of a
shared machine falls on all alike; throughput is the median with min and max, and ratios are
taken from medians. Features are compared with fp32 NCHW by cosine. "unfolded" is the fast
path without folding. `warmup_s` is this run's
prepare + first pass (a mode `choose` already built is not built again; its setup time is in
the dispatch file).

Architectures are the registry's, `timm:<name>`, or the pathology foundation presets
(breakhis_tl/models/foundation.py: uni, uni2_h, virchow2, h_optimus_0, prov_gigapath, ...), each
with its own preprocessing (input size, resize, mean/std, interpolation) and, unless
`--batch` is given, its own extraction batch (`FoundationSpec.batch_size`, sized for an
8 GiB CPU peak). `--weights`: default (published/ImageNet), none (seeded random init, no
download) or a weights file, for every architecture, with `arch=value` overrides as in
`train --weights`; left out, efficientnet_lite0 takes its offline ImageNet weights and every
other architecture random weights (the same cost per image, nothing downloaded).

`--modes` times only the named modes (FastPath.describe() text, bf16 for bfloat16), with
fp32 always among them, and skips `choose`: it builds a copy of the backbone per candidate,
about 30 GiB at once for a ViT-g. `bfloat16` (autocast) runs the model as built, with no
copy; `bfloat16 weights` keeps a bf16 copy (half the fp32 size; building it passes through
an fp32 copy).

Each row has `peak_rss_mib`: the process's peak resident set while that mode ran its timed
passes (reset before each pass, Linux /proc/self/clear_refs), which includes everything the
process held at the time (every timed mode's copies, the other architectures, the images);
`setup_peak_rss_mib` is the same over its build and first pass. Run one large backbone per
process for its own footprint. `process_peak_rss_mib` is the whole run's peak.

`load_avg_1m_start`/`_end` say how busy the machine was: on a shared 2-core machine, two
torch threads wait for each other whenever the other core is taken (a tiny ViT ran 50x
slower on 2 threads than on 1 at load 4), so compare only numbers from one run, or pass
--threads 1 there.

    python benchmarks/extraction_throughput.py --images 64 --repeats 5
    python benchmarks/extraction_throughput.py --archs vgg16,inception_v3,efficientnet_b0
    python benchmarks/extraction_throughput.py --archs uni --images 16 --modes fp32,bf16
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from pathlib import Path

import torch
from common import (
    emit,
    hwm_mib,
    machine,
    make_tree,
    parser,
    preset_batch,
    reset_peak_rss,
    table,
    workdir,
)

from breakhis_tl.data.images import load_rgb
from breakhis_tl.data.transforms import decode_transform, normalize
from breakhis_tl.errors import UserError
from breakhis_tl.features.extract import pick_device
from breakhis_tl.models import compute as F
from breakhis_tl.models import foundation
from breakhis_tl.models.backbones import build_backbone, check_arch
from breakhis_tl.runner import weights_for as run_weights_for

DEFAULT_ARCHS = "resnet50,densenet121,mobilenet_v2,efficientnet_lite0"
DEFAULT_BATCH = 32
_FLAGS = ("channels_last", "folded")
_SHORT = {"bf16": "bfloat16", "fp16": "float16"}


def default_weights(arch: str) -> str:
    """Without --weights: lite0's offline ImageNet weights, random weights for the rest."""
    return "default" if arch == "efficientnet_lite0" else "none"


def weights_for(spec: str | None, arch: str) -> str:
    """`--weights` for one architecture: none, default or a file, `arch=value` overriding."""
    return default_weights(arch) if spec is None else run_weights_for(spec, arch)


def check_weights(value: str) -> None:
    if value not in ("none", "default") and not Path(value).is_file():
        raise UserError(
            f"--weights must be default, none or a weights file; {value} is not a file."
        )


def batch_for(arch: str, batch: int | None) -> int:
    """`--batch` if given, else a foundation preset's own batch, else 32."""
    return batch if batch is not None else preset_batch(arch, DEFAULT_BATCH)


def parse_mode(text: str) -> F.FastPath:
    """A mode as FastPath.describe() writes it ("bfloat16 weights + channels_last"); bf16
    and fp16 stand for bfloat16 and float16."""
    first, *flags = [t.strip() for t in text.strip().split("+")]
    dtype, _, rest = first.partition(" ")
    dtype = _SHORT.get(dtype, dtype)
    unknown = [f for f in flags if f not in _FLAGS]
    if dtype not in ("fp32", "bfloat16", "float16") or rest not in ("", "weights") or unknown:
        raise UserError(
            f"Unknown mode {text!r}: a dtype (fp32, bf16/bfloat16, fp16/float16), 'weights' "
            f"after it to cast the weights, then any of + {', + '.join(_FLAGS)}."
        )
    return F.FastPath.from_dict({"autocast": dtype, "cast": rest == "weights" and dtype != "fp32",
                                 **{f: f in flags for f in _FLAGS}})  # fmt: skip


def modes(bb, device, x, args) -> tuple[dict[str, F.FastPath], F.FastPath | None, float | None]:
    """The modes to time (fp32 NCHW first), the chosen fast path and choose's own time; with
    --modes, those modes only and no choose (None, None)."""
    if args.mode_list is not None:
        paths = [F.PLAIN, *args.mode_list]
        return {p.describe(): p for p in paths}, None, None
    t0 = time.perf_counter()
    fast = F.choose(bb, device, args.precision, args.cache, batch=x[: args.choose_batch])
    choose_s = time.perf_counter() - t0
    unfolded = dataclasses.replace(fast, folded=False)
    paths = [F.PLAIN, *F.candidates(device, None), *F.candidates(device, F.low_dtype(device))]
    paths += [fast, unfolded]
    return {p.describe(): p for p in paths}, fast, choose_s


def runner(bb, x, path, batch):
    prepared = F.prepare(bb, x.device, path)
    return lambda: [F.run_backbone(prepared, x[i : i + batch], path)
                    for i in range(0, len(x), batch)]  # fmt: skip


def load(arch, weights, paths, device):
    bb = build_backbone(arch, weights)
    decode = decode_transform(bb.prep)
    x = torch.stack([normalize(decode(load_rgb(q)), bb.prep) for q in paths]).to(device)
    return bb, x


class Peaks:
    """Peak resident set per (arch, mode): reset before each of its passes, read after."""

    def __init__(self):
        self.per_call = reset_peak_rss()  # False: only the process's monotone peak exists
        self.timed: dict = {}
        self.process = hwm_mib()

    def start(self) -> None:
        if self.per_call:
            self.process = max(self.process, hwm_mib())
            reset_peak_rss()

    def read(self) -> float:
        peak = hwm_mib()
        self.process = max(self.process, peak)
        return peak

    def wrap(self, key, fn):
        def call():
            self.start()
            out = fn()
            self.timed[key] = max(self.timed.get(key, 0.0), self.read())
            return out

        return call


def setup(archs, paths, device, args, peaks: Peaks) -> tuple[dict, dict]:
    """Per (arch, mode): a function over all images, its setup seconds, its cosine to fp32."""
    fns, info = {}, {}
    for arch in archs:
        weights = weights_for(args.weights, arch)
        peaks.start()
        bb, x = load(arch, weights, paths, device)
        build_peak = peaks.read()
        batch = batch_for(arch, args.batch)
        all_paths, fast, choose_s = modes(bb, device, x, args)
        unfolded = dataclasses.replace(fast, folded=False) if fast else None
        estimate = None
        if foundation.is_foundation(arch):
            estimate = round(foundation.peak_memory_estimate(arch, min(batch, len(x))) / 2**20)
        ref = None
        for name, path in all_paths.items():  # fp32 NCHW first: its features are the reference
            peaks.start()
            t0 = time.perf_counter()
            fn = runner(bb, x, path, batch)
            feats = torch.cat(fn())  # warm-up: first-call optimisation belongs to setup
            warmup_s = time.perf_counter() - t0
            ref = feats if ref is None else ref
            fns[(arch, name)] = peaks.wrap((arch, name), fn)
            info[(arch, name)] = {
                "arch": arch, "mode": name, "weights": weights, "weights_id": bb.weights_id,
                "input_size": bb.prep.input_size, "batch": batch,
                "warmup_s": round(warmup_s, 3), "cosine_min": F.cosine_min(ref, feats),
                "fast_path": fast is not None and path == fast,
                "unfolded_fast_path": unfolded is not None and path == unfolded,
                "choose_s": None if choose_s is None else round(choose_s, 2),
                "images": len(x), "build_peak_rss_mib": round(build_peak, 1),
                "setup_peak_rss_mib": round(peaks.read(), 1),
                "estimated_peak_mib": estimate,
            }  # fmt: skip
    return fns, info


def summarise(arch, rows) -> dict:
    """Ratios from medians: every mode against fp32 NCHW; with a chosen fast path, the fast
    path against the best candidate, fp32 NCHW and unfolded."""
    mine = [r for r in rows if r["arch"] == arch]
    fp32 = next(r for r in mine if r["mode"] == "fp32")
    best = max(mine, key=lambda r: r["images_per_s"] if r["cosine_min"] >= F.MIN_COSINE else 0)
    out = {
        "benchmark": "extraction_throughput", "summary": True, "arch": arch,
        "weights": fp32["weights"], "batch": fp32["batch"], "images": fp32["images"],
        "fp32_images_per_s": fp32["images_per_s"],
        "fp32_range": f"[{fp32['min_images_per_s']:.2f}, {fp32['max_images_per_s']:.2f}]",
        "best_mode": best["mode"], "best_images_per_s": best["images_per_s"],
        "modes": {r["mode"]: {k: r[k] for k in ("images_per_s", "min_images_per_s",
                                                "max_images_per_s", "vs_fp32", "cosine_min",
                                                "peak_rss_mib")} for r in mine},
        "peak_rss_mib": max(r["peak_rss_mib"] for r in mine),
        "setup_peak_rss_mib": max(r["setup_peak_rss_mib"] for r in mine),
    }  # fmt: skip
    fast = next((r for r in mine if r["fast_path"]), None)
    if fast is None:
        return out
    unfolded = next(r for r in mine if r["unfolded_fast_path"])
    return out | {
        "fast_path": fast["mode"], "fast_images_per_s": fast["images_per_s"],
        "fast_range": f"[{fast['min_images_per_s']:.2f}, {fast['max_images_per_s']:.2f}]",
        "unfolded_images_per_s": unfolded["images_per_s"],
        "speedup": round(fast["images_per_s"] / fp32["images_per_s"], 3),
        "vs_best": round(fast["images_per_s"] / best["images_per_s"], 3),
        "vs_unfolded": round(fast["images_per_s"] / unfolded["images_per_s"], 3),
        "cosine_min": fast["cosine_min"], "choose_s": fast["choose_s"],
    }  # fmt: skip


def row(host: dict, info: dict, secs: list[float], peak: float, fp32_secs: list[float]) -> dict:
    n = info["images"]
    return {"benchmark": "extraction_throughput", **host, **info,
            "images_per_s": round(n / statistics.median(secs), 2),
            "min_images_per_s": round(n / max(secs), 2),
            "max_images_per_s": round(n / min(secs), 2), "repeats": len(secs),
            "vs_fp32": round(statistics.median(fp32_secs) / statistics.median(secs), 3),
            "peak_rss_mib": round(peak, 1)}  # fmt: skip


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--archs", default=DEFAULT_ARCHS,
                   help="registry names, timm:<name> or foundation presets")  # fmt: skip
    p.add_argument("--weights", default=None,
                   help="default, none or a weights file, with arch=value overrides (default: "
                   "efficientnet_lite0 default, every other architecture none)")  # fmt: skip
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=None,
                   help="extraction batch (default: a preset's own, else 32)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median of these)")
    p.add_argument("--precision", default="auto", choices=F.PRECISIONS)
    p.add_argument("--modes", default="auto",
                   help="auto (every candidate and the fast path choose picks) or a comma "
                   "list such as fp32,bf16,bf16 weights (no choose)")  # fmt: skip
    p.add_argument("--choose-batch", type=int, default=8, help="images choose() times on")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's, one per core)")  # fmt: skip
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    try:
        for arch in archs:
            check_arch(arch)
            check_weights(weights_for(args.weights, arch))
        args.mode_list = None
        if args.modes != "auto":
            args.mode_list = [parse_mode(m) for m in args.modes.split(",") if m.strip()]
    except UserError as exc:
        p.error(str(exc))
    device = pick_device(args.device)
    work = workdir(args.workdir, "images")
    # a second run reuses the decisions (delete to re-measure); the folder `train` uses if set
    args.cache = Path(os.environ.get("BREAKHIS_TL_DISPATCH_DIR") or work / "dispatch")
    root = make_tree(work, max(args.images, 8))
    paths = sorted(root.rglob("*.png"))[: args.images]
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    peaks = Peaks()
    try:
        fns, info = setup(archs, paths, device, args, peaks)
    except UserError as exc:  # e.g. published weights not cached and offline: one sentence
        p.exit(2, f"error: {exc}\n")
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    times = F.time_interleaved(fns, args.repeats, sync)
    host = machine(str(device)) | {
        "load_avg_1m_start": load_start,
        "load_avg_1m_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "peak_rss_scope": "mode" if peaks.per_call else "process",
    }
    rows = [row(host, info[key], secs, peaks.timed[key], times[(key[0], "fp32")])
            for key, secs in times.items()]  # fmt: skip
    peaks.read()
    for r in rows:
        r["process_peak_rss_mib"] = round(peaks.process, 1)
    summaries = [{**host, **summarise(a, rows)} for a in archs]
    for r in summaries + rows:  # summaries first: one line per architecture to read
        emit(r)
    table(rows, ["arch", "mode", "batch", "images_per_s", "min_images_per_s", "max_images_per_s",
                 "vs_fp32", "warmup_s", "cosine_min", "peak_rss_mib", "fast_path"])  # fmt: skip
    print()
    if args.mode_list is None:
        table(summaries, ["arch", "fast_path", "fp32_images_per_s", "fast_images_per_s",
                          "fast_range", "unfolded_images_per_s", "best_images_per_s", "speedup",
                          "vs_best", "vs_unfolded", "cosine_min"])  # fmt: skip
    else:
        table(summaries, ["arch", "fp32_images_per_s", "fp32_range", "best_mode",
                          "best_images_per_s", "peak_rss_mib"])  # fmt: skip
    cross(summaries)


def cross(summaries: list[dict]) -> None:
    """efficientnet_lite0's fast path against mobilenet_v2's, measured in the same rounds."""
    by = {s["arch"]: s for s in summaries}
    if (
        "efficientnet_lite0" in by
        and "mobilenet_v2" in by
        and "fast_images_per_s" in by["mobilenet_v2"]
    ):
        lite0, mobile = by["efficientnet_lite0"], by["mobilenet_v2"]
        ratio = lite0["fast_images_per_s"] / mobile["fast_images_per_s"]
        emit({"benchmark": "extraction_throughput", "lite0_vs_mobilenet_v2": round(ratio, 3)})


if __name__ == "__main__":
    main()
