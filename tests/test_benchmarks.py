"""Smoke test: every benchmark script runs on a tiny size and prints well-formed JSON lines.

No timing is asserted here; the measured numbers live in README's Performance section.
"""

import json
import subprocess
import sys

import pytest
from conftest import REPO

CASES = {
    "head_training.py": (
        ["--images", "200", "--dim", "64", "--epochs", "3"],
        {"seconds", "epochs", "val_balanced_accuracy"},
    ),
    "extraction_throughput.py": (
        "--archs mobilenet_v2 --images 4 --batch 2 --repeats 1 --choose-batch 2".split(),
        {"fp32_images_per_s", "fast_images_per_s", "speedup", "vs_best", "vs_unfolded"},
    ),
    "decode_once.py": (
        ["--archs", "mobilenet_v2,efficientnet_lite0", "--images", "4"],
        {"decodes", "target_decodes"},
    ),
    "cached_vs_end_to_end.py": (
        ["--images", "16", "--epochs", "2", "--workers", "0"],
        {"cached_seconds", "end_to_end_seconds", "speedup", "cached_val_balanced_accuracy"},
    ),
    "scale.py": (
        ["--images", "24", "--epochs", "2", "--probe-images", "2", "--workers", "0"],
        {"peak_rss_mib", "extract_and_train_seconds", "index_seconds"},
    ),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_runs_and_prints_json(script, tmp_path):
    args, keys = CASES[script]
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args, "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert records, done.stdout
    first = records[0]
    assert keys <= set(first), set(first)
    assert {"cpu", "cores", "torch", "device"} <= set(first)
    if script == "decode_once.py":
        assert first["decodes"] == first["target_decodes"] == 4
