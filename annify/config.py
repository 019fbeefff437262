"""A training run's settings: one list, with their defaults, checked in one place.

``TrainConfig`` is that list. A spec's ``train:`` section is checked against it when the spec loads
(``annify.spec.load_spec``), so a typo is reported with its key before anything runs; ``annify
train``'s options and ``annify.train.train``'s keyword arguments override it. ``DEFAULTS`` is the
same list as a dict. The checks that need a registry (weight schemes, timm's optimizers) import it
when they run, so this module stays light.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from annify.errors import SpecError

__all__ = [
    "DEFAULTS",
    "INIT_DEFAULTS",
    "TEACHERS",
    "TrainConfig",
    "head_epochs",
    "head_local_for",
    "resolve_settings",
    "run_label",
    "train_section_problems",
]


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run (the paper's recipe by default: SGD, lr 0.1, /10 at 1/2 and 3/4)."""

    data: str = "digits"  # data source, see annify.data
    epochs: int = 300  # paper: 300 on CIFAR
    batch_size: int = 64  # per process
    opt: str = "sgd"  # timm optimizer name
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4  # timm's convention: not on biases and norm parameters
    nesterov: bool = False
    # lr × decay_rate after these fractions of the run (floats) or epoch counts (ints)
    milestones: list = field(default_factory=lambda: [0.5, 0.75])
    decay_rate: float = 0.1
    weights: str = "adaloss"  # weight scheme, see annify.weighting
    weight_hparams: dict = field(default_factory=lambda: {})  # e.g. {gamma: 0.05}
    head: int | None = None  # for weights=opt: the output trained (1-based); default the last
    seed: int = 0
    # the network you have: "timm" (its pretrained weights), a run folder (plain or anytime), a checkpoint
    # folder, or a .safetensors/.pth state dict; it starts the trunk and the last output, and is measured
    # beside every output as "original" (annify.init)
    init: str | None = None
    freeze_trunk: bool = False  # train the added heads only (the last output stays the original's exactly)
    head_lr: float | None = None  # the added heads' learning rate (None: lr)
    # the first epochs (an int) or fraction of the epochs (a float < 1) train only the heads, on the frozen
    # trunk; then everything trains (two-phase)
    head_epochs: int | float = 0
    # with distill > 0, what the outputs learn from besides the labels: "original", a frozen copy of the
    # --init network, for every output, the last too; "last" (or None), the last output, for the earlier ones
    teacher: str | None = None
    # after each epoch, BatchNorm statistics are recomputed on this many training images (0: off): with
    # few steps the running averages lag the weights (1 epoch of 2,000 Fashion-MNIST images: last output
    # 80 % error with them, 58 % recomputed)
    bn_recalibrate: int = 2048
    # weights scale only what each head sends into the trunk (weighting.HeadLocal); None: on for adaloss,
    # off otherwise (the Fashion-MNIST reproduction, BENCHMARKS.md §7, is the evidence)
    head_local: bool | None = None
    distill: float = 0.0  # gamma: earlier outputs also learn from the last output's softened prediction
    distill_temperature: float = 1.0  # T of the distillation's softmax
    train_subset: int | None = None  # train on a fixed, seeded subset of this many training images

    @classmethod
    def resolve(cls, section: dict, overrides: dict) -> TrainConfig:
        """The defaults, then a spec's ``train:`` section, then the non-None ``overrides``, checked."""
        return cls(**resolve_settings(section, overrides))


DEFAULTS: dict[str, Any] = {f.name: getattr(TrainConfig(), f.name) for f in fields(TrainConfig)}

# A trained start (``init`` set) has defaults of its own, chosen on the Fashion-MNIST study of
# benchmarks/bench_trained_start.py (BENCHMARKS.md, "From a trained network"); a spec's train: section
# and the arguments still win over them.
INIT_DEFAULTS: dict[str, Any] = {  # joint_adaloss_kd_lr0.1 there: chosen on validation over 12 recipes
    "epochs": 4,
    "lr": 0.1,
    "head_lr": 0.1,
    "head_epochs": 0,
    "teacher": "original",
    "distill": 0.5,
}


# What distillation's outputs learn from (``teacher``; None means "last"): the --init network, or the
# last output.
TEACHERS = ("original", "last")


def head_epochs(cfg: dict) -> int:
    """The number of heads-only epochs a run's settings ask for (a fraction of the epochs rounds)."""
    he = cfg["head_epochs"]
    return round(he * cfg["epochs"]) if isinstance(he, float) else int(he)


def head_local_for(weights: str, head_local: bool | None) -> bool:
    """Whether a run weighs head-locally: as asked, else (None) on for AdaLoss and off for the others."""
    return weights == "adaloss" if head_local is None else head_local


