"""Grad-CAM figures: input crop, overlay, colour bar, predicted and true class."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from breakhis_tl import cam  # noqa: E402
from breakhis_tl.predict import Classifier  # noqa: E402


@pytest.mark.parametrize(
    ("name", "truth"),
    [
        (
            "SOB_M_DC-14-2523-40-010.png",
            {"label": "malignant", "subtype": "DC", "magnification": 40},
        ),
        (
            "SOB_B_TA-14-3411F-400-007.png",
            {"label": "benign", "subtype": "TA", "magnification": 400},
        ),
        ("10253_idx5_x1001_y1351_class0.png", {"label": "non_idc"}),
        ("10253_idx5_x501_y351_class1.png", {"label": "idc"}),
        ("photo.png", None),
    ],
)
def test_true_class_from_the_file_name(name, truth):
    assert cam.true_class(name) == truth


def test_caption_says_predicted_probability_and_truth():
    probs = np.array([0.2, 0.8])
    text, ok = cam.caption("SOB_B_A-14-22549AB-100-001.png", ["benign", "malignant"], probs)
    assert text == "predicted: malignant (p = 0.80) | true: benign, A (adenosis), 100X"
    assert ok is False
    subtypes = ["A", "F", "PT", "TA", "DC", "LC", "MC", "PC"]
    probs = np.eye(8)[4] * 0.9 + 0.0125
    text, ok = cam.caption("SOB_M_DC-14-2523-40-010.png", subtypes, probs)
    assert text.startswith("predicted: DC (p = 0.91)") and "(ductal carcinoma), 40X" in text and ok
    text, ok = cam.caption("x1_class1.png", ["non_idc", "idc"], np.array([0.3, 0.7]))
    assert text.endswith("true class unknown") and ok is None
    text, ok = cam.caption("9_idx5_x1_y2_class1.png", ["non_idc", "idc"], np.array([0.3, 0.7]))
    assert text.endswith("true: idc") and ok is True


@pytest.fixture(scope="module")
def clf(sample_run):
    return Classifier.from_head(sample_run[1].heads["efficientnet_lite0"], device="cpu")


def test_save_cams_figure(clf, breakhis_sample, tmp_path, monkeypatch):
    paths = sorted(str(p) for p in breakhis_sample.rglob("*.png"))
    paths = [next(p for p in paths if "SOB_B_" in p), next(p for p in paths if "SOB_M_" in p)]
    seen = []
    real = cam.save_figure

    def spy(fig, path):
        fig.canvas.draw()
        seen.append((fig._suptitle.get_text(), [ax.get_label() for ax in fig.axes], fig))
        return real(fig, path)

    monkeypatch.setattr(cam, "save_figure", spy)
    written = cam.save_cams(clf, paths, tmp_path)
    expected = clf.predict(paths, workers=0, progress=False)
    assert [p.name for p in written] == [f"{p.rsplit('/', 1)[1][:-4]}_cam.png" for p in paths]
    for (title, labels, fig), row, path in zip(seen, expected.itertuples(), paths, strict=True):
        prob = getattr(row, f"prob_{row.prediction}")
        assert f"predicted: {row.prediction} (p = {prob:.2f})" in title
        truth = cam.true_class(path)
        assert f"true: {truth['label']}, {truth['subtype']}" in title
        assert labels.count("<colorbar>") == 1 and len(fig.axes) == 3
        bar = next(ax for ax in fig.axes if ax.get_label() == "<colorbar>")
        assert "relevance" in bar.get_ylabel()
        crop, overlay = fig.axes[0].get_images(), fig.axes[1].get_images()
        assert len(crop) == 1 and len(overlay) == 2  # the crop alone; the crop under the heat
        assert crop[0].get_array().shape[:2] == (224, 224)
    with Image.open(written[0]) as im:
        assert im.width > 1.6 * im.height  # crop and overlay side by side


def test_both_classes_of_the_default_head_have_a_map(clf, breakhis_sample):
    """The default (logistic regression) head has a row per class, so an image predicted
    benign gets a Grad-CAM of its class as one predicted malignant does: non-zero (a row of
    zeros for class 0 made every benign map 0 everywhere)."""
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from breakhis_tl.data.transforms import decode_transform, normalize

    assert clf.meta["head"] == "logreg"
    paths = sorted(str(p) for p in breakhis_sample.rglob("*.png"))
    pred = clf.predict(paths, workers=0, progress=False)["prediction"].tolist()
    chosen = {c: paths[pred.index(c)] for c in clf.classes}  # one image predicted each class
    model = cam._Full(clf.backbone.module, clf.head).float()
    layer = cam.target_layer(clf.meta["arch"], clf.backbone.module)
    with GradCAM(model=model, target_layers=[layer]) as grad_cam:
        grad_cam.compute_input_gradient = True
        for k, c in enumerate(clf.classes):
            with Image.open(chosen[c]) as im:
                x = normalize(decode_transform(clf.prep)(im.convert("RGB")), clf.prep)[None]
            with torch.enable_grad():
                heat = grad_cam(input_tensor=x, targets=[ClassifierOutputTarget(k)])[0]
            assert heat.max() > 0, (chosen[c], c)


def test_tta_cam_title_is_the_predictions_row(clf, head_file, breakhis_sample, tmp_path,
                                              monkeypatch):  # fmt: skip
    """`predict --tta --cam DIR`: each figure's title gives the class and probability of its
    row in predictions.csv (the mean over the 8 views), and the map is of that class (the
    title said p = 0.71 where the CSV said 0.578 for SOB_B_F-14-25197-400-033)."""
    import pandas as pd
    from pytorch_grad_cam.utils import model_targets

    from breakhis_tl.cli import main

    def top(df):
        return [f"{r.prediction} {getattr(r, f'prob_{r.prediction}'):.2f}" for r in df.itertuples()]

    paths = sorted(str(p) for p in breakhis_sample.rglob("*.png"))
    plain = top(clf.predict(paths, workers=0, progress=False))
    tta = top(clf.predict(paths, tta=True, workers=0, progress=False))
    differ = [p for p, a, b in zip(paths, plain, tta, strict=True) if a != b][:2]
    assert len(differ) == 2  # images whose title would show the wrong number without TTA
    titles, targets = [], []
    real_save, real_target = cam.save_figure, model_targets.ClassifierOutputTarget

    def spy(fig, path):
        titles.append(fig._suptitle.get_text())
        return real_save(fig, path)

    def target(k):
        targets.append(k)
        return real_target(k)

    monkeypatch.setattr(cam, "save_figure", spy)
    monkeypatch.setattr(model_targets, "ClassifierOutputTarget", target)
    out = tmp_path / "preds.csv"
    args = ["predict", "--head", str(head_file), *differ, "--device", "cpu", "--workers", "0"]
    assert main([*args, "--tta", "--cam", str(tmp_path / "cam"), "--out", str(out)]) == 0
    rows = pd.read_csv(out)
    assert len(titles) == len(rows) == 2
    for title, k, row in zip(titles, targets, rows.itertuples(), strict=True):
        prob = getattr(row, f"prob_{row.prediction}")
        assert f"predicted: {row.prediction} (p = {prob:.2f}, mean of 8 views)" in title, title
        assert clf.classes[k] == row.prediction  # the map explains the class the CSV gives
