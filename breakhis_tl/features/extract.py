"""Extract backbone features once and keep them on disk (see cache.py).

A frozen backbone maps an image to the same feature every epoch, so the expensive pass is
done once per image and feature space (backbone, weights, preprocessing, view, compute mode)
and cached as fp16. A run decodes each image once for all its backbones, resizes that decode
to each input size, and computes every requested view of the square crop from it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from breakhis_tl import __version__
from breakhis_tl.data.dataset import StainedImages, collate_hashed, make_loader
from breakhis_tl.data.identity import ImageStore
from breakhis_tl.data.stain import StainSetup
from breakhis_tl.data.transforms import DecodeSizes, dihedral, normalize
from breakhis_tl.errors import UserError
from breakhis_tl.features.cache import FeatureCache, Lookup, space_key
from breakhis_tl.models.backbones import Backbone, initialiser_versions
from breakhis_tl.models.compute import (  # noqa: F401 (re-exported: the extraction API)
    FastPath,
    cpu_supports_bf16,
    fast_path,
    prepare,
    run_backbone,
)
from breakhis_tl.models.foundation import max_batch

log = logging.getLogger(__name__)

# Bump when a backbone's forward, pooling or folding changes: cached features then differ.
FEATURES_VERSION = 4

__all__ = ["FeatureCache"]


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


def feature_space(bb: Backbone, view: int, fp: FastPath, stain: str = "none") -> str:
    """Everything a feature depends on but the image: the compute mode (fp32 layouts differ
    far below fp16 storage and share the key; a low precision's mode is keyed whole);
    random weights are what the seed and the initialising library's version make."""
    key = {
        "arch": bb.name, "weights": bb.weights_id, "prep": bb.prep.to_dict(), "view": view,
        "compute": fp.dtype if fp.autocast is None else fp.describe(), "stain": stain,
        "code": FEATURES_VERSION,
        "torch": ".".join(torch.__version__.split(".")[:2]),
    }  # fmt: skip
    if bb.weights == "none":
        key["initialisers"] = initialiser_versions(bb.name)
    return space_key(key)


@dataclass
class Request:
    """Features of `backbone` for dihedral view `view` and stain view `stain_view` of the
    images `rows` (indices into the list)."""

    backbone: Backbone
    view: int
    rows: np.ndarray
    path: FastPath | None = None  # compute mode (None: the device's default fast path)
    stain_view: int = 0  # 0: the (normalised) image; k >= 1: its k-th HED-jittered copy


@dataclass
class ExtractionReport:
    extracted: list[str] = field(default_factory=list)  # "arch/view k" entries computed now
    cached: list[str] = field(default_factory=list)  # entries read wholly from the cache
    failed: dict[int, str] = field(default_factory=dict)  # image row -> message
    stain_fallbacks: dict[int, str] = field(default_factory=dict)  # row -> why unnormalised
    decodes: int = 0  # images decoded in this run, all backbones together
    upscaled: int = 0  # images smaller than a backbone's input size
    images_extracted: int = 0  # image x request pairs computed now
    to_hash: set[int] = field(default_factory=set)  # rows whose pixel hash is still wanted
    pixels: dict[int, tuple[str, str]] = field(default_factory=dict)  # row -> hash, "WxH"


@dataclass
class _Slot:
    req: Request
    path: FastPath
    space: str
    feats: torch.Tensor
    ok: torch.Tensor
    todo: np.ndarray  # positions in req.rows still to extract


@dataclass
class ExtractOptions:
    """How extraction runs; none of it changes a feature but `optimised` (the compute mode
    when a request names none) and `stain`."""

    batch_size: int = 32
    workers: int | None = None
    strict: bool = False
    optimised: bool = True
    progress: bool = True
    shard: tuple[int, int] | None = None
    stain: StainSetup | None = None
    hash_pixels: bool = False


def extract(
    paths: list[str],
    requests: list[Request],
    cache: FeatureCache | None = None,
    device: torch.device | str = "cpu",
    store: ImageStore | None = None,
    **options,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], ExtractionReport]:
    """Features for every request, in request order: (fp16 features [rows, D], ok [rows]).

    Cached images are read, the rest extracted and cached. A broken image is reported by
    path and left out (its `ok` is False) unless `strict`. `shard=(i, n)` extracts only the
    images whose content id falls in shard i of n (for several processes sharing a cache).
    `stain` normalises every image once before decoding and makes the jittered stain views
    (an image whose normalisation fails is used unnormalised and listed in the report).
    `hash_pixels`: each decoded image the store has no pixel hash for gets one from that
    decode, remembered in the store (the leakage check then decodes nothing again).
    `options` are ExtractOptions fields.
    """
    o = ExtractOptions(**options)
    o.stain = o.stain or StainSetup()
    device = torch.device(device)
    report = ExtractionReport()
    store = store or ImageStore(cache.root.parent / "images.sqlite" if cache else None)
    ids = store.content_ids(paths, workers=o.workers)
    default, shard = fast_path(device, o.optimised), o.shard
    slots = [
        _lookup(req, ids, paths, cache, req.path or default, o.strict, report, o.stain)
        for req in requests
    ]
    if shard is not None:
        for s in slots:
            s.todo = np.array([p for p in s.todo if in_shard(ids[s.req.rows[p]], shard)], int)
    groups: dict[tuple, list[_Slot]] = defaultdict(list)
    for s in slots:
        name = f"{s.req.backbone.name}/view {s.req.view}"
        name += f"/stain view {s.req.stain_view}" if s.req.stain_view else ""
        if len(s.todo):
            groups[s.req.backbone.prep.decode_key()].append(s)
            report.extracted.append(name)
        else:
            report.cached.append(name)
    if o.hash_pixels:
        known = store.known_pixels(ids)
        report.to_hash = {r for r, i in enumerate(ids) if i and i not in known}
    if groups:
        _extract_all(paths, ids, list(groups.values()), (cache, store, device), report, o)
    _warn(report)
    return [(s.feats, s.ok) for s in slots], report


