"""Specs: plain, commented YAML that fully describes an anytime network.

A spec names a model (and its keyword arguments), the input size, the class count and one entry per
output, in order; the last entry is the model's own classifier. The model is a timm name, timm's
``hf-hub:ORG/NAME``, ``torchvision:NAME`` (from torchvision's model registry), or ``module:CLASS``
for a module of the user's own, which the spec records but can never rebuild: the user passes the
module again (``annify.load(spec, model=module)``). Loading collects every problem and reports them
together, each with the key that is wrong. ``yaml.safe_load`` only: a spec never names Python to
import and run.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from annify.errors import SpecError
from annify.sources import model_source

__all__ = [
    "HeadSpec",
    "Spec",
    "SpecError",
    "dump",
    "load_spec",
    "parse",
    "spec_name",
]


@dataclass
class HeadSpec:
    """One output. ``node`` is the qualified FX node the head reads (``model`` for the classifier)."""

    node: str
    type: str | None = None  # head type from annify.heads; None: the default for the layout
    block: int | None = None  # 1-based block index of the tap point, where it is a block output
    flops: int | None = None  # cumulative anytime FLOPs (fvcore) at the spec's input size
    fraction: float | None = None  # flops / the last output's flops
    flops_single: int | None = None  # trunk up to here plus this head alone
    params: int | None = None  # cumulative parameters, running anytime


@dataclass
class Spec:
    """An anytime network: a model (see ``sources.model_source``) plus its outputs."""

    name: str
    model: str  # resnet50, hf-hub:timm/resnet50.a1_in1k, torchvision:resnet50 or module:MyNet
    heads: list[HeadSpec]
    input_size: tuple[int, int, int] = (3, 224, 224)
    num_classes: int = 1000
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    head_type: str | None = None
    placement: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    cost_convention: str | None = None

    @property
    def taps(self) -> list[str]:
        """Nodes read by the added heads (every output but the last)."""
        return [h.node for h in self.heads[:-1]]


def spec_name(model: str) -> str:
    """The paper's naming: resnet50 → resann50, densenet169 → denseann169, others ``<name>_ann``.

    The CIFAR family keeps its prefix: cifar_resnet_n7_c16 → cifar_resann_n7_c16. A source prefix
    is dropped (hf-hub:timm/resnet18.a1_in1k → resann18.a1_in1k, module:MyNet → MyNet_ann), but
    torchvision's models keep a mark of it (torchvision:resnet18 → tv_resann18), so that they do not
    share a file with timm's.
    """
    source, _, rest = model.rpartition(":")
    if source:
        name = spec_name(rest.rpartition("/")[2])
        return f"tv_{name}" if source == "torchvision" else name
    for plain, ann in (("resnet", "resann"), ("densenet", "denseann")):
        m = re.fullmatch(rf"((?:cifar_)?){plain}(\d.*|_n\d.*)", model)
        if m:
            return f"{m.group(1)}{ann}{m.group(2)}"
    return f"{model}_ann"


_TOP_KEYS = {f for f in Spec.__dataclass_fields__}
_HEAD_KEYS = {f for f in HeadSpec.__dataclass_fields__}


def parse(data: Any, source: str = "spec") -> Spec:
    """Validate plain data (as read from YAML) into a ``Spec``; raise ``SpecError`` listing every problem."""
    errors: list[str] = []
    if not isinstance(data, dict):
        raise SpecError(
            f"{source}: expected a mapping of keys (model, input_size, heads, ...), got {type(data).__name__}"
        )
    for key in sorted(set(data) - _TOP_KEYS):
        errors.append(f"unknown key '{key}' (known: {', '.join(sorted(_TOP_KEYS))})")
    for key in ("model", "heads"):
        if key not in data:
            errors.append(f"'{key}' is required")
    if "model" in data and not isinstance(data["model"], str):
        errors.append("'model' must be a timm model name, hf-hub:ORG/NAME, torchvision:NAME or module:CLASS")
    elif "model" in data:
        try:
            source, _ = model_source(data["model"])
        except SpecError as e:
            errors.append(str(e))
        else:
            if source == "module" and data.get("model_kwargs"):
                errors.append("'model_kwargs' must be empty for module: (your module is passed as it is)")
    size = data.get("input_size", (3, 224, 224))
    if not (
        isinstance(size, (list, tuple)) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size)
    ):
        errors.append(f"'input_size' must be [C, H, W] with positive integers, got {size!r}")
    nc = data.get("num_classes", 1000)
    if not (isinstance(nc, int) and nc > 0):
        errors.append(f"'num_classes' must be a positive integer, got {nc!r}")
    for key in ("model_kwargs", "placement", "train"):
        if not isinstance(data.get(key, {}), dict):
            errors.append(f"'{key}' must be a mapping")
    kwargs = data.get("model_kwargs") or {}
    if isinstance(kwargs, dict) and "in_chans" in kwargs:
        ic = kwargs["in_chans"]
        if not (isinstance(ic, int) and not isinstance(ic, bool) and ic > 0):
            errors.append(f"'model_kwargs.in_chans' must be a positive integer, got {ic!r}")
        elif isinstance(size, (list, tuple)) and len(size) == 3 and size[0] != ic:
            errors.append(
                f"'model_kwargs.in_chans' is {ic} but 'input_size' has {size[0]} channels; make them agree"
            )
    heads: list[HeadSpec] = []
    raw = data.get("heads", [])
    if not isinstance(raw, list) or not raw:
        errors.append("'heads' must be a non-empty list, one entry per output (the last is the classifier)")
        raw = []
    for i, h in enumerate(raw):
        if not isinstance(h, dict) or not isinstance(h.get("node"), str):
            errors.append(f"heads[{i}]: needs a 'node' (a name from `annify inspect MODEL`)")
            continue
        bad = sorted(set(h) - _HEAD_KEYS)
        if bad:
            errors.append(f"heads[{i}]: unknown key '{bad[0]}' (known: {', '.join(sorted(_HEAD_KEYS))})")
            continue
        heads.append(HeadSpec(**h))
    if isinstance(data.get("train"), dict) and data["train"]:
        from annify.config import train_section_problems  # imports the registries it checks against

        errors += [
            f"train: {p}" if not p.startswith("train:") else p for p in train_section_problems(data["train"])
        ]
    nodes = [h.node for h in heads[:-1]]
    dup = sorted({n for n in nodes if nodes.count(n) > 1})
    if dup:
        errors.append(f"heads: node '{dup[0]}' appears twice")
    if errors:
        raise SpecError(f"{source}: " + "; ".join(errors))
    name = data.get("name") or spec_name(data["model"])
    return Spec(
        name=name,
        model=data["model"],
        heads=heads,
        input_size=tuple(size),
        num_classes=nc,
        model_kwargs=dict(data.get("model_kwargs") or {}),
        head_type=data.get("head_type"),
        placement=dict(data.get("placement") or {}),
        train=dict(data.get("train") or {}),
        cost_convention=data.get("cost_convention"),
    )


class _SpecLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` for plain data: a key given twice and an alias (``*name``) are errors.

    A second ``heads:`` would otherwise silently replace the first (the last wins), and aliases let a
    few lines expand into billions of nodes (an "alias bomb"); a spec needs neither.
    """

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(
                f"line {event.start_mark.line + 1} uses the YAML alias *{event.anchor}; a spec is plain data: "
                "write the value out in full"
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    if key in seen:
                        where = f"on line {line}" if seen[key] == line else f"(lines {seen[key]} and {line})"
                        raise _Refused(f"key '{key}' appears twice {where}; keep one of them")
                    seen[key] = line
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
        return super().construct_mapping(node, deep)


class _Refused(Exception):
    """What ``_SpecLoader`` refuses (turned into a ``SpecError`` naming the file)."""


def load_spec(path: str | os.PathLike) -> Spec:
    """Read and validate a spec file."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file '{p}' does not exist; write one with `annify convert MODEL --out DIR`")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_SpecLoader)  # a SafeLoader
    except _Refused as e:
        raise SpecError(f"{p}: {e}") from None
    except UnicodeDecodeError:
        raise SpecError(
            f"{p} is not a text file (a spec is YAML); pass the .yaml spec, not weights"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{p}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
    return parse(data, str(p))


_COMMENTS = {
    "name": "name of the anytime network",
    "model": "timm name (cifar_resnet_n{n}_c{c} included), hf-hub:ORG/NAME, torchvision:NAME, or "
    "module:CLASS (your own module, passed to annify.load(spec, model=...))",
    "model_kwargs": "keyword arguments for timm.create_model or torchvision's get_model (default: none)",
    "input_size": "[C, H, W] the network is traced and costed at",
    "num_classes": "classes predicted by every output",
    "head_type": "default head type for added heads (default: by layout: NCHW bn_relu_pool_linear, else norm_pool_linear)",
    "placement": "how the tap points were chosen (informational; `heads` is what is built)",
    "cost_convention": "how flops are counted",
    "train": "training settings for `annify train` (defaults: SGD lr 0.1, momentum 0.9, wd 1e-4, lr/10 at 1/2 and 3/4)",
    "heads": "one entry per output, in order; the last is the model's own classifier (node: model)",
}


class _PlainDumper(yaml.SafeDumper):
    """Writes every value out in full, never as an alias (``_SpecLoader`` refuses aliases)."""

    def ignore_aliases(self, data) -> bool:
        return True


def dump(spec: Spec, header: str = "") -> str:
    """The spec as commented YAML (a comment on each key) that ``load_spec`` reads back unchanged."""
    data = asdict(spec)
    data["input_size"] = list(spec.input_size)
    data["heads"] = [{k: v for k, v in h.items() if v is not None} for h in data["heads"]]
    lines = [f"# {line}".rstrip() for line in header.strip().splitlines()] if header else []
    order = [
        "name",
        "model",
        "model_kwargs",
        "input_size",
        "num_classes",
        "head_type",
        "placement",
        "cost_convention",
        "train",
        "heads",
    ]
    for key in order:
        value = data[key]
        if value in (None, {}) and key not in ("model_kwargs",):
            continue
        lines.append(f"# {_COMMENTS[key]}")
        if key == "heads":
            lines.append("heads:")
            for i, h in enumerate(value):
                body = yaml.dump(
                    [h], Dumper=_PlainDumper, sort_keys=False, default_flow_style=None, width=200
                ).rstrip()
                lines.append(f"  # output {i + 1}")
                lines.extend("  " + line for line in body.splitlines())
        else:
            if key in ("input_size", "model_kwargs", "placement"):
                inline = yaml.dump(value, Dumper=_PlainDumper, default_flow_style=True, width=200).strip()
                lines.append(f"{key}: {inline}")
            else:
                lines.append(
                    yaml.dump({key: value}, Dumper=_PlainDumper, sort_keys=False, width=200).rstrip()
                )
    return "\n".join(lines) + "\n"
