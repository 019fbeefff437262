"""Run annify command lines as a user types them, in a scratch folder, made cheap by one rule per option.

Shared by ``test_readme_commands.py`` (README's command list) and ``test_help_examples.py`` (every
``Example:`` of every ``--help``). A line is run as written except for:

- ``CHEAP``: an option that sets how long a command runs (``--epochs``, ``--train-subset``) is set to a
  small value (replaced where the line gives one, added where the command takes it and the line does not);
- data a fresh machine lacks: an absolute path in ``--data`` (and ``fashion-mnist`` alone, which means
  Debian's ``/usr/share/datasets/fashion-mnist``) is re-rooted inside the scratch folder, where
  ``make_workdir`` has written a tiny stand-in of that kind; relative paths and image files the lines name
  are made there too;
- how it runs (``RUNNERS``): in this process through click's ``CliRunner``; a ``torchrun`` line as a
  subprocess; a server (``serve``) as a subprocess that must answer ``/healthz``, then is stopped.

A command this module has no runner for fails the test, so a new command gets a rule before it ships.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import click
from click.testing import CliRunner
from helpers import write_cifar, write_idx
from PIL import Image

from annify.cli import main
from annify.data import DEBIAN_FASHION_MNIST

ROOT = Path(__file__).resolve().parents[1]
CHEAP = {"--epochs": "1", "--train-subset": "20"}  # 20: the digits' 10 classes twice; the ImageNet stand-in
RUNNERS = {  # how each command runs: "cli" in process, "server" as a process answering /healthz
    "convert": "cli",
    "inspect": "cli",
    "train": "cli",
    "eval": "cli",
    "predict": "cli",
    "export": "cli",
    "eann": "cli",
    "demo": "cli",
    "calibrate": "cli",
    "serve": "server",
}
SERVER_START_S = 120  # a server that has not answered /healthz by then fails the test


def commands() -> dict[str, click.Command]:
    """annify's commands by name."""
    ctx = click.Context(main)
    return {name: main.get_command(ctx, name) for name in main.list_commands(ctx)}


def tracked_files() -> list[str] | None:
    """The files git tracks in this checkout (as they are in the working tree), None outside a checkout."""
    try:
        done = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return [name for name in done.stdout.decode().split("\0") if name and (ROOT / name).is_file()]


def make_workdir(folder: Path) -> Path:
    """A fresh clone in a scratch folder: every file git tracks (outside a checkout, specs/), so output
    committed where a command writes (a stale zoo/ spec) breaks the lines as it would a user's, plus tiny
    stand-ins of what the lines name that a fresh machine lacks: images, a CIFAR folder, Fashion-MNIST, an
    ImageNet folder."""
    files = tracked_files()
    if files is None:
        shutil.copytree(ROOT / "specs", folder / "specs")
    for name in files or ():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, folder / name)
    Image.new("L", (8, 8), color=128).save(folder / "digit.png")
    Image.new("RGB", (40, 30), color=(120, 30, 200)).save(folder / "image.png")
    write_cifar(folder / "data", "cifar10", n_train=100, n_test=40)
    write_idx(rerooted(folder, DEBIAN_FASHION_MNIST), n_train=120, n_test=40)
    for split, per_class in (("train", 10), ("val", 2)):
        for c, label in enumerate(("cat", "dog")):
            classes = rerooted(folder, "/data/imagenet") / split / label
            classes.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (48, 40), color=(40 * i, 200 * c, 90)).save(classes / f"{i}.png")
    return folder


def rerooted(folder: Path, path: str | os.PathLike[str]) -> Path:
    """An absolute path moved inside ``folder`` (``/data/imagenet`` -> ``folder/data/imagenet``)."""
    return folder / Path(path).relative_to("/")


def annify_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher, arguments after ``annify``): the launcher is [] for ``annify ...`` and the part up
    to ``-m`` for ``torchrun ... -m annify ...``."""
    if argv[0] == "annify":
        return [], argv[1:]
    if argv[0] == "torchrun" and "-m" in argv and argv[argv.index("-m") + 1] == "annify":
        return argv[: argv.index("-m")], argv[argv.index("-m") + 2 :]
    raise AssertionError(f"not an annify command line: {shlex.join(argv)}")


def cheap(args: list[str], folder: Path) -> list[str]:
    """``args`` (after ``annify``) with ``CHEAP`` applied and data paths a fresh machine lacks re-rooted."""
    name = args[0]
    command = commands().get(name)
    assert command is not None, f"unknown command {name!r} (annify has {sorted(commands())})"
    assert name in RUNNERS, f"no rule for running {name!r}: add it to RUNNERS in tests/cli_lines.py"
    takes = {opt for p in command.params for opt in p.opts}
    out = list(args)
    for option, value in CHEAP.items():
        if option in out:
            out[out.index(option) + 1] = value
        elif option in takes:
            out += [option, value]
    if "--data" in out:
        i = out.index("--data") + 1
        kind, sep, path = out[i].partition(":")
        if kind == "fashion-mnist" and not sep:
            sep, path = ":", str(DEBIAN_FASHION_MNIST)
        if path.startswith("/"):
            out[i] = f"{kind}{sep}{rerooted(folder, path)}"
    return out


def run_line(line: str, folder: Path) -> None:
    """Run one command line (shell syntax, ``#`` comments allowed) made cheap, in ``folder``; fail with
    the command's output where it exits non-zero."""
    launcher, args = annify_args(shlex.split(line, comments=True))
    args = cheap(args, folder)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "ANNIFY_CACHE": str(folder / "cache"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    if launcher:
        torchrun = Path(sys.executable).parent / launcher[0]
        done = subprocess.run(
            [str(torchrun), *launcher[1:], "-m", "annify", *args],
            cwd=folder, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, f"{shlex.join(args)}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    elif RUNNERS[args[0]] == "server":
        _serve(args, folder, env)
    else:
        cwd = os.getcwd()
        old_cache = os.environ.get("ANNIFY_CACHE")
        os.chdir(folder)
        os.environ["ANNIFY_CACHE"] = env["ANNIFY_CACHE"]
        try:
            result = CliRunner().invoke(main, args, catch_exceptions=False)
        finally:
            os.chdir(cwd)
            if old_cache is None:
                del os.environ["ANNIFY_CACHE"]
            else:
                os.environ["ANNIFY_CACHE"] = old_cache
        assert result.exit_code == 0, f"{shlex.join(args)}\n{result.output[-3000:]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(args: list[str], folder: Path, env: dict[str, str]) -> None:
    """Start the server on a free port, wait until GET /healthz answers 200, then stop it (SIGINT)."""
    port = str(_free_port())
    if "--port" in args:
        args[args.index("--port") + 1] = port
    else:
        args += ["--port", port]
    log = folder / f"serve-{port}.log"  # a file, not a pipe: a chatty server never blocks on a full pipe
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "annify", *args], cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            assert server.poll() is None, f"{shlex.join(args)} exited\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
                    assert answer.status == 200
                    return
            except OSError:
                assert time.monotonic() < deadline, f"{shlex.join(args)}: no /healthz in {SERVER_START_S} s"
                time.sleep(0.5)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
