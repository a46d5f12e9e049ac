"""Stain cost: ms per image of each stain step on the full decoded image, and its total.

Methods: none, macenko (torchstain's built-in reference), reinhard (fitted on one reference
image), hed-jitter (one HED-light view), timed beside the PNG decode they follow. Images:
generated 700x460 tissue-like PNGs (common.make_tree) and the real BreakHis sample images.
Every repeat runs all methods in turn (interleaved, so a slow spell of a shared machine hits
them alike), with torch on --threads threads (1, as in a DataLoader worker: on a busy 2-core
machine 2 threads made Macenko 6x slower). A row is the median [min, max] over repeats of
the mean ms per image. The step runs once per image per run (the features are cached), so a
full BreakHis extraction pays it 7,909 times: the projection column.

    python benchmarks/stain_cost.py --images 8 --repeats 5
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch
from common import emit, machine, make_tree, parser, table, workdir

from breakhis_tl.data.images import load_rgb
from breakhis_tl.data.stain import StainError, StainNormaliser, stain_view, torchstain_version

BREAKHIS_IMAGES = 7909
SHARED = Path(
    os.environ.get(
        "BREAKHIS_TL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"
    )
)
REAL_DEFAULT = SHARED / "breakhis_sample"
SIMD = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")


def cpu_details() -> dict:
    """CPU model, family/model/stepping and the SIMD flags that decide kernel speed."""
    info: dict = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = (s.strip() for s in line.partition(":"))
        if key in ("cpu family", "model", "stepping"):
            info[f"cpu_{key.replace(' ', '_')}"] = value
        elif key == "flags":
            info["cpu_flags"] = " ".join(f for f in value.split() if f in SIMD)
    return info


def methods(ref: str) -> dict:
    """name -> function(image, path) for every timed step."""
    none, mac = StainNormaliser("none"), StainNormaliser("macenko")
    rei = StainNormaliser("reinhard", ref)
    return {
        "decode": lambda im, p: load_rgb(p),
        "none": lambda im, p: none(im, p),
        "macenko": lambda im, p: mac(im, p),
        "reinhard": lambda im, p: rei(im, p),
        "hed-jitter": lambda im, p: stain_view(im, 0, p, 1),
    }


def time_set(paths: list[str], fns: dict, repeats: int) -> tuple[dict, dict]:
    """{method: [ms per image per repeat]} and {method: images that raised StainError}."""
    images = [load_rgb(p) for p in paths]
    times: dict = {name: [] for name in fns}
    failed: dict = {name: 0 for name in fns}
    for fn in fns.values():  # warm-up: imports, first-call allocations
        _call(fn, images[0], paths[0])
    for r in range(repeats):
        names = list(fns)
        names = names[r % len(names) :] + names[: r % len(names)]  # rotate the order too
        for name in names:
            t0 = time.perf_counter()
            bad = sum(_call(fns[name], im, p) for im, p in zip(images, paths, strict=True))
            times[name].append((time.perf_counter() - t0) * 1000 / len(images))
            failed[name] = bad
    return times, failed


def _call(fn, im, path) -> int:
    try:
        fn(im, path)
        return 0
    except StainError:
        return 1


def rows(label: str, n: int, times: dict, failed: dict) -> list[dict]:
    out = []
    for name, ms in times.items():
        med = statistics.median(ms)
        out.append(
            {
                "images": label,
                "n": n,
                "method": name,
                "ms_per_image": round(med, 2),
                "range_ms": f"[{min(ms):.1f}, {max(ms):.1f}]",
                "min_ms": round(min(ms), 2),
                "max_ms": round(max(ms), 2),
                "failed": failed[name],
                "breakhis_minutes": round(med * BREAKHIS_IMAGES / 60000, 2),
            }
        )
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=8, help="generated 700x460 images")
    p.add_argument("--real", default=str(REAL_DEFAULT), help="BreakHis sample folder, or ''")
    p.add_argument("--real-images", type=int, default=14)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (DataLoader workers use 1)"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = make_tree(workdir(args.workdir, "images"), max(args.images, 8))
    sets = {"generated": [str(q) for q in sorted(root.rglob("*.png"))[: args.images]]}
    real = sorted(Path(args.real).rglob("*.png")) if args.real else []
    if real:
        sets["breakhis_sample"] = [str(q) for q in real[: args.real_images]]
    ref = sets.get("breakhis_sample", sets["generated"])[0]
    fns = methods(ref)
    record = {"benchmark": "stain_cost", **machine("cpu"), **cpu_details()}
    record |= {"torchstain": torchstain_version(), "reinhard_ref": os.path.basename(ref)}
    record |= {"repeats": args.repeats, "breakhis_images": BREAKHIS_IMAGES}
    record["load_1m_before"] = round(os.getloadavg()[0], 2)  # a shared machine's contention
    all_rows = []
    for label, paths in sets.items():
        all_rows += rows(label, len(paths), *time_set(paths, fns, args.repeats))
    record["load_1m_after"] = round(os.getloadavg()[0], 2)
    for r in all_rows:
        emit({**record, **r})
    cols = ["images", "n", "method", "ms_per_image", "range_ms", "failed", "breakhis_minutes"]
    table(all_rows, cols)


if __name__ == "__main__":
    main()
