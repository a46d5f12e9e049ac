"""The main job: split, extract features once, train a head per architecture, write everything.

Stages run in order and each is a function a reader can name: configuration checks (before
any long work), data and folds (`prepare_data`), backbones (`build_backbones`), features
(`extract_features`, cached per image), one head per architecture x fold x repeat (the
stages of `headjob`), and the run's files (`write_run_outputs`).
"""

from __future__ import annotations

import logging
import math
import platform
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from breakhis_tl import __version__, headjob
from breakhis_tl.config import RunConfig, view_pairs
from breakhis_tl.data.folds import Plan, SplitOptions, check_options, plan_folds, write_split
from breakhis_tl.data.identity import ImageStore
from breakhis_tl.data.index import build_index, filter_magnification, parse_magnification
from breakhis_tl.data.leakage import check_twins
from breakhis_tl.data.splits import TASKS, check_classes, class_names, target_column
from breakhis_tl.data.stain import StainNormaliser, StainSetup
from breakhis_tl.data.transforms import N_VIEWS
from breakhis_tl.errors import UserError
from breakhis_tl.features.extract import (
    ExtractionReport,
    FeatureCache,
    Request,
    check_features,
    extract,
    fast_path,
    pick_device,
    prepare,
)
from breakhis_tl.heads.modules import HEADS
from breakhis_tl.heads.recipes import RECIPES, apply_recipe
from breakhis_tl.metrics import fold_table
from breakhis_tl.models.backbones import (
    Backbone,
    build_backbone,
    check_arch,
    with_input_size,
)
from breakhis_tl.models.compute import PRECISIONS, choose
from breakhis_tl.report.outputs import (
    atomic_csv,
    atomic_json,
    check_run_name,
    check_writable,
    default_run_name,
    discard_attempt,
    open_run_folders,
    run_folders,
)
from breakhis_tl.report.plots import CURVE_METRICS, plot_comparison

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run: str
    results: pd.DataFrame
    history: pd.DataFrame
    predictions: pd.DataFrame
    heads: dict[str, Path]
    folders: dict[str, Path]
    interrupted: bool
    cache_used: bool
    skipped: list[str]
    seconds: dict[str, float] = field(default_factory=dict)  # per stage (`Stopwatch`)


