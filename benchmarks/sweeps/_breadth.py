"""Shared by ``bench_breadth`` and ``bench_earlyon``: one model per timm family, and the checks.

A family is a timm model module (``resnet``, ``vision_transformer``, ...). Its representative is the
registered, non-deprecated model with the fewest parameters (timm's ``test_*`` CI fixtures set aside),
counted by building every candidate on the meta device (no memory, about 0.1 s a model). The choice is cached in
``benchmarks/sweeps/results/families.json`` because it takes a few minutes for all of timm.
"""

from __future__ import annotations

import json
import signal
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import timm
import torch
from timm.models import _registry

import annify
from benchmarks._common import default_input_size, fit_input_size, write_json

RESULTS = Path(__file__).parent / "results"
FAMILIES_JSON = RESULTS / "families.json"
MAX_PARAMS = 100_000_000
SWEEP_MAX_PARAMS = 30_000_000  # bench_breadth.py --all: every timm model up to this size


def timm_modules() -> list[str]:
    """timm's own model modules (annify's registrations such as cifar_resnet left out)."""
    out = []
    for mod in timm.list_modules():
        names = _models_of(mod)
        if names and _registry.model_entrypoint(names[0]).__module__.startswith("timm."):
            out.append(mod)
    return out


def _models_of(module: str) -> list[str]:
    deprecated = set(_registry._deprecated_models)
    return sorted(n for n in _registry._module_to_models.get(module, ()) if n not in deprecated)


def count_params(name: str) -> int:
    """Parameter count of a timm model, built on the meta device (no weights allocated)."""
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False)
    return sum(p.numel() for p in model.parameters())


def smallest(module: str) -> dict:
    """The family's representative: the released model with the fewest parameters.

    timm's CI fixtures (``test_resnet``, ``test_vit``, ...) are left out of the choice because they
    are not released architectures (``test_resnet`` has one block per stage); the smallest of them
    is kept under ``test_model`` so that the sweep can run it as an extra.
    Returns {module, model, params, test_model, test_params, candidates, meta_failures}.
    """
    sizes, failures = {}, {}
    for name in _models_of(module):
        try:
            sizes[name] = count_params(name)
        except Exception as e:  # a model whose __init__ needs real data; rare
            failures[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"

    def pick(names: list[str]) -> tuple[str | None, int | None]:
        if not names:
            return None, None
        name = min(names, key=lambda n: (sizes[n], n))
        return name, sizes[name]

    model, params = pick([n for n in sizes if not n.startswith("test_")])
    test_model, test_params = pick([n for n in sizes if n.startswith("test_")])
    return {
        "module": module,
        "model": model,
        "params": params,
        "test_model": test_model,
        "test_params": test_params,
        "candidates": len(sizes) + len(failures),
        "meta_failures": failures,
    }


def families(refresh: bool = False) -> list[dict]:
    """One entry per timm family (see ``smallest``), cached in ``results/families.json``."""
    if FAMILIES_JSON.is_file() and not refresh:
        cached = json.loads(FAMILIES_JSON.read_text())
        if cached.get("timm") == timm.__version__ and cached.get("version") == 2:
            return cached["families"]
    found = [smallest(m) for m in timm_modules()]
    write_json(FAMILIES_JSON, {"timm": timm.__version__, "version": 2, "families": found})
    return found


def every_model(seed: int = 0) -> list[dict]:
    """Rows (as ``families()``'s, one model each) of every registered, non-deprecated model of timm's
    own modules, in a seeded random order, so that the first N checked are a seeded sample of all.
    Parameters are left to the sweep to count (``params`` None): counting all of timm on the meta
    device takes longer than the sweep can wait on a busy machine)."""
    import random

    names = sorted(n for module in timm_modules() for n in _models_of(module))
    random.Random(seed).shuffle(names)
    return [{"module": n, "model": n, "params": None, "test_model": None} for n in names]


class Timeout(BaseException):  # noqa: N818 - a BaseException, so no `except Exception` in a model swallows it
    """The time limit of one check ran out."""


@contextmanager
def time_limit(seconds: int):
    """Raise ``Timeout`` after ``seconds`` of this process's CPU time (SIGPROF; main thread only; 0
    disables). CPU time, not wall time: a sweep under ``nice -n 19`` on a busy machine gets a small
    share of a core, and a wall-clock limit would fail models for the load, not for themselves."""
    if not seconds:
        yield
        return

    def _raise(signum, frame):
        raise Timeout(f"over {seconds} s of CPU time")

    old = signal.signal(signal.SIGPROF, _raise)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)


