"""Pathology foundation models, and any timm model, as frozen feature extractors.

Each preset is built the way its model card says (timm kwargs, preprocessing, which tokens
make the embedding), so that features are comparable with published numbers. Hub weights are
loaded through timm's Hugging Face support; Phikon and Phikon-v2 are published for
`transformers` only and are converted to the equivalent timm ViT (key mapping in
`_HF_VIT_KEYS`); kaiko.ai's ViT-L/14 comes from the official GitHub release used by its
torch.hub entry. timm and huggingface_hub are imported only when such a backbone is built.

Weights are one of `default` (the published weights), `none` (seeded random init, no
download) or a local file (safetensors or torch state dict) that must match the architecture
key for key and shape for shape: a wrong checkpoint is refused, never half-loaded.

Every build returns a weights identity that goes into the feature-cache key and the head
file: `hf-<hub id>@<commit>-<file>-<sha256>` for hub weights, `url-<file>-<sha256>` for a
downloaded release, `file-<sha256>` for a local file and `none-seed<seed>` for random.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.error
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from breakhis_tl.data.identity import sha256_file
from breakhis_tl.data.transforms import Preprocessing
from breakhis_tl.errors import UserError

log = logging.getLogger(__name__)

# The project's switch (see backbones.py): fail at once instead of trying any download.
OFFLINE_ENV = "BREAKHIS_TL_OFFLINE"  # 1: fail at once, with one sentence, instead of a download
# Peak CPU memory the batch-size hints aim under (weights + activations of one batch).
MEMORY_BUDGET = 8 << 30
# Interpreter, torch and timm before any weights, rounded up.
RUNTIME_OVERHEAD = 1 << 30

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HOPTIMUS_MEAN, HOPTIMUS_STD = (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)
KAIKO_RELEASE = "https://github.com/kaiko-ai/towards_large_pathology_fms/releases/download/0.0.1"


@dataclass(frozen=True)
class FoundationSpec:
    """A named backbone as its card describes it.

    `timm_kwargs` rebuild the architecture without the hub (random init, local files, tests);
    `card_kwargs` are what the card passes to `timm.create_model("hf-hub:<id>")`, the hub's
    config.json supplying the rest. Layer names ("swiglu_packed", "silu") stand for timm/torch
    classes so that this module imports without timm.
    """

    name: str
    hub_id: str
    timm_name: str
    timm_kwargs: dict
    feature_dim: int
    params: int  # parameters of the trunk (checked against a meta build in the tests)
    prep: Preprocessing
    pooling: str  # "cls" or "cls+mean" (class token, mean of patch tokens; registers dropped)
    card: str
    licence: str
    gated: bool
    batch_size: int  # extraction batch keeping CPU peak memory under MEMORY_BUDGET
    source: str = "timm-hub"  # "timm-hub" | "transformers" (converted) | "url"
    card_kwargs: dict = field(default_factory=dict)
    weights_files: tuple[str, ...] = ()  # files tried in order ("transformers", "url")
    autocast: str = "float16"  # GPU autocast dtype the cards use


_SWIGLU = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}
_UNI2_H = {
    "img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
    "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
    **_SWIGLU, "reg_tokens": 8, "dynamic_img_size": True,
}  # fmt: skip
_HOPTIMUS = {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.33334, "num_classes": 0}
_HOPTIMUS_CARD = {"init_values": 1e-5, "dynamic_img_size": False}


def _prep(mean=IMAGENET_MEAN, std=IMAGENET_STD, resize=224, interp="bilinear") -> Preprocessing:
    return Preprocessing(224, resize, tuple(mean), tuple(std), interp)


PRESETS: dict[str, FoundationSpec] = {
    s.name: s
    for s in [
        # https://huggingface.co/MahmoodLab/UNI : ViT-L/16, Resize(224), ImageNet mean/std,
        # create_model("hf-hub:MahmoodLab/uni", init_values=1e-5, dynamic_img_size=True); CLS.
        FoundationSpec(
            "uni", "MahmoodLab/UNI", "vit_large_patch16_224",
            {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0,
             "dynamic_img_size": True},
            1024, 303_350_784, _prep(), "cls", "https://huggingface.co/MahmoodLab/UNI",
            "CC-BY-NC-ND-4.0", True, 64,
            card_kwargs={"init_values": 1e-5, "dynamic_img_size": True},
        ),
        # https://huggingface.co/MahmoodLab/UNI2-h : ViT-H/14 with 8 registers, SwiGLU; the
        # card's timm_kwargs verbatim; Resize(224), ImageNet mean/std; CLS (1536).
        FoundationSpec(
            "uni2_h", "MahmoodLab/UNI2-h", "vit_giant_patch14_224", _UNI2_H,
            1536, 681_394_176, _prep(), "cls", "https://huggingface.co/MahmoodLab/UNI2-h",
            "CC-BY-NC-ND-4.0", True, 32, card_kwargs=_UNI2_H,
        ),
        # https://huggingface.co/paige-ai/Virchow2 : ViT-H/14, 4 registers, SwiGLU
        # (card: mlp_layer=SwiGLUPacked, act_layer=SiLU); 224 bicubic, crop_pct 1, ImageNet
        # mean/std; embedding = CLS ++ mean of the 256 patch tokens (tokens 1-4 are registers).
        FoundationSpec(
            "virchow2", "paige-ai/Virchow2", "vit_huge_patch14_224",
            {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "reg_tokens": 4,
             "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True, **_SWIGLU},
            2560, 631_239_424, _prep(interp="bicubic"), "cls+mean",
            "https://huggingface.co/paige-ai/Virchow2", "CC-BY-NC-ND-4.0", True, 64,
            card_kwargs=dict(_SWIGLU),
        ),
        # https://huggingface.co/bioptimus/H-optimus-0 : ViT-g/14, 4 registers; card:
        # init_values=1e-5, dynamic_img_size=False, 224 px, its own mean/std; CLS (1536).
        FoundationSpec(
            "h_optimus_0", "bioptimus/H-optimus-0", "vit_giant_patch14_reg4_dinov2",
            _HOPTIMUS, 1536, 1_134_774_272, _prep(HOPTIMUS_MEAN, HOPTIMUS_STD, interp="bicubic"),
            "cls", "https://huggingface.co/bioptimus/H-optimus-0", "Apache-2.0", True, 32,
            card_kwargs=_HOPTIMUS_CARD,
        ),
        # https://huggingface.co/bioptimus/H-optimus-1 : same architecture and preprocessing.
        FoundationSpec(
            "h_optimus_1", "bioptimus/H-optimus-1", "vit_giant_patch14_reg4_dinov2",
            _HOPTIMUS, 1536, 1_134_774_272, _prep(HOPTIMUS_MEAN, HOPTIMUS_STD, interp="bicubic"),
            "cls", "https://huggingface.co/bioptimus/H-optimus-1",
            "CC-BY-NC-ND-4.0 (see card)", True, 32, card_kwargs=_HOPTIMUS_CARD,
        ),
        # https://huggingface.co/owkin/phikon : iBOT ViT-B/16 published as a transformers
        # ViTModel; last_hidden_state[:, 0] (CLS after the final LayerNorm); ImageNet mean/std.
        FoundationSpec(
            "phikon", "owkin/phikon", "vit_base_patch16_224",
            {"img_size": 224, "num_classes": 0},
            768, 85_798_656, _prep(), "cls", "https://huggingface.co/owkin/phikon",
            "Owkin non-commercial", False, 64, source="transformers",
            weights_files=("model.safetensors", "pytorch_model.bin"),
        ),
        # https://huggingface.co/owkin/phikon-v2 : DINOv2 ViT-L/16 without registers
        # (transformers Dinov2Model), CLS of last_hidden_state; ImageNet mean/std, 224 px.
        FoundationSpec(
            "phikon_v2", "owkin/phikon-v2", "vit_large_patch16_224",
            {"img_size": 224, "init_values": 1e-5, "num_classes": 0},
            1024, 303_350_784, _prep(interp="bicubic"), "cls",
            "https://huggingface.co/owkin/phikon-v2", "Owkin non-commercial", False, 64,
            source="transformers", weights_files=("model.safetensors", "pytorch_model.bin"),
        ),
        # https://huggingface.co/prov-gigapath/prov-gigapath : tile encoder, ViT-g with 16 px
        # patches (config.json: vit_giant_patch14_dinov2 + patch_size 16, mlp_ratio 5.33334);
        # Resize(256, bicubic), CenterCrop(224), ImageNet mean/std; CLS (1536).
        FoundationSpec(
            "prov_gigapath", "prov-gigapath/prov-gigapath", "vit_giant_patch14_dinov2",
            {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
             "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334, "num_classes": 0},
            1536, 1_134_953_984, _prep(resize=256, interp="bicubic"), "cls",
            "https://huggingface.co/prov-gigapath/prov-gigapath", "Apache-2.0", True, 32,
        ),
        # https://github.com/kaiko-ai/towards_large_pathology_fms (hubconf `vitl14`, used by
        # kaiko-ai/eva as pathology/kaiko_vitl14): DINOv2 ViT-L/14 with 4 registers, weights
        # from release 0.0.1; Resize(224), CenterCrop(224), mean = std = 0.5; CLS (1024).
        FoundationSpec(
            "kaiko_vitl14", "kaiko-ai/towards_large_pathology_fms",
            "vit_large_patch14_reg4_dinov2", {"num_classes": 0, "dynamic_img_size": True},
            1024, 304_370_688, _prep((0.5,) * 3, (0.5,) * 3), "cls",
            "https://github.com/kaiko-ai/towards_large_pathology_fms",
            "kaiko non-commercial (repository LICENSE)", False, 64, source="url",
            weights_files=(f"{KAIKO_RELEASE}/vitl14.pth",),
        ),
    ]
}  # fmt: skip


def is_foundation(name: str) -> bool:
    """Whether `name` is a preset of this module (build_backbone dispatches on it)."""
    return name in PRESETS


# --------------------------------------------------------------------------- building


class TokenPool(nn.Module):
    """A timm ViT trunk, pooled as the card says: the class token, or the class token
    concatenated with the mean of the patch tokens (class and register tokens left out)."""

    def __init__(self, vit: nn.Module, pooling: str):
        super().__init__()
        if pooling not in ("cls", "cls+mean"):
            raise ValueError(f"unknown pooling {pooling!r}")
        self.vit, self.pooling = vit, pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)
        cls = tokens[:, 0]
        if self.pooling == "cls":
            return cls
        return torch.cat([cls, tokens[:, self.vit.num_prefix_tokens :].mean(1)], dim=-1)


def _timm():
    try:
        import timm
    except ImportError:
        raise UserError("Foundation and timm backbones need timm; pip install timm.") from None
    return timm


def _resolve(kwargs: dict) -> dict:
    """Layer names of a spec to the timm/torch classes they stand for."""
    timm = _timm()
    layers = {"swiglu_packed": timm.layers.SwiGLUPacked, "silu": nn.SiLU}
    return {k: layers[v] if k in ("mlp_layer", "act_layer") else v for k, v in kwargs.items()}


def architecture(name: str, init: bool = True) -> TokenPool:
    """The pooled preset with random init, on the current default device: with
    `torch.device("meta")` a ViT-g costs no memory, so its shapes can be checked anywhere.
    `init=False` skips the weight init, for a model whose every tensor is loaded next."""
    spec = _spec(name)
    kwargs = _resolve(spec.timm_kwargs) | ({} if init else {"weight_init": "skip"})
    vit = _timm().create_model(spec.timm_name, pretrained=False, **kwargs)
    return TokenPool(vit, spec.pooling)


def _spec(name: str) -> FoundationSpec:
    if name not in PRESETS:
        raise UserError(f"Unknown foundation model {name!r}; choose from {', '.join(PRESETS)}.")
    return PRESETS[name]


def build(
    name: str, weights: str = "default", seed: int = 0
) -> tuple[nn.Module, int, Preprocessing, str]:
    """A preset as (module in eval mode mapping [B,3,H,W] to [B,dim], dim, preprocessing,
    weights identity); `weights` is default (published), none (random from `seed`) or a file."""
    spec = _spec(name)
    if weights == "none":
        torch.manual_seed(seed)  # a random init is part of the experiment: make it repeatable
        module, wid = architecture(name), f"none-seed{seed}"
    elif weights == "default":
        module, wid = _published(spec)
    else:
        path = _existing(weights)
        module = _load_file(spec, path)
        wid = f"file-{sha256_file(path)[:16]}"
    return module.eval(), spec.feature_dim, spec.prep, wid


def _load_file(spec: FoundationSpec, path: Path) -> TokenPool:
    """The architecture on the meta device, then the file's tensors in it, strictly."""
    module = _meta(spec.name)
    load_strict(module.vit, _convert(spec, read_state_dict(path), module), path, spec.name)
    return module


