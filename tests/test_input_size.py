"""--input-size: CNNs take small patches without upscaling to 224; fixed-size models refuse."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO

from breakhis_tl.errors import UserError
from breakhis_tl.heads.training import TrainConfig
from breakhis_tl.models.backbones import build_backbone, with_input_size
from breakhis_tl.predict import Classifier
from breakhis_tl.runner import RunConfig, run_training


def test_cnns_take_a_smaller_input_and_fixed_size_models_refuse():
    lite0 = build_backbone("efficientnet_lite0", "default")
    small = with_input_size(lite0, 96)
    assert (small.prep.input_size, small.prep.resize_size) == (96, 96)
    assert small.prep.mean == lite0.prep.mean and lite0.prep.input_size == 224  # a copy
    assert small(torch.rand(2, 3, 96, 96)).shape == (2, 1280)
    with pytest.raises(UserError, match="vit_b_16 cannot take 96-px images .*fixed at 224"):
        with_input_size(build_backbone("vit_b_16", "none"), 96)
    with pytest.raises(UserError, match="uni is used at its model card's input size"):
        with_input_size(dataclasses.replace(lite0, name="uni"), 96)  # named, not tried
    with pytest.raises(UserError, match="too small for inception_v3; use 75 px"):
        with_input_size(build_backbone("inception_v3", "none"), 64)


def _cfg(data, out, run, **kw):
    return RunConfig(data=str(data), archs=["efficientnet_lite0"], out=str(out), workers=0,
                     progress=False, run=run, precision="fp32",
                     train=TrainConfig(epochs=3, select="last"), **kw)  # fmt: skip


def test_run_at_96_px_is_cached_apart_recorded_and_predicted_at_96(breakhis_sample, tmp_path):
    small = run_training(_cfg(breakhis_sample, tmp_path, "s96", input_size=96))
    assert set(small.results["input_size"]) == {96}
    full = run_training(_cfg(breakhis_sample, tmp_path, "s224"))
    assert not full.cache_used and set(full.results["input_size"]) == {224}  # another space
    again = run_training(_cfg(breakhis_sample, tmp_path, "s96b", input_size=96))
    assert again.cache_used
    head = next(iter(small.heads.values()))
    clf = Classifier.from_head(head, device="cpu")
    assert clf.prep.input_size == 96 and clf.backbone.prep.input_size == 96
    run_preds = small.predictions.drop_duplicates("path").set_index("path")
    cols = [c for c in run_preds if c.startswith("prob_")]
    mine = clf.predict(list(run_preds.index), progress=False).set_index("path")[cols]
    assert np.allclose(mine.to_numpy(), run_preds[cols].to_numpy(), atol=2e-3)


def test_command_line_refuses_input_size_for_a_vit(breakhis_sample, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "breakhis_tl", "train", "--data", str(breakhis_sample),
         "--archs", "vit_b_16", "--weights", "none", "--input-size", "96", "--out",
         str(tmp_path)],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 2 and "vit_b_16 cannot take 96-px images" in done.stderr
    assert "Traceback" not in done.stderr


def test_input_size_benchmark_runs_on_real_patches(idc_sample, tmp_path):
    """Smoke test (no timing asserted): one JSON row per (architecture, size)."""
    done = subprocess.run(
        [sys.executable, "input_size.py", "--data", str(idc_sample), "--images", "4",
         "--sizes", "64,224", "--archs", "efficientnet_lite0", "--repeats", "1", "--batch", "4",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO / "benchmarks",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["input_size"] for r in rows] == [64, 224]
    assert rows[1]["vs_224"] == 1.0 and rows[0]["images_per_s"] > 0 and "cpu_flags" in rows[0]
