"""Datasets and loaders for training and evaluating anytime networks.

A data source is one string, so specs and the CLI can name it:

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes). Always available offline,
  small enough that a whole training run takes seconds; the default for tests and examples.
- ``fashion-mnist`` (Debian's ``dataset-fashion-mnist`` package), ``fashion-mnist:PATH``, ``mnist:PATH``,
  ``kmnist:PATH``: the four IDX files of the MNIST family, gzipped or not, read by torchvision's own
  dataset classes. 28x28 gray (1 channel); 5,000 training images are held out for validation.
- ``cifar10:PATH`` / ``cifar100:PATH``: the python-pickle CIFAR release, extracted (``cifar-10-batches-py``
  or ``cifar-100-python``, or the folder holding it).
- ``imagefolder:PATH``: ``train/`` and ``val/`` (optionally ``test/``) folders of class folders (ImageNet layout).
- ``timm:NAME:PATH``: anything ``timm.data.create_dataset(NAME, root=PATH)`` reads from local disk.

Every source yields fixed ``train``/``val``/``test`` splits. Splits never depend on the training seed, so
runs that differ only in seed are selected on and scored against the same images.
"""

from __future__ import annotations

import functools
import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Subset

from annify.errors import DataError, InferenceError

__all__ = [
    "DataError",
    "DataInfo",
    "TensorBatches",
    "TensorImageDataset",
    "build_datasets",
    "build_loaders",
    "data_info",
    "describe_batches",
    "make_batches",
    "pad_crop_flip",
    "parse_source",
    "set_epoch",
]

ACCEPTED = (
    "digits | fashion-mnist[:PATH] | mnist:PATH | kmnist:PATH | cifar10:PATH | cifar100:PATH"
    " | imagefolder:PATH | timm:NAME:PATH"
)
SPLIT_SEED = 0  # seeds every split; deliberately not the training seed
IMAGENET_INPUT = (3, 224, 224)


@dataclass
class DataInfo:
    """What a model needs to know about a source before seeing any data."""

    num_classes: int
    input_size: tuple[int, int, int]  # (C, H, W) the model sees
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str  # e.g. "digits", "cifar10:/path", "imagefolder:/path"


# --------------------------------------------------------------------------- parsing


def parse_source(source: str) -> tuple[str, str | None]:
    """Split a source string into its kind and argument.

    Returns ``("digits", None)``, ``(kind, PATH)`` for cifar10/cifar100/imagefolder, and
    ``("timm", "NAME:PATH")`` for timm sources (NAME may be empty for a plain folder or tar).
    """
    kind, sep, arg = source.strip().partition(":")
    kind = kind.lower()
    if kind == "digits" and not sep:
        return kind, None
    if kind == "fashion-mnist" and not sep:
        return kind, str(DEBIAN_FASHION_MNIST)
    if kind in ("cifar10", "cifar100", "imagefolder", *_MNIST) and arg:
        return kind, arg
    if kind == "timm" and ":" in arg and arg.partition(":")[2]:
        return kind, arg
    raise DataError(f"unknown data source {source!r}; expected one of: {ACCEPTED}")


def _existing_dir(kind: str, path: str, hint: str) -> Path:
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"{kind}: {root} does not exist — {hint}")
    return root


def _check_input_size(input_size: tuple[int, int, int], channels: tuple[int, ...], kind: str) -> None:
    if len(input_size) != 3 or min(input_size) < 1:
        raise DataError(f"input_size must be (C, H, W) with positive entries, got {input_size}")
    if input_size[0] not in channels:
        raise DataError(f"{kind}: {input_size[0]} channels requested; this source gives {channels}")


def _holdout_count(val_size: int | float, pool: int, kind: str) -> int:
    """Turns ``val_size`` (a count, or a fraction of the training pool) into a count."""
    count = math.ceil(val_size * pool) if isinstance(val_size, float) else int(val_size)
    if not 0 < count < pool:
        raise DataError(f"{kind}: val_size={val_size} leaves no train or no val images out of {pool}")
    return count


