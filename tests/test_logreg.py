"""The default head's logistic regression (torch, all folds at once) against scikit-learn's.

scikit-learn is the reference, solved to convergence (tol 1e-8): at its default tolerance
(1e-4) its own out-of-fold probabilities move by up to 4e-3 at C = 0.1 and 0.3-1.0 at
C >= 10 when it is run on, and on breakhis_real that picks C = 0.001 instead of the 0.1 that
the converged solution picks. The torch probe stops at the same gradient tolerance in float32;
measured against the converged reference: the same C on both data sets, probabilities within
1.8e-3 at the chosen C (breakhis_real) and 2.7e-4 (idc_real, all 3,032 patches).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import _shared
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from breakhis_tl.heads import logreg
from breakhis_tl.heads.training import LOGREG_C, Hooks, TrainConfig, fit_logreg, fit_logreg_cv

PROB_TOL = 5e-3  # largest difference of a probability at the chosen C (measured <= 1.8e-3)


def _lite0_features(index) -> dict:
    from breakhis_tl.features.extract import Request, extract
    from breakhis_tl.models.backbones import build_backbone
    from breakhis_tl.models.compute import PLAIN

    bb = build_backbone("efficientnet_lite0", "default")
    paths = index["path"].tolist()
    # fp32: the same features on any CPU, within fp32 rounding (bf16 would vary with it)
    [(x, ok)], _ = extract(paths, [Request(bb, 0, np.arange(len(paths)), PLAIN)], workers=0,
                           progress=False)  # fmt: skip
    assert ok.all()
    return {"x": x, "index": index}


@pytest.fixture(scope="module")
def breakhis_feats():
    """lite0 (ImageNet weights) features of the 148 real BreakHis images, in fp16 as cached."""
    from breakhis_tl.data.index import index_breakhis

    root = _shared("breakhis_real")
    out = _lite0_features(index_breakhis(root))
    out["y"] = (out["index"]["label"] == "malignant").to_numpy().astype(int)
    return out


@pytest.fixture(scope="module")
def idc_feats():
    """The same for the real IDC patches of 25 of the 167 patients."""
    from breakhis_tl.data.index import index_idc

    index = index_idc(_shared("idc_real"))
    keep = sorted(index["patient"].unique())[:25]
    index = index[index["patient"].isin(keep)].reset_index(drop=True)
    out = _lite0_features(index)
    out["y"] = (out["index"]["label"] == "idc").to_numpy().astype(int)
    return out


def _converged(c: float):
    """scikit-learn's pipeline, solved to convergence: the reference."""
    lr = LogisticRegression(C=c, class_weight="balanced", tol=1e-8, max_iter=20000)
    return make_pipeline(StandardScaler(), lr)


def _sklearn_path(x, y, splits):
    """Out-of-fold probabilities per C of scikit-learn's pipeline on the same folds."""
    oofs = []
    for c in LOGREG_C:
        oof = np.zeros((len(y), 2))
        for tr, te in splits:
            oof[te] = _converged(c).fit(x[tr], y[tr]).predict_proba(x[te])
        oofs.append(oof)
    return oofs


@pytest.mark.slow
@pytest.mark.parametrize("data", ["breakhis_feats", "idc_feats"])
def test_default_probe_matches_converged_sklearn(data, request):
    """Same folds, same C chosen by out-of-fold balanced accuracy, the same out-of-fold
    probabilities of the validation patients and the same refit head, within PROB_TOL."""
    d = request.getfixturevalue(data)
    x16, y, g = d["x"], d["y"], d["index"]["patient"].astype(str).to_numpy()
    val = np.isin(g, np.unique(g)[::5])
    order = np.r_[np.flatnonzero(~val), np.flatnonzero(val)]  # the pool: train, then val
    head, res, val_oof = fit_logreg_cv((x16[~val], y[~val], g[~val]), (x16[val], y[val], g[val]),
                                       ["a", "b"], TrainConfig())  # fmt: skip
    x, y, g = x16.float().numpy()[order].astype(np.float64), y[order], g[order]
    splits = list(StratifiedGroupKFold(5, shuffle=True, random_state=0).split(x, y, g))
    oofs = _sklearn_path(x, y, splits)
    scores = [balanced_accuracy_score(y, o.argmax(1)) for o in oofs]
    best = int(np.argmax(scores))
    assert res.best_epoch == best + 1, ([h["cv_balanced_accuracy"] for h in res.history], scores)
    assert np.abs(val_oof - oofs[best][len(order) - val.sum() :]).max() <= PROB_TOL
    ref = _converged(LOGREG_C[best]).fit(x, y)
    ours = torch.softmax(head(torch.as_tensor(x, dtype=torch.float32)), 1).detach().numpy()
    assert np.abs(ours - ref.predict_proba(x)).max() <= PROB_TOL


