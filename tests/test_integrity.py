"""Every reported number is clean: split files, twins, patient keys, selection, baselines."""

import copy
import logging
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import _shared

from breakhis_tl.cli import main
from breakhis_tl.data.folds import SplitOptions, plan_folds, write_split
from breakhis_tl.data.index import index_breakhis
from breakhis_tl.data.splits import apply_group_by
from breakhis_tl.errors import UserError
from breakhis_tl.features.extract import Request, check_features, extract
from breakhis_tl.heads.modules import read_head_file
from breakhis_tl.heads.training import TrainConfig
from breakhis_tl.models import calibration
from breakhis_tl.models.backbones import (
    REGISTRY,
    build_backbone,
    random_weights_fingerprint,
    same_random_weights,
    with_input_size,
)
from breakhis_tl.models.calibration import bn_state, calibrate, calibration_id
from breakhis_tl.models.compute import cpu_info
from breakhis_tl.runner import RunConfig, run_training

TWIN_DC = "SOB_M_DC-14-13412-100-003.png"
TWIN_LC = "SOB_M_LC-14-13412-100-003.png"


@pytest.fixture(scope="module")
def breakhis_real():
    return _shared("breakhis_real")


@pytest.fixture(scope="module")
def full_index(full_tree):
    return index_breakhis(full_tree)


def _cfg(data, out, **kw):
    train = kw.pop("train", TrainConfig(epochs=3))
    return RunConfig(
        data=str(data),
        archs=kw.pop("archs", ["efficientnet_lite0"]),
        out=str(out),
        workers=0,
        progress=False,
        train=train,
        **kw,
    )


# -- split files ------------------------------------------------------------------------------


def test_folds_split_file_reused_per_fold_without_leak(full_index, full_folds_csv, tmp_path):
    plan = plan_folds(
        full_index, SplitOptions(protocol="folds", fold="all", folds_csv=str(full_folds_csv))
    )
    write_split(plan, tmp_path / "split.csv")
    assert len(pd.read_csv(tmp_path / "split.csv")) == 5 * 7909  # one row per image per fold
    back = plan_folds(full_index, SplitOptions(split_file=str(tmp_path / "split.csv"), fold=2))
    ((k, fold2),) = back.folds
    assert k == 2 and len(fold2) == 7909 and fold2["relpath"].is_unique  # not 5 copies
    again = dict(plan.folds)[2]
    assert (
        fold2.set_index("relpath")["split"]
        .sort_index()
        .equals(again.set_index("relpath")["split"].sort_index())
    )


def test_split_file_protocol_and_fold_mismatches_are_refused(full_index, tmp_path):
    path = tmp_path / "random.csv"
    write_split(plan_folds(full_index, SplitOptions(protocol="random")), path)
    with pytest.raises(UserError, match="written with protocol random, but --protocol patient"):
        plan_folds(full_index, SplitOptions(split_file=str(path), protocol="patient"))
    legacy = pd.read_csv(path).drop(columns=["protocol", "group_by"])  # an older file
    legacy.to_csv(tmp_path / "legacy.csv", index=False)
    with pytest.raises(UserError, match=r"patient\(s\) have images on more than one side"):
        plan_folds(full_index, SplitOptions(split_file=str(tmp_path / "legacy.csv")))
    cv1 = tmp_path / "cv1.csv"
    write_split(plan_folds(full_index, SplitOptions(protocol="cv", cv=5, fold=3)), cv1)
    with pytest.raises(UserError, match="--fold all asks for every fold, but .* only fold 3"):
        plan_folds(full_index, SplitOptions(split_file=str(cv1), fold="all"))
    with pytest.raises(UserError, match="has no fold 2"):
        plan_folds(full_index, SplitOptions(split_file=str(cv1), fold=2))
    doubled = pd.concat([pd.read_csv(cv1)] * 2)
    doubled.to_csv(tmp_path / "doubled.csv", index=False)
    with pytest.raises(UserError, match="more than once in one fold"):
        plan_folds(full_index, SplitOptions(split_file=str(tmp_path / "doubled.csv")))


