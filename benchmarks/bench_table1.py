"""The paper's Table 1, Figure 3 and Figure 6c, small: weight schemes against OPT on the embedded digits.

Hu et al. (AAAI 2019) train a network for each output alone (OPT) and report, at the outputs nearest
1/4, 1/2, 3/4 and all of the cost, the relative % increase in test error of CONST, LINEAR and AdaLoss
over OPT (Table 1; their CIFAR/SVHN averages: CONST 15.07 / 16.40 / 18.76 / 18.90, LINEAR 25.67 /
13.02 / 12.97 / 12.65, AdaLoss 32.99 / 9.97 / 3.96 / 2.73). Figure 3 does the same for the training
loss, Figure 6c plots AdaLoss's final weights. This benchmark repeats all three on sklearn's 8×8
digits (1,167 train / 270 val / 360 test images) with a CIFAR-style pre-activation ResANN, a head
after every residual unit.

Per seed it trains 7 networks with ``annify.train.train``: OPT at each of the 4 target outputs
(``weights="opt", head=k``), CONST, LINEAR and ADALOSS, the paper's recipe otherwise (SGD lr 0.1,
momentum 0.9, wd 1e-4, lr / 10 at 1/2 and 3/4 of the epochs), final weights (no model selection).
After each run the final train-set cross-entropy of every output is measured in eval mode on the
un-augmented train images (the Figure 3 counterpart; the per-epoch train loss in metrics.jsonl is a
train-mode running mean over augmented batches, also recorded).

Relative increases are computed on the mean error over seeds (the headline: a single test image is
0.28 points of error); the spread is the min–max of the per-seed increases (seed s against OPT seed s).
Errors are reported on test (360), val (270; not used for any choice here, so a second held-out set)
and both pooled (630).

Each run folder holds ``bench.json`` once the run is done; a rerun with the same ``--out`` skips
finished runs and resumes an interrupted one from its last checkpoint.

Usage::

    PYTHONPATH=. python benchmarks/bench_table1.py                 # 3 seeds, writes benchmarks/results/
    PYTHONPATH=. python benchmarks/bench_table1.py --quick         # 1-minute smoke run, writes to --out only
    PYTHONPATH=. python benchmarks/bench_table1.py --seeds 0,1,2,3,4 --epochs 40 --out /tmp/t1
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._timing import machine, machine_line, set_threads, table  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TARGETS = (0.25, 0.5, 0.75, 1.0)
TARGET_LABELS = ("1/4", "1/2", "3/4", "1")
SCHEMES = ("const", "linear", "adaloss")
PAPER = {  # Table 1, averages over 12 ResANNs on CIFAR10, CIFAR100 and SVHN
    "const": [15.07, 16.40, 18.76, 18.90],
    "linear": [25.67, 13.02, 12.97, 12.65],
    "adaloss": [32.99, 9.97, 3.96, 2.73],
}
READING = "## Reading"  # a hand-written section of table1.md that a rewrite keeps


# -------------------------------------------------------------------- runs


def _convert(model: str, every: int):
    from annify.convert import convert

    _, spec, _ = convert(
        model, every=every, input_size=(1, 8, 8), num_classes=10, model_kwargs={"in_chans": 1}
    )
    return spec


def _final_eval(net, spec) -> dict:
    """Cross-entropy and error of every output on train (un-augmented), val and test, eval mode."""
    from annify.data import build_datasets, build_loaders
    from annify.evaluate import evaluate

    datasets = build_datasets("digits", input_size=spec.input_size, augment=False)
    loaders = build_loaders(datasets, 256)
    out = {}
    for split, loader in loaders.items():
        ev = evaluate(net, loader, "cpu")
        out.update({f"{split}_ce": ev.losses, f"{split}_error": ev.errors, f"{split}_count": ev.count})
    return out


def run_one(spec, folder: Path, scheme: str, head: int | None, seed: int, args) -> dict:
    """Train one network (or read the result of a finished one) and return its ``bench.json`` record."""
    from annify.train import train

    done = folder / "bench.json"
    if done.is_file():
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / "log.txt", "a")  # noqa: SIM115 - closed below
    try:
        res = train(
            spec,
            out=folder,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weights="opt" if scheme == "opt" else scheme,
            head=head,
            seed=seed,
            device="cpu",
            resume=True,
            log=lambda s: print(s, file=log, flush=True),
        )
    finally:
        log.close()
    metrics = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    record = {
        "scheme": scheme,
        "head": head,
        "seed": seed,
        "seconds": res.seconds,
        "epochs": res.epochs_done,
        "table": res.table,
        **_final_eval(res.net, res.spec),
        "last_epoch_train_loss": metrics[-1]["train_loss"],  # train mode, augmented, running mean
        "final_weights": metrics[-1]["weights"],
        "weights_history": [m["weights"] for m in metrics],
    }
    ours = [round(e * record["test_count"]) for e in record["test_error"]]
    theirs = [round(r["test_error"] * record["test_count"]) for r in res.table]
    if ours != theirs:  # the same network and images, batched differently
        print(f"warning: {folder}: test errors differ between train() and re-evaluation: {theirs} vs {ours}")
    done.write_text(json.dumps(record) + "\n")
    return record


# -------------------------------------------------------------------- aggregation


def _finite(xs):
    return [x for x in xs if math.isfinite(x)]


def _rel(e: float, o: float) -> float:
    from annify.evaluate import relative_to_opt

    return relative_to_opt([e], [o])[0]


def aggregate(records: list[dict], idx: list[int], n_val: int, n_test: int) -> dict:
    """Per-scheme errors, train CE and relative increases over OPT at the target outputs."""
    seeds = sorted({r["seed"] for r in records})

    def metric(r: dict, what: str) -> list[float]:
        rows = r["table"]
        if what == "test":
            return [x["test_error"] for x in rows]
        if what == "val":
            return [x["val_error"] for x in rows]
        if what == "pooled":
            return [(x["val_error"] * n_val + x["test_error"] * n_test) / (n_val + n_test) for x in rows]
        return r[what]  # *_ce, train_error, last_epoch_train_loss

    by = {(r["scheme"], r["head"], r["seed"]): r for r in records}
    out: dict = {"seeds": seeds, "outputs": idx, "metrics": {}}
    for what in (
        "test",
        "val",
        "pooled",
        "test_ce",
        "val_ce",
        "train_ce",
        "train_error",
        "last_epoch_train_loss",
    ):
        # OPT at target j is the network trained for output idx[j] alone, read at that output
        opt = [[metric(by["opt", i + 1, s], what)[i] for s in seeds] for i in idx]  # (4, S)
        m: dict = {"opt": {"per_seed": opt, "mean": [statistics.mean(v) for v in opt]}}
        for scheme in SCHEMES:
            full = [metric(by[scheme, None, s], what) for s in seeds]  # (S, K)
            at = [[full[k][i] for k in range(len(seeds))] for i in idx]  # (4, S)
            mean_at = [statistics.mean(v) for v in at]
            paired = [[_rel(a, o) for a, o in zip(at[j], opt[j], strict=True)] for j in range(len(idx))]
            m[scheme] = {
                "all_outputs_mean": [statistics.mean(col) for col in zip(*full, strict=True)],
                "per_seed": at,
                "mean": mean_at,
                "rel_of_means": [_rel(a, o) for a, o in zip(mean_at, m["opt"]["mean"], strict=True)],
                "rel_per_seed": paired,
            }
        out["metrics"][what] = m
    ada = [by["adaloss", None, s]["final_weights"] for s in seeds]
    out["adaloss_weights"] = {
        "mean": [statistics.mean(c) for c in zip(*ada, strict=True)],
        "min": [min(c) for c in zip(*ada, strict=True)],
        "max": [max(c) for c in zip(*ada, strict=True)],
        "per_seed": ada,
    }
    hist = [by["adaloss", None, s]["weights_history"] for s in seeds]
    out["adaloss_weights"]["history_mean"] = [
        [statistics.mean(ws) for ws in zip(*epoch_ws, strict=True)] for epoch_ws in zip(*hist, strict=True)
    ]
    return out


def _cell(rel_of_means: float, per_seed: list[float]) -> str:
    fin = _finite(per_seed)
    if not math.isfinite(rel_of_means):
        return "∞ (OPT made no errors)"
    spread = f"{min(fin):+.1f} to {max(fin):+.1f}" if fin else "n/a"
    inf = f", {len(per_seed) - len(fin)} seed(s) ∞" if len(fin) < len(per_seed) else ""
    return f"**{rel_of_means:+.1f}** ({spread}{inf})"


def rel_table(m: dict) -> str:
    rows = [["OPT", *["0"] * len(TARGETS)]]
    for scheme in SCHEMES:
        s = m[scheme]
        rows.append(
            [
                scheme.upper(),
                *[_cell(a, b) for a, b in zip(s["rel_of_means"], s["rel_per_seed"], strict=True)],
            ]
        )
    return table(["", *TARGET_LABELS], rows)


def abs_table(m: dict, scale: float = 100.0, fmt: str = ".2f") -> str:
    def cell(v: list[float]) -> str:
        sd = statistics.stdev(v) * scale if len(v) > 1 else 0.0
        return f"{statistics.mean(v) * scale:{fmt}} ± {sd:{fmt}}"

    rows = [["OPT", *[cell(v) for v in m["opt"]["per_seed"]]]]
    rows += [[s.upper(), *[cell(v) for v in m[s]["per_seed"]]] for s in SCHEMES]
    return table(["", *TARGET_LABELS], rows)


# -------------------------------------------------------------------- plots


def plot(agg: dict, fracs: list[float], flops: list[int], folder: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from annify.evaluate import _save_figure

    idx = agg["outputs"]
    colors = {"const": "tab:blue", "linear": "tab:orange", "adaloss": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = (
        ("test", "test error (%), mean over seeds", 100.0),
        ("train_ce", "final train CE (eval mode)", 1.0),
    )
    for ax, (what, ylabel, scale) in zip(axes, panels, strict=True):
        m = agg["metrics"][what]
        for s in SCHEMES:
            ys = [scale * v for v in m[s]["all_outputs_mean"]]
            ax.plot(flops, ys, marker="o", ms=3, color=colors[s], label=s.upper())
        opt = m["opt"]["per_seed"]
        ys = [scale * statistics.mean(v) for v in opt]
        lo = [y - scale * min(v) for y, v in zip(ys, opt, strict=True)]
        hi = [scale * max(v) - y for y, v in zip(ys, opt, strict=True)]
        ax.errorbar(
            [flops[i] for i in idx],
            ys,
            yerr=[lo, hi],
            fmt="*",
            ms=12,
            color="black",
            capsize=3,
            label="OPT (min–max)",
        )
        ax.set_xlabel("FLOPs to the output (fvcore, cumulative)")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    _save_figure(fig, folder / "table1.png")

    w = agg["adaloss_weights"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    lo = [m - a for m, a in zip(w["mean"], w["min"], strict=True)]
    hi = [b - m for m, b in zip(w["mean"], w["max"], strict=True)]
    ax.errorbar(
        fracs,
        w["mean"],
        yerr=[lo, hi],
        marker="o",
        capsize=3,
        color="tab:green",
        label="AdaLoss (min–max over seeds)",
    )
    k = len(fracs)
    ax.plot(
        fracs,
        [0.25 + 0.75 * i / max(k - 1, 1) for i in range(k)],
        ls="--",
        color="tab:orange",
        label="LINEAR",
    )
    ax.axhline(1.0, ls=":", color="tab:blue", label="CONST")
    ax.set_xlabel("output's fraction of the total cost")
    ax.set_ylabel("final loss weight")
    ax.set_title("final AdaLoss weights (cf. paper Fig. 6c)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    ax = axes[1]
    hist = w["history_mean"]
    for i in range(k):
        ax.plot(range(1, len(hist) + 1), [h[i] for h in hist], color=plt.cm.viridis(i / max(k - 1, 1)), lw=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("AdaLoss weight at epoch end (mean over seeds)")
    ax.set_title("dark: early outputs, yellow: late outputs")
    ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    _save_figure(fig, folder / "adaloss_weights.png")


# -------------------------------------------------------------------- report


def _checks(agg: dict) -> list[str]:
    """The paper's claims, checked mechanically on the pooled (val + test) and test errors."""
    lines = []
    for what in ("test", "pooled", "test_ce", "train_ce"):
        r = {s: agg["metrics"][what][s]["rel_of_means"] for s in SCHEMES}
        late_ada = max(r["adaloss"][2:])
        lines.append(
            f"- {what}: AdaLoss at 3/4 and 1: {r['adaloss'][2]:+.1f} / {r['adaloss'][3]:+.1f}; "
            f"CONST {r['const'][2]:+.1f} / {r['const'][3]:+.1f}; LINEAR {r['linear'][2]:+.1f} / {r['linear'][3]:+.1f}. "
            f"AdaLoss beats CONST late (both of 3/4, 1): {'yes' if all(r['adaloss'][j] < r['const'][j] for j in (2, 3)) else 'no'}; "
            f"AdaLoss worse than CONST at 1/4: {'yes' if r['adaloss'][0] > r['const'][0] else 'no'}; "
            f"AdaLoss within 5% of OPT late: {'yes' if late_ada <= 5 else 'no'}."
        )
    return lines


