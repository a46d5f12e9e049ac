"""`python -m breakhis_tl <command>`: a thin layer over the package's functions."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from breakhis_tl.errors import UserError

log = logging.getLogger("breakhis_tl")


WORKERS_HELP = (
    "DataLoader worker processes (default: cores - 1, at most 4, at least 2 on 2+ cores; "
    "feeding a GPU, cores - 1 as memory allows)"
)
EXTRACT_BATCH_HELP = (
    "images per extraction batch (default 32); a foundation model runs it in chunks of at "
    "most its preset's batch"
)


def _number(kind: type, low: float, low_ok: bool, high: float | None, rule: str):
    """An argparse type: `kind` within [low or (low, high), with the rule said in words."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            noun = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        above = value >= low if low_ok else value > low
        if not above or value == float("inf") or (high is not None and value >= high):
            raise argparse.ArgumentTypeError(f"{text} must be {rule}")
        return value

    return parse


positive_int = _number(int, 1, True, None, "at least 1")
nonneg_int = _number(int, 0, True, None, "zero or more")
positive_float = _number(float, 0, False, None, "a positive number")
nonneg_float = _number(float, 0, True, None, "zero or a positive number")
fraction = _number(float, 0, False, 1, "between 0 and 1")
fraction_or_zero = _number(float, 0, True, 1, "at least 0 and below 1")


def _data_args(p: argparse.ArgumentParser, data_required: bool = True) -> None:
    p.add_argument(
        "--data",
        required=data_required,
        default=None,
        help="folder holding BreaKHis_v1 (or the IDC patient folders)",
    )
    p.add_argument("--dataset", default="breakhis", help="breakhis or idc")


def _stain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--stain",
        default="none",
        help="stain normalisation of every image before the backbone: none (default), macenko "
        "(torchstain's reference unless --stain-ref) or reinhard (needs --stain-ref)",
    )
    p.add_argument("--stain-ref", default=None, help="reference H&E image of the normalisation")
    p.add_argument(
        "--stain-views",
        type=nonneg_int,
        default=0,
        help="HED-jittered copies of each training image (Tellez's HED-light), cached like "
        "--views and combined with them; val and test images are never jittered",
    )


def _input_size_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input-size",
        type=positive_int,
        default=None,
        help="px fed to CNN backbones (resize shorter side, centre crop); default: each "
        "backbone's own (224, inception 299). E.g. 96 for IDC's 50x50 patches",
    )


