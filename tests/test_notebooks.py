"""The notebooks run end to end on the sample (papermill) and are committed without outputs."""

import ast
import json

import nbformat
import pandas as pd
import papermill as pm
import pytest
from conftest import REPO

from breakhis_tl.cli import main

NOTEBOOKS = REPO / "notebooks"
TRAINING_PARAMS = {
    "data_dir",
    "dataset",
    "archs",
    "weights",
    "task",
    "magnification",
    "protocol",
    "epochs",
    "views",
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
    assert {"out_dir", "run_name", "data_dir"} <= analysis


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


def test_training_then_analysis_notebooks(breakhis_sample, tmp_path):
    out = tmp_path / "outputs"
    trained = _run("01_training.ipynb", tmp_path / "01.ipynb", {
        "data_dir": str(breakhis_sample), "archs": ["efficientnet_lite0", "mobilenet_v2"],
        "weights": "default,mobilenet_v2=none", "epochs": 3, "run_name": "nb",
        "out_dir": str(out),
    })  # fmt: skip
    models = out / "trained_models" / "nb"
    for f in ("efficientnet_lite0.pt", "mobilenet_v2.pt", "results.csv", "predictions.csv"):
        assert (models / f).is_file()
    assert len(pd.read_csv(models / "results.csv")) == 4
    assert (out / "summary_writers" / "nb" / "mobilenet_v2").is_dir()
    assert (out / "validation_graphs" / "nb" / "compare_f1.png").is_file()
    # a sample grid and one curves figure per architecture, shown inline
    assert _images(trained) >= 3
    text = "".join(o.get("text", "") for c in trained.cells for o in c.get("outputs", []))
    assert "Leakage check: passed" in text and "tensorboard" in "".join(
        c.source for c in trained.cells
    )

    analysed = _run("02_analysis.ipynb", tmp_path / "02.ipynb", {
        "out_dir": str(out), "run_name": "nb", "data_dir": str(breakhis_sample),
        "leakage_epochs": 3, "cam_images": 2,
    })  # fmt: skip
    assert _images(analysed) >= 4  # confusion matrices, ROC, Grad-CAM grids
    assert len(list((models / "gradcam" / "efficientnet_lite0").glob("*.png"))) == 2
    for protocol in ("random", "patient"):
        assert (out / "trained_models" / f"nb_leakage_{protocol}" / "results.csv").is_file()


def test_analysis_notebook_on_a_command_line_run(breakhis_sample, tmp_path):
    assert (
        main(
            [
                "train",
                "--data",
                str(breakhis_sample),
                "--archs",
                "efficientnet_lite0",
                "--epochs",
                "2",
                "--out",
                str(tmp_path),
                "--run",
                "cli",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    analysed = _run("02_analysis.ipynb", tmp_path / "02.ipynb", {
        "out_dir": str(tmp_path), "run_name": "cli", "data_dir": str(breakhis_sample),
        "leakage_epochs": 2, "cam_images": 1,
    })  # fmt: skip
    assert _images(analysed) >= 3
