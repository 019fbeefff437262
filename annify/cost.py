"""Per-output cost of an anytime network, counted with fvcore.

Convention, stated once: fvcore counts one fused multiply-add as one FLOP (so resnet50 at 224 is
4.1 GFLOPs, half of what ``torch.utils.flop_counter`` reports). Costs are counted in eval mode at
batch size 1, where fvcore counts BatchNorm as its eval-mode affine: two FLOPs per element (one
without affine parameters). Heads are counted like any other module. ``scaled_dot_product_attention``,
which fvcore leaves at zero, is counted here as batch·heads·L·S·(D + Dv) multiply-adds (QKᵀ plus
AV); so is torch's fused ``_native_multi_head_attention`` (``nn.MultiheadAttention`` in eval mode,
as in torchvision's ViT), plus its q/k/v in-projection and out-projection. The operators fvcore
still skips (elementwise adds, activations, pooling) are reported, never hidden.

For output k (0-based) of an anytime network:

- ``flops``: running anytime, the trunk up to tap k plus every head up to k;
- ``flops_single``: as a single exit, the trunk up to tap k plus head k only;
- ``params`` / ``params_single``: the same split for parameters.
"""

from __future__ import annotations

import warnings
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from itertools import accumulate, pairwise

import torch
from torch import nn

with warnings.catch_warnings():  # fvcore (last release 2022) calls the deprecated torch.jit.script at import
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

from annify.rewrite import AnytimeNet
from annify.spec import Spec

__all__ = ["CONVENTION", "Costs", "count", "head_flops", "mha_flop_jit", "sdpa_flop_jit", "with_costs"]

CONVENTION = (
    "fvcore FLOPs: one fused multiply-add = 1 FLOP; eval mode, batch 1; "
    "scaled_dot_product_attention counted as B*H*L*S*(D+Dv), fused multi-head attention "
    "as that plus its in- and out-projections"
)


def sdpa_flop_jit(inputs: list, outputs: list) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: QKᵀ and AV multiply-adds."""
    q, k, v = (get_shape(t) for t in inputs[:3])
    batch = 1
    for d in q[:-1]:
        batch *= d  # B·H·L
    return batch * k[-2] * (q[-1] + v[-1])


def mha_flop_jit(inputs: list, outputs: list) -> int:
    """fvcore handle for ``aten::_native_multi_head_attention``, the fused path of ``nn.MultiheadAttention``.

    Inputs: query (B, L, E), key and value (B, S, E), embed_dim, num_heads, the packed q/k/v weight
    (3E, E) and bias, the out-projection weight (Eo, E) and bias, ... Multiply-adds: the in-projection
    B·(L + 2S)·E·E, attention B·H·L·S·(D + Dv) = B·L·S·2E (H heads of D = E/H), the out-projection
    B·L·E·Eo; biases are not counted, as fvcore counts none for ``linear``.
    """
    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    qkv_w, proj_w = get_shape(inputs[5]), get_shape(inputs[7])
    batch = 1
    for d in q[:-2]:
        batch *= d
    length, source, dim = q[-2], k[-2], q[-1]
    in_proj = batch * (length + 2 * source) * (qkv_w[0] // 3) * qkv_w[1]
    attention = batch * length * source * 2 * dim
    out_proj = batch * length * proj_w[0] * proj_w[1]
    return in_proj + attention + out_proj


@dataclass
class Costs:
    """Cost of each output, in order; the last is the model's own classifier."""

    flops: list[int]
    flops_single: list[int]
    params: list[int]
    params_single: list[int]
    trunk_flops: list[int]  # trunk cost of each segment alone
    head_flops: list[int]
    unsupported: dict[str, int] = field(default_factory=dict)

    @property
    def fraction(self) -> list[float]:
        """Anytime FLOPs of each output as a fraction of the last output's."""
        return [f / self.flops[-1] for f in self.flops]


