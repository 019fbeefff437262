"""``imagefolder:PATH``: ``train/`` and ``val/`` (optionally ``test/``) folders of class folders, ImageNet layout.

Read through timm's readers, each image through ``annify.images.image_mode`` (as ``predict`` reads
it), with timm's ImageNet-style transforms; ``timm:NAME:PATH`` (``annify.data.timm_data``) shares the
datasets and transforms here. Without a ``test/`` folder, ``val/`` is split in half into val and test.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset, IterableDataset, Subset

from annify.data.dataset import check_input_size, class_map, existing_dir
from annify.data.sources import DataInfo
from annify.errors import DataError
from annify.images import image_mode

__all__ = [
    "IMAGENET_INPUT",
    "ImageFiles",
    "datasets",
    "info",
    "num_classes",
    "split_datasets",
    "timm_dataset",
]

IMAGENET_INPUT = (3, 224, 224)


def info(kind: str, path: str) -> DataInfo:
    """From a directory listing: the class folders of train/ (every val/ and test/ class among them)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    root = existing_dir("imagefolder", path, "expected train/ and val/ folders of class folders")
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


def timm_dataset(label: str, name: str, root: Path, split: str, class_map=None, search_split=True):
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


def num_classes(label: str, ds) -> int:
    classes = class_map(ds) or getattr(ds, "classes", None)
    if not classes:
        raise DataError(f"{label}: cannot tell the number of classes — use a dataset with class folders")
    return len(classes)


def _halves(ds) -> tuple[Subset, Subset]:
    """Even and odd samples. Readers list files grouped by class, so both halves keep the class mix."""
    return Subset(ds, range(0, len(ds), 2)), Subset(ds, range(1, len(ds), 2))


def split_datasets(train, val, test, input_size, augment, mean, std, kind, channels=(3,)):
    """Attach timm's ImageNet-style transforms; with no test set, val is split in half into val/test."""
    from timm.data import create_transform

    check_input_size(input_size, channels, kind)
    train.transform = create_transform(input_size, is_training=augment, mean=mean, std=std)
    evaluate = create_transform(input_size, is_training=False, mean=mean, std=std)
    for ds in (val, test):
        if ds is not None:
            ds.transform = evaluate
    val, test = _halves(val) if test is None else (val, test)
    return {"train": train, "val": val, "test": test}


class ImageFiles(Dataset):
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


def datasets(kind: str, path: str, input_size, val_size, augment: bool) -> dict:
    """The folders on disk, val halved into val and test without a test folder; ``val_size`` is not used."""
    native = info(kind, path)
    input_size = input_size or native.input_size
    root, label = Path(native.name.partition(":")[2]), "imagefolder"

    def split(name: str, folder: str, classes=None) -> ImageFiles:
        # search_split=False: the split folders are given, so a class named "train" cannot be mistaken for one
        return ImageFiles(timm_dataset(label, "", root / folder, name, classes, False).reader, 3, label)

    train = split("train", "train")
    classes = class_map(train)
    val = split("validation", "val", classes)
    test = split("test", "test", classes) if (root / "test").is_dir() else None
    return split_datasets(train, val, test, input_size, augment, native.mean, native.std, label)
