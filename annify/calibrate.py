"""Early-exit thresholds with a statistical guarantee: Learn-then-Test and conformal risk control.

A sample exits at the first output whose max softmax reaches the threshold λ (the last output takes
everyone left). The risk of λ is the mean of a per-sample loss in [0, 1]:

- ``consistency``: 1 if the exit's class differs from the last output's (needs no labels);
- ``accuracy-gap``: 1 if the exit is wrong where the last output is right (bounds the accuracy lost
  against the full network; Jazbec et al., "Fast yet Safe", NeurIPS 2024).

λ runs over a fixed grid (``default_grid``), ordered from most to least conservative (from 1 down),
fixed before any data is seen. Two methods choose it on calibration data (a run's validation split,
never test):

- ``ltt``, Learn-then-Test (Angelopoulos et al. 2021, arXiv 2110.01052): every λ of the grid is a
  null hypothesis "risk > ε" with a Hoeffding–Bentkus p-value; fixed-sequence testing rejects them in
  grid order while p ≤ δ and stops at the first failure. The most aggressive λ rejected has risk ≤ ε
  with probability ≥ 1 − δ over the draw of the calibration set. Needs no monotonicity.
- ``crc``, conformal risk control (Angelopoulos et al. 2022, arXiv 2208.02814): the smallest λ with
  n/(n+1)·R̂(λ) + 1/(n+1) ≤ ε has E[risk] ≤ ε. It needs a loss monotone in λ, and exiting earlier can
  turn a wrong exit right, so each sample's loss is made monotone first (at λ, the largest loss it
  has at any λ' ≥ λ of the grid): an upper bound of the real loss, so the guarantee carries over.

One threshold for every output (not one per output) keeps the grid one-dimensional, which is what
fixed-sequence testing needs; no temperatures are fitted, since fitting them on the same calibration
set would make the grid depend on it. With no valid λ, the thresholds are those of the full network.
The binomial CDF comes from ``scipy.stats.binom``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from annify.errors import InferenceError
from annify.run_dir import RunDir

__all__ = [
    "METHODS",
    "RISKS",
    "Calibration",
    "calibrate",
    "calibrate_run",
    "default_grid",
    "fixed_sequence",
    "hoeffding_bentkus_p_value",
    "loss_matrix",
    "read_thresholds",
    "select",
]

RISKS = ("consistency", "accuracy-gap")
METHODS = ("ltt", "crc")


def default_grid() -> np.ndarray:
    """Confidence thresholds from 1 down to 0: finely spaced near 1 (1 − 10⁻⁶ … 0.99, where trained
    networks put most of their confidence), then in steps of 0.01."""
    fine = 1 - np.logspace(-6, -2, 13)
    return np.unique(np.concatenate([[1.0], fine, np.linspace(0.0, 0.99, 100)]))[::-1].copy()


def hoeffding_bentkus_p_value(risk: float | np.ndarray, n: int, epsilon: float) -> np.ndarray:
    """The Hoeffding–Bentkus p-value of the null "true risk > ε" given a mean loss ``risk`` over n samples.

    p = min(exp(−n·h1(min(R̂, ε), ε)), e·BinomCDF(⌈n·R̂⌉; n, ε)) with
    h1(a, b) = a·ln(a/b) + (1−a)·ln((1−a)/(1−b)) (0·ln 0 = 0), valid for any loss in [0, 1]
    (Bates et al. 2021; Angelopoulos et al. 2021, Proposition 3).
    """
    from scipy.special import xlogy
    from scipy.stats import binom

    r = np.asarray(risk, dtype=np.float64)
    a = np.minimum(r, epsilon)
    h1 = xlogy(a, a / epsilon) + xlogy(1 - a, (1 - a) / (1 - epsilon))
    hoeffding = np.exp(-n * h1)
    bentkus = math.e * binom.cdf(np.ceil(n * r - 1e-9), n, epsilon)  # n·R̂ is an integer up to rounding
    return np.minimum(hoeffding, bentkus)


def fixed_sequence(p_values: Sequence[float] | np.ndarray, delta: float) -> int:
    """How many hypotheses fixed-sequence testing rejects: those before the first p-value above δ."""
    above = np.flatnonzero(np.asarray(p_values) > delta)
    return int(above[0]) if len(above) else len(p_values)


def loss_matrix(
    logits_per_output: Sequence[torch.Tensor],
    labels: torch.Tensor | None = None,
    risk: str = "consistency",
    grid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's loss at each threshold of the grid, and where it exits there.

    Returns:
        (losses, G×N in {0, 1}; exits, G×N output indices), G the grid's length, N the samples.
    """
    if risk not in RISKS:
        raise InferenceError(f"unknown risk '{risk}'; choose one of {', '.join(RISKS)}")
    if risk == "accuracy-gap" and labels is None:
        raise InferenceError("the accuracy-gap risk needs labels; use --risk consistency, which needs none")
    grid = default_grid() if grid is None else np.asarray(grid, dtype=np.float64)
    probs = [torch.softmax(z.detach().double(), dim=-1) for z in logits_per_output]
    conf = torch.stack([p.max(dim=-1).values for p in probs]).numpy()  # K×N
    preds = torch.stack([p.argmax(dim=-1) for p in probs]).numpy()  # K×N
    passed = conf[None] >= grid[:, None, None]  # G×K×N
    passed[:, -1] = True
    exits = passed.argmax(axis=1)  # the first output reaching the threshold
    if risk == "consistency":
        per_exit = preds != preds[-1]  # K×N
    else:
        y = labels.reshape(1, -1).cpu().numpy()
        per_exit = (preds != y) & (preds[-1] == y)
    losses = np.take_along_axis(per_exit, exits, axis=0).astype(np.float64)  # G×N
    return losses, exits


