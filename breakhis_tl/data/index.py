"""Image indexes of BreakHis and IDC, built from file names alone.

Every fact a split needs (label, subtype, magnification, patient) is in a BreakHis file name,
so the index never opens an image: indexing 7,909 files takes well under a second.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pandas as pd

from breakhis_tl.errors import UserError

log = logging.getLogger(__name__)

DATASETS = ("breakhis", "idc")
IMAGE_SUFFIXES = {".png"}

# Subtype codes in the order of Spanhol et al.: four benign, then four malignant.
SUBTYPES = {
    "A": "adenosis",
    "F": "fibroadenoma",
    "PT": "phyllodes_tumor",
    "TA": "tubular_adenoma",
    "DC": "ductal_carcinoma",
    "LC": "lobular_carcinoma",
    "MC": "mucinous_carcinoma",
    "PC": "papillary_carcinoma",
}
BENIGN_SUBTYPES = ("A", "F", "PT", "TA")
MAGNIFICATIONS = (40, 100, 200, 400)
BREAKHIS_CLASSES = ("benign", "malignant")
IDC_CLASSES = ("non_idc", "idc")

# SOB_<B|M>_<subtype>-<year>-<slide>-<magnification>-<sequence>.png
BREAKHIS_NAME = re.compile(
    r"^SOB_(?P<bm>[BM])_(?P<subtype>[A-Z]+)-(?P<year>\d+)-(?P<slide>[0-9A-Z]+)"
    r"-(?P<mag>\d+)-(?P<seq>\d+)\.png$",
    re.IGNORECASE,
)
# <patient>_idx5_x<X>_y<Y>_class<0|1>.png
IDC_NAME = re.compile(
    r"^(?P<patient>\d+)_idx5_x(?P<x>\d+)_y(?P<y>\d+)_class(?P<cls>[01])\.png$", re.IGNORECASE
)


def accession_of(slide: str) -> str:
    """A BreakHis slide id's accession number (its leading digits): slides such as 22549AB,
    22549CD and 22549G may come from one patient. A key without digits stays itself."""
    m = re.match(r"\d+", slide)
    return m[0] if m else slide


def image_files(root: Path, suffixes: set[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Image files under `root`, in path order, through linked subfolders too (a dataset
    assembled from links, one per patient, is common; `Path.rglob` does not follow them)."""
    return [Path(p) for p in _walk(str(root), suffixes)]


def _walk(root: str, suffixes: set[str]) -> list[str]:
    """`image_files` as strings (Path objects cost seconds at IDC's size). The real folders
    come first and each linked one after them in name order, so a folder reached both ways is
    listed by its real path, the same on every machine; a link to a folder seen already, or
    to one holding the root, is not followed."""
    seen, out, todo, links = set(), [], [root], []
    top = os.path.join(os.path.realpath(root), "")
    while todo or links:
        if not todo:
            links.sort(key=lambda p: p.split(os.sep))
        folder = todo.pop() if todo else links.pop(0)
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as entries:
                for e in entries:
                    if not e.is_dir():
                        if os.path.splitext(e.name)[1].lower() in suffixes and e.is_file():
                            out.append(e.path)
                    elif not e.is_symlink():
                        todo.append(e.path)
                    elif not top.startswith(os.path.join(os.path.realpath(e.path), "")):
                        links.append(e.path)
        except OSError as exc:
            log.warning("Folder %s could not be read (%s); its images are left out.", folder, exc)
    out.sort(key=lambda p: p.split(os.sep))  # Path order: part by part
    return out


def _image_files(root: Path) -> list[str]:
    if not root.exists():
        raise UserError(f"Data folder {root} does not exist.")
    if not root.is_dir():
        raise UserError(f"Data path {root} is not a folder.")
    files = _walk(str(root), IMAGE_SUFFIXES)
    if not files:
        raise UserError(
            f"No PNG images found under {root}; point --data at the folder holding the dataset."
        )
    return files


