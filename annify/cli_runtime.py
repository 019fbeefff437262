"""The ``predict`` and ``export`` commands: anytime inference on image files, and deployable files."""

from __future__ import annotations

import json
from pathlib import Path

import click

from annify._cli_common import (
    checkpoint_option,
    cpu_options,
    finite_positive,
    friendly,
    registry_choice,
    writable_dir,
)
from annify.report import format_flops


def _floats(ctx, param, value: str | None) -> list[float] | None:
    """'0.5' or '0.485,0.456,0.406' -> a list of floats."""
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"expected numbers separated by commas, got '{value}'", param=param
        ) from None


normalization_options = [
    click.option(
        "--mean",
        callback=_floats,
        help="Per-channel mean the network was trained with (default: the run's data.json).",
    ),
    click.option(
        "--std",
        callback=_floats,
        help="Per-channel std the network was trained with (default: the run's data.json).",
    ),
]


def with_normalization(fn):
    for opt in reversed(normalization_options):
        fn = opt(fn)
    return fn


def _resolve(spec, checkpoint, mean, std):
    """The run-aware spec, weights and normalisation (``annify.run_dir.resolve``), notes printed."""
    from annify.convert import build, load_weights
    from annify.run_dir import resolve

    res = resolve(spec, checkpoint, mean, std, need_normalization=True)
    if res.note:
        click.echo(res.note, err=True)
    net = build(res.spec)
    load_weights(net, res.weights)
    return net, res


def _calibrated(res) -> dict | None:
    """The run's ``thresholds.json`` (checked to fit its weights) as a dict, if it has one."""
    import json as json_

    from annify.calibrate import read_thresholds
    from annify.run_dir import RunDir

    if res.run is None or not RunDir(res.run).thresholds.is_file():
        return None
    return json_.loads(read_thresholds(res.run, res.weights).to_json())


def _read_labels(path: str | None) -> list[str] | None:
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise click.ClickException(
            f"--labels {path} is not a text file; give a UTF-8 text file with one class name per line"
        ) from None
    return [line.strip() for line in text.splitlines() if line.strip()]


@click.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path())
@checkpoint_option
@click.option(
    "--budget-flops",
    type=float,
    callback=finite_positive,
    help="Per-image FLOP budget: the latest output that fits (e.g. 2e9).",
)
@click.option(
    "--deadline-ms",
    type=float,
    callback=finite_positive,
    help="Wall-clock deadline per image: the latest output ready by then.",
)
@click.option(
    "--early-exit",
    is_flag=True,
    help="Exit at the first output confident enough, by the run's thresholds.json (`annify calibrate`).",
)
@click.option("--topk", default=5, show_default=True, type=click.IntRange(min=1), help="Classes to print.")
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False),
    help="Text file with one class name per line (default: class indices).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list instead of text.")
