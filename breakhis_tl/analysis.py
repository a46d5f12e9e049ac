"""Reading a finished run back and comparing architectures honestly.

Everything here works from the files a run writes (`trained_models/<run>/`), so the analysis
notebook reads a run made by the training notebook and one made by the command line alike.
Every interval resamples patients, not images: images of one patient are correlated, and an
image bootstrap would make the interval far too narrow. The side a table reports is the test
side where the protocol has one; otherwise it is the validation side, marked as the one that
selected the epoch (its score is optimistic).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score

from breakhis_tl.errors import UserError
from breakhis_tl.metrics import compute_metrics, fold_table, patient_rows, split_label
from breakhis_tl.report.plots import mag_label

log = logging.getLogger(__name__)

TABLE_METRICS = ("image_rate", "patient_rate", "balanced_accuracy", "precision", "recall", "f1",
                 "auc")  # fmt: skip
CI_COLUMN = "pooled balanced_accuracy 95% CI"  # patient bootstrap of the pooled predictions
POOLED_COLUMN = "pooled balanced_accuracy"  # the interval's own point: every fold's rows at once
FEW_PATIENTS = 10  # an interval on fewer patients than this is a rough range
TOO_FEW = 3  # a group with fewer patients than this says nothing
SHORT_NAMES = {
    "balanced_accuracy": "bal. acc. (fold mean ± std)", POOLED_COLUMN: "pooled bal. acc.",
    CI_COLUMN: "pooled bal. acc. 95% CI (patient bootstrap)", "image_rate": "image rate",
    "patient_rate": "patient rate", "precision": "prec.", "recall": "recall", "f1": "F1",
    "auc": "AUC", "magnification": "mag.", "patient balanced_accuracy": "patient bal. acc.",
    "leaky balanced_accuracy": "leaky bal. acc.", "patient auc": "patient AUC",
    "leaky auc": "leaky AUC",
}  # fmt: skip


# --- reading a run -------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    folder: Path
    results: pd.DataFrame
    history: pd.DataFrame
    predictions: pd.DataFrame
    config: dict
    classes: list[str]
    heads: dict[str, Path]  # head name -> file, only the heads this run's results name

    def head_per_arch(self) -> dict[str, Path]:
        """The first head of every architecture (fold 1 / repeat 1): one is enough to look
        at (Grad-CAM, inference) when a run trained several per architecture."""
        out: dict[str, Path] = {}
        for arch in self.results["arch"].unique():
            for name in _head_names(self.history, self.results[self.results["arch"] == arch]):
                if name in self.heads:
                    out.setdefault(arch, self.heads[name])
        return out


def _head_names(history: pd.DataFrame, results: pd.DataFrame) -> list[str]:
    """Head names as the run recorded them (history's `head` column); for runs written before
    that column, rebuilt from arch, fold and repeat the way the runner names heads."""
    archs = set(results["arch"])
    if "head" in history and "arch" in history:
        names = history.loc[history["arch"].isin(archs), "head"].dropna().unique()
        return [str(n) for n in names]
    repeats = results["repeat"].nunique() if "repeat" in results else 1
    names = []
    for r in results.drop_duplicates(["arch", "fold", "repeat"]).itertuples():
        name = str(r.arch).replace(":", "_").replace("/", "_")
        name += "" if pd.isna(r.fold) else f"_fold{int(r.fold)}"
        name += f"_rep{int(r.repeat)}" if repeats > 1 else ""
        names.append(name)
    return list(dict.fromkeys(names))


def load_run(out_dir: str | Path, run: str) -> Run:
    """A finished run's files. Its heads are the ones its results name, never a glob of the
    folder, so a file left by some other run can never be taken for one of this run's."""
    folder = Path(out_dir) / "trained_models" / run
    if not (folder / "results.csv").is_file():
        raise UserError(f"No results.csv in {folder}; is {run!r} the name of a finished run?")
    config = json.loads((folder / "config.json").read_text())
    predictions = pd.read_csv(folder / "predictions.csv", keep_default_na=False, na_values=[""],
                              dtype={"patient": str, "slide": str})  # fmt: skip
    results, history = pd.read_csv(folder / "results.csv"), pd.read_csv(folder / "history.csv")
    heads = {}
    for name in _head_names(history, results):
        if (folder / f"{name}.pt").is_file():
            heads[name] = folder / f"{name}.pt"
        else:
            log.warning("Run %s names head %s, but %s.pt is missing.", run, name, name)
    return Run(run, folder, results, history, predictions, config, list(config["classes"]), heads)


def reported_split(frame: pd.DataFrame) -> str:
    """The side a head is judged on: test where the protocol has one, else val."""
    return "test" if (frame["split"] == "test").any() else "val"


# --- the patient bootstrap -----------------------------------------------------------------


def _patient_counts(y_true, y_pred, groups, patients, classes) -> tuple[np.ndarray, np.ndarray]:
    """Per patient x class: images, and images classified correctly. A replicate's balanced
    accuracy follows from these counts exactly, so the bootstrap never re-reads images."""
    pid = pd.Categorical(np.asarray(groups), categories=patients).codes
    cid = pd.Categorical(np.asarray(y_true), categories=classes).codes
    if (pid < 0).any() or (cid < 0).any():
        raise ValueError("a prediction names a patient or class outside the given lists")
    totals = np.zeros((len(patients), len(classes)))
    correct = np.zeros_like(totals)
    np.add.at(totals, (pid, cid), 1)
    np.add.at(correct, (pid, cid), (np.asarray(y_true) == np.asarray(y_pred)).astype(float))
    return totals, correct


def resample_patients(n_patients: int, n: int, seed: int) -> np.ndarray:
    """(n, n_patients) counts: how often each patient is drawn in each replicate."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_patients, size=(n, n_patients))
    weights = np.zeros((n, n_patients))
    np.add.at(weights, (np.arange(n)[:, None], draws), 1)
    return weights


def balanced_accuracy_of(weights, totals, correct) -> np.ndarray:
    """Balanced accuracy per replicate (as scikit-learn's: the mean recall of the classes
    present); NaN where a replicate holds fewer than two classes, which says nothing."""
    tot, cor = weights @ totals, weights @ correct
    present = tot > 0
    recall = np.divide(cor, tot, out=np.zeros_like(cor), where=present)
    ba = recall.sum(1) / np.maximum(present.sum(1), 1)
    return np.where(present.sum(1) >= 2, ba, np.nan)


def _interval(stats: np.ndarray, level: float) -> tuple[float, float]:
    stats = stats[~np.isnan(stats)]
    if not len(stats):
        return float("nan"), float("nan")
    lo, hi = np.percentile(stats, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


def bootstrap_ci(
    y_true, y_pred, groups, n: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile CI of balanced accuracy, resampling patients (not images).

    Each replicate draws patients with replacement and keeps all their images (and all their
    rows: predictions of several repeats on one patient move together).
    """
    if len(np.asarray(y_true)) == 0:
        return float("nan"), float("nan")
    patients, classes = np.unique(np.asarray(groups)), np.unique(np.asarray(y_true))
    totals, correct = _patient_counts(y_true, y_pred, groups, patients, classes)
    weights = resample_patients(len(patients), n, seed)
    return _interval(balanced_accuracy_of(weights, totals, correct), level)


def gap_bootstrap(
    predictions: pd.DataFrame, arms: tuple[str, str] = ("patient", "leaky"), n: int = 1000,
    seed: int = 0, level: float = 0.95,
) -> tuple[float, float, float]:  # fmt: skip
    """Mean over repeats of (second arm - first arm) balanced accuracy, and its percentile
    CI from resampling test patients: one draw of patients per replicate serves every arm
    and repeat, so the pairing of the two arms on the same patients is kept.

    `predictions`: columns arm, repeat, patient, target, prediction (the test rows)."""
    p = predictions
    patients, classes = np.unique(p["patient"].astype(str)), np.unique(p["target"])
    weights = np.vstack([np.ones(len(patients)), resample_patients(len(patients), n, seed)])
    gaps = []
    for _, rows in p.groupby("repeat", sort=True):
        ba = {}
        for arm in arms:
            g = rows[rows["arm"] == arm]
            t, c = _patient_counts(g["target"], g["prediction"], g["patient"].astype(str),
                                   patients, classes)  # fmt: skip
            ba[arm] = balanced_accuracy_of(weights, t, c)
        gaps.append(ba[arms[1]] - ba[arms[0]])
    mean = np.mean(gaps, axis=0)
    lo, hi = _interval(mean[1:], level)
    return float(mean[0]), lo, hi


def few_patients_caveat(n_patients: int, selected: bool = False) -> str:
    """What a reader must know before reading an interval."""
    notes = []
    if n_patients < FEW_PATIENTS:
        notes.append(f"only {n_patients} patients: a rough range")
    if selected:
        notes.append("val helped pick the model: optimistic")
    return "; ".join(notes)


# --- tables --------------------------------------------------------------------------------


def _images(predictions: pd.DataFrame) -> int:
    """Distinct images (a row per image per fold and repeat in predictions.csv)."""
    return int(predictions["relpath" if "relpath" in predictions else "path"].nunique())


def results_table(run: Run, metrics=TABLE_METRICS, n_boot: int = 1000) -> pd.DataFrame:
    """Per architecture and split: mean ± std over folds and repeats of every rate, the
    distinct images and patients scored, and on the reported side the balanced accuracy of
    all folds' and repeats' rows pooled with its 95% patient-bootstrap interval and caveat.
    The two are different numbers (a fold mean against a pooled score), so their columns say
    which is which; a difference between architectures is `architecture_differences`."""
    res, pred = run.results, run.predictions
    side = reported_split(res)
    table = fold_table(res, metrics)
    keys = list(res.groupby(["arch", "split"], sort=False).groups)  # fold_table's row order
    images, patients, pooled, cis, caveats = [], [], [], [], []
    for arch, split in keys:
        p = pred[(pred["arch"] == arch) & (pred["split"] == split)]
        images.append(_images(p))
        patients.append(p["patient"].nunique())
        if split != side or p.empty:
            pooled.append("")
            cis.append("")
            caveats.append("")
            continue
        lo, hi = bootstrap_ci(p["target"], p["prediction"], p["patient"], n=n_boot)
        pooled.append(f"{balanced_accuracy_score(p['target'], p['prediction']):.3f}")
        cis.append(f"[{lo:.3f}, {hi:.3f}]")
        caveats.append(few_patients_caveat(patients[-1], selected=split == "val"))
    table.insert(4, "images", images)
    table.insert(5, "patients", patients)
    table[POOLED_COLUMN] = pooled
    table[CI_COLUMN] = cis
    table["caveat"] = caveats
    return table


def architecture_differences(run: Run, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Every pair of architectures of one run on the reported side: the difference in
    pooled balanced accuracy (second minus first, averaged over repeats) with a paired 95%
    patient-bootstrap interval (`gap_bootstrap`: one draw of patients serves both, so what
    the two share, the patients, cancels). Two unpaired intervals that overlap say little
    about a difference; this interval is about the difference itself. Only images both
    architectures scored in the same fold and repeat are compared."""
    p = run.predictions
    p = p[p["split"] == reported_split(p)]
    archs = list(p["arch"].unique())
    rows = []
    for i, first in enumerate(archs):
        for second in archs[i + 1 :]:
            key = ["fold", "repeat", "relpath" if "relpath" in p else "path"]
            a, b = (p[p["arch"] == x].assign(arm=x) for x in (first, second))
            shared = a[key].merge(b[key]).drop_duplicates()
            both = pd.concat([a, b]).merge(shared)
            gap, lo, hi = gap_bootstrap(both, (first, second), n=n_boot, seed=seed)
            rows.append({
                "first": first, "second": second, "split": split_label(reported_split(p)),
                "difference (second - first)": round(gap, 3),
                "95% CI (paired patient bootstrap)": f"[{lo:+.3f}, {hi:+.3f}]",
                "patients": both["patient"].nunique(), "images": _images(both),
                "caveat": few_patients_caveat(both["patient"].nunique(),
                                              selected=reported_split(p) == "val"),
            })  # fmt: skip
    return pd.DataFrame(rows)


def per_group_metrics(
    run: Run, by: str = "magnification", split: str | None = None
) -> pd.DataFrame:
    """Metrics per architecture and group (say, magnification) on the reported side, rows of
    all folds and repeats pooled. A cell of fewer than 3 patients is flagged: its rates are
    anecdotes about one or two slides, not a property of the magnification."""
    p = run.predictions
    split = split or reported_split(p)
    p = p[p["split"] == split]
    if by not in p:
        raise UserError(f"The predictions of run {run.name} have no {by!r} column.")
    index = {c: i for i, c in enumerate(run.classes)}
    shown = ("image_rate", "patient_rate", "balanced_accuracy", "f1", "auc")
    rows = []
    for (arch, group), g in p.groupby(["arch", by], sort=True):
        probs = g[[f"prob_{c}" for c in run.classes]].to_numpy(float)
        m = compute_metrics(g["target"].map(index), probs, run.classes, g["patient"].tolist())
        n = g["patient"].nunique()
        rows.append({
            "arch": arch, by: mag_label(group) if by == "magnification" else group,
            "split": split_label(split), "images": _images(g), "patients": n,
            **{k: round(m[k], 3) for k in shown},
            "note": "too few patients to mean anything" if n < TOO_FEW else "",
        })  # fmt: skip
    return pd.DataFrame(rows)


def _reported_rows(run: Run, arch: str, repeat: int | None) -> pd.DataFrame:
    p = run.predictions[run.predictions["arch"] == arch]
    if p.empty:
        raise UserError(f"Run {run.name} has no predictions of {arch!r}.")
    p = p[p["split"] == reported_split(p)]
    return p[p["repeat"] == (repeat or p["repeat"].min())]


PATIENT_COLUMNS = {"label": "true label", "n_images": "images", "share_correct": "correct share",
                   "majority_vote": "majority vote", "prediction": "mean probability"}  # fmt: skip


def patient_table(run: Run, arch: str, repeat: int | None = None) -> pd.DataFrame:
    """One row per patient of the reported side (one repeat: the first unless named): the
    project's one patient table (`metrics.patient_rows`, also behind `evaluate`), so a tie
    of the vote is broken the same way here: by the higher mean probability. A diagnosis is
    made per patient, so this is the table a pathologist would read."""
    p = _reported_rows(run, arch, repeat).assign(label=lambda f: f["target"])
    table = patient_rows(p, run.classes).rename(columns=PATIENT_COLUMNS)
    last = f"prob_{run.classes[-1]}"
    table[f"mean P({run.classes[-1]})"] = table[last].astype(float).round(3)
    table["correct share"] = table["correct share"].astype(float).round(3)
    return table.drop(columns=[f"prob_{c}" for c in run.classes])


def recognition_rates(run: Run, arch: str, repeat: int | None = None) -> dict:
    """Spanhol's two rates on the reported side, with the patient vote beside them: the
    image-level rate counts every image once; the patient-level rate averages each patient's
    share of correct images, so every patient weighs the same. The vote is judged on the
    patients of one class only (an IDC patient with patches of both has no single answer)."""
    table = patient_table(run, arch, repeat)
    n, share = table["images"].to_numpy(float), table["correct share"].to_numpy(float)
    p = _reported_rows(run, arch, repeat)
    single = table[table["true label"].isin(run.classes)]
    by_vote = (single["majority vote"] == single["true label"]).mean() if len(single) else np.nan
    return {
        "arch": arch, "split": split_label(reported_split(p)), "images": int(n.sum()),
        "patients": len(table), "image_rate": float((p["prediction"] == p["target"]).mean()),
        "patient_rate": float(share.mean()), "patients_right_by_vote": float(by_vote),
        "min_images": int(n.min()), "max_images": int(n.max()),
    }  # fmt: skip


def rates_sentence(rates: dict) -> str:
    """Why the two rates differ, from the numbers: the image-level rate weighs a patient by
    its images, so it is higher exactly when patients with more images did better."""
    img, pat = rates["image_rate"], rates["patient_rate"]
    head = (f"{rates['arch']} ({rates['split']}): image-level rate {img:.3f}, patient-level "
            f"rate {pat:.3f} over {rates['patients']} patients "
            f"({rates['min_images']} to {rates['max_images']} images each).")  # fmt: skip
    if abs(img - pat) < 5e-4:
        return head + " They agree: patients were classified about as well whatever their count."
    better = "more" if img > pat else "fewer"
    return head + (
        f" The image-level rate is {'higher' if img > pat else 'lower'} because it weighs each "
        f"patient by its number of images, and patients with {better} images were classified "
        "better; the patient-level rate gives every patient the same weight."
    )


def confusion(run: Run, arch: str, split: str | None = None) -> tuple[list, str]:
    """Confusion matrix of one architecture on the reported side (all folds and repeats)."""
    from sklearn.metrics import confusion_matrix

    p = run.predictions[run.predictions["arch"] == arch]
    split = split or reported_split(p)
    p = p[p["split"] == split]
    matrix = confusion_matrix(p["target"], p["prediction"], labels=run.classes).tolist()
    return matrix, split_label(split)


def results_sentence(run: Run) -> str:
    """One line per architecture: the reported balanced accuracy and its patient interval,
    with the caveat that applies; computed, so it never contradicts the table."""
    table = results_table(run, ("balanced_accuracy",))
    side = split_label(reported_split(run.results))
    lines = []
    for row in table[table["split"] == side].to_dict("records"):
        text = (f"{row['arch']}: {side} balanced accuracy {row[POOLED_COLUMN]} on all folds' "
                f"rows pooled, 95% patient-bootstrap interval {row[CI_COLUMN]} on "
                f"{row['patients']} patients; per fold (or repeat) "
                f"{row['balanced_accuracy']}")  # fmt: skip
        caveat = row["caveat"]
        lines.append(text + (f" ({caveat})." if caveat else "."))
    return "\n".join(lines)


MAIN_COLUMNS = ("arch", "split", "folds", "repeats", "images", "patients", "balanced_accuracy",
                POOLED_COLUMN, CI_COLUMN, "caveat")  # fmt: skip
DETAIL_COLUMNS = ("arch", "split", "image_rate", "patient_rate", "precision", "recall", "f1",
                  "auc")  # fmt: skip


def page(table: pd.DataFrame, columns=None, caption: str | None = None):
    """A table that fits a notebook page: the named columns only, short column names, no
    index, no wrapping inside a cell (an interval stays on one line)."""
    if columns is not None:
        table = table[[c for c in columns if c in table]]
    styler = table.rename(columns=SHORT_NAMES).style.hide(axis="index")
    styler = styler.format(precision=3, na_rep="")
    if "path" in table:  # the file name says which image; the folder is the run's data
        styler = styler.format(lambda p: Path(str(p)).name, subset=["path"])
    styler = styler.set_table_styles([
        {"selector": "th, td", "props": "white-space: nowrap; padding: 2px 6px; font-size: 12px"},
    ])  # fmt: skip
    return styler.set_caption(caption) if caption else styler


# --- the leakage study ---------------------------------------------------------------------

STUDY_SEED = 20160101  # test patients and halves are picked once, whatever the head seeds
ARMS = ("patient", "leaky")


@dataclass
class LeakageSplits:
    """Both arms' splits (index rows with a `split` column) and the leak pool."""

    patient: pd.DataFrame  # train: other patients; val; test: half A of the test patients
    leaky: pd.DataFrame  # the same, plus the leak pool (half B) in train
    leak_pool: pd.DataFrame  # other images of the test patients, never a test image


@dataclass
class LeakageStudy:
    table: pd.DataFrame  # per arm, and the gap: mean ± std over seeds, the gap's interval
    gaps: pd.DataFrame  # per repeat: both arms' balanced accuracy and AUC, and the gap
    conclusion: str
    gap: float
    ci: tuple[float, float]
    runs: dict[str, str]  # arm -> run name
    splits: LeakageSplits
    predictions: pd.DataFrame = field(repr=False, default_factory=pd.DataFrame)

    def __iter__(self):  # table, conclusion = leakage_study(...)
        return iter((self.table, self.conclusion))


def _halves(test: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each test patient's images in two random halves, A (scored) and B (the leak pool).
    Pixel twins (one picture under two names) stay together, so no test picture leaks."""
    rng = np.random.default_rng(seed)
    key = test["pixel"].fillna(test["relpath"]) if "pixel" in test else test["relpath"]
    in_a = pd.Series(False, index=test.index)
    for _, g in test.groupby("patient", sort=True):
        pictures = sorted(key[g.index].unique())
        chosen = rng.permutation(len(pictures))[: (len(pictures) + 1) // 2]
        in_a[g.index[key[g.index].isin([pictures[i] for i in chosen])]] = True
    return test[in_a], test[~in_a]


def leakage_splits(
    index: pd.DataFrame, task: str, test_frac: float = 0.15, val_frac: float = 0.15,
    seed: int = STUDY_SEED,
) -> LeakageSplits:  # fmt: skip
    """Test patients picked once (seeded, stratified as every split is:
    `splits.patient_strata`); their images halved into the test images and the leak pool;
    validation patients carved from the rest, the same for both arms. Only the leak pool
    differs between the arms' training sets."""
    from breakhis_tl.data.splits import check_strata, patient_strata, pick_patients, target_column

    target = target_column(task)
    strata = patient_strata(index, target)  # the strata every patient-level split uses
    check_strata(index, target, strata, 3, "the leakage study's test and val patients")
    if index[target].nunique() < 2:
        raise UserError("The leakage study needs images of at least two classes.")
    test = pick_patients(strata, test_frac, seed, keep=2)
    val = pick_patients(strata.drop(test), val_frac / (1 - test_frac), seed + 1, keep=1)
    a, b = _halves(index[index["patient"].isin(test)], seed + 2)
    side = np.where(index["patient"].isin(val), "val", "train")
    base = index.assign(split=side)
    base.loc[a.index, "split"] = "test"
    patient = base.drop(index=b.index)
    leaky = base.copy()
    return LeakageSplits(patient, leaky, b.assign(split="train"))


def _study_index(data_dir, dataset, magnification, group_by, cache_dir) -> pd.DataFrame:
    """The images the study may use, with their pixel hashes (cached, as the runner does)."""
    from breakhis_tl.data.identity import ImageStore
    from breakhis_tl.data.index import build_index, filter_magnification, parse_magnification
    from breakhis_tl.data.splits import apply_group_by

    index = build_index(data_dir, dataset)
    index = filter_magnification(index, parse_magnification(magnification))
    index = apply_group_by(index, group_by)
    store = ImageStore(Path(cache_dir) / "images.sqlite")
    try:
        return index.assign(pixel=store.pixel_hashes(index["path"].tolist()))
    finally:
        store.close()


def fresh_run_names(out_dir, prefix: str, arms, run: str | None = None) -> dict[str, str]:
    """`<prefix>_<timestamp>_<arm>` (a suffix added while a name is taken), or `<run>_<arm>`
    when a name is given; a given name already used is refused, never overwritten."""
    from breakhis_tl.report.outputs import check_run_name, run_folders

    def taken(name):
        return any(f.exists() for f in run_folders(out_dir, name).values())

    base = run or f"{prefix}_{time.strftime('%Y%m%d-%H%M%S')}"
    stem, k = base, 1
    while run is None and any(taken(f"{stem}_{a}") for a in arms):
        k += 1
        stem = f"{base}-{k}"
    names = {a: f"{stem}_{a}" for a in arms}
    for name in names.values():
        check_run_name(run_folders(out_dir, name), overwrite=False)
    return names


def _train_arms(splits: LeakageSplits, names: dict, group_by: str, cfg_kw: dict) -> dict:
    """Both arms from their own split files, with the same config and head seeds; features
    come from one cache, so only the heads are trained again."""
    from breakhis_tl.data.folds import Plan, write_split
    from breakhis_tl.runner import RunConfig, run_training

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arm, protocol in zip(ARMS, ("patient", "random"), strict=True):
            plan = Plan(protocol, group_by, [(None, getattr(splits, arm))])
            path = write_split(plan, Path(tmp) / f"{arm}.csv")  # the run keeps a copy
            cfg = RunConfig(split_file=str(path), run=names[arm], **cfg_kw)
            out[arm] = run_training(cfg, command=f"leakage_study ({arm} arm, {names[arm]})")
    return out


def _per_repeat(trained: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per repeat, both arms' test scores and the gap; and the test predictions of both,
    checked to be the same images in every arm and repeat."""
    scores, preds = [], []
    for arm, r in trained.items():
        test = r.results[r.results["split"] == "test"]
        scores.append(test.set_index("repeat")[["balanced_accuracy", "auc"]].add_prefix(f"{arm} "))
        preds.append(r.predictions[r.predictions["split"] == "test"].assign(arm=arm))
    p = pd.concat(preds, ignore_index=True)
    images = p.groupby(["arm", "repeat"])["relpath"].apply(frozenset)
    if images.nunique() != 1:
        raise RuntimeError("The leakage study's arms did not score the same test images.")
    gaps = pd.concat(scores, axis=1).reset_index()
    gaps["gap"] = gaps["leaky balanced_accuracy"] - gaps["patient balanced_accuracy"]
    gaps["AUC gap"] = gaps["leaky auc"] - gaps["patient auc"]
    return gaps, p


def _mean_std(v: pd.Series, sign: bool = False) -> str:
    v = v.astype(float)
    text = f"{v.mean():+.3f}" if sign else f"{v.mean():.3f}"
    return text + (f" ± {v.std(ddof=1):.3f}" if len(v) > 1 else "")


def _study_table(splits: LeakageSplits, gaps: pd.DataFrame, ci) -> pd.DataFrame:
    test = splits.patient[splits.patient["split"] == "test"]
    rows = []
    trains_on = ("other patients", "+ other images of the test patients")
    for arm, what in zip(ARMS, trains_on, strict=True):
        train = getattr(splits, arm)
        train = train[train["split"] == "train"]
        rows.append({
            "arm": arm, "trains on": what, "train images": len(train),
            "train patients": train["patient"].nunique(), "test images": len(test),
            "test patients": test["patient"].nunique(), "seeds": len(gaps),
            "balanced_accuracy": _mean_std(gaps[f"{arm} balanced_accuracy"]),
            "auc": _mean_std(gaps[f"{arm} auc"]), "gap 95% CI": "",
        })  # fmt: skip
    rows.append({
        "arm": "leaky - patient", "trains on": "(the gap, paired by seed)", "seeds": len(gaps),
        "balanced_accuracy": _mean_std(gaps["gap"], True), "auc": _mean_std(gaps["AUC gap"], True),
        "gap 95% CI": f"[{ci[0]:+.3f}, {ci[1]:+.3f}]",
    })  # fmt: skip
    table = pd.DataFrame(rows)
    counts = ["train images", "train patients", "test images", "test patients"]
    table[counts] = table[counts].astype("Int64")
    table["caveat"] = few_patients_caveat(test["patient"].nunique())
    return table


def leakage_conclusion(
    gap: float, ci, seeds: int, images: int, patients: int, same_heads: bool = False
) -> str:
    """The study's finding in one line, from its numbers (never fixed prose)."""
    verb = "raised" if gap >= 0 else "lowered"
    text = (f"Training on other images of the test patients {verb} balanced accuracy by "
            f"{abs(gap) * 100:.1f} points (95% CI [{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}]) "
            f"over {seeds} seeds, on the same {images} test images of {patients} "
            "patients.")  # fmt: skip
    if ci[0] <= 0 <= ci[1]:
        text += " The interval includes zero: this data cannot tell the two arms apart."
    if patients < FEW_PATIENTS:
        text += f" With {patients} test patients the interval is a rough range."
    if seeds > 1 and same_heads:
        text += " Every seed gave the same head (this head's fit does not depend on the seed)."
    return text


@dataclass
class StudyOptions:
    """The leakage study's own settings; everything else goes to RunConfig."""

    dataset: str = "breakhis"
    task: str = "binary"
    magnification: str = "all"
    weights: str = "default"
    epochs: int = 30
    seeds: int = 5
    test_frac: float = 0.15
    val_frac: float = 0.15
    group_by: str = "slide"
    seed: int = 0
    run_prefix: str = "leakage"
    run: str | None = None
    study_seed: int = STUDY_SEED
    n_boot: int = 1000
    train: object = None  # a TrainConfig (default: the default head)


def leakage_study(data_dir: str | Path, arch: str, out_dir: str | Path, **kwargs) -> LeakageStudy:
    """How much of a score comes from having seen the test patients, measured exactly.

    One set of test patients is fixed and each one's images are halved: half A is scored,
    half B is the leak pool. The `patient` arm trains on the other patients; the `leaky` arm
    on the same images plus the leak pool (never a test image). Same test images, same val,
    same head and budget, `seeds` head seeds each; the gap's interval resamples test
    patients. `kwargs` are StudyOptions fields, the rest go to RunConfig (cache_dir,
    workers, device, progress, ...)."""
    fields = {f.name for f in dataclasses.fields(StudyOptions)}
    o = StudyOptions(**{k: v for k, v in kwargs.items() if k in fields})
    kwargs = {k: v for k, v in kwargs.items() if k not in fields}
    from breakhis_tl.heads.training import TrainConfig

    names = fresh_run_names(out_dir, o.run_prefix, ARMS, o.run)
    cache = kwargs.get("cache_dir") or Path(out_dir) / "data" / "cache"
    index = _study_index(data_dir, o.dataset, o.magnification, o.group_by, cache)
    splits = leakage_splits(index, o.task, o.test_frac, o.val_frac, o.study_seed)
    train = dataclasses.replace(o.train or TrainConfig(), epochs=o.epochs, seed=o.seed)
    cfg_kw = dict(data=str(data_dir), dataset=o.dataset, archs=[arch], weights=o.weights,
                  task=o.task, magnification=o.magnification, repeats=o.seeds,
                  out=str(out_dir), train=train, **kwargs)  # fmt: skip
    trained = _train_arms(splits, names, o.group_by, cfg_kw)
    gaps, preds = _per_repeat(trained)
    gap, lo, hi = gap_bootstrap(preds, ARMS, n=o.n_boot)
    test = splits.patient[splits.patient["split"] == "test"]
    same = bool(gaps.filter(like="balanced_accuracy").nunique().max() == 1)
    conclusion = leakage_conclusion(gap, (lo, hi), len(gaps), len(test), test["patient"].nunique(),
                                    same)  # fmt: skip
    return LeakageStudy(_study_table(splits, gaps, (lo, hi)), gaps, conclusion, gap, (lo, hi),
                        names, splits, preds)  # fmt: skip


# --- studies that start from a finished run ------------------------------------------------


def run_config(run: Run, **changes):
    """The RunConfig a run was made with (from its config.json), with `changes` applied;
    fields this version does not know are dropped, and the data folder is the resolved one."""
    from breakhis_tl.heads.training import TrainConfig
    from breakhis_tl.runner import RunConfig

    saved = dict(run.config.get("config", {}))
    known = {f.name for f in dataclasses.fields(RunConfig)}
    train_known = {f.name for f in dataclasses.fields(TrainConfig)}
    train = TrainConfig(**{k: v for k, v in saved.pop("train", {}).items() if k in train_known})
    kept = {k: v for k, v in saved.items() if k in known}
    kept.update(data=run.config.get("data", kept.get("data")), train=train, run=None,
                overwrite=False)  # fmt: skip
    kept.update(changes)
    return RunConfig(**kept)


def run_settings(run: Run, data_dir: str | Path | None = None) -> dict:
    """What the run was made on (data folder, dataset, task, magnification, weights, archs),
    so that a study started from the analysis notebook follows the run."""
    cfg = run.config.get("config", {})
    return {
        "data": str(data_dir or run.config.get("data") or cfg.get("data")),
        "dataset": cfg.get("dataset", "breakhis"), "task": run.config.get("task", "binary"),
        "magnification": cfg.get("magnification", "all"),
        "weights": cfg.get("weights", "default"), "archs": list(run.results["arch"].unique()),
        "group_by": run.config.get("group_by") or "slide",
    }  # fmt: skip


def leakage_study_for(
    run: Run, out_dir: str | Path, arch: str | None = None, data_dir: str | Path | None = None,
    **kwargs,
) -> LeakageStudy:  # fmt: skip
    """The leakage study on a finished run's data, task, magnification, weights, patient key,
    stain setup, input size and head (its first architecture unless `arch` is named);
    `kwargs` go to leakage_study."""
    from breakhis_tl.runner import weights_for

    s = run_settings(run, data_dir)
    arch = arch or s["archs"][0]
    cache = run.config.get("config", {}).get("cache_dir")
    if cache and Path(cache).is_absolute():
        kwargs.setdefault("cache_dir", cache)
    kwargs.setdefault("run_prefix", f"{run.name}_leakage")
    saved = run_config(run)
    kwargs.setdefault("train", saved.train)  # the run's own head and settings
    for name in ("stain", "stain_ref", "stain_views", "input_size"):  # and its images
        kwargs.setdefault(name, getattr(saved, name))
    return leakage_study(
        s["data"], arch, out_dir, dataset=s["dataset"], task=s["task"],
        magnification=s["magnification"], weights=weights_for(s["weights"], arch),
        group_by=s["group_by"], **kwargs,
    )  # fmt: skip


SENSITIVITY_COLUMNS = ("patients", "balanced_accuracy", CI_COLUMN, "auc")


def group_by_sensitivity(cfg, run_prefix: str = "groupby", run: str | None = None) -> pd.DataFrame:
    """The same run config trained twice, grouping images into patients by slide id and by
    accession number, and the two results tables side by side. If slides of one accession
    come from one patient, grouping by slide lets that patient sit on both sides; a drop
    under `accession` is the size of that leak."""
    if cfg.split_file:
        raise UserError("A split file fixes the grouping; the sensitivity study makes its own.")
    if (cfg.protocol or "patient") == "random":
        raise UserError("The random protocol ignores the patient key; nothing to compare.")
    from breakhis_tl.runner import run_training

    names = fresh_run_names(cfg.out, run_prefix, ("slide", "accession"), run)
    tables = {}
    for group_by, name in names.items():
        c = dataclasses.replace(cfg, group_by=group_by, run=name, overwrite=False)
        run_training(c, command=f"group_by_sensitivity ({group_by}, {name})")
        t = results_table(load_run(cfg.out, name)).set_index(["arch", "split"])
        tables[group_by] = t[[c for c in SENSITIVITY_COLUMNS if c in t]]
    joined = pd.concat(tables, axis=1).swaplevel(axis=1)
    order = [(m, g) for m in SENSITIVITY_COLUMNS for g in names if (m, g) in joined.columns]
    return joined[order].reset_index()


def group_by_for(run: Run, out_dir: str | Path, **kwargs) -> pd.DataFrame:
    """group_by_sensitivity on a finished run's own config, outputs under `out_dir`."""
    cfg = run_config(run, out=str(out_dir))
    kwargs.setdefault("run_prefix", f"{run.name}_groupby")
    return group_by_sensitivity(cfg, **kwargs)


def describe_run(run: Run) -> str:
    """Two lines on what a run is, read from its own files."""
    s, c = run_settings(run), run.config
    heads = f"{len(run.heads)} head(s) of {', '.join(s['archs'])}"
    return (f"Run {run.name}: {heads}; task {s['task']} ({', '.join(run.classes)}), protocol "
            f"{c.get('protocol')}, patient key {s['group_by']}, magnification "
            f"{s['magnification']}.\nData: {s['data']}\nCommand: {c.get('command')}")  # fmt: skip


def head_curves(history: pd.DataFrame, title: str, limit: int = 6) -> list:
    """One curves figure per head (at most `limit`: a run of folds x repeats has many),
    with the kept epoch (logreg: the kept C) marked as the run recorded it
    (`plots.selected_epoch`), the same mark as its saved figure and TensorBoard."""
    from breakhis_tl.report.plots import curves_figure, selected_epoch

    figures = []
    key = "head" if "head" in history else "arch"
    for name, h in list(history.groupby(key, sort=False))[:limit]:
        rows = h.to_dict("records")
        figures.append(curves_figure(rows, f"{name} ({title})", best_epoch=selected_epoch(rows)))
    return figures


def group_by_sentence(joined: pd.DataFrame) -> str:
    """The sensitivity study's finding per architecture, on the reported side."""
    side = "test" if (joined[("split", "")] == "test").any() else "val (selected)"
    lines = []
    for r in joined[joined[("split", "")] == side].to_dict("records"):
        ba, n = ("balanced_accuracy",), ("patients",)
        lines.append(
            f"{r[('arch', '')]}: {side} balanced accuracy {r[ba + ('slide',)]} grouping by slide "
            f"id ({r[n + ('slide',)]} patients), {r[ba + ('accession',)]} grouping by accession "
            f"({r[n + ('accession',)]} patients). The two splits draw different patients, so "
            "part of any difference is the draw; the intervals show how much."
        )
    return "\n\n".join(lines)


def _coarser(first: pd.Series, second: pd.Series) -> tuple[pd.Series, int | None]:
    """One patient key for two runs' rows of the same images: the key of the run whose
    patients contain the other's (accession contains slide), so a patient split in two by
    the finer key is still one draw. Neither containing the other: patients linked by any
    shared image are joined (None)."""

    def within(fine: pd.Series, coarse: pd.Series) -> bool:  # each fine patient in one coarse
        return bool(pd.DataFrame({"f": fine, "c": coarse}).groupby("f")["c"].nunique().le(1).all())

    if within(second, first):
        return first, 0
    if within(first, second):
        return second, 1
    pairs = pd.DataFrame({"a": "1:" + first, "b": "2:" + second})
    root = {n: n for n in pd.unique(pairs.to_numpy().ravel())}

    def find(n):
        while root[n] != n:
            root[n] = root[root[n]]
            n = root[n]
        return n

    for a, b in pairs.itertuples(index=False):
        root[find(a)] = find(b)
    return pairs["a"].map(find), None


def compare_runs(out_dir: str | Path, first: str, second: str, n: int = 2000) -> str:
    """Two runs that each report every image once (say, patient-level against image-level
    5-fold CV on the same images): the gap in pooled balanced accuracy, second minus first,
    with a paired patient-bootstrap 95% interval (one draw of patients serves both runs).
    The draw is of one patient key, the coarser of the two runs' (see `_coarser`): pairing
    needs each patient to be the same unit in both runs, and the sentence names the key."""
    frames, keys, sides = [], [], []
    for arm in (first, second):
        run = load_run(out_dir, arm)
        p = run.predictions
        sides.append(reported_split(p))
        frames.append(p[p["split"] == sides[-1]].assign(arm=arm, repeat=1))
        keys.append(run.config.get("group_by") or "patient")
    shared = sorted(set(frames[0]["relpath"]) & set(frames[1]["relpath"]))
    if not shared:
        raise UserError(f"Runs {first} and {second} report no image in common: nothing to pair.")
    ids = [f.drop_duplicates("relpath").set_index("relpath").loc[shared, "patient"].astype(str)
           for f in frames]  # fmt: skip
    key, which = _coarser(*ids)
    both = pd.concat(frames, ignore_index=True)
    both = both[both["relpath"].isin(shared)]
    both["patient"] = both["relpath"].map(key)
    gap, lo, hi = gap_bootstrap(both, arms=(first, second), n=n)
    if which is None:
        how = "patients joined wherever the two runs' keys link them"
    elif keys[0] == keys[1] or ids[0].equals(ids[1]):
        how = f"patient key {keys[which]}"
    else:
        how = f"patient key {keys[which]} of run {(first, second)[which]}, the coarser"
    scored = ""
    if sides != ["test", "test"]:  # a val side picked its model: say what is compared
        scored = (f"; {first} scored on {split_label(sides[0])}, {second} on "
                  f"{split_label(sides[1])}: a selected side is optimistic")  # fmt: skip
    return (
        f"{second} minus {first}: {gap:+.3f} balanced accuracy, 95% CI [{lo:+.3f}, {hi:+.3f}] "
        f"(paired patient bootstrap on {how}: {key.nunique()} patients, {len(shared)} "
        f"images{scored})"
    )