def _holdout(labels: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (kept, held out) with a fixed seed, stratified by class when feasible."""
    from sklearn.model_selection import train_test_split

    n, counts = len(labels), torch.bincount(labels)
    counts = counts[counts > 0]
    stratify = labels.numpy() if counts.min() >= 2 and len(counts) <= min(count, n - count) else None
    kept, held = train_test_split(range(n), test_size=count, random_state=SPLIT_SEED, stratify=stratify)
    return torch.tensor(sorted(kept)), torch.tensor(sorted(held))


# --------------------------------------------------------------------------- in-memory tensor images


def pad_crop_flip(
    x: torch.Tensor, pad: int, offsets: torch.Tensor | None, flips: torch.Tensor | None
) -> torch.Tensor:
    """Translate a batch by zero-padding and cropping back, then mirror the chosen images.

    Args:
        x: (B, C, H, W) images in [0, 1], before normalization (so the padding is black).
        pad: pixels of padding on each side.
        offsets: (B, 2) integer crop origins (row, column) in ``0..2*pad``; unused (None) when pad is 0.
        flips: (B,) bools, True mirrors that image left-right; None for no flips.
    """
    b, _, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        rows = offsets[:, :1] + torch.arange(h, device=x.device)  # (B, H)
        cols = offsets[:, 1:] + torch.arange(w, device=x.device)  # (B, W)
        batch = torch.arange(b, device=x.device)[:, None, None]
        x = padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B,H,W,C) -> (B,C,H,W)
    if flips is not None:
        x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
    return x.contiguous()


class PadCropFlip:
    """Random translation by zero-padding and cropping back, optionally with a horizontal flip.

    Works on one (C, H, W) image in [0, 1], before normalization, so the padding is black: the
    background of digits and what CIFAR's standard recipe pads with. Draws from torch's global RNG,
    which the DataLoader seeds per worker, so runs are reproducible. ``TensorBatches`` applies the
    same transform to whole batches on the training device (``pad_crop_flip``).
    """

    def __init__(self, pad: int, flip: bool):
        self.pad, self.flip = pad, flip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        offsets = torch.randint(0, 2 * self.pad + 1, (1, 2)) if self.pad > 0 else None
        flips = (torch.rand(()) < 0.5).view(1) if self.flip else None
        return pad_crop_flip(x[None], self.pad, offsets, flips)[0]


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
        return _finish(x[None], self.input_size, self.mean, self.std)[0], int(self.labels[index])


def _finish(x: torch.Tensor, input_size, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, C0, H0, W0) images in [0, 1] -> resized to ``input_size``, gray repeated, normalized."""
    c, h, w = input_size
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    x = x.expand(-1, c, -1, -1)  # gray -> RGB when asked; a no-op otherwise
    return (x - mean) / std


class TensorBatches:
    """A ``TensorImageDataset`` held whole on the training device, served in batches: the fast path.

    Indexing, augmentation (the dataset's ``PadCropFlip`` as one batched op), resizing and
    normalization all run on the device, with no DataLoader and no per-sample Python. Iterating
    yields ``(images, labels)`` already on ``device``, like a DataLoader followed by ``.to(device)``.

    Shuffling follows a DataLoader's ``RandomSampler`` with the same ``generator`` state (one int64
    draw, then ``randperm``), so without augmentation both paths give the same batches in the same
    order; augmentation parameters are drawn for the whole epoch from the same generator after the
    permutation. Reseed ``generator`` before each epoch for reproducible, resumable runs.

    Args:
        ds: the dataset (its images, labels, size, normalization and augmentation are used).
        batch_size: images per batch (per process).
        device: where the data lives and the batches are made.
        shuffle: reshuffle (and augment) each epoch; otherwise in order, never augmented.
        seed: initial seed of ``generator``.
        rank, world: under DDP every rank gets the same number of batches of its own shard, padded by
            wrapping around as ``DistributedSampler`` does (train); evaluation shards are
            ``range(rank, n, world)``, unpadded.
    """

    def __init__(
        self,
        ds: TensorImageDataset,
        batch_size: int,
        device: torch.device | str = "cpu",
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
    ):
        self.device = torch.device(device)
        self.images = ds.images.to(self.device)
        self.labels = ds.labels.to(self.device)
        self.input_size, self.augment = ds.input_size, ds.augment if shuffle else None
        self.mean, self.std = ds.mean.to(self.device), ds.std.to(self.device)
        self.batch_size, self.shuffle, self.rank, self.world = batch_size, shuffle, rank, world
        self.generator = torch.Generator().manual_seed(seed)

    def _order(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This process's sample indices for one pass, with their crop offsets and flips."""
        n = len(self.labels)
        if not self.shuffle:
            return torch.arange(self.rank, n, self.world), None, None
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # a DataLoader's base seed
        order = torch.randperm(n, generator=self.generator)
        offsets = flips = None
        if self.augment is not None and self.augment.pad > 0:
            offsets = torch.randint(0, 2 * self.augment.pad + 1, (n, 2), generator=self.generator)
        if self.augment is not None and self.augment.flip:
            flips = torch.rand(n, generator=self.generator) < 0.5
        if self.world > 1:  # as DistributedSampler: pad to a multiple of world, then every world-th
            total = -(-n // self.world) * self.world
            pick = torch.arange(total) % n
            pick = pick[self.rank :: self.world]
            order = order[pick]
            offsets = None if offsets is None else offsets[pick]
            flips = None if flips is None else flips[pick]
        return order, offsets, flips

    def __len__(self) -> int:
        n = len(self.labels)
        per_rank = -(-n // self.world) if self.shuffle else len(range(self.rank, n, self.world))
        return -(-per_rank // self.batch_size)

    def __iter__(self):
        order, offsets, flips = self._order()
        dev = self.device
        order = order.to(dev)
        offsets = None if offsets is None else offsets.to(dev)
        flips = None if flips is None else flips.to(dev)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self.images[idx]
            x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
            if self.augment is not None:
                part = slice(start, start + self.batch_size)
                x = pad_crop_flip(
                    x,
                    self.augment.pad,
                    None if offsets is None else offsets[part],
                    None if flips is None else flips[part],
                )
            yield _finish(x, self.input_size, self.mean, self.std), self.labels[idx]


# --------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All digits as (images in [0,1], labels), and the fixed (pool, test) index split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    labels = torch.tensor(y, dtype=torch.long)
    pool, test = _holdout(labels, math.ceil(0.2 * len(labels)))  # test = 20% (360 images)
    return images, labels, pool, test


def _digits_info() -> DataInfo:
    # Normalize with the training pool (train + val): independent of val_size, never sees test.
    images, _, pool, _ = _digits()
    mean, std = images[pool].mean().item(), images[pool].std().item()
    return DataInfo(10, (1, 8, 8), (mean,), (std,), "digits")


def _digits_datasets(input_size, val_size, augment):
    info = _digits_info()
    _check_input_size(input_size, (1, 3), "digits")
    images, labels, pool, test = _digits()
    count = _holdout_count(270 if val_size is None else val_size, len(pool), "digits")  # 15% of all
    kept, held = _holdout(labels[pool], count)
    train, val = pool[kept], pool[held]
    mean, std = info.mean * input_size[0], info.std * input_size[0]
    # Pad-and-crop only: a mirrored digit is a different glyph (or none), so flips would corrupt labels.
    aug = PadCropFlip(pad=8 // 8, flip=False) if augment else None
    make = functools.partial(TensorImageDataset, input_size=input_size, mean=mean, std=std)
    return {
        "train": make(images[train], labels[train], augment=aug),
        "val": make(images[val], labels[val]),
        "test": make(images[test], labels[test]),
    }


# --------------------------------------------------------------------------- the MNIST family

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist


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
    import os
    import shutil
    import tempfile

    layout = _MNIST[kind]
    root = _existing_dir(kind, path, layout.hint).resolve()
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
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=raw)
        try:
            with os.fdopen(fd, "wb") as out, (gzip.open if src.suffix == ".gz" else open)(src, "rb") as f:
                shutil.copyfileobj(f, out)
            os.replace(tmp, dest)
        except (OSError, EOFError) as err:
            Path(tmp).unlink(missing_ok=True)
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
def _mnist_info(kind: str, path: str) -> DataInfo:
    # Normalize with the whole training pool (train + val): independent of val_size, never sees test.
    images, labels, _, _, where = _mnist(kind, path)
    x = images.float() / 255
    classes = int(labels.max()) + 1
    return DataInfo(classes, (1, 28, 28), (x.mean().item(),), (x.std().item(),), f"{kind}:{where}")


def _mnist_datasets(kind, path, input_size, val_size, augment):
    info = _mnist_info(kind, path)
    _check_input_size(input_size, (1, 3), kind)
    images, labels, test_images, test_labels, _ = _mnist(kind, path)
    if val_size is None:  # as the paper holds out 5,000 CIFAR images; small copies hold out 10%
        val_size = 5000 if len(labels) >= 10000 else 0.1
    train, val = _holdout(labels, _holdout_count(val_size, len(labels), kind))
    # A mirrored garment is the same garment; a mirrored digit or kana is another glyph (or none).
    aug = PadCropFlip(pad=2, flip=kind == "fashion-mnist") if augment else None
    mean, std = info.mean * input_size[0], info.std * input_size[0]
    make = functools.partial(TensorImageDataset, input_size=input_size, mean=mean, std=std)
    return {
        "train": make(images[train], labels[train], augment=aug),
        "val": make(images[val], labels[val]),
        "test": make(test_images, test_labels),
    }


# --------------------------------------------------------------------------- CIFAR


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
    root = _existing_dir(kind, path, hint)
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


def _cifar_info(kind: str, path: str) -> DataInfo:
    layout = _CIFAR[kind]
    folder = _cifar_dir(kind, path)
    return DataInfo(layout.num_classes, (3, 32, 32), layout.mean, layout.std, f"{kind}:{folder}")


def _cifar_datasets(kind, path, input_size, val_size, augment):
    info = _cifar_info(kind, path)
    _check_input_size(input_size, (3,), kind)
    folder, layout = Path(info.name.partition(":")[2]), _CIFAR[kind]
    parts = [_read_cifar_file(kind, folder / name) for name in layout.train_files]
    images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    test_images, test_labels = _read_cifar_file(kind, folder / layout.test_file)
    if val_size is None:  # the paper holds out 5,000; small (test-sized) copies hold out 10%
        val_size = 5000 if len(labels) >= 10000 else 0.1
    train, val = _holdout(labels, _holdout_count(val_size, len(labels), kind))
    aug = PadCropFlip(pad=4, flip=True) if augment else None
    make = functools.partial(TensorImageDataset, input_size=input_size, mean=info.mean, std=info.std)
    return {
        "train": make(images[train], labels[train], augment=aug),
        "val": make(images[val], labels[val]),
        "test": make(test_images, test_labels),
    }


# --------------------------------------------------------------------------- image folders via timm


def _folder_info(path: str) -> DataInfo:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    root = _existing_dir("imagefolder", path, "expected train/ and val/ folders of class folders")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(
                f"imagefolder: no '{split}' folder under {root} — expected train/ and val/ "
                "(optionally test/) folders of class folders, ImageNet layout"
            )
    classes = [d for d in (root / "train").iterdir() if d.is_dir()]
    if not classes:
        raise DataError(f"imagefolder: {root / 'train'} has no class folders — put images in train/<class>/")
    if len(classes) < 2:
        raise DataError(
            f"imagefolder: {root / 'train'} has one class folder ({classes[0].name}); a classifier needs at "
            "least 2 — put each class's images in train/<class>/"
        )
    known = {d.name for d in classes}
    for split in ("val", "test"):
        extra = (
            sorted(d.name for d in (root / split).iterdir() if d.is_dir() and d.name not in known)
            if (root / split).is_dir()
            else []
        )
        if extra:
            raise DataError(
                f"imagefolder: {root / split} has class folder '{extra[0]}' that train/ lacks; every "
                f"{split} class needs training images under train/{extra[0]}/"
            )
    return DataInfo(
        len(classes), IMAGENET_INPUT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, f"imagefolder:{root}"
    )


def _timm_dataset(label: str, name: str, root: Path, split: str, class_map=None, search_split=True):
    """``timm.data.create_dataset`` with its assorted failures turned into one-line DataErrors."""
    from timm.data import create_dataset

    try:
        ds = create_dataset(name, root=str(root), split=split, class_map=class_map, search_split=search_split)
    except Exception as err:  # timm raises AssertionError, RuntimeError, OSError, ... by reader
        msg = f"{type(err).__name__}: {err}".splitlines()[0]
        raise DataError(f"{label}: cannot read split '{split}' from {root} ({msg}) — check the path") from err
    if isinstance(ds, IterableDataset):
        raise DataError(f"{label}: {name!r} is a streaming dataset — use a map-style folder, tar or hfds")
    if len(ds) == 0:
        raise DataError(f"{label}: split '{split}' under {root} is empty — add images")
    return ds


def _class_map(ds) -> dict | None:
    return getattr(getattr(ds, "reader", None), "class_to_idx", None) or getattr(ds, "class_to_idx", None)


def _num_classes(label: str, ds) -> int:
    classes = _class_map(ds) or getattr(ds, "classes", None)
    if not classes:
        raise DataError(f"{label}: cannot tell the number of classes — use a dataset with class folders")
    return len(classes)


def _halves(ds) -> tuple[Subset, Subset]:
    """Even and odd samples. Readers list files grouped by class, so both halves keep the class mix."""
    return Subset(ds, range(0, len(ds), 2)), Subset(ds, range(1, len(ds), 2))


def _timm_split_datasets(train, val, test, input_size, augment, mean, std, kind, channels=(3,)):
    """Attach timm's ImageNet-style transforms; with no test set, val is split in half into val/test."""
    from timm.data import create_transform

    _check_input_size(input_size, channels, kind)
    train.transform = create_transform(input_size, is_training=augment, mean=mean, std=std)
    evaluate = create_transform(input_size, is_training=False, mean=mean, std=std)
    for ds in (val, test):
        if ds is not None:
            ds.transform = evaluate
    val, test = _halves(val) if test is None else (val, test)
    return {"train": train, "val": val, "test": test}


class _ImageFiles(Dataset):
    """(image, class) pairs from a timm reader, each image read by ``image_mode`` (as ``predict`` reads it).

    timm's ImageDataset converts with PIL's ``convert('RGB')`` (which clips 16-bit and float images)
    and skips an unreadable file with a log line naming only its index; here a file that cannot be
    read is a ``DataError`` naming it.
    """

    def __init__(self, reader, channels: int, label: str) -> None:
        self.reader, self.channels, self.label, self.transform = reader, channels, label, None

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int):
        from PIL import Image

        file, target = self.reader[index][:2]
        name = self.reader.filename(index, absolute=True)
        try:
            with file, Image.open(file) as im:
                im = image_mode(im, self.channels, name)
        except OSError as e:  # truncated or corrupt files; PIL's UnidentifiedImageError is one
            raise DataError(
                f"{self.label}: cannot read image '{name}' ({e}); remove or replace the file"
            ) from None
        return (self.transform(im) if self.transform is not None else im), target


def _imagefolder_datasets(path, input_size, augment):
    info = _folder_info(path)
    root, label = Path(info.name.partition(":")[2]), "imagefolder"

    def split(name: str, folder: str, classes=None) -> _ImageFiles:
        # search_split=False: the split folders are given, so a class named "train" cannot be mistaken for one
        return _ImageFiles(_timm_dataset(label, "", root / folder, name, classes, False).reader, 3, label)

    train = split("train", "train")
    classes = _class_map(train)
    val = split("validation", "val", classes)
    test = split("test", "test", classes) if (root / "test").is_dir() else None
    return _timm_split_datasets(train, val, test, input_size, augment, info.mean, info.std, label)


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
    root = _existing_dir(label, path, "point at the dataset folder or tar")
    train = _timm_dataset(label, name, root, "train")
    val = _timm_dataset(label, name, root, "validation", _class_map(train))
    first = _first_image(train)
    gray = getattr(first, "mode", "RGB") in ("L", "I", "I;16", "F")
    if gray:  # gray images (the torch/*mnist sets, gray folders) train at 1 channel, their native size
        native = (1, first.size[1], first.size[0]) if name.startswith("torch/") else (1, *IMAGENET_INPUT[1:])
        mean = (sum(IMAGENET_DEFAULT_MEAN) / 3,)
        std = (sum(IMAGENET_DEFAULT_STD) / 3,)
    else:
        native, mean, std = IMAGENET_INPUT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    info = DataInfo(_num_classes(label, train), native, mean, std, f"timm:{arg}")
    size = input_size or info.input_size
    channels = (1,) if gray else (3,)
    return info, _timm_split_datasets(train, val, None, size, augment, mean, std, label, channels)


# --------------------------------------------------------------------------- public entry points


def data_info(source: str) -> DataInfo:
    """Class count, native input size and normalization of a source, reading as little as possible.

    digits, CIFAR and image folders answer from constants and a directory listing; ``timm:`` sources
    are built (timm has no cheaper way to count classes).
    """
    kind, arg = parse_source(source)
    if kind == "digits":
        return _digits_info()
    if kind in _CIFAR:
        return _cifar_info(kind, arg)
    if kind in _MNIST:
        return _mnist_info(kind, arg)
    if kind == "imagefolder":
        return _folder_info(arg)
    return _timm_datasets(arg, None, augment=False)[0]


def build_datasets(
    source: str,
    input_size: tuple[int, int, int] | None = None,
    val_size: int | float | None = None,
    augment: bool = True,
    train_subset: int | None = None,
) -> dict[str, Dataset]:
    """The ``train``/``val``/``test`` datasets of a source, yielding ``(image, label)`` pairs.

    Args:
        source: see ``parse_source``.
        input_size: (C, H, W) the model sees; defaults to the source's native size. digits accept
            1 or 3 channels (gray repeated), the others 3; H and W are reached by bilinear resizing
            (tensor sources) or timm's resize and crop (image folders).
        val_size: images held out of train for validation, as a count or a fraction of the training
            pool. Defaults: digits 270 (15% of all), CIFAR 5,000 (10% when train has < 10,000).
            Folder sources take their validation set from disk and ignore it.
        augment: random augmentation on train (digits, MNIST, KMNIST: translation; Fashion-MNIST and
            CIFAR: translation and flip; folders: timm's RandomResizedCrop, flip and color jitter).
            val/test are never augmented.
        train_subset: keep this many training images, a fixed subset (``SPLIT_SEED``, not the run's
            seed, so runs that differ in seed train on the same images): stratified by class for the
            in-memory sources, uniform for folders and timm sets. val/test stay whole.
    """
    kind, arg = parse_source(source)
    if kind == "timm":
        datasets = _timm_datasets(arg, input_size, augment)[1]
    else:
        size = input_size or data_info(source).input_size
        if kind == "digits":
            datasets = _digits_datasets(size, val_size, augment)
        elif kind in _CIFAR:
            datasets = _cifar_datasets(kind, arg, size, val_size, augment)
        elif kind in _MNIST:
            datasets = _mnist_datasets(kind, arg, size, val_size, augment)
        else:
            datasets = _imagefolder_datasets(arg, size, augment)
    if train_subset is not None:
        datasets["train"] = _subset(datasets["train"], train_subset, source)
    return datasets


def _subset(ds: Dataset, count: int, source: str) -> Dataset:
    """A fixed subset of ``count`` training images: stratified (and still a tensor dataset) in memory,
    uniform otherwise (a folder's labels are not known without reading every sample)."""
    n = len(ds)
    if not 1 <= count <= n:
        raise DataError(f"train_subset={count} is not between 1 and the {n} training images of {source}")
    classes = len(ds.labels.unique()) if isinstance(ds, TensorImageDataset) else len(_class_map(ds) or ())
    if count < classes:
        raise DataError(
            f"train_subset={count} is fewer than the {classes} classes of {source}, so some classes would get "
            f"no training image; give at least {classes} (e.g. --train-subset {10 * classes})"
        )
    if count == n:
        return ds
    if isinstance(ds, TensorImageDataset):
        _, chosen = _holdout(ds.labels, count)
        return TensorImageDataset(
            ds.images[chosen], ds.labels[chosen], ds.input_size, ds.mean.flatten().tolist(),
            ds.std.flatten().tolist(), ds.augment,
        )  # fmt: skip
    kept = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))[:count].sort().values
    return Subset(ds, kept.tolist())


def build_loaders(
    datasets: dict[str, Dataset],
    batch_size: int,
    workers: int = 0,
    distributed: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    persistent_workers: bool = True,
) -> dict[str, DataLoader]:
    """A DataLoader per split: ``train`` shuffled reproducibly from ``seed``, the others in order.

    With ``distributed`` every split gets a DistributedSampler (train shuffled from ``seed``); call
    ``set_epoch`` before each epoch so the shuffle changes. Note that a distributed eval sampler pads
    the last batch with repeats so every rank gets the same count. ``drop_last`` applies to train only.
    ``persistent_workers=False`` starts fresh workers each epoch, seeded from the loader's generator:
    what a trainer that reseeds the generator per epoch needs for exactly reproducible resumes.
    """
    loaders = {}
    for split, ds in datasets.items():
        train = split == "train"
        generator = torch.Generator().manual_seed(seed)  # also seeds each worker's augmentation RNG
        sampler = (
            DistributedSampler(ds, shuffle=train, seed=seed, drop_last=drop_last and train)
            if distributed
            else None
        )
        loaders[split] = DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=persistent_workers and workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=drop_last and train,
            generator=generator,
        )
    return loaders


LOADERS = ("auto", "tensor", "dataloader")


def make_batches(
    datasets: dict[str, Dataset],
    batch_size: int,
    loader: str = "auto",
    workers: int = 0,
    device: torch.device | str = "cpu",
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
) -> dict:
    """Batches of each split for a trainer or an evaluation: ``TensorBatches`` or DataLoaders.

    ``loader``: ``tensor`` holds in-memory data sets (digits, the MNIST family, CIFAR) whole on
    ``device`` and makes batches there; ``dataloader`` uses torch's DataLoader with ``workers``
    processes; ``auto`` takes ``tensor`` where the data allows. ``train`` (if present) is shuffled
    and augmented, reseedable through its ``generator``; under DDP (``world`` > 1) every rank gets
    its shard of each split. The DataLoader path starts fresh workers each epoch, seeded from the
    loader's generator, so a trainer that reseeds it per epoch resumes exactly.
    """
    if loader not in LOADERS:
        raise DataError(f"unknown loader '{loader}'; use {', '.join(LOADERS)}")
    in_memory = all(isinstance(d, TensorImageDataset) for d in datasets.values())
    if loader == "tensor" and not in_memory:
        raise DataError(
            "--loader tensor needs an in-memory data set (digits, the MNIST family, CIFAR); use --loader dataloader"
        )
    if in_memory and loader != "dataloader":
        return {
            split: TensorBatches(
                ds, batch_size, device, shuffle=split == "train", seed=seed, rank=rank, world=world
            )
            for split, ds in datasets.items()
        }
    out = {}
    if "train" in datasets:
        out["train"] = build_loaders(
            {"train": datasets["train"]}, batch_size, workers, distributed=world > 1, seed=seed,
            persistent_workers=False,
        )["train"]  # fmt: skip
    shards = {s: Subset(d, range(rank, len(d), world)) for s, d in datasets.items() if s != "train"}
    return {**out, **build_loaders(shards, batch_size, workers)}


def describe_batches(batches, workers: int = 0) -> str:
    """``held on cpu (in-memory fast path)`` or ``DataLoader with N worker process(es)``, for logs."""
    if isinstance(batches, TensorBatches):
        return f"held on {batches.device} (in-memory fast path)"
    return f"DataLoader with {workers} worker process(es)"


def set_epoch(loaders: dict[str, DataLoader], epoch: int) -> None:
    """Tell distributed samplers the epoch, so each epoch shuffles differently; a no-op otherwise."""
    for loader in loaders.values():
        if isinstance(getattr(loader, "sampler", None), DistributedSampler):
            loader.sampler.set_epoch(epoch)


# --------------------------------------------------------------------------- images


def data_config(spec) -> dict:
    """timm's resolved data config for the spec's model, at the spec's input size.

    Read from the registered pretrained config (so the mean and std are those the model family is
    trained with: ImageNet's for timm models, CIFAR's for cifar_resnet); a model with no registered
    config is built once to ask it.
    """
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    import annify.models  # noqa: F401 - registers cifar_resnet

    args = {"input_size": tuple(spec.input_size)}
    try:
        cfg = get_pretrained_cfg(spec.model)
    except RuntimeError:
        cfg = None
    if cfg is not None:
        return resolve_data_config(args, pretrained_cfg=cfg.to_dict())
    from annify.convert import create_model

    return resolve_data_config(args, model=create_model(spec.model, spec.num_classes, **spec.model_kwargs))


def _per_channel(values: Sequence[float], channels: int, given: str | None = None) -> tuple[float, ...]:
    """One value per channel: ``values`` as they are, or one repeated. A model's own 3-channel config
    (``given`` None) is averaged for a 1-channel input; values a user gives (``given``: the option)
    must be one or one per channel."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1 and given is None:
        return (sum(values) / len(values),)
    raise InferenceError(
        f"{given or 'normalization'} has {len(values)} values but the network takes {channels}-channel "
        f"images; give one value per channel ({channels}) or one for all"
    )


def image_transform(spec, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
    """timm's eval transform for the spec's input: resize, center-crop, normalize (built once per call site).

    Resizing and cropping follow the model's data config (``crop_pct``, interpolation); ``mean`` and
    ``std`` default to the model's data config too (a 3-channel mean is averaged for a 1-channel input).
    """
    from timm.data import create_transform

    channels = spec.input_size[0]
    if channels not in (1, 3):
        raise InferenceError(f"images can feed 1- or 3-channel inputs, this spec takes {channels}")
    cfg = data_config(spec)
    for option, values in (("--mean", mean), ("--std", std)):
        bad = [v for v in values or () if not math.isfinite(v) or (option == "--std" and v <= 0)]
        if bad:
            need = "positive numbers (each channel's spread)" if option == "--std" else "finite numbers"
            raise InferenceError(f"{option} must be {need}, got {bad[0]:g}")
    return create_transform(
        input_size=tuple(spec.input_size),
        interpolation=cfg["interpolation"],
        crop_pct=cfg["crop_pct"],
        crop_mode=cfg["crop_mode"],
        mean=_per_channel(
            cfg["mean"] if mean is None else mean, channels, None if mean is None else "--mean"
        ),
        std=_per_channel(cfg["std"] if std is None else std, channels, None if std is None else "--std"),
        is_training=False,
    )


def image_mode(im, channels: int, name: str = "image"):
    """A PIL image as the ``L`` (1 channel) or ``RGB`` (3 channels) image a network reads, without squashing it.

    PIL's own ``convert`` clips what it cannot map: a 16-bit gray PNG's values above 255 all become
    255, and a float image in [0, 1] becomes black. Here 16-bit images are scaled (÷257), float images
    in [0, 1] are scaled by 255 (in [0, 255] kept; any other range is refused), palette images are
    mapped through their palette, CMYK goes through PIL's conversion to RGB, and transparency is
    composited on white. ``predict`` and image-folder training both read images through this.
    """
    import numpy as np
    from PIL import Image

    mode = im.mode
    if mode == "P":  # through the palette, keeping its transparency as alpha
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        im = Image.fromarray(np.round(np.asarray(im, dtype=np.float64) / 257).astype(np.uint8), "L")
    elif mode in ("I", "F"):
        values = np.asarray(im, dtype=np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > (65535 if mode == "I" else 255):
            raise DataError(
                f"cannot read image '{name}': its {'32-bit integer' if mode == 'I' else 'float'} pixels range "
                f"from {low:g} to {high:g}, which is no image range annify knows (0..1, 0..255"
                f"{', 0..65535' if mode == 'I' else ''}); save it as an 8- or 16-bit PNG"
            )
        scale = 255.0 if mode == "F" and high <= 1.0 else 1 / 257 if high > 255 else 1.0
        im = Image.fromarray(np.round(values * scale).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    if im.mode not in ("1", "L", "RGB", "RGBA", "CMYK", "YCbCr", "RGBX"):
        raise DataError(
            f"cannot read image '{name}': PIL mode {mode} is not one annify converts (gray, RGB, CMYK, palette, "
            "16-bit, float, with or without alpha); convert it to RGB first"
        )
    return im.convert("L" if channels == 1 else "RGB")


def load_image(
    path, spec, mean: Sequence[float] | None = None, std: Sequence[float] | None = None, transform=None
) -> torch.Tensor:
    """Read an image file as the spec's input: C×H×W, resized, center-cropped and normalized.

    The image is converted to the spec's channel count by ``image_mode`` and passed through
    ``transform`` (``image_transform(spec, mean, std)`` when not given; pass one to read many images).
    """
    from PIL import Image, UnidentifiedImageError
    from PIL.Image import DecompressionBombError

    transform = transform if transform is not None else image_transform(spec, mean, std)
    channels = spec.input_size[0]
    try:
        with Image.open(path) as im:
            im = image_mode(im, channels, str(path))
    except FileNotFoundError:
        raise InferenceError(f"cannot read image '{path}': no such file") from None
    except UnidentifiedImageError:
        raise InferenceError(f"cannot read image '{path}': not an image format PIL can read") from None
    except DecompressionBombError:
        raise InferenceError(
            f"cannot read image '{path}': too many pixels for PIL's decompression-bomb limit; downscale it first"
        ) from None
    except DataError as e:
        raise InferenceError(str(e)) from None
    except (OSError, ValueError) as e:
        raise InferenceError(f"cannot read image '{path}': {e}") from None
    return transform(im)
