"""The main job: split, extract features once, train a head per architecture, write everything.

Stages run in order and each can be read on its own: configuration checks (before any long
work), data and split, backbones, feature extraction (cached), head training per architecture
and fold, and the outputs (heads, results.csv, predictions, TensorBoard logs, graphs).
"""

from __future__ import annotations

import json
import logging
import math
import platform
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from breakhis_tl import __version__
from breakhis_tl.backbones import DEFAULT_ARCHS, Backbone, build_backbone, check_arch
from breakhis_tl.errors import UserError
from breakhis_tl.features import (
    FastPath,
    FeatureCache,
    Request,
    extract,
    fast_path,
    pick_device,
    prepare,
)
from breakhis_tl.heads import HEADS, make_head, save_head
from breakhis_tl.index import build_index, filter_magnification, parse_magnification
from breakhis_tl.metrics import METRICS, compute_metrics, fold_table
from breakhis_tl.plots import CURVE_METRICS, plot_comparison, plot_confusion, plot_curves
from breakhis_tl.splits import (
    PROTOCOLS,
    TASKS,
    check_classes,
    class_names,
    make_split,
    read_split,
    select_fold,
    target_column,
    write_split,
)
from breakhis_tl.tblog import log_epoch, log_final, open_writer
from breakhis_tl.training import (
    TrainConfig,
    end_to_end_batches,
    end_to_end_features,
    feature_batches,
    fit,
    predict_features,
)
from breakhis_tl.transforms import N_VIEWS

log = logging.getLogger(__name__)


@dataclass
class RunConfig:
    data: str | None = None  # folder holding BreaKHis_v1; None: <out>/data, downloaded if absent
    dataset: str = "breakhis"  # breakhis or idc
    archs: list[str] = field(default_factory=lambda: list(DEFAULT_ARCHS))
    weights: str = "default"  # default, none or a file; per arch: "default,resnet50=none"
    task: str | None = None  # binary or subtype; None: binary (subtype for eva)
    magnification: str = "all"  # all or a list such as 40X,200X
    protocol: str = "patient"  # patient, cv, folds, eva or random
    fold: str | None = None  # fold to run or all; None: all cv folds, official fold 1
    cv: int | None = None  # k folds with patient (grouped) or random (image-level)
    split_file: str | None = None  # reuse a split written by `split --out`
    folds_csv: str | None = None  # official Folds.csv; default: looked for beside BreaKHis_v1
    val_frac: float = 0.15
    test_frac: float = 0.15
    views: int = 1  # cached dihedral views of each training image (1-8)
    no_cache: bool = False  # end to end: backbone pass every epoch (slow baseline)
    strict: bool = False  # stop at the first unreadable image instead of skipping it
    device: str = "auto"
    run: str | None = None  # run name; default: a timestamp
    out: str = "."  # where summary_writers/, validation_graphs/, trained_models/ go
    cache_dir: str | None = None  # default: <out>/data/cache/features
    workers: int | None = None  # DataLoader workers; default: cores - 1, at most 4
    extract_batch: int = 32
    progress: bool = True
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if isinstance(self.archs, str):  # "a,b" or "all", as on the command line
            from breakhis_tl.backbones import parse_archs

            self.archs = parse_archs(self.archs)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunResult:
    run: str
    results: pd.DataFrame
    history: pd.DataFrame
    predictions: pd.DataFrame
    heads: dict[str, Path]
    folders: dict[str, Path]
    interrupted: bool
    cache_used: bool
    skipped: list[str]


class StopFlag:
    """First Ctrl-C during training: finish the epoch, keep the best head. Otherwise: abort."""

    def __init__(self):
        self.stop = False
        self.training = False

    def __call__(self, signum, frame):
        if self.training and not self.stop:
            self.stop = True
            log.warning("Ctrl-C: stopping after this epoch (press again to abort at once).")
        else:
            raise KeyboardInterrupt

    def install(self):
        try:
            return signal.signal(signal.SIGINT, self)
        except ValueError:  # not the main thread (a notebook's worker): no handler
            return None


