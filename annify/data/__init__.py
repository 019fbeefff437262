"""Datasets and loaders for training and evaluating anytime networks.

Split the way timm splits its data package:

- ``sources``: the registry of data sources (``SOURCES``, one ``Source`` record per kind), parsing a
  source string and the one dispatch to its reader: ``data_info``, ``build_datasets``.
- readers, one per format: ``digits``, ``mnist`` (IDX files), ``cifar`` (pickles), ``folders``
  (ImageNet-layout folders through timm's readers) and ``timm_data`` (``timm.data.create_dataset``).
- ``dataset``: ``TensorImageDataset`` (images held in memory) and the fixed, seeded splits.
- ``transforms``: ``PadCropFlip`` / ``pad_crop_flip`` (one image / a batch), resizing and normalizing.
- ``batches``: the in-memory fast path (``TensorBatches``) and ``make_batches``, which picks it or
  DataLoaders (``build_loaders``).

Reading an image file for inference is ``annify.images``. The names below load on first use (PEP 562),
so the command line's help, which lists the sources, does not import torch.
"""

import textwrap

from annify._lazy import load
from annify.data.sources import (
    DEBIAN_FASHION_MNIST,
    SOURCES,
    DataInfo,
    Source,
    build_datasets,
    data_info,
    describe_sources,
    parse_source,
    register,
    sources_help,
)
from annify.errors import DataError

if __doc__:  # the list of sources, from the registry (``python -OO`` drops docstrings)
    __doc__ += "\nThe data sources (``SOURCES``):\n\n" + textwrap.indent(describe_sources(), "    ") + "\n"

_EXPORTS = {
    "SPLIT_SEED": "annify.data.dataset",
    "TensorImageDataset": "annify.data.dataset",
    "PadCropFlip": "annify.data.transforms",
    "pad_crop_flip": "annify.data.transforms",
    "LOADERS": "annify.data.batches",
    "TensorBatches": "annify.data.batches",
    "build_loaders": "annify.data.batches",
    "describe_batches": "annify.data.batches",
    "make_batches": "annify.data.batches",
    "set_epoch": "annify.data.batches",
}


def __getattr__(name: str):
    return load(globals(), _EXPORTS, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "DEBIAN_FASHION_MNIST",
    "LOADERS",
    "SOURCES",
    "SPLIT_SEED",
    "DataError",
    "DataInfo",
    "PadCropFlip",
    "Source",
    "TensorBatches",
    "TensorImageDataset",
    "build_datasets",
    "build_loaders",
    "data_info",
    "describe_batches",
    "describe_sources",
    "make_batches",
    "pad_crop_flip",
    "parse_source",
    "register",
    "set_epoch",
    "sources_help",
]
