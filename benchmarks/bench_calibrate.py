"""The guarantee of `annify calibrate` on a trained run: achieved risk on held-out images over random splits.

The run's validation and test logits are computed once and pooled; each of ``--splits`` random
splits calibrates on as many images as the validation split holds and measures on the rest. For each
method and ε: how often the held-out risk exceeded ε (Learn-then-Test promises at most δ, up to the
noise of a finite held-out set), the mean held-out risk (conformal risk control promises at most ε),
the mean share of the full network's FLOPs, and the accuracy lost against the full network.

Usage::

    python -m benchmarks.bench_calibrate runs/digits
    python -m benchmarks.bench_calibrate runs/digits --epsilons 0.02,0.05 --splits 1000

Results: Markdown on stdout and ``benchmarks/results/calibrate.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import annify
from benchmarks._common import (
    RESULTS,
    RunDir,
    build_datasets,
    exit_flops,
    loss_matrix,
    machine,
    machine_line,
    select,
    table,
    write_json,
)


def logits_of(run: Path):
    spec = annify.load_spec(RunDir(run).config)
    net = annify.load(spec, RunDir(run).last).eval()
    data = build_datasets(spec.train.get("data") or "digits", input_size=spec.input_size, augment=False)
    outs, labels, n_val = [], [], len(data["val"])
    with torch.inference_mode():
        for split in ("val", "test"):
            xs, ys = zip(*(data[split][i] for i in range(len(data[split]))), strict=True)
            outs.append(net(torch.stack(xs)))
            labels.append(torch.tensor(ys))
    logits = [torch.cat([o[k] for o in outs]) for k in range(net.num_outputs)]
    return net, logits, torch.cat(labels), n_val


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--epsilons", default="0.02,0.05")
    p.add_argument("--delta", type=float, default=0.1)
    p.add_argument("--splits", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)

    net, logits, labels, n_cal = logits_of(Path(args.run))
    flops = np.asarray(exit_flops(net))
    full = exit_flops(net, [False] * (net.num_outputs - 1) + [True])[-1]
    preds = torch.stack([z.argmax(-1) for z in logits]).numpy()
    right = preds == labels.numpy()[None]  # K×N
    rows, rng = [], np.random.default_rng(args.seed)
    for risk in ("consistency", "accuracy-gap"):
        losses, exits = loss_matrix(logits, labels, risk)
        n = losses.shape[1]
        for method in ("ltt", "crc"):
            for eps in (float(e) for e in args.epsilons.split(",")):
                over, risks, shares, gaps, none = 0, [], [], [], 0
                for _ in range(args.splits):
                    order = rng.permutation(n)
                    cal, held = order[:n_cal], order[n_cal:]
                    index, _ = select(losses[:, cal], method, eps, args.delta)
                    if index is None:
                        none += 1
                        risks.append(0.0), shares.append(1.0), gaps.append(0.0)
                        continue
                    r = losses[index, held].mean()
                    over += r > eps
                    risks.append(r)
                    shares.append(flops[exits[index, held]].mean() / full)
                    gaps.append(right[-1, held].mean() - right[exits[index, held], held].mean())
                rows.append(
                    {
                        "risk": risk, "method": method, "epsilon": eps, "violations": over / args.splits,
                        "mean_risk": float(np.mean(risks)), "flops_share": float(np.mean(shares)),
                        "accuracy_lost": float(np.mean(gaps)), "nothing_valid": none / args.splits,
                    }
                )  # fmt: skip
    print(
        f"run {args.run}: {n_cal} calibration / {len(labels) - n_cal} held-out images per split, "
        f"{args.splits} splits, delta {args.delta}\n"
    )
    header = [
        "risk",
        "method",
        "ε",
        "held-out risk > ε",
        "mean held-out risk",
        "FLOPs share",
        "accuracy lost",
        "none valid",
    ]
    print(
        table(
            header,
            [
                [
                    r["risk"],
                    r["method"],
                    f"{r['epsilon']:g}",
                    f"{100 * r['violations']:.1f}%",
                    f"{r['mean_risk']:.4f}",
                    f"{r['flops_share']:.3f}",
                    f"{100 * r['accuracy_lost']:.2f} pt",
                    f"{100 * r['nothing_valid']:.1f}%",
                ]
                for r in rows
            ],
        )  # fmt: skip
    )
    print()
    print(machine_line())
    out = write_json(
        RESULTS / "calibrate.json", {"args": vars(args), "rows": rows, "machine": machine()}, indent=2
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
