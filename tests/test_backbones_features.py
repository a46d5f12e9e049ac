import dataclasses
import os
import shutil

import numpy as np
import pytest
import torch

from breakhis_tl.data.identity import ImageStore
from breakhis_tl.data.images import load_rgb
from breakhis_tl.data.transforms import decode_transform, dihedral, normalize
from breakhis_tl.errors import UserError
from breakhis_tl.features.extract import (
    FeatureCache,
    Request,
    extract,
    fast_path,
    feature_space,
    run_backbone,
)
from breakhis_tl.models.backbones import REGISTRY, build_backbone, parse_archs


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


def test_feature_space_changes_with_every_input(lite0):
    fp = type(fast_path(torch.device("cpu")))(None, True)  # fp32 + channels_last
    base = feature_space(lite0, 0, fp)
    assert base == feature_space(dataclasses.replace(lite0), 0, fp)
    other_prep = dataclasses.replace(lite0, prep=dataclasses.replace(lite0.prep, input_size=256))
    keys = {
        base,
        feature_space(lite0, 1, fp),
        feature_space(other_prep, 0, fp),
        feature_space(dataclasses.replace(lite0, weights_id="none-seed0"), 0, fp),
        feature_space(dataclasses.replace(lite0, name="mobilenet_v2"), 0, fp),
        feature_space(lite0, 0, type(fp)(torch.bfloat16, True)),  # bf16 features differ
        feature_space(lite0, 0, fp, stain="macenko"),
    }
    assert len(keys) == 7


def test_random_weights_feature_space_follows_the_initialising_library(lite0, monkeypatch):
    """The seed names random weights only together with the library that draws them."""
    from breakhis_tl.features import extract as features

    fp = type(fast_path(torch.device("cpu")))(None, True)
    rand = dataclasses.replace(lite0, weights="none", weights_id="none-seed0")
    assert "efficientnet-lite-pytorch" in features.initialiser_versions(rand.name)
    before, pretrained = feature_space(rand, 0, fp), feature_space(lite0, 0, fp)
    monkeypatch.setattr(features, "initialiser_versions", lambda name: "torch 9, x 1")
    assert feature_space(rand, 0, fp) != before
    assert feature_space(lite0, 0, fp) == pretrained  # pretrained weights: no such part


def test_content_ids_in_worker_blocks_equal_one_by_one(idc_sample, tmp_path):
    """Many files go to loader workers in blocks; the ids (and a missing file's None) are the
    ones a plain loop gives, in the caller's order."""
    from breakhis_tl.data import identity

    paths = [str(p) for p in sorted(idc_sample.rglob("*.png"))[:40]]
    paths.insert(7, str(tmp_path / "gone.png"))
    want = [None if "gone" in p else identity.content_id(p) for p in paths]
    assert identity._in_blocks(identity._content_ids, paths, None, size=4) == want  # workers
    assert identity._in_blocks(identity._content_ids, paths, None, size=64) == want  # in-process
    assert identity._in_blocks(identity._content_ids, paths, 0, size=4) == want
    store = ImageStore(tmp_path / "i.sqlite")
    assert store.content_ids(paths) == want == store.content_ids(paths)  # hashed, then read


def test_content_id_sees_a_change_with_same_size_and_mtime(sample_paths, tmp_path):
    store = ImageStore(tmp_path / "images.sqlite")
    copy = tmp_path / "a.png"
    shutil.copy(sample_paths[0], copy)
    st = os.stat(copy)
    (before,) = store.content_ids([str(copy)])
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte in the middle: same size
    copy.write_bytes(bytes(data))
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime
    assert os.stat(copy).st_size == st.st_size and os.stat(copy).st_mtime_ns == st.st_mtime_ns
    (after,) = store.content_ids([str(copy)])
    assert after != before


def _cosine_floor(fp) -> float:
    # like with like: the same mode on both sides; bf16 rounds more than fp32
    return 0.995 if fp.autocast is not None else 0.9999


