"""The MNIST family from IDX files the tests write, the fixed training subset, gray timm data sets,
and the in-memory fast path (TensorBatches) against the DataLoader path."""

import os

import pytest
import torch
from helpers import IDX_NAMES, assert_one_line_error, write_idx

from annify.data import (
    DataError,
    PadCropFlip,
    TensorBatches,
    TensorImageDataset,
    build_datasets,
    build_loaders,
    data_info,
    parse_source,
)
from annify.evaluate import fit_to_data
from annify.spec import load_spec


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ANNIFY_CACHE", str(tmp_path / "cache"))


# --- the MNIST family --------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "gz"), [("fashion-mnist", True), ("mnist", False), ("kmnist", True)])
def test_mnist_family_reads_idx_files(tmp_path, kind, gz):
    src = tmp_path / "src"
    train_x, train_y, test_x, test_y = write_idx(src, gz=gz, seed=len(kind))
    before = sorted(os.listdir(src))
    info = data_info(f"{kind}:{src}")
    assert (info.num_classes, info.input_size) == (10, (1, 28, 28))
    assert info.mean[0] == pytest.approx(train_x.float().div(255).mean().item(), abs=1e-5)
    ds = build_datasets(f"{kind}:{src}", augment=False)
    assert [len(ds[s]) for s in ("train", "val", "test")] == [180, 20, 50]  # 10% held out below 10,000
    assert torch.equal(ds["test"].images[:, 0], test_x) and torch.equal(ds["test"].labels, test_y.long())
    seen = torch.cat([ds["train"].images, ds["val"].images])[:, 0]
    assert sorted(map(bytes, seen.flatten(1).numpy())) == sorted(map(bytes, train_x.flatten(1).numpy()))
    assert sorted(os.listdir(src)) == before  # the source folder is only read


def test_fashion_mnist_holds_out_5000_and_trains_at_one_channel(tmp_path):
    src = tmp_path / "fm"
    write_idx(src, n_train=10000, n_test=20)
    ds = build_datasets(f"fashion-mnist:{src}")
    assert (len(ds["train"]), len(ds["val"])) == (5000, 5000)
    assert torch.bincount(ds["val"].labels).tolist() == [500] * 10  # stratified
    spec = load_spec("specs/cifar_resann_n7_c16.yaml")  # 3×32×32 for CIFAR
    fitted, note = fit_to_data(spec, f"fashion-mnist:{src}")
    assert fitted.input_size == (1, 28, 28) and fitted.model_kwargs["in_chans"] == 1
    assert "rebuilding cifar_resann_n7_c16" in note


def test_fashion_mnist_default_path_and_errors(tmp_path):
    assert parse_source("fashion-mnist") == ("fashion-mnist", "/usr/share/datasets/fashion-mnist")
    with pytest.raises(DataError, match="does not exist .* apt-get install dataset-fashion-mnist"):
        data_info(f"fashion-mnist:{tmp_path / 'nowhere'}")
    write_idx(tmp_path / "part")
    (tmp_path / "part" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="no t10k-labels-idx1-ubyte"):
        data_info(f"mnist:{tmp_path / 'part'}")
    (tmp_path / "bad").mkdir()
    for name in IDX_NAMES:
        (tmp_path / "bad" / f"{name}.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="is not a readable IDX file"):
        data_info(f"kmnist:{tmp_path / 'bad'}")
    with pytest.raises(DataError, match="unknown data source"):
        parse_source("mnist")  # mnist needs a path


def test_a_damaged_gzip_stream_is_a_data_error(tmp_path):
    """A .gz whose header is fine but whose deflate stream is damaged (zlib.error, not an OSError)."""
    src = tmp_path / "damaged"
    write_idx(src)
    name = src / "train-images-idx3-ubyte.gz"
    blob = bytearray(name.read_bytes())
    blob[20:40] = b"\xff" * 20  # inside the deflate stream, past the 10-byte gzip header
    name.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="is not a readable IDX file"):
        data_info(f"mnist:{src}")


