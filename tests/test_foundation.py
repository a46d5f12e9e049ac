"""Foundation-model presets and strict timm loading, without the network.

Big trunks (ViT-L/H/g) are built on the meta device: shapes, parameter counts and the pooled
feature size are checked for free. Real forwards use ViT-Ti/B only. Hub failures are
simulated (offline mode in a subprocess, patched downloads for gated / unreachable hubs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("huggingface_hub")

import huggingface_hub  # noqa: E402
import timm  # noqa: E402
from huggingface_hub import errors as hub_errors  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from breakhis_tl.data.identity import sha256_file
from breakhis_tl.errors import UserError  # noqa: E402
from breakhis_tl.models import foundation as F  # noqa: E402

DOCUMENTED = {  # name: (feature size, pooling), as the cards give them
    "uni": (1024, "cls"),
    "uni2_h": (1536, "cls"),
    "virchow2": (2560, "cls+mean"),
    "h_optimus_0": (1536, "cls"),
    "h_optimus_1": (1536, "cls"),
    "phikon": (768, "cls"),
    "phikon_v2": (1024, "cls"),
    "prov_gigapath": (1536, "cls"),
    "kaiko_vitl14": (1024, "cls"),
}


def _one_sentence(msg: str) -> bool:
    return "\n" not in msg and msg.endswith(".") and "Traceback" not in msg


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_preset_architecture_on_meta(name):
    spec = F.PRESETS[name]
    assert (spec.feature_dim, spec.pooling) == DOCUMENTED[name]
    module = F._meta(name)
    assert sum(p.numel() for p in module.vit.parameters()) == spec.params
    out = module(torch.empty(2, 3, spec.prep.input_size, spec.prep.input_size, device="meta"))
    assert tuple(out.shape) == (2, spec.feature_dim)
    assert F.peak_memory_estimate(name, spec.batch_size) <= F.MEMORY_BUDGET
    assert spec.card.startswith("https://") and spec.hub_id in spec.card
    assert F.is_foundation(name) and not F.is_foundation(f"timm:{name}")


def test_card_settings_that_matter():
    p = F.PRESETS
    assert p["h_optimus_0"].prep.mean == (0.707223, 0.578729, 0.703617)
    assert p["h_optimus_1"].prep.std == (0.211883, 0.230117, 0.177517)
    assert p["kaiko_vitl14"].prep.mean == (0.5, 0.5, 0.5)
    assert (p["prov_gigapath"].prep.resize_size, p["prov_gigapath"].prep.input_size) == (256, 224)
    assert p["uni2_h"].card_kwargs["reg_tokens"] == 8 and p["uni2_h"].card_kwargs["no_embed_class"]
    assert F._meta("virchow2").vit.num_prefix_tokens == 5  # class token + 4 registers


def test_virchow_pooling_drops_registers():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=0, reg_tokens=4)
    vit.eval()
    x = torch.randn(2, 3, 64, 64)
    tokens = vit.forward_features(x)
    want = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)
    torch.testing.assert_close(F.TokenPool(vit, "cls+mean")(x), want)
    torch.testing.assert_close(F.TokenPool(vit, "cls")(x), vit(x))  # timm's own token pool


@pytest.fixture(scope="module")
def phikon():
    return F.build("phikon", "none", seed=3)


def test_small_preset_random_init_real_forward(phikon):
    module, dim, prep, wid = phikon
    x = torch.randn(2, 3, prep.input_size, prep.input_size)
    with torch.inference_mode():
        out = module(x)
    assert out.shape == (2, dim) and torch.isfinite(out).all()
    assert wid == "none-seed3" and not module.training


def test_preset_weights_file_in_half_precision(phikon, tmp_path):
    src = phikon[0]
    path = tmp_path / "phikon.safetensors"
    save_file({k: v.half().contiguous() for k, v in src.vit.state_dict().items()}, str(path))
    module, _, _, wid = F.build("phikon", str(path), seed=0)
    assert not any(t.is_meta for t in module.state_dict().values())
    assert all(t.dtype == torch.float32 for t in module.state_dict().values())
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(module(x), src(x), atol=2e-2, rtol=2e-2)
    assert wid == f"file-{sha256_file(path)[:16]}"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=0).eval()


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_timm_weights_file_loads_strictly(tiny, tmp_path, fmt):
    path = tmp_path / f"tiny.{fmt}"
    state = tiny.state_dict()
    save_file(state, str(path)) if fmt == "safetensors" else torch.save({"state_dict": state}, path)
    model, dim, prep, wid = F.build_timm("vit_tiny_patch16_224", str(path), seed=5)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), tiny(x))
    assert dim == 192 and prep.input_size == 224 and wid.startswith("file-")


def test_timm_random_init_is_seeded():
    a, dim, _, wid = F.build_timm("vit_tiny_patch16_224", "none", seed=7)
    b, *_ = F.build_timm("vit_tiny_patch16_224", "none", seed=7)
    assert (dim, wid) == (192, "none-seed7")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_wrong_checkpoint_is_refused_in_one_sentence(tiny, tmp_path, change):
    state = dict(tiny.state_dict())
    if change == "missing":
        del state["blocks.3.attn.qkv.weight"]
    elif change == "extra":
        state["head.weight"] = torch.zeros(1000, 192)
    else:
        state["pos_embed"] = torch.zeros(1, 50, 192)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(UserError) as err:
        F.build_timm("vit_tiny_patch16_224", str(path))
    msg = str(err.value)
    assert _one_sentence(msg) and str(path) in msg and "refused" in msg
    expected = {
        "missing": "1 missing keys (blocks.3.attn.qkv.weight)",
        "extra": "1 unexpected keys (head.weight)",
        "shape": "1 keys of another shape (pos_embed)",
    }[change]
    assert expected in msg


def test_preset_refuses_a_foreign_checkpoint(tiny, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file(tiny.state_dict(), str(path))
    with pytest.raises(UserError, match=r"does not fit uni: .*keys of another shape"):
        F.build("uni", str(path))


def _to_transformers(state: dict, dinov2: bool) -> dict:
    """timm ViT weights in the layout of transformers' ViTModel (or Dinov2Model)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "blocks":
            i, rest = parts[1], ".".join(parts[2:])
            pre = f"encoder.layer.{i}."
            if rest.startswith("attn.qkv."):
                for name, chunk in zip(("query", "key", "value"), value.chunk(3), strict=True):
                    out[f"{pre}attention.attention.{name}.{parts[-1]}"] = chunk
                continue
            names = {
                "norm1": "norm1" if dinov2 else "layernorm_before",
                "norm2": "norm2" if dinov2 else "layernorm_after",
                "attn.proj": "attention.output.dense",
                "mlp.fc1": "mlp.fc1" if dinov2 else "intermediate.dense",
                "mlp.fc2": "mlp.fc2" if dinov2 else "output.dense",
                "ls1": "layer_scale1",
                "ls2": "layer_scale2",
            }
            mod, leaf = rest.rsplit(".", 1)
            leaf = "lambda1" if leaf == "gamma" else leaf
            out[pre + names[mod] + "." + leaf] = value
        elif key == "cls_token":
            out["embeddings.cls_token"] = value
        elif key == "pos_embed":
            out["embeddings.position_embeddings"] = value
        elif key.startswith("patch_embed.proj."):
            out["embeddings.patch_embeddings.projection." + parts[-1]] = value
        elif key.startswith("norm."):
            out["layernorm." + parts[-1]] = value
    out["embeddings.mask_token"] = torch.zeros(1, 1, state["cls_token"].shape[-1])
    if not dinov2:
        out["pooler.dense.weight"] = torch.zeros(1, 1)  # ViTModel's unused pooler
        out = {f"vit.{k}": v for k, v in out.items()}
    return out


