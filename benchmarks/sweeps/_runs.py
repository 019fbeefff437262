"""Training sweeps' machinery, shared by ``bench_table1`` and ``bench_trained_start``: one training run that writes ``bench.json`` when it is done (a rerun
reads it, or resumes the run from its last checkpoint), and a process pool running many.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path
from typing import NamedTuple

import annify
from benchmarks._common import (
    RunDir,
    TensorBatches,
    build_datasets,
    evaluate,
    set_threads,
    write_json,
)

RESULTS = Path(__file__).parent / "results"


class Job(NamedTuple):
    """One training run: its network, folder, label, ``train()`` settings, OPT head (None: every
    output trained), seed, and the arguments shared by a sweep's runs (data, train_subset, epochs,
    batch_size, lr, threads)."""

    spec: annify.Spec
    folder: Path
    label: str
    settings: dict
    head: int | None
    seed: int
    args: dict


def final_eval(net, spec, data: str, train_subset: int | None) -> dict:
    """Cross-entropy and error of every output on train (un-augmented), val and test, eval mode."""
    datasets = build_datasets(data, input_size=spec.input_size, augment=False, train_subset=train_subset)
    out = {}
    for split, ds in datasets.items():
        ev = evaluate(net, TensorBatches(ds, 256), "cpu")
        out.update({f"{split}_ce": ev.losses, f"{split}_error": ev.errors, f"{split}_count": ev.count})
    return out


def run_one(job: Job) -> dict:
    """Train one network (or read the result of a finished one) and return its ``bench.json`` record."""
    args, folder = job.args, job.folder
    set_threads(args["threads"])
    done = folder / "bench.json"
    if done.is_file():
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "log.txt", "a") as log:
        res = annify.train(
            job.spec,
            out=folder,
            data=args["data"],
            train_subset=args["train_subset"],
            epochs=args["epochs"],
            batch_size=args["batch_size"],
            lr=args["lr"],
            head=job.head,
            seed=job.seed,
            device="cpu",
            resume=True,
            log=lambda s: print(s, file=log, flush=True),
            **job.settings,
        )
    metrics = [json.loads(x) for x in RunDir(folder).metrics.read_text().splitlines() if x.strip()]
    record = {
        "scheme": job.label,
        "head": job.head,
        "seed": job.seed,
        "settings": job.settings,
        "seconds": res.seconds,
        "epochs": res.epochs_done,
        "table": res.table,
        **final_eval(res.net, res.spec, args["data"], args["train_subset"]),
        "last_epoch_train_loss": metrics[-1]["train_loss"],  # train mode, augmented, running mean
        "final_weights": metrics[-1]["weights"],
        "weights_history": [m["weights"] for m in metrics],
    }
    ours = [round(e * record["test_count"]) for e in record["test_error"]]
    theirs = [round(r["test_error"] * record["test_count"]) for r in res.table]
    if ours != theirs:  # the same network and images, batched differently
        print(f"warning: {folder}: test errors differ between train() and re-evaluation: {theirs} vs {ours}")
    write_json(done, record, indent=None)
    return record


def run_all(jobs: list[Job], n_jobs: int, started: float) -> list[dict]:
    """Run the jobs, ``n_jobs`` at a time in separate processes (one thread each); records in job order."""
    records: list[dict | None] = [None] * len(jobs)

    def report(i: int, rec: dict) -> None:
        records[i] = rec
        errs = " ".join(f"{100 * r['test_error']:.1f}" for r in rec["table"])
        elapsed = (time.perf_counter() - started) / 60
        print(f"[{sum(r is not None for r in records)}/{len(jobs)}] {jobs[i].folder.name}: {rec['seconds']:.0f} s "
              f"(elapsed {elapsed:.1f} min)  test err % {errs}", flush=True)  # fmt: skip

    if n_jobs <= 1:
        for i, job in enumerate(jobs):
            report(i, run_one(job))
        return records
    with mp.get_context("spawn").Pool(n_jobs, maxtasksperchild=1) as pool:
        pending = {i: pool.apply_async(run_one, (job,)) for i, job in enumerate(jobs)}
        while pending:
            for i in [i for i, r in pending.items() if r.ready()]:
                report(i, pending.pop(i).get())
            time.sleep(1.0)
    return records
