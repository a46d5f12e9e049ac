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

from breakhis_tl.data.images import ImageError, as_rgb
from breakhis_tl.data.index import BREAKHIS_NAME, IDC_CLASSES, IDC_NAME, SUBTYPES
from breakhis_tl.data.transforms import N_VIEWS, decode_transform, normalize
from breakhis_tl.errors import UserError
from breakhis_tl.report.plots import mag_label, save_figure

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


def true_class(name: str) -> dict | None:
    """What the file name says about an image: BreakHis gives the label and subtype code, IDC
    the class (class0 = non_idc, class1 = idc); None for any other name."""
    base = Path(name).name
    m = BREAKHIS_NAME.match(base)
    if m:
        code = m["subtype"].upper()
        label = "benign" if m["bm"].upper() == "B" else "malignant"
        return {"label": label, "subtype": code, "magnification": int(m["mag"])}
    m = IDC_NAME.match(base)
    if m:
        return {"label": IDC_CLASSES[int(m["cls"])]}
    return None


def caption(
    name: str, classes: list[str], probs: np.ndarray, tta: bool = False
) -> tuple[str, bool | None]:
    """`predicted: malignant (p = 0.93) | true: malignant, DC (ductal carcinoma), 40X` and
    whether the prediction is right (None where the name does not tell). Under `tta` the
    probability is the mean over the 8 views, as predictions.csv gives it, and says so."""
    k = int(np.argmax(probs))
    mean = f", mean of {N_VIEWS} views" if tta else ""
    text = f"predicted: {classes[k]} (p = {probs[k]:.2f}{mean})"
    truth = true_class(name)
    if truth is None:
        return text + " | true class unknown", None
    sub = truth.get("subtype")
    shown = truth["label"] + (
        f", {sub} ({SUBTYPES.get(sub, '?').replace('_', ' ')})" if sub else ""
    )
    if "magnification" in truth:
        shown += f", {mag_label(truth['magnification'])}"
    actual = sub if sub in classes else truth["label"]
    return f"{text} | true: {shown}", (classes[k] == actual if actual in classes else None)


def cam_figure(rgb: np.ndarray, heat: np.ndarray, title: str, correct: bool | None):
    """The model's input crop beside the Grad-CAM overlay, with a colour bar for the heat
    scale, so the tissue under a hot spot can be seen without the overlay hiding it."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(7.6, 4.0), gridspec_kw={"wspace": 0.05})
    axes[0].imshow(rgb)
    axes[0].set_title(f"input crop ({rgb.shape[1]} px)", fontsize=9)
    axes[1].imshow(rgb)
    shown = axes[1].imshow(heat, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
    axes[1].set_title("Grad-CAM of the predicted class", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    bar = fig.colorbar(shown, ax=list(axes), fraction=0.025, pad=0.02)
    bar.set_label("relevance (0 = none, 1 = highest)", fontsize=8)
    colour = {True: "darkgreen", False: "firebrick", None: "black"}[correct]
    fig.suptitle(title, fontsize=9, color=colour)
    return fig


def save_cams(clf, items: list, out_dir: Path, tta: bool = False) -> list[Path]:
    """One PNG per readable image (`<name>_cam.png`): input crop, Grad-CAM overlay of the
    predicted class with a colour bar, the predicted class and probability, and the true
    class where the file name gives it. `tta` as given to `predict`: the title's class and
    probability are then the mean over the 8 views that predictions.csv reports, and the
    map (of the image as it is) explains that class."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

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
            im, _ = clf.stain.normaliser.apply(im, str(item))  # as predict sees it
            x8 = decode(im)
            # the probabilities `predict` gives (same path and precision), and the CAM of
            # that class, so the figure never disagrees with predictions.csv
            probs = clf._probs(x8[None].to(clf.device), tta)[0].numpy()
            x = normalize(x8, clf.prep)[None].to(clf.device)
            target = [ClassifierOutputTarget(int(probs.argmax()))]
            with torch.enable_grad():
                heat = cam(input_tensor=x, targets=target)[0]
            name = f"image{i}" if isinstance(item, Image.Image) else Path(item).stem
            title, correct = caption(name + ".png", clf.classes, probs, tta)
            fig = cam_figure(x8.permute(1, 2, 0).numpy(), heat, f"{name}\n{title}", correct)
            written.append(save_figure(fig, out_dir / f"{name}_cam.png"))
    return written
