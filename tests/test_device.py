"""What runs where on a GPU run, checked on a CPU: calibration on the run's device (torch's
`meta` device stands in for a GPU: a module or batch left on the CPU shows), and loader
workers from the machine when they feed a GPU."""

from __future__ import annotations

import pytest

from breakhis_tl import dataset
from breakhis_tl.backbones import build_backbone
from breakhis_tl.calibration import calibrate


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