def _meta(name: str) -> TokenPool:
    with torch.device("meta"):
        return architecture(name, init=False)


def _published(spec: FoundationSpec) -> tuple[TokenPool, str]:
    if spec.source == "timm-hub":
        return _from_timm_hub(spec)
    if spec.source == "transformers":
        path = _hub_file(spec.hub_id, spec.weights_files)
        return _load_file(spec, path), _hub_identity(spec.hub_id, path)
    path = _url_file(spec.name, spec.weights_files[0])
    return _load_file(spec, path), f"url-{path.name}-{sha256_file(path)[:16]}"


def _from_timm_hub(spec: FoundationSpec) -> tuple[TokenPool, str]:
    """The card's own call; the architecture is then compared with the explicit one that
    `--weights none` and weights files use, so a drift between them is seen, not silent."""
    _hub_file(spec.hub_id, ("config.json",))  # gated/offline/no-network: one sentence
    with _hub_errors(spec.hub_id):
        vit = _timm().create_model(
            f"hf-hub:{spec.hub_id}", pretrained=True, **_resolve(spec.card_kwargs)
        )
    _warn_if_other_architecture(spec, vit)
    filename = vit.pretrained_cfg.get("hf_hub_filename") or "pytorch_model.bin"
    return TokenPool(vit, spec.pooling), _hub_identity(spec.hub_id, _cached(spec.hub_id, filename))


