import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from breakhis_tl.cam import target_layer
from breakhis_tl.cli import main
from breakhis_tl.data.index import index_breakhis, index_idc
from breakhis_tl.errors import UserError
from breakhis_tl.heads.modules import load_head, make_head, read_head_file, save_head
from breakhis_tl.predict import Classifier, patient_of


def _probs(df):
    return df[["prob_benign", "prob_malignant"]].to_numpy()


def test_predict_folder_and_patients(clf, breakhis_sample):
    df = clf.predict(breakhis_sample, workers=0, progress=False)
    assert len(df) == 14 and list(df.columns) == [
        "path",
        "label",  # BreakHis names give the true label
        "prediction",
        "prob_benign",
        "prob_malignant",
        "error",
    ]
    assert df["label"].tolist() == ["benign" if "SOB_B_" in p else "malignant" for p in df["path"]]
    assert np.allclose(_probs(df).sum(1), 1, atol=1e-5)
    assert (df["error"] == "").all()
    assert set(df["prediction"]) <= {"benign", "malignant"}
    pats = clf.patients(df)
    assert len(pats) == 11 and pats["n_images"].sum() == 14
    assert pats.set_index("patient").loc["25197", "n_images"] == 4
    row = pats.set_index("patient").loc["25197"]
    mask = df["path"].str.contains("-25197-")
    assert row["prob_malignant"] == pytest.approx(df.loc[mask, "prob_malignant"].mean())
    truth = "benign" if df.loc[mask, "path"].str.contains("SOB_B_").all() else "malignant"
    assert row["label"] == truth
    right = (df.loc[mask, "prediction"] == truth).mean()
    assert row["share_correct"] == pytest.approx(right)
    assert row["majority_vote"] in clf.classes and row["prediction"] in clf.classes


def test_same_numbers_as_training_predictions(sample_run, clf):
    """The head predicts at inference what the run wrote for its test images. (Its val rows
    are the out-of-fold scores of the C selection: the refit head has seen those images.)"""
    cfg, res = sample_run
    preds = res.predictions[res.predictions["split"] == "test"]
    paths = [f"{cfg.data}/{r}" for r in preds["relpath"]]
    now = clf.predict(paths, workers=0, progress=False)
    # training features were cached in fp16, so allow that rounding
    assert np.allclose(_probs(now), preds[["prob_benign", "prob_malignant"]].to_numpy(), atol=2e-3)


