"""Timing helpers shared by the benchmarks: interleaved A/B ratios and a description of the machine.

Why interleaved ratios: this machine is shared (other jobs run tests at the same time), so absolute
times drift by tens of percent within a minute. Running A and B alternately, one pair per repeat,
and taking the ratio within each pair cancels most of that drift; the median of the per-pair ratios
is the headline and its spread (interquartile range, and min-max) says how much to trust it.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


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
    if mode == "keep":
        from annify.cpu import keep_freed_memory

        if not keep_freed_memory():
            return "cpu memory release (keep is glibc-only)"
    return f"cpu memory {mode}"


def _quantile(xs: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty list."""
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class Paired:
    """Result of ``paired_ratio``: per-pair times (seconds) of A and B and their ratios A/B."""

    a: list[float]
    b: list[float]

    @property
    def ratios(self) -> list[float]:
        return [x / y for x, y in zip(self.a, self.b, strict=True)]

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    @property
    def iqr(self) -> tuple[float, float]:
        r = self.ratios
        return _quantile(r, 0.25), _quantile(r, 0.75)

    @property
    def range(self) -> tuple[float, float]:
        return min(self.ratios), max(self.ratios)

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
        q1, q3 = self.iqr
        lo, hi = self.range
        return f"IQR {q1:.3f}–{q3:.3f}, min–max {lo:.3f}–{hi:.3f}"

    def as_dict(self) -> dict:
        return {
            "median_ratio": self.median,
            "iqr": list(self.iqr),
            "min_max": list(self.range),
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


def table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