def _split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default=None, help="binary (default) or subtype")
    p.add_argument("--magnification", default="all", help="all, or a list such as 40X,200X")
    p.add_argument(
        "--protocol",
        default=None,
        help="patient (default), cv, folds, eva or random (leaky, for comparison); with "
        "--split-file, the protocol written in the file",
    )
    p.add_argument(
        "--group-by",
        default=None,
        help="patient key: slide (default; the paper's 82 patients) or accession (the slide "
        "id's digits, joining slides such as 22549AB/22549CD/22549G)",
    )
    p.add_argument(
        "--eva-holdout",
        action="store_true",
        help="eva: carve validation patients from eva's train side; its 14 val slides become "
        "an untouched test set",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the split (and of training)")
    p.add_argument("--val-frac", type=fraction, default=0.15, help="share of patients in val")
    p.add_argument("--test-frac", type=fraction, default=0.15, help="share of patients in test")
    p.add_argument(
        "--folds-csv",
        default=None,
        help="the official Folds.csv (default: looked for beside BreaKHis_v1)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m breakhis_tl",
        description="Frozen ImageNet backbones and trained heads on BreakHis and IDC.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_download(sub)
    _add_index(sub)
    _add_split(sub)
    _add_train(sub)
    _add_extract(sub)
    _add_predict(sub)
    _add_evaluate(sub)
    return parser


def _add_download(sub) -> None:
    p = sub.add_parser(
        "download",
        help="fetch and unpack the BreakHis archive",
        description="Fetch BreaKHis_v1.tar.gz (resumable), verify it against the sha256 "
        "recorded after the first download, unpack it safely and check that all 7,909 images "
        "are there.",
    )
    p.add_argument("--to", default="data", help="folder to download into (default: data)")
    # sources tried in order, instead of the default ones; repeat or comma-separate (tests)
    p.add_argument("--url", action="append", default=None, help=argparse.SUPPRESS)
    p.add_argument("--expect", type=positive_int, default=None, help=argparse.SUPPRESS)


def _add_index(sub) -> None:
    p = sub.add_parser(
        "index",
        help="index a dataset and print its counts",
        description="Build the image index and print images by label and "
        "magnification, subtypes and patients.",
    )
    _data_args(p)
    p.add_argument("--out", default=None, help="write the index to this CSV file")


def _add_split(sub) -> None:
    p = sub.add_parser(
        "split",
        help="make a patient-disjoint split and keep it as data",
        description="Make a split, print images and patients per split and "
        "class, check for leakage, and write one row per image.",
    )
    _data_args(p)
    _split_args(p)
    p.add_argument(
        "--fold",
        default=None,
        help="fold to hold out as test (cv; default all), official fold 1-5 or all (folds; "
        "default 1)",
    )
    p.add_argument("--split-file", default=None, help="check (and print) a split file")
    p.add_argument(
        "--cv",
        type=positive_int,
        default=None,
        help="number of folds (cv protocol: default 5; random: image-level folds)",
    )
    p.add_argument("--out", default=None, help="write the split to this CSV file")
    p.add_argument("--cache-dir", default="data/cache", help="where pixel hashes are remembered")


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="extract features once and train a head per architecture",
        description="Split by patient, extract frozen-backbone features once "
        "(cached), train a classifier head per architecture, and write heads, "
        "results.csv, TensorBoard logs and validation graphs.",
    )
    _data_args(p, data_required=False)
    _split_args(p)
    p.add_argument(
        "--archs", default="all", help="comma-separated architectures, or all (the 7 defaults)"
    )
    p.add_argument(
        "--weights",
        default="default",
        help="default (ImageNet), none (random init) or a weights file; per architecture: "
        "default,resnet50=none",
    )
    p.add_argument("--fold", default=None, help="fold K or all (cv: all folds; folds: fold 1)")
    p.add_argument(
        "--cv",
        type=positive_int,
        default=None,
        help="K-fold cross-validation (patient: grouped; random: image-level)",
    )
    p.add_argument("--split-file", default=None, help="reuse a split written by `split --out`")
    _head_args(p)
    _run_args(p)


def _head_args(p: argparse.ArgumentParser) -> None:
    """How each head is trained: its kind, recipe, repeats and the epoch loop's settings."""
    p.add_argument(
        "--head",
        default="logreg",
        help="logreg (default: L-BFGS logistic regression, C chosen by patient-grouped CV over "
        "train+val, then refit on both; on val alone when too few patients; no epochs), "
        "linear (AdamW epochs with early stopping) or mlp",
    )
    p.add_argument(
        "--recipe",
        default="default",
        help="default, or eva (kaiko-ai eva's BreakHis head recipe: linear, plain CE, AdamW "
        "3e-4, batch 256, 12,500 steps, 5 runs; overrides the head options)",
    )
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help="heads per fold with different seeds (default 1; eva recipe 5)",
    )
    p.add_argument(
        "--select",
        default="best",
        help="best: the epoch with the best val balanced accuracy (early stopping); last: "
        "train --epochs and keep the last head (for splits without val)",
    )
    p.add_argument("--epochs", type=positive_int, default=30, help="maximum epochs (default 30)")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=nonneg_float, default=1e-4)
    p.add_argument("--patience", type=positive_int, default=10, help="early-stopping patience")
    p.add_argument("--hidden", type=positive_int, default=512, help="mlp hidden units")
    p.add_argument("--dropout", type=fraction_or_zero, default=0.5)


