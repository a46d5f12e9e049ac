"""Scoring a saved head against the labels that BreakHis and IDC file names carry.

`predict` and `evaluate` both score through these functions, so a number printed next to
predictions is the number `evaluate` writes. Image level: the scikit-learn metrics of
`metrics.compute_metrics` and Spanhol's image rate. Patient level: Spanhol's patient rate
(mean over patients of each patient's share of correct images) and, for patients of a single
class, accuracy, balanced accuracy and AUC of the patient's mean probabilities. The patient
table shows each patient's share correct, majority vote and mean-probability prediction side
by side, because the two levels differ exactly there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from breakhis_tl.data.index import (
    BENIGN_SUBTYPES,
    BREAKHIS_NAME,
    IDC_CLASSES,
    IDC_NAME,
    SUBTYPES,
    patient_of,
)
from breakhis_tl.errors import UserError
from breakhis_tl.metrics import compute_metrics, patient_rows

log = logging.getLogger(__name__)

SUMMARY_METRICS = (
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("auc", "AUC"),
    ("rate", "recognition rate (Spanhol)"),
)

PATIENT_LEVEL = (
    "Patient level: accuracy, balanced accuracy and AUC of each patient's mean probabilities; "
    "the recognition rate is the mean of the patients' share_correct (Spanhol et al. 2016)."
)


def _label_of(name: str, subtype: bool, dataset: str) -> str | None:
    base = Path(str(name)).name
    if dataset == "idc":
        m = IDC_NAME.match(base)
        return IDC_CLASSES[int(m["cls"])] if m else None
    m = BREAKHIS_NAME.match(base)
    code = m["subtype"].upper() if m else None
    if code not in SUBTYPES or (m["bm"].upper() == "B") != (code in BENIGN_SUBTYPES):
        return None  # not a BreakHis name, or one whose B/M letter contradicts its subtype
    if subtype:
        return code
    return "benign" if m["bm"].upper() == "B" else "malignant"


def labels_from_names(paths, classes: list[str], dataset: str) -> list[str | None]:
    """The true label of each input in the head's terms (benign/malignant, non_idc/idc or a
    subtype code), read from its file name; None where the name does not give one. A subtype
    outside `classes` (an eva head has 4 of the 8) is returned as is, for the caller to leave
    out with a note."""
    subtype = bool(classes) and set(classes) <= set(SUBTYPES)
    return [_label_of(p, subtype, dataset) for p in paths]


def scorable(labels, classes: list[str], protocol: str | None) -> tuple[np.ndarray, str]:
    """Which labels the head can be scored on, and a note on those left out. Only the eva
    protocol drops classes on purpose; elsewhere a label outside the head's classes means the
    head is the wrong one, and that is said in one sentence."""
    labels = pd.Series(list(labels), dtype=object)
    known = labels.notna()
    inside = labels.isin(classes)
    outside = sorted(set(labels[known & ~inside]))
    if outside and protocol != "eva":
        raise UserError(
            f"The head's classes ({', '.join(classes)}) do not cover the labels "
            f"{', '.join(outside)} of these images; use a head trained for their task."
        )
    note = ""
    if outside:
        note = (
            f"{int((known & ~inside).sum())} image(s) of class(es) {', '.join(outside)} were left "
            f"out of the scoring: this eva head knows only {', '.join(classes)}."
        )
    return inside.to_numpy(), note


def _rows(predictions: pd.DataFrame, labels, classes: list[str]) -> pd.DataFrame:
    """Readable rows whose label is one of the head's classes, with label and patient."""
    df = predictions.assign(label=list(labels), patient=predictions["path"].map(patient_of))
    return df[(df["error"] == "") & df["label"].isin(classes)]


def score(predictions: pd.DataFrame, labels, classes: list[str]) -> dict:
    """Image-level metrics (compute_metrics, with Spanhol's image and patient rates), on the
    readable inputs whose label is one of `classes`."""
    df = _rows(predictions, labels, classes)
    if df.empty:
        raise UserError(
            f"No readable input has a label among the head's classes ({', '.join(classes)}), "
            "so there is nothing to score."
        )
    y = df["label"].map(classes.index).to_numpy()
    probs = df[[f"prob_{c}" for c in classes]].to_numpy()
    has_patient = df["patient"].notna().all()
    return compute_metrics(y, probs, classes, df["patient"].tolist() if has_patient else None)


