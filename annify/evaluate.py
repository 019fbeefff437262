"""The evaluate stage: every output's top-1 error, anytime tables, relative-to-OPT numbers, plots.

Anytime evaluation runs every sample through every output and reports each output's error against
its cumulative FLOPs (``annify.cost``). Errors are fractions in [0, 1] in the tables and files, and
percentages in what is printed and plotted.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from annify._files import atomic_write
from annify.data import SOURCES, build_datasets, data_info, make_batches, parse_source
from annify.errors import DataError, DeviceError
from annify.report import figure, format_flops, format_rows, save_figure
from annify.sources import model_source
from annify.spec import Spec

__all__ = [
    "Evaluation",
    "anytime_table",
    "evaluate",
    "evaluate_checkpoint",
    "evaluate_weights",
    "fit_to_data",
    "format_table",
    "nearest_outputs",
    "plot_anytime",
    "plot_weights",
    "relative_to_opt",
    "resolve_device",
    "save_table",
]


@dataclass
class Evaluation:
    """Per-output results on one split, in output order."""

    errors: list[float]  # top-1 error, a fraction in [0, 1]
    losses: list[float]  # mean cross-entropy
    count: int  # samples seen (summed over ranks)


def fit_to_data(spec: Spec, source: str) -> tuple[Spec, str | None]:
    """The spec a data source needs, and a one-line note when it differs from ``spec``.

    The class count always comes from the data. Sources with one native resolution (digits 8×8,
    the MNIST family 28×28, CIFAR 32×32) also set H×W. Gray sources other than digits (the MNIST
    family, gray timm data sets) train natively at 1 channel: a timm model is built with
    ``in_chans=1`` (torchvision models and modules of your own keep 3, the gray repeated). Digits keep the spec's channel count (gray repeated to 3 when the model wants 3).
    Folder sources resize to any size, so the spec's H×W stays. Where the data's H×W differs from
    the spec's, a model built by name is fitted to it by ``annify.sources.fit_input_size``: kept at
    the data's size where it runs there, rebuilt at it (timm's ``img_size``) where it accepts that,
    else the images are resized to the smallest size it accepts (or to the spec's); the note says which.
    """
    info = data_info(source)
    kind = parse_source(source)[0]
    c, h, w = spec.input_size
    kwargs = dict(spec.model_kwargs)
    timm_model = model_source(spec.model)[0] in ("timm", "hf-hub")  # others take no in_chans
    if info.input_size[0] == 1 and not SOURCES[kind].keeps_channels and timm_model:
        c = kwargs["in_chans"] = 1
    size = (c, *info.input_size[1:]) if SOURCES[kind].fixed_size else (c, h, w)
    how = ""
    if tuple(size[1:]) != (h, w) and model_source(spec.model)[0] != "module":
        from annify.sources import fit_input_size

        size, kwargs, how = fit_input_size(spec.model, size, info.num_classes, kwargs, fallback=(c, h, w))
        how = f"; {how}"
    if (
        info.num_classes == spec.num_classes
        and tuple(size) == tuple(spec.input_size)
        and kwargs == spec.model_kwargs
    ):
        return spec, None
    shape = "×".join(map(str, (size[0], *info.input_size[1:])))  # the data's H×W, the model's channels
    note = (
        f"note: {info.name} has {info.num_classes} classes at {shape}; rebuilding {spec.name} for it "
        f"(the spec says {spec.num_classes} classes at {'×'.join(map(str, spec.input_size))}){how}"
    )
    return replace(spec, num_classes=info.num_classes, input_size=tuple(size), model_kwargs=kwargs), note


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` (this process's GPU under torchrun) or ``cuda:N``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"unknown device '{device}'; use auto, cpu or cuda") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device}, but torch sees no CUDA device; use --device cpu")
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise DeviceError(f"unsupported device '{device}'; use auto, cpu or cuda")
    return dev


@torch.no_grad()
def evaluate(
    net: nn.Module,
    loader,
    device: torch.device | str = "cpu",
    amp: bool = False,
    channels_last: bool = False,
) -> Evaluation:
    """Top-1 error and mean cross-entropy of every output of ``net`` over ``loader``.

    Runs in eval mode and puts every module back in the mode it had. Under ``torch.distributed``
    the counts are summed over ranks, so give each rank its own shard of the split (every rank
    evaluating the whole split also gives the right numbers, just slower).

    Args:
        amp: bf16 autocast (CUDA).
        channels_last: feed images in channels-last memory format.
    """
    device = torch.device(device)
    modes = {m: m.training for m in net.modules()}
    net.eval()
    sums = None  # (2K + 1,) float64: wrong answers of each output, loss sums of each output, samples
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                outs = net(x)  # K × (B, num_classes)
            wrong = torch.stack([(o.argmax(1) != y).sum() for o in outs]).double()
            loss = torch.stack([F.cross_entropy(o.float(), y, reduction="sum") for o in outs]).double()
            batch = torch.cat([wrong, loss, loss.new_tensor([len(y)])])
            sums = batch if sums is None else sums + batch
    finally:
        for m, training in modes.items():
            m.training = training
    if sums is None:
        raise ValueError("evaluate got an empty loader")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    sums = sums.cpu()
    k, n = (len(sums) - 1) // 2, sums[-1].item()
    return Evaluation((sums[:k] / n).tolist(), (sums[k : 2 * k] / n).tolist(), int(n))


def evaluate_checkpoint(
    spec_path: str | os.PathLike,
    checkpoint: str | os.PathLike,
    data: str | None = None,
    batch_size: int = 256,
    device: str = "auto",
    workers: int = 0,
) -> list[dict]:
    """The anytime table (see ``anytime_table``) of a spec with a checkpoint's weights on val and test.

    ``data`` defaults to the spec's ``train.data`` (a run's config.yaml has it), else digits; the
    network is fitted to the data as the trainer does (``fit_to_data``), and FLOPs are counted at
    that input size.
    """
    from annify.run_dir import resolve

    res = resolve(spec_path, checkpoint)
    spec, checkpoint = res.spec, res.weights
    source = data or spec.train.get("data") or "digits"
    trained = spec.train.get("data")
    classes = data_info(source).num_classes
    if trained and classes != spec.num_classes:  # a run's config.yaml: its weights have its class count
        raise DataError(
            f"{source} has {classes} classes but the network in {spec_path} predicts {spec.num_classes} "
            f"(it was trained on {trained}); pass --data with {spec.num_classes} classes"
        )
    spec, _ = fit_to_data(spec, source)
    return evaluate_weights(spec, checkpoint, source, batch_size, device, workers)[1]


def evaluate_weights(
    spec: Spec,
    checkpoint: str | os.PathLike,
    source: str,
    batch_size: int = 256,
    device: str = "auto",
    workers: int = 0,
) -> tuple[Spec, list[dict]]:
    """(``spec`` with its costs at its input size, anytime table on val and test) of a checkpoint.

    ``spec`` must already fit the data ``source`` (see ``fit_to_data``); a checkpoint of another
    network gets a one-line ``ConvertError``.
    """
    from annify.convert import build, load_weights
    from annify.cost import count, with_costs

    net = build(spec)
    load_weights(net, checkpoint)
    costs = count(net, spec.input_size)
    spec = with_costs(spec, costs)
    dev = resolve_device(device)
    net.to(dev)
    datasets = build_datasets(source, input_size=spec.input_size, augment=False)
    loaders = make_batches({s: datasets[s] for s in ("val", "test")}, batch_size, workers=workers, device=dev)
    amp = dev.type == "cuda"
    val, test = (evaluate(net, loaders[s], dev, amp=amp) for s in ("val", "test"))
    return spec, anytime_table([h.node for h in spec.heads], costs.flops, val, test)


def anytime_table(
    nodes: Sequence[str], flops: Sequence[int], val: Evaluation, test: Evaluation | None = None
) -> list[dict]:
    """One row per output: output (1-based), node, flops, fraction, val_error, test_error."""
    rows = []
    for i, (node, f) in enumerate(zip(nodes, flops, strict=True)):
        rows.append(
            {
                "output": i + 1,
                "node": node,
                "flops": int(f),
                "fraction": round(f / flops[-1], 4),
                "val_error": val.errors[i],
                "test_error": None if test is None else test.errors[i],
            }
        )
    return rows


def save_table(rows: list[dict], folder: str | os.PathLike) -> None:
    """Write ``anytime.json`` and ``anytime.csv`` into ``folder`` (atomically)."""
    from annify.run_dir import RunDir

    run = RunDir(folder)
    atomic_write(run.anytime_json, json.dumps(rows, indent=1) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(run.anytime_csv, buf.getvalue())


def format_table(rows: list[dict]) -> str:
    """The anytime table as aligned text, errors in percent."""

    def pct(e: float | None) -> str:
        return "-" if e is None else f"{100 * e:.2f}"

    lines = [("output", "node", "flops", "fraction", "val err %", "test err %")]
    for r in rows:
        node = "model (own classifier)" if r["node"] == "model" else r["node"]
        lines.append(
            (
                str(r["output"]),
                node,
                format_flops(r["flops"]),
                f"{r['fraction']:.3f}",
                pct(r["val_error"]),
                pct(r["test_error"]),
            )
        )
    return format_rows(lines)


def kept_and_gained(rows: Sequence[dict], original: dict, split: str = "test") -> str:
    """One sentence: what a trained start kept (last output vs the original) and gained (earlier outputs)."""
    last, orig = rows[-1][f"{split}_error"], original[f"{split}_error"]
    first = rows[0]
    change = 100 * (last - orig)
    kept = "kept" if change <= 0.2 else "lost"
    return (
        f"{kept} the original network: its last output errs {100 * last:.2f} % on {split} against the "
        f"original's {100 * orig:.2f} % ({change:+.2f} points); gained {len(rows) - 1} earlier outputs, "
        f"the first at {first['fraction']:.0%} of the cost erring {100 * first[f'{split}_error']:.2f} %"
    )


def relative_to_opt(errors: Sequence[float], opt_errors: Sequence[float]) -> list[float]:
    """Relative increase of error over OPT, in percent, per output (the paper's Table 1).

    ``opt_errors[i]`` is the error of a network trained for output i alone (``--weights opt
    --head i``). 2.73 means 2.73% worse than OPT: an OPT error of 10% becomes 10.27%.
    """
    if len(errors) != len(opt_errors):
        raise ValueError(f"{len(errors)} errors but {len(opt_errors)} OPT errors")
    out = []
    for e, o in zip(errors, opt_errors, strict=True):
        out.append(100.0 * (e - o) / o if o > 0 else (0.0 if e == 0 else math.inf))
    return out


def nearest_outputs(
    fractions: Sequence[float], targets: Sequence[float] = (0.25, 0.5, 0.75, 1.0)
) -> list[int]:
    """Indices of the outputs whose cost fraction is nearest each target (Table 1's 1/4, 1/2, 3/4, 1)."""
    return [min(range(len(fractions)), key=lambda i: abs(fractions[i] - t)) for t in targets]


def plot_anytime(
    tables: dict[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike,
    title: str | None = None,
    marks: dict[str, tuple[float, float]] | None = None,
) -> None:
    """Error (%) against cumulative FLOPs, one line per table, log-scale FLOPs; written atomically.

    Args:
        tables: label -> [(flops, error as a fraction), ...] in output order.
        marks: label -> one (flops, error) point drawn as a star (the original network a run started from).
    """
    fig, ax = figure(title=title)
    for label, points in tables.items():
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, [100 * y for y in ys], marker="o", label=label)
    for label, (x, y) in (marks or {}).items():
        ax.plot([x], [100 * y], marker="*", markersize=14, linestyle="none", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs (fvcore, cumulative)")
    ax.set_ylabel("top-1 error (%)")
    ax.legend()
    save_figure(fig, path)


def plot_weights(
    history: Sequence[tuple[float, Sequence[float]]],
    path: str | os.PathLike,
    xlabel: str = "epoch",
    title: str | None = None,
) -> None:
    """Each output's loss weight over training, from ``[(x, [w_1, ..., w_K]), ...]``; written atomically."""
    if not history:
        raise ValueError("plot_weights needs at least one point")
    fig, ax = figure(title=title)
    xs = [x for x, _ in history]
    for i in range(len(history[0][1])):
        ax.plot(xs, [w[i] for _, w in history], marker=".", label=f"output {i + 1}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss weight")
    ax.legend(fontsize="small", ncol=2)
    save_figure(fig, path)