def test_cli_matches_api(clf, head_file, breakhis_sample, tmp_path, capsys):
    code = main(
        [
            "predict",
            "--head",
            str(head_file),
            str(breakhis_sample),
            "--out",
            str(tmp_path / "p.csv"),
            "--patients",
            str(tmp_path / "pp.csv"),
            "--device",
            "cpu",
            "--workers",
            "0",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "Per patient" in out and "SOB_B_A-14-22549AB-40-001.png" in out
    cli = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    api = clf.predict(breakhis_sample, workers=0, progress=False)
    assert cli["path"].tolist() == api["path"].tolist()
    assert np.allclose(_probs(cli), _probs(api), atol=1e-6)
    assert len(pd.read_csv(tmp_path / "pp.csv")) == 11


def test_tta_and_gradcam(clf, breakhis_sample, tmp_path):
    plain = clf.predict(breakhis_sample, workers=0, progress=False)
    tta = clf.predict(breakhis_sample, tta=True, workers=0, progress=False)
    assert np.allclose(_probs(tta).sum(1), 1, atol=1e-5)
    assert not np.allclose(_probs(tta), _probs(plain))
    written = clf.gradcam(breakhis_sample, tmp_path / "cam")
    assert len(written) == 14 and len(list((tmp_path / "cam").glob("*_cam.png"))) == 14
    im = Image.open(written[0]).convert("RGB")
    assert im.width > 1.6 * im.height  # the crop beside its overlay, with a colour bar
    # the heat map is not flat: it points somewhere
    assert np.asarray(im).std() > 10


def test_gradcam_not_for_vit():
    with pytest.raises(UserError, match="Grad-CAM needs a convolutional feature map; vit_b_16"):
        target_layer("vit_b_16", None)


def test_mixed_good_and_bad_inputs(clf, head_file, breakhis_sample, tmp_path, capsys):
    good = sorted(breakhis_sample.rglob("*.png"))[:3]
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "trunc.png").write_bytes(good[0].read_bytes()[:3000])
    bad = [
        tmp_path / "empty.png",
        tmp_path / "notes.png",
        tmp_path / "trunc.png",
        tmp_path / "missing.png",
    ]
    inputs = [str(good[0]), *map(str, bad[:2]), str(good[1]), *map(str, bad[2:]), str(good[2])]
    df = clf.predict(inputs, workers=0, progress=False)
    ok = df["error"] == ""
    assert ok.tolist() == [True, False, False, True, False, False, True]
    assert np.allclose(_probs(df[ok]).sum(1), 1, atol=1e-5)
    assert "empty.png is empty" in df["error"][1] and "missing.png does not exist" in df["error"][5]
    code = main(
        [
            "predict",
            "--head",
            str(head_file),
            *inputs,
            "--out",
            str(tmp_path / "p.csv"),
            "--device",
            "cpu",
            "--workers",
            "0",
        ]
    )
    assert code == 1
    assert "4 of 7 input(s) could not be classified" in capsys.readouterr().err
    written = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert len(written) == 7 and (written["error"] != "").sum() == 4


def test_pil_images(clf, breakhis_sample):
    ims = [Image.open(p).convert("L") for p in sorted(breakhis_sample.rglob("*.png"))[:2]]
    df = clf.predict(ims, progress=False)
    assert df["path"].tolist() == ["<image 0>", "<image 1>"] and (df["error"] == "").all()


def test_empty_folder(clf, tmp_path, head_file, capsys):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="No images found in folder"):
        clf.predict(tmp_path, progress=False)
    assert main(["predict", "--head", str(head_file), str(tmp_path)]) == 2
    assert "No images found in folder" in capsys.readouterr().err


def test_metadata_mismatch(head_file, tmp_path):
    head, meta = load_head(head_file)
    bad = tmp_path / "bad.pt"
    save_head(bad, make_head("linear", 1024, 2), {**meta, "feature_dim": 1024})
    with pytest.raises(
        UserError,
        match="expects 1024-d features, but the efficientnet_lite0 backbone gives 1280-d ones",
    ):
        Classifier.from_head(bad)
    other = tmp_path / "other.pt"
    save_head(other, head, {**meta, "weights_id": "none-seed0"})
    with pytest.raises(UserError, match="trained on efficientnet_lite0 with weights none-seed0"):
        Classifier.from_head(other)


