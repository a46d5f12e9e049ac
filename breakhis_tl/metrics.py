"""Standard metrics from scikit-learn, plus Spanhol's image- and patient-level rates.

Image-level recognition rate is the share of images classified correctly (= accuracy).
Patient-level recognition rate is the mean over patients of each patient's share of correctly
classified images (Spanhol et al. 2016), so a patient with many images does not dominate.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
from sklearn import metrics as skm
from sklearn.exceptions import UndefinedMetricWarning

log = logging.getLogger(__name__)

METRICS = (
    "accuracy", "balanced_accuracy", "precision", "recall", "f1", "auc",
    "image_rate", "patient_rate",
)  # fmt: skip


def patient_rate(y_true, y_pred, patients) -> float:
    df = pd.DataFrame({"p": np.asarray(patients), "ok": np.asarray(y_true) == np.asarray(y_pred)})
    return float(df.groupby("p")["ok"].mean().mean()) if len(df) else float("nan")


def compute_metrics(
    y_true, probs, classes: list[str], patients=None, curves_only=False, quiet=False
) -> dict:
    """Binary metrics for two classes (positive = the second), macro averages for more.

    A metric that is undefined on this data (a single class present, nothing predicted
    positive) is NaN with a warning, never an exception. `curves_only` computes just the
    per-epoch curve metrics (no AUC, confusion or patients): each scikit-learn call costs
    milliseconds of input checks, which add up over hundreds of epochs. `quiet`: no warnings
    (the per-epoch validation pass would repeat them every epoch). With more than two classes
    AUC is the mean one-vs-rest AUC over the classes present (scikit-learn's macro average is
    NaN as soon as one class is absent, as on a small validation set).
    """
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    labels = list(range(k))
    out = {m: float("nan") for m in METRICS}
    out["n_images"] = int(len(y_true))
    out["n_patients"] = int(len(set(patients))) if patients is not None else None
    if len(y_true) == 0:
        return out
    y_pred = probs.argmax(1)
    avg = "binary" if k == 2 else "macro"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["accuracy"] = skm.accuracy_score(y_true, y_pred)
        out["balanced_accuracy"] = skm.balanced_accuracy_score(y_true, y_pred)
        kw = {"average": avg, "zero_division": np.nan}
        if k > 2:
            kw["labels"] = labels
        prf = skm.precision_recall_fscore_support(y_true, y_pred, **kw)
        out["precision"], out["recall"], out["f1"] = prf[:3]
    out["image_rate"] = out["accuracy"]
    if curves_only:
        return {m: (float(v) if isinstance(v, (float, np.floating)) else v) for m, v in out.items()}
    present = np.unique(y_true)
    say = (lambda *a: None) if quiet else log.warning
    if len(present) < 2:
        say("Only one class (%s) in this split: AUC is undefined (NaN).", classes[present[0]])
    elif k == 2:
        out["auc"] = skm.roc_auc_score(y_true, probs[:, 1])
    else:
        out["auc"] = float(np.mean([skm.roc_auc_score(y_true == c, probs[:, c]) for c in present]))
        if len(present) < k:
            missing = ", ".join(classes[c] for c in labels if c not in present)
            say("No %s image in this split: AUC is the mean over the classes present.", missing)
    if any(issubclass(w.category, UndefinedMetricWarning) for w in caught):
        say("Some metrics are undefined on this split and are NaN.")
    if patients is not None:
        out["patient_rate"] = patient_rate(y_true, y_pred, patients)
    out = {m: (float(v) if isinstance(v, (float, np.floating)) else v) for m, v in out.items()}
    out["confusion"] = skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return out


def split_label(split: str) -> str:
    """The side that helped pick the model (its epoch, or the probe's C) is named so in
    every table: its score is optimistic."""
    return "val (selected)" if split == "val" else split


def fold_table(results: pd.DataFrame, metrics) -> pd.DataFrame:
    """One row per architecture and split of a results table: each metric as its mean, with
    ± the std over folds and repeats where there are several."""
    rows = []
    for (arch, split), g in results.groupby(["arch", "split"], sort=False):
        folds = int(g["fold"].nunique()) if g["fold"].notna().any() else 1
        runs = int(g["repeat"].nunique()) if "repeat" in g else 1
        row = {"arch": arch, "split": split_label(split), "folds": folds, "repeats": runs}
        for m in metrics:
            v = g[m].astype(float)
            row[m] = f"{v.mean():.3f}" + (f" ± {v.std(ddof=1):.3f}" if len(v) > 1 else "")
        rows.append(row)
    return pd.DataFrame(rows)


def patient_vote(predictions: pd.Series, mean_probs: pd.Series, classes: list[str]) -> str:
    """The most frequent per-image prediction of one patient. A tie goes to the tied class
    with the higher mean probability (then the earlier class), so the vote is always a class
    and is the same in `evaluate`, `predict` and the analysis notebook."""
    counts = predictions.value_counts()
    tied = counts[counts == counts.max()].index
    return max(tied, key=lambda c: (mean_probs[f"prob_{c}"], -classes.index(c)))


def _label_order(classes: list[str]):
    return lambda c: (classes.index(c) if c in classes else len(classes), c)


def patient_rows(df: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """The one patient table of the project: per patient (`patient` column), the true
    label(s) when `df` has a `label` column (several joined by "/", as an IDC patient has
    patches of both classes), the images, the share predicted correctly, the majority vote
    (`patient_vote`), the class of the mean probability, and the mean probabilities."""
    cols = [f"prob_{c}" for c in classes]
    labelled = "label" in df
    head = ["patient"] + (["label"] if labelled else []) + ["n_images"]
    tail = (["share_correct"] if labelled else []) + ["majority_vote", "prediction"]
    rows = []
    for patient, g in df.groupby("patient", sort=True):
        mean = g[cols].mean()
        row = {"patient": patient, "n_images": len(g)}
        if labelled:
            present = set(g["label"].dropna())
            row["label"] = "/".join(sorted(present, key=_label_order(classes)))
            scored = g[g["label"].isin(classes)]
            right = (scored["prediction"] == scored["label"]).mean() if len(scored) else np.nan
            row["share_correct"] = float(right)
        row["majority_vote"] = patient_vote(g["prediction"], mean, classes)
        row["prediction"] = classes[int(np.argmax(mean.to_numpy()))]
        rows.append({**row, **mean.to_dict()})
    return pd.DataFrame(rows, columns=[*head, *tail, *cols])