class Stopwatch:
    """Seconds per stage of a run, in its log and config.json: what a run's time went to
    (a random init's calibration, for one, is paid with or without the feature cache)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - self._last, 3)
        self._last = now

    def summary(self) -> str:
        return ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())


class StopFlag:
    """First Ctrl-C during training: finish the epoch, keep the best head. Otherwise: abort."""

    def __init__(self):
        self.stop = False
        self.training = False

    def __call__(self, signum, frame):
        if self.training and not self.stop:
            self.stop = True
            log.warning("Ctrl-C: stopping after this epoch (press again to abort at once).")
        else:
            raise KeyboardInterrupt

    def install(self):
        try:
            return signal.signal(signal.SIGINT, self)
        except ValueError:  # not the main thread (a notebook's worker): no handler
            return None


def validate(cfg: RunConfig) -> None:
    """Every mistake that can be seen up front is reported before any long work starts."""
    if not cfg.archs:
        raise UserError("No architecture given.")
    for a in cfg.archs:
        check_arch(a)
    if cfg.task is not None and cfg.task not in TASKS:
        raise UserError(f"Unknown task {cfg.task!r}; choose one of: {', '.join(TASKS)}.")
    if cfg.recipe not in RECIPES:
        raise UserError(f"Unknown recipe {cfg.recipe!r}; choose one of: {', '.join(RECIPES)}.")
    check_options(split_options(cfg, cfg.task or "binary"))
    t = cfg.train
    if t.head not in HEADS:
        raise UserError(f"Unknown head {t.head!r}; choose one of: {', '.join(HEADS)}.")
    checks = [
        (t.epochs >= 1, f"--epochs must be at least 1, not {t.epochs}."),
        (t.lr > 0 and math.isfinite(t.lr), f"--lr must be a positive number, not {t.lr}."),
        (t.weight_decay >= 0, f"--weight-decay must not be negative, not {t.weight_decay}."),
        (t.batch_size >= 1, f"--batch-size must be at least 1, not {t.batch_size}."),
        (t.patience >= 1, f"--patience must be at least 1, not {t.patience}."),
        (0 <= t.dropout < 1, f"--dropout must be in [0, 1), not {t.dropout}."),
        (t.select in ("best", "last"), f"--select must be best or last, not {t.select!r}."),
        (1 <= cfg.views <= N_VIEWS, f"--views must be between 1 and {N_VIEWS}, not {cfg.views}."),
        (cfg.cv is None or cfg.cv >= 2, f"--cv must be at least 2, not {cfg.cv}."),
        (cfg.repeats >= 1, f"--repeats must be at least 1, not {cfg.repeats}."),
        (
            cfg.input_size is None or cfg.input_size >= 32,
            f"--input-size must be at least 32 px, not {cfg.input_size}.",
        ),
        (
            cfg.precision in PRECISIONS,
            f"--precision must be one of {', '.join(PRECISIONS)}, not {cfg.precision!r}.",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    if cfg.views > 1 and headjob.runs_end_to_end(cfg):
        raise UserError("--views caches views; with --no-cache, augmentation is online already.")
    for part in cfg.weights.split(","):
        name, sep, _ = part.strip().partition("=")
        if sep and name not in cfg.archs:
            raise UserError(f"--weights names {name!r}, which is not among --archs.")
    pick_device(cfg.device)


def split_options(cfg: RunConfig, task: str) -> SplitOptions:
    return SplitOptions(
        protocol=cfg.protocol, task=task, seed=cfg.train.seed, fold=cfg.fold, cv=cfg.cv,
        val_frac=cfg.val_frac, test_frac=cfg.test_frac, folds_csv=cfg.folds_csv,
        split_file=cfg.split_file, group_by=cfg.group_by, eva_holdout=cfg.eva_holdout,
    )  # fmt: skip


def weights_for(spec: str, arch: str) -> str:
    """`default`, `none` or a file for every architecture, with `arch=value` overrides:
    `default,mobilenet_v2=none` keeps ImageNet weights except for mobilenet_v2."""
    chosen = "default"
    for part in spec.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            chosen = name
        elif name == arch:
            return value
    return chosen


def _resolve_data(cfg: RunConfig, out: Path) -> Path:
    if cfg.data is not None:
        return Path(cfg.data)
    data = out / "data"
    if cfg.dataset == "breakhis" and not (data / "BreaKHis_v1").is_dir():
        from breakhis_tl.data.download import download_breakhis

        log.info("No --data given and no BreakHis in %s: downloading it first.", data)
        download_breakhis(data)
    return data


def versions() -> dict:
    import sklearn
    import torchvision

    return {
        "breakhis_tl": __version__, "torch": torch.__version__,
        "torchvision": torchvision.__version__, "scikit-learn": sklearn.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
    }  # fmt: skip


@dataclass
class Data:
    """The run's images (one row each, across folds) and its folds."""

    plan: Plan
    images: pd.DataFrame
    y: np.ndarray  # class index per image
    twins: dict  # fold -> test images with a twin in train


def prepare_data(cfg: RunConfig, task: str, classes: list[str], selecting: bool = True) -> Data:
    """Index, folds and class checks (no image is opened yet)."""
    index = build_index(_resolve_data(cfg, Path(cfg.out)), cfg.dataset)
    index = filter_magnification(index, parse_magnification(cfg.magnification))
    plan = plan_folds(index, split_options(cfg, task))
    images = (
        pd.concat([f for _, f in plan.folds]).drop_duplicates("relpath")
        .drop(columns=["split", "fold"], errors="ignore").reset_index(drop=True)
    )  # fmt: skip
    for _, split in plan.folds:
        check_classes(split, task, classes)
    if selecting:
        _check_selection(cfg, plan)
    y = images[target_column(task)].map({c: i for i, c in enumerate(classes)}).to_numpy()
    return Data(plan, images, y, {})


