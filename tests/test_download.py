import hashlib
import http.server
import io
import logging
import shutil
import socket
import tarfile
import threading
from pathlib import Path

import pytest

from breakhis_tl.cli import main
from breakhis_tl.data.download import (
    SourceError,
    download_breakhis,
    fetch,
    read_recorded_sha256,
    safe_extract,
)
from breakhis_tl.errors import UserError

ARCHIVE = "BreaKHis_v1.tar.gz"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tar_of(folder: Path, path: Path, change=None) -> Path:
    """A BreaKHis_v1.tar.gz of `folder`; `change(name, bytes)` may alter a member's bytes."""
    with tarfile.open(path, "w:gz") as tar:
        for f in sorted(folder.rglob("*")):
            info = tar.gettarinfo(f, arcname=f"BreaKHis_v1/{f.relative_to(folder)}")
            if f.is_file():
                data = f.read_bytes()
                data = change(f.name, data) if change else data
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


@pytest.fixture(scope="module")
def archive(tmp_path_factory, breakhis_sample) -> Path:
    """A BreaKHis_v1.tar.gz of the 14 real sample images, in the archive's layout."""
    return _tar_of(breakhis_sample / "BreaKHis_v1", tmp_path_factory.mktemp("srv") / ARCHIVE)


@pytest.fixture(scope="module")
def tampered(tmp_path_factory, breakhis_sample, archive) -> Path:
    """The same 14 PNGs with one byte appended to one of them: a valid archive that extracts
    and counts as well as the real one, so only the digest can tell them apart."""
    first = min(p.name for p in (breakhis_sample / "BreaKHis_v1").rglob("*.png"))
    path = tmp_path_factory.mktemp("bad") / ARCHIVE
    _tar_of(breakhis_sample / "BreaKHis_v1", path, lambda n, d: d + b"x" if n == first else d)
    assert path.read_bytes() != archive.read_bytes()
    return path


