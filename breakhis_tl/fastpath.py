"""How a batch goes through a frozen backbone, chosen by measurement and cached per machine.

A frozen backbone never changes, so what only serves training is folded away once
(folding.py: batch norm, "same" padding and ReLU-type activations into the convolutions).
Which compute mode is fastest (fp32 or bf16, NCHW or channels_last, eager or a frozen
TorchScript graph) depends on the CPU or GPU, the torch version and the backbone; guessing
was wrong before (bf16 is 5x slower on an AVX2-only EPYC and 2-4x faster where AVX512-BF16
exists), so `choose` times the candidates on one warm batch, interleaved and repeated,
checks each against fp32, and caches the decision.

The folded module is a copy: `Backbone.module` stays as built, for Grad-CAM (cam.py) and
for anything that changes batch-norm statistics (calibration) before extraction.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch
from torch import nn

from breakhis_tl.backbones import Backbone, freeze
from breakhis_tl.folding import fold_frozen

log = logging.getLogger(__name__)

DISPATCH_FILE = "dispatch.json"  # under the cache folder the caller passes (data/cache)
MIN_COSINE = 0.995  # a candidate's features against fp32 NCHW on the same batch, per image
RETIME_WITHIN = 0.15  # modes this much slower than the fastest are timed again before picking
DISPATCH_VERSION = 2  # in every dispatch key: bump when folding or the candidate list changes
# a traced/compiled graph must beat the eager mode by this much: on one batch its wins are
# within noise (convnext_tiny's jit "won" in choose and ran 13% slower in the benchmark)
GRAPH_MARGIN = 0.05
REALISTIC_IMAGES = 8000  # BreakHis has 7,909: a setup cost is spread over this many images
_DTYPES = {"fp32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class FastPath:
    """How a batch goes through a backbone. `autocast`: the lower-precision dtype or None
    (fp32); `cast`: apply that dtype by casting weights and input once instead of autocast
    (no per-call weight casts); `folded`: run `fold_frozen`'s copy; `jit`: a frozen,
    oneDNN-optimised TorchScript trace of it (conv + activation fusion); `compiled`:
    torch.compile (inductor, weights frozen, any batch size) of it."""

    autocast: torch.dtype | None = None
    channels_last: bool = False
    folded: bool = False
    cast: bool = False
    jit: bool = False
    compiled: bool = False

    def describe(self) -> str:
        """Stable text for the feature-cache key and head metadata (features differ by
        mode); the two fields of the old FastPath keep their old text."""
        parts = [self.dtype + (" weights" if self.cast and self.autocast else "")]
        parts += [n for n, on in [("channels_last", self.channels_last),
                                  ("folded", self.folded), ("jit", self.jit),
                                  ("compiled", self.compiled)] if on]  # fmt: skip
        return " + ".join(parts)

    @property
    def dtype(self) -> str:
        return str(self.autocast).replace("torch.", "") if self.autocast else "fp32"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "autocast": self.dtype}

    @classmethod
    def from_dict(cls, d: dict) -> FastPath:
        return cls(**{**d, "autocast": _DTYPES[d["autocast"]]})


PLAIN = FastPath()  # fp32 NCHW, unfolded: the reference every candidate is checked against


BF16_FLAGS = {"avx512_bf16", "amx_bf16", "avx_ne_convert", "bf16"}  # x86 and Arm names


def cpu_supports_bf16() -> bool:
    """Native bf16 arithmetic (AVX512-BF16, AMX, AVX-NE-CONVERT, Arm BF16) that oneDNN can
    use. oneDNN's own test also says yes on AVX512 CPUs without bf16 instructions, where it
    emulates bf16 and runs it about 2x slower than fp32 (measured under
    ONEDNN_MAX_CPU_ISA=AVX512_CORE); on AVX2 alone it is 4-6x slower. Where no flags can
    be read (Windows, macOS), torch's own CPU probe answers on x86, and oneDNN's on Arm."""
    onednn = _onednn_bf16()
    flags = set(cpu_info()[1])
    if not flags and platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86"):
        flags = _probed_x86_flags()  # unknown: emulated bf16 is the likelier case
    elif not flags:
        return onednn
    return onednn and bool(BF16_FLAGS & flags)


def _onednn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _probed_x86_flags() -> set[str]:
    """bf16 flags from torch's cpuinfo probe (torch >= 2.3), under /proc/cpuinfo's names."""
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
    gpu = ""
    if device.type == "cuda":
        gpu = f" | {torch.cuda.get_device_name(device)}"
    return f"{name} flags:{digest} | torch {torch.__version__} | {device.type}{gpu}"


def fast_path(device: torch.device, optimised: bool = True) -> FastPath:
    """The unmeasured default (no backbone at hand): folded + channels_last, with bf16
    (fp16 on old GPUs) where the hardware has kernels for it: autocast on a GPU, cast
    weights on a CPU (faster in every measurement here). `choose` measures."""
    if not optimised:
        return PLAIN
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return FastPath(dtype, True, folded=True)
    if device.type == "cpu":  # bf16 weights: no per-call casts, and folded ReLUs fuse
        bf16 = cpu_supports_bf16()
        return FastPath(torch.bfloat16 if bf16 else None, True, folded=True, cast=bf16)
    return FastPath(folded=True)


def candidates(device: torch.device, compile: bool = False) -> list[FastPath]:
    """The modes worth timing here; bf16 only where kernels exist (emulated bf16 is never
    the fastest and takes minutes to time on a big backbone). `compile` adds torch.compile
    modes: 2x on lite0 here, but 30-90 s to compile each, so timing them is opt-in."""
    fp32 = [PLAIN, FastPath(None, True), FastPath(None, True, folded=True)]
    if device.type == "mps":
        return [PLAIN, FastPath(folded=True)]
    low = None
    if device.type == "cuda":
        low = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif cpu_supports_bf16():
        low = torch.bfloat16
    if device.type == "cpu":
        fp32.append(FastPath(None, True, folded=True, jit=True))
    lows = []
    if low is not None:
        lows = [FastPath(low, True, folded=True), FastPath(low, True, folded=True, cast=True)]
        if device.type == "cpu":
            lows.append(FastPath(low, True, folded=True, cast=True, jit=True))
    if compile:
        fp32.append(FastPath(None, True, folded=True, compiled=True))
        lows += [FastPath(low, True, folded=True, cast=True, compiled=True)] if low else []
    return fp32 + lows


# ---------------------------------------------------------------- running


# original module -> {(device, path): runnable, None = the original itself}; and each
# runnable -> its original. Weak, so a dropped backbone frees its copies.
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ORIGIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _original(module: nn.Module) -> nn.Module:
    ref = _ORIGIN.get(module)
    return (ref() if ref is not None else None) or module


def prepare(bb: Backbone, device: torch.device, path: FastPath) -> Backbone:
    """A Backbone whose module is the runnable for `path` on `device`; the original module
    is moved to `device` (Grad-CAM runs through it) and otherwise left as built. Built once
    per original module, device and path: `run_backbone` on the original backbone, or on
    any backbone `prepare` returned, finds it."""
    device = torch.device(device)
    original = _original(bb.module)
    memo = _PREPARED.setdefault(original, {})
    key = (str(device), path)
    if key not in memo:
        original.to(device)
        runnable = _build(dataclasses.replace(bb, module=original), device, path)
        memo[key] = None if runnable is original else runnable
        if runnable is not original:
            _ORIGIN[runnable] = weakref.ref(original)  # weak: a dropped backbone is freed
    runnable = memo[key]
    return dataclasses.replace(bb, module=original if runnable is None else runnable)


def _build(bb: Backbone, device: torch.device, path: FastPath) -> nn.Module:
    if not (path.folded or path.channels_last or path.cast or path.jit or path.compiled):
        return bb.module
    m = fold_frozen(bb.module) if path.folded else freeze(copy.deepcopy(bb.module))
    m.to(device)
    if path.channels_last:
        m.to(memory_format=torch.channels_last)
    if path.cast and path.autocast:
        m.to(path.autocast)
    if path.jit:
        m = _jit(m, _example(bb, device, path))
    if path.compiled:
        m = _compile(m, _example(bb, device, path))
    return m


def _compile(m: nn.Module, x: torch.Tensor) -> nn.Module:
    """Inductor with the weights frozen as constants (conv-bn-activation fusion, weight
    prepacking); compiled here, on the example, for any batch size (no recompiles)."""
    import torch._inductor.config as inductor

    compiled = torch.compile(m, dynamic=True)
    with inductor.patch(freezing=True), torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled(x)
    return compiled


def _jit(m: nn.Module, x: torch.Tensor) -> nn.Module:
    """A traced, frozen graph that oneDNN optimises (conv + bias + activation fused)."""
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(m, x, check_trace=False)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))


def _example(bb: Backbone, device: torch.device, path: FastPath, n: int = 2) -> torch.Tensor:
    s = bb.prep.input_size
    return _as_input(torch.zeros(n, 3, s, s, device=device), path)


def _as_input(x: torch.Tensor, path: FastPath) -> torch.Tensor:
    if path.cast and path.autocast:
        x = x.to(path.autocast)
    return x.contiguous(memory_format=torch.channels_last) if path.channels_last else x


def run_backbone(bb: Backbone, x: torch.Tensor, path: FastPath) -> torch.Tensor:
    """Normalised float batch -> fp32 features, on the batch's device. `bb` is the built
    backbone or what `prepare` returned; the runnable is built on first use if needed."""
    module = prepare(bb, x.device, path).module
    autocast = path.autocast is not None and not path.cast
    ctx = torch.autocast(x.device.type, dtype=path.autocast) if autocast else nullcontext()
    with torch.inference_mode(), ctx:
        return module(_as_input(x, path)).float()


# ---------------------------------------------------------------- choosing


@dataclass
class Trial:
    """One candidate's measurement: seconds per batch over the rounds, its one-off setup
    (folding, tracing, first-call optimisation) and its worst per-image cosine to fp32."""

    path: FastPath
    seconds: list[float]
    setup_s: float
    cosine: float
    images: int

    def per_image(self) -> float:
        return statistics.median(self.seconds) / self.images

    def cost(self, images: int) -> float:
        """Seconds for `images` images, setup included: a mode that is faster per batch
        but slow to set up loses where it does not pay back."""
        return self.setup_s + images * self.per_image()

    def to_dict(self) -> dict:
        med = statistics.median(self.seconds)
        return {"mode": self.path.describe(), "images_per_s": self.images / med,
                "min_images_per_s": self.images / max(self.seconds),
                "max_images_per_s": self.images / min(self.seconds),
                "setup_s": round(self.setup_s, 3), "cosine_min": self.cosine}  # fmt: skip


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


def measure(bb: Backbone, device: torch.device, paths: list[FastPath], x: torch.Tensor,
            rounds: int = 5) -> list[Trial]:  # fmt: skip
    """Time every path on the warm batch `x`, interleaved; check each against fp32 NCHW.
    The close contenders (within RETIME_WITHIN of the fastest that matches fp32) are timed for
    `rounds` more: near-ties are where a shared machine's noise picks the wrong mode."""
    device = torch.device(device)
    x = x.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    ref = run_backbone(bb, x, PLAIN)
    setup, cosine, fns = {}, {}, {}
    for p in paths:
        t0 = time.perf_counter()
        prepared = prepare(bb, device, p)
        out = run_backbone(prepared, x, p)  # first call: oneDNN/TorchScript optimise here
        run_backbone(prepared, x, p)
        if sync:
            sync()
        setup[p] = time.perf_counter() - t0
        cosine[p] = cosine_min(ref, out)
        fns[p] = lambda prepared=prepared, p=p: run_backbone(prepared, x, p)
    times = time_interleaved(fns, rounds, sync)
    close = _contenders(times, cosine)
    if len(close) > 1:
        for p, more in time_interleaved({p: fns[p] for p in close}, rounds, sync).items():
            times[p] += more
    trials = []
    for p in paths:
        steady = 2 * statistics.median(times[p])  # the two warm-up calls, had they been warm
        trials.append(Trial(p, times[p], max(setup[p] - steady, 0.0), cosine[p], len(x)))
    return trials


