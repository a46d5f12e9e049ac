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
            code = "B_A" if label == "benign" else "M_DC"
            name = f"SOB_{code}-14-{slide}-40-{i:03d}.png"
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


# --- item 2: one "selected", read from the run; item 13: the curves figure ---------------


def _c_history(selected=None):
    """Seven candidates of C where grouped CV peaks at 2 and val at 6 (they disagree)."""
    cv = [0.6, 0.8, 0.7, 0.65, 0.6, 0.55, 0.5]
    val = [0.5, 0.55, 0.6, 0.62, 0.64, 0.9, 0.7]
    rows = [{"head": "h", "arch": "m", "epoch": k + 1, "C": 10.0 ** (k - 4),
             "cv_balanced_accuracy": cv[k], "val_balanced_accuracy": val[k],
             "train_balanced_accuracy": 0.9, "train_loss": 0.3, "val_loss": 0.5}
            for k in range(7)]  # fmt: skip
    if selected is not None:
        for r in rows:
            r["selected"] = r["epoch"] == selected
    return pd.DataFrame(rows)


def _marks(fig):
    return {
        ln.get_xdata()[0]
        for ax in fig.axes
        for ln in ax.get_lines()
        if len(ln.get_xdata()) == 2 and len(set(ln.get_xdata())) == 1
    }


def test_head_curves_mark_the_c_the_run_selected():
    import matplotlib.pyplot as plt

    from breakhis_tl.report.plots import selected_epoch

    (fig,) = analysis.head_curves(_c_history(), "t")  # an older run: the runner's rule
    assert _marks(fig) == {2}  # grouped CV picked C, not val's best (6)
    assert "grouped CV picks C" in fig.axes[1].get_title()
    labels = [ln.get_label() for ln in fig.axes[1].get_lines()]
    assert any("grouped CV" in label for label in labels)  # the curve that selects is drawn
    plt.close(fig)
    (fig,) = analysis.head_curves(_c_history(selected=3), "t")  # what the run recorded
    assert _marks(fig) == {3}
    plt.close(fig)
    epochs = _c_history().drop(columns=["C", "cv_balanced_accuracy"])
    assert selected_epoch(epochs) == 6


def test_run_records_its_selection_once(sample_run):
    cfg, res = sample_run
    folder = res.folders["models"]
    history = pd.read_csv(folder / "history.csv")
    assert history.groupby("head")["selected"].sum().eq(1).all()
    chosen = history.loc[history["selected"], "C"].tolist()
    results = pd.read_csv(folder / "results.csv")
    assert set(results["C"]) == set(chosen) and results["best_epoch"].isna().all()
    assert set(results["C_candidates"]) == {len(history)}


def test_band_legend_shows_the_band_colour():
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    from breakhis_tl.report import plots

    runs = [[{"epoch": e, "val_loss": 1 / e + s / 10} for e in (1, 2, 3)] for s in range(3)]
    fig = plots.comparison_figure({"a": runs, "b": runs}, "loss", "demo")
    ax = fig.axes[0]
    bands = [c.get_facecolor()[0][:3] for c in ax.collections]
    patches = [h for h in ax.get_legend().get_patches()]
    shown = [p.get_facecolor()[:3] for p in patches]
    assert len(shown) == 2 and all(
        mcolors.same_color(b, s) for b, s in zip(bands, shown, strict=True)
    )
    assert not any(mcolors.same_color(s, "0.6") for s in shown)
    plt.close(fig)


def test_confusion_figure_is_readable():
    import matplotlib.pyplot as plt

    from breakhis_tl.report.plots import confusion_figure

    fig = confusion_figure([[3, 1], [2, 9]], CLASSES, "efficientnet_lite0 (test, all folds)")
    fig.canvas.draw()
    box = fig.axes[0].get_window_extent()
    assert box.width / fig.dpi > 1.5 and box.height / fig.dpi > 1.5  # inches
    plt.close(fig)


def test_tensorboard_draws_the_score_that_picks_c():
    from breakhis_tl.report import tblog

    class Writer:
        def __init__(self):
            self.tags = {}

        def add_scalar(self, tag, value, step):
            self.tags[tag] = (value, step)

        def flush(self):
            pass

    w = Writer()
    tblog.log_epoch(w, 2, {"val_balanced_accuracy": 0.7, "cv_balanced_accuracy": 0.8})
    assert w.tags["balanced_accuracy/cv"] == (0.8, 2)
    assert any("cv" in p for p in tblog._layout()["train vs val"]["balanced_accuracy"][1])


