"""Stain normalisation and HED jitter: failures named, references recorded, views reproducible."""

import json
import multiprocessing
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torchstain
from PIL import Image
from torchstain.torch.utils import get_mean_std, lab_split, rgb2lab

from breakhis_tl.data import stain
from breakhis_tl.data.identity import sha256_file
from breakhis_tl.data.images import load_rgb
from breakhis_tl.data.stain import (
    HED_STRONG,
    StainError,
    StainNormaliser,
    hed_jitter,
    hed_to_rgb,
    rgb_to_hed,
    stain_view,
    stain_views,
)
from breakhis_tl.errors import UserError

REPO = Path(__file__).resolve().parents[1]  # not tests.conftest: a site-packages "tests" shadows it

SIZE = (700, 460)


@pytest.fixture(scope="module")
def real(breakhis_sample):
    return sorted(breakhis_sample.rglob("*.png"))


@pytest.fixture(scope="module")
def macenko():
    return StainNormaliser("macenko")


@pytest.fixture(scope="module")
def reinhard(real):
    return StainNormaliser("reinhard", real[0])


def white():
    return Image.new("RGB", SIZE, (255, 255, 255))


def near_white():
    noise = np.random.default_rng(0).normal(238, 4, (SIZE[1], SIZE[0], 3))
    return Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8))


def flat():
    return Image.new("RGB", SIZE, (200, 120, 180))


def as_array(im):
    return np.asarray(im).astype(int)


@pytest.mark.parametrize(
    "make, reason", [(white, "nearly no tissue"), (near_white, "nearly no tissue"), (flat, "flat")]
)
@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_blank_or_flat_images_fail_cleanly_by_name(method, make, reason, macenko, reinhard):
    norm = macenko if method == "macenko" else reinhard
    im = make()
    with pytest.raises(StainError, match=rf"\({method}\) failed for a/blank\.png: ") as err:
        norm(im, "a/blank.png")
    assert err.value.name == "a/blank.png" and reason in err.value.reason
    out, message = norm.apply(im, "a/blank.png")  # the caller's fallback: unnormalised image
    assert out is im and "a/blank.png" in message
    with pytest.raises(StainError):
        norm.apply(im, "a/blank.png", strict=True)


def stain_angle(he_a, he_b) -> float:
    """Largest angle (degrees) between matching stain vectors of two 3x2 stain matrices."""
    a, b = (torch.nn.functional.normalize(m.double(), dim=0) for m in (he_a, he_b))
    return float(torch.rad2deg(torch.arccos((a * b).sum(0).clamp(-1, 1))).max())


def fitted_he(im):
    norm = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    norm.fit(torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous())
    return norm.HERef


@pytest.mark.parametrize("with_ref", [False, True])
def test_macenko_moves_stains_to_the_reference(real, macenko, with_ref):
    norm = StainNormaliser("macenko", real[0]) if with_ref else macenko
    target = norm._norm.HERef
    before, after = [], []
    for path in real[1:5]:
        im = load_rgb(path)
        out = norm(im, str(path))
        assert out.size == im.size and out.mode == "RGB"
        arr = np.asarray(out)
        assert arr.dtype == np.uint8 and arr.std() > 5  # an image, not a flat fill
        # Macenko's estimate, refitted on the output, lands near the reference stain vectors
        before.append(stain_angle(fitted_he(im), target))
        after.append(stain_angle(fitted_he(out), target))
    assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)
    assert np.mean(after) < 0.5 * np.mean(before), (before, after)


def lab_stats(im) -> torch.Tensor:
    chw = torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255
    return torch.tensor([get_mean_std(x) for x in lab_split(rgb2lab(chw))])


def test_reinhard_matches_the_reference_lab_statistics(real, reinhard):
    target = torch.stack([reinhard._norm.target_means, reinhard._norm.target_stds], dim=1)
    for path in real[1:4]:
        im = load_rgb(path)
        out = reinhard(im, str(path))
        assert out.size == im.size and out.mode == "RGB"
        before = (lab_stats(im) - target).abs()
        after = (lab_stats(out) - target).abs()
        # L in 0..100, a and b in -128..127; clipping to the RGB gamut costs a little
        assert float(after.max()) < 0.5 and float(after.sum()) < float(before.sum()), after


def test_identity_records_method_library_and_reference(real, tmp_path, monkeypatch, macenko):
    ident = macenko.identity()
    assert "method=macenko" in ident and "ref=library-default" in ident
    assert f"torchstain={stain.torchstain_version()}" in ident
    assert stain.torchstain_version() != "absent"
    assert StainNormaliser("none").identity() == "none"
    a = StainNormaliser("reinhard", real[0]).identity()
    assert a.split("ref=sha256:")[1].startswith(sha256_file(real[0]))
    assert a != StainNormaliser("reinhard", real[1]).identity()
    assert a != StainNormaliser("macenko", real[0]).identity()
    moved = tmp_path / "elsewhere.png"
    shutil.copy(real[0], moved)
    assert StainNormaliser("reinhard", moved).identity() == a  # the bytes, not the path
    monkeypatch.setattr(stain, "torchstain_version", lambda: "9.9.9")
    assert macenko.identity() != ident and "torchstain=9.9.9" in macenko.identity()