def cosine_min(ref: torch.Tensor, out: torch.Tensor) -> float:
    """The worst per-image cosine, scale-free: a random-init efficientnet_b0's features are
    ~1e-13, below the norm floor of torch's cosine_similarity (which would say 0 for every
    mode alike). A zero or non-finite feature vector scores 0."""
    ref, out = (v.detach().cpu().double().flatten(1) for v in (ref, out))  # no fp64 on MPS
    unit = [v / v.norm(dim=1, keepdim=True) for v in (ref, out)]
    cos = torch.nan_to_num((unit[0] * unit[1]).sum(dim=1), nan=0.0)
    both_zero = (ref.abs().amax(dim=1) == 0) & (out.abs().amax(dim=1) == 0)
    return float(torch.where(both_zero, 1.0, cos).min())


def _contenders(times: dict, cosine: dict) -> list:
    good = {p: statistics.median(t) for p, t in times.items() if cosine[p] >= MIN_COSINE}
    best = min(good.values(), default=0.0)
    return [p for p, t in good.items() if t <= best * (1 + RETIME_WITHIN)]


PRECISIONS = ("auto", "fp32", "bf16")


def choose(bb: Backbone, device: torch.device, precision: str = "auto",
           cache_dir: str | Path | None = None, batch: torch.Tensor | None = None,
           images: int = REALISTIC_IMAGES, rounds: int = 5,
           compile: bool = False) -> FastPath:  # fmt: skip
    """The fastest mode for this backbone here whose features match fp32 (cosine >=
    MIN_COSINE), counting setup over `images` images; cached in cache_dir/dispatch.json.
    `precision`: `fp32` = the fastest fp32 mode, `bf16` = bf16 even if slower; `compile`
    also times torch.compile modes (see `candidates`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    device = torch.device(device)
    key = dispatch_key(bb, device, precision) + (" | compile" if compile else "")
    cached = _read_cache(cache_dir).get(key)
    if cached:
        path = FastPath.from_dict(cached["path"])
        now = torch.get_num_threads()
        then = cached.get("threads", now)
        log.info("Compute mode for %s on %s: %s (cached in %s%s).", bb.name, device,
                 path.describe(), Path(cache_dir) / DISPATCH_FILE,
                 "" if then == now else f", measured with {then} threads, now {now}")  # fmt: skip
        return path
    paths = _family(candidates(device, compile), device, precision)
    x = batch if batch is not None else synthetic_batch(bb)
    trials = measure(bb, device, [PLAIN] + [p for p in paths if p != PLAIN], x, rounds)
    best = _pick(trials, precision, images, bb.name)
    _forget(bb, device, keep={best.path, PLAIN})
    _write_cache(cache_dir, key, best, trials)
    seen = "; ".join(f"{t.path.describe()} {1 / t.per_image():.1f}/s"
                     + ("" if t.cosine >= MIN_COSINE else f" (cosine {t.cosine:.4f}, refused)")
                     for t in trials)  # fmt: skip
    log.info("Compute mode for %s on %s: %s (%.1f images/s, cosine %.4f; measured: %s).",
             bb.name, device, best.path.describe(), 1 / best.per_image(), best.cosine,
             seen)  # fmt: skip
    return best.path


def _family(paths: list[FastPath], device: torch.device, precision: str) -> list[FastPath]:
    if precision == "fp32":
        return [p for p in paths if p.autocast is None]
    if precision == "bf16":
        low = [p for p in paths if p.autocast is not None]
        if not any(p.autocast == torch.bfloat16 for p in low):  # no kernels: asked for anyway
            low = [FastPath(torch.bfloat16, True, folded=True)]
        return [p for p in low if p.autocast == torch.bfloat16]
    return paths


def _pick(trials: list[Trial], precision: str, images: int, name: str) -> Trial:
    pool = [t for t in trials if precision != "bf16" or t.path.autocast is not None]
    good = [t for t in pool if t.cosine >= MIN_COSINE]
    if not good:
        log.warning("No %s mode of %s matches fp32 (cosine >= %s); using the closest.",
                    precision, name, MIN_COSINE)  # fmt: skip
        good = [max(pool, key=lambda t: t.cosine)]
    return min(good, key=lambda t: t.cost(images) * (1 + GRAPH_MARGIN * _is_graph(t.path)))


def _is_graph(p: FastPath) -> bool:
    return p.jit or p.compiled


def synthetic_batch(bb: Backbone, n: int = 8, seed: int = 0) -> torch.Tensor:
    """A normalised batch of smooth random colour fields, for when no image is at hand."""
    from breakhis_tl.transforms import normalize

    g = torch.Generator().manual_seed(seed)
    s = bb.prep.input_size
    small = torch.randint(0, 256, (n, 3, max(s // 16, 1), max(s // 16, 1)), generator=g)
    big = nn.functional.interpolate(small.float(), size=(s, s), mode="bilinear")
    return normalize(big.clamp(0, 255), bb.prep)


def _forget(bb: Backbone, device: torch.device, keep: set[FastPath]) -> None:
    """Drop the losing candidates' copies (a backbone copy each)."""
    memo = _PREPARED.get(_original(bb.module), {})
    for key in [k for k in memo if k[0] == str(device) and k[1] not in keep]:
        del memo[key]


