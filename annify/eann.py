"""EANN maths: the schedule of an ensemble of exponentially deepening anytime networks, and its cost.

An EANN runs its member ANNs one after another, smallest first. Each member output is a candidate
prediction; it is *used* only if its validation error is strictly lower than that of every prediction
used before it, otherwise the best earlier prediction stays in force (Hu et al., "Learning Anytime
Predictions in Neural Networks via Adaptive Loss Balancing", AAAI 2019, Sec. 4 and Fig. 4).

Costs are the members' own FLOPs as given (whatever convention produced them, see ``annify.cost``):
the EANN's cost at output k of member m is the full cost of members 0..m-1 plus member m's cumulative
cost at output k. Everything here works on per-output tables and imports no torch: it trains, runs
and writes nothing. The stage itself (convert, train with the trainer it is given or load, evaluate,
write ``eann.json`` and ``eann.png``) is ``annify.eann_run``; its ``run_eann``, ``EANNRun`` and
``plot_eann`` are reachable from here too.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import asdict, dataclass
from itertools import pairwise
from typing import Any

from annify._lazy import load
from annify.report import format_flops, format_rows

__all__ = [
    "EANNRun",  # noqa: F822 (annify.eann_run's, through __getattr__)
    "MemberTable",
    "ScheduleStep",
    "build_schedule",
    "default_placement",
    "depth_ratio",
    "format_eann",
    "ideal_inflation",
    "inflation",
    "linear_ensemble_curve",
    "plot_eann",  # noqa: F822
    "prop41_bounds",
    "run_eann",  # noqa: F822
    "schedule_to_json",
    "uniform_inflation",
]


@dataclass
class MemberTable:
    """One member ANN: a row per anytime output, in the order the outputs are computed.

    ``flops[k]`` is the cumulative cost of running the member up to and including output k, so it must
    be positive and strictly increasing; ``flops[-1]`` is the member's total cost. Predictions are
    optional and never read here.
    """

    name: str
    flops: list[float]
    val_error: list[float]
    test_error: list[float]
    val_pred: Any = None
    test_pred: Any = None

    def __post_init__(self) -> None:
        errors = []
        n = len(self.flops)
        if n == 0:
            errors.append("flops is empty")
        for key in ("val_error", "test_error"):
            if len(getattr(self, key)) != n:
                errors.append(f"{key} has {len(getattr(self, key))} entries, flops has {n}")
        if n and self.flops[0] <= 0:
            errors.append(f"flops[0] must be positive, got {self.flops[0]}")
        if any(b <= a for a, b in pairwise(self.flops)):
            errors.append(f"flops must be strictly increasing, got {list(self.flops)}")
        if errors:
            raise ValueError(f"member {self.name!r}: " + "; ".join(errors))

    @property
    def total_flops(self) -> float:
        """Cost of running the whole member."""
        return float(self.flops[-1])


@dataclass
class ScheduleStep:
    """One member output in EANN order, with the prediction in force once it has been computed."""

    member: int
    member_name: str
    output: int
    flops: float  # EANN cost: earlier members' totals + this member's cumulative flops[output]
    val_error: float  # of this output itself
    test_error: float
    used: bool  # strictly better on validation than every earlier used prediction
    effective_val_error: float  # of the prediction in force after this step
    effective_test_error: float
    source_member: int  # where the prediction in force comes from
    source_output: int


def build_schedule(members: list[MemberTable]) -> list[ScheduleStep]:
    """Run ``members`` in the given order and apply the validation selection rule at every output."""
    if not members:
        raise ValueError("an EANN needs at least one member")
    steps: list[ScheduleStep] = []
    offset = 0.0  # total cost of the members already run
    best: tuple[float, float, int, int] | None = None  # (val, test, member, output) in force
    for m, table in enumerate(members):
        for k, (flops, val, test) in enumerate(
            zip(table.flops, table.val_error, table.test_error, strict=True)
        ):
            used = best is None or val < best[0]
            if used:
                best = (float(val), float(test), m, k)
            assert best is not None
            eff_val, eff_test, src_member, src_output = best
            steps.append(
                ScheduleStep(
                    member=m, member_name=table.name, output=k, flops=float(offset + flops),
                    val_error=float(val), test_error=float(test), used=used,
                    effective_val_error=eff_val, effective_test_error=eff_test,
                    source_member=src_member, source_output=src_output,
                )
            )  # fmt: skip
        offset += table.total_flops
    return steps


def depth_ratio(members: list[MemberTable], per_pair: bool = False) -> float | list[float]:
    """Exponential base b of the ensemble: ratios of consecutive members' total costs.

    Returns the geometric mean of the ratios, or the list of ratios when ``per_pair`` is true.
    """
    if len(members) < 2:
        raise ValueError(f"a depth ratio needs at least two members, got {len(members)}")
    ratios = [b.total_flops / a.total_flops for a, b in pairwise(members)]
    if per_pair:
        return ratios
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def prop41_bounds(b: float) -> dict[str, float]:
    """Proposition 4.1's cost inflation for base b: the supremum and the bound on the uniform mean."""
    if not b > 1:
        raise ValueError(f"Proposition 4.1 needs an exponential base b > 1, got {b}")
    return {
        "sup_C": 2 + 1 / (b - 1),
        "mean_C_bound": 1 - 1 / (2 * b) + (1 + math.log(b)) / (b - 1),
    }


