"""Inference from a head file alone: rebuild its frozen backbone and classify images.

The head's metadata names the backbone, its weights and preprocessing, so a head shared as a
single file is all a user needs. A bad image is a row with an `error`, never a lost batch.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from breakhis_tl.data.dataset import collate_noted, default_workers
from breakhis_tl.data.images import ImageError, as_rgb
from breakhis_tl.data.index import (
    BREAKHIS_NAME,
    IDC_CLASSES,
    IDC_NAME,
    accession_of,
    image_files,
    patient_of,
)
from breakhis_tl.data.stain import StainSetup
from breakhis_tl.data.transforms import (
    N_VIEWS,
    Preprocessing,
    decode_transform,
    dihedral,
    normalize,
)
from breakhis_tl.errors import UserError
from breakhis_tl.features.extract import fast_path, pick_device, prepare, run_backbone
from breakhis_tl.heads.modules import load_head
from breakhis_tl.models.backbones import Backbone, build_backbone

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}

Input = str | Path | Image.Image

# What each dataset's images look like: a head applied to the other kind still answers.
DATASETS = {"breakhis": ("BreakHis", BREAKHIS_NAME, (700, 460)), "idc": ("IDC", IDC_NAME, (50, 50))}
SIZE_FACTOR = 4  # a shorter side this many times off the training images' is "far"
LABEL_MODES = ("auto", "none")


def expand_inputs(inputs: Input | Iterable[Input]) -> list[Input]:
    """Folders are searched recursively for images; other paths are kept as given, so that a
    missing or bad file shows up as a row with an error."""
    if isinstance(inputs, (str, Path, Image.Image)):
        inputs = [inputs]
    out: list[Input] = []
    for item in inputs:
        if isinstance(item, Image.Image):
            out.append(item)
            continue
        path = Path(item)
        if path.is_dir():
            found = image_files(path, IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"No images found in folder {path}.")
            out.extend(str(p) for p in found)
        else:
            out.append(str(path))
    if not out:
        raise UserError("No input images given.")
    return out


class _InputDataset(Dataset):
    """Inputs decoded as in training: stain-normalised first when the head was (a failed
    normalisation keeps the image and says why in item 3, as training did)."""

    def __init__(self, items: list[Input], prep: Preprocessing, stain: StainSetup):
        self.items, self.decode, self.stain = items, decode_transform(prep), stain

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            im = as_rgb(item)
        except ImageError as exc:
            return None, i, i, str(exc), (0, 0)
        name = f"<image {i}>" if isinstance(item, Image.Image) else str(item)
        normalised, note = self.stain.normaliser.apply(im, name)
        return self.decode(normalised), i, i, note or "", im.size


def head_mode(meta: dict, device: torch.device):
    """The compute mode the head's training features came from, where this machine has it
    (features differ by dtype); else this machine's default fast path."""
    from breakhis_tl.models.compute import FastPath, cpu_supports_bf16

    try:
        mode = FastPath.from_dict(meta["compute_mode"])
    except (KeyError, TypeError, ValueError):
        return fast_path(device)
    low = mode.autocast is not None
    if device.type == "cpu" and low and not cpu_supports_bf16():
        return fast_path(device)
    if device.type not in ("cpu", "cuda"):
        return fast_path(device)
    return mode


def head_dataset(meta: dict) -> str:
    """breakhis or idc: what the head was trained on; a head saved before `dataset` was
    recorded tells by its classes."""
    if meta.get("dataset") in DATASETS:
        return meta["dataset"]
    return "idc" if list(meta.get("classes", ())) == list(IDC_CLASSES) else "breakhis"


def domain_warning(names: list[str], sizes: list, dataset: str, classes: list[str]) -> str:
    """One sentence when inputs look like the other dataset (named like it, or of a size far
    from the training images'), since the head then labels them without complaint; else ""."""
    title, _, (w, h) = DATASETS[dataset]
    other = next(d for d in DATASETS if d != dataset)
    named = sum(bool(DATASETS[other][1].match(Path(n).name)) for n in names)
    far = [s for s in sizes if not min(w, h) / SIZE_FACTOR <= min(s) <= min(w, h) * SIZE_FACTOR]
    if not named and not far:
        return ""
    parts = [f"{named} are named like {DATASETS[other][0]} images"] if named else []
    if far:
        fw, fh = Counter(far).most_common(1)[0][0]
        parts.append(f"{len(far)} are far from that size (such as {fw}x{fh})")
    return (
        f"This head was trained on {title} images ({w}x{h}), but of {len(names)} input(s) "
        f"{' and '.join(parts)}; its {'/'.join(classes)} predictions for them mean little."
    )


