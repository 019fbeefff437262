"""The ``eann`` command (registered in ``annify.cli``)."""

from __future__ import annotations

import click

from annify._cli_common import cpu_options, device_options, friendly, setting_help, writable_dir
from annify.cli_train import DATA_HELP, SCHEME_HELP


@click.command("eann")
@click.argument("members", nargs=-1, required=True)
@click.option("--data", help=f"Data source: {DATA_HELP} (default: the first spec's train.data, else digits).")
@click.option("--epochs", type=int, help=setting_help("Epochs per member", "epochs", init=False))
@click.option("--weights", metavar="SCHEME", help=setting_help(SCHEME_HELP, "weights", init=False))
@click.option(
    "--checkpoints",
    "--checkpoint",
    "checkpoints",
    multiple=True,
    help="Use these weights instead of training: one per member, in order (repeat the option). "
    "A .safetensors file, a folder with model.safetensors, or a run folder (its checkpoints/last).",
)
@click.option(
    "--plain",
    is_flag=True,
    help="Train plain networks (--weights opt, final output only) for the linear-ensemble baseline "
    "(default: each ANN's final output stands in for its plain network).",
)
@click.option("--batch-size", type=int, help=setting_help("Images per step", "batch_size", init=False))
@click.option("--lr", type=float, help=setting_help("Initial learning rate", "lr", init=False))
@click.option("--seed", type=int, help=setting_help("Seed of every member's training", "seed", init=False))
@click.option(
    "--train-subset",
    type=click.IntRange(1),
    help=setting_help(
        "Train every member on a fixed subset of N training images", "train_subset", none="all", init=False
    ),
)
@click.option("--out", default="runs/eann", show_default=True, help="Output folder.")
@click.option("--resume", is_flag=True, help="Continue (or reuse) the member runs already in --out.")
@click.option(
    "--force", is_flag=True, help="Replace the EANN results (eann.json, eann.png) already in --out."
)
@device_options
@cpu_options
@friendly
def eann(
    members,
    data,
    epochs,
    weights,
    checkpoints,
    plain,
    batch_size,
    lr,
    seed,
    train_subset,
    out,
    resume,
    force,
    device,
    workers,
):
    """Train the anytime networks MEMBERS, smallest first, and assemble them into an EANN.

    An EANN runs ANNs of exponentially growing cost one after another; each output is used only if
    it beats every earlier one on validation (Hu et al., AAAI 2019, Sec. 4).

    Each member is a timm model name, converted with the paper's head placement for its family
    (CIFAR ResANNs: every unit, every third for n >= 25; resnet26/50: every 2nd block; resnet101:
    every 3rd; densenet169: every 14th layer from the 12th; other models: 4 outputs spaced by cost),
    or a spec file or run folder. Members train into OUT/members/<name>/ unless --checkpoints
    gives their weights. Prints the schedule (the EANN's FLOPs at every member output, the output's
    own errors, whether it is used, and the test error in force), the depth ratio b, the measured
    cost inflation C against the best single member and Proposition 4.1's bounds on it; writes
    OUT/eann.json and OUT/eann.png (the EANN, each member alone and the linear ensemble).

    \b
    Example: annify eann cifar_resnet_n7_c16 cifar_resnet_n13_c16 cifar_resnet_n25_c16 \\
               --epochs 20 --out runs/eann
    Example: annify eann runs/eann/members/cifar_resann_n7_c16 runs/eann/members/cifar_resann_n13_c16 \\
               --checkpoints runs/eann/members/cifar_resann_n7_c16 \\
               --checkpoints runs/eann/members/cifar_resann_n13_c16 --out runs/eann2
    """
    from annify.eann import format_eann
    from annify.eann_run import run_eann

    folder = writable_dir(out)  # fail before the slow part
    run = run_eann(
        list(members),
        out=folder,
        data=data,
        epochs=epochs,
        weights=weights,
        checkpoints=list(checkpoints) or None,
        plain=plain,
        seed=seed,
        batch_size=batch_size,
        lr=lr,
        device=device,
        resume=resume,
        force=force,
        workers=workers,
        train_subset=train_subset,
        log=click.echo,
    )
    click.echo(format_eann(run.summary))
    click.echo(f"wrote {folder / 'eann.json'} and {folder / 'eann.png'}")
