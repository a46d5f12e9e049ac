"""How a batch goes through a frozen backbone: the compute mode.

The dtype is a rule, not a race: bf16 where the device has native bf16 kernels (emulated
bf16 is several times slower than fp32), fp32 elsewhere, and fp32 whenever the backbone's
bf16 features are not close to fp32 ones (per-image cosine below MIN_COSINE on a batch of
smooth colour fields). bf16 runs one fixed layout (folded, channels_last): its layouts round
differently, so timing them would make the features depend on a race. fp32 layouts (NCHW or
channels_last, batch norm folded or not) differ far below the fp16 the cache stores, so the
fastest is timed on one warm batch and kept in dispatch.json per machine, and they share one
feature space. On a GPU, fp32 is fp32: TF32 is switched off while a backbone runs.

The folded module is a copy: `Backbone.module` stays as built, for Grad-CAM and for the
batch-norm calibration of random inits.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import platform
import statistics
import time
import warnings
import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx, nn

from breakhis_tl.models.backbones import Backbone, freeze

log = logging.getLogger(__name__)

DISPATCH_FILE = "dispatch.json"  # under the cache folder the caller passes (data/cache)
MIN_COSINE = 0.995  # a low-precision mode's features against fp32 on the same batch, per image
DISPATCH_VERSION = 4  # in every dispatch key: bump when folding or the candidate list changes
PRECISIONS = ("auto", "fp32", "bf16")
_DTYPES = {"fp32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
BF16_FLAGS = {"avx512_bf16", "amx_bf16", "avx_ne_convert", "bf16"}  # x86 and Arm names
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")  # what a machine may be told to use


@dataclass(frozen=True)
class FastPath:
    """`autocast`: the lower-precision dtype or None (fp32); `cast`: weights and input cast
    to it once (the CPU's way: no per-call weight casts) instead of autocast (the GPU's);
    `folded`: batch norm and lite0's "same" padding folded into the convolutions."""

    autocast: torch.dtype | None = None
    channels_last: bool = False
    folded: bool = False
    cast: bool = False

    def describe(self) -> str:
        parts = [self.dtype + (" weights" if self.cast and self.autocast else "")]
        parts += [
            n for n, on in [("channels_last", self.channels_last), ("folded", self.folded)] if on
        ]
        return " + ".join(parts)

    @property
    def dtype(self) -> str:
        return str(self.autocast).replace("torch.", "") if self.autocast else "fp32"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "autocast": self.dtype}

    @classmethod
    def from_dict(cls, d: dict) -> FastPath:
        """Unknown keys (the TorchScript/compile flags of older heads) are dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in d.items() if k in known}
        return cls(**{**kept, "autocast": _DTYPES[d["autocast"]]})


PLAIN = FastPath()  # fp32 NCHW, unfolded: the reference every mode is checked against


def cpu_supports_bf16() -> bool:
    """Native bf16 arithmetic that oneDNN can use. oneDNN's own test also says yes on
    AVX512 CPUs without bf16 instructions, where it emulates bf16 slower than fp32."""
    onednn = _onednn_bf16()
    flags = set(cpu_info()[1])
    if not flags and platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86"):
        flags = _probed_x86_flags()  # no /proc/cpuinfo (Windows, macOS): torch's own probe
    elif not flags:
        return onednn  # Arm without readable flags: oneDNN decides
    return onednn and bool(BF16_FLAGS & flags)


def _onednn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _probed_x86_flags() -> set[str]:
    try:
        caps = torch._C._cpu._get_cpu_capability()
    except (AttributeError, RuntimeError):
        return set()
    return {k for k in BF16_FLAGS if caps.get(k)}


def cpu_info() -> tuple[str, list[str]]:
    """The CPU's model name and flags (/proc/cpuinfo; the platform's name elsewhere)."""
    name, flags = "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and not name:
                name = value
            elif key in ("flags", "Features") and not flags:
                flags = sorted(value.split())
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), flags


def machine_id(device: torch.device) -> str:
    """What a timing depends on besides the backbone: CPU model + a hash of its flags (two
    CPUs sold under one name differ in AVX512/AMX), the torch version, and the GPU."""
    name, flags = cpu_info()
    digest = hashlib.sha256(" ".join(flags).encode()).hexdigest()[:12]
    gpu = f" | {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    limits = [f"{k}={os.environ[k]}" for k in ISA_LIMITS if os.environ.get(k)]  # imitated CPUs
    return " | ".join([f"{name} flags:{digest}", *limits, f"torch {torch.__version__}",
                       f"{device.type}{gpu}"])  # fmt: skip


def low_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision this device has native kernels for, if any."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_supports_bf16() else None


def fast_path(device: torch.device, optimised: bool = True) -> FastPath:
    """The unmeasured default (no backbone at hand): folded channels_last, in the device's
    native low precision where it has one."""
    device = torch.device(device)
    if not optimised:
        return PLAIN
    if device.type == "mps":
        return FastPath(folded=True)
    low = low_dtype(device)
    return FastPath(low, True, folded=True, cast=low is not None and device.type == "cpu")


def candidates(device: torch.device, dtype: torch.dtype | None) -> list[FastPath]:
    """The layouts worth timing for one dtype on this device (one for a low precision)."""
    if device.type == "mps":
        return [PLAIN, FastPath(folded=True)]
    if dtype is not None:
        return [FastPath(dtype, True, True, cast=device.type == "cpu")]
    return [FastPath(None, cl, folded) for cl, folded in [(False, False), (True, False),
                                                          (True, True)]]  # fmt: skip


# ---------------------------------------------------------------- running

# original module -> {(device, path): runnable}; weak, so a dropped backbone frees its copies
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ORIGIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prepare(bb: Backbone, device: torch.device, path: FastPath) -> Backbone:
    """A Backbone whose module runs `path` on `device`, built once per original module; the
    original is moved to `device` and otherwise left as built."""
    device = torch.device(device)
    ref = _ORIGIN.get(bb.module)
    original = (ref() if ref is not None else None) or bb.module
    memo = _PREPARED.setdefault(original, {})
    key = (str(device), path)
    if key not in memo:
        original.to(device)
        memo[key] = _build(original, device, path)
        if memo[key] is not original:
            _ORIGIN[memo[key]] = weakref.ref(original)
    return dataclasses.replace(bb, module=memo[key])


def _build(module: nn.Module, device: torch.device, path: FastPath) -> nn.Module:
    if not (path.folded or path.channels_last or path.cast):
        return module
    m = fold_frozen(module) if path.folded else freeze(copy.deepcopy(module))
    m.to(device)
    if path.channels_last:
        m.to(memory_format=torch.channels_last)
    if path.cast and path.autocast:
        m.to(path.autocast)
    return m


def run_backbone(bb: Backbone, x: torch.Tensor, path: FastPath) -> torch.Tensor:
    """Normalised float batch -> fp32 features, on the batch's device."""
    module = prepare(bb, x.device, path).module
    if path.cast and path.autocast:
        x = x.to(path.autocast)
    if path.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    use_autocast = path.autocast is not None and not path.cast
    tf32 = torch.backends.cudnn.flags(enabled=True, allow_tf32=False) if (
        x.device.type == "cuda" and path.autocast is None) else nullcontext()  # fmt: skip
    with torch.inference_mode(), tf32, torch.autocast(x.device.type, path.autocast, use_autocast):
        return module(x).float()


