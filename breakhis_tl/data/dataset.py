"""A torch Dataset over an index; broken images come back as failures, not exceptions.

A worker that raised would stop the whole DataLoader; returning the failure lets the
caller report the file by name and go on with the other images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from breakhis_tl.data.images import ImageError, load_rgb, usable_cores


class ImageDataset(Dataset):
    def __init__(
        self, paths: Sequence[str], transform: Callable, labels: Sequence[int] | None = None
    ):
        self.paths = list(paths)
        self.transform = transform
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            im = load_rgb(self.paths[i])
        except ImageError as exc:
            return None, self.labels[i], i, str(exc), (0, 0)
        return self.transform(im), self.labels[i], i, "", im.size


class StainedImages(ImageDataset):
    """Each image normalised once and turned into its stain views, all decoded: item 0 is a
    uint8 tensor [n_views, 3, S, S] (views an image does not need are zeros), or a tuple of
    them, one per size, when the transform is a `DecodeSizes`. A failed
    normalisation keeps the image and carries its message in item 3 (see `collate_noted`)."""

    def __init__(self, paths, transform, stain, keys: Sequence[str], n_views: Sequence[int],
                 labels: Sequence[int] | None = None,
                 hash_pixels: Sequence[bool] | None = None):  # fmt: skip
        super().__init__(paths, transform, labels)
        self.stain, self.keys, self.n_views = stain, list(keys), list(n_views)
        self.width = max(self.n_views, default=1)
        self.hash_pixels = list(hash_pixels) if hash_pixels is not None else None

    def __getitem__(self, i: int):
        try:
            im = load_rgb(self.paths[i])
        except ImageError as exc:
            return None, self.labels[i], i, str(exc), (0, 0), None
        pixel = None
        if self.hash_pixels and self.hash_pixels[i]:  # the duplicate check's hash, same decode
            from breakhis_tl.data.identity import image_pixels

            pixel = image_pixels(im)
        views, note = self.stain.prepare(im, self.paths[i], self.keys[i], self.n_views[i])
        x = [self.transform(v) for v in views]
        if isinstance(x[0], tuple):  # DecodeSizes: one stack per input size
            x = tuple(self._pad(list(s)) for s in zip(*x, strict=True))
        else:
            x = self._pad(x)
        return x, self.labels[i], i, note, im.size, pixel

    def _pad(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(x + [torch.zeros_like(x[0])] * (self.width - len(x)))


class OnlineStain:
    """End-to-end training's stain step: normalise, then a random stain view in 0..views
    (drawn from torch's generator, which `EpochSeeded` seeds per epoch and image)."""

    def __init__(self, stain, transform: Callable):
        self.stain, self.transform = stain, transform

    def __call__(self, im, name: str = "<image>"):
        view = int(torch.randint(self.stain.views + 1, ())) if self.stain.views else 0
        key = str(int(torch.randint(2**31 - 1, ())))  # a fresh jitter every epoch
        views, _ = self.stain.prepare(im, name, key, view + 1)
        return self.transform(views[-1])


def collate_noted(items):
    """`collate`, plus (index, message) of the readable images that carry a note."""
    notes = [(it[2], it[3]) for it in items if it[0] is not None and it[3]]
    return (*collate(items), notes)


def collate_hashed(items: list[tuple]) -> tuple:
    """`collate_noted`, plus (index, (pixel hash, "WxH")) of the images hashed on the way."""
    hashed = [(it[2], it[5]) for it in items if it[0] is not None and it[5] is not None]
    return (*collate_noted(items), hashed)


def collate(items):
    """Stack the good images; keep (index, message) of the bad ones and each image's size."""
    good = [it for it in items if it[0] is not None]
    failed = [(it[2], it[3]) for it in items if it[0] is None]
    if good:
        xs = [it[0] for it in good]
        if isinstance(xs[0], tuple):  # DecodeSizes: one batch per input size
            x = tuple(map(torch.stack, zip(*xs, strict=True)))
        else:
            x = torch.stack(xs)
        y = torch.tensor([it[1] for it in good])
        idx = torch.tensor([it[2] for it in good])
    else:
        x, y, idx = None, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    sizes = [it[4] for it in good]
    return x, y, idx, failed, sizes


def make_loader(
    dataset: ImageDataset,
    batch_size: int = 32,
    workers: int | None = None,
    seed: int = 0,
    collate_fn: Callable = collate,
    sampler: Sampler | None = None,
    persistent: bool = False,
    device: torch.device | str | None = None,
) -> DataLoader:
    """In file order unless a `sampler` orders it (`EpochShuffle`). `persistent`: the workers
    outlive one pass, for a loader iterated every epoch (starting them again each epoch cost
    the end-to-end baseline about a quarter of its epoch). `device`: where the batches go,
    for the default number of workers and pinned memory (a GPU's copies then overlap)."""
    if workers is None:
        workers = default_workers(device)
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        persistent_workers=persistent and workers > 0,
        generator=g,
        pin_memory=cuda,
    )


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's order, the cached and the end-to-end training alike."""
    return seed * 100_003 + epoch


class EpochShuffle(Sampler[tuple[int, int]]):
    """A seeded order per epoch (set `epoch` before each pass) from one loader, so its
    workers can persist: the order depends on the seed and the epoch alone. It yields
    (image, epoch) keys for `EpochSeeded`."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def __iter__(self):
        epoch = self.epoch  # fixed for the pass, whatever changes it meanwhile
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        return iter([(i, epoch) for i in torch.randperm(self.n, generator=g).tolist()])

    def __len__(self) -> int:
        return self.n


class EpochSeeded(Dataset):
    """Each image's random augmentation drawn from its own seed (run seed, epoch, image):
    persistent workers are seeded only once, so without it an epoch's augmentation would
    depend on the epochs before it and on the number of workers."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        i, epoch = key
        with torch.random.fork_rng(devices=[]):  # the caller's generator is left as it was
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_003 + i) % 2**63)
            return self.dataset[i]


def default_workers(device: torch.device | str | None = None) -> int:
    """On the CPU: a core per worker beside the main process, at most 4, and 2 on a 2-core
    machine (benchmarks/loader_workers.py measures the choice). Feeding a GPU, the cores do
    nothing but decode, and a few workers leave the GPU waiting: every usable core but the
    main process's, as far as memory allows (`WORKER_GIB` each)."""
    cores = usable_cores()
    cpu_rule = 0 if cores < 2 else min(4, max(2, cores - 1))
    if device is None or torch.device(device).type != "cuda":
        return cpu_rule
    return max(cpu_rule, min(cores - 1, int(available_gib() // WORKER_GIB)))


WORKER_GIB = 1.0  # a decoding worker's own memory, with room for its prefetched batches


def available_gib() -> float:
    """Memory free for new processes (MemAvailable), in GiB; unknown counts as plenty."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")
