"""Where code may import from: tests never import benchmarks (a benchmark may change or go without
breaking the suite), and benchmarks use annify's public API, with the few internals they still need
imported in one place, ``benchmarks/_common.py``, so a module moving inside annify is one edit there."""

import ast
from pathlib import Path

import annify

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import in a file, those inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module, [a.name for a in node.names]))
    return found


def test_tests_never_import_benchmarks():
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in sorted((ROOT / "tests").rglob("*.py"))
        for line, module, _ in _imports(path)
        if module == "benchmarks" or module.startswith("benchmarks.")
    ]
    assert not bad, "tests import benchmarks:\n" + "\n".join(bad)


def test_benchmarks_use_the_public_api():
    public = set(annify.__all__)
    bad = []
    for path in sorted((ROOT / "benchmarks").rglob("*.py")):
        if path.name == "_common.py":  # the one place for what annify does not export (yet)
            continue
        text = path.read_text()
        if "sys.path.insert" in text:
            bad.append(f"{path.relative_to(ROOT)}: sys.path.insert (run it as python -m benchmarks....)")
        for line, module, names in _imports(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if module.startswith("annify."):
                bad.append(f"{where}: imports {module} (use annify.NAME, or add it to benchmarks/_common.py)")
            elif module == "annify" and (private := [n for n in names if n not in public]):
                bad.append(f"{where}: from annify import {', '.join(private)}: not in annify.__all__")
    assert not bad, "benchmarks reach into annify's internals:\n" + "\n".join(bad)


def test_benchmarks_never_import_another_benchmark():
    """What two benchmarks share lives in a helper module (``_common``, ``sweeps/_runs``, ``sweeps/_breadth``),
    so a benchmark can change or go without breaking another."""
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in sorted((ROOT / "benchmarks").rglob("*.py"))
        for line, module, _ in _imports(path)
        if module.startswith("benchmarks.") and module.rsplit(".", 1)[-1].startswith("bench_")
    ]
    assert not bad, "benchmarks import other benchmarks:\n" + "\n".join(bad)
