"""The on-disk feature cache: entries per image, grouped in chunk files.

A feature space (backbone, weights identity, preprocessing, view, compute mode, stain
setting) is one folder. Inside it, each chunk file holds the fp16 features of some images,
keyed by their content ids, so a run over another subset of the same images (a different
magnification, seed, fold or protocol) reads what is there and extracts only what is not.
A chunk counts only once its JSON marker is written (after the features), so a run killed
at any moment leaves either a complete chunk or one that is ignored and redone. Images that
failed to decode are remembered too, with their message, so `--strict` stops on them even
when the cache is warm; so are images whose stain normalisation failed (their `notes`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CACHE_FORMAT = "breakhis_tl.features.extract/2"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def space_key(ident: dict) -> str:
    """A stable name for everything the features depend on, except the image itself."""
    full = {"format": CACHE_FORMAT, **ident}
    return hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class Lookup:
    """What the cache holds for a list of content ids, in that order."""

    feats: torch.Tensor  # [n, D] fp16, zeros where not found or failed
    ok: torch.Tensor  # [n] bool: features present and valid
    found: torch.Tensor  # [n] bool: the cache knows this image (features or a failure)
    failed: dict[int, str] = field(default_factory=dict)  # position -> message
    notes: dict[int, str] = field(default_factory=dict)  # position -> why stain-unnormalised


class FeatureCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def folder(self, space: str) -> Path:
        return self.root / space[:2] / space

    def _chunks(self, space: str) -> list[tuple[Path, dict]]:
        folder = self.folder(space)
        if not folder.is_dir():
            return []
        out = []
        for marker in sorted(folder.glob("*.json")):
            data = marker.with_suffix(".safetensors")
            try:
                meta = json.loads(marker.read_text())
            except (OSError, ValueError) as exc:
                log.warning("Cache marker %s is unreadable (%s); ignoring it.", marker, exc)
                continue
            if data.is_file() and isinstance(meta.get("ids"), list):
                out.append((data, meta))
        return out

    def lookup(self, space: str, ids: list[str | None], dim: int) -> Lookup:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        n = len(ids)
        res = Lookup(
            torch.zeros(n, dim, dtype=torch.float16),
            torch.zeros(n, dtype=torch.bool),
            torch.zeros(n, dtype=torch.bool),
        )
        where: dict[str, list[int]] = {}
        for pos, i in enumerate(ids):
            if i is not None:
                where.setdefault(i, []).append(pos)
        for data, meta in self._chunks(space):
            rows = [(r, where[i]) for r, i in enumerate(meta["ids"]) if i in where]
            if not rows:
                continue
            try:
                tensors = load_file(str(data))
                feats, ok = tensors["features"], tensors["ok"].bool()
                assert feats.shape == (len(meta["ids"]), dim) and len(ok) == len(meta["ids"])
            except (OSError, ValueError, KeyError, AssertionError, SafetensorError) as exc:
                log.warning("Cache chunk %s is unreadable (%s); extracting again.", data, exc)
                continue
            failed, notes = meta.get("failed", {}), meta.get("notes", {})
            for r, positions in rows:
                i = meta["ids"][r]
                for pos in positions:
                    res.feats[pos], res.ok[pos], res.found[pos] = feats[r], ok[r], True
                    if not ok[r]:
                        res.failed[pos] = failed.get(i, f"image {i} could not be read")
                    if i in notes:
                        res.notes[pos] = notes[i]
                del where[i]
        return res

    def save(
        self, space: str, ids: list[str], feats: torch.Tensor, ok: torch.Tensor,
        failed: dict[str, str], meta: dict, notes: dict[str, str] | None = None,
    ) -> Path:  # fmt: skip
        """One chunk: features first, then the marker that makes it count. `notes`: images
        used unnormalised because stain normalisation failed, and why."""
        from safetensors.torch import save_file

        folder = self.folder(space)
        folder.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:24]
        data = folder / f"{name}.safetensors"
        tmp = data.with_name(f".{data.name}.{os.getpid()}.tmp")
        save_file({"features": feats.contiguous(), "ok": ok.to(torch.uint8)}, str(tmp))
        os.replace(tmp, data)
        marker = {**meta, "ids": ids, "failed": failed, "notes": notes or {}, "rows": len(ids)}
        atomic_write_text(data.with_suffix(".json"), json.dumps(marker))
        return data

    def describe(self, space: str) -> dict:
        """Images and failures a space holds (for `extract` summaries and tests)."""
        ids, failed = set(), 0
        for _, meta in self._chunks(space):
            ids.update(meta["ids"])
            failed += len(meta.get("failed", {}))
        return {"images": len(ids), "failed": failed}
