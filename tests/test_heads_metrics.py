import math
import pickle

import numpy as np
import pytest
import torch

from breakhis_tl.errors import UserError
from breakhis_tl.heads.modules import HEAD_FORMAT, load_head, make_head, read_head_file, save_head
from breakhis_tl.metrics import compute_metrics, patient_rate

META = {
    "head": "mlp",
    "feature_dim": 8,
    "classes": ["benign", "malignant"],
    "hidden": 4,
    "dropout": 0.1,
    "arch": "efficientnet_lite0",
    "metrics": {"val": {"auc": 0.5}},
}


def test_head_round_trip(tmp_path):
    head = make_head("mlp", 8, 2, hidden=4, dropout=0.1)
    path = save_head(tmp_path / "h.pt", head, META)
    loaded, meta = load_head(path)
    assert meta == META
    x = torch.randn(3, 8)
    head.eval()
    assert torch.equal(loaded(x), head(x))
    assert [p.name for p in tmp_path.iterdir()] == ["h.pt"]  # no temporary file left
    # plain torch.load with weights_only works too: tensors and strings only
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == HEAD_FORMAT


class Payload:
    """Unpickling this runs code: it would create a file."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_payload_refused_and_not_run(tmp_path):
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save(
        {"format": HEAD_FORMAT, "meta": "{}", "state_dict": {}, "x": Payload(str(target))}, evil
    )
    with pytest.raises(
        UserError,
        match="holds pickled objects other than tensors; it was refused and nothing in it was run",
    ):
        load_head(evil)
    assert not target.exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(Payload(str(target))))
    with pytest.raises(UserError):
        load_head(raw)
    assert not target.exists()


def test_bad_head_files(tmp_path):
    good = save_head(tmp_path / "h.pt", make_head("linear", 8, 2), {**META, "head": "linear"})
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[:200])
    with pytest.raises(UserError, match="trunc.pt is not a breakhis_tl head file"):
        load_head(trunc)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(UserError, match="not a breakhis_tl head file"):
        load_head(text)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(UserError, match="no format tag"):
        load_head(tensor)
    old = tmp_path / "old.pt"
    torch.save({"format": "breakhis_tl.head/0", "meta": "{}", "state_dict": {}}, old)
    with pytest.raises(UserError, match="has format 'breakhis_tl.head/0'; this version"):
        read_head_file(old)
    wrong = tmp_path / "wrong.pt"
    save_head(wrong, make_head("linear", 8, 2), {**META, "head": "linear", "feature_dim": 16})
    with pytest.raises(UserError, match="does not match its own metadata"):
        load_head(wrong)
    with pytest.raises(UserError, match="does not exist"):
        load_head(tmp_path / "none.pt")


def test_unknown_head():
    with pytest.raises(UserError, match="Unknown head 'svm'"):
        make_head("svm", 8, 2)


def test_binary_metrics_by_hand():
    # truth 0 0 0 1 1 1; predicted 0 1 0 1 1 0 -> TP 2, FP 1, FN 1, TN 2
    y = [0, 0, 0, 1, 1, 1]
    p1 = np.array([0.2, 0.7, 0.1, 0.9, 0.6, 0.4])
    probs = np.stack([1 - p1, p1], 1)
    m = compute_metrics(y, probs, ["benign", "malignant"], ["a", "a", "b", "c", "c", "d"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    # AUC: pairs (pos, neg) ranked right: 0.9 beats 3, 0.6 beats 2 (0.2, 0.1), 0.4 beats 2 -> 7/9
    assert m["auc"] == pytest.approx(7 / 9)
    assert m["confusion"] == [[2, 1], [1, 2]]
    # patients: a 1/2, b 1, c 1, d 0 -> mean 0.625
    assert m["patient_rate"] == pytest.approx(0.625)
    assert m["image_rate"] == m["accuracy"] and m["n_patients"] == 4


def test_multiclass_macro_by_hand():
    y = [0, 1, 2, 2]
    pred = [0, 2, 2, 2]
    probs = np.eye(3)[pred] * 0.8 + 0.2 / 3
    m = compute_metrics(y, probs, ["a", "b", "c"])
    # per class precision: a 1, b NaN (never predicted), c 2/3; recall a 1, b 0, c 1
    assert m["recall"] == pytest.approx((1 + 0 + 1) / 3)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    assert m["confusion"] == [[1, 0, 0], [0, 0, 1], [0, 0, 2]]


def test_undefined_metrics_are_nan_not_errors(caplog):
    m = compute_metrics([1, 1, 1], np.array([[0.2, 0.8]] * 3), ["benign", "malignant"])
    assert math.isnan(m["auc"]) and m["accuracy"] == 1.0
    assert "AUC is undefined" in caplog.text
    m = compute_metrics([0, 1], np.array([[0.9, 0.1]] * 2), ["benign", "malignant"])
    assert math.isnan(m["precision"])  # nothing predicted positive
    empty = compute_metrics([], np.zeros((0, 2)), ["benign", "malignant"])
    assert empty["n_images"] == 0 and math.isnan(empty["accuracy"])


def test_patient_rate_is_mean_of_patient_shares():
    # patient x: 3 images, all right; patient y: 1 image, wrong -> 0.5, not 3/4
    assert patient_rate([0, 0, 0, 1], [0, 0, 0, 0], ["x", "x", "x", "y"]) == 0.5
