"""Batch-norm statistics for random-init backbones: the no-pretraining baseline that works.

A randomly initialised network has batch-norm running statistics of 0 and 1, which match
nothing it computes: frozen that way, activations vanish or explode layer by layer
(mobilenet_v2 gave all-zero features after the fp16 cache, inception_v3 mostly inf). The
fix is the usual one for a random-features baseline: one forward pass in train mode over
(a seeded sample of) the training images, no gradient, with cumulative averages, then
freeze again. Only the statistics change; the random weights stay as the seed made them.
"""

from __future__ import annotations

import hashlib
import logging
import re
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from breakhis_tl.data.dataset import ImageDataset, make_loader
from breakhis_tl.data.stain import StainSetup
from breakhis_tl.data.transforms import eval_preset
from breakhis_tl.models.backbones import BN_RUNNING, Backbone, random_weights_fingerprint

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 256  # a seeded sample of the training images is plenty for BN means
CALIBRATION_VERSION = 1  # in calibration_id: bump when the pass computes other statistics


def _norm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_batchnorm(bb: Backbone) -> bool:
    return bool(_norm_layers(bb.module))


def bn_state(bb: Backbone) -> dict[str, torch.Tensor]:
    """The running statistics alone: what a random-init head file must carry."""
    return {
        k: v.detach().cpu().clone()
        for k, v in bb.module.state_dict().items()
        if k.endswith(BN_RUNNING)
    }


FINGERPRINT_KEY = "random_weights.fingerprint"  # in a head file's extra tensors


def random_init_record(bb: Backbone, memo: dict) -> dict[str, torch.Tensor]:
    """What a random-init head carries of its backbone: the batch-norm statistics of its
    fold and a fingerprint of the weights the seed drew (once per architecture, in `memo`),
    so `predict` can tell whether its torch draws the same weights again."""
    if bb.name not in memo:
        memo[bb.name] = random_weights_fingerprint(bb.module)
    return {**bn_state(bb), FINGERPRINT_KEY: memo[bb.name]}


def load_bn_state(bb: Backbone, state: dict[str, torch.Tensor], weights_id: str) -> Backbone:
    """Put a head's statistics back (predict) under the name it was trained with: the rebuilt
    backbone keeps its own base name, only the statistics' `-bn` part comes from the head."""
    missing = set(bn_state(bb)) - set(state)
    if missing:
        raise ValueError(f"batch-norm statistics missing for {sorted(missing)[:3]}")
    saved = _BN_SUFFIX.search(weights_id)
    if saved is None:
        raise ValueError(f"its weights id {weights_id} names no batch-norm statistics")
    bb.module.load_state_dict(state, strict=False)
    bb.weights_id = _base_id(bb) + saved.group(0)
    return bb


_BN_SUFFIX = re.compile(r"-bn[0-9a-f]{12}$")


def _base_id(bb: Backbone) -> str:
    return _BN_SUFFIX.sub("", bb.weights_id)


def calibration_id(
    bb: Backbone, sample: list[str], seed: int, batch_size: int, stain: StainSetup | None
) -> str:
    """What the statistics are made from (the sample's file contents, seed, batch size,
    preprocessing, stain normalisation), not their bits: train-mode batch norm sums in an
    order that depends on the thread count and the CPU, and the id names the cached
    features, so a 1-thread torchrun `extract` and an N-thread `train` must agree."""
    from breakhis_tl.data.identity import content_id

    recipe = f"v{CALIBRATION_VERSION}|{seed}|{batch_size}|{sorted(bb.prep.to_dict().items())}"
    h = hashlib.sha256(recipe.encode())
    stain_id = stain.normaliser.identity() if stain is not None else "none"
    h.update(f"|{stain_id}|".encode())
    for path in sample:
        try:
            h.update(content_id(path).encode())
        except OSError:
            h.update(b"unreadable")  # skipped by the pass as well
    return h.hexdigest()[:12]


@torch.no_grad()
def calibrate(
    bb: Backbone,
    paths: list[str],
    seed: int,
    batch_size: int = 32,
    workers: int | None = 0,
    stain=None,
    device: torch.device | str = "cpu",
) -> Backbone:
    """Recompute batch-norm running statistics on a seeded sample of `paths`, then freeze.
    `stain` (a StainSetup): normalise them as the features' images will be, so the statistics
    describe the backbone's real inputs. The pass runs on `device`, batch by batch, and the
    module stays there (extraction moves it there anyway): on a GPU run the CPU would
    otherwise do a forward pass per calibrated backbone and fold."""
    layers = _norm_layers(bb.module)
    if not layers or not paths:
        return bb
    rng = np.random.default_rng(seed)
    take = sorted(rng.choice(len(paths), min(CALIBRATION_IMAGES, len(paths)), replace=False))
    ds = ImageDataset([paths[i] for i in take], eval_preset(bb.prep))
    if stain is not None and stain.method != "none":
        from breakhis_tl.data.dataset import OnlineStain

        ds.transform = OnlineStain(StainSetup(stain.normaliser), ds.transform)  # no jitter
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all calibration batches
        m.training = True
    device = torch.device(device)
    bb.module.to(device)
    torch.manual_seed(seed)
    # NCHW: its statistics vary with the thread count in the 6th digit, channels_last's
    # (1.8x faster) in the 3rd; either way not bit for bit, hence calibration_id
    seen = 0
    # in fp32 as extraction runs it: on a GPU, with TF32 off (models/compute.py)
    fp32 = torch.backends.cudnn.flags(enabled=True, allow_tf32=False) if (
        device.type == "cuda") else nullcontext()  # fmt: skip
    try:
        with fp32:
            for x, _, _, _, _ in make_loader(ds, batch_size, workers, device=device):
                if x is not None and len(x) > 1:  # batch-norm in train mode needs two samples
                    bb.module(x.to(device, non_blocking=True).float())
                    seen += len(x)
    finally:
        for m in layers:
            m.training = False
    if seen == 0:
        log.warning("No readable image to calibrate %s's batch-norm statistics on.", bb.name)
    bb.weights_id = f"{_base_id(bb)}-bn{calibration_id(bb, ds.paths, seed, batch_size, stain)}"
    log.info(
        "Random-init %s: batch-norm statistics recomputed on %d training images.", bb.name, seen
    )
    return bb
