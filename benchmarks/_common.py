"""What every benchmark shares: the machine line, threads, interleaved timing, one statistics summary,
Markdown tables, a plain/converted model pair, result files, and the few annify internals they need.

Benchmarks run from the repository root as modules: ``python -m benchmarks.bench_NAME``. They use
annify's public API (``import annify``); what annify does not export yet is imported in this module
alone (the end of this file), so a module moving inside annify is one edit here.

Why interleaved ratios: this machine is shared (other jobs run tests at the same time), so absolute
times drift by tens of percent within a minute. Running A and B alternately, one pair per repeat,
and taking the ratio within each pair cancels most of that drift; the median of the per-pair ratios
is the headline and its spread (interquartile range, and min-max) says how much to trust it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import annify

RESULTS = Path(__file__).parent / "results"


def set_threads(n: int | None) -> int:
    """Set torch's intra-op threads (``None`` leaves them alone); returns the number in use."""
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def cpu_memory_option(parser) -> None:
    """``--cpu-memory keep|release`` on a benchmark's argument parser (default keep, as annify's commands)."""
    parser.add_argument(
        "--cpu-memory",
        choices=["keep", "release"],
        default="keep",
        help="keep: annify.keep_freed_memory(), as annify's commands do by default; release: glibc's default",
    )


def set_cpu_memory(mode: str) -> str:
    """Apply ``--cpu-memory`` to this process (keep cannot be undone); returns a label for the results."""
    if mode == "keep" and not annify.keep_freed_memory():
        return "cpu memory release (keep is glibc-only)"
    return f"cpu memory {mode}"


# -------------------------------------------------------------------- statistics


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty list."""
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-round ratios a/b of two interleaved timings (index i of both is the same round)."""
    return [x / y for x, y in zip(a, b, strict=True)]


def summary(xs: Sequence[float]) -> dict:
    """The one summary every benchmark reports for per-round ratios (or any repeated measurement):
    median, interquartile range, min-max and the number of rounds."""
    return {
        "median": statistics.median(xs),
        "iqr": [quantile(xs, 0.25), quantile(xs, 0.75)],
        "min_max": [min(xs), max(xs)],
        "repeats": len(xs),
    }


def spread(s: dict, digits: int = 3, min_max: bool = True) -> str:
    """``IQR lo–hi, min–max lo–hi`` of a ``summary``, for a table cell (``min_max=False``: the IQR only)."""
    text = f"IQR {s['iqr'][0]:.{digits}f}–{s['iqr'][1]:.{digits}f}"
    if min_max:
        text += f", min–max {s['min_max'][0]:.{digits}f}–{s['min_max'][1]:.{digits}f}"
    return text


def cell(xs: Sequence[float], digits: int = 3, suffix: str = "", min_max: bool = False) -> str:
    """``**median suffix** (IQR lo–hi)``: the headline cell of a ratio column."""
    s = summary(xs)
    return f"**{s['median']:.{digits}f}{suffix}** ({spread(s, digits, min_max)})"


# -------------------------------------------------------------------- timing


@dataclass
class Paired:
    """Result of ``paired_ratio``: per-pair times (seconds) of A and B and their ratios A/B."""

    a: list[float]
    b: list[float]

    @property
    def ratios(self) -> list[float]:
        return ratios(self.a, self.b)

    @property
    def summary(self) -> dict:
        return summary(self.ratios)

    @property
    def median(self) -> float:
        return self.summary["median"]

    @property
    def iqr(self) -> tuple[float, float]:
        return tuple(self.summary["iqr"])

    @property
    def range(self) -> tuple[float, float]:
        return tuple(self.summary["min_max"])

    @property
    def median_a(self) -> float:
        return statistics.median(self.a)

    @property
    def median_b(self) -> float:
        return statistics.median(self.b)

    @property
    def repeats(self) -> int:
        return len(self.a)

    def spread(self) -> str:
        """``IQR lo-hi, min-max lo-hi`` of the ratios, for a table cell."""
        return spread(self.summary)

    def as_dict(self) -> dict:
        s = self.summary
        return {
            "median_ratio": s["median"],
            "iqr": s["iqr"],
            "min_max": s["min_max"],
            "median_a_s": self.median_a,
            "median_b_s": self.median_b,
            "repeats": self.repeats,
            "a_s": self.a,
            "b_s": self.b,
        }