@pytest.mark.slow
def test_multinomial_matches_sklearn(breakhis_feats):
    """More than two classes: one softmax over all of them, every row penalised, as
    scikit-learn's multinomial LogisticRegression (here the 8 BreakHis subtypes)."""
    x = breakhis_feats["x"].float().numpy().astype(np.float64)
    codes = breakhis_feats["index"]["subtype"]
    y = codes.astype("category").cat.codes.to_numpy()
    p = logreg.standardise([breakhis_feats["x"]], y, 8, "cpu")
    logreg.set_folds(p, np.ones((1, len(y)), bool), balanced=True)
    theta, _ = logreg.solve(p, 0.01, logreg.zeros(p))
    ours = logreg.probabilities(p, theta)[:, 0]
    ref = _converged(0.01).fit(x, y)
    assert np.abs(ours - ref.predict_proba(x)).max() <= PROB_TOL


def test_fallback_probe_fits_each_c_as_sklearn(breakhis_feats):
    """`fit_logreg` (too few patients to cross-validate): every candidate's head is
    scikit-learn's for that C (up to C = 0.01, where both are well within PROB_TOL of the
    optimum; from 0.1 up, float32 rounding and the gradient tolerance move them by about
    that much), and the head kept is the best on val."""
    x16, y = breakhis_feats["x"], breakhis_feats["y"]
    g = breakhis_feats["index"]["patient"].to_numpy()
    val = np.isin(g, np.unique(g)[::4])
    xt, xv, seen = torch.as_tensor(x16[~val]), x16[val].float(), []

    def evaluate(h):
        seen.append(torch.softmax(h(xv), 1).detach().numpy())
        return y[val], seen[-1], list(g[val])

    head, res = fit_logreg(lambda e: [(xt, torch.as_tensor(y[~val]))], evaluate, ["a", "b"],
                           TrainConfig())  # fmt: skip
    x = x16.float().numpy().astype(np.float64)
    for c, ours in zip(LOGREG_C[:3], seen, strict=False):
        ref = _converged(c).fit(x[~val], y[~val]).predict_proba(x[val])
        assert np.abs(ours - ref).max() <= PROB_TOL, c
    scores = [h["val_balanced_accuracy"] for h in res.history]
    assert res.best_epoch == 1 + int(np.argmax(scores))
    assert np.array_equal(torch.softmax(head(xv), 1).detach().numpy(), seen[res.best_epoch - 1])


def test_binary_head_rows_are_opposite_halves():
    """Two classes: rows -w/2 and +w/2 (so Grad-CAM has a row to follow for each class), with
    the probabilities of the former form (a row of zeros for class 0, w for class 1)."""
    from breakhis_tl.heads.training import linear_from_logreg

    rng = np.random.default_rng(0)
    coef, b = rng.normal(size=(1, 16)), rng.normal(size=1)
    mean, scale = rng.normal(size=16), rng.uniform(0.5, 2, 16)
    head = linear_from_logreg(coef, b, mean, scale, 2)
    w, bias = head[0].weight.detach(), head[0].bias.detach()
    assert torch.equal(w[0], -w[1]) and torch.equal(bias[0], -bias[1]) and w[1].abs().min() > 0
    x = torch.as_tensor(rng.normal(size=(50, 16)), dtype=torch.float32)
    raw = torch.as_tensor(coef / scale, dtype=torch.float32)
    shift = float(b[0] - ((coef / scale) @ mean)[0])
    former = torch.cat([torch.zeros(50, 1), x @ raw.T + shift], 1)
    assert torch.allclose(torch.softmax(head(x), 1), torch.softmax(former, 1), atol=1e-6)