def pictures_known(data: Data, store: ImageStore, workers: int | None = None) -> bool:
    """Whether every image's pixel hash is remembered: then the leakage check costs nothing
    and goes first; else a run with an extraction pass checks after it, the pass hashing in
    its own decode (the split does not depend on the hashes, and no head comes before the
    check), so a twin across sides then stops the run after the extraction (kept in the
    cache, lost under --no-cache)."""
    ids = store.content_ids(data.images["path"].tolist(), workers=workers)
    known = store.known_pixels(ids)
    return all(i is None or i in known for i in ids)


def check_pictures(cfg: RunConfig, data: Data, task: str, store: ImageStore) -> None:
    """The leakage check by picture: pixel hashes, computed once per image ever."""
    images = data.images
    images["pixel"] = store.pixel_hashes(images["path"].tolist(), cfg.workers, cfg.progress)
    pixel = dict(zip(images["relpath"], images["pixel"], strict=True))
    for k, split in data.plan.folds:
        found = check_twins(
            split.assign(pixel=split["relpath"].map(pixel)), target_column(task), data.plan.protocol
        )
        data.twins[k] = found.test_with_train_twin


def _check_selection(cfg: RunConfig, plan: Plan) -> None:
    if cfg.train.select == "best" and any(not (s["split"] == "val").any() for _, s in plan.folds):
        raise UserError(
            "This split has no validation images to select the epoch on; add them, or pass "
            f"--select last to train {cfg.train.epochs} epochs and keep the last head."
        )


def build_backbones(
    cfg: RunConfig, data: Data, stain: StainSetup | None = None, device="cpu"
) -> dict[tuple[str, int | None], Backbone]:
    """(arch, fold) -> frozen backbone. A random init gets its batch-norm statistics from
    each fold's own training images, so a baseline never sees its test images; on `device`."""
    from breakhis_tl.models.calibration import calibrate, has_batchnorm

    def build(arch, weights):
        bb = build_backbone(arch, weights, cfg.train.seed)
        return with_input_size(bb, cfg.input_size) if cfg.input_size else bb

    out = {}
    for arch in cfg.archs:
        weights = weights_for(cfg.weights, arch)
        try:
            base = build(arch, weights)
        except UserError as exc:
            raise _all_missing(cfg, exc) from None
        for i, (k, split) in enumerate(data.plan.folds):
            if weights != "none" or not has_batchnorm(base):
                out[(arch, k)] = base
                continue
            bb = base if i == 0 else build(arch, weights)
            train = split.loc[split["split"] == "train", "path"].tolist()
            out[(arch, k)] = calibrate(bb, train, cfg.train.seed, cfg.extract_batch, cfg.workers,
                                       stain, device)  # fmt: skip
    return out


def _all_missing(cfg: RunConfig, exc: UserError) -> UserError:
    """The first missing ImageNet checkpoint's sentence, with every other architecture of
    the run that would need a download too."""
    from breakhis_tl.models.backbones import missing_imagenet

    wanted = [a for a in cfg.archs if weights_for(cfg.weights, a) == "default"]
    missing = missing_imagenet(wanted)
    if len(missing) < 2 or "ImageNet weights of" not in str(exc):
        return exc
    return UserError(f"{exc} Of this run's architectures, {len(missing)} need ImageNet weights "
                     f"that are not cached: {', '.join(missing)}.")  # fmt: skip


def compute_modes(cfg: RunConfig, backbones, device, cache_root: Path, shard=None) -> dict:
    """(arch, weights id) -> the compute mode for this machine (`compute.choose`), kept
    per machine in dispatch.json. Its dtype is a rule of the hardware, so shards on alike
    machines extract one feature space; shards on unlike ones should share --precision."""
    import os

    folder = Path(os.environ.get("BREAKHIS_TL_DISPATCH_DIR") or cache_root)
    if shard is not None and cfg.precision == "auto":
        log.info(
            "Sharded extraction: every shard must run one dtype (the feature cache is keyed "
            "by it); on machines with and without bf16 kernels pass --precision."
        )
    modes = {}
    for bb in {id(b): b for b in backbones.values()}.values():
        modes[(bb.name, bb.weights_id)] = choose(bb, device, cfg.precision, cache_dir=folder)
    return modes


