import logging

import pandas as pd
import pytest

from breakhis_tl.cli import main
from breakhis_tl.data.folds import SplitOptions, plan_folds, write_split
from breakhis_tl.data.index import index_breakhis, index_idc
from breakhis_tl.data.splits import (
    EVA_VAL_PATIENTS,
    check_no_leakage,
    make_split,
    read_folds_csv,
)
from breakhis_tl.errors import UserError


@pytest.fixture(scope="module")
def full_index(full_tree):
    return index_breakhis(full_tree)


def _patients(df, side):
    return set(df.loc[df["split"] == side, "patient"])


def test_patient_split_is_disjoint_sized_and_seeded(full_index):
    a = make_split(full_index, "patient", seed=0)
    assert set(a["split"]) == {"train", "val", "test"}
    tr, va, te = (_patients(a, s) for s in ("train", "val", "test"))
    assert not (tr & va or tr & te or va & te)
    assert len(tr | va | te) == 81
    # about 15% of 81 patients each for val and test, stratified by label (rounded per class)
    assert 12 <= len(va) <= 13 and 12 <= len(te) <= 13
    for side in ("val", "test"):
        assert a.loc[a["split"] == side, "label"].nunique() == 2
    # slide 13412 (DC and LC folders) is on one side only
    assert a.loc[a["patient"] == "13412", "split"].nunique() == 1
    assert a["split"].equals(make_split(full_index, "patient", seed=0)["split"])
    assert not a["split"].equals(make_split(full_index, "patient", seed=1)["split"])


def test_cv_folds_grouped_and_stratified(full_index):
    s = make_split(full_index, "cv", seed=0, n_folds=5, fold=2)
    assert set(s["fold"]) == {2}
    # nested: the held-out fold is test, and validation patients come from the other folds
    tests = [set(make_split(full_index, "cv", seed=0, n_folds=5, fold=k).query("split == 'test'")
                 ["patient"]) for k in range(1, 6)]  # fmt: skip
    assert sum(len(t) for t in tests) == full_index["patient"].nunique()
    assert all(a.isdisjoint(b) for i, a in enumerate(tests) for b in tests[i + 1 :])
    assert _patients(s, "test") == tests[1]
    assert _patients(s, "val") and _patients(s, "val").isdisjoint(_patients(s, "test"))
    assert 14 <= len(tests[1]) <= 19 and s.loc[s["split"] == "test", "label"].nunique() == 2
    again = make_split(full_index, "cv", seed=0, n_folds=5, fold=2)
    assert s["split"].equals(again["split"])
    assert not s["split"].equals(make_split(full_index, "cv", seed=3, n_folds=5, fold=2)["split"])


def test_eva_protocol(full_index):
    s = make_split(full_index, "eva", task="subtype")
    assert set(s["magnification"]) == {40}
    assert set(s["subtype"]) == {"TA", "MC", "F", "DC"}
    assert set(s["split"]) == {"train", "val"}
    assert _patients(s, "val") == set(EVA_VAL_PATIENTS)
    assert not _patients(s, "train") & _patients(s, "val")
    with pytest.raises(UserError, match="eva protocol is the four-class subtype task"):
        make_split(full_index, "eva", task="binary")


def test_official_folds(full_index, full_folds_csv, caplog):
    with caplog.at_level(logging.WARNING):
        s = make_split(full_index, "folds", fold=1, seed=0, folds_csv=full_folds_csv)
    # fold 1 of the official Folds.csv puts slide 13412's DC and LC folders apart: warned
    assert "13412" in caplog.text
    assert set(s["split"]) == {"train", "val", "test"}
    assert (s["fold"] == 1).all() and len(s) == 7909
    folds = read_folds_csv(full_folds_csv)
    official_test = set(folds.loc[(folds["fold"] == 1) & (folds["grp"] == "test"), "name"])
    assert set(s.loc[s["split"] == "test", "filename"]) == official_test
    # val patients come out of the official train group, never out of test
    assert not _patients(s, "val") & _patients(s, "test")
    caplog.clear()
    s2 = make_split(full_index, "folds", fold=2, seed=0, folds_csv=full_folds_csv)
    assert "13412" not in caplog.text
    assert set(s2.loc[s2["split"] == "test", "filename"]) != official_test
    # Folds.csv beside BreaKHis_v1 is found without --folds-csv
    s3 = make_split(full_index, "folds", fold=1, seed=0)
    assert s3["split"].equals(s["split"])


def test_random_protocol_warns_and_leaks(full_index, caplog):
    with caplog.at_level(logging.WARNING):
        s = make_split(full_index, "random", seed=0)
    assert "splits images, not patients" in caplog.text
    assert len(_patients(s, "train") & _patients(s, "test")) > 10
    assert abs((s["split"] == "test").mean() - 0.15) < 0.01
    with pytest.raises(UserError, match="patient"):
        check_no_leakage(s)


def test_random_cv_is_image_level(idc_sample):
    idc = index_idc(idc_sample)
    tests = [make_split(idc, "random", seed=0, n_folds=5, fold=k) for k in range(1, 6)]
    held = [set(t.loc[t["split"] == "test", "relpath"]) for t in tests]
    assert sum(map(len, held)) == len(idc) and len(set().union(*held)) == len(idc)
    for t in tests:  # one patient, on every side: image-level on purpose
        assert set(t["split"]) == {"train", "val", "test"}
        assert t.groupby("split")["label"].nunique().min() == 2


