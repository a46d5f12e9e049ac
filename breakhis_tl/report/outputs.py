"""A run's files: where they go, written atomically, and never mixed with an older run's.

Every file is written to a temporary name and renamed, so a killed run leaves complete
files or none. A run name already in use is refused unless `--overwrite`, which replaces the
run's three folders whole: an analysis that globs a run's heads never sees a stale one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd

from breakhis_tl.errors import UserError

KINDS = {"models": "trained_models", "logs": "summary_writers", "graphs": "validation_graphs"}


def run_folders(out: str | Path, run: str) -> dict[str, Path]:
    return {k: Path(out) / sub / run for k, sub in KINDS.items()}


def check_run_name(folders: dict[str, Path], overwrite: bool) -> None:
    """Up front, before any work: a used name is refused, or marked for replacement."""
    used = [f for f in folders.values() if f.exists() and any(f.iterdir())]
    if used and not overwrite:
        raise UserError(
            f"Run name {used[0].name!r} is already used ({used[0]}); choose another --run, "
            "or pass --overwrite to replace that run whole."
        )
    for f in folders.values():
        _check_writable(f)


def check_writable(folder: Path, what: str = "Output folder") -> None:
    """Up front, in one sentence: a folder under a file, or where nothing can be created
    (/proc, a read-only mount, no permission). Checked by making and removing an empty
    probe folder in the nearest existing parent, since permission bits alone do not tell
    (root passes them on /proc), and a failed run must leave no empty folders behind."""
    import tempfile

    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{what} {folder} cannot be created: {probe} is a file, not a folder.")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".breakhis_tl_probe_", dir=probe))
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise UserError(f"{what} {folder} cannot be created in {probe} ({reason}).") from None


_check_writable = check_writable


def open_run_folders(folders: dict[str, Path], overwrite: bool) -> dict[Path, bool]:
    """Called when training starts: replace an older run of that name, then create. Returns,
    for each folder this attempt owns, whether it made it (True) or found it empty (False):
    what `discard_attempt` may undo when the run is aborted. A folder that held a run before
    (replaced under --overwrite) is not listed, so an abort never deletes it."""
    owned = {}
    for f in folders.values():
        if f.exists() and not (f.is_dir() and not any(f.iterdir())):
            if overwrite:
                shutil.rmtree(f)
        else:
            owned[f] = not f.exists()
        try:
            f.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"Output folder {f} cannot be written ({exc.strerror}).") from None
    return owned


def discard_attempt(owned: dict[Path, bool]) -> None:
    """After an abort (a second Ctrl-C, an error): remove what this attempt wrote to the run
    folders it owns (`open_run_folders`), so a split.csv or a partial TensorBoard log does
    not make the same command be refused as a used run name. A folder it made goes; one it
    found empty is emptied and kept. The feature cache lies elsewhere and is kept."""
    for folder, made in owned.items():
        if made:
            shutil.rmtree(folder, ignore_errors=True)
            continue
        for child in folder.iterdir() if folder.is_dir() else ():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


def atomic_csv(df: pd.DataFrame, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


def atomic_json(obj: dict, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)
    return path


def default_run_name() -> str:
    return time.strftime("%Y%m%d-%H%M%S")
