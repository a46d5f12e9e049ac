"""Reading a finished run back and comparing architectures honestly.

Everything here works from the files a run writes (`trained_models/<run>/`), so the analysis
notebook reads a run made by the training notebook and one made by the command line alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score

from breakhis_tl.errors import UserError
from breakhis_tl.metrics import METRICS, compute_metrics, fold_table

TABLE_METRICS = ("image_rate", "patient_rate", "balanced_accuracy", "precision", "recall", "f1",
                 "auc")  # fmt: skip


@dataclass
class Run:
    name: str
    folder: Path
    results: pd.DataFrame
    history: pd.DataFrame
    predictions: pd.DataFrame
    config: dict
    classes: list[str]
    heads: dict[str, Path]


def load_run(out_dir: str | Path, run: str) -> Run:
    folder = Path(out_dir) / "trained_models" / run
    if not (folder / "results.csv").is_file():
        raise UserError(f"No results.csv in {folder}; is {run!r} the name of a finished run?")
    config = json.loads((folder / "config.json").read_text())
    predictions = pd.read_csv(
        folder / "predictions.csv", keep_default_na=False, na_values=[""], dtype={"patient": str}
    )
    return Run(
        name=run, folder=folder, results=pd.read_csv(folder / "results.csv"),
        history=pd.read_csv(folder / "history.csv"), predictions=predictions, config=config,
        classes=list(config["classes"]), heads={p.stem: p for p in sorted(folder.glob("*.pt"))},
    )  # fmt: skip


def bootstrap_ci(
    y_true, y_pred, groups, n: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile CI of balanced accuracy, resampling patients (not images).

    Images of one patient are correlated; resampling images would make the interval far
    too narrow. Each replicate draws patients with replacement and keeps all their images.
    """
    y_true, y_pred, groups = map(np.asarray, (y_true, y_pred, groups))
    if len(y_true) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    patients = np.unique(groups)
    members = {p: np.flatnonzero(groups == p) for p in patients}
    stats = []
    for _ in range(n):
        idx = np.concatenate([members[p] for p in rng.choice(patients, len(patients))])
        if len(np.unique(y_true[idx])) < 2:
            continue  # balanced accuracy of one class says nothing
        stats.append(balanced_accuracy_score(y_true[idx], y_pred[idx]))
    if not stats:
        return float("nan"), float("nan")
    lo, hi = np.percentile(stats, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


def results_table(run: Run, ci_split: str = "test") -> pd.DataFrame:
    """Per architecture and split: mean ± std over folds of every rate, plus a 95% patient
    bootstrap CI of balanced accuracy on `ci_split` (val where there is no test split)."""
    res = run.results
    split_for_ci = ci_split if ci_split in set(res["split"]) else "val"
    table = fold_table(res, TABLE_METRICS)
    counts = res.groupby(["arch", "split"], sort=False)[["n_images", "n_patients"]].sum()
    keys = list(zip(table["arch"], table["split"], strict=True))
    table.insert(3, "images", [int(counts.loc[k, "n_images"]) for k in keys])
    table.insert(4, "patients", [int(counts.loc[k, "n_patients"]) for k in keys])
    cis = []
    for arch, split in keys:
        if split != split_for_ci:
            cis.append(np.nan)
            continue
        p = run.predictions[(run.predictions["arch"] == arch) & (run.predictions["split"] == split)]
        lo, hi = bootstrap_ci(p["target"], p["prediction"], p["patient"])
        cis.append(f"[{lo:.3f}, {hi:.3f}]")
    table["balanced_accuracy 95% CI"] = cis
    return table


def _held_out(predictions: pd.DataFrame) -> str:
    """The split a head is judged on: test where the protocol has one, else val."""
    return "test" if (predictions["split"] == "test").any() else "val"


def per_group_metrics(
    run: Run, by: str = "magnification", split: str | None = None
) -> pd.DataFrame:
    """Metrics per architecture and group (say, magnification) from the saved predictions."""
    p = run.predictions
    split = split or _held_out(p)
    p = p[p["split"] == split]
    if by not in p:
        raise UserError(f"The predictions of run {run.name} have no {by!r} column.")
    index = {c: i for i, c in enumerate(run.classes)}
    rows = []
    for (arch, group), g in p.groupby(["arch", by], sort=True):
        probs = g[[f"prob_{c}" for c in run.classes]].to_numpy(float)
        m = compute_metrics(g["target"].map(index), probs, run.classes, g["patient"].tolist())
        rows.append(
            {
                "arch": arch,
                by: group,
                "split": split,
                "images": m["n_images"],
                "patients": m["n_patients"],
                **{k: m[k] for k in METRICS},
            }
        )
    return pd.DataFrame(rows)


def confusion(run: Run, arch: str, split: str | None = None) -> tuple[list, str]:
    p = run.predictions[run.predictions["arch"] == arch]
    split = split or _held_out(p)
    p = p[p["split"] == split]
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(p["target"], p["prediction"], labels=run.classes).tolist(), split


def leakage_study(
    data_dir: str | Path,
    arch: str,
    out_dir: str | Path,
    weights: str = "default",
    epochs: int = 30,
    seed: int = 0,
    dataset: str = "breakhis",
    run_prefix: str = "leakage",
    **kwargs,
) -> pd.DataFrame:
    """The same head trained with the `random` (image-level) and `patient` splits.

    The features come from one cache, so the only difference is which images end up in
    test: with `random`, other images of the test patients were seen in training.
    """
    from breakhis_tl.runner import RunConfig, run_training
    from breakhis_tl.training import TrainConfig

    rows = []
    for protocol in ("random", "patient"):
        cfg = RunConfig(
            data=str(data_dir),
            dataset=dataset,
            archs=[arch],
            weights=weights,
            protocol=protocol,
            run=f"{run_prefix}_{protocol}",
            out=str(out_dir),
            train=TrainConfig(epochs=epochs, seed=seed),
            **kwargs,
        )
        res = run_training(cfg, command=f"leakage_study({arch}, {protocol})")
        for r in res.results.to_dict("records"):
            rows.append(
                {
                    "protocol": protocol,
                    **{
                        k: r[k]
                        for k in (
                            "split",
                            "n_images",
                            "n_patients",
                            "balanced_accuracy",
                            "image_rate",
                            "patient_rate",
                            "auc",
                        )
                    },
                }
            )
    return pd.DataFrame(rows)
