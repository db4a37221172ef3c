"""Schedules: pure functions of the optimizer step.

Nothing here knows about epochs, data loaders or world size: the same configuration updates the
topology at the same optimizer steps on 1 or N processes and at any batch size.

* :class:`PruningSchedule` — Zhu & Gupta's cubic density schedule. Between ``start`` (t0) and
  ``end`` (tf) the target density is::

      d(t) = d_f + (d_i - d_f) * (1 - (t - t0) / (tf - t0)) ** 3

  and pruning happens at every multiple of ``interval`` in (t0, tf] plus at tf itself, so the final
  density is reached exactly at tf (the reference code skips that last step).
* :class:`DropFractionSchedule` — the fraction r(t) of active weights dropped (and regrown) per
  update, decayed from ``initial`` to ``final`` over [start, end] by a registered decay
  (``cosine``, ``constant``; :func:`register_drop_decay` adds one, chosen by name in the config).
  Updates happen at the multiples of ΔT in [first, end), where ``first`` (default ``start``) may be
  later than the decay's start: GraNet's r_t decays over the whole run [0, T] while its updates
  begin at t0 (the authors' code updates only at steps >= t0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from ..registry import Registry

DropDecay = Callable[[float, float, float], float]
_DROP_DECAYS: Registry[DropDecay] = Registry("drop decay")


def register_drop_decay(name: str, decay: DropDecay) -> None:
    """Register ``decay(progress, initial, final) -> r`` under ``name`` (``drop_decay=name``).

    ``progress`` runs from 0 at ``regrow_start`` to 1 at ``regrow_end`` (clamped); the function must
    return a fraction in [0, 1].
    """
    if not callable(decay):
        raise TypeError(f"a drop decay must be callable, got {type(decay).__name__}")
    _DROP_DECAYS.register(name, decay)


def list_drop_decays() -> tuple[str, ...]:
    """Names of the registered drop-fraction decays, sorted."""
    return _DROP_DECAYS.names()


def _cosine(progress: float, initial: float, final: float) -> float:
    """RigL / GraNet: ``final + (initial - final) * (1 + cos(pi * progress)) / 2``."""
    return final + 0.5 * (initial - final) * (1.0 + math.cos(math.pi * progress))


def _constant(progress: float, initial: float, final: float) -> float:
    """The same fraction at every update."""
    return initial


register_drop_decay("cosine", _cosine)
register_drop_decay("constant", _constant)


@dataclass(frozen=True)
class PruningSchedule:
    """Cubic gradual-pruning schedule from ``init_density`` at ``start`` to ``final_density`` at ``end``.

    Attributes:
        init_density: density d_i at ``start``.
        final_density: density d_f reached exactly at ``end``.
        start: optimizer step t0 where pruning begins.
        end: optimizer step tf where the final density is reached (``end > start``).
        interval: ΔT, steps between pruning events.
    """

    init_density: float
    final_density: float
    start: int
    end: int
    interval: int

    def __post_init__(self) -> None:
        if self.end <= self.start:
            raise ValueError(f"pruning must end after it starts (t0={self.start} >= tf={self.end})")
        if self.interval < 1:
            raise ValueError(f"update interval must be >= 1, got {self.interval}")
        if self.final_density > self.init_density:
            raise ValueError(
                f"final density {self.final_density} is above the initial density "
                f"{self.init_density}: pruning can only lower density"
            )

    def progress(self, step: int) -> float:
        """Fraction of the pruning window elapsed at ``step``, clamped to [0, 1]."""
        return min(1.0, max(0.0, (step - self.start) / (self.end - self.start)))

    def density(self, step: int) -> float:
        """Target density at ``step`` (d_i before t0, d_f after tf)."""
        remaining = (1.0 - self.progress(step)) ** 3
        return self.final_density + (self.init_density - self.final_density) * remaining

    def interpolate(self, step: int, initial: float, final: float) -> float:
        """The cubic schedule applied to arbitrary end points (used for per-layer counts)."""
        return final + (initial - final) * (1.0 - self.progress(step)) ** 3

    def is_prune_step(self, step: int) -> bool:
        """Whether the network is pruned at ``step``: multiples of ΔT in (t0, tf], and tf."""
        return self.start < step <= self.end and (step % self.interval == 0 or step == self.end)


@dataclass(frozen=True)
class DropFractionSchedule:
    """Fraction of each layer's active weights dropped and regrown at an update.

    Attributes:
        initial: r_0, the fraction at ``start``.
        final: the fraction reached at ``end`` (cosine decay) — ignored when ``decay`` is constant.
        start: step where r(t)'s decay starts (and, unless ``first`` is given, the first step at
            which updates may happen).
        end: updates happen at steps strictly before ``end``; the decay ends there.
        interval: ΔT, steps between updates.
        decay: name of a registered decay (``"cosine"``, ``"constant"``, ...).
        first: first step at which updates may happen (``None``: ``start``). Only the update
            window moves: r(t) still decays over [start, end], so the first update uses r(first).
    """

    initial: float
    final: float
    start: int
    end: int
    interval: int
    decay: str = "cosine"
    first: Optional[int] = None

    def __post_init__(self) -> None:
        _DROP_DECAYS.get(self.decay)  # ValueError naming the valid decays
        for value in (self.initial, self.final):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"drop fractions must be in [0, 1], got {value}")
        if self.interval < 1:
            raise ValueError(f"update interval must be >= 1, got {self.interval}")
        if self.first is not None and (isinstance(self.first, bool) or not isinstance(self.first, int)
                                       or self.first < 0):
            raise ValueError(f"the first update step must be an int >= 0, got {self.first!r}")

    @property
    def first_update(self) -> int:
        """The first step at which an update may happen: ``first``, else ``start``."""
        return self.start if self.first is None else self.first

    def fraction(self, step: int) -> float:
        """r(t): the decay from ``initial`` at ``start`` to ``final`` at ``end`` (``initial`` if end <= start)."""
        if self.end <= self.start:
            return self.initial
        progress = min(1.0, max(0.0, (step - self.start) / (self.end - self.start)))
        return _DROP_DECAYS.get(self.decay)(progress, self.initial, self.final)

    def is_update_step(self, step: int) -> bool:
        """Whether a drop-and-regrow update happens at ``step``: a multiple of ΔT in [first, end), not 0."""
        return (self.initial > 0 and self.first_update <= step < self.end and step > 0
                and step % self.interval == 0)