def failure_reason(e: BaseException) -> str:
    """One line: the exception, and the innermost frame inside annify/timm/torch that raised it."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    where = ""
    for fs in reversed(traceback.extract_tb(e.__traceback__)):
        if any(p in fs.filename for p in ("/annify/", "/timm/", "/torch/")):
            where = f" [{Path(fs.filename).name}:{fs.lineno} {fs.name}]"
            break
    return f"{type(e).__name__}: {first[:200]}{where}"


def _first_tensor(out):
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


SWEEP_SIZE = 64  # --all: each model at the size fit_input_size picks for 64×64 images


def small_fit(name: str, classes: int | None) -> tuple[tuple[int, int, int] | None, dict, str]:
    """(input size, model kwargs, how) for a fast check: what ``fit_input_size`` picks for
    ``SWEEP_SIZE``² images (the model as built where it runs there, timm's ``img_size`` where it
    takes it, else the smallest larger size it runs at); the default size where none works.

    A smaller image makes a conversion faster (tracing, counting and the checks each run the model)
    and changes nothing in what is checked: the converted and the plain model, built alike, see the
    same image.
    """
    channels = (timm.models.get_pretrained_cfg_value(name, "input_size") or (3,))[0]
    try:
        return fit_input_size(name, (channels, SWEEP_SIZE, SWEEP_SIZE), classes)
    except annify.ConvertError as e:
        return None, {}, f"default size ({e})"


def check_annify(name: str, heads: int = 4, small: bool = False) -> dict:
    """Convert ``name`` with ``heads`` outputs; compare the last output with timm's, ``torch.equal``, eval mode.

    Batch 1 at the model's default input size (``small``: as ``small_fit`` builds it). The timm model
    is ``annify.plain_model(net)``: built afresh from the spec, holding the converted network's trunk
    weights (every key of the timm model's state dict, strictly). A model with too
    few points on its trunk for ``heads`` (every block inside a branch: crossvit's two towers) is
    converted with ``every`` instead, about ``heads`` outputs, so that its exactness is still checked.
    """
    # Feature backbones registered with num_classes=0 (dinov3, sam2, qwen3 vision towers) would get
    # heads with zero outputs; give them a 1000-class classifier, as a user converting them would.
    classes = 1000 if timm.models.get_pretrained_cfg_value(name, "num_classes") == 0 else None
    t0 = time.perf_counter()
    size, kwargs, how = small_fit(name, classes) if small else (None, {}, "default size")
    torch.manual_seed(0)
    placement = {"heads": heads}
    try:
        net, spec, costs = annify.convert(
            name, **placement, num_classes=classes, input_size=size, model_kwargs=kwargs
        )
    except annify.ConvertError as e:
        if "--heads must be between" not in str(e) and "found no tap point" not in str(e):
            raise
        m = annify.create_model(name, num_classes=classes, **kwargs).eval()
        blocks = annify.tap_points(annify.trace(m, size or default_input_size(m), train_graph=False))
        placement = {"every": max(1, len(blocks) // heads)}
        torch.manual_seed(0)
        net, spec, costs = annify.convert(
            name, **placement, num_classes=classes, input_size=size, model_kwargs=kwargs
        )
    t_convert = time.perf_counter() - t0
    model = annify.plain_model(net)
    net.eval()
    size = size or default_input_size(model)
    torch.manual_seed(1)
    x = torch.randn(1, *size)
    with torch.no_grad():
        outs = net(x)
        ref = _first_tensor(model(x))
    last = _first_tensor(outs[-1])
    equal = torch.equal(last, ref)
    shapes_ok = all(tuple(o.shape) == tuple(ref.shape) for o in outs[:-1])
    even = [(k + 1) / len(outs) for k in range(len(outs))]
    by_heads = "heads" in placement
    return {
        "placement": placement,
        # each placed output's distance from its target k/heads (the classifier's, 1.0, is left out)
        "spacing": [round(abs(f - e), 4) for f, e in zip(costs.fraction[:-1], even, strict=False)]
        if by_heads
        else [],
        "num_classes_set": classes,
        # tensors carried across each cut: 1 at a clean block output; more where the tap is inside a
        # branch (the other branches stay live) or inside a DenseNet block (every earlier feature map)
        "carried": [seg.carry for seg in net.segments[:-1]],  # eval mode: the eval graph's segments
        "spacing_error": round(max(abs(f - e) for f, e in zip(costs.fraction, even, strict=True)), 3)
        if by_heads
        else None,
        "equal": bool(equal),
        "max_abs_diff": None if equal else float((last - ref).abs().max()),
        "heads_shape_ok": bool(shapes_ok),
        "outputs": len(outs),
        "taps": [h.node for h in spec.heads[:-1]],
        "fraction": [h.fraction for h in spec.heads],
        "flops": costs.flops[-1],
        "unsupported_ops": sorted(costs.unsupported),
        "input_size": list(size),
        "model_kwargs": kwargs,
        "fit": how,
        "convert_s": round(t_convert, 2),
    }


def check_timm_fx(name: str) -> dict:
    """timm's own FX test (``test_model_forward_fx``): trace with timm's leaf modules and functions,
    return the graph's last node in eval and train mode, and compare with ``torch.equal``."""
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    kwargs = dict(
        leaf_modules=list(get_notrace_modules()),
        autowrap_functions=list(get_notrace_functions()),
        param_shapes_constant=True,
    )
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    torch.manual_seed(1)
    x = torch.randn(1, *size)
    with torch.no_grad():
        ref = _first_tensor(model(x))
        train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kwargs)
        fx_model = create_feature_extractor(
            model,
            train_return_nodes=[train_nodes[-1]],
            eval_return_nodes=[eval_nodes[-1]],
            tracer_kwargs=kwargs,
        ).eval()
        out = _first_tensor(tuple(fx_model(x).values()))
    return {"equal": bool(torch.equal(out, ref))}


def run_check(fn, name: str, seconds: int = 0) -> dict:
    """``fn(name)`` with a time limit; failures become {"ok": False, "reason": one line}."""
    t0 = time.perf_counter()
    try:
        with time_limit(seconds), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fn(name)
        ok = out.get("equal", False) and out.get("heads_shape_ok", True)
        if not ok:
            why = []
            if not out.get("equal", False):
                why.append(f"final output differs from timm's (max |diff| {out.get('max_abs_diff')})")
            if not out.get("heads_shape_ok", True):
                why.append("a head's output shape differs from the classifier's")
            out["reason"] = "; ".join(why)
        out["ok"] = bool(ok)
    except (Exception, Timeout) as e:  # every failure is data here
        out = {"ok": False, "reason": failure_reason(e)}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out
