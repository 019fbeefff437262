"""Where models come from: timm's registry, timm's ``hf-hub:ORG/NAME``, ``torchvision:NAME``, or a
module of the user's own (``module:CLASS``, which a spec records but annify never imports); and the
input size a model built by name runs at for the data's images (``fit_input_size``).

``spec.py`` validates a spec's model name here, so this module imports torch, timm and torchvision
only inside the functions that build a model: reading a spec stays light.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from annify.errors import ConvertError, SpecError

if TYPE_CHECKING:
    from torch import nn

    from annify.spec import Spec

__all__ = [
    "SIZE_LADDER",
    "MODEL_SOURCES",
    "create_model",
    "default_input_size",
    "fit_input_size",
    "model_source",
    "spec_model",
]


# Where a spec's model comes from: a prefix of its name (none for timm's registry).
MODEL_SOURCES = {
    "hf-hub": "hf-hub:ORG/NAME (timm, configuration from the Hugging Face Hub)",
    "torchvision": "torchvision:NAME (torchvision.models.get_model)",
    "module": "module:CLASS (a module of your own, passed again to annify.load(spec, model=...))",
}


def model_source(model: str) -> tuple[str, str]:
    """(source, name) of a spec's model: ``timm``, ``hf-hub``, ``torchvision`` or ``module``.

    ``hf-hub:`` names stay whole (timm reads the prefix); raises ``SpecError`` for an unknown prefix
    or a missing name.
    """
    prefix, sep, name = model.partition(":")
    if not sep:
        return "timm", model
    if prefix not in MODEL_SOURCES:
        known = "; ".join(["a timm name", *MODEL_SOURCES.values()])
        raise SpecError(f"unknown model source '{prefix}:' in '{model}' (known: {known})")
    if not name:
        raise SpecError(f"'{model}' names no model after '{prefix}:' (expected {MODEL_SOURCES[prefix]})")
    if prefix == "module" and not name.isidentifier():
        raise SpecError(
            f"'{model}': after 'module:' comes the class name of your module, such as module:MyNet"
        )
    return prefix, model if prefix == "hf-hub" else name


def create_model(name: str, num_classes: int | None = None, **kwargs) -> nn.Module:
    """A model with fresh weights, by name: timm's registry (annify's registrations included), timm's
    ``hf-hub:ORG/NAME``, or ``torchvision:NAME`` (``torchvision.models.get_model``). Typos get close names.
    """
    import timm

    import annify.models  # noqa: F401 - registers the cifar_resnet family

    try:
        source, ident = model_source(name)
    except SpecError as e:
        raise ConvertError(str(e)) from None
    if source == "module":
        raise ConvertError(
            f"'{name}' stands for a module of your own, which annify never imports; pass the module itself: "
            "annify.convert(module, ...) or annify.load(spec, model=module)"
        )
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if source == "torchvision":
        return _torchvision_model(ident, kwargs)
    if source == "timm" and not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `timm.list_models()` lists the names"
        raise ConvertError(f"unknown model '{name}'{hint}")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise ConvertError(f"timm could not build '{name}' with {kwargs}: {e}") from None
    except (OSError, RuntimeError, ValueError, ImportError) as e:  # the Hub's download errors are OSErrors
        if source != "hf-hub":
            raise
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(
            f"could not fetch '{name}' from the Hugging Face Hub ({why}); check the name and the network, "
            "or build the model with timm where the Hub is reachable and pass it: annify.convert(model)"
        ) from None


def _torchvision_model(name: str, kwargs: dict) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)  # the classification models
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = (
            f"; did you mean {', '.join(close)}?"
            if close
            else "; torchvision.models.list_models() lists them"
        )
        raise ConvertError(f"unknown torchvision classification model '{name}'{hint}")
    try:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConvertError(f"torchvision could not build '{name}' with {kwargs}: {e}") from None


def spec_model(spec: Spec, model: nn.Module | None = None) -> nn.Module:
    """The model a spec describes: built from its source, or the module the user passes."""
    source, name = model_source(spec.model)
    if model is None:
        if source == "module":
            raise ConvertError(
                f"spec '{spec.name}' was converted from a {name} of your own, and a spec never names code "
                f"to import; pass the module: annify.load(spec, model={name}(...))"
            )
        return create_model(spec.model, spec.num_classes, **spec.model_kwargs)
    if source == "module" and type(model).__name__ != name:
        raise ConvertError(
            f"spec '{spec.name}' was converted from a {name}, not a {type(model).__name__}; "
            "pass the module it was converted from"
        )
    return model


# Square sizes tried, smallest first, for data smaller than a model accepts (see ``fit_input_size``).
SIZE_LADDER = (16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 288, 320, 384, 448, 512)


def _runs_at(model: nn.Module, size: tuple[int, int, int]) -> bool:
    """Whether ``model`` takes one ``size`` image (eval mode) and returns one tensor of logits, every
    pixel read: a patch embedding must tile the image (timm's strict ViTs floor a remainder away)."""
    import torch

    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if isinstance(patch, int):
        patch = (patch, patch)
    if isinstance(patch, (tuple, list)) and (size[1] % patch[0] or size[2] % patch[1]):
        return False
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, *size))
    except Exception:  # a third-party forward refusing the size: any exception type, by design
        return False
    return isinstance(out, torch.Tensor) and out.dim() == 2


