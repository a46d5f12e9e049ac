"""Folding away what a frozen backbone never changes, on a copy.

Three rewrites, exact in eval mode up to fp32 rounding (SiLU/Hardswish in bf16: one step):
- batch norm after a convolution goes into the convolution's weights (torch.fx `fuse`);
- efficientnet_lite0's static "same" padding goes into the convolution: the symmetric part
  becomes the conv's own padding, and an asymmetric stride-2 remainder becomes zero taps at
  the start of a one-wider kernel (dilation 1 only), so no padded copy of the input is
  ever written (a separate pad cost 14-18% of a lite0 batch and made its next conv 5x slower);
- a ReLU, ReLU6, SiLU or Hardswish (module or function) after a convolution runs inside
  it: on the CPU, oneDNN applies it as the convolution writes its output
  (`mkldnn._convolution_pointwise`, the kernel torch's own inductor emits for this pattern)
  instead of a second pass over memory (26% of a lite0 batch). In bf16 the activation is
  applied before rounding, so it can differ from the unfused op by one bf16 step. Elsewhere,
  under autocast, or in bf16 on a CPU oneDNN has no bf16 convolution for, the two run in turn.

Bump features.FEATURES_VERSION when a rewrite here changes any feature value.
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import fx, nn

from breakhis_tl.backbones import freeze

log = logging.getLogger(__name__)


def fold_frozen(module: nn.Module) -> nn.Module:
    """A frozen copy with batch norms, "same" padding and activations folded into the
    convolutions; the original is not touched. A module torch.fx cannot trace keeps its
    batch norms and activations (the padding is still folded)."""
    from torch.fx.experimental.optimization import fuse

    work = _unpad_same(copy.deepcopy(module))
    work.__dict__.pop("train", None)  # freeze()'s lambda would return the original module
    nn.Module.train(work, False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = fx.symbolic_trace(work)
            if shared := _shared_layers(traced):  # fuse() would fold one call's norm into all
                raise ValueError(f"layers called more than once: {', '.join(shared)}")
            folded = _fuse_activations(fuse(traced, inplace=True, no_trace=True))
    except Exception as exc:  # noqa: BLE001 - torch.fx raises many types; unfolded still works
        log.info("Not folded (%s: %s).", type(module).__name__, exc)
        folded = work
    return freeze(folded)


def _calls(gm: fx.GraphModule) -> dict[str, int]:
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def _shared_layers(gm: fx.GraphModule) -> list[str]:
    mods, kinds = dict(gm.named_modules()), (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    return [t for t, n in _calls(gm).items() if n > 1 and isinstance(mods[t], kinds)]


# ---------------------------------------------------------------- "same" padding


def _unpad_same(module: nn.Module) -> nn.Module:
    """Replace efficientnet_lite_pytorch's Conv2dStaticSamePadding (a ZeroPad2d before
    every conv) by a plain Conv2d that pads for itself."""
    try:
        from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding
    except ImportError:
        return module
    for name, child in list(module.named_children()):
        if isinstance(child, Conv2dStaticSamePadding) and _widenable(child):
            setattr(module, name, _plain_conv(child))
        else:
            _unpad_same(child)
    return module


def _widenable(c: nn.Conv2d) -> bool:
    """A zero tap shifts the input by the dilation, so only dilation 1 maps exactly; and the
    conv must not pad for itself as well (lite0's never do)."""
    return tuple(c.dilation) == (1, 1) and not any(c.padding) and c.padding_mode == "zeros"


def _plain_conv(c: nn.Conv2d) -> nn.Conv2d:
    """Pads (left, right, top, bottom) -> a conv with symmetric padding max(left, right)
    per axis, its kernel widened by |left - right| zero taps on the side that got less
    padding: output k reads the same input pixels with the same weights, plus zeros."""
    left, right, top, bottom = getattr(c.static_padding, "padding", (0, 0, 0, 0))
    weight = c.weight.detach()
    (kh, kw), extra = c.kernel_size, (abs(top - bottom), abs(left - right))
    wide = weight.new_zeros(*weight.shape[:2], kh + extra[0], kw + extra[1])
    h0 = extra[0] if bottom > top else 0  # zero taps first where the top got less padding
    w0 = extra[1] if right > left else 0
    wide[:, :, h0 : h0 + kh, w0 : w0 + kw] = weight
    conv = nn.Conv2d(c.in_channels, c.out_channels, tuple(wide.shape[2:]), c.stride,
                     (max(top, bottom), max(left, right)), c.dilation, c.groups,
                     c.bias is not None, device=weight.device, dtype=weight.dtype)  # fmt: skip
    with torch.no_grad():
        conv.weight.copy_(wide)
        if c.bias is not None:
            conv.bias.copy_(c.bias)
    return conv.eval()


# ---------------------------------------------------------------- activations


# activation module -> oneDNN post-op name (ReLU6 is a Hardtanh(0, 6))
_POST_OPS = {nn.ReLU: "relu", nn.Hardtanh: "hardtanh", nn.ReLU6: "hardtanh", nn.SiLU: "swish",
             nn.Hardswish: "hardswish"}  # fmt: skip
# the same activations called as functions (inception_v3's BasicConv2d calls F.relu)
_FUNCTIONS = {nn.functional.relu: nn.ReLU, torch.relu: nn.ReLU, nn.functional.relu6: nn.ReLU6,
              nn.functional.silu: nn.SiLU, nn.functional.hardswish: nn.Hardswish}  # fmt: skip


class ConvAct(nn.Module):
    """A convolution and the activation after it, as one oneDNN kernel on the CPU."""

    def __init__(self, conv: nn.Conv2d, act: nn.Module):
        super().__init__()
        self.conv, self.act = conv, act
        self.attr, self.scalars = _POST_OPS[type(act)], []
        if isinstance(act, nn.Hardtanh):
            self.scalars = [float(act.min_val), float(act.max_val)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if not _fusable(x, c):
            return self.act(c(x))
        return torch.ops.mkldnn._convolution_pointwise(
            x, c.weight, c.bias, c.padding, c.stride, c.dilation, c.groups,
            self.attr, self.scalars, "",
        )  # fmt: skip


def _has_fused_kernel() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(
            torch.ops.mkldnn, "_convolution_pointwise"
        )
    except (AttributeError, RuntimeError):
        return False


def _has_bf16_kernel() -> bool:
    """oneDNN's bf16 convolution needs avx512bw/vl/dq or avx_ne_convert (not plain AVX2)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_FUSED_KERNEL = _has_fused_kernel()
_BF16_KERNEL = _FUSED_KERNEL and _has_bf16_kernel()


def _fusable(x: torch.Tensor, c: nn.Conv2d) -> bool:
    """The oneDNN kernel takes CPU fp32/bf16 with matching weights and numeric padding;
    under autocast its inputs would not be cast, and TorchScript cannot trace its scalar
    list, so the plain ops run there (the frozen graph fuses what oneDNN lets it)."""
    return (
        _FUSED_KERNEL
        and torch.backends.mkldnn.enabled
        and not torch.jit.is_tracing()
        and x.device.type == "cpu"
        and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _BF16_KERNEL))
        and x.dtype == c.weight.dtype
        and c.padding_mode == "zeros"
        and not isinstance(c.padding, str)
        and not torch.is_autocast_enabled("cpu")
    )


def _fuse_activations(gm: fx.GraphModule) -> fx.GraphModule:
    """Every Conv2d called once whose only user is an activation oneDNN can apply becomes a
    ConvAct; the activation's node is removed from the graph."""
    mods, calls = dict(gm.named_modules()), _calls(gm)
    for node in list(gm.graph.nodes):
        act = _activation(node, mods)
        src = node.args[0] if act is not None and node.args else None
        if not (isinstance(src, fx.Node) and src.op == "call_module"
                and type(mods[src.target]) is nn.Conv2d and len(src.users) == 1
                and calls[src.target] == 1):  # fmt: skip
            continue
        parent, _, name = src.target.rpartition(".")
        setattr(gm.get_submodule(parent), name, ConvAct(mods[src.target], act))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def _activation(node: fx.Node, mods: dict) -> nn.Module | None:
    """The activation `node` applies, as a module, if oneDNN can fuse it; else None."""
    if node.op == "call_module" and type(mods[node.target]) in _POST_OPS:
        return mods[node.target]
    if node.op == "call_function" and node.target in _FUNCTIONS and len(node.args) == 1:
        if set(node.kwargs) <= {"inplace"}:  # in place or not, the values are the same
            return _FUNCTIONS[node.target]()
    return None