def _head_split(head_path: str | Path | None, meta: dict) -> pd.DataFrame | None:
    """The train and val rows of the head's fold in the split.csv beside the head file; None
    where there is none (a head copied alone) or it cannot be read."""
    from breakhis_tl.data.folds import read_split

    split_file = Path(head_path).parent / "split.csv" if head_path else None
    if split_file is None or not split_file.is_file():
        return None
    try:
        split = read_split(split_file)
    except UserError:
        return None
    if meta.get("fold") is not None and split["fold"].notna().any():
        split = split[pd.to_numeric(split["fold"], errors="coerce") == float(meta["fold"])]
    seen = split[split["split"].isin(["train", "val"]) & split["path"].notna()]
    return seen if len(seen) else None  # no row of its fold: nothing to check against


def _patient_key(name: str, dataset: str, accession: bool) -> str | None:
    """The patient an input's name belongs to, in the head's dataset only; by accession
    (the slide id's digits) when the split grouped so."""
    key = patient_of(name, dataset)
    return accession_of(key) if accession and key else key


def seen_by_head(head_path: str | Path | None, meta: dict, names: list[str]) -> list[str] | None:
    """Per input, what of it the head was fit or selected on: "train" or "val" for the image
    itself (by file name: BreakHis and IDC names are unique, wherever the copy lies), "train
    patient" or "val patient" for another image of such a patient (the same slide at another
    magnification scores well for the wrong reason), else "". None when the head's split
    cannot be read, so "not checked" never passes for "clear"."""
    seen = _head_split(head_path, meta)
    if seen is None:
        return None
    dataset = head_dataset(meta)
    accession = "group_by" in seen and (seen["group_by"] == "accession").any()
    by_name, by_patient = {}, {}
    for path, side in sorted(zip(seen["path"], seen["split"], strict=True), key=lambda r: r[1]):
        by_name.setdefault(Path(path).name.lower(), side)  # "train" sorts first: it wins a tie
        by_patient.setdefault(_patient_key(path, dataset, accession), side)
    by_patient.pop(None, None)
    out = []
    for name in names:
        patient = _patient_key(name, dataset, accession)
        out.append(by_name.get(Path(name).name.lower()) or (
            f"{by_patient[patient]} patient" if patient in by_patient else ""))  # fmt: skip
    return out


def unchecked_note(head_path: str | Path | None, meta: dict, names: list[str]) -> str:
    """One sentence when inputs are named like the head's dataset but its split is unknown:
    they may be images it was trained on, and nothing here can tell."""
    dataset = head_dataset(meta)
    named = sum(patient_of(n, dataset) is not None for n in names)
    if not named:
        return ""
    where = f"beside {Path(head_path).name}" if head_path else "with a head held in memory"
    return (
        f"{named} input(s) are named like {DATASETS[dataset][0]} images, but no readable split.csv "
        f"{where} lists its fold's train and val images, so whether it was trained or "
        "selected on them was not checked; keep the head in its run folder to check."
    )


def seen_warning(sides: list[str]) -> str:
    """One sentence when inputs are images, or patients, the head was fit or selected on:
    scored, they flatter it."""
    counts = Counter(s for s in sides if s)
    if not counts:
        return ""
    what = {"train": "train image(s)", "val": "val image(s)",
            "train patient": "other image(s) of train patients",
            "val patient": "other image(s) of val patients"}  # fmt: skip
    parts = ", ".join(f"{counts[k]} {v}" for k, v in what.items() if counts[k])
    return (
        f"{sum(counts.values())} of {len(sides)} input(s) are images, or other images of "
        f"patients, this head was trained or selected on ({parts}, by the split.csv beside "
        "it): their predictions say nothing about its accuracy; score it on patients it never "
        "saw."
    )


