"""Full scale: the whole BreakHis (7,909 images) and IDC (277,524 patches) jobs through the
real commands, cold and warm, one JSON row per stage.

Speed figures taken on a few hundred images say little about a researcher's real job, and
what dominates changes with scale (decoding, the index, the head). The trees are built from
the real images in ../shared/data, never generated: each BreakHis path of
`breakhis_layout.csv` holds a real image of its subtype and magnification at 700x460, each
IDC patch a real patch of its class, every file made unique by a few changed pixels (the
feature cache keys by content, the leakage check by pixels). The commands run as the user
runs them, one process each (`python -m breakhis_tl` through `cli.main`), so every row
includes start-up and imports as a user pays them.

    python benchmarks/full_scale.py --device cuda            # full size, on a GPU machine
    python benchmarks/full_scale.py --small --device cpu     # 200 + 1,500 images: minutes

Rows: tree_breakhis, tree_idc (building the trees; reused when complete), index_breakhis,
index_idc (`index.build_index`), ids_breakhis, ids_idc (content ids into a new store),
train_breakhis_cold (fresh feature cache),
train_breakhis_warm (the same cache), extract_breakhis (lite0, fresh cache) and
train_idc_cold. A command's row carries its own "Time per stage" split under `stages`.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from common import (
    IDC_IMAGES,
    IDC_PATIENTS,
    SHARED_DATA,
    emit,
    hwm_mib,
    layout_subset,
    machine,
    make_real_idc_tree,
    make_real_tree,
    parser,
    positive,
    reset_peak_rss,
    workdir,
)

from breakhis_tl.data.images import usable_cores

REPO = Path(__file__).resolve().parents[1]
GPU_MARK = "FULL_SCALE_GPU_PEAK_MIB"
# The child: the real command line, then its GPU memory peak where it used CUDA.
WRAPPER = f"""
import sys
from breakhis_tl.cli import main
try:
    rc = main(sys.argv[1:])
finally:
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        print("{GPU_MARK}", torch.cuda.max_memory_allocated() / 2**20, file=sys.stderr)
raise SystemExit(rc)
"""
# Shares of a --budget: issue #28's target seconds for each command on one GPU.
TARGET_SECONDS = {"train_breakhis_cold": 60, "train_breakhis_warm": 15,
                  "extract_breakhis": 20, "train_idc_cold": 90}  # fmt: skip


@dataclass
class Stage:
    name: str
    dataset: str
    images: int
    argv: list[str]
    fresh: Path | None  # a cache folder emptied first (a cold run)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser("The whole BreakHis and IDC jobs, cold and warm, one JSON row per stage.")
    p.add_argument("--workers", type=int, default=None, help="loader workers of the commands")
    p.add_argument("--archs", default=None, help="BreakHis train's --archs (default all; "
                   "--small: efficientnet_lite0,mobilenet_v2)")  # fmt: skip
    p.add_argument("--small", action="store_true", help="200 BreakHis images, 1,500 IDC "
                   "patches of 20 patients, 64 px: the same pipeline on a CPU")  # fmt: skip
    p.add_argument("--budget", type=positive, default=None, help="seconds for the whole run: "
                   "each command gets its share, and is stopped at it")  # fmt: skip
    p.add_argument("--trees-only", nargs="?", const="breakhis,idc", default=None,
                   help="the trees, index and content ids only (of breakhis, idc or both): "
                   "the data side at full size, on any machine")  # fmt: skip
    args = p.parse_args(argv)
    if args.trees_only and not set(args.trees_only.split(",")) <= {"breakhis", "idc"}:
        p.error(f"--trees-only takes breakhis, idc or both, not {args.trees_only!r}")
    return args


def plan_stages(args: argparse.Namespace, work: Path, roots: dict, counts: dict) -> list[Stage]:
    """The commands in order; a cold run's cache folder is emptied before it starts."""
    breakhis, idc = roots["breakhis"], roots["idc"]
    n_breakhis, n_idc = counts["breakhis"], counts["idc"]
    common = ["--device", args.device, "--out", str(work / "runs")]
    if args.workers is not None:
        common += ["--workers", str(args.workers)]
    size = ["--input-size", "64"] if args.small else []
    archs = args.archs or ("efficientnet_lite0,mobilenet_v2" if args.small else "all")
    train = ["train", "--data", str(breakhis), "--archs", archs, "--weights",
             "none,efficientnet_lite0=default", "--overwrite", *size, *common]  # fmt: skip
    cache = {k: work / f"cache_{k}" for k in ("breakhis", "extract", "idc")}
    idc_size = ["--input-size", "64" if args.small else "96"]
    return [
        Stage("train_breakhis_cold", "breakhis", n_breakhis,
              [*train, "--run", "breakhis_cold", "--cache-dir", str(cache["breakhis"])],
              cache["breakhis"]),
        Stage("train_breakhis_warm", "breakhis", n_breakhis,
              [*train, "--run", "breakhis_warm", "--cache-dir", str(cache["breakhis"])], None),
        Stage("extract_breakhis", "breakhis", n_breakhis,
              ["extract", "--data", str(breakhis), "--archs", "efficientnet_lite0", *size,
               *common, "--cache-dir", str(cache["extract"])], cache["extract"]),
        Stage("train_idc_cold", "idc", n_idc,
              ["train", "--data", str(idc), "--dataset", "idc", "--archs", "efficientnet_lite0",
               *idc_size, "--run", "idc_cold", "--overwrite", *common, "--cache-dir",
               str(cache["idc"])], cache["idc"]),
    ]  # fmt: skip