def _run_args(p: argparse.ArgumentParser) -> None:
    """Where features come from and where the run goes: views, stain, device, cache, names."""
    p.add_argument(
        "--views",
        type=positive_int,
        default=1,
        help="cached flips/90-degree rotations per training image (1-8)",
    )
    _stain_args(p)
    _input_size_arg(p)
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="end to end: backbone pass every epoch (slow baseline); for logreg, which has no "
        "epochs, the one pass is kept in memory instead of the cache",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unreadable image (or, with --stain, the first image that "
        "cannot be normalised) instead of skipping it (using it unnormalised)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument(
        "--precision",
        default="auto",
        help="compute dtype of the backbones: auto (bf16 where the device has native bf16 "
        "kernels and the features match fp32, else fp32), fp32 or bf16",
    )
    p.add_argument("--workers", type=nonneg_int, default=None, help=WORKERS_HELP)
    p.add_argument("--extract-batch", type=positive_int, default=32, help=EXTRACT_BATCH_HELP)
    p.add_argument("--cache-dir", default=None, help="feature cache (default <out>/data/cache)")
    p.add_argument("--run", default=None, help="run name (default: a timestamp)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing run of that name, whole"
    )
    p.add_argument("--out", default=".", help="folder for the output folders (default: .)")


def _add_extract(sub) -> None:
    p = sub.add_parser(
        "extract",
        help="extract features into the cache only (sharded across processes if asked)",
        description="Extract frozen-backbone features of the images `train` would use with the "
        "same options into the feature cache, and nothing else; `train` then reads them. "
        "--shard i/N (or RANK and WORLD_SIZE from torchrun) extracts one disjoint part, so N "
        "processes sharing the cache folder split the work.",
    )
    _data_args(p, data_required=False)
    _split_args(p)
    p.add_argument("--archs", default="all", help="comma-separated architectures, or all")
    p.add_argument("--weights", default="default", help="default, none or a weights file")
    p.add_argument("--fold", default=None, help="fold K or all (as for train)")
    p.add_argument("--cv", type=positive_int, default=None, help="K-fold cross-validation")
    p.add_argument("--split-file", default=None, help="a split written by `split --out`")
    p.add_argument("--views", type=positive_int, default=1, help="views per training image")
    _stain_args(p)
    _input_size_arg(p)
    p.add_argument("--shard", default=None, help="i/N: this process's part (0-based)")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--precision", default="auto", help="auto, fp32 or bf16")
    p.add_argument("--workers", type=nonneg_int, default=None, help=WORKERS_HELP)
    p.add_argument("--extract-batch", type=positive_int, default=32, help=EXTRACT_BATCH_HELP)
    p.add_argument("--cache-dir", default=None, help="feature cache (default <out>/data/cache)")
    p.add_argument("--out", default=".", help="folder holding data/ (default: .)")


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="classify images with a saved head",
        description="Load a head file, rebuild its frozen backbone, classify "
        "images and folders (searched recursively), and aggregate per patient.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="images or folders")
    p.add_argument("--head", required=True, help="a head file from trained_models/<run>/")
    p.add_argument("--out", default=None, help="write per-image predictions to this CSV")
    p.add_argument("--patients", default=None, help="write the per-patient table to this CSV")
    p.add_argument("--tta", action="store_true", help="average the 8 flips/90-degree rotations")
    p.add_argument("--cam", default=None, metavar="DIR", help="write Grad-CAM overlays here")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--workers", type=nonneg_int, default=None, help=WORKERS_HELP)
    p.add_argument(
        "--labels",
        choices=("auto", "none"),
        default="auto",
        help="auto: when every image's name gives its label (BreakHis, IDC), score the "
        "predictions against them; none: never",
    )


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a saved head on a labelled split or folder",
        description="Score a head on one side of a split file (or on images and folders "
        "whose BreakHis/IDC names give their labels): image-level metrics, the per-patient "
        "table and Spanhol's image/patient recognition rates, written as CSV with a "
        "confusion matrix.",
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="images or folders (or --split-file)")
    p.add_argument("--head", required=True, help="a .pt head file from trained_models/<run>/")
    p.add_argument("--split-file", default=None, help="a split written by split --out or train")
    p.add_argument("--data", default=None, help="the folder the split file's paths are under")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="side of the split file to score (default test)")  # fmt: skip
    p.add_argument("--fold", type=positive_int, default=None,
                   help="fold of the split file (default: the head's fold)")  # fmt: skip
    p.add_argument("--out", default=None, metavar="DIR", help="write CSVs and confusion.png here")
    p.add_argument("--tta", action="store_true", help="average the 8 flips/90-degree rotations")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--workers", type=nonneg_int, default=None, help=WORKERS_HELP)


