"""Breadth: the smallest model of every timm family converts with ``heads=4`` and its final output is
bit-identical to timm's (``torch.equal``, eval mode, batch 1, default input size).

Slow (the conversions took 13 minutes of one CPU thread for all families):
``PYTHONPATH=. pytest -m slow tests/test_breadth.py``. The 11 families listed under "Library issues" in
BENCHMARKS.md fail here until those are fixed. The same checks, with timings, timm's own FX test
alongside and a JSON report: ``benchmarks/bench_breadth.py`` (results in BENCHMARKS.md).
"""

import pytest

from benchmarks._breadth import MAX_PARAMS, check_annify, family, timm_modules


@pytest.mark.slow
@pytest.mark.parametrize("module", timm_modules())
def test_family_converts_exactly(module):
    fam = family(module)
    if fam["model"] is None:
        pytest.skip(f"{module}: no released model")
    if fam["params"] > MAX_PARAMS:
        pytest.skip(
            f"{module}: smallest model {fam['model']} has {fam['params'] / 1e6:.0f}M parameters (> 100M)"
        )
    result = check_annify(fam["model"], heads=4)
    if result["placement"] == {"heads": 4}:  # else too few trunk points: converted with --every
        assert result["outputs"] == 4, result
    assert result["heads_shape_ok"], result
    assert result["equal"], f"{fam['model']}: final output differs, max |diff| {result['max_abs_diff']}"
