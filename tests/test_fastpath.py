"""The measured compute-mode dispatch and the folding of frozen backbones (fastpath.py).

Comparisons are like with like: folded fp32 against unfolded fp32 to fp32 tolerance, and a
bf16 mode against fp32 only to the tolerance bf16 allows, so the suite passes on CPUs with
and without bf16 kernels.
"""

import copy
import json
import logging
import types

import pytest
import torch
from torch import fx, nn

from breakhis_tl import fastpath as F
from breakhis_tl import folding, runner
from breakhis_tl.backbones import build_backbone
from breakhis_tl.errors import UserError
from breakhis_tl.fastpath import PLAIN, FastPath
from breakhis_tl.folding import ConvAct
from breakhis_tl.images import load_rgb
from breakhis_tl.transforms import decode_transform, normalize

CNNS = ["vgg16", "resnet50", "densenet121", "inception_v3", "mobilenet_v2",
        "efficientnet_b0", "efficientnet_lite0", "convnext_tiny"]  # fmt: skip
CPU = torch.device("cpu")


def real_batch(bb, folder, n=2):
    paths = sorted(folder.rglob("*.png"))[:n]
    decode = decode_transform(bb.prep)
    return torch.stack([normalize(decode(load_rgb(p)), bb.prep) for p in paths])


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
    nn.Module.train(bb.module, True)  # _freeze patched train() to stay in eval
    with torch.no_grad():
        bb.module(torch.randn(4, 3, 96, 96, generator=g))
    nn.Module.train(bb.module, False)
    for bn in bns:
        bn.momentum = 0.1
    return bb


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m, name):
        return isinstance(m, ConvAct) or super().is_leaf_module(m, name)


def bn_after_conv(module):
    """Batch norms whose input is a convolution's output: what folding must remove."""
    gm = fx.GraphModule(module, _Tracer().trace(module))
    mods = dict(gm.named_modules())
    hits = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(mods[node.target], nn.BatchNorm2d):
            src = node.args[0]
            if src.op == "call_module" and isinstance(mods[src.target], nn.Conv2d):
                hits.append(node.target)
    return hits


def cosine_min(a, b):
    return F.cosine_min(a.float(), b.float())  # scale-free: random-init b0 features are ~1e-13


def test_describe_is_stable_and_round_trips():
    assert PLAIN.describe() == "fp32"
    assert FastPath(None, True).describe() == "fp32 + channels_last"  # the old text
    assert FastPath(torch.bfloat16, True).describe() == "bfloat16 + channels_last"
    full = FastPath(torch.bfloat16, True, folded=True, cast=True, jit=True)
    assert full.describe() == "bfloat16 weights + channels_last + folded + jit"
    every = F.candidates(CPU, compile=True) + [full, FastPath(torch.float16, True, folded=True)]
    assert len({p.describe() for p in every}) == len(set(every))
    for p in every:
        assert FastPath.from_dict(json.loads(json.dumps(p.to_dict()))) == p


