"""Real tissue: counts, the official folds, and signal that only real images can show.

Generated images can never show that the pipeline keeps the signal (preprocessing, cache,
labels, head); these tests do, on real BreakHis and IDC images from ../shared/data.
"""

import logging

import numpy as np
import pandas as pd
import pytest
from conftest import _shared

from breakhis_tl.data.index import index_breakhis, index_idc
from breakhis_tl.data.splits import make_split


@pytest.fixture(scope="module")
def breakhis_real():
    return _shared("breakhis_real")


@pytest.fixture(scope="module")
def idc_real():
    return _shared("idc_real")


def test_index_of_the_real_breakhis_subset(breakhis_real):
    i = index_breakhis(breakhis_real)
    assert len(i) == 148 and i["slide"].nunique() == 37 and i["slide_folder"].nunique() == 38
    assert i.groupby("label")["patient"].nunique().to_dict() == {"benign": 15, "malignant": 22}
    assert i["subtype"].value_counts().to_dict() == {
        "DC": 34, "MC": 26, "F": 21, "A": 18, "PT": 18, "PC": 15, "TA": 8, "LC": 8,
    }  # fmt: skip
    mags = i["magnification"].value_counts().to_dict()
    assert mags == {40: 37, 100: 78, 200: 13, 400: 20}


def test_index_of_the_real_idc_subset(idc_real):
    i = index_idc(idc_real)
    assert len(i) == 3032 and i["patient"].nunique() == 167
    assert set(i["label"]) == {"idc", "non_idc"}


OFFICIAL = {1: (5005, 2904), 2: (5506, 2403), 3: (5332, 2577), 4: (5211, 2698), 5: (4826, 3083)}


@pytest.mark.parametrize("fold", [1, 2, 3, 4, 5])
def test_real_folds_csv_on_the_full_scale_tree(fold, full_tree, full_folds_csv, caplog):
    index = index_breakhis(full_tree)
    with caplog.at_level(logging.WARNING):
        s = make_split(index, "folds", fold=fold, seed=0, folds_csv=full_folds_csv)
    train = s[s["split"].isin(["train", "val"])]  # val is carved out of the official train
    test = s[s["split"] == "test"]
    assert (len(train), len(test)) == OFFICIAL[fold]
    assert train["slide_folder"].nunique() == 54 and test["slide_folder"].nunique() == 28
    # slide 13412's DC and LC folders fall on opposite sides in folds 1, 3 and 5 only
    warned = "13412" in caplog.text
    assert warned == (fold in (1, 3, 5))
    assert not set(s.loc[s["split"] == "val", "patient"]) & set(test["patient"])


def _folds_of(run_dir) -> pd.DataFrame:
    return pd.read_csv(run_dir / "split.csv")


@pytest.mark.slow
def test_default_head_is_as_good_as_a_tuned_sklearn_probe(breakhis_real, tmp_path):
    """The default linear probe converges: within 2 points of balanced accuracy of a
    LogisticRegression whose C is chosen by patient-grouped 5-fold CV, on the same lite0
    features and the same outer patient folds (the runner's nested 5-fold CV)."""
    from safetensors.torch import load_file
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from breakhis_tl.runner import RunConfig, run_training

    cfg = RunConfig(data=str(breakhis_real), archs=["efficientnet_lite0"], protocol="cv", cv=5,
                    run="probe", out=str(tmp_path), workers=0, progress=False)  # fmt: skip
    res = run_training(cfg)
    ours = res.results.loc[res.results["split"] == "test", "balanced_accuracy"].mean()
    # the same cached features, read back by content id
    chunk = next((tmp_path / "data/cache/features").rglob("*.safetensors"))
    import json

    ids = json.loads(chunk.with_suffix(".json").read_text())["ids"]
    feats = load_file(str(chunk))["features"].float().numpy()
    from breakhis_tl.data.identity import ImageStore

    index = index_breakhis(breakhis_real)
    store = ImageStore(tmp_path / "data/cache/images.sqlite")
    row = {i: k for k, i in enumerate(ids)}
    x = feats[[row[i] for i in store.content_ids(index["path"].tolist())]]
    y = (index["label"] == "malignant").to_numpy().astype(int)
    g = index["patient"].to_numpy()
    split = _folds_of(tmp_path / "trained_models/probe")
    at = {p: k for k, p in enumerate(index["relpath"])}
    scores = []
    for k in range(1, 6):
        f = split[split["fold"] == k]
        te = f.loc[f["split"] == "test", "path"].map(at).to_numpy()
        tr = f.loc[f["split"] != "test", "path"].map(at).to_numpy()
        pipe = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced",
                                                                  max_iter=5000))  # fmt: skip
        grid = GridSearchCV(pipe, {"logisticregression__C": np.logspace(-4, 2, 7)},
                            cv=StratifiedGroupKFold(5, shuffle=True, random_state=0),
                            scoring="balanced_accuracy")  # fmt: skip
        grid.fit(x[tr], y[tr], groups=g[tr])
        scores.append(balanced_accuracy_score(y[te], grid.predict(x[te])))
    print(f"default head {ours:.3f}, tuned scikit-learn probe {np.mean(scores):.3f}")
    assert ours >= np.mean(scores) - 0.02, (ours, scores)