def patient_table(predictions: pd.DataFrame, classes: list[str], labels=None) -> pd.DataFrame:
    """One row per patient (readable inputs with a BreakHis or IDC name): the project's one
    patient table (`metrics.patient_rows`, shared with the analysis notebook). Spanhol's
    patient rate is the mean of `share_correct`; patient-level accuracy is that of
    `prediction`."""
    df = predictions.assign(patient=predictions["path"].map(patient_of))
    if labels is not None:
        df["label"] = list(labels)
    df = df[(df["error"] == "") & df["patient"].notna()]
    return patient_rows(df, classes)


def patient_scores(table: pd.DataFrame, classes: list[str], image: dict) -> dict:
    """Patient-level metrics: Spanhol's patient rate (from the image-level scoring) for every
    patient, and the metrics of the mean-probability and majority-vote predictions for
    patients whose images all have one label (an IDC patient has patches of both classes,
    so there these are undefined and left NaN)."""
    single = table[table["label"].isin(classes)]
    out = {"rate": image.get("patient_rate", np.nan), "n": image.get("n_patients")}
    if single.empty:
        return out
    if single["label"].nunique() < 2:  # one class: 1.000 would say nothing about patients
        out["n_single_label"] = len(single)
        out["withheld"] = (
            f"Patient-level accuracy, balanced accuracy and AUC are not shown: the "
            f"{len(single)} patient(s) whose images all have one label are all "
            f"{single['label'].iloc[0]}, and one class cannot show patients told apart."
        )
        return out
    y = single["label"].map(classes.index).to_numpy()
    probs = single[[f"prob_{c}" for c in classes]].to_numpy()
    out.update(compute_metrics(y, probs, classes))
    out["majority_vote_accuracy"] = float((single["majority_vote"] == single["label"]).mean())
    out["n_single_label"] = len(single)
    return out


def summary_table(image: dict, patient: dict) -> pd.DataFrame:
    """Image- and patient-level numbers side by side, one metric a row."""
    rows = []
    for key, name in SUMMARY_METRICS:
        rows.append(
            {
                "metric": name,
                "image_level": image.get("image_rate" if key == "rate" else key, np.nan),
                "patient_level": patient.get(key, np.nan),
            }
        )
    rows.append(
        {"metric": "majority-vote accuracy", "image_level": np.nan,
         "patient_level": patient.get("majority_vote_accuracy", np.nan)}
    )  # fmt: skip
    rows.append(
        {"metric": "n", "image_level": image.get("n_images"), "patient_level": patient.get("n")}
    )
    return pd.DataFrame(rows)


@dataclass
class Evaluation:
    """Everything `evaluate` writes and `predict` prints when the names give labels."""

    predictions: pd.DataFrame  # per image, with the label column
    classes: list[str]
    image: dict  # compute_metrics of the images
    patients: pd.DataFrame  # patient_table
    patient: dict  # patient_scores
    summary: pd.DataFrame  # summary_table
    notes: list[str] = field(default_factory=list)


def assess(predictions: pd.DataFrame, classes: list[str], protocol: str | None) -> Evaluation:
    """Score predictions that carry a `label` column (Classifier.predict with labels)."""
    labels = [lab or None for lab in predictions["label"].fillna("")]
    _, note = scorable(labels, classes, protocol)
    notes = [note] if note else []
    image = score(predictions, labels, classes)
    table = patient_table(predictions, classes, labels)
    patient = patient_scores(table, classes, image)
    if len(table) and patient.get("n_single_label", 0) < len(table):
        mixed = len(table) - patient.get("n_single_label", 0)
        uses = (
            ""
            if patient.get("withheld")
            else ("; patient-level accuracy, balanced accuracy and AUC use the other patients only")
        )
        notes.append(f"{mixed} patient(s) have images of several classes{uses} (the patient "
                     "rate uses all).")  # fmt: skip
    if patient.get("withheld"):
        notes.append(patient["withheld"])
    if image.get("n_patients") is None:
        notes.append("Some scored names give no patient, so the patient rate is not computed.")
    return Evaluation(predictions, classes, image, table, patient,
                      summary_table(image, patient), notes)  # fmt: skip