def test_tampered_head_refused(head_file, tmp_path, capsys):
    _, state = read_head_file(head_file)
    weight = state["0.weight"].numpy().tobytes()
    data = bytearray(head_file.read_bytes())
    at = bytes(data).index(weight[:64])  # the stored weights, uncompressed in the zip
    data[at : at + 4] = np.float32(123.0).tobytes()
    tampered = tmp_path / "tampered.pt"
    tampered.write_bytes(bytes(data))
    assert main(["predict", "--head", str(tampered), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "tampered.pt was changed after it was saved" in err and "Traceback" not in err


def test_patient_of():
    assert patient_of("x/SOB_M_DC-14-13412-100-003.png") == "13412"
    assert patient_of("8975_idx5_x101_y1201_class0.png") == "8975"
    assert patient_of("photo.png") is None


def test_not_a_head_file_says_what_it_is(tmp_path, breakhis_sample, capsys):
    cases = {
        "split.csv": ("path,split\nBreaKHis_v1/x.png,test\n", "is a CSV file"),
        "empty.pt": ("", "is an empty file"),
        "notes.pt": ("hello", "is a text file"),
    }
    for name, (text, what) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError) as caught:
            read_head_file(tmp_path / name)
        msg = str(caught.value)
        assert what in msg and msg.endswith("pass a .pt head file from trained_models/<run>/.")
    image = next(breakhis_sample.rglob("*.png"))
    with pytest.raises(UserError, match="is an image, not a breakhis_tl head file"):
        read_head_file(image)
    with pytest.raises(UserError, match="does not exist; pass a .pt head file"):
        read_head_file(tmp_path / "missing.pt")


def test_weights_file_as_head(tmp_path):
    weights = tmp_path / "resnet50.pth"
    torch.save({"conv1.weight": torch.zeros(2, 2)}, weights)
    with pytest.raises(UserError, match="no format tag; backbone weights go to train --weights"):
        read_head_file(weights)


def test_wrong_dataset_folder_names_the_fix(idc_sample, breakhis_sample, capsys):
    with pytest.raises(UserError, match="these look like IDC patches; add --dataset idc"):
        index_breakhis(idc_sample)
    with pytest.raises(UserError, match="these look like BreakHis images; leave out --dataset idc"):
        index_idc(breakhis_sample)
    assert main(["index", "--data", str(idc_sample)]) == 2
    assert "add --dataset idc" in capsys.readouterr().err


def test_unrelated_folder_keeps_the_question(tmp_path):
    from conftest import png_bytes

    (tmp_path / "photo.png").write_bytes(png_bytes())
    with pytest.raises(UserError, match="is this the BreakHis folder"):
        index_breakhis(tmp_path)
    with pytest.raises(UserError, match="is this the IDC folder"):
        index_idc(tmp_path)


def test_predict_says_which_inputs_the_head_was_fit_or_selected_on(
    clf, head_file, breakhis_sample, tmp_path, caplog
):
    """Labels scored on a head's own training or validation images, or on other images of
    those patients, flatter it: predict counts them by the run's split.csv, by file name
    wherever the copy lies and by patient; held-out patients, and a head copied away from
    its run (no split.csv beside it) says it could not check: a warning when scored."""
    import shutil

    split = pd.read_csv(head_file.parent / "split.csv")
    full = {rel: str(breakhis_sample / rel) for rel in split["path"]}
    n_train, n_val = (int((split["split"] == s).sum()) for s in ("train", "val"))
    assert n_train and n_val
    train_image = split.loc[split["split"] == "train", "path"].iloc[0]
    flat = tmp_path / "flat"
    flat.mkdir()
    copy = flat / train_image.rsplit("/", 1)[1]  # the same image, another folder
    shutil.copy(full[train_image], copy)
    name = copy.name.split("-")  # SOB_B_F-14-25197-40-001.png: same slide, 400X
    sibling = flat / "-".join([*name[:3], "400", "999.png"])
    shutil.copy(full[train_image], sibling)
    with caplog.at_level("WARNING", logger="breakhis_tl.predict"):
        clf.predict([*full.values(), str(copy), str(sibling)], progress=False)
    total = len(full) + 2
    assert (f"{n_train + n_val + 2} of {total} input(s) are images, or other images of "
            f"patients, this head was trained or selected on ({n_train + 1} train image(s), "
            f"{n_val} val image(s), 1 other image(s) of train patients") in caplog.text  # fmt: skip
    caplog.clear()
    held_out = [full[r] for r in split.loc[split["split"] == "test", "path"]]
    with caplog.at_level("WARNING", logger="breakhis_tl.predict"):
        clf.predict(held_out, progress=False)
    assert "trained or selected on" not in caplog.text
    alone = tmp_path / "alone.pt"
    shutil.copy(head_file, alone)
    lone = Classifier.from_head(alone, device="cpu")
    for labels, level in (("auto", "WARNING"), ("none", "INFO")):
        caplog.clear()
        with caplog.at_level("INFO", logger="breakhis_tl.predict"):
            lone.predict(held_out, progress=False, labels=labels)
        (note,) = [r for r in caplog.records if "was not checked" in r.getMessage()]
        assert note.levelname == level and "beside alone.pt" in note.getMessage()
        assert "of patients, this head was trained" not in caplog.text


def test_seen_by_head_reads_the_heads_own_fold(tmp_path):
    """With several folds in split.csv, a head is judged by its fold's sides alone; a row
    with no path is passed over."""
    from breakhis_tl.predict import seen_by_head

    a, b = "SOB_B_F-14-25197-40-001.png", "SOB_M_DC-14-2523-40-001.png"
    pd.DataFrame({
        "path": [f"x/{a}", f"x/{b}", f"x/{a}", f"x/{b}", None],
        "split": ["train", "test", "test", "val", "train"],
        "fold": [1, 1, 2, 2, 2],
    }).to_csv(tmp_path / "split.csv", index=False)  # fmt: skip
    head = tmp_path / "head.pt"
    assert seen_by_head(head, {"fold": 1}, [f"/d/{a}", f"/d/{b}"]) == ["train", ""]
    assert seen_by_head(head, {"fold": 2}, [f"/d/{a}", f"/d/{b}"]) == ["", "val"]
    assert seen_by_head(head, {"fold": 1}, [f"/d/{a.lower()}"]) == ["train"]
    # an IDC patch whose patient id has a BreakHis slide's digits is another patient
    idc = tmp_path / "idc"
    idc.mkdir()
    pd.DataFrame({"path": ["x/SOB_B_A-14-10253-40-001.png"], "split": ["train"]}).to_csv(
        idc / "split.csv", index=False)  # fmt: skip
    meta = {"fold": None, "dataset": "breakhis"}
    assert seen_by_head(idc / "h.pt", meta, ["10253_idx5_x1_y1_class0.png"]) == [""]
    assert seen_by_head(idc / "h.pt", meta, ["SOB_B_A-14-10253-100-009.png"]) == ["train patient"]


def test_unreadable_split_is_not_checked_rather_than_clear(tmp_path):
    """A head alone, or one whose fold has no row in split.csv, cannot tell whether an input
    was trained on: None (not [""]) and a sentence, for inputs named like its dataset only."""
    from breakhis_tl.predict import seen_by_head, unchecked_note

    name = "SOB_B_F-14-25197-40-001.png"
    meta = {"fold": 3, "dataset": "breakhis"}
    assert seen_by_head(tmp_path / "h.pt", meta, [name]) is None
    pd.DataFrame({"path": [f"x/{name}"], "split": ["train"], "fold": [1]}).to_csv(
        tmp_path / "split.csv", index=False)  # fmt: skip
    assert seen_by_head(tmp_path / "h.pt", meta, [name]) is None  # fold 3 is not there
    assert seen_by_head(tmp_path / "h.pt", {**meta, "fold": 1}, [name]) == ["train"]
    note = unchecked_note(tmp_path / "h.pt", meta, [name, "photo.png"])
    assert note.startswith("1 input(s) are named like BreakHis images") and "h.pt" in note
    assert unchecked_note(tmp_path / "h.pt", meta, ["photo.png"]) == ""


def test_seen_by_head_keys_patients_as_the_split_did(tmp_path):
    """Under --group-by accession, slides 22549AB and 22549CD are one patient."""
    from breakhis_tl.predict import seen_by_head

    other = "SOB_B_A-14-22549CD-100-001.png"
    for group_by, expected in (("accession", "train patient"), ("slide", "")):
        rows = {"path": ["x/SOB_B_A-14-22549AB-40-001.png"], "split": ["train"],
                "group_by": [group_by]}  # fmt: skip
        pd.DataFrame(rows).to_csv(tmp_path / "split.csv", index=False)
        assert seen_by_head(tmp_path / "h.pt", {"fold": None}, [other]) == [expected]
