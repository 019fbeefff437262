"""The registry of data sources is the one list: the CLI's help, the errors, parsing, the dispatch to a
reader and the spec fitting all follow it. This module is also the reader of a source the tests register."""

import pytest
import torch
from click.testing import CliRunner

from annify.cli import main
from annify.data import (
    SOURCES,
    DataError,
    DataInfo,
    Source,
    TensorImageDataset,
    build_datasets,
    data_info,
    parse_source,
    register,
    sources_help,
)
from annify.evaluate import fit_to_data
from annify.spec import HeadSpec, Spec

# --------------------------------------------------------------------------- a reader: info() and datasets()


def info(kind, arg):
    return DataInfo(3, (3, 8, 8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), f"{kind}:{arg}")


def datasets(kind, arg, input_size, val_size, augment):
    size = input_size or info(kind, arg).input_size
    images, labels = torch.rand(12, 3, 8, 8), torch.arange(12) % 3
    counts = {"train": 12, "val": 6, "test": 6}
    return {
        s: TensorImageDataset(images[:n], labels[:n], size, (0.5,) * 3, (0.25,) * 3)
        for s, n in counts.items()
    }


@pytest.fixture
def registered():
    """Registers ``toy:PATH`` (fixed size) and ``loose:NAME:PATH`` read by this module, for one test."""
    register(Source("toy", "PATH", "a test source", fixed_size=True, reader=__name__))
    register(Source("loose", "NAME:PATH", "a test source of any size", fixed_size=False, reader=__name__))
    yield
    for kind in ("toy", "loose"):
        del SOURCES[kind]


# --------------------------------------------------------------------------- the one list


@pytest.mark.parametrize("command", ["train", "eval", "eann"])
def test_every_registered_source_is_in_the_data_help(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # click wraps the help at spaces
    assert f"--data TEXT Data source: {sources_help()} (default:" in text
    for source in SOURCES.values():
        assert source.syntax in text, source.kind


def test_the_listed_forms_and_fixed_sizes_are_the_registry_s():
    assert sources_help() == " | ".join(s.syntax for s in SOURCES.values())
    assert sources_help() == (
        "digits | fashion-mnist[:PATH] | mnist:PATH | kmnist:PATH | cifar10:PATH | cifar100:PATH"
        " | imagefolder:PATH | timm:NAME:PATH"
    )
    fixed = {kind for kind, source in SOURCES.items() if source.fixed_size}
    assert fixed == {"digits", "fashion-mnist", "mnist", "kmnist", "cifar10", "cifar100"}
    import annify.data

    for source in SOURCES.values():
        assert source.syntax in annify.data.__doc__ and source.help in annify.data.__doc__


def test_an_unknown_source_is_one_line_listing_every_registered_source():
    for bad in ("nope", "nope:/x", "Digits:/x"):
        with pytest.raises(DataError) as err:
            data_info(bad)
        message = str(err.value)
        assert message == f"unknown data source {bad!r}; expected one of: {sources_help()}"
        assert "\n" not in message
        assert all(s.syntax in message for s in SOURCES.values())


def test_a_registered_source_is_parsed_read_listed_and_fitted(registered):
    assert parse_source("TOY:/x") == ("toy", "/x")
    assert parse_source("loose::/x") == ("loose", ":/x")
    assert sources_help().endswith(" | toy:PATH | loose:NAME:PATH")
    with pytest.raises(DataError, match=r"expected one of: .*\| toy:PATH \| loose:NAME:PATH$"):
        parse_source("toy")  # toy needs a path
    assert data_info("toy:/x") == info("toy", "/x")
    split = build_datasets("toy:/x", input_size=(3, 4, 4), train_subset=6)
    assert [len(split[s]) for s in ("train", "val", "test")] == [6, 6, 6]
    assert split["train"][0][0].shape == (3, 4, 4)
    spec = Spec("tiny", "cifar_resnet_n3_c8", [HeadSpec("model")], input_size=(3, 32, 32), num_classes=3)
    assert fit_to_data(spec, "toy:/x")[0].input_size == (3, 8, 8)  # fixed size: the data's H×W
    assert fit_to_data(spec, "loose:n:/x") == (spec, None)  # any size: the spec's stays


def test_a_kind_is_registered_once_in_lower_case(registered):
    with pytest.raises(ValueError, match="'toy' is already registered"):
        register(Source("toy", "PATH", "again", fixed_size=True, reader=__name__))
    for kind in ("Toy2", "toy:2"):
        with pytest.raises(ValueError, match="lower case without ':'"):
            register(Source(kind, "PATH", "bad", fixed_size=True, reader=__name__))