def _warn_if_other_architecture(spec: FoundationSpec, vit: nn.Module) -> None:
    want = {k: tuple(v.shape) for k, v in _meta(spec.name).vit.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:3]
        log.warning("%s from the hub differs from its preset architecture (%s)", spec.name, diff)


def build_timm(
    model_name: str, weights: str = "default", seed: int = 0
) -> tuple[nn.Module, int, Preprocessing, str]:
    """Any timm model (`timm:<name>`, `hf-hub:<id>` names included) with its classifier
    removed; a weights file is loaded strictly, like the presets'."""
    timm = _timm()
    path = _existing(weights) if weights not in ("default", "none") else None
    torch.manual_seed(seed)  # a random init is part of the experiment: make it repeatable
    model = _create_timm(timm, model_name, pretrained=weights == "default")
    if weights == "none":
        wid = f"none-seed{seed}"
    elif path is None:
        wid = _timm_pretrained_identity(model)
    else:
        load_strict(model, read_state_dict(path), path, f"timm:{model_name}")
        wid = f"file-{sha256_file(path)[:16]}"
    dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return model.eval(), dim, _timm_prep(timm, model), wid


def _create_timm(timm, model_name: str, pretrained: bool) -> nn.Module:
    hub_id = _timm_hub_id(model_name) if pretrained else None
    if hub_id and _offline():  # fail at once, with the sentence, if the cache lacks it
        _hub_file(hub_id.split("@")[0], ("model.safetensors", "pytorch_model.bin"))
    try:
        with _hub_errors(hub_id or model_name):
            return timm.create_model(model_name, pretrained=pretrained, num_classes=0)
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"timm could not create {model_name!r} ({exc}).") from None
    except urllib.error.URLError as exc:
        raise UserError(
            f"The pretrained weights of timm:{model_name} could not be downloaded ({exc.reason}); "
            f"connect, or use --weights none or a weights file."
        ) from None