def report(agg: dict, info: dict) -> str:
    m = agg["metrics"]
    fr = info["fractions"]
    idx = agg["outputs"]
    outs = ", ".join(f"output {i + 1} ({fr[i]:.3f})" for i in idx)
    parts = [
        "# Table 1, Figure 3 and Figure 6c on digits",
        "",
        f"Command: `{info['command']}`",
        "",
        machine_line(info["machine"]) + ". The 2 cores are shared with other engineers' jobs; torch runs "
        f"{info['threads']} thread(s) (2 threads under that load was >10× slower per epoch than 1).",
        "",
        f"Wall time: {info['wall_s'] / 60:.1f} min for {info['runs']} runs "
        f"({info['trained_s'] / 60:.1f} min inside `train()`, median {info['median_run_s']:.0f} s a run).",
        "",
        f"Setup: `{info['model']}` converted with `every={info['every']}` at 1×8×8 → {len(fr)} outputs "
        f"(cost fractions {', '.join(f'{f:.3f}' for f in fr)}). Targets 1/4, 1/2, 3/4, 1 → {outs}. "
        f"{info['epochs']} epochs, batch {info['batch_size']}, lr {info['lr']} (/10 at 1/2 and 3/4), "
        f"SGD momentum 0.9, wd 1e-4, pad-and-crop augmentation; seeds {agg['seeds']}; final weights. "
        f"AdaLoss: gamma 0.05, EMA momentum 0.9, refreshed every step. The paper trains 300 epochs on CIFAR/SVHN.",
        "",
        "Cells: **relative % increase over OPT of the mean over seeds** (scheme mean error vs OPT mean error), "
        "then (min to max of the per-seed increases, seed s against OPT seed s). Lower is better; OPT is 0.",
        "",
        "## Table 1 layout: relative % increase in test error over OPT (test, 360 images)",
        "",
        rel_table(m["test"]),
        "",
        "Paper (CIFAR/SVHN average): CONST 15.07 / 16.40 / 18.76 / 18.90; LINEAR 25.67 / 13.02 / 12.97 / 12.65; "
        "AdaLoss 32.99 / 9.97 / 3.96 / 2.73.",
        "",
        "### Same on val (270 images)",
        "",
        rel_table(m["val"]),
        "",
        "### Same on val + test pooled (630 images)",
        "",
        rel_table(m["pooled"]),
        "",
        "### Absolute errors (%, mean ± std over seeds) at the target outputs",
        "",
        "Test:",
        "",
        abs_table(m["test"]),
        "",
        "Val + test pooled:",
        "",
        abs_table(m["pooled"]),
        "",
        "### Same on test cross-entropy (continuous, so not limited to 1/360 steps; lower is better)",
        "",
        "Mean cross-entropy of each output on the 360 test images. Not what the paper tabulates, but it "
        "ranks the schemes with far less noise than the error count when late errors are a handful of images.",
        "",
        rel_table(m["test_ce"]),
        "",
        "Val cross-entropy (270 images):",
        "",
        rel_table(m["val_ce"]),
        "",
        "## Figure 3 counterpart: relative % increase in final training loss over OPT",
        "",
        "Training loss = cross-entropy of each output over the 1,167 train images, measured after training "
        "in eval mode without augmentation (what Figure 3 plots: how well each output fits, not generalizes).",
        "",
        rel_table(m["train_ce"]),
        "",
        "Final train CE (mean ± std over seeds):",
        "",
        abs_table(m["train_ce"], 1.0, ".4f"),
        "",
        "For comparison, the last epoch's train-mode running mean over augmented batches (metrics.jsonl):",
        "",
        rel_table(m["last_epoch_train_loss"]),
        "",
        "## Final AdaLoss weights per output (Figure 6c), mean over seeds (min–max)",
        "",
        table(
            ["output", "cost fraction", "weight"],
            [
                [i + 1, f"{fr[i]:.3f}", f"{a:.3f} ({lo:.3f}–{hi:.3f})"]
                for i, (a, lo, hi) in enumerate(
                    zip(
                        agg["adaloss_weights"]["mean"],
                        agg["adaloss_weights"]["min"],
                        agg["adaloss_weights"]["max"],
                        strict=True,
                    )
                )
            ],
        ),
        "",
        "Plots: `table1.png` (test error and final train CE against FLOPs, every output, mean over seeds; "
        "OPT stars with min–max bars), `adaloss_weights.png` (final weights; weights per epoch).",
        "",
        "## Mechanical checks of the paper's pattern",
        "",
        *_checks(agg),
        "",
    ]
    return "\n".join(parts)


