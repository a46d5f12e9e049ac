"""Grad-CAM heat maps through the frozen backbone and the head together (pytorch-grad-cam).

The backbone's weights stay frozen: gradients flow to the activations of its last conv
feature map only (the input is marked as needing a gradient, so nothing is unfrozen).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from breakhis_tl.errors import UserError
from breakhis_tl.images import ImageError, as_rgb
from breakhis_tl.transforms import decode_transform, normalize

log = logging.getLogger(__name__)


def target_layer(arch: str, module: nn.Module) -> nn.Module:
    """The last convolutional feature map of a CNN backbone; an error for the others."""
    if arch in ("efficientnet_lite0", "vgg16"):
        return module.trunk  # _Pooled: the trunk's output is the last feature map
    layers = {
        "resnet50": lambda m: m.layer4,
        "densenet121": lambda m: m.features,
        "inception_v3": lambda m: m.Mixed_7c,
        "mobilenet_v2": lambda m: m.features,
        "efficientnet_b0": lambda m: m.features,
        "convnext_tiny": lambda m: m.features,
    }
    if arch not in layers:
        raise UserError(
            f"Grad-CAM needs a convolutional feature map; {arch} has none that it supports "
            "(vision transformers and timm models are not covered)."
        )
    return layers[arch](module)


class _Full(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        return self.head(self.backbone(x))


def save_cams(clf, items: list, out_dir: Path) -> list[Path]:
    """One PNG overlay per readable image (`<name>_cam.png`), of the predicted class."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image

    layer = target_layer(clf.meta["arch"], clf.backbone.module)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"Cannot write Grad-CAM images to {out_dir} ({exc.strerror}).") from None
    model = _Full(clf.backbone.module, clf.head).float()
    decode = decode_transform(clf.prep)
    written = []
    with GradCAM(model=model, target_layers=[layer]) as cam:
        cam.compute_input_gradient = True  # gradients reach the frozen feature map this way
        for i, item in enumerate(items):
            try:
                im = as_rgb(item)
            except ImageError as exc:
                log.warning("No Grad-CAM for it: %s", exc)
                continue
            x8 = decode(im)
            x = normalize(x8, clf.prep)[None].to(clf.device)
            with torch.enable_grad():
                heat = cam(input_tensor=x, targets=None)[0]  # None: the predicted class
            rgb = x8.permute(1, 2, 0).numpy().astype(np.float32) / 255.0
            overlay = show_cam_on_image(rgb, heat, use_rgb=True)
            name = f"image{i}" if isinstance(item, Image.Image) else Path(item).stem
            path = out_dir / f"{name}_cam.png"
            Image.fromarray(overlay).save(path)
            written.append(path)
    return written
