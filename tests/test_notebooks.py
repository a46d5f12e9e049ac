"""The notebooks run end to end on real BreakHis images (papermill) and are committed without
outputs and without logic of their own."""

import ast
import json
from pathlib import Path

import nbformat
import pandas as pd
import papermill as pm
import pytest
from conftest import REPO, _shared

from breakhis_tl.cli import main

NOTEBOOKS = REPO / "notebooks"
TRAINING_PARAMS = {
    "data_dir",
    "group_by",
    "recipe",
    "repeats",
    "dataset",
    "archs",
    "weights",
    "task",
    "magnification",
    "protocol",
    "epochs",
    "views",
    "stain",
    "stain_ref",
    "stain_views",
    "input_size",
    "seed",
    "run_name",
    "out_dir",
}
ALLOWED_IMPORTS = {"breakhis_tl", "logging", "matplotlib", "IPython", "pandas", "numpy"}


def _code_cells(name):
    return [c for c in nbformat.read(NOTEBOOKS / name, as_version=4).cells if c.cell_type == "code"]


@pytest.mark.parametrize("name", ["01_training.ipynb", "02_analysis.ipynb"])
def test_committed_without_outputs_and_without_logic(name):
    raw = json.loads((NOTEBOOKS / name).read_text())
    for cell in raw["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
    cells = _code_cells(name)
    assert cells[0].metadata.get("tags") == ["parameters"]
    for cell in cells:
        lines = [s for s in cell.source.splitlines() if not s.startswith("%")]
        tree = ast.parse("\n".join(lines))
        for node in ast.walk(tree):
            assert not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Lambda)), name
            if isinstance(node, ast.ImportFrom):
                assert node.module.split(".")[0] in ALLOWED_IMPORTS, node.module
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] in ALLOWED_IMPORTS for a in node.names)


def test_training_parameters_match_the_command_line():
    names = {
        t.id
        for t in ast.walk(ast.parse(_code_cells("01_training.ipynb")[0].source))
        if isinstance(t, ast.Name)
    }
    assert names == TRAINING_PARAMS
    analysis = {
        t.id
        for t in ast.walk(ast.parse(_code_cells("02_analysis.ipynb")[0].source))
        if isinstance(t, ast.Name)
    }
    assert {"out_dir", "run_name", "data_dir", "leakage_seeds", "group_by_study"} <= analysis


def _run(name, out, params):
    pm.execute_notebook(
        str(NOTEBOOKS / name),
        str(out),
        parameters=params,
        kernel_name="python3",
        cwd=str(NOTEBOOKS),
        progress_bar=False,
    )
    return nbformat.read(out, as_version=4)


def _images(nb):
    return sum(
        1
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    )


def _text(nb):
    """Everything a reader sees: printed text and the HTML of displayed tables."""
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            out.append(o.get("text", ""))
            out.append(o.get("data", {}).get("text/html", ""))
            out.append(o.get("data", {}).get("text/plain", ""))
            out.append(o.get("data", {}).get("text/markdown", ""))
    return "".join(out)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """One output folder for the module: its feature cache serves every run in it."""
    return tmp_path_factory.mktemp("notebooks")


@pytest.mark.slow
def test_training_then_analysis_notebooks(out, tmp_path):
    data = _shared("breakhis_real")
    trained = _run("01_training.ipynb", tmp_path / "01.ipynb", {
        "data_dir": str(data), "archs": ["efficientnet_lite0"], "epochs": 3, "run_name": "nb",
        "out_dir": str(out), "group_by": "slide", "repeats": 1, "stain": "macenko",
        "stain_views": 1,
    })  # fmt: skip
    models = out / "trained_models" / "nb"
    for f in ("efficientnet_lite0.pt", "results.csv", "predictions.csv", "config.json"):
        assert (models / f).is_file()
    results = pd.read_csv(models / "results.csv")
    assert len(results) == 2  # val and test
    assert set(results["stain"]) == {"macenko"} and set(results["stain_views"]) == {1}
    assert (out / "summary_writers" / "nb").is_dir()
    graphs = out / "validation_graphs" / "nb"
    assert (graphs / "efficientnet_lite0_curves.png").is_file()
    assert not list(graphs.glob("compare_*.png"))  # one head: nothing to compare
    assert _images(trained) >= 2  # a sample grid and the curves figure, inline
    text = _text(trained)
    assert "Leakage check: no patient is on two sides" in text and "tensorboard" in "".join(
        c.source for c in trained.cells
    )
    assert "with dropout" not in "".join(c.source for c in trained.cells)

    # data_dir is not given: the analysis reads the run's data, task and magnification
    analysed = _run("02_analysis.ipynb", tmp_path / "02.ipynb", {
        "out_dir": str(out), "run_name": "nb", "leakage_epochs": 3, "leakage_seeds": 2,
        "leakage_test_frac": 0.3, "cam_images": 2,
    })  # fmt: skip
    assert _images(analysed) >= 4  # confusion matrix, ROC, Grad-CAM grid, stain figure
    assert len(list((models / "gradcam" / "efficientnet_lite0").glob("*.png"))) == 2
    text = _text(analysed)
    assert "bal. acc. 95% CI" in text and "caveat" in text  # the interval fits the page
    assert "patient-bootstrap interval [" in text  # the conclusion is computed from the run
    assert "patient-level rate" in text and "majority vote" in text
    assert "test patients raised" in text or "test patients lowered" in text
    assert "over 2 seeds" in text
    runs = {p.name for p in (out / "trained_models").iterdir()}
    leak = sorted(r for r in runs if r.startswith("nb_leakage_"))
    assert [r.rsplit("_", 1)[1] for r in leak] == ["leaky", "patient"]
    config = json.loads((out / "trained_models" / leak[0] / "config.json").read_text())
    assert config["task"] == "binary" and config["config"]["repeats"] == 2
    assert Path(config["data"]) == data.resolve()
    assert len([r for r in runs if r.startswith("nb_groupby_")]) == 2
    assert "accession" in text
    assert "This run's stain settings: {'method': 'macenko'" in text


@pytest.mark.slow
def test_analysis_notebook_on_a_command_line_run(out, tmp_path):
    data = _shared("breakhis_real")
    argv = ["train", "--data", str(data), "--archs", "efficientnet_lite0", "--epochs", "2",
            "--magnification", "40X,100X", "--out", str(out), "--run", "cli",
            "--workers", "0"]  # fmt: skip
    assert main(argv) == 0
    analysed = _run("02_analysis.ipynb", tmp_path / "02.ipynb", {
        "out_dir": str(out), "run_name": "cli", "leakage_epochs": 2, "leakage_seeds": 2,
        "leakage_test_frac": 0.3, "cam_images": 1, "group_by_study": False,
    })  # fmt: skip
    assert _images(analysed) >= 3
    text = _text(analysed)
    assert "magnification 40X,100X" in text and "over 2 seeds" in text
    leak = [p for p in (out / "trained_models").iterdir() if p.name.startswith("cli_leakage_")]
    mags = pd.read_csv(leak[0] / "predictions.csv")["magnification"]
    assert set(mags) <= {40, 100}
