"""Atomic files and folders: the one place annify writes safely.

Every write goes through a temporary sibling in the same folder (so the final rename never crosses a
file system), is flushed and ``os.fsync``-ed, renamed into place with ``os.replace`` and then the
folder itself is fsynced, so that after a crash or a ``kill -9`` a reader finds the old content or
the new, never a mix, and never a file whose name is on disk before its data. Temporaries are
removed on any exception. ``mkstemp``/``mkdtemp`` create private files (0600) and folders (0700);
what is written here gets the mode a plain ``open``/``mkdir`` would give it under the process umask.

- ``atomic_write(path, text_or_bytes)``: a whole file from memory.
- ``atomic_file(path)``: a context manager yielding a temporary path, for writers that take a path
  (``torch.save``, safetensors' ``save_file``, ``onnx.save``).
- ``atomic_folder(path)``: a context manager yielding a staging folder that replaces ``path`` whole
  (checkpoints). Between its two renames ``path`` is briefly missing and ``previous_folder(path)``
  holds the old one: readers look there too (``run_dir.find_checkpoint``).
- ``staging(folder)`` and ``move_into(stage, folder, names)``: files checked in a hidden staging
  folder, then moved one by one into a folder that holds other files too (``annify export``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "TEMP_PREFIX",
    "atomic_file",
    "atomic_folder",
    "atomic_write",
    "fsync_dir",
    "move_into",
    "previous_folder",
    "remove_leftovers",
    "staging",
]

# Every temporary file or folder made here starts with this, so a folder's leftovers can be found.
TEMP_PREFIX = ".tmp-"


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``/proc/self/status``):
    setting it to read it would, for an instant, give files another thread creates mode 0666."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0)  # elsewhere the only way to read it is to set it: set it straight back
    os.umask(umask)
    return umask


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of folder ``path`` (a rename into it, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _commit(tmp: Path, path: Path) -> None:
    """The last steps of an atomic file write: the umask's mode, the rename, the folder's fsync."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextmanager
def _removed_on_error(tmp: Path, path: Path) -> Iterator[None]:
    """Remove the temporary file ``tmp`` if the block raises; a failed write (a full disk) then names
    ``path``, the file it was for, rather than the temporary one or none."""
    try:
        yield
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None and e.strerror:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, text: str | bytes) -> None:
    """Write ``text`` (str or bytes) to ``path`` whole: the old file stays until the new one is complete."""
    p = Path(path)
    if not isinstance(text, (str, bytes)):
        raise TypeError(f"atomic_write writes str or bytes, not {type(text).__name__}")
    mode = "wb" if isinstance(text, bytes) else "w"
    fd, name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{p.name}-", dir=p.parent)
    with _removed_on_error(Path(name), p):
        with os.fdopen(fd, mode) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _commit(Path(name), p)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on a clean exit it replaces ``path``.

    For writers that take a path: ``with atomic_file(p) as tmp: torch.save(state, tmp)``. The file
    is fsynced before the rename and the folder after it; if the block raises, ``path`` is untouched
    and the temporary file removed.
    """
    p = Path(path)
    fd, name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{p.name}-", dir=p.parent)
    os.close(fd)
    tmp = Path(name)
    with _removed_on_error(tmp, p):
        yield tmp
        _fsync_file(tmp)
        _commit(tmp, p)


def previous_folder(path: str | os.PathLike) -> Path:
    """Where ``atomic_folder`` keeps the old ``path`` between its two renames (``.old-NAME``)."""
    p = Path(path)
    return p.with_name(f".old-{p.name}")


def _sync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` and every folder in it, the deepest first."""
    for root, _, files in os.walk(folder, topdown=False):
        for f in files:
            _fsync_file(Path(root) / f)
        fsync_dir(root)


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A staging folder beside ``path`` to fill; on a clean exit it replaces ``path`` whole.

    Every file in it and the folder are fsynced, then two renames swap it in: ``path`` to
    ``previous_folder(path)``, the staging folder to ``path``; the old one is then deleted. A kill
    before the first rename leaves ``path`` as it was; between them the old one is at
    ``previous_folder(path)``, and a reader should take it from there (``run_dir.find_checkpoint``). If
    the block raises, ``path`` is untouched and the staging folder removed.
    """
    dest = Path(path)
    stage = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{dest.name}-", dir=dest.parent))
    try:
        os.chmod(stage, 0o777 & ~_umask())
        yield stage
        _sync_tree(stage)
        old = previous_folder(dest)
        if dest.exists():  # else an earlier kill left the previous one in ``old``: keep it until the swap
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
        os.replace(stage, dest)
        fsync_dir(dest.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


@contextmanager
def staging(folder: str | os.PathLike) -> Iterator[Path]:
    """A hidden folder inside ``folder`` for files to check before ``move_into`` puts them in place.

    Removed on exit, with whatever was not moved.
    """
    stage = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}stage-", dir=folder))
    try:
        os.chmod(stage, 0o777 & ~_umask())
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def move_into(stage: str | os.PathLike, folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Move the files ``names`` from ``stage`` into ``folder``, each fsynced, replacing any there.

    Each file is replaced atomically (a reader sees the old file or the new), not the set of them.
    """
    stage, folder = Path(stage), Path(folder)
    names = list(names)
    for name in names:
        _fsync_file(stage / name)
    for name in names:
        os.replace(stage / name, folder / name)
    fsync_dir(folder)


def remove_leftovers(folder: str | os.PathLike) -> None:
    """Remove the temporary files and folders that a killed write left in ``folder``.

    Only for a folder one process writes at a time (a locked run folder): a write in progress
    elsewhere would lose its temporary file.
    """
    for leftover in Path(folder).glob(f"{TEMP_PREFIX}*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
