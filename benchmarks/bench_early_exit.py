"""Budgeted batch early exit at batch 64: does the wall clock shrink as much as the FLOPs do?

For each network, ``early_exit(net, x, thresholds)`` on one batch of 64 images and the full anytime
network computing every output run interleaved (20+ rounds, order alternating); the speed-up is
the per-round time ratio full / early exit, set beside the FLOP reduction that batch realised
(full anytime FLOPs / mean per-sample FLOPs of the exits taken, ``annify.cost.exit_flops``). The
goal (issue 10, item 6) is a speed-up of at least 0.75 × the FLOP reduction.

The networks carry timm's random initialisation and the images are Gaussian noise: what is timed is
the work done for a given pattern of exits, not accuracy. The thresholds are fit with
``fit_thresholds`` (MSDNet's geometric schedule) on the network's own softmax outputs for a separate
noise batch, so that the average FLOPs hit ``full / --reductions``; the timed batch then realises
its own reduction, which is the one reported.

Diagnostic, from the same rounds: the full forward is run segment by segment with a clock around
each segment (the same calls as ``net(x)``), and *segment-time bound* is the speed-up early exit
would get if each sample cost what its segments cost per sample at batch 64 (no exit bookkeeping,
no change of efficiency as the batch shrinks). Where that bound is below 0.75 × the FLOP reduction,
time per FLOP differs between segments and no bookkeeping fix can meet the goal. After the rounds,
each policy's early exit runs ``--repeats`` more times with a clock around every segment inside it:
the batch each segment ran at, its median time, and what is left (the exit bookkeeping).

With ``--stream N`` each round also classifies N batches of 64 (the timed one and N − 1 more noise
batches) with ``early_exit_stream``, which pools the samples still undecided across batches, against the
full forward on each of the N batches; its FLOP reduction is the one realised over all N·64 samples,
and the script prints the batch of every segment call the stream made.

With ``--freeze`` both the full forward and the early exit run ``annify.freeze(net)`` (the same outputs
bit for bit, so the same thresholds and exits), and each round also runs the unfrozen network's
``net(x)``: the frozen full forward's speed against it is printed too. The full forward runs under
``torch.inference_mode``, as ``early_exit`` does (before 2026-12-07: ``no_grad``).

Usage::

    python -m benchmarks.bench_early_exit                       # both networks, as in BENCHMARKS.md
    python -m benchmarks.bench_early_exit --nets cifar --repeats 20 --reductions 4.6,2.5
    python -m benchmarks.bench_early_exit --nets cifar --repeats 40 --channels-last --cpu-memory keep --stream 8
    python -m benchmarks.bench_early_exit --nets cifar --repeats 40 --channels-last --cpu-memory keep --freeze

Results are printed as Markdown and written to ``benchmarks/results/early_exit.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

import annify
import benchmarks._common as common
from benchmarks._common import (
    RESULTS,
    command,
    exit_flops,
    interleaved,
    machine,
    machine_line,
    model_pair,
    ratios,
    set_threads,
    spread,
    summary,
    table,
    write_json,
)

# label: (timm model, placement, input size, classes, noise images for fitting the thresholds)
NETS = {
    "resann50": ("resnet50", {"every": 2}, (3, 224, 224), 1000, 64),
    "cifar": ("cifar_resnet_n7_c16", {"every": 1}, (3, 32, 32), 10, 512),
}
GOAL = 0.75


def _timed_segments(net, x, seg_times: list[list[float]]) -> list:
    """``net(x)`` under ``torch.inference_mode`` (as ``early_exit`` runs), segment by segment with the
    state handed over (what ``run_segments`` does), appending each segment's time."""
    state, outs = [x], []
    with torch.inference_mode():
        for j in range(net.num_outputs):
            t0 = time.perf_counter()
            carried, out = net.run_segment(j, state)
            seg_times[j].append(time.perf_counter() - t0)
            state = list(carried)
            del carried
            outs.append(out)
    return outs


def _full(net, x) -> list:
    with torch.inference_mode():
        return net(x)


def _inside(net, x, thresholds, repeats: int) -> dict:
    """Where an early exit's time goes: each segment's batch and median time with a clock around
    ``run_segment`` inside ``early_exit``, and the rest (the exit bookkeeping), over ``repeats`` calls
    (run after the interleaved rounds, so the clock costs them nothing)."""
    real, seen = net.run_segment, {}

    def clocked(j, state, head=True):
        n = state[0].shape[0]  # read first: a state handed over as a list is emptied by the call
        t0 = time.perf_counter()
        out = real(j, state, head)
        seen.setdefault(j, []).append((n, time.perf_counter() - t0))
        return out

    totals = []
    net.run_segment = clocked
    try:
        with torch.no_grad():
            for _ in range(repeats):
                t0 = time.perf_counter()
                annify.early_exit(net, x, thresholds)
                totals.append(time.perf_counter() - t0)
    finally:
        del net.run_segment  # the instance attribute goes; the method is back
    segments = [
        {"segment": j, "batch": v[0][0], "median_s": statistics.median(t for _, t in v)}
        for j, v in sorted(seen.items())
    ]
    total = statistics.median(totals)
    return {
        "median_s": total,
        "segments": segments,
        "bookkeeping_s": total - sum(g["median_s"] for g in segments),
    }


