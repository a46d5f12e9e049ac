"""A torch Dataset over an index; broken images come back as failures, not exceptions.

A worker that raised would stop the whole DataLoader; returning the failure lets the
caller report the file by name and go on with the other images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from breakhis_tl.images import ImageError, load_rgb


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


def collate(items):
    """Stack the good images; keep (index, message) of the bad ones and each image's size."""
    good = [it for it in items if it[0] is not None]
    failed = [(it[2], it[3]) for it in items if it[0] is None]
    if good:
        x = torch.stack([it[0] for it in good])
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
    shuffle: bool = False,
    seed: int = 0,
) -> DataLoader:
    if workers is None:
        workers = default_workers()
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=False,
        generator=g,
        pin_memory=torch.cuda.is_available(),
    )


def default_workers() -> int:
    import os

    return min(4, max(0, (os.cpu_count() or 1) - 1))