# --- item 4: IDC strata -------------------------------------------------------------------


def _idc_index(patients=14, seed=0):
    """Patients holding both classes, as IDC's do; only one of them mostly IDC."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        share = 0.8 if p == 0 else rng.uniform(0.05, 0.45)
        for i in range(20):
            label = "idc" if i < round(share * 20) else "non_idc"
            rel = f"{9000 + p}/{i}.png"
            rows.append(
                {"patient": str(9000 + p), "label": label, "path": f"/d/{rel}", "relpath": rel}
            )
    return pd.DataFrame(rows)


def test_idc_patients_are_stratified_by_their_share_not_their_majority():
    from breakhis_tl.data.splits import make_split, patient_strata

    index = _idc_index()
    strata = patient_strata(index, "label")
    assert strata.nunique() >= 2 and strata.value_counts().min() >= 3
    assert all(s.startswith("idc share") for s in strata)
    split = make_split(index, "patient", seed=1)  # one majority-IDC patient: once refused
    for side in ("train", "val", "test"):
        assert set(split.loc[split["split"] == side, "label"]) == {"idc", "non_idc"}
    for side in ("val", "test"):  # each side draws from every share stratum
        picked = split.loc[split["split"] == side, "patient"].unique()
        assert set(strata[picked]) == set(strata)
    folds = make_split(index, "cv", n_folds=3, fold=1)
    assert folds["split"].eq("test").any()


def test_leakage_study_uses_the_same_strata():
    index = _idc_index()
    splits = analysis.leakage_splits(index, "binary", seed=3)
    from breakhis_tl.data.splits import patient_strata

    strata = patient_strata(index, "label")
    test = splits.patient.loc[splits.patient["split"] == "test", "patient"].unique()
    assert set(strata[test]) == set(strata)


# --- item 14: no patient-level number from one class --------------------------------------


def test_evaluate_shows_no_patient_number_from_one_class():
    rows = []
    for patient, labels in (("10", "0011"), ("11", "0101"), ("12", "00"), ("13", "000")):
        for i, c in enumerate(labels):
            p1 = 0.3
            rows.append({"path": f"/d/{patient}_idx5_x{i}_y0_class{c}.png", "error": "",
                         "label": ["non_idc", "idc"][int(c)], "prediction": "non_idc",
                         "prob_non_idc": 1 - p1, "prob_idc": p1})  # fmt: skip
    ev = evaluate.assess(pd.DataFrame(rows), ["non_idc", "idc"], "patient")
    summary = ev.summary.set_index("metric")["patient_level"]
    for metric in ("accuracy", "balanced accuracy", "AUC", "majority-vote accuracy"):
        assert np.isnan(summary[metric])
    text = evaluate.format_summary(ev)
    assert "not shown: the 2 patient(s)" in text and "are all non_idc" in text
    assert "use the other patients only" not in text
    assert summary["recognition rate (Spanhol)"] == pytest.approx((0.5 + 0.5 + 1 + 1) / 4)


# --- item 3: eva's ConstantLR warm-up -----------------------------------------------------


def test_eva_recipe_trains_its_first_five_epochs_at_a_third_of_the_lr():
    import dataclasses

    import torch

    from breakhis_tl.heads.modules import make_head
    from breakhis_tl.heads.recipes import apply_recipe
    from breakhis_tl.heads.training import feature_batches, fit
    from breakhis_tl.runner import RunConfig

    cfg = apply_recipe(RunConfig(archs=["efficientnet_lite0"], recipe="eva"))
    assert (cfg.train.warmup_epochs, cfg.train.warmup_factor) == (5, pytest.approx(1 / 3))
    train = dataclasses.replace(cfg.train, epochs=7, max_steps=None, patience=100)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 8, generator=g), torch.arange(40) % 4

    def val(h):
        with torch.no_grad():
            return y.numpy(), torch.softmax(h(x), 1).numpy(), [str(i % 5) for i in range(40)]

    result = fit(make_head("linear", 8, 4), feature_batches(x, y, 256, 0), val, y.numpy(),
                 ["TA", "MC", "F", "DC"], train)  # fmt: skip
    lrs = [h["lr"] for h in result.history]
    assert lrs == pytest.approx([1e-4] * 5 + [3e-4] * 2)
    plain = fit(make_head("linear", 8, 4), feature_batches(x, y, 256, 0), val, y.numpy(),
                ["TA", "MC", "F", "DC"], dataclasses.replace(train, warmup_epochs=0))  # fmt: skip
    assert [h["lr"] for h in plain.history] == pytest.approx([3e-4] * 7)


# --- item 5: two kinds of interval, labelled; a paired comparison of architectures --------


def _two_arch_run(tmp_path):
    slides = {f"{k}S": CLASSES[k % 2] for k in range(10)}
    a = _predictions("arch_a", slides, seed=4, right=0.6)
    b = a.assign(arch="arch_b", prediction=a["target"])  # b gets every image right
    _write_run(tmp_path, "two", pd.concat([a, b], ignore_index=True))
    return load_run(tmp_path, "two"), a


def test_results_table_labels_its_two_kinds_of_number(tmp_path):
    from sklearn.metrics import balanced_accuracy_score

    run, a = _two_arch_run(tmp_path)
    table = analysis.results_table(run, n_boot=200).set_index("arch")
    pooled = balanced_accuracy_score(a["target"], a["prediction"])
    assert table.loc["arch_a", analysis.POOLED_COLUMN] == f"{pooled:.3f}"
    shown = analysis.page(table.reset_index(), analysis.MAIN_COLUMNS).to_html()
    assert "fold mean ± std" in shown and "pooled bal. acc. 95% CI (patient bootstrap)" in shown


def test_architecture_differences_are_paired_on_patients(tmp_path):
    from sklearn.metrics import balanced_accuracy_score

    run, a = _two_arch_run(tmp_path)
    diff = analysis.architecture_differences(run, n_boot=300).iloc[0]
    expected = 1 - balanced_accuracy_score(a["target"], a["prediction"])
    assert (diff["first"], diff["second"]) == ("arch_a", "arch_b")
    assert diff["difference (second - first)"] == pytest.approx(expected, abs=5e-4)
    lo, hi = (float(v) for v in diff["95% CI (paired patient bootstrap)"].strip("[]").split(","))
    assert 0 <= lo <= expected <= hi and diff["patients"] == 10 and diff["images"] == 40
    gap = analysis.gap_bootstrap(
        pd.concat([a.assign(arm="arch_a"), a.assign(arm="arch_b", prediction=a["target"])]),
        ("arch_a", "arch_b"), n=300,
    )  # fmt: skip
    assert diff["95% CI (paired patient bootstrap)"] == f"[{gap[1]:+.3f}, {gap[2]:+.3f}]"


def test_analysis_notebook_has_the_paired_cell_and_no_outputs():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "notebooks" / "02_analysis.ipynb"
    cells = json.loads(path.read_text())["cells"]
    code = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert "architecture_differences(run)" in code
    assert all(not c.get("outputs") for c in cells if c["cell_type"] == "code")


# --- items 8 and 9: output folders that cannot be made ------------------------------------


@pytest.mark.parametrize("where", ["file", "proc"])
def test_out_that_cannot_be_made_is_one_sentence(where, tmp_path, capsys):
    from breakhis_tl.cli import main

    sample = tmp_path / "missing-data-is-never-reached"
    if where == "file":
        out = tmp_path / "afile"
        out.write_text("x")
        said = f"{out} is a file, not a folder"
    else:
        out = "/proc/breakhis_tl_nope"
        said = "cannot be created in /proc"
    code = main(
        ["train", "--out", str(out), "--data", str(sample), "--archs", "efficientnet_lite0"]
    )
    err = capsys.readouterr().err
    assert code == 2 and said in err and "Traceback" not in err


def test_cache_folder_that_cannot_be_made_is_one_sentence(tmp_path, breakhis_sample):
    from breakhis_tl.errors import UserError
    from breakhis_tl.runner import RunConfig, run_training

    (tmp_path / "blocker").write_text("x")
    cache = str(tmp_path / "blocker" / "cache")
    cfg = RunConfig(data=str(breakhis_sample), archs=["efficientnet_lite0"], out=str(tmp_path),
                    cache_dir=cache, workers=0, progress=False)  # fmt: skip
    with pytest.raises(UserError, match="Cache folder .*blocker is a file, not a folder"):
        run_training(cfg)


# --- items 10 and 15: missing weights name every download and the offline backbone -------


def test_missing_weights_name_them_all_and_the_offline_arch(
    breakhis_sample, tmp_path, capsys, monkeypatch
):
    from breakhis_tl.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    code = main(["train", "--data", str(breakhis_sample), "--out", str(tmp_path / "o"),
                 "--archs", "vgg16,efficientnet_lite0,resnet50,densenet121"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "ImageNet weights of vgg16 are not cached" in err
    assert "--archs efficientnet_lite0" in err
    assert "3 need ImageNet weights that are not cached: vgg16, resnet50, densenet121" in err


# --- item 15: messages that point the right way -------------------------------------------


def test_weights_path_that_does_not_exist_is_named_as_such(tmp_path):
    from breakhis_tl.errors import UserError
    from breakhis_tl.models.backbones import weights_id

    with pytest.raises(UserError, match=r"--weights /x/nope.pt: no such file; give default"):
        weights_id("/x/nope.pt", 0)


def test_eva_on_idc_says_eva_is_a_breakhis_protocol(idc_sample, tmp_path, capsys):
    from breakhis_tl.cli import main

    code = main(["train", "--data", str(idc_sample), "--dataset", "idc", "--protocol", "eva",
                 "--out", str(tmp_path), "--archs", "efficientnet_lite0"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "eva protocol is a BreakHis protocol" in err
    assert "subtype task" not in err


def test_predict_out_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    from breakhis_tl import cli
    from breakhis_tl.predict import Classifier

    def never(*a, **k):
        raise AssertionError("the head was loaded before --out was checked")

    monkeypatch.setattr(Classifier, "from_head", never)
    for out in (f"{tmp_path}/", str(tmp_path)):
        code = cli.main(["predict", "--head", "h.pt", "x.png", "--out", out])
        err = capsys.readouterr().err
        assert code == 2 and "is a folder; --out names a CSV file" in err


def test_random_cv_warns_once(idc_sample, caplog):
    import logging

    from breakhis_tl.data.folds import SplitOptions, plan_folds
    from breakhis_tl.data.index import build_index
    from breakhis_tl.data.splits import RANDOM_WARNING

    index = build_index(idc_sample, "idc")
    with caplog.at_level(logging.WARNING):
        plan_folds(index, SplitOptions(protocol="random", cv=5))
    assert [r.getMessage() for r in caplog.records].count(RANDOM_WARNING) == 1


def test_torch_torchvision_mismatch_is_one_sentence(monkeypatch, capsys):
    from breakhis_tl import cli

    def broken(args):
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setitem(cli.COMMANDS, "index", broken)
    code = cli.main(["index", "--data", "somewhere"])
    err = capsys.readouterr().err
    assert code == 2 and "install matching builds" in err and "Traceback" not in err


def test_compare_runs_says_when_a_side_picked_its_model(tmp_path):
    """A run scored on test paired with one scored on its selecting val side: the sentence
    names both sides and that the selected one is optimistic (review finding)."""
    import json

    from breakhis_tl.analysis import compare_runs

    rows = [("a", "p1", "benign"), ("b", "p2", "malignant"), ("c", "p3", "malignant"),
            ("d", "p4", "benign")]  # fmt: skip
    for run, split in (("tested", "test"), ("selected", "val")):
        folder = tmp_path / "trained_models" / run
        folder.mkdir(parents=True)
        pd.DataFrame(
            [{"arch": "x", "fold": 1, "repeat": 1, "split": split, "balanced_accuracy": 1.0}]
        ).to_csv(folder / "results.csv", index=False)
        pd.DataFrame(columns=["arch", "head", "epoch"]).to_csv(folder / "history.csv",
                                                               index=False)  # fmt: skip
        preds = [{"arch": "x", "fold": 1, "repeat": 1, "split": split, "relpath": r,
                  "patient": p, "target": t, "prediction": t} for r, p, t in rows]  # fmt: skip
        pd.DataFrame(preds).to_csv(folder / "predictions.csv", index=False)
        (folder / "config.json").write_text(json.dumps({"classes": ["benign", "malignant"]}))
    text = compare_runs(tmp_path, "tested", "selected", n=50)
    assert "tested scored on test, selected on val (selected)" in text and "optimistic" in text
    same = compare_runs(tmp_path, "tested", "tested", n=50)
    assert "optimistic" not in same
