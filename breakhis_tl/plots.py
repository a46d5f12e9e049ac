"""Validation graphs (matplotlib PNGs) of a run: curves, comparisons, confusion matrices."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

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
