import logging

import pytest

from breakhis_tl.cli import main
from breakhis_tl.data.index import build_index, index_breakhis, index_idc, parse_magnification
from breakhis_tl.errors import UserError


def test_full_scale_index_matches_published_counts(full_tree):
    index = index_breakhis(full_tree)
    assert len(index) == 7909
    assert index["label"].value_counts().to_dict() == {"malignant": 5429, "benign": 2480}
    assert index["magnification"].value_counts().to_dict() == {
        100: 2081,
        200: 2013,
        40: 1995,
        400: 1820,
    }
    assert index["subtype"].value_counts().to_dict() == {
        "DC": 3451,
        "F": 1014,
        "MC": 792,
        "LC": 626,
        "TA": 569,
        "PC": 560,
        "PT": 453,
        "A": 444,
    }
    assert index["slide_folder"].nunique() == 82
    # slide 13412 has a DC and an LC folder and is one patient
    assert index["patient"].nunique() == 81
    assert set(index.loc[index["patient"] == "13412", "subtype"]) == {"DC", "LC"}


def test_index_command_prints_published_counts(full_tree, capsys):
    assert main(["index", "--data", str(full_tree)]) == 0
    out = capsys.readouterr().out
    assert "7909 images, 81 patients" in out
    for number in ("2480", "5429", "1995", "2081", "2013", "1820", "3451", "444"):
        assert number in out
    assert "Slide folders: 82" in out


@pytest.mark.parametrize("below", ["", "BreaKHis_v1", "BreaKHis_v1/histology_slides/breast"])
def test_data_may_point_above_at_or_below_the_archive_folder(breakhis_sample, below):
    index = index_breakhis(breakhis_sample / below)
    assert len(index) == 14
    assert index["relpath"].str.startswith("BreaKHis_v1/histology_slides/").all()


def test_sample_fields(breakhis_sample):
    index = index_breakhis(breakhis_sample)
    row = index[index["filename"] == "SOB_B_A-14-22549AB-40-001.png"].iloc[0]
    assert (row.label, row.subtype, row.subtype_name, row.magnification, row.patient) == (
        "benign",
        "A",
        "adenosis",
        40,
        "22549AB",
    )
    assert index["patient"].nunique() == 11
    assert set(index["subtype"]) == {"A", "F", "PT", "TA", "DC", "LC", "MC", "PC"}


def test_idc_index(idc_sample):
    index = index_idc(idc_sample)
    assert len(index) == 103
    assert index["patient"].unique().tolist() == ["8975"]
    assert index["label"].value_counts().to_dict() == {"non_idc": 52, "idc": 51}
    assert {"x", "y"} <= set(index.columns)


def test_idc_command(idc_sample, capsys):
    assert main(["index", "--data", str(idc_sample), "--dataset", "idc"]) == 0
    assert "103 images, 1 patients" in capsys.readouterr().out


def test_idc_label_checked_against_folder(tmp_path, caplog):
    from conftest import png_bytes

    (tmp_path / "1" / "0").mkdir(parents=True)
    (tmp_path / "1" / "1").mkdir(parents=True)
    (tmp_path / "1" / "0" / "1_idx5_x1_y1_class0.png").write_bytes(png_bytes())
    (tmp_path / "1" / "0" / "1_idx5_x2_y1_class1.png").write_bytes(png_bytes())
    with caplog.at_level(logging.WARNING):
        index = index_idc(tmp_path)
    assert len(index) == 1
    assert "1_idx5_x2_y1_class1.png" in caplog.text


def test_unparseable_names_reported_and_non_images_ignored(tmp_path, breakhis_sample, caplog):
    import shutil

    shutil.copytree(breakhis_sample, tmp_path / "d")
    folder = tmp_path / "d/BreaKHis_v1/histology_slides/breast/benign"
    (folder / "notes.txt").write_text("not an image")
    (folder / "thumbs.db").write_bytes(b"\0")
    (folder / "scan_0001.png").write_bytes(b"x")
    with caplog.at_level(logging.WARNING):
        index = index_breakhis(tmp_path / "d")
    assert len(index) == 14
    assert "1 PNG file(s) do not follow the BreakHis naming" in caplog.text
    assert "scan_0001.png" in caplog.text


def test_bad_folders_give_one_sentence(tmp_path, capsys):
    with pytest.raises(UserError, match="does not exist"):
        build_index(tmp_path / "nope")
    with pytest.raises(UserError, match="No PNG images found under"):
        build_index(tmp_path)
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(UserError, match="No BreakHis images found .* 1 PNG file"):
        build_index(tmp_path)
    with pytest.raises(UserError, match="Unknown dataset 'camelyon'"):
        build_index(tmp_path, "camelyon")
    assert main(["index", "--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Data folder") and "Traceback" not in err


def test_parse_magnification():
    assert parse_magnification("all") is None
    assert parse_magnification("40X,200x, 400") == [40, 200, 400]
    with pytest.raises(UserError, match="Unknown magnification '50X'"):
        parse_magnification("40X,50X")