class _Competitor:
    """Answers "the smallest cost at which some reference output has error <= e" in O(log n)."""

    def __init__(self, reference: list[MemberTable], split: str) -> None:
        rows = sorted(
            (err, flops, t.name, k)
            for t in reference
            for k, (flops, err) in enumerate(zip(t.flops, getattr(t, f"{split}_error"), strict=True))
        )
        self.errors = [r[0] for r in rows]
        self.best: list[tuple[float, str, int]] = []  # cheapest among rows[: i + 1]
        for _, flops, name, k in rows:
            if not self.best or flops < self.best[-1][0]:
                self.best.append((float(flops), name, k))
            else:
                self.best.append(self.best[-1])

    def cheapest(self, error: float) -> tuple[float, str, int] | None:
        i = bisect.bisect_right(self.errors, error)
        return self.best[i - 1] if i else None


def inflation(
    members: list[MemberTable],
    steps: list[ScheduleStep],
    budgets: list[float] | None = None,
    reference: list[MemberTable] | None = None,
    split: str = "test",
) -> dict[str, Any]:
    """Measured cost inflation C(B) of the EANN against the best single network at each budget B.

    At budget B the EANN's error is the effective error of its latest step with cost <= B. A single
    ``reference`` network run alone (default: each member on its own) has, at cost x, the error of its
    latest output with cost <= x, so the smallest cost B' at which any of them reaches an error <= the
    EANN's is the cheapest reference output that does. Then C(B) = B / B': the EANN at budget B is
    as good as the best single network at budget B / C. Budgets with no EANN prediction yet, or whose
    error no reference output reaches, are listed in ``skipped``.

    The default grid is the union of the EANN's step costs, i.e. the instants at which it emits an
    output. ``mean`` is the plain average over the grid, so with the default grid it averages over
    output times, not over uniformly drawn budgets; pass an evenly spaced ``budgets`` for the latter.

    Caveat: Proposition 4.1 compares against the *optimum* of depth B / C and assumes every member is
    near-optimal in its later outputs. With the members as reference C >= 1 by construction (the
    prediction in force is a member output that costs less on its own) and the bound can be exceeded
    when a member's late outputs are weak; with another reference (e.g. an OPT curve) C may fall
    below 1 where the members beat it.

    Returns:
        ``{"max", "mean", "per_budget", "skipped", "split"}``; each ``per_budget`` entry holds the
        budget, the EANN error, the matched cost with the reference network and output, and ``C``.
    """
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    competitor = _Competitor(members if reference is None else reference, split)
    costs = [s.flops for s in steps]
    grid = sorted(set(costs)) if budgets is None else sorted(float(b) for b in budgets)
    per_budget, skipped = [], []
    for budget in grid:
        i = bisect.bisect_right(costs, budget)
        if i == 0:
            skipped.append(budget)
            continue
        error = getattr(steps[i - 1], f"effective_{split}_error")
        match = competitor.cheapest(error)
        if match is None:
            skipped.append(budget)
            continue
        cost, name, k = match
        per_budget.append(
            {"budget": budget, "error": error, "matched_cost": cost, "matched_member": name,
             "matched_output": k, "C": budget / cost}
        )  # fmt: skip
    ratios = [row["C"] for row in per_budget]
    return {
        "max": max(ratios) if ratios else None,
        "mean": sum(ratios) / len(ratios) if ratios else None,
        "per_budget": per_budget,
        "skipped": skipped,
        "split": split,
    }