def test_extract_then_cache_hit(lite0, sample_paths, tmp_path):
    cache = FeatureCache(tmp_path / "features")
    store = ImageStore(tmp_path / "images.sqlite")
    rows = np.arange(len(sample_paths))
    reqs = [Request(lite0, 0, rows), Request(lite0, 3, rows[:4])]
    first, rep1 = extract(sample_paths, reqs, cache, workers=0, progress=False, store=store)
    assert rep1.extracted == ["efficientnet_lite0/view 0", "efficientnet_lite0/view 3"]
    assert rep1.decodes == len(sample_paths)  # view 3 came from the same decode
    again, rep2 = extract(sample_paths, reqs, cache, workers=0, progress=False, store=store)
    assert rep2.extracted == [] and rep2.decodes == 0
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a[0], b[0]) and a[0].dtype == torch.float16
    # view 3 is the backbone on the rotated-and-flipped crop of the same decode
    fp = fast_path(torch.device("cpu"))
    x = decode_transform(lite0.prep)(load_rgb(sample_paths[2]))
    direct = run_backbone(lite0, normalize(dihedral(x, 3), lite0.prep)[None], fp)[0]
    cos = torch.nn.functional.cosine_similarity(direct, first[1][0][2].float(), 0)
    assert cos > _cosine_floor(fp)


def test_cache_is_per_image_a_subset_or_reorder_extracts_nothing(lite0, sample_paths, tmp_path):
    """A changed --magnification, seed or fold picks another subset of the same images."""
    cache, store = FeatureCache(tmp_path / "f"), ImageStore(tmp_path / "i.sqlite")
    kw = dict(workers=0, progress=False, store=store)
    (full,), _ = extract(sample_paths[:8], [Request(lite0, 0, np.arange(8))], cache, **kw)
    subset = [sample_paths[i] for i in (5, 1, 3)]
    (part,), rep = extract(subset, [Request(lite0, 0, np.arange(3))], cache, **kw)
    assert rep.extracted == [] and rep.decodes == 0
    assert torch.equal(part[0], full[0][[5, 1, 3]])
    # two new images beside cached ones: only the new ones are decoded
    more = sample_paths[6:10]
    (mixed,), rep = extract(more, [Request(lite0, 0, np.arange(4))], cache, **kw)
    assert rep.decodes == 2 and torch.equal(mixed[0][:2], full[0][6:8])


def test_changed_file_is_extracted_again(lite0, sample_paths, tmp_path):
    cache, store = FeatureCache(tmp_path / "f"), ImageStore(tmp_path / "i.sqlite")
    img = tmp_path / "x" / "a.png"
    img.parent.mkdir()
    shutil.copy(sample_paths[0], img)
    st = os.stat(img)
    kw = dict(workers=0, progress=False, store=store)
    (a,), _ = extract([str(img)], [Request(lite0, 0, np.arange(1))], cache, **kw)
    load_rgb(sample_paths[1]).resize(load_rgb(sample_paths[0]).size).save(img)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    (b,), rep = extract([str(img)], [Request(lite0, 0, np.arange(1))], cache, **kw)
    assert rep.decodes == 1 and not torch.equal(a[0], b[0])


def test_incomplete_cache_entry_is_ignored(lite0, sample_paths, tmp_path):
    cache = FeatureCache(tmp_path)
    rows = np.arange(3)
    kw = dict(workers=0, progress=False, store=ImageStore(None))
    extract(sample_paths, [Request(lite0, 0, rows)], cache, **kw)
    marker = next(tmp_path.rglob("*.json"))
    marker.unlink()  # as if killed between the features file and the marker
    _, rep = extract(sample_paths, [Request(lite0, 0, rows)], cache, **kw)
    assert rep.extracted == ["efficientnet_lite0/view 0"]
    data = next(tmp_path.rglob("*.safetensors"))
    data.write_bytes(data.read_bytes()[:100])  # damaged features file, marker present
    _, rep = extract(sample_paths, [Request(lite0, 0, rows)], cache, **kw)
    assert rep.extracted == ["efficientnet_lite0/view 0"]


