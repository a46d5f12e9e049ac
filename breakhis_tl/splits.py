"""Split protocols, each patient-disjoint (except `random`, leaky on purpose) and checked.

A split is data: the index plus a `split` column (train/val/test) and, for `cv` and `folds`,
a `fold` column. It can be written to CSV, kept, and read back for another run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from breakhis_tl.errors import UserError
from breakhis_tl.index import BREAKHIS_CLASSES, IDC_CLASSES, SUBTYPES

log = logging.getLogger(__name__)

PROTOCOLS = ("patient", "cv", "folds", "eva", "random")
TASKS = ("binary", "subtype")
SPLITS = ("train", "val", "test")

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


def target_column(task: str) -> str:
    if task == "binary":
        return "label"
    if task == "subtype":
        return "subtype"
    raise UserError(f"Unknown task {task!r}; choose one of: {', '.join(TASKS)}.")


def class_names(task: str, dataset: str, protocol: str = "patient") -> list[str]:
    if task == "binary":
        return list(IDC_CLASSES if dataset == "idc" else BREAKHIS_CLASSES)
    if dataset == "idc":
        raise UserError("The subtype task needs BreakHis; IDC patches have only two classes.")
    if protocol == "eva":
        return [c for c in SUBTYPES if c in EVA_CLASSES]
    return list(SUBTYPES)


def check_no_leakage(df: pd.DataFrame, column: str = "split", warn_only: bool = False) -> None:
    """Raise (or warn) if any patient has images in two groups of `column`.

    The one check every protocol goes through: a patient seen in training makes a test score
    a measure of memory, not of generalisation.
    """
    groups = df.groupby("patient")[column].nunique()
    shared = sorted(groups[groups > 1].index)
    if not shared:
        return
    msg = (
        f"{len(shared)} patient(s) have images on more than one side of the {column!r} split "
        f"({', '.join(shared[:8])}{' ...' if len(shared) > 8 else ''})."
    )
    if warn_only:
        log.warning("%s", msg)
    else:
        raise UserError(msg)


def _patient_strata(df: pd.DataFrame, target: str) -> pd.Series:
    # A patient with two subtypes (slide 13412: DC and LC) is stratified by its commoner one.
    return df.groupby("patient")[target].agg(lambda s: s.value_counts().index[0])


def _need_patients(strata: pd.Series, need: int, what: str, classes) -> None:
    counts = strata.value_counts().reindex(sorted(set(classes)), fill_value=0)
    if counts.min() < need:
        have = ", ".join(f"{c}: {n}" for c, n in counts.sort_index().items())
        raise UserError(
            f"Cannot stratify {what}: it needs at least {need} patients of each class, and "
            f"there are {len(strata)} patients ({have})."
        )


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
    strata = _patient_strata(df, target)
    _need_patients(strata, 3, "a train/val/test split by patient", df[target])
    n, k = len(strata), strata.nunique()
    n_test = max(k, round(test_frac * n))
    rest, test = train_test_split(
        strata.index, test_size=n_test, stratify=strata.values, random_state=seed
    )
    rest_strata = strata.loc[rest]
    n_val = max(k, round(val_frac * n))
    if len(rest) - n_val < k:
        raise UserError(
            f"Cannot stratify a train/val/test split by patient: {n} patients leave fewer than "
            f"{k} for training after val and test."
        )
    train, val = train_test_split(
        rest_strata.index, test_size=n_val, stratify=rest_strata.values, random_state=seed
    )
    side = {**{p: "train" for p in train}, **{p: "val" for p in val}, **{p: "test" for p in test}}
    return df.assign(split=df["patient"].map(side))


def cv_folds(df: pd.DataFrame, target: str, n_folds: int, seed: int, grouped: bool) -> pd.Series:
    """Fold 1..k of every image; grouped by patient unless image-level (`random`)."""
    if n_folds < 2:
        raise UserError(f"Cross-validation needs at least 2 folds, not {n_folds}.")
    fold = pd.Series(0, index=df.index, dtype=int)
    if grouped:
        strata = _patient_strata(df, target)
        _need_patients(strata, n_folds, f"{n_folds} patient-level folds", df[target])
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


def select_fold(df: pd.DataFrame, fold: int) -> pd.DataFrame:
    """Fold `fold` is validation, the others train (for a split with a `fold` column)."""
    n = int(df["fold"].max())
    if not 1 <= fold <= n:
        raise UserError(f"Fold {fold} is out of range; this split has folds 1 to {n}.")
    return df.assign(split=df["fold"].map(lambda f: "val" if f == fold else "train"))


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
    train = out[out["split"] == "train"]
    strata = _patient_strata(train, target)
    _need_patients(
        strata, 2, f"a validation set out of the train patients of fold {fold}", train[target]
    )
    n_val = max(strata.nunique(), round(val_frac * len(strata)))
    _, val = train_test_split(
        strata.index, test_size=n_val, stratify=strata.values, random_state=seed
    )
    out.loc[out["patient"].isin(val) & (out["split"] == "train"), "split"] = "val"
    # The official folds share a few slide ids between train and test: warn, do not fail.
    check_no_leakage(out, warn_only=True)
    return out


def eva_split(df: pd.DataFrame) -> pd.DataFrame:
    """eva's protocol: 40X, TA/MC/F/DC, a fixed list of validation patients, no test set."""
    if "magnification" not in df:
        raise UserError("The eva protocol is defined on BreakHis only.")
    out = df[(df["magnification"] == 40) & df["subtype"].isin(EVA_CLASSES)].reset_index(drop=True)
    if out.empty:
        raise UserError("No 40X images of classes TA, MC, F or DC: the eva protocol has nothing.")
    return out.assign(
        split=out["patient"].map(lambda p: "val" if p in EVA_VAL_PATIENTS else "train")
    )


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