def in_shard(content_id: str | None, shard: tuple[int, int]) -> bool:
    i, n = shard
    return content_id is not None and int(content_id[:8], 16) % n == i


def _lookup(req, ids, paths, cache, fp, strict, report, stain) -> _Slot:
    space = feature_space(req.backbone, req.view, fp, stain.key(req.stain_view))
    req_ids = [ids[r] for r in req.rows]
    dim = req.backbone.feature_dim
    if cache is not None:
        hit = cache.lookup(space, req_ids, dim)
    else:
        n = len(req_ids)
        hit = Lookup(torch.zeros(n, dim, dtype=torch.float16), torch.zeros(n, dtype=torch.bool),
                     torch.zeros(n, dtype=torch.bool))  # fmt: skip
    for pos, i in enumerate(req_ids):
        if i is None:  # missing file: nothing to key it by
            hit.found[pos] = True
            hit.failed[pos] = f"Image {paths[req.rows[pos]]} does not exist."
    for pos, msg in hit.failed.items():
        report.failed[int(req.rows[pos])] = msg
        if strict:
            raise UserError(f"{msg} (--strict stops at the first unreadable image).")
    for pos, msg in hit.notes.items():
        _note(report, int(req.rows[pos]), msg, strict)
    todo = np.flatnonzero(~hit.found.numpy())
    return _Slot(req, fp, space, hit.feats, hit.ok, todo)


def _warn(report: ExtractionReport) -> None:
    if report.upscaled:
        log.warning(
            "%d image(s) are smaller than a backbone's input size and were upscaled to it.",
            report.upscaled,
        )
    if report.stain_fallbacks:
        log.warning(
            "%d image(s) could not be stain-normalised and were used as they are: %s",
            len(report.stain_fallbacks), "; ".join(list(report.stain_fallbacks.values())[:5]),
        )  # fmt: skip
    if report.failed:
        log.warning(
            "%d image(s) could not be read and were skipped: %s",
            len(report.failed),
            "; ".join(list(report.failed.values())[:5]),
        )


