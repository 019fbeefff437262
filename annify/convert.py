"""The convert stage: a model and a placement in, an anytime network and its spec out.

The model is a name (timm's registry, timm's ``hf-hub:ORG/NAME``, ``torchvision:NAME``) or any
``nn.Module`` torch.fx can trace. A spec records a module of the user's own as ``module:CLASS`` and
never names code to import: ``build``/``load`` take the module again (``model=``). Placement is declarative: after every K blocks (``every``, ``start``), at named nodes or globs
(``at``), at multiples of a FLOP period (``flops_period``), or N outputs spaced evenly by cost
(``heads``). The last block is never given a head: the model's own classifier reads it and is
always the last output (so ``resnet50 --every 2`` has 8 outputs, as in the paper).
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import os
from collections.abc import Callable
from dataclasses import replace

import timm
import torch
from torch import nn

from annify import heads as head_registry
from annify.cost import CONVENTION, Costs, count, head_flops
from annify.errors import ConvertError
from annify.rewrite import AnytimeNet
from annify.spec import HeadSpec, Spec, SpecError, load_spec, model_source, spec_name
from annify.trace import TapPoint, Traced, describe_node, tap_points, trace

__all__ = [
    "ConvertError",
    "build",
    "choose",
    "convert",
    "convert_spec",
    "create_model",
    "fit_input_size",
    "inspect_model",
    "load",
    "plain_model",
    "spec_name",
]


# Automatic placement leaves out tap points past this fraction of the trunk's cost.
FINAL_FRACTION = 0.99
# The most targets --flops-period may make (past the tap points, each takes the nearest one left).
MAX_PERIODS = 1000


def create_model(name: str, num_classes: int | None = None, **kwargs) -> nn.Module:
    """A model with fresh weights, by name: timm's registry (annify's registrations included), timm's
    ``hf-hub:ORG/NAME``, or ``torchvision:NAME`` (``torchvision.models.get_model``). Typos get close names.
    """
    import annify.models  # noqa: F401 - registers the cifar_resnet family

    try:
        source, ident = model_source(name)
    except SpecError as e:
        raise ConvertError(str(e)) from None
    if source == "module":
        raise ConvertError(
            f"'{name}' stands for a module of your own, which annify never imports; pass the module itself: "
            "annify.convert(module, ...) or annify.load(spec, model=module)"
        )
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if source == "torchvision":
        return _torchvision_model(ident, kwargs)
    if source == "timm" and not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `timm.list_models()` lists the names"
        raise ConvertError(f"unknown model '{name}'{hint}")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise ConvertError(f"timm could not build '{name}' with {kwargs}: {e}") from None
    except (OSError, RuntimeError, ValueError, ImportError) as e:  # the Hub's download errors are OSErrors
        if source != "hf-hub":
            raise
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(
            f"could not fetch '{name}' from the Hugging Face Hub ({why}); check the name and the network, "
            "or build the model with timm where the Hub is reachable and pass it: annify.convert(model)"
        ) from None


def _torchvision_model(name: str, kwargs: dict) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)  # the classification models
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = (
            f"; did you mean {', '.join(close)}?"
            if close
            else "; torchvision.models.list_models() lists them"
        )
        raise ConvertError(f"unknown torchvision classification model '{name}'{hint}")
    try:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConvertError(f"torchvision could not build '{name}' with {kwargs}: {e}") from None


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


def _spec_model(spec: Spec, model: nn.Module | None) -> nn.Module:
    """The model a spec describes: built from its source, or the module the user passes."""
    source, name = model_source(spec.model)
    if model is None:
        if source == "module":
            raise ConvertError(
                f"spec '{spec.name}' was converted from a {name} of your own, and a spec never names code "
                f"to import; pass the module: annify.load(spec, model={name}(...))"
            )
        return create_model(spec.model, spec.num_classes, **spec.model_kwargs)
    if source == "module" and type(model).__name__ != name:
        raise ConvertError(
            f"spec '{spec.name}' was converted from a {name}, not a {type(model).__name__}; "
            "pass the module it was converted from"
        )
    return model


# Square sizes tried, smallest first, for data smaller than a model accepts (see ``fit_input_size``).
SIZE_LADDER = (16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 288, 320, 384, 448, 512)


def _runs_at(model: nn.Module, size: tuple[int, int, int]) -> bool:
    """Whether ``model`` takes one ``size`` image (eval mode) and returns one tensor of logits, every
    pixel read: a patch embedding must tile the image (timm's strict ViTs floor a remainder away)."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if isinstance(patch, int):
        patch = (patch, patch)
    if isinstance(patch, (tuple, list)) and (size[1] % patch[0] or size[2] % patch[1]):
        return False
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, *size))
    except Exception:  # a third-party forward refusing the size: any exception type, by design
        return False
    return isinstance(out, torch.Tensor) and out.dim() == 2


