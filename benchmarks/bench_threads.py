"""torch threads on a shared machine: 1 against 2 intra-op threads, with and without a busy neighbour.

Why: torch's default is one OpenMP thread per core. When another process keeps a core busy, the
OpenMP threads of a small model's many short operators wait on each other at every barrier (spinning,
then sleeping) while the neighbour holds the core they wait for. This script measures how much that
costs, to choose the default of ``--threads``.

Workloads, each timed with 1 and 2 threads, quiet and with a busy neighbour (a subprocess spinning
``while True: pass``, started before and stopped after each busy measurement), in interleaved rounds
(the order of the four settings rotates; ratios are taken within a round):

tiny: one training epoch of the trainer's steps (head-local AdaLoss, fused SGD) over 256 of the
    embedded digits (8×8, ``train_subset``; 4 steps of 64) with the demo's network
    (cifar_resnet_n3_c8, 3 outputs): what ``annify demo`` and the tests train, in small.
step: one training step of the converted cifar_resnet_n7_c16 (21 outputs) at 3×32×32, batch 64 (the
    trainer's step, ``benchmarks/bench_train.py``): a network with real convolutions.

Usage::

    python -m benchmarks.bench_threads --repeats 20
    python -m benchmarks.bench_threads --workloads tiny --repeats 20

Results: ``benchmarks/results/threads.md`` and ``threads.json``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import annify
from benchmarks._common import (
    RESULTS,
    EpochLosses,
    build_datasets,
    cifar_step,
    command,
    fit_to_data,
    machine,
    machine_line,
    make_batches,
    ratios,
    resolve_settings,
    spread,
    summary,
    table,
    trainer_optimizer,
    write_json,
    write_text,
)

SPEC = """\
name: tiny
model: cifar_resnet_n3_c8
input_size: [3, 32, 32]
num_classes: 10
heads:
  - {node: stages.0.2.add}
  - {node: stages.1.2.add}
  - {node: model}
"""
SETTINGS = [(1, False), (2, False), (1, True), (2, True)]  # (threads, busy neighbour)


def tiny_epoch(tmp: Path):
    """One training epoch of the demo's network on 256 digits: the trainer's steps, no evaluation."""
    (tmp / "tiny.yaml").write_text(SPEC)
    spec, _ = fit_to_data(annify.load_spec(tmp / "tiny.yaml"), "digits")
    torch.manual_seed(0)
    net = annify.build(spec).train()
    batches = make_batches(build_datasets("digits", input_size=spec.input_size, train_subset=256), 64)[
        "train"
    ]
    optimizer, _ = trainer_optimizer(net, resolve_settings({}, {}))
    scheme, local = annify.weighting.get("adaloss", net.num_outputs), annify.weighting.HeadLocal(net)
    trunk = [p for n, p in net.named_parameters() if not n.startswith(net.exits_prefix)]

    def run() -> None:
        watch = EpochLosses(net.num_outputs, torch.device("cpu"))
        for step, (x, y) in enumerate(batches, 1):
            local.set(scheme.weights)
            losses = annify.train.output_objectives(net, x, y)[0]
            annify.train.weighted_update(losses, scheme, optimizer, trunk, local)
            watch.add(losses, step)
        watch.read(step)

    return run


class Neighbour:
    """A process that keeps one core busy while it lives."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.2)  # let it reach the scheduler
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def measure(fn, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of ``fn`` per setting, round-robin over the four settings, the order rotating each round."""
    times: dict[str, list[float]] = {_key(s): [] for s in SETTINGS}
    for r in range(-warmup, repeats):
        order = SETTINGS[r % 4 :] + SETTINGS[: r % 4]
        for threads, busy in order:
            torch.set_num_threads(threads)
            if busy:
                with Neighbour():
                    t0 = time.perf_counter()
                    fn()
                    seconds = time.perf_counter() - t0
            else:
                t0 = time.perf_counter()
                fn()
                seconds = time.perf_counter() - t0
            if r >= 0:
                times[_key((threads, busy))].append(seconds)
        print(
            f"round {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items() if v),
            flush=True,
        )
    return times


def _key(setting: tuple[int, bool]) -> str:
    return f"{setting[0]}t {'busy' if setting[1] else 'quiet'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="tiny,step")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(machine_line(info), flush=True)
    sections, raw = [], {"command": command(), "machine": info}
    with tempfile.TemporaryDirectory() as tmp:
        for name in [w for w in args.workloads.split(",") if w]:
            started = time.perf_counter()
            fn = tiny_epoch(Path(tmp)) if name == "tiny" else cifar_step()
            t = measure(fn, args.repeats)
            med = {k: statistics.median(v) for k, v in t.items()}
            pairs = {
                "2t/1t quiet": ("2t quiet", "1t quiet"),
                "2t/1t busy": ("2t busy", "1t busy"),
                "1t busy/quiet": ("1t busy", "1t quiet"),
                "2t busy/quiet": ("2t busy", "2t quiet"),
            }
            stats = {k: summary(ratios(t[a], t[b])) for k, (a, b) in pairs.items()}
            rows = [[k, f"{med[k]:.2f}"] for k in med]
            rows2 = [[k, f"**{r['median']:.2f}**", spread(r, 2)] for k, r in stats.items()]
            what = (
                "one epoch (256 images, 4 steps) of the demo's network on digits"
                if name == "tiny"
                else "one training step, converted cifar_resnet_n7_c16, batch 64"
            )
            sections.append(
                f"### {name}: {what}\n\n{args.repeats} rounds, took {time.perf_counter() - started:.0f} s; load average "
                f"after {machine()['load_average_1_5_15']}.\n\n"
                + table(["setting", "median s"], rows)
                + "\n\n"
                + table(["ratio (time)", "median", "spread of per-round ratios"], rows2)
            )
            raw[name] = {"times_s": t, "median_s": med, "ratios": stats, "repeats": args.repeats}
    md = f"## torch threads with and without a busy neighbour\n\nCommand: `{raw['command']}`\n\n{machine_line(info)}\n\n"
    md += "\n\n".join(sections) + "\n"
    write_text(out / "threads.md", md)
    write_json(out / "threads.json", raw)
    print(md)


if __name__ == "__main__":
    main()