def test_subtype_split_puts_every_class_on_every_side(full_index):
    """With 3 PT patients, scikit-learn's stratified split once left PT out of val and test."""
    for seed in range(3):
        s = make_split(full_index, "patient", task="subtype", seed=seed)
        for side in ("train", "val", "test"):
            assert set(s.loc[s["split"] == side, "subtype"]) == set(full_index["subtype"]), side


def test_leakage_check_names_patients():
    df = pd.DataFrame({"patient": ["a", "a", "b"], "split": ["train", "test", "val"]})
    with pytest.raises(UserError, match=r"1 patient\(s\) .* \(a\)"):
        check_no_leakage(df)


def test_too_few_patients_says_how_many(breakhis_sample, idc_sample):
    index = index_breakhis(breakhis_sample)
    with pytest.raises(
        UserError,
        match="needs at least 3 patients of each class, and there are "
        r"11 patients \(A: 2, DC: 2",
    ):
        make_split(index, "patient", task="subtype")
    with pytest.raises(UserError, match="needs at least 3 patients .* 1 patients"):
        make_split(index_idc(idc_sample), "patient")
    with pytest.raises(UserError, match="needs at least 10 patients"):
        make_split(index, "cv", n_folds=10)


def test_bad_fold_and_folds_csv(full_index, made_folds_csv, tmp_path):
    with pytest.raises(UserError, match="Fold 6 is out of range; the official BreakHis folds"):
        make_split(full_index, "folds", fold=6, folds_csv=made_folds_csv)
    with pytest.raises(UserError, match="The folds file has no rows for fold 2"):
        make_split(full_index, "folds", fold=2, folds_csv=made_folds_csv)
    with pytest.raises(UserError, match="Fold 7 is out of range; this split has folds 1 to 5"):
        make_split(full_index, "cv", fold=7, n_folds=5)
    bad = tmp_path / "Folds.csv"
    bad.write_text("fold,grp,filename\n1,train,a.png\n")
    with pytest.raises(UserError, match="lacks column\\(s\\) mag"):
        read_folds_csv(bad)
    bad.write_text("fold,mag,grp,filename\n1,40,train,a.png\n9,40,train,b.png\n")
    with pytest.raises(UserError, match="line 3 is malformed"):
        read_folds_csv(bad)
    bad.write_text("fold,mag,grp,filename\n1,40,validation,a.png\n")
    with pytest.raises(UserError, match="line 2 is malformed"):
        read_folds_csv(bad)
    with pytest.raises(UserError, match="does not exist"):
        read_folds_csv(tmp_path / "none.csv")


def test_unknown_protocol_and_task(full_index):
    with pytest.raises(UserError, match="Unknown protocol 'kfold'"):
        make_split(full_index, "kfold")
    with pytest.raises(UserError, match="Unknown task 'grade'"):
        make_split(full_index, "patient", task="grade")


def test_split_round_trip(full_index, tmp_path):
    plan = plan_folds(full_index, SplitOptions(protocol="cv", cv=5, seed=0))
    write_split(plan, tmp_path / "split.csv")
    written = pd.read_csv(tmp_path / "split.csv")
    assert list(written.columns) == ["path", "split", "fold", "protocol", "group_by"]
    assert len(written) == 5 * 7909 and set(written["protocol"]) == {"cv"}
    back = plan_folds(full_index, SplitOptions(split_file=str(tmp_path / "split.csv")))
    assert back.protocol == "cv" and [k for k, _ in back.folds] == [1, 2, 3, 4, 5]
    for (_, a), (_, b) in zip(plan.folds, back.folds, strict=True):
        assert (
            a.set_index("relpath")["split"]
            .sort_index()
            .equals(b.set_index("relpath")["split"].sort_index())
        )


def test_split_command(breakhis_sample, tmp_path, capsys):
    out = tmp_path / "s.csv"
    assert (
        main(
            [
                "split",
                "--data",
                str(breakhis_sample),
                "--protocol",
                "patient",
                "--out",
                str(out),
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )  # fmt: skip
        == 0
    )
    text = capsys.readouterr().out
    assert "Patients per split and class" in text
    assert "Leakage check: no patient is on two sides; no pixel-identical image" in text
    df = pd.read_csv(out)
    assert len(df) == 14 and set(df["split"]) == {"train", "val", "test"}
    no_folds = ["--folds-csv", str(tmp_path / "none.csv")]
    assert main(["split", "--data", str(breakhis_sample), "--protocol", "folds", *no_folds]) == 2
    assert "Folds file" in capsys.readouterr().err
    assert (
        main(
            [
                "split",
                "--data",
                str(breakhis_sample),
                "--dataset",
                "camelyon",
                "--protocol",
                "patient",
            ]
        )
        == 2
    )
    assert "Unknown dataset" in capsys.readouterr().err


def test_random_and_folds_are_seeded(full_index, full_folds_csv):
    a = make_split(full_index, "random", seed=0)["split"]
    assert a.equals(make_split(full_index, "random", seed=0)["split"])
    assert not a.equals(make_split(full_index, "random", seed=1)["split"])
    f0 = make_split(full_index, "folds", fold=2, seed=0, folds_csv=full_folds_csv)
    f1 = make_split(full_index, "folds", fold=2, seed=1, folds_csv=full_folds_csv)
    # the official test group never moves; the val patients carved from train do
    assert f0.loc[f0["split"] == "test", "relpath"].equals(f1.loc[f1["split"] == "test", "relpath"])
    assert set(f0.loc[f0["split"] == "val", "patient"]) != set(
        f1.loc[f1["split"] == "val", "patient"]
    )
