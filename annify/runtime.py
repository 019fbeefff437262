"""Anytime inference: stop at a FLOP budget or a deadline, run an EANN, exit early per sample.

Every cost here is per sample, in the convention of ``annify.cost`` (fvcore, one multiply-add = one
FLOP, batch 1), taken from the spec where it has the numbers and counted otherwise. Output k of an
anytime network costs its cumulative anytime FLOPs: the trunk up to tap k plus every head up to k,
since running anytime (or exiting early) evaluates each head on the way.

- ``AnytimeRunner`` runs a network (or an ``EANNRuntime``) segment by segment and returns the latest
  output that fits a FLOP budget, or that is ready when a wall-clock deadline passes.
- ``EANNRuntime`` runs the members of an ensemble of anytime networks one after another, computing
  only the heads whose predictions the ensemble uses.

Budgeted batch classification lives in ``annify.early_exit``, the per-segment costs in
``annify.cost`` and image loading in ``annify.images``.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from annify.cost import exit_flops, segment_costs
from annify.errors import InferenceError
from annify.report import format_sci
from annify.rewrite import AnytimeNet

__all__ = ["AnytimeResult", "AnytimeRunner", "EANNRuntime", "Exit"]


class Exit(NamedTuple):
    """An output a runner can return: which member (None for a single network), which output, its cost."""

    member: int | None
    output: int
    flops: float


@dataclass
class AnytimeResult:
    """What ``AnytimeRunner.run`` returns.

    ``flops_spent`` counts everything computed, per sample: with a deadline that can include the
    segment that overran it. ``outputs_computed`` counts the predictions computed, the returned one
    included. ``late`` is true when not even the first output was ready at the deadline.
    """

    logits: torch.Tensor
    output_index: int  # 0-based output of the network (of ``member`` for an EANN)
    member: int | None
    flops_spent: float
    elapsed_ms: float
    outputs_computed: int
    late: bool = False


class _NetSchedule:
    """A single anytime network as a sequence of segments, each ending in one output."""

    def __init__(self, net: AnytimeNet):
        self.net = net
        self.exits = [Exit(None, k, f) for k, f in enumerate(exit_flops(net))]

    def events(self, x: torch.Tensor) -> Iterator[tuple[float, int | None, torch.Tensor | None]]:
        for e, out in zip(self.exits, self.net.stream(x), strict=True):
            yield e.flops, e.output, out


class EANNRuntime(nn.Module):
    """An EANN at inference: its members run one after another, smallest first.

    ``used[m][k]`` says whether the ensemble ever returns member m's output k (the validation
    selection of ``annify.eann.build_schedule``). Only what the used outputs need is computed: heads
    of unused outputs are skipped (``run_segment(head=False)``), a member stops after its last used
    output, and a member with no used output is not run at all. Costs count exactly that, so the
    cost of (member m, output k) is, for each earlier member, its trunk up to its last used output
    plus its used heads, then member m's trunk up to tap k plus its used heads up to k. That is at
    most ``ScheduleStep.flops``, which charges every member in full.

    ``stream(x)`` yields ``(cumulative FLOPs, logits)`` for every used output, in order; ``forward``
    returns them as a list. ``exits`` lists them with their (member, output) and cost.
    """

    def __init__(self, members: list[AnytimeNet], used: list[list[bool]]):
        super().__init__()
        if not members:
            raise ValueError("an EANN needs at least one member")
        if len(used) != len(members):
            raise ValueError(f"{len(members)} members but {len(used)} rows in 'used'")
        for m, (net, row) in enumerate(zip(members, used, strict=True)):
            if len(row) != net.num_outputs:
                raise ValueError(f"member {m} has {net.num_outputs} outputs but used[{m}] has {len(row)}")
        if not any(any(row) for row in used):
            raise ValueError("no output of the EANN is used")
        self.members = nn.ModuleList(members)
        self.used = [[bool(u) for u in row] for row in used]
        self.exits: list[Exit] = []
        self._plan: list[list[tuple[int, bool, float, int | None]]] = []  # (segment, head, flops, exit)
        spent = 0.0
        for m, (net, row) in enumerate(zip(members, self.used, strict=True)):
            steps = []
            last = max((k for k, u in enumerate(row) if u), default=-1)
            trunk, head = segment_costs(net) if last >= 0 else ([], [])
            for j in range(last + 1):
                spent += trunk[j] + (head[j] if row[j] else 0.0)
                if row[j]:
                    self.exits.append(Exit(m, j, spent))
                steps.append((j, row[j], spent, len(self.exits) - 1 if row[j] else None))
            self._plan.append(steps)

    @classmethod
    def from_schedule(cls, members: list[AnytimeNet], steps: list) -> EANNRuntime:
        """Build from ``annify.eann.build_schedule``'s steps (their ``member``, ``output``, ``used``)."""
        used = [[False] * net.num_outputs for net in members]
        for s in steps:
            used[s.member][s.output] = bool(s.used)
        return cls(members, used)

    def events(self, x: torch.Tensor) -> Iterator[tuple[float, int | None, torch.Tensor | None]]:
        """After every segment run: (cumulative FLOPs, exit index or None, logits or None)."""
        for m, steps in enumerate(self._plan):
            outs = self.members[m].run_segments(x, [head for _, head, _, _ in steps])
            for (_, _, flops, exit_index), out in zip(steps, outs, strict=True):
                yield flops, exit_index, (out if exit_index is not None else None)

    def stream(self, x: torch.Tensor) -> Iterator[tuple[float, torch.Tensor]]:
        for flops, exit_index, out in self.events(x):
            if exit_index is not None:
                yield flops, out

    def forward(self, x: torch.Tensor) -> list[tuple[float, torch.Tensor]]:
        return list(self.stream(x))