@pytest.mark.parametrize("dinov2", [False, True])
def test_transformers_layout_is_converted_exactly(dinov2):
    kwargs = {"num_classes": 0, "img_size": 64} | ({"init_values": 0.5} if dinov2 else {})
    torch.manual_seed(1)
    src = timm.create_model("vit_tiny_patch16_224", **kwargs).eval()
    dst = timm.create_model("vit_tiny_patch16_224", weight_init="skip", **kwargs).eval()
    state = F.hf_vit_to_timm(_to_transformers(src.state_dict(), dinov2))
    F.load_strict(dst, state, "converted", "tiny")
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(dst(x), src(x))


def test_dinov2_release_layout_is_converted_exactly():
    kw = dict(num_classes=0, img_size=64, reg_tokens=4, no_embed_class=True, init_values=0.5)
    torch.manual_seed(2)
    src = timm.create_model("vit_tiny_patch16_224", **kw).eval()
    dst = timm.create_model("vit_tiny_patch16_224", weight_init="skip", **kw).eval()
    state = dict(src.state_dict())
    cls_pos = torch.randn(1, 1, 192)  # DINOv2 keeps a class position; timm folds it in
    original = {k: v for k, v in state.items() if k not in ("reg_token", "pos_embed", "cls_token")}
    original |= {
        "register_tokens": state["reg_token"],
        "cls_token": state["cls_token"] - cls_pos,
        "pos_embed": torch.cat([cls_pos, state["pos_embed"]], dim=1),
        "mask_token": torch.zeros(1, 192),
    }
    F.load_strict(dst, F.dinov2_to_timm(original), "release", "tiny")
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():  # cls - pos + pos rounds: float32 tolerance, not exact
        torch.testing.assert_close(dst(x), src(x), atol=1e-4, rtol=1e-4)
    assert F.dinov2_to_timm(state).keys() == state.keys()  # timm layout passes unchanged


