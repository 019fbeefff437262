"""Starting from the network you have: ``annify train SPEC --init SOURCE``.

SOURCE is ``timm`` (the model's pretrained weights), a run folder of ``annify train`` (a plain
network trained on its last output with ``--weights opt``, or an anytime one), a checkpoint folder,
or a ``.safetensors`` / ``.pth`` state dict. It starts the trunk and the model's own classifier, so
the last output *is* the original network; the added heads always start fresh (a source's own head
weights are not used, and the log says how many it held).

The original network is measured once, on the run's validation and test splits, before any step
(``original.json`` in the run folder); the trainer reports it beside every output. A frozen copy of
it can teach every output (``teacher="original"``, see ``annify.weighting.teacher_losses``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from annify._files import atomic_write
from annify.errors import TrainError
from annify.run_dir import RunDir
from annify.spec import Spec

__all__ = ["init_state", "load_init", "original_row", "read_original", "teacher_from"]


def init_state(source: str, spec: Spec) -> dict[str, torch.Tensor]:
    """The state dict SOURCE holds (see the module docstring), in timm's key names."""
    import timm

    import annify.models  # noqa: F401 - registers the cifar_resnet family

    if source == "timm":
        cfg = timm.models.get_pretrained_cfg(spec.model)
        if cfg is None or not (cfg.url or cfg.hf_hub_id or cfg.file or cfg.state_dict):
            raise TrainError(
                f"timm has no pretrained weights for {spec.model}; pass --init with a run folder, "
                "a checkpoint folder or a .safetensors/.pth file"
            )
        kwargs = {**spec.model_kwargs, "num_classes": spec.num_classes}
        return timm.create_model(spec.model, pretrained=True, **kwargs).state_dict()
    path = _weights_path(Path(source))
    try:
        return timm.models.load_state_dict(str(path), use_ema=False)
    except Exception as e:  # safetensors, pickle and zip readers each raise their own types
        raise TrainError(
            f"--init {source}: {path} is not a readable state dict ({str(e).splitlines()[0]})"
        ) from None


def _weights_path(p: Path) -> Path:
    """The weights file of a run folder, a checkpoint folder or a file (``run_dir.weights_file``)."""
    from annify.errors import InferenceError
    from annify.run_dir import in_checkpoints, weights_file

    if not p.exists() and not in_checkpoints(p):
        raise TrainError(
            f"--init {p}: no such file or folder; pass 'timm', a run folder, a checkpoint folder or a file"
        )
    try:
        path = weights_file(p)
    except InferenceError as e:
        raise TrainError(f"--init {p}: {e}") from None
    if not path.is_file():
        raise TrainError(
            f"--init {p}: no model.safetensors in it; pass a run folder, a checkpoint folder or a weights file"
        )
    return path


def load_init(net: nn.Module, spec: Spec, source: str, say: Callable) -> bool:
    """Load SOURCE's trunk and classifier into ``net``; heads stay fresh. True when the classifier was loaded.

    A classifier of another class count (timm's ImageNet head on 10 classes) is skipped with a note:
    the last output then starts fresh too, and there is no original network on this data to report.
    """
    import timm

    state = init_state(source, spec)
    prefix = net.exits_prefix
    heads = [k for k in state if k.startswith(prefix)]
    state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    own = net.state_dict()
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not k.startswith(prefix)]
    if unexpected or missing:
        raise TrainError(
            f"--init {source} does not fit {spec.model}: {len(unexpected)} unknown keys (e.g. {unexpected[:1]}), "
            f"{len(missing)} trunk weights missing (e.g. {missing[:1]})"
        )
    classifier = (timm.models.get_pretrained_cfg_value(spec.model, "classifier") or "") + "."
    wrong = [k for k in state if tuple(state[k].shape) != tuple(own[k].shape)]
    if any(not k.startswith(classifier) for k in wrong):
        bad = next(k for k in wrong if not k.startswith(classifier))
        raise TrainError(
            f"--init {source}: {bad} has shape {tuple(state[bad].shape)}, the model {tuple(own[bad].shape)}"
        )
    if wrong:
        say(
            f"note: --init {source}: skipped {', '.join(sorted(wrong))} (another class count); "
            "the classifier starts fresh, so there is no original network to compare with"
        )
    with torch.no_grad():
        net.load_state_dict({k: v for k, v in state.items() if k not in wrong}, strict=False)
    unused = f" ({len(heads)} head tensors in it not used)" if heads else ""
    say(
        f"loaded the trunk{'' if wrong else ' and classifier'} from {source} ({len(state) - len(wrong)} tensors); "
        f"the {len(net.exits)} added heads start fresh{unused}"
    )
    return not wrong


def original_row(val_error: float, test_error: float | None, flops: int, last_flops: int) -> dict:
    """The original network as a row of an anytime table (``output`` is ``"original"``)."""
    return {
        "output": "original",
        "node": "model",
        "flops": int(flops),
        "fraction": round(flops / last_flops, 4),
        "val_error": val_error,
        "test_error": test_error,
    }


def write_original(out: Path, row: dict, source: str) -> None:
    atomic_write(RunDir(out).original, json.dumps({**row, "source": source}, indent=1) + "\n")


def read_original(out: Path) -> dict | None:
    """The original's row from a run folder, None when the run did not start from one."""
    path = RunDir(out).original
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    record.pop("source", None)
    return record


def teacher_from(net: nn.Module, model: nn.Module | None = None) -> nn.Module:
    """A frozen copy of ``net``'s original network (``annify.plain_model``): eval mode, no gradients.

    ``model``: the module a ``module:`` spec was converted from; a copy of it is used, since ``net``
    shares that module's parameters and trains them.
    """
    import copy

    from annify.convert import plain_model

    teacher = plain_model(net, None if model is None else copy.deepcopy(model))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()
