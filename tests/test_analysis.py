"""Reading runs back, the patient bootstrap, and the leakage study (on real BreakHis images)."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import _shared
from sklearn.metrics import balanced_accuracy_score

from breakhis_tl import analysis
from breakhis_tl.analysis import (
    CI_COLUMN,
    balanced_accuracy_of,
    bootstrap_ci,
    fresh_run_names,
    gap_bootstrap,
    leakage_study,
    load_run,
    patient_table,
    per_group_metrics,
    recognition_rates,
    results_table,
)
from breakhis_tl.errors import UserError

# --- the bootstrap, on synthetic predictions --------------------------------------------


def _synthetic(seed=0, patients=12, per_patient=(2, 9), classes=("a", "b", "c")):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        label = classes[p % len(classes)]
        for _ in range(rng.integers(*per_patient)):
            pred = label if rng.random() < 0.7 else classes[rng.integers(len(classes))]
            rows.append({"patient": f"p{p}", "target": label, "prediction": pred})
    return pd.DataFrame(rows)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("classes", [("a", "b"), ("a", "b", "c")])
def test_replicate_balanced_accuracy_is_scikit_learns(classes):
    df = _synthetic(classes=classes)
    df.loc[df.index[:3], "prediction"] = "z"  # a predicted class absent from the truth
    patients, labels = np.unique(df["patient"]), np.unique(df["target"])
    totals, correct = analysis._patient_counts(
        df["target"], df["prediction"], df["patient"], patients, labels
    )
    weights = analysis.resample_patients(len(patients), 20, seed=1)
    got = balanced_accuracy_of(np.vstack([np.ones(len(patients)), weights]), totals, correct)
    assert got[0] == pytest.approx(balanced_accuracy_score(df["target"], df["prediction"]))
    for w, value in zip(weights, got[1:], strict=True):
        rows = np.repeat(
            df.index.to_numpy(), w[np.searchsorted(patients, df["patient"])].astype(int)
        )
        sub = df.loc[rows]
        if sub["target"].nunique() >= 2:
            assert value == pytest.approx(balanced_accuracy_score(sub["target"], sub["prediction"]))
        else:
            assert np.isnan(value)
    assert (weights.sum(1) == len(patients)).all()


def test_interval_resamples_patients_not_images():
    # 6 patients of 40 images each, each patient all right or all wrong: 240 images, but
    # only 6 independent units. An image bootstrap would be narrow; the patient one is not.
    rows = []
    for p, (label, right) in enumerate(
        [("a", 1), ("a", 1), ("a", 0), ("b", 1), ("b", 0), ("b", 1)]
    ):
        pred = label if right else ("b" if label == "a" else "a")
        rows += [{"patient": f"p{p}", "target": label, "prediction": pred}] * 40
    df = pd.DataFrame(rows)
    lo, hi = bootstrap_ci(df["target"], df["prediction"], df["patient"])
    assert hi - lo > 0.4
    per_image = bootstrap_ci(df["target"], df["prediction"], np.arange(len(df)))
    assert per_image[1] - per_image[0] < 0.25
    # the same patients with every image counted 3 times: the same interval, exactly
    tripled = pd.concat([df] * 3)
    assert bootstrap_ci(tripled["target"], tripled["prediction"], tripled["patient"]) == (lo, hi)


def _arms(df_patient, df_leaky, repeats=3):
    frames = []
    for r in range(1, repeats + 1):
        frames += [
            df_patient.assign(arm="patient", repeat=r),
            df_leaky.assign(arm="leaky", repeat=r),
        ]
    return pd.concat(frames, ignore_index=True)


def test_gap_bootstrap_pairs_arms_on_patients():
    base = _synthetic(seed=3, classes=("a", "b"))
    same = gap_bootstrap(_arms(base, base))
    assert same == (0.0, 0.0, 0.0)
    leaky = base.assign(prediction=base["target"])  # the leaky arm gets every image right
    gap, lo, hi = gap_bootstrap(_arms(base, leaky))
    expected = 1 - balanced_accuracy_score(base["target"], base["prediction"])
    assert gap == pytest.approx(expected)
    assert lo <= gap <= hi and lo >= 0
    doubled = _arms(pd.concat([base] * 2), pd.concat([leaky] * 2))
    assert gap_bootstrap(doubled) == pytest.approx((gap, lo, hi))  # patients, not images


def test_caveat_and_conclusion_follow_the_numbers():
    assert "only 4 patients" in analysis.few_patients_caveat(4)
    assert analysis.few_patients_caveat(12) == ""
    assert "optimistic" in analysis.few_patients_caveat(12, selected=True)
    text = analysis.leakage_conclusion(0.123, (0.05, 0.2), 5, 40, 12)
    assert "raised balanced accuracy by 12.3 points (95% CI [+5.0, +20.0]) over 5 seeds" in text
    assert "includes zero" not in text and "rough" not in text
    text = analysis.leakage_conclusion(-0.02, (-0.1, 0.05), 5, 8, 5)
    assert "lowered" in text and "includes zero" in text and "5 test patients" in text


def test_run_names_are_fresh_and_never_reused(tmp_path):
    first = fresh_run_names(tmp_path, "leak", ("patient", "leaky"))
    (tmp_path / "trained_models" / first["leaky"]).mkdir(parents=True)
    second = fresh_run_names(tmp_path, "leak", ("patient", "leaky"))
    assert set(first.values()).isdisjoint(second.values())
    (tmp_path / "trained_models" / "mine_patient").mkdir(parents=True)
    (tmp_path / "trained_models" / "mine_patient" / "results.csv").write_text("x")
    with pytest.raises(UserError, match="already used"):
        fresh_run_names(tmp_path, "leak", ("patient", "leaky"), run="mine")


# --- the leakage study and the run tables, on real BreakHis images ------------------------


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    data = _shared("breakhis_real")
    out = tmp_path_factory.mktemp("study")
    result = leakage_study(
        data, "efficientnet_lite0", out, task="binary", magnification="40X,100X", epochs=5,
        seeds=3, test_frac=0.3, workers=0, progress=False,
    )  # fmt: skip
    return out, result


def _split_file(out, run):
    return pd.read_csv(out / "trained_models" / run / "split.csv")


@pytest.mark.slow
def test_leakage_study_arms_differ_only_by_the_leak_pool(study):
    out, st = study
    patient, leaky = (_split_file(out, st.runs[a]) for a in ("patient", "leaky"))
    assert st.runs["patient"] != st.runs["leaky"]
    tests = [set(s.loc[s["split"] == "test", "path"]) for s in (patient, leaky)]
    assert tests[0] == tests[1] and tests[0]
    vals = [set(s.loc[s["split"] == "val", "path"]) for s in (patient, leaky)]
    assert vals[0] == vals[1]
    pool = set(st.splits.leak_pool["relpath"])
    assert pool and pool.isdisjoint(tests[0])
    train_p = set(patient.loc[patient["split"] == "train", "path"])
    assert set(leaky.loc[leaky["split"] == "train", "path"]) == train_p | pool
    # no picture of a test image in the pool (pixel twins stay together)
    sp = st.splits.leaky
    test_pixels = set(sp.loc[sp["split"] == "test", "pixel"])
    assert test_pixels.isdisjoint(st.splits.leak_pool["pixel"])
    # the patient arm trains on no test patient; the pool holds only test patients' images
    test_patients = set(sp.loc[sp["split"] == "test", "patient"])
    assert test_patients.isdisjoint(
        st.splits.patient.loc[st.splits.patient["split"] == "train", "patient"]
    )
    assert set(st.splits.leak_pool["patient"]) <= test_patients
    assert patient["protocol"].iloc[0] == "patient" and leaky["protocol"].iloc[0] == "random"


@pytest.mark.slow
def test_leakage_study_scores_every_seed_on_the_same_images(study):
    out, st = study
    assert len(st.gaps) == 3 and list(st.gaps["repeat"]) == [1, 2, 3]
    per = st.predictions.groupby(["arm", "repeat"])["relpath"].apply(frozenset)
    assert len(per) == 6 and per.nunique() == 1  # 2 arms x 3 seeds
    for arm in ("patient", "leaky"):
        cfg = json.loads((out / "trained_models" / st.runs[arm] / "config.json").read_text())
        assert cfg["task"] == "binary" and cfg["config"]["magnification"] == "40X,100X"
        assert cfg["config"]["repeats"] == 3
        mags = pd.read_csv(out / "trained_models" / st.runs[arm] / "predictions.csv")[
            "magnification"
        ]
        assert set(mags) <= {40, 100}
    assert st.gap == pytest.approx(st.gaps["gap"].mean())
    assert (st.gap, *st.ci) == pytest.approx(gap_bootstrap(st.predictions))
    assert st.ci[0] <= st.gap <= st.ci[1]
    assert "over 3 seeds" in st.conclusion and f"{abs(st.gap) * 100:.1f} points" in st.conclusion
    gap_row = st.table.iloc[-1]
    assert gap_row["gap 95% CI"] == f"[{st.ci[0]:+.3f}, {st.ci[1]:+.3f}]"
    table, conclusion = st  # a DataFrame and a sentence
    assert conclusion == st.conclusion


@pytest.mark.slow
def test_a_named_study_is_never_overwritten(study):
    out, st = study
    name = st.runs["patient"].removesuffix("_patient")
    with pytest.raises(UserError, match="already used"):
        leakage_study(_shared("breakhis_real"), "efficientnet_lite0", out, run=name, epochs=1)


@pytest.mark.slow
def test_run_tables_on_a_real_run(study):
    out, st = study
    folder = out / "trained_models" / st.runs["patient"]
    (folder / "stale_head.pt").write_bytes(b"not a head of this run")
    run = load_run(out, st.runs["patient"])
    assert "stale_head" not in run.heads and len(run.heads) == 3
    assert list(run.head_per_arch()) == ["efficientnet_lite0"]
    table = results_table(run, n_boot=200)
    test = table[table["split"] == "test"].iloc[0]
    assert test["repeats"] == 3 and "±" in test["balanced_accuracy"]
    assert test["images"] == st.table.iloc[0]["test images"]
    assert test[CI_COLUMN].startswith("[")
    assert ("only" in test["caveat"]) == (test["patients"] < 10)
    val = table[table["split"] == "val (selected)"].iloc[0]
    assert val[CI_COLUMN] == "" and val["caveat"] == ""
    mags = per_group_metrics(run)
    assert set(mags["magnification"]) <= {"40X", "100X"}
    few = mags["patients"] < 3
    assert (mags.loc[few, "note"] == "too few patients to mean anything").all()
    assert (mags.loc[~few, "note"] == "").all()


@pytest.mark.slow
def test_patient_table_and_spanhol_rates(study):
    out, st = study
    run = load_run(out, st.runs["leaky"])
    pt = patient_table(run, "efficientnet_lite0")
    assert pt["images"].sum() == st.table.iloc[0]["test images"]
    assert set(pt["majority vote"]) <= set(run.classes) | {"tie"}
    assert set(pt["mean probability"]) <= set(run.classes)
    rates = recognition_rates(run, "efficientnet_lite0")
    rows = run.predictions[(run.predictions["split"] == "test") & (run.predictions["repeat"] == 1)]
    assert rates["image_rate"] == pytest.approx((rows["prediction"] == rows["target"]).mean())
    result = run.results[(run.results["split"] == "test") & (run.results["repeat"] == 1)].iloc[0]
    assert rates["patient_rate"] == pytest.approx(result["patient_rate"], abs=1e-3)
    assert rates["image_rate"] == pytest.approx(result["image_rate"])
    sentence = analysis.rates_sentence(rates)
    assert f"{rates['image_rate']:.3f}" in sentence and f"{rates['patient_rate']:.3f}" in sentence


@pytest.mark.slow
def test_group_by_sensitivity_side_by_side(study):
    out, st = study
    run = load_run(out, st.runs["patient"])
    cfg = analysis.run_config(run, out=str(out), split_file=None, protocol="patient", repeats=1,
                              magnification="all")  # fmt: skip
    cfg.train.epochs = 2
    joined = analysis.group_by_sensitivity(cfg, run_prefix="gb")
    assert ("balanced_accuracy", "slide") in joined.columns
    assert ("balanced_accuracy", "accession") in joined.columns
    assert set(joined[("split", "")]) == {"val (selected)", "test"}
    runs = sorted(p.name for p in (out / "trained_models").glob("gb_*"))
    assert len(runs) == 2
    groups = {json.loads((out / "trained_models" / r / "config.json").read_text())["group_by"]
              for r in runs}  # fmt: skip
    assert groups == {"slide", "accession"}


def test_compare_runs_pairs_the_same_images(tmp_path):
    """Two runs scoring the same images: the gap is their balanced-accuracy difference."""
    import json

    from breakhis_tl.analysis import compare_runs

    rows = [("a", "p1", "benign"), ("b", "p1", "benign"), ("c", "p2", "malignant"),
            ("d", "p3", "malignant"), ("e", "p4", "benign"), ("f", "p4", "benign")]  # fmt: skip
    wrong = {"first": {"c", "e"}, "second": set()}
    for run, bad in wrong.items():
        folder = tmp_path / "trained_models" / run
        folder.mkdir(parents=True)
        pd.DataFrame([{"arch": "x", "fold": 1, "repeat": 1, "split": "test"}]).assign(
            balanced_accuracy=0.5
        ).to_csv(folder / "results.csv", index=False)
        pd.DataFrame(columns=["arch", "head", "epoch"]).to_csv(folder / "history.csv", index=False)
        flip = {"benign": "malignant", "malignant": "benign"}
        preds = [
            {"arch": "x", "fold": 1, "repeat": 1, "split": "test", "relpath": r, "patient": p,
             "target": t, "prediction": flip[t] if r in bad else t}
            for r, p, t in rows
        ]  # fmt: skip
        pd.DataFrame(preds).to_csv(folder / "predictions.csv", index=False)
        (folder / "config.json").write_text(json.dumps({"classes": ["benign", "malignant"]}))
    text = compare_runs(tmp_path, "first", "second", n=200)
    # first: benign 3/4, malignant 1/2 -> 0.625; second: 1.0; gap +0.375
    assert text.startswith("second minus first: +0.375") and "4 patients, 6 images" in text
