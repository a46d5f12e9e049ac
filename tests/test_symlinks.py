"""The data reached through a symbolic link: the user is shown the paths they passed, and
every comparison of files (split files, calibration sample, content ids, feature cache,
pixel hashes, the "trained or selected on" check) holds whichever way the data was reached."""

import logging
import os
from pathlib import Path

import pandas as pd
import pytest

from breakhis_tl.cli import main
from breakhis_tl.data import identity
from breakhis_tl.data.folds import SplitOptions, plan_folds
from breakhis_tl.data.identity import ImageStore
from breakhis_tl.data.index import build_index
from breakhis_tl.evaluate import split_inputs
from breakhis_tl.models import calibration
from breakhis_tl.predict import Classifier
from breakhis_tl.runner import RunConfig, run_extraction, run_training


def _pngs(root: Path) -> list[str]:
    return [str(p) for p in sorted(root.rglob("*.png"))]


def _forms(linked_data, tmp_path) -> dict[str, Path]:
    """The sample three ways: through a link above it, through a link straight at its
    BreaKHis_v1 folder under another name (no `BreaKHis_v1` in the path given), and real."""
    above = linked_data("breakhis_sample")
    real = above.resolve()
    at = tmp_path / "archive"
    at.symlink_to(real / "BreaKHis_v1", target_is_directory=True)
    return {"link above": above, "link at": at, "real": real}


@pytest.mark.parametrize(
    "dataset, sub, inner",
    [("breakhis", "breakhis_sample", ""), ("breakhis", "breakhis_sample", "BreaKHis_v1"),
     ("idc", "idc_sample", ""), ("idc", "idc_sample", "8975")],
)  # fmt: skip
def test_index_shows_the_given_paths_and_keys_them_by_the_real_ones(
    linked_data, tmp_path, dataset, sub, inner
):
    link = linked_data(sub)
    real = link.resolve() / inner
    if inner:  # a link straight at a folder inside the data, named otherwise
        link = tmp_path / "renamed"
        link.symlink_to(real, target_is_directory=True)
    via_link, via_real = build_index(link, dataset), build_index(real, dataset)
    assert via_link["relpath"].tolist() == via_real["relpath"].tolist()
    assert via_link["path"].tolist() == _pngs(link) and via_real["path"].tolist() == _pngs(real)
    if dataset == "breakhis":  # the key Folds.csv and split files use, however reached
        assert via_link["relpath"].str.startswith("BreaKHis_v1/histology_slides/").all()


def test_a_tree_of_linked_patient_folders_is_indexed_whole(linked_data, tmp_path):
    """IDC assembled from one link per patient folder (and one patient reached twice): every
    patch found once, a link back to the tree walked once."""
    real = linked_data("idc_real").resolve()
    patients = sorted(p for p in real.iterdir() if p.is_dir())[:5]
    tree = tmp_path / "idc_links"
    tree.mkdir()
    for p in patients:
        (tree / p.name).symlink_to(p, target_is_directory=True)
    (tree / "loop").symlink_to(tree, target_is_directory=True)  # walked once, not forever
    got = build_index(tree, "idc")
    want = sum(len(list(p.rglob("*.png"))) for p in patients)
    assert len(got) == want and got["relpath"].is_unique
    assert set(got["patient"].astype(str)) == {p.name for p in patients}
    from breakhis_tl.data.index import image_files

    assert len(image_files(tree)) == want


def test_a_folder_reached_by_link_and_for_real_is_listed_by_its_real_path(linked_data, tmp_path):
    """Whatever order the file system lists them in (`alink` sorts first): the real folder
    wins, so keys and split files do not change when a link is added beside the data."""
    import shutil

    from breakhis_tl.data.index import image_files

    real = linked_data("idc_sample").resolve() / "8975"
    tree = tmp_path / "idc"
    shutil.copytree(real, tree / "8975")
    before = build_index(tree, "idc")
    (tree / "alink").symlink_to(tree / "8975", target_is_directory=True)
    (tree / "up").symlink_to(tmp_path, target_is_directory=True)  # holds the root: not walked
    after = build_index(tree, "idc")
    assert after["path"].tolist() == before["path"].tolist()
    assert after["relpath"].tolist() == before["relpath"].tolist()
    assert [str(p) for p in image_files(tree)] == sorted(after["path"], key=lambda p: p.split("/"))


