"""The default head's time: `fit_logreg_cv` (7 values of C x 5 patient-grouped folds, then
the refit) on real lite0 features, this code against scikit-learn's (the code at --baseline),
interleaved round by round, median [min, max].

python benchmarks/logreg_probe.py --rows 3032,7909 --repeats 5

Features: efficientnet_lite0 (its ImageNet weights) on the real IDC patches of --data,
extracted once into --workdir's cache. A size beyond the real rows tiles them: each copy's
patients renamed and its features jittered (1% of each feature's spread), so no two rows are
equal and the folds keep whole patients.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from common import emit, hwm_mib, machine, parser, reset_peak_rss, rss_mib, spread, workdir

from breakhis_tl.heads import logreg, training
from breakhis_tl.heads.training import LOGREG_C, TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "idc_real"


def features(data: Path, limit: int | None, work: Path) -> tuple[np.ndarray, ...]:
    """(features, labels, patients) of the IDC patches, from the cache after the first run."""
    from breakhis_tl.data.index import index_idc
    from breakhis_tl.features.extract import FeatureCache, Request, extract
    from breakhis_tl.models.backbones import build_backbone

    index = index_idc(data).sort_values(["patient", "relpath"]).reset_index(drop=True)
    if limit:
        index = index.iloc[:limit]
    bb = build_backbone("efficientnet_lite0", "default")
    paths = index["path"].tolist()
    cache = FeatureCache(work / "cache" / "features")
    [(x, ok)], _ = extract(paths, [Request(bb, 0, np.arange(len(paths)))], cache=cache,
                           progress=False)  # fmt: skip
    ok = ok.numpy()
    y = (index["label"] == "idc").to_numpy().astype(np.int64)
    return x.float().numpy()[ok], y[ok], index["patient"].astype(str).to_numpy()[ok]


def tiled(x: np.ndarray, y: np.ndarray, g: np.ndarray, rows: int, seed: int = 0) -> tuple:
    copies = -(-rows // len(y))
    rng = np.random.default_rng(seed)
    noise = [rng.normal(0, 0.01, x.shape).astype(np.float32) * x.std(0) for _ in range(copies)]
    xs = np.concatenate([x + (n if k else 0) for k, n in enumerate(noise)])[:rows]
    gs = np.concatenate([np.char.add(g.astype(str), f"#{k}") for k in range(copies)])[:rows]
    return xs, np.tile(y, copies)[:rows], gs


def baseline(rev: str) -> types.ModuleType:
    """training.py as it was at `rev` (scikit-learn's solver), importable beside today's."""
    src = subprocess.run(["git", "show", f"{rev}:breakhis_tl/training.py"], cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    moved = {
        "breakhis_tl.dataset": "breakhis_tl.data.dataset",
        "breakhis_tl.features": "breakhis_tl.features.extract",
    }  # the modules since then
    for old, new in moved.items():
        src = src.replace(f"from {old} import", f"from {new} import")
    module = types.ModuleType("baseline_training")
    sys.modules[module.__name__] = module  # its dataclasses look their module up
    exec(compile(src, f"{rev}:training.py", "exec"), module.__dict__)
    return module


def one_fit(fit, x, y, g, device) -> tuple[float, float, list[int], float]:
    """Seconds, chosen C, L-BFGS iterations per solve (this code only) of one head, and the
    MiB of host memory it added at its peak to what the caller held (its features)."""
    val = np.isin(g, np.unique(g)[-max(2, len(np.unique(g)) // 7) :])  # some patients as val
    iters = []
    real = logreg.solve

    def counted(*a, **k):
        theta, n = real(*a, **k)
        iters.append(n)
        return theta, n

    logreg.solve = counted
    kw = {"device": device} if fit is training.fit_logreg_cv else {}
    train, held = (x[~val], y[~val], g[~val]), (x[val], y[val], g[val])  # the caller's arrays
    try:
        before, _ = rss_mib(), reset_peak_rss()
        t0 = time.perf_counter()
        _, res, _ = fit(train, held, ["non_idc", "idc"], TrainConfig(), **kw)
        seconds = time.perf_counter() - t0
    finally:
        logreg.solve = real
    return seconds, LOGREG_C[res.best_epoch - 1], iters, hwm_mib() - before


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the real IDC patches")
    p.add_argument("--rows", default="3032,7909", help="head sizes (rows), comma-separated")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--baseline", default="81dfe66", help="git revision of the old head; none")
    p.add_argument("--limit", type=int, default=None, help="use only the first N patches")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = workdir(args.workdir, "logreg_probe")
    x, y, g = features(Path(args.data), args.limit, work)
    impls = {"torch": training.fit_logreg_cv}
    if args.baseline != "none":
        impls["sklearn"] = baseline(args.baseline).fit_logreg_cv
    torch.optim.LBFGS([torch.zeros(1, requires_grad=True)])  # torch._dynamo's import, once
    for rows in (int(r) for r in args.rows.split(",")):
        data = tiled(x, y, g, rows)
        one_fit(impls["torch"], *data, args.device)  # warm-up, untimed
        got = {name: [] for name in impls}
        for r in range(args.repeats):
            names = list(impls)[r % len(impls) :] + list(impls)[: r % len(impls)]
            for name in names:
                got[name].append(one_fit(impls[name], *data, args.device))
        base = np.median([r[0] for r in got["sklearn"]]) if "sklearn" in got else None
        for name, runs in got.items():
            seconds = [r[0] for r in runs]
            emit({"benchmark": "logreg_probe", **machine(args.device), "impl": name,
                  "rows": rows, "dim": x.shape[1], "runs": len(runs),
                  "seconds": spread(seconds)["median"], "spread": spread(seconds),
                  "chosen_C": sorted({r[1] for r in runs}), "lbfgs_iterations": runs[0][2],
                  "features_mib": round(data[0].nbytes / 2**20),
                  "added_peak_mib": round(max(r[3] for r in runs)),
                  "vs_baseline": round(base / np.median(seconds), 2) if base else None,
                  "target_seconds": 10.0 if rows >= 7909 else None})  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    main()