def fold_frozen(module: nn.Module) -> nn.Module:
    """A frozen copy with batch norms (torch.fx `fuse`) and lite0's static "same" padding
    folded into the convolutions: a separate pad writes a padded copy of every input. A
    module torch.fx cannot trace keeps its batch norms."""
    from torch.fx.experimental.optimization import fuse

    work = _unpad_same(copy.deepcopy(module))
    work.__dict__.pop("train", None)  # freeze()'s lambda would return the original module
    nn.Module.train(work, False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = fx.symbolic_trace(work)
            mods = dict(traced.named_modules())
            calls = [n.target for n in traced.graph.nodes if n.op == "call_module"]
            convs = [t for t in calls if isinstance(mods[t], (nn.Conv2d, nn.Linear))]
            if len(convs) != len(set(convs)):  # fuse() would fold one call's norm into all
                raise ValueError("a convolution is called more than once")
            work = _inplace_activations(fuse(traced, inplace=True, no_trace=True))
    except Exception as exc:  # noqa: BLE001 - torch.fx raises many types; unfolded still works
        log.info("Batch norm not folded (%s: %s).", type(module).__name__, exc)
    return freeze(work)


_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Hardswish)
_FRESH = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)  # each call returns a new tensor


def _inplace_activations(gm: fx.GraphModule) -> fx.GraphModule:
    """Activations that overwrite their input where it is a convolution's (or norm's) fresh
    output that nothing else reads, at every call of the module (a view would alias another
    tensor): lite0's ReLU6 otherwise writes each convolution's output a second time."""
    mods = dict(gm.named_modules())
    safe: dict[str, bool] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(mods[n.target], _ACTIVATIONS):
            arg = n.args[0]
            fresh = isinstance(arg, fx.Node) and arg.op == "call_module"
            ok = fresh and isinstance(mods[arg.target], _FRESH) and len(arg.users) == 1
            safe[n.target] = safe.get(n.target, True) and ok
    for target, ok in safe.items():
        if ok:
            mods[target].inplace = True
    return gm


