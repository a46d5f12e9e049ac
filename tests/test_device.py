"""What runs where on a GPU run, checked on a CPU: calibration on the run's device (torch's
`meta` device stands in for a GPU: a module or batch left on the CPU shows), loader workers
from the machine when they feed a GPU; and the cache's block saving, which grew with the
square of the images at IDC scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from breakhis_tl.data import dataset
from breakhis_tl.models.backbones import build_backbone
from breakhis_tl.models.calibration import calibrate


class _Seen(Exception):
    pass


def test_calibration_runs_on_the_runs_device(breakhis_sample):
    """The calibration batch meets the module on the device asked for, not on the CPU (torch's
    meta device has no batch-norm cumulative average, so the pass stops at its first batch)."""
    paths = sorted(str(p) for p in breakhis_sample.rglob("*.png"))[:4]
    bb = build_backbone("mobilenet_v2", "none", seed=0)
    seen = []

    def check(module, args):
        seen.append((args[0].device.type, next(module.parameters()).device.type))
        raise _Seen

    bb.module.register_forward_pre_hook(check)
    with pytest.raises(_Seen):
        calibrate(bb, paths, seed=0, batch_size=2, device="meta")
    assert seen == [("meta", "meta")]


def test_workers_feeding_a_gpu_come_from_the_cores_and_memory(monkeypatch):
    """On the CPU the measured rule stands (at most 4); feeding a GPU, every usable core but
    the main process's, as far as memory allows, and never fewer than on the CPU."""
    got = {}
    for cores, gib in ((1, 64), (2, 64), (5, 64), (16, 128), (16, 6.5), (64, 0.5)):
        monkeypatch.setattr(dataset, "usable_cores", lambda c=cores: c)
        monkeypatch.setattr(dataset, "available_gib", lambda g=gib: g)
        got[(cores, gib)] = tuple(map(dataset.default_workers, (None, "cpu", "cuda", "cuda:0")))
    assert got == {
        (1, 64): (0, 0, 0, 0), (2, 64): (2, 2, 2, 2), (5, 64): (4, 4, 4, 4),
        (16, 128): (4, 4, 15, 15), (16, 6.5): (4, 4, 6, 6), (64, 0.5): (4, 4, 4, 4),
    }  # fmt: skip


def test_loader_pins_memory_for_a_gpu_only():
    ds = dataset.ImageDataset([], None)
    assert dataset.make_loader(ds, workers=0, device="cuda").pin_memory
    assert not dataset.make_loader(ds, workers=0, device="cpu").pin_memory


def test_save_block_saves_the_blocks_rows_of_each_request():
    """Each request's rows of the block, in its own order, the ones with no content id left
    out, whatever else the request holds."""
    from types import SimpleNamespace

    from breakhis_tl.features.extract import _save_block

    prep = SimpleNamespace(to_dict=lambda: {})
    bb = SimpleNamespace(name="a", weights_id="w", prep=prep)
    rows = np.array([9, 3, 5, 7, 1, 4])
    req = SimpleNamespace(rows=rows, backbone=bb, view=0, stain_view=0)
    feats = torch.arange(6, dtype=torch.float16)[:, None]
    slot = SimpleNamespace(req=req, todo=np.array([0, 1, 2, 4, 5]), space="s", feats=feats,
                           ok=torch.ones(6, dtype=torch.bool))  # fmt: skip
    ids = [f"id{i}" for i in range(10)]
    ids[4] = None
    saved = []
    cache = SimpleNamespace(save=lambda space, chunk_ids, f, ok, msgs, meta, notes: saved.append(
        (chunk_ids, f[:, 0].tolist(), msgs)))  # fmt: skip
    report = SimpleNamespace(stain_fallbacks={})
    _save_block(cache, ids, None, [1, 3, 4, 7, 9], {3: "bad"}, [slot], report)
    assert saved == [(["id9", "id3", "id1"], [0.0, 1.0, 4.0], {"id3": "bad"})]
