"""The paper head's own cost, in eval and in training (issue 10, items 1 and 2).

Parts (``--parts eval,train``):

eval: resann50's seven paper heads (BatchNorm → ReLU → mean over H×W → linear). In eager PyTorch
    the head makes three passes over its full-resolution map (BatchNorm writes it, ReLU rewrites it,
    the mean reads it); ``torch.compile`` of the same module (inductor, C++ on the CPU) fuses them
    into one reading pass. For each of resnet50 --every 2's seven heads, the tap's feature map at
    batch ``--batch`` (random images, timm's initialisation) is stored; then, interleaved in each
    round (order rotating), every head runs eager (as annify runs it in eval without autograd:
    BatchNorm-ReLU-mean over cache-sized slices of the batch), eager over the whole batch at once
    (the eval path before slicing; same logits, checked exactly), compiled and as a bare mean (the
    floor). The compiled heads give the eager ones' logits to float rounding (checked before
    timing). Needs a C++ compiler for inductor.
train: one paper head in training, forward + backward of BatchNorm (batch statistics), ReLU, mean
    and linear on a stored map that requires grad, with the fused operation
    (``annify.heads._BatchNormReLUPool``) against autograd's chain (``heads.unfused()``),
    interleaved, on the maps of the CIFAR network of §8 (cifar_resnet_n7_c16 at batch 64) and of
    resnet50 --every 2 at batch 8, plus a smaller map. Below ``heads.FUSED_MIN_NUMEL`` values both
    columns run the chain (the row then shows the timing noise).

Usage::

    python -m benchmarks.bench_heads --repeats 30
    python -m benchmarks.bench_heads --parts train --repeats 20

Results: printed as Markdown and written to ``benchmarks/results/heads.json`` (one key per part).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

import benchmarks._common as common
from benchmarks._common import (
    RESULTS,
    cell,
    command,
    heads,
    heads_whole_batch,
    interleaved,
    machine,
    machine_line,
    model_pair,
    ratios,
    set_threads,
    table,
    write_json,
)


def eval_part(args, memory: str) -> dict:
    net = model_pair("resnet50", every=2, input_size=(3, 224, 224), num_classes=1000)[1]
    x = torch.randn(args.batch, 3, 224, 224)
    feats, state = [], (x,)
    with torch.no_grad():
        for j in range(net.num_outputs - 1):
            state, feat = net.run_segment(j, state, head=False)
            feats.append(feat.clone())
        started = time.perf_counter()
        compiled = [torch.compile(h, dynamic=False) for h in net.exits]
        for h, c, f in zip(net.exits, compiled, feats, strict=True):
            torch.testing.assert_close(c(f), h(f), rtol=1e-4, atol=1e-4)
        compile_s = time.perf_counter() - started

        def run(heads):
            return lambda: [h(f) for h, f in zip(heads, feats, strict=True)]

        def whole_batch():  # eager, every map at once (the eval path before it pooled in slices)
            with heads_whole_batch():
                return [h(f) for h, f in zip(net.exits, feats, strict=True)]

        def means():
            return [f.mean((2, 3)) for f in feats]

        for got, want in zip(run(net.exits)(), whole_batch(), strict=True):
            assert torch.equal(got, want)  # slicing the batch changes no value
        t = interleaved(
            {"eager": run(net.exits), "whole batch": whole_batch, "compiled": run(compiled), "mean": means},
            args.repeats,
        )
    rows, out = [], {}
    for name in ("eager", "whole batch", "compiled", "mean"):
        ratio = ratios(t[name], t["eager"])
        rows.append([name, f"{statistics.median(t[name]) * 1e3:.2f}", cell(ratio), args.repeats])
        out[name] = {"times_s": t[name], "ratio_to_eager": ratio}
    out["compile_and_check_s"] = compile_s
    out["shapes"] = [list(f.shape) for f in feats]
    print(
        f"\n### resann50's seven paper heads in eval, batch {args.batch} ({args.threads} thread(s), {memory})\n"
    )
    print(
        f"Maps: {', '.join('×'.join(map(str, f.shape)) for f in feats)}; compiling and checking took {compile_s:.0f} s.\n"
    )
    print(table(["heads", "all seven, median ms", "/ eager (per-round ratio)", "rounds"], rows))
    return out


# (label, map shape): cifar_resnet_n7_c16's three stages at batch 64, resnet50 --every 2's maps at
# batch 8, and a map below the size where the fusion starts (heads.FUSED_MIN_NUMEL = 2^19 values)
TRAIN_MAPS = [
    ("cifar stage 1", (64, 16, 32, 32)),
    ("cifar stage 2", (64, 32, 16, 16)),
    ("cifar stage 3", (64, 64, 8, 8)),
    ("resnet50 layer1", (8, 256, 56, 56)),
    ("resnet50 layer2", (8, 512, 28, 28)),
    ("resnet50 layer3", (8, 1024, 14, 14)),
    ("resnet50 layer4", (8, 2048, 7, 7)),
    ("2^17 values", (32, 64, 8, 8)),
]


def train_part(args, memory: str) -> dict:
    rows, out = [], {}
    for label, shape in TRAIN_MAPS:
        torch.manual_seed(0)
        head = heads.build("bn_relu_pool_linear", shape[1], 10, "NCHW").train()
        x = (torch.randn(shape) * 2 + 0.5).requires_grad_()
        g = torch.randn(shape[0], 10)

        def step(x=x, head=head, g=g):
            x.grad = None
            head.zero_grad(set_to_none=True)
            head(x).backward(g)

        def chain(step=step):
            with heads.unfused():
                step()

        t = interleaved({"fused": step, "chain": chain}, args.repeats)
        ratio = ratios(t["fused"], t["chain"])
        fused = x.numel() >= heads.FUSED_MIN_NUMEL
        rows.append(
            [
                label,
                "×".join(map(str, shape)),
                "yes" if fused else "no (below the size)",
                f"{statistics.median(t['chain']) * 1e3:.2f}",
                f"{statistics.median(t['fused']) * 1e3:.2f}",
                cell(ratio),
            ]
        )
        out[label] = {"shape": list(shape), "fused": fused, "times_s": t, "ratio": ratio}
    print(f"\n### One paper head in training, forward + backward ({args.threads} thread(s), {memory})\n")
    print(
        table(
            [
                "map",
                "shape",
                "fused",
                "chain, median ms",
                "annify's head, median ms",
                "annify / chain (per round)",
            ],
            rows,
        )
    )
    return out


PARTS = {"eval": eval_part, "train": train_part}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="eval,train")
    ap.add_argument("--batch", type=int, default=8, help="eval: the batch of resann50's maps")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    common.cpu_memory_option(ap)
    args = ap.parse_args()
    parts = args.parts.split(",")
    if unknown := sorted(set(parts) - set(PARTS)):
        ap.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    warnings.simplefilter("ignore")
    set_threads(args.threads)
    memory = common.set_cpu_memory(args.cpu_memory)
    print(machine_line(), memory)
    path = RESULTS / "heads.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    for part in parts:
        out = PARTS[part](args, memory)
        out.update({"command": command(), "machine": machine(), "cpu_memory": memory})
        result[part] = out
    write_json(path, result)


if __name__ == "__main__":
    main()
