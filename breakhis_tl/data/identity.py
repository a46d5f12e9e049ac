"""What an image is, independent of where it lies: a content id and a pixel hash.

The content id (sha1 of the file's bytes) keys the feature cache, so a file changed in place
is never served stale features, whatever its size and modification time say. The pixel hash
(sha1 of the decoded RGB pixels) finds the same picture saved twice with different bytes:
BreakHis slide 13412 has a DC and an LC folder whose images are pixel-identical copies.

Both are computed once per file ever and kept in one SQLite file: content ids by file stat
(path with its folder resolved, size, mtime, ctime, inode; ctime changes on any write, even
when mtime is restored), pixel hashes by content id.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS content (path TEXT, stat TEXT, id TEXT, PRIMARY KEY (path, stat));
CREATE TABLE IF NOT EXISTS pixels (id TEXT PRIMARY KEY, hash TEXT, size TEXT);
"""


def _stat_key(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def _or_none(fn, paths: list[str]) -> list:
    """fn of each path, None where the file cannot be read."""
    out: list = []
    for p in paths:
        try:
            out.append(fn(p))
        except OSError:
            out.append(None)
    return out


class _Blocks:
    """fn over items, a block of `size` per item: a loader task per file costs more than a
    stat or a hash of a small file."""

    def __init__(self, fn, items: list, size: int) -> None:
        self.fn, self.items, self.size = fn, items, size

    def __len__(self) -> int:
        return -(-len(self.items) // self.size)

    def __getitem__(self, i: int) -> list:
        return self.fn(self.items[i * self.size : (i + 1) * self.size])


def _in_blocks(fn, items: list, workers: int | None, bar=None, size: int = 2048) -> list:
    """fn over items in loader processes (threads would queue on the GIL); in this process
    for a few blocks, or where it may start none (a daemonic pool worker)."""
    import multiprocessing

    from torch.utils.data import DataLoader

    from breakhis_tl.data.images import usable_cores

    if workers is None:
        workers = min(8, usable_cores()) if len(items) >= 4 * size else 0
    if multiprocessing.current_process().daemon:
        workers = 0
    out: list = []
    for part in DataLoader(_Blocks(fn, items, size), batch_size=None, num_workers=workers):
        out += part
        if bar is not None:
            bar.update(len(part))
    return out


def store_keys(paths: Sequence[str]) -> list[str]:
    """The paths content ids are remembered under: each file's folder resolved, so a file
    reached through a link to the data and through the real folder is one file, read once
    (the file's own name is kept: a linked file is keyed by its link, its stat by the target)."""
    real: dict[str, str] = {}
    out = []
    for p in paths:
        folder, name = os.path.split(os.fspath(p))
        if folder not in real:
            real[folder] = os.path.realpath(folder or ".")
        out.append(os.path.join(real[folder], name))
    return out


def file_hasher(path: str | Path, algorithm: str = "sha256"):
    """A hashlib object fed with the file's bytes, read in blocks (the one file hash of the
    project: content ids, weights identities, stain references, downloaded archives)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h


def sha256_file(path: str | Path) -> str:
    return file_hasher(path).hexdigest()


def content_id(path: str) -> str:
    return file_hasher(path, "sha1").hexdigest()


_stat_keys = partial(_or_none, _stat_key)  # module level: loader workers pickle them
_content_ids = partial(_or_none, content_id)


def pixel_hash(rgb: np.ndarray) -> str:
    """Same pixels, same hash, whatever the PNG encoder did with the bytes."""
    h = hashlib.sha1(str(rgb.shape).encode())
    h.update(np.ascontiguousarray(rgb).tobytes())
    return h.hexdigest()


class ImageStore:
    """Content ids and pixel hashes of image files, remembered across runs."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            if self.path is None:
                self._db = sqlite3.connect(":memory:")
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(str(self.path), timeout=60)
            self._db.executescript(SCHEMA)
        return self._db

    def content_ids(
        self, paths: Sequence[str], progress: bool = False, workers: int | None = None
    ) -> list[str | None]:
        """Content id per path (None for a missing file); only new or changed files are read,
        by `workers` loader processes (default: every core, for thousands of new files)."""
        db = self._conn()
        keys = store_keys(paths)
        known = {(p, st): i for p, st, i in db.execute("SELECT path, stat, id FROM content")}
        stats = _stat_keys(list(paths))
        out = [known.get((k, st)) if st else None for k, st in zip(keys, stats, strict=True)]
        todo = [i for i, (st, cid) in enumerate(zip(stats, out, strict=True)) if st and not cid]
        bar = tqdm(desc="content ids", unit="file", total=len(todo), disable=not progress,
                   leave=False)  # fmt: skip
        ids = _in_blocks(_content_ids, [paths[i] for i in todo], workers, bar)
        bar.close()
        new = []
        for i, cid in zip(todo, ids, strict=True):
            out[i] = cid
            if cid is not None:
                new.append((keys[i], stats[i], cid))
        if new:
            with db:
                db.executemany("INSERT OR REPLACE INTO content VALUES (?, ?, ?)", new)
        return out

    def known_pixels(self, ids: Sequence[str | None]) -> dict[str, tuple[str, str]]:
        """{content id: (pixel hash, "WxH")} of the ids already hashed."""
        db = self._conn()
        found = {}
        wanted = sorted({i for i in ids if i})
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for i, h, size in db.execute(
                f"SELECT id, hash, size FROM pixels WHERE id IN ({marks})", chunk
            ):
                found[i] = (h, size)
        return found

    def remember_pixels(self, rows: list[tuple[str, str, str]]) -> None:
        if rows:
            with self._conn() as db:
                db.executemany("INSERT OR REPLACE INTO pixels VALUES (?, ?, ?)", rows)

    def pixel_hashes(
        self, paths: Sequence[str], workers: int | None = None, progress: bool = False
    ) -> list[str | None]:
        """Pixel hash per path (None for an unreadable file); decodes only unseen files."""
        ids = self.content_ids(paths, workers=workers)
        known = self.known_pixels(ids)
        todo = [k for k, i in enumerate(ids) if i and i not in known]
        if todo:
            computed = _decode_hashes([paths[k] for k in todo], workers, progress)
            rows = [
                (ids[k], h, size)
                for k, (h, size) in zip(todo, computed, strict=True)
                if h is not None
            ]
            self.remember_pixels(rows)
            known.update({i: (h, s) for i, h, s in rows})
        return [known[i][0] if i in known else None for i in ids]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def image_pixels(im) -> tuple[str, str]:
    """(pixel hash, "WxH") of a decoded PIL image: what the store remembers of its pixels."""
    return pixel_hash(np.asarray(im)), f"{im.size[0]}x{im.size[1]}"


class _HashDataset:
    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str | None, str]:
        from breakhis_tl.data.images import ImageError, load_rgb

        try:
            im = load_rgb(self.paths[i])
        except ImageError:
            return None, ""
        return image_pixels(im)


def _decode_hashes(
    paths: list[str], workers: int | None, progress: bool
) -> list[tuple[str | None, str]]:
    from torch.utils.data import DataLoader

    from breakhis_tl.data.images import usable_cores

    # nothing else runs during this pass, so every core decodes (the loaders' default keeps
    # one for the model)
    workers = min(8, usable_cores()) if workers is None else workers
    if len(paths) < 64:
        workers = 0  # not worth starting processes for
    loader = DataLoader(
        _HashDataset(paths), batch_size=16, num_workers=workers, collate_fn=lambda b: b
    )
    out: list[tuple[str | None, str]] = []
    for batch in tqdm(loader, desc="pixel hashes", unit="batch", disable=not progress):
        out.extend(batch)
    return out
