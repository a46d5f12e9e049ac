"""Training a head: on cached features (the fast path) or end to end (the slow baseline).

Both share one epoch loop: AdamW, class-weighted cross-entropy, the best head by validation
balanced accuracy, early stopping. They differ only in where a batch of features comes from.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from breakhis_tl.data.dataset import epoch_seed
from breakhis_tl.heads import logreg
from breakhis_tl.metrics import compute_metrics

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    head: str = "logreg"  # logreg (L-BFGS, C by grouped CV), linear (AdamW epochs) or mlp
    hidden: int = 512  # mlp hidden units
    dropout: float = 0.5  # mlp: before the last layer
    epochs: int = 30  # upper bound; early stopping may end sooner
    max_steps: int | None = None  # optimiser-step budget (eva: 12,500); ends epochs early
    batch_size: int = 256  # feature batches are cheap; a linear probe's usual size
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    patience: int = 10  # epochs without a better val balanced accuracy before stopping
    class_weighted: bool = True  # balanced cross-entropy (BreakHis is 69% malignant)
    select: str = "best"  # best: the epoch with the best val balanced accuracy; last
    seed: int = 0
    warmup_epochs: int = 0  # epochs at lr x warmup_factor first (eva: torch's ConstantLR)
    warmup_factor: float = 1 / 3

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FitResult:
    history: list[dict]  # one dict per epoch: train_* and val_* metrics, losses, seconds
    best_state: dict
    best_epoch: int
    interrupted: bool
    seconds: float


Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    """'balanced' weights (BreakHis is 69% malignant), from scikit-learn."""
    present = np.unique(y)
    w = compute_class_weight("balanced", classes=present, y=y)
    full = np.ones(n_classes)
    full[present] = w
    return torch.tensor(full, dtype=torch.float32)


def _score(metrics: dict) -> float:
    v = metrics.get("balanced_accuracy", metrics.get("val_balanced_accuracy", float("nan")))
    return -math.inf if v is None or math.isnan(v) else v


@dataclass
class Hooks:
    """What the caller hears and says during the epochs: each epoch's logs, and whether to
    stop (Ctrl-C) after the epoch in progress."""

    on_epoch: Callable[[int, dict], None] | None = None
    should_stop: Callable[[], bool] = lambda: False


def fit(
    head: nn.Module,
    train_batches: Callable[[int], Batches],
    evaluate_val: Callable[[nn.Module], tuple[np.ndarray, np.ndarray, list]],
    train_labels: np.ndarray,
    classes: list[str],
    cfg: TrainConfig,
    hooks: Hooks | None = None,
    seed: int | None = None,
) -> FitResult:
    """`train_batches(epoch)` yields (features, labels); `evaluate_val(head)` returns
    (labels, probabilities, patients) of the validation images. The head trains on the
    device it is on. `seed`: the head's own seed (default `cfg.seed`), so a head never
    depends on what else shares the run."""
    hooks = hooks or Hooks()
    torch.manual_seed(cfg.seed if seed is None else seed)
    device = next(head.parameters()).device
    weights = torch.ones(len(classes), device=device)
    if cfg.class_weighted:
        weights = class_weights(train_labels, len(classes)).to(device)
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = _warmup(opt, cfg)
    history: list[dict] = []
    best, best_epoch, best_state, since_best = -math.inf, 0, copy.deepcopy(head.state_dict()), 0
    start = time.perf_counter()
    interrupted, steps = False, 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        seen, steps = _train_epoch(head, train_batches(epoch), loss_fn, opt, cfg, steps)
        logs = {"epoch": epoch, **_epoch_logs(head, evaluate_val, seen, classes, weights)}
        score = logs.pop("_score")
        logs.update(lr=opt.param_groups[0]["lr"], seconds=time.perf_counter() - t0)
        if warmup is not None:
            warmup.step()  # per epoch, as Lightning steps an epoch-interval scheduler
        history.append(logs)
        if hooks.on_epoch:
            hooks.on_epoch(epoch, logs)
        if cfg.select == "last" or score > best or epoch == 1:
            best, best_epoch, since_best = score, epoch, 0
            best_state = copy.deepcopy(head.state_dict())
        else:
            since_best += 1
        if hooks.should_stop():
            interrupted = True
            log.warning("Interrupted: stopped after epoch %d, keeping the best head so far.", epoch)
            break
        if _stop_early(cfg, steps, epoch, since_best):
            break
    head.load_state_dict(best_state)
    head.eval()
    return FitResult(history, best_state, best_epoch, interrupted, time.perf_counter() - start)


def _train_epoch(head, batches: Batches, loss_fn, opt, cfg: TrainConfig, steps: int):
    """One pass of AdamW steps (up to the step budget): the (loss, n) of each batch, its
    labels and softmax outputs, and the steps taken so far."""
    device = next(head.parameters()).device
    head.train()
    losses, ys, ps = [], [], []
    for x, y in batches:
        if cfg.max_steps is not None and steps >= cfg.max_steps:
            break
        steps += 1
        x, y = x.to(device).float(), y.to(device)
        logits = head(x)
        loss = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append((loss.item(), len(y)))
        ys.append(y.cpu())
        ps.append(torch.softmax(logits.detach(), 1).cpu())
    head.eval()
    return (losses, ys, ps), steps


def _epoch_logs(head, evaluate_val, seen, classes: list[str], weights: torch.Tensor) -> dict:
    """The epoch's row of the history: train metrics from the pass just made, val metrics
    from a fresh validation pass, and (under `_score`) what selects the head."""
    losses, ys, ps = seen
    t_eval = time.perf_counter()
    y_val, p_val, patients = evaluate_val(head)
    train_m = compute_metrics(torch.cat(ys).numpy(), torch.cat(ps).numpy(), classes,
                              curves_only=True)  # fmt: skip
    val_m = compute_metrics(y_val, p_val, classes, patients, quiet=True)
    val_loss = float("nan")
    if len(y_val):
        log_p = torch.log(torch.as_tensor(p_val).clamp_min(1e-12)).float()
        val_loss = nn.functional.nll_loss(log_p, torch.as_tensor(y_val), weight=weights.cpu())
        val_loss = val_loss.item()
    return {
        "train_loss": sum(a * n for a, n in losses) / max(1, sum(n for _, n in losses)),
        "val_loss": val_loss,
        **{f"train_{k}": v for k, v in train_m.items() if k != "confusion"},
        **{f"val_{k}": v for k, v in val_m.items() if k != "confusion"},
        "eval_seconds": time.perf_counter() - t_eval,  # validation pass and all metrics
        "_score": _score(val_m),
    }


def _stop_early(cfg: TrainConfig, steps: int, epoch: int, since_best: int) -> bool:
    if cfg.max_steps is not None and steps >= cfg.max_steps:
        log.info("Step budget of %d optimiser steps reached at epoch %d.", steps, epoch)
        return True
    if cfg.select == "best" and since_best >= cfg.patience:
        log.info("Early stop at epoch %d: no better val balanced accuracy for %d epochs.",
                 epoch, cfg.patience)  # fmt: skip
        return True
    return False


def _warmup(opt: torch.optim.Optimizer, cfg: TrainConfig):
    """torch's ConstantLR when the config asks for a warm-up: the learning rate times
    `warmup_factor` for the first `warmup_epochs` epochs, then as set (eva's HeadModule
    default schedule, stepped once an epoch)."""
    if cfg.warmup_epochs <= 0:
        return None
    return torch.optim.lr_scheduler.ConstantLR(
        opt, factor=cfg.warmup_factor, total_iters=cfg.warmup_epochs
    )


def feature_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int
) -> Callable[[int], Batches]:
    """Shuffled minibatches of cached features, reshuffled (seeded) every epoch.

    Keep `x` in fp16 as cached: a gather over all features each epoch is bound by memory
    bandwidth, and half the bytes is nearly half the time.
    """

    def batches(epoch: int) -> Batches:
        g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(order), batch_size):
            j = order[i : i + batch_size]
            yield x[j].float(), y[j]

    return batches


@torch.inference_mode()
def predict_features(
    head: nn.Module, x: torch.Tensor, device="cpu", batch_size: int = 4096
) -> np.ndarray:
    head.eval().to(device)
    out = [
        torch.softmax(head(x[i : i + batch_size].to(device).float()), 1).cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


@dataclass
class Feed:
    """How images reach the backbone when nothing is cached: batch size, device, compute
    mode, loader workers and the stain setup (a StainSetup or None)."""

    batch_size: int
    device: torch.device | str
    path: object  # the compute mode (FastPath)
    workers: int | None = None
    stain: object = None


def end_to_end_batches(
    backbone, paths: list[str], labels: np.ndarray, seed: int, feed: Feed
) -> Callable[[int], Batches]:
    """Every epoch, every training image through the frozen backbone with online augmentation:
    what most tutorials do, and the baseline the feature cache is measured against. `stain`
    (a StainSetup) normalises each image and, with stain views, jitters it afresh each epoch."""
    from breakhis_tl.data.dataset import (
        EpochSeeded,
        EpochShuffle,
        ImageDataset,
        OnlineStain,
        make_loader,
    )
    from breakhis_tl.data.transforms import train_preset
    from breakhis_tl.features.extract import run_backbone

    transform, stain, device = train_preset(backbone.prep), feed.stain, feed.device
    if stain is not None and (stain.method != "none" or stain.views):
        transform = OnlineStain(stain, transform)
    ds = EpochSeeded(ImageDataset(paths, transform, labels.tolist()), seed)
    order = EpochShuffle(len(ds), seed)
    loader = make_loader(ds, feed.batch_size, feed.workers, seed=seed, sampler=order,
                         persistent=True, device=device)  # fmt: skip

    def batches(epoch: int) -> Batches:
        order.epoch = epoch
        for x, y, _, _, _ in loader:
            if x is not None:
                # a clone outside inference mode, so autograd may use it in the head
                yield run_backbone(backbone, x.to(device), feed.path).clone(), y

    batches.loader = loader  # for a look at its workers (tests); the closure keeps it alive
    return batches


def end_to_end_features(
    backbone, paths: list[str], feed: Feed, keep: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict[int, str]]:
    """Eval-preset features of `paths` computed now (no cache): (features, ok mask, and the
    images whose stain normalisation failed, by position, with why). `keep`: a dict that
    holds these paths' loader, workers alive, for the next call (every epoch's validation)."""
    from breakhis_tl.data.dataset import StainedImages, collate_noted, make_loader
    from breakhis_tl.data.stain import StainSetup
    from breakhis_tl.data.transforms import decode_transform, normalize
    from breakhis_tl.features.extract import run_backbone

    key = tuple(paths)
    loader = keep.get(key) if keep is not None else None
    if loader is None:
        stain = feed.stain or StainSetup()
        ds = StainedImages(paths, decode_transform(backbone.prep), stain, paths, [1] * len(paths))
        loader = make_loader(ds, feed.batch_size, feed.workers, collate_fn=collate_noted,
                             persistent=keep is not None, device=feed.device)  # fmt: skip
        if keep is not None:
            keep[key] = loader
    feats = torch.zeros(len(paths), backbone.feature_dim)
    ok = torch.zeros(len(paths), dtype=torch.bool)
    notes: dict[int, str] = {}
    for x, _, idx, _, _, noted in loader:
        notes.update(noted)
        if x is not None:
            x = normalize(x[:, 0].to(feed.device), backbone.prep)
            feats[idx] = run_backbone(backbone, x, feed.path).cpu()
            ok[idx] = True
    return feats, ok, notes


LOGREG_C = tuple(float(c) for c in np.logspace(-4, 2, 7))  # inverse regularisation strengths


def _collect(train_batches: Callable[[int], Batches]) -> tuple[torch.Tensor, np.ndarray]:
    xs, ys = zip(*((x.float(), y) for x, y in train_batches(1)), strict=True)
    return torch.cat(xs), torch.cat(ys).numpy()


def linear_from_logreg(
    coef: np.ndarray, intercept: np.ndarray, mean: np.ndarray, scale: np.ndarray, n_classes: int
) -> nn.Module:
    """A plain linear head with the standardisation folded in: the same head file, predict
    and Grad-CAM work for it as for any linear head. `coef` (rows, features) and `intercept`
    are on the standardised features, as scikit-learn's `coef_` and `intercept_`. A binary
    model's one row w (the logit of class 1 against 0) becomes the rows -w/2 and +w/2: the
    softmax is the same sigmoid, and each class has a row of its own for Grad-CAM to follow
    (a row of zeros for class 0 left its map blank)."""
    coef = np.asarray(coef, dtype=np.float64) / scale
    bias = np.asarray(intercept, dtype=np.float64) - coef @ mean
    if n_classes == 2 and coef.shape[0] == 1:
        coef, bias = np.vstack([-coef / 2, coef / 2]), np.concatenate([-bias / 2, bias / 2])
    head = nn.Sequential(nn.Linear(coef.shape[1], n_classes))
    with torch.no_grad():
        head[0].weight.copy_(torch.as_tensor(coef, dtype=torch.float32))
        head[0].bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return head.eval()


def _fold_head(p: logreg.Problem, theta: torch.Tensor, f: int = 0) -> nn.Module:
    return linear_from_logreg(*logreg.fold_linear(p, theta, f), p.n_classes)


def _solve(p, c, theta, k, should_stop):
    """One candidate's solve; the flag is polled inside it from the second candidate on (the
    first, the strongest penalty and the quickest, always ends, so a head always exists)."""
    theta, iters = logreg.solve(p, c, theta, should_stop if k > 1 else None)
    log.debug("Logistic regression, C = %g: %d L-BFGS iterations.", c, iters)
    return theta


def fit_logreg(
    train_batches: Callable[[int], Batches],
    evaluate_val: Callable[[nn.Module], tuple[np.ndarray, np.ndarray, list]],
    classes: list[str],
    cfg: TrainConfig,
    hooks: Hooks | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, FitResult]:
    """The linear probe of CLIP and DINOv2 evaluations: L-BFGS logistic regression on
    standardised features, trained to convergence whatever the data size, its strength C
    chosen on the validation patients only (`select last`: C = 1, nothing selected). The
    fallback of `fit_logreg_cv`, for splits with too few patients to cross-validate.
    Each candidate C is one row of the history (its `epoch` is the candidate's number).
    A Ctrl-C (`hooks.should_stop`) ends the path: the best candidate finished so far is
    kept."""
    hooks, start = hooks or Hooks(), time.perf_counter()
    x, y = _collect(train_batches)
    p = logreg.standardise([x], y, len(classes), device)
    logreg.set_folds(p, np.ones((1, len(y)), bool), cfg.class_weighted)
    grid = (1.0,) if cfg.select == "last" else LOGREG_C
    history, heads, best, theta, interrupted = [], [], 0, logreg.zeros(p), False
    for k, c in enumerate(grid, start=1):
        t0 = time.perf_counter()
        try:
            theta = _solve(p, c, theta, k, hooks.should_stop)
        except logreg.Interrupted:
            interrupted = True
            break
        head = _fold_head(p, theta)
        train_p = predict_features(head, x, device)
        y_val, p_val, patients = evaluate_val(head)
        val_m = compute_metrics(y_val, p_val, classes, patients, quiet=True)
        train_m = compute_metrics(y, train_p, classes, curves_only=True)
        logs = {"epoch": k, "C": c, "train_loss": _nll(train_p, y), "val_loss": _nll(p_val, y_val),
                **{f"train_{m}": v for m, v in train_m.items() if m != "confusion"},
                **{f"val_{m}": v for m, v in val_m.items() if m != "confusion"},
                "seconds": time.perf_counter() - t0}  # fmt: skip
        history.append(logs)
        heads.append(head)
        if hooks.on_epoch:
            hooks.on_epoch(k, logs)
        if _score(val_m) > _score(history[best - 1] if best else {}) or not best:
            best = k
    interrupted = interrupted or hooks.should_stop()
    _say_chosen(grid[best - 1], "on the validation set", interrupted, len(history), len(grid))
    head = heads[best - 1]
    state = copy.deepcopy(head.state_dict())
    return head, FitResult(history, state, best, interrupted, time.perf_counter() - start)


def _say_chosen(c: float, how: str, interrupted: bool, done: int, grid: int) -> None:
    if interrupted:
        log.warning("Interrupted: C = %g chosen %s among the first %d of %d candidates.",
                    c, how, done, grid)  # fmt: skip
    else:
        log.info("Logistic regression: C = %g chosen %s.", c, how)


def _nll(p: np.ndarray, y: np.ndarray) -> float:
    if len(y) == 0:
        return float("nan")
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))


def _cv_row(k: int, c: float, y, oof, is_val, classes: list[str], t0: float) -> dict:
    """One candidate's history row: out-of-fold metrics of the pool, its train and val parts."""
    pool_m = compute_metrics(y, oof, classes, curves_only=True)
    val_m = compute_metrics(y[is_val], oof[is_val], classes, quiet=True)
    return {"epoch": k, "C": c, "train_loss": _nll(oof[~is_val], y[~is_val]),
            "val_loss": _nll(oof[is_val], y[is_val]), "cv_balanced_accuracy":
            pool_m["balanced_accuracy"],
            **{f"train_{m}": v for m, v in compute_metrics(
                y[~is_val], oof[~is_val], classes, curves_only=True).items()},
            **{f"val_{m}": v for m, v in val_m.items() if m != "confusion"},
            "seconds": time.perf_counter() - t0}  # fmt: skip


def _cv_path(p, splits, y, is_val, classes, hooks: Hooks) -> tuple[list, ...]:
    """Every fold solved together, C ascending, each warm-started from the last: one history
    row, the out-of-fold probabilities and the fold solutions per finished candidate."""
    history, oofs, thetas, theta = [], [], [], logreg.zeros(p)
    for k, c in enumerate(LOGREG_C, start=1):
        t0 = time.perf_counter()
        try:
            theta = _solve(p, c, theta, k, hooks.should_stop)
        except logreg.Interrupted:
            break
        probs = logreg.probabilities(p, theta)
        oof = np.zeros((len(y), len(classes)))
        for f, (_, te) in enumerate(splits):
            oof[te] = probs[te, f]
        history.append(_cv_row(k, c, y, oof, is_val, classes, t0))
        oofs.append(oof)
        thetas.append(theta)
        if hooks.on_epoch:
            hooks.on_epoch(k, history[-1])
    return history, oofs, thetas


def fit_logreg_cv(
    train: tuple,
    val: tuple,
    classes: list[str],
    cfg: TrainConfig,
    hooks: Hooks | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, FitResult, np.ndarray] | None:
    """The default linear probe, tuned as a careful user tunes scikit-learn's: C chosen by
    patient-grouped k-fold CV over the training and validation patients (out-of-fold
    balanced accuracy; one small validation set alone picks C noisily), then refit on all of
    them. The test side is never seen. `train` and `val`: (features, labels, patients), the
    features an array or tensor of any float dtype. Returns the head, its history (one row
    per C, with out-of-fold metrics on the validation images) and the out-of-fold
    probabilities of the validation images at the chosen C: their `val (selected)` score,
    optimistic (C was chosen on out-of-fold scores that include them) but not the refit
    head's own, which has seen those images. A Ctrl-C (`hooks.should_stop`) ends
    the C path at once; the best candidate finished so far is refit."""
    from sklearn.model_selection import StratifiedGroupKFold

    hooks, start = hooks or Hooks(), time.perf_counter()
    y = np.concatenate([np.asarray(train[1]), np.asarray(val[1])])
    groups = np.concatenate([train[2], val[2]])
    is_val = np.r_[np.zeros(len(train[1]), bool), np.ones(len(val[1]), bool)]
    per_class = min(len(set(groups[y == c])) for c in np.unique(y))
    if per_class < 2 or len(np.unique(y)) < len(classes):
        return None  # too few patients to cross-validate: the caller picks C on val alone
    cv = StratifiedGroupKFold(n_splits=min(5, per_class), shuffle=True, random_state=seed)
    splits = list(cv.split(np.zeros((len(y), 1)), y, groups))
    fold_rows = np.zeros((len(splits), len(y)), bool)
    for f, (tr, _) in enumerate(splits):
        fold_rows[f, tr] = True
    p = logreg.standardise([train[0], val[0]], y, len(classes), device)
    logreg.set_folds(p, fold_rows, cfg.class_weighted)
    history, oofs, thetas = _cv_path(p, splits, y, is_val, classes, hooks)
    best = 1  # the first of equal scores, as the candidates come
    for k, h in enumerate(history, start=1):
        best = k if h["cv_balanced_accuracy"] > history[best - 1]["cv_balanced_accuracy"] else best
    interrupted = len(history) < len(LOGREG_C) or hooks.should_stop()
    _say_chosen(LOGREG_C[best - 1], f"by {cv.n_splits}-fold patient-grouped CV", interrupted,
                len(history), len(LOGREG_C))  # fmt: skip
    warm = logreg.fold_mean(p, thetas[best - 1])
    logreg.set_folds(p, np.ones((1, len(y)), bool), cfg.class_weighted)
    head = _fold_head(p, _solve(p, LOGREG_C[best - 1], warm, 1, None))
    state = copy.deepcopy(head.state_dict())
    result = FitResult(history, state, best, interrupted, time.perf_counter() - start)
    return head, result, oofs[best - 1][is_val]
