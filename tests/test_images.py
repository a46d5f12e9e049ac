import numpy as np
import pytest
from PIL import Image

from breakhis_tl.data.dataset import ImageDataset, collate, make_loader
from breakhis_tl.data.images import ImageError, load_rgb
from breakhis_tl.data.transforms import N_VIEWS, Preprocessing, decode_transform, dihedral


def _save(tmp_path, name, im, **kw):
    p = tmp_path / name
    im.save(p, **kw)
    return p


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "I;16", "1"])
def test_modes_become_rgb(tmp_path, mode):
    arr = (np.arange(64 * 48) % 256).reshape(48, 64).astype(np.uint8)
    if mode == "I;16":
        im = Image.fromarray(arr.astype(np.uint16) * 257)
    else:
        im = Image.fromarray(arr, "L").convert(mode)
    out = load_rgb(_save(tmp_path, "x.png", im))
    assert out.mode == "RGB" and out.size == (64, 48)
    if mode in ("L", "I;16"):
        # 16-bit values are scaled down, not clipped to white
        assert np.abs(np.asarray(out)[..., 0].astype(int) - arr).max() <= 1


def test_bad_files_one_sentence(tmp_path, breakhis_sample):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty.png is empty \(0 bytes\)"):
        load_rgb(empty)
    text = tmp_path / "text.png"
    text.write_text("hello, not an image")
    with pytest.raises(ImageError, match="text.png is not an image that Pillow can read"):
        load_rgb(text)
    real = next(breakhis_sample.rglob("*.png")).read_bytes()
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(real[: len(real) // 2])
    with pytest.raises(ImageError, match="trunc.png is truncated or corrupt"):
        load_rgb(trunc)


def test_decompression_bomb_is_a_clear_error(tmp_path, monkeypatch):
    p = _save(tmp_path, "big.png", Image.new("RGB", (300, 300)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="big.png is too large to decode safely"):
        load_rgb(p)


def test_dataset_reports_failures_and_keeps_others(tmp_path, breakhis_sample):
    good = sorted(breakhis_sample.rglob("*.png"))[:3]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    ds = ImageDataset([*good[:2], bad, good[2]], decode_transform(Preprocessing()), [0, 1, 0, 1])
    x, y, idx, failed, sizes = collate([ds[i] for i in range(4)])
    assert x.shape == (3, 3, 224, 224) and x.dtype.is_floating_point is False
    assert idx.tolist() == [0, 1, 3] and y.tolist() == [0, 1, 1]
    assert failed[0][0] == 2 and "bad.png" in failed[0][1]
    assert sizes == [(700, 460)] * 3
    batches = list(make_loader(ds, batch_size=2, workers=1))
    assert sum(len(b[2]) for b in batches) == 3


def test_dihedral_views_are_distinct_and_invertible():
    x = torch_arange()
    views = [dihedral(x, k) for k in range(N_VIEWS)]
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    assert (dihedral(dihedral(x, 1), 3) == x).all()


def torch_arange():
    import torch

    return torch.arange(16).reshape(1, 4, 4)


def test_default_workers_follow_the_usable_cores(monkeypatch):
    """A core per worker beside the main process, at most 4; 2 on a 2-core machine, where 1
    worker was measured slowest (README, Performance); none on one core."""
    import breakhis_tl.data.dataset as dataset

    got = {}
    for cores in (1, 2, 3, 5, 16):
        monkeypatch.setattr(dataset, "usable_cores", lambda c=cores: c)
        got[cores] = dataset.default_workers()
    assert got == {1: 0, 2: 2, 3: 2, 5: 4, 16: 4}


def test_epoch_seeded_draws_per_image_and_epoch_and_leaves_the_callers_generator():
    """Each (image, epoch) key gets its own draw, the same key the same draw, and the
    caller's random stream (the head's, with no workers) is left where it was."""
    import torch
    from torch.utils.data import Dataset

    from breakhis_tl.data.dataset import EpochSeeded, EpochShuffle

    class Draws(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return float(torch.rand(()))

    ds, state = EpochSeeded(Draws(), seed=3), torch.get_rng_state()
    draws = {(i, e): ds[(i, e)] for i in range(4) for e in (1, 2)}
    assert torch.equal(torch.get_rng_state(), state)
    assert len(set(draws.values())) == 8 and ds[(2, 1)] == draws[(2, 1)]
    assert EpochSeeded(Draws(), seed=4)[(2, 1)] != draws[(2, 1)]
    order = EpochShuffle(4, seed=3)
    order.epoch = 2
    keys = iter(order)
    order.epoch = 3  # a pass in progress keeps its epoch
    assert {e for _, e in keys} == {2}


def test_fast_png_decoder_gives_pillows_pixels(breakhis_sample, idc_sample):
    """Real BreakHis and IDC PNGs through the fast decoder: the same pixels as Pillow's."""
    from breakhis_tl.data import images

    files = sorted(breakhis_sample.rglob("*.png"))[:6] + sorted(idc_sample.rglob("*.png"))[:20]
    assert images.pyspng is not None, "pyspng is in requirements.txt but not installed"
    for f in files:
        fast = images._fast_png(f)
        assert fast is not None, f
        with Image.open(f) as im:
            ref = np.asarray(im.convert("RGB"))
        assert np.array_equal(np.asarray(fast), ref), f
        assert np.array_equal(np.asarray(load_rgb(f)), ref), f


def test_fast_png_decoder_leaves_other_files_to_pillow(tmp_path, breakhis_sample):
    from breakhis_tl.data import images

    grey = _save(tmp_path, "grey.png", Image.new("L", (8, 8), 7))
    deep = _save(tmp_path, "deep.png", Image.fromarray(np.full((8, 8), 40000, np.uint16)))
    jpeg = _save(tmp_path, "rgb.jpg", Image.new("RGB", (8, 8), (1, 2, 3)))
    cut = tmp_path / "cut.png"
    src = sorted(breakhis_sample.rglob("*.png"))[0]
    cut.write_bytes(src.read_bytes()[:5000])
    for p in (grey, deep, jpeg, cut):
        assert images._fast_png(p) is None, p
    assert np.asarray(load_rgb(deep))[0, 0, 0] == round(40000 / 65535 * 255)


def test_a_damaged_chunk_is_refused_whichever_decoder_is_installed(tmp_path, breakhis_sample):
    """A wrong CRC in an ancillary chunk: Pillow refuses the file, so the fast path must too
    (which images a run reads must not depend on pyspng being installed)."""
    from breakhis_tl.data import images

    data = sorted(breakhis_sample.rglob("*.png"))[0].read_bytes()
    n = int.from_bytes(data[33:37], "big")  # the chunk after IHDR
    bad = bytearray(data)
    bad[41 + n] ^= 0xFF  # its CRC
    p = tmp_path / "badcrc.png"
    p.write_bytes(bytes(bad))
    assert not images._chunks_intact(bytes(bad)) and images._chunks_intact(data)
    assert images._fast_png(p) is None
    with pytest.raises(ImageError, match="badcrc.png is not an image that Pillow can read"):
        load_rgb(p)


def test_without_pyspng_pillow_gives_the_same_pixels(breakhis_sample, monkeypatch):
    from breakhis_tl.data import images

    path = sorted(breakhis_sample.rglob("*.png"))[1]
    fast = np.asarray(load_rgb(path))
    monkeypatch.setattr(images, "pyspng", None)
    assert images._fast_png(path) is None
    assert np.array_equal(np.asarray(load_rgb(path)), fast)
