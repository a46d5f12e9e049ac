"""Classifier heads and the head file: weights plus everything needed to use them later.

A head file is a `torch.save` dict of a format tag, a JSON string of metadata and a state dict
of tensors. `torch.load(weights_only=True)` reads exactly that and refuses any other pickled
object, so loading a head shared by someone else cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from breakhis_tl.errors import UserError

HEAD_FORMAT = "breakhis_tl.head/1"
HEADS = ("logreg", "linear", "mlp")


def make_head(
    kind: str, in_dim: int, n_classes: int, hidden: int = 512, dropout: float = 0.5
) -> nn.Module:
    if kind in ("linear", "logreg"):  # a linear probe: logistic regression on the features
        return nn.Sequential(nn.Linear(in_dim, n_classes))
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes)
        )
    raise UserError(f"Unknown head {kind!r}; choose one of: {', '.join(HEADS)}.")


def save_head(path: str | Path, head: nn.Module, meta: dict, extra: dict | None = None) -> Path:
    """Atomic: written to a temporary file, then renamed over the target. `extra`: tensors
    of the backbone that the head depends on (a random-init backbone's batch-norm
    statistics), so the file alone rebuilds what it was trained on."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    extra = {k: v.detach().cpu().clone() for k, v in (extra or {}).items()}
    text = json.dumps(meta, default=_jsonable)
    payload = {
        "format": HEAD_FORMAT,
        "meta": text,
        "state_dict": state,
        "checksum": _checksum(text, state, extra),
    }
    if extra:
        payload["extra"] = extra
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def _checksum(meta: str, state: dict, extra: dict | None = None) -> str:
    """sha256 of metadata and weights: a file changed after saving is refused, not misused."""
    h = hashlib.sha256(meta.encode())
    for part in (state, extra or {}):
        for k in sorted(part):
            h.update(k.encode())
            h.update(part[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


PASS_HEAD = "pass a .pt head file from trained_models/<run>/"
TEXT_KINDS = {".csv": "a CSV file", ".json": "a JSON file", ".txt": "a text file"}


def _not_torch(path: Path) -> str | None:
    """What the file is when it is not a torch file at all, so the sentence can name it (a
    CSV passed as --head otherwise reads as pickled objects or an IndexError)."""
    with path.open("rb") as f:
        start = f.read(512)
    if start[:4] == b"PK\x03\x04" or start[:1] == b"\x80":
        return None  # a torch zip archive or a legacy pickle: let torch.load judge it
    if not start:
        return "an empty file"
    if start[:8] == b"\x89PNG\r\n\x1a\n" or start[:3] == b"\xff\xd8\xff":
        return "an image"
    if b"\x00" not in start:
        return TEXT_KINDS.get(path.suffix.lower(), "a text file")
    return "not a torch file"


def read_head_file(path: str | Path) -> tuple[dict, dict]:
    """(metadata, state dict), or one sentence saying why this is not a head file."""
    path = Path(path)
    if path.is_dir():
        heads = sorted(p.name for p in path.glob("*.pt"))
        hint = f" such as {path / heads[0]}" if heads else ""
        raise UserError(f"Head {path} is a folder, not a head file; pass one of its .pt files"
                        f"{hint}.")  # fmt: skip
    if not path.is_file():
        raise UserError(f"Head file {path} does not exist; {PASS_HEAD}.")
    what = _not_torch(path)
    if what:
        raise UserError(f"{path} is {what}, not a breakhis_tl head file; {PASS_HEAD}.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"Head file {path} holds pickled objects other than tensors; it was refused "
            "and nothing in it was run."
        ) from None
    except Exception:  # torch.load raises many types for files that are not its own
        raise UserError(
            f"{path} is not a breakhis_tl head file: it is a damaged or truncated torch file; "
            f"{PASS_HEAD}."
        ) from None
    if not isinstance(payload, dict) or "format" not in payload:
        raise UserError(
            f"{path} is not a breakhis_tl head file (a torch file with no format tag; backbone "
            f"weights go to train --weights); {PASS_HEAD}."
        )
    if payload["format"] != HEAD_FORMAT:
        raise UserError(
            f"Head file {path} has format {payload['format']!r}; this version of breakhis_tl "
            f"reads {HEAD_FORMAT!r}."
        )
    try:
        meta = json.loads(payload["meta"])
        state = payload["state_dict"]
        extra = payload.get("extra", {})
        assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
        assert isinstance(extra, dict) and all(isinstance(v, torch.Tensor) for v in extra.values())
    except (KeyError, TypeError, ValueError, AssertionError):
        raise UserError(
            f"Head file {path} is damaged: its metadata or weights are missing."
        ) from None
    if payload.get("checksum") != _checksum(payload["meta"], state, extra):
        raise UserError(
            f"Head file {path} was changed after it was saved: its checksum does not match."
        )
    if extra:
        meta["_extra"] = extra  # backbone tensors the head depends on (see save_head)
    return meta, state


def load_head(path: str | Path) -> tuple[nn.Module, dict]:
    meta, state = read_head_file(path)
    try:
        head = make_head(
            meta["head"],
            int(meta["feature_dim"]),
            len(meta["classes"]),
            int(meta.get("hidden", 512)),
            float(meta.get("dropout", 0.5)),
        )
        head.load_state_dict(state)
    except (KeyError, RuntimeError) as exc:
        raise UserError(f"Head file {path} does not match its own metadata ({exc}).") from None
    return head.eval(), meta
