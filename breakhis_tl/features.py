"""Extract backbone features once and keep them on disk.

A frozen backbone maps an image to the same feature every epoch, so the expensive pass is
done once per (backbone, weights, preprocessing, image list, view) and cached as fp16. A run
decodes each image once for all backbones that share an input size, and computes every
requested view of the square crop from that one decode.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from breakhis_tl import __version__
from breakhis_tl.backbones import Backbone
from breakhis_tl.dataset import ImageDataset, make_loader
from breakhis_tl.errors import UserError
from breakhis_tl.transforms import decode_transform, dihedral, normalize

log = logging.getLogger(__name__)

CACHE_FORMAT = "breakhis_tl.features/1"
DEFAULT_CACHE = Path("data") / "cache" / "features"


def pick_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise UserError(f"Unknown device {name!r}; choose auto, cpu, cuda or mps.")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"Device {name} was asked for, but torch sees no CUDA GPU here.")
    if name == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise UserError("Device mps was asked for, but torch sees no Apple GPU here.")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class FastPath:
    """How a batch goes through a backbone: autocast dtype (None = fp32) and memory format."""

    autocast: torch.dtype | None
    channels_last: bool

    def describe(self) -> str:
        dtype = str(self.autocast).replace("torch.", "") if self.autocast else "fp32"
        return f"{dtype}{' + channels_last' if self.channels_last else ''}"


def fast_path(device: torch.device, optimised: bool = True) -> FastPath:
    """bf16 autocast where the CPU has bf16 kernels (2-4x there); without them bf16 is slower
    than fp32 (measured 5x slower on an AVX2-only EPYC), so fp32 + channels_last is kept."""
    if not optimised:
        return FastPath(None, False)
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return FastPath(dtype, True)
    if device.type == "cpu":
        return FastPath(torch.bfloat16 if cpu_supports_bf16() else None, True)
    return FastPath(None, False)


def run_backbone(bb: Backbone, x: torch.Tensor, path: FastPath) -> torch.Tensor:
    """Normalised float batch -> fp32 features, on the backbone's device."""
    if path.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast(x.device.type, dtype=path.autocast) if path.autocast else nullcontext()
    with torch.inference_mode(), ctx:
        return bb.module(x).float()


def prepare(bb: Backbone, device: torch.device, path: FastPath) -> Backbone:
    bb.module.to(device)
    if path.channels_last:
        bb.module.to(memory_format=torch.channels_last)
    return bb