class _Probe(nn.Module):
    """Calls ``fn`` with tensors as traced inputs and every other argument baked in as a constant.

    Segments can carry non-tensor values (sizes read off a tensor); jit tracing takes tensors only.
    """

    def __init__(self, fn, args: tuple, owner: nn.Module):
        super().__init__()
        self.owner = owner  # registered so that jit tracing sees its parameters as parameters
        self._fn = [fn]
        self._args = list(args)
        self._slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    def forward(self, *tensors):
        args = list(self._args)
        for i, t in zip(self._slots, tensors):
            args[i] = t
        out = self._fn[0](*args)
        flat = out if isinstance(out, (tuple, list)) else (out,)
        return tuple(t for t in flat if isinstance(t, torch.Tensor))


def _fvcore(fn, args: tuple, owner: nn.Module, unsupported: Counter) -> int:
    probe = _Probe(fn, args, owner)
    fca = FlopCountAnalysis(probe, tuple(a for a in args if isinstance(a, torch.Tensor)))
    fca.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    fca.set_op_handle("aten::_native_multi_head_attention", mha_flop_jit)
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    total = int(fca.total())
    unsupported.update(fca.unsupported_ops())
    return total


def _reads(net: nn.Module, graph) -> nn.Module:
    """A module holding just the submodules and parameters of ``net`` that a segment's graph reads.

    The segment's jit trace needs them registered (a parameter that requires grad may not become a
    constant), and fvcore hooks every module of what it traces: handing it the whole network made
    counting a network of K segments cost K times the hooks of every module (the bulk of converting
    a model with many tap points). FLOP counts are the same: the traced operations are.
    """
    box, seen = nn.Module(), set()
    for i, n in enumerate(graph.nodes):
        if n.op not in ("call_module", "get_attr"):
            continue
        obj = net
        for part in n.target.split("."):
            obj = getattr(obj, part)
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, nn.Module):
            box.add_module(f"m{i}", obj)
        elif isinstance(obj, nn.Parameter):
            box.register_parameter(f"p{i}", obj)
    return box


def head_flops(head: nn.Module, shape: tuple[int, ...]) -> int:
    """FLOPs of ``head`` reading one feature of ``shape`` (no batch dimension), by the convention above."""
    was_training = head.training
    head.eval()
    with torch.no_grad():
        flops = _fvcore(head, (torch.zeros(1, *shape),), head, Counter())
    head.train(was_training)
    return flops


def _param_owners(net: AnytimeNet) -> list[set[int]]:
    """Ids of the parameters each segment reads first (a parameter counts where first used)."""
    seen: set[int] = set()
    per_seg = []
    for seg in net._eval_segments:
        ids = set()
        for n in seg.graph.nodes:
            if n.op == "call_module":
                ids |= {id(p) for p in net.get_submodule(n.target).parameters()}
            elif n.op == "get_attr":
                obj = net
                for part in n.target.split("."):
                    obj = getattr(obj, part)
                if isinstance(obj, nn.Parameter):
                    ids.add(id(obj))
        per_seg.append(ids - seen)
        seen |= ids
    return per_seg