def _timm_prep(timm, model: nn.Module) -> Preprocessing:
    cfg = timm.data.resolve_data_config({}, model=model)
    size = int(cfg["input_size"][-1])
    interp = "bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear"
    return Preprocessing(size, size, tuple(cfg["mean"]), tuple(cfg["std"]), interp)


def _timm_hub_id(model_name: str) -> str | None:
    if model_name.startswith(("hf-hub:", "hf_hub:")):
        return model_name[7:].split("@")[0]
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(model_name)
    except Exception:  # unknown names are reported by create_model itself
        return None
    return getattr(cfg, "hf_hub_id", None) if cfg is not None else None


def _timm_pretrained_identity(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        filename = cfg.get("hf_hub_filename") or "pytorch_model.bin"
        return _hub_identity(hub_id, _cached(hub_id.split("@")[0], filename))
    url = cfg.get("url")
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url or "")
    if url and path.is_file():
        return f"url-{path.name}-{sha256_file(path)[:16]}"
    return f"timm-{cfg.get('architecture', '?')}.{cfg.get('tag', '')}-unhashed"


# --------------------------------------------------------------------------- weights files


def _existing(weights: str) -> Path:
    path = Path(weights)
    if not path.is_file():
        raise UserError(f"--weights {weights}: no such file; give default, none or the path of a "
                        "weights file.")  # fmt: skip
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file or a torch state dict (optionally under `state_dict`/`model`)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"Weights file {path} could not be read as a state dict ({exc}).") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"Weights file {path} holds a {type(state).__name__}, not a state dict.")
    return state


