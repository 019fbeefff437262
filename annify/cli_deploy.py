"""The ``calibrate`` and ``serve`` commands: exit thresholds with a guarantee, and the anytime server."""

from __future__ import annotations

import click

from annify._cli_common import cpu_options, friendly
from annify.report import format_flops


def _unit_interval(ctx, param, value: float) -> float:
    if not 0 < value < 1:
        raise click.BadParameter(f"must be between 0 and 1 (exclusive), got {value}", param=param)
    return value


@click.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--epsilon", default=0.05, show_default=True, type=float, callback=_unit_interval,
    help="The risk to stay under: e.g. 0.02 = at most 2% of answers differ from the full network's.",
)  # fmt: skip
@click.option(
    "--delta", default=0.1, show_default=True, type=float, callback=_unit_interval,
    help="ltt: the chance the guarantee fails (over the draw of the validation set).",
)  # fmt: skip
@click.option(
    "--risk", type=click.Choice(["consistency", "accuracy-gap"]), default="consistency", show_default=True,
    help="consistency: the exit's class differs from the last output's (no labels used); accuracy-gap: "
    "the exit is wrong where the last output is right.",
)  # fmt: skip
@click.option(
    "--method", type=click.Choice(["ltt", "crc"]), default="ltt", show_default=True,
    help="ltt: Learn-then-Test, P(risk <= epsilon) >= 1 - delta; crc: conformal risk control, "
    "E[risk] <= epsilon.",
)  # fmt: skip
@click.option(
    "--batch-size", type=click.IntRange(1), default=256, show_default=True, help="Images per batch."
)
@cpu_options
@friendly
def calibrate(run, epsilon, delta, risk, method, batch_size):
    """Choose RUN's early-exit threshold with a guarantee on its validation split; write RUN/thresholds.json.

    A sample exits at its first output whose max softmax reaches the threshold. Learn-then-Test
    (Hoeffding-Bentkus p-values, fixed-sequence testing from the most conservative threshold) or
    conformal risk control picks the most aggressive threshold whose risk is within --epsilon. The
    test split only reports the risk achieved. `annify predict --early-exit`, `annify export`
    (manifest.json) and `annify serve` use the file.

    \b
    Example: annify calibrate runs/digits --epsilon 0.05 --delta 0.1
    Example: annify calibrate runs/digits --risk accuracy-gap --method crc --epsilon 0.02
    """
    from annify.calibrate import calibrate_run

    cal, path = calibrate_run(run, risk, method, epsilon, delta, batch_size)
    share = cal.expected_flops / cal.full_flops
    if not cal.valid:
        click.echo(
            f"no threshold keeps {risk} risk <= {epsilon:g} on {cal.n} validation images "
            f"({'p-value' if method == 'ltt' else 'corrected risk'} {cal.bound:.3g} at the most conservative): "
            "the full network; raise --epsilon or --delta, or calibrate on more images"
        )
    else:
        stat = f"p = {cal.bound:.3g} <= {delta:g}" if method == "ltt" else f"corrected risk {cal.bound:.3g}"
        click.echo(
            f"threshold {cal.threshold:.6g}: {cal.guarantee} ({method}, {cal.n} validation images, {stat}); "
            f"{format_flops(cal.expected_flops)} FLOPs per image, {share:.3f} of the full network"
        )
    t = cal.test
    acc = f", accuracy {t['accuracy']:.2%} (full network {t['full_accuracy']:.2%})" if "accuracy" in t else ""
    click.echo(
        f"on test ({t['n']} images): {risk} risk {t['risk']:.4f}, {format_flops(t['avg_flops'])} FLOPs{acc}"
    )
    click.echo(f"wrote {path}")


COMMANDS = [calibrate]
