"""Named head-training recipes: this project's default, and the eva benchmark's.

A recipe fixes how a head is trained on cached features, so a number can be traced to a
published setting. `default` is what `train` always did. `eva` is kaiko-ai eva's offline
BreakHis recipe, as its config sets it (kaiko-ai/eva,
configs/vision/pathology/offline/classification/breakhis.yaml): a linear head
(torch.nn.Linear), plain torch.nn.CrossEntropyLoss (no class weights), torch.optim.AdamW with
lr 3e-4 (and torch's default weight decay, 0.01), batch size 256 with shuffling, at most
12,500 optimiser steps (MAX_STEPS), the best checkpoint by val/MulticlassAccuracy (macro
accuracy = balanced accuracy; checkpoint_type best), EarlyStopping with patience 500
validation checks (PATIENCE), and N_RUNS = 5 runs. The config names no learning-rate
schedule, so eva.HeadModule's default applies: `lr_scheduler=torch.optim.lr_scheduler.
ConstantLR` with torch's defaults (factor 1/3, total_iters 5), returned to Lightning without an
interval and so stepped once an epoch: the first 5 epochs train at lr 1e-4, then 3e-4
(kaiko-eva 0.3.0, src/eva/core/models/modules/head.py; the same default since 0.0.2). Its
images are ResizeAndCrop to 224 with ImageNet mean/std, which is what the ImageNet backbones
here use already.
"""

from __future__ import annotations

import dataclasses
import logging

log = logging.getLogger(__name__)

RECIPES = ("default", "eva")

EVA_TRAIN = dict(
    head="linear",
    class_weighted=False,
    lr=3e-4,
    weight_decay=0.01,  # torch.optim.AdamW's default, which eva leaves as is
    batch_size=256,
    max_steps=12_500,
    epochs=12_500,  # the step budget ends training; one step per epoch at most this many
    patience=500,
    select="best",
    warmup_epochs=5,  # torch.optim.lr_scheduler.ConstantLR's default total_iters
    warmup_factor=1 / 3,  # and its default factor
)
EVA_RUNS = 5
EVA_VERSION = "kaiko-eva 0.3.0"  # the eva source this recipe was checked against


def apply_recipe(cfg):
    """The run config with its recipe's settings in place (and repeats resolved)."""
    if cfg.recipe == "eva":
        _warn_overridden(cfg.train)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **EVA_TRAIN))
        log.info(
            "Recipe eva (%s): linear head, plain cross-entropy, AdamW lr 3e-4 (x 1/3 for the "
            "first 5 epochs, eva's ConstantLR), batch 256, at most 12,500 steps, patience 500, "
            "%d runs.",
            EVA_VERSION,
            cfg.repeats or EVA_RUNS,
        )
        if cfg.repeats is None:
            cfg = dataclasses.replace(cfg, repeats=EVA_RUNS)
    if cfg.repeats is None:
        cfg = dataclasses.replace(cfg, repeats=1)
    if cfg.train.head == "logreg":
        _warn_unused_by_logreg(cfg.train)
    return cfg


EPOCH_OPTIONS = (
    "epochs",
    "max_steps",
    "lr",
    "weight_decay",
    "patience",
    "batch_size",
    "hidden",
    "dropout",
)


def _warn_unused_by_logreg(train) -> None:
    """logreg trains to convergence: epoch options set by hand would otherwise be recorded
    in the run as if they had shaped the head."""
    from breakhis_tl.heads.training import TrainConfig

    default = TrainConfig()
    changed = [k for k in EPOCH_OPTIONS if getattr(train, k) != getattr(default, k)]
    if changed:
        log.warning(
            "The logreg head has no epochs (L-BFGS to convergence) and ignores %s; "
            "--head linear or mlp trains by epochs.",
            ", ".join(f"{k}={getattr(train, k)}" for k in changed),
        )


def _warn_overridden(train) -> None:
    """Head options set away from their defaults are replaced by the recipe: say so, since a
    silently ignored --lr or --epochs would make the run's record misleading to its author."""
    from breakhis_tl.heads.training import TrainConfig

    default = TrainConfig()
    changed = [k for k, v in EVA_TRAIN.items()
               if getattr(train, k) != getattr(default, k) and getattr(train, k) != v]  # fmt: skip
    if changed:
        log.warning(
            "--recipe eva sets the head options itself; ignoring %s as given.",
            ", ".join(f"{k}={getattr(train, k)}" for k in changed),
        )