def test_split_file_with_classes_outside_the_task(breakhis_sample, tmp_path, capsys):
    index = index_breakhis(breakhis_sample)
    pd.DataFrame({"path": index["relpath"], "split": "train"}).assign(
        split=lambda d: np.where(np.arange(len(d)) % 3 == 0, "val", "train")
    ).to_csv(tmp_path / "s.csv", index=False)
    args = [
        "train",
        "--data",
        str(breakhis_sample),
        "--archs",
        "efficientnet_lite0",
        "--out",
        str(tmp_path),
        "--split-file",
        str(tmp_path / "s.csv"),
        "--protocol",
        "eva",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "outside the subtype task's classes" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--protocol", "eva", "--cv", "5"], "--cv does not apply to the eva protocol"),
        (["--protocol", "folds", "--cv", "5"], "--cv does not apply to the folds protocol"),
        (["--protocol", "patient", "--fold", "2"], "--fold applies to cv, folds or --cv runs"),
        (["--protocol", "eva"], "None of eva's 14 validation slides"),
    ],
)
def test_meaningless_combinations_one_sentence_nothing_written(
    extra, message, breakhis_sample, tmp_path, capsys
):
    args = [
        "train",
        "--data",
        str(breakhis_sample),
        "--archs",
        "efficientnet_lite0",
        "--out",
        str(tmp_path),
        "--run",
        "x",
        *extra,
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    for sub in ("trained_models", "summary_writers", "validation_graphs"):
        assert not (tmp_path / sub / "x").exists()  # a failed run leaves no empty folders


# -- pixel-identical twins and the patient key ----------------------------------------------


def test_official_fold_1_reports_the_real_dc_lc_twin(breakhis_real, tmp_path, capsys, caplog):
    folds_csv = breakhis_real.parent / "Folds.csv"
    args = [
        "split",
        "--data",
        str(breakhis_real),
        "--protocol",
        "folds",
        "--fold",
        "1",
        "--folds-csv",
        str(folds_csv),
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    with caplog.at_level(logging.WARNING):
        assert main(args) == 0
    out = capsys.readouterr().out
    assert "1 pixel-identical pair(s) on two sides" in out and "passed" not in out
    assert "patient(s) are on two sides (13412)" in out
    assert TWIN_DC in caplog.text and TWIN_LC in caplog.text


def test_patient_key_joins_the_twin_in_every_other_protocol(breakhis_real, tmp_path, caplog):
    from breakhis_tl.data.identity import ImageStore
    from breakhis_tl.data.leakage import find_twins

    index = index_breakhis(breakhis_real)
    pixels = ImageStore(tmp_path / "i.sqlite").pixel_hashes(index["path"].tolist())
    index = index.assign(pixel=pixels)
    pair = index[index["filename"].isin([TWIN_DC, TWIN_LC])]
    assert pair["pixel"].nunique() == 1 and pair["relpath"].nunique() == 2  # same picture
    for opts in [SplitOptions(protocol="patient", seed=s) for s in range(3)] + [
        SplitOptions(protocol="cv", cv=3, seed=0),
        SplitOptions(protocol="patient", seed=0, group_by="accession"),
    ]:
        for _, split in plan_folds(index, opts).folds:
            twins = find_twins(split, "label")
            assert twins.across == [] and twins.test_with_train_twin == 0
    # the same picture under two labels is reported for the subtype task
    relabelled = find_twins(index.assign(split="train"), "subtype").relabelled
    assert {relabelled[0][0], relabelled[0][2]} == {TWIN_DC, TWIN_LC}


@pytest.mark.parametrize("mode", ["cached", "uncached logreg", "end to end"])
def test_twin_across_sides_stops_a_patient_protocol(breakhis_real, tmp_path, mode):
    """Were the patient key to miss a twin (one picture under two slide ids), the run stops
    by name: here a copy of a real image saved under another slide id, in a temporary tree."""
    import shutil

    root = tmp_path / "tree"
    for png in breakhis_real.rglob("*.png"):
        link = root / png.relative_to(breakhis_real)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(png)
    original = next(breakhis_real.rglob(TWIN_DC))
    alias = root / "BreaKHis_v1/alias/SOB_M_DC-14-99999-100-003.png"
    alias.parent.mkdir(parents=True)
    shutil.copy(original, alias)
    index = index_breakhis(root)
    sides = np.where(index["slide"] == "99999", "test", "train")
    split = pd.DataFrame({"path": index["relpath"], "split": sides})
    val = index["slide"].isin(index.groupby("label")["slide"].first())
    split.loc[val & (index["slide"] != "99999"), "split"] = "val"
    split.to_csv(tmp_path / "s.csv", index=False)
    kw = {
        "cached": {},
        "uncached logreg": {"no_cache": True},  # checked after its pass
        "end to end": {"no_cache": True, "train": TrainConfig(head="linear", epochs=1)},
    }
    with pytest.raises(UserError, match="pixel-identical pair.*99999"):
        run_training(_cfg(root, tmp_path, split_file=str(tmp_path / "s.csv"), run="t",
                          **kw[mode]))  # fmt: skip
    for folder in ("trained_models", "summary_writers", "validation_graphs"):
        assert not (tmp_path / folder / "t").exists()  # stopped before any head or file
    if mode != "cached":
        assert not (tmp_path / "data/cache/features").exists()
        return
    # a second try, every hash now known, stops before extracting anything
    shutil.rmtree(tmp_path / "data/cache/features")
    with pytest.raises(UserError, match="pixel-identical pair.*99999"):
        run_training(_cfg(root, tmp_path, split_file=str(tmp_path / "s.csv"), run="t"))
    assert not (tmp_path / "data/cache/features").exists()


def test_group_by_accession_joins_slides(full_index):
    slide = apply_group_by(full_index, "slide")
    acc = apply_group_by(full_index, "accession")
    assert slide["patient"].nunique() == 81
    joined = set(acc.loc[acc["slide"].isin(["22549AB", "22549CD", "22549G"]), "patient"])
    assert joined == {"22549"} and acc["patient"].nunique() < 81
    for _, split in plan_folds(
        full_index, SplitOptions(protocol="patient", group_by="accession", seed=0)
    ).folds:
        sides = split.assign(acc=split["slide"].str.extract(r"^(\d+)", expand=False))
        assert sides.groupby("acc")["split"].nunique().max() == 1


# -- selection on the reported data -----------------------------------------------------------


def test_cv_reports_test_folds_chosen_without_looking(breakhis_real, tmp_path):
    res = run_training(_cfg(breakhis_real, tmp_path, protocol="cv", cv=3, run="cv"))
    r = res.results
    assert sorted(r.loc[r["split"] == "test", "fold"]) == [1, 2, 3]
    assert r.loc[r["split"] == "test", "model_selection"].eq(False).all()
    split = pd.read_csv(tmp_path / "trained_models/cv/split.csv")
    index = index_breakhis(breakhis_real).set_index("relpath")["patient"]
    for k in (1, 2, 3):
        f = split[split["fold"] == k].assign(patient=lambda d: d["path"].map(index))
        test = set(f.loc[f["split"] == "test", "patient"])
        assert test and test.isdisjoint(f.loc[f["split"] != "test", "patient"])
    tested = pd.concat(
        [split[(split["fold"] == k) & (split["split"] == "test")] for k in (1, 2, 3)]
    )
    assert tested["path"].is_unique and len(tested) == 148  # every image reported once


def test_no_validation_refused_or_last_head_kept(breakhis_sample, tmp_path):
    index = index_breakhis(breakhis_sample)
    sides = np.where(index["patient"].isin(index["patient"].unique()[:4]), "test", "train")
    pd.DataFrame({"path": index["relpath"], "split": sides}).to_csv(tmp_path / "s.csv", index=False)
    kw = dict(split_file=str(tmp_path / "s.csv"))
    with pytest.raises(UserError, match="no validation images .* --select last"):
        run_training(_cfg(breakhis_sample, tmp_path, run="a", **kw))
    t = TrainConfig(epochs=4, head="linear", select="last")
    res = run_training(_cfg(breakhis_sample, tmp_path, run="b", train=t, **kw))
    assert res.results["best_epoch"].tolist() == [4] and res.results["split"].tolist() == ["test"]


def test_eva_val_is_labelled_selected(full_tree, tmp_path):
    from breakhis_tl.metrics import fold_table

    results = pd.DataFrame(
        {
            "arch": ["a", "a"],
            "fold": [None, None],
            "repeat": [1, 1],
            "split": ["val", "test"],
            "balanced_accuracy": [0.9, 0.7],
        }
    )
    assert fold_table(results, ["balanced_accuracy"])["split"].tolist() == [
        "val (selected)",
        "test",
    ]
    index = index_breakhis(full_tree)
    plain = dict(plan_folds(index, SplitOptions(protocol="eva", task="subtype")).folds)[None]
    held = plan_folds(index, SplitOptions(protocol="eva", task="subtype", eva_holdout=True))
    held = held.folds[0][1]
    assert set(plain["split"]) == {"train", "val"}
    assert set(held.loc[held["split"] == "test", "slide"]) == set(
        plain.loc[plain["split"] == "val", "slide"]
    )  # eva's 14 slides become an untouched test set
    assert set(held["split"]) == {"train", "val", "test"}


# -- baselines and determinism ----------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_random_init_gives_finite_varying_features(arch, breakhis_sample):
    paths = sorted(str(p) for p in breakhis_sample.rglob("*.png"))
    bb = calibrate(build_backbone(arch, "none", seed=0), paths[:8], seed=0)
    ((f, ok),), _ = extract(
        paths[8:], [Request(bb, 0, np.arange(6))], None, workers=0, progress=False
    )
    check_features(arch, f, ok)  # raises on inf/NaN or constant features
    x = f.float()
    assert torch.isfinite(x).all() and (x.std(0) > 0).float().mean() > 0.5, arch


@pytest.mark.parametrize("arch", ["mobilenet_v2", "densenet121"])
def test_calibration_does_not_depend_on_the_thread_count(arch, breakhis_sample):
    """The statistics name the weights (weights_id) and so the cached features: a 1-thread
    torchrun `extract` and an N-thread `train` must calibrate to one name and to the same
    statistics up to summation order."""
    paths = sorted(str(p) for p in breakhis_sample.rglob("*.png"))[:6]
    threads, bbs = torch.get_num_threads(), []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            bbs.append(calibrate(build_backbone(arch, "none", seed=0), paths, seed=0))
    finally:
        torch.set_num_threads(threads)
    assert bbs[0].weights_id == bbs[1].weights_id
    one, many = bn_state(bbs[0]), bn_state(bbs[1])  # the same statistics up to rounding
    for k in (k for k in one if k.endswith("running_var")):
        mean, std = k.replace("_var", "_mean"), one[k].sqrt()
        assert ((one[k] - many[k]).abs() / one[k]).max() < 1e-4, k
        assert ((one[mean] - many[mean]).abs() / std).max() < 1e-4, mean
    other = calibrate(build_backbone(arch, "none", seed=0), paths[:5], seed=0)
    assert other.weights_id != bbs[0].weights_id  # other images, other statistics, other name


def test_a_calibrated_backbone_is_named_by_everything_its_statistics_came_from(
    breakhis_sample, monkeypatch
):
    from breakhis_tl.data.stain import StainNormaliser, StainSetup

    paths = sorted(str(p) for p in breakhis_sample.rglob("*.png"))[:6]
    bb = build_backbone("mobilenet_v2", "none", seed=0)
    base = calibration_id(bb, paths, 0, 32, None)
    assert calibration_id(bb, paths, 0, 32, None) == base
    others = {
        "seed": calibration_id(bb, paths, 1, 32, None),
        "batch size": calibration_id(bb, paths, 0, 16, None),
        "sample": calibration_id(bb, paths[::-1], 0, 32, None),
        "input size": calibration_id(with_input_size(bb, 112), paths, 0, 32, None),
        "stain": calibration_id(bb, paths, 0, 32, StainSetup(StainNormaliser("macenko"))),
    }
    monkeypatch.setattr(calibration, "CALIBRATION_VERSION", calibration.CALIBRATION_VERSION + 1)
    others["version"] = calibration_id(bb, paths, 0, 32, None)
    assert base not in others.values() and len(set(others.values())) == len(others), others
    assert build_backbone("mobilenet_v2", "none", seed=1).weights_id != bb.weights_id


def test_random_weights_are_told_apart_by_draw_not_by_the_cpus_last_bits(tmp_path):
    """AVX2 and generic `normal_` draw the same seed's weights with other last bits: one
    weights name and one fingerprint for both, another for another draw."""
    here = build_backbone("mobilenet_v2", "none", seed=0)
    code = (
        "import sys, torch; from breakhis_tl.models.backbones import *; "
        "bb = build_backbone('mobilenet_v2', 'none', seed=0); "
        "torch.save((bb.weights_id, random_weights_fingerprint(bb.module)), sys.argv[1])"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "fp.pt")], env=env, check=True)
    weights_id, generic = torch.load(tmp_path / "fp.pt")
    mine = random_weights_fingerprint(here.module)
    assert weights_id == here.weights_id and same_random_weights(generic, mine)
    if "avx2" in cpu_info()[1]:  # the case this guards: the bits do differ
        assert not torch.equal(generic, mine)
    other = build_backbone("mobilenet_v2", "none", seed=1)
    assert not same_random_weights(random_weights_fingerprint(other.module), mine)
    changed = {
        "1% wider": lambda w: w.mul_(1.01),
        "reversed": lambda w: w.copy_(w.flatten().flip(0).view_as(w)),
        "transposed": lambda w: w.copy_(w.flatten(1).t().reshape(w.shape)),
        "every value one ulp up": lambda w: w.copy_(torch.nextafter(w, w.new_tensor(9.0))),
    }
    told = {}
    for name, change in changed.items():
        other = copy.deepcopy(here.module)
        with torch.no_grad():
            change(dict(other.named_parameters())["features.18.0.weight"])  # 409,600 values
        told[name] = not same_random_weights(random_weights_fingerprint(other), mine)
    assert told == {**dict.fromkeys(changed, True), "every value one ulp up": False}


