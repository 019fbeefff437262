"""Anytime inference: stop at a FLOP budget or a deadline, run an EANN, exit early per sample.

Every cost here is per sample, in the convention of ``annify.cost`` (fvcore, one multiply-add = one
FLOP, batch 1), taken from the spec where it has the numbers and counted otherwise. Output k of an
anytime network costs its cumulative anytime FLOPs: the trunk up to tap k plus every head up to k,
since running anytime (or exiting early) evaluates each head on the way.

- ``AnytimeRunner`` runs a network (or an ``EANNRuntime``) segment by segment and returns the latest
  output that fits a FLOP budget, or that is ready when a wall-clock deadline passes.
- ``EANNRuntime`` runs the members of an ensemble of anytime networks one after another, computing
  only the heads whose predictions the ensemble uses.
- Budgeted batch classification (MSDNet's protocol): ``calibrate_temperatures`` and
  ``fit_thresholds`` on validation, then ``early_exit`` really shrinks the batch at every segment to
  the samples still undecided; ``budget_curve`` ties them together.
- ``load_image`` prepares an image file for a spec's input.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate, pairwise
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from annify.errors import InferenceError
from annify.rewrite import AnytimeNet

__all__ = [
    "AnytimeResult",
    "AnytimeRunner",
    "EANNRuntime",
    "Exit",
    "batched_carry",
    "budget_curve",
    "calibrate_temperatures",
    "early_exit",
    "exit_flops",
    "fit_thresholds",
    "load_image",
    "segment_costs",
]


class Exit(NamedTuple):
    """An output a runner can return: which member (None for a single network), which output, its cost."""

    member: int | None
    output: int
    flops: float


@dataclass
class AnytimeResult:
    """What ``AnytimeRunner.run`` returns.

    ``flops_spent`` counts everything computed, per sample: with a deadline that can include the
    segment that overran it. ``outputs_computed`` counts the predictions computed, the returned one
    included. ``late`` is true when not even the first output was ready at the deadline.
    """

    logits: torch.Tensor
    output_index: int  # 0-based output of the network (of ``member`` for an EANN)
    member: int | None
    flops_spent: float
    elapsed_ms: float
    outputs_computed: int
    late: bool = False


def _sci(value: float) -> str:
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


_COUNTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def segment_costs(net: AnytimeNet) -> tuple[list[float], list[float]]:
    """(trunk FLOPs of each segment, FLOPs of each head) of ``net``, per sample.

    Derived from the spec's cumulative ``flops`` and single-exit ``flops_single`` when every output
    has them (their difference at output k is the cost of the heads before k), counted with
    ``annify.cost.count`` otherwise (once per network). The last output is the model's own classifier, inside the last
    segment, so its head costs 0.
    """
    spec = getattr(net, "spec", None)
    heads = list(spec.heads) if spec is not None else []
    if len(heads) == net.num_outputs and all(
        h.flops is not None and h.flops_single is not None for h in heads
    ):
        before = [h.flops - h.flops_single for h in heads]  # heads before output k
        head = [b - a for a, b in pairwise(before)] + [0]
        trunk_cum = [h.flops_single - c for h, c in zip(heads, head, strict=True)]
        trunk = [trunk_cum[0]] + [b - a for a, b in pairwise(trunk_cum)]
        return [float(t) for t in trunk], [float(c) for c in head]
    if net not in _COUNTED:  # counting traces the network; its structure never changes, so once
        from annify.cost import count

        costs = count(net, spec.input_size if spec is not None else None)
        _COUNTED[net] = [float(t) for t in costs.trunk_flops], [float(c) for c in costs.head_flops]
    trunk, head = _COUNTED[net]
    return list(trunk), list(head)


def exit_flops(net: AnytimeNet) -> list[float]:
    """Cumulative anytime FLOPs of each output of ``net`` (what exiting there costs), per sample."""
    trunk, head = segment_costs(net)
    return [t + h for t, h in zip(accumulate(trunk), accumulate(head), strict=True)]


class _NetSchedule:
    """A single anytime network as a sequence of segments, each ending in one output."""

    def __init__(self, net: AnytimeNet):
        self.net = net
        self.exits = [Exit(None, k, f) for k, f in enumerate(exit_flops(net))]

    def events(self, x: torch.Tensor) -> Iterator[tuple[float, int | None, torch.Tensor | None]]:
        state: tuple = (x,)
        for j, e in enumerate(self.exits):
            state, out = self.net.run_segment(j, state)
            yield e.flops, j, out


class EANNRuntime(nn.Module):
    """An EANN at inference: its members run one after another, smallest first.

    ``used[m][k]`` says whether the ensemble ever returns member m's output k (the validation
    selection of ``annify.eann.build_schedule``). Only what the used outputs need is computed: heads
    of unused outputs are skipped (``run_segment(head=False)``), a member stops after its last used
    output, and a member with no used output is not run at all. Costs count exactly that, so the
    cost of (member m, output k) is, for each earlier member, its trunk up to its last used output
    plus its used heads, then member m's trunk up to tap k plus its used heads up to k. That is at
    most ``ScheduleStep.flops``, which charges every member in full.

    ``stream(x)`` yields ``(cumulative FLOPs, logits)`` for every used output, in order; ``forward``
    returns them as a list. ``exits`` lists them with their (member, output) and cost.
    """

    def __init__(self, members: list[AnytimeNet], used: list[list[bool]]):
        super().__init__()
        if not members:
            raise ValueError("an EANN needs at least one member")
        if len(used) != len(members):
            raise ValueError(f"{len(members)} members but {len(used)} rows in 'used'")
        for m, (net, row) in enumerate(zip(members, used, strict=True)):
            if len(row) != net.num_outputs:
                raise ValueError(f"member {m} has {net.num_outputs} outputs but used[{m}] has {len(row)}")
        if not any(any(row) for row in used):
            raise ValueError("no output of the EANN is used")
        self.members = nn.ModuleList(members)
        self.used = [[bool(u) for u in row] for row in used]
        self.exits: list[Exit] = []
        self._plan: list[list[tuple[int, bool, float, int | None]]] = []  # (segment, head, flops, exit)
        spent = 0.0
        for m, (net, row) in enumerate(zip(members, self.used, strict=True)):
            steps = []
            last = max((k for k, u in enumerate(row) if u), default=-1)
            trunk, head = segment_costs(net) if last >= 0 else ([], [])
            for j in range(last + 1):
                spent += trunk[j] + (head[j] if row[j] else 0.0)
                if row[j]:
                    self.exits.append(Exit(m, j, spent))
                steps.append((j, row[j], spent, len(self.exits) - 1 if row[j] else None))
            self._plan.append(steps)

    @classmethod
    def from_schedule(cls, members: list[AnytimeNet], steps: list) -> EANNRuntime:
        """Build from ``annify.eann.build_schedule``'s steps (their ``member``, ``output``, ``used``)."""
        used = [[False] * net.num_outputs for net in members]
        for s in steps:
            used[s.member][s.output] = bool(s.used)
        return cls(members, used)

    def events(self, x: torch.Tensor) -> Iterator[tuple[float, int | None, torch.Tensor | None]]:
        """After every segment run: (cumulative FLOPs, exit index or None, logits or None)."""
        for m, steps in enumerate(self._plan):
            net, state = self.members[m], (x,)
            for j, head, flops, exit_index in steps:
                state, out = net.run_segment(j, state, head=head)
                yield flops, exit_index, (out if exit_index is not None else None)

    def stream(self, x: torch.Tensor) -> Iterator[tuple[float, torch.Tensor]]:
        for flops, exit_index, out in self.events(x):
            if exit_index is not None:
                yield flops, out

    def forward(self, x: torch.Tensor) -> list[tuple[float, torch.Tensor]]:
        return list(self.stream(x))