def _restore_random_init(path: str | Path, bb: Backbone, meta: dict) -> None:
    """The weights the head's seed draws here must be the ones it was trained on (checked
    where the head has their fingerprint), and its batch-norm statistics go back in."""
    from breakhis_tl.models.backbones import (
        initialiser_versions,
        random_weights_fingerprint,
        same_random_weights,
    )
    from breakhis_tl.models.calibration import FINGERPRINT_KEY, load_bn_state

    extra = {k: v for k, v in meta.get("_extra", {}).items() if not k.startswith("stain.")}
    fingerprint = extra.pop(FINGERPRINT_KEY, None)
    if fingerprint is None:
        log.warning(
            "Head %s predates random-weights fingerprints: the %s weights its seed draws "
            "here cannot be checked against the trained ones.",
            path,
            bb.name,
        )
    if fingerprint is not None and not same_random_weights(
        random_weights_fingerprint(bb.module), fingerprint
    ):
        then = meta.get("initialisers") or f"torch {meta.get('versions', {}).get('torch')}"
        raise UserError(
            f"Head {path} was trained on random {bb.name} weights from seed "
            f"{meta.get('seed', 0)}, but {initialiser_versions(bb.name)} draw other weights "
            f"from that seed (the head's: {then}); predict with those versions, or train "
            "the head again with these."
        )
    if extra:  # batch-norm statistics
        try:
            load_bn_state(bb, extra, meta.get("weights_id", ""))
        except (ValueError, RuntimeError) as exc:
            raise UserError(f"Head {path} carries backbone statistics that do not fit "
                            f"{bb.name} ({exc}).") from None  # fmt: skip


