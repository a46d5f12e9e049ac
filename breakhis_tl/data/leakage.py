"""The leakage checks every split goes through: by patient, and by picture.

A patient seen in training makes a test score a measure of memory, not of generalisation. The
same picture saved twice under two names (BreakHis slide 13412: a DC and an LC folder of
pixel-identical images) is the same leak at the level of pixels, and it hides from a check by
patient key whenever the two copies carry different keys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pandas as pd

from breakhis_tl.errors import UserError

log = logging.getLogger(__name__)


def shared_patients(df: pd.DataFrame, column: str = "split") -> list[str]:
    groups = df.groupby("patient")[column].nunique()
    return sorted(groups[groups > 1].index)


def check_no_leakage(df: pd.DataFrame, column: str = "split", warn_only: bool = False) -> list:
    """Raise (or warn) if any patient has images in two groups of `column`; return them."""
    shared = shared_patients(df, column)
    if not shared:
        return []
    msg = (
        f"{len(shared)} patient(s) have images on more than one side of the {column!r} split "
        f"({', '.join(shared[:8])}{' ...' if len(shared) > 8 else ''})."
    )
    if not warn_only:
        raise UserError(msg)
    log.warning("%s", msg)
    return shared


@dataclass
class Twins:
    """Pixel-identical images of one split: across its sides, and under two labels."""

    across: list[tuple[str, str, str, str]] = field(default_factory=list)  # a, side, b, side
    relabelled: list[tuple[str, str, str, str]] = field(default_factory=list)  # a, y, b, y
    test_with_train_twin: int = 0  # held-out images whose picture is also in train

    def lines(self, limit: int = 5) -> list[str]:
        out = []
        if self.across:
            shown = "; ".join(f"{a} ({sa}) = {b} ({sb})" for a, sa, b, sb in self.across[:limit])
            more = " ..." if len(self.across) > limit else ""
            out.append(
                f"{len(self.across)} pixel-identical pair(s) lie on two sides of the split: "
                f"{shown}{more}."
            )
        if self.relabelled:
            shown = "; ".join(
                f"{a} ({ya}) = {b} ({yb})" for a, ya, b, yb in self.relabelled[:limit]
            )
            more = " ..." if len(self.relabelled) > limit else ""
            out.append(
                f"{len(self.relabelled)} pixel-identical pair(s) carry two labels: {shown}{more}."
            )
        return out


def find_twins(df: pd.DataFrame, target: str, column: str = "split") -> Twins:
    """Pairs of images in `df` with the same `pixel` hash, by side and by label."""
    twins = Twins()
    if "pixel" not in df:
        return twins
    named = df.dropna(subset=["pixel"])
    for _, group in named.groupby("pixel", sort=True):
        if group["relpath"].nunique() < 2:
            continue
        rows = group.drop_duplicates("relpath").to_dict("records")
        for i, a in enumerate(rows):
            for b in rows[i + 1 :]:
                name_a, name_b = a["filename"], b["filename"]
                if a[column] != b[column]:
                    twins.across.append((name_a, a[column], name_b, b[column]))
                if a[target] != b[target]:
                    twins.relabelled.append((name_a, a[target], name_b, b[target]))
    train = set(named.loc[named[column] == "train", "pixel"])
    held = named[named[column].isin(["test", "val"]) & named["pixel"].isin(train)]
    twins.test_with_train_twin = int((held[column] == "test").sum())
    return twins


def check_twins(df: pd.DataFrame, target: str, protocol: str) -> Twins:
    """Report twins; across sides they stop a patient-disjoint protocol, since the patient
    key should have joined them. The official folds and `random` only warn."""
    twins = find_twins(df, target)
    lines = twins.lines()
    if twins.across and protocol not in ("folds", "random"):
        raise UserError(lines[0] + " Group them (e.g. --group-by accession) or remove one copy.")
    for line in lines:
        log.warning("%s", line)
    return twins


def leakage_line(protocol: str, shared: list, twins: Twins) -> str:
    """What is true of a split, in one sentence: never "passed" after a warning."""
    parts = []
    if protocol == "random":
        parts.append("skipped by patient: the random protocol shares patients on purpose")
    elif shared:
        parts.append(
            f"{len(shared)} patient(s) are on two sides ({', '.join(shared[:5])}); the "
            f"{protocol} protocol defines it so, and it is reported, not fixed"
        )
    else:
        parts.append("no patient is on two sides")
    if twins.across:
        parts.append(
            f"{len(twins.across)} pixel-identical pair(s) on two sides "
            f"({twins.test_with_train_twin} test image(s) with a twin in train)"
        )
    elif protocol != "random":
        parts.append("no pixel-identical image on two sides")
    if twins.relabelled:
        parts.append(f"{len(twins.relabelled)} pixel-identical pair(s) under two labels")
    return "; ".join(parts) + "."


def describe_split(split: pd.DataFrame, target: str, protocol: str, store) -> str:
    """The leakage sentence of one fold, with its pixel hashes from `store` (an ImageStore)."""
    pixels = store.pixel_hashes(split["path"].tolist())
    twins = find_twins(split.assign(pixel=pixels), target)
    return leakage_line(protocol, shared_patients(split), twins)