def make_stain(cfg: RunConfig) -> StainSetup:
    """The run's stain setup; a bad method or reference stops here, before any long work.
    A relative reference is made absolute in `cfg`, so the run's config.json still finds it
    from another folder (the analysis notebook's)."""
    if cfg.stain_ref is not None:
        cfg.stain_ref = str(Path(cfg.stain_ref).resolve())
    normaliser = StainNormaliser(cfg.stain, cfg.stain_ref)
    return StainSetup(normaliser, cfg.stain_views, cfg.train.seed)


def extract_features(s: Setup, cache, modes: dict, shard=None, hash_pixels: bool = False):
    """Each distinct backbone over every image, its views over the training images."""
    cfg, data, backbones = s.cfg, s.data, s.backbones
    rows_of = {rel: i for i, rel in enumerate(data.images["relpath"])}
    distinct, train_rows = {}, {}
    for (_, k), bb in backbones.items():
        key = (bb.name, bb.weights_id)
        distinct[key] = bb
        split = dict(data.plan.folds)[k]
        rows = split.loc[split["split"] == "train", "relpath"].map(rows_of)
        train_rows.setdefault(key, set()).update(rows.tolist())
    all_rows = np.arange(len(data.images))
    requests, view_pos = [], {}
    for key, bb in distinct.items():
        requests.append(Request(bb, 0, all_rows, modes.get(key)))
        vr = np.array(sorted(train_rows[key]), dtype=np.int64)
        view_pos[key] = {int(r): i for i, r in enumerate(vr)}
        requests += [Request(bb, v, vr, modes.get(key), sv) for v, sv in view_pairs(cfg)]
    paths = data.images["path"].tolist()
    got, report = extract(paths, requests, cache, s.device, s.store,
                          batch_size=cfg.extract_batch, workers=cfg.workers, strict=cfg.strict,
                          progress=cfg.progress, shard=shard, stain=s.stain,
                          hash_pixels=hash_pixels)  # fmt: skip
    feats = {}
    for req, (f, ok) in zip(requests, got, strict=True):
        feats[(req.backbone.name, req.backbone.weights_id, req.view, req.stain_view)] = (f, ok)
        if req.view == 0 and req.stain_view == 0:
            check_features(req.backbone.name, f, ok)
    if report.extracted:
        log.info("Extracted %d image feature(s); %d feature set(s) came wholly from the cache.",
                 report.images_extracted, len(report.cached))  # fmt: skip
    else:
        log.info("Feature cache used: nothing extracted (%d feature set(s) read).",
                 len(report.cached))  # fmt: skip
    return feats, view_pos, report


@dataclass
class Setup:
    """What `train` and `extract` both start from: the resolved config, its stain setup,
    device, task and classes, the cache and image store, the indexed and split data, and
    the backbones (calibrated where random)."""

    cfg: RunConfig
    stain: StainSetup
    device: torch.device
    task: str
    classes: list[str]
    cache_root: Path
    store: ImageStore
    data: Data
    backbones: dict


def set_up(cfg: RunConfig, watch: Stopwatch, selecting: bool = True, check=None) -> Setup:
    """The shared start of a run; `check(cfg)` runs once the config is valid and before any
    data is read (train's run-name check), so a mistake costs nothing."""
    cfg = resolve_protocol(apply_recipe(cfg))
    validate(cfg)
    if check is not None:
        check(cfg)
    stain = make_stain(cfg)
    device = pick_device(cfg.device)
    task = cfg.task or ("subtype" if cfg.protocol == "eva" else "binary")
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out) / "data" / "cache"
    check_writable(cache_root, "Cache folder")
    store = ImageStore(cache_root / "images.sqlite")
    classes = class_names(task, cfg.dataset, cfg.protocol or "patient")
    data = prepare_data(cfg, task, classes, selecting=selecting)
    watch.lap("index and split")
    backbones = build_backbones(cfg, data, stain, device)  # a missing weights file stops here
    watch.lap("backbones (and batch-norm calibration)")
    return Setup(cfg, stain, device, task, classes, cache_root, store, data, backbones)


