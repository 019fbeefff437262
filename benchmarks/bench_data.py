"""Small-data fast path: images/s of in-memory batches made on the device against torch's DataLoader.

In-memory data sets (digits, the MNIST family, CIFAR) can be held whole on the training device, with
batches sliced, augmented (pad-and-crop, flip), resized and normalized there by
``annify.data.TensorBatches``: what ``annify train`` does by default (``--loader auto``). The
alternative is torch's DataLoader over the same ``TensorImageDataset``, one sample at a time, with
0 or N worker processes (``--loader dataloader --workers N``).

Parts, each interleaved round-robin in the same rounds (``benchmarks._common.interleaved``), ratios
taken within each round, median and spread reported:

data: one pass over N training images with augmentation, nothing else (the input pipeline alone).
train: one pass of training steps (forward of every output, weighted loss, backward, SGD step) of a
    small ResANN over the same images, so the ratio is what a user's epoch gains.

Usage::

    python -m benchmarks.bench_data                    # Fashion-MNIST if installed, else digits
    python -m benchmarks.bench_data --repeats 20 --images 4096 --workers 2
    python -m benchmarks.bench_data --device cuda      # on a GPU

Results go to ``benchmarks/results/data.md``.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import annify
from benchmarks._common import (
    DEBIAN_FASHION_MNIST,
    RESULTS,
    TensorBatches,
    build_datasets,
    build_loaders,
    command,
    data_spec,
    interleaved,
    machine,
    machine_line,
    ratios,
    set_threads,
    spread,
    summary,
    table,
    write_text,
)


def _source() -> str:
    return "fashion-mnist" if DEBIAN_FASHION_MNIST.is_dir() else "digits"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data", default=None, help="an in-memory source (default: fashion-mnist if installed, else digits)"
    )
    ap.add_argument("--images", type=int, default=4096, help="training images per pass (a fixed subset)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--model", default="cifar_resnet_n3_c16", help="the ResANN of the train part")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of the third variant")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    set_threads(args.threads)
    source = args.data or _source()
    info = machine()
    print(machine_line(info), flush=True)

    dev = torch.device(args.device)
    spec = data_spec(args.model, source)
    train_ds = build_datasets(source, input_size=spec.input_size, train_subset=args.images)["train"]
    n = len(train_ds)
    fast = TensorBatches(train_ds, args.batch_size, dev, shuffle=True, seed=0)
    loaders = {
        "dataloader, 0 workers": build_loaders({"train": train_ds}, args.batch_size, 0)["train"],
        f"dataloader, {args.workers} workers": build_loaders(
            {"train": train_ds}, args.batch_size, args.workers, persistent_workers=True
        )["train"],
    }
    pipelines = {"fast path (TensorBatches)": fast, **loaders}

    def data_pass(batches):
        def run():
            for x, y in batches:
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()

        return run

    torch.manual_seed(0)
    net = annify.build(spec).to(dev).train()
    from timm.optim import create_optimizer_v2

    opt = create_optimizer_v2(net, opt="sgd", lr=0.01, weight_decay=1e-4, momentum=0.9)
    scheme = annify.weighting.get("adaloss", net.num_outputs)

    def train_pass(batches):
        def run():
            for x, y in batches:
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                annify.train.weighted_update(annify.train.output_objectives(net, x, y)[0], scheme, opt, [])
            if dev.type == "cuda":
                torch.cuda.synchronize()

        return run

    parts = {}
    for part, make, repeats in (
        ("data", data_pass, args.repeats),
        ("train", train_pass, max(args.repeats // 2, 10)),
    ):
        print(f"{part}: {len(pipelines)} pipelines x {repeats} rounds over {n} images ...", flush=True)
        times = interleaved({k: make(v) for k, v in pipelines.items()}, repeats=repeats, warmup=1)
        parts[part] = times

    fast_name = next(iter(pipelines))
    rows = []
    for part, times in parts.items():
        for name, ts in times.items():
            ips = n / statistics.median(ts)
            if name == fast_name:
                rows.append([part, name, f"{ips:,.0f}", "1 (reference)", ""])
                continue
            s = summary(ratios(ts, times[fast_name]))  # the fast path's speed-up in each round
            rows.append([part, name, f"{ips:,.0f}", f"**{s['median']:.2f}×**", spread(s, 2)])
    md = "\n".join([
        "# Small-data fast path: images/s against torch's DataLoader",
        "",
        f"Command: `{command()}`",
        "",
        machine_line(info) + f"; device {dev}.",
        "",
        f"Data `{source}`: {n} training images ({'×'.join(map(str, spec.input_size))}), batch {args.batch_size}, "
        f"augmentation on; train part: `{args.model}` with a head after every unit, AdaLoss, SGD. "
        f"{args.repeats} interleaved rounds for data, {max(args.repeats // 2, 10)} for train (one warm-up round each). "
        "Speed-up = the other pipeline's time / the fast path's time in the same round (median, spread).",
        "",
        table(["part", "pipeline", "images/s (median)", "fast path speed-up", "spread of the speed-up"], rows),
        "",
    ])  # fmt: skip
    out = write_text(RESULTS / ("data.md" if dev.type == "cpu" else f"data_{dev.type}.md"), md)
    print(md)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
