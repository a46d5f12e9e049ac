"""Fetching and unpacking the BreakHis archive: resumable, and safe against hostile archives."""

from __future__ import annotations

import logging
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from breakhis_tl.errors import UserError

log = logging.getLogger(__name__)

BREAKHIS_URL = "http://www.inf.ufpr.br/vri/databases/BreaKHis_v1.tar.gz"
ARCHIVE_NAME = "BreaKHis_v1.tar.gz"
BREAKHIS_IMAGES = 7909
CHUNK = 1 << 20


def fetch(url: str, dest: Path, timeout: float = 30.0) -> Path:
    """Download `url` to `dest`, resuming a `.part` file where the server honours Range."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the part file already holds everything
            part.replace(dest)
            return dest
        raise UserError(_offline(url, dest, f"the server answered {exc.code}")) from None
    except (urllib.error.URLError, OSError) as exc:
        raise UserError(_offline(url, dest, str(getattr(exc, "reason", exc)))) from None
    with response:
        resumed = have and getattr(response, "status", 200) == 206
        if have and not resumed:
            log.info("The server does not resume downloads; starting %s again.", dest.name)
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        with (
            open(part, "ab" if resumed else "wb") as out,
            tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=dest.name) as bar,
        ):
            try:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
            except (OSError, urllib.error.URLError) as exc:
                raise UserError(
                    f"The download of {url} broke off ({exc}); run the same command again to "
                    f"resume from {part}."
                ) from None
    if total is not None and part.stat().st_size != total:
        raise UserError(
            f"The download of {url} stopped at {part.stat().st_size} of {total} bytes; run the "
            "same command again to resume."
        )
    part.replace(dest)
    return dest


def _offline(url: str, dest: Path, why: str) -> str:
    return (
        f"Could not download {url} ({why}); download {ARCHIVE_NAME} by hand and put it at "
        f"{dest}, then run the command again."
    )


def safe_extract(archive: Path, to: Path) -> None:
    """Check every member before writing anything: absolute paths, `..` and links that leave
    `to` refuse the whole archive (the standard library's `data` filter does the checking)."""
    to.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for m in members:
                try:
                    if m.name.startswith(("/", "\\")) or (len(m.name) > 1 and m.name[1] == ":"):
                        # the data filter would strip the slash; an absolute member is refused
                        raise tarfile.AbsolutePathError(m)
                    tarfile.data_filter(m, str(to))
                except tarfile.FilterError as exc:
                    raise UserError(
                        f"Archive {archive} is refused: member {m.name!r} would be written "
                        f"outside {to} ({type(exc).__name__})."
                    ) from None
            tar.extractall(to, members=members, filter="data")
    except (tarfile.ReadError, EOFError, OSError) as exc:
        raise UserError(f"Archive {archive} is not a readable tar archive ({exc}).") from None


def count_pngs(root: Path) -> int:
    return sum(1 for p in root.rglob("*.png") if p.is_file())


def download_breakhis(
    to: str | Path = "data", url: str = BREAKHIS_URL, expected: int = BREAKHIS_IMAGES
) -> Path:
    """Fetch, extract and check the archive; returns the folder holding `BreaKHis_v1`.

    A complete archive already at `<to>/BreaKHis_v1.tar.gz` (put there by hand) is used as is.
    """
    to = Path(to)
    try:
        to.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"Cannot create the data folder {to} ({exc.strerror}).") from None
    target = to / "BreaKHis_v1"
    if target.is_dir() and count_pngs(target) == expected:
        log.info("BreakHis is already in %s.", target)
        return to
    archive = to / ARCHIVE_NAME
    if not archive.is_file():
        fetch(url, archive)
    staging = to / ".extracting"
    shutil.rmtree(staging, ignore_errors=True)
    safe_extract(archive, staging)
    found = count_pngs(staging)
    if found != expected:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(
            f"Archive {archive} holds {found} PNG images, not the {expected} of BreakHis; delete "
            "it and download it again."
        )
    extracted = next(staging.rglob("BreaKHis_v1"), None) or staging
    shutil.rmtree(target, ignore_errors=True)
    extracted.replace(target)
    shutil.rmtree(staging, ignore_errors=True)
    log.info("BreakHis is ready in %s: %d images.", target, found)
    return to
