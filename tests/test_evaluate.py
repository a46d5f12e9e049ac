"""Scoring a saved head against the labels in BreakHis/IDC names: predict and evaluate."""

import logging

import numpy as np
import pandas as pd
import pytest
from conftest import _shared
from PIL import Image
from sklearn import metrics as skm

from breakhis_tl.cli import main
from breakhis_tl.data.index import index_breakhis, index_idc
from breakhis_tl.data.splits import class_names
from breakhis_tl.errors import UserError
from breakhis_tl.evaluate import (
    assess,
    labels_from_names,
    patient_table,
    scorable,
    score,
    split_inputs,
)
from breakhis_tl.heads.modules import load_head, make_head, save_head
from breakhis_tl.predict import Classifier, domain_warning, patient_of


@pytest.fixture(scope="session")
def breakhis_real():
    return _shared("breakhis_real")


@pytest.fixture(scope="module")
def real_preds(clf, breakhis_real):
    return clf.predict(breakhis_real, workers=0, progress=False)


@pytest.fixture(scope="module")
def idc_head(head_file, tmp_path_factory):
    """The sample head's weights under IDC metadata: what a head trained on IDC declares."""
    head, meta = load_head(head_file)
    meta = {k: v for k, v in meta.items() if k != "_extra"}
    path = tmp_path_factory.mktemp("idc") / "idc_head.pt"
    return save_head(path, head, {**meta, "dataset": "idc", "classes": ["non_idc", "idc"]})


def test_labels_from_names():
    names = [
        "a/SOB_B_TA-14-3411F-100-004.png",
        "SOB_M_DC-14-13412-100-003.png",
        "SOB_B_DC-14-13412-100-003.png",  # B with a malignant subtype: no label
        "8975_idx5_x101_y1201_class1.png",
        "photo.png",
    ]
    assert labels_from_names(names, ["benign", "malignant"], "breakhis") == [
        "benign", "malignant", None, None, None,
    ]  # fmt: skip
    assert labels_from_names(names, class_names("subtype", "breakhis"), "breakhis")[:2] == [
        "TA",
        "DC",
    ]
    # an eva head: labels outside its 4 classes are given, for the caller to leave out
    eva = class_names("subtype", "breakhis", "eva")
    assert labels_from_names(names[:2], eva, "breakhis") == ["TA", "DC"]
    assert labels_from_names(names, ["non_idc", "idc"], "idc") == [None] * 3 + ["idc", None]