def _test_scores(data, out, dataset, weights, run, **kw):
    from breakhis_tl.runner import RunConfig, run_training

    cfg = RunConfig(data=str(data), dataset=dataset, archs=["efficientnet_lite0"],
                    weights=weights, run=run, out=str(out), workers=0, progress=False,
                    **kw)  # fmt: skip
    res = run_training(cfg)
    test = res.results[res.results["split"] == "test"]
    print(f"{run} {dataset} {weights}: test auc {test['auc'].mean():.3f}, "
          f"balanced accuracy {test['balanced_accuracy'].mean():.3f}")  # fmt: skip
    return test["auc"].mean(), test["balanced_accuracy"].mean()


def _cache_rows(out):
    """Features of every chunk written so far (a baseline is compared only if it works)."""
    from safetensors.torch import load_file

    rows = [load_file(str(p)) for p in (out / "data/cache/features").rglob("*.safetensors")]
    return [t["features"][t["ok"].bool()].float() for t in rows]


@pytest.mark.slow
def test_real_signal_breakhis(breakhis_real, tmp_path):
    """lite0 (pretrained, offline) + the default linear probe, patient-level nested 5-fold CV
    on 148 real BreakHis images of 37 patients. Measured (AMD EPYC, 2026-11-27): test ROC AUC
    0.824 (balanced
    accuracy 0.720); BN-calibrated random init 0.662 (0.646). Floors leave a clear margin."""
    import torch

    auc, _ = _test_scores(breakhis_real, tmp_path, "breakhis", "default", "pre",
                          protocol="cv", cv=5)  # fmt: skip
    base, _ = _test_scores(breakhis_real, tmp_path, "breakhis", "none", "rand",
                           protocol="cv", cv=5)  # fmt: skip
    for f in _cache_rows(tmp_path):
        assert torch.isfinite(f).all() and (f.std(0) > 0).float().mean() > 0.5
    assert auc > 0.70, auc
    assert auc - base > 0.08, (auc, base)


@pytest.fixture(scope="module")
def idc_subset(idc_real, tmp_path_factory):
    """40 of the 167 real IDC patients (about 700 patches), linked, not copied."""
    root = tmp_path_factory.mktemp("idc40")
    for patient in sorted(p for p in idc_real.iterdir() if p.is_dir())[:40]:
        for png in patient.rglob("*.png"):
            link = root / png.relative_to(idc_real)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(png)
    return root


@pytest.mark.slow
def test_real_signal_idc(idc_subset, tmp_path):
    """The same on real IDC patches, patient-disjoint (train/val/test by patient), on 40 of
    the 167 patients (about 700 patches). One split of few patients, stratified by their
    share of IDC patches: the gap to a random init is real but small and noisy here, so the
    floors are low; the 5-fold table in docs/results.md is the measurement."""
    import torch

    auc, _ = _test_scores(idc_subset, tmp_path, "idc", "default", "pre", protocol="patient")
    base, _ = _test_scores(idc_subset, tmp_path, "idc", "none", "rand", protocol="patient")
    for f in _cache_rows(tmp_path):
        assert torch.isfinite(f).all() and (f.std(0) > 0).float().mean() > 0.5
    assert auc > 0.75, auc
    assert auc - base > 0.02, (auc, base)