@pytest.mark.parametrize(
    "written, read",
    [("link at", "real"), ("real", "link at"), ("link above", "real"), ("real", "link above")],
)
def test_a_split_file_reads_back_through_the_other_path(
    linked_data, tmp_path, capsys, caplog, written, read
):
    forms = _forms(linked_data, tmp_path)
    split = tmp_path / "split.csv"
    assert main(["split", "--data", str(forms[written]), "--out", str(split),
                 "--cache-dir", str(tmp_path / "cache")]) == 0  # fmt: skip
    rows = pd.read_csv(split)
    assert len(rows) == 14
    with caplog.at_level(logging.WARNING):
        plan = plan_folds(build_index(forms[read]), SplitOptions(split_file=str(split)))
    assert "match no indexed image" not in caplog.text
    ((_, fold),) = plan.folds
    assert dict(zip(fold["relpath"], fold["split"], strict=True)) == dict(
        zip(rows["path"], rows["split"], strict=True)
    )
    train = split_inputs(split, forms[read], "breakhis", "train", None)
    assert len(train) == (rows["split"] == "train").sum()
    assert all(p.startswith(str(forms[read]) + os.sep) for p in train)  # the user's form
    capsys.readouterr()


def test_train_through_a_link_then_predict_and_evaluate_either_way(
    linked_data, tmp_path, monkeypatch, caplog, capsys
):
    """A random-init run through the link: its calibration sample is its train side by the
    split file's keys, and its head warns about the images it saw whichever way they are
    given; predict and evaluate show the paths as passed."""
    link = linked_data("breakhis_sample")
    real = link.resolve()
    samples, real_calibrate = [], calibration.calibrate

    def spy(bb, paths, *args, **kwargs):
        samples.append(list(paths))
        return real_calibrate(bb, paths, *args, **kwargs)

    monkeypatch.setattr(calibration, "calibrate", spy)
    cfg = RunConfig(data=str(link), archs=["efficientnet_lite0"], weights="none", run="l",
                    out=str(tmp_path), workers=0, progress=False)  # fmt: skip
    res = run_training(cfg)
    head, split_file = res.heads["efficientnet_lite0"], res.folders["models"] / "split.csv"
    split = pd.read_csv(split_file)
    train = split.loc[split["split"] == "train", "path"]
    (sample,) = samples
    assert {os.path.relpath(p, link) for p in sample} == set(train)
    assert res.predictions["path"].str.startswith(str(link) + os.sep).all()
    clf = Classifier.from_head(head, device="cpu")
    seen = f"{len(train)} train image(s), {(split['split'] == 'val').sum()} val image(s)"
    for root in (link, real):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            df = clf.predict(root, workers=0, progress=False)
        assert df["path"].tolist() == _pngs(root)
        warned = [m for m in caplog.messages if "trained or selected on" in m]
        assert len(warned) == 1 and seen in warned[0], warned
    out = tmp_path / "ev"
    args = ["evaluate", "--head", str(head), "--split-file", str(split_file), "--data",
            str(link), "--out", str(out), "--device", "cpu", "--workers", "0"]  # fmt: skip
    assert main(args) == 0
    shown = pd.read_csv(out / "predictions.csv")["path"]
    assert len(shown) == (split["split"] == "test").sum()
    assert shown.str.startswith(str(link) + os.sep).all()  # as given, not resolved
    capsys.readouterr()


def test_shards_through_a_link_and_the_real_path_share_one_cache(
    linked_data, tmp_path, monkeypatch
):
    """Shard 0 through the link, shard 1 through the real path: the content ids, pixel
    hashes and features of one are the other's, so nothing is read or decoded twice."""
    link = linked_data("breakhis_sample")
    real = link.resolve()

    def cfg(root: Path) -> RunConfig:
        return RunConfig(data=str(root), archs=["efficientnet_lite0"], workers=0,
                         progress=False, cache_dir=str(tmp_path / "c"))  # fmt: skip

    first = run_extraction(cfg(link), shard=(0, 2))
    read, decoded = [], []
    real_id, real_decode = identity.content_id, identity._decode_hashes
    monkeypatch.setattr(identity, "content_id", lambda p: read.append(p) or real_id(p))
    monkeypatch.setattr(
        identity,
        "_decode_hashes",
        lambda paths, *a: decoded.extend(paths) or real_decode(paths, *a),
    )
    second = run_extraction(cfg(real), shard=(1, 2))
    assert first["extracted"] > 0 and second["extracted"] > 0
    assert read == [] and decoded == []
    store = ImageStore(tmp_path / "c" / "images.sqlite")
    for root in (link, real):
        assert None not in store.pixel_hashes(_pngs(root))
    whole = run_extraction(cfg(link))  # checks every picture: all hashed by the two shards
    assert whole["extracted"] == 0 and read == [] and decoded == []
