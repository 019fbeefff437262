"""Placement by cost: how near could ``--heads 4`` get, given the tap points a model has?

``sweeps/bench_breadth.py --all`` records, for every timm model it converts, how far each placed output's
cost fraction is from its target k/4. This script takes the models where some output missed by more
than ``--over`` (0.05) and asks whether a better placement existed: it lists the candidates that
automatic placement may use (annify's ``placement_candidates``: points on the trunk, never
inside a branch) with their trunk cost fractions, and computes the *floor*: for each target, the
distance to the nearest candidate. No placement can do better than the largest of those (a lower
bound: one candidate per target, head costs left out). Where annify's worst distance is within
``--slack`` (0.01, about the heads' own share) of the floor, the miss is the model's structure (no
tap point nearer the target), not the placement; the script names the graph stretch with no tap
point in it (the nodes between the two candidates that bracket the worst target).

Each model is built as the sweep built it (the input size and keyword arguments in its row).

Usage::

    python -m benchmarks.bench_placement                 # from benchmarks/sweeps/results/all.json
    python -m benchmarks.bench_placement --over 0.05 --limit 20

Results: ``benchmarks/results/placement.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import annify
from benchmarks._common import (
    RESULTS,
    command,
    machine,
    machine_line,
    placement_candidates,
    set_threads,
    table,
    write_json,
)
from benchmarks.sweeps._breadth import RESULTS as SWEEP_RESULTS

TARGETS = (0.25, 0.5, 0.75)


def _stretch(traced, a: str | None, b: str | None) -> str:
    """The computing nodes after tap point ``a`` up to ``b`` (its own operation included): how many, where."""
    names = traced.qualnames
    i = names.index(a) + 1 if a else 0
    j = names.index(b) + 1 if b else len(names)
    inside = names[i:j]
    if not inside:
        return "nothing"
    modules = [n for n in inside if traced.node(n).op == "call_module"]
    if len(inside) <= 2 and modules:
        return f"one module call: `{modules[0]}`"
    prefix = ".".join(os.path.commonprefix([n.split(".") for n in inside]))
    if prefix:
        return f"{len(inside)} nodes inside `{prefix}`"
    tops = list(dict.fromkeys(".".join(n.split(".")[:2]) for n in inside))
    shown = ", ".join(f"`{t}`" for t in tops[:4]) + (f" and {len(tops) - 4} more" if len(tops) > 4 else "")
    return f"{len(inside)} nodes across {shown}"


def floor_of(row: dict) -> dict:
    """Candidates, floor and the stretch around the worst target for one row of ``all.json``."""
    a = row["annify"]
    torch.manual_seed(0)
    kwargs = a.get("model_kwargs", {})
    m = annify.create_model(row["model"], num_classes=a.get("num_classes_set"), **kwargs).eval()
    traced = annify.trace(m, tuple(a["input_size"]))
    cands, cum, total = placement_candidates(traced, annify.tap_points(traced, trunk=True))
    fr = [c / total for c in cum]
    per_target = []
    for t in TARGETS:
        below = max((i for i, f in enumerate(fr) if f <= t), default=None, key=lambda i: fr[i])
        above = min((i for i, f in enumerate(fr) if f > t), default=None, key=lambda i: fr[i])
        near = min((abs(f - t) for f in fr), default=1.0)
        per_target.append({"target": t, "floor": round(near, 4), "below": below, "above": above})
    worst = max(per_target, key=lambda p: p["floor"])
    lo = cands[worst["below"]].node if worst["below"] is not None else None
    hi = cands[worst["above"]].node if worst["above"] is not None else None
    return {
        "candidates": len(cands),
        "floor": worst["floor"],
        "placed": a["spacing_error"],
        "worst_target": worst["target"],
        "bracket": [lo or "(input)", hi or "(the end)"],
        "bracket_fractions": [
            round(fr[worst["below"]], 3) if worst["below"] is not None else 0.0,
            round(fr[worst["above"]], 3) if worst["above"] is not None else 1.0,
        ],
        "stretch": _stretch(traced, lo, hi),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--source", default=str(SWEEP_RESULTS / "all.json"), help="results of sweeps.bench_breadth --all"
    )
    ap.add_argument("--over", type=float, default=0.05, help="models whose worst distance exceeds this")
    ap.add_argument("--slack", type=float, default=0.01, help="placed within this of the floor = structural")
    ap.add_argument("--limit", type=int, default=0, help="check only the first N such models")
    ap.add_argument("--out", default=str(RESULTS / "placement.json"))
    args = ap.parse_args()
    set_threads(1)
    src = json.loads(Path(args.source).read_text())
    rows = [
        r for r in src["rows"] if r.get("status") == "ok" and r["annify"].get("spacing_error") is not None
    ]
    all_d = [d for r in rows for d in r["annify"]["spacing"]]
    over = sorted(
        (r for r in rows if r["annify"]["spacing_error"] > args.over),
        key=lambda r: -r["annify"]["spacing_error"],
    )
    if args.limit:
        over = over[: args.limit]
    t0 = time.perf_counter()
    found = []
    for r in over:
        try:
            f = floor_of(r)
        except Exception as e:  # noqa: BLE001 - report and go on: one model must not stop the survey
            f = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
        f["model"] = r["model"]
        found.append(f)
        print(f"{r['model']:<36} {json.dumps(f)[:200]}", file=sys.stderr, flush=True)
    info = machine()
    structural = [f for f in found if "floor" in f and f["placed"] <= f["floor"] + args.slack]
    better = [f for f in found if "floor" in f and f["placed"] > f["floor"] + args.slack]
    summary = {
        "models": len(rows),
        "outputs": len(all_d),
        "median": round(statistics.median(all_d), 4),
        "worst": max(all_d),
        "within_0.05": sum(r["annify"]["spacing_error"] <= 0.05 for r in rows),
        "over": len(over),
        "structural": len(structural),
        "placement_could_do_better": [f["model"] for f in better],
        "errors": {f["model"]: f["error"] for f in found if "error" in f},
        "floor_over_0.05": sum(f.get("floor", 0) > 0.05 for f in found),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    out = {"command": command(), "source": src["command"], "machine": info}
    out.update(summary=summary, rows=found)
    write_json(args.out, out)
    print(machine_line(info))
    print(
        f"\n`--heads 4` over {summary['models']} models ({summary['outputs']} outputs) of `{src['command']}`: "
        f"median distance {summary['median']:.4f}, worst {summary['worst']:.3f}; "
        f"{summary['within_0.05']} models within 0.05 at every output, {summary['over']} not.\n"
        f"Of those {summary['over']}: {summary['structural']} placed within {args.slack} of their floor "
        f"(no tap point nearer the target; {summary['floor_over_0.05']} have a floor above 0.05), "
        f"{len(better)} could be placed better{': ' + ', '.join(summary['placement_could_do_better']) if better else ''}; "
        f"{len(summary['errors'])} not rebuilt.\n"
    )
    body = [
        [
            f"`{f['model']}`",
            f.get("placed", "-"),
            f.get("floor", "-"),
            f.get("candidates", "-"),
            f.get("worst_target", "-"),
            " → ".join(f"`{n}` ({x})" for n, x in zip(f["bracket"], f["bracket_fractions"], strict=True))
            if "bracket" in f
            else f.get("error", ""),
            f.get("stretch", ""),
        ]
        for f in found
    ]
    print(table(["model", "placed worst", "floor", "candidates", "target", "bracket", "stretch"], body))


if __name__ == "__main__":
    main()
