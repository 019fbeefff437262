"""The ``train`` and ``eval`` commands (registered in ``annify.cli``)."""

from __future__ import annotations

import click
import yaml

from annify._cli_common import cpu_options, device_options, friendly, registry_choice, setting_help
from annify.config import TEACHERS
from annify.data import sources_help

SCHEME_HELP = "Loss weighting: a weight scheme of annify.weighting's registry, an unknown name lists them"
DATA_HELP = sources_help()  # every registered data source, as written: digits | fashion-mnist[:PATH] | ...


def _hparams(values: tuple[str, ...]) -> dict | None:
    """('gamma=0.07', 'period=10') -> {'gamma': 0.07, 'period': 10}."""
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(
                f"expected KEY=VALUE such as gamma=0.07, got '{item}'", param_hint="--hparam"
            )
        out[key.strip()] = yaml.safe_load(value)
    return out or None


@click.command("train")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--data", help=f"Data source: {DATA_HELP} (default: the spec's train.data, else digits).")
@click.option("--weights", metavar="SCHEME", help=setting_help(SCHEME_HELP, "weights"))
@click.option(
    "--head",
    type=int,
    help=setting_help("With --weights opt: the output to train, 1-based", "head", none="the last"),
)
@click.option(
    "--hparam", multiple=True, help="Weight-scheme hyperparameter KEY=VALUE, e.g. gamma=0.07 (repeatable)."
)
@click.option("--epochs", type=int, help=setting_help("Epochs", "epochs"))
@click.option("--batch-size", type=int, help=setting_help("Images per step and process", "batch_size"))
@click.option("--lr", type=float, help=setting_help("Initial learning rate of the trunk", "lr"))
@click.option(
    "--seed", type=int, help=setting_help("Seed of initialization, data order and augmentation", "seed")
)
@click.option("--out", help="Run folder (default: runs/<spec file name>).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from checkpoints/last.")
@click.option(
    "--module",
    "module_ref",
    metavar="FILE_OR_PACKAGE:CALLABLE",
    help="For a spec converted from a module of your own (model: module:NAME): the callable, named by you "
    "here (a spec never names code), that builds it, e.g. my_net.py:MyNet or mypkg.nets:make_net.",
)
@click.option(
    "--init",
    help=setting_help(
        "Start from the network you have: 'timm' (its pretrained weights), a run folder, a checkpoint folder "
        "or a .safetensors/.pth file; it is measured beside every output, and a trained start has its own "
        "defaults (annify.config.INIT_DEFAULTS)",
        "init",
        none="a fresh network",
    ),
)
@click.option(
    "--freeze-trunk",
    is_flag=True,
    default=None,
    help=setting_help("Train the added heads only (the last output stays exact)", "freeze_trunk"),
)
@click.option(
    "--head-lr",
    type=click.FloatRange(0),
    help=setting_help("The added heads' learning rate", "head_lr", none="--lr"),
)
@click.option(
    "--head-epochs",
    type=float,
    help=setting_help(
        "Train the heads alone on the frozen trunk first: N epochs, or a fraction < 1 of --epochs (two-phase)",
        "head_epochs",
    ),
)
@click.option(
    "--teacher",
    type=click.Choice(TEACHERS),
    help=setting_help(
        "With --distill GAMMA, what outputs also learn from: original (the --init network; every output) or "
        "last (the last output; the earlier ones)",
        "teacher",
        none="last",
    ),
)
@click.option(
    "--bn-recalibrate",
    type=click.IntRange(0),
    help=setting_help(
        "Recompute BatchNorm statistics on N training images after each epoch (0: off)", "bn_recalibrate"
    ),
)
@click.option(
    "--head-local/--no-head-local",
    default=None,
    help="Weights scale only the gradient each head sends into the trunk; heads learn at full weight "
    "(default: the spec's train.head_local, else on for adaloss and off for the other schemes).",
)
@click.option(
    "--distill",
    type=click.FloatRange(0, 1),
    help=setting_help(
        "GAMMA: earlier outputs learn (1-GAMMA)*CE + GAMMA*T^2*KL from the last output (0: off)", "distill"
    ),
)
@click.option(
    "--distill-temperature",
    type=click.FloatRange(0, min_open=True),
    help=setting_help("T of --distill", "distill_temperature"),
)
@click.option(
    "--train-subset",
    type=click.IntRange(1),
    help=setting_help("Train on a fixed subset of N training images", "train_subset", none="all"),
)
@click.option(
    "--loader",
    type=registry_choice("annify.data", "LOADERS"),
    metavar="LOADER",
    default="auto",
    show_default=True,
    help="tensor: in-memory data held on the device, batches made there; dataloader: torch DataLoader.",
)
@click.option(
    "--compile",
    "compile_",
    is_flag=True,
    help="torch.compile the network (inductor): a minute or more to start, then the fastest steps (the CIFAR "
    "ResANN on a CPU: its heads add 3% to a step instead of 10%). Needs a C++ compiler on the CPU.",
)
@click.option("--amp/--no-amp", default=None, help="bf16 autocast (default: on for CUDA, off for the CPU).")
@click.option(
    "--channels-last/--no-channels-last",
    default=None,
    help="channels-last memory format (default: on for CUDA, off for the CPU).",
)
@device_options
@cpu_options
@friendly
def train(
    spec, data, weights, head, hparam, epochs, batch_size, lr, seed, out, resume, init, freeze_trunk,
    module_ref, head_lr, head_epochs, teacher, bn_recalibrate, head_local, distill, distill_temperature,
    train_subset, loader, compile_, amp, channels_last, device, workers,
):  # fmt: skip
    """Train the anytime network SPEC and write a run folder.

    The run folder holds config.yaml (the resolved spec and settings), metrics.jsonl (one line per
    epoch), checkpoints/last and checkpoints/best, anytime.json/.csv (error of every output on val
    and test, with its FLOPs) and the plots anytime.png and weights.png. Settings come from the
    spec's train: section, overridden by these options. Under torchrun every process trains a
    shard of each batch (DistributedDataParallel).

    \b
    Example: annify train specs/cifar_resann_n7_c16.yaml --data digits --epochs 10 --out runs/digits
    Example: annify train specs/cifar_resann_n7_c16.yaml --data fashion-mnist --train-subset 10000 \\
               --epochs 15 --out runs/fmnist
    Example: torchrun --nproc_per_node 2 -m annify train specs/cifar_resann_n7_c16.yaml \\
               --data cifar10:data/cifar-10-batches-py --out runs/c10
    """
    from pathlib import Path

    from annify.evaluate import format_table, kept_and_gained
    from annify.train import train as run_train

    result = run_train(
        spec,
        model=None if module_ref is None else _own_module(module_ref),
        out=out or Path("runs") / Path(spec).stem,
        data=data,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weights=weights,
        weight_hparams=_hparams(hparam),
        head=head,
        seed=seed,
        init=init,
        freeze_trunk=freeze_trunk,
        head_lr=head_lr,
        head_epochs=None if head_epochs is None else (int(head_epochs) if head_epochs >= 1 else head_epochs),
        teacher=teacher,
        bn_recalibrate=bn_recalibrate,
        head_local=head_local,
        distill=distill,
        distill_temperature=distill_temperature,
        train_subset=train_subset,
        loader=loader,
        device=device,
        amp=amp,
        channels_last=channels_last,
        compile=compile_,
        resume=resume,
        workers=workers,
        log=click.echo,
    )
    if result.rank == 0:
        click.echo(format_table(result.table + ([result.original] if result.original else [])))
        if result.original:
            click.echo(kept_and_gained(result.table, result.original))
        click.echo(f"wrote {result.out} ({result.epochs_done} epochs, {result.seconds:.1f} s)")


def _own_module(ref: str):
    """The module that ``FILE_OR_PACKAGE:CALLABLE`` builds (called with no arguments), imported as the user asked."""
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    from torch import nn

    where, sep, name = ref.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise click.BadParameter(f"expected FILE_OR_PACKAGE:CALLABLE such as my_net.py:MyNet, got '{ref}'")
    try:
        if where.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            if spec is None or not Path(where).is_file():
                raise FileNotFoundError(f"no such file {where}")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        else:
            sys.path.insert(0, str(Path.cwd()))  # a package beside the command, as `python -m` finds it
            mod = importlib.import_module(where)
        model = getattr(mod, name)()
    except Exception as e:  # the user's code: any failure is theirs to see, in one line
        raise click.BadParameter(f"{ref}: {type(e).__name__}: {e}", param_hint="--module") from None
    if not isinstance(model, nn.Module):
        raise click.BadParameter(
            f"{ref}() returned {type(model).__name__}, not a torch nn.Module", param_hint="--module"
        )
    return model


@click.command("eval")
@click.argument("spec", type=click.Path())
@click.option(
    "--checkpoint",
    help="Weights: a run folder, a checkpoint folder or a .safetensors file (default: SPEC, when it is a run "
    "folder).",
)
@click.option("--data", help=f"Data source: {DATA_HELP} (default: the spec's train.data, else digits).")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Images per batch.")
@device_options
@cpu_options
@friendly
def eval_(spec, checkpoint, data, batch_size, device, workers):
    """Print the anytime table of SPEC with CHECKPOINT's weights: every output's error on val and test.

    Columns: output, the node its head reads, cumulative FLOPs (fvcore), fraction of the whole
    network's FLOPs, top-1 error (%) on the validation and test splits.

    SPEC may be a run folder: its config.yaml, and its last checkpoint unless --checkpoint says otherwise.

    \b
    Example: annify eval runs/digits/config.yaml --checkpoint runs/digits/checkpoints/last
    Example: annify eval runs/digits
    """
    from pathlib import Path

    from annify.evaluate import evaluate_checkpoint, format_table
    from annify.run_dir import CONFIG

    if Path(spec).is_dir():
        spec, checkpoint = Path(spec) / CONFIG, checkpoint or spec
    if checkpoint is None:
        from annify.spec import load_spec

        load_spec(spec)  # a missing or malformed spec is the first thing to fix
        raise click.UsageError("pass --checkpoint (a run folder, a checkpoint folder or a .safetensors file)")
    rows = evaluate_checkpoint(
        spec, checkpoint, data=data, batch_size=batch_size, device=device, workers=workers
    )
    click.echo(format_table(rows))