def cmd_predict(args: argparse.Namespace) -> int:
    import pandas as pd

    from breakhis_tl.evaluate import assess, format_summary
    from breakhis_tl.predict import Classifier

    for flag, path in (("--out", args.out), ("--patients", args.patients)):
        _check_csv_path(flag, path)
    clf = Classifier.from_head(args.head, device=args.device)
    preds = clf.predict(args.paths, tta=args.tta, batch_size=args.batch_size,
                        workers=args.workers, labels=args.labels)  # fmt: skip
    patients = clf.patients(preds)
    with pd.option_context(
        "display.max_rows", 200, "display.width", 200, "display.max_colwidth", 60
    ):
        shown = preds.assign(path=preds["path"].map(lambda p: Path(p).name))
        print(shown.to_string(index=False, float_format="%.3f"))
        if len(patients):
            print("\nPer patient:")
            print(patients.to_string(index=False, float_format="%.3f"))
    if "label" in preds:
        ev = assess(preds, clf.classes, clf.meta.get("protocol"))
        print("\nScored against the labels in the file names:")
        print(format_summary(ev))
    elif args.labels == "auto":
        print(f"\nNot scored: not every image's name gives its label for this {clf.dataset} head "
              f"({clf.dataset} file names do; --labels none hides this line).")  # fmt: skip
    if args.out:
        _write_csv(preds, args.out)
    if args.patients:
        _write_csv(patients, args.patients)
    if args.cam:
        written = clf.gradcam(preds.loc[preds["error"] == "", "path"].tolist(), args.cam, args.tta)
        print(f"Wrote {len(written)} Grad-CAM overlay(s) to {args.cam}.")
    return _unreadable(preds)


