"""Export an anytime network to ONNX and TorchScript, one file per truncated network and per segment.

- ``<name>_out{k}``: input → output k (0-based), a single-exit network: segments 0..k and head k
  only (the heads before k are left out; its logits equal ``forward_until(x, k + 1)[-1]``).
- ``<name>_seg{j}``: segment j alone, carried tensors in → carried tensors out plus output j's
  logits, so a serving loop can stop after any segment (segment 0 takes the image).

Each file is a pruned ``torch.fx.GraphModule`` of the segment graphs (only the submodules they
use), traced with ``torch.onnx.export(dynamo=False)`` (the TorchScript-based exporter, opset 17,
which the widest range of runtimes reads) or ``torch.jit.trace``. Batch size is dynamic where the
model allows it, and every file is checked against PyTorch at a batch size other than the traced
one. Some models carry non-tensor values across a cut (sizes read off a tensor); tracing would bake
them into a segment file as constants, valid for one input shape only, so for such models only the
truncated networks are exported (they compute those values inside) and the manifest says so.

Every weight is stored once. The truncated networks and segments share most of their weights, so
the ONNX files hold only their graphs and point (ONNX external data: location, offset, length) into
one ``<name>.onnx.data`` file beside them, where each distinct tensor is written once (an ONNX file
therefore needs that file in its folder). TorchScript files embed their own weights.

Files are written into a staging folder, checked there, then moved into place; ``manifest.json``
lists them with their inputs, outputs and FLOPs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx, nn

from annify._files import atomic_write, move_into, staging
from annify.cost import exit_flops, segment_costs
from annify.early_exit import batched_carry
from annify.errors import ExportError
from annify.rewrite import AnytimeNet

__all__ = ["FORMATS", "ExportError", "export"]

FORMATS = ("onnx", "torchscript")
OPSET = 17
ATOL = 1e-4
_SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
_INLINE = 1024  # initializers smaller than this many bytes stay inside their ONNX file
_ALIGN = 64  # byte alignment of each tensor in the shared weights file


class _SharedWeights:
    """One external-data file for every ONNX file of an export: each distinct tensor written once."""

    def __init__(self, path: Path):
        self.path = path
        self.offsets: dict[tuple, tuple[int, int]] = {}  # (type, dims, digest) -> (offset, length)
        self.size = 0

    def externalize(self, model) -> None:
        """Point ``model``'s large initializers into the shared file, appending the tensors it lacks."""
        from onnx.external_data_helper import set_external_data

        with open(self.path, "ab") as f:
            for tensor in model.graph.initializer:
                raw = tensor.raw_data
                if len(raw) < _INLINE:
                    continue
                key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(raw).digest())
                if key not in self.offsets:
                    pad = -self.size % _ALIGN
                    f.write(b"\0" * pad + raw)
                    self.offsets[key] = (self.size + pad, len(raw))
                    self.size += pad + len(raw)
                offset, length = self.offsets[key]
                set_external_data(tensor, self.path.name, offset, length)
                tensor.ClearField("raw_data")


def _copy(graph: fx.Graph) -> fx.Graph:
    g = fx.Graph()
    g.output(g.graph_copy(graph, {}))
    return g


class _Piece(nn.Module):
    """Segments ``first..last`` of ``net`` with head ``last`` at the end, as a standalone module.

    Returns the logits, or with ``with_state`` the values carried out of ``last`` followed by them.
    """

    def __init__(self, net: AnytimeNet, first: int, last: int, with_state: bool):
        super().__init__()
        segs = net.segments[first : last + 1]
        self.parts = nn.ModuleList(fx.GraphModule(net, _copy(s.graph)) for s in segs)
        self.taps = [s.tap for s in segs]
        self.carries = [s.carry for s in segs]
        self.head = net.exits[last] if segs[-1].tap is not None else None
        self.with_state = with_state

    def forward(self, *inputs):
        state, values = inputs, None
        for part, tap, carry in zip(self.parts, self.taps, self.carries, strict=True):
            values = part(*state)
            if tap is not None:
                state = tuple(values[:carry])
        if self.head is None:  # the model's own classifier ends the last segment
            return values
        logits = self.head(values[self.taps[-1]])
        return (*state, logits) if self.with_state else logits


