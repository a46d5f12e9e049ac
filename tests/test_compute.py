"""The compute mode of frozen backbones (models/compute.py): folding, the dtype rule, the refusal
of low precision that does not match fp32, and the measured layout.

Nothing here asserts how close bf16 comes to fp32 on this CPU (a fact of the hardware): the
refusal is tested by injecting the cosine, and fp32 paths keep fp32 tolerances.
"""

import copy
import json
import logging

import pytest
import torch
from torch import nn

from breakhis_tl.models import compute as F
from breakhis_tl.models.backbones import build_backbone
from breakhis_tl.models.compute import PLAIN, FastPath

CPU = torch.device("cpu")
LOW = torch.bfloat16


def with_running_stats(bb, seed=0):
    """Random-init batch norms hold mean 0 / var 1 / weight 1 / bias 0, which folds to the
    identity; give them real statistics (one train-mode pass) and a random affine."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in bb.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative: one pass sets the batch statistics exactly
        bn.weight.data.uniform_(0.5, 1.5, generator=g)
        bn.bias.data.normal_(0, 0.1, generator=g)
    nn.Module.train(bb.module, True)  # freeze() patched train() to stay in eval
    with torch.no_grad():
        bb.module(torch.randn(4, 3, 96, 96, generator=g))
    nn.Module.train(bb.module, False)
    return bb


def test_describe_is_stable_and_round_trips():
    assert PLAIN.describe() == "fp32"
    assert FastPath(None, True).describe() == "fp32 + channels_last"
    assert FastPath(LOW, True, True, cast=True).describe() == (
        "bfloat16 weights + channels_last + folded"
    )
    for p in [PLAIN, FastPath(LOW, True, True, True), FastPath(torch.float16, True)]:
        assert FastPath.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    old = {
        "autocast": "bfloat16",
        "channels_last": True,
        "folded": True,
        "cast": True,
        "jit": True,
        "compiled": False,
    }  # a head file written before TorchScript went
    assert FastPath.from_dict(old) == FastPath(LOW, True, True, True)


@pytest.mark.parametrize("name", ["mobilenet_v2", "densenet121", "inception_v3", "resnet50"])
def test_folding_keeps_features_and_removes_batch_norm(name):
    bb = with_running_stats(build_backbone(name, "none", 0))
    before = {k: v.clone() for k, v in bb.module.state_dict().items()}
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    folded = F.fold_frozen(bb.module)
    with torch.inference_mode():
        ref, out = bb.module(x), folded(x)
    assert F.cosine_min(ref, out) >= 0.9999
    assert (ref - out).abs().max() <= 1e-3 * ref.abs().max() + 1e-6
    left = [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bool(left) == (name == "densenet121")  # pre-activation: norms follow concats
    assert all(not p.requires_grad for p in folded.parameters())
    folded.train()
    assert not folded.training
    # the original, which Grad-CAM runs through, is untouched
    assert bb.module.train() is bb.module and not bb.module.training
    assert all(torch.equal(v, bb.module.state_dict()[k]) for k, v in before.items())


class _Residual(nn.Module):
    """conv -> ReLU6 whose input also feeds the sum, a ReLU6 on a view of a tensor read
    elsewhere (both must stay out of place), then conv -> ReLU6 read by nothing else."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.c = nn.Conv2d(4, 8, 1)
        self.shared, self.on_view, self.last = nn.ReLU6(), nn.ReLU6(), nn.ReLU6()

    def forward(self, x):
        y = self.a(x)
        z = self.shared(y) + y
        w = self.c(z)
        z = z + self.on_view(w[:, :4]) + w[:, 4:]  # a view of w: must not be overwritten
        return self.last(self.b(z)).mean((2, 3))


def test_activations_overwrite_their_input_only_where_nothing_else_reads_it():
    torch.manual_seed(0)
    m = _Residual().eval()
    x = torch.randn(2, 3, 8, 8)
    folded = F.fold_frozen(m)
    assert isinstance(folded, torch.fx.GraphModule)  # folded, not the unfolded fallback
    assert torch.allclose(folded(x), m(x), atol=1e-6)
    assert not folded.get_submodule("shared").inplace and folded.get_submodule("last").inplace
    assert not folded.get_submodule("on_view").inplace
    assert not m.shared.inplace and not m.last.inplace  # the original is left as built
    lite0 = F.fold_frozen(build_backbone("efficientnet_lite0", "default").module)
    acts = [mod for mod in lite0.modules() if isinstance(mod, nn.ReLU6)]
    assert acts and all(a.inplace for a in acts)