def load_strict(model: nn.Module, state: dict, path: str | Path, name: str) -> None:
    """Load every tensor or nothing: missing, unexpected and reshaped keys are reported in one
    sentence. A meta-device model takes the file's tensors as they are (no second copy)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or reshaped:
        parts = [
            f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
            for keys, what in [(missing, "missing keys"), (unexpected, "unexpected keys"),
                               (reshaped, "keys of another shape")]
            if keys
        ]  # fmt: skip
        raise UserError(f"Weights file {path} does not fit {name}: {'; '.join(parts)}; refused.")
    on_meta = any(t.is_meta for t in own.values())
    model.load_state_dict(state, strict=True, assign=on_meta)
    if on_meta:
        model.float()  # an fp16/bf16 file is used in fp32, like the hub weights


def _convert(spec: FoundationSpec, state: dict, module: TokenPool) -> dict:
    """Upstream layouts to timm's; a file already in timm's layout passes unchanged."""
    if spec.source == "transformers":
        state = hf_vit_to_timm(state)
        return _fit_pos_embed(state, module.vit)
    if spec.source == "url":
        return dinov2_to_timm(state)
    return state


# transformers ViTModel / Dinov2Model key -> timm VisionTransformer key (q, k, v are fused).
_HF_VIT_KEYS = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"encoder\.layer\.(\d+)\.(?:layernorm_before|norm1)\.", r"blocks.\1.norm1."),
    (r"encoder\.layer\.(\d+)\.(?:layernorm_after|norm2)\.", r"blocks.\1.norm2."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layer\.(\d+)\.(?:intermediate\.dense|mlp\.fc1)\.", r"blocks.\1.mlp.fc1."),
    (r"encoder\.layer\.(\d+)\.(?:output\.dense|mlp\.fc2)\.", r"blocks.\1.mlp.fc2."),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"layernorm\.", "norm."),
]
_HF_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(\w+)")


def hf_vit_to_timm(state: dict) -> dict:
    """Phikon (ViTModel) and Phikon-v2 (Dinov2Model) weights in timm's ViT layout; the
    unused pooler and mask token are dropped. Keys already in timm's layout are kept."""
    out, qkv = {}, {}
    for key, value in state.items():
        key = key.removeprefix("vit.")
        if key.startswith(("pooler.", "embeddings.mask_token")):
            continue
        if m := _HF_QKV.fullmatch(key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
            continue
        for pattern, repl in _HF_VIT_KEYS:
            if re.match(pattern, key):
                key = re.sub(pattern, repl, key, count=1)
                break
        out[key] = value
    for (block, kind), parts in qkv.items():
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat(
            [parts[p] for p in ("query", "key", "value")]
        )
    return out


def _fit_pos_embed(state: dict, vit: nn.Module) -> dict:
    """A checkpoint trained at another grid is resampled once to the model's grid."""
    pos, own = state.get("pos_embed"), vit.pos_embed
    if pos is None or pos.shape == own.shape:
        return state
    from timm.layers import resample_abs_pos_embed

    grid = vit.patch_embed.grid_size
    prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
    state["pos_embed"] = resample_abs_pos_embed(pos, list(grid), num_prefix_tokens=prefix)
    return state


def dinov2_to_timm(state: dict) -> dict:
    """The original DINOv2 layout (kaiko's release) in timm's: registers become `reg_token`,
    the class token takes its position embedding (timm's no_embed_class), SwiGLU w12/w3 are
    fc1/fc2, the mask token is dropped."""
    state = dict(state)
    state.pop("mask_token", None)
    if "register_tokens" in state:
        pos = state.pop("pos_embed")
        state["reg_token"] = state.pop("register_tokens")
        state["cls_token"] = state["cls_token"] + pos[:, :1]
        state["pos_embed"] = pos[:, 1:]
    renamed = {}
    for key, value in state.items():
        key = re.sub(r"^(blocks\.\d+\.mlp\.)w12\.", r"\1fc1.", key)
        renamed[re.sub(r"^(blocks\.\d+\.mlp\.)w3\.", r"\1fc2.", key)] = value
    return renamed


# --------------------------------------------------------------------------- downloads


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode() or os.environ.get(OFFLINE_ENV))


