"""TensorBoard logging of one head's training: scalars per epoch, figures and hparams at the end.

Layout, one run (folder) per head, nothing else:

* SCALARS: tags grouped by metric, `loss/train`, `loss/val`, `balanced_accuracy/train`, ...,
  so train and val of one metric sit in one section; `balanced_accuracy/cv` is the
  grouped-CV score that picks the logreg head's C, where C was picked so. `add_scalars` is
  not used: it writes a sub-run folder per curve, which shows up as extra runs.
* CUSTOM SCALARS: one chart per metric with train and val overlaid (a layout, not more data).
* The selected head's final val and test metrics, one point each at the selected epoch, as
  `selected/val_<metric>` and `selected/test_<metric>`. The HPARAMS plugin can only show metric
  values that are scalar series of the session's run (or of a sub-run, which would be another
  run folder), so these are its metrics. They form one section that sorts after every metric
  section, instead of `hparam/*` single-point charts at the top of SCALARS or a single point
  at the top of each metric's section; CUSTOM SCALARS overlays them on the curves.
* HPARAMS: the experiment, session start and end summaries written into the head's own run
  (`add_hparams` would open a second writer in a sub-folder).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from breakhis_tl.metrics import METRICS
from breakhis_tl.report.plots import CV_KEY, confusion_figure

SIDES = ("train", "val")
CURVES = ("loss", *METRICS)
FINAL_SPLITS = ("val", "test")  # the selected head's metrics in HPARAMS: selection and report
# HPARAMS shows the first metrics by default: the selection metric and the usual report first
_FIRST = ("balanced_accuracy", "auc", "f1", "patient_rate")
FINAL_METRICS = _FIRST + tuple(m for m in METRICS if m not in _FIRST)


def curve_tag(metric: str, side: str) -> str:
    """`loss/train`, `balanced_accuracy/val`: grouped by metric, then side."""
    return f"{metric}/{side}"


def selected_tag(metric: str, split: str) -> str:
    """The tag of the selected head's final `metric` on `split`, read by the HPARAMS tab."""
    return f"selected/{split}_{metric}"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _layout() -> dict:
    """Custom-scalars layout: train, val and the selected head's points of a metric in one
    chart, which SCALARS cannot do without a sub-run per curve."""
    charts = {m: ["Multiline", [f"^{m}/(train|val|cv)$", f"^selected/[a-z]+_{m}$"]] for m in CURVES}
    return {"train vs val": charts}


def open_writer(folder: Path, text: dict[str, str]) -> SummaryWriter:
    writer = SummaryWriter(log_dir=str(folder))
    for tag, value in text.items():
        writer.add_text(tag, f"```\n{value}\n```")
    writer.add_custom_scalars(_layout())
    return writer


def log_epoch(writer: SummaryWriter, epoch: int, logs: dict) -> None:
    """One scalar per metric and side; NaN (undefined) metrics are left out, not drawn as 0."""
    for m in CURVES:
        for side in SIDES:
            v = logs.get(f"{side}_{m}")
            if _finite(v):
                writer.add_scalar(curve_tag(m, side), v, epoch)
    if _finite(logs.get(CV_KEY)):  # the score that picks logreg's C: drawn beside val
        writer.add_scalar(curve_tag("balanced_accuracy", "cv"), logs[CV_KEY], epoch)
    writer.breakhis_last_epoch = epoch  # where log_final puts its points without best_epoch
    writer.flush()


def _log_figures(writer, evals, classes, title) -> None:
    for split, (metrics, y, probs) in evals.items():
        fig = confusion_figure(metrics["confusion"], classes, f"{title} ({split})")
        writer.add_figure(f"confusion/{split}", fig)
        if not len(y):
            continue
        pairs = [("", 1)] if len(classes) == 2 else [(f"/{c}", k) for k, c in enumerate(classes)]
        for suffix, k in pairs:
            writer.add_pr_curve(
                f"pr/{split}{suffix}", torch.as_tensor(y == k), torch.as_tensor(probs[:, k])
            )


def log_final(
    writer: SummaryWriter,
    evals: dict[str, tuple[dict, np.ndarray, np.ndarray]],
    classes: list[str],
    hparams: dict,
    title: str,
    best_epoch: int | None = None,
    hparam_domains: dict[str, list] | None = None,
) -> None:
    """`evals`: split -> (metrics, labels, probabilities) of the selected head.

    `best_epoch` places the final metrics at the selected epoch on the curves' x axis (the
    last logged step when not given). `hparam_domains` (name -> all values in this run, e.g.
    every architecture) lets the HPARAMS tab filter by value.
    """
    _log_figures(writer, evals, classes, title)
    step = best_epoch if best_epoch is not None else getattr(writer, "breakhis_last_epoch", 0)
    final = {}
    for split in (s for s in FINAL_SPLITS if s in evals):
        metrics = evals[split][0]
        for m in FINAL_METRICS:
            final[selected_tag(m, split)] = metrics.get(m)
            if _finite(metrics.get(m)):
                writer.add_scalar(selected_tag(m, split), metrics[m], step)
    clean = {
        k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
        for k, v in hparams.items()
    }
    domains = {  # a domain of another type than the value would make torch raise
        k: list(v)
        for k, v in (hparam_domains or {}).items()
        if k in clean and all(type(d) is type(clean[k]) for d in v)
    }
    for summary in hparams_summaries(clean, final, domains):  # experiment, start, end
        writer.file_writer.add_summary(summary)
    writer.flush()