def test_a_random_init_head_predicts_and_refuses_other_random_weights(
    breakhis_sample, tmp_path, monkeypatch, caplog
):
    """The head carries the batch-norm statistics and a fingerprint of the random weights;
    predict rebuilds the weights from the seed and refuses them if they are other ones."""
    from breakhis_tl.heads.modules import load_head, save_head
    from breakhis_tl.models.calibration import FINGERPRINT_KEY
    from breakhis_tl.predict import Classifier

    cfg = _cfg(breakhis_sample, tmp_path, archs=["mobilenet_v2"], weights="none", run="r")
    head = run_training(cfg).heads["mobilenet_v2"]
    clf = Classifier.from_head(head)
    meta, _ = read_head_file(head)
    assert clf.backbone.weights_id == meta["weights_id"]
    saved = load_head(head)[1]["_extra"]
    assert all(torch.equal(v, saved[k]) for k, v in bn_state(clf.backbone).items())
    images = sorted(breakhis_sample.rglob("*.png"))[:3]
    assert (clf.predict(images, progress=False)["error"] == "").all()
    module, meta = load_head(head)  # a head saved before fingerprints: loads as it did
    extra = {k: v for k, v in meta.pop("_extra").items() if k != FINGERPRINT_KEY}
    old = save_head(tmp_path / "old.pt", module, meta, extra)
    with caplog.at_level(logging.WARNING):
        assert Classifier.from_head(old).backbone.weights_id == clf.backbone.weights_id
    assert "predates random-weights fingerprints" in caplog.text
    drawn = torch.nn.init.kaiming_normal_  # another torch whose initialiser draws wider

    def wider(tensor, *args, **kw):
        with torch.no_grad():
            return drawn(tensor, *args, **kw).mul_(1.01)

    monkeypatch.setattr(torch.nn.init, "kaiming_normal_", wider)
    with pytest.raises(UserError, match="draw other weights from that seed"):
        Classifier.from_head(head)
    Classifier.from_head(old)  # without a fingerprint nothing can tell