def _keep_reading(path: Path) -> str:
    if not path.is_file():
        return f"{READING}\n\n(to be written by whoever reads the numbers)\n"
    text = path.read_text()
    i = text.find(READING)
    return text[i:] if i >= 0 else f"{READING}\n\n(to be written by whoever reads the numbers)\n"


def _clean(x):
    """JSON-safe: non-finite floats become None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


# -------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="cifar_resnet_n5_c16")
    ap.add_argument("--every", type=int, default=1, help="a head after every K residual units")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", default="3", help="a count N (seeds 0..N-1) or a comma list")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out", default="/tmp/annify_bench_table1", help="run folders go here")
    ap.add_argument(
        "--results", default=None, help="where table1.md/json/png go (default benchmarks/results)"
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: n3_c8, 1 seed, 5 epochs, results in --out"
    )
    args = ap.parse_args()
    if args.quick:
        args.model, args.epochs, args.seeds = "cifar_resnet_n3_c8", 5, "1"
        args.out = args.out.rstrip("/") + "_quick"
    seeds = list(range(int(args.seeds))) if "," not in args.seeds else [int(s) for s in args.seeds.split(",")]
    results = Path(args.results) if args.results else (Path(args.out) if args.quick else RESULTS)
    results.mkdir(parents=True, exist_ok=True)
    set_threads(args.threads)
    info_machine = machine()
    print(machine_line(info_machine), flush=True)

    from annify.data import build_datasets
    from annify.evaluate import nearest_outputs

    spec = _convert(args.model, args.every)
    fracs = [h.fraction for h in spec.heads]
    flops = [h.flops for h in spec.heads]
    idx = nearest_outputs(fracs, TARGETS)
    ds = build_datasets("digits", input_size=spec.input_size, augment=False)
    n_val, n_test = len(ds["val"]), len(ds["test"])
    print(
        f"{args.model}: {len(fracs)} outputs; targets {TARGETS} -> outputs {[i + 1 for i in idx]}", flush=True
    )

    plan = [(s, "opt", i + 1) for s in seeds for i in idx]
    plan += [(s, scheme, None) for s in seeds for scheme in SCHEMES]
    plan.sort(key=lambda p: p[0])  # seed by seed: partial results stay balanced
    started = time.perf_counter()
    records = []
    root = Path(args.out)
    for n, (seed, scheme, head) in enumerate(plan, 1):
        name = f"seed{seed}_{scheme}" + (f"{head:02d}" if head else "")
        t0 = time.perf_counter()
        rec = run_one(spec, root / name, scheme, head, seed, args)
        records.append(rec)
        errs = " ".join(f"{100 * r['test_error']:.1f}" for r in rec["table"])
        print(
            f"[{n}/{len(plan)}] {name}: {time.perf_counter() - t0:.0f} s (elapsed {(time.perf_counter() - started) / 60:.1f} min)"
            f"  test err % {errs}",
            flush=True,
        )
    wall = time.perf_counter() - started

    agg = aggregate(records, idx, n_val, n_test)
    run_s = [r["seconds"] for r in records]
    info = {
        "command": " ".join(["python", *sys.argv]),
        "machine": info_machine,
        "threads": args.threads,
        "model": args.model,
        "every": args.every,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "fractions": fracs,
        "flops": flops,
        "wall_s": wall,
        "trained_s": sum(run_s),
        "median_run_s": statistics.median(run_s),
        "runs": len(records),
        "splits": {"val": n_val, "test": n_test},
    }
    title = f"{args.model} every {args.every}, digits, {args.epochs} epochs, {len(seeds)} seed(s)"
    plot(agg, fracs, flops, results, title)
    md = report(agg, info)
    path = results / "table1.md"
    path.write_text(md + "\n" + _keep_reading(path))
    summary = {"info": info, "paper_table1": PAPER, "aggregate": agg}
    summary["runs"] = [{k: v for k, v in r.items() if k != "weights_history"} for r in records]
    (results / "table1.json").write_text(json.dumps(_clean(summary), indent=1) + "\n")
    print(md)
    print(f"wrote {path}, {results / 'table1.json'}, table1.png, adaloss_weights.png in {wall / 60:.1f} min")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
