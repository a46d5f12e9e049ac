import dataclasses
import os
import shutil

import numpy as np
import pytest
import torch

from breakhis_tl.backbones import REGISTRY, build_backbone, parse_archs
from breakhis_tl.errors import UserError
from breakhis_tl.features import (
    FeatureCache,
    Request,
    cache_key,
    extract,
    fast_path,
    images_digest,
)
from breakhis_tl.images import load_rgb
from breakhis_tl.transforms import decode_transform, dihedral, normalize


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0", "default")


@pytest.fixture(scope="module")
def sample_paths(breakhis_sample):
    return sorted(str(p) for p in breakhis_sample.rglob("*.png"))


def test_registry_names_and_feature_sizes():
    for name in (
        "vgg16",
        "resnet50",
        "densenet121",
        "inception_v3",
        "mobilenet_v2",
        "efficientnet_b0",
        "convnext_tiny",
        "vit_b_16",
        "efficientnet_lite0",
    ):
        assert name in REGISTRY
    assert REGISTRY["inception_v3"].prep.input_size == 299


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet50", "inception_v3", "vgg16"])
def test_frozen_backbone_gives_documented_size(name):
    bb = build_backbone(name, "none", seed=0)
    size = bb.prep.input_size
    out = bb(torch.randn(2, 3, size, size))
    assert out.shape == (2, bb.feature_dim)
    assert not any(p.requires_grad for p in bb.module.parameters())
    bb.module.train()  # batch-norm statistics stay fixed whatever a caller does
    assert not bb.module.training
    assert all(not m.training for m in bb.module.modules())


def test_lite0_pretrained_offline_and_deterministic(lite0, sample_paths):
    im = decode_transform(lite0.prep)(load_rgb(sample_paths[0]))
    x = normalize(im, lite0.prep)[None]
    a, b = lite0(x), lite0(x)
    assert torch.equal(a, b) and a.shape == (1, 1280)
    # pretrained ImageNet weights differ from a random init of the same network
    rand = build_backbone("efficientnet_lite0", "none", seed=0)
    assert not torch.allclose(a, rand(x), atol=1e-3)


def test_random_init_depends_on_seed():
    x = torch.randn(1, 3, 224, 224)
    a = build_backbone("mobilenet_v2", "none", seed=0)
    b = build_backbone("mobilenet_v2", "none", seed=0)
    c = build_backbone("mobilenet_v2", "none", seed=1)
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))
    assert a.weights_id == "none-seed0" != c.weights_id


def test_missing_weights_name_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match=r"put resnet50-[0-9a-f]+\.pth in .*checkpoints"):
        build_backbone("resnet50", "default")


def test_weights_file(tmp_path):
    bb = build_backbone("mobilenet_v2", "none", seed=3)
    from torchvision.models import mobilenet_v2

    torch.manual_seed(3)
    full = mobilenet_v2()
    torch.save(full.state_dict(), tmp_path / "w.pth")
    from_file = build_backbone("mobilenet_v2", str(tmp_path / "w.pth"))
    x = torch.randn(1, 3, 224, 224)
    assert torch.allclose(from_file(x), bb(x), atol=1e-5)
    assert from_file.weights_id.startswith("file-")
    with pytest.raises(UserError, match="does not fit vgg16"):
        build_backbone("vgg16", str(tmp_path / "w.pth"))


def test_unknown_architecture():
    with pytest.raises(UserError, match="Unknown architecture 'resnet51'"):
        parse_archs("efficientnet_lite0,resnet51")
    assert len(parse_archs("all")) == 7


def test_cache_key_changes_with_every_input(lite0, sample_paths, tmp_path):
    digest = images_digest(sample_paths)
    base = cache_key(lite0, digest, 0)
    assert base == cache_key(lite0, images_digest(list(sample_paths)), 0)
    other_prep = dataclasses.replace(lite0, prep=dataclasses.replace(lite0.prep, input_size=256))
    other_weights = dataclasses.replace(lite0, weights_id="none-seed0")
    other_arch = dataclasses.replace(lite0, name="mobilenet_v2")
    keys = {
        base,
        cache_key(lite0, digest, 1),
        cache_key(other_prep, digest, 0),
        cache_key(other_weights, digest, 0),
        cache_key(other_arch, digest, 0),
        cache_key(lite0, images_digest(sample_paths[:-1]), 0),
        cache_key(lite0, images_digest(sample_paths[::-1]), 0),
    }
    assert len(keys) == 7
    # a file rewritten in place (new mtime/size) is a different image list
    copy = tmp_path / "a.png"
    shutil.copy(sample_paths[0], copy)
    before = images_digest([str(copy)])
    os.utime(copy, ns=(1, 1))
    assert images_digest([str(copy)]) != before