class _Response:
    headers: dict = {}
    request = None
    status_code = 403


def _raise(exc):
    def download(*args, **kwargs):
        raise exc

    return download


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("BREAKHIS_TL_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.utils._auth._get_token_from_file_refreshed", lambda: None)


@pytest.mark.parametrize("token", [None, "hf_xxx"])
def test_gated_model_says_accept_the_licence_and_set_hf_token(online, monkeypatch, token):
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    gated = hub_errors.GatedRepoError("403 gated", response=_Response())
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _raise(gated))
    with pytest.raises(UserError) as err:
        F.build("uni2_h", "default")
    msg = str(err.value)
    assert _one_sentence(msg)
    assert "MahmoodLab/UNI2-h" in msg and "https://huggingface.co/MahmoodLab/UNI2-h" in msg
    assert "HF_TOKEN" in msg
    assert ("no access" in msg) if token else ("no HF_TOKEN is set" in msg)


@pytest.mark.parametrize(
    "exc, words",
    [
        (hub_errors.LocalEntryNotFoundError("no connection"), "unreachable"),
        (hub_errors.RepositoryNotFoundError("401", response=_Response()), "not found"),
        (hub_errors.HfHubHTTPError("500", response=_Response()), "HTTP 403"),
        (ConnectionError("reset"), "unreachable"),
    ],
)
def test_hub_failures_are_one_sentence(online, monkeypatch, exc, words):
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _raise(exc))
    with pytest.raises(UserError) as err:
        F.build("phikon_v2", "default")
    msg = str(err.value)
    assert _one_sentence(msg) and "owkin/phikon-v2" in msg and words in msg


def test_offline_mode_with_empty_cache_names_the_hub_id(tmp_path):
    """HF_HUB_OFFLINE is read when huggingface_hub is imported: a fresh interpreter (which
    also shows that importing the module imports neither timm nor huggingface_hub)."""
    script = textwrap.dedent(
        """
        import sys
        from breakhis_tl.models import foundation as F
        from breakhis_tl.errors import UserError
        print("lazy", "timm" in sys.modules, "huggingface_hub" in sys.modules)
        for name in ("uni", "phikon", "kaiko_vitl14"):
            try:
                F.build(name, "default")
            except UserError as exc:
                print(exc)
            else:
                print("built", name)
        try:
            F.build_timm("vit_tiny_patch16_224", "default")
        except UserError as exc:
            print(exc)
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("BREAKHIS_TL_OFFLINE", "HF_TOKEN")}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
            "TORCH_HOME": str(tmp_path / "torch")}  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    lines = run.stdout.strip().splitlines()
    assert run.returncode == 0 and len(lines) == 5, run.stdout + run.stderr
    lazy, uni, phikon, kaiko, tiny = lines
    assert lazy == "lazy False False"  # heavy optional deps only when such a backbone is built
    for line, hub_id in [(uni, "MahmoodLab/UNI"), (phikon, "owkin/phikon"),
                         (tiny, "timm/vit_tiny_patch16_224")]:  # fmt: skip
        assert _one_sentence(line) and hub_id in line
        assert f"`hf download {hub_id}" in line and "HF_HUB_OFFLINE" in line
        assert str(tmp_path / "hf") in line
    assert _one_sentence(kaiko) and "vitl14.pth" in kaiko and str(tmp_path / "torch") in kaiko


def test_hub_identity_reads_commit_and_blob_sha(tmp_path):
    sha = "ab" * 32
    commit = "c" * 40
    blob = tmp_path / "blobs" / sha
    blob.parent.mkdir()
    blob.write_bytes(b"w")
    snap = tmp_path / "snapshots" / commit / "model.safetensors"
    snap.parent.mkdir(parents=True)
    snap.symlink_to(blob)
    assert F._hub_identity("org/m", snap) == f"hf-org/m@{'c' * 12}-model.safetensors-{'ab' * 8}"
    assert F._hub_identity("org/m", None) == "hf-org/m@unresolved"


def test_unknown_preset_and_missing_file():
    with pytest.raises(UserError, match="Unknown foundation model"):
        F.build("uni3", "none")
    with pytest.raises(UserError, match="weights file"):
        F.build("phikon", "/no/such/file.safetensors")
