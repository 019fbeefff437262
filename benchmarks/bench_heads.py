"""The paper head in eval, eager against one compiled pass, on resann50's seven tap maps (issue 10, item 1).

The paper head (BatchNorm → ReLU → mean over H×W → linear) in eager PyTorch makes three passes over
its full-resolution map (BatchNorm writes it, ReLU rewrites it, the mean reads it). ``torch.compile``
of the same module (inductor, C++ on the CPU) fuses them into one reading pass. This script measures
how far each is from the floor, a mean alone over the same maps, to say what a compiled head would
save in the every-output forward of section 13a.

For each of resnet50 --every 2's seven heads, the tap's feature map at batch ``--batch`` (random
images, timm's initialisation) is stored; then, interleaved in each round (order rotating), every
head runs eager (as annify runs it in eval without autograd: BatchNorm-ReLU-mean over cache-sized
slices of the batch), eager over the whole batch at once (the eval path before slicing; same logits,
checked exactly), compiled and as a bare mean. The compiled heads give the eager ones' logits to
float rounding (checked before timing). Needs a C++ compiler for inductor.

Usage::

    PYTHONPATH=. python benchmarks/bench_heads.py --repeats 20

Results: printed as Markdown and written to ``benchmarks/results/heads.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchmarks._timing as timing  # noqa: E402
from benchmarks._timing import _quantile, interleaved, machine, machine_line, set_threads, table  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    timing.cpu_memory_option(ap)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    set_threads(args.threads)
    memory = timing.set_cpu_memory(args.cpu_memory)
    print(machine_line(), memory)
    from annify import heads as annify_heads
    from annify.convert import convert

    torch.manual_seed(0)
    net, _, _ = convert("resnet50", input_size=(3, 224, 224), num_classes=1000, every=2)
    net.eval()
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
            keep, annify_heads._EVAL_SLICE_BYTES = annify_heads._EVAL_SLICE_BYTES, 1 << 62
            try:
                return [h(f) for h, f in zip(net.exits, feats, strict=True)]
            finally:
                annify_heads._EVAL_SLICE_BYTES = keep

        def means():
            return [f.mean((2, 3)) for f in feats]

        for got, want in zip(run(net.exits)(), whole_batch(), strict=True):
            assert torch.equal(got, want)  # slicing the batch changes no value
        t = interleaved(
            {"eager": run(net.exits), "whole batch": whole_batch, "compiled": run(compiled), "mean": means},
            args.repeats,
        )
    rows, out = [], {"command": " ".join(["python", *sys.argv]), "machine": machine(), "cpu_memory": memory}
    for name in ("eager", "whole batch", "compiled", "mean"):
        ratio = [a / b for a, b in zip(t[name], t["eager"], strict=True)]
        rows.append(
            [
                name,
                f"{statistics.median(t[name]) * 1e3:.2f}",
                f"**{statistics.median(ratio):.3f}** (IQR {_quantile(ratio, 0.25):.3f}–{_quantile(ratio, 0.75):.3f})",
                args.repeats,
            ]
        )
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
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "heads.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
