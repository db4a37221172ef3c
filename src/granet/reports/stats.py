"""Statistics and figures shared by ``granet report``, the plasticity study and the benchmarks.

One definition of "mean ± std over seeds" (sample standard deviation, 0 for a single value) and one
way to make a figure (matplotlib's Agg renderer on a ``Figure`` object: no pyplot, no display, no
change of the global backend), so every table and plot of the project agrees.

Paired comparisons (``benchmarks/compare_methods.py``): two methods run with the same seeds (same
initialisation and data order) give one difference per seed; :func:`paired_interval` is the
Student-t confidence interval of the mean difference and :func:`verdict` reads it as "holds"
(the whole interval above 0), "reversed" (below 0) or "not separable" (it contains 0). The t
quantile is computed here, exactly, from the closed form of Student's t distribution for an integer
number of degrees of freedom, so no statistics package is needed.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ..errors import install_hint

#: What a table shows where a value is missing.
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
    """A matplotlib ``Figure`` drawn by the Agg renderer (needs the ``[plots]`` extra, see
    :func:`~granet.errors.install_hint`)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(f"plots need matplotlib: {install_hint('plots', 'matplotlib')}") from None
    # Constrained layout keeps titles, the suptitle and outside legends from overlapping.
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


#: The caption of figures drawn with :func:`side_by_side`.
SIDE_BY_SIDE_NOTE = "methods at the same x are drawn side by side, a few points apart, so equal values stay visible"


def side_by_side_offsets(count: int, step: float = 5.0, width: float = 30.0) -> list[float]:
    """Horizontal offsets in points of ``count`` series drawn at the same x positions, centred on 0.

    ``step`` points apart, closer when ``count`` series would span more than ``width`` points.
    """
    if count < 1:
        return []
    gap = step if count == 1 else min(step, width / (count - 1))
    return [(i - (count - 1) / 2) * gap for i in range(count)]


def side_by_side(ax: Any, index: int, count: int) -> Any:
    """The data transform of ``ax`` shifted sideways for series ``index`` of ``count``
    (:func:`side_by_side_offsets`): pass it as ``transform=`` to ``errorbar`` / ``plot``.

    Series that share x positions (methods at the same densities) would hide each other where their
    values agree; shifted by a few points on the screen each stays visible, while the plotted data
    keep their exact values (``line.get_xdata()``). Say so in the caption (:data:`SIDE_BY_SIDE_NOTE`).
    """
    from matplotlib.transforms import offset_copy

    return offset_copy(ax.transData, fig=ax.figure, x=side_by_side_offsets(count)[index], y=0.0, units="points")


def errorbar_side_by_side(ax: Any, index: int, count: int, x: Sequence[float], y: Sequence[float],
                          yerr: Sequence[float], **style: Any) -> Any:
    """``ax.errorbar(x, y, yerr, **style)`` drawn as series ``index`` of ``count`` (:func:`side_by_side`).

    matplotlib leaves lines drawn through another transform out of its autoscaling, so the points
    and their error bars are added to the axes' data limits here.
    """
    container = ax.errorbar(x, y, yerr=yerr, transform=side_by_side(ax, index, count), **style)
    ax.update_datalim([(xi, yi + sign * ei) for xi, yi, ei in zip(x, y, yerr) for sign in (-1, 1)])
    ax.autoscale_view()
    return container


