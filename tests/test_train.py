import dataclasses
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import drawn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from breakhis_tl.cli import main
from breakhis_tl.errors import UserError
from breakhis_tl.heads.modules import load_head
from breakhis_tl.heads.training import TrainConfig
from breakhis_tl.runner import RunConfig, run_training


def test_run_writes_heads_results_logs_and_graphs(sample_run):
    cfg, res = sample_run
    models, logs, graphs = res.folders["models"], res.folders["logs"], res.folders["graphs"]
    results = pd.read_csv(models / "results.csv")
    assert results["split"].tolist() == ["val", "test"]
    assert results["model_selection"].tolist() == [True, False]
    assert {"balanced_accuracy", "patient_rate", "image_rate", "auc", "n_patients"} <= set(results)
    assert (
        results["n_images"].sum() + (pd.read_csv(models / "split.csv")["split"] == "train").sum()
        == 14
    )
    head, meta = load_head(models / "efficientnet_lite0.pt")
    assert meta["classes"] == ["benign", "malignant"] and meta["feature_dim"] == 1280
    assert meta["arch"] == "efficientnet_lite0"
    assert meta["weights_id"].startswith("lite0-imagenet-")  # the weights file's own hash
    assert meta["compute"] == results["compute"].iloc[0] and meta["group_by"] == "slide"
    assert meta["task"] == "binary" and meta["protocol"] == "patient" and meta["seed"] == 0
    assert meta["prep"]["input_size"] == 224 and meta["package_version"]
    assert meta["metrics"]["val"]["balanced_accuracy"] == pytest.approx(
        results.loc[results["split"] == "val", "balanced_accuracy"].item(), nan_ok=True
    )
    history = pd.read_csv(models / "history.csv")
    assert len(history) == res.results["C_candidates"].iloc[0] and "val_f1" in history
    assert res.results["best_epoch"].isna().all() and res.results["C"].notna().all()
    preds = pd.read_csv(models / "predictions.csv")
    assert np.allclose(preds[["prob_benign", "prob_malignant"]].sum(axis=1), 1, atol=1e-5)
    curves = drawn(graphs / "efficientnet_lite0_curves.png")
    width, height = curves["size"]
    assert width > 3 * height  # the panels side by side
    assert curves["colours"]["C0"] > 100 and curves["colours"]["C1"] > 100  # train and val
    assert all(curves["colours"][c] > 50 for c in ("C2", "C3", "C4"))  # precision, recall, F1
    confusion = drawn(graphs / "efficientnet_lite0_confusion.png")
    assert confusion["blues"] > 2000 and 0.05 < confusion["inked"] < 0.95  # filled cells
    assert not list(graphs.glob("compare_*.png"))  # one head: nothing to compare
    acc = EventAccumulator(str(logs / "efficientnet_lite0")).Reload()
    tags = acc.Tags()
    assert {"balanced_accuracy/val", "f1/val", "accuracy/train", "loss/val"} <= set(tags["scalars"])
    assert len(acc.Scalars("balanced_accuracy/val")) == len(history)
    assert any(t.startswith("confusion/") for t in tags["images"])
    assert "config/text_summary" in tags["tensors"] or tags["tensors"]


def test_second_run_extracts_nothing_and_matches(sample_run, caplog):
    cfg, first = sample_run
    import logging

    with caplog.at_level(logging.INFO):
        second = run_training(dataclasses.replace(cfg, run="again"), command="pytest again")
    assert second.cache_used and "Feature cache used: nothing extracted" in caplog.text
    cols = ["balanced_accuracy", "accuracy", "f1", "auc", "patient_rate"]
    pd.testing.assert_frame_equal(first.results[cols], second.results[cols])


def test_comparison_figures_need_two_heads(sample_run):
    """Two repeats from the sample's cache: one comparison figure per metric over both heads
    (folds and architectures count as heads alike: `done` holds one entry per head)."""
    from breakhis_tl.report.plots import CURVE_METRICS

    cfg, _ = sample_run
    res = run_training(dataclasses.replace(cfg, run="two_heads", repeats=2), command="pytest")
    graphs = res.folders["graphs"]
    assert len(res.heads) == 2
    for metric in CURVE_METRICS + ("balanced_accuracy", "loss"):
        shown = drawn(graphs / f"compare_{metric}.png")
        assert shown["colours"]["C0"] > 100, metric  # one architecture: its mean line