def validate(cfg: RunConfig) -> None:
    """Every mistake that can be seen up front is reported before any long work starts."""
    for a in cfg.archs:
        check_arch(a)
    if not cfg.archs:
        raise UserError("No architecture given.")
    if cfg.task is not None and cfg.task not in TASKS:
        raise UserError(f"Unknown task {cfg.task!r}; choose one of: {', '.join(TASKS)}.")
    if cfg.protocol not in PROTOCOLS:
        raise UserError(
            f"Unknown protocol {cfg.protocol!r}; choose one of: {', '.join(PROTOCOLS)}."
        )
    t = cfg.train
    if t.head not in HEADS:
        raise UserError(f"Unknown head {t.head!r}; choose one of: {', '.join(HEADS)}.")
    checks = [
        (t.epochs >= 1, f"--epochs must be at least 1, not {t.epochs}."),
        (t.lr > 0 and math.isfinite(t.lr), f"--lr must be a positive number, not {t.lr}."),
        (t.weight_decay >= 0, f"--weight-decay must not be negative, not {t.weight_decay}."),
        (t.batch_size >= 1, f"--batch-size must be at least 1, not {t.batch_size}."),
        (t.patience >= 1, f"--patience must be at least 1, not {t.patience}."),
        (0 <= t.dropout < 1, f"--dropout must be in [0, 1), not {t.dropout}."),
        (1 <= cfg.views <= N_VIEWS, f"--views must be between 1 and {N_VIEWS}, not {cfg.views}."),
        (cfg.cv is None or cfg.cv >= 2, f"--cv must be at least 2, not {cfg.cv}."),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    if cfg.fold is not None and cfg.fold != "all" and not str(cfg.fold).isdigit():
        raise UserError(f"--fold must be a fold number or all, not {cfg.fold!r}.")
    if cfg.views > 1 and cfg.no_cache:
        raise UserError("--views caches views; with --no-cache, augmentation is online already.")
    for part in cfg.weights.split(","):
        name, sep, _ = part.strip().partition("=")
        if sep and name not in cfg.archs:
            raise UserError(f"--weights names {name!r}, which is not among --archs.")
    pick_device(cfg.device)


def weights_for(spec: str, arch: str) -> str:
    """`default`, `none` or a file for every architecture, with `arch=value` overrides:
    `default,mobilenet_v2=none` keeps ImageNet weights except for mobilenet_v2."""
    chosen = "default"
    for part in spec.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            chosen = name
        elif name == arch:
            return value
    return chosen


def _writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{time.time_ns()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"Output folder {folder} cannot be written ({exc.strerror}).") from None


def _resolve_data(cfg: RunConfig, out: Path) -> Path:
    if cfg.data is not None:
        return Path(cfg.data)
    data = out / "data"
    if cfg.dataset == "breakhis" and not (data / "BreaKHis_v1").is_dir():
        from breakhis_tl.download import download_breakhis

        log.info("No --data given and no BreakHis in %s: downloading it first.", data)
        download_breakhis(data)
    return data


def load_folds(
    cfg: RunConfig, index: pd.DataFrame, task: str
) -> list[tuple[int | None, pd.DataFrame]]:
    """(fold, split) pairs to train on: one for a plain split, several for folds."""
    if cfg.split_file:
        split = read_split(cfg.split_file, index)
        if "fold" in split and split["fold"].nunique() > 1 and cfg.fold not in (None, "all"):
            split = select_fold(split, int(cfg.fold))
        return [(None, split)]
    fold = None if cfg.fold in (None, "all") else int(cfg.fold)
    kw = dict(
        protocol=cfg.protocol,
        task=task,
        seed=cfg.train.seed,
        val_frac=cfg.val_frac,
        test_frac=cfg.test_frac,
        folds_csv=cfg.folds_csv,
    )
    if cfg.protocol == "folds":
        folds = range(1, 6) if cfg.fold == "all" else [fold or 1]
        return [(k, make_split(index, fold=k, **kw)) for k in folds]
    if cfg.protocol == "cv" or cfg.cv:
        base = make_split(index, fold=fold or 1, n_folds=cfg.cv or 5, **kw)
        ks = sorted(base["fold"].unique()) if fold is None else [fold]
        return [(int(k), select_fold(base, int(k))) for k in ks]
    return [(None, make_split(index, fold=fold, **kw))]


def _versions() -> dict:
    import sklearn
    import torchvision

    return {
        "breakhis_tl": __version__, "torch": torch.__version__,
        "torchvision": torchvision.__version__, "scikit-learn": sklearn.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
    }  # fmt: skip


def run_training(cfg: RunConfig, command: str | None = None) -> RunResult:
    validate(cfg)
    out = Path(cfg.out)
    run = cfg.run or time.strftime("%Y%m%d-%H%M%S")
    folders = {
        "models": out / "trained_models" / run,
        "logs": out / "summary_writers" / run,
        "graphs": out / "validation_graphs" / run,
    }
    for f in folders.values():
        _writable(f)
    command = command or " ".join(sys.argv)
    device = pick_device(cfg.device)

    # data and split
    task = cfg.task or ("subtype" if cfg.protocol == "eva" else "binary")
    classes = class_names(task, cfg.dataset, cfg.protocol)
    index = build_index(_resolve_data(cfg, out), cfg.dataset)
    index = filter_magnification(index, parse_magnification(cfg.magnification))
    folds = load_folds(cfg, index, task)
    for _, split in folds:
        check_classes(split, task, classes)
    base = (
        pd.concat([f for _, f in folds])
        .drop_duplicates("relpath")
        .drop(columns=["split", "fold"], errors="ignore")
        .reset_index(drop=True)
    )
    # one row per image (cv: with its fold); official folds: one row per image and fold
    kept = pd.concat([f for _, f in folds]) if cfg.protocol == "folds" else folds[0][1]
    write_split(kept, folders["models"] / "split.csv")
    target = target_column(task)
    y_all = base[target].map({c: i for i, c in enumerate(classes)})
    paths = base["path"].tolist()

    # backbones: built first, so a missing weights file stops the run before any extraction
    backbones = {
        a: build_backbone(a, weights_for(cfg.weights, a), cfg.train.seed) for a in cfg.archs
    }
    fp = fast_path(device)
    cache = (
        None if cfg.no_cache else FeatureCache(cfg.cache_dir or out / "data" / "cache" / "features")
    )
    feats, report = {}, None
    rows_of = {rel: i for i, rel in enumerate(base["relpath"])}
    view_rows = np.array(
        sorted({rows_of[r] for _, s in folds for r in s.loc[s["split"] == "train", "relpath"]})
    )
    if not cfg.no_cache:
        all_rows = np.arange(len(paths))
        requests = [Request(bb, 0, all_rows) for bb in backbones.values()]
        requests += [
            Request(bb, v, view_rows) for bb in backbones.values() for v in range(1, cfg.views)
        ]
        feats, report = extract(
            paths,
            requests,
            cache,
            device,
            cfg.extract_batch,
            cfg.workers,
            cfg.strict,
            progress=cfg.progress,
        )
        if report.extracted:
            log.info(
                "Extracted %d feature set(s); %d came from the cache.",
                len(report.extracted),
                len(report.cached),
            )
        else:
            log.info("Feature cache used: nothing extracted (%d entries).", len(report.cached))
    else:
        for bb in backbones.values():
            prepare(bb, device, fp)

    stop = StopFlag()
    ctx = _Context(cfg, run, task, classes, command, device, fp, folders, feats, view_rows, stop)
    previous = stop.install()
    rows, history_rows, pred_frames, heads, histories = [], [], [], {}, {}
    skipped: list[str] = []
    interrupted = False
    try:
        for arch, bb in backbones.items():
            for fold, split in folds:
                split = split.reset_index(drop=True)
                sel = np.array(split["relpath"].map(rows_of), dtype=np.int64)
                stop.training = True
                res = _train_one(ctx, bb, fold, split, sel, y_all.to_numpy()[sel].astype(int))
                stop.training = False
                heads[res["name"]] = res["head_path"]
                histories[res["name"]] = res["history"]
                rows += res["rows"]
                history_rows += [{"arch": arch, "fold": fold, **h} for h in res["history"]]
                pred_frames.append(res["predictions"])
                skipped = sorted(set(skipped) | set(res["skipped"]))
                if res["interrupted"]:
                    interrupted = True
                    break
            if interrupted:
                break
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)

    results = pd.DataFrame(rows)
    history = pd.DataFrame(history_rows)
    predictions = pd.concat(pred_frames, ignore_index=True) if pred_frames else pd.DataFrame()
    _write_outputs(cfg, run, folders, results, history, predictions, histories, command, classes)
    return RunResult(
        run,
        results,
        history,
        predictions,
        heads,
        folders,
        interrupted,
        bool(report and not report.extracted),
        skipped,
    )


