"""Layer-wise density distributions: how a global density budget is split between layers.

Every distribution here returns exact integer non-zero counts per layer that add up to
``round(density * total)``; nothing is sampled (the reference code's Bernoulli masks only hit the
budget in expectation).

* ``uniform``: every layer gets the same density.
* ``er`` (Erdős–Rényi, SET): density of a layer with weight shape ``(c_out, c_in, ...)`` is
  proportional to ``(c_out + c_in) / (c_out * c_in)``.
* ``erk`` (Erdős–Rényi-Kernel, RigL): density proportional to ``sum(shape) / prod(shape)``,
  kernel dimensions included, optionally raised to ``power_scale``.
* ``global``: no per-layer quota; the mask is chosen by one score over all layers jointly
  (see :mod:`granet.sparsity.sparsifier`), so this module only validates the name for it.

Distributions are registered :class:`Distribution` objects chosen by name
(``SparsityConfig(distribution="erk")``); :func:`register_distribution` adds one.

For ER/ERK a layer whose proportional share would exceed its size is made dense and the scale is
solved again for the remaining layers (RigL's dense-capacity handling); :func:`allocate_counts`
does that, and is reused for SNFS's momentum redistribution of regrowth.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from ..registry import Registry

RawDensity = Callable[[Sequence[int], float], float]


@dataclass(frozen=True)
class Distribution:
    """A named rule splitting a density budget between layers.

    Attributes:
        name: the name used in :class:`~granet.sparsity.config.SparsityConfig` (``distribution=...``).
        raw_density: ``raw_density(shape, power_scale)``, the unnormalised density of a layer with
            weight ``shape``; layer counts are proportional to ``raw_density * size`` (capped at
            the layer size). ``None`` means no per-layer quota: the mask is chosen by one score
            over all layers jointly (``global``).
    """

    name: str
    raw_density: Optional[RawDensity]

    @property
    def per_layer(self) -> bool:
        """Whether the distribution gives per-layer counts (every built-in one but ``global``)."""
        return self.raw_density is not None


_DISTRIBUTIONS: Registry[Distribution] = Registry("distribution")


def register_distribution(distribution: Distribution) -> Distribution:
    """Make ``distribution`` selectable by name; names are unique."""
    if not isinstance(distribution, Distribution):
        raise TypeError(f"register a Distribution, not {type(distribution).__name__}")
    return _DISTRIBUTIONS.register(distribution.name, distribution)


def list_distributions() -> tuple[str, ...]:
    """Names of the registered distributions, sorted."""
    return _DISTRIBUTIONS.names()


def get_distribution(name: str) -> Distribution:
    """The registered distribution ``name``; ``ValueError`` naming the valid ones otherwise."""
    return _DISTRIBUTIONS.get(name)


def allocate_counts(total: int, weights: Sequence[float], capacities: Sequence[int]) -> list[int]:
    """Split ``total`` items between bins proportionally to ``weights``, never above ``capacities``.

    Solves ``c_l = min(cap_l, eps * w_l)`` for the scale ``eps`` such that ``sum(c_l) == total``:
    bins whose share would exceed their capacity are filled and the scale is solved again for the
    rest. Fractional shares are then rounded by the largest-remainder rule so the sum is exact.

    Args:
        total: number of items to allocate, ``0 <= total <= sum(capacities)``.
        weights: non-negative proportionality weight of each bin.
        capacities: maximum number of items of each bin.

    Returns:
        Integer counts, one per bin, summing exactly to ``total``.

    Raises:
        ValueError: if ``total`` is negative or exceeds the total capacity, or weights are negative.
    """
    if len(weights) != len(capacities):
        raise ValueError("weights and capacities must have the same length")
    caps = [int(c) for c in capacities]
    if total < 0 or total > sum(caps):
        raise ValueError(f"cannot allocate {total} items into bins of total capacity {sum(caps)}")
    if any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError("allocation weights must be finite and non-negative")
    if total == 0:
        return [0] * len(caps)
    # Bins that can take nothing, or carry no weight, take no share of the scale.
    full: set[int] = {i for i, c in enumerate(caps) if c == 0}
    free = [i for i in range(len(caps)) if i not in full]
    ideal = [0.0] * len(caps)
    while True:
        remaining = total - sum(caps[i] for i in full)
        weight = sum(weights[i] for i in free)
        if weight <= 0:
            # No weight left: spread the rest proportionally to the remaining capacity.
            shares = {i: float(caps[i]) for i in free}
            weight = sum(shares.values())
        else:
            shares = {i: float(weights[i]) for i in free}
        eps = remaining / weight if weight > 0 else 0.0
        overflow = [i for i in free if eps * shares[i] > caps[i]]
        if not overflow:
            for i in free:
                ideal[i] = eps * shares[i]
            for i in full:
                ideal[i] = float(caps[i])
            break
        full.update(overflow)
        free = [i for i in free if i not in full]
    counts = [min(caps[i], int(math.floor(ideal[i]))) for i in range(len(caps))]
    deficit = total - sum(counts)
    # Largest remainders first; ties go to the bin with more weight, then the lower index.
    order = sorted(
        (i for i in range(len(caps)) if counts[i] < caps[i]),
        key=lambda i: (-(ideal[i] - counts[i]), -weights[i], i),
    )
    while deficit > 0:
        progressed = False
        for i in order:
            if deficit == 0:
                break
            if counts[i] < caps[i]:
                counts[i] += 1
                deficit -= 1
                progressed = True
        if not progressed:  # unreachable when total <= sum(caps); kept as a guard
            raise RuntimeError("allocation failed to place every item")
    while deficit < 0:  # floating point put a few too many on full bins; take them back
        i = max(range(len(caps)), key=lambda j: counts[j] - ideal[j])
        counts[i] -= 1
        deficit += 1
    return counts


def _uniform(shape: Sequence[int], power_scale: float) -> float:
    """Every layer at the same density."""
    return 1.0


def _er(shape: Sequence[int], power_scale: float) -> float:
    """Erdős–Rényi: ``(c_out + c_in) / (c_out * c_in)`` from the first two dimensions."""
    dims = shape[:2] if len(shape) >= 2 else shape
    return (sum(dims) / math.prod(dims)) ** power_scale


def _erk(shape: Sequence[int], power_scale: float) -> float:
    """Erdős–Rényi-Kernel: ``sum(shape) / prod(shape)``, kernel dimensions included."""
    return (sum(shape) / math.prod(shape)) ** power_scale


def layer_counts(
    kind: str, shapes: Sequence[Sequence[int]], density: float, power_scale: float = 1.0
) -> list[int]:
    """Exact non-zero counts per layer for a distribution at overall ``density``.

    Args:
        kind: a registered per-layer distribution (``"uniform"``, ``"er"``, ``"erk"``, ...).
        shapes: weight shapes of the sparsified layers.
        density: fraction of the sparsified weights kept, in (0, 1].
        power_scale: exponent applied to the ER/ERK raw densities (RigL's ``erk_power_scale``);
            0 gives the uniform distribution.

    Returns:
        Counts ``c_l <= prod(shape_l)`` with ``sum(c_l) == round(density * total)``.
    """
    rule = get_distribution(kind)
    if rule.raw_density is None:
        per_layer = [n for n, d in _DISTRIBUTIONS.items() if d.per_layer]
        raise ValueError(f"distribution {kind!r} has no per-layer counts; per-layer ones: {', '.join(per_layer)}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    sizes = [math.prod(s) for s in shapes]
    total = round(density * sum(sizes))
    # Layer l's density is eps * raw_l, so its share of the count is eps * raw_l * size_l.
    weights = [rule.raw_density(s, power_scale) * n for s, n in zip(shapes, sizes)]
    return allocate_counts(total, weights, sizes)


register_distribution(Distribution("uniform", _uniform))
register_distribution(Distribution("er", _er))
register_distribution(Distribution("erk", _erk))
register_distribution(Distribution("global", None))
