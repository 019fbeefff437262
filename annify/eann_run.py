"""The eann stage: members in, EANN out (``annify eann``).

``run_eann`` converts each member (or reads its spec), trains it with the trainer it is given
(``annify.train.train`` by default) or loads its weights, evaluates every output on val and test, and
writes ``eann.json`` and ``eann.png``. The schedule, the selection rule and the cost inflation are
``annify.eann``'s, computed from the tables this stage measures.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from annify.eann import (
    MemberTable,
    ScheduleStep,
    build_schedule,
    default_placement,
    depth_ratio,
    linear_ensemble_curve,
    schedule_to_json,
    uniform_inflation,
)
from annify.errors import EANNError
from annify.report import figure, save_figure

if TYPE_CHECKING:
    from annify.train import RunResult

__all__ = ["EANNRun", "plot_eann", "run_eann"]


@dataclass
class EANNRun:
    """What ``run_eann`` produced."""

    out: Path  # the folder holding eann.json, eann.png and members/
    members: list[MemberTable]  # every output of every member, on val and test
    linear: list[MemberTable]  # the linear-ensemble baseline's networks: one (final) output each
    steps: list[ScheduleStep]
    summary: dict[str, Any]  # what eann.json holds


def run_eann(
    members: Sequence[str],
    *,
    out: str | os.PathLike[str],
    data: str | None = None,
    epochs: int | None = None,
    weights: str | None = None,
    checkpoints: Sequence[str] | None = None,
    plain: bool = False,
    seed: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    device: str = "auto",
    resume: bool = False,
    workers: int = 0,
    train_subset: int | None = None,
    force: bool = False,
    log: Callable[[str], Any] = print,
    trainer: Callable[..., RunResult] | None = None,
) -> EANNRun:
    """Assemble an EANN from timm model names or spec files, in the order given (smallest first).

    Each member is a timm model name, converted with ``default_placement``, or a spec file (or a run
    folder holding config.yaml). Members are trained with ``trainer`` (``annify.train.train`` unless
    given: a callable taking ``train()``'s arguments and returning its ``RunResult``) into
    ``out/members/<name>/`` (``weights`` defaults to the spec's, else AdaLoss), or, with
    ``checkpoints`` (one per member, in order: a weights file, a checkpoint folder or a run folder),
    loaded and evaluated without training. Every output is evaluated on val and test of ``data``
    (default: the first spec's ``train.data``, else digits), and each member's folder gets its
    ``anytime.json`` and ``config.yaml``.

    Members must take the same input and predict the same classes. A member trained here gets the
    data's class count; a spec file given with a checkpoint keeps its own (its weights have it).

    The linear-ensemble baseline (the paper's Fig. 6b) runs plain networks one after another, each
    giving only its final prediction. With ``plain`` each member's architecture is trained again
    with ``--weights opt`` (the final output only) into ``out/plain/<name>/``; otherwise each ANN's
    final output stands in for its plain network's, costed as the plain network (no added heads).

    Writes ``out/eann.json`` (``schedule_to_json`` plus ``data``, ``runs``, ``linear_networks``,
    ``inflation_uniform`` and ``cost_convention``) and ``out/eann.png``; a folder already holding them
    is refused unless ``resume`` (continue that EANN) or ``force`` (replace them).
    """
    # imported here so torch and the data sources load only when the stage runs
    if trainer is None:
        from annify.train import train as trainer
    from annify._files import atomic_write
    from annify.data import data_info
    from annify.evaluate import evaluate_weights, fit_to_data, save_table
    from annify.run_dir import RunDir, run_checkpoint
    from annify.spec import dump

    if len(members) < 2:
        raise EANNError(f"an EANN needs at least 2 members, smallest first; got {len(members)}")
    checkpoints = list(checkpoints or [])
    if checkpoints and len(checkpoints) != len(members):
        raise EANNError(
            f"{len(members)} members but {len(checkpoints)} checkpoints; give one --checkpoints per member, in order"
        )
    out = Path(out)
    held = [name for name in ("eann.json", "eann.png") if (out / name).exists()]
    if held and not (resume or force):
        raise EANNError(
            f"{out} already holds an EANN's results ({', '.join(held)}); pass --resume to continue it, "
            "--force to replace them, or choose another --out"
        )
    twice = next((m for i, m in enumerate(members) if m in members[:i]), None)
    if twice is not None:
        raise EANNError(
            f"member {twice} is given twice; an EANN's members are networks of growing cost, each once"
        )

    # ---------------------------------------------------------------- the members' specs, fitted to the data
    given = [_member_spec(m) for m in members]  # (spec, read from a file)
    source = data or given[0][0].train.get("data") or "digits"
    specs = []
    for spec, from_file in given:
        fitted, _ = fit_to_data(spec, source)
        if checkpoints and from_file:  # the checkpoint was trained for the spec's classes
            fitted = replace(fitted, num_classes=spec.num_classes)
        specs.append(fitted)
    _check_compatible(specs)
    info = data_info(source)
    if specs[0].num_classes != info.num_classes:
        raise EANNError(
            f"the members predict {specs[0].num_classes} classes but {info.name} has {info.num_classes}; "
            "pass the --data they were trained on"
        )
    names = _unique_names([s.name for s in specs])
    totals = [spec.heads[-1].flops for spec, _ in given]  # known for converted members and costed specs
    growing_known = all(t is not None for t in totals)
    for i, (a, b) in enumerate(zip(totals, totals[1:]) if growing_known else ()):
        if b <= a:
            raise EANNError(
                f"member {i + 2} ({names[i + 1]}, {b:.3g} FLOPs) costs no more than member {i + 1} ({names[i]}, "
                f"{a:.3g} FLOPs); an EANN runs its members smallest first, each costlier than the one before: "
                "reorder them"
            )
    if not checkpoints:
        from annify.config import resolve_settings

        each = resolve_settings(specs[0].train, {"epochs": epochs})["epochs"]
        paper = epochs is None and "epochs" not in specs[0].train
        default = " (the paper's recipe; pass --epochs N for a shorter run)" if paper else ""
        log(
            f"training {len(specs)} members for {each} epochs each on {source}{default}; each member's first "
            "steps print an estimate of its time"
        )

    # ---------------------------------------------------------------- train or load, then evaluate
    tables, linear, runs = [], [], []
    for i, (spec, name) in enumerate(zip(specs, names, strict=True)):
        folder = RunDir(out / "members" / name)  # a member's run folder, or its evaluation's
        if checkpoints:
            checkpoint = run_checkpoint(checkpoints[i])
            log(f"member {i + 1}/{len(specs)} {name}: evaluating {checkpoint}")
            spec, table = evaluate_weights(spec, checkpoint, source, device=device, workers=workers)
            folder.root.mkdir(parents=True, exist_ok=True)
            header = (
                f"annify eval {folder.config} --checkpoint {checkpoint}\nmember {name} of the EANN in {out}"
            )
            atomic_write(folder.config, dump(spec, header))
            save_table(table, folder.root)
        else:
            log(f"member {i + 1}/{len(specs)} {name}: training into {folder.root}")
            result = trainer(
                spec, out=folder.root, data=source, epochs=epochs, batch_size=batch_size, lr=lr,
                weights=weights, seed=seed, device=device, resume=resume, workers=workers,
                train_subset=train_subset, log=log,
            )  # fmt: skip
            spec, table, checkpoint = result.spec, result.table, folder.last
        tables.append(_table(name, table))
        runs.append(
            {"name": name, "model": spec.model, "spec": str(folder.config),
             "checkpoint": str(checkpoint), "trained": not checkpoints,
             "num_classes": spec.num_classes, "input_size": list(spec.input_size)}
        )  # fmt: skip

        # ------------------------------------------------------------ the plain network of the baseline
        if plain:
            log(f"member {i + 1}/{len(specs)} {name}: training the plain network into {out / 'plain' / name}")
            result = trainer(
                spec, out=out / "plain" / name, data=source, epochs=epochs, batch_size=batch_size, lr=lr,
                weights="opt", weight_hparams={}, seed=seed, device=device, resume=resume, workers=workers,
                train_subset=train_subset, head_local=False, distill=0.0, log=log,
            )  # fmt: skip
            spec, table = result.spec, result.table
            runs[-1]["plain"] = str(out / "plain" / name)
        final = table[-1]
        linear.append(
            MemberTable(name, [spec.heads[-1].flops_single], [final["val_error"]], [final["test_error"]])
        )

    # ---------------------------------------------------------------- schedule, inflation, files
    steps = build_schedule(tables)
    ratios = depth_ratio(tables, per_pair=True)
    if not growing_known and any(r <= 1 for r in ratios):  # costs were unknown before training
        log("note: the members do not grow in cost; an EANN runs them in the order given, smallest first")
    networks = (
        "plain networks: each member's architecture trained with --weights opt (final output only)"
        if plain
        else "stand-in: each ANN member's final output, costed as its plain network (no added heads)"
    )
    extra = {
        "data": source,
        "runs": runs,
        "linear_networks": networks,
        "inflation_uniform": uniform_inflation(tables, steps),
        "cost_convention": specs[0].cost_convention,
    }
    summary = schedule_to_json(steps, tables, extra, linear=linear)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "eann.json", json.dumps(summary, indent=1) + "\n")
    label = "linear ensemble (plain nets)" if plain else "linear ensemble (ANN finals as plain)"
    plot_eann(steps, tables, out / "eann.png", title=f"EANN on {source}", linear=linear, linear_label=label)
    return EANNRun(out, tables, linear, steps, summary)


def _member_spec(arg: str):
    """(spec, read from a file) of a member: a spec file, a run folder, or a timm model name."""
    from annify.convert import convert
    from annify.run_dir import RunDir
    from annify.spec import load_spec

    path = Path(arg)
    if path.is_dir() and RunDir(path).config.is_file():
        return load_spec(RunDir(path).config), True
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return load_spec(path), True
    return convert(arg, **default_placement(arg))[1], False


def _check_compatible(specs) -> None:
    """One-line error naming the first member that takes other inputs or predicts other classes."""
    first = specs[0]
    for spec in specs[1:]:
        what = [
            w
            for w, differs in (
                ("class count", spec.num_classes != first.num_classes),
                ("input size", tuple(spec.input_size) != tuple(first.input_size)),
            )
            if differs
        ]
        if what:

            def desc(s):
                return f"{s.name} ({s.num_classes} classes, input {'×'.join(map(str, s.input_size))})"

            raise EANNError(
                f"members {desc(first)} and {desc(spec)} differ in {' and '.join(what)}; "
                "an EANN's members must take the same input and predict the same classes"
            )


def _unique_names(names: list[str]) -> list[str]:
    """Folder names: a repeated name gets -2, -3, ..."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def _table(name: str, rows: list[dict]) -> MemberTable:
    """A member's anytime table (``annify.evaluate.anytime_table`` rows) as a ``MemberTable``."""
    return MemberTable(
        name,
        [float(r["flops"]) for r in rows],
        [float(r["val_error"]) for r in rows],
        [float(r["test_error"]) for r in rows],
    )


def plot_eann(
    steps: list[ScheduleStep],
    members: list[MemberTable],
    path: str | os.PathLike[str],
    title: str = "EANN",
    linear: list[MemberTable] | None = None,
    linear_label: str = "linear ensemble",
) -> Path:
    """Plot test error against FLOPs (log x): the EANN, each member alone, and the linear ensemble.

    ``linear`` are the baseline's networks (default: the members, see ``linear_ensemble_curve``).

    The PNG is written to a temporary file beside ``path`` and moved into place, so a reader never
    sees a half-written plot.
    """
    fig, ax = figure((6.4, 4.4), grid=False)
    for t in members:
        ax.step(t.flops, t.test_error, where="post", marker=".", alpha=0.6, label=f"{t.name} alone")
    curve = linear_ensemble_curve(linear or members)
    ax.step(
        *zip(*curve, strict=True),
        where="post",
        marker="s",
        linestyle="--",
        color="gray",
        label=linear_label,
    )
    ax.step(
        [s.flops for s in steps], [s.effective_test_error for s in steps], where="post",
        color="black", linewidth=2, label="EANN",
    )  # fmt: skip
    used = [s for s in steps if s.used]
    ax.scatter([s.flops for s in used], [s.test_error for s in used], color="black", s=12, zorder=3)
    ax.set(xscale="log", xlabel="FLOPs", ylabel="test error", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, path)
    return Path(path)