@dataclass
class _Job:
    """One module to export, with traced and check inputs and PyTorch's outputs on the check inputs."""

    kind: str  # "truncated" or "segment"
    index: int  # output k / segment j, 0-based
    module: nn.Module
    trace_args: tuple
    check_args: tuple
    reference: list[torch.Tensor]
    inputs: list[str]
    outputs: list[str]
    batched_in: list[bool]  # which inputs / outputs have the batch dimension
    batched_out: list[bool]
    flops: float  # per-sample cost of running this file


def _jobs(net: AnytimeNet, x_trace, x_check, trunk: list[float], head: list[float]) -> list[_Job]:
    """The truncated networks, then the segments unless some segment carries a non-tensor value."""
    n = net.num_outputs
    states_trace, states_check = [(x_trace,)], [(x_check,)]  # the input of each segment
    for j in range(n - 1):
        states_trace.append(net.run_segment(j, states_trace[-1], head=False)[0])
        states_check.append(net.run_segment(j, states_check[-1], head=False)[0])
    jobs = [
        _Job("truncated", k, _Piece(net, 0, k, with_state=False).eval(), (x_trace,), (x_check,),
             [net.forward_until(x_check, k + 1)[-1]], ["x"], ["logits"], [True], [True],
             sum(trunk[: k + 1]) + head[k])
        for k in range(n)
    ]  # fmt: skip
    if not all(isinstance(v, torch.Tensor) for s in states_trace for v in s):
        return jobs
    batched = [[True], *batched_carry(net), []]  # per segment input; the last one carries nothing out
    for j in range(n):
        carried, logits = net.run_segment(j, states_check[j])
        ins = ["x"] if j == 0 else [f"in{i}" for i in range(len(states_trace[j]))]
        outs = [f"out{i}" for i in range(len(carried))] + ["logits"]
        jobs.append(
            _Job("segment", j, _Piece(net, j, j, with_state=True).eval(), states_trace[j], states_check[j],
                 [*carried, logits], ins, outs, batched[j], [*batched[j + 1], True], trunk[j] + head[j])
        )  # fmt: skip
    return jobs


def _write(job: _Job, fmt: str, stage: Path, name: str, check: bool, shared: _SharedWeights) -> dict:
    """Export one job in one format into the staging folder and check it there; its manifest entry."""
    target = stage / f"{name}_{'out' if job.kind == 'truncated' else 'seg'}{job.index}{_SUFFIX[fmt]}"
    names = job.inputs + job.outputs
    dynamic = {n: {0: "batch"} for n, b in zip(names, job.batched_in + job.batched_out, strict=True) if b}
    if fmt == "onnx":  # exported in memory, its weights moved to the shared file, then written once
        import onnx

        buf = io.BytesIO()
        _export_file(job.module, tuple(job.trace_args), buf, fmt, job.inputs, job.outputs, dynamic)
        model = onnx.load_model_from_string(buf.getvalue())
        shared.externalize(model)
        onnx.save(model, str(target))
    else:
        _export_file(job.module, tuple(job.trace_args), str(target), fmt, job.inputs, job.outputs, dynamic)
    diff = _check(target, fmt, job.check_args, job.inputs, job.reference, target.name) if check else None
    return {
        "path": target.name, "format": fmt, "kind": job.kind, "output": job.index,
        "inputs": _describe(job.inputs, job.trace_args, job.batched_in),
        "outputs": _describe(job.outputs, job.reference, job.batched_out),
        "flops": job.flops, "max_abs_diff": diff,
    }  # fmt: skip


