"""Validation graphs (matplotlib PNGs) of a run: curves, comparisons, confusion matrices."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

CURVE_METRICS = ("accuracy", "precision", "recall", "f1")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def curves_figure(history: list[dict], title: str):
    """Accuracy, precision, recall and F1 over epochs, train and val."""
    fig, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(4 * len(CURVE_METRICS), 3.4))
    epochs = [h["epoch"] for h in history]
    for ax, m in zip(axes, CURVE_METRICS, strict=True):
        for side, style in (("train", "--"), ("val", "-")):
            ax.plot(
                epochs,
                [h.get(f"{side}_{m}", np.nan) for h in history],
                style,
                marker=".",
                label=side,
            )
        ax.set_title(m.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.set_ylabel(m)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(history: list[dict], title: str, path: Path) -> Path:
    return _save(curves_figure(history, title), path)


def plot_comparison(histories: dict[str, list[dict]], metric: str, run: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, history in histories.items():
        ax.plot(
            [h["epoch"] for h in history],
            [h.get(f"val_{metric}", np.nan) for h in history],
            marker=".",
            label=name,
        )
    ax.set_title(f"Validation {metric.replace('_', ' ')} by architecture ({run})")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"val {metric}")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def confusion_figure(matrix, classes: list[str], title: str):
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(classes), 1.0 + 0.7 * len(classes)))
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=classes).plot(
        ax=ax, cmap="Blues", colorbar=False, values_format="d"
    )
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    fig.tight_layout()
    return fig


def plot_confusion(matrix, classes: list[str], title: str, path: Path) -> Path:
    return _save(confusion_figure(matrix, classes, title), path)


def sample_grid(index, magnifications=(40, 100, 200, 400), size: int = 160):
    """One image per subtype (rows) at each magnification (columns); blank where none."""
    from breakhis_tl.images import ImageError, load_rgb
    from breakhis_tl.index import SUBTYPES

    subtypes = [s for s in SUBTYPES if s in set(index["subtype"])]
    fig, axes = plt.subplots(
        len(subtypes),
        len(magnifications),
        squeeze=False,
        figsize=(2.2 * len(magnifications), 1.6 * len(subtypes)),
    )
    for r, sub in enumerate(subtypes):
        for c, mag in enumerate(magnifications):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            rows = index[(index["subtype"] == sub) & (index["magnification"] == mag)]
            if len(rows):
                try:
                    im = load_rgb(rows["path"].iloc[0])
                    im.thumbnail((size, size))
                    ax.imshow(im)
                except ImageError:
                    pass
            if r == 0:
                ax.set_title(f"{mag}X")
            if c == 0:
                ax.set_ylabel(f"{sub}\n{SUBTYPES[sub]}", fontsize=8)
    fig.suptitle("One image per subtype and magnification")
    fig.tight_layout()
    return fig


def roc_figure(predictions, classes: list[str], split: str = "test"):
    """ROC curves per architecture (binary: positive = second class; else one-vs-rest macro)."""
    from sklearn.metrics import RocCurveDisplay

    p = predictions
    if not (p["split"] == split).any():
        split = "val"
    p = p[p["split"] == split]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for arch, g in p.groupby("arch", sort=False):
        if g["target"].nunique() < 2:
            continue
        if len(classes) == 2:
            RocCurveDisplay.from_predictions(
                g["target"] == classes[1], g[f"prob_{classes[1]}"], name=arch, ax=ax
            )
        else:
            for c in classes:
                if (g["target"] == c).any():
                    RocCurveDisplay.from_predictions(
                        g["target"] == c, g[f"prob_{c}"], name=f"{arch}: {c}", ax=ax
                    )
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_title(f"ROC ({split})")
    return fig


def image_grid(paths, titles=None, cols: int = 4):
    """Images (say, Grad-CAM overlays) side by side with their titles."""
    from PIL import Image

    n = len(paths)
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, path, title in zip(axes.flat, paths, titles or [None] * n, strict=False):
        ax.imshow(Image.open(path))
        if title:
            ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig
