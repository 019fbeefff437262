"""Tests for annify.data: the embedded digits, CIFAR pickles, image folders, loaders and errors."""

import pickle

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import write_cifar
from PIL import Image

from annify.data import (
    DataError,
    DataInfo,
    build_datasets,
    build_loaders,
    data_info,
    parse_source,
    set_epoch,
)

# --------------------------------------------------------------------------- helpers


def _indices(ds):
    """Rows of the full digits set that a digits split holds, found by exact image match."""
    from sklearn.datasets import load_digits

    rows = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
    where = {row.numpy().tobytes(): i for i, row in enumerate(rows)}
    assert len(where) == len(rows)  # no duplicate images, so a match names one row
    return [where[row.numpy().tobytes()] for row in ds.images.view(len(ds), -1)]


def _write_folder(root, splits=("train", "val"), classes=("cat", "dog", "fish"), per_class=4):
    for split in splits:
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = np.full((20, 24, 3), 40 * c + i, dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


# --------------------------------------------------------------------------- parsing and errors


def test_parse_source_accepts_every_form():
    assert parse_source("digits") == ("digits", None)
    assert parse_source("cifar10:/d/c") == ("cifar10", "/d/c")
    assert parse_source("cifar100:rel") == ("cifar100", "rel")
    assert parse_source("imagefolder:/in") == ("imagefolder", "/in")
    assert parse_source("timm:folder:/x:y") == ("timm", "folder:/x:y")
    assert parse_source("timm::/x") == ("timm", ":/x")


@pytest.mark.parametrize("bad", ["mnist", "cifar10", "cifar10:", "digits:/x", "timm:/x", "timm:name:", ""])
def test_parse_source_rejects_with_the_accepted_forms(bad):
    with pytest.raises(ValueError, match="cifar10:PATH") as err:
        parse_source(bad)
    assert "\n" not in str(err.value)


def test_missing_and_empty_paths_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_datasets(f"cifar10:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="no 'data_batch_1' under .* cifar-10-batches-py"):
        build_datasets(f"cifar10:{tmp_path}")
    with pytest.raises(DataError, match="no 'train' folder"):
        build_datasets(f"imagefolder:{tmp_path}")
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        data_info(f"imagefolder:{tmp_path}")
    (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(DataError, match="has one class folder"):
        data_info(f"imagefolder:{tmp_path}")
    (tmp_path / "train" / "dog").mkdir()
    with pytest.raises(DataError, match="cannot read split 'train'"):
        build_datasets(f"imagefolder:{tmp_path}")


@pytest.mark.parametrize(
    "content",
    [b"not a pickle at all", pickle.dumps({b"labels": [0]}), pickle.dumps(print), pickle.dumps([1, 2])],
    ids=["garbage", "no-data", "code", "not-a-dict"],
)
def test_corrupt_cifar_file_is_a_data_error(tmp_path, content):
    folder, _, _ = write_cifar(tmp_path, "cifar10")
    (folder / "data_batch_3").write_bytes(content)
    with pytest.raises(DataError, match="data_batch_3 is not a CIFAR batch .* re-extract") as err:
        build_datasets(f"cifar10:{folder}")
    assert "\n" not in str(err.value)


def test_out_of_range_cifar_labels_are_rejected(tmp_path):
    folder, _, _ = write_cifar(tmp_path, "cifar10")
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}
    (folder / "test_batch").write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError, match="malformed"):
        build_datasets(f"cifar10:{tmp_path}")


def test_wrong_channel_count_is_rejected(tmp_path):
    write_cifar(tmp_path, "cifar10")
    with pytest.raises(DataError, match="channels"):
        build_datasets(f"cifar10:{tmp_path}", input_size=(1, 32, 32))
    with pytest.raises(DataError, match="channels"):
        build_datasets("digits", input_size=(2, 8, 8))


# --------------------------------------------------------------------------- digits


def test_digits_info():
    info = data_info("digits")
    assert isinstance(info, DataInfo)
    assert (info.num_classes, info.input_size, info.name) == (10, (1, 8, 8), "digits")
    assert len(info.mean) == len(info.std) == 1


def test_digits_splits_are_fixed_and_disjoint():
    a = build_datasets("digits")
    b = build_datasets("digits", augment=False)
    assert {k: len(v) for k, v in a.items()} == {"train": 1167, "val": 270, "test": 360}
    idx = [i for split in a.values() for i in _indices(split)]
    assert sorted(idx) == list(range(1797))  # disjoint and covering
    for split in a:
        assert torch.equal(a[split].images, b[split].images)
        assert torch.equal(a[split].labels, b[split].labels)
        assert set(a[split].labels.tolist()) == set(range(10))  # stratified: every class everywhere


def test_digits_val_size_moves_images_between_train_and_val_only():
    ds = build_datasets("digits", val_size=0.5)
    assert (len(ds["train"]), len(ds["val"]), len(ds["test"])) == (718, 719, 360)
    with pytest.raises(DataError, match="val_size"):
        build_datasets("digits", val_size=5000)


def test_digits_shapes_resize_and_normalization():
    ds = build_datasets("digits", augment=False)
    x, y = ds["train"][0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= y < 10
    train = torch.stack([ds["train"][i][0] for i in range(len(ds["train"]))])
    assert abs(train.mean().item()) < 0.05 and abs(train.std().item() - 1) < 0.05

    big = build_datasets("digits", input_size=(3, 16, 16), augment=False)
    x3, y3 = big["train"][0]
    assert x3.shape == (3, 16, 16) and y3 == y
    assert torch.equal(x3[0], x3[1]) and torch.equal(x3[0], x3[2])  # gray repeated
    expected = F.interpolate(x[None], size=(16, 16), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(x3[:1], expected, rtol=1e-5, atol=1e-5)  # resizing commutes with normalize


def test_digits_augmentation_is_translation_only():
    ds = build_datasets("digits")["train"]
    torch.manual_seed(0)
    raw = ds.images[5]
    padded = F.pad(raw, (1, 1, 1, 1))
    shifts = [(padded[:, i : i + 8, j : j + 8] - ds.mean) / ds.std for i in range(3) for j in range(3)]
    outputs = [ds[5][0] for _ in range(40)]
    assert all(x.shape == (1, 8, 8) for x in outputs)
    assert any(not torch.equal(x, shifts[4]) for x in outputs)  # pixels do change
    for x in outputs:  # and each is a shift of the original, never a mirror image
        assert any(torch.equal(x, s) for s in shifts)
    assert not any(torch.equal(x, shifts[4].flip(-1)) for x in outputs)
    torch.manual_seed(0)
    assert all(torch.equal(ds[5][0], x) for x in outputs[:5])  # reproducible from torch's RNG


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("kind,num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_reads_the_pickle_format(tmp_path, kind, num_classes):
    folder, train_labels, test_labels = write_cifar(tmp_path, kind, num_classes=num_classes)
    info = data_info(f"{kind}:{tmp_path}")  # the parent folder works too
    assert (info.num_classes, info.input_size, len(info.mean)) == (num_classes, (3, 32, 32), 3)
    ds = build_datasets(f"{kind}:{folder}")
    assert (len(ds["train"]), len(ds["val"]), len(ds["test"])) == (54, 6, 20)  # 10% held out of 60
    assert sorted(ds["train"].labels.tolist() + ds["val"].labels.tolist()) == sorted(train_labels)
    assert ds["test"].labels.tolist() == test_labels  # fine labels for CIFAR-100
    x, y = ds["train"][0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < num_classes
    again = build_datasets(f"{kind}:{folder}")
    assert torch.equal(again["val"].images, ds["val"].images)  # the split is fixed, not drawn per call


def test_cifar_pixels_match_the_file_and_resize(tmp_path):
    folder, _, _ = write_cifar(tmp_path, "cifar10")
    with open(folder / "test_batch", "rb") as f:
        first = torch.tensor(pickle.load(f)[b"data"][0]).view(3, 32, 32).float() / 255
    ds = build_datasets(f"cifar10:{folder}", input_size=(3, 40, 40), val_size=10)
    assert (len(ds["train"]), len(ds["val"])) == (50, 10)
    x, _ = ds["test"][0]
    assert x.shape == (3, 40, 40)
    native = build_datasets(f"cifar10:{folder}")["test"]
    torch.testing.assert_close(native[0][0] * native.std + native.mean, first)


# --------------------------------------------------------------------------- image folders


def test_imagefolder_without_test_splits_val_in_half(tmp_path):
    _write_folder(tmp_path)
    info = data_info(f"imagefolder:{tmp_path}")
    assert (info.num_classes, info.input_size) == (3, (3, 224, 224))
    ds = build_datasets(f"imagefolder:{tmp_path}", input_size=(3, 32, 32))
    assert (len(ds["train"]), len(ds["val"]), len(ds["test"])) == (12, 6, 6)
    assert {y for _, y in ds["test"]} == {0, 1, 2}  # each half keeps every class
    loaders = build_loaders(ds, batch_size=4)
    x, y = next(iter(loaders["train"]))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4,)
    x, _ = next(iter(loaders["val"]))
    assert x.shape == (4, 3, 32, 32)


def test_imagefolder_with_test_and_missing_class_keeps_train_indices(tmp_path):
    _write_folder(tmp_path, splits=("train",))
    _write_folder(tmp_path, splits=("val", "test"), classes=("dog",), per_class=2)
    ds = build_datasets(f"imagefolder:{tmp_path}", input_size=(3, 32, 32), augment=False)
    assert (len(ds["val"]), len(ds["test"])) == (2, 2)
    assert {y for _, y in ds["val"]} == {1}  # "dog" is class 1 of train's cat/dog/fish


def test_timm_source_reads_a_folder(tmp_path):
    _write_folder(tmp_path, splits=("train", "validation"))
    info = data_info(f"timm::{tmp_path}")
    assert info.num_classes == 3 and info.name == f"timm::{tmp_path}"
    ds = build_datasets(f"timm::{tmp_path}", input_size=(3, 32, 32))
    assert (len(ds["train"]), len(ds["val"]), len(ds["test"])) == (12, 6, 6)
    assert ds["val"][0][0].shape == (3, 32, 32)


# --------------------------------------------------------------------------- loaders


def test_loaders_batch_and_shuffle_deterministically():
    ds = build_datasets("digits", augment=False)

    def first_labels(seed):
        loaders = build_loaders(ds, batch_size=64, seed=seed, drop_last=True)
        return [y for _, y in loaders["train"]], loaders

    a, loaders = first_labels(0)
    b, _ = first_labels(0)
    c, _ = first_labels(1)
    assert len(a) == 1167 // 64 and all(y.shape == (64,) for y in a)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=True))
    assert not torch.equal(torch.cat(a), ds["train"].labels[: len(a) * 64])  # shuffled
    val = torch.cat([y for _, y in loaders["val"]])
    assert torch.equal(val, ds["val"].labels)  # in order, last partial batch kept
    x, _ = next(iter(loaders["test"]))
    assert x.shape == (64, 1, 8, 8)


def test_distributed_loaders_reshuffle_per_epoch(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ds = build_datasets("digits", augment=False)
        loaders = build_loaders(ds, batch_size=512, distributed=True, seed=3)

        def order(epoch):
            set_epoch(loaders, epoch)
            return torch.cat([y for _, y in loaders["train"]])

        assert torch.equal(order(0), order(0))
        assert not torch.equal(order(0), order(1))
        assert torch.equal(torch.cat([y for _, y in loaders["val"]]), ds["val"].labels)
    finally:
        dist.destroy_process_group()