def test_decode_once_for_all_input_sizes(lite0, sample_paths):
    mob = build_backbone("mobilenet_v2", "none")
    inc = build_backbone("inception_v3", "none")
    rows = np.arange(5)
    reqs = [Request(b, v, rows) for b in (lite0, mob, inc) for v in (0, 1)]
    out, rep = extract(sample_paths, reqs, None, workers=0, progress=False)
    assert rep.decodes == 5  # one decode per image for both sizes, all views and backbones
    assert out[-1][0].shape == (5, 2048)
    # each size is the image resized from that one decode, as a run of that size alone makes it
    (alone,), rep = extract(sample_paths, [reqs[-1]], None, workers=0, progress=False)
    assert rep.decodes == 5 and torch.equal(alone[0], out[-1][0])
    (alone,), _ = extract(sample_paths, [reqs[2]], None, workers=0, progress=False)
    assert torch.equal(alone[0], out[2][0])
    # and the pixels are those of a decode per size, which filled the caches before
    from breakhis_tl.data.transforms import DecodeSizes

    im = load_rgb(sample_paths[0])
    both = DecodeSizes([lite0.prep, inc.prep])(im)
    assert torch.equal(both[0], decode_transform(lite0.prep)(im))
    assert torch.equal(both[1], decode_transform(inc.prep)(im))


def test_backbone_runs_the_batch_in_chunks_of_its_own_size(lite0, sample_paths, monkeypatch):
    """A foundation preset's batch caps what one forward sees, whatever the loader's batch."""
    import breakhis_tl.features.extract as ex
    from breakhis_tl.models.foundation import PRESETS, max_batch

    assert max_batch("uni") == PRESETS["uni"].batch_size and max_batch("resnet50") is None
    seen = []
    real = ex.run_backbone
    monkeypatch.setattr(ex, "run_backbone", lambda bb, x, p: seen.append(len(x)) or real(bb, x, p))
    req = [Request(lite0, 0, np.arange(5))]
    (whole,), _ = extract(sample_paths, req, None, workers=0, progress=False, batch_size=32)
    assert seen == [5]
    monkeypatch.setattr(ex, "max_batch", lambda name: 2)
    seen.clear()
    (chunked,), _ = extract(sample_paths, req, None, workers=0, progress=False, batch_size=32)
    assert seen == [2, 2, 1]
    assert torch.allclose(whole[0].float(), chunked[0].float(), atol=2e-2)


def test_broken_image_skipped_or_strict(lite0, sample_paths, tmp_path, caplog):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    paths = [sample_paths[0], str(bad), sample_paths[1]]
    out, rep = extract(paths, [Request(lite0, 0, np.arange(3))], None, workers=0, progress=False)
    feats, ok = out[0]
    assert ok.tolist() == [True, False, True]
    assert feats[0].abs().sum() > 0 and list(rep.failed) == [1]
    assert "broken.png" in caplog.text and "skipped" in caplog.text
    with pytest.raises(UserError, match="broken.png .*--strict"):
        extract(
            paths, [Request(lite0, 0, np.arange(3))], None, workers=0, strict=True, progress=False
        )


def test_fast_path_choice():
    from breakhis_tl.features.extract import cpu_supports_bf16

    cpu = fast_path(torch.device("cpu"))
    assert cpu.channels_last
    assert cpu.autocast == (torch.bfloat16 if cpu_supports_bf16() else None)
    assert cpu.cast == cpu_supports_bf16() and cpu.folded
    assert fast_path(torch.device("cpu"), optimised=False) == type(cpu)(None, False)


def test_timm_is_imported_only_when_asked_for():
    """In a fresh interpreter (other tests in this process may have imported timm)."""
    import subprocess
    import sys

    code = (
        "import sys; from breakhis_tl.models.backbones import build_backbone, check_arch; "
        "build_backbone('mobilenet_v2', 'none'); check_arch('uni'); "
        "assert 'timm' not in sys.modules and 'huggingface_hub' not in sys.modules; "
        "bb = build_backbone('timm:resnet18', 'none'); assert 'timm' in sys.modules; "
        "print(bb.feature_dim)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "512"