def t_two_sided_probability(t: float, df: int) -> float:
    """``P(|T| <= t)`` for Student's t with ``df`` (integer >= 1) degrees of freedom, ``t >= 0``.

    The finite trigonometric sums of Abramowitz & Stegun 26.7.3 / 26.7.4, with
    ``theta = atan(t / sqrt(df))``: for odd ``df``,
    ``(2 / pi) * (theta + sin(theta) * (cos(theta) + 2/3 cos^3(theta) + ... + (2*4*...*(df-3)) /
    (1*3*...*(df-2)) cos^(df-2)(theta)))`` (just ``2 theta / pi`` for ``df = 1``); for even ``df``,
    ``sin(theta) * (1 + 1/2 cos^2(theta) + (1*3)/(2*4) cos^4(theta) + ... + (1*3*...*(df-3)) /
    (2*4*...*(df-2)) cos^(df-2)(theta))``.

    Raises:
        ValueError: ``df`` is not a positive integer or ``t`` is negative or not finite.
    """
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df!r}")
    if not (t >= 0 and math.isfinite(t)):
        raise ValueError(f"t must be a finite number >= 0, got {t!r}")
    theta = math.atan(t / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2 == 1:
        total, term = 0.0, math.cos(theta)  # cos(theta), then each term x (k-1)/k cos^2(theta), k = 3, 5, ...
        for k in range(3, df + 1, 2):
            total += term
            term *= (k - 1) / k * cos2
        return (2 / math.pi) * (theta + math.sin(theta) * total) if df > 1 else 2 * theta / math.pi
    total, term = 0.0, 1.0  # 1, then each term x (k-1)/k cos^2(theta), k = 2, 4, ...
    for k in range(2, df + 1, 2):
        total += term
        term *= (k - 1) / k * cos2
    return math.sin(theta) * total


def t_quantile(df: int, confidence: float = 0.95) -> float:
    """The two-sided Student-t critical value: the ``t`` with ``P(|T| <= t) = confidence``.

    Found by bisection on :func:`t_two_sided_probability` to the float's resolution (e.g. 2.7764 for
    ``df = 4``, 12.7062 for ``df = 1``).

    Raises:
        ValueError: ``confidence`` is not strictly between 0 and 1, or ``df`` is not a positive integer.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence!r}")
    t_two_sided_probability(0.0, df)  # validates df
    low, high = 0.0, 1.0
    while t_two_sided_probability(high, df) < confidence:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if mid in (low, high):
            break
        if t_two_sided_probability(mid, df) < confidence:
            low = mid
        else:
            high = mid
    return high


HOLDS, REVERSED, NOT_SEPARABLE = "holds", "reversed", "not separable"


def verdict(low: float, high: float) -> str:
    """``"holds"`` if the interval is above 0, ``"reversed"`` if below 0, else ``"not separable"``."""
    if low > 0:
        return HOLDS
    if high < 0:
        return REVERSED
    return NOT_SEPARABLE


@dataclass(frozen=True)
class PairedInterval:
    """Mean of paired differences ``a_i - b_i`` with its two-sided Student-t confidence interval.

    Attributes:
        n: number of pairs; ``mean`` / ``std``: mean and sample standard deviation of the differences;
        low / high: ``mean -/+ t_quantile(n - 1, confidence) * std / sqrt(n)``; confidence: the level.
    """

    n: int
    mean: float
    std: float
    low: float
    high: float
    confidence: float

    @property
    def verdict(self) -> str:
        """:func:`verdict` of the interval."""
        return verdict(self.low, self.high)


def paired_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedInterval:
    """The confidence interval of the mean of ``a[i] - b[i]`` (pairs: same seed of two methods).

    Raises:
        ValueError: the sequences differ in length, hold fewer than 2 pairs, or a value is not finite.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_interval needs pairs: got {len(a)} and {len(b)} values")
    if len(a) < 2:
        raise ValueError(f"paired_interval needs at least 2 pairs, got {len(a)}")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    if not all(math.isfinite(d) for d in diffs):
        raise ValueError(f"paired_interval: values must be finite, got differences {diffs}")
    mean, std = mean_std(diffs)
    half = t_quantile(len(diffs) - 1, confidence) * std / math.sqrt(len(diffs))
    return PairedInterval(len(diffs), mean, std, mean - half, mean + half, confidence)


__all__ = ["mean_std", "format_mean_std", "figure", "MISSING", "t_two_sided_probability", "t_quantile",
           "verdict", "PairedInterval", "paired_interval", "HOLDS", "REVERSED", "NOT_SEPARABLE", "side_by_side",
           "side_by_side_offsets", "errorbar_side_by_side", "SIDE_BY_SIDE_NOTE"]
