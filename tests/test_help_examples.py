"""Every ``Example:`` line of every command's ``--help`` is a command that works as written.

The default suite checks that each example parses: the command exists, every option is one it takes
and every value has the right type (click does the checking, as it would for a user). The slow test
runs them all, in the order a user would (convert and inspect, train, then eval, predict and export
of that run, the EANNs, the demo), in a scratch copy of the repository's specs, with the files an
example names but cannot make (an image, a CIFAR folder) written by the test first. Examples on
Fashion-MNIST run where Debian's dataset-fashion-mnist is installed and are skipped elsewhere.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from helpers import write_cifar
from PIL import Image

from annify.cli import main

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["convert", "inspect", "train", "eval", "calibrate", "predict", "export", "serve", "eann", "demo"]
FASHION = Path("/usr/share/datasets/fashion-mnist")


def _commands() -> dict[str, click.Command]:
    ctx = click.Context(main)
    return {name: main.get_command(ctx, name) for name in main.list_commands(ctx)}


def _examples() -> list[tuple[str, list[str]]]:
    """(command name, argv as written) for every example, continuation lines joined, in ORDER."""
    found = []
    for name, command in _commands().items():
        text = (command.help or "").replace("\\\n", " ")
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("Example:"):
                found.append((name, shlex.split(line.removeprefix("Example:"))))
    rank = {n: i for i, n in enumerate(ORDER)}
    return sorted(found, key=lambda e: rank.get(e[0], len(ORDER)))  # stable: help order within a command


EXAMPLES = _examples()
IDS = [" ".join(argv)[:70] for _, argv in EXAMPLES]


def test_every_command_has_an_example():
    named = {name for name, _ in EXAMPLES}
    missing = [name for name in _commands() if name not in named]
    assert not missing, f"commands without an Example: line in --help: {missing}"
    assert set(named) <= set(ORDER), "add the new command to ORDER, after the commands it needs"


def _annify_args(argv: list[str]) -> list[str]:
    """The arguments after ``annify`` (or after ``-m annify`` in a torchrun line)."""
    if argv[0] == "annify":
        return argv[1:]
    assert argv[0] == "torchrun" and "-m" in argv and argv[argv.index("-m") + 1] == "annify", argv
    return argv[argv.index("-m") + 2 :]


@pytest.mark.parametrize(("name", "argv"), EXAMPLES, ids=IDS)
def test_example_parses(name, argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # paths an earlier example makes do not exist here: parse, don't check them
    args = _annify_args(argv)
    assert args[0] == name
    command = _commands()[name]
    for param in command.params:  # existence is checked by the slow test, which makes the files
        if isinstance(param.type, click.Path):
            monkeypatch.setattr(param.type, "exists", False)
    ctx = command.make_context(
        name, args[1:]
    )  # raises click.UsageError/BadParameter on a bad option or value
    given = {p.name for p in command.params if ctx.get_parameter_source(p.name).name == "COMMANDLINE"}
    assert given, f"{argv} sets nothing"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch folder with the repository's specs, the image and CIFAR folder the examples name."""
    folder = tmp_path_factory.mktemp("examples")
    shutil.copytree(ROOT / "specs", folder / "specs")
    Image.new("L", (8, 8), color=128).save(folder / "digit.png")
    write_cifar(folder / "data", "cifar10", n_train=100, n_test=40)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(("name", "argv"), EXAMPLES, ids=IDS)
def test_example_runs_as_written(name, argv, workdir, monkeypatch):
    if "fashion-mnist" in argv and not FASHION.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    if name == "serve":
        pytest.skip("a server runs until stopped; tests/test_serve.py starts one and speaks HTTP to it")
    monkeypatch.chdir(workdir)
    if argv[0] == "torchrun":
        torchrun = Path(sys.executable).parent / "torchrun"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [str(torchrun), *argv[1:]], cwd=workdir, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return
    result = CliRunner().invoke(main, argv[1:], catch_exceptions=False)
    assert result.exit_code == 0, result.output[-3000:]