def test_bad_settings_are_user_errors(real, tmp_path):
    with pytest.raises(UserError, match="no built-in Reinhard target"):
        StainNormaliser("reinhard")
    with pytest.raises(UserError, match="Unknown stain method"):
        StainNormaliser("vahadane")
    with pytest.raises(UserError, match="needs --stain macenko or --stain reinhard"):
        StainNormaliser("none", real[0])
    with pytest.raises(UserError, match="does not exist"):
        StainNormaliser("macenko", tmp_path / "missing.png")
    blank = tmp_path / "blank.png"
    white().save(blank)
    with pytest.raises(UserError, match=r"blank\.png cannot be used: nearly no tissue"):
        StainNormaliser("reinhard", blank)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"bad\.png"):
        StainNormaliser("macenko", tmp_path / "bad.png")


def test_normaliser_pickles_with_its_fit(real):
    norm = StainNormaliser("macenko", real[0])
    copy = pickle.loads(pickle.dumps(norm))
    im = load_rgb(real[1])
    assert copy.identity() == norm.identity()
    assert np.array_equal(np.asarray(copy(im)), np.asarray(norm(im)))


def test_nan_output_and_library_errors_are_stain_errors(real, monkeypatch):
    im = load_rgb(real[1])
    norm = StainNormaliser("macenko")
    norm._norm.maxCRef = torch.tensor([float("nan"), 1.0])
    with pytest.raises(StainError, match="not finite"):
        norm(im, "nan.png")

    def singular(*args, **kwargs):
        raise torch.linalg.LinAlgError("singular matrix")

    norm = StainNormaliser("macenko")
    monkeypatch.setattr(norm._norm, "normalize", singular)
    with pytest.raises(StainError, match="singular.png: torchstain raised singular matrix"):
        norm(im, "singular.png")


# ---- HED jitter -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tissue(real):
    return load_rgb(real[2])


def test_hed_round_trip_is_exact_and_sigma_zero_is_identity(tissue):
    rgb = np.asarray(tissue)
    assert np.array_equal(hed_to_rgb(rgb_to_hed(rgb)), rgb)
    assert np.array_equal(np.asarray(hed_jitter(tissue, 3, sigma=0.0)), rgb)


@pytest.mark.parametrize("sigma", [0.05, HED_STRONG])
def test_hed_jitter_is_alpha_times_stain_plus_beta(tissue, sigma):
    rng = np.random.default_rng(11)
    alpha, beta = rng.uniform(1 - sigma, 1 + sigma, 3), rng.uniform(-sigma, sigma, 3)
    expected = hed_to_rgb(rgb_to_hed(np.asarray(tissue)) * alpha + beta)
    got = np.asarray(hed_jitter(tissue, 11, sigma))
    assert got.shape == expected.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - expected).max() <= 1  # float32 fast path vs float64


def test_stain_views_are_deterministic_per_seed_image_and_view(tissue):
    key = "SOB_B_A-14-22549AB-40-001.png"
    views = stain_views(tissue, 7, key, 4)
    assert views[0] is tissue
    again = [stain_view(tissue, 7, key, v) for v in (3, 2, 1)][::-1]  # other order
    for a, b in zip(views[1:], again, strict=True):
        assert a.size == tissue.size and a.mode == "RGB"
        assert a.tobytes() == b.tobytes()
    base = views[1].tobytes()
    assert len({v.tobytes() for v in views}) == 4  # every view differs
    assert stain_view(tissue, 8, key, 1).tobytes() != base  # another seed
    assert stain_view(tissue, 7, key + "x", 1).tobytes() != base  # another image
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert pool.submit(stain_view, tissue, 7, key, 1).result().tobytes() == base


def test_strong_jitter_moves_colours_more_than_light(tissue):
    rgb = as_array(tissue)
    light = np.mean([np.abs(as_array(stain_view(tissue, 0, "k", v)) - rgb).mean() for v in (1, 2)])
    strong = np.mean(
        [np.abs(as_array(stain_view(tissue, 0, "k", v, HED_STRONG)) - rgb).mean() for v in (1, 2)]
    )
    assert 0 < light < strong
    with pytest.raises(ValueError):
        hed_jitter(tissue, 0, sigma=1.0)
    with pytest.raises(ValueError):
        stain_view(tissue, -1, "k", 1)


def test_benchmark_runs_on_a_tiny_size(tmp_path, breakhis_sample):
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "stain_cost.py"),
            *("--images", "2", "--real-images", "1", "--repeats", "1"),
            *("--real", str(breakhis_sample), "--workdir", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    keys = {"cpu", "cpu_flags", "method", "ms_per_image", "min_ms", "max_ms", "breakhis_minutes"}
    assert records and keys <= set(records[0]), records[:1]
    methods = {"decode", "none", "macenko", "reinhard", "hed-jitter"}
    assert {r["method"] for r in records} == methods
    assert {r["images"] for r in records} == {"generated", "breakhis_sample"}
    assert all(r["failed"] == 0 for r in records)