def make_split(
    index: pd.DataFrame,
    protocol: str = "patient",
    task: str = "binary",
    seed: int = 0,
    fold: int = 1,
    n_folds: int | None = None,
    val_frac: float = 0.15,
    test_frac: float = 0.15,
    folds_csv: str | Path | None = None,
) -> pd.DataFrame:
    """The index with a `split` column (and `fold` where there are folds), leakage-checked.

    `n_folds` with `patient` or `random` gives cross-validation (patient-level folds or
    image-level folds); `cv` is the patient protocol with 5 folds unless told otherwise.
    """
    if protocol not in PROTOCOLS:
        raise UserError(f"Unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}.")
    target = target_column(task)
    if task == "subtype" and "subtype" not in index:
        raise UserError("The subtype task needs BreakHis; IDC patches have only two classes.")
    if protocol == "eva":
        if task != "subtype":
            raise UserError("The eva protocol is the four-class subtype task; use --task subtype.")
        out = eva_split(index)
    elif protocol == "folds":
        path = folds_csv or find_folds_csv(index)
        if path is None:
            raise UserError(
                "No Folds.csv found beside the BreaKHis_v1 folder; give its path with --folds-csv."
            )
        out = official_fold_split(index, target, read_folds_csv(path), fold, seed, val_frac)
        return out
    elif protocol == "cv" or n_folds:
        grouped = protocol != "random"
        if not grouped:
            log.warning("%s", RANDOM_WARNING)
        out = index.assign(fold=cv_folds(index, target, n_folds or 5, seed, grouped))
        out = select_fold(out, fold)
        if not grouped:
            return out
        check_no_leakage(out, column="fold")
    elif protocol == "random":
        return random_split(index, target, seed, val_frac, test_frac)
    else:
        out = patient_split(index, target, seed, val_frac, test_frac)
    check_no_leakage(out)
    return out


def check_classes(df: pd.DataFrame, task: str, classes: list[str]) -> None:
    """Every class must be in train; a class absent from val or test only makes metrics NaN."""
    target = target_column(task)
    present = set(df.loc[df["split"] == "train", target])
    missing = [c for c in classes if c not in present]
    if missing:
        raise UserError(
            f"Class(es) {', '.join(missing)} have no training image in this split; choose a "
            "task, magnification or protocol that keeps every class in training."
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


SPLIT_COLUMNS = ["relpath", "split", "fold"]


def write_split(df: pd.DataFrame, path: str | Path) -> None:
    cols = [c for c in SPLIT_COLUMNS if c in df]
    out = df[cols].rename(columns={"relpath": "path"})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(path, index=False)


def read_split(path: str | Path, index: pd.DataFrame) -> pd.DataFrame:
    """Apply a split written by `write_split` to an index, matching rows by relative path."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Split file {path} does not exist.")
    split = pd.read_csv(path)
    if not {"path", "split"} <= set(split.columns):
        raise UserError(f"Split file {path} needs the columns path and split.")
    merged = index.drop(columns=["split", "fold"], errors="ignore").merge(
        split.rename(columns={"path": "relpath"}), on="relpath", how="inner"
    )
    if len(merged) < len(split):
        log.warning("%d row(s) of %s match no indexed image.", len(split) - len(merged), path)
    if merged.empty:
        raise UserError(f"No row of split file {path} matches an image under the data folder.")
    return merged
