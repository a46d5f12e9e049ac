"""Fetching and unpacking the BreakHis archive: several sources tried in order, resumable,
verified against a recorded sha256, and safe against hostile archives."""

from __future__ import annotations

import hashlib
import http.client
import logging
import re
import shutil
import tarfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from tqdm.auto import tqdm

from breakhis_tl.data.identity import file_hasher
from breakhis_tl.errors import UserError

log = logging.getLogger(__name__)

BREAKHIS_URL = "http://www.inf.ufpr.br/vri/databases/BreaKHis_v1.tar.gz"
# Sources tried in order. Zenodo record 1214456 is NOT a BreakHis mirror: it holds Kather's
# colorectal sets (NCT-CRC-HE-100K.zip, CRC-VAL-HE-7K.zip), which eva's CRC class downloads
# (kaiko-ai/eva, src/eva/vision/data/datasets/classification/crc.py); eva's BreaKHis class
# lists only the authors' URL above (same repository, .../classification/breakhis.py). No
# other copy could be verified, so none is listed; `urls=` (and the CLI) take any others.
BREAKHIS_URLS: tuple[str, ...] = (BREAKHIS_URL,)
ARCHIVE_NAME = "BreaKHis_v1.tar.gz"
BREAKHIS_IMAGES = 7909
CHUNK = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


class SourceError(UserError):
    """One source could not give a good archive; the message is a short clause saying why,
    so that several can be joined into the one sentence shown when every source fails."""


def _part_paths(dest: Path) -> tuple[Path, Path]:
    """The partial download and the sidecar naming the URL its bytes came from."""
    part = dest.with_name(dest.name + ".part")
    return part, part.with_name(part.name + ".source")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def fetch(url: str, dest: Path, timeout: float = 30.0) -> str:
    """Download `url` to `dest` and return the file's sha256 (hex).

    A `.part` file is resumed where the server honours Range, but only if it came from this
    same URL: two servers may serve different bytes, and splicing them makes a corrupt
    archive. The hash is taken while downloading, so a 4 GB archive is read once; a resumed
    download first hashes the bytes it already has, so the digest covers the whole file.
    Failures raise `SourceError` with a short reason, so the caller can try the next source.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part, source = _part_paths(dest)
    have = part.stat().st_size if part.is_file() else 0
    came_from = _read_text(source) if have else None
    if have and came_from != url:
        log.info("%s came from %s, not %s: starting it again.", part.name, came_from, url)
        have = 0  # the part file is only overwritten once this source answers
    response = _open(url, have, timeout)
    if response is None:  # 416: the part file already holds everything
        hasher = file_hasher(part)
    else:
        with response:
            resumed = have > 0 and getattr(response, "status", 200) == 206
            if have and not resumed:
                log.info("%s does not resume downloads; starting %s again.", url, dest.name)
            hasher = file_hasher(part) if resumed else hashlib.sha256()
            length = response.headers.get("Content-Length")
            total = (have if resumed else 0) + int(length) if length and length.isdigit() else None
            with open(part, "ab" if resumed else "wb") as out:
                if not resumed:
                    source.write_text(url + "\n")
                _copy(response, out, hasher, total, dest.name)
        size = part.stat().st_size
        if total is not None and size != total:
            raise SourceError(f"the download stopped at {size} of {total} bytes")
    part.replace(dest)
    source.unlink(missing_ok=True)
    return hasher.hexdigest()


def _open(url: str, have: int, timeout: float):
    """The server's response, or None when it says (416) that `have` bytes are all there is."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            return None
        raise SourceError(f"the server answered {exc.code}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SourceError(f"the connection failed ({str(reason) or type(exc).__name__})") from None


def _copy(response, out: BinaryIO, hasher, total: int | None, name: str) -> None:
    """Stream the body into `out`, hashing as it goes; a broken connection keeps the part."""
    initial = out.tell()
    with tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=name) as bar:
        try:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                hasher.update(chunk)
                bar.update(len(chunk))
        except (OSError, urllib.error.URLError, http.client.HTTPException) as exc:
            raise SourceError(
                f"the download broke off ({str(exc) or type(exc).__name__})"
            ) from None


def sha256_path(archive: Path) -> Path:
    """Where the archive's digest is recorded: `<archive>.sha256`, in sha256sum's format."""
    return archive.with_name(archive.name + ".sha256")


def read_recorded_sha256(archive: Path) -> str | None:
    """The digest recorded after the first good download, or None when there is none yet."""
    path = sha256_path(archive)
    if not path.is_file():
        return None
    fields = (_read_text(path) or "").split()
    if not fields or not _HEX64.fullmatch(fields[0].lower()):
        raise UserError(
            f"{path} does not start with a sha256 digest; delete it (the next good download "
            "records it again)."
        )
    return fields[0].lower()