def test_uncalibrated_random_init_is_degenerate_and_stopped(breakhis_sample):
    """What `--weights none` gave before: batch-norm at 0/1 statistics kills the signal."""
    paths = sorted(str(p) for p in breakhis_sample.rglob("*.png"))[:6]
    bb = build_backbone("mobilenet_v2", "none", seed=0)
    ((f, ok),), _ = extract(paths, [Request(bb, 0, np.arange(6))], None, workers=0, progress=False)
    with pytest.raises(UserError, match="mobilenet_v2 features are"):
        check_features("mobilenet_v2", f, ok)


def test_head_is_the_same_alone_or_in_a_larger_run(breakhis_real, tmp_path):
    t = TrainConfig(epochs=3, head="linear")
    kw = dict(weights="default,mobilenet_v2=none", train=t, protocol="cv", cv=3, input_size=96)
    run_training(_cfg(breakhis_real, tmp_path, archs=["mobilenet_v2"], run="alone", fold="2", **kw))
    run_training(
        _cfg(
            breakhis_real,
            tmp_path,
            archs=["efficientnet_lite0", "mobilenet_v2"],
            run="together",
            **kw,
        )
    )
    _, a = read_head_file(tmp_path / "trained_models/alone/mobilenet_v2_fold2.pt")
    _, b = read_head_file(tmp_path / "trained_models/together/mobilenet_v2_fold2.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_changing_magnification_or_seed_extracts_nothing_new(breakhis_real, tmp_path, caplog):
    run_training(_cfg(breakhis_real, tmp_path, run="all"))
    with caplog.at_level(logging.INFO):
        run_training(_cfg(breakhis_real, tmp_path, run="mag", magnification="100X"))
        run_training(_cfg(breakhis_real, tmp_path, run="seed", train=TrainConfig(epochs=3, seed=5)))
    assert caplog.text.count("Feature cache used: nothing extracted") == 2


def test_predict_refuses_a_backbone_whose_weights_changed(sample_run, monkeypatch):
    from breakhis_tl.models import backbones
    from breakhis_tl.predict import Classifier

    _, res = sample_run
    head = res.heads["efficientnet_lite0"]
    Classifier.from_head(head)  # same weights: fine
    monkeypatch.setattr(backbones, "default_weights_id", lambda name: "lite0-imagenet-other")
    with pytest.raises(UserError, match="features would not be the ones the head learned"):
        Classifier.from_head(head)


# -- outputs ---------------------------------------------------------------------------------


def test_run_name_reuse_refused_or_replaced_whole(breakhis_sample, tmp_path):
    run_training(_cfg(breakhis_sample, tmp_path, run="r", archs=["efficientnet_lite0"]))
    with pytest.raises(UserError, match="Run name 'r' is already used .* --overwrite"):
        run_training(_cfg(breakhis_sample, tmp_path, run="r"))
    cfg = _cfg(
        breakhis_sample, tmp_path, run="r", archs=["mobilenet_v2"], weights="none", overwrite=True
    )
    run_training(cfg)
    heads = sorted(p.name for p in (tmp_path / "trained_models/r").glob("*.pt"))
    assert heads == ["mobilenet_v2.pt"]  # the older run's head is gone, not mixed in
    assert not list((tmp_path / "trained_models/r").glob(".*tmp"))


RUN_SUBS = ("trained_models", "summary_writers", "validation_graphs")


def _abort_in_head(monkeypatch, out, run):
    """A second Ctrl-C while a head trains: its split.csv and TensorBoard log exist."""
    from breakhis_tl import headjob

    def second_ctrl_c(ctx, job, data):
        assert (out / "trained_models" / run / "split.csv").is_file()
        assert any((out / "summary_writers" / run).iterdir())
        raise KeyboardInterrupt

    monkeypatch.setattr(headjob, "train_head", second_ctrl_c)


def test_an_aborted_run_leaves_nothing_that_blocks_it(breakhis_sample, tmp_path, monkeypatch):
    """A double Ctrl-C left split.csv and a partial TensorBoard log, and the same command was
    then refused ("Run name ... is already used"): the run folders it made are removed, the
    completed feature-cache entries are kept."""
    (tmp_path / "trained_models" / "r").mkdir(parents=True)  # there before, empty
    with monkeypatch.context() as m:
        _abort_in_head(m, tmp_path, "r")
        with pytest.raises(KeyboardInterrupt):
            run_training(_cfg(breakhis_sample, tmp_path, run="r"))
    assert not (tmp_path / "summary_writers/r").exists()
    assert not (tmp_path / "validation_graphs/r").exists()
    kept = tmp_path / "trained_models/r"  # not made by the attempt: emptied, not deleted
    assert kept.is_dir() and not any(kept.iterdir())
    assert any((tmp_path / "data/cache/features").rglob("*.safetensors"))  # cache kept
    res = run_training(_cfg(breakhis_sample, tmp_path, run="r"))  # the same command runs
    assert res.cache_used and not res.interrupted  # nothing extracted again
    assert (tmp_path / "trained_models/r/efficientnet_lite0.pt").is_file()


def test_an_aborted_overwrite_never_deletes_the_run_that_was_there(breakhis_sample, tmp_path,
                                                                   monkeypatch):  # fmt: skip
    """Only what an attempt created is removed: run folders that held a run before it (here
    replaced under --overwrite) stay, and the same --overwrite command runs again."""
    run_training(_cfg(breakhis_sample, tmp_path, run="r"))
    with monkeypatch.context() as m:
        _abort_in_head(m, tmp_path, "r")
        with pytest.raises(KeyboardInterrupt):
            run_training(_cfg(breakhis_sample, tmp_path, run="r", overwrite=True))
    assert all((tmp_path / sub / "r").is_dir() for sub in RUN_SUBS)
    run_training(_cfg(breakhis_sample, tmp_path, run="r", overwrite=True))
    assert (tmp_path / "trained_models/r/efficientnet_lite0.pt").is_file()


def test_repeats_give_one_head_per_seed(breakhis_sample, tmp_path):
    res = run_training(_cfg(breakhis_sample, tmp_path, run="rep", repeats=2))
    assert sorted(res.heads) == ["efficientnet_lite0_rep1", "efficientnet_lite0_rep2"]
    assert sorted(res.results["repeat"]) == [1, 1, 2, 2]
    seeds = {read_head_file(p)[0]["head_seed"] for p in res.heads.values()}
    assert len(seeds) == 2


@pytest.mark.slow
def test_eva_protocol_and_recipe_end_to_end_on_real_images(breakhis_real, tmp_path):
    """`train --protocol eva --recipe eva`: eva's 4 classes at 40X, its val slides, its head
    recipe and 5 runs; every output names the recipe."""
    res = run_training(_cfg(breakhis_real, tmp_path, run="eva", protocol="eva", recipe="eva"))
    r = res.results
    assert len(res.heads) == 5 and set(r["recipe"]) == {"eva"} and set(r["split"]) == {"val"}
    assert r["model_selection"].all()  # eva selects and reports on val: labelled as such
    meta, _ = read_head_file(res.heads["efficientnet_lite0_rep1"])
    assert meta["recipe"] == "eva" and meta["head"] == "linear"
    assert meta["train"]["lr"] == 3e-4 and meta["train"]["max_steps"] == 12_500
    assert meta["train"]["class_weighted"] is False and meta["train"]["patience"] == 500
    assert meta["classes"] == ["F", "TA", "DC", "MC"]


def test_eva_recipe_says_which_given_head_options_it_ignores(caplog):
    """--recipe eva replaces the head options; a user's --lr or --epochs is named, not lost
    in silence, and options left at their defaults raise no warning."""
    from breakhis_tl.heads.recipes import apply_recipe

    given = RunConfig(archs=["efficientnet_lite0"], recipe="eva",
                      train=TrainConfig(epochs=3, lr=0.01))  # fmt: skip
    with caplog.at_level("WARNING", logger="breakhis_tl.heads.recipes"):
        cfg = apply_recipe(given)
    assert cfg.train.lr == 3e-4 and cfg.train.epochs == 12_500 and cfg.repeats == 5
    assert "ignoring lr=0.01, epochs=3 as given" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="breakhis_tl.heads.recipes"):
        apply_recipe(RunConfig(archs=["efficientnet_lite0"], recipe="eva"))
    assert "ignoring" not in caplog.text