def select(losses: np.ndarray, method: str, epsilon: float, delta: float) -> tuple[int | None, float]:
    """The grid index a method chooses from calibration losses (G×N, grid order), and its bound.

    ``ltt``: the last hypothesis fixed-sequence testing rejects; the bound is its p-value (≤ δ).
    ``crc``: the last index whose corrected risk of the monotone loss is ≤ ε; the bound is that risk.
    None when nothing is valid (the bound is then the first threshold's statistic).
    """
    n = losses.shape[1]
    if method == "ltt":
        stats = hoeffding_bentkus_p_value(losses.mean(axis=1), n, epsilon)
        rejected = fixed_sequence(stats, delta)
    elif method == "crc":
        monotone = np.maximum.accumulate(losses, axis=0)  # at λ_g: the largest loss at λ_0..λ_g
        stats = (n * monotone.mean(axis=1) + 1.0) / (n + 1)  # the loss is bounded by B = 1
        rejected = fixed_sequence(stats, epsilon)  # stats only grow along the grid: a prefix is valid
    else:
        raise InferenceError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    if rejected == 0:
        return None, float(stats[0])
    return rejected - 1, float(stats[rejected - 1])


@dataclass
class Calibration:
    """What ``calibrate`` chose, as ``thresholds.json`` holds it.

    ``thresholds`` are per output what ``annify.early_exit`` takes (``math.inf``: nobody exits there;
    the last is 0). ``threshold`` is λ, None when nothing was valid (the full network). ``bound`` is
    the statistic that made λ valid: the p-value (≤ δ) for ``ltt``, the corrected risk (≤ ε) for ``crc``.
    """

    method: str
    risk: str
    epsilon: float
    delta: float | None  # None for crc, whose guarantee is on the expected risk
    n: int  # calibration samples
    threshold: float | None
    thresholds: list[float]
    bound: float
    val_risk: float  # the mean loss at λ on calibration
    expected_flops: float  # per sample, on calibration
    full_flops: float  # the full network's, per sample (heads before the last not run)
    test: dict | None = None  # the achieved risk, cost and accuracy on test: a report, never used to choose
    weights_sha256: str | None = None  # the weights calibrated; read_thresholds refuses others
    guarantee: str = field(default="")

    @property
    def valid(self) -> bool:
        return self.threshold is not None

    def to_json(self) -> str:
        d = asdict(self)
        d["thresholds"] = [None if math.isinf(t) else t for t in self.thresholds]  # JSON has no inf
        return json.dumps(d, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        d = json.loads(text)
        d["thresholds"] = [math.inf if t is None else float(t) for t in d["thresholds"]]
        return cls(**d)


def calibrate(
    logits_per_output: Sequence[torch.Tensor],
    flops_per_output: Sequence[float],
    labels: torch.Tensor | None = None,
    risk: str = "consistency",
    method: str = "ltt",
    epsilon: float = 0.05,
    delta: float = 0.1,
    full_flops: float | None = None,
    grid: np.ndarray | None = None,
) -> Calibration:
    """Choose the exit threshold on calibration logits (K outputs of N×classes) with a guarantee.

    Args:
        flops_per_output: each output's cumulative FLOPs when every head runs (``exit_flops(net)``).
        labels: needed by ``accuracy-gap`` only.
        full_flops: the full network's cost without the earlier heads (default: the last output's).
    """
    if not 0 < epsilon < 1:
        raise InferenceError(f"--epsilon must be between 0 and 1, got {epsilon}")
    if method == "ltt" and not 0 < delta < 1:
        raise InferenceError(f"--delta must be between 0 and 1, got {delta}")
    grid = default_grid() if grid is None else np.asarray(grid, dtype=np.float64)
    losses, exits = loss_matrix(logits_per_output, labels, risk, grid)
    k_out, n = len(logits_per_output), losses.shape[1]
    if len(flops_per_output) != k_out:
        raise ValueError(f"{k_out} outputs of logits but {len(flops_per_output)} FLOP counts")
    full = float(flops_per_output[-1] if full_flops is None else full_flops)
    index, bound = select(losses, method, epsilon, delta)
    level = f"with probability ≥ {1 - delta:g}" if method == "ltt" else "in expectation"
    if index is None:
        return Calibration(
            method, risk, epsilon, delta if method == "ltt" else None, n, None,
            [math.inf] * (k_out - 1) + [0.0], bound, 0.0, full, full,
            guarantee=f"no threshold has {risk} risk ≤ {epsilon:g} {level}: the full network",
        )  # fmt: skip
    lam = float(grid[index])
    flops = np.asarray(flops_per_output, dtype=np.float64)
    return Calibration(
        method, risk, epsilon, delta if method == "ltt" else None, n, lam,
        [lam] * (k_out - 1) + [0.0], bound, float(losses[index].mean()), float(flops[exits[index]].mean()), full,
        guarantee=f"{risk} risk ≤ {epsilon:g} {level}",
    )  # fmt: skip


def evaluate_thresholds(
    logits_per_output: Sequence[torch.Tensor],
    labels: torch.Tensor | None,
    calibration: Calibration,
    flops_per_output: Sequence[float],
) -> dict:
    """The risk, mean FLOPs and accuracy (with labels) of a calibration's thresholds on other data."""
    lam = math.inf if calibration.threshold is None else calibration.threshold
    grid = np.array([lam])
    losses, exits = loss_matrix(logits_per_output, labels, calibration.risk, grid)
    flops = np.asarray(flops_per_output, dtype=np.float64)
    report = {
        "n": int(losses.shape[1]),
        "risk": float(losses[0].mean()),
        "avg_flops": calibration.full_flops
        if calibration.threshold is None
        else float(flops[exits[0]].mean()),
    }
    if labels is not None:
        preds = torch.stack([z.argmax(dim=-1) for z in logits_per_output]).numpy()
        y = labels.cpu().numpy()
        report["accuracy"] = float((preds[exits[0], np.arange(len(y))] == y).mean())
        report["full_accuracy"] = float((preds[-1] == y).mean())
    return report


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def calibrate_run(
    run: str | os.PathLike,
    risk: str = "consistency",
    method: str = "ltt",
    epsilon: float = 0.05,
    delta: float = 0.1,
    batch_size: int = 256,
) -> tuple[Calibration, Path]:
    """Calibrate a run folder's network on its validation split, report on test, write ``thresholds.json``.

    The data is the run's own (``train.data`` in its ``config.yaml``), split as training split it;
    the weights are its last checkpoint. Returns the calibration and the file written.
    """
    from annify._files import atomic_write
    from annify.convert import build, load_weights
    from annify.cost import exit_flops
    from annify.data import build_datasets, make_batches
    from annify.early_exit import _collect, _inference
    from annify.run_dir import find_run, weights_file
    from annify.spec import load_spec

    folder = find_run(run)
    if folder is None or Path(run).resolve() != folder:
        raise InferenceError(
            f"{run} is not a run folder (config.yaml and checkpoints/); pass what `annify train --out` wrote"
        )
    spec = load_spec(RunDir(folder).config)
    weights = weights_file(folder)
    net = build(spec)
    load_weights(net, weights)
    datasets = build_datasets(spec.train.get("data") or "digits", input_size=spec.input_size, augment=False)
    loaders = make_batches({s: datasets[s] for s in ("val", "test")}, batch_size)
    with _inference(net):
        val_logits, val_labels = _collect(net, loaders["val"])
        test_logits, test_labels = _collect(net, loaders["test"])
    flops = exit_flops(net)
    full = exit_flops(net, [False] * (net.num_outputs - 1) + [True])[-1]
    labels = val_labels if risk == "accuracy-gap" else None  # consistency is calibrated without labels
    cal = calibrate(val_logits, flops, labels, risk, method, epsilon, delta, full_flops=full)
    cal.test = evaluate_thresholds(test_logits, test_labels, cal, flops)
    cal.weights_sha256 = _sha256(weights)
    path = RunDir(folder).thresholds
    atomic_write(path, cal.to_json())
    return cal, path


def read_thresholds(path: str | os.PathLike, weights: str | os.PathLike | None = None) -> Calibration:
    """A ``thresholds.json`` (or the one in a run folder); with ``weights``, checked to be theirs."""
    p = Path(path)
    if p.is_dir():
        p = RunDir(p).thresholds
    if not p.is_file():
        raise InferenceError(f"{p} does not exist; run `annify calibrate RUN` first")
    try:
        cal = Calibration.from_json(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        raise InferenceError(
            f"{p} is not a thresholds file written by `annify calibrate`; run it again"
        ) from None
    if weights is not None and cal.weights_sha256 not in (None, _sha256(Path(weights))):
        raise InferenceError(
            f"{p} was calibrated for other weights than {weights}; run `annify calibrate` on this run again"
        )
    return cal