class FileHandler(http.server.BaseHTTPRequestHandler):
    """Serves one payload as a real server would (Range -> 206, past the end -> 416), or
    misbehaves as `mode` says: "503", "close" (no answer at all), "truncate" (announces the
    whole length, sends half, hangs up)."""

    payload = b""
    mode = "ok"
    ranges_seen: list[str]
    requests = 0

    def do_GET(self):  # noqa: N802
        type(self).requests += 1
        if self.mode == "503":
            self.send_error(503)
            return
        if self.mode == "close":
            self.close_connection = True
            return
        data, status = self.payload, 200
        rng = self.headers.get("Range")
        if rng:
            self.ranges_seen.append(rng)
            start = int(rng.split("=")[1].rstrip("-"))
            if start >= len(data):
                self.send_error(416)
                return
            data, status = data[start:], 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if self.mode == "truncate" else data)
        if self.mode == "truncate":
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """Start local servers: serve(payload, mode) -> (url, handler class with its counters)."""
    running = []

    def start(payload: bytes = b"", mode: str = "ok"):
        handler = type("H", (FileHandler,), {"payload": payload, "mode": mode})
        handler.ranges_seen = []
        httpd = http.server.HTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        running.append(httpd)
        return f"http://127.0.0.1:{httpd.server_port}/{ARCHIVE}", handler

    yield start
    for httpd in running:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def refused_url() -> str:
    """A URL on a loopback port where nothing listens."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/{ARCHIVE}"


def _part(dest: Path, data: bytes, source: str | None) -> Path:
    part = dest.with_name(dest.name + ".part")
    part.write_bytes(data)
    if source is not None:
        part.with_name(part.name + ".source").write_text(source + "\n")
    return part


# --- one source -------------------------------------------------------------------------


def test_download_from_file_url_extracts_counts_and_records_sha256(archive, tmp_path):
    root = download_breakhis(tmp_path / "data", archive.as_uri(), expected=14)
    pngs = list((root / "BreaKHis_v1").rglob("*.png"))
    assert len(pngs) == 14
    assert not (root / ".extracting").exists()
    recorded = (root / f"{ARCHIVE}.sha256").read_text()
    assert recorded == f"{sha256(archive.read_bytes())}  {ARCHIVE}\n"


def test_download_resumes_partial_file_and_hashes_all_of_it(serve, archive, tmp_path):
    full = archive.read_bytes()
    url, handler = serve(full)
    dest = tmp_path / ARCHIVE
    part = _part(dest, full[:1000], url)
    assert fetch(url, dest) == sha256(full)  # not the digest of the 1000 bytes left to fetch
    assert handler.ranges_seen == ["bytes=1000-"]
    assert dest.read_bytes() == full
    assert not part.exists()
    assert not part.with_name(part.name + ".source").exists()


def test_complete_part_file_is_finished_and_hashed(serve, archive, tmp_path):
    full = archive.read_bytes()
    url, handler = serve(full)
    dest = tmp_path / ARCHIVE
    _part(dest, full, url)
    assert fetch(url, dest) == sha256(full)  # the server answered 416: nothing left to send
    assert handler.ranges_seen == [f"bytes={len(full)}-"]
    assert dest.read_bytes() == full


@pytest.mark.parametrize("recorded_source", ["http://127.0.0.1:9/elsewhere.tar.gz", None])
def test_part_from_another_source_is_not_resumed(serve, archive, tmp_path, recorded_source):
    full = archive.read_bytes()
    url, handler = serve(full)
    dest = tmp_path / ARCHIVE
    _part(dest, b"bytes from another server" * 100, recorded_source)
    assert fetch(url, dest) == sha256(full)
    assert handler.ranges_seen == []  # no Range: the foreign part was started again
    assert dest.read_bytes() == full


def test_part_is_kept_when_the_other_source_does_not_answer(refused_url, tmp_path):
    dest = tmp_path / ARCHIVE
    part = _part(dest, b"first half", "http://127.0.0.1:9/first.tar.gz")
    with pytest.raises(SourceError, match="the connection failed"):
        fetch(refused_url, dest)
    assert part.read_bytes() == b"first half"
    assert part.with_name(part.name + ".source").read_text().strip().endswith("first.tar.gz")


def test_a_silent_server_times_out(tmp_path):
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/{ARCHIVE}"
        with pytest.raises(SourceError, match="timed out"):
            fetch(url, tmp_path / ARCHIVE, timeout=0.5)


def test_wrong_image_count_is_reported_and_the_archive_dropped(archive, tmp_path):
    with pytest.raises(UserError, match="holds 14 PNG images, not the 7909"):
        download_breakhis(tmp_path, archive.as_uri())
    assert not (tmp_path / ARCHIVE).exists()  # a rerun downloads it again
    assert not (tmp_path / f"{ARCHIVE}.sha256").exists()
    assert not (tmp_path / "BreaKHis_v1").exists()


# --- several sources --------------------------------------------------------------------


@pytest.mark.parametrize("first_mode", ["503", "close", "truncate", "garbage", "refused"])
def test_falls_back_to_the_second_source(serve, archive, tmp_path, caplog, refused_url, first_mode):
    full = archive.read_bytes()
    if first_mode == "refused":
        first, first_handler = refused_url, None
    else:
        payload = b"<html>not the archive</html>" if first_mode == "garbage" else full
        first, first_handler = serve(payload, "ok" if first_mode == "garbage" else first_mode)
    second, second_handler = serve(full)
    caplog.set_level(logging.WARNING, logger="breakhis_tl.data.download")
    root = download_breakhis(tmp_path, [first, second], expected=14)
    assert len(list((root / "BreaKHis_v1").rglob("*.png"))) == 14
    if first_handler is not None:
        assert first_handler.requests == 1
    assert second_handler.requests == 1
    failed = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].startswith(f"Source {first} failed: ")
    assert "\n" not in failed[0]  # one line per failed source
    recorded = (tmp_path / f"{ARCHIVE}.sha256").read_text()
    assert recorded == f"{sha256(full)}  {ARCHIVE}\n"
    assert read_recorded_sha256(tmp_path / ARCHIVE) == sha256((tmp_path / ARCHIVE).read_bytes())


def test_first_source_is_used_when_it_works(serve, archive, tmp_path):
    first, first_handler = serve(archive.read_bytes())
    second, second_handler = serve(archive.read_bytes())
    download_breakhis(tmp_path, [first, second], expected=14)
    assert (first_handler.requests, second_handler.requests) == (1, 0)


def test_all_sources_failing_is_one_sentence_naming_each(serve, refused_url, tmp_path):
    first, _ = serve(mode="503")
    with pytest.raises(UserError) as err:
        download_breakhis(tmp_path, [first, refused_url], expected=14)
    msg = str(err.value)
    assert f"{first}: the server answered 503" in msg
    assert f"{refused_url}: the connection failed" in msg
    assert msg.endswith(
        f"download {ARCHIVE} by hand and put it at {tmp_path / ARCHIVE}, then run the command "
        "again."
    )
    assert "\n" not in msg and not (tmp_path / "BreaKHis_v1").exists()


def test_broken_download_is_resumed_by_the_next_run(serve, archive, tmp_path):
    full = archive.read_bytes()
    url, handler = serve(full, "truncate")
    part = tmp_path / f"{ARCHIVE}.part"
    with pytest.raises(UserError, match=r"the download stopped at \d+ of \d+ bytes") as err:
        download_breakhis(tmp_path, url, expected=14)
    assert str(err.value).endswith(f"(the partial download {part} resumes then).")
    have = part.stat().st_size
    assert 0 < have < len(full) and part.read_bytes() == full[:have]
    handler.mode = "ok"  # the server is back
    download_breakhis(tmp_path, url, expected=14)
    assert handler.ranges_seen == [f"bytes={have}-"]
    assert read_recorded_sha256(tmp_path / ARCHIVE) == sha256(full)


def test_offline_says_where_to_put_the_archive(tmp_path, refused_url):
    with pytest.raises(
        UserError,
        match=r"download BreaKHis_v1.tar.gz by hand and put it at .*"
        r"BreaKHis_v1.tar.gz, then run the command again",
    ):
        download_breakhis(tmp_path, refused_url)


@pytest.mark.parametrize("style", ["repeated", "comma"])
def test_download_command_takes_several_urls(serve, archive, tmp_path, capsys, style):
    first, first_handler = serve(mode="503")
    second, second_handler = serve(archive.read_bytes())
    urls = (
        ["--url", first, "--url", second] if style == "repeated" else ["--url", f"{first},{second}"]
    )
    assert main(["download", "--to", str(tmp_path), *urls, "--expect", "14"]) == 0
    assert "BreakHis is ready" in capsys.readouterr().out
    assert (first_handler.requests, second_handler.requests) == (1, 1)
    assert (tmp_path / f"{ARCHIVE}.sha256").is_file()


# --- the recorded sha256 ----------------------------------------------------------------


def _first_good_run(url_or_path, tmp_path: Path) -> str:
    download_breakhis(tmp_path, url_or_path, expected=14)
    digest = read_recorded_sha256(tmp_path / ARCHIVE)
    shutil.rmtree(tmp_path / "BreaKHis_v1")  # as if the images were lost: the next run extracts
    return digest


def test_tampered_archive_by_hand_is_refused_and_nothing_extracted(archive, tampered, tmp_path):
    good = _first_good_run(archive.as_uri(), tmp_path)
    (tmp_path / ARCHIVE).write_bytes(tampered.read_bytes())
    bad = sha256(tampered.read_bytes())
    with pytest.raises(UserError) as err:
        download_breakhis(tmp_path, archive.as_uri(), expected=14)
    msg = str(err.value)
    assert msg.startswith(f"Archive {tmp_path / ARCHIVE} is refused: its sha256 is {bad}, not ")
    assert f"not the {good} recorded in {tmp_path / ARCHIVE}.sha256" in msg
    assert not (tmp_path / "BreaKHis_v1").exists() and not (tmp_path / ".extracting").exists()
    assert (tmp_path / ARCHIVE).read_bytes() == tampered.read_bytes()  # the user's file is kept
    # the same bytes pass when nothing is recorded: only the digest refused them
    (tmp_path / f"{ARCHIVE}.sha256").unlink()
    download_breakhis(tmp_path, archive.as_uri(), expected=14)
    assert read_recorded_sha256(tmp_path / ARCHIVE) == bad


def test_redownload_is_verified_and_a_mismatching_source_skipped(
    serve, archive, tampered, tmp_path, caplog
):
    good = _first_good_run(archive.as_uri(), tmp_path)
    (tmp_path / ARCHIVE).unlink()
    liar, _ = serve(tampered.read_bytes())
    honest, _ = serve(archive.read_bytes())
    caplog.set_level(logging.WARNING, logger="breakhis_tl.data.download")
    download_breakhis(tmp_path, [liar, honest], expected=14)
    assert sha256((tmp_path / ARCHIVE).read_bytes()) == good
    assert any(
        r.getMessage().startswith(f"Source {liar} failed: ") and good in r.getMessage()
        for r in caplog.records
    )
    assert len(list((tmp_path / "BreaKHis_v1").rglob("*.png"))) == 14


def test_redownload_with_only_a_mismatching_source_fails(serve, archive, tampered, tmp_path):
    good = _first_good_run(archive.as_uri(), tmp_path)
    (tmp_path / ARCHIVE).unlink()
    liar, _ = serve(tampered.read_bytes())
    with pytest.raises(UserError, match="by hand") as err:
        download_breakhis(tmp_path, liar, expected=14)
    assert good in str(err.value) and sha256(tampered.read_bytes()) in str(err.value)
    assert not (tmp_path / "BreaKHis_v1").exists()
    assert not (tmp_path / ARCHIVE).exists()


def test_archive_by_hand_is_used_without_any_download_and_recorded(archive, tmp_path, refused_url):
    (tmp_path / ARCHIVE).write_bytes(archive.read_bytes())
    download_breakhis(tmp_path, refused_url, expected=14)
    assert read_recorded_sha256(tmp_path / ARCHIVE) == sha256(archive.read_bytes())


def test_unreadable_sha256_file_is_reported(archive, tmp_path):
    (tmp_path / f"{ARCHIVE}.sha256").write_text("not a digest\n")
    with pytest.raises(UserError, match="does not start with a sha256 digest; delete it"):
        download_breakhis(tmp_path, archive.as_uri(), expected=14)


# --- safe extraction --------------------------------------------------------------------


def _tar_with(tmp_path: Path, add) -> Path:
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        good = tarfile.TarInfo("BreaKHis_v1/ok.txt")
        good.size = 2
        tar.addfile(good, io.BytesIO(b"ok"))
        add(tar)
    return path


def _file(name):
    def add(tar):
        info = tarfile.TarInfo(name)
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))

    return add


def _link(name, target, kind):
    def add(tar):
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, target
        tar.addfile(info)

    return add


@pytest.mark.parametrize(
    "add",
    [
        _file("../evil.txt"),
        _file("/tmp/breakhis_tl_evil.txt"),
        _file("BreaKHis_v1/../../evil.txt"),
        _link("BreaKHis_v1/passwd", "/etc/passwd", tarfile.SYMTYPE),
        _link("BreaKHis_v1/up", "../../outside", tarfile.SYMTYPE),
        _link("BreaKHis_v1/hard", "/etc/passwd", tarfile.LNKTYPE),
    ],
    ids=["dotdot", "absolute", "nested-dotdot", "abs-symlink", "rel-symlink-out", "hardlink"],
)
def test_malicious_archive_is_refused_and_nothing_written(tmp_path, add):
    evil = _tar_with(tmp_path, add)
    dest = tmp_path / "out"
    with pytest.raises(UserError, match="is refused: member .* would be written outside"):
        safe_extract(evil, dest)
    assert list(dest.rglob("*")) == []
    assert not (tmp_path / "evil.txt").exists()
    assert not Path("/tmp/breakhis_tl_evil.txt").exists()


def test_not_an_archive(tmp_path):
    bad = tmp_path / "BreaKHis_v1.tar.gz"
    bad.write_bytes(b"<html>not found</html>")
    with pytest.raises(UserError, match="is not a readable tar archive"):
        download_breakhis(tmp_path)
    assert bad.read_bytes() == b"<html>not found</html>"  # the user's file is not deleted
