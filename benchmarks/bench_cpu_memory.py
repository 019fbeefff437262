"""Freed CPU memory kept for reuse (``annify.keep_freed_memory``, ``--cpu-memory keep``) against glibc's default.

glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns
it on ``free``, so each large activation is page-faulted anew on every call. The two settings are
process-wide, so each runs in its own worker process (spawned, same seed, same workload, 1 torch
thread); the parent asks them in turn for one timed call (order alternating each round, so the
comparison is interleaved and side by side) and takes the per-round ratio keep / release. At the end
each worker reports its peak resident size (``ru_maxrss``) and its resident size between calls: the
memory price of keeping.

Workloads:
  resnet50        plain timm resnet50, eval, ``no_grad``, batch ``--batch`` at 3×224×224
  resann50        annify's resnet50 --every 2 computing all 8 outputs, same batch
  resann50-cl     the same in channels-last memory format (network and images)
  resnet50-train  one SGD step (forward, backward, update) of plain resnet50, batch 8 at 224
  cifar-train     one trainer step of the converted cifar_resnet_n7_c16 (21 outputs, AdaLoss), batch 64

Usage::

    python -m benchmarks.bench_cpu_memory --repeats 20

Results: printed as Markdown and written to ``benchmarks/results/cpu_memory.json``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time
import warnings
from pathlib import Path

from benchmarks._common import (
    RESULTS,
    cell,
    command,
    machine,
    machine_line,
    model_pair,
    ratios,
    set_cpu_memory,
    set_threads,
    table,
    write_json,
)

WORKLOADS = ["resnet50", "resann50", "resann50-cl", "resnet50-train", "cifar-train"]
MODES = ["release", "keep"]


def _build(name: str, batch: int):
    """A zero-argument function doing one call of the workload (built with seed 0)."""
    import timm
    import torch

    torch.manual_seed(0)
    if name in ("resnet50", "resann50", "resann50-cl"):
        if name == "resnet50":
            model = timm.create_model("resnet50").eval()
        else:
            model = model_pair("resnet50", every=2, input_size=(3, 224, 224), num_classes=1000)[1]
        x = torch.randn(batch, 3, 224, 224)
        if name.endswith("-cl"):
            model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)

        def infer() -> None:
            with torch.no_grad():
                model(x)

        return infer
    if name == "resnet50-train":
        from benchmarks._common import plain_step

        model = timm.create_model("resnet50").train()
        x, y = torch.randn(8, 3, 224, 224), torch.randint(0, 1000, (8,))
        return plain_step(model, x, y)
    if name == "cifar-train":
        from benchmarks._common import cifar_step

        return cifar_step()
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


def _worker(mode: str, conn) -> None:
    """Serve one setting: ``("build", name, batch)``; ``("run",)`` -> seconds; ``("rss",)`` -> bytes resident
    (peak, and now, between calls)."""
    warnings.simplefilter("ignore")
    set_threads(1)
    assert set_cpu_memory(mode) == f"cpu memory {mode}", "keep needs glibc"
    fn = None
    while True:
        msg = conn.recv()
        if msg[0] == "build":
            fn = _build(msg[1], msg[2])
            conn.send(None)
        elif msg[0] == "run":
            t0 = time.perf_counter()
            fn()
            conn.send(time.perf_counter() - t0)
        elif msg[0] == "rss":  # (peak, now): ru_maxrss is in kB on Linux, statm in pages
            now = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
            conn.send((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, now))
        else:
            return


def measure(name: str, batch: int, repeats: int, warmup: int = 2) -> dict:
    """Per-round seconds of each setting and the per-round ratios keep / release (fresh workers)."""
    ctx = mp.get_context("spawn")
    pipes, procs = {}, []
    for mode in MODES:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(mode, child), daemon=True)
        proc.start()
        pipes[mode] = parent
        procs.append(proc)
    try:
        for mode in MODES:  # built one after the other: building is not timed
            pipes[mode].send(("build", name, batch))
            pipes[mode].recv()
        times: dict[str, list[float]] = {m: [] for m in MODES}
        for r in range(-warmup, repeats):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                pipes[mode].send(("run",))
                t = pipes[mode].recv()
                if r >= 0:
                    times[mode].append(t)
        rss = {}
        for mode in MODES:
            pipes[mode].send(("rss",))
            rss[mode] = pipes[mode].recv()
    finally:
        for mode in MODES:
            pipes[mode].send(("stop",))
        for proc in procs:
            proc.join(timeout=30)
    keep = ratios(times["keep"], times["release"])
    return {"times_s": times, "ratio_keep_over_release": keep, "rss_bytes_peak_and_between_calls": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--batch", type=int, default=32, help="batch of the inference workloads")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    print(machine_line())
    result = {"command": command(), "machine": machine(), "batch": args.batch}
    rows = []
    for name in args.workloads.split(","):
        m = measure(name, args.batch, args.repeats)
        result[name] = m
        r = m["ratio_keep_over_release"]
        med = {mode: statistics.median(m["times_s"][mode]) * 1e3 for mode in MODES}
        rss = m["rss_bytes_peak_and_between_calls"]
        rows.append(
            [
                name,
                f"{med['release']:.0f}",
                f"{med['keep']:.0f}",
                cell(r, min_max=True),
                f"{1 / statistics.median(r):.2f}×",
                f"{rss['release'][0] / 2**20:.0f} / {rss['keep'][0] / 2**20:.0f}",
                f"{rss['release'][1] / 2**20:.0f} / {rss['keep'][1] / 2**20:.0f}",
                args.repeats,
            ]
        )
        print(f"{name} done", flush=True)
    result["machine_after"] = machine()
    header = [
        "workload",
        "release ms",
        "keep ms",
        "keep / release (median of per-round ratios)",
        "speed-up",
        "peak RSS MiB (release / keep)",
        "RSS between calls MiB (release / keep)",
        "rounds",
    ]
    print(f"\n### Freed CPU memory kept against glibc's default (1 thread, inference batch {args.batch})\n")
    print(table(header, rows))
    write_json(RESULTS / "cpu_memory.json", result)


if __name__ == "__main__":
    main()
