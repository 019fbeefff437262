"""Prediction heads, in a small registry chosen per spec.

A head maps the features at a tap point to logits. ``bn_relu_pool_linear`` is the paper's head
(appendix B: BN-ReLU, global average pooling, a linear prediction) for NCHW feature maps;
``norm_pool_linear`` serves tokens (NLC) and channels-last (NHWC) features with a LayerNorm in
place of BatchNorm, as timm's ``NormMlpClassifierHead`` does. Add a head type with::

    @register("my_head")
    def my_head(channels: int, num_classes: int, layout: str, **kw) -> nn.Module: ...
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from annify.errors import ConvertError, UnknownNameError

__all__ = ["available", "build", "default_for", "register"]

_HEADS: dict[str, Callable[..., nn.Module]] = {}
_DEFAULTS = {
    "NCHW": "bn_relu_pool_linear",
    "NHWC": "norm_pool_linear",
    "NLC": "norm_pool_linear",
    "NC": "norm_linear",
}


def register(name: str) -> Callable:
    """Register a head factory ``f(channels, num_classes, layout, **kw) -> nn.Module`` under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _HEADS:
            raise ValueError(f"head type '{name}' is already registered")
        _HEADS[name] = fn
        return fn

    return deco


def available() -> list[str]:
    """Names of the registered head types."""
    return sorted(_HEADS)


def default_for(layout: str) -> str:
    """The head type used for a feature layout when the spec names none."""
    return _DEFAULTS[layout]


def build(name: str, channels: int, num_classes: int, layout: str, **kw) -> nn.Module:
    """Build a head of type ``name`` reading ``channels``-wide features laid out as ``layout``."""
    if name not in _HEADS:
        raise UnknownNameError(f"unknown head type '{name}'; available: {', '.join(available())}")
    return _HEADS[name](channels, num_classes, layout, **kw)


class PaperHead(nn.Module):
    """BatchNorm, ReLU, global average pooling, linear (Hu et al. 2019, appendix B).

    The ReLU works in place on BatchNorm's fresh output (BatchNorm's backward reads its input, not
    its output): the same numbers, but one full-resolution tensor less to allocate and write per call,
    which at an early tap (256×56×56 per image in resnet50) is most of what the head costs.
    """

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: B×C×H×W
        return self.fc(self.act(self.norm(x)).mean((2, 3)))


class TokenHead(nn.Module):
    """LayerNorm over channels, average over tokens or positions, linear.

    For NLC features the first ``num_prefix_tokens`` (class and register tokens) are left out of
    the average, as timm's ``global_pool='avg'`` does; NHWC features average over H and W.
    """

    def __init__(self, channels: int, num_classes: int, layout: str, num_prefix_tokens: int = 0):
        super().__init__()
        self.layout = layout
        self.num_prefix_tokens = num_prefix_tokens
        self.norm = nn.LayerNorm(channels)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.layout == "NLC":  # B×L×C
            x = x[:, self.num_prefix_tokens :].mean(1)
        elif self.layout == "NHWC":  # B×H×W×C
            x = x.mean((1, 2))
        return self.fc(x)


@register("bn_relu_pool_linear")
def _paper_head(channels: int, num_classes: int, layout: str, **kw) -> nn.Module:
    if layout != "NCHW":
        raise ConvertError(
            f"head 'bn_relu_pool_linear' reads NCHW features, not {layout}; use 'norm_pool_linear'"
        )
    return PaperHead(channels, num_classes)


@register("norm_pool_linear")
def _token_head(channels: int, num_classes: int, layout: str, num_prefix_tokens: int = 0, **kw) -> nn.Module:
    if layout == "NCHW":
        raise ConvertError(
            "head 'norm_pool_linear' reads NLC or NHWC features; use 'bn_relu_pool_linear' for NCHW"
        )
    return TokenHead(channels, num_classes, layout, num_prefix_tokens if layout == "NLC" else 0)


@register("norm_linear")
def _vector_head(channels: int, num_classes: int, layout: str, **kw) -> nn.Module:
    if layout != "NC":
        raise ConvertError(f"head 'norm_linear' reads pooled NC features, not {layout}")
    return TokenHead(channels, num_classes, "NC")
