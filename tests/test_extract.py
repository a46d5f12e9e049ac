"""`extract`: features only, into the cache; sharded across processes with no coordination
but the file system, and bit for bit what one process makes."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO
from safetensors.torch import load_file

from breakhis_tl.cli import main, parse_shard
from breakhis_tl.data.identity import ImageStore
from breakhis_tl.errors import UserError


def _env():
    """This process's environment and torch thread count: fp32 reductions split over another
    number of threads round differently, and the shards must compute as this process does."""
    import torch

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    return env


def _features(cache) -> dict:
    """{(space, content id): feature row} of every complete chunk in a cache folder."""
    out = {}
    for marker in (cache / "features").rglob("*.json"):
        data = load_file(str(marker.with_suffix(".safetensors")))
        for row, cid in enumerate(json.loads(marker.read_text())["ids"]):
            out[(marker.parent.name, cid)] = data["features"][row]
    return out


def test_two_shards_equal_one_process_bit_for_bit(breakhis_sample, tmp_path, capsys):
    common = ["extract", "--data", str(breakhis_sample), "--archs", "efficientnet_lite0",
              "--views", "2", "--workers", "0"]  # fmt: skip
    assert main([*common, "--cache-dir", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "breakhis_tl", *common, "--cache-dir", str(tmp_path / "two")]
    procs = [
        subprocess.Popen(
            [*cmd, "--shard", f"{i}/2"],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    done = [int(o.split(" image feature")[0].split()[-1]) for o, _ in outs]
    one, two = _features(tmp_path / "one"), _features(tmp_path / "two")
    assert all(done) and sum(done) == len(one) > 14  # 14 images + a view of each train image
    assert one.keys() == two.keys()
    assert all(one[k].equal(two[k]) for k in one)
    # the shards hashed their own images' pixels: train's leakage check decodes nothing
    store = ImageStore(tmp_path / "two" / "images.sqlite")
    paths = [str(p) for p in breakhis_sample.rglob("*.png")]
    assert len(store.known_pixels(store.content_ids(paths))) == len(paths)
    # train then reads everything from the sharded cache
    capsys.readouterr()
    args = ["train", "--data", str(breakhis_sample), "--archs", "efficientnet_lite0", "--views",
            "2", "--workers", "0", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "two"),
            "--run", "after", "--epochs", "2"]  # fmt: skip
    assert main(args) == 0


def test_shard_option_and_environment(monkeypatch):
    assert parse_shard("1/4") == (1, 4)
    with pytest.raises(UserError, match="--shard must be i/N"):
        parse_shard("4/4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert parse_shard(None) == (2, 3)


def test_a_shard_decodes_only_its_own_images(breakhis_sample, tmp_path, monkeypatch):
    """A shard hashes its images in their extraction's decode and leaves the picture check
    (which needs every image) to train: n shards do not each decode the whole dataset."""
    from breakhis_tl.data import identity
    from breakhis_tl.features.extract import in_shard
    from breakhis_tl.runner import RunConfig, run_extraction

    decoded = []
    monkeypatch.setattr(identity, "_decode_hashes", lambda paths, *a: decoded.extend(paths))
    cfg = RunConfig(data=str(breakhis_sample), archs=["efficientnet_lite0"], workers=0,
                    progress=False, cache_dir=str(tmp_path / "c"))  # fmt: skip
    out = run_extraction(cfg, shard=(0, 2))
    assert decoded == [] and out["extracted"] > 0
    store = ImageStore(tmp_path / "c" / "images.sqlite")
    paths = [str(p) for p in breakhis_sample.rglob("*.png")]
    ids = store.content_ids(paths)
    mine = {i for i in ids if in_shard(i, (0, 2))}
    assert 0 < len(mine) < len(ids) and set(store.known_pixels(ids)) == mine
