"""Every ``Example:`` line of every command's ``--help`` is a command that works as written.

Each example is checked twice in the default suite: it parses (the command exists, every option is one
it takes and every value has the right type; click does the checking, as it would for a user), and it
runs, in the order a user would (convert and inspect, train, then eval, predict and export of that run,
the EANNs, the demo), in a fresh clone in a scratch folder, made cheap as ``tests/cli_lines.py`` says
(``--epochs 1``, ``--train-subset 20``, tiny stand-ins for the data and images a fresh machine lacks).
"""

from __future__ import annotations

import shlex

import click
import pytest
from cli_lines import annify_args, commands, make_workdir, run_line

ORDER = ["convert", "inspect", "train", "eval", "calibrate", "predict", "export", "serve", "eann", "demo"]


def _examples() -> list[tuple[str, list[str]]]:
    """(command name, argv as written) for every example, continuation lines joined, in ORDER."""
    found = []
    for name, command in commands().items():
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
    missing = [name for name in commands() if name not in named]
    assert not missing, f"commands without an Example: line in --help: {missing}"
    assert set(named) <= set(ORDER), "add the new command to ORDER, after the commands it needs"


@pytest.mark.parametrize(("name", "argv"), EXAMPLES, ids=IDS)
def test_example_parses(name, argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # paths an earlier example makes do not exist here: parse, don't check them
    _, args = annify_args(argv)
    assert args[0] == name
    command = commands()[name]
    for param in command.params:  # existence: test_example_runs_as_written makes the files
        if isinstance(param.type, click.Path):
            monkeypatch.setattr(param.type, "exists", False)
    ctx = command.make_context(
        name, args[1:]
    )  # raises click.UsageError/BadParameter on a bad option or value
    given = {p.name for p in command.params if ctx.get_parameter_source(p.name).name == "COMMANDLINE"}
    assert given, f"{argv} sets nothing"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("examples"))


@pytest.mark.parametrize(("name", "argv"), EXAMPLES, ids=IDS)
def test_example_runs_as_written(name, argv, workdir):
    run_line(shlex.join(argv), workdir)