def test_predict_scores_against_names(clf, real_preds, breakhis_real):
    """Labels come from the names; the metrics are scikit-learn's on them and the patient
    rate is the mean of the patient table's share_correct."""
    index = index_breakhis(breakhis_real).set_index("path")
    df = real_preds
    assert list(df.columns[:3]) == ["path", "label", "prediction"]
    assert df["label"].tolist() == index.loc[df["path"], "label"].tolist()
    ev = assess(df, clf.classes, clf.meta.get("protocol"))
    y = (df["label"] == "malignant").astype(int)
    pred = (df["prediction"] == "malignant").astype(int)
    assert ev.image["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert ev.image["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert ev.image["auc"] == pytest.approx(skm.roc_auc_score(y, df["prob_malignant"]))
    by_patient = (df["label"] == df["prediction"]).groupby(df["path"].map(patient_of)).mean()
    assert ev.image["patient_rate"] == pytest.approx(by_patient.mean())
    table = clf.patients(df)
    assert len(table) == 37 and table["n_images"].sum() == 148
    assert table["share_correct"].mean() == pytest.approx(ev.image["patient_rate"])
    assert list(table.columns[:6]) == [
        "patient", "label", "n_images", "share_correct", "majority_vote", "prediction",
    ]  # fmt: skip
    for row in table.itertuples():
        g = df[df["path"].map(patient_of) == row.patient]
        counts = g["prediction"].value_counts()
        if (counts == counts.max()).sum() == 1:
            assert row.majority_vote == counts.idxmax()
        means = g[["prob_benign", "prob_malignant"]].mean().to_numpy()
        assert row.prediction == clf.classes[int(means.argmax())]
        assert row.label == index.loc[g["path"].iloc[0], "label"]
    # patient level: the mean-probability predictions of the 37 single-class patients
    yp = (table["label"] == "malignant").astype(int)
    assert ev.patient["auc"] == pytest.approx(skm.roc_auc_score(yp, table["prob_malignant"]))
    summary = ev.summary.set_index("metric")
    assert summary.loc["recognition rate (Spanhol)", "patient_level"] == pytest.approx(
        by_patient.mean()
    )
    assert summary.loc["n", "image_level"] == 148 and summary.loc["n", "patient_level"] == 37


def test_labels_none_and_unlabelled_names(clf, breakhis_sample, tmp_path):
    plain = clf.predict(breakhis_sample, workers=0, progress=False, labels="none")
    assert "label" not in plain
    pats = clf.patients(plain)
    assert "label" not in pats and "majority_vote" in pats and len(pats) == 11
    one = sorted(breakhis_sample.rglob("*.png"))[0]
    (tmp_path / "renamed.png").write_bytes(one.read_bytes())
    mixed = clf.predict([str(one), str(tmp_path / "renamed.png")], workers=0, progress=False)
    assert "label" not in mixed  # one name gives no label: nothing is scored
    with pytest.raises(UserError, match="choose auto or none"):
        clf.predict(breakhis_sample, labels="yes", progress=False)


def test_unreadable_rows_are_not_scored(clf, breakhis_sample, tmp_path):
    good = sorted(breakhis_sample.rglob("*.png"))
    bad = tmp_path / "SOB_M_DC-14-2523-40-010.png"
    bad.write_bytes(good[0].read_bytes()[:2000])
    df = clf.predict([*map(str, good), str(bad)], workers=0, progress=False)
    assert df["label"].iloc[-1] == "malignant" and df["error"].iloc[-1] != ""
    result = score(df, df["label"].tolist(), clf.classes)
    assert result["n_images"] == 14


def test_cli_predict_prints_scores(head_file, breakhis_sample, tmp_path, capsys):
    code = main(["predict", "--head", str(head_file), str(breakhis_sample), "--device", "cpu",
                 "--workers", "0", "--patients", str(tmp_path / "pp.csv")])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "Scored against the labels in the file names" in out
    for name in ("balanced accuracy", "AUC", "recognition rate (Spanhol)", "majority-vote"):
        assert name in out
    pp = pd.read_csv(tmp_path / "pp.csv")
    assert {"label", "share_correct", "majority_vote", "prediction"} <= set(pp.columns)
    main(["predict", "--head", str(head_file), str(breakhis_sample), "--labels", "none",
          "--device", "cpu", "--workers", "0"])  # fmt: skip
    assert "Scored against" not in capsys.readouterr().out


def test_evaluate_split_file(clf, head_file, breakhis_real, tmp_path, capsys):
    split = tmp_path / "split.csv"
    assert main(["split", "--data", str(breakhis_real), "--out", str(split),
                 "--cache-dir", str(tmp_path / "cache")]) == 0  # fmt: skip
    capsys.readouterr()
    out = tmp_path / "ev"
    code = main(["evaluate", "--head", str(head_file), "--split-file", str(split),
                 "--data", str(breakhis_real), "--out", str(out), "--device", "cpu",
                 "--workers", "0"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "efficientnet_lite0 on test of split.csv" in printed
    rows = pd.read_csv(split)
    test = rows[rows["split"] == "test"]
    preds = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert len(preds) == len(test)
    assert sorted(p.split("BreaKHis_v1/")[-1] for p in preds["path"]) == sorted(
        "BreaKHis_v1/".join(["", p]).split("BreaKHis_v1/")[-1] for p in test["path"]
    )
    api = clf.predict(preds["path"].tolist(), workers=0, progress=False)
    expected = assess(api, clf.classes, None)
    metrics = pd.read_csv(out / "metrics.csv").set_index("metric")
    assert metrics.loc["accuracy", "image_level"] == pytest.approx(expected.image["accuracy"])
    assert metrics.loc["recognition rate (Spanhol)", "patient_level"] == pytest.approx(
        expected.image["patient_rate"]
    )
    patients = pd.read_csv(out / "patients.csv")
    assert patients["n_images"].sum() == len(test)
    assert set(patients["patient"].astype(str)) == set(api["path"].map(patient_of))
    assert np.array(expected.image["confusion"]).sum() == len(test)
    im = Image.open(out / "confusion.png")
    assert im.width > 200 and im.height > 200


def test_evaluate_folder_matches_predict(clf, head_file, breakhis_sample, tmp_path, capsys):
    code = main(["evaluate", "--head", str(head_file), str(breakhis_sample), "--out",
                 str(tmp_path), "--device", "cpu", "--workers", "0"])  # fmt: skip
    assert code == 0
    df = clf.predict(breakhis_sample, workers=0, progress=False)
    metrics = pd.read_csv(tmp_path / "metrics.csv").set_index("metric")
    assert metrics.loc["balanced accuracy", "image_level"] == pytest.approx(
        score(df, df["label"].tolist(), clf.classes)["balanced_accuracy"]
    )
    assert "the given images" in capsys.readouterr().out


def test_evaluate_bad_inputs(head_file, breakhis_real, breakhis_sample, tmp_path, capsys):
    split = tmp_path / "s.csv"
    pd.DataFrame(
        {"path": ["BreaKHis_v1/nowhere/SOB_B_A-14-1-40-001.png"], "split": ["test"]}
    ).to_csv(split, index=False)
    cases = [
        (["--split-file", str(split), "--data", str(breakhis_real)], "None of the 1 test image"),
        (["--split-file", str(split), "--data", str(breakhis_real), "--split", "val"],
         "has no val images (it has test); choose one with --split"),
        (["--split-file", str(split)], "--split-file needs --data"),
        ([], "Give either --split-file (with --data) or images and folders, not neither"),
        ([str(breakhis_sample), "--split-file", str(split), "--data", "x"], "not both"),
    ]  # fmt: skip
    for extra, message in cases:
        assert main(["evaluate", "--head", str(head_file), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1
    (tmp_path / "photo.png").write_bytes(next(breakhis_sample.rglob("*.png")).read_bytes())
    assert main(["evaluate", "--head", str(head_file), str(tmp_path / "photo.png"),
                 "--device", "cpu", "--workers", "0"]) == 2  # fmt: skip
    assert "reads labels from breakhis file names" in capsys.readouterr().err


def test_split_file_folds(breakhis_real, tmp_path):
    index = index_breakhis(breakhis_real)
    rel = index["relpath"].tolist()
    rows = [(p, "test" if i % 3 == 0 else "train", k) for k in (1, 2) for i, p in enumerate(rel)]
    split = tmp_path / "cv.csv"
    pd.DataFrame(rows, columns=["path", "split", "fold"]).to_csv(split, index=False)
    with pytest.raises(UserError, match="holds folds 1, 2 and the head names none"):
        split_inputs(split, breakhis_real, "breakhis", "test", None)
    with pytest.raises(UserError, match="has no fold 3"):
        split_inputs(split, breakhis_real, "breakhis", "test", 3)
    got = split_inputs(split, breakhis_real, "breakhis", "test", 2)
    assert len(got) == len(rel[::3]) and all(p.endswith(".png") for p in got)


def test_csv_as_head(breakhis_sample, tmp_path, capsys):
    csv = tmp_path / "results.csv"
    csv.write_text("arch,split,accuracy\nresnet50,test,0.9\n")
    assert main(["predict", "--head", str(csv), str(breakhis_sample)]) == 2
    err = capsys.readouterr().err
    assert "results.csv is a CSV file, not a breakhis_tl head file; pass a .pt head file " \
        "from trained_models/<run>/." in err  # fmt: skip
    assert "IndexError" not in err and "pickled" not in err
    assert main(["evaluate", "--head", str(tmp_path), str(breakhis_sample)]) == 2
    assert "is a folder, not a head file" in capsys.readouterr().err


def test_head_on_the_other_dataset_warns(clf, idc_head, idc_sample, breakhis_sample, caplog):
    with caplog.at_level(logging.WARNING):
        df = clf.predict(idc_sample, workers=0, progress=False)
    warned = [r.getMessage() for r in caplog.records if "This head was trained on" in r.message]
    assert len(warned) == 1
    assert "trained on BreakHis images (700x460), but of 103 input(s) 103 are named like IDC" \
        in warned[0] and "far from that size (such as 50x50)" in warned[0]  # fmt: skip
    assert "label" not in df  # IDC names give no benign/malignant label: nothing is scored
    caplog.clear()
    other = Classifier.from_head(idc_head, device="cpu")
    with caplog.at_level(logging.WARNING):
        df = other.predict(breakhis_sample, workers=0, progress=False)
    warned = [r.getMessage() for r in caplog.records if "This head was trained on" in r.message]
    assert len(warned) == 1 and "trained on IDC images (50x50)" in warned[0]
    assert "14 are named like BreakHis images" in warned[0] and "label" not in df
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        clf.predict(breakhis_sample, workers=0, progress=False)
        other.predict(idc_sample, workers=0, progress=False)
    assert not [r for r in caplog.records if "This head was trained on" in r.message]


def test_domain_warning_by_size_alone():
    assert domain_warning(["<image 0>"], [(700, 460)], "breakhis", ["benign", "malignant"]) == ""
    msg = domain_warning(["<image 0>", "<image 1>"], [(50, 50), (700, 460)], "breakhis", ["a", "b"])
    assert "of 2 input(s) 1 are far from that size (such as 50x50)" in msg
    assert "named like" not in msg
    assert domain_warning(["x.png"], [(32, 50)], "idc", ["non_idc", "idc"]) == ""


def test_idc_head_scored_on_idc(idc_head, idc_sample):
    """IDC patients have patches of both classes: the patient rate is defined, patient-level
    accuracy is not, and a note says why."""
    clf = Classifier.from_head(idc_head, device="cpu")
    df = clf.predict(idc_sample, workers=0, progress=False)
    index = index_idc(idc_sample).set_index("path")
    assert df["label"].tolist() == index.loc[df["path"], "label"].tolist()
    ev = assess(df, clf.classes, None)
    table = ev.patients
    assert len(table) == 1 and table["label"].iloc[0] == "non_idc/idc"
    assert np.isnan(ev.patient.get("accuracy", np.nan))
    assert ev.image["patient_rate"] == pytest.approx(ev.image["accuracy"])  # one patient
    assert any("several classes" in n for n in ev.notes)


def test_eva_head_leaves_other_classes_out(head_file, real_preds, tmp_path):
    _, meta = load_head(head_file)
    meta = {k: v for k, v in meta.items() if k != "_extra"}
    eva = class_names("subtype", "breakhis", "eva")
    path = save_head(
        tmp_path / "eva.pt",
        make_head("linear", int(meta["feature_dim"]), len(eva)),
        {**meta, "classes": eva, "task": "subtype", "protocol": "eva"},
    )
    clf = Classifier.from_head(path, device="cpu")
    paths = real_preds["path"].tolist()
    df = clf.predict(paths, workers=0, progress=False)
    codes = [p.split("SOB_")[-1].split("-")[0].split("_")[1] for p in paths]
    assert df["label"].tolist() == codes
    ev = assess(df, clf.classes, "eva")
    inside = sum(c in eva for c in codes)
    assert ev.image["n_images"] == inside < len(paths)
    assert any(f"{len(paths) - inside} image(s) of class(es)" in n for n in ev.notes)
    assert np.array(ev.image["confusion"]).shape == (4, 4)
    pc = ev.patients[ev.patients["label"] == "PC"]
    assert len(pc) and pc["share_correct"].isna().all()
    with pytest.raises(UserError, match="do not cover the labels DC, LC"):
        scorable(["A", "DC", "LC"], ["A", "F", "PT", "TA"], "patient")


def test_patient_table_without_patients(clf):
    df = pd.DataFrame({"path": ["x.png"], "prediction": ["benign"], "prob_benign": [0.9],
                       "prob_malignant": [0.1], "error": [""]})  # fmt: skip
    table = patient_table(df, clf.classes, ["benign"])
    assert table.empty and "share_correct" in table.columns