@dataclass
class _Context:
    """What every head of a run shares."""

    cfg: RunConfig
    run: str
    task: str
    classes: list[str]
    command: str
    device: torch.device
    fp: FastPath
    folders: dict[str, Path]
    feats: dict  # (arch, view) -> (fp16 features, ok mask), rows as in the run's image list
    view_rows: np.ndarray  # image rows whose extra views were extracted, in feature order
    stop: StopFlag


def _train_one(ctx: _Context, bb: Backbone, fold, split, sel, y) -> dict:
    """Train, evaluate and save one head: `sel` maps the split's rows to the image list."""
    cfg, classes, feats, device, fp = ctx.cfg, ctx.classes, ctx.feats, ctx.device, ctx.fp
    folders, run, task, command, stop = ctx.folders, ctx.run, ctx.task, ctx.command, ctx.stop
    name = bb.name if fold is None else f"{bb.name}_fold{fold}"
    t = cfg.train
    side = split["split"].to_numpy()
    sides = [s for s in ("val", "test") if (side == s).any()]
    if cfg.no_cache:
        # the slow baseline: every image through the backbone, every epoch
        tr = np.flatnonzero(side == "train")
        batches = end_to_end_batches(
            bb, [split["path"][i] for i in tr], y[tr], t.batch_size, t.seed, device, fp, cfg.workers
        )
        ok_mask = np.ones(len(split), bool)

        def eval_feats(s):
            idx = np.flatnonzero(side == s)
            f, ok = end_to_end_features(
                bb, [split["path"][i] for i in idx], cfg.extract_batch, device, fp, cfg.workers
            )
            return f[ok], idx[ok.numpy()]

        train_labels = y[tr]
    else:
        f0, ok0 = feats[(bb.name, 0)]
        f_all, ok_mask = f0[sel], ok0[sel].numpy()
        tr = np.flatnonzero((side == "train") & ok_mask)
        xs, ys = [f_all[tr]], [y[tr]]
        if cfg.views > 1:
            pos = {r: i for i, r in enumerate(ctx.view_rows)}
            for v in range(1, cfg.views):
                fv, _ = feats[(bb.name, v)]
                take = [pos[sel[i]] for i in tr]
                xs.append(fv[take])
                ys.append(y[tr])
        x_train = torch.cat(xs)
        y_train = torch.as_tensor(np.concatenate(ys))
        batches = feature_batches(x_train, y_train, t.batch_size, t.seed)
        train_labels = y_train.numpy()

        def eval_feats(s):
            idx = np.flatnonzero((side == s) & ok_mask)
            return f_all[idx], idx

    skipped = [split["path"][i] for i in np.flatnonzero(~ok_mask)]
    patients = split["patient"].to_numpy()
    val_cache = {}

    def evaluate_val(head):
        if "val" not in val_cache or cfg.no_cache:
            val_cache["val"] = eval_feats("val")
        x, idx = val_cache["val"]
        return y[idx], predict_features(head, x, device), patients[idx].tolist()

    tb_dir = folders["logs"] / (bb.name if fold is None else f"{bb.name}/fold{fold}")
    head = make_head(t.head, bb.feature_dim, len(classes), t.hidden, t.dropout)
    hparams = {
        "arch": bb.name, "weights": bb.weights_id, "head": t.head, "task": task,
        "protocol": cfg.protocol, "fold": -1 if fold is None else fold, "epochs": t.epochs,
        "lr": t.lr, "weight_decay": t.weight_decay, "batch_size": t.batch_size,
        "views": cfg.views, "seed": t.seed, "cached": not cfg.no_cache,
    }  # fmt: skip
    writer = open_writer(tb_dir, {
        "config": json.dumps(cfg.to_dict(), indent=1, default=str), "command": command,
        "versions": json.dumps(_versions(), indent=1),
        "skipped_images": f"{len(skipped)} skipped\n" + "\n".join(skipped),
    })  # fmt: skip
    log.info(
        "Training a %s head on %s%s (%d classes).",
        t.head,
        bb.name,
        "" if fold is None else f", fold {fold}",
        len(classes),
    )
    try:
        result = fit(
            head,
            batches,
            evaluate_val,
            train_labels,
            classes,
            t,
            on_epoch=lambda e, logs: log_epoch(writer, e, logs),
            should_stop=lambda: stop.stop,
            device=device,
        )
        evals, rows, preds = {}, [], []
        for s in sides:
            x, idx = eval_feats(s) if s != "val" or cfg.no_cache else val_cache["val"]
            probs = predict_features(head, x, device) if len(idx) else np.zeros((0, len(classes)))
            m = compute_metrics(y[idx], probs, classes, patients[idx].tolist())
            evals[s] = (m, y[idx], probs)
            rows.append({
                "arch": bb.name, "fold": fold, "split": s,
                **{k: m[k] for k in METRICS}, "n_images": m["n_images"],
                "n_patients": m["n_patients"], "best_epoch": result.best_epoch,
                "epochs_run": len(result.history), "train_seconds": round(result.seconds, 3),
                "skipped_images": len(skipped), "weights": bb.weights_id, "head": t.head,
                "task": task, "protocol": cfg.protocol, "views": cfg.views,
                "cached": not cfg.no_cache, "interrupted": result.interrupted,
            })  # fmt: skip
            frame = split.iloc[idx][
                [
                    c
                    for c in ("path", "relpath", "patient", "magnification", "subtype", "label")
                    if c in split
                ]
            ].copy()
            frame.insert(0, "split", s)
            frame.insert(0, "fold", fold)
            frame.insert(0, "arch", bb.name)
            frame["target"] = [classes[i] for i in y[idx]]
            frame["prediction"] = [classes[i] for i in probs.argmax(1)] if len(idx) else []
            for k, c in enumerate(classes):
                frame[f"prob_{c}"] = probs[:, k] if len(idx) else []
            preds.append(frame)
        log_final(writer, evals, classes, hparams, name)
    finally:
        writer.close()
    best_val = evals.get("val", (None,))[0] or {}
    meta = {
        "arch": bb.name, "weights": bb.weights, "weights_id": bb.weights_id,
        "feature_dim": bb.feature_dim, "classes": classes, "prep": bb.prep.to_dict(),
        "task": task, "dataset": cfg.dataset, "protocol": cfg.protocol,
        "magnification": cfg.magnification, "fold": fold, "seed": t.seed, "head": t.head,
        "hidden": t.hidden, "dropout": t.dropout, "train": t.to_dict(), "views": cfg.views,
        "best_epoch": result.best_epoch,
        "metrics": {s: {k: v for k, v in evals[s][0].items()} for s in evals},
        "val_balanced_accuracy": best_val.get("balanced_accuracy"),
        "package_version": __version__, "versions": _versions(), "command": command,
        "run": run, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "skipped_images": len(skipped),
    }  # fmt: skip
    head_path = save_head(folders["models"] / f"{name}.pt", head, meta)
    plot_curves(result.history, f"{name} ({run})", folders["graphs"] / f"{name}_curves.png")
    shown = "test" if "test" in evals else "val"
    plot_confusion(
        evals[shown][0]["confusion"],
        classes,
        f"{name}: {shown} ({run})",
        folders["graphs"] / f"{name}_confusion.png",
    )
    return {
        "name": name,
        "rows": rows,
        "history": result.history,
        "head_path": head_path,
        "predictions": pd.concat(preds, ignore_index=True),
        "skipped": skipped,
        "interrupted": result.interrupted,
    }


def _write_outputs(cfg, run, folders, results, history, predictions, histories, command, classes):
    models = folders["models"]
    results.to_csv(models / "results.csv", index=False)
    history.to_csv(models / "history.csv", index=False)
    predictions.to_csv(models / "predictions.csv", index=False)
    (models / "config.json").write_text(json.dumps(
        {"run": run, "command": command, "classes": classes, "config": cfg.to_dict(),
         "versions": _versions()}, indent=1, default=str))  # fmt: skip
    for metric in CURVE_METRICS + ("balanced_accuracy",):
        if histories:
            plot_comparison(histories, metric, run, folders["graphs"] / f"compare_{metric}.png")


SUMMARY_METRICS = ("balanced_accuracy", "image_rate", "patient_rate", "f1", "auc")


def summary_table(results: pd.DataFrame) -> str:
    """Mean (and +/- std over folds, where there are folds) per architecture and split."""
    if results.empty:
        return "(no results)"
    return fold_table(results, SUMMARY_METRICS).to_string(index=False)
