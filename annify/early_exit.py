"""Budgeted batch classification (MSDNet's protocol) that really saves what it skips.

``calibrate_temperatures`` and ``fit_thresholds`` choose, on validation, a confidence threshold per
output; ``early_exit`` then runs a batch segment by segment and shrinks it at every output to the
samples still undecided, so skipped work is not computed; ``budget_curve`` ties them together into
accuracy against expected FLOPs. Costs follow ``annify.cost``.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from annify.cost import exit_flops
from annify.errors import InferenceError
from annify.report import format_sci
from annify.rewrite import AnytimeNet

__all__ = [
    "batched_carry",
    "budget_curve",
    "calibrate_temperatures",
    "early_exit",
    "early_exit_stream",
    "fit_thresholds",
]


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
            f"target {format_sci(target_avg_flops)} FLOPs is outside what exiting can reach, "
            f"{format_sci(float(flops[0]))} to {format_sci(float(flops[-1]))}"
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
    """Eval mode and ``torch.inference_mode`` (no autograd, no view or version tracking: less fixed cost
    per operation than ``no_grad``, which counts when the last segments run a few samples each); the
    mode is switched only when it has to be (``train()`` walks every module, a few ms per call on
    resnet50: more than an early exit's own bookkeeping). Tensors made inside are inference tensors:
    what leaves this module is cloned outside it, so callers may use it in autograd or change it."""
    was_training = net.training
    if was_training:
        net.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            net.train()


_CARRY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # net -> batched_carry(net)


def _batched_carry(net: AnytimeNet) -> list[list[bool]]:
    """``batched_carry``, found once per network (it walks every segment graph; the graphs never change)."""
    flags = _CARRY.get(net)
    if flags is None:
        flags = _CARRY[net] = batched_carry(net)
    return flags


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


def _take(v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``v.index_select(0, keep)`` in ``v``'s memory format (index_select alone returns a contiguous
    tensor, so a channels-last network would run every later segment converting back and forth)."""
    out = torch.empty_like(v.narrow(0, 0, len(keep)))  # batch stride outermost: narrow keeps the format
    return torch.index_select(v, 0, keep, out=out)


class _Exits:
    """The state of an early exit over one or more batches: per output, the samples waiting to run its
    segment (chunks of carried state, with each sample's batch and place in it), and per batch the
    outputs holding the logits of its exited samples and each sample's exit so far.

    A segment runs once ``pool`` samples wait for it (or, when the input ends, on whatever waits), on
    all of them at once: samples still undecided from several batches share one call, so late
    segments are not run at a batch of one or two, where a segment costs 2-3x per sample what it
    costs at batch 64 (BENCHMARKS.md §15c).
    """

    def __init__(self, net: AnytimeNet, thresholds, temperatures, pool: int):
        k_out = net.num_outputs
        if isinstance(thresholds, (str, os.PathLike)):  # a thresholds.json, or a run folder holding one
            from annify.calibrate import read_thresholds

            thresholds = read_thresholds(thresholds).thresholds
        if len(thresholds) != k_out:
            raise ValueError(f"{k_out} outputs but {len(thresholds)} thresholds")
        if any(math.isnan(float(t)) for t in thresholds):  # nan >= nothing: it would silently mean "never"
            raise InferenceError(
                f"thresholds {list(thresholds)} hold nan; give each output a confidence in [0, 1] "
                "(math.inf where no sample may exit), e.g. from fit_thresholds"
            )
        self.net, self.thresholds, self.pool, self.k_out = net, list(thresholds), pool, k_out
        # the confidences are float32, and torch compares a float32 tensor with a Python number in
        # float32: each threshold rounded to float32 is what a confidence (a float32 read out as a
        # Python float) must reach, compared in Python, with no tensor operation per output
        self.limits = torch.tensor([float(t) for t in self.thresholds], dtype=torch.float32).tolist()
        self.temps = list(temperatures) if temperatures is not None else [1.0] * k_out
        # a max softmax is at most 1: above that no sample can exit, so the head is skipped
        self.runs = [j == k_out - 1 or not self.thresholds[j] > 1.0 for j in range(k_out)]
        self.flops = torch.tensor(exit_flops(net, self.runs), dtype=torch.float64)
        self.batched = _batched_carry(net)
        # waiting[j]: chunks (carried state, [(batch, index in batch), ...]) to run segment j on
        self.waiting: list[list[tuple[tuple, list[tuple[int, int]]]]] = [[] for _ in range(k_out)]
        # per batch, the outputs its exited samples are in: (logits, their rows, their places in the batch)
        self.found: list[list[tuple[torch.Tensor, list[int], list[int]]]] = []
        self.exits: list[list[int]] = []
        self.open: list[int] = []  # per batch, how many of its samples have not exited yet
        self.shape: tuple | None = None  # a sample's shape: batches of another shape are not pooled

    def add(self, x: torch.Tensor) -> None:
        if x.shape[0] == 0:
            raise ValueError("early exit needs non-empty batches (this one has 0 samples)")
        if self.shape is not None and tuple(x.shape[1:]) != self.shape:
            self.run(flush=True)  # carried shapes (and ints such as a width) differ: do not mix
        self.shape = tuple(x.shape[1:])
        b = len(self.found)
        self.found.append([])
        self.exits.append([self.k_out - 1] * x.shape[0])
        self.open.append(x.shape[0])
        self.waiting[0].append(((x,), [(b, i) for i in range(x.shape[0])]))

    def run(self, flush: bool) -> None:
        """Run every segment that has ``pool`` samples waiting (with ``flush``: any waiting), in order."""
        with _inference(self.net):
            for j in range(self.k_out):
                if sum(len(ids) for _, ids in self.waiting[j]) >= (1 if flush else self.pool):
                    self._segment(j)

    def _segment(self, j: int) -> None:
        net, chunks, last = self.net, self.waiting[j], j == self.k_out - 1
        self.waiting[j] = []
        ids = [i for _, c in chunks for i in c]
        flags = [True] if j == 0 else self.batched[j - 1]
        state = _pooled(chunks, flags)
        state, logits = net.run_segment(j, state, head=self.runs[j])
        if not self.runs[j]:
            self.waiting[j + 1].append((state, ids))
            return
        if last:
            passed = [True] * len(ids)
        else:
            z = logits.float() if self.temps[j] == 1.0 else logits.float() / self.temps[j]
            limit = self.limits[j]
            passed = [c >= limit for c in torch.softmax(z, dim=-1).amax(dim=-1).tolist()]
        # the bookkeeping is in Python lists (a batch is tens to hundreds of samples): every tensor
        # operation costs a dispatch, and with few samples left a segment takes well under a millisecond
        done = [r for r, p in enumerate(passed) if p]
        if not done:
            self.waiting[j + 1].append((state, ids))
            return
        self._store(j, logits, [(r, ids[r]) for r in done])
        if len(done) < len(ids):
            kept = [r for r, p in enumerate(passed) if not p]
            # index_select's index, on the state's device (a dtype given: torch.tensor need not infer it)
            keep, b = torch.tensor(kept, dtype=torch.int64, device=logits.device), len(ids)
            state = tuple(
                _take(v, keep) if flag and _has_batch(v, b) else v
                for v, flag in zip(state, self.batched[j], strict=True)
            )
            self.waiting[j + 1].append((state, [ids[r] for r in kept]))

    def _store(self, j: int, logits: torch.Tensor, done: list) -> None:
        """Record the samples ``done`` = [(row of logits, (batch, place)), ...] as exiting at output j.

        Only Python lists change here: each batch's logits are gathered once, in ``result``, from the
        outputs that hold them (a copy per output would cost several tensor operations at every exit).
        """
        by_batch: dict[int, tuple[list[int], list[int]]] = {}
        for r, (b, i) in done:
            rows, places = by_batch.setdefault(b, ([], []))
            rows.append(r)
            places.append(i)
        for b, (rows, places) in by_batch.items():
            self.found[b].append((logits, rows, places))
            exits = self.exits[b]
            for i in places:
                exits[i] = j
            self.open[b] -= len(places)

    def finished(self, b: int) -> bool:
        return self.open[b] == 0

    def result(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch b's logits (each sample's row of the output it exited at, in the first exiting
        output's dtype), exits and FLOPs: one concatenation and one gather, made outside inference mode."""
        parts = self.found[b]
        assert parts and self.open[b] == 0
        dtype, src, at, chunks = parts[0][0].dtype, [0] * len(self.exits[b]), 0, []
        for logits, rows, places in parts:
            for r, i in zip(rows, places, strict=True):
                src[i] = at + r
            at += len(logits)
            chunks.append(logits.to(dtype))  # what writing it into a tensor of that dtype would do
        first = chunks[0]
        index = torch.tensor(src, dtype=torch.int64, device=first.device)
        logits = torch.cat(chunks).index_select(0, index) if len(chunks) > 1 else first.index_select(0, index)
        exit_at = torch.tensor(self.exits[b])
        self.found[b], self.exits[b] = [], []  # handed out: a long stream keeps nothing per batch
        return logits, exit_at, self.flops[exit_at]


def _has_batch(v, b: int) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b


def _pooled(chunks: list[tuple[tuple, list]], flags: Sequence[bool]) -> list:
    """The carried state of several chunks (state, sample ids) as one batch: the values that have the
    batch dimension (``flags``) concatenated, the others (the same in every chunk) taken once.

    Empties ``chunks`` and returns a list, for ``run_segment`` to be handed the only references (each
    value is then freed at its last use in the segment)."""
    state = chunks[0][0]
    if len(chunks) > 1:
        b = len(chunks[0][1])
        state = [
            torch.cat([c[0][p] for c in chunks]) if flag and _has_batch(v, b) else v
            for p, (v, flag) in enumerate(zip(state, flags, strict=True))
        ]
    state = list(state)
    chunks.clear()
    return state


def early_exit(
    net: AnytimeNet,
    x: torch.Tensor,
    thresholds: Sequence[float] | str | os.PathLike,
    temperatures: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Classify a batch, each sample exiting at its first output confident enough; skips real compute.

    After each segment the samples whose ``max softmax(logits / T_k) >= thresholds[k]`` leave, and
    the carried state is cut down to the rest (``index_select`` on dim 0 of every carried tensor that
    derives from the input and has the current batch size; other carried values are kept as they
    are), so later segments run on the undecided samples only. A channels-last batch stays
    channels-last. An output whose threshold is above 1 (``math.inf``: ``fit_thresholds`` gives it
    to outputs before the first one allowed to exit) can let no sample go, so its head is not run,
    and the FLOPs returned leave it out: they are the work each sample was given. ``thresholds`` may
    also be the ``thresholds.json`` of ``annify calibrate`` (or the run folder holding it): thresholds
    with a guarantee on the risk they cost (``annify.calibrate``).

    On a CPU, time follows the FLOPs skipped far more closely with freed memory kept
    (``annify.keep_freed_memory()``, once per process; annify's commands do it) and the network and
    batch in channels-last format: resann50 at batch 64 then gets 0.87 of its 4.5× FLOP cut as
    wall-clock speed-up, against 0.56 with neither (BENCHMARKS.md §15b). Run it on ``annify.freeze(net)``
    (the same outputs bit for bit) where the last segments see a few samples each: their module calls'
    fixed cost goes, and the CIFAR ResANN's 5.1× cut at batch 64 gives 0.751-0.77 of it in 8 of 10 runs
    (median 0.757; 0.743-0.75 in the other two) instead of 0.722-0.741.
    With many batches to classify, ``early_exit_stream`` also pools the last undecided samples of
    several batches.

    Returns:
        (logits at each sample's exit, N×classes; exit output index, N; per-sample FLOPs, N).
    """
    ex = _Exits(net, thresholds, temperatures, pool=x.shape[0])
    ex.add(x)
    ex.run(flush=True)
    return ex.result(0)


def early_exit_stream(
    net: AnytimeNet,
    batches: Iterable[torch.Tensor],
    thresholds: Sequence[float] | str | os.PathLike,
    temperatures: Sequence[float] | None = None,
    pool: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``early_exit`` over many batches, pooling the samples still undecided across them.

    A segment runs once ``pool`` samples wait for it (default: the first batch's size), so the few
    samples of each batch that go deep are classified together with those of later batches instead
    of running the last segments at a batch of one or two. Each sample's exit, logits and FLOPs are
    those ``early_exit`` gives it (up to float rounding between batch sizes); what changes is the
    wall clock (cifar_resnet_n7_c16 at a 4.6× FLOP cut, BENCHMARKS.md §15c) and the latency: a
    sample may wait for later batches, so this is for throughput (a test set, a queue of jobs), not
    for answering one batch as soon as possible. Batches of a different sample shape are not pooled
    with earlier ones.

    Yields, for each batch in order once all its samples have exited, what ``early_exit`` returns.
    """
    ex: _Exits | None = None
    ready = 0  # the next batch to hand out
    for x in batches:
        if ex is None:
            ex = _Exits(net, thresholds, temperatures, pool=pool or x.shape[0])
        ex.add(x)
        ex.run(flush=False)
        while ready < len(ex.open) and ex.finished(ready):
            yield ex.result(ready)
            ready += 1
    if ex is None:
        return
    ex.run(flush=True)
    while ready < len(ex.open):
        yield ex.result(ready)
        ready += 1


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
    ``fit_thresholds``) are fit on ``val_loader`` (never on test), then ``early_exit_stream`` runs
    on ``test_loader`` (the undecided samples of several batches pooled). ``wall_s`` is the time it
    took on test, data loading excluded.

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
        correct, total, spent = 0, 0, 0.0
        labels, loading = [], [0.0]

        def images(labels=labels, loading=loading):
            it = iter(test_loader)
            while True:
                start = time.perf_counter()
                item = next(it, None)
                loading[0] += time.perf_counter() - start
                if item is None:
                    return
                labels.append(torch.as_tensor(item[1]))
                yield item[0]

        start = time.perf_counter()
        for b, (logits, _, per_sample) in enumerate(early_exit_stream(net, images(), thresholds, temps)):
            correct += int((logits.argmax(dim=-1) == labels[b]).sum())
            total += len(per_sample)
            spent += float(per_sample.sum())
        wall = time.perf_counter() - start - loading[0]
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