def data_roots(data: str | Path) -> tuple[Path, Path]:
    """The data folder as the user named it (absolute, links kept: the paths they are shown)
    and as it really lies (links resolved: where the keys come from). Keys from the named
    form would change with the link a folder is reached through, and a split file written
    one way would then match nothing read the other way."""
    root = Path(data).expanduser().absolute()
    return root, root.resolve()


def file_key(path: str, root: Path, real: Path) -> str:
    """The key of a file found under `root` (a path string beginning with it): its path
    from `BreaKHis_v1/` on when the resolved path has one (split files and Folds.csv then
    match anywhere), else from the resolved folder; the same key through any link to the
    data (root's `data_roots`)."""
    rel = path[len(str(root)) :].lstrip(os.sep).split(os.sep)
    parts = [*real.parts, *rel]
    if "BreaKHis_v1" in parts:
        return "/".join(parts[parts.index("BreaKHis_v1") :])
    return "/".join(rel)


def _report_unparsed(bad: list[str], dataset: str) -> None:
    if bad:
        names = ", ".join(map(os.path.basename, bad[:5])) + (" ..." if len(bad) > 5 else "")
        log.warning(
            "%d PNG file(s) do not follow the %s naming and were left out: %s",
            len(bad),
            dataset,
            names,
        )


def _mostly(files: list[str], pattern: re.Pattern) -> bool:
    """Whether most files are named like the other dataset: the error then names the fix."""
    return sum(bool(pattern.match(os.path.basename(p))) for p in files) * 2 > len(files)


def index_breakhis(data: str | Path) -> pd.DataFrame:
    """Index BreakHis from the archive layout; `data` may be above, at or below `BreaKHis_v1`.

    The patient key is the slide id (third `-` field of the file name). Slide 13412 has a DC
    and an LC folder; grouping by slide id keeps both on the same side of every split.
    """
    root, real = data_roots(data)
    rows, bad = [], []
    for path in _image_files(root):
        name = os.path.basename(path)
        m = BREAKHIS_NAME.match(name)
        code = m["subtype"].upper() if m else None
        if not m or code not in SUBTYPES or int(m["mag"]) not in MAGNIFICATIONS:
            bad.append(path)
            continue
        benign = m["bm"].upper() == "B"
        if benign != (code in BENIGN_SUBTYPES):
            bad.append(path)
            continue
        rows.append(
            {
                "path": path,
                "relpath": file_key(path, root, real),
                "filename": name,
                "label": "benign" if benign else "malignant",
                "subtype": code,
                "subtype_name": SUBTYPES[code],
                "magnification": int(m["mag"]),
                "patient": m["slide"].upper(),
                "slide": m["slide"].upper(),
                "slide_folder": os.path.basename(os.path.dirname(os.path.dirname(path))),
            }
        )
    _report_unparsed(bad, "BreakHis")
    if not rows:
        hint = (
            "these look like IDC patches; add --dataset idc."
            if _mostly(bad, IDC_NAME)
            else "is this the BreakHis folder?"
        )
        raise UserError(
            f"No BreakHis images found under {root}: {len(bad)} PNG file(s), none named "
            f"SOB_<B|M>_<subtype>-<yy>-<slide>-<mag>-<seq>.png; {hint}"
        )
    return pd.DataFrame(rows)


