"""The main job, end to end: the path most users walk first, then the weightings compared, then an EANN.

A CIFAR-style ResANN (the paper's pre-activation ResNet, a head after every residual unit) is
converted for the data (scikit-learn's bundled digits by default; Fashion-MNIST when asked and
installed). First the trained-network path: the plain network is trained as usual (its own
classifier only), then made anytime from it with ``annify train --init`` and the trained-start
defaults; original and anytime are printed side by side with a sentence on what was kept and gained
(``trained_start.txt``). Then, from scratch and from the same seed, annify's default weighting, CONST
and the paper's AdaLoss (Eq. 7, weights on the whole loss): the anytime tables side by side, summed
up in one sentence and plotted. Then an EANN of three ResANNs of doubling depth (n = 2, 4, 8 units
per stage, depth ratio b ≈ 2) trained with the default weighting, its schedule and cost inflation
printed beside Proposition 4.1, with a sentence on why they differ.

Any timm model can stand in for the ResANN (``model``): it is fitted to the data's image size by
``annify.sources.fit_input_size`` (kept, rebuilt at it with ``img_size``, or the images resized to
the smallest size it accepts; the log says which) and gets a head after every block, or 12 outputs
spaced by cost where it has more blocks. The EANN's members stay the CIFAR ResNets.

Every run resumes where a previous demo into the same folder stopped, so running the command
again finishes an interrupted demo and reprints a finished one.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from annify._files import atomic_write
from annify.convert import ConvertError, convert
from annify.data import data_info
from annify.eann import format_eann
from annify.eann_run import run_eann
from annify.errors import TrainError
from annify.evaluate import plot_anytime
from annify.report import format_flops, format_rows
from annify.run_dir import RESULTS, RunDir
from annify.sources import fit_input_size
from annify.spec import dump
from annify.train import resolve_settings, run_label, train

__all__ = ["EANN_MEMBERS", "demo", "demo_variants", "eann_verdict", "side_by_side", "verdict"]

EANN_MEMBERS = ("cifar_resnet_n2_c16", "cifar_resnet_n4_c16", "cifar_resnet_n8_c16")
MAX_OUTPUTS = 12  # a model with more blocks gets this many outputs, spaced by cost
PAPER_ADALOSS = {"weights": "adaloss", "head_local": False, "distill": 0.0}
CONST = {"weights": "const", "head_local": False, "distill": 0.0}
PLAIN = {"weights": "opt", "head_local": False, "distill": 0.0}  # a network trained the usual way


def demo_variants() -> dict[str, dict]:
    """label -> train settings: annify's default first, then CONST and the paper's AdaLoss."""
    resolved = resolve_settings({}, {})
    default = {k: resolved[k] for k in ("weights", "head_local", "distill")}
    variants = {run_label(default): default}
    for settings in (CONST, PAPER_ADALOSS):
        variants.setdefault(run_label(settings), dict(settings))
    return variants


def demo(
    out: str | os.PathLike = "runs/demo",
    model: str = "cifar_resnet_n3_c8",
    epochs: int = 15,
    data: str = "digits",
    train_subset: int | None = None,
    seed: int = 0,
    eann: Sequence[str] = EANN_MEMBERS,
    log: Callable[[str], object] = print,
    force: bool = False,
) -> dict[str, list[dict]]:
    """Convert ``model`` for ``data``, train it each way (``demo_variants``), print and plot the comparison.

    Returns label -> anytime table (rows with output, node, flops, fraction, val_error, test_error).
    Writes ``out/<spec>.yaml``, one run folder per variant under ``out/``, ``out/comparison.txt`` and
    ``out/anytime.png``; with ``eann`` members (empty to skip), ``out/eann/`` (eann.json, eann.png).
    A folder holding results other than a demo's (a training run's, an EANN's) is refused unless ``force``.
    """
    out = Path(out)
    foreign = _foreign_results(out)
    if foreign and not force:
        raise TrainError(
            f"{out} holds results that are not a demo's ({', '.join(foreign)}), which the demo would replace; "
            "choose another --out, or pass --force to replace them"
        )
    out.mkdir(parents=True, exist_ok=True)
    info = data_info(data)
    size, kwargs, how = fit_input_size(
        model, info.input_size, info.num_classes, {"in_chans": info.input_size[0]}
    )
    spec = _demo_spec(model, size, info.num_classes, kwargs)
    spec_path = out / f"{spec.name}.yaml"
    atomic_write(spec_path, dump(spec, f"annify train {spec_path}\n{spec.name} for {data} (annify demo)"))
    log(f"converted {model} for {data} ({how}): {len(spec.heads)} outputs -> {spec_path}")

    common = dict(data=data, epochs=epochs, seed=seed, train_subset=train_subset, resume=True, log=log)
    story = from_a_trained_network(spec_path, out, common, log)
    atomic_write(out / "trained_start.txt", story + "\n")
    log(story)

    tables: dict[str, list[dict]] = {}
    variants = demo_variants()
    for label, settings in variants.items():
        log(f"training with {label} for {epochs} epochs ...")
        tables[label] = train(spec_path, out=out / label, **common, **settings).table

    default = next(iter(variants))
    text = side_by_side(tables) + "\n\n" + verdict(tables, default)
    atomic_write(out / "comparison.txt", text + "\n")
    log(text)
    plot = RunDir(out).anytime_png  # a run's name for its curves: _foreign_results tells the two apart
    plot_anytime(
        {s: [(r["flops"], r["test_error"]) for r in rows] for s, rows in tables.items()},
        plot,
        title=f"{spec.name} on {data}: test error against FLOPs",
    )
    log(f"wrote {out / 'comparison.txt'} and {plot}")
    if eann:
        log(f"EANN of {', '.join(eann)}, each trained with {default} for {epochs} epochs ...")
        run = run_eann(
            list(eann), out=out / "eann", data=data, epochs=epochs, seed=seed, resume=True,
            train_subset=train_subset, log=log,
        )  # fmt: skip
        log(format_eann(run.summary))
        log(eann_verdict(run.summary))
        log(f"wrote {run.out / 'eann.json'} and {run.out / 'eann.png'}")
    return tables


def _foreign_results(out: Path) -> list[str]:
    """Files at the top of ``out`` that a demo does not write: another command's results.

    A demo writes its spec, comparison.txt and anytime.png there (anytime.png after comparison.txt)
    and its runs in subfolders, which it resumes.
    """
    plot = RunDir(out).anytime_png.name
    names = [n for n in (*RESULTS, "eann.json", "eann.png") if (out / n).exists()]
    return [n for n in names if n != plot or not (out / "comparison.txt").exists()]


def from_a_trained_network(spec_path: Path, out: Path, common: dict, log: Callable[[str], object]) -> str:
    """The path most users walk: a plain network trained as usual, then made anytime from it.

    The plain network is ``spec_path``'s model trained on its last output alone (``weights="opt"``);
    ``annify train --init`` then adds the outputs with the trained-start defaults
    (``annify.config.INIT_DEFAULTS``). Returns the side-by-side table and its sentence.
    """
    from annify.config import INIT_DEFAULTS
    from annify.evaluate import kept_and_gained

    log(f"training a plain network (its own classifier only) for {common['epochs']} epochs ...")
    train(spec_path, out=out / "plain", **common, **PLAIN)
    log(f"making it anytime with --init {out / 'plain'} (the trained-start recipe) ...")
    epochs = min(common["epochs"], INIT_DEFAULTS["epochs"])  # a demo asked to be short stays short
    result = train(
        spec_path, out=out / "anytime-from-plain", **{**common, "epochs": epochs}, init=str(out / "plain")
    )
    original, rows = result.original, result.table
    lines: list[tuple] = [("output", "flops", "fraction", "original test err %", "anytime test err %")]
    for r in rows:
        mine = "-" if r is not rows[-1] else f"{100 * original['test_error']:.2f}"
        lines.append(
            (
                r["output"],
                format_flops(r["flops"]),
                f"{r['fraction']:.3f}",
                mine,
                f"{100 * r['test_error']:.2f}",
            )
        )
    recipe = ", ".join(f"{k} {v}" for k, v in {**INIT_DEFAULTS, "epochs": epochs}.items())
    return (
        f"From a trained network ({recipe}):\n" + format_rows(lines, left=()) + "\n"
        f"In words: {kept_and_gained(rows, original)}."
    )


def _demo_spec(model: str, size: tuple[int, int, int], num_classes: int, kwargs: dict):
    """A head after every block (the paper's ResANN placement) where that gives at most
    ``MAX_OUTPUTS`` outputs, else ``MAX_OUTPUTS`` outputs spaced evenly by cost."""
    common = dict(input_size=size, num_classes=num_classes, model_kwargs=kwargs)
    try:
        spec = convert(model, every=1, **common)[1]
        if len(spec.heads) <= MAX_OUTPUTS:
            return spec
    except ConvertError:  # no repeated blocks to count; cost-spaced placement needs none
        pass
    return convert(model, heads=MAX_OUTPUTS, **common)[1]


def side_by_side(tables: dict[str, list[dict]]) -> str:
    """Test error of each output under each variant, in one table (errors in percent)."""
    labels = list(tables)
    rows: list[tuple] = [("output", "flops", "fraction", *(f"{s} test err %" for s in labels))]
    for i, row in enumerate(tables[labels[0]]):
        errs = (f"{100 * tables[s][i]['test_error']:.2f}" for s in labels)
        rows.append((row["output"], format_flops(row["flops"]), f"{row['fraction']:.3f}", *errs))
    rows.append(("mean", "", "", *(f"{100 * _mean(tables[s]):.2f}" for s in labels)))
    return format_rows(rows, left=())


def _mean(rows: list[dict], part: slice = slice(None)) -> float:
    return statistics.mean(r["test_error"] for r in rows[part])


def verdict(tables: dict[str, list[dict]], default: str) -> str:
    """One sentence in words: how the default compares with the others, early, late and overall."""
    k = len(tables[default])
    early = slice(0, max(1, k // 3))
    parts = []
    for label in tables:
        if label == default:
            continue
        d_all, o_all = 100 * _mean(tables[default]), 100 * _mean(tables[label])
        d_early, o_early = 100 * _mean(tables[default], early), 100 * _mean(tables[label], early)
        d_last, o_last = 100 * tables[default][-1]["test_error"], 100 * tables[label][-1]["test_error"]
        parts.append(
            f"{'lower' if d_all < o_all else 'higher' if d_all > o_all else 'the same'} mean error than "
            f"{label} ({d_all:.2f}% vs {o_all:.2f}%; first {early.stop} outputs {d_early:.2f}% vs "
            f"{o_early:.2f}%, last output {d_last:.2f}% vs {o_last:.2f}%)"
        )
    best = min(tables, key=lambda s: _mean(tables[s]))
    return (
        f"In words: over all {k} outputs the default ({default}) has " + "; and ".join(parts) + ". "
        f"Best anytime quality (mean test error over the outputs) in this run: {best}. "
        "One seed and one short run: BENCHMARKS.md has the multi-seed comparison."
    )


def eann_verdict(summary: dict) -> str:
    """One sentence: the measured cost inflation beside Proposition 4.1, and why they differ."""
    inf, bounds = summary["inflation"], summary["prop41"]
    if inf["max"] is None or bounds is None:
        return "Proposition 4.1 does not apply here (fewer than two members growing in cost)."
    steps = summary["steps"]
    used = [s for s in steps if s["used"]]
    last = used[-1]
    share = last["flops"] / steps[-1]["flops"]
    where = (
        f"{last['member_name']} output {last['output'] + 1}, at {100 * share:.0f}% of the EANN's total cost"
    )
    if inf["max"] <= bounds["sup_C"]:
        return (
            f"In words: the measured inflation (max C {inf['max']:.2f}) stays within Proposition 4.1's bound "
            f"(sup C {bounds['sup_C']:.2f}): the members keep improving, as the proposition assumes."
        )
    return (
        f"In words: the measured inflation (max C {inf['max']:.2f}, mean {inf['mean']:.2f}) exceeds "
        f"Proposition 4.1's bound (sup C {bounds['sup_C']:.2f}) because the proposition assumes every "
        f"member's later outputs are near-optimal; here the EANN's last improvement on validation is "
        f"{where}, so past it the prediction in force stops improving while the budget grows, and C grows "
        "with the budget."
    )