def _refuse_unwritable(e: OSError | RuntimeError, folder: Path) -> None:
    """Re-raise a failed write (a full disk: an OSError, or torch's zip writer's RuntimeError) as a
    one-line ExportError naming the folder; any other RuntimeError is a bug and keeps its traceback."""
    if (
        isinstance(e, RuntimeError)
        and "PytorchStreamWriter" not in str(e)
        and "inline_container" not in str(e)
    ):
        raise e
    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
    raise ExportError(
        f"cannot write the export into {folder} ({why}); free disk space there or choose another --out"
    ) from None


def _describe(names: list[str], tensors, batched: list[bool]) -> list[dict]:
    """Names and shapes for the manifest, with "batch" for a dynamic batch dimension."""
    return [
        {"name": n, "shape": ["batch", *t.shape[1:]] if b else list(t.shape)}
        for n, t, b in zip(names, tensors, batched, strict=True)
    ]


def _export_file(module, args, dest, fmt, in_names, out_names, dynamic) -> None:
    """Trace ``module`` into ``dest`` (a path, or a binary buffer)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "onnx":
            try:
                torch.onnx.export(
                    module, args, dest, dynamo=False, opset_version=OPSET,
                    input_names=in_names, output_names=out_names, dynamic_axes=dynamic,
                )  # fmt: skip
            except ImportError as e:
                raise ExportError(f"ONNX export needs {e.name or 'onnx'}; pip install annify[onnx]") from None
        else:
            torch.jit.save(torch.jit.trace(module, args, check_trace=False), dest)


def _run_file(path, fmt, args, in_names) -> list[torch.Tensor]:
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {n: a.numpy() for n, a in zip(in_names, args, strict=True)}
        return [torch.from_numpy(o) for o in session.run(None, feeds)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.9+ deprecates TorchScript; it still loads
        out = torch.jit.load(str(path))(*args)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _check(path, fmt, args, in_names, reference, label) -> float:
    try:
        got = _run_file(path, fmt, args, in_names)
    except Exception as e:  # a runtime that rejects the file: report it as an export failure
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{label}: {fmt} file does not run at batch {len(args[0])}: {first}") from None
    if len(got) != len(reference):
        raise ExportError(f"{label}: {fmt} file returns {len(got)} outputs, PyTorch {len(reference)}")
    diff = worst = 0.0  # largest absolute difference; largest relative to its output's scale
    for g, r in zip(got, reference, strict=True):
        if tuple(g.shape) != tuple(r.shape):
            raise ExportError(f"{label}: {fmt} output shape {tuple(g.shape)} != PyTorch {tuple(r.shape)}")
        if r.numel():
            d = float((g.float() - r.float()).abs().max())
            diff, worst = max(diff, d), max(worst, d / max(1.0, float(r.float().abs().max())))
    if worst > ATOL:
        raise ExportError(
            f"{label}: {fmt} output differs from PyTorch by {diff:.2e} (> {ATOL:g} of the output's scale)"
        )
    return diff


def export(
    net: AnytimeNet,
    out_dir: str | os.PathLike,
    formats: tuple[str, ...] | list[str] = FORMATS,
    check: bool = True,
    preprocessing: dict | None = None,
    early_exit: dict | None = None,
) -> dict:
    """Export every truncated network and every segment of ``net``; returns the manifest.

    Args:
        net: the network; exported in eval mode (its mode is restored afterwards).
        out_dir: created if needed; files are named after ``net.spec.name``.
        formats: any of ``"onnx"``, ``"torchscript"``.
        check: run each file (onnxruntime / ``torch.jit.load``) on a fresh input and require its
            outputs to match PyTorch's within 1e-4 (of the output's largest magnitude where that
            exceeds 1: float32 rounding grows with it); a mismatch raises ``ExportError``.
        preprocessing: what the inputs must be normalised with (``mean``, ``std`` per channel),
            recorded in the manifest beside ``input_size`` so a deployment feeds the files right.
        early_exit: calibrated exit thresholds (``annify calibrate``'s thresholds.json as a dict),
            recorded as the manifest's ``early_exit`` so a serving loop over the segments can use them.
    """
    formats = tuple(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ExportError(
            f"unknown export format {bad[0] if bad else '(none)'}; choose from {', '.join(FORMATS)}"
        )
    if check and "onnx" in formats:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ExportError("checking ONNX files needs onnxruntime; pip install annify[onnx]") from None
    spec = net.spec
    name = spec.name if spec is not None else "anytime"
    input_size = tuple(spec.input_size if spec is not None else net.input_size)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    previous = _previous_export(folder, name, spec.model if spec is not None else None)
    anytime = exit_flops(net)
    trunk, head = segment_costs(net)
    generator = torch.Generator().manual_seed(0)
    x_trace = torch.randn(2, *input_size, generator=generator)
    x_check = torch.randn(3, *input_size, generator=generator)

    was_training = net.training
    net.eval()
    try:
        with staging(folder) as stage:  # nothing in place until every file passes its check
            shared = _SharedWeights(stage / f"{name}.onnx.data")  # written only if an ONNX file has weights
            with torch.no_grad():
                jobs = _jobs(net, x_trace, x_check, trunk, head)
                segments_exported = any(job.kind == "segment" for job in jobs)
                files = []
                for job in jobs:
                    for fmt in formats:
                        try:
                            files.append(_write(job, fmt, stage, name, check, shared))
                        except (OSError, RuntimeError) as e:
                            _refuse_unwritable(e, folder)
            weights = shared.path.name if shared.path.exists() else None
            move_into(stage, folder, [entry["path"] for entry in files] + ([weights] if weights else []))
    finally:
        net.train(was_training)

    manifest = {
        "name": name,
        "model": spec.model if spec is not None else None,
        "input_size": list(input_size),
        "mean": (preprocessing or {}).get("mean"),
        "std": (preprocessing or {}).get("std"),
        "num_classes": spec.num_classes if spec is not None else None,
        "opset": OPSET if "onnx" in formats else None,
        "cost_convention": spec.cost_convention if spec is not None else None,
        "flops": anytime,
        "segments_exported": segments_exported,
        "onnx_weights": weights,
        "note": (
            "outputs and segments are 0-based; 'flops' per file is its own per-sample cost "
            "(truncated: trunk to output k plus head k; segment: its trunk plus its head); "
            "the top-level 'flops' are cumulative anytime FLOPs per output"
            + (
                ""
                if segments_exported
                else "; segments carry non-tensor values, so only truncated networks are exported"
            )
            + (
                f"; every ONNX file reads its weights from {weights} (each tensor stored once), "
                "which must stay in the same folder"
                if weights
                else ""
            )
        ),
        "files": files,
    }
    if early_exit is not None:
        manifest["early_exit"] = early_exit
    try:
        atomic_write(folder / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    except OSError as e:
        _refuse_unwritable(e, folder)
    written = {f["path"] for f in files} | ({weights} if weights else set())
    for stale in previous - written:  # files of the earlier export of this network that no longer exist
        (folder / stale).unlink(missing_ok=True)
    return manifest


def _previous_export(folder: Path, name: str, model: str | None) -> set[str]:
    """Files of an earlier export in ``folder``; another network's export there is refused."""
    path = folder / "manifest.json"
    if not path.is_file():
        return set()
    try:
        old = json.loads(path.read_text())
        files = {str(f["path"]) for f in old["files"]} | (
            {str(old["onnx_weights"])} if old.get("onnx_weights") else set()
        )
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise ExportError(f"{path} is not an annify manifest; export into another --out folder") from None
    if (old.get("name"), old.get("model")) != (name, model):
        raise ExportError(
            f"{folder} holds the export of another network ({old.get('name')}, {old.get('model')}); "
            "export into another --out folder (or delete that one)"
        )
    return {f for f in files if "/" not in f and not f.startswith(".")}