def dispatch_key(bb: Backbone, device: torch.device, precision: str) -> str:
    """Machine (CPU + flags hash, torch, GPU), backbone + weights, input size, precision,
    and this module's candidate set (DISPATCH_VERSION). Random inits count as one weights
    kind: speed does not depend on the seed or on the batch-norm statistics of a fold (each
    fold of a random-init run would measure again). Not the thread count: the mode names
    the cached features, so a `train` with N threads must reuse what a 1-thread torchrun
    `extract` chose, or it would silently extract everything again."""
    return f"{machine_id(device)} | {_model_key(bb, precision)} | v{DISPATCH_VERSION}"


def _model_key(bb: Backbone, precision: str) -> str:
    weights = "none" if bb.weights_id.startswith("none-") else bb.weights_id
    return f"{bb.name} | {weights} | {bb.prep.input_size}px | {precision}"


def share_decision(cache_dir: str | Path, bb: Backbone, precision: str, path: FastPath) -> None:
    """Shard 0's mode, under a key without the machine, for shards on other machines: the
    whole cache must hold one feature space."""
    _update_cache(cache_dir, _shared_key(bb, precision), {"path": path.to_dict()},
                  prune=_stale_launch)  # fmt: skip


SHARED_KEEP_DAYS = 30  # a launch's shared decision is dropped from dispatch.json after this


