"""Validation graphs (matplotlib PNGs) of a run: curves, comparisons, confusion matrices."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

CURVE_METRICS = ("accuracy", "precision", "recall", "f1")
SELECTION_METRIC = "balanced_accuracy"  # what early stopping and head selection look at
# Panels of the curves figure: title, metrics drawn in it, whether the y axis is [0, 1].
CURVE_PANELS = (
    ("loss", ("loss",), False),
    ("balanced accuracy (selection)", ("balanced_accuracy",), True),
    ("accuracy", ("accuracy",), True),
    ("precision / recall / F1", ("precision", "recall", "f1"), True),
)
SIDES = (("train", "--"), ("val", "-"))
CV_KEY = "cv_balanced_accuracy"  # the logreg head's C is chosen on this, not on val


def mag_label(m) -> str:
    """`40`, `"40"` or `"40x"` -> `"40X"`, the way the dataset and papers write it; other
    values (`"all"`) unchanged."""
    text = str(m).strip()
    digits = text[:-1] if text[-1:] in "xX" else text
    return f"{int(digits)}X" if digits.isdigit() else text


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _series(history: list[dict], key: str) -> list[float]:
    out = []
    for h in history:
        v = h.get(key)
        out.append(np.nan if v is None else float(v))
    return out


def selected_epoch(history) -> int | None:
    """The epoch (for logreg, the candidate C) whose head the run kept, as the run recorded
    it (history's `selected` column), so figures, TensorBoard and notebooks mark one and the
    same head. A history written before that column gets the runner's own rule: the first
    best grouped-CV score where C was chosen by CV, else the first best val balanced
    accuracy."""
    rows = history.to_dict("records") if hasattr(history, "to_dict") else list(history)
    if not rows:
        return None
    marked = [int(h["epoch"]) for h in rows if h.get("selected") in (True, 1, "True")]
    if marked:
        return marked[0]
    if any("selected" in h for h in rows):
        return None
    for key in (CV_KEY, "val_balanced_accuracy"):
        scores = np.array(_series(rows, key))
        if not np.isnan(scores).all():
            return int(rows[int(np.nanargmax(scores))]["epoch"])
    return None


def _selection_title(history: list[dict]) -> str:
    if not _is_c_grid(history):
        return "balanced accuracy (early stopping)"
    by_cv = not np.isnan(_series(history, CV_KEY)).all()
    return f"balanced accuracy ({'grouped CV' if by_cv else 'val'} picks C)"


def _mark_epoch(ax, epoch: int | None, label: bool, history: list[dict] | None = None) -> None:
    if epoch is not None:
        what = f"C = {_c_of(history, epoch)}" if _is_c_grid(history) else f"epoch {epoch}"
        text = f"selected ({what})" if label else "_nolegend_"
        ax.axvline(epoch, color="0.3", lw=1.2, ls=":", label=text)


def _is_c_grid(history: list[dict] | None) -> bool:
    """A logreg head's history has one row per candidate C, not per epoch."""
    return bool(history) and "C" in history[0]


def _c_of(history: list[dict], k: int) -> str:
    return f"{history[k - 1]['C']:g}"


def _x_axis(ax, history: list[dict]) -> None:
    if _is_c_grid(history):
        ax.set_xlabel("C (logistic regression, candidates)")
        ax.set_xticks([int(h["epoch"]) for h in history])
        ax.set_xticklabels([f"{h['C']:g}" for h in history], fontsize=7)
    else:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def curves_figure(history: list[dict], title: str, best_epoch: int | None = None):
    """Loss, the selection metric (balanced accuracy), accuracy and precision/recall/F1
    over epochs (logreg: candidates of C), train dashed and val solid, so over- or
    under-fitting and the reason the kept head was kept (`best_epoch`, dotted line: pass
    the run's own, or `selected_epoch` of a saved history) are visible in one figure. Where
    grouped CV chose C, its score is drawn too: it is the curve the selection followed."""
    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(4.2 * len(CURVE_PANELS), 3.6))
    epochs = [int(h["epoch"]) for h in history]
    for k, (ax, (name, metrics, unit)) in enumerate(zip(axes, CURVE_PANELS, strict=True)):
        for j, m in enumerate(metrics):
            colour = None if len(metrics) == 1 else f"C{j + 2}"
            for i, (side, style) in enumerate(SIDES):
                label = side if len(metrics) == 1 else f"{side} {m}"
                ax.plot(
                    epochs, _series(history, f"{side}_{m}"), style, marker=".",
                    color=colour or f"C{i}", label=label,
                )  # fmt: skip
        if metrics == (SELECTION_METRIC,) and not np.isnan(_series(history, CV_KEY)).all():
            ax.plot(epochs, _series(history, CV_KEY), "-", marker="s", ms=4, color="C3",
                    label="grouped CV (train + val patients)")  # fmt: skip
        _mark_epoch(ax, best_epoch, label=k == 0, history=history)
        ax.set_title(_selection_title(history) if metrics == (SELECTION_METRIC,) else name)
        _x_axis(ax, history)
        ax.set_ylabel(metrics[0].replace("_", " ") if len(metrics) == 1 else "score")
        if unit:
            ax.set_ylim(-0.03, 1.05)
        ax.grid(alpha=0.3)
        # below the panel: scores sit near 1 and a legend inside would hide them
        ax.legend(fontsize=8, ncol=3, loc="upper center",
                  bbox_to_anchor=(0.5, -0.3), frameon=False)  # fmt: skip
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(history: list[dict], title: str, path: Path, best_epoch: int | None = None) -> Path:
    return save_figure(curves_figure(history, title, best_epoch=best_epoch), path)


