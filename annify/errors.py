"""The errors annify reports to its users: one base class, one subclass per stage.

Every message is one line that names the problem and the fix. The command line catches
``AnnifyError`` (and ``OSError``, naming the path) and prints that line; anything else is a bug and
shows its traceback. ``ANNIFY_DEBUG=1`` shows the traceback of an ``AnnifyError`` too.

Each subclass also derives from the built-in exception it replaces (``ValueError`` mostly), so code
that caught those before still works.
"""

from __future__ import annotations

__all__ = [
    "AnnifyError",
    "CheckpointError",
    "ConvertError",
    "DataError",
    "DeviceError",
    "EANNError",
    "ExportError",
    "InferenceError",
    "SpecError",
    "TraceError",
    "TrainError",
    "TrainingDiverged",
    "UnknownNameError",
]


class AnnifyError(Exception):
    """Base of every error annify reports to a user (a bad input, file or setting, never a bug)."""


class SpecError(AnnifyError, ValueError):
    """A spec file or a training setting that is malformed; the message names the key."""


class ConvertError(AnnifyError, ValueError):
    """A model or placement that cannot be converted."""


class TraceError(AnnifyError, RuntimeError):
    """torch.fx cannot trace the model; the message names the model, the node and a hint."""


class DataError(AnnifyError, ValueError):
    """A data source that cannot be read."""


class DeviceError(AnnifyError, ValueError):
    """A device that is unknown or not present."""


class TrainError(AnnifyError, ValueError):
    """A training run that cannot start or continue (run folder, initial weights, frozen outputs)."""


class TrainingDiverged(TrainError):
    """A loss became NaN or infinite; the message names the output and the last good checkpoint."""


class CheckpointError(TrainError):
    """A checkpoint that cannot be resumed from; the message says which file and why."""


class EANNError(AnnifyError, ValueError):
    """Members that cannot form an EANN (count, order, inputs, classes, checkpoints)."""


class InferenceError(AnnifyError, ValueError):
    """Anytime inference that cannot run as asked: an image, a budget, a deadline, a normalization."""


class ExportError(AnnifyError, ValueError):
    """A network or format that cannot be exported."""


class UnknownNameError(AnnifyError, KeyError):
    """A name missing from a registry (weight schemes, head types); the message lists what exists."""

    def __str__(self) -> str:  # KeyError quotes its argument; this is a sentence
        return str(self.args[0]) if self.args else ""
