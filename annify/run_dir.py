"""The run folder: its layout, and how every command resolves ``--checkpoint`` to what it needs.

``RunDir`` owns every file name of a run folder; no other module spells one. ``annify train --out RUN``
writes::

    RUN/config.yaml                       the resolved spec (refitted to the data) and its settings
    RUN/data.json                         the data source and the mean/std its images were normalised with
    RUN/metrics.jsonl                     one line per epoch: losses, weights, val errors
    RUN/anytime.json, RUN/anytime.csv     the anytime table of the final weights (val and test)
    RUN/anytime.png, RUN/weights.png      its plot, and the weight scheme's history
    RUN/original.json                     with --init: the original network's errors before training
    RUN/checkpoints/last/model.safetensors, state.pt    the weights and what --resume needs
    RUN/checkpoints/best/model.safetensors, best.json   the best by anytime quality, and its epoch
    RUN/.lock                             held by the one process writing the run

``annify calibrate RUN`` adds ``RUN/thresholds.json``. A checkpoint is replaced whole
(``_files.atomic_folder``); a kill between its two renames leaves the previous one as
``checkpoints/.old-last``, which ``RunDir.last_checkpoint`` finds as ``annify train --resume`` does.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from annify._files import atomic_folder, previous_folder
from annify.errors import CheckpointError, InferenceError, SpecError, TrainError
from annify.spec import Spec, load_spec

__all__ = [
    "BEST_INFO",
    "CONFIG",
    "DATA",
    "RESULTS",
    "STATE",
    "WEIGHTS",
    "Resolved",
    "RunDir",
    "find_run",
    "RunLock",
    "find_checkpoint",
    "foreign_results",
    "in_checkpoints",
    "lock",
    "read_state",
    "normalization",
    "resolve",
    "run_checkpoint",
    "weights_file",
]

CONFIG, DATA, WEIGHTS = "config.yaml", "data.json", "model.safetensors"
STATE, BEST_INFO = "state.pt", "best.json"  # beside WEIGHTS: in checkpoints/last and checkpoints/best
_CHECKPOINTS, _LAST, _BEST = "checkpoints", "last", "best"
LOCK = ".lock"  # held (fcntl.flock) by the one process writing the run folder


@dataclass(frozen=True)
class RunDir:
    """A run folder (``root``): the path of each of its files, its last checkpoint and its normalisation."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    config = property(lambda self: self.root / CONFIG, doc="the resolved spec and settings")
    data = property(lambda self: self.root / DATA, doc="the data source and its mean/std")
    metrics = property(lambda self: self.root / "metrics.jsonl", doc="one JSON line per epoch")
    anytime_json = property(lambda self: self.root / "anytime.json", doc="the anytime table")
    anytime_csv = property(lambda self: self.root / "anytime.csv", doc="the anytime table as CSV")
    anytime_png = property(lambda self: self.root / "anytime.png", doc="the anytime curves")
    weights_png = property(lambda self: self.root / "weights.png", doc="the weight scheme's history")
    original = property(lambda self: self.root / "original.json", doc="the --init network's errors")
    thresholds = property(lambda self: self.root / "thresholds.json", doc="what `annify calibrate` wrote")
    lock_file = property(lambda self: self.root / LOCK, doc="held by the process writing the run")
    checkpoints = property(lambda self: self.root / _CHECKPOINTS, doc="the folder of the checkpoints")
    last = property(lambda self: self.root / _CHECKPOINTS / _LAST, doc="the checkpoint --resume takes")
    best = property(lambda self: self.root / _CHECKPOINTS / _BEST, doc="the best by anytime quality")

    def last_checkpoint(self) -> Path | None:
        """``checkpoints/last``, or the previous one a kill left mid-swap; None before the first."""
        return find_checkpoint(self.checkpoints, _LAST)

    def write_checkpoint(self, dest: Path, files: dict[str, Callable[[Path], None]]) -> None:
        """Write checkpoint ``dest`` (``last`` or ``best``), each file by ``files[name](path)``, atomically
        (``_files.atomic_folder``): the previous one is untouched until every file is complete, and a kill
        mid-swap leaves it where ``last_checkpoint`` takes it. A failed write is a one-line
        ``CheckpointError`` (``unwritable``)."""
        from safetensors import SafetensorError

        target = dest
        try:
            with atomic_folder(dest) as stage:
                for name, write in files.items():
                    target = dest / name
                    write(stage / name)
                target = dest  # past the writers: the fsyncs and the swap
        except (OSError, RuntimeError, SafetensorError) as e:  # a full disk: torch.save's zip writer
            # raises RuntimeError, safetensors its own error; the previous checkpoint is untouched
            raise self.unwritable(target, e, "checkpoint ") from None

    def unwritable(self, path: Path, e: Exception, what: str = "") -> CheckpointError:
        """The one line for a run file that could not be written: why, and the checkpoint a resume takes."""
        text = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip()
        why = text.splitlines()[0] if text else type(e).__name__
        previous = self.last_checkpoint()  # what --resume continues from
        kept = f"the last good checkpoint {previous} is kept" if previous else "no checkpoint was written yet"
        return CheckpointError(
            f"cannot write {what}{path} ({why}); {kept}; free disk space and continue with --resume"
        )

    def is_run(self) -> bool:
        """Whether ``root`` is a run folder that ``annify train`` started (its config and checkpoints)."""
        return self.config.is_file() and self.checkpoints.is_dir()

    def normalization(self) -> tuple[list[float], list[float]] | None:
        """(mean, std) from the run's ``data.json``; None when the run has none."""
        record = self.data
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


