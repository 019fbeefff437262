"""``cifar10:PATH`` / ``cifar100:PATH``: the python-pickle CIFAR release, extracted, held in memory.

``PATH`` is the extracted folder (``cifar-10-batches-py`` or ``cifar-100-python``) or the folder holding
it. The pickles are read with an unpickler that admits numpy arrays and nothing else.
"""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from annify.data.dataset import TensorImageDataset, check_input_size, existing_dir, holdout, holdout_count
from annify.data.sources import DataInfo
from annify.data.transforms import PadCropFlip
from annify.errors import DataError

__all__ = ["datasets", "info"]


@dataclass(frozen=True)
class _CifarLayout:
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_CIFAR = {
    "cifar10": _CifarLayout(
        "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "labels", 10,
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": _CifarLayout(
        "cifar-100-python", ("train",), "test", "fine_labels", 100,
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
    ),
}  # fmt: skip

# The pickles hold numpy arrays and lists; nothing else may be imported while reading them.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _cifar_dir(kind: str, path: str) -> Path:
    """The folder holding the CIFAR batch files: ``path`` itself or its extracted child folder."""
    layout = _CIFAR[kind]
    hint = f"point at the extracted {layout.folder} folder (or its parent)"
    root = existing_dir(kind, path, hint)
    for folder in (root, root / layout.folder):
        if (folder / layout.train_files[0]).is_file():
            return folder
    raise DataError(f"{kind}: no '{layout.train_files[0]}' under {root} — {hint}")


def _read_cifar_file(kind: str, file: Path) -> tuple[torch.Tensor, torch.Tensor]:
    layout = _CIFAR[kind]
    if not file.is_file():
        raise DataError(f"{kind}: missing {file} — re-extract the archive")
    try:
        with open(file, "rb") as f:
            batch = _CifarUnpickler(f, encoding="latin1").load()
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        images = torch.as_tensor(batch["data"]).view(-1, 3, 32, 32)
        labels = torch.as_tensor(batch[layout.label_key], dtype=torch.long)
    except Exception as err:  # any unreadable content means the same thing to the user
        msg = f"{type(err).__name__}: {err}".splitlines()[0]
        raise DataError(f"{kind}: {file} is not a CIFAR batch ({msg}) — re-extract the archive") from err
    bad_labels = len(labels) and (labels.min() < 0 or labels.max() >= layout.num_classes)
    if images.dtype != torch.uint8 or len(images) != len(labels) or bad_labels:
        raise DataError(f"{kind}: {file} has malformed images or labels — re-extract the archive")
    return images, labels


def info(kind: str, path: str) -> DataInfo:
    """From constants and a directory listing: the batch files are read only for the datasets."""
    layout = _CIFAR[kind]
    folder = _cifar_dir(kind, path)
    return DataInfo(layout.num_classes, (3, 32, 32), layout.mean, layout.std, f"{kind}:{folder}")


def datasets(kind: str, path: str, input_size, val_size, augment: bool) -> dict[str, TensorImageDataset]:
    """Train and val from the training batches (5,000 held out; 10% of a small copy), test from the test batch."""
    native = info(kind, path)
    input_size = input_size or native.input_size
    check_input_size(input_size, (3,), kind)
    folder, layout = Path(native.name.partition(":")[2]), _CIFAR[kind]
    parts = [_read_cifar_file(kind, folder / name) for name in layout.train_files]
    images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    test_images, test_labels = _read_cifar_file(kind, folder / layout.test_file)
    if val_size is None:  # the paper holds out 5,000; small (test-sized) copies hold out 10%
        val_size = 5000 if len(labels) >= 10000 else 0.1
    train, val = holdout(labels, holdout_count(val_size, len(labels), kind))
    aug = PadCropFlip(pad=4, flip=True) if augment else None
    make = functools.partial(TensorImageDataset, input_size=input_size, mean=native.mean, std=native.std)
    return {
        "train": make(images[train], labels[train], augment=aug),
        "val": make(images[val], labels[val]),
        "test": make(test_images, test_labels),
    }