def group_histories(
    histories: dict[str, list], groups: dict[str, str] | None = None
) -> dict[str, list[list[dict]]]:
    """Architecture -> the histories of its heads (folds, repeats). Accepts head name ->
    history with `groups` (head name -> architecture; a head not in it is its own group),
    or architecture -> list of histories as it is."""
    out: dict[str, list[list[dict]]] = {}
    for name, h in histories.items():
        many = bool(h) and isinstance(h[0], list)
        key = name if groups is None else groups.get(name, name)
        out.setdefault(key, []).extend(h if many else [h])
    return out


def epoch_band(runs: list[list[dict]], key: str) -> tuple[np.ndarray, ...]:
    """Epochs, mean, std and count of the heads that reached each epoch. Heads stop at
    different epochs (early stopping): each epoch averages the heads still training."""
    table: dict[int, list[float]] = {}
    for history in runs:
        for h in history:
            v = h.get(key)
            if v is not None and not np.isnan(float(v)):
                table.setdefault(int(h["epoch"]), []).append(float(v))
    epochs = np.array(sorted(table), dtype=int)
    vals = [np.array(table[e]) for e in epochs]
    mean = np.array([v.mean() for v in vals])
    std = np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals])
    return epochs, mean, std, np.array([len(v) for v in vals])


def _band_line(ax, arch: str, runs: list[list[dict]], key: str, colour: str) -> None:
    epochs, mean, std, count = epoch_band(runs, key)
    if not len(epochs):
        return
    n = len(runs)
    if n == 1:
        ax.plot(epochs, mean, marker=".", color=colour, label=arch)
        return
    full = count == n
    ax.fill_between(epochs, mean - std, mean + std, color=colour, alpha=0.2, lw=0)
    ax.plot(
        epochs[full], mean[full], marker=".", color=colour, label=f"{arch} (mean ± std, n={n})"
    )  # the band: ± 1 std over folds/repeats
    if not full.all():  # fewer heads from here on: dotted, so the drop in n is visible
        start = max(int(np.argmin(full)) - 1, 0)
        ax.plot(epochs[start:], mean[start:], ":", marker=".", ms=3, color=colour)


