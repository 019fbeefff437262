"""The MNIST family (``fashion-mnist[:PATH]``, ``mnist:PATH``, ``kmnist:PATH``): four IDX files, in memory.

The files, gzipped or not, are read by torchvision's own dataset classes: 28x28 gray (1 channel),
5,000 training images held out for validation, the official 10,000 as test. torchvision wants them
unpacked in ``<root>/<Class>/raw``; where they are not, they are unpacked into annify's cache
(``~/.cache/annify``, or ``$ANNIFY_CACHE``), never into the folder they came from (a system folder
such as Debian's ``/usr/share/datasets/fashion-mnist`` stays untouched).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from annify.data.dataset import TensorImageDataset, check_input_size, existing_dir, holdout, holdout_count
from annify.data.sources import DataInfo
from annify.data.transforms import PadCropFlip
from annify.errors import DataError

__all__ = ["datasets", "info"]


@dataclass(frozen=True)
class _MnistLayout:
    cls: str  # torchvision.datasets class, which also names its folder (root/<cls>/raw)
    hint: str


_MNIST = {
    "fashion-mnist": _MnistLayout(
        "FashionMNIST", "apt-get install dataset-fashion-mnist, or pass fashion-mnist:PATH to the IDX files"
    ),
    "mnist": _MnistLayout("MNIST", "pass mnist:PATH to the folder of the four IDX files"),
    "kmnist": _MnistLayout("KMNIST", "pass kmnist:PATH to the folder of the four IDX files"),
}
_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _cache_dir() -> Path:
    """annify's user cache: ``$ANNIFY_CACHE``, else ``$XDG_CACHE_HOME/annify``, else ``~/.cache/annify``."""
    import os

    if os.environ.get("ANNIFY_CACHE"):
        return Path(os.environ["ANNIFY_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "annify"


def _mnist_root(kind: str, path: str) -> Path:
    """A torchvision root for ``kind``: ``path`` itself when it holds ``<cls>/raw`` unpacked, else a
    cache folder where the files (gzipped or not, found in ``path`` or ``path/<cls>/raw``) are unpacked.

    The source folder is only read (a system folder stays untouched); the cache is keyed by the
    source's resolved path and written atomically, so a kill never leaves a half-written file.
    """
    import errno
    import gzip
    import hashlib
    import shutil
    import zlib

    from annify._files import atomic_file

    layout = _MNIST[kind]
    root = existing_dir(kind, path, layout.hint).resolve()
    if all((root / layout.cls / "raw" / f).is_file() for f in _IDX_FILES):
        return root
    found = {}
    for name in _IDX_FILES:
        for folder in (root, root / layout.cls / "raw"):
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    found.setdefault(name, candidate)
    missing = [n for n in _IDX_FILES if n not in found]
    if missing:
        raise DataError(f"{kind}: no {missing[0]}(.gz) under {root} — {layout.hint}")
    key = hashlib.sha1(str(root).encode()).hexdigest()[:12]
    cache = _cache_dir() / "datasets" / f"{layout.cls}-{key}"
    raw = cache / layout.cls / "raw"
    for name, src in found.items():
        dest = raw / name
        if dest.is_file() and dest.stat().st_mtime >= src.stat().st_mtime:
            continue
        raw.mkdir(parents=True, exist_ok=True)
        try:
            with (
                atomic_file(dest) as tmp,
                open(tmp, "wb") as out,
                (gzip.open if src.suffix == ".gz" else open)(src, "rb") as f,
            ):
                shutil.copyfileobj(f, out)
        except (OSError, EOFError, zlib.error) as err:  # zlib.error: a damaged .gz stream
            if isinstance(err, OSError) and err.errno in (
                errno.ENOSPC,
                errno.EDQUOT,
                errno.EROFS,
                errno.EACCES,
            ):
                raise DataError(
                    f"{kind}: cannot unpack {src} into annify's cache {raw} ({err.strerror}); free space there, "
                    "or set ANNIFY_CACHE to a folder with room"
                ) from None  # the cache is the problem, not the data set
            if isinstance(err, OSError) and err.filename:
                raise
            raise DataError(
                f"{kind}: {src} is not a readable IDX file ({err}) — reinstall or re-download it"
            ) from err
    return cache


@functools.lru_cache(maxsize=4)
def _mnist(kind: str, path: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(train images, train labels, test images, test labels, resolved source): uint8 (N, 1, 28, 28)."""
    import torchvision.datasets as tvd

    layout = _MNIST[kind]
    root = _mnist_root(kind, path)
    cls = getattr(tvd, layout.cls)
    try:
        train, test = (cls(str(root), train=t, download=False) for t in (True, False))
    except Exception as err:  # torchvision raises RuntimeError / AssertionError / ValueError by defect
        msg = f"{type(err).__name__}: {err}".splitlines()[0]
        raise DataError(f"{kind}: cannot read the IDX files for {path} ({msg}) — {layout.hint}") from err
    images = [d.data.unsqueeze(1).contiguous() for d in (train, test)]
    labels = [d.targets.long() for d in (train, test)]
    if any(i.dtype != torch.uint8 or len(i) != len(lab) for i, lab in zip(images, labels)):
        raise DataError(f"{kind}: the IDX files under {path} have mismatched images and labels")
    return images[0], labels[0], images[1], labels[1], str(Path(path).expanduser().resolve())


@functools.lru_cache(maxsize=4)
def info(kind: str, path: str) -> DataInfo:
    """Classes from the labels, 28x28 gray; normalized with the whole training pool (train + val):
    independent of val_size, never sees test."""
    images, labels, _, _, where = _mnist(kind, path)
    x = images.float() / 255
    classes = int(labels.max()) + 1
    return DataInfo(classes, (1, 28, 28), (x.mean().item(),), (x.std().item(),), f"{kind}:{where}")


def datasets(kind: str, path: str, input_size, val_size, augment: bool) -> dict[str, TensorImageDataset]:
    """Train and val from the training files (5,000 held out; 10% of a small copy), test from the test files."""
    native = info(kind, path)
    input_size = input_size or native.input_size
    check_input_size(input_size, (1, 3), kind)
    images, labels, test_images, test_labels, _ = _mnist(kind, path)
    if val_size is None:  # as the paper holds out 5,000 CIFAR images; small copies hold out 10%
        val_size = 5000 if len(labels) >= 10000 else 0.1
    train, val = holdout(labels, holdout_count(val_size, len(labels), kind))
    # A mirrored garment is the same garment; a mirrored digit or kana is another glyph (or none).
    aug = PadCropFlip(pad=2, flip=kind == "fashion-mnist") if augment else None
    mean, std = native.mean * input_size[0], native.std * input_size[0]
    make = functools.partial(TensorImageDataset, input_size=input_size, mean=mean, std=std)
    return {
        "train": make(images[train], labels[train], augment=aug),
        "val": make(images[val], labels[val]),
        "test": make(test_images, test_labels),
    }
