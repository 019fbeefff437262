"""Breadth: the smallest model of every timm family converts with ``heads=4`` and its final output is
bit-identical to timm's (``torch.equal``, eval mode, batch 1, default input size).

Slow (the conversions took 13 minutes of one CPU thread for all families):
``pytest -m slow tests/test_breadth.py``. The same check over every timm model, with timings, timm's
own FX test alongside and a JSON report, is a sweep: ``python -m benchmarks.sweeps.bench_breadth``
(results in BENCHMARKS.md). The test picks its models and checks them itself: tests never import
benchmarks, and the sweep's bookkeeping (caches, time limits, failure reasons) is no test's business.
"""

import warnings

import pytest
import timm
import torch
from timm.models import _registry

import annify
from annify.sources import default_input_size

MAX_PARAMS = 100_000_000  # a family whose smallest model is larger is skipped


def timm_modules() -> list[str]:
    """timm's own model modules (annify's registrations such as cifar_resnet left out)."""
    return [
        m
        for m in timm.list_modules()
        if (names := _models_of(m)) and _registry.model_entrypoint(names[0]).__module__.startswith("timm.")
    ]


def _models_of(module: str) -> list[str]:
    deprecated = set(_registry._deprecated_models)
    return sorted(n for n in _registry._module_to_models.get(module, ()) if n not in deprecated)


def smallest(module: str) -> tuple[str | None, int | None]:
    """The family's released model with the fewest parameters (timm's ``test_*`` CI fixtures left out),
    counted on the meta device; models that cannot be built there are passed over."""
    sizes = {}
    for name in _models_of(module):
        if name.startswith("test_"):
            continue
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                model = timm.create_model(name, pretrained=False)
        except Exception:  # noqa: BLE001 - a model whose __init__ needs real data; rare
            continue
        sizes[name] = sum(p.numel() for p in model.parameters())
    if not sizes:
        return None, None
    name = min(sizes, key=lambda n: (sizes[n], n))
    return name, sizes[name]


def convert_about(name: str, heads: int, classes: int | None):
    """``convert(name, heads=heads)``; a model with too few trunk points for that (every block inside a
    branch: crossvit's two towers) is converted with ``every`` instead, about ``heads`` outputs."""
    torch.manual_seed(0)
    try:
        return annify.convert(name, heads=heads, num_classes=classes)[0], True
    except annify.ConvertError as e:
        if "--heads must be between" not in str(e) and "found no tap point" not in str(e):
            raise
    model = annify.create_model(name, num_classes=classes).eval()
    blocks = annify.tap_points(annify.trace(model, default_input_size(model), train_graph=False))
    torch.manual_seed(0)
    return annify.convert(name, every=max(1, len(blocks) // heads), num_classes=classes)[0], False


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.slow
@pytest.mark.parametrize("module", timm_modules())
def test_family_converts_exactly(module):
    name, params = smallest(module)
    if name is None:
        pytest.skip(f"{module}: no released model")
    if params > MAX_PARAMS:
        pytest.skip(f"{module}: smallest model {name} has {params / 1e6:.0f}M parameters (> 100M)")
    # feature backbones registered with num_classes=0 get a 1000-class classifier, as a user would give them
    classes = 1000 if timm.models.get_pretrained_cfg_value(name, "num_classes") == 0 else None
    net, by_heads = convert_about(name, 4, classes)
    plain = annify.plain_model(net)  # the timm model holding the network's trunk weights
    net.eval()
    torch.manual_seed(1)
    x = torch.randn(1, *net.input_size)
    with torch.no_grad():
        outs, ref = net(x), _first(plain(x))
    last = _first(outs[-1])
    if by_heads:
        assert len(outs) == 4
    assert all(tuple(_first(o).shape) == tuple(ref.shape) for o in outs[:-1]), [o.shape for o in outs]
    assert torch.equal(last, ref), f"{name}: final output differs, max |diff| {(last - ref).abs().max()}"