def _once(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    t0 = clock()
    fn()
    return clock() - t0


def interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int = 20,
    warmup: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Time several functions round-robin: each repeat runs every function once, order rotated.

    Rotating the order (ABC, BCA, CAB, ...) keeps any one function from always running right after
    another has warmed the caches. ``warmup`` untimed rounds go first. Returns the times per function,
    index i of every list being the same round, so ratios can be taken within a round.

    ``clock``: wall time by default. ``time.thread_time`` counts only the CPU time of the calling
    thread, which is all of torch's work with one intra-op thread: on an oversubscribed machine it
    leaves out the time other processes held the core (wall-time ratios then swing by 2x per round).
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        shift = i % len(names)
        for n in names[shift:] + names[:shift]:
            times[n].append(_once(fns[n], clock))
    return times


def paired_ratio(
    fn_a: Callable[[], object], fn_b: Callable[[], object], repeats: int = 20, warmup: int = 2
) -> Paired:
    """Time ``fn_a`` and ``fn_b`` alternately; each repeat is one A and one B (AB, BA, AB, ...).

    ``warmup`` untimed pairs go first. The result's ``median`` is the median of the per-pair ratios A/B.
    """
    t = interleaved({"a": fn_a, "b": fn_b}, repeats, warmup)
    return Paired(t["a"], t["b"])


# -------------------------------------------------------------------- the machine


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() where that is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_features() -> str:
    """The vector extensions that matter for CPU convolutions (avx2, avx512f, amx), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return (
                        " ".join(x for x in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if x in flags)
                        or "none"
                    )
    except OSError:
        pass
    return "unknown"


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> dict:
    """What the numbers were measured on: CPU, cores, threads, library versions, load, date."""
    import timm

    return {
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda": torch.cuda.is_available(),
        "load_average_1_5_15": load_average(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_line(info: dict | None = None) -> str:
    """One Markdown line describing the machine."""
    m = info or machine()
    return (
        f"Machine: {m['cpu']} ({m.get('cpu_features', '?')}), {m['cores']} cores, torch threads {m['threads']}, "
        f"Python {m['python']}, torch {m['torch']}, timm {m['timm']}, GPU: {'yes' if m['cuda'] else 'none'}; "
        f"load average (1/5/15 min) {m['load_average_1_5_15']}; {m['date']}"
    )


# -------------------------------------------------------------------- tables and result files


def table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table (results go into BENCHMARKS.md; ``annify.report.format_rows`` aligns plain text
    for a terminal, which is why this is not that)."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def command() -> str:
    """The command line that is running, as one types it from the repository root (for a report)."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    head = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
    return " ".join([head, *sys.argv[1:]])


def finite(x):
    """JSON-safe: non-finite floats become None (JSON has no inf or nan)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [finite(v) for v in x]
    return x


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` whole (annify's atomic write: a reader never sees half a result), making its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _not_public("atomic_write")(path, text)
    return path


def write_json(path: str | Path, data, indent: int | None = 1) -> Path:
    """A benchmark's results as JSON (non-finite floats as null), written as ``write_text`` writes."""
    return write_text(path, json.dumps(finite(data), indent=indent) + "\n")


# -------------------------------------------------------------------- models


def model_pair(
    name: str,
    every: int | None = None,
    input_size: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
    seed: int = 0,
    **convert_kwargs,
):
    """(plain timm model, converted AnytimeNet with the same trunk weights), both in eval mode.

    Built through the public API: ``annify.convert`` (fresh weights after ``torch.manual_seed(seed)``)
    and ``annify.plain_model(net)``, the baseline whose output the converted network's last output
    equals exactly. The spec is ``net.spec``; other placements (``heads=``, ``at=``) and
    ``model_kwargs`` pass through ``convert_kwargs``.
    """
    torch.manual_seed(seed)
    net, _, _ = annify.convert(
        name, every=every, input_size=input_size, num_classes=num_classes, **convert_kwargs
    )
    return annify.plain_model(net), net.eval()


def data_spec(model: str, data: str, every: int = 1) -> annify.Spec:
    """The spec of ``model`` converted with a head every ``every`` blocks for a data source: its
    channels, classes and image size (``fit_to_data``), as ``annify train --data`` builds it."""
    info = _not_public("data_info")(data)
    _, spec, _ = annify.convert(
        model,
        every=every,
        input_size=info.input_size,
        num_classes=info.num_classes,
        model_kwargs={"in_chans": info.input_size[0]},
    )
    return _not_public("fit_to_data")(spec, data)[0]


def heads_share(spec) -> tuple[int, int, float]:
    """(plain model FLOPs, anytime FLOPs of the last output, the heads' share of the plain FLOPs).

    As a single exit the model's own output costs the trunk alone, which is the plain model.
    """
    last = spec.heads[-1]
    return last.flops_single, last.flops, (last.flops - last.flops_single) / last.flops_single


def twin(net):
    """Another converted network with ``net``'s weights, on its device, in its mode (``annify.build``)."""
    other = annify.build(net.spec)
    other.load_state_dict(net.state_dict())
    return other.to(next(net.parameters()).device).train(net.training)


# -------------------------------------------------------------------- training steps
# One step of the trainer and of the plain model, shared by bench_train, bench_threads and bench_cpu_memory.

MODELS = {  # name: (timm model, placement, input size, classes, batch)
    "cifar": ("cifar_resnet_n7_c16", 1, (3, 32, 32), 10, 64),
    "resnet50": ("resnet50", 2, (3, 224, 224), 1000, 8),
}


def step_optimizer(model, fused: bool = True):
    """The trainer's optimizer at lr 0.01; ``fused=False``: the per-tensor loop."""
    if fused:
        return _not_public("trainer_optimizer")(model, _not_public("resolve_settings")({}, {"lr": 0.01}))[0]
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt="sgd", lr=0.01, weight_decay=1e-4, momentum=0.9, nesterov=False)


