"""Split protocols, each patient-disjoint (except `random`, leaky on purpose) and checked.

A split is data: the index plus a `split` column (train/val/test) and a `fold` column. In
every protocol the model is selected on `val` and reported on `test`; only eva's own
definition (no `--eva-holdout`) has no test side, and its val rows are labelled as selected.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from breakhis_tl.data.index import BREAKHIS_CLASSES, IDC_CLASSES, SUBTYPES, accession_of
from breakhis_tl.data.leakage import check_no_leakage
from breakhis_tl.errors import UserError

log = logging.getLogger(__name__)

PROTOCOLS = ("patient", "cv", "folds", "eva", "random")
TASKS = ("binary", "subtype")
SPLITS = ("train", "val", "test")
GROUP_BY = ("slide", "accession")

# kaiko-ai eva's BreakHis protocol: 40X, four classes, these slide ids for validation.
EVA_CLASSES = ("TA", "MC", "F", "DC")
EVA_VAL_PATIENTS = (
    "18842D", "19979", "15275", "15792", "16875", "3909", "5287",
    "16716", "2773", "5695", "16184CD", "23060CD", "21998CD", "21998EF",
)  # fmt: skip

RANDOM_WARNING = (
    "The random protocol splits images, not patients: images of one patient land on both "
    "sides, so its scores overstate what a model does on a new patient."
)

__all__ = ["check_no_leakage"]


def target_column(task: str) -> str:
    if task == "binary":
        return "label"
    if task == "subtype":
        return "subtype"
    raise UserError(f"Unknown task {task!r}; choose one of: {', '.join(TASKS)}.")


def class_names(task: str, dataset: str, protocol: str = "patient") -> list[str]:
    if protocol == "eva" and dataset == "idc":
        raise UserError("The eva protocol is a BreakHis protocol (40X, four subtypes, eva's "
                        "validation slides); for IDC use --protocol patient or cv.")  # fmt: skip
    if task == "binary":
        return list(IDC_CLASSES if dataset == "idc" else BREAKHIS_CLASSES)
    if dataset == "idc":
        raise UserError("The subtype task needs BreakHis; IDC patches have only two classes.")
    if protocol == "eva":
        return [c for c in SUBTYPES if c in EVA_CLASSES]
    return list(SUBTYPES)


def apply_group_by(index: pd.DataFrame, group_by: str = "slide") -> pd.DataFrame:
    """The patient key: the slide id (what the dataset paper counts as 82 patients, and what
    eva uses), or its accession number (its digits), which joins slides such as 22549AB,
    22549CD and 22549G that may come from one patient."""
    if group_by not in GROUP_BY:
        raise UserError(f"Unknown --group-by {group_by!r}; choose one of: {', '.join(GROUP_BY)}.")
    slide = index["slide"] if "slide" in index else index["patient"]
    if group_by == "accession":
        return index.assign(patient=slide.astype(str).map(accession_of))
    return index.assign(patient=slide.astype(str))


SHARE_EDGES = (0.25, 0.5, 0.75)  # patients holding both classes: strata of positive share
MIN_STRATUM = 3  # a share stratum smaller than this joins its neighbour


def _holds_both(counts: pd.DataFrame) -> bool:
    """Two classes and patients with images of both (IDC: a patient's patches of tissue
    with and without cancer), where a patient's majority label hides most of the picture."""
    return counts.shape[1] == 2 and bool((counts.gt(0).sum(axis=1) > 1).any())


def patient_strata(df: pd.DataFrame, target: str) -> pd.Series:
    """Per patient, the stratum every patient-level split (and the leakage study) balances:
    its class where patients hold one class (a patient with two subtypes, slide 13412's DC
    and LC, takes its commoner one); where patients hold both of two classes, its share of
    the positive class in bins (0-25%, 25-50%, 50-75%, 75-100%, a bin of fewer than
    MIN_STRATUM patients joined to a neighbour), so train, val and test get patients of
    every kind rather than of one majority."""
    counts = pd.crosstab(df["patient"], df[target])
    if not _holds_both(counts):
        return df.groupby("patient")[target].agg(lambda s: s.value_counts().index[0])
    positive = next((c for c in counts.columns if c in ("idc", "malignant")), counts.columns[-1])
    share = counts[positive] / counts.sum(axis=1)
    code = pd.Series(np.searchsorted(SHARE_EDGES, share.to_numpy(), side="right"), share.index)
    edges = (0.0, *SHARE_EDGES, 1.0)
    names = {}
    for members in _joined_bins(code.value_counts().sort_index()):
        low, high = edges[members[0]], edges[members[-1] + 1]
        names.update({k: f"{positive} share {low:.0%}-{high:.0%}" for k in members})
    return code.map(names).rename(target)


