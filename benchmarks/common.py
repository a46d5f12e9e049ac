"""Shared pieces of the benchmarks: generated BreakHis-like images, the machine, the output.

Images are generated (700x460 RGB PNGs, BreakHis size, at BreakHis paths) so the benchmarks
need no dataset; the two classes differ in colour, so a head can learn them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from breakhis_tl.index import SUBTYPES  # noqa: E402

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


def peak_rss_mib() -> float:
    """Peak resident set of this process and of its finished children (DataLoader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024


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
