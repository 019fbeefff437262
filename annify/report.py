"""How annify shows numbers: FLOP counts and tables as text, figures drawn off-screen and written atomically.

One owner for all three, so the library, the CLI and the benchmarks print and plot the same way.
Figures use matplotlib's ``Figure`` with the Agg canvas directly: pyplot's global backend is never
switched, so importing annify in a notebook leaves its plotting alone.
"""

from __future__ import annotations

import io
import os
from collections.abc import Collection, Sequence

__all__ = ["figure", "format_flops", "format_rows", "format_sci", "save_figure"]


def format_flops(f: float) -> str:
    """Human-readable FLOPs: 4.11G, 310.4K."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(f) >= scale:
            return f"{f / scale:.3g}{unit}" if f / scale < 100 else f"{f / scale:.1f}{unit}"
    return f"{f:.0f}"


def format_sci(value: float) -> str:
    """Short scientific notation for messages: 2.0e9, 8.1e4."""
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def format_rows(rows: Sequence[Sequence[object]], left: Collection[int] = (1,)) -> str:
    """Rows of cells (the first row is the header) as aligned text, one line per row.

    Every column is as wide as its widest cell; columns in ``left`` (0-based) are left-aligned, the
    others (numbers) right-aligned; trailing blanks are dropped. Every table annify prints goes here.
    """
    cells = [[str(v) for v in row] for row in rows]
    if len({len(row) for row in cells}) > 1:
        raise ValueError("every row of a table needs the same number of cells")
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))] if cells else []
    return "\n".join(
        "  ".join(
            v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))
        ).rstrip()
        for row in cells
    )


def figure(figsize: tuple[float, float] = (6, 4), title: str | None = None, grid: bool = True):
    """(figure, axes) on an Agg canvas, not registered with pyplot; ``save_figure`` writes it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if title:
        ax.set_title(title)
    if grid:
        ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write ``fig`` as a PNG through a temporary file and a rename: a reader never sees half a plot."""
    from annify._files import atomic_write

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write(path, buf.getvalue())