# what `annify train` writes at the top of a run folder, beside checkpoints/
_TOP = RunDir("")
RESULTS = tuple(
    p.name
    for p in (_TOP.config, _TOP.data, _TOP.metrics, _TOP.anytime_json, _TOP.anytime_csv, _TOP.anytime_png,
              _TOP.weights_png)
)  # fmt: skip


class RunLock:
    """A run folder held by this process (``lock``); ``release`` lets it go (a killed process lets go too)."""

    def __init__(self, out: Path, fd: int, created: bool) -> None:
        self.out, self.fd, self.created = out, fd, created

    def release(self) -> None:
        if self.fd < 0:
            return
        RunDir(self.out).lock_file.unlink(
            missing_ok=True
        )  # before unlocking: a waiting process then finds a new file
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
    path = RunDir(out).lock_file
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # the holder let go and removed it between our open and our lock
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return RunLock(out, fd, created)


def find_checkpoint(root: str | os.PathLike, name: str = _LAST) -> Path | None:
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
    run = RunDir(p)
    if p.is_dir() and (run.checkpoints.is_dir() or run.config.is_file()):  # a run folder
        last = run.last_checkpoint()
        if last is None:
            raise InferenceError(
                f"run {p} has no checkpoint yet: train it (annify train SPEC --out {p}), or continue an "
                "interrupted run with --resume"
            )
        return last / WEIGHTS
    if not p.exists() and in_checkpoints(p):  # checkpoints/last, mid-swap
        found = find_checkpoint(p.parent, p.name)
        if found is not None:
            return found / WEIGHTS
    return p / WEIGHTS if p.is_dir() else p


def in_checkpoints(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a checkpoint of a run's ``checkpoints/`` folder (which may be mid-swap)."""
    p = Path(path)
    return p.parent.name == _CHECKPOINTS and p.parent.is_dir()


def run_checkpoint(path: str | os.PathLike) -> Path:
    """A run folder's last checkpoint (``RunDir.last_checkpoint``); any other ``path`` as given."""
    return RunDir(path).last_checkpoint() or Path(path)


def read_state(checkpoint: Path) -> dict:
    """The training state (``state.pt``: epoch, best, settings, optimizer, scheduler, scheme, RNG) of
    checkpoint folder ``checkpoint``; a missing or unreadable one is a one-line ``CheckpointError``."""
    import torch

    path = checkpoint / STATE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} has no {STATE}; delete it to start over")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, ... all mean the same to the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint state {path} is unreadable ({msg}); delete {checkpoint} to start over"
        ) from None


def find_run(checkpoint: str | os.PathLike) -> Path | None:
    """The run folder holding ``checkpoint`` (itself, or up to three folders above), if any."""
    p = Path(checkpoint).resolve()
    for folder in [p, *p.parents][:4]:
        if RunDir(folder).is_run():
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
        previous = load_spec(RunDir(out).config)
    except (SpecError, OSError):
        return found
    same = (previous.model, previous.taps, previous.train) == (spec.model, spec.taps, dict(settings))
    return [] if same else found


def normalization(run: Path) -> tuple[list[float], list[float]] | None:
    """(mean, std) from the run's ``data.json``; None when the run has none (``RunDir.normalization``)."""
    return RunDir(run).normalization()


def run_spec(given: Spec, checkpoint: str | os.PathLike, named: str = "the spec") -> tuple[Spec, Path | None]:
    """(the network ``checkpoint``'s weights fit, its run folder): a run's own resolved ``config.yaml``
    (refitted to its data), or ``given`` for weights outside a run; another model is a one-line error."""
    run = find_run(checkpoint)
    if run is None:
        return given, None
    spec = load_spec(RunDir(run).config)
    if spec.model != given.model:
        raise SpecError(
            f"{checkpoint} is a checkpoint of {spec.model} (run {run}), but {named} describes "
            f"{given.model}; pass the run's own {RunDir(run).config}"
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
            f"note: using the run's resolved spec {RunDir(run).config} ({spec.num_classes} classes at "
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
