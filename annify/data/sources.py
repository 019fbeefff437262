"""Data sources: the one list of what ``--data`` accepts, and the one dispatch to the module reading each.

A data source is one string, so specs and the command line can name it: a kind, then what the kind
needs after a colon (``digits``, ``cifar10:PATH``, ``timm:NAME:PATH``). Each kind is registered here
once, as a ``Source`` record: how it is written, a line saying what it is, whether its images have one
native size, and the module that reads it. The command line's ``--data`` help, the error for an unknown
source and the spec fitting in ``annify.evaluate`` all read this list.

Every source yields fixed ``train``/``val``/``test`` splits. Splits never depend on the training seed, so
runs that differ only in seed are selected on and scored against the same images.

This module imports no torch: the command line's help reads it. A reader module is imported the first
time its source is used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from annify.errors import DataError

__all__ = [
    "DEBIAN_FASHION_MNIST",
    "SOURCES",
    "DataInfo",
    "Source",
    "build_datasets",
    "data_info",
    "describe_sources",
    "parse_source",
    "register",
    "sources_help",
]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist


@dataclass
class DataInfo:
    """What a model needs to know about a source before seeing any data."""

    num_classes: int
    input_size: tuple[int, int, int]  # (C, H, W) the model sees
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str  # e.g. "digits", "cifar10:/path", "imagefolder:/path"


@dataclass(frozen=True)
class Source:
    """One kind of data source.

    ``reader`` names the module that reads it, imported on first use. It defines
    ``info(kind, arg) -> DataInfo`` (class count, native input size and normalization, reading as
    little as it can) and ``datasets(kind, arg, input_size, val_size, augment)`` (the ``train``, ``val``
    and ``test`` datasets; ``input_size`` None means the native size). ``arg`` is what follows
    ``kind:`` (``default`` when nothing does); see ``build_datasets`` for the other arguments.
    """

    kind: str  # what the source string starts with, lower case
    argument: str  # what follows "kind:": "" (nothing may), "PATH" or "NAME:PATH" (NAME may be empty)
    help: str  # one line: what the source is
    fixed_size: bool  # its images have one native H×W, which a spec fitted to the data takes
    reader: str  # the module defining info() and datasets()
    default: str | None = None  # the argument when the source is written without one
    # gray images repeated to the spec's channel count, instead of a timm model rebuilt at one channel
    # (the digits: the specs written for them say how many channels they want)
    keeps_channels: bool = False

    @property
    def syntax(self) -> str:
        """How the source is written: ``digits``, ``fashion-mnist[:PATH]``, ``cifar10:PATH``."""
        if not self.argument:
            return self.kind
        return (
            f"{self.kind}[:{self.argument}]" if self.default is not None else f"{self.kind}:{self.argument}"
        )

    def accepts(self, written: bool, arg: str) -> bool:
        """Whether the kind followed by ``:arg`` (``written``), or by nothing, gives what it needs."""
        if not written:
            return not self.argument or self.default is not None
        # every colon the argument names is there, and its last part (the PATH) is not empty
        parts = arg.split(":", self.argument.count(":"))
        return bool(self.argument) and len(parts) == self.argument.count(":") + 1 and bool(parts[-1])


SOURCES: dict[str, Source] = {}  # kind -> Source, in the order the help lists them


def register(source: Source) -> Source:
    """Add a data source kind; a kind can be registered once."""
    if source.kind in SOURCES:
        raise ValueError(f"data source '{source.kind}' is already registered")
    if source.kind != source.kind.lower() or ":" in source.kind:
        raise ValueError(f"a data source kind is lower case without ':', got '{source.kind}'")
    SOURCES[source.kind] = source
    return source


def sources_help() -> str:
    """Every registered source as it is written: ``digits | fashion-mnist[:PATH] | ...``."""
    return " | ".join(s.syntax for s in SOURCES.values())


def describe_sources() -> str:
    """One line per registered source: how it is written and what it is."""
    width = max(len(s.syntax) for s in SOURCES.values())
    return "\n".join(f"{s.syntax:<{width}}  {s.help}" for s in SOURCES.values())


# The sources annify reads, in the order the help lists them.
_IDX = "its four IDX files, gzipped or not (28x28 gray)"
# fmt: off
register(Source("digits", "", "scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), offline; the default",
                fixed_size=True, reader="annify.data.digits", keeps_channels=True))
register(Source("fashion-mnist", "PATH", f"Fashion-MNIST, {_IDX}; without PATH, Debian's dataset-fashion-mnist",
                fixed_size=True, reader="annify.data.mnist", default=str(DEBIAN_FASHION_MNIST)))
register(Source("mnist", "PATH", f"MNIST, {_IDX}",
                fixed_size=True, reader="annify.data.mnist"))
register(Source("kmnist", "PATH", f"Kuzushiji-MNIST, {_IDX}",
                fixed_size=True, reader="annify.data.mnist"))
register(Source("cifar10", "PATH", "CIFAR-10's python pickles, extracted (cifar-10-batches-py or its parent)",
                fixed_size=True, reader="annify.data.cifar"))
register(Source("cifar100", "PATH", "CIFAR-100's python pickles, extracted (cifar-100-python or its parent)",
                fixed_size=True, reader="annify.data.cifar"))
register(Source("imagefolder", "PATH", "train/ and val/ (optionally test/) folders of class folders, as ImageNet",
                fixed_size=False, reader="annify.data.folders"))
register(Source("timm", "NAME:PATH", "anything timm.data.create_dataset(NAME, root=PATH) reads from local disk",
                fixed_size=False, reader="annify.data.timm_data"))
# fmt: on


def parse_source(source: str) -> tuple[str, str | None]:
    """Split a source string into its kind and argument.

    Returns ``("digits", None)``, ``(kind, PATH)`` for the path sources (Debian's folder for a bare
    ``fashion-mnist``), and ``("timm", "NAME:PATH")`` for timm sources (NAME may be empty for a plain
    folder or tar).
    """
    kind, sep, arg = source.strip().partition(":")
    kind = kind.lower()
    if kind not in SOURCES or not SOURCES[kind].accepts(bool(sep), arg):
        raise DataError(f"unknown data source {source!r}; expected one of: {sources_help()}")
    return kind, arg if sep else SOURCES[kind].default


def _reader(kind: str):
    return importlib.import_module(SOURCES[kind].reader)


def data_info(source: str) -> DataInfo:
    """Class count, native input size and normalization of a source, reading as little as possible.

    digits, CIFAR and image folders answer from constants and a directory listing; ``timm:`` sources
    are built (timm has no cheaper way to count classes).
    """
    kind, arg = parse_source(source)
    return _reader(kind).info(kind, arg)


def build_datasets(
    source: str,
    input_size: tuple[int, int, int] | None = None,
    val_size: int | float | None = None,
    augment: bool = True,
    train_subset: int | None = None,
) -> dict:
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
    datasets = _reader(kind).datasets(kind, arg, input_size, val_size, augment)
    if train_subset is not None:
        from annify.data.dataset import fixed_subset

        datasets["train"] = fixed_subset(datasets["train"], train_subset, source)
    return datasets