class AnytimeRunner:
    """Run an anytime network or an ``EANNRuntime`` until a FLOP budget or a deadline.

    Puts the network in eval mode. Computation happens segment by segment and stops as soon as the
    answer is known: with a budget, right after the chosen output; with a deadline, at the first
    check (after each segment) that finds it passed.

    Args:
        model: an ``AnytimeNet`` or an ``EANNRuntime``.
        clock: seconds, monotonic; ``time.perf_counter`` unless a test injects a fake one.
    """

    def __init__(self, model: AnytimeNet | EANNRuntime, clock: Callable[[], float] = time.perf_counter):
        self.model = model.eval()
        self.schedule = model if isinstance(model, EANNRuntime) else _NetSchedule(model)
        self.clock = clock

    @property
    def exits(self) -> list[Exit]:
        """The outputs this runner can return, in order, with their cumulative per-sample FLOPs."""
        return self.schedule.exits

    def select(self, budget_flops: float) -> int:
        """Index into ``exits`` of the latest output whose cumulative FLOPs fit ``budget_flops``."""
        first = self.exits[0].flops
        if budget_flops < first:
            raise InferenceError(
                f"budget {_sci(budget_flops)} FLOPs is below the first output's cost {_sci(first)}; "
                "raise --budget-flops"
            )
        return bisect_right([e.flops for e in self.exits], budget_flops) - 1

    def steps(self, x: torch.Tensor) -> Iterator[tuple[float, int, torch.Tensor]]:
        """Yield (cumulative FLOPs, exit index, logits) output by output, computing lazily.

        For a single network the exit index is the output index; for an EANN it indexes ``exits``.
        Gradients are off while a step computes, not in the caller's code between steps.
        """
        events = self.schedule.events(x)
        while True:
            with torch.no_grad():
                event = next(events, None)
            if event is None:
                return
            flops, exit_index, out = event
            if exit_index is not None:
                yield flops, exit_index, out

    def run(
        self, x: torch.Tensor, budget_flops: float | None = None, deadline_ms: float | None = None
    ) -> AnytimeResult:
        """The latest output within the budget and ready by the deadline (either, both or neither)."""
        target = len(self.exits) - 1 if budget_flops is None else self.select(budget_flops)
        if deadline_ms is not None and deadline_ms <= 0:
            raise InferenceError(f"--deadline-ms must be positive, got {deadline_ms}")
        start = self.clock()
        deadline = None if deadline_ms is None else start + deadline_ms / 1000
        best: tuple[int, torch.Tensor] | None = None
        spent, computed, late = 0.0, 0, False
        with torch.no_grad():
            events = self.schedule.events(x)
            for flops, exit_index, out in events:
                spent, computed = flops, computed + (exit_index is not None)
                if deadline is not None and self.clock() > deadline:
                    if best is None and exit_index is not None:  # not even the first was ready in time
                        best, late = (exit_index, out), True
                    if best is not None:
                        break
                    continue
                if exit_index is not None:
                    best = (exit_index, out)
                    if exit_index == target:
                        break
            events.close()
        assert best is not None
        e = self.exits[best[0]]
        return AnytimeResult(
            logits=best[1],
            output_index=e.output,
            member=e.member,
            flops_spent=spent,
            elapsed_ms=(self.clock() - start) * 1000,
            outputs_computed=computed,
            late=late,
        )


