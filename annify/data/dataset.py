"""Images held in memory as one tensor, and the fixed, seeded splits every source makes.

Splits never depend on the training seed (``SPLIT_SEED``), so runs that differ only in seed are
selected on and scored against the same images, and ``--train-subset N`` trains on the same images.
The in-memory readers (digits, the MNIST family, CIFAR) return ``TensorImageDataset``; image folders
and timm's data sets are read from disk by timm's readers, a sample at a time.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from annify.data.transforms import PadCropFlip, resize_and_normalize
from annify.errors import DataError

__all__ = [
    "SPLIT_SEED",
    "TensorImageDataset",
    "check_input_size",
    "class_map",
    "existing_dir",
    "fixed_subset",
    "holdout",
    "holdout_count",
]

SPLIT_SEED = 0  # seeds every split; deliberately not the training seed


class TensorImageDataset(Dataset):
    """Images held in memory, augmented, resized and normalized one sample at a time.

    Args:
        images: (N, C, H, W), uint8 in 0..255 or float in [0, 1].
        labels: (N,) class indices.
        input_size: (C, H, W) to produce; a 1-channel image is repeated when C is 3.
        mean, std: per output channel.
        augment: applied at the stored resolution, before resizing; None for evaluation.
    """

    def __init__(self, images, labels, input_size, mean, std, augment: PadCropFlip | None = None):
        self.images, self.labels, self.input_size, self.augment = images, labels, tuple(input_size), augment
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index]
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        if self.augment is not None:
            x = self.augment(x)
        return resize_and_normalize(x[None], self.input_size, self.mean, self.std)[0], int(self.labels[index])


def existing_dir(kind: str, path: str, hint: str) -> Path:
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"{kind}: {root} does not exist — {hint}")
    return root


def check_input_size(input_size: tuple[int, int, int], channels: tuple[int, ...], kind: str) -> None:
    if len(input_size) != 3 or min(input_size) < 1:
        raise DataError(f"input_size must be (C, H, W) with positive entries, got {input_size}")
    if input_size[0] not in channels:
        raise DataError(f"{kind}: {input_size[0]} channels requested; this source gives {channels}")


def holdout_count(val_size: int | float, pool: int, kind: str) -> int:
    """Turns ``val_size`` (a count, or a fraction of the training pool) into a count."""
    count = math.ceil(val_size * pool) if isinstance(val_size, float) else int(val_size)
    if not 0 < count < pool:
        raise DataError(f"{kind}: val_size={val_size} leaves no train or no val images out of {pool}")
    return count


def holdout(labels: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (kept, held out) with a fixed seed, stratified by class when feasible."""
    from sklearn.model_selection import train_test_split

    n, counts = len(labels), torch.bincount(labels)
    counts = counts[counts > 0]
    stratify = labels.numpy() if counts.min() >= 2 and len(counts) <= min(count, n - count) else None
    kept, held = train_test_split(range(n), test_size=count, random_state=SPLIT_SEED, stratify=stratify)
    return torch.tensor(sorted(kept)), torch.tensor(sorted(held))


def class_map(ds) -> dict | None:
    """A timm dataset's class-name-to-index map (its reader's, or its own), None where it has none."""
    return getattr(getattr(ds, "reader", None), "class_to_idx", None) or getattr(ds, "class_to_idx", None)


def fixed_subset(ds: Dataset, count: int, source: str) -> Dataset:
    """A fixed subset of ``count`` training images: stratified (and still a tensor dataset) in memory,
    uniform otherwise (a folder's labels are not known without reading every sample)."""
    n = len(ds)
    if not 1 <= count <= n:
        raise DataError(f"train_subset={count} is not between 1 and the {n} training images of {source}")
    classes = len(ds.labels.unique()) if isinstance(ds, TensorImageDataset) else len(class_map(ds) or ())
    if count < classes:
        raise DataError(
            f"train_subset={count} is fewer than the {classes} classes of {source}, so some classes would get "
            f"no training image; give at least {classes} (e.g. --train-subset {10 * classes})"
        )
    if count == n:
        return ds
    if isinstance(ds, TensorImageDataset):
        _, chosen = holdout(ds.labels, count)
        return TensorImageDataset(
            ds.images[chosen], ds.labels[chosen], ds.input_size, ds.mean.flatten().tolist(),
            ds.std.flatten().tolist(), ds.augment,
        )  # fmt: skip
    kept = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))[:count].sort().values
    return Subset(ds, kept.tolist())