def test_cache_is_reused_and_refreshed(tmp_path):
    src = tmp_path / "src"
    write_idx(src)
    data_info(f"mnist:{src}")
    cached = list((tmp_path / "cache" / "datasets").glob("MNIST-*/MNIST/raw/*"))
    assert sorted(p.name for p in cached) == sorted(IDX_NAMES)
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    from annify.data.mnist import _mnist_root

    _mnist_root("mnist", str(src))
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps  # not rewritten
    assert not list((tmp_path / "cache").rglob(".*ubyte*"))  # no temporary files left


def test_train_subset_is_fixed_and_stratified(tmp_path):
    src = tmp_path / "src"
    write_idx(src, n_train=400)
    a = build_datasets(f"fashion-mnist:{src}", train_subset=100, augment=False)
    b = build_datasets(f"fashion-mnist:{src}", train_subset=100, augment=False)
    assert len(a["train"]) == 100 and torch.equal(a["train"].images, b["train"].images)
    assert torch.bincount(a["train"].labels).tolist() == [10] * 10
    assert len(a["val"]) == 40 and len(a["test"]) == 50  # untouched
    with pytest.raises(DataError, match="train_subset=1000 is not between 1 and the 360"):
        build_datasets(f"fashion-mnist:{src}", train_subset=1000)


def test_timm_gray_dataset_trains_at_one_channel(tmp_path):
    root = tmp_path / "tv"
    write_idx(root / "FashionMNIST" / "raw", n_train=40, n_test=20, gz=False)
    source = f"timm:torch/fashion_mnist:{root}"
    info = data_info(source)
    assert info.input_size == (1, 28, 28) and len(info.mean) == 1
    ds = build_datasets(source, input_size=(1, 32, 32))
    x, y = ds["train"][0]
    assert x.shape == (1, 32, 32) and 0 <= y < 10
    assert ds["val"][0][0].shape == (1, 32, 32)


