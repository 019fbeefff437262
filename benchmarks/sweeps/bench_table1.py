"""The paper's Table 1, Figure 3 and Figure 6c: weight schemes against OPT, on Fashion-MNIST or digits.

Hu et al. (AAAI 2019) train a network for each output alone (OPT) and report, at the outputs nearest
1/4, 1/2, 3/4 and all of the cost, the relative % increase in test error of CONST, LINEAR and AdaLoss
over OPT (Table 1; their CIFAR/SVHN averages: CONST 15.07 / 16.40 / 18.76 / 18.90, LINEAR 25.67 /
13.02 / 12.97 / 12.65, AdaLoss 32.99 / 9.97 / 3.96 / 2.73). Figure 3 does the same for the training
loss, Figure 6c plots AdaLoss's final weights. This benchmark repeats all three with a CIFAR-style
pre-activation ResANN, a head after every residual unit, on Fashion-MNIST (Debian's
``dataset-fashion-mnist``: 55,000 train / 5,000 val / 10,000 test, 28×28 gray) or the embedded digits.

Per seed it trains OPT at each of the 4 target outputs (``weights="opt", head=k``), CONST, LINEAR,
ADALOSS (the paper's Eq. 7) and ADALOSS_HL (AdaLoss with head-local weighting, ``head_local=True``),
the paper's recipe otherwise (SGD lr 0.1, momentum 0.9, wd 1e-4, lr / 10 at 1/2 and 3/4 of the
epochs), final weights (no model selection). Then the scheme with the best anytime quality on
*validation* (mean val error over all outputs, mean over seeds) is trained once more with
distillation from the last output (``distill``, ``distill_temperature``): ``<scheme>+KD``. The
choice never looks at test.

After each run the final train-set cross-entropy of every output is measured in eval mode on the
un-augmented train images (the Figure 3 counterpart). Relative increases are computed on the mean
error over seeds; the spread is the min–max of the per-seed increases (seed s against OPT seed s).
"Anytime quality" is the mean error over all outputs (every output counts once), the number the
trainer also selects checkpoints on.

Each run folder holds ``bench.json`` once the run is done; a rerun with the same ``--out`` skips
finished runs and resumes an interrupted one from its last checkpoint. ``--jobs N`` trains N runs
at a time, each on one thread.

Usage::

    python -m benchmarks.sweeps.bench_table1 --config cpu --jobs 2   # Fashion-MNIST, 2-core CPU, < 90 min
    python -m benchmarks.sweeps.bench_table1 --config full           # all 55,000 images, wider, longer (GPU)
    python -m benchmarks.sweeps.bench_table1 --config digits         # the earlier digits run
    python -m benchmarks.sweeps.bench_table1 --quick                 # 1-minute smoke run on digits
    python -m benchmarks.sweeps.bench_table1 --config converged --jobs 2     # 40 epochs on 1,000 images
    python -m benchmarks.sweeps.bench_table1 --compare benchmarks/sweeps/results/table1_converged15 \
        benchmarks/sweeps/results/table1_converged                                 # the epochs x scheme table
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from benchmarks._common import (
    build_datasets,
    command,
    data_spec,
    machine,
    machine_line,
    nearest_outputs,
    relative_to_opt,
    save_figure,
    set_threads,
    table,
    write_json,
    write_text,
)
from benchmarks.sweeps._runs import RESULTS, Job, run_all

TARGETS = (0.25, 0.5, 0.75, 1.0)
TARGET_LABELS = ("1/4", "1/2", "3/4", "1")
# scheme label -> train() settings; "+KD" variants are added for the validation-chosen best scheme
_SAME = {"distill": 0.0, "bn_recalibrate": 0}  # as the runs recorded in BENCHMARKS.md were trained
SCHEMES = {  # every setting explicit, so the runs do not depend on train's defaults
    "const": {"weights": "const", "head_local": False, **_SAME},
    "linear": {"weights": "linear", "head_local": False, **_SAME},
    "adaloss": {"weights": "adaloss", "head_local": False, **_SAME},
    "adaloss_hl": {"weights": "adaloss", "head_local": True, **_SAME},
    # the authors' code: final_extra 0.5 added to the last output's ratio (AdaptiveLossWeight)
    "adaloss_fe": {
        "weights": "adaloss",
        "head_local": False,
        "weight_hparams": {"final_extra": 0.5},
        **_SAME,
    },
}
PAPER = {  # Table 1, averages over 12 ResANNs on CIFAR10, CIFAR100 and SVHN
    "const": [15.07, 16.40, 18.76, 18.90],
    "linear": [25.67, 13.02, 12.97, 12.65],
    "adaloss": [32.99, 9.97, 3.96, 2.73],
}
CONFIGS = {  # --config presets; explicit flags override them
    "cpu": dict(data="fashion-mnist", model="cifar_resnet_n3_c16", train_subset=6000, epochs=15, seeds="3"),
    "full": dict(data="fashion-mnist", model="cifar_resnet_n5_c32", train_subset=None, epochs=40, seeds="3"),
    "digits": dict(data="digits", model="cifar_resnet_n5_c16", train_subset=None, epochs=30, seeds="3"),
    # towards the paper's regime on a CPU: a small subset trained long (40 epochs, 640 steps), 5 seeds;
    # run it beside converged15 (the same at 15 epochs) for the epochs x scheme table
    "converged": dict(
        data="fashion-mnist", model="cifar_resnet_n3_c8", train_subset=1000, epochs=40, seeds="5"
    ),
    "converged15": dict(
        data="fashion-mnist", model="cifar_resnet_n3_c8", train_subset=1000, epochs=15, seeds="5"
    ),
}
READING = "## Reading"  # a hand-written section of the report that a rewrite keeps


# -------------------------------------------------------------------- aggregation


def _finite(xs):
    return [x for x in xs if math.isfinite(x)]


def _rel(e: float, o: float) -> float:
    return relative_to_opt([e], [o])[0]


METRICS = ("test", "val", "test_ce", "val_ce", "train_ce", "train_error", "last_epoch_train_loss")


def aggregate(records: list[dict], idx: list[int], schemes: list[str]) -> dict:
    """Per-scheme errors, train CE and relative increases over OPT at the target outputs."""
    seeds = sorted({r["seed"] for r in records})

    def metric(r: dict, what: str) -> list[float]:
        rows = r["table"]
        if what == "test":
            return [x["test_error"] for x in rows]
        if what == "val":
            return [x["val_error"] for x in rows]
        return r[what]  # *_ce, train_error, last_epoch_train_loss

    by = {(r["scheme"], r["head"], r["seed"]): r for r in records}
    out: dict = {"seeds": seeds, "outputs": idx, "schemes": schemes, "metrics": {}}
    for what in METRICS:
        # OPT at target j is the network trained for output idx[j] alone, read at that output
        opt = [[metric(by["opt", i + 1, s], what)[i] for s in seeds] for i in idx]  # (4, S)
        m: dict = {"opt": {"per_seed": opt, "mean": [statistics.mean(v) for v in opt]}}
        for scheme in schemes:
            full = [metric(by[scheme, None, s], what) for s in seeds]  # (S, K)
            at = [[full[k][i] for k in range(len(seeds))] for i in idx]  # (4, S)
            mean_at = [statistics.mean(v) for v in at]
            paired = [[_rel(a, o) for a, o in zip(at[j], opt[j], strict=True)] for j in range(len(idx))]
            anytime = [statistics.mean(f) for f in full]  # (S,) mean over every output
            m[scheme] = {
                "all_outputs_mean": [statistics.mean(col) for col in zip(*full, strict=True)],
                "per_seed": at,
                "mean": mean_at,
                "rel_of_means": [_rel(a, o) for a, o in zip(mean_at, m["opt"]["mean"], strict=True)],
                "rel_per_seed": paired,
                "anytime_per_seed": anytime,
                "anytime": statistics.mean(anytime),
            }
        out["metrics"][what] = m
    out["weights"] = {}
    for scheme in schemes:
        ws = [by[scheme, None, s]["final_weights"] for s in seeds]
        hist = [by[scheme, None, s]["weights_history"] for s in seeds]
        out["weights"][scheme] = {
            "mean": [statistics.mean(c) for c in zip(*ws, strict=True)],
            "min": [min(c) for c in zip(*ws, strict=True)],
            "max": [max(c) for c in zip(*ws, strict=True)],
            "history_mean": [
                [statistics.mean(w) for w in zip(*epoch_ws, strict=True)]
                for epoch_ws in zip(*hist, strict=True)
            ],
        }
    return out


def best_on_val(records: list[dict], schemes: list[str]) -> str:
    """The scheme with the lowest anytime quality on validation (mean val error over outputs and seeds)."""

    def quality(scheme: str) -> float:
        runs = [r for r in records if r["scheme"] == scheme and r["head"] is None]
        return statistics.mean(statistics.mean(x["val_error"] for x in r["table"]) for r in runs)

    return min(schemes, key=quality)


def _cell(rel_of_means: float, per_seed: list[float]) -> str:
    fin = _finite(per_seed)
    if not math.isfinite(rel_of_means):
        return "∞ (OPT made no errors)"
    spread = f"{min(fin):+.1f} to {max(fin):+.1f}" if fin else "n/a"
    inf = f", {len(per_seed) - len(fin)} seed(s) ∞" if len(fin) < len(per_seed) else ""
    return f"**{rel_of_means:+.1f}** ({spread}{inf})"


def rel_table(m: dict, schemes: list[str]) -> str:
    rows = [["OPT", *["0"] * len(TARGETS), "–"]]
    for scheme in schemes:
        s = m[scheme]
        cells = [_cell(a, b) for a, b in zip(s["rel_of_means"], s["rel_per_seed"], strict=True)]
        rows.append([scheme.upper(), *cells, _anytime_cell(s)])
    return table(["", *TARGET_LABELS, "anytime (mean over outputs)"], rows)


def _anytime_cell(s: dict, scale: float = 100.0) -> str:
    v = s["anytime_per_seed"]
    return f"{scale * s['anytime']:.2f} ({scale * min(v):.2f}–{scale * max(v):.2f})"


def abs_table(m: dict, schemes: list[str], scale: float = 100.0, fmt: str = ".2f") -> str:
    def cell(v: list[float]) -> str:
        sd = statistics.stdev(v) * scale if len(v) > 1 else 0.0
        return f"{statistics.mean(v) * scale:{fmt}} ± {sd:{fmt}}"

    rows = [["OPT", *[cell(v) for v in m["opt"]["per_seed"]], "–"]]
    rows += [[s.upper(), *[cell(v) for v in m[s]["per_seed"]], _anytime_cell(m[s], scale)] for s in schemes]
    return table(["", *TARGET_LABELS, "anytime (mean over outputs)"], rows)


def paired_wins(m: dict, a: str, b: str) -> str:
    """How many seeds ``a`` beats ``b`` at each target and on anytime quality (lower is better)."""
    n = len(m[a]["anytime_per_seed"])
    at = [
        sum(x < y for x, y in zip(m[a]["per_seed"][j], m[b]["per_seed"][j], strict=True))
        for j in range(len(TARGETS))
    ]
    any_ = sum(x < y for x, y in zip(m[a]["anytime_per_seed"], m[b]["anytime_per_seed"], strict=True))
    cells = ", ".join(f"{lab}: {w}/{n}" for lab, w in zip(TARGET_LABELS, at, strict=True))
    return f"{a.upper()} beats {b.upper()} (seeds): {cells}; anytime: {any_}/{n}"


# -------------------------------------------------------------------- plots


COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink"]


def plot(agg: dict, fracs: list[float], flops: list[int], folder: Path, title: str) -> None:
    import matplotlib.ticker
    from matplotlib.figure import Figure

    idx, schemes = agg["outputs"], agg["schemes"]
    fig = Figure(figsize=(12, 4.5))
    axes = fig.subplots(1, 2)
    panels = (
        ("test", "test error (%), mean over seeds", 100.0),
        ("train_ce", "final train CE (eval mode)", 1.0),
    )
    for ax, (what, ylabel, scale) in zip(axes, panels, strict=True):
        m = agg["metrics"][what]
        for s, color in zip(schemes, COLORS, strict=False):
            ys = [scale * v for v in m[s]["all_outputs_mean"]]
            ax.plot(flops, ys, marker="o", ms=3, color=color, label=s.upper())
        opt = m["opt"]["per_seed"]
        ys = [scale * statistics.mean(v) for v in opt]
        lo = [y - scale * min(v) for y, v in zip(ys, opt, strict=True)]
        hi = [scale * max(v) - y for y, v in zip(ys, opt, strict=True)]
        ax.errorbar([flops[i] for i in idx], ys, yerr=[lo, hi], fmt="*", ms=12, color="black", capsize=3,
                    label="OPT (min–max)")  # fmt: skip
        ax.set_xlabel("FLOPs to the output (fvcore, cumulative)")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(
            matplotlib.ticker.FormatStrFormatter("%g")
        )  # a short range has no major ticks
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    save_figure(fig, folder / "table1.png")

    adaptive = [s for s in schemes if s.startswith("adaloss")]
    fig = Figure(figsize=(12, 4.2))
    axes = fig.subplots(1, 2)
    ax = axes[0]
    k = len(fracs)
    for s, color in zip(adaptive, COLORS[2:], strict=False):
        w = agg["weights"][s]
        lo = [m - a for m, a in zip(w["mean"], w["min"], strict=True)]
        hi = [b - m for m, b in zip(w["mean"], w["max"], strict=True)]
        ax.errorbar(fracs, w["mean"], yerr=[lo, hi], marker="o", capsize=3, color=color,
                    label=f"{s.upper()} (min–max over seeds)")  # fmt: skip
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
    hist = agg["weights"]["adaloss"]["history_mean"]
    cmap = matplotlib.colormaps["viridis"]
    for i in range(k):
        ax.plot(range(1, len(hist) + 1), [h[i] for h in hist], color=cmap(i / max(k - 1, 1)), lw=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("AdaLoss weight at epoch end (mean over seeds)")
    ax.set_title("dark: early outputs, yellow: late outputs")
    ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    save_figure(fig, folder / "adaloss_weights.png")


# -------------------------------------------------------------------- report


def _checks(agg: dict) -> list[str]:
    """The paper's claims, checked mechanically on test error and cross-entropy."""
    lines = []
    for what in ("test", "test_ce", "train_ce"):
        m = agg["metrics"][what]
        r = {s: m[s]["rel_of_means"] for s in agg["schemes"]}
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
    idx, schemes = agg["outputs"], agg["schemes"]
    outs = ", ".join(f"output {i + 1} ({fr[i]:.3f})" for i in idx)
    n = info["splits"]
    paired = [paired_wins(m["test"], a, b) for a, b in info["pairs"]]
    parts = [
        f"# Table 1, Figure 3 and Figure 6c on {info['data']}",
        "",
        f"Command: `{info['command']}`",
        "",
        machine_line(info["machine"])
        + f". The 2 cores are shared with other jobs; {info['jobs']} run(s) at a time, "
        f"{info['threads']} torch thread(s) each.",
        "",
        f"Wall time: {info['wall_s'] / 60:.1f} min for {info['runs']} runs "
        f"({info['trained_s'] / 60:.1f} min inside `train()`, median {info['median_run_s']:.0f} s a run).",
        "",
        f"Setup: `{info['model']}` converted with `every={info['every']}` at {'×'.join(map(str, info['input_size']))} "
        f"→ {len(fr)} outputs (cost fractions {', '.join(f'{f:.3f}' for f in fr)}). Targets 1/4, 1/2, 3/4, 1 → {outs}. "
        f"Data `{info['data']}`: {n['train']} train / {n['val']} val / {n['test']} test images. "
        f"{info['epochs']} epochs, batch {info['batch_size']}, lr {info['lr']} (/10 at 1/2 and 3/4), "
        f"SGD momentum 0.9, wd 1e-4, pad-and-crop augmentation; seeds {agg['seeds']}; final weights. "
        f"AdaLoss: gamma 0.05, EMA momentum 0.9, refreshed every step. ADALOSS_HL: the same weights, head-local. "
        f"{info['kd_scheme'].upper()}: distillation gamma {info['distill']}, T {info['distill_temperature']} on "
        f"{info['kd_base'].upper()}, the best anytime quality on validation among the others. "
        "The paper trains 300 epochs on CIFAR/SVHN.",
        "",
        "Cells: **relative % increase over OPT of the mean over seeds** (scheme mean error vs OPT mean error), "
        "then (min to max of the per-seed increases, seed s against OPT seed s). Lower is better; OPT is 0. "
        "Last column: anytime quality, the mean error over all outputs (%), mean over seeds (min–max).",
        "",
        f"## Table 1 layout: relative % increase in test error over OPT (test, {n['test']} images)",
        "",
        rel_table(m["test"], schemes),
        "",
        "Paper (CIFAR/SVHN average): CONST 15.07 / 16.40 / 18.76 / 18.90; LINEAR 25.67 / 13.02 / 12.97 / 12.65; "
        "AdaLoss 32.99 / 9.97 / 3.96 / 2.73.",
        "",
        "Paired by seed (test error):",
        "",
        *[f"- {p}" for p in paired],
        "",
        f"### Same on val ({n['val']} images)",
        "",
        rel_table(m["val"], schemes),
        "",
        "### Absolute test errors (%, mean ± std over seeds) at the target outputs",
        "",
        abs_table(m["test"], schemes),
        "",
        "### Test cross-entropy: relative % increase over OPT",
        "",
        rel_table(m["test_ce"], schemes),
        "",
        "## Figure 3 counterpart: relative % increase in final training loss over OPT",
        "",
        f"Training loss = cross-entropy of each output over the {n['train']} train images, measured after training "
        "in eval mode without augmentation (what Figure 3 plots: how well each output fits).",
        "",
        rel_table(m["train_ce"], schemes),
        "",
        "Final train CE (mean ± std over seeds; last column: mean over outputs):",
        "",
        abs_table(m["train_ce"], schemes, 1.0, ".4f"),
        "",
        "## Final weights per output (Figure 6c), mean over seeds (min–max)",
        "",
        table(
            ["output", "cost fraction", *[s.upper() for s in schemes if s.startswith("adaloss")]],
            [
                [
                    i + 1,
                    f"{fr[i]:.3f}",
                    *[
                        f"{w['mean'][i]:.3f} ({w['min'][i]:.3f}–{w['max'][i]:.3f})"
                        for s, w in agg["weights"].items()
                        if s.startswith("adaloss")
                    ],
                ]
                for i in range(len(fr))
            ],
        ),  # fmt: skip
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


# -------------------------------------------------------------------- main


def compare(folders: list[str]) -> str:
    """The epochs x scheme table: each scheme's relative increase over OPT (test) at the four targets, and
    its final AdaLoss weight spread, for results folders of runs that differ in epochs (``--compare``)."""
    rows = []
    for folder in folders:
        data = json.loads((Path(folder) / "table1.json").read_text())
        info, agg = data["info"], data["aggregate"]
        m = agg["metrics"]["test"]
        for scheme in agg["schemes"]:
            w = agg["weights"][scheme]["mean"]
            cells = [f"{v:+.1f}" for v in m[scheme]["rel_of_means"]]
            rows.append([str(info["epochs"]), scheme, *cells, f"{100 * m[scheme]['anytime']:.2f}",
                         f"{min(w):.2f}–{max(w):.2f}"])  # fmt: skip
    return table(["epochs", "scheme", *TARGET_LABELS, "anytime %", "final weights"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--config", choices=sorted(CONFIGS), default="cpu", help="preset (flags below override it)"
    )
    ap.add_argument("--data", help="data source (fashion-mnist, digits, ...)")
    ap.add_argument("--model", help="a cifar_resnet_n{n}_c{c} or any timm model")
    ap.add_argument("--train-subset", type=int, help="train on a fixed subset of N images")
    ap.add_argument("--every", type=int, default=1, help="a head after every K residual units")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--seeds", help="a count N (seeds 0..N-1) or a comma list")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--distill", type=float, default=0.5, help="gamma of the +KD run")
    ap.add_argument("--distill-temperature", type=float, default=1.0)
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (separate processes)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run")
    ap.add_argument("--out", help="run folders go here (default /tmp/annify_table1_<config>)")
    ap.add_argument(
        "--results", help="where table1.md/json/png go (default benchmarks/sweeps/results/table1_<config>)"
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: digits, n3_c8, 1 seed, 3 epochs, results in --out"
    )
    ap.add_argument(
        "--compare",
        nargs="+",
        metavar="RESULTS",
        help="print the epochs x scheme table of finished results folders",
    )
    args = ap.parse_args()
    if args.compare:
        print(compare(args.compare))
        return
    preset = dict(CONFIGS["digits" if args.quick else args.config])
    if args.quick:
        preset.update(model="cifar_resnet_n3_c8", epochs=3, seeds="1")
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    name = "quick" if args.quick else args.config
    args.out = args.out or f"/tmp/annify_table1_{name}"
    seeds = list(range(int(args.seeds))) if "," not in args.seeds else [int(s) for s in args.seeds.split(",")]
    results = (
        Path(args.results) if args.results else (Path(args.out) if args.quick else RESULTS / f"table1_{name}")
    )
    results.mkdir(parents=True, exist_ok=True)
    set_threads(args.threads)
    info_machine = machine()
    print(machine_line(info_machine), flush=True)

    spec = data_spec(args.model, args.data, args.every)
    fracs = [h.fraction for h in spec.heads]
    flops = [h.flops for h in spec.heads]
    idx = nearest_outputs(fracs, TARGETS)
    ds = build_datasets(args.data, input_size=spec.input_size, augment=False, train_subset=args.train_subset)
    splits = {k: len(v) for k, v in ds.items()}
    print(f"{args.model} on {args.data} {splits}: {len(fracs)} outputs; targets {TARGETS} -> outputs "
          f"{[i + 1 for i in idx]}", flush=True)  # fmt: skip

    root = Path(args.out)
    shared = {k: getattr(args, k) for k in ("data", "train_subset", "epochs", "batch_size", "lr", "threads")}

    def job(seed: int, label: str, settings: dict, head: int | None) -> Job:
        folder = root / (f"seed{seed}_{label}" + (f"{head:02d}" if head else ""))
        return Job(spec, folder, label, settings, head, seed, shared)

    # phase 1: OPT at the four targets and every scheme, seed by seed (partial results stay balanced)
    plan = [
        job(s, "opt", {"weights": "opt", "head_local": False, **_SAME}, i + 1) for s in seeds for i in idx
    ]
    plan += [job(s, label, settings, None) for s in seeds for label, settings in SCHEMES.items()]
    plan.sort(key=lambda j: j.seed)
    started = time.perf_counter()
    records = run_all(plan, args.jobs, started)
    # phase 2: distillation on the scheme with the best anytime quality on validation
    base = best_on_val(records, list(SCHEMES))
    kd = f"{base}+kd"
    kd_settings = {**SCHEMES[base], "distill": args.distill, "distill_temperature": args.distill_temperature}
    print(f"best anytime quality on val: {base}; training {kd}", flush=True)
    records += run_all([job(s, kd, kd_settings, None) for s in seeds], args.jobs, started)
    wall = time.perf_counter() - started

    schemes = [*SCHEMES, kd]
    agg = aggregate(records, idx, schemes)
    run_s = [r["seconds"] for r in records]
    info = {
        "command": command(),
        "machine": info_machine,
        "threads": args.threads,
        "jobs": args.jobs,
        "data": args.data,
        "model": args.model,
        "input_size": list(spec.input_size),
        "every": args.every,
        "epochs": args.epochs,
        "train_subset": args.train_subset,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "distill": args.distill,
        "distill_temperature": args.distill_temperature,
        "kd_base": base,
        "kd_scheme": kd,
        "fractions": fracs,
        "flops": flops,
        "wall_s": wall,
        "trained_s": sum(run_s),
        "median_run_s": statistics.median(run_s),
        "runs": len(records),
        "splits": splits,
        "pairs": [("adaloss_hl", "adaloss"), ("adaloss_hl", "const"), ("adaloss", "const"), (kd, base)],
    }
    title = f"{args.model} every {args.every}, {args.data}, {args.epochs} epochs, {len(seeds)} seed(s)"
    plot(agg, fracs, flops, results, title)
    md = report(agg, info)
    path = results / "table1.md"
    write_text(path, md + "\n" + _keep_reading(path))
    summary = {"info": info, "paper_table1": PAPER, "aggregate": agg}
    summary["runs"] = [{k: v for k, v in r.items() if k != "weights_history"} for r in records]
    write_json(results / "table1.json", summary)
    print(md)
    print(f"wrote {path}, {results / 'table1.json'}, table1.png, adaloss_weights.png in {wall / 60:.1f} min")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