def uniform_inflation(
    members: list[MemberTable], steps: list[ScheduleStep], n: int = 1000, split: str = "test"
) -> dict[str, Any]:
    """``inflation`` over ``n`` evenly spaced budgets from the EANN's first output to its total cost.

    Proposition 4.1 bounds E[C] for B ~ Uniform(1, L); this grid estimates that mean, whereas
    ``inflation``'s default grid (the output times) weighs every output equally however close together.

    Returns:
        ``{"max", "mean", "budgets", "from", "to", "split"}``.
    """
    lo, hi = steps[0].flops, steps[-1].flops
    grid = [lo + (hi - lo) * i / (n - 1) for i in range(n)] if n > 1 else [hi]
    result = inflation(members, steps, budgets=grid, split=split)
    return {
        "max": result["max"], "mean": result["mean"], "budgets": len(result["per_budget"]),
        "from": lo, "to": hi, "split": split,
    }  # fmt: skip


def ideal_inflation(b: float, L: float, resolution: int = 1) -> dict[str, Any]:
    """Simulate Proposition 4.1's idealized EANN and measure its cost inflation C.

    The model is the one of the paper's proof (Appendix A): member i has depth b**i (1, b, b**2, ...),
    one unit of depth costs one unit, and there is an output every ``1 / resolution`` units. The
    optimal (OPT) network of depth d has error e(d), strictly decreasing in d. Member i's output at
    depth d is competitive (error e(d)) iff d > b**i / b = b**(i-1), the previous member's depth;
    otherwise it is worse than anything before it, so the selection rule never uses it and the EANN
    keeps the previous member's final prediction (the proof's Case 1). Members are added until the
    EANN's total cost reaches L; C is measured by ``inflation`` against OPT at every EANN output time
    in (1, L], which is evenly spaced, so ``mean_C`` estimates E over B ~ Uniform(1, L].

    The mean bound holds when L ends a member, i.e. L = (b**N - 1) / (b - 1): the proof averages C
    member by member, and cutting the last member right after its Case 1 phase (where C climbs to
    its supremum) can push the average above the bound. Depths are rounded to the output grid, so
    for non-integer b raise ``resolution``.

    Returns:
        ``{"depths", "sup_C", "mean_C", "n_budgets", "bounds"}`` with ``bounds = prop41_bounds(b)``.
    """
    bounds = prop41_bounds(b)
    if L <= 1:
        raise ValueError(f"L must exceed 1, the depth of the first member, got {L}")
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    depths, total = [], 0.0
    while total < L:
        depths.append(b ** len(depths))
        total += depths[-1]

    def error(units: int) -> float:  # e(d) for d = units / resolution; strictly decreasing
        return 1.0 / (1.0 + units)

    members = []
    for i, depth in enumerate(depths):
        units = range(1, round(depth * resolution) + 1)
        errs = [2.0 if u / resolution <= depth / b else error(u) for u in units]
        members.append(MemberTable(f"ann{i}", [u / resolution for u in units], errs, errs))
    top = round(depths[-1] * resolution)
    opt_errors = [error(u) for u in range(1, top + 1)]
    opt = MemberTable("opt", [u / resolution for u in range(1, top + 1)], opt_errors, opt_errors)
    steps = build_schedule(members)
    grid = [s.flops for s in steps if 1 < s.flops <= L]
    measured = inflation(members, steps, budgets=grid, reference=[opt])
    return {
        "depths": depths,
        "sup_C": measured["max"],
        "mean_C": measured["mean"],
        "n_budgets": len(measured["per_budget"]),
        "bounds": bounds,
    }


def linear_ensemble_curve(members: list[MemberTable]) -> list[tuple[float, float]]:
    """Fig. 6b's baseline: members run in order as plain networks, each giving only its final output.

    The point after member m costs the total of members 0..m and has the test error of the prediction
    in force, chosen with the same strictly-better-on-validation rule as the EANN. A member's total
    includes its auxiliary heads when the tables come from ANNs; pass plain networks' tables for the
    paper's baseline.
    """
    finals = [MemberTable(t.name, [t.total_flops], [t.val_error[-1]], [t.test_error[-1]]) for t in members]
    return [(s.flops, s.effective_test_error) for s in build_schedule(finals)]


