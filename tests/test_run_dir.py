"""The run folder has one owner: ``annify.run_dir.RunDir`` names every file, and names what ``train`` writes."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

import annify
from annify import run_dir
from annify._files import previous_folder
from annify.errors import CheckpointError
from annify.run_dir import RunDir

PACKAGE = Path(annify.__file__).parent
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"  # they read runs' files too
_FILES = (
    "config",
    "data",
    "metrics",
    "anytime_json",
    "anytime_csv",
    "anytime_png",
    "weights_png",
    "original",
)
_FILES += ("thresholds", "lock_file", "checkpoints")


def owned_names() -> tuple[set[str], set[str]]:
    """(every file name RunDir owns, with the checkpoints relative to the run; its folder names).

    A folder name (``checkpoints``, ``last``, ``best``) is also a word (a click option, distillation's
    teacher, a state's key): it counts where a path is joined with it (``out / "checkpoints"``).
    """
    run = RunDir("")
    names = {getattr(run, f).name for f in _FILES}
    names |= {run_dir.WEIGHTS, run_dir.STATE, run_dir.BEST_INFO, run.last.as_posix(), run.best.as_posix()}
    folders = {run.checkpoints.name, run.last.name, run.best.name}
    return names - folders, folders


def spelled(text: str, names: set[str], folders: set[str]) -> set[str]:
    """The owned names a string literal in ``text`` is, or starts or ends as a path with; the folder
    names joined to a path."""
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            value = node.value
            found |= {n for n in names if value == n or value.endswith("/" + n) or value.startswith(n + "/")}
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            found |= {
                n.value for n in (node.left, node.right) if isinstance(n, ast.Constant) and n.value in folders
            }
    return found


def test_no_module_but_run_dir_spells_a_run_folder_file_name():
    names, folders = owned_names()
    literal = "x = out / 'checkpoints/last'; y = f\"{out / 'config.yaml'}\"; z = out / 'checkpoints' / 'best'"
    assert spelled(literal, names, folders) == {"checkpoints/last", "config.yaml", "checkpoints", "best"}
    assert spelled("teacher = 'last'; option = 'checkpoints'", names, folders) == set()
    offenders = {
        f"{path.parent.name}/{path.name}": sorted(found)
        for path in sorted([*PACKAGE.rglob("*.py"), *BENCHMARKS.rglob("*.py")])
        if path != PACKAGE / "run_dir.py" and (found := spelled(path.read_text(), names, folders))
    }
    assert offenders == {}, "spell these through annify.run_dir.RunDir"


def test_run_dir_names_what_train_writes(run, tmp_path):
    folder = RunDir(run)
    top = {p.name for p in run.iterdir()}
    assert top == {*run_dir.RESULTS, folder.checkpoints.name}  # no --init, no calibration, the lock let go
    for name in run_dir.RESULTS:
        assert (run / name).is_file()
    assert {folder.config, folder.data, folder.metrics, folder.anytime_json, folder.anytime_csv} <= {
        run / n for n in run_dir.RESULTS
    }
    assert {folder.anytime_png, folder.weights_png} <= {run / n for n in run_dir.RESULTS}
    assert {p.name for p in folder.checkpoints.iterdir()} == {folder.last.name, folder.best.name}
    assert {p.name for p in folder.last.iterdir()} == {run_dir.WEIGHTS, run_dir.STATE}
    assert {p.name for p in folder.best.iterdir()} == {run_dir.WEIGHTS, run_dir.BEST_INFO}
    assert folder.is_run() and run_dir.find_run(folder.last) == run.resolve()
    assert folder.last_checkpoint() == folder.last
    assert run_dir.weights_file(run) == folder.last / run_dir.WEIGHTS
    record = json.loads(folder.data.read_text())
    assert folder.normalization() == (record["mean"], record["std"]) == run_dir.normalization(run)
    assert len(folder.metrics.read_text().splitlines()) == 1  # one epoch
    assert json.loads(folder.anytime_json.read_text())[-1]["output"] == len(
        annify.load_spec(folder.config).heads
    )


def test_last_checkpoint_is_found_mid_swap(run, tmp_path):
    copy = RunDir(tmp_path / "run")
    shutil.copytree(run, copy.root)
    assert copy.last_checkpoint() == copy.last
    copy.last.rename(previous_folder(copy.last))  # a kill between atomic_folder's two renames
    assert copy.last_checkpoint() == previous_folder(copy.last)
    assert run_dir.weights_file(copy.root) == previous_folder(copy.last) / run_dir.WEIGHTS
    assert run_dir.run_checkpoint(copy.root) == previous_folder(copy.last)
    shutil.rmtree(previous_folder(copy.last))
    assert copy.last_checkpoint() is None
    assert run_dir.run_checkpoint(tmp_path / "weights.safetensors") == tmp_path / "weights.safetensors"


def test_a_run_dir_is_a_value():
    assert RunDir("runs/x") == RunDir(Path("runs/x"))
    assert RunDir("runs/x").root == Path("runs/x")
    assert RunDir("runs/x").last == Path("runs/x") / RunDir("").last


def test_checkpoints_are_written_whole_and_their_state_read_back(tmp_path):
    run = RunDir(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    run.write_checkpoint(run.last, {run_dir.STATE: lambda p: torch.save({"epoch": 1}, p)})
    assert run.last_checkpoint() == run.last and run_dir.read_state(run.last) == {"epoch": 1}

    def full_disk(path):
        raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointError, match=f"the last good checkpoint {run.last} is kept"):
        run.write_checkpoint(run.last, {run_dir.STATE: full_disk})
    assert run_dir.read_state(run.last) == {"epoch": 1}  # the previous one, untouched
    (run.last / run_dir.STATE).write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="is unreadable"):
        run_dir.read_state(run.last)


def test_resuming_removes_what_a_killed_write_left_in_the_run_folder(run, tmp_path, spec_path):
    """atomic_write's temporary files sit beside their target: in the run folder itself and in checkpoints/."""
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    (out / ".tmp-config.yaml-abc").write_text("half")
    (out / "checkpoints" / ".tmp-last-x1y2").mkdir()
    from annify.train import train

    train(spec_path, out=out, epochs=1, resume=True, log=lambda _: None)
    assert not list(out.glob(".tmp-*")) and not list((out / "checkpoints").glob(".tmp-*"))
