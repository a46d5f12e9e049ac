"""Named transform presets and the eight label-preserving views of a square crop.

Decoding (resize + center crop to uint8) is split from normalisation, so one decoded batch
serves every backbone with the same input size, whatever its mean and std; `DecodeSizes`
resizes one decode to every input size a run needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torchvision.transforms import v2

N_VIEWS = 8  # the dihedral group of the square: 4 rotations x optional flip

INTERPOLATIONS = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}


@dataclass(frozen=True)
class Preprocessing:
    input_size: int = 224
    resize_size: int = 224  # shorter side before the center crop; equal keeps the most tissue
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    def decode_key(self) -> tuple:
        """What decoding depends on: backbones sharing it share one decode per image."""
        return (self.input_size, self.resize_size, self.interpolation)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            input_size=int(d["input_size"]),
            resize_size=int(d["resize_size"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            interpolation=str(d["interpolation"]),
        )


def decode_transform(prep: Preprocessing) -> Callable:
    """PIL image to a uint8 tensor [3, S, S]; small images are upscaled by the resize."""
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(
                prep.resize_size, interpolation=INTERPOLATIONS[prep.interpolation], antialias=True
            ),
            v2.CenterCrop(prep.input_size),
        ]
    )


class DecodeSizes:
    """PIL image to one uint8 tensor [3, S, S] per preprocessing: the pixels are read once
    and each size resized from them, so backbones of different input sizes share a decode."""

    def __init__(self, preps: list[Preprocessing]) -> None:
        self.sizes = [v2.Compose(decode_transform(p).transforms[1:]) for p in preps]

    def __call__(self, im) -> tuple[torch.Tensor, ...]:
        x = v2.functional.pil_to_tensor(im)
        return tuple(size(x) for size in self.sizes)


def normalize(x: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 [.., 3, H, W] to the float input a backbone expects."""
    mean = torch.tensor(prep.mean, device=x.device).view(3, 1, 1)
    std = torch.tensor(prep.std, device=x.device).view(3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """View k of 8 of the square image(s) x: rotation by 90 x (k % 4), then a flip if k >= 4."""
    if not 0 <= k < N_VIEWS:
        raise ValueError(f"view {k} is not one of 0..{N_VIEWS - 1}")
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


class RandomDihedral(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dihedral(x, int(torch.randint(N_VIEWS, ())))


def eval_preset(prep: Preprocessing) -> Callable:
    decode = decode_transform(prep)
    return lambda im: normalize(decode(im), prep)


def train_preset(prep: Preprocessing) -> Callable:
    """Online augmentation for end-to-end training: the views plus mild colour jitter."""
    decode = decode_transform(prep)
    augment = v2.Compose(
        [RandomDihedral(), v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02)]
    )
    return lambda im: normalize(augment(decode(im)), prep)