def annify_step(net, scheme, x, y, amp: bool = False, head_local: bool = True, model=None):
    """One step exactly as ``annify.train.train`` takes it (single process), returning nothing.

    ``model`` is what the forward calls (``torch.compile(net)`` with ``--compile``, as the trainer
    does); parameters, hooks and the optimizer belong to ``net``."""
    from annify import weighting

    optimizer = step_optimizer(net)
    trunk = [p for n, p in net.named_parameters() if p.requires_grad and not n.startswith(net.exits_prefix)]
    scheme.to(x.device)
    local = weighting.HeadLocal(net) if head_local else None
    watch, steps = _not_public("EpochLosses")(net.num_outputs, x.device), [0]

    def step() -> None:
        if local is not None:
            local.set(scheme.weights)
        losses = annify.train.output_objectives(net if model is None else model, x, y, amp)[0]  # (K,)
        annify.train.weighted_update(losses, scheme, optimizer, trunk, local)
        steps[0] += 1
        watch.add(losses, steps[0])
        if watch.due(steps[0]):  # the trainer's rate-limited look at the losses (finiteness, progress)
            watch.read(steps[0])

    return step


def plain_step(model, x, y, amp: bool = False, compiled=None):
    """The plain timm model's step: cross-entropy on its one output, the trainer's optimizer
    (``compiled``: what the forward calls instead of ``model``)."""
    optimizer = step_optimizer(model)
    dev = x.device
    forward = model if compiled is None else compiled

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = forward(x)  # (B, classes)
        loss = torch.nn.functional.cross_entropy(out.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def train_pair(name: str, device: str):
    """(plain timm model, converted network with the same trunk weights, spec, batch, input size,
    classes) of ``MODELS[name]``, both in training mode on ``device``."""
    model, every, size, classes, batch = MODELS[name]
    plain, net = model_pair(model, every=every, input_size=size, num_classes=classes)
    return plain.to(device).train(), net.to(device).train(), net.spec, batch, size, classes


def cifar_step():
    """One trainer step of the CIFAR ResANN (``MODELS["cifar"]``, head-local AdaLoss) on random data."""
    _, net, _, batch, size, classes = train_pair("cifar", "cpu")
    x, y = torch.randn(batch, *size), torch.randint(0, classes, (batch,))
    return annify_step(net, annify.weighting.get("adaloss", net.num_outputs), x, y)


# -------------------------------------------------------------------- not public (yet)
# What the benchmarks need that annify/__init__.py does not export: imported here alone, on first use
# (``from benchmarks._common import build_datasets``), each with the capability it stands for. Each is a
# candidate for annify's public API; until then a module moving inside annify is one edit in this list.
_NOT_PUBLIC = {  # name here: (annify module, its name there; None: the module itself)
    # data: a source's train/val/test splits, its shape and classes, batching (annify.data)
    "build_datasets": ("annify.data", "build_datasets"),
    "build_loaders": ("annify.data", "build_loaders"),
    "data_info": ("annify.data", "data_info"),  # data_spec above
    "make_batches": ("annify.data", "make_batches"),
    "TensorBatches": ("annify.data", "TensorBatches"),
    "DEBIAN_FASHION_MNIST": ("annify.data", "DEBIAN_FASHION_MNIST"),
    # a spec refitted to a data source's image size (annify.evaluate)
    "fit_to_data": ("annify.evaluate", "fit_to_data"),  # data_spec above
    # evaluation: every output's loss and error; relative-to-OPT; the outputs nearest cost targets
    "evaluate": ("annify.evaluate", "evaluate"),
    "relative_to_opt": ("annify.evaluate", "relative_to_opt"),
    "nearest_outputs": ("annify.evaluate", "nearest_outputs"),
    # sizes: a model's default input size, the size it runs at for given images, placement candidates
    "default_input_size": ("annify.sources", "default_input_size"),
    "fit_input_size": ("annify.sources", "fit_input_size"),
    "placement_candidates": ("annify.placement", "placement_candidates"),
    # the cost of exiting at each output (early exit, calibration, runtime)
    "exit_flops": ("annify.cost", "exit_flops"),
    # calibration's loss matrix and threshold selection
    "loss_matrix": ("annify.calibrate", "loss_matrix"),
    "select": ("annify.calibrate", "select"),
    # EANN: Proposition 4.1's inflation, the member placement, the run and its table
    "inflation": ("annify.eann", "inflation"),
    "uniform_inflation": ("annify.eann", "uniform_inflation"),
    "default_placement": ("annify.eann", "default_placement"),
    "run_eann": ("annify.eann_run", "run_eann"),
    "format_eann": ("annify.eann", "format_eann"),
    # the trainer's settings resolved with their defaults, its optimizer and its device-side loss record
    "resolve_settings": ("annify.config", "resolve_settings"),
    "run_label": ("annify.config", "run_label"),  # a run's weighting as one label: "AdaLoss, head-local"
    "TRAIN_DEFAULTS": ("annify.config", "DEFAULTS"),
    "trainer_optimizer": ("annify.train", "_optimizer"),
    "EpochLosses": ("annify.train", "_EpochLosses"),
    # the head registry (documented in CONTRIBUTING for adding a head type): build one, the paper head's
    # fused BN-ReLU-pool switch (unfused) and the size where fusing starts
    "heads": ("annify.heads", None),
    # ONNX / TorchScript export
    "export": ("annify.export", "export"),
    # a run folder's files, named by their one owner
    "RunDir": ("annify.run_dir", "RunDir"),
    # files written whole (the one place that writes safely)
    "atomic_write": ("annify._files", "atomic_write"),
    # FLOPs as text, figures off-screen
    "format_flops": ("annify.report", "format_flops"),
    "figure": ("annify.report", "figure"),
    "save_figure": ("annify.report", "save_figure"),
}


@contextlib.contextmanager
def heads_whole_batch():
    """The paper heads pool every map at once in eval, as before they pooled in slices of the batch
    (bench_heads' before). Sets ``annify.heads._EVAL_SLICE_BYTES``: a private knob, patched here alone."""
    heads = _not_public("heads")
    keep, heads._EVAL_SLICE_BYTES = heads._EVAL_SLICE_BYTES, 1 << 62
    try:
        yield
    finally:
        heads._EVAL_SLICE_BYTES = keep


def __getattr__(name: str):
    if name not in _NOT_PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _not_public(name)


def _not_public(name: str):
    """A name of ``_NOT_PUBLIC``, imported on first use and kept as this module's attribute."""
    module, attr = _NOT_PUBLIC[name]
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value
    return value