@with_normalization
@cpu_options
@friendly
def predict(
    spec, images, checkpoint, budget_flops, deadline_ms, early_exit, topk, labels, as_json, mean, std
):
    """Classify IMAGE files with the anytime network SPEC, within a FLOP budget or a deadline.

    Each image is resized, center-cropped and normalized for the spec's model, then run segment by
    segment. Without --budget-flops or --deadline-ms every output is computed and the last is used;
    with --early-exit each image stops at its first output confident enough (calibrated thresholds).
    The deadline is checked between segments, after one untimed warm-up pass; an image whose first
    output was not ready in time still gets it, marked LATE. Prints the top-k classes, the output
    used (1-based) and the FLOPs spent per image; --json gives the 0-based output_index.

    \b
    Example: annify predict specs/cifar_resann_n7_c16.yaml --checkpoint runs/digits --budget-flops 2e6 digit.png
    Example: annify predict specs/cifar_resann_n7_c16.yaml --checkpoint runs/digits --early-exit digit.png
    """
    import torch

    from annify.freeze import freeze
    from annify.images import image_transform, load_image
    from annify.runtime import AnytimeRunner

    if early_exit and (budget_flops is not None or deadline_ms is not None):
        raise click.UsageError("--early-exit stops by confidence: drop --budget-flops and --deadline-ms")
    names = _read_labels(labels)
    net, res = _resolve(spec, checkpoint, mean, std)
    net = freeze(net)  # inference only: the same outputs bit for bit, less time per segment
    exit_thresholds = None
    if early_exit:
        from annify.calibrate import read_thresholds

        if res.run is None:
            raise click.UsageError("--early-exit reads the run's thresholds.json: --checkpoint a run folder")
        exit_thresholds = read_thresholds(res.run, res.weights).thresholds
    runner = AnytimeRunner(net)
    if budget_flops is not None:
        runner.select(budget_flops)  # fail on a budget below the first output before reading images
    transform = image_transform(net.spec, res.mean, res.std)  # once, not per image
    inputs = [load_image(path, net.spec, transform=transform) for path in images]
    if deadline_ms is not None:  # one untimed pass, so the first image does not pay for warm-up
        for _ in runner.steps(inputs[0].unsqueeze(0)):
            pass
    rows = []
    for path, x in zip(images, inputs, strict=True):
        if exit_thresholds is not None:
            result = _exit_early(net, x.unsqueeze(0), exit_thresholds)
        else:
            result = runner.run(x.unsqueeze(0), budget_flops=budget_flops, deadline_ms=deadline_ms)
        probs = torch.softmax(result.logits[0].float(), dim=-1)
        top = probs.topk(min(topk, probs.numel()))
        rows.append(
            {
                "image": str(path),
                "output_index": result.output_index,
                "num_outputs": net.num_outputs,
                "flops": result.flops_spent,
                "elapsed_ms": round(result.elapsed_ms, 3),
                "late": result.late,
                "topk": [
                    {
                        "class": int(c),
                        **({"label": names[c]} if names and c < len(names) else {}),
                        "prob": float(p),
                    }
                    for p, c in zip(top.values.tolist(), top.indices.tolist(), strict=True)
                ],
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        classes = ", ".join(f"{t.get('label', t['class'])} ({t['prob']:.3f})" for t in row["topk"])
        late = " LATE" if row["late"] else ""
        click.echo(
            f"{row['image']}: {classes} | output {row['output_index'] + 1}/{row['num_outputs']}, "
            f"{format_flops(row['flops'])} FLOPs, {row['elapsed_ms']:.1f} ms{late}"
        )


def _exit_early(net, x, thresholds):
    """``annify.early_exit`` on one image, as the ``AnytimeResult`` the printing code reads."""
    import time

    from annify.early_exit import early_exit
    from annify.runtime import AnytimeResult

    start = time.perf_counter()
    logits, exit_at, flops = early_exit(net, x, thresholds)
    elapsed = (time.perf_counter() - start) * 1000
    k = int(exit_at[0])
    computed = 1 + sum(t <= 1 for t in thresholds[:k])  # a threshold above 1 skips its head
    return AnytimeResult(logits, k, None, float(flops[0]), elapsed, outputs_computed=computed)


@click.command("export")
@click.argument("spec", type=click.Path(dir_okay=False))
@checkpoint_option
@click.option(
    "--format",
    "fmt",
    type=registry_choice("annify.export", "FORMATS", "all"),
    metavar="FORMAT",
    default="all",
    show_default=True,
    help="File format to write (annify.export.FORMATS; an unknown name lists them), or all of them.",
)
@click.option("--out", default="export", show_default=True, help="Output folder.")
@click.option(
    "--no-check",
    is_flag=True,
    help="Skip running each file against PyTorch (within 1e-4 of the output's scale).",
)
@with_normalization
@cpu_options
@friendly
def export_command(spec, checkpoint, fmt, out, no_check, mean, std):
    """Export SPEC's truncated networks and segments to ONNX and/or TorchScript, with manifest.json.

    NAME_out{k} maps the image to output k (0-based); NAME_seg{j} runs segment j from the carried
    tensors. Each file is checked against PyTorch unless --no-check.

    Example: annify export specs/cifar_resann_n7_c16.yaml --checkpoint runs/digits --format onnx --out export/
    """
    from annify.export import FORMATS, export

    folder = writable_dir(out)
    net, res = _resolve(spec, checkpoint, mean, std)
    manifest = export(
        net, folder, formats=FORMATS if fmt == "all" else (fmt,), check=not no_check,
        preprocessing={"mean": res.mean, "std": res.std}, early_exit=_calibrated(res),
    )  # fmt: skip
    for f in manifest["files"]:
        checked = "" if f["max_abs_diff"] is None else f"  max diff {f['max_abs_diff']:.1e}"
        click.echo(
            f"{folder / f['path']}  {f['kind']} {f['output']}  {format_flops(f['flops'])} FLOPs{checked}"
        )
    if not manifest["segments_exported"]:
        click.echo("segments carry non-tensor values: exported the truncated networks only")
    click.echo(f"wrote {folder / 'manifest.json'}")