def _stale_launch(key: str, entry: dict) -> bool:
    """Each sharded launch adds a key; finished launches' keys would pile up for ever."""
    if not key.startswith("shard 0 of run "):
        return False
    try:
        age = datetime.now(timezone.utc) - datetime.fromisoformat(entry["when"])
    except (KeyError, TypeError, ValueError):
        return True
    return age > timedelta(days=SHARED_KEEP_DAYS)


def shared_decision(cache_dir: str | Path, bb: Backbone, precision: str) -> FastPath | None:
    entry = _read_cache(cache_dir).get(_shared_key(bb, precision))
    return FastPath.from_dict(entry["path"]) if entry else None


def _shared_key(bb: Backbone, precision: str) -> str:
    return f"shard 0 of run {run_token() or '(unnamed)'} | {_model_key(bb, precision)}"


def run_id_variable() -> str:
    """Where this launch's id comes from: BREAKHIS_TL_RUN_ID if set, else the launcher that
    split the shards (as `cli.parse_shard` reads them): torchrun's rendezvous id when RANK is
    set, a SLURM array's job id in an array task."""
    env = os.environ
    if env.get("BREAKHIS_TL_RUN_ID"):
        return "BREAKHIS_TL_RUN_ID"
    if "RANK" in env and "WORLD_SIZE" in env:
        return "TORCHELASTIC_RUN_ID"
    return "SLURM_ARRAY_JOB_ID" if "SLURM_ARRAY_TASK_ID" in env else "BREAKHIS_TL_RUN_ID"