def _stream_calls(net, xs, thresholds) -> list[tuple[int, int]]:
    """(segment, batch) of every segment call ``early_exit_stream`` makes over the batches ``xs``."""
    real, calls = net.run_segment, []

    def spy(j, state, head=True):
        calls.append((j, state[0].shape[0]))
        return real(j, state, head)

    net.run_segment = spy
    try:
        list(annify.early_exit_stream(net, xs, thresholds))
    finally:
        del net.run_segment
    return calls


def _summary(counts, realised, s, **extra) -> dict:
    """A policy's results for the JSON file: exits, FLOP reduction, speed-up stats ``s``, the goal's verdict."""
    eff = s["median"] / realised
    return {
        "exit_counts": counts,
        "flop_reduction": realised,
        "speed_up": s,
        "efficiency": eff,
        "meets_goal": eff >= GOAL,
        **extra,
    }


def _row(label, red, realised, full, early, s, bound_cell, counts) -> list:
    """A table row: the full and early-exit times (lists of per-round seconds), the speed-up stats ``s``."""
    eff = s["median"] / realised
    return [
        label,
        f"{red}",
        f"{realised:.2f}×",
        f"{statistics.median(full) * 1e3:.0f}",
        f"{statistics.median(early) * 1e3:.0f}",
        f"**{s['median']:.2f}×** ({spread(s, 2, min_max=False)})",
        f"**{eff:.3f}**",
        "yes" if eff >= GOAL else "no",
        bound_cell,
        len(full),
        " ".join(map(str, counts)),
    ]


