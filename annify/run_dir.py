"""The run folder: its layout, and how every command resolves ``--checkpoint`` to what it needs.

``annify train --out RUN`` writes::

    RUN/config.yaml                       the resolved spec (refitted to the data) and its settings
    RUN/data.json                         the data source and the mean/std its images were normalised with
    RUN/checkpoints/last/model.safetensors
    RUN/checkpoints/best/model.safetensors

``--checkpoint`` takes a run folder, a checkpoint folder or a ``.safetensors`` file. Inside a run,
the run's own ``config.yaml`` is the network the weights fit (``annify train`` refits a spec to
its data: class count, input size, channels), and its ``data.json`` is the normalisation: so
``annify predict zoo/resann50.yaml --checkpoint runs/x`` works after ``annify train
zoo/resann50.yaml --out runs/x``. A bare weights file outside a run has no normalisation record:
the commands that read images then need ``--mean`` and ``--std``, never a silent guess.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from annify._files import previous_folder
from annify.errors import InferenceError, SpecError, TrainError
from annify.spec import Spec, load_spec

__all__ = [
    "CONFIG",
    "DATA",
    "RESULTS",
    "WEIGHTS",
    "Resolved",
    "find_run",
    "RunLock",
    "find_checkpoint",
    "foreign_results",
    "lock",
    "normalization",
    "resolve",
    "weights_file",
]

CONFIG, DATA, WEIGHTS = "config.yaml", "data.json", "model.safetensors"
# what `annify train` writes at the top of a run folder, beside checkpoints/
RESULTS = (CONFIG, DATA, "metrics.jsonl", "anytime.json", "anytime.csv", "anytime.png", "weights.png")
_LAST = Path("checkpoints") / "last"


LOCK = ".lock"  # held (fcntl.flock) by the one process writing the run folder


class RunLock:
    """A run folder held by this process (``lock``); ``release`` lets it go (a killed process lets go too)."""

    def __init__(self, out: Path, fd: int, created: bool) -> None:
        self.out, self.fd, self.created = out, fd, created

    def release(self) -> None:
        if self.fd < 0:
            return
        (self.out / LOCK).unlink(missing_ok=True)  # before unlocking: a waiting process then finds a new file
        os.close(self.fd)
        self.fd = -1
        if self.created:  # a run that stopped before writing anything leaves no empty folder
            with contextlib.suppress(OSError):
                self.out.rmdir()


def lock(out: str | os.PathLike) -> RunLock:
    """Hold the run folder ``out`` (created if needed) for this process: a second process gets a one-line
    ``TrainError`` naming the holder, instead of racing it for the same checkpoints and files.

    The lock is an ``fcntl.flock`` on ``out/.lock``, which the system lets go when the process ends,
    however it ends; a lock file left by a killed process is taken over.
    """
    import fcntl

    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise TrainError(
                f"{out} is in use by another annify process (pid {holder}); wait for it to finish, or "
                "choose another --out"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(out / LOCK).st_ino
        except FileNotFoundError:  # the holder let go and removed it between our open and our lock
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return RunLock(out, fd, created)


def find_checkpoint(root: str | os.PathLike, name: str = "last") -> Path | None:
    """``root/name``, or the previous one that a kill left mid-swap (see ``_files.atomic_folder``)."""
    root = Path(root)
    for folder in (root / name, previous_folder(root / name)):
        if folder.is_dir():
            return folder
    return None


def weights_file(checkpoint: str | os.PathLike) -> Path:
    """The weights file of a run folder (its last checkpoint), a checkpoint folder or a file.

    A checkpoint that a kill left mid-swap is found under its previous name (``find_checkpoint``), as
    ``annify train --resume`` finds it; a run folder with no checkpoint yet is a one-line error.
    """
    p = Path(checkpoint)
    if p.is_dir() and ((p / "checkpoints").is_dir() or (p / CONFIG).is_file()):  # a run folder
        last = find_checkpoint(p / "checkpoints", _LAST.name)
        if last is None:
            raise InferenceError(
                f"run {p} has no checkpoint yet: train it (annify train SPEC --out {p}), or continue an "
                "interrupted run with --resume"
            )
        return last / WEIGHTS
    if not p.exists() and p.parent.name == "checkpoints":  # checkpoints/last, mid-swap
        found = find_checkpoint(p.parent, p.name)
        if found is not None:
            return found / WEIGHTS
    return p / WEIGHTS if p.is_dir() else p


def find_run(checkpoint: str | os.PathLike) -> Path | None:
    """The run folder holding ``checkpoint`` (itself, or up to three folders above), if any."""
    p = Path(checkpoint).resolve()
    for folder in [p, *p.parents][:4]:
        if (folder / CONFIG).is_file() and (folder / "checkpoints").is_dir():
            return folder
    return None


def foreign_results(out: Path, spec: Spec, settings: dict) -> list[str]:
    """The result files in ``out`` that a new run of ``spec`` with ``settings`` would replace.

    Empty when there are none, or when they are this very run's (its ``config.yaml`` names the same
    model, heads and settings: a run stopped before its first checkpoint starts again in place).
    """
    found = [name for name in RESULTS if (out / name).exists()]
    if not found:
        return []
    try:
        previous = load_spec(out / CONFIG)
    except (SpecError, OSError):
        return found
    same = (previous.model, previous.taps, previous.train) == (spec.model, spec.taps, dict(settings))
    return [] if same else found


def normalization(run: Path) -> tuple[list[float], list[float]] | None:
    """(mean, std) from the run's ``data.json``; None when the run has none."""
    record = run / DATA
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text())
        return [float(v) for v in data["mean"]], [float(v) for v in data["std"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        raise InferenceError(
            f"{record} is corrupt: it should be JSON with the run's 'mean' and 'std' lists; "
            "restore them (e.g. from the run's data source) or re-run `annify train`"
        ) from None


def run_spec(given: Spec, checkpoint: str | os.PathLike, named: str = "the spec") -> tuple[Spec, Path | None]:
    """(the network ``checkpoint``'s weights fit, its run folder): a run's own resolved ``config.yaml``
    (refitted to its data), or ``given`` for weights outside a run; another model is a one-line error."""
    run = find_run(checkpoint)
    if run is None:
        return given, None
    spec = load_spec(run / CONFIG)
    if spec.model != given.model:
        raise SpecError(
            f"{checkpoint} is a checkpoint of {spec.model} (run {run}), but {named} describes "
            f"{given.model}; pass the run's own {run / CONFIG}"
        )
    return spec, run


@dataclass
class Resolved:
    """What a command needs from ``SPEC --checkpoint C``."""

    spec: Spec  # the network the weights fit
    weights: Path  # the .safetensors file
    run: Path | None  # the run folder, if the weights are in one
    mean: list[float] | None  # normalisation (None where not asked for and unknown)
    std: list[float] | None
    note: str | None  # one line when the run's spec replaces the one given


def resolve(
    spec_path: str | os.PathLike,
    checkpoint: str | os.PathLike,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    need_normalization: bool = False,
) -> Resolved:
    """Resolve ``spec_path`` and ``checkpoint`` as described in the module docstring.

    ``mean``/``std`` given explicitly win over the run's record. With ``need_normalization`` a
    checkpoint outside a run and no ``mean``/``std`` is a one-line error.
    """
    if (mean is None) != (std is None):
        raise InferenceError("pass --mean and --std together (one value per input channel, or one for all)")
    given = load_spec(spec_path)
    weights = weights_file(checkpoint)
    spec, run = run_spec(given, checkpoint, str(spec_path))
    note = None
    if run is not None and (spec.num_classes, tuple(spec.input_size), spec.model_kwargs, spec.taps) != (
        given.num_classes, tuple(given.input_size), given.model_kwargs, given.taps
    ):  # fmt: skip
        note = (
            f"note: using the run's resolved spec {run / CONFIG} ({spec.num_classes} classes at "
            f"{'×'.join(map(str, spec.input_size))}), which its weights fit"
        )
    if mean is None and run is not None:
        stats = normalization(run)
        mean, std = stats if stats else (None, None)
    if need_normalization and mean is None:
        raise InferenceError(
            f"{weights} is not in a run folder, so how its images were normalised is unknown; pass "
            "--mean and --std (e.g. --mean 0.5 --std 0.25), or --checkpoint the run folder"
        )
    return Resolved(
        spec, weights, run, None if mean is None else list(mean), None if std is None else list(std), note
    )