def run_token() -> str:
    """What the shards of one launch share, so a shard never takes an earlier launch's
    decision; "" where there is none (shards started by hand, torchrun without a rendezvous
    id), and those share the last unnamed one."""
    value = os.environ.get(run_id_variable(), "")
    return "" if value == "none" else value  # "none": torchrun's static default


def check_runs_here(bb: Backbone, device: torch.device, path: FastPath) -> str | None:
    """Why shard 0's mode cannot run on this device (None if it runs): a smoke batch, not
    a guess from flags."""
    try:
        with torch.inference_mode():
            out = run_backbone(bb, synthetic_batch(bb, 2).to(device), path)
    except Exception as err:  # noqa: BLE001 - any failure means "not here"
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None if torch.isfinite(out.float()).all() else "non-finite features"


def _read_cache(cache_dir: str | Path | None) -> dict:
    if cache_dir is None:
        return {}
    try:
        return json.loads((Path(cache_dir) / DISPATCH_FILE).read_text())
    except (OSError, ValueError):
        return {}  # absent or unreadable: measure again (and rewrite it)


def _write_cache(cache_dir, key: str, best: Trial, trials: list[Trial]) -> None:
    if cache_dir is None:
        return
    _update_cache(cache_dir, key, {"path": best.path.to_dict(), "mode": best.path.describe(),
                                   "threads": torch.get_num_threads(),
                                   "measured": [t.to_dict() for t in trials]})  # fmt: skip