# --------------------------------------------------------------------------- budgeted batch


def calibrate_temperatures(
    logits_per_output: Sequence[torch.Tensor], labels: torch.Tensor, max_iter: int = 50
) -> list[float]:
    """One temperature per output, minimizing the validation NLL of ``softmax(logits / T)``.

    Optimizes log T with L-BFGS (so T stays positive), starting from T = 1. The result is clamped
    to [0.01, 100]: an output whose NLL keeps falling beyond that (e.g. an untrained head) carries
    no confidence worth scaling, and a float32 softmax at such T would flatten into ties.
    """
    labels = labels.long().clone()  # clones: tensors made under inference_mode cannot enter autograd
    temps = []
    with torch.enable_grad():
        for logits in logits_per_output:
            z = logits.detach().float().clone()
            log_t = torch.zeros((), requires_grad=True)
            opt = torch.optim.LBFGS([log_t], max_iter=max_iter, line_search_fn="strong_wolfe")

            def closure(z=z, log_t=log_t, opt=opt):
                opt.zero_grad()
                loss = F.cross_entropy(z / log_t.exp(), labels)
                loss.backward()
                return loss

            opt.step(closure)
            temps.append(min(max(float(log_t.detach().exp()), 1e-2), 1e2))
    return temps


def _exit_index(conf: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """First output whose confidence reaches its threshold, per sample; conf is K×N."""
    passed = conf >= torch.tensor(thresholds, dtype=conf.dtype).unsqueeze(1)
    passed[-1] = True
    return passed.to(torch.uint8).argmax(dim=0)  # argmax returns the first maximum


def fit_thresholds(
    val_probs_per_output: Sequence[torch.Tensor],
    target_avg_flops: float,
    flops_per_output: Sequence[float],
    val_labels: torch.Tensor | None = None,
) -> list[float]:
    """Max-softmax thresholds whose average cost on validation is ``target_avg_flops`` (MSDNet's scheme).

    The share of samples exiting at output k follows q^k (k = 1..K, normalized). For a given q,
    output k's threshold is the confidence of the n_k-th most confident sample still running, so
    that n_k of them exit there (the last output takes everyone left). q is found by bisection on
    log q so that the average FLOPs realized on validation hits the target; the closest q seen wins.

    With ``val_labels``, the first output allowed to exit is searched too: weak early heads can make
    the geometric schedule worse than stopping at one fixed output, so for each first exit j the
    schedule is fitted over outputs j..K and the policy with the best validation accuracy at (or
    nearest below) the target cost wins. Stopping every sample at a single output is among them.

    Returns K thresholds; a sample exits at the first output whose max softmax is >= its threshold.
    ``math.inf`` means no sample exits there; the last is 0 (everyone exits).
    """
    conf = torch.stack([p.float().max(dim=1).values for p in val_probs_per_output])  # K×N
    k_out, n = conf.shape
    flops = torch.tensor([float(f) for f in flops_per_output], dtype=torch.float64)
    if len(flops) != k_out:
        raise ValueError(f"{k_out} outputs of probabilities but {len(flops)} FLOP counts")
    if not flops[0] <= target_avg_flops <= flops[-1]:
        raise ValueError(
            f"target {_sci(target_avg_flops)} FLOPs is outside what exiting can reach, "
            f"{_sci(float(flops[0]))} to {_sci(float(flops[-1]))}"
        )
    order = conf.argsort(dim=1, descending=True)

    def thresholds_for(log_q: float, start: int) -> list[float]:
        ranks = torch.arange(1, k_out - start + 1, dtype=torch.float64)
        cum = torch.round(n * torch.softmax(log_q * ranks, 0).cumsum(0)).long()
        exited = torch.zeros(n, dtype=torch.bool)
        out = [math.inf] * start
        for k in range(start, k_out - 1):
            want = int(cum[k - start]) - int(exited.sum())
            if want <= 0:
                out.append(math.inf)
                continue
            running = order[k][~exited[order[k]]]
            t = float(conf[k, running[want - 1]])
            out.append(t)
            exited |= conf[k] >= t
        return [*out, 0.0]

    def avg_flops(thresholds: list[float]) -> float:
        return float(flops[_exit_index(conf, thresholds)].mean())

    def fit(start: int) -> list[float]:
        lo, hi = -30.0, 30.0
        best, best_gap = None, math.inf
        for _ in range(60):
            mid = (lo + hi) / 2
            t = thresholds_for(mid, start)
            got = avg_flops(t)
            if abs(got - target_avg_flops) < best_gap:
                best, best_gap = t, abs(got - target_avg_flops)
            if got < target_avg_flops:
                lo = mid
            else:
                hi = mid
        assert best is not None
        return best

    if val_labels is None:
        return fit(0)
    preds = torch.stack([p.argmax(dim=1) for p in val_probs_per_output])  # K×N
    correct = preds == val_labels.reshape(1, -1)
    tolerance = 0.01 * float(flops[-1])  # a policy may overshoot the target by 1% of the full cost

    def score(thresholds: list[float]) -> tuple[bool, float]:
        exits = _exit_index(conf, thresholds)
        fits = avg_flops(thresholds) <= target_avg_flops + tolerance
        return fits, float(correct[exits, torch.arange(n)].float().mean())

    starts = [j for j in range(k_out) if flops[j] <= target_avg_flops + tolerance]
    fixed = [[math.inf] * j + [0.0] * (k_out - j) for j in starts]  # everyone stops at output j
    candidates = [fit(j) for j in starts] + fixed
    best = max(candidates or [fit(0)], key=score)
    assert best is not None
    return best


@contextlib.contextmanager
def _inference(net: nn.Module):
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        net.train(was_training)


def batched_carry(net: AnytimeNet) -> list[list[bool]]:
    """For each segment, which carried values derive from the input (and so have its batch dimension).

    Found by data flow in the segment graphs: a value computed only from parameters and constants
    is shared by the whole batch and must not be sliced.
    """
    flags, out = [True], []  # segment 0 reads the input batch
    for seg in net.segments[:-1]:
        dep: dict[fx.Node, bool] = {}
        from_input = iter(flags)
        for node in seg.graph.nodes:
            if node.op == "placeholder":
                dep[node] = next(from_input, False)
            else:
                dep[node] = any(dep.get(a, False) for a in node.all_input_nodes)
        ret = next(n for n in seg.graph.nodes if n.op == "output").args[0]
        flags = [isinstance(v, fx.Node) and dep[v] for v in ret[: seg.carry]]
        out.append(flags)
    return out


def early_exit(
    net: AnytimeNet,
    x: torch.Tensor,
    thresholds: Sequence[float],
    temperatures: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Classify a batch, each sample exiting at its first output confident enough; skips real compute.

    After each segment the samples whose ``max softmax(logits / T_k) >= thresholds[k]`` leave, and
    the carried state is cut down to the rest (``index_select`` on dim 0 of every carried tensor that
    derives from the input and has the current batch size; other carried values are kept as they
    are), so later segments run on the undecided samples only.

    Returns:
        (logits at each sample's exit, N×classes; exit output index, N; per-sample FLOPs, N).
    """
    k_out, n = net.num_outputs, x.shape[0]
    if len(thresholds) != k_out:
        raise ValueError(f"{k_out} outputs but {len(thresholds)} thresholds")
    temps = list(temperatures) if temperatures is not None else [1.0] * k_out
    if n == 0:
        raise ValueError("early_exit needs a non-empty batch")
    flops = torch.tensor(exit_flops(net), dtype=torch.float64)
    exit_at = torch.full((n,), k_out - 1, dtype=torch.long)
    result: torch.Tensor | None = None
    active = torch.arange(n)
    state: tuple = (x,)
    with _inference(net):
        batched = batched_carry(net)
        for j in range(k_out):
            state, logits = net.run_segment(j, state)
            if result is None:
                result = logits.new_empty((n, *logits.shape[1:]))
            if j == k_out - 1:
                done = torch.ones(len(active), dtype=torch.bool)
            else:
                conf = torch.softmax(logits.float() / temps[j], dim=-1).amax(dim=-1)
                done = conf >= thresholds[j]
            result[active[done]] = logits[done]
            exit_at[active[done]] = j
            if done.all():
                break
            if done.any():
                keep = (~done).nonzero().squeeze(1)
                b = len(active)
                state = tuple(
                    v.index_select(0, keep)
                    if flag and isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b
                    else v
                    for v, flag in zip(state, batched[j], strict=True)
                )
                active = active[keep]
    assert result is not None
    return result, exit_at, flops[exit_at]


def _collect(net: AnytimeNet, loader) -> tuple[list[torch.Tensor], torch.Tensor]:
    outs: list[list[torch.Tensor]] = [[] for _ in range(net.num_outputs)]
    labels = []
    for x, y in loader:
        for k, logits in enumerate(net(x)):
            outs[k].append(logits.float())
        labels.append(torch.as_tensor(y))
    return [torch.cat(o) for o in outs], torch.cat(labels)


def budget_curve(net: AnytimeNet, val_loader, test_loader, targets: Sequence[float]) -> list[dict]:
    """Budgeted batch classification: accuracy against average FLOPs, one row per target.

    Temperatures and thresholds (including the first output allowed to exit, see
    ``fit_thresholds``) are fit on ``val_loader`` (never on test), then ``early_exit`` runs
    on ``test_loader``. ``wall_s`` is the time spent in ``early_exit`` on test (data loading excluded).

    Returns:
        One dict per target: ``target_flops``, ``avg_flops`` and ``accuracy`` on test, ``wall_s``,
        ``val_avg_flops`` and the ``thresholds`` and ``temperatures`` used.
    """
    flops = exit_flops(net)
    with _inference(net):
        val_logits, val_labels = _collect(net, val_loader)
    temps = calibrate_temperatures(val_logits, val_labels)
    probs = [torch.softmax(z / t, dim=-1) for z, t in zip(val_logits, temps, strict=True)]
    conf = torch.stack([p.max(dim=1).values for p in probs])
    rows = []
    for target in targets:
        thresholds = fit_thresholds(probs, target, flops, val_labels)
        val_avg = float(torch.tensor(flops, dtype=torch.float64)[_exit_index(conf, thresholds)].mean())
        correct, total, spent, wall = 0, 0, 0.0, 0.0
        for x, y in test_loader:
            start = time.perf_counter()
            logits, _, per_sample = early_exit(net, x, thresholds, temps)
            wall += time.perf_counter() - start
            correct += int((logits.argmax(dim=-1) == torch.as_tensor(y)).sum())
            total += len(per_sample)
            spent += float(per_sample.sum())
        rows.append(
            {
                "target_flops": float(target),
                "avg_flops": spent / total,
                "accuracy": correct / total,
                "wall_s": wall,
                "val_avg_flops": val_avg,
                "thresholds": thresholds,
                "temperatures": temps,
            }
        )
    return rows


# --------------------------------------------------------------------------- images


def data_config(spec) -> dict:
    """timm's resolved data config for the spec's model, at the spec's input size.

    Read from the registered pretrained config (so the mean and std are those the model family is
    trained with: ImageNet's for timm models, CIFAR's for cifar_resnet); a model with no registered
    config is built once to ask it.
    """
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    import annify.models  # noqa: F401 - registers cifar_resnet

    args = {"input_size": tuple(spec.input_size)}
    try:
        cfg = get_pretrained_cfg(spec.model)
    except RuntimeError:
        cfg = None
    if cfg is not None:
        return resolve_data_config(args, pretrained_cfg=cfg.to_dict())
    from annify.convert import create_model

    return resolve_data_config(args, model=create_model(spec.model, spec.num_classes, **spec.model_kwargs))


def _per_channel(values: Sequence[float], channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return (sum(values) / len(values),)
    raise InferenceError(f"{len(values)} normalization values for a {channels}-channel input")


def run_normalization(checkpoint) -> tuple[list[float], list[float]] | None:
    """The (mean, std) a run normalised its data with, read from ``data.json`` of the checkpoint's run.

    ``checkpoint`` is a run's checkpoint folder (``runs/x/checkpoints/last``) or a file in it; the run
    folder is searched up to three levels above. None where no run record is found.
    """
    from pathlib import Path

    from annify.run_dir import DATA, normalization

    p = Path(checkpoint).resolve()
    folder = next((f for f in [p, *p.parents][:4] if (f / DATA).is_file()), None)
    return None if folder is None else normalization(folder)


def load_image(
    path, spec, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> torch.Tensor:
    """Read an image file as the spec's input: C×H×W, resized, center-cropped and normalized.

    Resizing and cropping follow timm's eval transform for the model (``crop_pct``, interpolation);
    the image is converted to the spec's channel count (L or RGB) and normalized with ``mean``/``std``
    if given, else with the model's data config (a 3-channel mean is averaged for a 1-channel input).
    """
    from PIL import Image, UnidentifiedImageError
    from PIL.Image import DecompressionBombError
    from timm.data import create_transform

    channels = spec.input_size[0]
    if channels not in (1, 3):
        raise InferenceError(f"images can feed 1- or 3-channel inputs, this spec takes {channels}")
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
    except FileNotFoundError:
        raise InferenceError(f"cannot read image '{path}': no such file") from None
    except UnidentifiedImageError:
        raise InferenceError(f"cannot read image '{path}': not an image format PIL can read") from None
    except DecompressionBombError:
        raise InferenceError(
            f"cannot read image '{path}': too many pixels for PIL's decompression-bomb limit; downscale it first"
        ) from None
    except (OSError, ValueError) as e:
        raise InferenceError(f"cannot read image '{path}': {e}") from None
    cfg = data_config(spec)
    transform = create_transform(
        input_size=tuple(spec.input_size),
        interpolation=cfg["interpolation"],
        crop_pct=cfg["crop_pct"],
        crop_mode=cfg["crop_mode"],
        mean=_per_channel(mean if mean is not None else cfg["mean"], channels),
        std=_per_channel(std if std is not None else cfg["std"], channels),
        is_training=False,
    )
    return transform(im)
