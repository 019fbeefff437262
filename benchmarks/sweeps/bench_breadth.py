"""Breadth: convert the smallest model of every timm family with ``heads=4`` and check the final output.

For each timm model module ("family") the registered model with the fewest parameters is converted
(``convert(name, heads=4)``), run at its default input size with batch 1 in eval mode, and its last
output compared with the plain timm model's, ``torch.equal``. Families whose smallest model has more
than 100M parameters are skipped and listed. For comparison, timm's own FX test
(``test_model_forward_fx``: trace with timm's leaf registrations, return the last node) runs on the
same model. Results go to ``benchmarks/sweeps/results/breadth.json``.

The report also says how near ``--heads 4`` puts each output to its target: the distance between
each placed output's cost fraction (anytime FLOPs over the whole network's) and k/4, its median and
worst over all outputs.

Usage::

    python -m benchmarks.sweeps.bench_breadth --jobs 2          # all families, 2 workers
    python -m benchmarks.sweeps.bench_breadth --only resnet,vgg  # some families
    python -m benchmarks.sweeps.bench_breadth --models regnetx_002,mobilevit_xxs --no-timm-fx
    nice -n 19 python -m benchmarks.sweeps.bench_breadth --all --no-timm-fx  # every model <= 30M

Each worker appends one JSON line per family to ``benchmarks/sweeps/results/breadth_shard{k}.jsonl`` and skips
families already there, so an interrupted run resumes where it stopped (``--fresh`` starts over).
``--models`` checks the named models instead of the families' representatives, in
``benchmarks/sweeps/results/models_shard{k}.jsonl`` and ``benchmarks/sweeps/results/models.json``.

``--all`` checks every registered timm model with at most ``--max-params`` parameters (30M), not one
per family, in a seeded random order (``--seed``), in ``benchmarks/sweeps/results/all_shard{k}.jsonl`` and
``benchmarks/sweeps/results/all.json``. An interrupted ``--all`` run has checked a seeded random sample (the first N of
that order), which the report says; ``--sample N`` stops there on purpose.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._common import command as common_command
from benchmarks._common import machine, machine_line, set_threads, table, write_json
from benchmarks.sweeps._breadth import (
    MAX_PARAMS,
    RESULTS,
    SWEEP_MAX_PARAMS,
    check_annify,
    check_timm_fx,
    count_params,
    every_model,
    families,
    run_check,
)


def _shard_file(k: int, kind: str = "breadth") -> Path:
    return RESULTS / f"{kind}_shard{k}.jsonl"


def _named(models: list[str]) -> list[dict]:
    """Rows like ``families()``'s for models named on the command line (each its own "family")."""
    return [{"module": m, "model": m, "params": count_params(m), "test_model": None} for m in models]


def _work(
    fams: list[dict],
    k: int,
    n: int,
    timeout: int,
    timm_fx: bool,
    kind: str = "breadth",
    limit: int = MAX_PARAMS,
) -> None:
    """Worker: check every n-th family starting at k, appending to the shard file."""
    path = _shard_file(k, kind)
    done = set()
    if path.is_file():
        done = {json.loads(line)["module"] for line in path.read_text().splitlines() if line.strip()}
    mine = [f for i, f in enumerate(fams) if i % n == k and f["module"] not in done]
    for f in mine:
        row = dict(f)
        row.pop("meta_failures", None)
        if f["model"] is not None and row["params"] is None:  # --all: counted as the sweep goes
            try:
                row["params"] = count_params(f["model"])
            except Exception as e:  # a model whose __init__ needs real data; rare
                row["params"] = None
                row["uncounted"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        if f["model"] is None:
            row["status"] = "no model"
        elif row["params"] is None:
            row["status"] = "not counted"
        elif row["params"] > limit:
            row["status"] = f"skipped (>{limit / 1e6:.0f}M params)"
        else:
            check = functools.partial(check_annify, small=True) if kind == "all" else check_annify
            row["annify"] = run_check(check, f["model"], timeout)
            if timm_fx:
                row["timm_fx"] = run_check(check_timm_fx, f["model"], timeout)
            row["status"] = "ok" if row["annify"]["ok"] else "fail"
        if f.get("test_model"):  # timm's CI fixture for the family, as an extra
            row["test"] = {
                "model": f["test_model"],
                "annify": run_check(check_annify, f["test_model"], timeout),
            }
            if timm_fx:
                row["test"]["timm_fx"] = run_check(check_timm_fx, f["test_model"], timeout)
        with path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        a = row.get("annify", {})
        print(
            f"[{k}] {f['module']:<28} {f['model'] or '-':<40} {row['status']:<8} "
            f"{a.get('seconds', '')}s {a.get('reason', '')}",
            flush=True,
        )


def _collect(n: int, kind: str = "breadth") -> list[dict]:
    rows = []
    for k in range(n):
        p = _shard_file(k, kind)
        if p.is_file():
            rows += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["module"])


