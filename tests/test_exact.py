"""Issue 29: pairing, the marked C, one patient table, IDC strata, paired architecture
comparisons and patient-level numbers from too few patients (synthetic runs: no training)."""

import json

import numpy as np
import pandas as pd
import pytest

from breakhis_tl import analysis, evaluate
from breakhis_tl.analysis import load_run

CLASSES = ["benign", "malignant"]


def _predictions(arch, slides, seed, split="test", right=0.7, per_slide=4):
    """Rows of a run's predictions.csv: `slides` maps slide id -> true class."""
    rng = np.random.default_rng(seed)
    rows = []
    for slide, label in slides.items():
        for i in range(per_slide):
            ok = rng.random() < right
            pred = label if ok else CLASSES[1 - CLASSES.index(label)]
            p1 = 0.8 if pred == "malignant" else 0.2
            name = f"SOB_{label[0].upper()}_{'A' if label == 'benign' else 'DC'}-14-{slide}-40-{i:03d}.png"
            rows.append({
                "arch": arch, "fold": 1, "repeat": 1, "split": split,
                "relpath": f"{slide}/{name}", "path": f"/d/{slide}/{name}",
                "patient": slide, "slide": slide, "target": label, "prediction": pred,
                "prob_benign": 1 - p1, "prob_malignant": p1,
            })  # fmt: skip
    return pd.DataFrame(rows)


def _write_run(out, name, predictions, group_by="slide", history=None):
    folder = out / "trained_models" / name
    folder.mkdir(parents=True)
    predictions.to_csv(folder / "predictions.csv", index=False)
    results = []
    for (arch, split), g in predictions.groupby(["arch", "split"]):
        ba = float((g["prediction"] == g["target"]).mean())
        results.append({"arch": arch, "fold": 1, "repeat": 1, "split": split,
                        **{m: ba for m in analysis.TABLE_METRICS}})  # fmt: skip
    pd.DataFrame(results).to_csv(folder / "results.csv", index=False)
    (history if history is not None else pd.DataFrame({"arch": [], "head": []})).to_csv(
        folder / "history.csv", index=False
    )
    config = {"classes": CLASSES, "group_by": group_by, "protocol": "cv", "config": {}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# --- item 1: compare_runs pairs on one patient key ---------------------------------------


def test_compare_runs_pairs_on_the_coarser_key(tmp_path):
    # 6 accessions, each of 2 slides (12 slides): by slide, 12 patients; by accession, 6.
    slides = {f"{a}{s}": CLASSES[a % 2] for a in range(100, 106) for s in "AB"}
    by_slide = _predictions("m", slides, seed=1)
    by_accession = by_slide.assign(patient=by_slide["slide"].str[:3])
    _write_run(tmp_path, "slide_run", by_slide, "slide")
    _write_run(tmp_path, "acc_run", by_accession.assign(prediction="malignant"), "accession")
    text = analysis.compare_runs(tmp_path, "slide_run", "acc_run", n=200)
    assert "6 patients" in text and "48 images" in text
    assert "patient key accession of run acc_run, the coarser" in text
    text = analysis.compare_runs(tmp_path, "acc_run", "slide_run", n=200)
    assert "6 patients" in text  # the same key whichever run comes first


def test_compare_runs_joins_keys_that_cross(tmp_path):
    slides = {f"{k}S": CLASSES[k % 2] for k in range(4)}
    first = _predictions("m", slides, seed=2)
    second = first.copy()
    second.loc[second.groupby("slide").head(1).index[:2], "patient"] = "x"
    _write_run(tmp_path, "a", first)
    _write_run(tmp_path, "b", second)
    text = analysis.compare_runs(tmp_path, "a", "b", n=100)
    assert "3 patients" in text and "joined" in text  # s0, s1 and x are one unit


# --- item 7: one patient table, one tie rule ----------------------------------------------


def test_patient_table_one_tie_rule_in_analysis_and_evaluate(tmp_path):
    # patient 7T: one image benign at 0.9, one malignant at 0.6: a 1-1 tie of the vote, and
    # the higher mean probability is benign's (0.65).
    p = _predictions("m", {"7T": "benign", "8U": "malignant"}, seed=0, per_slide=2, right=1.0)
    p.loc[0, ["prediction", "prob_benign", "prob_malignant"]] = ["benign", 0.9, 0.1]
    p.loc[1, ["prediction", "prob_benign", "prob_malignant"]] = ["malignant", 0.4, 0.6]
    _write_run(tmp_path, "r", p)
    table = analysis.patient_table(load_run(tmp_path, "r"), "m")
    tied = table.set_index("patient").loc["7T"]
    assert tied["majority vote"] == "benign" and tied["mean probability"] == "benign"
    ev = evaluate.patient_table(p.assign(error="", path=p["path"]), CLASSES, list(p["target"]))
    assert list(ev["majority_vote"]) == list(table["majority vote"])
    assert list(ev["share_correct"]) == pytest.approx(list(table["correct share"]))
