"""Freeze an anytime network for inference: the same outputs, bit for bit, at less cost per call.

``freeze(net)`` returns a copy of ``net`` in eval mode whose segments and heads call torch's functions
directly, with the weights held as constants, instead of going through ``nn.Module`` calls:

- a convolution, linear layer, max pooling or eval BatchNorm becomes the very function call its
  ``forward`` makes (``torch.conv2d(x, weight, bias, stride, ...)``, ``torch.batch_norm(..., False, ...)``),
  without ``nn.Module.__call__``, its hook checks, BatchNorm's bookkeeping of momentum and counters,
  and the attribute lookups of the generated code: a few microseconds per module, tens per segment,
  which at the few samples the last segments of an early exit run was a fifth of a segment's time;
- a ReLU of a value nothing else reads (a convolution's or BatchNorm's fresh output) runs in place;
  ``nn.Identity`` and eval-mode dropout disappear;
- the paper's head (``bn_relu_pool_linear``) becomes the same chain of calls.

Modules of any other type, and modules with forward hooks, keep their call. Nothing is folded or reordered, so every output equals the
unfrozen network's in eval mode exactly (``torch.equal``; tests/test_freeze.py). BatchNorm folded into
the convolution before it, or computed as ``shift + x * scale``, changes the last bits and measured no
faster in an early exit on the CPU (BENCHMARKS.md §15b).

A frozen network is for inference only: ``train()``, ``.to()`` and ``load_state_dict`` refuse with one
line (its code holds the tensors it was frozen with), so freeze last, after moving the network to its
device and memory format. Later changes to ``net`` do not reach the copy. Gradients still flow to the
input (saliency maps work); the weights are constants and get none.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from annify.heads import PaperHead, eval_pool
from annify.rewrite import AnytimeNet, Segment, fresh_module, make_segment

__all__ = ["freeze", "lowered"]


def freeze(net: AnytimeNet) -> AnytimeNet:
    """A frozen copy of ``net`` for inference (see the module doc): ``net(x)``, ``early_exit``, ``stream``
    and the runtimes give the same outputs, bit for bit, as ``net`` in eval mode, at less cost per call
    (BENCHMARKS.md §15b). ``net`` itself is left as it is."""
    if not isinstance(net, AnytimeNet):
        raise TypeError(
            f"annify.freeze takes an AnytimeNet (annify.load / annify.convert), not {type(net).__name__}"
        )
    if net.frozen:
        return net
    # the segments are rebuilt below: not copied only to be replaced
    frozen = copy.deepcopy(net, {id(net._train_segments): None, id(net._eval_segments): None}).eval()
    frozen._eval_segments = [_lower_segment(frozen, seg, j) for j, seg in enumerate(net._eval_segments)]
    frozen._frozen_heads = [lowered(h) or h for h in frozen.exits]
    return frozen


def _lower_segment(net: nn.Module, seg: Segment, j: int) -> Segment:
    g = fx.Graph()
    g.output(g.graph_copy(seg.graph, {}))
    fresh: set[fx.Node] = set()  # nodes whose value is a new tensor its own backward does not save
    for n in list(g.nodes):
        if n.op != "call_module":
            continue
        m = net.get_submodule(n.target)
        if _hooked(m):  # a hook of the user's must still run (and may return anything)
            continue
        if type(m) is nn.Identity or (type(m) in _DROPOUT and not m.training):
            if len(n.args) == 1 and not n.kwargs:
                n.replace_all_uses_with(n.args[0])
                g.erase_node(n)
            continue
        if fresh_module(m):
            fresh.add(n)
        if type(m) is nn.ReLU and n.args and n.args[0] in fresh and len(n.args[0].users) == 1:
            fn = torch.relu_  # nothing else reads its input: the same values, no new tensor
        else:
            fn = lowered(m)
        if fn is not None:
            n.op, n.target = "call_function", fn
    g.lint()
    return make_segment(g, j == 0, seg.tap, seg.carry, f"frozen segment {j}")


_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_LOWER: dict[type, Callable[[nn.Module], Callable | None]] = {}


def _lowers(*types: type):
    def deco(fn):
        for t in types:
            _LOWER[t] = fn
        return fn

    return deco


def lowered(m: nn.Module) -> Callable | None:
    """``m``'s eval forward as a plain function of its input with ``m``'s tensors as constants, or
    None where ``m``'s type (exactly: a subclass may do more) has no lowering. The function computes
    what ``m(x)`` computes in eval mode, bit for bit. A module with forward hooks keeps its call, so the
    hooks still run (the copy's modules carry the hooks ``net``'s had when it was frozen)."""
    lower = _LOWER.get(type(m))
    return None if lower is None or _hooked(m) else lower(m)


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _const(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


@_lowers(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(m: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> Callable | None:
    if m.padding_mode != "zeros":  # the module pads itself first
        return None
    op = {1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}[len(m.kernel_size)]
    w, b, args = _const(m.weight), _const(m.bias), (m.stride, m.padding, m.dilation, m.groups)

    def conv(x):
        return op(x, w, b, *args)

    return conv


@_lowers(nn.Linear)
def _linear(m: nn.Linear) -> Callable:
    w, b = _const(m.weight), _const(m.bias)

    def linear(x):
        return F.linear(x, w, b)

    return linear


@_lowers(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
def _max_pool(m) -> Callable | None:
    if m.return_indices:
        return None
    op = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}[type(m)]
    args = (m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, False)

    def max_pool(x):
        return op(x, *args)

    return max_pool


@_lowers(nn.ReLU)
def _relu(m: nn.ReLU) -> Callable:
    return torch.relu_ if m.inplace else torch.relu


@_lowers(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _batch_norm(m: nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d) -> Callable | None:
    if m.running_mean is None or m.running_var is None:  # eval uses the batch's statistics
        return None
    w, b, mean, var, eps = (
        _const(m.weight),
        _const(m.bias),
        _const(m.running_mean),
        _const(m.running_var),
        m.eps,
    )
    cudnn = torch.backends.cudnn

    def batch_norm(x):  # the call F.batch_norm makes in eval mode
        return torch.batch_norm(x, w, b, mean, var, False, 0.0, eps, cudnn.enabled)

    return batch_norm


@_lowers(PaperHead)
def _paper_head(m: PaperHead) -> Callable | None:
    bn, fc = _batch_norm(m.norm), _linear(m.fc)
    if bn is None or type(m.act) is not nn.ReLU:
        return None

    def norm_act(x):  # the head's ReLU works in place on BatchNorm's fresh output, as PaperHead's does
        return torch.relu_(bn(x))

    def head(x):  # PaperHead's eval path, the same calls
        return eval_pool(x, norm_act, fc)

    return head
