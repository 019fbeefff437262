"""The ``annify`` command line: one short command per pipeline stage.

Each command parses its options, calls one library function and prints the result. User mistakes
become one-line errors with a non-zero exit, never tracebacks.
"""

from __future__ import annotations

import click

from annify._cli_common import cpu_options, finite_positive, friendly, parse_size, writable_dir
from annify.report import format_flops, format_rows


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="annify")
def main() -> None:
    """Turn any timm model into an anytime neural network: convert, train, eann, predict."""


model_options = [
    click.option("--input-size", help="C,H,W to trace and cost at (default: the model's pretrained config)."),
    click.option(
        "--num-classes", type=click.IntRange(1), help="Classes for every output (default: the model's)."
    ),
    click.option("--in-chans", type=int, help="Input channels passed to timm.create_model."),
]


def with_model_options(fn):
    for opt in reversed(model_options):
        fn = opt(fn)
    return fn


def _kwargs(in_chans, size=None):
    """``model_kwargs`` for the CLI's --in-chans, taking the channel count of --input-size when it differs
    from the usual 3 (so ``--input-size 1,224,224`` builds a 1-channel model)."""
    if in_chans is not None and in_chans < 1:
        raise click.BadParameter(f"must be a positive integer, got {in_chans}", param_hint="--in-chans")
    if size is not None and in_chans is not None and size[0] != in_chans:
        raise click.BadParameter(
            f"--input-size has {size[0]} channels but --in-chans is {in_chans}; make them agree",
            param_hint="--in-chans",
        )
    if in_chans is None and size is not None and size[0] != 3:
        in_chans = size[0]
    return {"in_chans": in_chans} if in_chans else {}


@main.command()
@click.argument("model")
@with_model_options
@cpu_options
@friendly
def inspect(model, input_size, num_classes, in_chans):
    """List MODEL's candidate tap points in execution order, with their cost.

    MODEL is a timm name, hf-hub:ORG/NAME (timm, from the Hugging Face Hub) or torchvision:NAME.
    Columns: kind, 1-based block index, graph node, module path, feature layout (NCHW, NHWC or
    tokens NLC), channels, spatial size or token count, cumulative trunk FLOPs (fvcore: one
    multiply-add = 1 FLOP) and the fraction of the whole model. Kinds: `block` is a block output
    (what --every counts); `trunk` is a finer point every path through the network passes
    (--heads and --flops-period use these and the blocks); `in-branch` is a block output inside one
    branch of a larger block, which only --every and --at use.

    Example: annify inspect resnet50
    """
    from annify.placement import inspect_model

    kw = _kwargs(in_chans, parse_size(input_size))
    if num_classes:
        kw["num_classes"] = num_classes
    taps, cum, total = inspect_model(model, parse_size(input_size), **kw)
    rows = [("kind", "block", "node", "module", "layout", "channels", "size", "flops", "fraction")]
    for t, c in zip(taps, cum):
        size = "x".join(str(s) for s in t.spatial)
        block = "-" if t.index is None else str(t.index)
        fraction = f"{c / total:.3f}"
        rows.append(
            (
                t.kind,
                block,
                t.node,
                t.module or "-",
                t.layout,
                str(t.channels),
                size,
                format_flops(c),
                fraction,
            )
        )
    rows.append(("", "", "(whole model)", "", "", "", "", format_flops(total), "1.000"))
    click.echo(format_rows(rows, left=(0, 2, 3, 4)))


def print_cost_table(spec) -> None:
    """Per-output cost table of a spec."""
    rows = [("output", "node", "flops", "fraction", "single-exit", "params")]
    for i, h in enumerate(spec.heads, 1):
        node = "model (own classifier)" if h.node == "model" else h.node
        rows.append(
            (
                i,
                node,
                format_flops(h.flops),
                f"{h.fraction:.3f}",
                format_flops(h.flops_single),
                format_flops(h.params),
            )
        )
    click.echo(format_rows(rows))