def count(
    net: AnytimeNet,
    input_size: tuple[int, int, int] | None = None,
    trunk: tuple[list[int], dict[str, int]] | None = None,
) -> Costs:
    """Count each output's FLOPs and parameters (see the module docstring for the convention).

    ``trunk``: each segment's trunk FLOPs and fvcore's unsupported operators in them, where they
    are known already (``annify.convert`` counts the trunk once to place heads by cost); then only
    the heads go through fvcore here.
    """
    input_size = tuple(input_size or net.input_size)
    if trunk is not None and len(trunk[0]) != len(net.segments):
        raise ValueError(f"{len(trunk[0])} trunk costs for {len(net.segments)} segments")
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    known, unsupported = trunk, Counter(trunk[1] if trunk is not None else {})
    trunk, heads, state = [], [], (torch.zeros(1, *input_size, device=device),)
    with torch.no_grad():
        for j, seg in enumerate(net.segments):
            if known is None:
                reads = _reads(net, seg.graph)
                trunk.append(_fvcore(lambda *s, seg=seg: seg.fn(net, *s), state, reads, unsupported))
            else:
                trunk.append(known[0][j])
            if seg.tap is None:
                break
            state, feature = net.run_segment(j, state, head=False)
            heads.append(_fvcore(net.exits[j], (feature,), net.exits[j], unsupported))
    heads.append(0)  # the model's own classifier is inside the last segment
    net.train(was_training)

    params_by_id = {id(p): p.numel() for p in net.parameters()}
    trunk_params = [sum(params_by_id[i] for i in ids) for ids in _param_owners(net)]
    head_params = [sum(p.numel() for p in h.parameters()) for h in net.exits] + [0]

    def cumulative(xs: list[int]) -> list[int]:
        out, total = [], 0
        for v in xs:
            total += v
            out.append(total)
        return out

    trunk_cum, head_cum = cumulative(trunk), cumulative(heads)
    tp_cum, hp_cum = cumulative(trunk_params), cumulative(head_params)
    return Costs(
        flops=[t + h for t, h in zip(trunk_cum, head_cum)],
        flops_single=[t + h for t, h in zip(trunk_cum, heads)],
        params=[t + h for t, h in zip(tp_cum, hp_cum)],
        params_single=[t + h for t, h in zip(tp_cum, head_params)],
        trunk_flops=trunk,
        head_flops=heads,
        unsupported=dict(unsupported),
    )


def with_costs(spec: Spec, costs: Costs) -> Spec:
    """``spec`` with each output's flops, fraction, single-exit flops and parameters from ``costs``."""
    heads = [
        replace(h, flops=f, fraction=round(fr, 4), flops_single=fs, params=p)
        for h, f, fr, fs, p in zip(
            spec.heads, costs.flops, costs.fraction, costs.flops_single, costs.params, strict=True
        )
    ]
    return replace(spec, heads=heads, cost_convention=CONVENTION)


# --------------------------------------------------------------------------- per-segment costs of a network

_COUNTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def segment_costs(net: AnytimeNet) -> tuple[list[float], list[float]]:
    """(trunk FLOPs of each segment, FLOPs of each head) of ``net``, per sample.

    Derived from the spec's cumulative ``flops`` and single-exit ``flops_single`` when every output
    has them (their difference at output k is the cost of the heads before k), counted with
    ``annify.cost.count`` otherwise (once per network). The last output is the model's own classifier, inside the last
    segment, so its head costs 0.
    """
    spec = net.spec
    heads = list(spec.heads) if spec is not None else []
    if len(heads) == net.num_outputs and all(
        h.flops is not None and h.flops_single is not None for h in heads
    ):
        before = [h.flops - h.flops_single for h in heads]  # heads before output k
        head = [b - a for a, b in pairwise(before)] + [0]
        trunk_cum = [h.flops_single - c for h, c in zip(heads, head, strict=True)]
        trunk = [trunk_cum[0]] + [b - a for a, b in pairwise(trunk_cum)]
        return [float(t) for t in trunk], [float(c) for c in head]
    if net not in _COUNTED:  # counting traces the network; its structure never changes, so once
        costs = count(net, spec.input_size if spec is not None else None)
        _COUNTED[net] = [float(t) for t in costs.trunk_flops], [float(c) for c in costs.head_flops]
    trunk, head = _COUNTED[net]
    return list(trunk), list(head)


def exit_flops(net: AnytimeNet, heads_run: Sequence[bool] | None = None) -> list[float]:
    """Cumulative anytime FLOPs of each output of ``net`` (what exiting there costs), per sample.

    ``heads_run``: which heads are computed on the way (default all); a skipped head costs nothing.
    """
    trunk, head = segment_costs(net)
    if heads_run is not None:
        head = [h if run else 0.0 for h, run in zip(head, heads_run, strict=True)]
    return [t + h for t, h in zip(accumulate(trunk), accumulate(head), strict=True)]