def _hub_file(hub_id: str, filenames: tuple[str, ...]) -> Path:
    """The first of `filenames` the repo has, from the cache or downloaded; errors of the hub
    (gated, no token, offline, no network) become one sentence naming `hub_id`."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    with _hub_errors(hub_id):
        for filename in filenames[:-1]:
            try:
                return Path(
                    huggingface_hub.hf_hub_download(hub_id, filename, local_files_only=_offline())
                )
            except EntryNotFoundError:  # not in the repo, or not cached: try the next name
                pass
        last = filenames[-1]
        return Path(huggingface_hub.hf_hub_download(hub_id, last, local_files_only=_offline()))


@contextmanager
def _hub_errors(hub_id: str) -> Iterator[None]:
    from huggingface_hub import errors

    try:
        yield
    except errors.GatedRepoError:
        raise UserError(_gated_sentence(hub_id)) from None
    except errors.RepositoryNotFoundError:
        raise UserError(
            f"{hub_id} was not found on the Hugging Face hub or needs a login; check the name, "
            f"accept its licence at https://huggingface.co/{hub_id} and set HF_TOKEN."
        ) from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled):
        raise UserError(_offline_sentence(hub_id)) from None
    except errors.EntryNotFoundError as exc:
        raise UserError(f"{hub_id} on the Hugging Face hub lacks a weights file ({exc}).") from None
    except errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        raise UserError(
            f"The Hugging Face hub answered HTTP {status} for {hub_id}; try again later, or "
            f"pre-download it with `hf download {hub_id}` where the hub answers."
        ) from None
    except (ConnectionError, TimeoutError):
        raise UserError(_offline_sentence(hub_id)) from None


def _gated_sentence(hub_id: str) -> str:
    from huggingface_hub import get_token

    who = "the Hugging Face token in use has no access" if get_token() else "no HF_TOKEN is set"
    return (
        f"{hub_id} is a gated model and {who}; accept its licence at "
        f"https://huggingface.co/{hub_id} and set HF_TOKEN to a token of that account "
        f"(or use --weights none or a weights file)."
    )


def _offline_sentence(hub_id: str) -> str:
    from huggingface_hub import constants

    cache = constants.HF_HUB_CACHE
    if _offline():
        why = "offline mode (HF_HUB_OFFLINE or BREAKHIS_TL_OFFLINE) forbids downloading it"
        return (
            f"{hub_id} is not in the Hugging Face cache {cache} and {why}; pre-download it with "
            f"`hf download {hub_id}` (huggingface-cli download in older huggingface_hub) into "
            f"that cache (HF_HOME), or use --weights none or a weights file."
        )
    return (
        f"{hub_id} could not be downloaded (huggingface.co is unreachable) and is not in the "
        f"cache {cache}; connect, or pre-download it elsewhere with `hf download {hub_id}` "
        f"and copy that cache here (HF_HOME)."
    )


def _cached(hub_id: str, filename: str) -> Path | None:
    """The weights file timm loaded, found in the hub cache (safetensors preferred, as timm)."""
    from huggingface_hub import try_to_load_from_cache

    names = [filename]
    if filename.endswith(".bin"):
        names.insert(0, "model.safetensors" if filename == "pytorch_model.bin" else
                     filename[:-4] + ".safetensors")  # fmt: skip
    for name in names:
        path = try_to_load_from_cache(hub_id, name)
        if isinstance(path, str):
            return Path(path)
    return None


def _hub_identity(hub_id: str, path: Path | None) -> str:
    """hub id, commit of the cached snapshot, file and its sha256: the cache stores large
    files under their sha256, so the hash is read from the blob's name, not recomputed."""
    if path is None:
        return f"hf-{hub_id}@unresolved"
    blob = Path(os.path.realpath(path)).name
    digest = blob if re.fullmatch(r"[0-9a-f]{64}", blob) else sha256_file(path)
    commit = path.parent.name if re.fullmatch(r"[0-9a-f]{40}", path.parent.name) else "local"
    return f"hf-{hub_id}@{commit[:12]}-{path.name}-{digest[:16]}"