def _update_cache(
    cache_dir: str | Path, key: str, entry: dict, prune: Callable[[str, dict], bool] | None = None
) -> None:
    """Read-modify-replace, so a concurrent reader never sees half a file; `prune(key,
    entry)` says which old entries to drop on the way."""
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / f".{DISPATCH_FILE}.lock"):
        data = _read_cache(folder)
        if prune is not None:
            data = {k: v for k, v in data.items() if not prune(k, v)}
        data[key] = {**entry, "when": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        tmp = folder / f".{DISPATCH_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, folder / DISPATCH_FILE)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Two launches' shard 0s may update the file at once: unlocked, one decision could be
    lost and that launch's shards would wait for it in vain. flock where the system has it
    (not Windows). On a network file system it may lock this host only (NFS with local
    locks, CIFS) or fail; a failure is logged once and the update goes on unlocked."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    with open(path, "a") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)
            except OSError as err:
                if not _LOCK_WARNED:
                    _LOCK_WARNED.append(path)
                    log.warning("Could not lock %s (%s); dispatch.json is updated unlocked, "
                                "so two launches' shard 0s writing at once could lose one "
                                "decision.", path, err)  # fmt: skip
        yield  # closing the file releases the lock


_LOCK_WARNED: list[Path] = []  # once per process
