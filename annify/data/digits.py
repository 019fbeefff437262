"""``digits``: scikit-learn's bundled 8x8 digits, held in memory; always available offline.

1,797 images of 10 classes, small enough that a whole training run takes seconds: the default for tests
and examples. A fixed 20% is the test set; validation is held out of the rest.
"""

from __future__ import annotations

import functools
import math

import torch

from annify.data.dataset import TensorImageDataset, check_input_size, holdout, holdout_count
from annify.data.sources import DataInfo
from annify.data.transforms import PadCropFlip

__all__ = ["datasets", "info"]


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All digits as (images in [0,1], labels), and the fixed (pool, test) index split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    labels = torch.tensor(y, dtype=torch.long)
    pool, test = holdout(labels, math.ceil(0.2 * len(labels)))  # test = 20% (360 images)
    return images, labels, pool, test


def info(kind: str, arg: None) -> DataInfo:
    """10 classes, 8x8 gray. Normalized with the training pool (train + val): independent of val_size,
    never sees test."""
    images, _, pool, _ = _digits()
    mean, std = images[pool].mean().item(), images[pool].std().item()
    return DataInfo(10, (1, 8, 8), (mean,), (std,), "digits")


def datasets(kind: str, arg: None, input_size, val_size, augment: bool) -> dict[str, TensorImageDataset]:
    """Train, val (270 images, 15% of all, by default) and test (20%), at ``input_size`` (1 or 3 channels)."""
    native = info(kind, arg)
    input_size = input_size or native.input_size
    check_input_size(input_size, (1, 3), "digits")
    images, labels, pool, test = _digits()
    count = holdout_count(270 if val_size is None else val_size, len(pool), "digits")  # 15% of all
    kept, held = holdout(labels[pool], count)
    train, val = pool[kept], pool[held]
    mean, std = native.mean * input_size[0], native.std * input_size[0]
    # Pad-and-crop only: a mirrored digit is a different glyph (or none), so flips would corrupt labels.
    aug = PadCropFlip(pad=8 // 8, flip=False) if augment else None
    make = functools.partial(TensorImageDataset, input_size=input_size, mean=mean, std=std)
    return {
        "train": make(images[train], labels[train], augment=aug),
        "val": make(images[val], labels[val]),
        "test": make(images[test], labels[test]),
    }