def _joined_bins(sizes: pd.Series) -> list[list[int]]:
    """Neighbouring share bins joined until each holds MIN_STRATUM patients (or one is left):
    a stratum of one or two patients cannot give a patient to every side."""
    bins, counts = [[int(k)] for k in sizes.index], [int(n) for n in sizes]
    while len(bins) > 1 and min(counts) < MIN_STRATUM:
        k = int(np.argmin(counts))
        j = k - 1 if k == len(bins) - 1 or (k > 0 and counts[k - 1] <= counts[k + 1]) else k + 1
        lo, hi = min(k, j), max(k, j)
        bins[lo : hi + 1] = [bins[lo] + bins[hi]]
        counts[lo : hi + 1] = [counts[lo] + counts[hi]]
    return bins


def check_strata(df: pd.DataFrame, target: str, strata: pd.Series, need: int, what: str) -> None:
    """One sentence when `df` has too few patients for `what`: `need` patients of each class
    (or, where patients hold both classes, `need` patients holding each class)."""
    counts = pd.crosstab(df["patient"], df[target])
    if _holds_both(counts):
        holding = counts.gt(0).sum(axis=0)
        if holding.min() < need or len(strata) < need:
            have = ", ".join(f"{c}: {n}" for c, n in holding.sort_index().items())
            raise UserError(
                f"Cannot stratify {what}: it needs at least {need} patients holding each class, "
                f"and there are {len(strata)} patients (holding {have})."
            )
        return
    counts = strata.value_counts().reindex(sorted(set(df[target])), fill_value=0)
    if counts.min() < need:
        have = ", ".join(f"{c}: {n}" for c, n in counts.sort_index().items())
        raise UserError(
            f"Cannot stratify {what}: it needs at least {need} patients of each class, and "
            f"there are {len(strata)} patients ({have})."
        )


def pick_patients(strata: pd.Series, frac: float, seed: int, keep: int = 1) -> list:
    """A stratified, seeded share `frac` of the patients: at least one of every class that
    has more than `keep` patients, and never the last `keep` of a class (they stay in the
    pool). scikit-learn's stratified splitter rounds small classes (3 PT patients) to zero."""
    rng = np.random.default_rng(seed)
    picked = []
    for cls in sorted(strata.unique()):
        members = sorted(strata.index[strata == cls])
        n = min(len(members) - keep, max(1, round(frac * len(members))))
        if n > 0:
            picked += list(rng.choice(members, size=n, replace=False))
    return picked


def patient_split(
    df: pd.DataFrame, target: str, seed: int, val_frac: float = 0.15, test_frac: float = 0.15
) -> pd.DataFrame:
    """Train/val/test by patient, stratified by class; every class gets a patient in each."""
    for name, frac in (("val", val_frac), ("test", test_frac)):
        if not 0 < frac < 1:
            raise UserError(f"The {name} fraction must be between 0 and 1, not {frac}.")
    if val_frac + test_frac >= 1:
        raise UserError(
            f"Val and test fractions ({val_frac} + {test_frac}) leave nothing to train."
        )
    strata = patient_strata(df, target)
    check_strata(df, target, strata, 3, "a train/val/test split by patient")
    test = pick_patients(strata, test_frac, seed, keep=2)
    rest = strata.drop(test)
    val = pick_patients(rest, val_frac / (1 - test_frac), seed + 1, keep=1)
    side = {p: "train" for p in strata.index}
    side.update({p: "test" for p in test})
    side.update({p: "val" for p in val})
    return df.assign(split=df["patient"].map(side))


