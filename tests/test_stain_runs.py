"""Stain options through the whole pipeline: cache key, fallback, stain views, head, predict.

Real BreakHis images (the 14-image sample) with efficientnet_lite0's real ImageNet weights;
one tissue-free PNG at a valid archive path stands in for a blank field of view.
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO
from PIL import Image

from breakhis_tl.data.stain import StainNormaliser, StainSetup
from breakhis_tl.errors import UserError
from breakhis_tl.features.cache import FeatureCache
from breakhis_tl.features.extract import Request, extract
from breakhis_tl.heads.training import Feed, TrainConfig, end_to_end_features
from breakhis_tl.models.backbones import build_backbone
from breakhis_tl.models.compute import FastPath
from breakhis_tl.predict import Classifier
from breakhis_tl.runner import RunConfig, run_training

FP32 = FastPath()  # plain fp32: features comparable bit for bit across runs
BLANK = (
    "BreaKHis_v1/histology_slides/breast/benign/SOB/adenosis/SOB_B_A_14-22549AB/40X/"
    "SOB_B_A-14-22549AB-40-099.png"
)


@pytest.fixture(scope="module")
def tree(breakhis_sample, tmp_path_factory):
    """The real sample, plus one tissue-free image named like an archive file."""
    root = tmp_path_factory.mktemp("stain_tree")
    shutil.copytree(breakhis_sample / "BreaKHis_v1", root / "BreaKHis_v1")
    (root / BLANK).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (700, 460), (250, 250, 250)).save(root / BLANK)
    return root


@pytest.fixture(scope="module")
def paths(tree):
    return sorted(str(p) for p in tree.rglob("*.png"))


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0", "default")


def _extract(paths, bb, cache_dir, stain=None, views=(0,), strict=False, workers=0):
    rows = np.arange(len(paths))
    reqs = [Request(bb, 0, rows, FP32, sv) for sv in views]
    cache = FeatureCache(cache_dir) if cache_dir else None
    return extract(
        paths,
        reqs,
        cache,
        "cpu",
        batch_size=8,
        workers=workers,
        strict=strict,
        progress=False,
        stain=stain,
    )


def test_stain_setting_changes_the_cache_key_and_nothing_else_does(paths, lite0, tmp_path):
    macenko = StainSetup(StainNormaliser("macenko"))
    assert StainSetup().key(0) == "none"  # features cached before stain options stay valid
    keys = {StainSetup().key(0), macenko.key(0), macenko.key(1), macenko.key(2),
            StainSetup(StainNormaliser("macenko"), seed=1).key(1),
            StainSetup(StainNormaliser("reinhard", paths[0])).key(0)}  # fmt: skip
    assert len(keys) == 6
    _, first = _extract(paths, lite0, tmp_path)
    _, normalised = _extract(paths, lite0, tmp_path, macenko)
    _, again = _extract(paths, lite0, tmp_path, macenko)
    _, plain = _extract(paths, lite0, tmp_path)
    assert first.images_extracted == normalised.images_extracted == len(paths)
    assert again.images_extracted == plain.images_extracted == 0  # both kept, apart


def test_tissue_free_image_falls_back_by_name_counted_even_from_cache(paths, lite0, tmp_path):
    macenko = StainSetup(StainNormaliser("macenko"))
    blank = paths.index(next(p for p in paths if p.endswith(BLANK)))
    ((plain, _),) = _extract(paths, lite0, None)[0]
    ((normed, ok),), report = _extract(paths, lite0, tmp_path, macenko)
    assert ok.all()  # nothing lost: the blank image is used unnormalised
    assert list(report.stain_fallbacks) == [blank]
    assert (
        "nearly no tissue" in report.stain_fallbacks[blank]
        and BLANK in report.stain_fallbacks[blank]
    )
    assert torch.equal(normed[blank], plain[blank])
    others = [i for i in range(len(paths)) if i != blank]
    cos = torch.nn.functional.cosine_similarity(normed[others].float(), plain[others].float())
    assert (cos < 0.999).all()  # every other image was normalised
    _, warm = _extract(paths, lite0, tmp_path, macenko)
    assert warm.images_extracted == 0 and warm.stain_fallbacks == report.stain_fallbacks
    for cache in (None, tmp_path):  # cold and warm
        with pytest.raises(UserError, match=rf"failed for .*{BLANK}.*--strict"):
            _extract(paths, lite0, cache, macenko, strict=True)


def test_stain_views_are_deterministic_under_a_seed_and_differ_by_view(paths, lite0, tmp_path):
    setup = StainSetup(StainNormaliser("none"), views=2, seed=3)
    got, _ = _extract(paths[:6], lite0, None, setup, views=(0, 1, 2))
    again, _ = _extract(paths[:6], lite0, tmp_path, setup, views=(0, 1, 2), workers=2)
    for (a, _), (b, _) in zip(got, again, strict=True):
        assert torch.equal(a, b)  # in another process (2 DataLoader workers): the same views
    (v0, _), (v1, _), (v2, _) = got
    assert not torch.equal(v0, v1) and not torch.equal(v1, v2)
    other, _ = _extract(paths[:6], lite0, None, StainSetup(views=2, seed=4), views=(1,))
    assert not torch.equal(other[0][0], v1)


def test_no_cache_path_normalises_like_the_cache(paths, lite0):
    macenko = StainSetup(StainNormaliser("macenko"))
    ((cached, _),), _ = _extract(paths, lite0, None, macenko)
    live, ok, notes = end_to_end_features(lite0, paths, Feed(8, "cpu", FP32, 0, macenko))
    assert ok.all() and list(notes) == [paths.index(next(p for p in paths if p.endswith(BLANK)))]
    cos = torch.nn.functional.cosine_similarity(live, cached.float())
    assert cos.min() > 0.999  # the cache holds fp16: equal up to that rounding


@pytest.mark.slow
def test_end_to_end_loaders_keep_their_workers_across_epochs(paths, lite0):
    """The end-to-end baseline iterates the same images every epoch: its workers start once
    (starting them each epoch cost it about a quarter of an epoch on 2 cores), the features
    stay the same, and an epoch's order and augmentation depend on the seed and epoch alone,
    not on the epochs before it or the number of workers."""
    from breakhis_tl.heads.training import end_to_end_batches

    keep = {}
    first, ok1, _ = end_to_end_features(lite0, paths[:6], Feed(4, "cpu", FP32, 1), keep=keep)
    (loader,) = keep.values()
    pids = [w.pid for w in loader._iterator._workers]
    again, ok2, _ = end_to_end_features(lite0, paths[:6], Feed(4, "cpu", FP32, 1), keep=keep)
    assert list(keep.values()) == [loader] and [w.pid for w in loader._iterator._workers] == pids
    assert ok1.all() and ok2.all() and torch.equal(first, again)

    def epoch(batches, e):
        xs, ys = zip(*batches(e), strict=True)
        return torch.cat(xs), torch.cat(ys).tolist()

    labels = np.arange(6)
    one = end_to_end_batches(lite0, paths[:6], labels, 7, Feed(2, "cpu", FP32, workers=1))
    x1, y1 = epoch(one, 1)
    pids = [w.pid for w in one.loader._iterator._workers]
    x2, y2 = epoch(one, 2)
    assert [w.pid for w in one.loader._iterator._workers] == pids
    assert sorted(y1) == list(range(6)) and y1 != y2
    by_image = [x[torch.argsort(torch.tensor(y))] for x, y in ((x1, y1), (x2, y2))]
    assert not any(torch.equal(a, b) for a, b in zip(*by_image, strict=True))  # fresh per epoch
    for workers in (1, 0):  # epoch 1 skipped; in this process or a worker
        fresh = end_to_end_batches(
            lite0, paths[:6], labels, 7, Feed(2, "cpu", FP32, workers=workers)
        )
        x, y = epoch(fresh, 2)
        assert y == y2 and torch.equal(x, x2)


def _train(tree, out, run, archs=("efficientnet_lite0",), **kw):
    cfg = RunConfig(data=str(tree), archs=list(archs), out=str(out), workers=0,
                    progress=False, run=run, precision="fp32",
                    train=TrainConfig(epochs=3, select="last"), **kw)  # fmt: skip
    return run_training(cfg)


@pytest.mark.slow
def test_head_trained_with_normalisation_makes_predict_normalise(tree, paths, tmp_path):
    ref = tmp_path / "ref.png"
    shutil.copy(next(p for p in paths if not p.endswith(BLANK)), ref)
    res = _train(tree, tmp_path, "rh", stain="reinhard", stain_ref=str(ref), stain_views=1)
    r = res.results
    assert set(r["stain"]) == {"reinhard"} and set(r["stain_views"]) == {1}
    _counts_the_blank_per_side(res, paths)
    config = json.loads((res.folders["models"] / "config.json").read_text())
    assert config["stain"]["method"] == "reinhard" and list(config["stain_fallbacks"]) == [
        next(p for p in paths if p.endswith(BLANK))
    ]
    ref.unlink()  # the head carries the fitted target: no reference file needed to predict
    head = next(iter(res.heads.values()))
    clf = Classifier.from_head(head, device="cpu")
    assert clf.meta["stain"]["ref"].startswith("sha256:")
    preds = clf.predict(paths, progress=False)
    assert "stain_note" in preds and (preds["stain_note"] != "").sum() == 1
    # the head's test predictions in the run equal what predict gives for the same images
    run_preds = res.predictions.set_index("path")
    shared = [p for p in paths if p in run_preds.index]
    cols = [c for c in preds if c.startswith("prob_")]
    mine = preds.set_index("path").loc[shared, cols].to_numpy()
    assert np.allclose(mine, run_preds.loc[shared, cols].to_numpy(), atol=2e-3)
    clf.stain = StainSetup()  # the same head without normalisation answers differently
    raw = clf.predict(shared, progress=False)[cols].to_numpy()
    assert np.abs(raw - mine).max() > 0.01


def _counts_the_blank_per_side(res, paths) -> None:
    """results.csv counts, per side, the images of that side that fell back: the blank."""
    blank = next(p for p in paths if p.endswith(BLANK))
    split = pd.read_csv(res.folders["models"] / "split.csv")
    side_of_blank = split.loc[split["path"] == BLANK, "split"].item()
    for _, row in res.results.iterrows():
        assert row["stain_fallbacks"] == int(row["split"] == side_of_blank), (row, blank)


def test_no_cache_run_with_stain_counts_fallbacks(tree, paths, tmp_path):
    res = _train(tree, tmp_path, "nc", stain="macenko", stain_views=1, no_cache=True)
    assert set(res.results["stain"]) == {"macenko"}
    _counts_the_blank_per_side(res, paths)  # val and test: counted as in the cached path


def test_command_line_stain_errors_are_one_sentence(tree, tmp_path):
    def run(*extra):
        return subprocess.run(
            [sys.executable, "-m", "breakhis_tl", "train", "--data", str(tree), "--archs",
             "efficientnet_lite0", "--out", str(tmp_path), *extra],
            capture_output=True, text=True, cwd=REPO,
        )  # fmt: skip

    bad = run("--stain", "reinhard")
    assert bad.returncode == 2 and "pass --stain-ref PATH" in bad.stderr
    assert "Traceback" not in bad.stderr
    bad = run("--stain", "macenko", "--stain-ref", str(tmp_path / "missing.png"))
    assert bad.returncode == 2 and "missing.png does not exist" in bad.stderr
    bad = run("--stain", "vahadane")
    assert bad.returncode == 2 and "Unknown stain method 'vahadane'" in bad.stderr
    assert not (tmp_path / "trained_models").exists()  # nothing started


@pytest.mark.slow
def test_random_init_calibrates_on_normalised_images_and_predict_agrees(tree, paths, tmp_path):
    """A random-init backbone's batch-norm statistics come from the images it will see:
    normalised ones under --stain, so its identity differs from the plain run's."""
    kw = dict(archs=["mobilenet_v2"], weights="none")
    plain = _train(tree, tmp_path, "rn", **kw)
    normed = _train(tree, tmp_path, "rm", stain="macenko", **kw)
    assert set(plain.results["weights"]) != set(normed.results["weights"])
    clf = Classifier.from_head(next(iter(normed.heads.values())), device="cpu")
    run_preds = normed.predictions.drop_duplicates("path").set_index("path")
    cols = [c for c in run_preds if c.startswith("prob_")]
    mine = clf.predict(list(run_preds.index), progress=False).set_index("path")[cols]
    assert np.allclose(mine.to_numpy(), run_preds[cols].to_numpy(), atol=2e-3)
