"""Batches for training and evaluation: the in-memory fast path (``TensorBatches``) or DataLoaders.

``make_batches`` picks between them (``--loader auto``): data sets held as one tensor (digits, the
MNIST family, CIFAR) are put on the training device whole and batched, augmented and normalised
there; folders and timm's data sets go through torch's DataLoader with worker processes.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from annify.data.dataset import TensorImageDataset
from annify.data.transforms import pad_crop_flip, resize_and_normalize
from annify.errors import DataError

__all__ = ["LOADERS", "TensorBatches", "build_loaders", "describe_batches", "make_batches", "set_epoch"]


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
            yield resize_and_normalize(x, self.input_size, self.mean, self.std), self.labels[idx]


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