def _unpad_same(module: nn.Module) -> nn.Module:
    """efficientnet_lite_pytorch pads (left, right, top, bottom) before each conv: a conv
    padding max(left, right) per axis for itself, its kernel widened by zero taps on the side
    that got less, reads the same pixels with the same weights (dilation 1 only)."""
    try:
        from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding as Same
    except ImportError:
        return module
    for name, c in list(module.named_children()):
        if not (isinstance(c, Same) and tuple(c.dilation) == (1, 1) and not any(c.padding)):
            _unpad_same(c)
            continue
        left, right, top, bottom = getattr(c.static_padding, "padding", (0, 0, 0, 0))
        w, (kh, kw) = c.weight.detach(), c.kernel_size
        wide = w.new_zeros(*w.shape[:2], kh + abs(top - bottom), kw + abs(left - right))
        h0 = abs(top - bottom) if bottom > top else 0  # zero taps where less was padded
        w0 = abs(left - right) if right > left else 0
        wide[:, :, h0 : h0 + kh, w0 : w0 + kw] = w
        conv = nn.Conv2d(
            c.in_channels,
            c.out_channels,
            tuple(wide.shape[2:]),
            c.stride,
            (max(top, bottom), max(left, right)),
            1,
            c.groups,
            c.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(wide)
            if c.bias is not None:
                conv.bias.copy_(c.bias)
        setattr(module, name, conv.eval())
    return module


# ---------------------------------------------------------------- choosing


def time_interleaved(fns: dict, rounds: int = 5, sync=None) -> dict[str, list[float]]:
    """Seconds per call of each function, `rounds` times, in rotating order: on a shared
    machine the load drifts, and rotation spreads the drift over every candidate alike."""
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            if sync:
                sync()
            out[name].append(time.perf_counter() - t0)
    return out


def cosine_min(ref: torch.Tensor, out: torch.Tensor) -> float:
    """The worst per-image cosine, scale-free: a random-init efficientnet_b0's features are
    ~1e-13, below the norm floor of torch's cosine_similarity. A zero or non-finite feature
    vector scores 0 (two zero vectors: 1)."""
    ref, out = (v.detach().cpu().double().flatten(1) for v in (ref, out))
    unit = [v / v.norm(dim=1, keepdim=True) for v in (ref, out)]
    cos = torch.nan_to_num((unit[0] * unit[1]).sum(dim=1), nan=0.0)
    both_zero = (ref.abs().amax(dim=1) == 0) & (out.abs().amax(dim=1) == 0)
    return float(torch.where(both_zero, 1.0, cos).min())


def low_precision_agrees(bb: Backbone, x: torch.Tensor, path: FastPath) -> float:
    """The worst per-image cosine of `path`'s features to fp32 ones on the batch `x`."""
    return cosine_min(run_backbone(bb, x, PLAIN), run_backbone(bb, x, path))


def choose(
    bb: Backbone,
    device: torch.device,
    precision: str = "auto",
    cache_dir: str | Path | None = None,
    batch: torch.Tensor | None = None,
    rounds: int = 3,
) -> FastPath:
    """This backbone's mode here: the dtype by rule (see the module docstring; `fp32` and
    `bf16` force one), the fastest layout of it by measurement; kept in dispatch.json."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    device = torch.device(device)
    key = dispatch_key(bb, device, precision)
    if cached := _read_cache(cache_dir).get(key):
        path = FastPath.from_dict(cached["path"])
        log.info(
            "Compute mode for %s on %s: %s (cached in %s).",
            bb.name,
            device,
            path.describe(),
            Path(cache_dir) / DISPATCH_FILE,
        )
        return path
    x = (batch if batch is not None else synthetic_batch(bb, n=4)).to(device)
    dtype = _asked_dtype(device, precision, bb.name)
    if dtype is not None and precision == "auto":
        cosine = low_precision_agrees(bb, x, candidates(device, dtype)[-1])
        if cosine < MIN_COSINE:
            log.warning(
                "%s features of %s differ from fp32 (worst cosine %.4f < %s): running fp32.",
                dtype,
                bb.name,
                cosine,
                MIN_COSINE,
            )
            dtype = None
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    paths = candidates(device, dtype)
    fns = {p: (lambda p=p: run_backbone(bb, x, p)) for p in paths}
    for fn in fns.values():
        fn()  # first call: folding, oneDNN's weight reorders
    times = {p: statistics.median(t) for p, t in time_interleaved(fns, rounds, sync).items()}
    best = min(paths, key=times.get)
    _write_cache(cache_dir, key, best, {p.describe(): len(x) / t for p, t in times.items()})
    log.info(
        "Compute mode for %s on %s: %s (measured images/s: %s).",
        bb.name,
        device,
        best.describe(),
        ", ".join(f"{p.describe()} {len(x) / t:.1f}" for p, t in times.items()),
    )
    return best


def _asked_dtype(device: torch.device, precision: str, name: str) -> torch.dtype | None:
    if precision == "fp32" or device.type == "mps":
        return None
    low = low_dtype(device)
    if precision == "bf16" and low != torch.bfloat16:
        log.warning(
            "bf16 was asked for %s, but this %s has no native bf16 kernels: it runs "
            "emulated, slower than fp32.",
            name,
            device.type,
        )
        return torch.bfloat16
    return low


def synthetic_batch(bb: Backbone, n: int = 8, seed: int = 0) -> torch.Tensor:
    """A normalised batch of smooth random colour fields, for when no image is at hand."""
    from breakhis_tl.data.transforms import normalize

    g = torch.Generator().manual_seed(seed)
    s = bb.prep.input_size
    small = torch.randint(0, 256, (n, 3, max(s // 16, 1), max(s // 16, 1)), generator=g)
    big = nn.functional.interpolate(small.float(), size=(s, s), mode="bilinear")
    return normalize(big.clamp(0, 255), bb.prep)


def dispatch_key(bb: Backbone, device: torch.device, precision: str) -> str:
    """Machine, backbone + weights kind, input size, precision and DISPATCH_VERSION; random
    inits count as one weights kind (speed does not depend on the seed)."""
    weights = "none" if bb.weights_id.startswith("none-") else bb.weights_id
    return (
        f"{machine_id(device)} | {bb.name} | {weights} | {bb.prep.input_size}px | "
        f"{precision} | v{DISPATCH_VERSION}"
    )


def _read_cache(cache_dir: str | Path | None) -> dict:
    if cache_dir is None:
        return {}
    try:
        return json.loads((Path(cache_dir) / DISPATCH_FILE).read_text())
    except (OSError, ValueError):
        return {}  # absent or unreadable: measure again (and rewrite it)


def _write_cache(cache_dir, key: str, best: FastPath, measured: dict) -> None:
    """Read-modify-replace, so a reader never sees half a file; two processes writing at
    once may lose one entry, which is then measured again."""
    if cache_dir is None:
        return
    folder = Path(cache_dir)
    data = _read_cache(folder)
    data[key] = {"path": best.to_dict(), "mode": best.describe(), "images_per_s": measured}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{DISPATCH_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, folder / DISPATCH_FILE)
    except OSError as err:  # a read-only or foreign folder: measured again next time
        log.warning("Could not keep the compute mode in %s (%s).", folder / DISPATCH_FILE, err)