def build_trees(args: argparse.Namespace, work: Path) -> tuple[dict, dict, list[dict]]:
    """Both trees (reused when complete) and the index of each, timed: their roots, image
    counts (by the index) and rows."""
    from breakhis_tl.data.identity import ImageStore
    from breakhis_tl.data.index import build_index

    layout = pd.read_csv(SHARED_DATA / "breakhis_layout.csv")["path"].tolist()
    n_breakhis, n_idc, patients = (200, 1500, 20) if args.small else (
        len(layout), IDC_IMAGES, IDC_PATIENTS)  # fmt: skip
    cores = usable_cores()
    builds = {
        "breakhis": lambda root: make_real_tree(
            root, layout_subset(layout, n_breakhis), SHARED_DATA / "breakhis_real", cores),
        "idc": lambda root: make_real_idc_tree(
            root, SHARED_DATA / "idc_real", n_idc, patients, cores),
    }  # fmt: skip
    roots = {"breakhis": work / f"breakhis_{n_breakhis}", "idc": work / f"idc_{n_idc}_{patients}"}
    rows, counts = [], {}
    wanted = (args.trees_only or "breakhis,idc").split(",")
    builds = {k: v for k, v in builds.items() if k in wanted}
    roots = {k: v for k, v in roots.items() if k in wanted}
    for name, build in builds.items():
        before = stamp_time(roots[name])
        reset_peak_rss()
        t0 = time.perf_counter()
        build(roots[name])
        reused = before is not None and stamp_time(roots[name]) == before
        images = n_breakhis if name == "breakhis" else n_idc
        seconds = time.perf_counter() - t0
        rows.append(row(f"tree_{name}", name, images, seconds, tree_reused=reused,
                        build_processes=cores))  # fmt: skip
    for name, root in roots.items():
        reset_peak_rss()
        t0 = time.perf_counter()
        paths = build_index(root, name)["path"].tolist()
        counts[name] = len(paths)
        rows.append(row(f"index_{name}", name, counts[name], time.perf_counter() - t0))
        store = work / f"ids_{name}.sqlite.tmp"
        store.unlink(missing_ok=True)  # a killed run's store would make this row warm
        reset_peak_rss()
        t0 = time.perf_counter()  # what every command's first extraction pays, into a new store
        ImageStore(store).content_ids(paths)
        rows.append(row(f"ids_{name}", name, counts[name], time.perf_counter() - t0))
        store.unlink()
    return roots, counts, rows


def stamp_time(root: Path) -> int | None:
    """When a tree was completed: unchanged by a build that reused it."""
    try:
        return (root / ".complete").stat().st_mtime_ns
    except OSError:
        return None


def row(stage: str, dataset: str, images: int, seconds: float, **extra) -> dict:
    """One stage's record; in-process stages report this process's peak since the stage."""
    extra.setdefault("peak_rss_mib", round(hwm_mib(), 1))
    rate = round(images / seconds, 1) if seconds > 0 else None
    return {"benchmark": "full_scale", "stage": stage, "dataset": dataset, "images": images,
            "seconds": round(seconds, 2), "images_per_s": rate, **extra}  # fmt: skip


class GpuSampler:
    """Samples the GPU's utilisation with `nvidia-smi` in a background thread while a stage
    runs, so a stage whose GPU waits on the CPU shows it. Does nothing without nvidia-smi."""

    def __init__(self, device: str, period_ms: int = 200) -> None:
        index = device.partition(":")[2] or "0"
        exe = shutil.which("nvidia-smi") if device != "cpu" else None
        self.cmd = exe and [exe, f"--id={index}", "--query-gpu=utilization.gpu",
                            "--format=csv,noheader,nounits", f"-lms={period_ms}"]  # fmt: skip
        self.samples: list[float] = []
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if self.cmd:
            try:
                self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE,
                                             stderr=subprocess.DEVNULL, text=True)  # fmt: skip
            except OSError:
                return self
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:  # "[N/A]" on some boards
                pass

    def __exit__(self, *exc) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait()
            self.thread.join(timeout=5)

    def summary(self) -> dict:
        if not self.samples:
            return {}
        mean = round(sum(self.samples) / len(self.samples), 1)
        return {"gpu_util_mean": mean, "gpu_util_max": max(self.samples),
                "gpu_util_samples": len(self.samples)}  # fmt: skip


