"""Statistics and figures shared by ``granet report``, the plasticity study and the benchmarks.

One definition of "mean ± std over seeds" (sample standard deviation, 0 for a single value) and one
way to make a figure (matplotlib's Agg renderer on a ``Figure`` object: no pyplot, no display, no
change of the global backend), so every table and plot of the project agrees.
"""
from __future__ import annotations

import statistics
from typing import Any, Optional, Sequence

MISSING = "—"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value).

    Raises:
        ValueError: ``values`` is empty.
    """
    if not values:
        raise ValueError("mean_std of no values")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_mean_std(values: Sequence[Optional[float]], digits: int) -> str:
    """``mean ± std`` of the non-null values; just the value for one; :data:`MISSING` for none."""
    present = [v for v in values if v is not None]
    if not present:
        return MISSING
    mean, std = mean_std(present)
    return f"{mean:.{digits}f}" if len(present) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def figure(width: float, height: float, constrained: bool = True) -> Any:
    """A matplotlib ``Figure`` drawn by the Agg renderer (needs ``pip install granet[plots]``)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'granet[plots]'") from None
    # Constrained layout keeps titles, the suptitle and outside legends from overlapping.
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


__all__ = ["mean_std", "format_mean_std", "figure", "MISSING"]