class AnytimeRunner:
    """Run an anytime network or an ``EANNRuntime`` until a FLOP budget or a deadline.

    Puts the network in eval mode. Computation happens segment by segment and stops as soon as the
    answer is known: with a budget, right after the chosen output; with a deadline, at the first
    check (after each segment) that finds it passed.

    Args:
        model: an ``AnytimeNet`` or an ``EANNRuntime``.
        clock: seconds, monotonic; ``time.perf_counter`` unless a test injects a fake one.
    """

    def __init__(self, model: AnytimeNet | EANNRuntime, clock: Callable[[], float] = time.perf_counter):
        self.model = model.eval()
        self.schedule = model if isinstance(model, EANNRuntime) else _NetSchedule(model)
        self.clock = clock

    @property
    def exits(self) -> list[Exit]:
        """The outputs this runner can return, in order, with their cumulative per-sample FLOPs."""
        return self.schedule.exits

    def select(self, budget_flops: float) -> int:
        """Index into ``exits`` of the latest output whose cumulative FLOPs fit ``budget_flops``."""
        first = self.exits[0].flops
        if budget_flops < first:
            raise InferenceError(
                f"budget {format_sci(budget_flops)} FLOPs is below the first output's cost {format_sci(first)}; "
                "raise --budget-flops"
            )
        return bisect_right([e.flops for e in self.exits], budget_flops) - 1

    def steps(self, x: torch.Tensor) -> Iterator[tuple[float, int, torch.Tensor]]:
        """Yield (cumulative FLOPs, exit index, logits) output by output, computing lazily.

        For a single network the exit index is the output index; for an EANN it indexes ``exits``.
        Gradients are off while a step computes, not in the caller's code between steps.
        """
        events = self.schedule.events(x)
        while True:
            with torch.no_grad():
                event = next(events, None)
            if event is None:
                return
            flops, exit_index, out = event
            if exit_index is not None:
                yield flops, exit_index, out

    def run(
        self, x: torch.Tensor, budget_flops: float | None = None, deadline_ms: float | None = None
    ) -> AnytimeResult:
        """The latest output within the budget and ready by the deadline (either, both or neither)."""
        target = len(self.exits) - 1 if budget_flops is None else self.select(budget_flops)
        if deadline_ms is not None and deadline_ms <= 0:
            raise InferenceError(f"--deadline-ms must be positive, got {deadline_ms}")
        start = self.clock()
        deadline = None if deadline_ms is None else start + deadline_ms / 1000
        best: tuple[int, torch.Tensor] | None = None
        spent, computed, late = 0.0, 0, False
        with torch.no_grad():
            events = self.schedule.events(x)
            for flops, exit_index, out in events:
                spent, computed = flops, computed + (exit_index is not None)
                if deadline is not None and self.clock() > deadline:
                    if best is None and exit_index is not None:  # not even the first was ready in time
                        best, late = (exit_index, out), True
                    if best is not None:
                        break
                    continue
                if exit_index is not None:
                    best = (exit_index, out)
                    if exit_index == target:
                        break
            events.close()
        assert best is not None
        e = self.exits[best[0]]
        return AnytimeResult(
            logits=best[1],
            output_index=e.output,
            member=e.member,
            flops_spent=spent,
            elapsed_ms=(self.clock() - start) * 1000,
            outputs_computed=computed,
            late=late,
        )
