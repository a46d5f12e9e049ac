"""Shared fixtures: the real test data beside the repository, and a full-scale BreakHis tree."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# BREAKHIS_TL_SHARED_DATA points elsewhere; CI sets BREAKHIS_TL_REQUIRE_DATA=1 so nothing skips.
SHARED = Path(os.environ.get("BREAKHIS_TL_SHARED_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("BREAKHIS_TL_OFFLINE", "1")  # never try a weights download in tests
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: share the cores, do not fight for them
    import torch

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
# One measured compute-mode decision per backbone for the whole session (all its pytest -n
# workers), not one per test, and none left over from another session.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
os.environ.setdefault(
    "BREAKHIS_TL_DISPATCH_DIR",
    os.path.join(tempfile.gettempdir(), f"breakhis_tl_dispatch_{_RUN}")
    if _RUN
    else tempfile.mkdtemp(prefix="breakhis_tl_dispatch_"),
)


def _shared(sub: str) -> Path:
    path = SHARED / sub
    if not path.exists():
        if os.environ.get("BREAKHIS_TL_REQUIRE_DATA"):
            pytest.fail(f"test data {path} is missing")
        pytest.skip(f"test data {path} is absent")
    return path


@pytest.fixture(scope="session")
def breakhis_sample() -> Path:
    return _shared("breakhis_sample")


@pytest.fixture(scope="session")
def idc_sample() -> Path:
    return _shared("idc_sample")


@pytest.fixture(scope="session")
def linked_data(tmp_path_factory):
    """The real test data reached through a symbolic link, as on clusters and shared machines
    (`<tmp>/shared` links to the data folder): `linked_data("breakhis_sample")` is that folder
    through the link, its `.resolve()` the same folder by its real path. Tests that run both
    ways fail when one side of a comparison resolves links and the other does not."""
    base = tmp_path_factory.mktemp("linked")
    (base / "shared").symlink_to(SHARED.resolve(), target_is_directory=True)

    def serve(sub: str) -> Path:
        _shared(sub)  # absent data skips (or fails under BREAKHIS_TL_REQUIRE_DATA) as usual
        path = base / "shared" / sub
        assert str(path) != str(path.resolve())
        return path

    return serve


@pytest.fixture(scope="session")
def breakhis_layout() -> pd.DataFrame:
    return pd.read_csv(_shared("breakhis_layout.csv"))


def png_bytes(size=(8, 8), color=(200, 120, 180)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def full_tree(tmp_path_factory, breakhis_layout) -> Path:
    """All 7,909 real BreakHis paths, each a tiny PNG: the index sees the real archive."""
    root = tmp_path_factory.mktemp("full")
    data = png_bytes()
    for rel in breakhis_layout["path"]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


@pytest.fixture(scope="session")
def full_folds_csv(full_tree) -> Path:
    """The real official Folds.csv (39,545 rows), beside the full-scale tree's BreaKHis_v1
    (a copy in the test's temporary folder, never in the repository)."""
    import shutil

    path = full_tree / "Folds.csv"
    shutil.copy(_shared("Folds.csv"), path)
    return path


@pytest.fixture(scope="session")
def made_folds_csv(full_tree, tmp_path_factory) -> Path:
    """A self-made Folds.csv in the official format, for the malformed-file tests only."""
    from breakhis_tl.data.index import index_breakhis

    index = index_breakhis(full_tree)
    rows = [(1, r.magnification, "test" if i % 3 == 0 else "train", r.relpath)
            for i, r in enumerate(index.itertuples())]  # fmt: skip
    path = tmp_path_factory.mktemp("made") / "Folds.csv"
    pd.DataFrame(rows, columns=["fold", "mag", "grp", "filename"]).to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def sample_run(tmp_path_factory, breakhis_sample):
    """One real training run on the 14 sample images with the pretrained offline backbone."""
    from breakhis_tl.heads.training import TrainConfig
    from breakhis_tl.runner import RunConfig, run_training

    out = tmp_path_factory.mktemp("run")
    cfg = RunConfig(
        data=str(breakhis_sample),
        archs=["efficientnet_lite0"],
        run="sample",
        out=str(out),
        views=2,
        workers=0,
        progress=False,
        train=TrainConfig(epochs=8, seed=0),
    )
    return cfg, run_training(cfg, command="pytest sample_run")


@pytest.fixture(scope="session")
def head_file(sample_run):
    """The sample run's head file (predict, evaluate)."""
    return sample_run[1].heads["efficientnet_lite0"]


@pytest.fixture(scope="session")
def clf(head_file):
    from breakhis_tl.predict import Classifier

    return Classifier.from_head(head_file, device="cpu")


@pytest.fixture(autouse=True, scope="session")
def no_network():
    """Tests never touch the network: any connection beyond loopback fails at once."""
    import ipaddress
    import socket

    real = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None:
            try:
                local = ipaddress.ip_address(host).is_loopback
            except ValueError:
                local = host == "localhost"
            if not local:
                raise OSError(f"tests never touch the network (connect to {host} refused)")
        return real(self, address)

    socket.socket.connect = guarded
    yield
    socket.socket.connect = real


TAB10 = {f"C{i}": tuple(int(h[k : k + 2], 16) for k in (1, 3, 5)) for i, h in enumerate(
    ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
     "#bcbd22", "#17becf"])}  # fmt: skip


def drawn(png: Path) -> dict:
    """What a saved figure shows, read from its pixels: width and height, the share of
    inked (non-white) pixels, how many pixels carry each of matplotlib's cycle colours
    (C0..C9: lines and markers), and how many are shades of the Blues colour map's cells."""
    import numpy as np

    im = np.asarray(Image.open(png).convert("RGB")).astype(int)
    colours = {k: int((np.abs(im - rgb).sum(-1) < 40).sum()) for k, rgb in TAB10.items()}
    r, g, b = im[..., 0], im[..., 1], im[..., 2]
    blues = int(((b - r > 40) & (b > 100) & (g > r)).sum())
    inked = float((im.sum(-1) < 720).mean())
    return {"size": im.shape[1::-1], "inked": inked, "colours": colours, "blues": blues}
