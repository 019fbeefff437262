"""Shared fixtures for the convert-stage tests.

``tiny`` is a fresh anytime network per test (cheap: cifar_resnet_n3_c8 with one input channel at
1×8×8); ``zoo`` traces and converts timm models once per session and must only be used in eval mode
and under ``torch.no_grad()``, since every test that asks for the same model shares it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import annify
from annify import heads as head_registry
from annify.trace import TapPoint, Traced

# One thread for the whole suite: the models here are tiny (or a single 224 forward), and on a busy
# 2-core machine OpenMP threads spin against other processes (a 2-epoch run went from 2.4 s to 20 s).
torch.set_num_threads(1)

TINY_MODEL = "cifar_resnet_n3_c8"
TINY_SIZE = (1, 8, 8)
TINY_KWARGS = {"in_chans": 1}
TINY_CLASSES = 5


def convert_tiny(**placement) -> tuple[annify.AnytimeNet, annify.Spec, annify.Costs]:
    """cifar_resnet_n3_c8 (9 basic units) at 1×8×8 with 5 classes, converted with ``placement``."""
    placement = placement or {"every": 2}
    return annify.convert(
        TINY_MODEL,
        input_size=TINY_SIZE,
        num_classes=TINY_CLASSES,
        model_kwargs=dict(TINY_KWARGS),
        **placement,
    )


def trunk_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The converted network's state dict without the added heads: the timm model's own keys."""
    return net.trunk_state_dict()


@pytest.fixture
def make_tiny():
    """``make_tiny(**placement)`` -> (net, spec, costs) of the tiny model (default ``every=2``)."""
    return convert_tiny


@pytest.fixture(name="trunk_state")
def trunk_state_fixture():
    """``trunk_state(net)``: the state dict without the added heads."""
    return trunk_state


@pytest.fixture(scope="session")
def _tiny_once():
    return convert_tiny(every=2)


@pytest.fixture
def tiny(_tiny_once):
    """A fresh (net, spec, costs): heads after units 2, 4, 6 and 8, plus the classifier (5 outputs)."""
    return copy.deepcopy(_tiny_once)  # converting (costing) takes a while; copying does not


@pytest.fixture
def tiny_net(tiny) -> annify.AnytimeNet:
    return tiny[0].eval()


@pytest.fixture
def tiny_twin(tiny_net) -> nn.Module:
    """A separate timm model (its own modules) holding the same weights as ``tiny_net``."""
    return annify.plain_model(tiny_net)


@pytest.fixture
def tiny_input() -> torch.Tensor:
    """A seeded batch of two 1×8×8 inputs."""
    return torch.randn(2, *TINY_SIZE, generator=torch.Generator().manual_seed(0))


@dataclass
class Converted:
    """A timm model traced at ``input_size``, an anytime network over it and an independent twin."""

    traced: Traced
    taps: list[TapPoint]
    net: annify.AnytimeNet  # default heads after every second block, like `annify convert --every 2`
    twin: nn.Module  # a fresh timm model with the same weights (no shared modules)
    x: torch.Tensor  # a seeded batch of one input

    def outputs(self) -> tuple[list, torch.Tensor]:
        with torch.no_grad():
            return self.net(self.x), self.twin(self.x)


@pytest.fixture(scope="session")
def zoo():
    """``zoo(name, input_size, **model_kwargs)`` -> ``Converted``, built once per session."""
    cache: dict[tuple, Converted] = {}

    def get(name: str, input_size: tuple[int, int, int], **kwargs) -> Converted:
        key = (name, tuple(input_size), tuple(sorted(kwargs.items())))
        if key not in cache:
            model = annify.create_model(name, **kwargs).eval()
            traced = annify.trace(model, input_size)
            taps = annify.tap_points(traced)
            chosen = [t for t in taps[:-1] if t.index % 2 == 0]
            prefix = getattr(model, "num_prefix_tokens", 0)
            heads = [
                head_registry.build(
                    head_registry.default_for(t.layout),
                    t.channels,
                    model.num_classes,
                    t.layout,
                    num_prefix_tokens=prefix,
                )
                for t in chosen
            ]
            net = annify.AnytimeNet(traced, [t.node for t in chosen], heads).eval()
            twin = annify.create_model(name, **kwargs).eval()
            twin.load_state_dict(trunk_state(net), strict=True)
            x = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
            cache[key] = Converted(traced, taps, net, twin, x)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory):
    """A tiny spec file (``helpers.tiny_spec()``), once per test module; modules may define their own."""
    from helpers import spec_file

    return spec_file(tmp_path_factory)


@pytest.fixture(scope="module")
def run(spec_path, tmp_path_factory):
    """A run folder: ``spec_path`` trained one epoch on the digits, once per test module."""
    from annify.train import train

    out = tmp_path_factory.mktemp("runs") / "run"
    train(spec_path, out=out, epochs=1, log=lambda _: None)
    return out
