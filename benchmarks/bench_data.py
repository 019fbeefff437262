"""Small-data fast path: images/s of in-memory batches made on the device against torch's DataLoader.

In-memory data sets (digits, the MNIST family, CIFAR) can be held whole on the training device, with
batches sliced, augmented (pad-and-crop, flip), resized and normalized there by
``annify.data.TensorBatches``: what ``annify train`` does by default (``--loader auto``). The
alternative is torch's DataLoader over the same ``TensorImageDataset``, one sample at a time, with
0 or N worker processes (``--loader dataloader --workers N``).

Parts, each interleaved round-robin in the same rounds (``benchmarks/_timing.interleaved``), ratios
taken within each round, median and spread reported:

data: one pass over N training images with augmentation, nothing else (the input pipeline alone).
train: one pass of training steps (forward of every output, weighted loss, backward, SGD step) of a
    small ResANN over the same images, so the ratio is what a user's epoch gains.

Usage::

    PYTHONPATH=. python benchmarks/bench_data.py                    # Fashion-MNIST if installed, else digits
    PYTHONPATH=. python benchmarks/bench_data.py --repeats 20 --images 4096 --workers 2
    PYTHONPATH=. python benchmarks/bench_data.py --device cuda      # on a GPU

Results go to ``benchmarks/results/data.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._timing import Paired, interleaved, machine, machine_line, set_threads, table  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def _source() -> str:
    from annify.data import DEBIAN_FASHION_MNIST

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

    from annify import weighting
    from annify.convert import convert
    from annify.data import TensorBatches, build_datasets, build_loaders, data_info
    from annify.evaluate import fit_to_data
    from annify.train import output_objectives, weighted_update

    dev = torch.device(args.device)
    d = data_info(source)
    _, spec, _ = convert(args.model, every=1, input_size=d.input_size, num_classes=d.num_classes,
                         model_kwargs={"in_chans": d.input_size[0]})  # fmt: skip
    spec = fit_to_data(spec, source)[0]
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

    from annify.convert import build

    torch.manual_seed(0)
    net = build(spec).to(dev).train()
    from timm.optim import create_optimizer_v2

    opt = create_optimizer_v2(net, opt="sgd", lr=0.01, weight_decay=1e-4, momentum=0.9)
    scheme = weighting.get("adaloss", net.num_outputs)

    def train_pass(batches):
        def run():
            for x, y in batches:
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                weighted_update(output_objectives(net, x, y)[0], scheme, opt, [])
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
            p = Paired(times[fast_name], ts)  # fast / other time: < 1 is faster; speed-up is 1 / ratio
            speedups = sorted(1 / r for r in p.ratios)
            q1, q3 = speedups[len(speedups) // 4], speedups[(3 * len(speedups)) // 4]
            rows.append([part, name, f"{ips:,.0f}", f"**{1 / p.median:.2f}×**",
                         f"IQR {q1:.2f}–{q3:.2f}, min–max {speedups[0]:.2f}–{speedups[-1]:.2f}"])  # fmt: skip
    cmd = " ".join(["python", *sys.argv])
    md = "\n".join([
        "# Small-data fast path: images/s against torch's DataLoader",
        "",
        f"Command: `PYTHONPATH=. {cmd}`",
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
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("data.md" if dev.type == "cpu" else f"data_{dev.type}.md")
    out.write_text(md)
    print(md)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