def _takes_img_size(model: nn.Module) -> bool:
    import inspect

    return "img_size" in inspect.signature(type(model).__init__).parameters


def fit_input_size(
    model: str,
    wanted: tuple[int, int, int],
    num_classes: int | None = None,
    model_kwargs: dict | None = None,
    fallback: tuple[int, int, int] | None = None,
) -> tuple[tuple[int, int, int], dict, str]:
    """The input size and model kwargs to run the model ``model`` (a name) on images of size ``wanted``.

    The rule, first that applies: (1) the model as built runs at ``wanted``: keep it; (2) its
    constructor takes ``img_size`` (timm's ViTs, Swins, ...): build it at the smallest size, ``wanted``
    or the first of ``SIZE_LADDER`` above it, at which it runs and its patches tile the image; (3) the
    smallest such size at which the model as built runs, else ``fallback`` (the size it was converted
    at, known to run): the inputs are resized to it. Returns (size, model kwargs, a phrase for the run
    log saying which rule applied and the size).
    """
    kwargs = dict(model_kwargs or {})
    c, h, w = wanted
    shape = f"{h}×{w}"
    m = create_model(model, num_classes, **kwargs)
    if _runs_at(m, wanted):
        return tuple(wanted), kwargs, f"runs at the data's size, {shape}"
    sizes = [(h, w)] + [(s, s) for s in SIZE_LADDER if s > max(h, w)]
    if _takes_img_size(m):
        for hw in sizes:
            sized = {**kwargs, "img_size": hw[0] if hw[0] == hw[1] else list(hw)}
            try:
                built = create_model(model, num_classes, **sized)
            except Exception:  # timm refuses the size in the constructor (window or grid checks)
                continue
            if _runs_at(built, (c, *hw)):
                how = (
                    "the data's size"
                    if hw == (h, w)
                    else f"the smallest it accepts; inputs resized from {shape}"
                )
                return (c, *hw), sized, f"built at {hw[0]}×{hw[1]} (img_size), {how}"
    for hw in sizes[1:]:
        if _runs_at(m, (c, *hw)):
            return (
                (c, *hw),
                kwargs,
                f"inputs resized from {shape} to {hw[0]}×{hw[1]}, the smallest size it accepts",
            )
    if fallback is not None and _runs_at(m, (c, *fallback[1:])):
        size = (c, *fallback[1:])
        return (
            size,
            kwargs,
            f"inputs resized from {shape} to {size[1]}×{size[2]}, the size it was converted at",
        )
    raise ConvertError(
        f"{model} runs at none of {shape} and the sizes up to {SIZE_LADDER[-1]}; give --input-size C,H,W "
        "at which it runs (see `annify inspect`)"
    )


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The input size from the model's pretrained config (3×224×224 if it has none)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))


def inspect_model(
    model: str | nn.Module, input_size: tuple[int, int, int] | None = None, **kwargs
) -> tuple[list[TapPoint], list[int], int]:
    """Candidate tap points of a model (a name, as ``create_model`` takes, or a module): block outputs
    and finer trunk points in execution order, with the trunk's cumulative FLOPs at each, and the total."""
    if isinstance(model, nn.Module) and kwargs:
        raise ConvertError(f"{sorted(kwargs)} build a model by name; a module passed in is used as it is")
    m = model if isinstance(model, nn.Module) else create_model(model, **kwargs)
    m.eval()
    traced = trace(m, input_size or default_input_size(m), train_graph=False)
    taps = tap_points(traced, trunk=True)
    cum, total = _trunk_costs(traced, taps)
    return taps, cum, total


def _trunk_costs(traced: Traced, taps: list[TapPoint], counted: dict | None = None) -> tuple[list[int], int]:
    """The trunk's cumulative FLOPs at each tap and in all; ``counted`` (if given) keeps them by node."""
    net = AnytimeNet(traced, [t.node for t in taps], [nn.Identity() for _ in taps])
    costs = count(net)
    if counted is not None:
        counted.update(
            cum=dict(zip([t.node for t in taps], costs.flops[:-1], strict=True)),
            total=costs.flops[-1],
            unsupported=costs.unsupported,
        )
    return costs.flops[:-1], costs.flops[-1]