def index_idc(data: str | Path) -> pd.DataFrame:
    """Index IDC patches from the Kaggle layout `<patient>/<0|1>/<name>.png`.

    The label comes from the file name; a patch whose class folder disagrees is left out
    and reported, since one of the two is wrong and we cannot tell which.
    """
    root, real = data_roots(data)
    rows, bad, mismatched = [], [], []
    for path in _image_files(root):
        name, folder = os.path.basename(path), os.path.basename(os.path.dirname(path))
        m = IDC_NAME.match(name)
        if not m:
            bad.append(path)
            continue
        if folder in ("0", "1") and folder != m["cls"]:
            mismatched.append(path)
            continue
        rows.append(
            {
                "path": path,
                "relpath": file_key(path, root, real),
                "filename": name,
                "label": IDC_CLASSES[int(m["cls"])],
                "patient": m["patient"],
                "slide": m["patient"],
                "x": int(m["x"]),
                "y": int(m["y"]),
            }
        )
    _report_unparsed(bad, "IDC")
    if mismatched:
        log.warning(
            "%d IDC patch(es) sit in a class folder that disagrees with their name and were "
            "left out: %s",
            len(mismatched),
            ", ".join(os.path.basename(p) for p in mismatched[:5]),
        )
    if not rows:
        hint = (
            "these look like BreakHis images; leave out --dataset idc."
            if _mostly(bad, BREAKHIS_NAME)
            else "is this the IDC folder?"
        )
        raise UserError(
            f"No IDC patches found under {root}: {len(bad)} PNG file(s), none named "
            f"<patient>_idx5_x<X>_y<Y>_class<0|1>.png; {hint}"
        )
    return pd.DataFrame(rows)


def build_index(data: str | Path, dataset: str = "breakhis") -> pd.DataFrame:
    if dataset == "breakhis":
        return index_breakhis(data)
    if dataset == "idc":
        return index_idc(data)
    raise UserError(f"Unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}.")


def parse_magnification(value: str | None) -> list[int] | None:
    """`all` or `40X,200X` (the X optional) to a list of magnifications, None meaning all."""
    if value is None or value.strip().lower() in ("", "all"):
        return None
    mags = []
    for part in value.split(","):
        text = part.strip().upper().removesuffix("X")
        if not text.isdigit() or int(text) not in MAGNIFICATIONS:
            raise UserError(
                f"Unknown magnification {part.strip()!r}; use all or a list of "
                "40X, 100X, 200X, 400X."
            )
        mags.append(int(text))
    return sorted(set(mags))


def filter_magnification(index: pd.DataFrame, mags: list[int] | None) -> pd.DataFrame:
    if mags is None:
        return index
    if "magnification" not in index:
        raise UserError("--magnification applies to BreakHis only; IDC patches have none.")
    out = index[index["magnification"].isin(mags)].reset_index(drop=True)
    if out.empty:
        raise UserError(f"No images at magnification {', '.join(f'{m}X' for m in mags)}.")
    return out


def index_tables(index: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The tables a reader checks against the published counts, as DataFrames."""
    tables = {}
    if "magnification" in index:
        table = pd.crosstab(
            index["label"],
            index["magnification"].map(lambda m: f"{m}X"),
            margins=True,
            margins_name="total",
        )
        cols = [f"{m}X" for m in MAGNIFICATIONS if f"{m}X" in table.columns] + ["total"]
        tables["Images by label and magnification"] = table[cols]
        sub = (
            index.groupby(["label", "subtype", "subtype_name"])
            .agg(
                images=("path", "size"),
                patients=("patient", "nunique"),
                slide_folders=("slide_folder", "nunique"),
            )
            .reset_index()
        )
        order = {c: i for i, c in enumerate(SUBTYPES)}
        tables["Subtypes"] = sub.sort_values("subtype", key=lambda s: s.map(order))
    tables["Images and patients by label"] = index.groupby("label").agg(
        images=("path", "size"), patients=("patient", "nunique")
    )
    return tables


def summary(index: pd.DataFrame) -> str:
    lines = [f"{len(index)} images, {index['patient'].nunique()} patients"]
    for title, table in index_tables(index).items():
        lines += ["", f"{title}:", table.to_string(index=title != "Subtypes")]
    if "slide_folder" in index:
        lines += ["", f"Slide folders: {index['slide_folder'].nunique()}"]
    return "\n".join(lines)


def patient_of(name: str, dataset: str | None = None) -> str | None:
    """Patient (slide) id from a BreakHis or IDC file name (of `dataset` only, if given: a
    BreakHis slide and an IDC patient can share digits); None for other names."""
    base = Path(name).name
    m = BREAKHIS_NAME.match(base) if dataset in (None, "breakhis") else None
    if m:
        return m["slide"].upper()
    m = IDC_NAME.match(base) if dataset in (None, "idc") else None
    return m["patient"] if m else None