def run_extraction(cfg: RunConfig, shard: tuple[int, int] | None = None) -> dict:
    """Features only, into the cache (eva's embedding step): the same data, split, backbones
    and views as `train` with these options, so a later `train` reads everything from the
    cache. `shard=(i, n)`: only the images whose content id falls in shard i of n, so n
    processes sharing a cache folder split the work with no other coordination (each shard
    decoding every image for the picture check would cost n passes over the data)."""
    watch = Stopwatch()
    s = set_up(cfg, watch, selecting=False)
    # a shard hashes its own images only: the check, which needs them all, is train's
    whole = shard is None or shard[1] == 1
    check_first = whole and pictures_known(s.data, s.store, s.cfg.workers)
    if check_first:
        check_pictures(s.cfg, s.data, s.task, s.store)
        watch.lap("duplicate check")
    modes = compute_modes(s.cfg, s.backbones, s.device, s.cache_root, shard)
    watch.lap("compute modes")
    cache = FeatureCache(s.cache_root / "features")
    _, _, report = extract_features(s, cache, modes, shard, hash_pixels=True)
    watch.lap("features")
    if whole and not check_first:
        check_pictures(s.cfg, s.data, s.task, s.store)
        watch.lap("duplicate check")
    elif not whole:
        log.info("Shard %d/%d hashed its own images' pixels; the leakage check by picture is "
                 "train's, once every shard is done.", shard[0], shard[1])  # fmt: skip
    log.info("Time per stage: %s.", watch.summary())
    return {"images": len(s.data.images), "extracted": report.images_extracted,
            "failed": len(report.failed), "stain_fallbacks": len(report.stain_fallbacks),
            "cache": str(cache.root), "seconds": watch.seconds,
            "modes": {f"{a}": m.describe() for (a, _), m in modes.items()}}  # fmt: skip


@dataclass
class _Context:
    """What every head of a run shares."""

    cfg: RunConfig
    run: str
    task: str
    classes: list[str]
    protocol: str
    group_by: str
    command: str
    device: torch.device
    modes: dict  # (arch, weights id) -> FastPath
    folders: dict[str, Path]
    feats: dict  # (arch, weights id, view, stain view) -> (fp16 features, ok mask)
    view_pos: dict  # (arch, weights id) -> {image row: position in that view's features}
    stop: StopFlag
    versions: dict
    stain: StainSetup
    fallbacks: dict  # image path -> why its stain normalisation failed
    writers: dict = field(default_factory=dict)
    hparam_domains: dict = field(default_factory=dict)  # TensorBoard reads one head's domains
    seconds: dict = field(default_factory=dict)  # per stage, up to the run's own files


def head_jobs(cfg: RunConfig, data: Data, backbones, stain: StainSetup) -> list[headjob.HeadJob]:
    from breakhis_tl.models.calibration import random_init_record

    rows_of = {rel: i for i, rel in enumerate(data.images["relpath"])}
    jobs, fingerprints = [], {}
    for arch in cfg.archs:
        for k, split in data.plan.folds:
            split = split.reset_index(drop=True)
            rows = np.array(split["relpath"].map(rows_of), dtype=np.int64)
            for r in range(cfg.repeats):
                name = arch.replace(":", "_").replace("/", "_")
                name += "" if k is None else f"_fold{k}"
                name += f"_rep{r + 1}" if cfg.repeats > 1 else ""
                seed = headjob.head_seed(cfg.train.seed, arch, k, r)
                y = data.y[rows].astype(int)
                bb, twins = backbones[(arch, k)], data.twins.get(k, 0)
                job = headjob.HeadJob(bb, k, r + 1, split, rows, y, twins, name, seed)
                if job.backbone.weights == "none":
                    job.extras = random_init_record(job.backbone, fingerprints)
                job.extras.update(stain.params())
                jobs.append(job)
    return jobs


