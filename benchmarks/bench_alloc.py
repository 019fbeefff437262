"""Where a converted network's forward spends time beyond the plain model's: user and system CPU time, page faults.

Issue 21 asked why the converted graph seemed to suffer more from glibc's allocator than the plain
model (every output of resnet50 ``--every 2`` at 1.04-1.07x earlyon's forward with glibc's default,
0.99x after ``annify.keep_freed_memory()``). This benchmark splits the time of one forward into the
user CPU time (computing), the system CPU time (the kernel: page faults on freshly mapped memory,
``mmap``/``munmap``/``brk``) and the count of minor page faults, for

- ``plain``: the timm model;
- ``earlyon``: earlyon 0.3.0's all-exits forward on the same exits (skipped if it is not installed);
- ``annify``: the converted network, every output, as a user calls it (``net(x)``);
- ``annify, state held``: the same, but each segment's carried input held by the caller until the
  segment returns (``run_segment`` given tuples): how annify ran before segments took their input
  as a list they empty (``Segment.boxed``), kept to show what that changed;
- ``segments``: the converted network's segments alone, no head (``run_segment(j, head=False)``);
- ``fx``: the plain model traced by ``torch.fx.symbolic_trace`` as one graph (no cut, no head),

each allocator mode (``release``: glibc's default; ``keep``: ``annify.keep_freed_memory()``) in
``--processes`` fresh processes, the variants interleaved round by round (order rotated), one
thread. Several processes because glibc's page faults depend on the process's heap history (the
same forward faults 25,000 times a call in one process and 44,000 in the next); the rounds of all
processes are pooled. CPU times come from ``getrusage(RUSAGE_THREAD)`` around each call, so time the
core spent on other processes is not counted (this machine is shared); ratios are taken within a
round and summarised by their median.

Usage::

    python -m benchmarks.bench_alloc                       # resnet50 --every 2, batch 8, 3 x 9 rounds
    python -m benchmarks.bench_alloc --batch 32 --rounds 5 --processes 2

Results: printed as Markdown and written to ``benchmarks/results/alloc.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import warnings

from benchmarks._common import (
    RESULTS,
    machine,
    machine_line,
    model_pair,
    set_threads,
    summary,
    table,
    write_json,
)


def _variants(name: str, every: int, batch: int):
    import torch

    plain, net = model_pair(name, every=every)
    x = torch.randn(batch, *net.spec.input_size)

    def segments():
        for _ in net.run_segments(x, [False] * net.num_outputs):  # each tap's features, dropped
            pass

    def held():  # tuples: run_segment leaves them as they are, so the caller keeps each input alive
        state = (x,)
        for j in range(net.num_outputs):
            state, _ = net.run_segment(j, state)

    traced = torch.fx.symbolic_trace(plain)  # the plain model as one flat fx graph, no cut, no head
    fns = {
        "plain": lambda: plain(x),
        "fx": lambda: traced(x),
        "annify": lambda: net(x),
        "annify, state held": held,
        "segments": segments,
    }
    try:
        from earlyon.models.custom import custom_ee
    except Exception:  # earlyon is optional (pip install earlyon==0.3.0)
        return fns
    import annify

    layers = [h.node.rsplit(".", 1)[0] for h in net.spec.heads[:-1]]  # 'layer1.1.act3' -> 'layer1.1'
    backbone = annify.create_model(name).eval()
    backbone.load_state_dict(plain.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapper = custom_ee(backbone, layers, num_classes=net.spec.num_classes).eval()
    fns["earlyon"] = lambda: wrapper(x, mode="training")
    return fns


def measure(name: str, every: int, batch: int, rounds: int, mode: str) -> dict:
    """One allocator mode, in this process: per-call user/system CPU ms and page faults per variant."""
    import torch

    import annify

    set_threads(1)
    if mode == "keep" and not annify.keep_freed_memory():
        raise SystemExit("keep_freed_memory() has no effect here (not Linux with glibc)")
    fns = _variants(name, every, batch)
    names = list(fns)
    rec = {n: {"user": [], "sys": [], "faults": []} for n in names}
    with torch.no_grad():
        for _ in range(2):  # warm-up rounds
            for n in names:
                fns[n]()
        for i in range(rounds):
            shift = i % len(names)
            for n in names[shift:] + names[:shift]:
                a = resource.getrusage(resource.RUSAGE_THREAD)
                fns[n]()
                b = resource.getrusage(resource.RUSAGE_THREAD)
                rec[n]["user"].append(1e3 * (b.ru_utime - a.ru_utime))
                rec[n]["sys"].append(1e3 * (b.ru_stime - a.ru_stime))
                rec[n]["faults"].append(b.ru_minflt - a.ru_minflt)
    return rec


def _ratio(rec: dict, a: str, b: str, key=lambda r, i: r["user"][i] + r["sys"][i]) -> dict:
    n = len(rec[b]["user"])
    return summary([key(rec[a], i) / key(rec[b], i) for i in range(n)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds per process")
    ap.add_argument("--processes", type=int, default=3, help="fresh processes per allocator mode")
    ap.add_argument("--mode", choices=["keep", "release"], help=argparse.SUPPRESS)  # one child process
    args = ap.parse_args()
    if args.mode:
        rec = measure(args.model, args.every, args.batch, args.rounds, args.mode)
        print(json.dumps(rec))
        return
    set_threads(1)  # as in the measuring processes, so the machine line says so
    out = {"machine": machine(), "args": vars(args), "modes": {}}
    rows = []
    recs: dict[str, dict] = {"release": {}, "keep": {}}
    for p in range(args.processes):
        for mode in ("release", "keep"):  # each in fresh processes: glibc's state is per process
            cmd = [sys.executable, "-m", "benchmarks.bench_alloc", "--mode", mode]
            cmd += ["--model", args.model, "--every", str(args.every), "--batch", str(args.batch)]
            cmd += ["--rounds", str(args.rounds)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode:
                raise SystemExit(f"the {mode} run failed: {res.stderr.strip().splitlines()[-1]}")
            rec = json.loads(res.stdout.strip().splitlines()[-1])
            for n, r in rec.items():
                pooled = recs[mode].setdefault(n, {k: [] for k in r})
                for k, v in r.items():
                    pooled[k] += v
            print(f"process {p + 1}/{args.processes}, {mode}: median faults a call "
                  + ", ".join(f"{n} {statistics.median(r['faults']):.0f}" for n, r in rec.items()),
                  file=sys.stderr)  # fmt: skip
    for mode, rec in recs.items():
        out["modes"][mode] = rec
        for n in rec:
            med = {k: statistics.median(v) for k, v in rec[n].items()}
            cpu = _ratio(rec, n, "plain")
            user = _ratio(rec, n, "plain", lambda r, i: r["user"][i])
            vs_e = _ratio(rec, n, "earlyon") if "earlyon" in rec else None
            rows.append([
                mode, n, f"{med['user']:.0f}", f"{med['sys']:.0f}", f"{med['faults']:.0f}",
                f"**{cpu['median']:.3f}** ({cpu['iqr'][0]:.3f}–{cpu['iqr'][1]:.3f})",
                f"{user['median']:.3f}",
                "" if vs_e is None else f"{vs_e['median']:.3f} ({vs_e['iqr'][0]:.3f}–{vs_e['iqr'][1]:.3f})",
            ])  # fmt: skip
    print(machine_line(out["machine"]))
    print(
        f"\n{args.model} --every {args.every}, batch {args.batch}, eval, no_grad, 1 thread, "
        f"{args.rounds} interleaved rounds in each of {args.processes} fresh processes per allocator mode\n"
    )
    print(table(
        ["allocator", "forward", "user ms", "sys ms", "page faults", "CPU / plain (IQR)", "user / plain",
         "CPU / earlyon (IQR)"],
        rows,
    ))  # fmt: skip
    path = write_json(RESULTS / "alloc.json", out)
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