def _record_sha256(archive: Path, digest: str) -> None:
    path = sha256_path(archive)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{digest}  {archive.name}\n")
    tmp.replace(path)
    log.info("Recorded the sha256 of %s in %s.", archive.name, path)


def _check_digest(archive: Path, digest: str, recorded: str | None) -> None:
    if recorded is not None and digest != recorded:
        raise SourceError(
            f"{archive} has sha256 {digest}, not the {recorded} recorded in "
            f"{sha256_path(archive)}, so nothing was extracted"
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
        why = " ".join(str(exc).split())  # tarfile's reasons can span lines; keep one sentence
        raise UserError(f"Archive {archive} is not a readable tar archive ({why}).") from None


def count_pngs(root: Path) -> int:
    return sum(1 for p in root.rglob("*.png") if p.is_file())


def _install(archive: Path, to: Path, expected: int) -> int:
    """Extract into a staging folder, count, and only then replace `<to>/BreaKHis_v1`, so a
    bad archive never leaves a half-written dataset behind."""
    staging = to / ".extracting"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        safe_extract(archive, staging)
        found = count_pngs(staging)
        if found != expected:
            raise SourceError(
                f"Archive {archive} holds {found} PNG images, not the {expected} of BreakHis"
            )
        target = to / "BreaKHis_v1"
        extracted = next(staging.rglob("BreaKHis_v1"), None) or staging
        shutil.rmtree(target, ignore_errors=True)
        extracted.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("BreakHis is ready in %s: %d images.", target, found)
    return found


def _from_sources(urls: Sequence[str], archive: Path, expected: int, recorded: str | None) -> str:
    """Try each source in turn until one gives an archive that verifies, extracts and counts;
    returns its sha256. A bad downloaded archive is deleted, so a rerun downloads it again."""
    failures = []
    for url in urls:
        try:
            digest = fetch(url, archive)
            _check_digest(archive, digest, recorded)
            _install(archive, archive.parent, expected)
            return digest
        except UserError as exc:
            why = str(exc).rstrip(".")
            log.warning("Source %s failed: %s.", url, why)
            failures.append(f"{url}: {why}")
            archive.unlink(missing_ok=True)
    part = _part_paths(archive)[0]
    resume = f" (the partial download {part} resumes then)" if part.is_file() else ""
    raise UserError(
        f"Could not download {ARCHIVE_NAME} from any of {len(failures)} source(s) "
        f"({'; '.join(failures)}); download {ARCHIVE_NAME} by hand and put it at {archive}, "
        f"then run the command again{resume}."
    )


def _from_local(archive: Path, expected: int, recorded: str | None) -> str:
    """Use an archive already there (put by hand, or kept from an earlier download) as is:
    verified against the recorded digest first, and never deleted, since it is the user's."""
    digest = file_hasher(archive).hexdigest()
    try:
        _check_digest(archive, digest, recorded)
    except SourceError:
        raise UserError(
            f"Archive {archive} is refused: its sha256 is {digest}, not the {recorded} "
            f"recorded in {sha256_path(archive)}, so nothing was extracted (delete the archive "
            "to download it again, or the .sha256 file if it was replaced on purpose)."
        ) from None
    try:
        _install(archive, archive.parent, expected)
    except SourceError as exc:
        raise UserError(f"{exc}; delete it and download it again.") from None
    return digest


def download_breakhis(
    to: str | Path = "data",
    urls: str | Sequence[str] = BREAKHIS_URLS,
    expected: int = BREAKHIS_IMAGES,
) -> Path:
    """Fetch, verify, extract and check the archive; returns the folder holding `BreaKHis_v1`.

    `urls` are tried in order (one string is one source). A complete archive already at
    `<to>/BreaKHis_v1.tar.gz` (put there by hand) is used instead of downloading. The first
    good archive's sha256 is written to `<to>/BreaKHis_v1.tar.gz.sha256`; from then on any
    archive, downloaded or put there by hand, must match it before anything is extracted.
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
    recorded = read_recorded_sha256(archive)
    if archive.is_file():
        digest = _from_local(archive, expected, recorded)
    else:
        sources = [urls] if isinstance(urls, str) else list(urls)
        if not sources:
            raise UserError(f"No download source given for {ARCHIVE_NAME}.")
        digest = _from_sources(sources, archive, expected, recorded)
    if recorded is None:
        _record_sha256(archive, digest)
    return to
