"""README.md's Python snippets run as written, with what they leave to the reader (issue 20)."""

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import ConvBNReLU
from torch import nn

from annify.cli import main
from annify.spec import spec_name

README = Path(__file__).resolve().parent.parent / "README.md"


class MyNet(nn.Module):
    """The reader's own module the README converts (``my_module``): runs at any square size."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.units = nn.Sequential(*(ConvBNReLU(8) for _ in range(4)))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.units(self.stem(x)).mean((2, 3)))


def reader_names(specs: list[Path]) -> dict:
    """What a snippet leaves to the reader: their own module, and timm's weights for the model of the
    (first) spec the snippet loads."""
    import timm

    from annify.spec import load_spec

    weights = timm.create_model(load_spec(specs[0]).model).state_dict() if specs else {}
    return {"my_module": MyNet(), "timm_state_dict": weights}


def _snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _write_specs_the_snippet_reads(snippet: str) -> list[Path]:
    """Run the README's own `annify convert ... --out zoo/` lines that write the specs a snippet loads."""
    wanted = list(dict.fromkeys(re.findall(r"zoo/([\w.-]+)\.yaml", snippet)))
    for line in re.findall(r"^annify convert .*$", README.read_text(), flags=re.M):
        args = shlex.split(line.partition("#")[0])[1:]
        name = args[args.index("--name") + 1] if "--name" in args else spec_name(args[1])
        if name in wanted and "--out" in args and args[args.index("--out") + 1].rstrip("/") == "zoo":
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, result.output
    return [Path("zoo") / f"{name}.yaml" for name in wanted]


@pytest.mark.parametrize("snippet", _snippets())
def test_readme_python_snippet_runs_as_written(snippet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = reader_names(_write_specs_the_snippet_reads(snippet))
    exec(compile(snippet, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
