"""annify: turn any timm model (or torch.fx-traceable module) into an Anytime Neural Network.

Hu, Dey, Hebert, Bagnell, "Learning Anytime Predictions in Neural Networks via Adaptive Loss
Balancing", AAAI 2019.

The stages are submodules named after them: ``annify.train.train(...)``, ``annify.export.export(...)``,
``annify.eann.run_eann(...)``; the names below are re-exported for convenience.
"""

from annify import weighting
from annify.convert import (
    ConvertError,
    build,
    convert,
    create_model,
    inspect_model,
    load,
    load_weights,
    spec_name,
)
from annify.cost import CONVENTION, Costs, count
from annify.rewrite import AnytimeNet
from annify.runtime import AnytimeRunner, EANNRuntime, budget_curve, early_exit
from annify.spec import HeadSpec, Spec, SpecError, dump, load_spec
from annify.trace import TapPoint, TraceError, tap_points, trace
from annify.train import RunResult

__version__ = "0.1.0"

__all__ = [
    "CONVENTION",
    "AnytimeNet",
    "AnytimeRunner",
    "EANNRuntime",
    "RunResult",
    "budget_curve",
    "early_exit",
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
    "load",
    "load_spec",
    "load_weights",
    "spec_name",
    "tap_points",
    "trace",
    "weighting",
]
