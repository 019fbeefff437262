"""The ``calibrate`` and ``serve`` commands: exit thresholds with a guarantee, and the anytime server."""

from __future__ import annotations

import click

from annify._cli_common import checkpoint_option, cpu_options, finite_positive, friendly, registry_choice
from annify.cli_runtime import _read_labels, with_normalization
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
    "--risk", type=registry_choice("annify.calibrate", "RISKS"), metavar="RISK", default="consistency",
    show_default=True,
    help="consistency: the exit's class differs from the last output's (no labels used); accuracy-gap: "
    "the exit is wrong where the last output is right.",
)  # fmt: skip
@click.option(
    "--method", type=registry_choice("annify.calibrate", "METHODS"), metavar="METHOD", default="ltt",
    show_default=True,
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


@click.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@checkpoint_option
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface)."
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@click.option(
    "--policy", default="anytime", show_default=True,
    help="anytime: each request stops at its deadline, budget or calibrated exit; full: every image runs "
    "the whole network; exit:K: every image stops at output K (1-based).",
)  # fmt: skip
@click.option(
    "--early-exit", is_flag=True,
    help="Requests exit by the run's thresholds.json (`annify calibrate`) unless they send X-Early-Exit: 0.",
)  # fmt: skip
@click.option(
    "--max-queue", default=256, show_default=True, type=click.IntRange(1),
    help="Images admitted and not yet answered; more get 503 with Retry-After.",
)  # fmt: skip
@click.option(
    "--max-batch", default=64, show_default=True, type=click.IntRange(1), help="Images per segment call."
)
@click.option(
    "--max-images", default=64, show_default=True, type=click.IntRange(1), help="Images per request."
)
@click.option(
    "--guard-ms", default=5.0, show_default=True, type=float, callback=finite_positive,
    help="Stop computing this long (at most a fifth of the deadline) before a deadline, to send the answer "
    "in time; raise it where the network or the clients add delay.",
)  # fmt: skip
@click.option("--max-body-mb", default=8.0, show_default=True, type=float, help="Request size limit (MiB).")
@click.option(
    "--labels", type=click.Path(exists=True, dir_okay=False),
    help="Text file with one class name per line (default: class indices).",
)  # fmt: skip
@with_normalization
@cpu_options
@friendly
def serve(
    spec,
    checkpoint,
    host,
    port,
    policy,
    early_exit,
    max_queue,
    max_batch,
    max_images,
    guard_ms,
    max_body_mb,
    labels,
    mean,
    std,
):
    """Serve SPEC over HTTP: POST /predict answers every request by its deadline with the best output ready.

    Send an image as the body (or several as multipart files) with X-Deadline-Ms, X-Budget-Flops or
    X-Early-Exit: 1. Images of all requests are batched together segment by segment; each answer
    gives the class, top-k probabilities, the output used, FLOPs, latency and deadline_hit. GET
    /healthz, GET /metrics (Prometheus). Stop with Ctrl-C or SIGTERM: requests in flight finish first.
    Binds 127.0.0.1 unless --host says otherwise; the server keeps no state between requests, so
    replicas scale out behind any HTTP load balancer. Ask it with, e.g.,
    curl -H 'X-Deadline-Ms: 5' -H 'Content-Type: image/png' --data-binary @digit.png localhost:8000/predict

    Example: annify serve specs/cifar_resann_n7_c16.yaml --checkpoint runs/digits --port 8000
    """
    try:
        from annify.serve import serve as run_serve
    except ModuleNotFoundError as e:
        raise click.ClickException(f"annify serve needs {e.name}: pip install 'annify[serve]'") from None

    run_serve(
        spec, checkpoint, host=host, port=port, policy=policy, early_exit=early_exit, max_queue=max_queue,
        max_batch=max_batch, max_body_bytes=int(max_body_mb * (1 << 20)), max_images=max_images,
        guard_ms=guard_ms, mean=mean, std=std, labels=_read_labels(labels), log=click.echo,
    )  # fmt: skip