def run_job(ctx: _Context, job: headjob.HeadJob) -> dict:
    """Train, evaluate and save one head."""
    data = headjob.training_data(ctx, job)
    ctx.writers[job.name] = headjob.open_head_writer(ctx, job, data.skipped)
    try:
        ctx.stop.training = True
        head, result = headjob.train_head(ctx, job, data)
        ctx.stop.training = False
        evals = headjob.evaluate_head(ctx, job, head, data)
        meta = headjob.head_record(ctx, job, result, evals, len(data.skipped))
        path = headjob.write_head_outputs(ctx, job, head, result, evals, meta)
    finally:
        ctx.stop.training = False
        ctx.writers.pop(job.name).close()
    return {
        "name": job.name, "arch": job.backbone.name, "head_path": path,
        "rows": headjob.result_rows(ctx, job, result, evals, len(data.skipped)),
        "history": [{**h, "selected": h["epoch"] == result.best_epoch} for h in result.history],
        "predictions": headjob.prediction_frame(ctx, job, evals),
        "skipped": data.skipped, "interrupted": result.interrupted,
    }  # fmt: skip


def resolve_protocol(cfg: RunConfig) -> RunConfig:
    """A split file's own protocol decides the task and classes when --protocol is left out
    (an eva split is the four-class subtype task)."""
    if cfg.protocol is None and cfg.split_file and Path(cfg.split_file).is_file():
        from breakhis_tl.data.folds import read_split

        written = read_split(cfg.split_file)
        if "protocol" in written and written["protocol"].notna().any():
            return replace(cfg, protocol=str(written["protocol"].dropna().iloc[0]))
    return cfg


def head_features(s: Setup, modes: dict) -> tuple[dict, dict, ExtractionReport | None]:
    """The heads' features: cached, or under --no-cache with logreg the same pass held in
    memory; none for end-to-end heads, whose backbones are only made ready to run."""
    if headjob.runs_end_to_end(s.cfg):
        for bb in {id(b): b for b in s.backbones.values()}.values():
            prepare(bb, s.device, modes.get((bb.name, bb.weights_id), fast_path(s.device)))
        return {}, {}, None
    cache = None if s.cfg.no_cache else FeatureCache(s.cache_root / "features")
    return extract_features(s, cache, modes, hash_pixels=True)


def run_training(cfg: RunConfig, command: str | None = None) -> RunResult:
    watch = Stopwatch()
    run = cfg.run or default_run_name()
    folders = run_folders(Path(cfg.out), run)
    s = set_up(cfg, watch, check=lambda c: check_run_name(folders, c.overwrite))
    cfg, data = s.cfg, s.data
    check_first = headjob.runs_end_to_end(cfg) or pictures_known(data, s.store, cfg.workers)
    if check_first:  # else after the extraction, hashed in its decode
        check_pictures(cfg, data, s.task, s.store)
        watch.lap("duplicate check")
    modes = compute_modes(cfg, s.backbones, s.device, s.cache_root)
    watch.lap("compute modes")
    feats, view_pos, report = head_features(s, modes)
    watch.lap("features")
    if not check_first:
        check_pictures(cfg, data, s.task, s.store)  # hashes from the extraction's own decode
        watch.lap("duplicate check")
    owned = open_run_folders(folders, cfg.overwrite)
    try:
        done, tables = _train_heads(s, run, folders, modes, (feats, view_pos), report, command,
                                    watch)  # fmt: skip
    except BaseException:  # a second Ctrl-C or an error: the same command must run again
        discard_attempt(owned)
        log.warning("Run %r aborted: its new run folders are removed, the cache is kept.", run)
        raise
    log.info("Time per stage: %s.", watch.summary())
    skipped = sorted({p for d in done for p in d["skipped"]})
    return RunResult(run, *tables,
                     {d["name"]: d["head_path"] for d in done}, folders,
                     any(d["interrupted"] for d in done),
                     bool(report and not report.extracted), skipped, watch.seconds)  # fmt: skip


