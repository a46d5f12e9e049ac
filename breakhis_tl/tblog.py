"""TensorBoard logging of one head's training: scalars per epoch, figures and hparams at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from breakhis_tl.metrics import METRICS
from breakhis_tl.plots import confusion_figure


def open_writer(folder: Path, text: dict[str, str]) -> SummaryWriter:
    writer = SummaryWriter(log_dir=str(folder))
    for tag, value in text.items():
        writer.add_text(tag, f"```\n{value}\n```")
    return writer


def log_epoch(writer: SummaryWriter, epoch: int, logs: dict) -> None:
    writer.add_scalars("loss", {"train": logs["train_loss"], "val": logs["val_loss"]}, epoch)
    for m in METRICS:
        for side in ("train", "val"):
            v = logs.get(f"{side}_{m}")
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                writer.add_scalar(f"{side}/{m}", v, epoch)
    writer.flush()


def log_final(
    writer: SummaryWriter,
    evals: dict[str, tuple[dict, np.ndarray, np.ndarray]],
    classes: list[str],
    hparams: dict,
    title: str,
) -> None:
    """`evals`: split -> (metrics, labels, probabilities) of the best head."""
    final = {}
    for split, (metrics, y, probs) in evals.items():
        fig = confusion_figure(metrics["confusion"], classes, f"{title} ({split})")
        writer.add_figure(f"confusion/{split}", fig)
        if len(y):
            pairs = (
                [("", 1)] if len(classes) == 2 else [(f"/{c}", k) for k, c in enumerate(classes)]
            )
            for suffix, k in pairs:
                writer.add_pr_curve(
                    f"pr/{split}{suffix}", torch.as_tensor(y == k), torch.as_tensor(probs[:, k])
                )
        final.update(
            {
                f"hparam/{split}_{m}": metrics[m]
                for m in METRICS
                if isinstance(metrics.get(m), float) and not math.isnan(metrics[m])
            }
        )
    clean = {
        k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
        for k, v in hparams.items()
    }
    writer.add_hparams(clean, final, run_name=".")
    writer.flush()
