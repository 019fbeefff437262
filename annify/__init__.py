"""annify: turn any timm model (or torch.fx-traceable module) into an Anytime Neural Network.

Hu, Dey, Hebert, Bagnell, "Learning Anytime Predictions in Neural Networks via Adaptive Loss
Balancing", AAAI 2019.

The stages are submodules named after them: ``annify.train.train(...)``, ``annify.export.export(...)``,
``annify.eann.run_eann(...)``; the names below are re-exported for convenience.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import types

from annify import _lazy

# Re-exports load on first use (PEP 562), so `import annify` and the command line's `--help` do not
# pay for importing torch and timm: name -> the module that defines it.
_EXPORTS = {
    "ConvertError": "annify.errors",
    "build": "annify.convert",
    "freeze": "annify.freeze",
    "convert": "annify.convert",
    "create_model": "annify.sources",
    "inspect_model": "annify.placement",
    "load": "annify.convert",
    "load_weights": "annify.convert",
    "plain_model": "annify.convert",
    "spec_name": "annify.spec",
    "CONVENTION": "annify.cost",
    "Costs": "annify.cost",
    "count": "annify.cost",
    "AnytimeNet": "annify.rewrite",
    "AnytimeRunner": "annify.runtime",
    "EANNRuntime": "annify.runtime",
    "keep_freed_memory": "annify.cpu",
    "budget_curve": "annify.early_exit",
    "early_exit_stream": "annify.early_exit",
    "HeadSpec": "annify.spec",
    "Spec": "annify.spec",
    "SpecError": "annify.spec",
    "dump": "annify.spec",
    "load_spec": "annify.spec",
    "TapPoint": "annify.trace",
    "TraceError": "annify.trace",
    "tap_points": "annify.trace",
    "trace": "annify.trace",
    "RunResult": "annify.train",
}


def __getattr__(name: str):
    if name in ("weighting", *_CALLABLE):
        return importlib.import_module(f"annify.{name}")
    return _lazy.load(globals(), _EXPORTS, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, "weighting", *_CALLABLE})


class _Package(types.ModuleType):
    """``annify.convert`` and ``annify.trace`` stay the functions when their submodules load.

    Importing a submodule sets it as an attribute of the package; for the two stage functions that
    share their module's name, the function is what ``annify.NAME`` has always meant. The modules
    stay reachable as ``sys.modules["annify.convert"]`` and through ``from annify.convert import ...``.
    """

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        if name in _CALLABLE and isinstance(value, types.ModuleType):
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


# Stage modules that share their name with their main function: ``annify.early_exit`` and
# ``annify.train`` are the modules (``annify.early_exit.fit_thresholds``, ``annify.train.train``, as
# documented), and calling one calls that function (``annify.early_exit(...)``, ``annify.train(...)``).
_CALLABLE = ("early_exit", "train")


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


sys.modules[__name__].__class__ = _Package


class _RegisterWithTimm(importlib.abc.MetaPathFinder):
    """Registers annify's models (``annify.models``) in timm's registry as soon as timm is imported.

    After ``import annify``, ``timm.create_model("cifar_resnet_n7_c16")`` works whether timm was
    imported before (registered at once) or after (this finder wraps timm's loading), without
    making ``import annify`` import timm and torch itself.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            importlib.import_module("annify.models")

        spec.loader.exec_module = exec_module
        return spec


if "timm" in sys.modules:
    importlib.import_module("annify.models")
elif not any(isinstance(f, _RegisterWithTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTimm())

__version__ = "0.1.0"

__all__ = [
    "CONVENTION",
    "AnytimeNet",
    "AnytimeRunner",
    "EANNRuntime",
    "RunResult",
    "budget_curve",
    "early_exit",
    "early_exit_stream",
    "freeze",
    "ConvertError",
    "Costs",
    "HeadSpec",
    "Spec",
    "SpecError",
    "TapPoint",
    "TraceError",
    "build",
    "convert",
    "count",
    "create_model",
    "dump",
    "inspect_model",
    "keep_freed_memory",
    "load",
    "load_spec",
    "load_weights",
    "plain_model",
    "spec_name",
    "tap_points",
    "trace",
    "train",
    "weighting",
]