CHUNK_IMAGES = 4096  # images decoded between cache writes: a killed run keeps the rest


def _note(report: ExtractionReport, row: int, msg: str, strict: bool) -> None:
    report.stain_fallbacks[row] = msg
    if strict:
        raise UserError(f"{msg} (--strict stops instead of using the image unnormalised).")


def _extract_all(paths, ids, groups, where: tuple, report, o: ExtractOptions) -> None:
    """Every decode size's requests, block by block, from one decode per image; `where` is
    (cache, store, device)."""
    cache, store, device = where
    slots = [s for group in groups for s in group]
    needed = sorted(set().union(*({int(s.req.rows[p]) for p in s.todo} for s in slots)))
    for s in slots:
        prepare(s.req.backbone, device, s.path)
    log.info(
        "Extracting features of %d images with %s on %s.",
        len(needed),
        ", ".join(dict.fromkeys(f"{s.req.backbone.name} ({s.path.describe()})" for s in slots)),
        device,
    )
    sizes = "/".join(str(g[0].req.backbone.prep.input_size) for g in groups)
    bar = tqdm(total=len(needed), desc=f"features {sizes}px", unit="img",
               disable=not o.progress)  # fmt: skip
    for start in range(0, len(needed), CHUNK_IMAGES):
        block = needed[start : start + CHUNK_IMAGES]
        fresh = [r for r in block if r in report.to_hash]
        done = _run_block(paths, ids, block, groups, device, report, o)
        bar.update(len(block))
        if cache is not None:
            _save_block(cache, ids, paths, block, done, slots, report)
        # block by block, like the features: a run stopped later keeps them
        store.remember_pixels([(ids[r], *report.pixels[r]) for r in fresh if r in report.pixels])
    bar.close()


def _stained_dataset(paths, ids, block, groups, stain, to_hash: set[int]) -> StainedImages:
    """The block's images, each decoded once to every group's size with as many stain views
    as some request needs of it (and a pixel hash for the rows in `to_hash`)."""
    n_views = np.ones(len(paths), dtype=np.int64)
    for s in (s for group in groups for s in group):
        rows = s.req.rows[s.todo]
        n_views[rows] = np.maximum(n_views[rows], s.req.stain_view + 1)
    sizes = DecodeSizes([group[0].req.backbone.prep for group in groups])
    keys = [ids[i] or paths[i] for i in block]
    return StainedImages([paths[i] for i in block], sizes, stain, keys, n_views[block].tolist(),
                         labels=block, hash_pixels=[i in to_hash for i in block])  # fmt: skip


def _positions(paths, group) -> list[torch.Tensor]:
    """Per request of the group: image row -> its position among the request's rows (-1: not
    wanted now)."""
    out = []
    for s in group:
        pos = np.full(len(paths), -1, dtype=np.int64)
        pos[s.req.rows[s.todo]] = s.todo
        out.append(torch.from_numpy(pos))
    return out


def _run_block(paths, ids, block, groups, device, report, o: ExtractOptions) -> dict:
    """Decode (and stain) each image of `block` once; every size, view and backbone from it."""
    strict, largest = o.strict, max(g[0].req.backbone.prep.input_size for g in groups)
    ds = _stained_dataset(paths, ids, block, groups, o.stain, report.to_hash)
    pos_of = [_positions(paths, group) for group in groups]
    failed: dict[int, str] = {}
    loader = make_loader(
        ds, batch_size=o.batch_size, workers=o.workers, collate_fn=collate_hashed, device=device
    )
    for x, rows, _, bad, sizes, notes, hashed in loader:
        for i, pixel in hashed:
            report.pixels[block[i]] = pixel
            report.to_hash.discard(block[i])
        for i, msg in bad:
            failed[block[i]] = msg
            report.failed[block[i]] = msg
            if strict:
                raise UserError(f"{msg} (--strict stops at the first unreadable image).")
        for i, msg in notes:
            _note(report, block[i], msg, strict)
        report.decodes += len(rows) + len(bad)
        report.upscaled += sum(1 for w, h in sizes if min(w, h) < largest)
        for xg, group, pos in zip(x or [None] * len(groups), groups, pos_of, strict=True):
            if xg is not None:
                _run_views(xg.to(device, non_blocking=True), rows, group, pos, report)
    return failed


