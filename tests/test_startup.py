"""`import annify` and the command line's help stay light, and annify's models reach timm's registry."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_and_help_do_not_load_torch():
    code = (
        "import sys, annify, annify.cli\n"
        "from click.testing import CliRunner\n"
        "for args in ([], ['train'], ['predict'], ['eann'], ['convert'], ['demo']):\n"
        "    assert CliRunner().invoke(annify.cli.main, [*args, '--help']).exit_code == 0, args\n"
        "print(sorted(m for m in ('torch', 'timm', 'fvcore') if m in sys.modules))"
    )
    assert python(code) == "[]"


@pytest.mark.parametrize("order", ["import annify, timm", "import timm, annify"])
def test_import_annify_registers_its_models_in_timm(order):
    code = f"{order}\nprint(type(timm.create_model('cifar_resnet_n7_c16')).__name__)"
    assert python(code) == "CifarResNet"


def test_lazy_exports_resolve():
    assert python("import annify; print(annify.AnytimeNet.__name__, annify.weighting.__name__)") == (
        "AnytimeNet annify.weighting"
    )
    assert "AnytimeNet" in python("import annify; print(dir(annify))")


def test_plots_never_touch_pyplot_or_its_backend(tmp_path):
    code = (
        "import sys\n"
        "from annify.evaluate import plot_anytime, plot_weights\n"
        f"plot_anytime({{'a': [(1, 0.5), (2, 0.25)]}}, r'{tmp_path / 'a.png'}', title='t')\n"
        f"plot_weights([(1, [0.5, 1.0]), (2, [0.7, 1.0])], r'{tmp_path / 'w.png'}')\n"
        "print('matplotlib.pyplot' in sys.modules)"
    )
    assert python(code) == "False"
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "w.png").stat().st_size > 0
    sources = "".join(p.read_text() for p in (ROOT / "annify").rglob("*.py"))
    assert "matplotlib.use(" not in sources and "import matplotlib.pyplot" not in sources


def test_no_library_module_imports_the_cli():
    import ast

    offenders = []
    for path in sorted((ROOT / "annify").rglob("*.py")):
        if path.name.startswith("cli") or path.name in ("_cli_common.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if any(n.startswith(("annify.cli", "annify._cli_common")) for n in names):
                offenders.append(path.name)
    assert offenders == []