def images_digest(paths: list[str]) -> str:
    """Changes when the list, its order, or any file's size or modification time changes."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


def cache_key(bb: Backbone, digest: str, view: int) -> str:
    ident = {
        "format": CACHE_FORMAT,
        "arch": bb.name,
        "weights": bb.weights_id,
        "prep": bb.prep.to_dict(),
        "images": digest,
        "view": view,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


class FeatureCache:
    """One safetensors file per entry; an entry counts only once its JSON marker exists.

    Both files are written to a temporary name and renamed, features first, so a run killed
    at any moment leaves either a complete entry or one that is ignored and redone.
    """

    def __init__(self, root: str | Path = DEFAULT_CACHE):
        self.root = Path(root)

    def _paths(self, key: str) -> tuple[Path, Path]:
        folder = self.root / key[:2]
        return folder / f"{key}.safetensors", folder / f"{key}.json"

    def load(self, key: str, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        data, marker = self._paths(key)
        if not marker.is_file() or not data.is_file():
            return None
        try:
            meta = json.loads(marker.read_text())
            tensors = load_file(str(data))
            feats, ok = tensors["features"], tensors["ok"].bool()
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            log.warning("Cache entry %s is unreadable (%s); extracting again.", data, exc)
            return None
        if feats.shape[0] != n or ok.shape[0] != n or meta.get("rows") != n:
            log.warning("Cache entry %s does not match its image list; extracting again.", data)
            return None
        return feats, ok

    def save(self, key: str, feats: torch.Tensor, ok: torch.Tensor, meta: dict) -> None:
        from safetensors.torch import save_file

        data, marker = self._paths(key)
        data.parent.mkdir(parents=True, exist_ok=True)
        tmp = data.with_name(f".{data.name}.{os.getpid()}.tmp")
        save_file({"features": feats.contiguous(), "ok": ok.to(torch.uint8)}, str(tmp))
        os.replace(tmp, data)
        atomic_write_text(marker, json.dumps({**meta, "rows": int(feats.shape[0])}, indent=1))


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class Request:
    """Features of `backbone` for view `view` of the images `rows` (indices into the list)."""

    backbone: Backbone
    view: int
    rows: np.ndarray


@dataclass
class ExtractionReport:
    extracted: list[str] = field(default_factory=list)  # "arch/view k" entries computed now
    cached: list[str] = field(default_factory=list)  # entries read from the cache
    failed: dict[int, str] = field(default_factory=dict)  # image row -> message
    decodes: int = 0  # images decoded in this run, all backbones together
    upscaled: int = 0  # images smaller than a backbone's input size


def extract(
    paths: list[str],
    requests: list[Request],
    cache: FeatureCache | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    workers: int | None = None,
    strict: bool = False,
    optimised: bool = True,
    progress: bool = True,
) -> tuple[dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]], ExtractionReport]:
    """Features for every request, as {(arch, view): (fp16 features [rows, D], ok [rows])}.

    A broken image is reported by path and left out (its `ok` is False) unless `strict`.
    """
    device = torch.device(device)
    report = ExtractionReport()
    out: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    todo: list[tuple[Request, str]] = []
    for req in requests:
        digest = images_digest([paths[i] for i in req.rows])
        key = cache_key(req.backbone, digest, req.view)
        hit = cache.load(key, len(req.rows)) if cache else None
        name = f"{req.backbone.name}/view {req.view}"
        if hit is not None:
            out[(req.backbone.name, req.view)] = hit
            report.cached.append(name)
        else:
            todo.append((req, key))
    groups: dict[tuple, list[tuple[Request, str]]] = defaultdict(list)
    for req, key in todo:
        groups[req.backbone.prep.decode_key()].append((req, key))
    fp = fast_path(device, optimised)
    for group in groups.values():
        _extract_group(
            paths, group, cache, device, fp, batch_size, workers, strict, progress, out, report
        )
    if report.upscaled:
        log.warning(
            "%d image(s) are smaller than a backbone's input size and were upscaled to it.",
            report.upscaled,
        )
    if report.failed:
        log.warning(
            "%d image(s) could not be read and were skipped: %s",
            len(report.failed),
            "; ".join(list(report.failed.values())[:5]),
        )
    return out, report


def _extract_group(
    paths, group, cache, device, fp, batch_size, workers, strict, progress, out, report
) -> None:
    prep = group[0][0].backbone.prep
    needed = sorted(set().union(*(set(r.rows.tolist()) for r, _ in group)))
    backbones = {r.backbone.name: prepare(r.backbone, device, fp) for r, _ in group}
    # per request: map from image row to its position in that request's output
    slots = []
    for req, key in group:
        pos = np.full(len(paths), -1, dtype=np.int64)
        pos[req.rows] = np.arange(len(req.rows))
        feats = torch.zeros(len(req.rows), req.backbone.feature_dim, dtype=torch.float16)
        slots.append(
            (req, key, torch.from_numpy(pos), feats, torch.zeros(len(req.rows), dtype=torch.bool))
        )
    ds = ImageDataset([paths[i] for i in needed], decode_transform(prep), labels=needed)
    loader = make_loader(ds, batch_size=batch_size, workers=workers)
    names = ", ".join(backbones)
    log.info(
        "Extracting features of %d images with %s (%s on %s).",
        len(needed),
        names,
        fp.describe(),
        device,
    )
    views = sorted({r.view for r, _ in group})
    for x, rows, _, failed, sizes in tqdm(
        loader, desc=f"features {prep.input_size}px", unit="batch", disable=not progress
    ):
        for i, msg in failed:
            report.failed[needed[i]] = msg
            if strict:
                raise UserError(f"{msg} (--strict stops at the first unreadable image).")
        report.decodes += len(rows) + len(failed)
        report.upscaled += sum(1 for w, h in sizes if min(w, h) < prep.input_size)
        if x is None:
            continue
        x = x.to(device, non_blocking=True)
        for view in views:
            xv = dihedral(x, view)
            normalized: dict[tuple, torch.Tensor] = {}
            for req, _, pos, feats, ok in slots:
                if req.view != view:
                    continue
                where = pos[rows]
                keep = where >= 0
                if not keep.any():
                    continue
                norm_key = (req.backbone.prep.mean, req.backbone.prep.std)
                if norm_key not in normalized:
                    normalized[norm_key] = normalize(xv, req.backbone.prep)
                f = run_backbone(backbones[req.backbone.name], normalized[norm_key][keep], fp)
                feats[where[keep]] = f.to("cpu", torch.float16)
                ok[where[keep]] = True
    for req, key, _, feats, ok in slots:
        name = f"{req.backbone.name}/view {req.view}"
        if cache is not None:
            cache.save(key, feats, ok, {
                "arch": req.backbone.name, "weights": req.backbone.weights_id,
                "prep": req.backbone.prep.to_dict(), "view": req.view,
                "failed": int((~ok).sum()), "package": __version__,
            })  # fmt: skip
        out[(req.backbone.name, req.view)] = (feats, ok)
        report.extracted.append(name)
