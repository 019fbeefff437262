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