def _takes_img_size(model: nn.Module) -> bool:
    import inspect

    return "img_size" in inspect.signature(type(model).__init__).parameters


def fit_input_size(
    model: str,
    wanted: tuple[int, int, int],
    num_classes: int | None = None,
    model_kwargs: dict | None = None,
    fallback: tuple[int, int, int] | None = None,
) -> tuple[tuple[int, int, int], dict, str]:
    """The input size and model kwargs to run the model ``model`` (a name) on images of size ``wanted``.

    The rule, first that applies: (1) the model as built runs at ``wanted``: keep it; (2) its
    constructor takes ``img_size`` (timm's ViTs, Swins, ...): build it at the smallest size, ``wanted``
    or the first of ``SIZE_LADDER`` above it, at which it runs and its patches tile the image; (3) the
    smallest such size at which the model as built runs, else ``fallback`` (the size it was converted
    at, known to run): the inputs are resized to it. Returns (size, model kwargs, a phrase for the run
    log saying which rule applied and the size).
    """
    kwargs = dict(model_kwargs or {})
    c, h, w = wanted
    shape = f"{h}×{w}"
    m = create_model(model, num_classes, **kwargs)
    if _runs_at(m, wanted):
        return tuple(wanted), kwargs, f"runs at the data's size, {shape}"
    sizes = [(h, w)] + [(s, s) for s in SIZE_LADDER if s > max(h, w)]
    if _takes_img_size(m):
        for hw in sizes:
            sized = {**kwargs, "img_size": hw[0] if hw[0] == hw[1] else list(hw)}
            try:
                built = create_model(model, num_classes, **sized)
            except Exception:  # timm refuses the size in the constructor (window or grid checks)
                continue
            if _runs_at(built, (c, *hw)):
                how = (
                    "the data's size"
                    if hw == (h, w)
                    else f"the smallest it accepts; inputs resized from {shape}"
                )
                return (c, *hw), sized, f"built at {hw[0]}×{hw[1]} (img_size), {how}"
    for hw in sizes[1:]:
        if _runs_at(m, (c, *hw)):
            return (
                (c, *hw),
                kwargs,
                f"inputs resized from {shape} to {hw[0]}×{hw[1]}, the smallest size it accepts",
            )
    if fallback is not None and _runs_at(m, (c, *fallback[1:])):
        size = (c, *fallback[1:])
        return (
            size,
            kwargs,
            f"inputs resized from {shape} to {size[1]}×{size[2]}, the size it was converted at",
        )
    raise ConvertError(
        f"{model} runs at none of {shape} and the sizes up to {SIZE_LADDER[-1]}; give --input-size C,H,W "
        "at which it runs (see `annify inspect`)"
    )


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The input size from the model's pretrained config (3×224×224 if it has none)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))
