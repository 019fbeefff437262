"""The convert stage, the builder: a model, a placement and head types in, an anytime network and
its spec out; and back again (``build``/``load`` rebuild a network from its spec).

Where the model comes from (a name, or any ``nn.Module`` torch.fx can trace) is ``annify.sources``;
which nodes get heads is ``annify.placement``. This module traces the model, checks it is a
classifier, puts the heads at the chosen nodes, counts the costs and writes the spec. A spec records
a module of the user's own as ``module:CLASS`` and never names code to import: ``build``/``load``
take the module again (``model=``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from annify import heads as head_registry
from annify.cost import CONVENTION, Costs, count, head_flops
from annify.errors import ConvertError
from annify.placement import choose, trunk_segments, unknown_node
from annify.rewrite import AnytimeNet
from annify.sources import create_model, default_input_size, spec_model
from annify.spec import HeadSpec, Spec, load_spec, spec_name
from annify.trace import TapPoint, Traced, describe_node, tap_points, trace

__all__ = [
    "ConvertError",
    "build",
    "convert",
    "convert_spec",
    "load",
    "load_weights",
    "plain_model",
    "spec_name",
    "create_model",  # owned by annify.sources; public as annify.create_model
]


def _classes(traced: Traced, wanted: int | None, model: str) -> int:
    """The class count of a traced classifier: timm's ``num_classes``, else the width of its output.

    A module passed in keeps its own classifier, so a different ``wanted`` count is refused.
    """
    own = getattr(traced.model, "num_classes", None)
    output = next(n for n in traced.eval_graph.nodes if n.op == "output")
    shape = traced.shapes.get(traced.eval_names[output.name])
    if not isinstance(own, int):
        own = shape[1] if shape is not None and len(shape) == 2 else None
    named = not model.startswith("module:")
    if own == 0:
        fix = "pass --num-classes N to give it one" if named else "give it a classifier"
        raise ConvertError(f"{model} has no classifier (num_classes=0); {fix}")
    if own is None:
        what = f"a {len(shape)}-D tensor" if shape is not None else "no single tensor"
        raise ConvertError(
            f"{model} returns {what}, not (batch, classes) logits; annify converts classifiers "
            "(wrap the model so that its forward returns the logits)"
        )
    if wanted is not None and wanted != own:
        raise ConvertError(
            f"{model} predicts {own} classes, not {wanted}: a module passed in keeps its own classifier; "
            "change its classifier or leave num_classes out"
        )
    return own


def _build_net(
    traced: Traced,
    nodes: list[str],
    num_classes: int,
    head_type: str | None,
    types: list[str | None] | None = None,
) -> AnytimeNet:
    known = set(traced.qualnames)
    heads = []
    for i, node in enumerate(nodes):
        if node not in known:
            raise unknown_node(traced, node, list(known))
        try:
            layout, channels, _, _ = describe_node(traced, node)
        except ValueError as e:
            raise ConvertError(f"cannot put a head at '{node}': {e}") from None
        heads.append(
            _make_head(traced, layout, channels, num_classes, (types[i] if types else None) or head_type)
        )
    try:
        return AnytimeNet(traced, nodes, heads)
    except KeyError as e:
        raise ConvertError(f"node {e} is missing from the train-mode graph; pick another tap point") from None
    except ValueError as e:  # taps out of execution order (a hand-edited spec)
        raise ConvertError(f"heads: {e}") from None


def _make_head(traced: Traced, layout: str, channels: int, num_classes: int, kind: str | None) -> nn.Module:
    kind = kind or head_registry.default_for(layout)
    prefix = getattr(traced.model, "num_prefix_tokens", 0)
    try:
        return head_registry.build(kind, channels, num_classes, layout, num_prefix_tokens=prefix)
    except (KeyError, ValueError) as e:
        raise ConvertError(str(e).strip("'\"")) from None


def _head_costs(traced: Traced, num_classes: int, head_type: str | None) -> Callable[[TapPoint], int]:
    """FLOPs of the head a tap point would get (one head built and counted per feature shape)."""
    cache: dict[tuple, int] = {}

    def flops(tap: TapPoint) -> int:
        key = (tap.layout, tap.channels, tap.shape)
        if key not in cache:
            cache[key] = head_flops(
                _make_head(traced, tap.layout, tap.channels, num_classes, head_type), tap.shape
            )
        return cache[key]

    return flops


def _head_entries(nodes: list[str], taps: list[TapPoint], costs: Costs, types=None) -> list[HeadSpec]:
    block_of = {t.node: t.index for t in taps if t.index is not None}
    n_blocks = len(block_of)
    frac = costs.fraction
    entries = []
    for i, node in enumerate([*nodes, "model"]):
        entries.append(
            HeadSpec(
                node=node,
                type=(types[i] if types and i < len(nodes) else None),
                block=block_of.get(node, n_blocks if node == "model" and n_blocks else None),
                flops=costs.flops[i],
                fraction=round(frac[i], 4),
                flops_single=costs.flops_single[i],
                params=costs.params[i],
            )
        )
    return entries


def convert(
    model: str | nn.Module,
    every: int | None = None,
    start: int | None = None,
    at: list[str] | None = None,
    flops_period: float | None = None,
    heads: int | None = None,
    input_size: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
    model_kwargs: dict | None = None,
    head_type: str | None = None,
    name: str | None = None,
) -> tuple[AnytimeNet, Spec, Costs]:
    """Convert a model into an anytime network; returns (network, spec, costs).

    ``model`` is a name (see ``create_model``; built with fresh weights) or a module of your own, which
    the network then shares (its submodules and parameters, not copies) and which is left in eval
    mode. Its spec records ``module:CLASS``; rebuild it with ``load(spec, model=module)``.
    """
    kwargs = dict(model_kwargs or {})
    if isinstance(model, nn.Module):
        if kwargs:
            raise ConvertError("model_kwargs build a model by name; a module passed in is used as it is")
        m, source = model, f"module:{type(model).__name__}"
    else:
        m, source = create_model(model, num_classes, **kwargs), model
    m.eval()
    size = tuple(input_size) if input_size else default_input_size(m)
    traced = trace(m, size)
    num_classes = _classes(traced, num_classes, source)
    taps = tap_points(traced, trunk=True)
    counted: dict = {}
    nodes, placement = choose(
        traced,
        taps,
        every,
        start,
        at,
        flops_period,
        heads,
        _head_costs(traced, num_classes, head_type),
        counted,
    )
    net = _build_net(traced, nodes, num_classes, head_type)
    costs = count(net, trunk=trunk_segments(counted, nodes))  # the trunk is counted once
    if num_classes != 1000 or "num_classes" in kwargs:
        kwargs.pop("num_classes", None)
    spec = Spec(
        name=name or spec_name(source),
        model=source,
        heads=_head_entries(nodes, taps, costs),
        input_size=size,
        num_classes=num_classes,
        model_kwargs=kwargs,
        head_type=head_type,
        placement=placement,
        cost_convention=CONVENTION,
    )
    net.describe(spec)
    return net, spec, costs


def build(spec: Spec, model: nn.Module | None = None) -> AnytimeNet:
    """Rebuild the network a spec describes: fresh weights, or those of ``model`` where it is passed.

    A spec of a module of your own (``module:CLASS``) needs that module (``model=``); any other spec
    may take one too (a timm model with pretrained weights, say) in place of a freshly built one.
    """
    return _build(spec, model)[0]


def _build(spec: Spec, model: nn.Module | None = None) -> tuple[AnytimeNet, Traced]:
    m = spec_model(spec, model).eval()
    traced = trace(m, spec.input_size)
    _classes(traced, spec.num_classes, spec.model)
    if spec.heads[-1].node != "model":
        raise ConvertError("the last entry of 'heads' must be the model's own classifier (node: model)")
    types = [h.type for h in spec.heads[:-1]]
    net = _build_net(traced, spec.taps, spec.num_classes, spec.head_type, types)
    net.describe(spec)
    return net, traced


def plain_model(net: AnytimeNet, model: nn.Module | None = None) -> nn.Module:
    """The model ``net`` was converted from, without the heads, holding ``net``'s trunk weights (eval mode).

    The baseline to compare an anytime network with: its last output equals this model's output
    exactly. A fresh model is built from ``net.spec`` (a module of your own: pass ``model``, whose
    weights are replaced); it shares no modules with ``net``.
    """
    if net.spec is None:
        raise ConvertError("this network has no spec (net.describe(spec)), so its model is unknown")
    plain = spec_model(net.spec, model)
    plain.load_state_dict(net.trunk_state_dict(), strict=True)
    return plain.eval()


def convert_spec(spec: Spec, model: nn.Module | None = None) -> tuple[AnytimeNet, Spec, Costs]:
    """Build the network a (hand-written) spec describes and fill in its costs: placement by YAML."""
    net, traced = _build(spec, model)
    costs = count(net)
    types = [h.type for h in spec.heads[:-1]]
    heads = _head_entries(spec.taps, tap_points(traced), costs, types)
    spec = replace(spec, heads=heads, placement=spec.placement or {"spec": True}, cost_convention=CONVENTION)
    net.describe(spec)
    return net, spec, costs


def load(
    spec: str | os.PathLike | Spec,
    checkpoint: str | os.PathLike | None = None,
    model: nn.Module | None = None,
) -> AnytimeNet:
    """Load the anytime network a spec (a file, or a ``Spec``) describes, with weights from ``checkpoint``.

    ``checkpoint`` is what the command line's ``--checkpoint`` takes: a run folder (its last
    checkpoint; the network is then the run's resolved spec, refitted to its data, which its weights
    fit), a checkpoint folder holding ``model.safetensors``, or a ``.safetensors`` file.
    ``model`` is the module to rebuild from, needed for a spec of a module of your own (see ``build``).
    """
    from annify.run_dir import run_spec

    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    if checkpoint is not None:
        spec = run_spec(spec, checkpoint)[0]
    net = build(spec, model)
    if checkpoint is not None:
        load_weights(net, checkpoint)
    return net


def load_weights(net: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Load safetensors weights into ``net``; a file that does not fit gets a one-line error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from annify.run_dir import weights_file

    p = weights_file(checkpoint)
    if not p.is_file():
        raise ConvertError(
            f"checkpoint '{checkpoint}' not found (expected a run folder, a .safetensors file or a folder with "
            "model.safetensors)"
        )
    try:
        state = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConvertError(f"checkpoint '{p}' is not a readable safetensors file ({e})") from None
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in
                 ((missing, "missing"), (unexpected, "unexpected")) if keys]  # fmt: skip
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} of the wrong shape (e.g. {k}: {tuple(state[k].shape)} in the checkpoint, "
                f"{tuple(own[k].shape)} in the network)"
            )
        raise ConvertError(
            f"checkpoint '{p}' does not fit this spec: {', '.join(parts)}; it was saved from another spec "
            "(class count, input size, heads): pass that spec, or the run folder"
        )
    with torch.no_grad():
        net.load_state_dict(state, strict=True)
