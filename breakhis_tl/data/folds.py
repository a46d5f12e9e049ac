"""The one place where options (or a split file) become the folds a run trains on.

`split` and `train` both call `plan_folds`. A split file is validated like a split made now:
one row per image per fold, the protocol and patient key it was written with stored in it,
and the leakage check on every fold it yields.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from breakhis_tl.data.leakage import check_no_leakage
from breakhis_tl.data.splits import PROTOCOLS, RANDOM_WARNING, apply_group_by, make_split
from breakhis_tl.errors import UserError

log = logging.getLogger(__name__)

SPLIT_COLUMNS = ["relpath", "split", "fold", "protocol", "group_by"]


@dataclass
class SplitOptions:
    protocol: str | None = None  # None: the split file's, else patient
    task: str = "binary"
    seed: int = 0
    fold: str | int | None = None  # K, "all", or None (cv/file: all folds; folds: fold 1)
    cv: int | None = None  # k folds for patient/cv (grouped) or random (image-level)
    val_frac: float = 0.15
    test_frac: float = 0.15
    folds_csv: str | None = None
    split_file: str | None = None
    group_by: str | None = None  # None: the split file's, else slide
    eva_holdout: bool = False


@dataclass
class Plan:
    protocol: str
    group_by: str
    folds: list[tuple[int | None, pd.DataFrame]]  # (fold or None, index with split column)


def check_options(o: SplitOptions) -> None:
    """Combinations that mean nothing are refused before any work."""
    if o.protocol is not None and o.protocol not in PROTOCOLS:
        raise UserError(f"Unknown protocol {o.protocol!r}; choose one of: {', '.join(PROTOCOLS)}.")
    if o.cv is not None and o.protocol in ("eva", "folds"):
        raise UserError(
            f"--cv does not apply to the {o.protocol} protocol, whose folds are fixed; "
            "leave --cv out or use --protocol cv."
        )
    if o.eva_holdout and o.protocol != "eva":
        raise UserError("--eva-holdout applies to --protocol eva only.")
    if o.fold is not None and o.fold != "all" and not str(o.fold).isdigit():
        raise UserError(f"--fold must be a fold number or all, not {o.fold!r}.")


def plan_folds(index: pd.DataFrame, o: SplitOptions) -> Plan:
    """(fold, split) pairs to train on: one for a plain split, several for folds."""
    check_options(o)
    if o.split_file:
        return _plan_from_file(index, o)
    protocol, group_by = o.protocol or "patient", o.group_by or "slide"
    index = apply_group_by(index, group_by)
    kw = dict(
        protocol=protocol, task=o.task, seed=o.seed, val_frac=o.val_frac, test_frac=o.test_frac,
        folds_csv=o.folds_csv, eva_holdout=o.eva_holdout,
    )  # fmt: skip
    wanted = None if o.fold in (None, "all") else int(o.fold)
    if protocol in ("eva", "patient", "random") and not o.cv:
        if wanted is not None:
            raise UserError(f"--fold applies to cv, folds or --cv runs, not to {protocol}.")
        return Plan(protocol, group_by, [(None, make_split(index, **kw))])
    if protocol == "folds":
        ks = range(1, 6) if o.fold == "all" else [wanted or 1]
    else:
        n = o.cv or 5
        if wanted is not None and not 1 <= wanted <= n:
            raise UserError(f"Fold {wanted} is out of range; this split has folds 1 to {n}.")
        ks = range(1, n + 1) if wanted is None else [wanted]
        kw["n_folds"] = n
    with _said_once(RANDOM_WARNING):  # one warning for the run, not one per fold
        parts = [(k, make_split(index, fold=k, **kw)) for k in ks]
    return Plan(protocol, group_by, parts)


@contextlib.contextmanager
def _said_once(message: str):
    """While the folds of one plan are made, `message` reaches the log once."""
    seen = []

    def once(record: logging.LogRecord) -> bool:
        if record.getMessage() != message:
            return True
        seen.append(record)
        return len(seen) == 1

    logger = logging.getLogger("breakhis_tl.data.splits")
    logger.addFilter(once)
    try:
        yield
    finally:
        logger.removeFilter(once)


def write_split(plan: Plan, path: str | Path) -> Path:
    """One row per image per fold, with the protocol and patient key it was made with."""
    frames = [f.assign(protocol=plan.protocol, group_by=plan.group_by) for _, f in plan.folds]
    df = pd.concat(frames, ignore_index=True)
    cols = [c for c in SPLIT_COLUMNS if c in df]
    out = df[cols].rename(columns={"relpath": "path"})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    out.to_csv(tmp, index=False)
    tmp.replace(path)
    return path


def read_split(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Split file {path} does not exist.")
    try:
        split = pd.read_csv(path, dtype={"path": str, "split": str, "protocol": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"Split file {path} is not a readable CSV ({exc}).") from None
    if not {"path", "split"} <= set(split.columns):
        raise UserError(f"Split file {path} needs the columns path and split.")
    bad = sorted(set(split["split"].dropna()) - {"train", "val", "test"})
    if bad or split["split"].isna().any():
        raise UserError(f"Split file {path} has split values other than train, val, test: {bad}.")
    if "fold" not in split:
        split["fold"] = pd.NA
    for col in ("protocol", "group_by"):
        values = split[col].dropna().unique() if col in split else []
        if len(values) > 1:
            raise UserError(f"Split file {path} mixes {col} values ({', '.join(values)}).")
    dup = split.duplicated(["path", "fold"])
    if dup.any():
        row = split[dup].iloc[0]
        raise UserError(
            f"Split file {path} lists {row['path']} more than once in one fold: a split has "
            "one row per image per fold."
        )
    return split


def _file_setting(split: pd.DataFrame, col: str, given: str | None, path, default: str) -> str:
    written = split[col].dropna().iloc[0] if col in split and split[col].notna().any() else None
    flag = "--" + col.replace("_", "-")
    if written and given and written != given:
        raise UserError(
            f"Split file {path} was written with {col} {written}, but {flag} {given} was "
            f"given; leave {flag} out or make the split again."
        )
    return written or given or default


def _plan_from_file(index: pd.DataFrame, o: SplitOptions) -> Plan:
    split = read_split(o.split_file)
    protocol = _file_setting(split, "protocol", o.protocol, o.split_file, "patient")
    group_by = _file_setting(split, "group_by", o.group_by, o.split_file, "slide")
    if o.cv is not None:
        raise UserError("--cv does not apply with --split-file: the folds are in the file.")
    index = apply_group_by(index, group_by)
    folds = sorted(int(f) for f in split["fold"].dropna().unique())
    if o.fold == "all" and len(folds) < 2:
        raise UserError(
            f"--fold all asks for every fold, but split file {o.split_file} holds only "
            f"{'fold ' + str(folds[0]) if folds else 'one split'}."
        )
    if o.fold not in (None, "all"):
        if int(o.fold) not in folds:
            raise UserError(
                f"Split file {o.split_file} has no fold {o.fold}; it holds "
                f"{', '.join(map(str, folds)) or 'one split without folds'}."
            )
        folds = [int(o.fold)]
    keys = folds or [None]
    base = index.drop(columns=["split", "fold"], errors="ignore")
    out = []
    for k in keys:
        part = split[split["fold"] == k] if k is not None else split
        merged = base.merge(
            part[["path", "split"]].rename(columns={"path": "relpath"}), on="relpath"
        )
        _check_file_fold(merged, part, k, protocol, o.split_file)
        out.append((k, merged.assign(fold=k if k is not None else pd.NA)))
    if protocol == "random":
        log.warning("%s", RANDOM_WARNING)
    return Plan(protocol, group_by, out)


def _check_file_fold(merged, part, k, protocol, path) -> None:
    where = f"fold {k} of split file {path}" if k is not None else f"split file {path}"
    if len(merged) < len(part):
        log.warning("%d row(s) of %s match no indexed image.", len(part) - len(merged), where)
    if merged.empty:
        raise UserError(f"No row of {where} matches an image under the data folder.")
    if not (merged["split"] == "train").any():
        raise UserError(f"{where[0].upper() + where[1:]} has no training image.")
    if protocol != "random":
        check_no_leakage(merged, warn_only=protocol in ("folds", "eva"))