def test_logreg_says_which_epoch_options_it_ignores(caplog):
    """logreg has no epochs: a given --epochs or --lr is named as unused, and the same
    options on an epoch head (or left at their defaults) raise no warning."""
    from breakhis_tl.heads.recipes import apply_recipe

    with caplog.at_level("WARNING", logger="breakhis_tl.heads.recipes"):
        apply_recipe(RunConfig(archs=["efficientnet_lite0"],
                               train=TrainConfig(epochs=3, lr=0.01)))  # fmt: skip
    assert "ignores epochs=3, lr=0.01; --head linear or mlp trains by epochs" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="breakhis_tl.heads.recipes"):
        apply_recipe(RunConfig(archs=["efficientnet_lite0"]))
        apply_recipe(RunConfig(archs=["efficientnet_lite0"],
                               train=TrainConfig(head="linear", epochs=3)))  # fmt: skip
    assert "ignores" not in caplog.text


def test_calibration_sees_only_each_folds_training_images(breakhis_sample, tmp_path,
                                                          monkeypatch):  # fmt: skip
    """A random-init baseline's batch-norm statistics come from its fold's training images
    alone: with 3 patient-grouped folds, each calibration gets exactly that fold's train
    side, and none of its validation or test patients."""
    seen = []
    real = calibration.calibrate

    def spy(bb, paths, *args, **kwargs):
        seen.append(list(paths))
        return real(bb, paths, *args, **kwargs)

    monkeypatch.setattr(calibration, "calibrate", spy)
    res = run_training(RunConfig(data=str(breakhis_sample), archs=["mobilenet_v2"],
                                 weights="none", cv=3, run="cal", out=str(tmp_path), workers=0,
                                 progress=False))  # fmt: skip
    split = pd.read_csv(res.folders["models"] / "split.csv")
    patient = index_breakhis(breakhis_sample).set_index("relpath")["patient"]
    split["patient"] = split["path"].map(patient)
    folds = sorted(split["fold"].unique())
    assert len(folds) == 3 and len(seen) == 3
    for k, paths in zip(folds, seen, strict=True):
        fold = split[split["fold"] == k]
        train = fold[fold["split"] == "train"]
        held_out = set(fold.loc[fold["split"] != "train", "patient"])
        rel = {os.path.relpath(p, breakhis_sample) for p in paths}
        assert rel == set(train["path"])
        assert held_out and not held_out & set(train.loc[train["path"].isin(rel), "patient"])


