"""eva's protocol and recipe: the split counted on all 7,909 BreakHis paths (names only, nothing
decoded), and `train --protocol eva --recipe eva --repeats 5` through the command line on 48
images of those paths (both of eva's sides, the four classes), with efficientnet_lite0's
offline ImageNet weights.

Everything is eva's recipe except its step budget: 20 optimiser steps instead of 12,500,
lowered in `recipes.EVA_TRAIN` itself (which `apply_recipe` reads; no command-line option can
shorten the recipe), so the head files must record 20. With fewer images than eva's batch of
256, an epoch is one step, so each run stops at epoch 20 by the budget.
"""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from breakhis_tl.cli import main
from breakhis_tl.data.index import SUBTYPES
from breakhis_tl.heads.modules import read_head_file

EVA_CLASSES = ["F", "TA", "DC", "MC"]
STEPS = 20  # eva: 12,500; see the module's docstring
PER_SIDE = 6  # images per class on each side of eva's split
CODE_OF = {name: code for code, name in SUBTYPES.items()}


def test_eva_split_counts_on_all_7909_paths(full_tree):
    from breakhis_tl.data.folds import SplitOptions, plan_folds
    from breakhis_tl.data.index import index_breakhis

    split = dict(plan_folds(index_breakhis(full_tree), SplitOptions("eva", task="subtype")).folds)
    split = split[None]
    assert split["split"].value_counts().to_dict() == {"train": 1132, "val": 339}
    assert (split["magnification"] == 40).all() and set(split["subtype"]) == set(EVA_CLASSES)


@pytest.fixture(scope="module")
def eva_tree(breakhis_layout, tmp_path_factory):
    """PER_SIDE 40X paths per class on each side of eva's split, each a picture of its own:
    8x8 PNGs coloured by subtype with per-image noise (one picture under two names would
    rightly stop the run as a leak)."""
    from breakhis_tl.data.splits import EVA_VAL_PATIENTS

    root = tmp_path_factory.mktemp("eva")
    rng = np.random.default_rng(0)
    codes = sorted(SUBTYPES)
    paths = breakhis_layout["path"][breakhis_layout["path"].str.contains("/40X/")]
    chosen = []
    for name in EVA_CLASSES:
        mine = paths[paths.str.contains(f"/SOB_[BM]_{name}-")].sort_values()
        slide = mine.str.extract(r"SOB_[BM]_[A-Z]+-\d+-([0-9A-Z]+)-")[0]
        val = slide.isin(EVA_VAL_PATIENTS)
        chosen += list(mine[val][:PER_SIDE]) + list(mine[~val][:PER_SIDE])
    for i, rel in enumerate(chosen):
        code = CODE_OF[rel.split("/")[-4]]  # .../SOB/<subtype folder>/<slide>/<mag>/<file>
        base = np.array([40 + 25 * codes.index(code), 200 - 20 * codes.index(code), 128])
        pixels = np.clip(base + rng.normal(0, 12, (8, 8, 3)), 0, 255).astype(np.uint8)
        pixels[0, 0] = (i, 3, 7)  # distinct pixels per image
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    return root


def test_eva_recipe_five_runs(eva_tree, tmp_path, capsys, monkeypatch):
    from breakhis_tl.heads import recipes

    monkeypatch.setitem(recipes.EVA_TRAIN, "max_steps", STEPS)
    args = ["train", "--data", str(eva_tree), "--protocol", "eva", "--recipe", "eva",
            "--repeats", "5", "--archs", "efficientnet_lite0", "--weights", "default",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path), "--run", "eva",
            "--workers", "0", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    models = tmp_path / "trained_models" / "eva"

    # eva's split, counted from the split file the run wrote
    split = pd.read_csv(models / "split.csv")
    n = len(EVA_CLASSES) * PER_SIDE
    assert split["split"].value_counts().to_dict() == {"train": n, "val": n}
    assert split["path"].str.contains("/40X/").all()

    # one result row per run, all named eva, on the four-class subtype task
    results = pd.read_csv(models / "results.csv")
    assert len(results) == 5 and sorted(results["repeat"]) == [1, 2, 3, 4, 5]
    assert set(results["recipe"]) == {"eva"} and set(results["protocol"]) == {"eva"}
    assert set(results["task"]) == {"subtype"} and set(results["split"]) == {"val"}
    assert set(results["n_images"]) == {n} and results["model_selection"].all()
    assert set(results["epochs_run"]) == {STEPS}  # the step budget, one step an epoch

    # five heads, rep1..rep5, each recording eva's recipe, and each its own head
    heads = sorted(p.name for p in models.glob("*.pt"))
    assert heads == [f"efficientnet_lite0_rep{r}.pt" for r in range(1, 6)]
    states, seeds = [], set()
    for name in heads:
        meta, state = read_head_file(models / name)
        assert meta["recipe"] == "eva" and meta["head"] == "linear"
        assert meta["protocol"] == "eva" and meta["task"] == "subtype"
        assert meta["classes"] == EVA_CLASSES and meta["feature_dim"] == 1280
        assert meta["train"]["max_steps"] == STEPS and meta["train"]["patience"] == 500
        assert meta["train"]["lr"] == 3e-4 and meta["train"]["batch_size"] == 256
        assert meta["weights_id"].startswith("lite0-imagenet-")
        seeds.add(meta["head_seed"])
        states.append(state)
    assert len(seeds) == 5
    for i in range(5):
        for j in range(i + 1, 5):
            assert any(not torch.equal(states[i][k], states[j][k]) for k in states[i])
    assert results["balanced_accuracy"].min() > 0.5  # the colours are learnt (chance 0.25)

    # the run's config and every head's TensorBoard hparams name the recipe
    config = json.loads((models / "config.json").read_text())
    assert config["config"]["recipe"] == "eva" and config["protocol"] == "eva"
    assert config["config"]["repeats"] == 5 and config["classes"] == EVA_CLASSES
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata as hp_meta

    logs = tmp_path / "summary_writers" / "eva"
    for r in range(1, 6):
        acc = EventAccumulator(str(logs / f"efficientnet_lite0_rep{r}")).Reload()
        plugin = acc.PluginTagToContent(hp_meta.PLUGIN_NAME)
        start_info = hp_meta.parse_session_start_info_plugin_data(
            plugin[hp_meta.SESSION_START_INFO_TAG]
        )
        assert start_info.hparams["recipe"].string_value == "eva"
        assert start_info.hparams["repeat"].number_value == r