def _unreadable(preds) -> int:
    failed = int((preds["error"] != "").sum())
    if failed:
        print(
            f"{failed} of {len(preds)} input(s) could not be classified; see the error column.",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a saved head where the truth is known: a split file's side, or labelled names."""
    from breakhis_tl.evaluate import assess, format_summary, split_inputs, write_outputs
    from breakhis_tl.predict import Classifier

    if bool(args.split_file) == bool(args.paths):
        raise UserError("Give either --split-file (with --data) or images and folders, not "
                        f"{'both' if args.paths else 'neither'}.")  # fmt: skip
    if args.split_file and not args.data:
        raise UserError("--split-file needs --data: the folder its paths are under.")
    clf = Classifier.from_head(args.head, device=args.device)
    inputs, what = args.paths, "the given images"
    if args.split_file:
        fold = args.fold if args.fold is not None else clf.meta.get("fold")
        inputs = split_inputs(args.split_file, args.data, clf.dataset, args.split, fold)
        what = f"{args.split} of {Path(args.split_file).name}" + (f", fold {fold}" if fold else "")
    preds = clf.predict(inputs, tta=args.tta, batch_size=args.batch_size, workers=args.workers)
    if "label" not in preds:
        raise UserError(
            "Not every readable image's name gives its label, so there is nothing to score "
            f"against; this {clf.dataset} head reads labels from {clf.dataset} file names."
        )
    ev = assess(preds, clf.classes, clf.meta.get("protocol"))
    print(f"{clf.meta.get('arch', 'head')} on {what}:")
    print(format_summary(ev))
    if args.out:
        title = (f"{clf.meta.get('arch', 'head')} on {what}\n({ev.image['n_images']} images, "
                 f"balanced accuracy {ev.image['balanced_accuracy']:.3f})")  # fmt: skip
        for path in write_outputs(ev, args.out, title):
            print(f"Wrote {path}.")
    return _unreadable(preds)


def cmd_train(args: argparse.Namespace) -> int:
    from breakhis_tl.heads.training import TrainConfig
    from breakhis_tl.models.backbones import parse_archs
    from breakhis_tl.runner import RunConfig, run_training, summary_table

    cfg = RunConfig(
        data=args.data, dataset=args.dataset, archs=parse_archs(args.archs),
        weights=args.weights, task=args.task, magnification=args.magnification,
        protocol=args.protocol, group_by=args.group_by, fold=args.fold, cv=args.cv,
        split_file=args.split_file, folds_csv=args.folds_csv, eva_holdout=args.eva_holdout,
        val_frac=args.val_frac, test_frac=args.test_frac, recipe=args.recipe,
        repeats=args.repeats, views=args.views, stain=args.stain, stain_ref=args.stain_ref,
        stain_views=args.stain_views, input_size=args.input_size, no_cache=args.no_cache,
        strict=args.strict,
        device=args.device, precision=args.precision, run=args.run, overwrite=args.overwrite,
        out=args.out,
        cache_dir=args.cache_dir, workers=args.workers, extract_batch=args.extract_batch,
        train=TrainConfig(
            head=args.head, hidden=args.hidden, dropout=args.dropout, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
            patience=args.patience, select=args.select, seed=args.seed,
        ),
    )  # fmt: skip
    command = "python -m breakhis_tl " + " ".join(sys.argv[1:])
    try:
        result = run_training(cfg, command)
    except KeyboardInterrupt:
        print(
            "Interrupted before training finished; completed cache entries are kept.",
            file=sys.stderr,
        )
        return 130
    print(summary_table(result.results))
    print(f"\nHeads and results.csv: {result.folders['models']}")
    print(
        f"TensorBoard logs:      {result.folders['logs']}  (tensorboard --logdir "
        f"{result.folders['logs'].parent})"
    )
    print(f"Validation graphs:     {result.folders['graphs']}")
    if result.skipped:
        print(f"{len(result.skipped)} unreadable image(s) were skipped; see the log above.")
    if result.interrupted:
        print("Interrupted: the best heads so far, logs and graphs are saved.", file=sys.stderr)
        return 130
    return 0


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`i/N`, or torchrun's RANK and WORLD_SIZE (and a SLURM array's task id and count)."""
    import os

    if text is None:
        env = os.environ
        if "RANK" in env and "WORLD_SIZE" in env:
            text = f"{env['RANK']}/{env['WORLD_SIZE']}"
        elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
            text = f"{int(env['SLURM_ARRAY_TASK_ID']) - first}/{env['SLURM_ARRAY_TASK_COUNT']}"
        else:
            return None
    i, sep, n = text.partition("/")
    if not (sep and i.strip().isdigit() and n.strip().isdigit() and int(i) < int(n)):
        raise UserError(f"--shard must be i/N with 0 <= i < N, not {text!r}.")
    return int(i), int(n)


def cmd_extract(args: argparse.Namespace) -> int:
    from breakhis_tl.heads.training import TrainConfig
    from breakhis_tl.models.backbones import parse_archs
    from breakhis_tl.runner import RunConfig, run_extraction

    shard = parse_shard(args.shard)
    cfg = RunConfig(
        data=args.data, dataset=args.dataset, archs=parse_archs(args.archs),
        weights=args.weights, task=args.task, magnification=args.magnification,
        protocol=args.protocol, group_by=args.group_by, fold=args.fold, cv=args.cv,
        split_file=args.split_file, folds_csv=args.folds_csv, eva_holdout=args.eva_holdout,
        val_frac=args.val_frac, test_frac=args.test_frac, views=args.views, strict=args.strict,
        stain=args.stain, stain_ref=args.stain_ref, stain_views=args.stain_views,
        input_size=args.input_size, device=args.device, precision=args.precision, out=args.out,
        cache_dir=args.cache_dir, extract_batch=args.extract_batch,
        workers=args.workers, train=TrainConfig(seed=args.seed),
    )  # fmt: skip
    done = run_extraction(cfg, shard)
    part = f" (shard {shard[0]} of {shard[1]})" if shard else ""
    print(f"{done['extracted']} image feature(s) extracted{part} of {done['images']} images, "
          f"{done['failed']} unreadable; cache: {done['cache']}.")  # fmt: skip
    if done["stain_fallbacks"]:
        print(f"{done['stain_fallbacks']} image(s) could not be stain-normalised and were used "
              "as they are; see the log above.")  # fmt: skip
    for arch, mode in done["modes"].items():
        print(f"  {arch}: {mode}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from breakhis_tl.data.download import BREAKHIS_IMAGES, BREAKHIS_URLS, download_breakhis

    urls = [u.strip() for arg in args.url or [] for u in arg.split(",") if u.strip()]
    root = download_breakhis(args.to, urls or BREAKHIS_URLS, args.expect or BREAKHIS_IMAGES)
    print(f"BreakHis is ready under {root / 'BreaKHis_v1'}.")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from breakhis_tl.data.index import build_index, summary

    index = build_index(args.data, args.dataset)
    print(summary(index))
    if args.out:
        _write_csv(index, args.out)
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    """Make (or check) a split with the same function `train` uses, and say what is true of
    it: patients shared between sides, pixel-identical pictures on two sides or labels."""
    from breakhis_tl.data.folds import SplitOptions, plan_folds, write_split
    from breakhis_tl.data.identity import ImageStore
    from breakhis_tl.data.index import build_index, filter_magnification, parse_magnification
    from breakhis_tl.data.leakage import check_twins, leakage_line, shared_patients
    from breakhis_tl.data.splits import check_classes, class_names, split_summary, target_column

    index = build_index(args.data, args.dataset)
    index = filter_magnification(index, parse_magnification(args.magnification))
    task = args.task or ("subtype" if args.protocol == "eva" else "binary")
    fold = args.fold if args.fold is not None else (None if args.protocol != "folds" else "1")
    opts = SplitOptions(
        protocol=args.protocol, task=task, seed=args.seed, fold=fold, cv=args.cv,
        val_frac=args.val_frac, test_frac=args.test_frac, folds_csv=args.folds_csv,
        split_file=args.split_file, group_by=args.group_by, eva_holdout=args.eva_holdout,
    )  # fmt: skip
    plan = plan_folds(index, opts)
    store = ImageStore(Path(args.cache_dir) / "images.sqlite")
    pixels = dict(zip(index["relpath"], store.pixel_hashes(index["path"].tolist()), strict=True))
    classes = class_names(task, args.dataset, plan.protocol)
    for k, split in plan.folds:
        print(f"\n== fold {k} ==" if k is not None else "")
        print(split_summary(split, task))
        check_classes(split, task, classes)  # a class missing from a side is named
        twins = check_twins(split.assign(pixel=split["relpath"].map(pixels)),
                            target_column(task), plan.protocol)  # fmt: skip
        shared = shared_patients(split)
        print("\nLeakage check: " + leakage_line(plan.protocol, shared, twins))
    if args.out:
        try:
            write_split(plan, args.out)
        except OSError as exc:
            raise UserError(f"Cannot write {args.out} ({exc.strerror}).") from None
        print(f"Wrote {args.out} ({plan.protocol}, grouped by {plan.group_by}).")
    return 0


def _check_csv_path(flag: str, path: str | None) -> None:
    """Before any work: a CSV path that names a folder would fail only after the whole
    table had been computed and printed."""
    if path and (path.endswith(("/", os.sep)) or Path(path).is_dir()):
        name = "patients.csv" if flag == "--patients" else "predictions.csv"
        raise UserError(f"{flag} {path} is a folder; {flag} names a CSV file, such as "
                        f"{Path(path) / name}.")  # fmt: skip


def _write_csv(df, path: str, writer=None) -> None:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        if writer:
            writer(df, path)
        else:
            df.to_csv(path, index=False)
    except OSError as exc:
        raise UserError(f"Cannot write {path} ({exc.strerror}).") from None
    print(f"Wrote {path}.")


COMMANDS = {
    "download": cmd_download,
    "index": cmd_index,
    "split": cmd_split,
    "train": cmd_train,
    "extract": cmd_extract,
    "predict": cmd_predict,
    "evaluate": cmd_evaluate,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.command:
        parser.print_help()
        return 2
    import matplotlib

    matplotlib.use("Agg")  # the command line only writes PNGs; never open a window
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        print(f"error: {build_mismatch(exc)}", file=sys.stderr)
        return 2


def build_mismatch(exc: Exception) -> str:
    """torchvision's compiled operators fail to load when it was built for another torch:
    the fix is an install, not anything in this project."""
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    return (f"torch {version('torch')} and torchvision {version('torchvision')} are not builds "
            f"made for each other ({exc}); install matching builds, e.g. both from the same "
            "index URL of the README's install command.")  # fmt: skip