def _url_file(name: str, url: str) -> Path:
    """A release file in torch.hub's cache (TORCH_HOME), downloaded once."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / os.path.basename(url)
    if path.is_file():
        return path
    hint = f"put {path.name} from {url} in {folder} (or set TORCH_HOME)"
    if _offline():
        raise UserError(f"The weights of {name} are not cached and offline mode is set; {hint}.")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), progress=True)
    except (urllib.error.URLError, OSError) as exc:
        raise UserError(f"The weights of {name} could not be downloaded ({exc}); {hint}.") from None
    return path


# --------------------------------------------------------------------------- memory hints


def max_batch(name: str) -> int | None:
    """The most images a preset runs at once (None for every other backbone): a ViT-g's
    activations at the loader's batch could exhaust the machine's memory."""
    return PRESETS[name].batch_size if name in PRESETS else None


def peak_memory_estimate(name: str, batch: int) -> int:
    """Bytes of CPU memory one fp32 forward needs: runtime, weights and, per image, the live
    activations of one block (input, qkv, two attention maps, two MLP hidden maps) doubled
    as a margin for allocator slack and autocast copies: the basis of the presets' batch
    sizes, erring on the side of fitting."""
    spec = _spec(name)
    vit = _meta(name).vit
    size = spec.prep.input_size
    tokens = (size // vit.patch_embed.patch_size[0]) ** 2 + vit.num_prefix_tokens
    dim, heads = vit.embed_dim, vit.blocks[0].attn.num_heads
    hidden = vit.blocks[0].mlp.fc1.out_features
    per_image = 4 * (tokens * (6 * dim + 2 * hidden) + 2 * heads * tokens**2) * 2
    return RUNTIME_OVERHEAD + 4 * spec.params + batch * per_image