def carve_val(
    df: pd.DataFrame, target: str, seed: int, val_frac: float, grouped: bool = True
) -> pd.DataFrame:
    """Move a stratified share of the train side to `val`: by patient, or by image."""
    train = df[df["split"] == "train"]
    out = df.copy()
    if grouped:
        strata = patient_strata(train, target)
        check_strata(train, target, strata, 2, "a validation set out of the training patients")
        val = pick_patients(strata, val_frac, seed, keep=1)
        out.loc[out["patient"].isin(val) & (out["split"] == "train"), "split"] = "val"
        return out
    counts = train[target].value_counts()
    if counts.min() < 2:
        raise UserError(
            f"Cannot carve an image-level validation set: class {counts.idxmin()!r} has "
            f"{counts.min()} training image(s)."
        )
    n_val = max(len(counts), round(val_frac * len(train)))
    _, val = train_test_split(
        train.index, test_size=n_val, stratify=train[target], random_state=seed
    )
    out.loc[val, "split"] = "val"
    return out


def cv_folds(df: pd.DataFrame, target: str, n_folds: int, seed: int, grouped: bool) -> pd.Series:
    """Fold 1..k of every image; grouped by patient unless image-level (`random`)."""
    if n_folds < 2:
        raise UserError(f"Cross-validation needs at least 2 folds, not {n_folds}.")
    fold = pd.Series(0, index=df.index, dtype=int)
    if grouped:
        strata = patient_strata(df, target)
        check_strata(df, target, strata, n_folds, f"{n_folds} patient-level folds")
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        parts = splitter.split(df, df["patient"].map(strata), groups=df["patient"])
    else:
        counts = df[target].value_counts()
        if counts.min() < n_folds:
            raise UserError(
                f"Cannot stratify {n_folds} image-level folds: class {counts.idxmin()!r} has "
                f"{counts.min()} images and each fold needs one."
            )
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        parts = splitter.split(df, df[target])
    for k, (_, held_out) in enumerate(parts, start=1):
        fold.iloc[held_out] = k
    return fold


def cv_split(
    df: pd.DataFrame, target: str, n_folds: int, fold: int, seed: int, val_frac: float,
    grouped: bool = True,
) -> pd.DataFrame:  # fmt: skip
    """Fold `fold` held out as test; validation carved out of the other folds, so the
    reported fold never picks the epoch (nested selection)."""
    if not 1 <= fold <= n_folds:
        raise UserError(f"Fold {fold} is out of range; this split has folds 1 to {n_folds}.")
    folds = cv_folds(df, target, n_folds, seed, grouped)
    out = df.assign(split=np.where(folds == fold, "test", "train"), fold=fold)
    return carve_val(out, target, seed, val_frac, grouped)