def test_cli_train_fashion_mnist_end_to_end(tmp_path):
    from click.testing import CliRunner

    from annify.cli import main

    src = tmp_path / "src"
    write_idx(src, n_train=120, n_test=30)
    spec = tmp_path / "s.yaml"
    spec.write_text("name: t\nmodel: cifar_resnet_n3_c8\ninput_size: [3, 32, 32]\nnum_classes: 10\n"
                    "heads:\n  - {node: stages.0.2.add}\n  - {node: model}\n")  # fmt: skip
    args = ["train", str(spec), "--data", f"fashion-mnist:{src}", "--epochs", "1", "--train-subset", "50"]
    result = CliRunner().invoke(
        main, [*args, "--head-local", "--distill", "0.5", "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 0, result.output
    assert "50 train / 12 val / 30 test images, held on cpu (in-memory fast path)" in result.output
    assert "in_chans: 1" in (tmp_path / "r" / "config.yaml").read_text()
    bad = CliRunner().invoke(main, [*args, "--loader", "tensor", "--data", "imagefolder:/nowhere"])
    assert_one_line_error(bad, "imagefolder: /nowhere does not exist")


# --- the fast path ---------------------------------------------------------------------------------


def _digits_train(augment=False):
    return build_datasets("digits", input_size=(3, 12, 12), augment=augment)["train"]


def test_fast_path_gives_the_loader_batches_without_augmentation():
    ds = _digits_train()
    loader = build_loaders({"train": ds}, 100, seed=7)["train"]
    fast = TensorBatches(ds, 100, shuffle=True, seed=7)
    fast.augment = None
    for epoch in range(2):
        loader.generator.manual_seed(epoch)
        fast.generator.manual_seed(epoch)
        batches = list(loader)
        assert len(fast) == len(batches)
        for (xa, ya), (xb, yb) in zip(batches, fast, strict=True):
            assert torch.equal(ya, yb)
            torch.testing.assert_close(xa, xb, rtol=0, atol=1e-6)  # resize and normalization, batched
    evals = TensorBatches(ds, 64)  # in order, never augmented
    x0, y0 = next(iter(evals))
    torch.testing.assert_close(x0[3], ds[3][0], rtol=0, atol=1e-6)
    assert y0[3].item() == ds[3][1]


def test_fast_path_augments_with_the_datasets_transform():
    """Each image of a shuffled epoch is its source image (found by its unique label) shifted by at most
    2 pixels with black borders and mirrored left-right or not: checked against every such candidate,
    made by slicing a padded copy here, not with the code under test."""
    images = torch.randint(0, 256, (50, 1, 6, 6), dtype=torch.uint8)
    labels = torch.arange(50)  # one class per image: the label says which image came out
    ds = TensorImageDataset(images, labels, (1, 6, 6), (0.5,), (0.25,), PadCropFlip(pad=2, flip=True))
    batches = list(TensorBatches(ds, 16, shuffle=True, seed=3))
    got = torch.cat([x for x, _ in batches]) * 0.25 + 0.5  # undo the normalisation
    order = torch.cat([y for _, y in batches])
    assert sorted(order.tolist()) == list(range(50))  # every image once per epoch
    base = images.float() / 255
    drawn = []
    for image, label in zip(got, order.tolist(), strict=True):
        padded = torch.nn.functional.pad(base[label], (2, 2, 2, 2))  # black border: 0 before normalising
        candidates = [
            (
                (i, j, flip),
                padded[:, i : i + 6, j : j + 6].flip(-1) if flip else padded[:, i : i + 6, j : j + 6],
            )
            for i in range(5)
            for j in range(5)
            for flip in (False, True)
        ]
        match = [how for how, want in candidates if torch.allclose(image, want, rtol=0, atol=1e-6)]
        assert match, f"image {label} is no shift or mirror of its source"
        drawn.append(match[0])
    assert 0 < sum(flip for _, _, flip in drawn) < 50  # some mirrored, some not
    assert len({(i, j) for i, j, _ in drawn}) > 5  # really random shifts
    assert torch.equal(
        order, torch.cat([y for _, y in TensorBatches(ds, 16, shuffle=True, seed=3)])
    )  # seeded


def test_per_sample_transform_is_a_shift_with_black_borders():
    base = torch.rand(1, 1, 6, 6)
    torch.manual_seed(0)
    one = PadCropFlip(pad=2, flip=False)(base[:1][0])
    torch.manual_seed(0)
    i, j = torch.randint(0, 5, (2,)).tolist()
    assert torch.equal(one, torch.nn.functional.pad(base[0], (2, 2, 2, 2))[:, i : i + 6, j : j + 6])


def test_fast_path_shards_like_distributed_sampler():
    images = torch.zeros(10, 1, 4, 4, dtype=torch.uint8)
    ds = TensorImageDataset(images, torch.arange(10), (1, 4, 4), (0.0,), (1.0,))
    seen = []
    for rank in range(3):
        b = TensorBatches(ds, 2, shuffle=True, seed=1, rank=rank, world=3)
        labels = torch.cat([y for _, y in b])
        assert len(labels) == 4 and len(b) == 2  # ceil(10 / 3), padded by wrapping around
        seen += labels.tolist()
    assert set(seen) == set(range(10))
    evals = [torch.cat([y for _, y in TensorBatches(ds, 2, rank=r, world=3)]).tolist() for r in range(3)]
    assert sorted(sum(evals, [])) == list(range(10))  # evaluation shards: every image once


def test_gray_data_keeps_three_channels_for_torchvision_models(tmp_path):
    from annify.spec import parse

    src = tmp_path / "src"
    write_idx(src)
    spec = parse({"model": "torchvision:resnet18", "input_size": [3, 64, 64], "num_classes": 10,
                  "heads": [{"node": "model"}]}, "t")  # fmt: skip
    fitted, _ = fit_to_data(spec, f"fashion-mnist:{src}")
    assert fitted.input_size == (3, 28, 28) and "in_chans" not in fitted.model_kwargs
    x, _ = build_datasets(f"fashion-mnist:{src}", input_size=fitted.input_size)["train"][0]
    assert x.shape == (3, 28, 28) and torch.equal(x[0], x[2])  # gray repeated