def format_summary(ev: Evaluation) -> str:
    """The summary as printed: the table, then its notes."""
    shown = ev.summary.copy()
    for col in ("image_level", "patient_level"):
        shown[col] = [
            "-" if pd.isna(v) else (f"{int(v)}" if m == "n" else f"{v:.3f}")
            for m, v in zip(shown["metric"], shown[col], strict=True)
        ]
    return "\n".join([shown.to_string(index=False), PATIENT_LEVEL, *ev.notes])


def split_inputs(
    split_file: str | Path, data: str | Path, dataset: str, side: str, fold: int | None
) -> list[str]:
    """Image paths of one side (and fold) of a split file, found under `data`: its paths are
    relative to the BreaKHis_v1 root (or the IDC folder), as `split --out` and `train`
    write them, and are matched against the index's relpath."""
    from breakhis_tl.data.folds import read_split
    from breakhis_tl.data.index import build_index

    split = read_split(split_file)
    folds = sorted(int(f) for f in split["fold"].dropna().unique())
    if folds and fold is None and len(folds) > 1:
        raise UserError(
            f"Split file {split_file} holds folds {', '.join(map(str, folds))} and the head "
            "names none; pass --fold."
        )
    if folds:
        fold = folds[0] if fold is None else int(fold)
        if fold not in folds:
            raise UserError(f"Split file {split_file} has no fold {fold}; it holds "
                            f"{', '.join(map(str, folds))}.")  # fmt: skip
        split = split[split["fold"] == fold]
    rows = split[split["split"] == side]
    if rows.empty:
        sides = ", ".join(sorted(set(split["split"])))
        raise UserError(f"Split file {split_file} has no {side} images (it has {sides}); "
                        "choose one with --split.")  # fmt: skip
    index = build_index(data, dataset)
    found = index.set_index("relpath")["path"]
    matched = rows["path"][rows["path"].isin(found.index)]
    if matched.empty:
        raise UserError(
            f"None of the {len(rows)} {side} image(s) of split file {split_file} (such as "
            f"{rows['path'].iloc[0]}) is under {data}; point --data at the folder the split "
            "was made from."
        )
    if len(matched) < len(rows):
        log.warning("%d of %d %s image(s) of split file %s are not under %s and were left out.",
                    len(rows) - len(matched), len(rows), side, split_file, data)  # fmt: skip
    return found[matched].tolist()


def write_outputs(ev: Evaluation, out: str | Path, title: str) -> list[Path]:
    """predictions.csv, metrics.csv (image and patient level), patients.csv and
    confusion.png (image level) under `out`; one sentence if the folder cannot be written."""
    from breakhis_tl.report.plots import confusion_figure, save_figure

    out = Path(out)
    paths = [out / n for n in ("predictions.csv", "metrics.csv", "patients.csv")]
    try:
        out.mkdir(parents=True, exist_ok=True)
        ev.predictions.to_csv(paths[0], index=False)
        ev.summary.to_csv(paths[1], index=False)
        ev.patients.to_csv(paths[2], index=False)
        paths.append(save_figure(_confusion(ev, title, confusion_figure), out / "confusion.png"))
    except OSError as exc:
        raise UserError(f"Output folder {out} cannot be written ({exc.strerror}).") from None
    return paths


def _confusion(ev: Evaluation, title: str, confusion_figure):
    """plots.confusion_figure made readable at any class count: room for the title, cells
    shaded by their share of the true class (with 69% malignant images, shading by count
    hides a benign row that is mostly wrong), that share under each count, and level tick
    labels where they fit."""
    import matplotlib.pyplot as plt

    matrix = np.asarray(ev.image["confusion"])
    k = len(ev.classes)
    fig = confusion_figure(matrix, ev.classes, title)
    ax = fig.axes[0]
    cell = 0.85 if k <= 4 else 0.6
    fig.set_size_inches(2.6 + cell * k, 2.3 + cell * k)
    totals = matrix.sum(1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    ax.images[0].set_data(shares)
    ax.images[0].set_clim(0, 1)
    for n, text in enumerate(ax.texts[: k * k]):
        i, j = divmod(n, k)
        text.set_text(f"{matrix[i, j]}\n{shares[i, j]:.0%}")
        text.set_fontsize(8 if k > 4 else 11)
        text.set_color("white" if shares[i, j] > 0.5 else "black")
    if k <= 4 or max(map(len, ev.classes)) <= 3:
        plt.setp(ax.get_xticklabels(), rotation=0, ha="center")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("Predicted label")
    ax.set_ylabel("True label (count, share of the row)")
    fig.tight_layout()
    return fig