def test_extract_then_cache_hit(lite0, sample_paths, tmp_path):
    cache = FeatureCache(tmp_path)
    rows = np.arange(len(sample_paths))
    first, rep1 = extract(
        sample_paths,
        [Request(lite0, 0, rows), Request(lite0, 3, rows[:4])],
        cache,
        workers=0,
        progress=False,
    )
    assert rep1.extracted == ["efficientnet_lite0/view 0", "efficientnet_lite0/view 3"]
    assert rep1.decodes == len(sample_paths)  # view 3 came from the same decode
    again, rep2 = extract(
        sample_paths,
        [Request(lite0, 0, rows), Request(lite0, 3, rows[:4])],
        cache,
        workers=0,
        progress=False,
    )
    assert rep2.extracted == [] and rep2.decodes == 0
    for k in first:
        assert torch.equal(first[k][0], again[k][0]) and first[k][0].dtype == torch.float16
    # view 3 is the backbone on the rotated-and-flipped crop of the same decode
    x = decode_transform(lite0.prep)(load_rgb(sample_paths[2]))
    direct = lite0(normalize(dihedral(x, 3), lite0.prep)[None])[0]
    cos = torch.nn.functional.cosine_similarity(
        direct, first[("efficientnet_lite0", 3)][0][2].float(), 0
    )
    assert cos > 0.999


def test_incomplete_cache_entry_is_ignored(lite0, sample_paths, tmp_path):
    cache = FeatureCache(tmp_path)
    rows = np.arange(3)
    extract(sample_paths, [Request(lite0, 0, rows)], cache, workers=0, progress=False)
    marker = next(tmp_path.rglob("*.json"))
    marker.unlink()  # as if killed between the features file and the marker
    _, rep = extract(sample_paths, [Request(lite0, 0, rows)], cache, workers=0, progress=False)
    assert rep.extracted == ["efficientnet_lite0/view 0"]
    data = next(tmp_path.rglob("*.safetensors"))
    data.write_bytes(data.read_bytes()[:100])  # damaged features file, marker present
    _, rep = extract(sample_paths, [Request(lite0, 0, rows)], cache, workers=0, progress=False)
    assert rep.extracted == ["efficientnet_lite0/view 0"]


def test_decode_once_per_input_size(lite0, sample_paths):
    mob = build_backbone("mobilenet_v2", "none")
    inc = build_backbone("inception_v3", "none")
    rows = np.arange(5)
    reqs = [Request(b, v, rows) for b in (lite0, mob, inc) for v in (0, 1)]
    out, rep = extract(sample_paths, reqs, None, workers=0, progress=False)
    assert rep.decodes == 2 * 5  # 224 px once and 299 px once, whatever the views and backbones
    assert out[("inception_v3", 1)][0].shape == (5, 2048)


def test_broken_image_skipped_or_strict(lite0, sample_paths, tmp_path, caplog):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    paths = [sample_paths[0], str(bad), sample_paths[1]]
    out, rep = extract(paths, [Request(lite0, 0, np.arange(3))], None, workers=0, progress=False)
    feats, ok = out[("efficientnet_lite0", 0)]
    assert ok.tolist() == [True, False, True]
    assert feats[0].abs().sum() > 0 and list(rep.failed) == [1]
    assert "broken.png" in caplog.text and "skipped" in caplog.text
    with pytest.raises(UserError, match="broken.png .*--strict"):
        extract(
            paths, [Request(lite0, 0, np.arange(3))], None, workers=0, strict=True, progress=False
        )


def test_fast_path_choice():
    from breakhis_tl.features import cpu_supports_bf16

    cpu = fast_path(torch.device("cpu"))
    assert cpu.channels_last
    assert cpu.autocast == (torch.bfloat16 if cpu_supports_bf16() else None)
    assert fast_path(torch.device("cpu"), optimised=False) == type(cpu)(None, False)


def test_timm_is_imported_only_when_asked_for():
    import importlib.util
    import sys

    assert "timm" not in sys.modules  # building torchvision backbones never imports it
    if importlib.util.find_spec("timm") is None:
        with pytest.raises(UserError, match="timm:<name> backbones need timm; pip install timm"):
            build_backbone("timm:resnet18", "none")
    else:
        bb = build_backbone("timm:resnet18", "none")
        assert bb(torch.randn(1, 3, 224, 224)).shape == (1, bb.feature_dim)