def _train_heads(
    s: Setup,
    run: str,
    folders: dict[str, Path],
    modes: dict,
    features: tuple,
    report: ExtractionReport | None,
    command: str | None,
    watch: Stopwatch,
) -> tuple[list[dict], tuple]:
    """Everything a run writes to its run folders (split file, heads, logs, tables, figures)
    in one place, so that an abort anywhere in it can be undone (`discard_attempt`)."""
    cfg, data = s.cfg, s.data
    feats, view_pos = features
    paths = data.images["path"].tolist()
    fallbacks = {paths[r]: m for r, m in (report.stain_fallbacks if report else {}).items()}
    write_split(data.plan, folders["models"] / "split.csv")
    ctx = _Context(cfg, run, s.task, s.classes, data.plan.protocol, data.plan.group_by,
                   command or " ".join(sys.argv), s.device, modes, folders, feats, view_pos,
                   StopFlag(), versions(), s.stain, fallbacks)  # fmt: skip
    jobs = head_jobs(cfg, data, s.backbones, s.stain)
    ctx.hparam_domains = {
        "arch": sorted({j.backbone.name for j in jobs}),
        "fold": sorted({-1 if j.fold is None else int(j.fold) for j in jobs}),
    }
    done = _run_jobs(ctx, jobs)
    watch.lap("heads" if not headjob.runs_end_to_end(cfg) else "heads (end to end)")
    results, history, predictions = _collect(done)
    ctx.seconds = watch.seconds
    write_run_outputs(ctx, results, history, predictions, done)
    watch.lap("run outputs")
    return done, (results, history, predictions)


def _run_jobs(ctx: _Context, jobs: list[headjob.HeadJob]) -> list[dict]:
    previous = ctx.stop.install()
    done = []
    try:
        for job in jobs:
            done.append(run_job(ctx, job))
            if done[-1]["interrupted"]:
                break
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return done


def _collect(done: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    results = pd.DataFrame([r for d in done for r in d["rows"]])
    history = pd.DataFrame([
        {"arch": d["arch"], "head": d["name"], **h} for d in done for h in d["history"]
    ])  # fmt: skip
    frames = [d["predictions"] for d in done if len(d["predictions"])]
    predictions = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return results, history, predictions


def write_run_outputs(ctx: _Context, results: pd.DataFrame, history: pd.DataFrame,
                      predictions: pd.DataFrame, done: list[dict]) -> None:  # fmt: skip
    """The run's tables, its config (with each stage's seconds so far: this stage, timed
    after, is not in it) and, for two or more heads, its comparison figures."""
    models = ctx.folders["models"]
    atomic_csv(results, models / "results.csv")
    atomic_csv(history, models / "history.csv")
    atomic_csv(predictions, models / "predictions.csv")
    atomic_json({
        "run": ctx.run, "command": ctx.command, "classes": ctx.classes, "task": ctx.task,
        "protocol": ctx.protocol, "group_by": ctx.group_by, "config": ctx.cfg.to_dict(),
        "data": str(Path(_resolve_data_quiet(ctx.cfg)).resolve()),
        "compute": {f"{a} ({w})": m.describe() for (a, w), m in ctx.modes.items()},
        "stain": ctx.stain.record(), "stain_fallbacks": ctx.fallbacks,
        "versions": ctx.versions, "seconds": ctx.seconds,
    }, models / "config.json")  # fmt: skip
    if len(done) >= 2:
        write_comparisons(ctx, done)


def write_comparisons(ctx: _Context, done: list[dict]) -> None:
    """One figure per metric over the run's heads (architectures, folds, repeats). Only for
    two or more: one head's figure would draw its val line again, already in its curves."""
    histories = {d["name"]: d["history"] for d in done}
    groups = {d["name"]: d["arch"] for d in done}
    for metric in CURVE_METRICS + ("balanced_accuracy", "loss"):
        path = ctx.folders["graphs"] / f"compare_{metric}.png"
        plot_comparison(histories, metric, ctx.run, path, groups=groups)


def _resolve_data_quiet(cfg: RunConfig) -> str:
    return cfg.data if cfg.data is not None else str(Path(cfg.out) / "data")


SUMMARY_METRICS = ("balanced_accuracy", "image_rate", "patient_rate", "f1", "auc")


def summary_table(results: pd.DataFrame) -> str:
    """Mean (and +/- std over folds and repeats, where there are several) per architecture
    and split; the split that helped pick the model reads `val (selected)`."""
    if results.empty:
        return "(no results)"
    return fold_table(results, SUMMARY_METRICS).to_string(index=False)
