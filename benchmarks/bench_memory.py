"""Peak CPU memory of resnet50 --every 2 (specs/resann50.yaml): converted against plain, early exit against full.

Each measurement runs in a fresh process (glibc's default allocator, no ``keep_freed_memory``, so freed
blocks go back to the system and the resident size follows what is live): the network is built, the
operation runs once to warm up, freed memory is trimmed (``malloc_trim``), and the operation runs again
while a thread samples the resident set size (``/proc/self/statm``) every 0.1 ms. The peak above the
resident size just before is the operation's working memory (activations, gradients, workspace; the
weights are already resident).

Operations, batch ``--batch`` at 3×224×224, one torch thread: inference (``inference_mode``) of the plain
timm model, of the converted network computing every output, and ``early_exit`` with thresholds fit
(``fit_thresholds``) to half the FLOPs on another noise batch; a training step (forward, cross-entropy
on every output, backward, SGD with momentum) of the plain model and of the converted network.
Configurations are interleaved over ``--repeats`` rounds; the median per configuration is reported,
and the ratios of medians.

Usage::

    python -m benchmarks.bench_memory --repeats 3

Results: Markdown on stdout and ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks._common import RESULTS, machine, machine_line, table, write_json

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ["infer_plain", "infer_converted", "infer_early_exit", "train_plain", "train_converted"]
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def measure(op) -> int:
    """Peak resident bytes above the level just before ``op()``, sampled every 0.1 ms."""
    op()  # warm-up: one-time allocations (optimizer state, kernel caches) are not the operation's
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base, peak, running = rss(), [0], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.0001)

    t = threading.Thread(target=sample)
    t.start()
    op()
    running[0] = False
    t.join()
    return max(peak[0], rss()) - base


def one(config: str, batch: int) -> dict:
    import torch
    import torch.nn.functional as F

    import annify
    from benchmarks._common import exit_flops

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = annify.load(ROOT / "specs" / "resann50.yaml")
    x = torch.randn(batch, 3, 224, 224)
    y = torch.randint(0, 1000, (batch,))
    info = {}
    if config.startswith("infer"):
        model = annify.plain_model(net).eval() if config == "infer_plain" else net.eval()
        if config == "infer_early_exit":
            with torch.inference_mode():
                probs = [z.softmax(-1) for z in net(torch.randn(batch, 3, 224, 224))]
            flops = exit_flops(net)
            thresholds = annify.early_exit.fit_thresholds(probs, flops[-1] / 2, flops)

            def op():
                _, _, spent = annify.early_exit(net, x, thresholds)
                info["flops_share"] = float(spent.mean()) / flops[-1]

        else:

            def op():
                with torch.inference_mode():
                    model(x)

    else:
        model = annify.plain_model(net).train() if config == "train_plain" else net.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def op():
            out = model(x)
            outs = out if isinstance(out, list) else [out]
            loss = sum(F.cross_entropy(z, y) for z in outs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return {"config": config, "peak_bytes": measure(op), **info}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.batch)))
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    for r in range(args.repeats):
        for c in CONFIGS if r % 2 == 0 else reversed(CONFIGS):
            cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--one", c, "--batch", str(args.batch)]
            out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout
            runs[c].append(json.loads(out.strip().splitlines()[-1]))
            print(runs[c][-1], flush=True)
    mb = {c: statistics.median(v["peak_bytes"] for v in runs[c]) / 2**20 for c in CONFIGS}
    print(
        f"\nresann50 (resnet50 --every 2, 8 outputs), batch {args.batch} at 3×224×224, {args.repeats} rounds\n"
    )
    print(table(["operation", "peak working memory (MiB, median)", "all rounds (MiB)"], [
        [c, f"{mb[c]:.0f}", ", ".join(f"{v['peak_bytes'] / 2**20:.0f}" for v in runs[c])] for c in CONFIGS
    ]))  # fmt: skip
    ratios = {
        "inference: converted / plain": mb["infer_converted"] / mb["infer_plain"],
        "inference: early exit / converted full": mb["infer_early_exit"] / mb["infer_converted"],
        "training step: converted / plain": mb["train_converted"] / mb["train_plain"],
    }
    share = statistics.median(v["flops_share"] for v in runs["infer_early_exit"])
    print()
    print(table(["ratio", "value"], [[k, f"{v:.2f}"] for k, v in ratios.items()]))
    print(f"\nearly exit spent {share:.2f} of the full network's FLOPs on the measured batch")
    print(machine_line())
    out = write_json(RESULTS / "memory.json", {"args": vars(args), "runs": runs, "median_mib": mb,
                                               "ratios": ratios, "machine": machine()}, indent=2)  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