def _run_views(x, rows, group, pos_of, report) -> None:
    """x: uint8 [B, stain views, 3, S, S]; each request takes its stain and dihedral view."""
    for sv, view in sorted({(s.req.stain_view, s.req.view) for s in group}):
        xv, normalized = dihedral(x[:, sv], view), {}
        for s, pos in zip(group, pos_of, strict=True):
            where = pos[rows]
            keep = where >= 0
            if (s.req.stain_view, s.req.view) != (sv, view) or not keep.any():
                continue
            bb = s.req.backbone
            nk = (bb.prep.mean, bb.prep.std)
            if nk not in normalized:
                normalized[nk] = normalize(xv, bb.prep)
            xb, step = normalized[nk][keep], max_batch(bb.name) or len(keep)
            f = torch.cat([run_backbone(bb, xb[i : i + step], s.path)
                           for i in range(0, len(xb), step)])  # fmt: skip
            s.feats[where[keep]] = f.to("cpu", torch.float16)
            s.ok[where[keep]] = True
            report.images_extracted += int(keep.sum())


def _save_block(cache, ids, paths, block, failed, slots, report) -> None:
    """The block's features, chunk by chunk; a request's rows in the block found in one
    vectorised pass (a Python scan of every image per block grew with the square of them)."""
    for s in slots:
        todo = np.asarray(s.todo, dtype=np.int64)
        in_block = todo[np.isin(s.req.rows[todo], np.asarray(block, dtype=np.int64))]
        positions = [int(p) for p in in_block if ids[s.req.rows[p]] is not None]
        if not positions:
            continue
        rows = [int(s.req.rows[p]) for p in positions]
        chunk_ids = [ids[r] for r in rows]
        msgs = {ids[r]: failed[r] for r in rows if r in failed}
        notes = {ids[r]: report.stain_fallbacks[r] for r in rows if r in report.stain_fallbacks}
        bb = s.req.backbone
        cache.save(s.space, chunk_ids, s.feats[positions], s.ok[positions], msgs, {
            "arch": bb.name, "weights": bb.weights_id, "prep": bb.prep.to_dict(),
            "view": s.req.view, "stain_view": s.req.stain_view, "package": __version__,
        }, notes=notes)  # fmt: skip


def check_features(name: str, feats: torch.Tensor, ok: torch.Tensor) -> None:
    """A baseline must work before anything is compared with it: features that are not
    finite, or that do not vary across images, say so by backbone instead of training a
    head on nothing (random-init inception_v3 once gave 90% inf after the fp16 cache)."""
    x = feats[ok].float()
    if len(x) == 0:
        return
    if not torch.isfinite(x).all():
        share = 1 - torch.isfinite(x).float().mean().item()
        raise UserError(
            f"The {name} features are not finite ({share:.0%} inf or NaN); this backbone's "
            "output overflows, so no head can be trained on it."
        )
    varying = (x.std(0) > 0).float().mean().item() if len(x) > 1 else 1.0
    if varying == 0 or (x == 0).all():
        raise UserError(
            f"The {name} features are constant across images (all zero or equal); this "
            "backbone carries no information, so no head can be trained on it."
        )
    if varying < 0.5:
        log.warning("Only %.0f%% of the %s feature columns vary across images.",
                    100 * varying, name)  # fmt: skip