def comparison_figure(
    histories: dict[str, list], metric: str, run: str, groups: dict[str, str] | None = None
):
    """Validation `metric` per architecture; with folds or repeats, the mean over them with a
    ± std band, so one lucky fold does not pass for an architecture's curve."""
    grouped = group_histories(histories, groups)
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for k, (arch, runs) in enumerate(grouped.items()):
        _band_line(ax, arch, runs, f"val_{metric}", f"C{k % 10}")
    ax.set_title(f"Validation {metric.replace('_', ' ')} by architecture ({run})")
    first = next((runs[0] for runs in grouped.values() if runs and runs[0]), [])
    _x_axis(ax, first)
    ax.set_ylabel(f"val {metric.replace('_', ' ')}")
    if metric != "loss":
        ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    _band_legend(ax, grouped)
    fig.tight_layout()
    return fig


def _band_legend(ax, grouped: dict[str, list]) -> None:
    """Say what the band and the dotted tail mean in the legend itself, where it is read:
    each architecture's entry shows its own band's colour behind its line."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles, labels = ax.get_legend_handles_labels()
    for k, (handle, label) in enumerate(zip(handles, labels, strict=True)):
        if label.endswith(")") and "mean ± std" in label:
            band = Patch(facecolor=handle.get_color(), alpha=0.2, lw=0)
            handles[k] = (band, handle)
    if any(len(r) > 1 for r in grouped.values()):
        ends = {len(h) for runs in grouped.values() for h in runs}
        if len(ends) > 1:
            handles.append(Line2D([], [], ls=":", color="0.3"))
            labels.append("dotted: mean of the heads still training\n(the others stopped early)")
    ax.legend(handles, labels, fontsize=8)


def plot_comparison(
    histories: dict[str, list],
    metric: str,
    run: str,
    path: Path,
    groups: dict[str, str] | None = None,
) -> Path:
    return save_figure(comparison_figure(histories, metric, run, groups), path)


def confusion_figure(matrix, classes: list[str], title: str):
    """scikit-learn's confusion matrix display, sized so that two classes and a long title
    (architecture, side, folds) still leave a readable panel in a notebook."""
    from sklearn.metrics import ConfusionMatrixDisplay

    k = len(classes)
    cell = 0.85 if k <= 4 else 0.6
    fig, ax = plt.subplots(figsize=(2.6 + cell * k, 2.3 + cell * k))
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=classes).plot(
        ax=ax, cmap="Blues", colorbar=False, values_format="d"
    )
    ax.set_title(title, fontsize=10, wrap=True)
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    fig.tight_layout()
    return fig


def plot_confusion(matrix, classes: list[str], title: str, path: Path) -> Path:
    return save_figure(confusion_figure(matrix, classes, title), path)


def sample_grid(index, magnifications=(40, 100, 200, 400), size: int = 160):
    """One image per subtype (rows) at each magnification (columns); blank where none."""
    from breakhis_tl.data.images import ImageError, load_rgb
    from breakhis_tl.data.index import SUBTYPES

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
                ax.set_title(mag_label(mag))
            if c == 0:
                ax.set_ylabel(f"{sub}\n{SUBTYPES[sub].replace('_', ' ')}", fontsize=8)
    fig.suptitle("One image per subtype and magnification")
    fig.tight_layout()
    return fig


def roc_figure(predictions, classes: list[str], split: str = "test"):
    """ROC curves per architecture. Binary: the positive class is the second one (malignant,
    idc), named on the axes; more classes: each class against the rest."""
    from sklearn.metrics import RocCurveDisplay

    p = predictions
    if not (p["split"] == split).any():
        split = "val"
    p = p[p["split"] == split]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for arch, g in p.groupby("arch", sort=False):
        if g["target"].nunique() < 2:
            continue
        shown = (
            [classes[1]] if len(classes) == 2 else [c for c in classes if (g["target"] == c).any()]
        )
        for c in shown:
            RocCurveDisplay.from_predictions(
                g["target"] == c,
                g[f"prob_{c}"],
                name=arch if len(classes) == 2 else f"{arch}: {c}",
                ax=ax,
            )
    ax.plot([0, 1], [0, 1], ":", color="grey")
    what = f"positive class: {classes[1]}" if len(classes) == 2 else "each class vs the rest"
    ax.set_xlabel(f"False positive rate ({what})")
    ax.set_ylabel(f"True positive rate ({what})")
    ax.set_title(f"ROC ({split})")
    return fig


def _wrap(title: str, width: int) -> str:
    """Break a long title (on spaces and hyphens; an overlong word is cut) so that titles of
    neighbouring images in a grid do not overlap."""
    import textwrap

    return "\n".join(textwrap.wrap(title, width, break_on_hyphens=True)) or title


def image_grid(paths, titles=None, cols: int = 4):
    """Images (say, Grad-CAM figures) side by side; long titles wrap onto several lines
    instead of running into the next image's title."""
    from PIL import Image

    n = len(paths)
    cols = max(1, min(cols, n))
    rows = max(1, -(-n // cols))
    aspect = 1.0
    if n:
        with Image.open(paths[0]) as first:
            aspect = min(max(first.width / first.height, 1.0), 3.0)
    width = 3.2 * aspect  # inches per cell: wide images (Grad-CAM figures) get wider cells
    titles = [_wrap(t, int(9 * width)) if t else "" for t in (titles or [""] * n)]
    lines = max([t.count("\n") + 1 for t in titles] + [1])
    height = 3.0 + 0.16 * lines
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, path, title in zip(axes.flat, paths, titles, strict=False):
        ax.imshow(Image.open(path))
        if title:
            ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def stain_figure(paths, ref=None, seed: int = 0, size: int = 224):
    """The same images as they are, under each normalisation and as two HED-light stain
    views: what `--stain` and `--stain-views` feed the backbone (a centre crop of `size`,
    the backbone's own crop). A failed normalisation shows the image unchanged, titled so.
    `ref`: the reference image of both normalisations (None: Macenko's library reference,
    and Reinhard fitted on the first image)."""
    from breakhis_tl.data.images import load_rgb
    from breakhis_tl.data.stain import StainNormaliser, stain_view
    from breakhis_tl.data.transforms import Preprocessing, decode_transform

    decode = decode_transform(Preprocessing(input_size=size, resize_size=size))

    methods = {"as scanned": None, "Macenko": StainNormaliser("macenko", ref),
               "Reinhard": StainNormaliser("reinhard", ref or paths[0])}  # fmt: skip
    titles = [*methods, "HED-light view 1", "HED-light view 2"]
    fig, axes = plt.subplots(len(paths), len(titles), figsize=(2.3 * len(titles), 2.5 * len(paths)),
                             squeeze=False)  # fmt: skip
    for row, path in zip(axes, paths, strict=True):
        image = load_rgb(path)
        shown = []
        for name, norm in methods.items():
            out, note = (image, None) if norm is None else norm.apply(image, str(path))
            shown.append((out, f"{name}\n(failed: unchanged)" if note else name))
        shown += [(stain_view(image, seed, str(path), v), titles[2 + v]) for v in (1, 2)]
        for ax, (im, title) in zip(row, shown, strict=True):
            ax.imshow(decode(im).permute(1, 2, 0).numpy())
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        row[0].text(-0.04, 0.5, Path(path).stem, transform=row[0].transAxes, rotation=90,
                    va="center", ha="right", fontsize=7)  # fmt: skip
    target = Path(ref).name if ref else f"torchstain's (Macenko), {Path(paths[0]).name} (Reinhard)"
    fig.suptitle(f"Stain normalisation and HED-light jitter; reference: {target}", fontsize=9)
    fig.tight_layout()
    return fig
