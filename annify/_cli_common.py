"""Shared pieces of the command line: the error boundary and common options."""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import click


def friendly(fn):
    """Turn annify's user-facing errors into one-line ``click`` errors (no traceback, exit 1).

    Catches ``annify.errors.AnnifyError`` (its message is the line) and ``OSError`` (the line names
    the path). Anything else is a bug and keeps its traceback. Set ``ANNIFY_DEBUG=1`` to see the
    traceback of a user-facing error too (for bug reports).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from annify.errors import AnnifyError

        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="fvcore")
        try:
            return fn(*args, **kwargs)
        except (AnnifyError, OSError) as e:
            if os.environ.get("ANNIFY_DEBUG"):
                raise
            raise click.ClickException(_one_line(e)) from None

    return wrapper


def _one_line(e: BaseException) -> str:
    """The first line of an error's message; an OSError from the system names its path and the fix."""
    import errno

    if isinstance(e, OSError) and e.strerror and e.filename:
        fix = (
            "free disk space there"
            if e.errno in (errno.ENOSPC, errno.EDQUOT)
            else "check the path and its permissions"
        )
        text = f"cannot use {e.filename}: {e.strerror}; {fix}"
    else:
        text = str(e).strip()
    lines = text.splitlines()
    if lines and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        # torch re-raises a worker's error with the worker's traceback as its message: its last line is
        # "annify.errors.DataError: <the message>"
        return lines[-1].partition(": ")[2] or lines[-1]
    return lines[0] if lines else type(e).__name__


def finite_positive(ctx, param, value: float | None) -> float | None:
    """Click callback: a finite positive number or nothing (nan and inf would silently disable a limit)."""
    import math

    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"must be a finite positive number, got {value}", param=param)
    return value


def writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and check it can be written; a one-line error otherwise."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise click.ClickException(
            f"cannot create output folder '{p}': {e.strerror}; choose another --out"
        ) from None
    if not os.access(p, os.W_OK):
        raise click.ClickException(f"output folder '{p}' is not writable; choose another --out")
    return p


def parse_size(value: str | None) -> tuple[int, int, int] | None:
    """'3,224,224' or '3x224x224' -> (3, 224, 224)."""
    if value is None:
        return None
    parts = value.replace("x", ",").split(",")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) <= 0:
        raise click.BadParameter(f"expected C,H,W such as 3,224,224, got '{value}'")
    return size


checkpoint_option = click.option(
    "--checkpoint",
    required=True,
    help="Weights: a run folder (its last checkpoint, spec and normalisation), a checkpoint folder, "
    "or a .safetensors file.",
)


def device_options(fn):
    """``--device`` and ``--workers``, shared by the commands that run a network over a dataset."""
    fn = click.option(
        "--workers", type=click.IntRange(0), default=0, show_default=True, help="DataLoader worker processes."
    )(fn)
    return click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")(fn)


class RegistryChoice(click.Choice):
    """A choice among the names a registry holds, read from the registry when a value is checked.

    The registries live in modules that import torch; reading them when a command runs, not when it
    is defined, keeps ``--help`` light (help shows the option's metavar instead of the names). An
    unknown value is refused with the registry's names, as ``click.Choice`` refuses one.
    """

    def __init__(self, names: Callable[[], Iterable[str]]) -> None:
        self._names = names
        self.case_sensitive = True

    @functools.cached_property
    def choices(self) -> tuple[str, ...]:  # click.Choice reads self.choices
        return tuple(self._names())


def registry_choice(module: str, attribute: str, *extra: str) -> RegistryChoice:
    """The names ``module.attribute`` holds (a sequence, or a function returning one), then ``extra``."""

    def names() -> tuple[str, ...]:
        held = getattr(importlib.import_module(module), attribute)
        return (*(held() if callable(held) else held), *extra)

    return RegistryChoice(names)


def shown(value) -> str:
    """A setting's value as help shows it: 0.0001 and 0 (not 1e-04 and 0.0), on and off for true and false."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return format(value, "g") if isinstance(value, float) else str(value)


def setting_help(text: str, key: str, *, none: str | None = None, init: bool = True) -> str:
    """``text``, then where the setting ``key`` comes from when the option is not given.

    The spec's ``train:`` section, else ``annify.config.DEFAULTS`` (``none`` says what a default of
    None means), and with ``init`` the trained start's ``INIT_DEFAULTS`` where it has one.
    """
    from annify.config import DEFAULTS, INIT_DEFAULTS

    value = DEFAULTS[key]
    if value is None and none is None:
        raise ValueError(f"setting '{key}' defaults to None: say what that means (none=...)")
    default = f"default: the spec's train.{key}, else {none if value is None else shown(value)}"
    if init and key in INIT_DEFAULTS:
        default += f"; with --init {shown(INIT_DEFAULTS[key])}"
    return f"{text} ({default})."


DEFAULT_THREADS = 1
THREADS_HELP = (
    f"torch CPU threads (intra-op). Default {DEFAULT_THREADS}: on a machine other processes also use, "
    "OpenMP threads beyond the free cores make small networks many times slower (measured: a small "
    "network's epoch 14.5x slower with 2 threads on a busy 2-core machine, BENCHMARKS.md §16); raise it "
    "on a machine of your own for large networks."
)


CPU_MEMORY = ("keep", "release")  # what --cpu-memory does with freed memory: CPU_MEMORY_HELP says
CPU_MEMORY_HELP = (
    "keep: freed tensor memory stays in the process for the next batch (no page faults on every large "
    "activation: resnet50's forward at batch 32 runs 1.6x faster on one thread, BENCHMARKS.md §18); release: "
    "the C library's default, large blocks go back to the system at once (a smaller resident size between "
    "batches)."
)


def cpu_options(fn):
    """``--threads N`` and ``--cpu-memory keep|release``: set up the CPU process before the command runs.

    torch is imported only then, so a command's ``--help`` stays fast.
    """

    @functools.wraps(fn)
    def wrapper(*args, threads: int, cpu_memory: str, **kwargs):
        import torch

        from annify.cpu import keep_freed_memory

        torch.set_num_threads(threads)
        if cpu_memory == "keep":
            keep_freed_memory()
        return fn(*args, **kwargs)

    wrapper = click.option(
        "--cpu-memory",
        type=click.Choice(CPU_MEMORY),
        default=CPU_MEMORY[0],
        show_default=True,
        help=CPU_MEMORY_HELP,
    )(wrapper)
    return click.option(
        "--threads", type=click.IntRange(1), default=DEFAULT_THREADS, show_default=True, help=THREADS_HELP
    )(wrapper)
