"""``timm:NAME:PATH``: anything ``timm.data.create_dataset(NAME, root=PATH)`` reads from local disk.

NAME may be empty for a plain folder or tar. Gray images (the ``torch/*mnist`` sets, gray folders)
train at 1 channel; timm's validation split is halved into val and test. Reading the class count means
building the datasets: timm has no cheaper way.
"""

from __future__ import annotations

from annify.data.dataset import class_map, existing_dir
from annify.data.folders import IMAGENET_INPUT, num_classes, split_datasets, timm_dataset
from annify.data.sources import DataInfo

__all__ = ["datasets", "info"]


def _first_image(ds):
    """The first sample's image, untransformed (a PIL image for every timm reader)."""
    transform, ds.transform = getattr(ds, "transform", None), None
    try:
        return ds[0][0]
    finally:
        ds.transform = transform


def _timm_datasets(arg, input_size, augment):
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    name, _, path = arg.partition(":")
    label = f"timm:{name}"
    root = existing_dir(label, path, "point at the dataset folder or tar")
    train = timm_dataset(label, name, root, "train")
    val = timm_dataset(label, name, root, "validation", class_map(train))
    first = _first_image(train)
    gray = getattr(first, "mode", "RGB") in ("L", "I", "I;16", "F")
    if gray:  # gray images (the torch/*mnist sets, gray folders) train at 1 channel, their native size
        native = (1, first.size[1], first.size[0]) if name.startswith("torch/") else (1, *IMAGENET_INPUT[1:])
        mean = (sum(IMAGENET_DEFAULT_MEAN) / 3,)
        std = (sum(IMAGENET_DEFAULT_STD) / 3,)
    else:
        native, mean, std = IMAGENET_INPUT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    info = DataInfo(num_classes(label, train), native, mean, std, f"timm:{arg}")
    size = input_size or info.input_size
    channels = (1,) if gray else (3,)
    return info, split_datasets(train, val, None, size, augment, mean, std, label, channels)


def info(kind: str, arg: str) -> DataInfo:
    """Built from the datasets: classes from the training split, the native size from its first image."""
    return _timm_datasets(arg, None, augment=False)[0]


def datasets(kind: str, arg: str, input_size, val_size, augment: bool) -> dict:
    """timm's train split, and its validation split halved into val and test; ``val_size`` is not used."""
    return _timm_datasets(arg, input_size, augment)[1]