def read_folds_csv(path: str | Path) -> pd.DataFrame:
    """Spanhol's official Folds.csv: `fold,mag,grp,filename`, fold 1-5, grp train/test."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Folds file {path} does not exist; give its path with --folds-csv.")
    try:
        folds = pd.read_csv(path, dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"Folds file {path} is not a readable CSV ({exc}).") from None
    missing = {"fold", "mag", "grp", "filename"} - set(folds.columns)
    if missing:
        raise UserError(
            f"Folds file {path} lacks column(s) {', '.join(sorted(missing))}; expected the "
            "header fold,mag,grp,filename."
        )
    folds = folds.dropna(how="all")
    bad_fold = ~folds["fold"].fillna("").str.strip().isin([str(i) for i in range(1, 6)])
    bad_grp = ~folds["grp"].fillna("").str.strip().str.lower().isin(["train", "test"])
    bad_name = folds["filename"].fillna("").str.strip() == ""
    bad = folds[bad_fold | bad_grp | bad_name]
    if len(bad):
        row = bad.index[0] + 2  # header is line 1
        raise UserError(
            f"Folds file {path} line {row} is malformed ({bad.iloc[0].to_dict()}); fold must be "
            "1-5, grp train or test, and filename set."
        )
    folds["fold"] = folds["fold"].str.strip().astype(int)
    folds["grp"] = folds["grp"].str.strip().str.lower()
    folds["name"] = folds["filename"].str.strip().str.split("/").str[-1]
    return folds


def find_folds_csv(index: pd.DataFrame) -> Path | None:
    """Look for Folds.csv beside or above the BreaKHis_v1 folder of the indexed images."""
    first = Path(index["path"].iloc[0])
    for parent in first.parents:
        if (parent / "Folds.csv").is_file():
            return parent / "Folds.csv"
    return None


def official_fold_split(
    df: pd.DataFrame, target: str, folds: pd.DataFrame, fold: int, seed: int, val_frac: float
) -> pd.DataFrame:
    """Spanhol's fold `fold`: its test group as test; val carved from its train patients.

    Rows are matched by file name, so a copy of the archive under another prefix still works.
    The test group is never used for model selection; the val patients come out of train.
    """
    if not 1 <= fold <= 5:
        raise UserError(f"Fold {fold} is out of range; the official BreakHis folds are 1 to 5.")
    rows = folds[folds["fold"] == fold].drop_duplicates("name").set_index("name")["grp"]
    if rows.empty:
        raise UserError(f"The folds file has no rows for fold {fold}.")
    grp = df["filename"].map(rows)
    if grp.isna().any():
        log.warning(
            "%d image(s) are not in fold %d of Folds.csv and are left out.",
            int(grp.isna().sum()),
            fold,
        )
    out = df.assign(split=grp, fold=fold).dropna(subset=["split"]).reset_index(drop=True)
    if out.empty:
        raise UserError(f"No indexed image appears in fold {fold} of the folds file.")
    out = carve_val(out, target, seed, val_frac)
    # The official folds share a few slide ids between train and test: warn, do not fail.
    check_no_leakage(out, warn_only=True)
    return out


def eva_split(df: pd.DataFrame, target: str, seed: int, val_frac: float, holdout: bool):
    """eva's protocol: 40X, TA/MC/F/DC, a fixed list of validation slides.

    eva selects the checkpoint on those slides and reports them too. With `holdout` they
    become an untouched test set and validation patients are carved from eva's train side.
    """
    if "magnification" not in df:
        raise UserError("The eva protocol is defined on BreakHis only.")
    out = df[(df["magnification"] == 40) & df["subtype"].isin(EVA_CLASSES)].reset_index(drop=True)
    if out.empty:
        raise UserError("No 40X images of classes TA, MC, F or DC: the eva protocol has nothing.")
    is_val = out["slide"].isin(EVA_VAL_PATIENTS)
    if not is_val.any():
        raise UserError(
            "None of eva's 14 validation slides (18842D, 19979, ...) is in this data, so the "
            "eva protocol has no validation set; use --protocol patient or the full BreakHis."
        )
    if is_val.all():
        raise UserError("Every image here is on one of eva's validation slides: nothing to train.")
    out = out.assign(split=np.where(is_val, "test" if holdout else "val", "train"))
    if holdout:
        out = _drop_accession_kin(out)
        out = carve_val(out, target, seed, val_frac)
    return out.assign(fold=pd.NA)


def _drop_accession_kin(out: pd.DataFrame) -> pd.DataFrame:
    """An untouched test set shares no accession number with training: slides such as
    16184/16184CD or 18842/18842D may be one patient, so their train side is dropped."""
    acc = out["slide"].astype(str).map(accession_of)
    held = set(acc[out["split"] == "test"])
    kin = (out["split"] == "train") & acc.isin(held)
    if kin.any():
        log.warning(
            "--eva-holdout: %d training image(s) of %d slide(s) share an accession number with "
            "eva's test slides and were left out.",
            int(kin.sum()),
            out.loc[kin, "slide"].nunique(),
        )
    return out[~kin].reset_index(drop=True)


def random_split(
    df: pd.DataFrame, target: str, seed: int, val_frac: float = 0.15, test_frac: float = 0.15
) -> pd.DataFrame:
    log.warning("%s", RANDOM_WARNING)
    counts = df[target].value_counts()
    if counts.min() < 3:
        raise UserError(
            f"Cannot stratify a random image split: class {counts.idxmin()!r} has "
            f"{counts.min()} images and train, val and test each need one."
        )
    rest, test = train_test_split(
        df.index,
        test_size=max(len(counts), round(test_frac * len(df))),
        stratify=df[target],
        random_state=seed,
    )
    train, val = train_test_split(
        rest,
        test_size=max(len(counts), round(val_frac * len(df))),
        stratify=df.loc[rest, target],
        random_state=seed,
    )
    split = pd.Series("train", index=df.index)
    split[val], split[test] = "val", "test"
    return df.assign(split=split)


@dataclass(frozen=True)
class SplitSettings:
    """What a split depends on besides the protocol and the fold."""

    task: str = "binary"
    seed: int = 0
    val_frac: float = 0.15
    test_frac: float = 0.15
    folds_csv: str | Path | None = None
    eva_holdout: bool = False


def make_split(
    index: pd.DataFrame,
    protocol: str = "patient",
    fold: int = 1,
    n_folds: int | None = None,
    **settings,
) -> pd.DataFrame:
    """The index with `split` (train/val/test) and `fold` columns, leakage-checked.

    `n_folds` with `patient` or `random` gives cross-validation (patient-level or
    image-level folds); `cv` is the patient protocol with 5 folds unless told otherwise.
    `settings` are SplitSettings fields.
    """
    o = SplitSettings(**settings)
    task, seed, val_frac, test_frac = o.task, o.seed, o.val_frac, o.test_frac
    if protocol not in PROTOCOLS:
        raise UserError(f"Unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}.")
    target = target_column(task)
    if task == "subtype" and "subtype" not in index:
        raise UserError("The subtype task needs BreakHis; IDC patches have only two classes.")
    if "slide" not in index:
        index = index.assign(slide=index["patient"])
    if protocol == "eva":
        if task != "subtype":
            raise UserError("The eva protocol is the four-class subtype task; use --task subtype.")
        out = eva_split(index, target, seed, val_frac, o.eva_holdout)
        # eva's slide list is what it is; grouped by accession it shares patients: say so.
        check_no_leakage(out, warn_only=True)
        return out
    elif protocol == "folds":
        path = o.folds_csv or find_folds_csv(index)
        if path is None:
            raise UserError(
                "No Folds.csv found beside the BreaKHis_v1 folder; give its path with --folds-csv."
            )
        return official_fold_split(index, target, read_folds_csv(path), fold, seed, val_frac)
    elif protocol == "cv" or n_folds:
        grouped = protocol != "random"
        if not grouped:
            log.warning("%s", RANDOM_WARNING)
        out = cv_split(index, target, n_folds or 5, fold, seed, val_frac, grouped)
        if not grouped:
            return out
    elif protocol == "random":
        return random_split(index, target, seed, val_frac, test_frac).assign(fold=pd.NA)
    else:
        out = patient_split(index, target, seed, val_frac, test_frac).assign(fold=pd.NA)
    check_no_leakage(out)
    return out


def check_classes(df: pd.DataFrame, task: str, classes: list[str]) -> None:
    """Every class must be in train; one absent from val or test is named in a warning,
    since its metrics there are undefined."""
    target = target_column(task)
    unknown = sorted(set(df[target].dropna()) - set(classes))
    if unknown:
        raise UserError(
            f"The split holds class(es) {', '.join(map(str, unknown))} outside the {task} task's "
            f"classes ({', '.join(classes)}); choose the task the split was made for."
        )
    present = set(df.loc[df["split"] == "train", target])
    missing = [c for c in classes if c not in present]
    if missing:
        raise UserError(
            f"Class(es) {', '.join(missing)} have no training image in this split; choose a "
            "task, magnification or protocol that keeps every class in training."
        )
    for side in ("val", "test"):
        rows = df[df["split"] == side]
        absent = [c for c in classes if c not in set(rows[target])]
        if len(rows) and absent:
            log.warning(
                "Class(es) %s have no %s image: too few patients to place one there.",
                ", ".join(absent),
                side,
            )


def split_summary(df: pd.DataFrame, task: str) -> str:
    target = target_column(task)
    order = [s for s in SPLITS if s in set(df["split"])]
    images = pd.crosstab(df["split"], df[target], margins=True, margins_name="total").reindex(
        order + ["total"]
    )
    patients = (
        df.groupby(["split", target])["patient"].nunique().unstack(fill_value=0).reindex(order)
    )
    patients["total"] = df.groupby("split")["patient"].nunique().reindex(order)
    lines = [
        "Images per split and class:",
        images.to_string(),
        "",
        "Patients per split and class:",
        patients.to_string(),
    ]
    return "\n".join(lines)