def run_net(
    label: str,
    batch: int,
    repeats: int,
    reductions: list[float],
    channels_last: bool,
    stream: int = 0,
    freeze: bool = False,
) -> tuple[list[list], dict]:
    model, placement, size, classes, n_val = NETS[label]
    net = model_pair(model, input_size=size, num_classes=classes, **placement)[1]
    flops = exit_flops(net)
    gen = torch.Generator().manual_seed(1)
    val = torch.randn(n_val, *size, generator=gen)
    x = torch.randn(batch, *size, generator=gen)
    more = [torch.randn(batch, *size, generator=gen) for _ in range(stream - 1)]  # the stream's other batches
    if channels_last:
        net.to(memory_format=torch.channels_last)
        val, x, *more = (t.contiguous(memory_format=torch.channels_last) for t in (val, x, *more))
    xs = [x, *more]
    with torch.no_grad():
        outs = [torch.cat(o) for o in zip(*(net(c) for c in val.split(batch)), strict=True)]
    probs = [torch.softmax(o, dim=-1) for o in outs]
    unfrozen = net
    if freeze:  # the same outputs bit for bit (tests/test_freeze.py), so the same thresholds and exits
        net = annify.freeze(net)
    policies = {}
    for red in reductions:
        th = annify.early_exit.fit_thresholds(probs, flops[-1] / red, flops)
        with torch.no_grad():
            _, exits, per_sample = annify.early_exit(net, x, th)
        counts = torch.bincount(exits, minlength=net.num_outputs).tolist()
        policies[red] = (th, counts, flops[-1] / float(per_sample.mean()))
    seg_times: list[list[float]] = [[] for _ in range(net.num_outputs)]
    fns = {"full": lambda: _timed_segments(net, x, seg_times)}
    if freeze:  # the network before freezing, computing every output as a user calls it
        fns["full, not frozen"] = lambda: _full(unfrozen, x)
    for red, (th, _, _) in policies.items():
        fns[f"exit {red}"] = lambda th=th: annify.early_exit(net, x, th)
    streamed = {}
    if stream > 1:  # the same policies over `stream` batches, stragglers pooled across them
        fns["full stream"] = lambda: [net(b) for b in xs]
        for red, (th, _, _) in policies.items():
            with torch.no_grad():
                res = list(annify.early_exit_stream(net, xs, th))
            exits = torch.cat([e for _, e, _ in res])
            spent = float(torch.cat([f for _, _, f in res]).mean())
            counts = torch.bincount(exits, minlength=net.num_outputs).tolist()
            streamed[red] = (counts, flops[-1] / spent, _stream_calls(net, xs, th))
            fns[f"stream {red}"] = lambda th=th: list(annify.early_exit_stream(net, xs, th))
    with torch.no_grad():
        t = interleaved(fns, repeats, warmup=2)
    inside = {red: _inside(net, x, th, repeats) for red, (th, _, _) in policies.items()}
    warm = len(seg_times[0]) - repeats  # the warm-up rounds also ran the timed full forward
    per_round = [[s[warm + i] for s in seg_times] for i in range(repeats)]
    full_segments = [statistics.median(s[warm:]) for s in seg_times]  # each segment at the full batch
    rows, out = [], {"flops": flops, "batch": batch, "times_s": t, "full_segments_s": full_segments}
    for red, (th, counts, realised) in policies.items():
        speed = ratios(t["full"], t[f"exit {red}"])
        bound = []
        for segs in per_round:  # expected time if each sample paid its segments' per-sample time
            cum = list(torch.tensor(segs).cumsum(0))
            spent = sum(n * float(c) for n, c in zip(counts, cum, strict=True)) / batch
            bound.append(float(cum[-1]) / spent)
        s, b = summary(speed), summary(bound)
        out[f"reduction {red}"] = _summary(
            counts, realised, s, thresholds=th, segment_time_bound=b, inside_early_exit=inside[red]
        )
        bound_cell = f"{b['median']:.2f}× ({b['median'] / realised:.2f})"
        rows.append(_row(label, red, realised, t["full"], t[f"exit {red}"], s, bound_cell, counts))
    for red, (counts, realised, calls) in streamed.items():
        s = summary(ratios(t["full stream"], t[f"stream {red}"]))
        out[f"stream {stream} reduction {red}"] = _summary(
            counts, realised, s, batches=stream, segment_calls=calls
        )
        rows.append(
            _row(
                f"{label}, stream of {stream}",
                red,
                realised,
                t["full stream"],
                t[f"stream {red}"],
                s,
                "",
                counts,
            )
        )
    return rows, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nets", default="cifar,resann50")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reductions", default="4.6,2.5", help="target FLOP reductions (full / average)")
    ap.add_argument("--channels-last", action="store_true", help="network and images in channels-last format")
    ap.add_argument(
        "--freeze",
        action="store_true",
        help="time annify.freeze(net) (full forward and early exit), and its full forward against the "
        "network before freezing",
    )
    ap.add_argument(
        "--stream",
        type=int,
        default=0,
        help="also time early_exit_stream over this many batches against the full forward on each",
    )
    common.cpu_memory_option(ap)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    set_threads(args.threads)
    memory = common.set_cpu_memory(args.cpu_memory)
    settings = f"{'channels-last' if args.channels_last else 'contiguous'}, {memory}"
    if args.batch != 64:  # the results file keeps one entry per network and settings
        settings += f", batch {args.batch}"
    if args.freeze:
        settings += ", frozen"
    if args.stream > 1:
        settings += f", stream of {args.stream}"
    print(machine_line())
    print(settings)
    reductions = [float(r) for r in args.reductions.split(",")]
    rows, result = [], {"command": command(), "machine": machine()}
    for label in args.nets.split(","):
        r, res = run_net(
            label, args.batch, args.repeats, reductions, args.channels_last, args.stream, args.freeze
        )
        rows += r
        result[label] = res
        print(f"{label} done", flush=True)
    print(
        f"\n### Early exit at batch {args.batch} against every output ({args.threads} thread(s), {settings})\n"
    )
    header = [
        "network",
        "target reduction",
        "FLOP reduction (realised)",
        "full ms",
        "early exit ms",
        "speed-up",
        "speed-up / FLOP reduction",
        f">= {GOAL}",
        "segment-time bound (/ FLOP reduction)",
        "rounds",
        "samples exiting at each output",
    ]
    print(table(header, rows))
    print("\nInside each early exit (a clock around every segment; median of the calls):\n")
    for label in args.nets.split(","):
        full = result[label]["full_segments_s"]
        print(
            f"- {label}, the full forward at batch {args.batch}, per sample: "
            + " ".join(f"{t / args.batch * 1e3:.3f}" for t in full)
            + " ms per segment"
        )
        if "full, not frozen" in result[label]["times_s"]:
            t = result[label]["times_s"]
            s = summary(ratios(t["full, not frozen"], t["full"]))
            print(
                f"- {label}, the frozen network's full forward against the network before freezing: "
                f"**{s['median']:.3f}×** as fast ({spread(s, 3)}, {len(t['full'])} rounds)"
            )
        for key, res in result[label].items():
            if key.startswith("stream"):
                calls = " ".join(f"{j}:{b}" for j, b in res["segment_calls"])
                print(f"- {label}, {key}: segment calls as segment:batch {calls}")
            if not key.startswith("reduction"):
                continue
            ins = res["inside_early_exit"]
            segs = " ".join(f"{g['batch']}:{g['median_s'] * 1e3:.2f}" for g in ins["segments"])
            print(
                f"- {label}, {key}: {ins['median_s'] * 1e3:.1f} ms in all, exit bookkeeping "
                f"{ins['bookkeeping_s'] * 1e3:.1f} ms ({ins['bookkeeping_s'] / ins['median_s']:.0%}); "
                f"segments as batch:ms {segs}"
            )
    after = machine()
    path = RESULTS / "early_exit.json"  # one entry per network and settings: a run keeps the others
    kept = json.loads(path.read_text()) if path.is_file() else {}
    kept.update(
        {
            f"{label} ({settings})": {
                **result[label],
                "command": result["command"],
                "machine": result["machine"],
                "machine_after": after,
                "channels_last": args.channels_last,
                "cpu_memory": args.cpu_memory,
                "frozen": args.freeze,
            }
            for label in args.nets.split(",")
        }
    )
    write_json(path, kept)


if __name__ == "__main__":
    main()