def test_a_cold_run_hashes_pixels_in_the_extractions_decode(breakhis_sample, tmp_path,
                                                            monkeypatch):  # fmt: skip
    """The duplicate check needs every image's pixel hash; a cold cached run takes it from
    the extraction's decode (no second pass over the images), and it is the hash a separate
    decode gives. End to end has no extraction pass, so it decodes for the check."""
    from breakhis_tl.data import identity
    from breakhis_tl.data.identity import ImageStore, pixel_hash
    from breakhis_tl.data.images import load_rgb

    decoded = []
    real = identity._decode_hashes

    def spy(paths, *args):
        decoded.extend(paths)
        return real(paths, *args)

    monkeypatch.setattr(identity, "_decode_hashes", spy)
    run_training(RunConfig(data=str(breakhis_sample), archs=["efficientnet_lite0"], run="a",
                           out=str(tmp_path / "a"), workers=0, progress=False))  # fmt: skip
    assert decoded == []
    store = ImageStore(tmp_path / "a/data/cache/images.sqlite")
    paths = [str(p) for p in sorted(breakhis_sample.rglob("*.png"))]
    known = store.known_pixels(store.content_ids(paths))
    assert len(known) == len(paths) == 14
    first = store.content_ids(paths[:1])[0]
    assert known[first][0] == pixel_hash(np.asarray(load_rgb(paths[0])))
    run_training(
        RunConfig(
            data=str(breakhis_sample),
            archs=["efficientnet_lite0"],
            run="c",
            out=str(tmp_path / "c"),
            workers=0,
            progress=False,
            no_cache=True,
        )
    )  # logreg: one pass in memory, hashing in it too
    assert decoded == []
    run_training(RunConfig(data=str(breakhis_sample), archs=["efficientnet_lite0"], run="b",
                           out=str(tmp_path / "b"), workers=0, progress=False, no_cache=True,
                           train=TrainConfig(head="linear", epochs=1)))  # fmt: skip
    assert sorted(decoded) == paths


def test_extraction_hashes_only_when_asked_and_keeps_each_blocks_hashes(breakhis_sample,
                                                                        monkeypatch):  # fmt: skip
    """extract() hashes pixels only for train's leakage check (benchmarks time the features
    alone), and saves them block by block: a run stopped in its second block keeps the first
    block's hashes, as it keeps that block's features."""
    from breakhis_tl.data.identity import ImageStore
    from breakhis_tl.features import extract as features

    paths = [str(p) for p in sorted(breakhis_sample.rglob("*.png"))]
    bb = build_backbone("efficientnet_lite0", "default")
    req = [Request(bb, 0, np.arange(len(paths)))]
    store = ImageStore(None)
    extract(paths, req, store=store, workers=0, progress=False)
    assert store.known_pixels(store.content_ids(paths)) == {}
    monkeypatch.setattr(features, "CHUNK_IMAGES", 5)
    real, calls = features._run_block, []

    def stop_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(features, "_run_block", stop_second)
    with pytest.raises(KeyboardInterrupt):
        extract(paths, req, store=store, workers=0, progress=False, hash_pixels=True)
    assert len(store.known_pixels(store.content_ids(paths))) == 5