def run_label(settings: dict) -> str:
    """A short name for a run's weighting: ``adaloss``, ``adaloss+hl`` (head-local), ``const+kd`` (distilled)."""
    cfg = {**DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
    hl = head_local_for(cfg["weights"], settings.get("head_local"))
    return cfg["weights"] + ("+hl" if hl else "") + ("+kd" if cfg["distill"] else "")


def resolve_settings(spec_train: dict, overrides: dict) -> dict:
    """DEFAULTS, then the spec's ``train:`` section, then the non-None ``overrides``; every problem reported."""
    cfg, errors = _resolve(spec_train, overrides)
    if errors:
        raise SpecError("; ".join(errors))
    return cfg


def train_section_problems(section: dict) -> list[str]:
    """The problems of a spec's ``train:`` section alone (``load_spec`` reports them with the spec's)."""
    return _resolve(section, {})[1]


def _resolve(spec_train: dict, overrides: dict) -> tuple[dict, list[str]]:
    from annify import weighting

    errors = [
        f"train: unknown key '{k}' (known: {', '.join(DEFAULTS)})" for k in spec_train if k not in DEFAULTS
    ]
    errors += [
        f"unknown setting '{k}' (known: {', '.join(DEFAULTS)})" for k in overrides if k not in DEFAULTS
    ]
    given = {k: v for k, v in spec_train.items() if k in DEFAULTS}
    given.update({k: v for k, v in overrides.items() if v is not None and k in DEFAULTS})
    cfg = {**DEFAULTS, **(INIT_DEFAULTS if given.get("init") is not None else {}), **given}
    for key in ("epochs", "batch_size"):
        if not (isinstance(cfg[key], int) and cfg[key] >= 1):
            errors.append(f"{key} must be a positive integer, got {cfg[key]!r}")
    b = cfg["bn_recalibrate"]
    if not (isinstance(b, int) and not isinstance(b, bool) and b >= 0):
        errors.append(f"bn_recalibrate must be a non-negative integer (images), got {b!r}")
    he = cfg["head_epochs"]
    if isinstance(he, bool) or not (
        (isinstance(he, int) and he >= 0) or (isinstance(he, float) and 0.0 <= he < 1.0)
    ):
        errors.append(f"head_epochs must be a number of epochs or a fraction in [0, 1), got {he!r}")
    elif isinstance(cfg["epochs"], int) and head_epochs(cfg) > cfg["epochs"]:
        errors.append(f"head_epochs ({he}) must not exceed epochs ({cfg['epochs']})")
    if cfg["head_lr"] is not None and not (isinstance(cfg["head_lr"], (int, float)) and cfg["head_lr"] >= 0):
        errors.append(f"head_lr must be a non-negative number, got {cfg['head_lr']!r}")
    if cfg["teacher"] not in (None, *TEACHERS):
        errors.append(
            f"teacher must be 'original' (the --init network) or 'last' (the last output), got {cfg['teacher']!r}"
        )
    elif cfg["teacher"] == "original" and cfg["init"] is None:
        errors.append("teacher 'original' is the --init network: pass --init too")
    if isinstance(he, (int, float)) and he > 0 and cfg["init"] is None:
        errors.append("head_epochs trains heads on a frozen trunk, which needs a trained one: pass --init")
    for key in ("lr", "momentum", "weight_decay", "decay_rate"):
        if not (isinstance(cfg[key], (int, float)) and cfg[key] >= 0):
            errors.append(f"{key} must be a non-negative number, got {cfg[key]!r}")
    if not (
        isinstance(cfg["milestones"], list) and all(isinstance(m, (int, float)) for m in cfg["milestones"])
    ):
        errors.append(f"milestones must be a list of fractions or epoch counts, got {cfg['milestones']!r}")
    if cfg["weights"] not in weighting.available():
        errors.append(
            f"unknown weight scheme '{cfg['weights']}' (available: {', '.join(weighting.available())})"
        )
    if cfg["head"] is not None and cfg["weights"] != "opt":
        errors.append(f"head is for --weights opt, not {cfg['weights']}")
    if cfg["head"] is not None and not (isinstance(cfg["head"], int) and cfg["head"] >= 1):
        errors.append(f"head is an output number, 1 for the first, got {cfg['head']!r}")
    if not isinstance(cfg["weight_hparams"], dict):
        errors.append("weight_hparams must be a mapping such as {gamma: 0.05}")
    elif cfg["weights"] in weighting.available() and cfg["weights"] != "opt":
        try:  # the scheme's own checks, with a stand-in head count
            weighting.get(cfg["weights"], 2, **cfg["weight_hparams"])
        except ValueError as e:
            errors.append(f"weight_hparams: {e}")
    seed = cfg["seed"]
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63):
        errors.append(f"seed must be an integer from 0 to 2**63 - 1, got {seed!r}")
    from timm.optim import list_optimizers

    if cfg["opt"] not in list_optimizers():
        errors.append(f"opt: unknown optimizer '{cfg['opt']}' (timm's, e.g. sgd, adamw, lamb)")
    if cfg["head_local"] is None and isinstance(cfg["weights"], str):
        cfg["head_local"] = head_local_for(cfg["weights"], None)
    for key in ("head_local", "freeze_trunk"):
        if not isinstance(cfg[key], bool):
            errors.append(f"{key} must be true or false, got {cfg[key]!r}")
    if not (isinstance(cfg["distill"], (int, float)) and 0.0 <= cfg["distill"] <= 1.0):
        errors.append(
            f"distill must be a number in [0, 1] (the weight of the KL term), got {cfg['distill']!r}"
        )
    temp = cfg["distill_temperature"]
    if not (isinstance(temp, (int, float)) and math.isfinite(temp) and temp > 0):
        errors.append(f"distill_temperature must be a positive number, got {temp!r}")
    subset = cfg["train_subset"]
    if subset is not None and not (isinstance(subset, int) and not isinstance(subset, bool) and subset >= 1):
        errors.append(f"train_subset must be a positive integer (images), got {subset!r}")
    if cfg["head_local"] and cfg["weights"] == "adaloss_grad":
        errors.append("adaloss_grad measures each head's trunk gradient, which head_local rescales; pick one")
    if (cfg["freeze_trunk"] or cfg["head_epochs"]) and cfg["weights"] == "adaloss_grad":
        errors.append(
            "adaloss_grad balances gradients on the shared trunk, which freeze_trunk and head_epochs "
            "leave without any"
        )
    if not errors:
        cfg["milestones"] = list(cfg["milestones"])
        cfg["weight_hparams"] = dict(cfg["weight_hparams"])
    return cfg, errors
