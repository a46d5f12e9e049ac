"""Validation graphs and TensorBoard logs, checked on histories from the real epoch loop."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import drawn
from matplotlib.collections import PolyCollection  # noqa: E402

from breakhis_tl.heads.modules import make_head  # noqa: E402
from breakhis_tl.heads.training import Hooks, TrainConfig, feature_batches, fit  # noqa: E402
from breakhis_tl.metrics import METRICS, compute_metrics  # noqa: E402
from breakhis_tl.report import (
    plots,
    tblog,  # noqa: E402
)

CLASSES = ["benign", "malignant"]


def _train(seed: int, epochs: int = 25, patience: int = 4, on_epoch=None):
    """A real head on noisy synthetic features: real history keys, early stopping included."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(240, generator=g) < 0.69).long()  # BreakHis is 69% malignant
    x = torch.randn(240, 16, generator=g) + 0.6 * y[:, None].float()
    tr, va = slice(0, 160), slice(160, 240)
    head = make_head("linear", 16, 2)
    cfg = TrainConfig(epochs=epochs, patience=patience, lr=3e-2, batch_size=32, seed=seed)

    def evaluate_val(h):
        with torch.no_grad():
            p = torch.softmax(h(x[va]), 1).numpy()
        return y[va].numpy(), p, [f"p{i % 9}" for i in range(80)]

    batches = feature_batches(x[tr].half(), y[tr], cfg.batch_size, seed)
    result = fit(head, batches, evaluate_val, y[tr].numpy(), CLASSES, cfg, Hooks(on_epoch))
    return result, head, evaluate_val


@pytest.fixture(scope="module")
def folds():
    """Five heads ("folds") of one architecture; early stopping ends them at their own epoch."""
    return [_train(seed)[0] for seed in range(5)]


# --- item 11: magnifications and ROC -------------------------------------------------------


@pytest.mark.parametrize(
    ("m", "text"), [(40, "40X"), ("100", "100X"), ("200x", "200X"), ("all", "all")]
)
def test_mag_label(m, text):
    assert plots.mag_label(m) == text


def _predictions(classes, n=60, seed=0):
    rng = np.random.default_rng(seed)
    target = rng.choice(classes, n)
    probs = rng.dirichlet(np.ones(len(classes)), n)
    for i, t in enumerate(target):  # informative, not perfect
        probs[i, classes.index(t)] += 0.5
    probs /= probs.sum(1, keepdims=True)
    frame = pd.DataFrame({"arch": "resnet50", "split": "test", "target": target})
    for k, c in enumerate(classes):
        frame[f"prob_{c}"] = probs[:, k]
    return frame


def test_roc_names_the_positive_class():
    fig = plots.roc_figure(_predictions(CLASSES), CLASSES)
    ax = fig.axes[0]
    for label in (ax.get_xlabel(), ax.get_ylabel()):
        assert "positive class: malignant" in label and "Positive label" not in label
    assert any("resnet50" in t.get_text() for t in ax.get_legend().get_texts())
    plt.close(fig)
    subtypes = ["A", "F", "DC", "LC"]
    fig = plots.roc_figure(_predictions(subtypes), subtypes)
    assert "each class vs the rest" in fig.axes[0].get_xlabel()
    assert len(fig.axes[0].get_legend().get_texts()) == 4
    plt.close(fig)


def test_sample_grid_writes_magnifications_with_x(breakhis_sample):
    from breakhis_tl.data.index import index_breakhis

    fig = plots.sample_grid(index_breakhis(breakhis_sample))
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["40X", "100X", "200X", "400X"]
    plt.close(fig)


# --- item 8: curves of one head ------------------------------------------------------------


def _vlines(ax):
    return [
        ln for ln in ax.get_lines() if len(set(ln.get_xdata())) == 1 and len(ln.get_xdata()) == 2
    ]


def test_curves_show_loss_balanced_accuracy_and_the_selected_epoch(folds, tmp_path):
    res = max(folds, key=lambda r: len(r.history))
    fig = plots.curves_figure(res.history, "resnet50 (demo)", best_epoch=res.best_epoch)
    assert len(fig.axes) == 4
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "loss" and "balanced accuracy" in titles[1]
    assert "accuracy" == titles[2] and "F1" in titles[3]
    loss = {ln.get_label(): list(ln.get_ydata()) for ln in fig.axes[0].get_lines()}
    assert loss["train"] == pytest.approx([h["train_loss"] for h in res.history])
    assert loss["val"] == pytest.approx([h["val_loss"] for h in res.history])
    bacc = {ln.get_label(): list(ln.get_ydata()) for ln in fig.axes[1].get_lines()}
    assert bacc["val"] == pytest.approx([h["val_balanced_accuracy"] for h in res.history])
    assert len(fig.axes[3].get_lines()) == 6 + 1  # P, R, F1 x train, val + the mark
    for ax in fig.axes:
        (mark,) = _vlines(ax)
        assert mark.get_xdata()[0] == res.best_epoch
        fig.canvas.draw()
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert f"selected (epoch {res.best_epoch})" in legend
    plt.close(fig)
    fig = plots.curves_figure(res.history, "no mark")
    assert not any(_vlines(ax) for ax in fig.axes)
    plt.close(fig)
    path = plots.plot_curves(res.history, "t", tmp_path / "c.png", best_epoch=res.best_epoch)
    shown = drawn(path)
    assert shown["size"][0] > 3 * shown["size"][1]  # the panels side by side
    assert all(shown["colours"][c] > 50 for c in ("C0", "C1", "C2", "C3", "C4"))


