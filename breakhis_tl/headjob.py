"""One head, stage by stage: its training data, its evaluation, its record, its files.

The runner decides which heads a run trains (architecture x fold x repeat); everything
about one of them lives here, so each stage can be read and named on its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from breakhis_tl import __version__
from breakhis_tl.heads.modules import make_head, save_head
from breakhis_tl.heads.training import (
    Feed,
    FitResult,
    Hooks,
    end_to_end_batches,
    end_to_end_features,
    feature_batches,
    fit,
    fit_logreg,
    fit_logreg_cv,
    predict_features,
)
from breakhis_tl.metrics import METRICS, compute_metrics
from breakhis_tl.models.backbones import Backbone, initialiser_versions
from breakhis_tl.report.plots import plot_confusion, plot_curves
from breakhis_tl.report.tblog import log_epoch, log_final, open_writer

if TYPE_CHECKING:
    from breakhis_tl.config import RunConfig

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("path", "relpath", "patient", "slide", "magnification", "subtype", "label")


def head_seed(seed: int, arch: str, fold, repeat: int) -> int:
    """A head's own seed, from what identifies it alone: trained alone or beside others,
    in any order, a head is the same."""
    text = f"{seed}/{arch}/{fold}/{repeat}"
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % (2**31 - 1)


@dataclass
class HeadJob:
    """Everything one head needs: which images, which labels, which backbone."""

    backbone: Backbone
    fold: int | None
    repeat: int
    split: pd.DataFrame  # this fold's images, with `split`
    rows: np.ndarray  # the split's rows in the run's image list
    y: np.ndarray  # class index per split row
    twins: int = 0  # test images whose picture is also in train (official folds)
    name: str = ""
    seed: int = 0
    extras: dict = field(default_factory=dict)  # backbone state a head file must carry


@dataclass
class TrainingData:
    batches: Callable  # epoch -> minibatches
    labels: np.ndarray  # training labels (with views), for class weights
    eval_feats: Callable[[str], tuple[torch.Tensor, np.ndarray]]  # side -> (x, split rows)
    skipped: list[str]
    x_train: torch.Tensor | None = None  # cached mode: the training features, in order
    groups: np.ndarray | None = None  # their patients (the logreg head's grouped CV)
    val_probs: np.ndarray | None = None  # out-of-fold val probabilities of a refit head


def runs_end_to_end(cfg: RunConfig) -> bool:
    """--no-cache runs the backbone every epoch for the heads that have epochs; logreg has
    none, so it takes the cached path's one pass, held in memory, and its C selection:
    cached and uncached logreg then differ by the disk cache alone."""
    return cfg.no_cache and cfg.train.head != "logreg"


def job_mode(ctx, job: HeadJob):
    """The compute mode this head's features came from (it is in their cache key)."""
    from breakhis_tl.models.compute import fast_path

    return ctx.modes.get((job.backbone.name, job.backbone.weights_id)) or fast_path(ctx.device)


def training_data(ctx, job: HeadJob) -> TrainingData:
    """Cached features (with the cached views of training images), or end to end."""
    cfg, t = ctx.cfg, ctx.cfg.train
    side = job.split["split"].to_numpy()
    paths = job.split["path"].tolist()
    if runs_end_to_end(cfg):
        tr = np.flatnonzero(side == "train")
        bb, fp = job.backbone, job_mode(ctx, job)
        feed = Feed(t.batch_size, ctx.device, fp, cfg.workers, ctx.stain)
        batches = end_to_end_batches(bb, [paths[i] for i in tr], job.y[tr], job.seed, feed)
        val_feed = dataclasses.replace(feed, batch_size=cfg.extract_batch)

        loaders = {}  # the val loader, its workers kept from one epoch to the next

        def eval_feats(s):
            idx = np.flatnonzero(side == s)
            chosen = [paths[i] for i in idx]
            keep = loaders if s == "val" else None
            f, ok, notes = end_to_end_features(bb, chosen, val_feed, keep)
            ctx.fallbacks.update({chosen[i]: msg for i, msg in notes.items()})
            return f[ok], idx[ok.numpy()]

        return TrainingData(batches, job.y[tr], _memo_val(eval_feats, cached=False), [])
    from breakhis_tl.config import view_pairs

    f0, ok0 = ctx.feats[(job.backbone.name, job.backbone.weights_id, 0, 0)]
    f_all, ok = f0[job.rows], ok0[job.rows].numpy()
    tr = np.flatnonzero((side == "train") & ok)
    xs, ys = [f_all[tr]], [job.y[tr]]
    for v, sv in view_pairs(cfg):
        fv, _ = ctx.feats[(job.backbone.name, job.backbone.weights_id, v, sv)]
        pos = ctx.view_pos[(job.backbone.name, job.backbone.weights_id)]
        take = np.array([pos[job.rows[i]] for i in tr], dtype=np.int64)
        xs.append(fv[take])
        ys.append(job.y[tr])
    x_train, y_train = torch.cat(xs), torch.as_tensor(np.concatenate(ys))

    def eval_feats(s):
        idx = np.flatnonzero((side == s) & ok)
        return f_all[idx], idx

    skipped = [paths[i] for i in np.flatnonzero(~ok)]
    batches = feature_batches(x_train, y_train, t.batch_size, job.seed)
    groups = np.tile(job.split["patient"].to_numpy()[tr], len(xs))
    return TrainingData(batches, y_train.numpy(), _memo_val(eval_feats, cached=True), skipped,
                        x_train, groups)  # fmt: skip