def stage_times(log: str) -> dict[str, float]:
    """The seconds per stage of a command's last "Time per stage: a 1.0 s, b 2.0 s." line."""
    lines = re.findall(r"Time per stage: (.*)\.\s*$", log, re.M)
    if not lines:
        return {}
    return {k.strip(): float(v) for k, v in re.findall(r"([^,]+?) ([\d.]+) s(?:,|$)", lines[-1])}


def run_command(argv: list[str], log_path: Path, limit: float | None) -> tuple[int, float, dict]:
    """Run one command in its own process group; its exit status (124 when stopped at
    `limit`), wall seconds and resource usage, which wait4 gives for that child alone."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", WRAPPER, *argv], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)  # fmt: skip
        try:
            status, usage, timed_out = _wait(proc.pid, t0, limit)
        except BaseException:  # stopped from outside (gpu_suite's timeout): take it along
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    used = {"ru_maxrss": usage.ru_maxrss, "cpu_seconds": usage.ru_utime + usage.ru_stime}
    return (124 if timed_out else proc.returncode), seconds, used


def _wait(pid: int, t0: float, limit: float | None) -> tuple[int, resource.struct_rusage, bool]:
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, usage, False
        if limit is not None and time.perf_counter() - t0 > limit:
            os.killpg(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            return status, usage, True
        time.sleep(0.02)


def command_row(stage: Stage, work: Path, device: str, limit: float | None) -> dict:
    """Run one stage's command and describe it: wall seconds, images/s, its own stage split,
    its peak resident set (largest process: the command or a loader worker), GPU figures."""
    if stage.fresh is not None and stage.fresh.exists():
        shutil.rmtree(stage.fresh)
    log_path = work / "logs" / f"{stage.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with GpuSampler(device) as gpu:
        rc, seconds, usage = run_command(stage.argv, log_path, limit)
    text = log_path.read_text(errors="replace")
    stages = stage_times(text)
    extra: dict = {"peak_rss_mib": round(usage["ru_maxrss"] / 1024, 1), "stages": stages,
                   "cpu_seconds": round(usage["cpu_seconds"], 1)}  # fmt: skip
    if "features" in stages and stages["features"] > 0:
        extra["features_images_per_s"] = round(stage.images / stages["features"], 1)
    peaks = re.findall(rf"^{GPU_MARK} ([\d.]+)$", text, re.M)
    if peaks:
        extra["gpu_peak_mib"] = round(float(peaks[-1]), 1)
    extracted = re.findall(r"Extracted (\d+) image feature|^(\d+) image feature\(s\) extracted",
                           text, re.M)  # fmt: skip
    extra["extracted"] = int("".join(extracted[-1])) if extracted else 0
    extra.update(gpu.summary())
    extra["command"] = "python -m breakhis_tl " + " ".join(stage.argv)
    if rc:
        why = f"time limit of {limit:.0f} s" if rc == 124 else f"exit status {rc}"
        tail = [ln for ln in text.splitlines() if ln.strip()][-1:] or [""]
        extra.update(error=why, log=str(log_path), last_line=tail[0][-300:])
    return row(stage.name, stage.dataset, stage.images, seconds, **extra)


def share(budget: float | None, start: float, todo: list[Stage]) -> float | None:
    """The next command's time limit: its target's share of what is left of the budget,
    so a stage that ends early leaves its time to the later ones."""
    if budget is None:
        return None
    left = budget - (time.perf_counter() - start)
    weights = [TARGET_SECONDS[s.name] for s in todo]
    return left * weights[0] / sum(weights)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # runs run_command's cleanup
    start = time.perf_counter()
    work = workdir(args.workdir, "full_scale_small" if args.small else "full_scale")
    roots, counts, rows = build_trees(args, work)
    info = {**machine(args.device), "small": args.small}
    for r in rows:
        emit({**r, **info})
    todo = [] if args.trees_only else plan_stages(args, work, roots, counts)
    failed = False
    while todo:
        limit = share(args.budget, start, todo)
        stage = todo.pop(0)
        if limit is not None and limit < 1:
            r = row(stage.name, stage.dataset, stage.images, 0.0, error="budget spent")
        else:
            r = command_row(stage, work, args.device, limit)
        failed = failed or "error" in r
        emit({**r, **info})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