class Classifier:
    """A frozen backbone and a trained head, rebuilt from a head file."""

    def __init__(self, backbone, head: torch.nn.Module, meta: dict, device: torch.device):
        self.backbone, self.head, self.meta, self.device = backbone, head, meta, device
        # the head's stain normalisation, from its recorded target (no reference file needed)
        self.stain = StainSetup.from_record(meta.get("stain"), meta.get("_extra"))
        self.classes: list[str] = list(meta["classes"])
        self.prep = Preprocessing.from_dict(meta["prep"])
        self.dataset = head_dataset(meta)
        self.path = head_mode(meta, device)
        self.source: Path | None = None  # the head file, when loaded from one
        prepare(backbone, device, self.path)
        head.to(device).eval()

    @classmethod
    def from_head(cls, path: str | Path, device: str = "auto") -> Classifier:
        head, meta = load_head(path)
        bb = build_backbone(meta["arch"], meta["weights"], int(meta.get("seed", 0)))
        if meta["weights"] == "none":
            _restore_random_init(path, bb, meta)
        if int(meta["prep"]["input_size"]) != bb.prep.input_size:  # trained at --input-size
            from breakhis_tl.models.backbones import with_input_size

            bb = with_input_size(bb, int(meta["prep"]["input_size"]))
        if bb.feature_dim != int(meta["feature_dim"]):
            raise UserError(
                f"Head {path} expects {meta['feature_dim']}-d features, but the {bb.name} "
                f"backbone gives {bb.feature_dim}-d ones."
            )
        if bb.weights_id != meta.get("weights_id", bb.weights_id):
            raise UserError(
                f"Head {path} was trained on {meta['arch']} with weights {meta['weights_id']}, "
                f"but the backbone rebuilt now has weights {bb.weights_id}; its features would "
                "not be the ones the head learned."
            )
        clf = cls(bb, head, meta, pick_device(device))
        clf.source = Path(path)
        return clf

    @torch.inference_mode()
    def _probs(self, x: torch.Tensor, tta: bool) -> torch.Tensor:
        views = range(N_VIEWS) if tta else [0]
        total = 0
        for v in views:
            f = run_backbone(self.backbone, normalize(dihedral(x, v), self.prep), self.path)
            total = total + torch.softmax(self.head(f), 1)
        return (total / len(views)).cpu()

    def _run(self, items: list[Input], tta: bool, batch_size: int, workers, progress: bool):
        """Probabilities (NaN rows for unreadable inputs), error messages, the original sizes
        of the readable images and the stain-normalisation failures."""
        has_pil = any(isinstance(i, Image.Image) for i in items)
        workers = default_workers(self.device) if workers is None else workers
        batches = -(-len(items) // batch_size)  # a worker builds whole batches: no more needed
        loader = DataLoader(
            _InputDataset(items, self.prep, self.stain),
            batch_size=batch_size,
            collate_fn=collate_noted,
            num_workers=0 if has_pil else min(workers, batches),
        )
        probs = np.full((len(items), len(self.classes)), np.nan)
        errors, sizes, notes = [""] * len(items), [], [""] * len(items)
        for x, _, idx, failed, batch_sizes, noted in tqdm(
            loader, desc="predict", unit="batch", disable=not progress or len(loader) < 2
        ):
            for i, msg in failed:
                errors[i] = msg
            for i, msg in noted:
                notes[i] = msg
            sizes.extend(batch_sizes)
            if x is not None:
                probs[idx.numpy()] = self._probs(x.to(self.device), tta).numpy()
        return probs, errors, sizes, notes

    def predict(
        self,
        inputs: Input | Iterable[Input],
        tta: bool = False,
        batch_size: int = 32,
        workers: int | None = None,
        progress: bool = True,
        labels: str = "auto",
    ) -> pd.DataFrame:
        """One row per input: path, prediction, prob_<class> (summing to 1) and error, and a
        `label` column after path when `labels` is auto and every readable input's name
        gives its true label (BreakHis and IDC names do), so the predictions can be scored."""
        if labels not in LABEL_MODES:
            raise UserError(f"Unknown labels mode {labels!r}; choose auto or none.")
        items = expand_inputs(inputs)
        probs, errors, sizes, notes = self._run(items, tta, batch_size, workers, progress)
        names = [
            f"<image {i}>" if isinstance(it, Image.Image) else str(it) for i, it in enumerate(items)
        ]
        df = pd.DataFrame({"path": names})
        ok = ~np.isnan(probs).any(1)
        df["prediction"] = [
            self.classes[k] if good else ""
            for k, good in zip(np.nan_to_num(probs).argmax(1), ok, strict=True)
        ]
        for k, c in enumerate(self.classes):
            df[f"prob_{c}"] = probs[:, k]
        df["error"] = errors
        if self.stain.method != "none":  # normalised as in training, or why not
            df["stain_note"] = notes
        for msg in filter(None, errors + notes):
            log.warning("%s", msg)
        sides = seen_by_head(self.source, self.meta, names)
        seen = seen_warning(sides or [])
        for warning in (domain_warning(names, sizes, self.dataset, self.classes), seen):
            if warning:
                log.warning("%s", warning)
        out = self._with_labels(df) if labels == "auto" else df
        if sides is None and (note := unchecked_note(self.source, self.meta, names)):
            # scored, "not checked" must not pass for "clear"; else a note is enough
            log.log(logging.WARNING if "label" in out else logging.INFO, "%s", note)
        return out

    def _with_labels(self, df: pd.DataFrame) -> pd.DataFrame:
        from breakhis_tl.evaluate import labels_from_names

        found = labels_from_names(df["path"], self.classes, self.dataset)
        readable = (df["error"] == "").tolist()
        missing = any(r and lab is None for r, lab in zip(readable, found, strict=True))
        if missing or not any(readable):
            return df  # some readable name gives no label: nothing is scored
        df.insert(1, "label", [lab or "" for lab in found])
        return df

    def patients(self, predictions: pd.DataFrame) -> pd.DataFrame:
        """One row per patient: its true label(s) and share of images correct when the
        predictions carry labels, the number of images, the majority vote, the
        mean-probability prediction and the mean probabilities (evaluate.patient_table)."""
        from breakhis_tl.evaluate import patient_table

        labels = None
        if "label" in predictions:
            labels = [lab or None for lab in predictions["label"].fillna("")]
        return patient_table(predictions, self.classes, labels)

    def gradcam(
        self, inputs: Input | Iterable[Input], out_dir: str | Path, tta: bool = False
    ) -> list[Path]:
        """Grad-CAM figures; pass the `tta` given to `predict` so that each figure's title
        shows the class and probability of its row in the predictions."""
        from breakhis_tl.cam import save_cams

        return save_cams(self, expand_inputs(inputs), Path(out_dir), tta)