def _memo_val(eval_feats, cached: bool):
    """Validation features are read once per head (every epoch uses them)."""
    memo = {}

    def get(s):
        if s != "val" or not cached:
            return eval_feats(s)
        if "val" not in memo:
            memo["val"] = eval_feats("val")
        return memo["val"]

    return get


def train_head(ctx, job: HeadJob, data: TrainingData) -> tuple[torch.nn.Module, FitResult]:
    t = ctx.cfg.train
    patients = job.split["patient"].to_numpy()

    def evaluate_val(h):
        x, idx = data.eval_feats("val")
        probs = predict_features(h, x, ctx.device) if len(idx) else np.zeros((0, len(ctx.classes)))
        return job.y[idx], probs, patients[idx].tolist()

    writer = ctx.writers[job.name]
    log.info("Training a %s head: %s (%d classes).", t.head, job.name, len(ctx.classes))
    hooks = Hooks(lambda e, logs: log_epoch(writer, e, logs), lambda: ctx.stop.stop)
    if t.head == "logreg":
        x_val, idx = data.eval_feats("val")
        if data.groups is not None and t.select == "best" and len(idx):
            train = (data.x_train, data.labels, data.groups)  # as cached: no float copy
            val = (x_val, job.y[idx], patients[idx])
            tuned = fit_logreg_cv(train, val, ctx.classes, t, hooks, job.seed, ctx.device)
            if tuned is not None:
                head, result, data.val_probs = tuned
                return head, result
        return fit_logreg(data.batches, evaluate_val, ctx.classes, t, hooks, job.seed,
                          ctx.device)  # fmt: skip
    torch.manual_seed(job.seed)
    head = make_head(t.head, job.backbone.feature_dim, len(ctx.classes), t.hidden, t.dropout)
    result = fit(head.to(ctx.device), data.batches, evaluate_val, data.labels, ctx.classes, t,
                 hooks, seed=job.seed)  # fmt: skip
    return head, result


def evaluate_head(ctx, job: HeadJob, head, data: TrainingData) -> dict:
    """Metrics and per-image predictions of the selected head on every held-out side."""
    out = {}
    patients = job.split["patient"].to_numpy()
    for s in ("val", "test"):
        if not (job.split["split"] == s).any():
            continue
        x, idx = data.eval_feats(s)
        n = len(ctx.classes)
        probs = predict_features(head, x, ctx.device) if len(idx) else np.zeros((0, n))
        if s == "val" and data.val_probs is not None:
            probs = data.val_probs  # the refit head saw val: its out-of-fold score instead
        m = compute_metrics(job.y[idx], probs, ctx.classes, patients[idx].tolist())
        out[s] = (m, job.y[idx], probs, idx)
    return out


def _selection_columns(head: str, result: FitResult) -> dict:
    """What was selected, in the head's own terms: an epoch-trained head's kept epoch and
    epochs run; the logreg head has no epochs, so its chosen C and the candidates tried."""
    if head != "logreg":
        return {"best_epoch": result.best_epoch, "epochs_run": len(result.history),
                "C": None, "C_candidates": None}  # fmt: skip
    chosen = result.history[result.best_epoch - 1] if result.history else {}
    return {"best_epoch": None, "epochs_run": None, "C": chosen.get("C"),
            "C_candidates": len(result.history)}  # fmt: skip


def result_rows(ctx, job: HeadJob, result: FitResult, evals: dict, skipped: int) -> list[dict]:
    cfg, t = ctx.cfg, ctx.cfg.train
    rows = []
    for s, (m, _, _, _) in evals.items():
        rows.append({
            "arch": job.backbone.name, "fold": job.fold, "repeat": job.repeat, "split": s,
            **{k: m[k] for k in METRICS}, "n_images": m["n_images"],
            "n_patients": m["n_patients"], "model_selection": s == "val" and t.select == "best",
            **_selection_columns(t.head, result),
            "train_seconds": round(result.seconds, 3), "skipped_images": skipped,
            "test_twins_in_train": job.twins if s == "test" else 0,
            "weights": job.backbone.weights_id, "head": t.head, "recipe": cfg.recipe,
            "select": t.select, "task": ctx.task, "protocol": ctx.protocol,
            "group_by": ctx.group_by, "views": cfg.views, "compute": job_mode(ctx, job).describe(),
            "input_size": job.backbone.prep.input_size, "stain": cfg.stain,
            "stain_views": cfg.stain_views, "stain_fallbacks": stain_fallbacks(ctx, job, s),
            "cached": not cfg.no_cache, "interrupted": result.interrupted,
        })  # fmt: skip
    return rows


