"""Anytime inference on this CPU: latency per output, the segmented runtime's overhead, early exit.

Parts (``--parts latency,overhead,early_exit``):

latency: wall time of ``net.forward_until(x, k)`` for every output k beside its cumulative anytime
    FLOPs (trunk up to tap k plus every head up to k, fvcore), for resann50 (resnet50 ``--every 2``)
    at 3×224×224 and a CIFAR ResANN (cifar_resnet_n7_c16, a head after every unit) at 3×32×32, batch 1,
    eval mode, no_grad. All k are timed round-robin in the same rounds (order rotated each round), so
    load drift on this shared machine hits every k alike; median and IQR over the rounds.
overhead: ``AnytimeRunner`` stepping through every segment with no head computed (an
    ``EANNRuntime`` of one member whose only used output is the last) against the timm model's own
    ``forward`` with the same weights (outputs checked equal), interleaved A/B pairs, median of the
    per-pair ratios and their IQR.
early_exit: a CIFAR ResANN (cifar_resnet_n7_c16) trained on digits with AdaLoss (``--epochs``,
    reused from ``--run`` when it holds a finished run), then ``budget_curve``: temperatures and
    thresholds fit on validation, accuracy and average FLOPs on test. For a few budgets, the wall
    time of batched ``early_exit`` on the whole test set against the full anytime network
    (every output) and the plain timm model, interleaved pairs: measured speed-up beside the FLOP
    reduction.

Usage::

    python -m benchmarks.bench_runtime
    python -m benchmarks.bench_runtime --parts overhead --threads 1 --repeats 30

Prints Markdown and writes ``benchmarks/results/runtime.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch

import annify
from benchmarks._common import (
    RESULTS,
    RunDir,
    build_datasets,
    build_loaders,
    cell,
    command,
    default_placement,
    evaluate,
    exit_flops,
    format_flops,
    interleaved,
    load_average,
    machine,
    machine_line,
    model_pair,
    paired_ratio,
    ratios,
    set_threads,
    spread,
    summary,
    table,
    write_text,
)

CIFAR = "cifar_resnet_n7_c16"


# --------------------------------------------------------------------------- latency per output


def latency(label: str, net, repeats: int) -> tuple[str, dict]:
    spec = net.spec
    flops = exit_flops(net)
    x = torch.randn(1, *spec.input_size)
    fns = {k: (lambda k=k: net.forward_until(x, k)) for k in range(1, net.num_outputs + 1)}
    with torch.no_grad():
        times = interleaved(fns, repeats=repeats, warmup=2)
    full = statistics.median(times[net.num_outputs])
    rows, data = [], []
    for k in range(1, net.num_outputs + 1):
        ms = [1000 * t for t in times[k]]
        med = statistics.median(ms)
        f = flops[k - 1]
        rows.append(
            [k, spec.heads[k - 1].node, format_flops(f), f"{f / flops[-1]:.3f}", f"{med:.2f}", spread(summary(ms), 2, min_max=False),
             f"{med / 1000 / full:.3f}", f"{f / med / 1e6:.2f}"]
        )  # fmt: skip
        data.append({"output": k, "flops": f, "median_ms": med, "times_ms": ms})
    header = ["output", "node", "FLOPs", "FLOP fraction", "median ms", "spread ms", "time fraction"]
    header.append("GFLOP/s (multiply-adds)")
    title = f"**{label}**, batch 1, {repeats} rounds (all outputs round-robin in each round)"
    return f"{title}\n\n{table(header, rows)}", {"label": label, "rows": data}


# --------------------------------------------------------------------------- segmented runtime overhead


def overhead(label: str, plain, net, batch: int, repeats: int) -> list[object]:
    used = [[False] * (net.num_outputs - 1) + [True]]
    runner = annify.AnytimeRunner(annify.EANNRuntime([net], used))
    x = torch.randn(batch, *net.spec.input_size)
    with torch.no_grad():
        assert torch.equal(runner.run(x).logits, plain(x)), "segmented output differs from the timm model's"
        result = paired_ratio(lambda: runner.run(x), lambda: plain(x), repeats=repeats, warmup=3)
    return [
        label, batch, net.num_outputs - 1, f"{1000 * result.median_b:.2f}", f"{1000 * result.median_a:.2f}",
        f"{result.median:.3f}", spread(result.summary, 3, min_max=False), result.repeats,
    ]  # fmt: skip


# --------------------------------------------------------------------------- early exit


def _digits_net(run: Path, epochs: int):
    """A digits-trained CIFAR ResANN: the finished run in ``run``, else trained there now."""
    folder = RunDir(run)
    if folder.anytime_json.is_file() and folder.last.is_dir():
        return annify.load(folder.config, folder.last).eval(), f"reused {run}"
    spec = annify.convert(CIFAR, every=default_placement(CIFAR)["every"], input_size=(3, 32, 32))[1]
    tic = time.perf_counter()
    result = annify.train(spec, out=run, data="digits", epochs=epochs, device="cpu", log=lambda *_: None)
    how = f"trained now: {epochs} epochs, AdaLoss, {time.perf_counter() - tic:.0f} s, into {run}"
    return result.net.eval(), how


def early_exit_part(run: Path, epochs: int, repeats: int) -> tuple[str, dict]:
    net, how = _digits_net(run, epochs)
    spec = net.spec
    flops = exit_flops(net)
    plain_flops = spec.heads[-1].flops_single
    datasets = build_datasets("digits", input_size=spec.input_size, augment=False)
    n_test = len(datasets["test"])
    loaders = build_loaders({s: datasets[s] for s in ("val", "test")}, n_test)  # the test set is one batch
    test = evaluate(net, loaders["test"])
    targets = [f * flops[-1] for f in (0.2, 0.3, 0.4, 0.5, 0.6, 0.8)]
    curve = annify.budget_curve(net, loaders["val"], loaders["test"], targets)
    x, y = next(iter(loaders["test"]))
    plain = annify.plain_model(net)

    rows = []
    for k, f in enumerate(flops):  # each output alone, for reference
        rows.append([k + 1, spec.heads[k].node, format_flops(f), f"{f / flops[-1]:.3f}", f"{100 * (1 - test.errors[k]):.2f}"])  # fmt: skip
    curve_rows = []
    for r in curve:
        curve_rows.append(
            [format_flops(r["target_flops"]), format_flops(r["avg_flops"]), f"{r['avg_flops'] / flops[-1]:.3f}",
             f"{100 * r['accuracy']:.2f}", format_flops(r["val_avg_flops"])]
        )  # fmt: skip

    timing_rows = []
    with torch.no_grad():
        for r in [curve[0], curve[2], curve[4]]:
            th, temps = r["thresholds"], r["temperatures"]
            t = interleaved(
                {"exit": lambda th=th, temps=temps: annify.early_exit(net, x, th, temps), "anytime": lambda: net(x),
                 "plain": lambda: plain(x)},
                repeats=repeats, warmup=2,
            )  # fmt: skip
            vs_any, vs_plain = ratios(t["anytime"], t["exit"]), ratios(t["plain"], t["exit"])
            timing_rows.append(
                [format_flops(r["avg_flops"]), f"{1000 * statistics.median(t['exit']):.1f}",
                 f"{1000 * statistics.median(t['anytime']):.1f}", f"{1000 * statistics.median(t['plain']):.1f}",
                 f"{flops[-1] / r['avg_flops']:.2f}×", cell(vs_any, 2, "×"),
                 f"{plain_flops / r['avg_flops']:.2f}×", cell(vs_plain, 2, "×")]
            )  # fmt: skip
    text = "\n\n".join(
        [
            f"**{spec.name}** on digits (3×8×8, {net.num_outputs} outputs), {how}. Full anytime cost "
            f"{format_flops(flops[-1])} FLOPs per image (every head), the plain model {format_flops(plain_flops)}.",
            "Each output alone (test accuracy):\n\n"
            + table(["output", "node", "FLOPs", "fraction", "test acc %"], rows),
            "Budgeted batch classification (`budget_curve`: temperatures and thresholds fit on validation, "
            f"{len(datasets['val'])} images; scored on test, {n_test} images):\n\n"
            + table(
                ["target FLOPs", "avg FLOPs (test)", "fraction", "test acc %", "avg FLOPs (val)"], curve_rows
            ),
            f"Wall clock on the whole test set as one batch ({n_test} images), {repeats} rounds of early exit, "
            "full anytime network (every output) and the plain timm model, order rotated each round; "
            "speed-up = the per-round time ratio, median (IQR):\n\n"
            + table(
                [
                    "avg FLOPs",
                    "early exit ms",
                    "anytime ms",
                    "plain ms",
                    "FLOP reduction vs anytime",
                    "measured speed-up vs anytime",
                    "FLOP reduction vs plain",
                    "measured speed-up vs plain",
                ],
                timing_rows,
            ),  # fmt: skip
        ]
    )
    return text, {"curve": curve, "timing": timing_rows}


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="latency,overhead,early_exit")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)"
    )
    parser.add_argument("--repeats", type=int, default=25, help="timed rounds per measurement (default 25)")
    parser.add_argument(
        "--run", default="runs/bench_runtime/cifar_resann_n7_c16", help="digits run for early_exit"
    )
    parser.add_argument("--epochs", type=int, default=10, help="epochs when early_exit trains its network")
    parser.add_argument("--out", default=str(RESULTS / "runtime.md"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    set_threads(args.threads)
    parts = args.parts.split(",")
    load_before = load_average()
    tic = time.perf_counter()
    sections = []
    nets = {}
    if {"latency", "overhead"} & set(parts):
        nets["resann50"] = model_pair("resnet50", every=2, input_size=(3, 224, 224))
        nets["cifar"] = model_pair(CIFAR, every=1, input_size=(3, 32, 32))
    if "latency" in parts:
        text = ["## Latency per output against FLOPs", ""]
        for key, label in (("resann50", "resann50 (resnet50 --every 2) at 3×224×224"),
                           ("cifar", f"{CIFAR} (--every 1) at 3×32×32")):  # fmt: skip
            section, _ = latency(label, nets[key][1], args.repeats)
            text += [section, ""]
            print(section, "\n", flush=True)
        sections.append("\n".join(text))
    if "overhead" in parts:
        rows = [
            overhead("resann50 at 3×224×224", *nets["resann50"], 1, args.repeats),
            overhead(f"{CIFAR} at 3×32×32", *nets["cifar"], 1, args.repeats),
            overhead(f"{CIFAR} at 3×32×32", *nets["cifar"], 64, args.repeats),
        ]
        header = [
            "network",
            "batch",
            "cuts",
            "timm forward ms",
            "segmented ms",
            "ratio (median)",
            "ratio spread",
            "pairs",
        ]
        section = (
            "## Segmented runtime overhead\n\n`AnytimeRunner` stepping through every segment, no head computed "
            "(an `EANNRuntime` of one member whose only used output is the last), against the timm model's "
            "`forward` with the same weights (outputs checked `torch.equal`); interleaved A/B pairs, ratio = "
            "segmented / timm within each pair.\n\n" + table(header, rows)
        )
        print(section, "\n", flush=True)
        sections.append(section)
    if "early_exit" in parts:
        text, _ = early_exit_part(Path(args.run), args.epochs, args.repeats)
        section = "## Early exit on digits\n\n" + text
        print(section, "\n", flush=True)
        sections.append(section)
    info = machine()
    head = [
        "# Anytime inference on CPU: latency per output, segmented-runtime overhead, early exit",
        "",
        machine_line(info),
        "",
        f"Command: `{command()}` (torch threads: {info['threads']}); took {time.perf_counter() - tic:.0f} s. "
        f"Load average (1/5/15 min) before: {load_before}, after: {info['load_average_1_5_15']} — the machine "
        "is shared with other jobs, so absolute times are noisy; the ratios are taken within a round.",
        "",
    ]
    write_text(args.out, "\n".join(head) + "\n" + "\n\n".join(sections) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
