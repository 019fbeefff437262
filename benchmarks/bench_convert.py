"""What converting costs: conversion time, the run-time overhead of computing every output, and the
time to stop early with ``forward_until``.

Parts (``--parts a,b,c,d``):

a. time of ``convert(name, heads=4)`` against ``timm.create_model(name)`` alone, interleaved;
b. the converted network computing every output against the plain timm model, same batch,
   interleaved; compared with the target ``1 + heads' FLOP share + 0.03``;
c. ``forward_until(x, k)`` for each k against the full forward, next to output k's FLOP fraction;
d. the traced FX graph alone (no cuts, no heads) against eager timm, and the same graph with its
   residual adds made in-place again (torch.fx records ``x += y`` as an out-of-place add).

Parts e (counting with each segment's modules against the whole network) and f (annify's tracer
against torchvision's NodePathTracer), and part a's "before" column, swapped annify's private
functions for their earlier versions; they went with issue 19 (benchmarks on the public API). Their
numbers stay in BENCHMARKS.md; commit 7ccb1a1 reruns them.

Usage::

    python -m benchmarks.bench_convert                   # everything, as in BENCHMARKS.md
    python -m benchmarks.bench_convert --parts b --threads 1 --batch 4

Results are printed as Markdown and written to ``benchmarks/results/convert.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import operator
import warnings

import torch

import annify
from benchmarks._common import (
    RESULTS,
    Paired,
    command,
    heads_share,
    interleaved,
    machine,
    machine_line,
    model_pair,
    paired_ratio,
    set_threads,
    table,
    write_json,
)

CONVERT_MODELS = ["resnet50", "vit_small_patch16_224", "convnext_tiny"]
# (model, placement, label): the paper's ResANN50 and an evenly spaced ViT
OVERHEAD_CASES = [
    ("resnet50", {"every": 2}, "--every 2"),
    ("vit_small_patch16_224", {"heads": 4}, "--heads 4"),
]


def part_a(repeats: int, models: list[str]) -> dict:
    import timm

    rows, out = [], {}
    for name in models:
        t = interleaved(
            {
                "convert": lambda name=name: annify.convert(name, heads=4),
                "create_model": lambda name=name: timm.create_model(name, pretrained=False),
            },
            repeats,
            warmup=1,
        )
        p = Paired(t["convert"], t["create_model"])
        out[name] = p.as_dict()
        rows.append(
            [name, f"{p.median_a:.2f}", f"{p.median_b:.2f}", f"{p.median:.1f}", p.spread(), p.repeats]
        )
    print("\n### a. Conversion time, `convert(name, heads=4)` vs `timm.create_model(name)`\n")
    header = ["model", "convert (s)", "create_model (s)", "convert / create_model", "spread", "rounds"]
    print(table(header, rows))
    return out


def _segments_only(net, x):
    """Every segment, no heads: the cut-up trunk alone."""
    state = (x,)
    for j in range(net.num_outputs):
        state, _ = net.run_segment(j, state, head=False)


def part_b(batch: int, repeats: int, threads: list[int]) -> dict:
    """Anytime vs plain, timed round-robin with two diagnostics in the same rounds.

    ``segments`` runs the cut-up trunk without heads (the cost of cutting); ``heads`` runs the heads
    alone on features computed beforehand (the cost of the heads, which FLOPs undercount: BatchNorm,
    ReLU and pooling over large early feature maps are memory-bound).
    """
    rows, out = [], {}
    for name, placement, label in OVERHEAD_CASES:
        plain, net = model_pair(name, **placement)
        x = torch.randn(batch, *net.input_size)
        plain_flops, last_flops, share = heads_share(net.spec)
        target = 1 + share + 0.03
        with torch.no_grad():
            feats, state = [], (x,)
            for j in range(len(net.exits)):
                state, f = net.run_segment(j, state, head=False)
                feats.append(f)
        fns = {
            "anytime": lambda net=net, x=x: net(x),
            "plain": lambda plain=plain, x=x: plain(x),
            "segments": lambda net=net, x=x: _segments_only(net, x),
            "heads": lambda net=net, feats=feats: [h(f) for h, f in zip(net.exits, feats, strict=True)],
        }
        for th in threads:
            set_threads(th)
            with torch.no_grad():
                t = interleaved(fns, repeats, warmup=3)
            p = Paired(t["anytime"], t["plain"])
            seg = Paired(t["segments"], t["plain"])
            hd = Paired(t["heads"], t["plain"])
            key = f"{name} {label} threads={th}"
            out[key] = {
                **p.as_dict(),
                "segments_over_plain": seg.as_dict(),
                "heads_over_plain": hd.as_dict(),
                "outputs": net.num_outputs,
                "plain_flops": plain_flops,
                "anytime_flops": last_flops,
                "heads_share": share,
                "target": target,
                "meets_target": p.median <= target,
            }
            rows.append(
                [
                    f"{name} {label}",
                    th,
                    net.num_outputs,
                    f"{p.median_a * 1e3:.0f}",
                    f"{p.median_b * 1e3:.0f}",
                    f"**{p.median:.3f}**",
                    p.spread(),
                    p.repeats,
                    f"{share * 100:.2f}%",
                    f"{target:.3f}",
                    "yes" if p.median <= target else "no",
                    f"{seg.median:.3f}",
                    f"{hd.median:.3f}",
                ]
            )
    print(f"\n### b. Every output vs the plain timm model (batch {batch}, eval, `torch.no_grad`)\n")
    header = [
        "model",
        "threads",
        "outputs",
        "anytime (ms)",
        "plain (ms)",
        "median ratio",
        "spread",
        "repeats",
        "heads' FLOP share",
        "target",
        "met",
        "segments alone / plain",
        "heads alone / plain",
    ]
    print(table(header, rows))
    return out


def part_c(batch: int, repeats: int, threads: int) -> dict:
    set_threads(threads)
    _, net = model_pair("resnet50", every=2)
    spec = net.spec
    x = torch.randn(batch, *net.input_size)
    rows, out = [], {}
    with torch.no_grad():
        for k in range(1, net.num_outputs + 1):
            p = paired_ratio(lambda k=k: net.forward_until(x, k), lambda: net(x), repeats, warmup=2)
            frac = spec.heads[k - 1].fraction
            out[k] = {**p.as_dict(), "flop_fraction": frac, "node": spec.heads[k - 1].node}
            rows.append(
                [
                    k,
                    f"`{spec.heads[k - 1].node}`",
                    f"{frac:.3f}",
                    f"{p.median_a * 1e3:.0f}",
                    f"**{p.median:.3f}**",
                    p.spread(),
                    p.repeats,
                ]
            )
    print(
        f"\n### c. `forward_until(x, k)` vs the full forward, resnet50 --every 2 (batch {batch}, {threads} threads)\n"
    )
    print(table(["k", "tap", "FLOP fraction", "time (ms)", "time fraction", "spread", "repeats"], rows))
    return out


def _inplace_residual_adds(graph: torch.fx.Graph) -> int:
    """Turn ``a + b`` into ``a.add_(b)`` where ``a`` has no other user: what timm's ``x += shortcut`` was.

    torch.fx records ``x += shortcut`` on a Proxy as an out-of-place ``add`` (a Proxy has no
    ``__iadd__``), so every residual sum allocates a fresh tensor. Returns how many were changed.
    """

    def shape(node):
        meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
        return tuple(meta.shape) if hasattr(meta, "shape") else None

    changed = 0
    for n in graph.nodes:
        first = n.args[0] if n.args else None
        if (
            n.op == "call_function"
            and n.target is operator.add
            and isinstance(first, torch.fx.Node)
            and first.op in ("call_module", "call_function", "call_method")  # never a parameter or input
            and len(first.users) == 1
            and shape(first) is not None
            and shape(first) == shape(n)  # no broadcasting into the left operand
        ):
            n.op, n.target = "call_method", "add_"
            changed += 1
    graph.lint()
    return changed


def part_d(batch: int, repeats: int, threads: int) -> dict:
    """Where the trunk's overhead comes from: the plain FX graph of the timm model (no cuts, no heads)
    against eager timm, and the same graph with its residual adds made in-place again."""
    set_threads(threads)
    out, rows = {}, []
    for name in ("resnet50", "convnext_tiny"):
        plain = annify.create_model(name).eval()
        traced = annify.trace(plain, (3, 224, 224), train_graph=False)
        gm = torch.fx.GraphModule(plain, traced.eval_graph).eval()
        graph = copy.deepcopy(traced.eval_graph)
        n_inplace = _inplace_residual_adds(graph)
        gm_inplace = torch.fx.GraphModule(plain, graph).eval()
        x = torch.randn(batch, 3, 224, 224)
        with torch.no_grad():
            same = torch.equal(gm(x), plain(x)) and torch.equal(gm_inplace(x), plain(x))
            t = interleaved(
                {
                    "eager": lambda p=plain, x=x: p(x),
                    "fx": lambda g=gm, x=x: g(x),
                    "fx_inplace": lambda g=gm_inplace, x=x: g(x),
                },
                repeats,
                warmup=2,
            )
        fx_ratio, fx_in = Paired(t["fx"], t["eager"]), Paired(t["fx_inplace"], t["eager"])
        out[name] = {
            "fx/eager": fx_ratio.as_dict(),
            "fx_inplace/eager": fx_in.as_dict(),
            "adds_made_inplace": n_inplace,
            "equal": same,
        }
        rows.append(
            [
                name,
                f"{fx_ratio.median_b * 1e3:.0f}",
                f"**{fx_ratio.median:.3f}**",
                fx_ratio.spread(),
                n_inplace,
                f"**{fx_in.median:.3f}**",
                fx_in.spread(),
                repeats,
                same,
            ]
        )
    print(f"\n### d. The FX graph alone vs eager timm (batch {batch}, {threads} thread(s))\n")
    header = [
        "model",
        "eager (ms)",
        "FX graph / eager",
        "spread",
        "adds made in-place",
        "FX in-place / eager",
        "spread",
        "repeats",
        "outputs equal",
    ]
    print(table(header, rows))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="a,b,c,d")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20, help="interleaved pairs for parts b and c")
    ap.add_argument("--convert-repeats", type=int, default=20, help="interleaved rounds for part a")
    ap.add_argument("--convert-models", default=",".join(CONVERT_MODELS), help="models for part a")
    ap.add_argument("--threads", default="1,2", help="torch threads for part b (comma-separated)")
    ap.add_argument("--c-threads", type=int, default=1, help="torch threads for parts c and d")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    parts = set(args.parts.split(","))
    threads = [int(t) for t in args.threads.split(",")]
    path = RESULTS / "convert.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    set_threads(max(threads))
    print(machine_line())
    runs = {  # part -> (settings recorded with it, the measurement)
        "a": lambda: ({}, part_a(args.convert_repeats, args.convert_models.split(","))),
        "b": lambda: ({"batch": args.batch}, part_b(args.batch, args.repeats, threads)),
        "c": lambda: (
            {"batch": args.batch, "threads": args.c_threads},
            part_c(args.batch, args.repeats, args.c_threads),
        ),
        "d": lambda: (
            {"batch": args.batch, "threads": args.c_threads},
            part_d(args.batch, args.repeats, args.c_threads),
        ),
    }
    for part in "abcd":
        if part in parts:
            settings, res = runs[part]()
            result[part] = {"command": command(), "machine": machine(), **settings, "results": res}
            write_json(path, result)  # each part kept as soon as it is measured


if __name__ == "__main__":
    main()