def test_resnet50_pretrained_cannot_work_offline_and_says_why(
    breakhis_sample, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    code = main(
        [
            "train",
            "--data",
            str(breakhis_sample),
            "--archs",
            "efficientnet_lite0,resnet50",
            "--weights",
            "default",
            "--out",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "ImageNet weights of resnet50 are not cached" in err and "resnet50-" in err
    assert "Traceback" not in err
    assert not (tmp_path / "data" / "cache").exists()  # stopped before any extraction


def test_random_init_resnet50_trains(breakhis_sample, tmp_path, capsys):
    code = main(
        [
            "train",
            "--data",
            str(breakhis_sample),
            "--archs",
            "resnet50",
            "--weights",
            "none",
            "--epochs",
            "2",
            "--out",
            str(tmp_path),
            "--run",
            "r",
            "--workers",
            "0",
            "--input-size",
            "96",
        ]
    )
    assert code == 0
    assert "resnet50" in capsys.readouterr().out
    meta = load_head(tmp_path / "trained_models/r/resnet50.pt")[1]
    # random weights from the seed, batch-norm statistics from the training images
    assert re.fullmatch(r"none-seed0-bn[0-9a-f]{12}", meta["weights_id"])
    assert meta["_extra"]["random_weights.fingerprint"].shape[1] == 4
    assert len(pd.read_csv(tmp_path / "trained_models/r/results.csv")) == 2


def _sample_run(data, out, run, **kw) -> RunConfig:
    return RunConfig(data=str(data), archs=["efficientnet_lite0"], run=run, out=str(out),
                     workers=0, progress=False, **kw)  # fmt: skip


def test_end_to_end_mode(breakhis_sample, tmp_path):
    cfg = _sample_run(breakhis_sample, tmp_path, "e2e", no_cache=True,
                      train=TrainConfig(head="linear", epochs=2, patience=2))  # fmt: skip
    res = run_training(cfg)
    assert res.results["cached"].eq(False).all() and len(res.results) == 2
    assert len(res.history) == 2  # two epochs, each its own backbone pass
    assert res.seconds["heads (end to end)"] > 0 and "features" in res.seconds
    assert not (tmp_path / "data" / "cache" / "features").exists()


def test_uncached_logreg_is_the_cached_one(breakhis_sample, tmp_path):
    """logreg has no epochs: --no-cache makes the same single pass and the same grouped-CV
    choice of C, so the two differ by the disk cache alone (not by selection)."""

    runs = {}
    for name, no_cache in (("cached", False), ("uncached", True)):
        out = tmp_path / name
        runs[name] = run_training(_sample_run(breakhis_sample, out, name, no_cache=no_cache))
        assert (out / "data/cache/features").exists() != no_cache
    cached, uncached = runs["cached"], runs["uncached"]
    cols = ["split", "balanced_accuracy", "auc", "best_epoch", "n_images"]
    pd.testing.assert_frame_equal(cached.results[cols], uncached.results[cols])
    assert list(uncached.results["cached"]) == [False, False]
    assert cached.history["C"].tolist() == uncached.history["C"].tolist()
    assert "cv_balanced_accuracy" in uncached.history  # chosen by CV, not on val alone
    written = json.loads((cached.folders["models"] / "config.json").read_text())["seconds"]
    assert written["features"] == cached.seconds["features"] > 0
    (a,), (b,) = cached.heads.values(), uncached.heads.values()
    wa, wb = load_head(a)[0].state_dict(), load_head(b)[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _train(args, tmp_path, data):
    return main(
        [
            "train",
            "--data",
            str(data),
            "--archs",
            "efficientnet_lite0",
            "--out",
            str(tmp_path),
            *args,
        ]
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "0"], "argument --epochs: 0 must be at least 1"),
        (["--lr", "-0.1"], "argument --lr: -0.1 must be a positive number"),
        (["--lr", "abc"], "argument --lr: 'abc' is not a number"),
        (["--views", "9"], "--views must be between 1 and 8, not 9"),
        (["--archs", "resnet51"], "Unknown architecture 'resnet51'"),
        (["--task", "grade"], "Unknown task 'grade'"),
        (["--protocol", "kfold"], "Unknown protocol 'kfold'"),
        (["--head", "svm"], "Unknown head 'svm'"),
        (["--device", "tpu"], "Unknown device 'tpu'"),
        (["--task", "subtype"], "Cannot stratify a train/val/test split by patient"),
    ],
)
def test_bad_train_options_one_sentence(args, message, tmp_path, breakhis_sample, capsys):
    with pytest.raises(SystemExit) if message.startswith("argument") else _nothing():
        code = _train(args, tmp_path, breakhis_sample)
        assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "data").exists()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_unwritable_output(tmp_path, breakhis_sample, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _train([], blocker, breakhis_sample) == 2
    assert "Output folder" in capsys.readouterr().err


def test_class_missing_from_training(tmp_path, breakhis_sample, capsys):
    from breakhis_tl.data.index import index_breakhis

    index = index_breakhis(breakhis_sample)
    split = pd.DataFrame(
        {"path": index["relpath"], "split": np.where(index["label"] == "malignant", "val", "train")}
    )
    split.to_csv(tmp_path / "split.csv", index=False)
    assert _train(["--split-file", str(tmp_path / "split.csv")], tmp_path, breakhis_sample) == 2
    assert "Class(es) malignant have no training image" in capsys.readouterr().err
    with pytest.raises(UserError, match="malignant"):
        run_training(
            RunConfig(
                data=str(breakhis_sample),
                archs=["efficientnet_lite0"],
                split_file=str(tmp_path / "split.csv"),
                out=str(tmp_path),
            )
        )


def test_cv_with_views_uses_each_folds_own_images(idc_sample, tmp_path):
    """Extra views are cached for every fold's training images; each fold takes its own."""
    cfg = RunConfig(
        data=str(idc_sample),
        dataset="idc",
        archs=["efficientnet_lite0"],
        protocol="random",
        cv=3,
        views=3,
        run="cvviews",
        out=str(tmp_path),
        workers=0,
        progress=False,
        input_size=96,  # bookkeeping, not accuracy: small inputs keep it cheap
    )
    res = run_training(cfg)
    test = res.results[res.results["split"] == "test"]
    assert sorted(test["fold"]) == [1, 2, 3]
    history = res.history
    # every fold trained on its own train images x 3 views (the online train metrics count them)
    split = pd.read_csv(tmp_path / "trained_models/cvviews/split.csv")
    for k in (1, 2, 3):
        n_train = int(((split["fold"] == k) & (split["split"] == "train")).sum())
        rows = history["head"] == f"efficientnet_lite0_fold{k}"
        assert history.loc[rows, "train_n_images"].iloc[0] == 3 * n_train