def schedule_to_json(
    steps: list[ScheduleStep],
    members: list[MemberTable],
    extra: dict[str, Any] | None = None,
    linear: list[MemberTable] | None = None,
) -> dict[str, Any]:
    """JSON-ready summary: members, steps, depth ratios, Prop. 4.1 bounds, inflation, linear curve.

    ``depth_ratio`` and ``prop41`` are None when undefined (one member, or b <= 1). ``extra`` keys are
    added at the top level and may not shadow the computed ones. ``linear`` are the networks of the
    linear-ensemble baseline (default: the members themselves, see ``linear_ensemble_curve``).
    """
    ratios = depth_ratio(members, per_pair=True) if len(members) > 1 else None
    b = depth_ratio(members) if ratios else None
    out: dict[str, Any] = {
        "members": [
            {
                "name": t.name,
                "flops": [float(x) for x in t.flops],
                "total_flops": t.total_flops,
                "val_error": [float(x) for x in t.val_error],
                "test_error": [float(x) for x in t.test_error],
            }
            for t in members
        ],  # fmt: skip
        "steps": [asdict(s) for s in steps],
        "depth_ratio": {"ratios": ratios, "geometric_mean": b} if ratios else None,
        "prop41": prop41_bounds(b) if b is not None and b > 1 else None,
        "inflation": inflation(members, steps),
        "linear_ensemble": [list(p) for p in linear_ensemble_curve(linear or members)],
    }
    clash = sorted(set(out) & set(extra or {}))
    if clash:
        raise ValueError(f"extra keys {clash} would overwrite computed fields")
    out.update(extra or {})
    return out


# -------------------------------------------------------------------- how members are converted

_PAPER_PLACEMENTS: dict[str, dict[str, int]] = {
    "resnet26": {"every": 2},  # the paper's ILSVRC ResANNs and DenseANN (specs/ holds them)
    "resnet50": {"every": 2},
    "resnet101": {"every": 3},
    "densenet169": {"start": 12, "every": 14},
}


def default_placement(model: str) -> dict[str, int]:
    """The head placement ``annify eann`` converts a timm model name with: the paper's where it has one.

    CIFAR ResANNs (``cifar_resnet_n{n}_c{c}``) get a head after every residual unit, every third
    unit for n >= 25 (the paper's appendix); resnet26/50 every second block, resnet101 every third,
    densenet169 every 14th dense layer from the 12th. Any other model gets 4 outputs spaced evenly
    by cost (``annify convert --heads 4``). Returns ``annify.convert.convert`` keyword arguments.
    """
    m = re.fullmatch(r"cifar_resnet_n(\d+)_c\d+", model)
    if m:
        return {"every": 1 if int(m.group(1)) < 25 else 3}
    return dict(_PAPER_PLACEMENTS.get(model, {"heads": 4}))


def format_eann(summary: dict[str, Any]) -> str:
    """``eann.json`` as text: the schedule (errors in percent), then the cost inflation against Prop. 4.1."""

    def pct(e: float) -> str:
        return f"{100 * e:.2f}"

    rows = [("step", "member", "output", "flops", "val err %", "test err %", "used", "in force: test err %")]
    for i, s in enumerate(summary["steps"], 1):
        rows.append(
            (str(i), s["member_name"], str(s["output"] + 1), format_flops(s["flops"]), pct(s["val_error"]),
             pct(s["test_error"]), "yes" if s["used"] else "-", pct(s["effective_test_error"]))
        )  # fmt: skip
    lines = [format_rows(rows)]
    ratio = summary["depth_ratio"]
    per_pair = ", ".join(f"{r:.2f}" for r in ratio["ratios"])
    lines.append(f"depth ratio b = {ratio['geometric_mean']:.2f} (member to member: {per_pair})")
    inf, uni = summary["inflation"], summary.get("inflation_uniform")
    if inf["max"] is not None:
        text = (
            f"cost inflation C on {inf['split']} against the best single member: "
            f"max {inf['max']:.2f}, mean {inf['mean']:.2f} over the {len(inf['per_budget'])} output times"
        )
        if uni and uni["max"] is not None:
            text += (
                f"; max {uni['max']:.2f}, mean {uni['mean']:.2f} over {uni['budgets']} evenly spaced budgets"
            )
        lines.append(text)
    bounds = summary["prop41"]
    if bounds is None:
        lines.append("Proposition 4.1: undefined, the members do not grow in cost (b <= 1)")
    else:
        lines.append(
            f"Proposition 4.1 at b = {ratio['geometric_mean']:.2f}: sup C = {bounds['sup_C']:.2f}, "
            f"E[C] <= {bounds['mean_C_bound']:.2f}"
        )
    points = ", ".join(f"{format_flops(f)}: {pct(e)}%" for f, e in summary["linear_ensemble"])
    lines.append(f"linear ensemble, test err % ({summary.get('linear_networks', 'the members')}): {points}")
    return "\n".join(lines)


# annify.eann_run's, named here as they always were
_STAGE = {name: "annify.eann_run" for name in ("EANNRun", "plot_eann", "run_eann")}


def __getattr__(name: str):
    return load(globals(), _STAGE, name)
