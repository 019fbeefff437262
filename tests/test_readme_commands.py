"""README's command list (the ```bash block under "What you type") works on a fresh clone.

Every line is run in README's order in one fresh clone in a scratch folder (every file git tracks, so a
stale file committed where a command writes breaks it here too), as ``tests/cli_lines.py`` says: the options that set how long a command runs are made small
(``--epochs 1``, ``--train-subset 20``), data a fresh machine lacks (Debian's Fashion-MNIST, an ImageNet
folder) is a tiny stand-in of the same kind, ``torchrun`` lines run under torchrun, a server must answer
``/healthz``. A line whose command has no rule fails. The commands the product is known by must be in
the list.
"""

from __future__ import annotations

import re
import shlex

import pytest
from cli_lines import ROOT, commands, make_workdir, run_line, tracked_files

README = ROOT / "README.md"
PRODUCT = (  # the three commands annify is known by, each the start of a README line
    "annify convert resnet50 --every 2 --out zoo/",
    "annify train zoo/resann50.yaml",
    "annify eann resnet26 resnet50 resnet101",
)
NOT_RUN: dict[str, str] = {}  # a README line this test cannot run -> why (keep it empty where possible)


def readme_lines() -> list[str]:
    """The command lines of the ```bash block under README's "What you type", continuations joined."""
    text = README.read_text()
    found = re.search(r"^## What you type\n+```bash\n(.*?)^```", text, re.S | re.M)
    assert found, 'README has no ```bash block under "## What you type"'
    block = found.group(1).replace("\\\n", " ")
    return [line for line in block.splitlines() if shlex.split(line, comments=True)]


LINES = readme_lines()


def test_readme_lists_the_commands_annify_is_known_by():
    typed = [shlex.split(line, comments=True) for line in LINES]
    for command in PRODUCT:
        argv = shlex.split(command)
        assert any(t[: len(argv)] == argv for t in typed), f"README's command list lacks `{command}`"


def test_lines_not_run_are_still_in_readme():
    stale = [line for line in NOT_RUN if line not in LINES]
    assert not stale, f"NOT_RUN names lines README no longer has: {stale}"


def test_nothing_is_committed_where_commands_write():
    """zoo/, runs/, export/ (the folders of README's --out values and of the commands' defaults) are
    output: a file committed there goes stale and stops the command on a fresh clone."""
    files = tracked_files()
    if files is None:
        pytest.skip("not a git checkout")
    outs = {
        str(p.default)
        for c in commands().values()
        for p in c.params
        if p.name == "out" and isinstance(p.default, str)
    }
    for argv in (shlex.split(line, comments=True) for line in LINES):
        outs.update(argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--out")
    tops = {out.strip("/").split("/")[0] for out in outs} | {"runs"}  # train's default: runs/<spec name>
    committed = [f for f in files if f.split("/")[0] in tops]
    assert not committed, f"output folders {sorted(tops)} hold committed files: {committed}"


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("clone"))


@pytest.mark.parametrize("line", LINES, ids=[line.split("#")[0].strip()[:60] for line in LINES])
def test_readme_line_runs(line, clone):
    if line in NOT_RUN:
        pytest.skip(NOT_RUN[line])
    run_line(line, clone)
