"""Prediction heads, in a small registry chosen per spec.

A head maps the features at a tap point to logits. ``bn_relu_pool_linear`` is the paper's head
(appendix B: BN-ReLU, global average pooling, a linear prediction) for NCHW feature maps;
``norm_pool_linear`` serves tokens (NLC) and channels-last (NHWC) features with a LayerNorm in
place of BatchNorm, as timm's ``NormMlpClassifierHead`` does. Add a head type with::

    @register("my_head")
    def my_head(channels: int, num_classes: int, layout: str, **kw) -> nn.Module: ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from annify.errors import ConvertError, UnknownNameError

__all__ = ["available", "build", "default_for", "register", "unfused"]

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


# bytes of one slice of the feature map that the fused training head processes at a time: small
# enough that the slice's temporaries stay in the core's cache instead of going to memory
_SLICE_BYTES = 1 << 20
# the smallest feature map (values) that the training head fuses; see PaperHead.forward
FUSED_MIN_NUMEL = 1 << 20


@contextlib.contextmanager
def unfused() -> Iterator[None]:
    """Inside the block the paper head trains through autograd's chain (BatchNorm, ReLU, mean) instead of
    the fused operation: the reference the fused path is compared with, in tests and benchmarks."""
    global FUSED_MIN_NUMEL
    keep, FUSED_MIN_NUMEL = FUSED_MIN_NUMEL, float("inf")
    try:
        yield
    finally:
        FUSED_MIN_NUMEL = keep


def _slices(x: torch.Tensor) -> list[slice]:
    """Slices of the batch dimension, each about ``_SLICE_BYTES`` of ``x`` (at least one sample)."""
    per_sample = max(1, x[0].numel() * x.element_size())
    k = max(1, _SLICE_BYTES // per_sample)
    return [slice(i, i + k) for i in range(0, x.shape[0], k)]


class _BatchNormReLUPool(torch.autograd.Function):
    """mean over H×W of ReLU(BatchNorm(x)) with batch statistics, forward and backward in few passes.

    Autograd's chain (BatchNorm, ReLU, mean) writes the normalised map, rewrites it in the ReLU,
    expands the pooled gradient back to full resolution, masks it, and runs BatchNorm's backward over
    it: about eleven passes over the full-resolution map per step. Pooling right after the ReLU makes
    the gradient reaching the map a constant per sample and channel, so the whole backward needs two
    reductions over ``m = [a·x + b > 0]`` (Σ m and Σ m·x) and one pass writing ``dx``; the forward is
    one statistics pass and one pooled pass. Each pass goes over cache-sized slices of the batch.
    Same function and gradients as the chain, up to float rounding (a·x + b instead of (x − μ)·σ⁻¹·γ + β).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):  # float32 on the CPU (see PaperHead.forward)
        n, c, h, w = x.shape
        count = n * h * w
        # batch statistics from per-(sample, channel) sums (torch.var_mean over N, H, W is a slow
        # Welford loop on the CPU); combined in float64, which keeps E[x²] − E[x]² accurate
        flat = x.flatten(2)
        mu = flat.sum(2).sum(0, dtype=torch.float64) / count
        var = (torch.linalg.vecdot(flat, flat).sum(0, dtype=torch.float64) / count - mu * mu).clamp_(min=0)
        mu, var = mu.float(), var.float()
        invstd = torch.rsqrt(var + eps)
        a = weight * invstd
        b = bias - mu * a
        a4, b4 = a[:, None, None], b[:, None, None]
        pooled = x.new_empty(n, c)
        for s in _slices(x):
            pooled[s] = torch.addcmul(b4, x[s], a4).relu_().mean((2, 3))
        ctx.save_for_backward(x, a, b, mu, invstd)
        return pooled, mu, var

    @staticmethod
    def backward(ctx, grad, _gmu, _gvar):
        x, a, b, mu, invstd = ctx.saved_tensors
        n, c, h, w = x.shape
        count = n * h * w
        g = grad / (h * w)  # the gradient each element of a sample's channel receives
        a4, b4 = a[:, None, None], b[:, None, None]
        s0, s1 = x.new_empty(n, c), x.new_empty(n, c)  # Σ_hw m and Σ_hw m·x
        for s in _slices(x):
            xs = x[s]
            m = torch.addcmul(b4, xs, a4).gt_(0)  # the ReLU's mask, as 0.0/1.0
            s0[s] = m.sum((2, 3))
            s1[s] = torch.linalg.vecdot(m.flatten(2), xs.flatten(2))
        dbias = (g * s0).sum(0)
        dweight = (g * (s1 - mu * s0)).sum(0) * invstd
        r = -a * invstd * dweight / count  # dx = a·g·m + r·x + q
        q = -a * dbias / count - r * mu
        r4, q4, ag = r[:, None, None], q[:, None, None], (a * g)[:, :, None, None]
        dx = torch.empty_like(x)
        for s in _slices(x):  # the mask again: recomputing it in cache is cheaper than storing it
            xs, d = x[s], dx[s]
            torch.mul(torch.addcmul(b4, xs, a4).gt_(0), ag[s], out=d)
            d.addcmul_(xs, r4).add_(q4)
        return dx, dweight, dbias, None


class PaperHead(nn.Module):
    """BatchNorm, ReLU, global average pooling, linear (Hu et al. 2019, appendix B).

    In training (batch statistics) BatchNorm, ReLU and pooling run as one fused operation
    on the CPU (``_BatchNormReLUPool``: about half the passes over the full-resolution map, forward
    and backward) and update the running statistics as ``nn.BatchNorm2d`` does. In eval the ReLU works
    in place on BatchNorm's fresh output (BatchNorm's backward reads its input, not its output): one
    full-resolution tensor less to allocate and write per call.
    """

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: B×C×H×W
        bn = self.norm
        fused = (
            bn.training
            and type(bn) is nn.BatchNorm2d  # not a SyncBatchNorm a user converted it to
            and bn.affine
            and bn.track_running_stats
            and bn.momentum is not None
            and x.dim() == 4
            # measured on the CPU only; under autocast BatchNorm keeps its own mixed-precision rules
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            # below about a million values the fixed cost of its ~15 operations outweighs the
            # passes it saves (measured on the CPU: 0.61-0.91x autograd's time at 64x16x32x32, the
            # higher with freed memory kept, annify.cpu; 1.05-1.2x at 64x32x16x16 and 8x2048x7x7)
            and x.numel() >= FUSED_MIN_NUMEL
        )
        if not fused:
            return self.fc(self.act(bn(x)).mean((2, 3)))
        pooled, mu, var = _BatchNormReLUPool.apply(x, bn.weight, bn.bias, bn.eps)
        with torch.no_grad():  # what nn.BatchNorm2d does with its batch statistics
            count = x.shape[0] * x.shape[2] * x.shape[3]
            bn.running_mean.lerp_(mu.to(bn.running_mean.dtype), bn.momentum)
            bn.running_var.lerp_((var * count / (count - 1)).to(bn.running_var.dtype), bn.momentum)
            bn.num_batches_tracked.add_(1)
        return self.fc(pooled)


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