def test_lite0_static_same_padding_is_folded_into_the_convolution():
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    bb = build_backbone("efficientnet_lite0", "default")
    folded = F.fold_frozen(bb.module)
    kinds = (Conv2dStaticSamePadding, nn.ZeroPad2d, nn.BatchNorm2d)
    assert not any(isinstance(m, kinds) for m in folded.modules())
    same = [m for m in bb.module.modules() if isinstance(m, Conv2dStaticSamePadding)]
    plain = [m for m in F._unpad_same(copy.deepcopy(bb.module)).modules() if type(m) is nn.Conv2d]
    assert len(plain) == len(same)
    widened = 0
    for old, new in zip(same, plain, strict=True):
        left, right, top, bottom = getattr(old.static_padding, "padding", (0, 0, 0, 0))
        if (left, top) == (right, bottom):
            assert new.kernel_size == old.kernel_size and torch.equal(new.weight, old.weight)
            continue
        widened += 1  # the asymmetric stride-2 pads: one zero tap at the start of the kernel
        assert new.padding == (bottom, right)
        assert new.weight[:, :, 0].abs().sum() == 0 and new.weight[:, :, :, 0].abs().sum() == 0
        assert torch.equal(new.weight[:, :, 1:, 1:], old.weight)
    assert widened >= 4
    x = F.synthetic_batch(bb, n=2)
    with torch.inference_mode():
        ref, out = bb.module(x), folded(x)
    assert F.cosine_min(ref, out) >= 0.9999 and (ref - out).abs().max() < 1e-3


@pytest.mark.parametrize("size", [7, 8, 33])
@pytest.mark.parametrize(("kernel", "stride", "dilation"), [(3, 2, 1), (5, 2, 1), (3, 2, 2)])
def test_same_padding_folds_exactly_or_not_at_all(size, kernel, stride, dilation):
    """A zero tap shifts the input by one pixel, so only dilation 1 is widened; a dilated
    conv keeps its own padding module, and both give the original's output."""
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    torch.manual_seed(0)
    same = Conv2dStaticSamePadding(
        4, 6, kernel, stride=stride, dilation=dilation, image_size=size
    ).eval()
    wrapped = F._unpad_same(nn.Sequential(same))
    assert (type(wrapped[0]) is nn.Conv2d) == (dilation == 1)
    x = torch.randn(2, 4, size, size)
    with torch.inference_mode():
        ref, out = same(x), wrapped(x)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)