def _stop_during_first_solve(monkeypatch):
    """A stop flag set by the first candidate's first evaluation, and a count of them."""
    flag, calls = {"stop": False}, []
    real = logreg.objective

    def spy(p, theta, c):
        flag["stop"] = True
        calls.append(c)
        return real(p, theta, c)

    monkeypatch.setattr(logreg, "objective", spy)
    return flag, calls


def test_ctrl_c_during_the_first_c_ends_the_path(breakhis_feats, monkeypatch):
    """The flag is polled between evaluations from the second candidate on: the first C
    finishes (a head needs one), the second stops at once, and its refit is the head."""
    x, y = breakhis_feats["x"], breakhis_feats["y"]
    g = breakhis_feats["index"]["patient"].to_numpy()
    val = np.isin(g, np.unique(g)[::5])
    flag, calls = _stop_during_first_solve(monkeypatch)
    stop = lambda: flag["stop"]  # noqa: E731
    hooks = Hooks(should_stop=stop)
    head, res, val_oof = fit_logreg_cv((x[~val], y[~val], g[~val]), (x[val], y[val], g[val]),
                                       ["a", "b"], TrainConfig(), hooks)  # fmt: skip
    assert res.interrupted and len(res.history) == 1 and res.best_epoch == 1
    assert set(calls) == {LOGREG_C[0]} and len(val_oof) == val.sum()
    batches = lambda epoch: [(torch.as_tensor(x[~val]), torch.as_tensor(y[~val]))]  # noqa: E731
    evaluate = lambda h: (y[val], torch.softmax(h(x[val].float()), 1).detach().numpy(), g[val])  # noqa: E731
    calls.clear()
    head, res = fit_logreg(batches, evaluate, ["a", "b"], TrainConfig(), hooks)
    assert res.interrupted and len(res.history) == 1 and set(calls) == {LOGREG_C[0]}


def test_ctrl_c_stops_a_cv_run_of_the_default_head(breakhis_sample, tmp_path, monkeypatch):
    """A Ctrl-C while the first head's first C is solved (the runner's own handler): that head
    ends with its first C, no other fold is trained, and the run says it was interrupted."""
    import signal

    from breakhis_tl.runner import RunConfig, run_training

    real, sent = logreg.solve, []

    def solve(*args, **kw):
        if not sent:
            sent.append(signal.raise_signal(signal.SIGINT))
        return real(*args, **kw)

    monkeypatch.setattr(logreg, "solve", solve)
    cfg = RunConfig(data=str(breakhis_sample), archs=["efficientnet_lite0"], protocol="cv", cv=3,
                    run="ctrlc", out=str(tmp_path), workers=0, progress=False)  # fmt: skip
    res = run_training(cfg)
    assert res.interrupted and len(res.heads) == 1
    assert res.history["epoch"].tolist() == [1] and res.results["interrupted"].all()


def test_probe_benchmark_runs_and_prints_json(tmp_path):
    """benchmarks/logreg_probe.py on 150 real patches: one row per head size and solver (no
    timing asserted; the measured ones are in README, Performance)."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    args = ["--data", str(_shared("idc_real")), "--limit", "150", "--rows", "150,200",
            "--repeats", "1", "--workdir", str(tmp_path)]  # fmt: skip
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "logreg_probe.py"), *args],
                          capture_output=True, text=True, timeout=600, cwd=REPO)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(r["rows"], r["impl"]) for r in rows] == [
        (150, "torch"), (150, "sklearn"), (200, "torch"), (200, "sklearn")
    ]  # fmt: skip
    assert all(r["runs"] == 1 and r["seconds"] > 0 and r["chosen_C"] for r in rows)
    assert all(len(r["lbfgs_iterations"]) >= 2 for r in rows if r["impl"] == "torch")