def stain_fallbacks(ctx, job: HeadJob, side: str | None = None) -> int:
    """Images of this head's split (of one side, if given) that went to the backbone
    unnormalised because stain normalisation failed for them."""
    if not ctx.fallbacks:
        return 0
    rows = job.split if side is None else job.split[job.split["split"] == side]
    return int(rows["path"].isin(ctx.fallbacks.keys()).sum())


def prediction_frame(ctx, job: HeadJob, evals: dict) -> pd.DataFrame:
    frames = []
    for s, (_, y, probs, idx) in evals.items():
        cols = [c for c in PREDICTION_COLUMNS if c in job.split]
        frame = job.split.iloc[idx][cols].copy()
        frame.insert(0, "split", s)
        frame.insert(0, "repeat", job.repeat)
        frame.insert(0, "fold", job.fold)
        frame.insert(0, "arch", job.backbone.name)
        frame["target"] = [ctx.classes[i] for i in y]
        frame["prediction"] = [ctx.classes[i] for i in probs.argmax(1)] if len(idx) else []
        for k, c in enumerate(ctx.classes):
            frame[f"prob_{c}"] = probs[:, k] if len(idx) else []
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def head_record(ctx, job: HeadJob, result: FitResult, evals: dict, skipped: int) -> dict:
    """The head file's metadata: enough to rebuild its backbone and judge its numbers."""
    cfg, t, bb = ctx.cfg, ctx.cfg.train, job.backbone
    return {
        "arch": bb.name, "weights": bb.weights, "weights_id": bb.weights_id,
        "initialisers": initialiser_versions(bb.name) if bb.weights == "none" else None,
        "feature_dim": bb.feature_dim, "classes": ctx.classes, "prep": bb.prep.to_dict(),
        "compute": job_mode(ctx, job).describe(), "compute_mode": job_mode(ctx, job).to_dict(),
        "task": ctx.task, "dataset": cfg.dataset,
        "protocol": ctx.protocol, "group_by": ctx.group_by, "recipe": cfg.recipe,
        "magnification": cfg.magnification, "fold": job.fold, "repeat": job.repeat,
        "seed": t.seed, "head_seed": job.seed, "head": t.head, "hidden": t.hidden,
        "dropout": t.dropout, "train": t.to_dict(), "views": cfg.views,
        "stain": ctx.stain.record(), "stain_fallbacks": stain_fallbacks(ctx, job),
        "best_epoch": result.best_epoch, "selected_on": "val" if t.select == "best" else "last",
        "metrics": {s: dict(evals[s][0]) for s in evals},
        "val_balanced_accuracy": evals["val"][0].get("balanced_accuracy") if "val" in evals
        else None,
        "package_version": __version__, "versions": ctx.versions, "command": ctx.command,
        "run": ctx.run, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "skipped_images": skipped, "test_twins_in_train": job.twins,
    }  # fmt: skip


def hparams(ctx, job: HeadJob) -> dict:
    cfg, t = ctx.cfg, ctx.cfg.train
    return {
        "arch": job.backbone.name, "weights": job.backbone.weights_id, "head": t.head,
        "task": ctx.task, "protocol": ctx.protocol, "group_by": ctx.group_by,
        "recipe": cfg.recipe, "fold": -1 if job.fold is None else job.fold,
        "repeat": job.repeat, "epochs": t.epochs, "lr": t.lr, "weight_decay": t.weight_decay,
        "batch_size": t.batch_size, "views": cfg.views, "seed": t.seed,
        "stain": cfg.stain, "stain_views": cfg.stain_views,
        "input_size": job.backbone.prep.input_size,
        "cached": not cfg.no_cache, "select": t.select,
    }  # fmt: skip


def open_head_writer(ctx, job: HeadJob, skipped: list[str]):
    tb_dir = ctx.folders["logs"] / job.name
    return open_writer(tb_dir, {
        "config": json.dumps(ctx.cfg.to_dict(), indent=1, default=str), "command": ctx.command,
        "versions": json.dumps(ctx.versions, indent=1),
        "skipped_images": f"{len(skipped)} skipped\n" + "\n".join(skipped),
    })  # fmt: skip


def write_head_outputs(ctx, job: HeadJob, head, result: FitResult, evals: dict,
                       meta: dict) -> Path:  # fmt: skip
    """The head file, its curves and its confusion matrix (test where there is one)."""
    folders, run = ctx.folders, ctx.run
    log_final(ctx.writers[job.name], {s: v[:3] for s, v in evals.items()}, ctx.classes,
              hparams(ctx, job), job.name, best_epoch=result.best_epoch,
              hparam_domains=ctx.hparam_domains)  # fmt: skip
    path = save_head(folders["models"] / f"{job.name}.pt", head, meta, extra=job.extras)
    plot_curves(result.history, f"{job.name} ({run})", folders["graphs"] / f"{job.name}_curves.png",
                best_epoch=result.best_epoch)  # fmt: skip
    if evals:
        shown = "test" if "test" in evals else "val"
        label = shown if shown == "test" else "val (selected)"
        plot_confusion(evals[shown][0]["confusion"], ctx.classes, f"{job.name}: {label} ({run})",
                       folders["graphs"] / f"{job.name}_confusion.png")  # fmt: skip
    return path
