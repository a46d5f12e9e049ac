"""Bad inputs never lose work; interruptions and kills never leave files that load as complete."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import REPO
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from breakhis_tl.errors import UserError
from breakhis_tl.features.extract import FeatureCache
from breakhis_tl.heads.modules import load_head
from breakhis_tl.heads.training import TrainConfig
from breakhis_tl.runner import RunConfig, run_training


def _cmd(*args):
    return [sys.executable, "-m", "breakhis_tl", *map(str, args)]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def sample_with_bad_image(breakhis_sample, tmp_path):
    """The sample plus a zero-byte PNG with a valid BreakHis name, so it is indexed."""
    root = tmp_path / "data"
    shutil.copytree(breakhis_sample, root)
    folder = next(root.rglob("SOB_B_F_14-25197")) / "40X"
    (folder / "SOB_B_F-14-25197-40-099.png").write_bytes(b"")
    return root


def test_broken_image_skipped_counted_and_others_trained(sample_with_bad_image, tmp_path, caplog):
    cfg = RunConfig(
        data=str(sample_with_bad_image),
        archs=["efficientnet_lite0"],
        run="skip",
        out=str(tmp_path),
        workers=0,
        progress=False,
        train=TrainConfig(epochs=2),
    )
    res = run_training(cfg)
    assert "1 image(s) could not be read and were skipped" in caplog.text
    assert "SOB_B_F-14-25197-40-099.png is empty" in caplog.text
    results = pd.read_csv(tmp_path / "trained_models/skip/results.csv")
    assert (results["skipped_images"] == 1).all()
    assert len(res.skipped) == 1 and res.skipped[0].endswith("-099.png")
    preds = res.predictions
    assert not preds["relpath"].str.endswith("-099.png").any()
    acc = EventAccumulator(
        str(tmp_path / "summary_writers/skip/efficientnet_lite0"), size_guidance={"tensors": 0}
    ).Reload()
    text = acc.Tensors("skipped_images/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "1 skipped" in text and "-099.png" in text


def test_strict_stops_at_the_broken_image(sample_with_bad_image, tmp_path):
    cfg = RunConfig(
        data=str(sample_with_bad_image),
        archs=["efficientnet_lite0"],
        strict=True,
        out=str(tmp_path),
        workers=0,
        progress=False,
        train=TrainConfig(epochs=2),
    )
    with pytest.raises(UserError, match="-099.png is empty .*--strict"):
        run_training(cfg)


def test_strict_stops_even_when_the_cache_is_warm(sample_with_bad_image, tmp_path):
    """The cache remembers which images failed, so --strict is not defeated by a warm cache."""
    kw = dict(data=str(sample_with_bad_image), archs=["efficientnet_lite0"], out=str(tmp_path),
              workers=0, progress=False, train=TrainConfig(epochs=2))  # fmt: skip
    run_training(RunConfig(run="warm", **kw))
    with pytest.raises(UserError, match="-099.png is empty .*--strict"):
        run_training(RunConfig(run="strict", strict=True, **kw))
    assert not (tmp_path / "trained_models/strict").exists()


def test_small_images_upscaled_with_one_warning(idc_sample, caplog):
    import numpy as np

    from breakhis_tl.features.extract import Request, extract
    from breakhis_tl.models.backbones import build_backbone

    paths = sorted(str(p) for p in idc_sample.rglob("*.png"))[:5]
    bb = build_backbone("efficientnet_lite0")
    out, rep = extract(paths, [Request(bb, 0, np.arange(5))], None, workers=0, progress=False)
    assert rep.upscaled == 5 and out[0][1].all()
    assert "5 image(s) are smaller than a backbone's input size and were upscaled" in caplog.text


def test_same_seed_same_split_features_and_metrics(breakhis_sample, tmp_path):
    runs = []
    for k in range(2):
        cfg = RunConfig(
            data=str(breakhis_sample),
            archs=["mobilenet_v2"],
            weights="none",
            run=f"r{k}",
            out=str(tmp_path),
            cache_dir=str(tmp_path / f"cache{k}"),
            workers=0,
            progress=False,
            train=TrainConfig(epochs=4, seed=7),
        )
        runs.append(run_training(cfg, command=f"repro {k}"))
    a = pd.read_csv(tmp_path / "trained_models/r0/split.csv")
    b = pd.read_csv(tmp_path / "trained_models/r1/split.csv")
    pd.testing.assert_frame_equal(a, b)
    fa = sorted((tmp_path / "cache0").rglob("*.safetensors"))
    fb = sorted((tmp_path / "cache1").rglob("*.safetensors"))
    assert [p.name for p in fa] == [p.name for p in fb]
    from safetensors.torch import load_file

    assert torch.equal(load_file(fa[0])["features"], load_file(fb[0])["features"])
    cols = ["balanced_accuracy", "accuracy", "auc", "f1", "patient_rate"]
    pd.testing.assert_frame_equal(runs[0].results[cols], runs[1].results[cols])
    meta = load_head(tmp_path / "trained_models/r0/mobilenet_v2.pt")[1]
    assert meta["seed"] == 7 and meta["command"] == "repro 0"
    assert {"torch", "torchvision", "scikit-learn", "python"} <= set(meta["versions"])


def test_ctrl_c_keeps_best_head_and_exits_130(breakhis_sample, tmp_path):
    proc = subprocess.Popen(
        _cmd(
            "train",
            "--data",
            breakhis_sample,
            "--archs",
            "efficientnet_lite0",
            "--head",
            "linear",  # trained by epochs (the default logreg head has no epochs to stop)
            "--epochs",
            "100000",
            "--patience",
            "100000",
            "--out",
            tmp_path,
            "--run",
            "int",
            "--workers",
            "0",
        ),
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    deadline = time.time() + 120
    for line in proc.stderr:
        if "Training a linear head" in line or time.time() > deadline:
            break
    time.sleep(2.0)  # some epochs in
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Interrupted: the best heads so far, logs and graphs are saved." in err
    models = tmp_path / "trained_models/int"
    head, meta = load_head(models / "efficientnet_lite0.pt")
    results = pd.read_csv(models / "results.csv")
    assert results["interrupted"].all() and results["epochs_run"].iloc[0] < 100000
    assert (tmp_path / "validation_graphs/int/efficientnet_lite0_curves.png").is_file()


def _check_outputs(out: Path) -> tuple[int, int]:
    """Every head that exists loads; every cache entry is complete or ignored."""
    heads = list((out / "trained_models").rglob("*.pt"))
    for h in heads:
        load_head(h)
    cache = FeatureCache(out / "data/cache/features")
    complete = 0
    for data in (out / "data/cache/features").rglob("*.safetensors"):
        marker = data.with_suffix(".json")
        space = data.parent.name
        if marker.is_file():
            meta = json.loads(marker.read_text())
            dim = load_file(str(data))["features"].shape[1]
            hit = cache.lookup(space, meta["ids"], dim)
            assert hit.found.all() and len(meta["ids"]) == meta["rows"]
            complete += 1
        else:  # features written, marker not yet: the chunk does not count
            others = [json.loads(m.read_text())["ids"] for m in data.parent.glob("*.json")]
            assert all(m.with_suffix(".safetensors") != data for m in data.parent.glob("*.json"))
            assert others is not None
    return len(heads), complete


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_nothing_half_written(breakhis_sample, tmp_path):
    rng = random.Random(1234)
    args = _cmd(
        "train",
        "--data",
        breakhis_sample,
        "--archs",
        "efficientnet_lite0,mobilenet_v2,resnet50",
        "--weights",
        "default,mobilenet_v2=none,resnet50=none",
        "--views",
        "4",
        "--epochs",
        "20",
        "--out",
        tmp_path,
        "--run",
        "kill",
        "--workers",
        "0",
        "--overwrite",  # each attempt replaces the killed one's run folders whole
    )
    for moment in sorted(rng.uniform(2, 14) for _ in range(4)):
        proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env()
        )
        time.sleep(moment)
        proc.kill()
        proc.wait()
        _check_outputs(tmp_path)
    # a run to the end after the kills reuses what was complete and finishes
    done = subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    heads, complete = _check_outputs(tmp_path)
    assert heads == 3 and complete == 3 * 4


def test_no_network_guard_is_active():
    import socket

    with pytest.raises(OSError, match="tests never touch the network"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)


def test_grayscale_palette_rgba_16bit_train(tmp_path, breakhis_sample):
    """Odd PNG modes in a real tree go through extraction as RGB."""
    root = tmp_path / "data"
    shutil.copytree(breakhis_sample, root)
    pngs = sorted(root.rglob("*.png"))
    for path, mode in zip(pngs, ["L", "P", "RGBA", "I;16"], strict=False):
        im = Image.open(path).convert("L" if mode == "I;16" else mode)
        if mode == "I;16":
            import numpy as np

            im = Image.fromarray(np.asarray(im).astype(np.uint16) * 257)
        im.save(path)
    res = run_training(
        RunConfig(
            data=str(root),
            archs=["efficientnet_lite0"],
            out=str(tmp_path),
            workers=0,
            progress=False,
            train=TrainConfig(epochs=2),
        )
    )
    assert res.skipped == []