@pytest.mark.parametrize("name", CNNS)
def test_folding_keeps_features_and_removes_batch_norm(name, breakhis_sample):
    bb = with_running_stats(build_backbone(name, "none", 0))
    before = {k: v.clone() for k, v in bb.module.state_dict().items()}
    x = real_batch(bb, breakhis_sample)
    folded = F.fold_frozen(bb.module)
    with torch.inference_mode():
        ref, out = bb.module(x), folded(x)
    assert cosine_min(ref, out) >= 0.9999
    assert (ref - out).abs().max() <= 1e-3 * ref.abs().max() + 1e-6
    left = [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    if name == "densenet121":  # pre-activation: its norms follow concatenations, not convs
        assert left and not bn_after_conv(folded)
    else:
        assert not left
    assert all(not p.requires_grad for p in folded.parameters())
    folded.train()
    assert not folded.training
    # the original, which Grad-CAM runs through, is untouched
    assert all(not p.requires_grad for p in bb.module.parameters())
    assert bb.module.train() is bb.module and not bb.module.training
    assert all(torch.equal(v, bb.module.state_dict()[k]) for k, v in before.items())


def test_lite0_static_same_padding_is_folded_into_the_convolution(breakhis_sample):
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    bb = build_backbone("efficientnet_lite0", "default")
    folded = F.fold_frozen(bb.module)
    assert not any(isinstance(m, (Conv2dStaticSamePadding, nn.ZeroPad2d))
                   for m in folded.modules())  # fmt: skip
    # the asymmetric stride-2 pads (one more on the right and bottom) became one zero tap
    # at the start of a one-wider kernel, with symmetric padding; the rest kept their shape
    same = [m for m in bb.module.modules() if isinstance(m, Conv2dStaticSamePadding)]
    plain = [m for m in folding._unpad_same(copy.deepcopy(bb.module)).modules()
             if type(m) is nn.Conv2d]  # fmt: skip
    assert len(plain) == len(same)
    widened = 0
    for old, new in zip(same, plain, strict=True):
        left, right, top, bottom = getattr(old.static_padding, "padding", (0, 0, 0, 0))
        if (left, top) == (right, bottom):
            assert new.kernel_size == old.kernel_size and torch.equal(new.weight, old.weight)
            assert new.padding == (top, left)
            continue
        widened += 1
        assert max(old.stride) == 2 and (right - left, bottom - top) == (1, 1)
        assert new.padding == (bottom, right)
        assert new.weight[:, :, 0].abs().sum() == 0 and new.weight[:, :, :, 0].abs().sum() == 0
        assert torch.equal(new.weight[:, :, 1:, 1:], old.weight)
    assert widened >= 4
    x = real_batch(bb, breakhis_sample, 4)
    with torch.inference_mode():
        ref, out = bb.module(x), folded(x)
    assert cosine_min(ref, out) >= 0.9999
    assert (ref - out).abs().max() < 1e-3


FUSED = {"efficientnet_lite0": 33, "mobilenet_v2": 35, "resnet50": 33, "efficientnet_b0": 49,
         "inception_v3": 94, "densenet121": 59, "vgg16": 13}  # fmt: skip


@pytest.mark.skipif(not folding._FUSED_KERNEL, reason="this torch has no oneDNN fused conv")
@pytest.mark.parametrize("name", list(FUSED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_folded_cnn_runs_no_batch_norm_padding_or_activation_pass(name, dtype):
    """What the profile of one folded batch may no longer hold: the three memory passes
    folding removes (batch norm, a padded copy, a separate ReLU/ReLU6)."""
    from torch.profiler import profile

    if dtype == torch.bfloat16 and not folding._BF16_KERNEL:
        pytest.skip("oneDNN has no bf16 convolution on this CPU (the plain ops run)")
    bb = with_running_stats(build_backbone(name, "none", 0))  # activations beyond ReLU6's 6
    folded = F.fold_frozen(bb.module).to(dtype).to(memory_format=torch.channels_last)
    acts = [m for m in folded.modules() if isinstance(m, ConvAct)]
    assert len(acts) == FUSED[name]
    x = torch.randn(2, 3, 96, 96).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        exact = bb.module(x.float())
        ref = bb.module.to(dtype)(x).float()
        with profile() as prof:
            out = folded(x).float()
    bb.module.float()
    ops = {e.key: e.count for e in prof.key_averages()}
    banned = {"aten::constant_pad_nd", "aten::clamp", "aten::hardtanh", "aten::silu",
              "aten::silu_"}  # fmt: skip
    if name != "densenet121":  # pre-activation: its norms follow concatenations, not convs
        banned |= {"aten::native_batch_norm", "aten::_native_batch_norm_legit_no_training",
                   "aten::batch_norm"}  # fmt: skip
    assert not banned & set(ops), ops
    relus = ops.get("aten::relu", 0) + ops.get("aten::relu_", 0)
    # what stays follows no convolution: resnet50's after its 16 residual sums, densenet121's
    # after the norms of its 58 layers' and 3 transitions' inputs and after the last norm
    assert relus == {"resnet50": 16, "densenet121": 62}.get(name, 0), ops
    if dtype == torch.float32:
        assert cosine_min(ref, out) >= 0.9999
    else:  # random norm statistics make bf16 rounding grow (cosine 0.84-0.99 with fp32):
        # folded must be no further from fp32 than the unfolded bf16 model is
        assert cosine_min(exact, out) >= cosine_min(exact, ref) - 0.002


def test_without_a_bf16_convolution_the_fused_layer_runs_the_plain_ops(monkeypatch):
    """A CPU with AVX2 alone has no oneDNN bf16 convolution: the fused kernel would raise."""
    bb = with_running_stats(build_backbone("mobilenet_v2", "none", 0))
    folded = F.fold_frozen(bb.module).to(torch.bfloat16)
    x = torch.randn(2, 3, 96, 96).to(torch.bfloat16)
    monkeypatch.setattr(folding, "_BF16_KERNEL", False)
    calls = []
    real = torch.ops.mkldnn._convolution_pointwise
    monkeypatch.setattr(folding.torch.ops.mkldnn, "_convolution_pointwise",
                        lambda *a: calls.append(1) or real(*a), raising=False)  # fmt: skip
    with torch.inference_mode():
        exact = bb.module(x.float())
        out, ref = folded(x).float(), bb.module.to(torch.bfloat16)(x).float()
    assert not calls
    assert cosine_min(exact, out) >= cosine_min(exact, ref) - 0.002


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


@pytest.mark.parametrize("size", [7, 8, 33])
@pytest.mark.parametrize(("kernel", "stride", "dilation"), [(3, 2, 1), (5, 2, 1), (3, 1, 1),
                                                            (3, 2, 2), (5, 1, 2)])  # fmt: skip
def test_same_padding_folds_exactly_or_not_at_all(size, kernel, stride, dilation):
    """A zero tap shifts the input by one pixel, so only dilation 1 is widened; a dilated
    conv keeps its own padding module, and both give the original's output."""
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    torch.manual_seed(0)
    same = Conv2dStaticSamePadding(4, 6, kernel, stride=stride, dilation=dilation,
                                   image_size=size).eval()  # fmt: skip
    wrapped = folding._unpad_same(nn.Sequential(same))
    assert (type(wrapped[0]) is nn.Conv2d) == (dilation == 1)
    x = torch.randn(2, 4, size, size)
    with torch.inference_mode():
        ref, out = same(x), wrapped(x)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)


def test_every_candidate_matches_fp32_within_its_dtype(breakhis_sample):
    bb = build_backbone("efficientnet_lite0", "default")
    x = real_batch(bb, breakhis_sample, 3)  # not the traced batch size (2)
    ref = F.run_backbone(bb, x, PLAIN)
    for p in F.candidates(CPU):
        out = F.run_backbone(bb, x, p)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert cosine_min(ref, out) >= (0.9999 if p.autocast is None else F.MIN_COSINE), p


def test_prepare_keeps_the_original_and_builds_once():
    bb = build_backbone("mobilenet_v2", "none", 0)
    path = FastPath(None, True, folded=True)
    a, b = F.prepare(bb, CPU, path), F.prepare(bb, CPU, path)
    assert a.module is b.module and a.module is not bb.module
    assert F.prepare(a, CPU, path).module is a.module  # a prepared backbone is not re-folded
    assert F.prepare(bb, CPU, PLAIN).module is bb.module
    assert any(isinstance(m, nn.BatchNorm2d) for m in bb.module.modules())  # for Grad-CAM
    x = torch.randn(2, 3, 224, 224)
    assert torch.equal(F.run_backbone(bb, x, path), F.run_backbone(a, x, path))


def trial(path, per_batch, setup=0.0, cosine=1.0):
    return F.Trial(path, [per_batch] * 5, setup, cosine, 8)


def test_pick_takes_the_fastest_that_matches_and_pays_back():
    slow, fast = PLAIN, FastPath(None, True, folded=True)
    bad = FastPath(torch.bfloat16, True, folded=True)
    jit = FastPath(None, True, folded=True, jit=True)
    trials = [trial(slow, 1.0), trial(fast, 0.5), trial(bad, 0.1, cosine=0.9)]
    assert F._pick(trials, "auto", 8000, "x").path == fast
    # 10% faster per batch but 1000 s to set up: does not pay back on 8,000 images
    assert F._pick(trials + [trial(jit, 0.45, setup=1000)], "auto", 8000, "x").path == fast
    assert F._pick(trials + [trial(jit, 0.45, setup=1)], "auto", 8000, "x").path == jit
    assert F._pick(trials, "bf16", 8000, "x").path == bad  # asked for: taken, with a warning
    # a graph 3% faster is noise on one batch: the eager mode is kept; 10% faster wins
    assert F._pick([trial(fast, 0.5), trial(jit, 0.485)], "auto", 8000, "x").path == fast
    assert F._pick([trial(fast, 0.5), trial(jit, 0.45)], "auto", 8000, "x").path == jit


def test_timing_is_interleaved_in_rotating_order():
    calls = []
    F.time_interleaved({k: (lambda k=k: calls.append(k)) for k in "abc"}, rounds=3)
    assert calls == list("abcbcacab")


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


def test_near_ties_that_match_fp32_are_timed_again():
    times = {"fp32": [1.0, 1.1, 0.9], "a": [0.50, 0.52, 0.48], "b": [0.55, 0.9, 0.56],
             "c": [0.7, 0.7, 0.7], "bad": [0.1, 0.1, 0.1]}  # fmt: skip
    cosine = {"fp32": 1.0, "a": 1.0, "b": 0.999, "c": 1.0, "bad": 0.9}
    assert F._contenders(times, cosine) == ["a", "b"]  # c is 40% slower; bad is not exact
    assert F._contenders({"a": [0.5]}, {"a": 0.5}) == []


def test_measure_times_the_near_ties_again(monkeypatch):
    bb = build_backbone("mobilenet_v2", "none", 0)
    slow, a, b = PLAIN, FastPath(None, True), FastPath(None, True, folded=True)
    fake = {slow: [1.0] * 3, a: [0.50] * 3, b: [0.55] * 3}  # a and b within 15%
    timed = []

    def timing(fns, rounds, sync=None):
        timed.append(set(fns))
        return {p: list(fake[p]) for p in fns}

    monkeypatch.setattr(F, "time_interleaved", timing)
    trials = F.measure(bb, CPU, [slow, a, b], F.synthetic_batch(bb, n=2), rounds=3)
    assert timed == [{slow, a, b}, {a, b}]
    assert {t.path: len(t.seconds) for t in trials} == {slow: 3, a: 6, b: 6}


@pytest.fixture
def few_candidates(monkeypatch):
    paths = [PLAIN, FastPath(None, True, folded=True)]
    if F.cpu_supports_bf16():
        paths.append(FastPath(torch.bfloat16, True, folded=True, cast=True))
    monkeypatch.setattr(F, "candidates", lambda device, compile=False: paths)
    return paths


def test_choose_measures_once_then_reads_the_cache(few_candidates, tmp_path, monkeypatch, caplog):
    bb = build_backbone("mobilenet_v2", "none", 0)
    x = F.synthetic_batch(bb, n=2)
    got = F.choose(bb, CPU, "auto", tmp_path, batch=x, rounds=2)
    assert got in few_candidates
    data = json.loads((tmp_path / F.DISPATCH_FILE).read_text())
    key = F.dispatch_key(bb, CPU, "auto")
    assert key.startswith(F.machine_id(CPU)) and "mobilenet_v2" in key and "224px" in key
    assert f"v{F.DISPATCH_VERSION}" in key
    assert data[key]["mode"] == got.describe()
    assert data[key]["threads"] == torch.get_num_threads()
    assert {m["mode"] for m in data[key]["measured"]} == {p.describe() for p in few_candidates}
    monkeypatch.setattr(F, "measure", lambda *a, **k: pytest.fail("measured again"))
    assert F.choose(bb, CPU, "auto", tmp_path) == got
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # a 1-thread torchrun extract and an N-thread train agree
    try:
        assert F.dispatch_key(bb, CPU, "auto") == key
        with caplog.at_level(logging.INFO):
            assert F.choose(bb, CPU, "auto", tmp_path) == got
    finally:
        torch.set_num_threads(threads)
    assert f"measured with {threads} threads, now {threads + 1}" in caplog.text


def test_precision_overrides(few_candidates, tmp_path):
    bb = build_backbone("mobilenet_v2", "none", 0)
    x = F.synthetic_batch(bb, n=2)
    assert F.choose(bb, CPU, "fp32", tmp_path, batch=x, rounds=1).autocast is None
    assert F.choose(bb, CPU, "bf16", tmp_path, batch=x, rounds=1).autocast == torch.bfloat16
    with pytest.raises(ValueError):
        F.choose(bb, CPU, "fp8", tmp_path)


def test_machine_names_the_cpu_and_its_flags():
    name, flags = F.cpu_info()
    assert name
    assert "torch " + torch.__version__ in F.machine_id(CPU)
    if flags:
        assert "flags:" in F.machine_id(CPU)


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


def test_torch_probe_agrees_with_proc_cpuinfo():
    flags = F.cpu_info()[1]
    if not flags or "avx2" not in flags or not hasattr(torch._C._cpu, "_get_cpu_capability"):
        pytest.skip("not an x86 CPU with /proc/cpuinfo flags and a torch CPU probe")
    assert bool(F._probed_x86_flags()) == bool(set(flags) & F.BF16_FLAGS)


def _clear_launch(monkeypatch):
    launch = ("BREAKHIS_TL_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_ARRAY_JOB_ID")
    for name in (*launch, "RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)


def test_a_shared_decision_belongs_to_one_launch(tmp_path, monkeypatch):
    _clear_launch(monkeypatch)
    bb = build_backbone("mobilenet_v2", "none", 0)
    bf16 = FastPath(torch.bfloat16, True, folded=True, cast=True)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-1")
    F.share_decision(tmp_path, bb, "auto", bf16)
    assert F.shared_decision(tmp_path, bb, "auto") == bf16
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-2")  # a later launch waits for its own
    assert F.shared_decision(tmp_path, bb, "auto") is None
    monkeypatch.setenv("BREAKHIS_TL_RUN_ID", "launch-1")  # the user's id comes first
    assert F.shared_decision(tmp_path, bb, "auto") == bf16
    data = json.loads((tmp_path / F.DISPATCH_FILE).read_text())
    old = {"path": bf16.to_dict(), "when": "2020-01-01T00:00:00+00:00"}
    data["shard 0 of run old-launch | x"] = old  # finished launches do not pile up
    (tmp_path / F.DISPATCH_FILE).write_text(json.dumps(data))
    monkeypatch.setenv("BREAKHIS_TL_RUN_ID", "launch-3")
    F.share_decision(tmp_path, bb, "auto", PLAIN)
    kept = json.loads((tmp_path / F.DISPATCH_FILE).read_text())
    assert "shard 0 of run old-launch | x" not in kept and len(kept) == 2
    assert F.shared_decision(tmp_path, bb, "auto") == PLAIN


def test_the_launch_id_comes_from_the_launcher_that_split_the_shards(monkeypatch):
    _clear_launch(monkeypatch)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")  # set, but the shards are torchrun's
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun without a rendezvous id
    assert (F.run_id_variable(), F.run_token()) == ("TORCHELASTIC_RUN_ID", "")
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert (F.run_id_variable(), F.run_token()) == ("SLURM_ARRAY_JOB_ID", "77")


class _NoBf16(nn.Module):
    """A step with no bf16 kernel on the CPU (torch's cdist), like a mode another device
    lacks: the failure is torch's own, not one this test wrote."""

    def forward(self, x):
        pooled = x.mean((2, 3))
        return torch.cdist(pooled[None], pooled[None])[0]


def _cdist_has_bf16() -> bool:
    try:
        x = torch.ones(1, 2, 2, dtype=torch.bfloat16)
        torch.cdist(x, x)
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.skipif(_cdist_has_bf16(), reason="this torch has a CPU bf16 cdist kernel")
def test_a_shared_mode_is_tried_on_this_device_first():
    bb = build_backbone("mobilenet_v2", "none", 0)
    bb = type(bb)(bb.name, "none", "none-test", 3, bb.prep, _NoBf16())
    assert F.check_runs_here(bb, CPU, PLAIN) is None
    why = F.check_runs_here(bb, CPU, FastPath(torch.bfloat16, cast=True))
    assert why and "cdist" in why and "BFloat16" in why


def test_a_shard_that_cannot_run_shard_0s_mode_stops_with_a_sentence(tmp_path, monkeypatch, caplog):
    _clear_launch(monkeypatch)
    monkeypatch.delenv("BREAKHIS_TL_DISPATCH_DIR", raising=False)
    bb = build_backbone("mobilenet_v2", "none", 0)
    bf16 = FastPath(torch.bfloat16, True, folded=True, cast=True)
    F.share_decision(tmp_path, bb, "auto", bf16)
    cfg = types.SimpleNamespace(precision="auto")
    monkeypatch.setattr(F, "check_runs_here", lambda *a: "RuntimeError: no bf16 kernel")
    with caplog.at_level(logging.WARNING), pytest.raises(UserError) as err:
        runner.compute_modes(cfg, {"a": bb}, CPU, tmp_path, shard=(1, 2))
    assert "no bf16 kernel); run every shard on a device" in str(err.value)
    assert "--precision fp32" in str(err.value) and "launch has no id" in caplog.text
    monkeypatch.setattr(F, "check_runs_here", lambda *a: None)
    with caplog.at_level(logging.INFO):
        modes = runner.compute_modes(cfg, {"a": bb}, CPU, tmp_path, shard=(1, 2))
    assert modes == {(bb.name, bb.weights_id): bf16}
    assert "shard 0's decision for launch (unnamed)" in caplog.text
    monkeypatch.setenv("BREAKHIS_TL_RUN_ID", "launch-9")  # shard 0 never came: it says so
    with (
        caplog.at_level(logging.INFO),
        pytest.raises(UserError, match="Shard 0 of launch launch-9"),
    ):
        runner._wait_for_decision(bb, "auto", tmp_path, timeout=0)
    assert "Waiting for shard 0 of launch launch-9" in caplog.text


def test_without_bf16_kernels_only_fp32_is_timed_unless_asked(monkeypatch):
    monkeypatch.setattr(F, "cpu_supports_bf16", lambda: False)
    assert all(p.autocast is None for p in F.candidates(CPU))
    assert F.fast_path(CPU).autocast is None
    forced = F._family(F.candidates(CPU), CPU, "bf16")
    assert forced and all(p.autocast == torch.bfloat16 for p in forced)


def _write_keys(folder: str, worker: int, n: int) -> None:
    for i in range(n):
        F._update_cache(folder, f"worker{worker}/key{i}", {"path": {}})


def test_concurrent_dispatch_updates_lose_no_decision(tmp_path):
    """Several launches' shard 0s writing dispatch.json at once: every decision is kept
    (read-modify-replace under a lock; unlocked, later writers dropped earlier keys)."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork (not on Windows)")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_keys, args=(str(tmp_path), w, 60)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    written = json.loads((tmp_path / F.DISPATCH_FILE).read_text())
    assert len(written) == 240


def test_a_refused_lock_is_said_once_and_the_update_goes_on(tmp_path, monkeypatch, caplog):
    """A file system that refuses flock: the decision is still written, and the log says
    once that the update was unlocked."""
    import fcntl

    def refuse(*args):
        raise OSError("locks not supported")

    monkeypatch.setattr(fcntl, "flock", refuse)
    monkeypatch.setattr(F, "_LOCK_WARNED", [])
    with caplog.at_level(logging.WARNING, logger="breakhis_tl.fastpath"):
        F._update_cache(tmp_path, "a", {"path": {}})
        F._update_cache(tmp_path, "b", {"path": {}})
    assert caplog.text.count("Could not lock") == 1
    assert set(json.loads((tmp_path / F.DISPATCH_FILE).read_text())) == {"a", "b"}
