"""eva at full scale: `train --protocol eva --recipe eva --repeats 5` through the command line
on all 7,909 BreakHis paths, with efficientnet_lite0's offline ImageNet weights.

Everything is eva's recipe (linear head, plain cross-entropy, AdamW 3e-4, batch 256, patience
500, best checkpoint by val balanced accuracy, 5 runs) except its step budget: 250 optimiser
steps instead of 12,500. `--recipe eva` replaces every head option, so no command-line option
(`--epochs`, `--patience`, ...) can shorten it; the budget is lowered in `recipes.EVA_TRAIN`
itself, which `apply_recipe` reads, and the head files must then record 250. The unshortened
recipe ran 1,473 epochs for one head here (best epoch 973) and 19 minutes for the five on a
loaded 2-core CPU, too slow for a test. With 250 steps, 5 steps an epoch on eva's 1,132
training images, each run stops at epoch 50 by the budget (patience 500 never triggers).

It runs on one torch thread: a head step (a 256x1280 by 1280x4 product) takes 1 ms on one
thread and 2-20 ms on two when the other core is busy (OpenMP threads waiting for each other),
which made the 250 epochs 5x slower on this shared 2-core machine.
"""

import json
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from breakhis_tl.cli import main
from breakhis_tl.heads import read_head_file
from breakhis_tl.index import SUBTYPES

EVA_CLASSES = ["F", "TA", "DC", "MC"]
STEPS = 250  # eva: 12,500; see the module's docstring
CODE_OF = {name: code for code, name in SUBTYPES.items()}


@pytest.fixture(scope="module")
def distinct_full_tree(full_tree, tmp_path_factory):
    """`full_tree`'s 7,909 paths, each a picture of its own: 8x8 PNGs, coloured by subtype
    with per-image noise. `full_tree` itself is one picture under every name, and a picture
    on both sides of a patient-disjoint split (eva's included) rightly stops a run as a leak."""
    root = tmp_path_factory.mktemp("eva_full")
    rng = np.random.default_rng(0)
    codes = sorted(SUBTYPES)
    for i, src in enumerate(sorted(full_tree.rglob("*.png"))):
        rel = src.relative_to(full_tree)
        code = CODE_OF[rel.parts[-4]]  # .../SOB/<subtype folder>/<slide>/<mag>/<file>
        base = np.array([40 + 25 * codes.index(code), 200 - 20 * codes.index(code), 128])
        pixels = np.clip(base + rng.normal(0, 12, (8, 8, 3)), 0, 255).astype(np.uint8)
        pixels[0, 0] = (i % 256, (i // 256) % 256, 7)  # distinct bytes and pixels per image
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, compress_level=1)
    return root


def test_eva_recipe_five_runs_on_the_full_scale_tree(
    distinct_full_tree, tmp_path, capsys, monkeypatch
):
    from breakhis_tl import recipes

    monkeypatch.setitem(recipes.EVA_TRAIN, "max_steps", STEPS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the docstring: tiny head steps, and a shared machine
    start = time.perf_counter()
    args = ["train", "--data", str(distinct_full_tree), "--protocol", "eva", "--recipe", "eva",
            "--repeats", "5", "--archs", "efficientnet_lite0", "--weights", "default",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path), "--run", "eva",
            "--workers", "0", "--device", "cpu"]  # fmt: skip
    try:
        code = main(args)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    assert code == 0, capsys.readouterr().err[-2000:]
    models = tmp_path / "trained_models" / "eva"

    # eva's split, counted from the split file the run wrote
    split = pd.read_csv(models / "split.csv")
    assert split["split"].value_counts().to_dict() == {"train": 1132, "val": 339}
    assert split["path"].str.contains("/40X/").all()

    # one result row per run, all named eva, on the four-class subtype task
    results = pd.read_csv(models / "results.csv")
    assert len(results) == 5 and sorted(results["repeat"]) == [1, 2, 3, 4, 5]
    assert set(results["recipe"]) == {"eva"} and set(results["protocol"]) == {"eva"}
    assert set(results["task"]) == {"subtype"} and set(results["split"]) == {"val"}
    assert set(results["n_images"]) == {339} and results["model_selection"].all()
    assert set(results["epochs_run"]) == {STEPS // 5}  # the step budget, 5 steps an epoch

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
    print(f"eva full scale: {seconds:.1f} s")