@main.command()
@click.argument("model")
@click.option("--every", type=int, help="A head after blocks S, S+K, ... (K = --every).")
@click.option("--start", type=int, help="First block with a head, 1-based (default: K).")
@click.option(
    "--at", "at", multiple=True, help="A head at this node or glob (repeatable); see `annify inspect`."
)
@click.option(
    "--flops-period",
    type=float,
    callback=finite_positive,
    help="A head at each multiple P of the total cost (P<=1: fraction; P>1: FLOPs).",
)
@click.option("--heads", type=int, help="N outputs spaced evenly by cost (the last is the classifier).")
@click.option(
    "--head-type",
    metavar="HEAD_TYPE",
    help="Head type for the added heads: one of annify.heads' registry, an unknown name lists them "
    "(default: by feature layout).",
)
@click.option(
    "--name", help="Spec name (default: resnet50 -> resann50, densenet169 -> denseann169, else <model>_ann)."
)
@click.option("--out", default="zoo", show_default=True, help="Output folder, or a .yaml path.")
@click.option("--force", is_flag=True, help="Replace an existing spec file that differs from the new one.")
@with_model_options
@cpu_options
@friendly
def convert(
    model, every, start, at, flops_period, heads, head_type, name, out, force, input_size, num_classes,
    in_chans,
):  # fmt: skip
    """Convert MODEL into an anytime network and write its spec.

    MODEL is a timm name, hf-hub:ORG/NAME (timm, from the Hugging Face Hub), torchvision:NAME
    (torchvision's model registry, fresh weights), or a YAML spec whose `heads` list the nodes
    (placement by spec): the network it describes is built and its costs are filled in. A module
    of your own is converted in Python: annify.convert(module, heads=4).

    Example: annify convert resnet50 --every 2 --out zoo/
    """
    from pathlib import Path

    from annify._files import atomic_write
    from annify.convert import convert as run_convert
    from annify.spec import SpecError, dump

    out_path = Path(out)
    folder = out_path.parent if out_path.suffix in (".yaml", ".yml") else out_path
    writable_dir(folder)  # fail before the slow part
    if model.endswith((".yaml", ".yml")):
        from annify.convert import convert_spec
        from annify.spec import load_spec

        placement = dict(every=every, start=start, at=at, flops_period=flops_period, heads=heads)
        given = [k for k, v in placement.items() if v]
        if given:
            raise click.UsageError(f"the spec already places its heads; drop --{given[0].replace('_', '-')}")
        _, spec, costs = convert_spec(load_spec(model))
        model = spec.model
    else:
        _, spec, costs = run_convert(
            model,
            every=every,
            start=start,
            at=list(at) or None,
            flops_period=flops_period,
            heads=heads,
            input_size=parse_size(input_size),
            num_classes=num_classes,
            model_kwargs=_kwargs(in_chans, parse_size(input_size)),
            head_type=head_type,
            name=name,
        )
    target = out_path if out_path.suffix in (".yaml", ".yml") else folder / f"{spec.name}.yaml"
    if target.exists() and not force and target.resolve() != Path(model).resolve():
        from annify.spec import load_spec

        try:
            same = load_spec(target) == spec
        except SpecError:
            same = False
        if not same:
            raise click.ClickException(
                f"{target} already holds a different spec; pass --force to replace it or choose another --out"
            )
    header = f"annify train {target}\n{spec.name}: {model} with {len(spec.heads)} outputs, written by `annify convert`"
    atomic_write(target, dump(spec, header))
    print_cost_table(spec)
    if costs.unsupported:
        skipped = ", ".join(f"{k} ({v})" for k, v in sorted(costs.unsupported.items()))
        click.echo(f"fvcore does not count: {skipped}")
    click.echo(f"wrote {target}")


@main.command()
@click.option("--out", default="runs/demo", show_default=True, help="Output folder.")
@click.option(
    "--model",
    default="cifar_resnet_n3_c8",
    show_default=True,
    help="Any timm model (the default: the paper's CIFAR-style ResNet), fitted to the data's image size; "
    "the log says how.",
)
@click.option(
    "--data",
    default="digits",
    show_default=True,
    help="digits (embedded), or fashion-mnist (apt-get install dataset-fashion-mnist) or any in-memory source.",
)
@click.option(
    "--train-subset",
    type=click.IntRange(1),
    help="Train on a fixed subset of N images (default: all; fashion-mnist: 5000 keeps the demo near 5 min).",
)
@click.option(
    "--epochs", default=15, show_default=True, type=click.IntRange(1), help="Epochs per training run."
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--eann/--no-eann",
    default=True,
    show_default=True,
    help="Also build an EANN of ResANNs of doubling depth.",
)
@click.option("--force", is_flag=True, help="Replace results in --out that are not a demo's.")
@cpu_options
@friendly
def demo(out, model, data, train_subset, epochs, seed, eann, force):
    """The main job: convert a CIFAR-style ResANN (or --model) for the data, train it with annify's default
    weighting, with CONST and with the paper's AdaLoss, print the anytime tables side by side with
    a sentence on what they show, and plot them; then train an EANN of three ResANNs of doubling
    depth and print its schedule and cost inflation beside Proposition 4.1. Running it again
    resumes (or reprints) the runs in --out.

    \b
    Example: annify demo --out runs/demo
    Example: annify demo --data fashion-mnist --train-subset 5000 --epochs 6 --no-eann --out runs/demo-fmnist
    Example: annify demo --model vit_tiny_patch16_224 --epochs 3 --no-eann --out runs/demo-vit
    """
    from annify.demo import demo as run_demo

    writable_dir(out)
    from annify.demo import EANN_MEMBERS

    run_demo(
        out, model=model, epochs=epochs, data=data, train_subset=train_subset, seed=seed,
        eann=EANN_MEMBERS if eann else (), log=click.echo, force=force,
    )  # fmt: skip


# Every command of the later stages, registered by name: (command, module, function). The modules hold
# only click code (torch loads when a command runs), so importing them all keeps `annify --help` light;
# one that fails to import is an error naming its command, never a command quietly missing.
STAGE_COMMANDS = (
    ("train", "annify.cli_train", "train"),
    ("eval", "annify.cli_train", "eval_"),
    ("eann", "annify.cli_eann", "eann"),
    ("predict", "annify.cli_runtime", "predict"),
    ("export", "annify.cli_runtime", "export_command"),
    ("calibrate", "annify.cli_deploy", "calibrate"),
    ("serve", "annify.cli_deploy", "serve"),
)


def add_commands(group: click.Group, commands=STAGE_COMMANDS) -> None:
    """Add each ``(name, module, function)`` command to ``group`` under its name.

    Raises:
        ImportError: a command's module or function cannot be loaded; the message names the command.
    """
    import importlib

    for name, module, function in commands:
        try:
            command = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError) as e:
            raise ImportError(
                f"annify cannot register its command '{name}' ({module}.{function}): {type(e).__name__}: {e}"
            ) from e
        group.add_command(command, name)


add_commands(main)
