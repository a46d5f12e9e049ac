import http.server
import io
import tarfile
import threading
from pathlib import Path

import pytest

from breakhis_tl.cli import main
from breakhis_tl.download import download_breakhis, fetch, safe_extract
from breakhis_tl.errors import UserError


@pytest.fixture(scope="module")
def archive(tmp_path_factory, breakhis_sample) -> Path:
    """A BreaKHis_v1.tar.gz of the 14 real sample images, in the archive's layout."""
    path = tmp_path_factory.mktemp("srv") / "BreaKHis_v1.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(breakhis_sample / "BreaKHis_v1", arcname="BreaKHis_v1")
    return path


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves one file, honouring `Range: bytes=N-` as a real server would."""

    payload = b""
    ranges_seen: list[str] = []

    def do_GET(self):  # noqa: N802
        data, status = self.payload, 200
        rng = self.headers.get("Range")
        if rng:
            self.ranges_seen.append(rng)
            start = int(rng.split("=")[1].rstrip("-"))
            data, status = data[start:], 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(archive):
    RangeHandler.payload = archive.read_bytes()
    RangeHandler.ranges_seen = []
    httpd = http.server.HTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/BreaKHis_v1.tar.gz"
    httpd.shutdown()


def test_download_from_file_url_extracts_and_counts(archive, tmp_path):
    root = download_breakhis(tmp_path / "data", archive.as_uri(), expected=14)
    pngs = list((root / "BreaKHis_v1").rglob("*.png"))
    assert len(pngs) == 14
    assert not (root / ".extracting").exists()


def test_download_resumes_partial_file(server, archive, tmp_path):
    dest = tmp_path / "BreaKHis_v1.tar.gz"
    full = archive.read_bytes()
    dest.with_name(dest.name + ".part").write_bytes(full[:1000])
    fetch(server, dest)
    assert RangeHandler.ranges_seen == ["bytes=1000-"]
    assert dest.read_bytes() == full
    assert not dest.with_name(dest.name + ".part").exists()


def test_download_command_over_http(server, tmp_path, capsys):
    assert main(["download", "--to", str(tmp_path), "--url", server, "--expect", "14"]) == 0
    assert "BreakHis is ready" in capsys.readouterr().out


def test_wrong_image_count_is_reported(archive, tmp_path):
    with pytest.raises(UserError, match="holds 14 PNG images, not the 7909"):
        download_breakhis(tmp_path, archive.as_uri())


def test_offline_says_where_to_put_the_archive(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(
        UserError,
        match=r"download BreaKHis_v1.tar.gz by hand and put it at .*"
        r"BreaKHis_v1.tar.gz, then run the command again",
    ):
        download_breakhis(tmp_path, f"http://127.0.0.1:{port}/BreaKHis_v1.tar.gz")


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
