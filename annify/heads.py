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
import torch.nn.functional as F
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
# bytes of one slice of the map the head pools in eval, without autograd: 2 MiB did best in an
# ad-hoc sweep of 128 KiB-4 MiB; benchmarks/bench_heads.py measures resann50's seven heads at batch 8
# pooled this way at 0.88-0.91x the whole-batch chain's time
_EVAL_SLICE_BYTES = 1 << 21
# the smallest feature map (values) that the training head fuses; see PaperHead.forward
FUSED_MIN_NUMEL = 1 << 19


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


def _slices(x: torch.Tensor, nbytes: int = _SLICE_BYTES) -> list[slice]:
    """Slices of the batch dimension, each about ``nbytes`` of ``x`` (at least one sample)."""
    per_sample = max(1, x[0].numel() * x.element_size())
    k = max(1, nbytes // per_sample)
    return [slice(i, i + k) for i in range(0, x.shape[0], k)]


class _BatchNormReLUPool(torch.autograd.Function):
    """mean over H×W of ReLU(BatchNorm(x)) with batch statistics, forward and backward in few passes.

    Autograd's chain (BatchNorm, ReLU, mean) writes the normalised map, rewrites it in the ReLU,
    expands the pooled gradient back to full resolution, masks it, and runs BatchNorm's backward over
    it: about eleven passes over the full-resolution map per step. Pooling right after the ReLU makes
    the gradient reaching the map a constant per sample and channel, so everything the output and the
    backward need are two sums per sample and channel over the ReLU's mask ``m = [w·x̂ + b > 0]``:
    ``Σ m`` and ``Σ m·x̂`` (x̂ the normalised map). The forward makes three reading passes (the mean,
    the centred variance, the two sums), the backward one pass writing ``dx``; each goes over
    cache-sized slices of the batch, and every elementwise step is BatchNorm's own inference kernel
    on centred values (``(x − μ)·σ⁻¹``), so a mean far from zero costs no precision: the same function
    and gradients as the chain, to float32 rounding.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):  # float32 on the CPU (see PaperHead.forward)
        n, c, h, w = x.shape
        count = n * h * w
        flat = x.flatten(2)
        slices = _slices(x)
        # batch statistics from per-(sample, channel) sums, combined in float64 (torch.var_mean
        # over N, H, W is a slow Welford loop on the CPU); the variance from centred values
        mu = (flat.sum(2).sum(0, dtype=torch.float64) / count).float()
        centred = x.new_empty(n, c)
        for s in slices:
            d = flat[s] - mu[:, None]
            centred[s] = torch.linalg.vecdot(d, d)
        var = (centred.sum(0, dtype=torch.float64) / count).float()
        # m = [w·x̂ + b > 0] = [sign·x̂ > τ] with sign = ±1 (the sign of w) and τ = −b/|w|
        # (±inf when w = 0: then m is [b > 0] everywhere, as it should be)
        sign = torch.where(weight < 0, -1.0, 1.0).to(x.dtype)
        tau = (-bias / weight.abs())[:, None, None]
        ones, masked = x.new_empty(n, c), x.new_empty(n, c)  # Σ_hw m and Σ_hw m·sign·x̂
        for s in slices:
            v = F.batch_norm(x[s], mu, var, sign, None, False, 0.0, eps)  # sign·x̂
            m = torch.gt(v, tau, out=torch.empty_like(v))
            ones[s] = m.sum((2, 3))
            masked[s] = torch.linalg.vecdot(m.flatten(2), v.flatten(2))
        masked.mul_(sign)  # Σ_hw m·x̂
        pooled = (masked * weight + ones * bias) / (h * w)
        ctx.save_for_backward(x, weight, mu, var, sign, tau, ones, masked)
        ctx.eps = eps
        return pooled, mu, var

    @staticmethod
    def backward(ctx, grad, _gmu, _gvar):
        x, weight, mu, var, sign, tau, ones, masked = ctx.saved_tensors
        eps = ctx.eps
        n, c, h, w = x.shape
        count = n * h * w
        g = grad / (h * w)  # the gradient each element of a sample's channel receives
        dbias = (g * ones).sum(0)
        dweight = (g * masked).sum(0)
        a = weight * torch.rsqrt(var + eps)
        ag = (a * g)[:, :, None, None]
        # BatchNorm's backward: dx = a·(g·m − mean(g·m) − x̂·mean(g·m·x̂)) = a·g·m + kw·x̂ + kb
        kw, kb = -a * dweight / count, -a * dbias / count
        dx = torch.empty_like(x)
        for s in _slices(x):  # the mask again: recomputing it in cache is cheaper than storing it
            xs, d = x[s], dx[s]
            v = F.batch_norm(xs, mu, var, sign, None, False, 0.0, eps)
            torch.mul(torch.gt(v, tau, out=v), ag[s], out=d)
            d.add_(F.batch_norm(xs, mu, var, kw, kb, False, 0.0, eps))
        return dx, dweight, dbias, None


def eval_pool(x: torch.Tensor, norm_act: Callable, fc: Callable) -> torch.Tensor:
    """``fc(mean over H×W of norm_act(x))`` for the paper head in eval (``norm_act`` its BatchNorm with
    running statistics and its ReLU; ``annify.freeze`` passes the same calls as plain functions).

    Without autograd on the CPU (evaluation, early exit, serving) samples are independent, so a map
    above ``_EVAL_SLICE_BYTES`` goes through in cache-sized slices of the batch, value for value what
    the whole batch gives; tracers (FLOP counting, ONNX export, torch.compile/export) get the
    whole-batch chain.
    """
    if (
        not torch.is_grad_enabled()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and x.dim() == 4
        and x.device.type == "cpu"
        and x.numel() * x.element_size() > _EVAL_SLICE_BYTES  # one slice: no slicing to pay for
    ):
        return fc(torch.cat([norm_act(x[s]).mean((2, 3)) for s in _slices(x, _EVAL_SLICE_BYTES)]))
    return fc(norm_act(x).mean((2, 3)))


class PaperHead(nn.Module):
    """BatchNorm, ReLU, global average pooling, linear (Hu et al. 2019, appendix B).

    In training (batch statistics) BatchNorm, ReLU and pooling run as one fused operation
    on the CPU (``_BatchNormReLUPool``: four passes over the full-resolution map instead of about
    eleven, forward and backward) and update the running statistics as ``nn.BatchNorm2d`` does;
    under ``torch.compile`` the compiler gets the plain chain, which it fuses into its own kernels. In
    eval the ReLU works in place on BatchNorm's fresh output (BatchNorm's backward reads its input,
    not its output); without autograd on the CPU the map is pooled in cache-sized slices of the
    batch, so BatchNorm's output is written to and read back from the cache instead of memory. Each
    slice computes what the whole batch would, value for value.
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
            and not torch.compiler.is_compiling()  # a compiler fuses the chain itself
            # below about 2^19 values the fixed cost of its ~20 operations outweighs the passes it
            # saves (the whole head forward + backward on the CPU, freed memory kept, annify.cpu;
            # benchmarks/bench_heads.py --parts train: 0.79x the chain's time at 64x16x32x32, 0.95x
            # at 64x32x16x16, 0.65x at 8x256x56x56, 0.93x at 8x2048x7x7; 1.01-1.07x at 64x64x8x8)
            and x.numel() >= FUSED_MIN_NUMEL
        )
        if not bn.training and bn.running_mean is not None:  # eval with running statistics
            return eval_pool(x, lambda t: self.act(bn(t)), self.fc)
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
