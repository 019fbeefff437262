"""Choosing tap points: which nodes of a traced model get heads.

Placement is declarative: after every K blocks (``every``, ``start``), at named nodes or globs
(``at``), at multiples of a FLOP period (``flops_period``), or N outputs spaced evenly by cost
(``heads``). The last block is never given a head: the model's own classifier reads it and is
always the last output (so ``resnet50 --every 2`` has 8 outputs, as in the paper). Placement by cost
counts the trunk at every candidate (``placement_candidates``); ``inspect_model`` shows the same
candidates and costs to a person choosing by hand.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections.abc import Callable

from torch import nn

from annify.cost import count
from annify.errors import ConvertError
from annify.rewrite import AnytimeNet
from annify.sources import create_model, default_input_size
from annify.trace import TapPoint, Traced, tap_points, trace

__all__ = [
    "FINAL_FRACTION",
    "MAX_PERIODS",
    "choose",
    "inspect_model",
    "placement_candidates",
    "trunk_segments",
    "unknown_node",
]


# Automatic placement leaves out tap points past this fraction of the trunk's cost.
FINAL_FRACTION = 0.99
# The most targets --flops-period may make (past the tap points, each takes the nearest one left).
MAX_PERIODS = 1000


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


def trunk_segments(counted: dict, nodes: list[str]) -> tuple[list[int], dict[str, int]] | None:
    """Each segment's trunk FLOPs of a network cut at ``nodes``, from a finer cut counted before.

    Every operation of the trunk lies in exactly one segment of either cut, so a coarse segment
    costs the sum of the fine ones it spans (and fvcore's unsupported operators are the same).
    None where nothing was counted (placement by blocks or names) or a node was not a candidate.
    """
    if not counted or any(n not in counted["cum"] for n in nodes):
        return None
    cum = [counted["cum"][n] for n in nodes] + [counted["total"]]
    return [b - a for a, b in zip([0, *cum[:-1]], cum, strict=True)], dict(counted["unsupported"])


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


def _arch(traced: Traced) -> str:
    cfg = getattr(traced.model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(traced.model).__name__


def unknown_node(traced: Traced, node: str, known: list[str]) -> ConvertError:
    """The error for a node the model does not have: the closest name, and where to look."""
    close = difflib.get_close_matches(node, known, n=1)
    hint = f" (closest: '{close[0]}')" if close else ""
    arch = _arch(traced)
    return ConvertError(
        f"node '{node}' is not in {arch}{hint}. Hint: annify inspect {arch} lists the tap points"
    )


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
                raise unknown_node(traced, pattern, known)
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