def spacing_summary(rows: list[dict]) -> dict:
    """Median and worst distance of a placed output's cost fraction from its target, over all outputs."""
    found = [(d, r["model"]) for r in rows for d in r.get("annify", {}).get("spacing", [])]
    if not found:
        return {}
    distances = sorted(d for d, _ in found)
    worst, model = max(found)
    n = len(distances)
    median = (distances[(n - 1) // 2] + distances[n // 2]) / 2
    models = sum(bool(r.get("annify", {}).get("spacing")) for r in rows)
    every = [r["model"] for r in rows if "every" in r.get("annify", {}).get("placement", {})]
    return {
        "outputs": n,
        "models": models,
        "median": round(median, 4),
        "worst": worst,
        "worst_model": model,
        "every_instead": every,  # too few trunk points for --heads 4: converted with --every
    }


def report(rows: list[dict], info: dict, wall_s: float, command: str, kind: str = "breadth") -> dict:
    """Summarise, write breadth.json (models.json for --models), print the Markdown tables."""
    tried = [r for r in rows if "annify" in r]
    skipped = [r for r in rows if r["status"].startswith("skipped") or r["status"] == "no model"]
    ok = [r for r in tried if r["annify"]["ok"]]
    fx_tried = [r for r in tried if "timm_fx" in r]
    fx_ok = [r for r in fx_tried if r["timm_fx"]["ok"]]
    summary = {
        "families": len(rows),
        "tried": len(tried),
        "annify_ok": len(ok),
        "timm_fx_tried": len(fx_tried),
        "timm_fx_ok": len(fx_ok),
        "skipped": [(r["module"], r["model"], r["params"]) for r in skipped],
        "annify_failures": {r["module"]: [r["model"], r["annify"]["reason"]] for r in tried if r not in ok},
        "timm_fx_failures": {
            r["module"]: [r["model"], r["timm_fx"]["reason"]] for r in fx_tried if not r["timm_fx"]["ok"]
        },
        "annify_ok_timm_fx_fail": [
            r["module"] for r in fx_tried if r["annify"]["ok"] and not r["timm_fx"]["ok"]
        ],
        "timm_fx_ok_annify_fail": [
            r["module"] for r in fx_tried if r["timm_fx"]["ok"] and not r["annify"]["ok"]
        ],
        "test_models_annify_ok": sum(r["test"]["annify"]["ok"] for r in rows if "test" in r),
        "test_models": sum("test" in r for r in rows),
        "test_model_failures": {
            r["module"]: [r["test"]["model"], r["test"]["annify"]["reason"]]
            for r in rows
            if "test" in r and not r["test"]["annify"]["ok"]
        },
        "spacing": spacing_summary(tried),
        "wall_s": round(wall_s, 1),
    }
    out = {"command": command, "machine": info, "summary": summary, "rows": rows}
    write_json(RESULTS / f"{kind}.json", out)

    print(machine_line(info))
    print(
        f"\nannify converts {len(ok)}/{len(tried)} families exactly (torch.equal of the final output)", end=""
    )
    if fx_tried:
        print(f"; timm's own FX test passes {len(fx_ok)}/{len(fx_tried)}", end="")
    print(f"; {len(skipped)} skipped; wall {wall_s / 60:.1f} min\n")
    sp = summary["spacing"]
    if sp:
        print(
            f"--heads 4: distance of each placed output's cost fraction from its target k/4, over "
            f"{sp['outputs']} outputs of {sp['models']} models: median {sp['median']:.3f}, "
            f"worst {sp['worst']:.3f} ({sp['worst_model']})"
            + (
                f"; converted with --every instead: {', '.join(sp['every_instead'])}"
                if sp["every_instead"]
                else ""
            )
            + "\n"
        )
    body = []
    for r in rows:
        a, t = r.get("annify", {}), r.get("timm_fx", {})
        params = f"{r['params'] / 1e6:.1f}M" if r.get("params") else "-"
        body.append(
            [
                r["module"],
                f"`{r['model']}`",
                params,
                r["status"],
                "ok" if t.get("ok") else ("fail" if t else "-"),
                ", ".join(f"`{n}`" for n in a.get("taps", [])),
                "/".join(str(c) for c in a.get("carried", [])),
                "-" if a.get("spacing_error") is None else a["spacing_error"],
                a.get("seconds", ""),
                (a.get("reason") or "").replace("|", "\\|"),
            ]
        )
    header = [
        "family",
        "model",
        "params",
        "annify",
        "timm FX",
        "taps",
        "carried",
        "spacing err",
        "s",
        "reason",
    ]
    print(table(header, body))
    extras = [r for r in rows if "test" in r]
    if extras:
        n_ok = sum(r["test"]["annify"]["ok"] for r in extras)
        print(f"\ntimm's CI fixtures (test_* models), as extras: annify {n_ok}/{len(extras)}\n")
        body = [
            [
                r["module"],
                f"`{r['test']['model']}`",
                "ok" if r["test"]["annify"]["ok"] else "fail",
                "ok"
                if r["test"].get("timm_fx", {}).get("ok")
                else ("fail" if "timm_fx" in r["test"] else "-"),
                (r["test"]["annify"].get("reason") or "").replace("|", "\\|"),
            ]
            for r in extras
        ]
        print(table(["family", "test model", "annify", "timm FX", "reason"], body))
    return out


def report_all(rows: list[dict], registered: int, args, info: dict, wall_s: float, command: str) -> dict:
    """``--all``: how many of the models visited (up to --max-params) converted exactly, every failure
    with its reason, and how many of timm's registered models the visit covered."""
    visited = rows
    rows = [r for r in visited if "annify" in r]
    ok = [r for r in rows if r["annify"]["ok"]]
    failed = [r for r in rows if not r["annify"]["ok"]]
    seconds = sorted(r["annify"]["seconds"] for r in rows)
    sizes: dict[str, int] = {}
    for r in rows:
        size = "x".join(map(str, r["annify"].get("input_size") or [])) or "-"
        sizes[size] = sizes.get(size, 0) + 1
    summary = {
        "max_params": int(args.max_params),
        "registered": registered,
        "visited": len(visited),
        "larger": sum(r["status"].startswith("skipped") for r in visited),
        "checked": len(rows),
        "sample": "all"
        if len(visited) == registered
        else f"the first {len(visited)} of the {registered} registered models in a random order, seed {args.seed}",
        "annify_ok": len(ok),
        "failures": {r["model"]: r["annify"]["reason"] for r in failed},
        "uncounted": {r["model"]: r["uncounted"] for r in visited if "uncounted" in r},
        "num_classes_set": [r["model"] for r in rows if r["annify"].get("num_classes_set")],
        "input_sizes": dict(sorted(sizes.items(), key=lambda kv: -kv[1])),
        "check_seconds": {
            "sum": round(sum(seconds), 1),
            "median": seconds[len(seconds) // 2] if seconds else None,
            "max": seconds[-1] if seconds else None,
        },
        "wall_s_this_invocation": round(wall_s, 1),
    }
    out = {"command": command, "machine": info, "summary": summary, "rows": rows}
    write_json(RESULTS / "all.json", out)
    print(machine_line(info))
    print(
        f"\nannify converts {len(ok)}/{len(rows)} timm models with <= {args.max_params / 1e6:.0f}M parameters "
        f"exactly (--heads 4, torch.equal of the final output); visited {summary['sample']}, "
        f"{summary['larger']} of them larger; checks took {sum(seconds) / 60:.1f} min in all (median "
        f"{summary['check_seconds']['median']} s a model)\n"
    )
    print(
        f"input sizes: {summary['input_sizes']}; num_classes=1000 given to {len(summary['num_classes_set'])}"
    )
    if summary["uncounted"]:
        print(f"not counted (could not be built on the meta device): {summary['uncounted']}")
    body = [
        [f"`{r['model']}`", f"{r['params'] / 1e6:.1f}M", (r["annify"]["reason"] or "").replace("|", "\\|")]
        for r in failed
    ]
    if body:
        print("\n" + table(["model", "params", "reason"], body))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (one torch thread each)")
    ap.add_argument("--only", default="", help="comma-separated families (timm module names)")
    ap.add_argument("--models", default="", help="comma-separated timm models, checked instead of families")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per check before it counts as failed")
    ap.add_argument("--no-timm-fx", action="store_true", help="skip timm's own FX test")
    ap.add_argument("--fresh", action="store_true", help="discard earlier shard results")
    ap.add_argument("--all", action="store_true", help="every timm model up to --max-params, not families")
    ap.add_argument("--max-params", type=float, default=SWEEP_MAX_PARAMS, help="--all: largest model")
    ap.add_argument("--seed", type=int, default=0, help="--all: seed of the random order")
    ap.add_argument("--sample", type=int, default=0, help="--all: check only the first N of that order")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)  # "k/n": run as worker k of n
    args = ap.parse_args()

    kind = "all" if args.all else "models" if args.models else "breadth"
    if args.all:
        fams = every_model(args.seed)
        registered = len(fams)
        fams = fams[: args.sample] if args.sample else fams
    else:
        fams = _named(args.models.split(",")) if args.models else families()
    if args.only:
        wanted = set(args.only.split(","))
        fams = [f for f in fams if f["module"] in wanted]
    if args.worker:
        k, n = (int(v) for v in args.worker.split("/"))
        set_threads(1 if n > 1 or args.all else None)
        limit = int(args.max_params) if args.all else MAX_PARAMS
        _work(fams, k, n, args.timeout, not args.no_timm_fx, kind, limit)
        return

    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        for k in range(max(args.jobs, 8)):
            _shard_file(k, kind).unlink(missing_ok=True)
    t0 = time.perf_counter()
    base = [sys.executable, "-m", "benchmarks.sweeps.bench_breadth", "--timeout", str(args.timeout)]
    if args.only:
        base += ["--only", args.only]
    if args.models:
        base += ["--models", args.models]
    if args.no_timm_fx:
        base.append("--no-timm-fx")
    if args.all:
        base += ["--all", "--max-params", str(args.max_params), "--seed", str(args.seed)]
        base += ["--sample", str(args.sample)]
    root = Path(__file__).resolve().parents[2]  # the workers import benchmarks from the repository root
    procs = [subprocess.Popen([*base, "--worker", f"{k}/{args.jobs}"], cwd=root) for k in range(args.jobs)]
    for p in procs:
        p.wait()
    info = machine()
    info["threads"] = 1 if args.jobs > 1 or args.all else info["threads"]
    info["workers"] = args.jobs
    rows = _collect(args.jobs, kind)
    command = common_command()
    if args.all:
        order = {f["module"]: i for i, f in enumerate(fams)}
        rows = sorted((r for r in rows if r["module"] in order), key=lambda r: order[r["module"]])
        report_all(rows, registered, args, info, time.perf_counter() - t0, command)
        return
    if args.only or args.models:
        wanted = {f["module"] for f in fams}
        rows = [r for r in rows if r["module"] in wanted]
    report(rows, info, time.perf_counter() - t0, command, kind)


if __name__ == "__main__":
    main()
