"""The main job on the embedded default data, end to end: convert, train two ways, compare.

A CIFAR-style ResANN (the paper's pre-activation ResNet, a head after every residual unit) is
converted for scikit-learn's bundled handwritten digits, trained once with AdaLoss and once with
CONST from the same seed, and both anytime tables are printed side by side and plotted. Then an
EANN of three ResANNs of doubling depth (n = 2, 4, 8 units per stage, depth ratio b ≈ 2) is
trained with AdaLoss and its schedule and cost inflation are printed beside Proposition 4.1.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from annify.convert import convert
from annify.eann import format_eann, run_eann
from annify.evaluate import plot_anytime
from annify.spec import atomic_write, dump
from annify.train import train

__all__ = ["EANN_MEMBERS", "demo"]

EANN_MEMBERS = ("cifar_resnet_n2_c16", "cifar_resnet_n4_c16", "cifar_resnet_n8_c16")


def demo(
    out: str | os.PathLike = "runs/demo",
    model: str = "cifar_resnet_n3_c8",
    epochs: int = 15,
    schemes: tuple[str, ...] = ("adaloss", "const"),
    seed: int = 0,
    eann: Sequence[str] = EANN_MEMBERS,
    log: Callable[[str], object] = print,
) -> dict[str, list[dict]]:
    """Convert ``model`` for the digits, train it with each scheme, print and plot the comparison.

    Returns scheme -> anytime table (rows with output, node, flops, fraction, val_error, test_error).
    Writes ``out/<spec>.yaml``, one run folder per scheme under ``out/``, ``out/comparison.txt`` and
    ``out/anytime.png``; with ``eann`` members (empty to skip), ``out/eann/`` (eann.json, eann.png).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _, spec, _ = convert(model, every=1, input_size=(1, 8, 8), num_classes=10, model_kwargs={"in_chans": 1})
    spec_path = out / f"{spec.name}.yaml"
    atomic_write(
        spec_path, dump(spec, f"annify train {spec_path}\n{spec.name} for the embedded digits (annify demo)")
    )
    log(f"converted {model}: {len(spec.heads)} outputs -> {spec_path}")

    tables: dict[str, list[dict]] = {}
    for scheme in schemes:
        log(f"training with {scheme} for {epochs} epochs ...")
        result = train(
            spec_path, out=out / scheme, data="digits", epochs=epochs, weights=scheme, seed=seed, log=log
        )
        tables[scheme] = result.table

    text = side_by_side(tables)
    atomic_write(out / "comparison.txt", text + "\n")
    log(text)
    plot_anytime(
        {s: [(r["flops"], r["test_error"]) for r in rows] for s, rows in tables.items()},
        out / "anytime.png",
        title=f"{spec.name} on digits: test error against FLOPs",
    )
    log(f"wrote {out / 'comparison.txt'} and {out / 'anytime.png'}")
    if eann:
        log(f"EANN of {', '.join(eann)}, each trained with AdaLoss for {epochs} epochs ...")
        run = run_eann(list(eann), out=out / "eann", data="digits", epochs=epochs, seed=seed, log=log)
        log(format_eann(run.summary))
        log(f"wrote {run.out / 'eann.json'} and {run.out / 'eann.png'}")
    return tables


def side_by_side(tables: dict[str, list[dict]]) -> str:
    """Test error of each output under each scheme, in one table (errors in percent)."""
    from annify._cli_common import format_flops

    schemes = list(tables)
    first = tables[schemes[0]]
    head = f"{'output':>6}  {'flops':>8}  {'fraction':>8}  " + "  ".join(
        f"{s + ' test err %':>18}" for s in schemes
    )
    lines = [head]
    for i, row in enumerate(first):
        errs = "  ".join(f"{100 * tables[s][i]['test_error']:>18.2f}" for s in schemes)
        lines.append(f"{row['output']:>6}  {format_flops(row['flops']):>8}  {row['fraction']:>8.3f}  {errs}")
    return "\n".join(lines)