# --- item 9: comparison with folds ---------------------------------------------------------


def test_folds_differ_in_length(folds):
    assert len({len(r.history) for r in folds}) > 1  # else the band test proves little


def test_epoch_band_averages_the_heads_still_running(folds):
    histories = [r.history for r in folds]
    epochs, mean, std, count = plots.epoch_band(histories, "val_balanced_accuracy")
    assert epochs.tolist() == list(range(1, max(len(h) for h in histories) + 1))
    for e, m, s, n in zip(epochs, mean, std, count, strict=True):
        vals = [h[e - 1]["val_balanced_accuracy"] for h in histories if len(h) >= e]
        assert n == len(vals) and m == pytest.approx(np.mean(vals))
        assert s == pytest.approx(np.std(vals, ddof=1) if len(vals) > 1 else 0.0)


def _comparison_parts(fig):
    ax = fig.axes[0]
    solid = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    return ax, solid, bands, legend


def test_comparison_draws_one_band_per_architecture(folds, tmp_path):
    other = [_train(seed, patience=6)[0] for seed in (10, 11, 12)]
    named = {f"resnet50_fold{k}": r.history for k, r in enumerate(folds)}
    named |= {f"vgg16_fold{k}": r.history for k, r in enumerate(other)}
    groups = {name: name.split("_fold")[0] for name in named}
    fig = plots.comparison_figure(named, "balanced_accuracy", "demo", groups=groups)
    ax, solid, bands, legend = _comparison_parts(fig)
    assert len(solid) == 2 and len(bands) == 2  # one mean line and band per arch, not 8 lines
    assert "resnet50 (mean ± std, n=5)" in legend and "vgg16 (mean ± std, n=3)" in legend
    assert any("still training" in t for t in legend) and any("std" in t for t in legend)
    assert ax.get_ylabel() == "val balanced accuracy"
    _, mean, _, count = plots.epoch_band([r.history for r in folds], "val_balanced_accuracy")
    res_line = next(ln for ln in solid if ln.get_label().startswith("resnet50"))
    assert list(res_line.get_ydata()) == pytest.approx(list(mean[count == 5]))
    plt.close(fig)
    by_arch = {"resnet50": [r.history for r in folds], "vgg16": [r.history for r in other]}
    fig = plots.comparison_figure(by_arch, "balanced_accuracy", "demo")
    assert _comparison_parts(fig)[3] == legend
    plt.close(fig)
    single = {"resnet50": folds[0].history, "vgg16": other[0].history}
    fig = plots.comparison_figure(single, "loss", "demo")
    _, solid, bands, legend = _comparison_parts(fig)
    assert len(solid) == 2 and not bands and legend == ["resnet50", "vgg16"]
    plt.close(fig)
    out = plots.plot_comparison(named, "f1", "demo", tmp_path / "cmp.png", groups=groups)
    shown = drawn(out)
    assert sum(n > 100 for n in shown["colours"].values()) >= len(set(groups.values()))


# --- item 10: image grid titles ------------------------------------------------------------


def test_image_grid_titles_do_not_run_into_each_other(tmp_path):
    from PIL import Image

    paths = []
    for k in range(4):
        paths.append(tmp_path / f"{k}.png")
        Image.new("RGB", (460, 240), (200, 120, 180 - 40 * k)).save(paths[-1])
    titles = [
        f"efficientnet_lite0_fold{k}: SOB_M_DC-14-2523-400-01{k}_cam, predicted malignant"
        for k in range(4)
    ]
    fig = plots.image_grid(paths, titles, cols=4)
    fig.canvas.draw()
    boxes = [ax.title.get_window_extent() for ax in fig.axes if ax.get_title()]
    assert len(boxes) == 4
    for a, b in zip(boxes, boxes[1:], strict=False):
        assert a.x1 <= b.x0, "neighbouring titles overlap"
    assert all("\n" in ax.get_title() for ax in fig.axes if ax.get_title())
    plt.close(fig)


# --- item 12: TensorBoard -----------------------------------------------------------------


def _log_head(folder, seed):
    writer = tblog.open_writer(folder, {"command": "pytest"})
    res, head, evaluate_val = _train(
        seed, on_epoch=lambda e, logs: tblog.log_epoch(writer, e, logs)
    )
    y, p, patients = evaluate_val(head)
    m = compute_metrics(y, p, CLASSES, patients)
    evals = {"val": (m, y, p), "test": (m, y, p)}
    hparams = {"arch": "resnet50", "fold": seed, "lr": 3e-2, "cached": True, "prep": {"a": 1}}
    domains = {"arch": ["resnet50", "vgg16"]}
    tblog.log_final(
        writer, evals, CLASSES, hparams, "t", best_epoch=res.best_epoch, hparam_domains=domains
    )
    writer.close()
    return res, m