def test_a_layer_called_twice_keeps_its_batch_norms():
    """torch.fx's fuse replaces a module by name: a conv called twice, with a norm after one
    call, would get that norm folded into both calls."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x)

    m = Twice().eval()
    m.bn.running_mean.fill_(2.0), m.bn.running_var.fill_(4.0)
    x = torch.randn(2, 3, 8, 8)
    folded = F.fold_frozen(m)
    assert any(isinstance(b, nn.BatchNorm2d) for b in folded.modules())
    with torch.inference_mode():
        assert torch.allclose(folded(x), m(x), atol=1e-6)


def test_every_fp32_layout_matches_plain_fp32():
    bb = build_backbone("efficientnet_lite0", "default")
    x = F.synthetic_batch(bb, n=3)
    ref = F.run_backbone(bb, x, PLAIN)
    for p in F.candidates(CPU, None):
        out = F.run_backbone(bb, x, p)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert F.cosine_min(ref, out) >= 0.9999, p


def test_a_low_precision_mode_runs_in_its_dtype_and_returns_fp32(monkeypatch):
    """What bf16 promises, on any CPU: the weights and the input are bf16, the features fp32.
    How close they come to fp32 is the hardware's affair (and the gate's, below)."""
    bb = build_backbone("mobilenet_v2", "none", 0)
    path = FastPath(LOW, True, True, cast=True)
    seen = []
    convs = [m for m in F.prepare(bb, CPU, path).module.modules() if isinstance(m, nn.Conv2d)]
    first = convs[0]
    first.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    out = F.run_backbone(bb, F.synthetic_batch(bb, n=2), path)
    assert seen == [LOW] and first.weight.dtype == LOW and out.dtype == torch.float32
    assert F.prepare(bb, CPU, path).module is F.prepare(bb, CPU, path).module  # built once
    assert F.prepare(bb, CPU, PLAIN).module is bb.module  # plain fp32: the module as built


@pytest.fixture
def bf16_machine(monkeypatch):
    """A CPU with native bf16 kernels, whatever this one is; no mode is actually timed."""
    monkeypatch.setattr(F, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(
        F,
        "time_interleaved",
        lambda fns, rounds, sync=None: {p: [0.5 if p.autocast else 1.0] * rounds for p in fns},
    )


@pytest.mark.parametrize("cosine", [0.9949, 0.9951])
def test_bf16_below_the_gate_is_refused_for_fp32(
    bf16_machine, monkeypatch, tmp_path, cosine, caplog
):
    bb = build_backbone("mobilenet_v2", "none", 0)
    monkeypatch.setattr(F, "low_precision_agrees", lambda *a: cosine)
    with caplog.at_level(logging.WARNING):
        got = F.choose(bb, CPU, "auto", tmp_path, batch=F.synthetic_batch(bb, n=2), rounds=1)
    refused = cosine < F.MIN_COSINE
    assert (got.autocast is None) == refused
    assert ("running fp32" in caplog.text) == refused
    assert got in F.candidates(CPU, None if refused else LOW)


def test_the_gate_compares_the_low_precision_mode_with_fp32(monkeypatch):
    bb = build_backbone("mobilenet_v2", "none", 0)
    x = F.synthetic_batch(bb, n=2)
    calls = []
    real = F.run_backbone
    monkeypatch.setattr(F, "run_backbone", lambda b, x, p: calls.append(p) or real(b, x, p))
    path = FastPath(None, True, True)  # fp32 here, so the measured cosine is fp32's own
    assert F.low_precision_agrees(bb, x, path) >= 0.9999
    assert calls == [PLAIN, path]


def test_choose_measures_once_then_reads_the_cache(bf16_machine, tmp_path, monkeypatch):
    bb = build_backbone("mobilenet_v2", "none", 0)
    monkeypatch.setattr(F, "low_precision_agrees", lambda *a: 0.999)
    got = F.choose(bb, CPU, "auto", tmp_path, batch=F.synthetic_batch(bb, n=2), rounds=2)
    assert got.autocast == LOW and got.cast  # the injected timings make bf16 the faster
    data = json.loads((tmp_path / F.DISPATCH_FILE).read_text())
    key = F.dispatch_key(bb, CPU, "auto")
    assert key.startswith(F.machine_id(CPU)) and "mobilenet_v2" in key and "224px" in key
    assert data[key]["mode"] == got.describe()
    assert set(data[key]["images_per_s"]) == {p.describe() for p in F.candidates(CPU, LOW)}
    monkeypatch.setattr(F, "time_interleaved", lambda *a, **k: pytest.fail("measured again"))
    assert F.choose(bb, CPU, "auto", tmp_path) == got
    assert F.dispatch_key(build_backbone("mobilenet_v2", "none", 5), CPU, "auto") == key


def test_precision_overrides(bf16_machine, tmp_path, monkeypatch):
    bb = build_backbone("mobilenet_v2", "none", 0)
    x = F.synthetic_batch(bb, n=2)
    monkeypatch.setattr(F, "low_precision_agrees", lambda *a: 0.5)  # fp32 forced: never asked
    assert F.choose(bb, CPU, "fp32", tmp_path, batch=x, rounds=1).autocast is None
    # bf16 forced: taken even where the gate would refuse it
    assert F.choose(bb, CPU, "bf16", tmp_path, batch=x, rounds=1).autocast == LOW
    with pytest.raises(ValueError):
        F.choose(bb, CPU, "fp8", tmp_path)


def test_without_bf16_kernels_auto_runs_fp32_and_measures_no_bf16(monkeypatch, tmp_path):
    monkeypatch.setattr(F, "cpu_supports_bf16", lambda: False)
    timed = []
    monkeypatch.setattr(
        F,
        "time_interleaved",
        lambda fns, rounds, sync=None: timed.extend(fns) or {p: [1.0] for p in fns},
    )
    bb = build_backbone("mobilenet_v2", "none", 0)
    got = F.choose(bb, CPU, "auto", tmp_path, batch=F.synthetic_batch(bb, n=2), rounds=1)
    assert got.autocast is None and all(p.autocast is None for p in timed)
    assert F.fast_path(CPU) == FastPath(None, True, folded=True)


def test_fp32_layouts_share_a_feature_space_and_low_precision_modes_do_not():
    """fp32 layouts differ far below fp16 storage; bf16 layouts round differently, so each
    low-precision mode (and fp32) names its own space."""
    from breakhis_tl.features.extract import feature_space

    bb = build_backbone("mobilenet_v2", "none", 0)
    fp32 = {feature_space(bb, 0, p) for p in F.candidates(CPU, None)}
    lows = [FastPath(LOW, True, True, True), FastPath(LOW, False, False, True),
            FastPath(LOW, True, True)]  # fmt: skip
    low = {feature_space(bb, 0, p) for p in lows}
    assert len(fp32) == 1 and len(low) == 3 and not fp32 & low
    assert F.candidates(CPU, LOW) == [FastPath(LOW, True, True, cast=True)]  # one, not timed


def test_cosine_is_scale_free_and_zero_for_empty_features():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(4, 1280, generator=g) * 1e-13  # a random-init efficientnet_b0's scale
    near = ref + torch.randn(4, 1280, generator=g) * 1e-16
    assert F.cosine_min(ref, near) > 0.999
    assert nn.functional.cosine_similarity(ref, near, dim=1).max() < 0.5  # torch's floor
    assert F.cosine_min(ref, -ref) == pytest.approx(-1)
    broken = near.clone()
    broken[2] = 0
    assert F.cosine_min(ref, broken) == 0
    broken[2] = float("nan")
    assert F.cosine_min(ref, broken) == 0
    ref[2], broken[2] = 0, 0  # both empty: they agree
    assert F.cosine_min(ref, broken) == pytest.approx(F.cosine_min(ref[:2], near[:2]))


def test_machine_id_names_the_flags_and_any_isa_limit(monkeypatch):
    """A decision measured on one CPU, or under an imitated one, is not reused on another."""
    monkeypatch.setattr(F, "cpu_info", lambda: ("Xeon", ["avx2", "avx512f"]))
    for name in F.ISA_LIMITS:
        monkeypatch.delenv(name, raising=False)
    plain = F.machine_id(CPU)
    monkeypatch.setattr(F, "cpu_info", lambda: ("Xeon", ["avx2", "avx512f", "amx_bf16"]))
    other = F.machine_id(CPU)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    limited = F.machine_id(CPU)
    assert len({plain, other, limited}) == 3 and "ONEDNN_MAX_CPU_ISA=AVX2" in limited


def test_bf16_needs_native_instructions_not_only_onednn(monkeypatch):
    """oneDNN says yes on AVX512 without bf16 instructions, where it emulates bf16 slowly."""
    monkeypatch.setattr(F, "_onednn_bf16", lambda: True)
    monkeypatch.setattr(F, "cpu_info", lambda: ("Xeon", ["avx2", "avx512f", "avx512bw"]))
    assert F.cpu_supports_bf16() is False
    monkeypatch.setattr(F, "cpu_info", lambda: ("Xeon", ["avx512f", "amx_bf16"]))
    assert F.cpu_supports_bf16() is True
    monkeypatch.setattr(F, "_onednn_bf16", lambda: False)  # a torch built without it
    assert F.cpu_supports_bf16() is False


@pytest.mark.parametrize("onednn", [True, False])
def test_without_readable_flags_torch_probes_x86_and_onednn_decides_on_arm(monkeypatch, onednn):
    monkeypatch.setattr(F, "_onednn_bf16", lambda: onednn)
    monkeypatch.setattr(F, "cpu_info", lambda: ("", []))  # Windows, macOS
    monkeypatch.setattr(F.platform, "machine", lambda: "AMD64")
    monkeypatch.setattr(F, "_probed_x86_flags", lambda: set())  # an AVX512 CPU without bf16
    assert F.cpu_supports_bf16() is False
    monkeypatch.setattr(F, "_probed_x86_flags", lambda: {"amx_bf16"})
    assert F.cpu_supports_bf16() is onednn
    monkeypatch.setattr(F.platform, "machine", lambda: "arm64")  # Apple silicon
    assert F.cpu_supports_bf16() is onednn


def test_timing_is_interleaved_in_rotating_order():
    calls = []
    F.time_interleaved({k: (lambda k=k: calls.append(k)) for k in "abc"}, rounds=3)
    assert calls == list("abcbcacab")