def _trunk_segments(counted: dict, nodes: list[str]) -> tuple[list[int], dict[str, int]] | None:
    """Each segment's trunk FLOPs of a network cut at ``nodes``, from a finer cut counted before.

    Every operation of the trunk lies in exactly one segment of either cut, so a coarse segment
    costs the sum of the fine ones it spans (and fvcore's unsupported operators are the same).
    None where nothing was counted (placement by blocks or names) or a node was not a candidate.
    """
    if not counted or any(n not in counted["cum"] for n in nodes):
        return None
    cum = [counted["cum"][n] for n in nodes] + [counted["total"]]
    return [b - a for a, b in zip([0, *cum[:-1]], cum, strict=True)], dict(counted["unsupported"])


def _arch(traced: Traced) -> str:
    cfg = getattr(traced.model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(traced.model).__name__


def _tensor_nodes(traced: Traced) -> list[str]:
    return [q for q in traced.qualnames if traced.shapes.get(q) is not None and len(traced.shapes[q]) >= 2]


def choose(
    traced: Traced,
    taps: list[TapPoint],
    every: int | None = None,
    start: int | None = None,
    at: list[str] | None = None,
    flops_period: float | None = None,
    heads: int | None = None,
    head_flops: Callable[[TapPoint], int] | None = None,
    counted: dict | None = None,
) -> tuple[list[str], dict]:
    """Pick the nodes that get heads; returns (nodes in execution order, the placement as data).

    ``taps`` are the candidates (``tap_points(traced, trunk=True)``): ``every``/``start`` count the
    block outputs among them; ``heads`` and ``flops_period`` take the candidate nearest each target
    cost among those on the trunk (never one inside a branch, never the last block's output),
    counting each head's own cost (``head_flops`` of a candidate) where it is given. Placement by
    cost counts the trunk at every candidate; pass a dict as ``counted`` to keep those counts
    (``convert`` reuses them for the final network instead of counting the trunk again).
    """
    given = [
        k for k, v in dict(every=every or start, at=at, flops_period=flops_period, heads=heads).items() if v
    ]
    if len(given) > 1:
        raise ConvertError(f"choose one placement, not {' and '.join(given)}")
    if not taps and not at:
        raise ConvertError(
            "found no repeated blocks to place heads after; name nodes with --at (see `annify inspect`)"
        )
    blocks = [t for t in taps if t.index is not None]
    if every is not None or start is not None:
        every = every if every is not None else 1
        start = start if start is not None else every
        if every <= 0 or start <= 0:
            raise ConvertError(
                f"--every and --start must be positive integers, got every={every} start={start}"
            )
        if not blocks:
            raise ConvertError(
                "found no repeated blocks to count with --every; use --heads N or name nodes with --at "
                "(see `annify inspect`)"
            )
        inner = blocks[:-1]  # the last block feeds the model's own classifier
        picked = [t.node for t in inner if t.index >= start and (t.index - start) % every == 0]
        if not picked:
            raise ConvertError(
                f"--every {every} --start {start} places no head: {_arch(traced)} has {len(blocks)} blocks and "
                f"the last feeds its own classifier, so heads go after blocks 1 to {len(inner)}; "
                f"give a --start (and --every) within that range"
            )
        return picked, {"every": every, "start": start}
    if at:
        known = _tensor_nodes(traced)
        picked = []
        for pattern in at:
            hits = (
                fnmatch.filter(known, pattern)
                if any(c in pattern for c in "*?[")
                else [pattern] * (pattern in known)
            )
            if not hits:
                close = difflib.get_close_matches(pattern, known, n=1)
                hint = f" (closest: '{close[0]}')" if close else ""
                raise ConvertError(
                    f"node '{pattern}' is not in {_arch(traced)}{hint}. "
                    f"Hint: annify inspect {_arch(traced)} lists the tap points"
                )
            picked += [h for h in hits if h not in picked]
        order = {q: i for i, q in enumerate(traced.qualnames)}
        return sorted(picked, key=order.get), {"at": list(at)}
    # automatic placement: never inside a branch, never the last block (the classifier reads it)
    if heads is None and flops_period is None:
        raise ConvertError("give a placement: --every K, --at NODE, --flops-period P or --heads N")
    if flops_period is not None and flops_period <= 0:
        raise ConvertError(f"--flops-period must be positive, got {flops_period}")
    inner, cum, total = placement_candidates(traced, taps, counted)
    branches = (
        "; block outputs inside branches are left to --every K and --at NODE (see `annify inspect`)"
        if any(t.kind == "in-branch" for t in taps)
        else ""
    )
    if not inner:
        raise ConvertError(f"found no tap point on {_arch(traced)}'s trunk for automatic placement{branches}")
    if heads is not None:
        if not 1 <= heads <= len(inner) + 1:
            raise ConvertError(
                f"--heads must be between 1 and {len(inner) + 1} ({len(inner)} tap points plus the classifier), "
                f"got {heads}{branches}"
            )
        fractions, absolute = [k / heads for k in range(1, heads)], []
        placement = {"heads": heads}
    else:
        period = flops_period * total if flops_period <= 1 else flops_period
        wanted = math.ceil(total * 0.999 / period) - 1  # the multiples of the period below the total
        if wanted > MAX_PERIODS:  # bounded before any list is made: a tiny period means billions of them
            raise ConvertError(
                f"--flops-period {flops_period:g} asks for {wanted:,} outputs (one per {period:.3g} FLOPs of "
                f"{total:.3g}), but {_arch(traced)} has {len(inner)} tap points; give a fraction of the total "
                f"cost such as 0.25, or a period in FLOPs of at least {total / (len(inner) + 1):.3g}"
            )
        ks = [k for k in range(1, int(total // period) + 1) if period * k < total * 0.999]
        fractions = [k * flops_period for k in ks] if flops_period <= 1 else []
        absolute = [k * period for k in ks] if flops_period > 1 else []
        placement = {"flops_period": flops_period}
    picked = _nearest(cum, total, fractions, absolute, [head_flops(t) for t in inner] if head_flops else None)
    return [inner[i].node for i in picked], placement


def placement_candidates(
    traced: Traced, taps: list[TapPoint], counted: dict | None = None
) -> tuple[list[TapPoint], list[int], int]:
    """The tap points placement by cost may use, their trunk's cumulative FLOPs, and the trunk's total.

    Points on the trunk only (never inside a branch), never the last block's output (the classifier
    reads it), nor any point where the trunk is all but done (a head there would repeat the model's
    own output). ``counted`` as in ``choose``.
    """
    blocks = [t for t in taps if t.index is not None]
    last = blocks[-1].node if blocks else None
    inner = [t for t in taps if t.on_trunk and t.node != last]
    cum, total = _trunk_costs(traced, inner, counted)
    keep = [i for i, c in enumerate(cum) if c < FINAL_FRACTION * total]
    return [inner[i] for i in keep], [cum[i] for i in keep], total


def _nearest(
    cum: list[int], total: int, fractions: list[float], absolute: list[float], head: list[int] | None
) -> list[int]:
    """Indices of the candidates whose anytime cost is nearest each target, one candidate per target.

    The anytime cost of an output at candidate i is the trunk's ``cum[i]`` plus the heads placed up
    to it; a fraction is of the whole anytime network (trunk plus every head). Heads change both,
    so the choice is repeated with the heads of the previous choice until it settles.
    """
    head = head or [0] * len(cum)
    picked: list[int] = []
    for _ in range(4):
        all_heads = sum(head[i] for i in picked)
        targets = [f * (total + all_heads) for f in fractions] + list(absolute)
        chosen: list[int] = []
        for target in targets:  # nearest unused candidate, counting the heads chosen before it
            free = [i for i in range(len(cum)) if i not in chosen]
            if free:
                before = {i: sum(head[j] for j in chosen if j < i) for i in free}
                chosen.append(min(free, key=lambda i: abs(cum[i] + before[i] + head[i] - target)))
        chosen.sort()
        if chosen == picked:
            break
        picked = chosen
    return picked


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
            close = difflib.get_close_matches(node, list(known), n=1)
            hint = f" (closest: '{close[0]}')" if close else ""
            raise ConvertError(
                f"node '{node}' is not in {_arch(traced)}{hint}. "
                f"Hint: annify inspect {_arch(traced)} lists the tap points"
            )
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
    costs = count(net, trunk=_trunk_segments(counted, nodes))  # the trunk is counted once
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
    m = _spec_model(spec, model).eval()
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
    plain = _spec_model(net.spec, model)
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