def _runs(root):
    return sorted({p.parent.relative_to(root).as_posix() for p in root.rglob("events.out.*")})


def test_tensorboard_one_run_per_head_grouped_tags_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata as hp_meta
    from tensorboard.plugins.hparams import metrics as hp_metrics

    logs = tmp_path / "logs"
    heads = {"resnet50/fold0": _log_head(logs / "resnet50/fold0", 0)}
    heads["resnet50/fold1"] = _log_head(logs / "resnet50/fold1", 1)
    assert _runs(logs) == sorted(heads)  # no add_scalars or add_hparams sub-runs
    for run, (res, final) in heads.items():
        acc = EventAccumulator(str(logs / run), size_guidance={"tensors": 0}).Reload()
        scalars = set(acc.Tags()["scalars"])
        for m in ("loss", "balanced_accuracy", "accuracy", "precision", "recall", "f1"):
            assert {f"{m}/train", f"{m}/val"} <= scalars
            assert [e.step for e in acc.Scalars(f"{m}/val")] == list(range(1, len(res.history) + 1))
        assert [e.value for e in acc.Scalars("loss/train")] == pytest.approx(
            [h["train_loss"] for h in res.history]
        )
        assert "auc/train" not in scalars  # NaN per epoch: left out, not drawn
        curves = {t for t in scalars if not t.startswith("selected/")}
        assert {t.split("/")[1] for t in curves} == {"train", "val"}  # metric/side, no hparam/*
        assert {t.split("/")[0] for t in curves} <= {"loss", *METRICS}
        sel = acc.Scalars(tblog.selected_tag("balanced_accuracy", "test"))
        assert sel[0].value == pytest.approx(final["balanced_accuracy"])
        assert {t for t in scalars if t.startswith("selected/")} == {
            tblog.selected_tag(m, s)
            for m in METRICS
            for s in ("val", "test")
            if np.isfinite(final[m])
        }
        assert [e.step for e in sel] == [res.best_epoch]
        plugin = acc.PluginTagToContent(hp_meta.PLUGIN_NAME)
        assert set(plugin) == {
            hp_meta.EXPERIMENT_TAG,
            hp_meta.SESSION_START_INFO_TAG,
            hp_meta.SESSION_END_INFO_TAG,
        }
        start = hp_meta.parse_session_start_info_plugin_data(plugin[hp_meta.SESSION_START_INFO_TAG])
        assert start.hparams["arch"].string_value == "resnet50"
        assert start.hparams["prep"].string_value == '{"a": 1}'
        exp = hp_meta.parse_experiment_plugin_data(plugin[hp_meta.EXPERIMENT_TAG])
        names = [mi.name for mi in exp.metric_infos]
        assert {n.tag for n in names} == {
            tblog.selected_tag(m, s) for m in METRICS for s in ("val", "test")
        }
        arch = next(h for h in exp.hparam_infos if h.name == "arch")
        assert [v.string_value for v in arch.domain_discrete.values] == ["resnet50", "vgg16"]
        assert names[0].tag == tblog.selected_tag("balanced_accuracy", "val")  # shown first
        for name in names:  # what the plugin reads for each metric is in this very run
            mrun, tag = hp_metrics.run_tag_from_session_and_metric(run, name)
            assert mrun == run and (tag in scalars or not np.isfinite(final[tag.split("_", 1)[1]]))
        layout = acc.PluginTagToContent("custom_scalars")
        assert layout  # train vs val overlaid in CUSTOM SCALARS


def test_tensorboard_without_best_epoch_puts_final_points_at_the_last_epoch(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = tblog.open_writer(tmp_path, {})
    res, head, evaluate_val = _train(3, on_epoch=lambda e, logs: tblog.log_epoch(writer, e, logs))
    y, p, patients = evaluate_val(head)
    m = compute_metrics(y, p, CLASSES, patients)
    mismatched = {"arch": [1, 2]}  # ints for a string hparam: dropped, not a crash at the end
    tblog.log_final(
        writer, {"val": (m, y, p)}, CLASSES, {"arch": "x"}, "t", hparam_domains=mismatched
    )
    writer.close()
    acc = EventAccumulator(str(tmp_path)).Reload()
    assert [e.step for e in acc.Scalars("selected/val_f1")] == [len(res.history)]
    assert not any(t.startswith("selected/test") for t in acc.Tags()["scalars"])
    from tensorboard.plugins.hparams import metadata as hp_meta

    exp = acc.PluginTagToContent(hp_meta.PLUGIN_NAME)[hp_meta.EXPERIMENT_TAG]
    (arch,) = hp_meta.parse_experiment_plugin_data(exp).hparam_infos
    assert arch.name == "arch" and not arch.HasField("domain_discrete")
