"""Scores that decide which weights are pruned, dropped and regrown, and exact top-k selection.

An update chooses weights in three roles, each by a registered, named score over one layer's
entries (the JaxPruner idea: a method is a preset of pieces, RigL differs from SET in one function):

* the **prune criterion** of gradual pruning and the **drop criterion** of drop-and-regrow score the
  *active* weights, high = keep (:class:`Criterion`; registered with
  :func:`register_prune_criterion` / :func:`register_drop_criterion`). Built in: ``magnitude``
  (``|w|``), the score of every built-in method.
* the **grow criterion** scores the *inactive* weights, high = regrow (:class:`GrowCriterion`,
  :func:`register_grow_criterion`). It also says when it needs the dense gradient (for the FLOPs
  ledger) and whether the optimizer must keep momentum. Built in:

  * ``gradient`` (RigL, GraNet): ``|dL/dw|`` of the dense gradient. Inactive weights are plain zeros
    in the parameter (not hidden behind a ``weight * mask`` product), so their gradient is available.
  * ``momentum`` (SNFS): ``|m|`` of the optimizer's first-moment buffer (SGD ``momentum_buffer``,
    Adam/AdamW ``exp_avg``).
  * ``random`` (SET): uniform scores from a generator seeded by (seed, step, layer), never the rank.

Criteria are chosen by name in :class:`~granet.sparsity.config.SparsityConfig` (``grow="gradient"``), so
presets stay serialisable. A score that is exactly ``|t|`` of a tensor the criterion can name (the
weight, the gradient, the momentum) also gives ``magnitude_of``: selection then reads the magnitudes
in place (and through the fused kernels of :mod:`granet.kernels.native`) instead of from a float copy.

Selection is always exact: :func:`select_top` (implemented in :mod:`granet.kernels.topk`) returns a mask
with exactly ``k`` entries set, breaking ties at the threshold with a seeded generator, so counts
never depend on sampling and every rank of a distributed job picks the same set.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..kernels.counter_rng import CounterGenerator, RandomSource, uniform
from ..kernels.topk import select_top, select_top_plain  # noqa: F401  (re-exported: the selection API)
from ..registry import Registry

# Optimizer state keys holding a first-moment estimate, in order of preference.
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


def seeded_generator(seed: int, *tags: object, counter: bool = False) -> RandomSource:
    """A CPU generator whose seed is a stable hash of ``seed`` and ``tags``; with ``counter``, the
    :class:`~granet.kernels.counter_rng.CounterGenerator` keyed by the same hash (``rng="device"``).

    Used for every random choice (initial masks, random regrowth, tie-breaking) so the choice is a
    pure function of (seed, purpose, step, layer): identical across processes and resumes, and
    independent of the device the weights live on.
    """
    text = ":".join(str(t) for t in (seed, *tags)).encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    key = int.from_bytes(digest, "little") & ((1 << 63) - 1)
    return CounterGenerator(key) if counter else torch.Generator().manual_seed(key)


def active_magnitudes(param: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Prune score: ``|w|`` of the active weights; inactive entries score -1.

    -1 is below every magnitude, so selecting the top k (k <= active count) keeps only active
    weights, and ties between inactive zeros and active zeros (just-regrown weights) cannot occur.
    """
    return torch.where(mask, param.detach().abs(), -1.0)


def weight_of(param: torch.Tensor, *_: object) -> torch.Tensor:
    """The weight itself (what magnitude pruning and dropping rank by ``|w|``)."""
    return param.detach()


def magnitude_scores(param: torch.Tensor, *_: object) -> torch.Tensor:
    """Prune / drop score: ``|w|`` (high = keep)."""
    return param.detach().abs()


def dense_gradient(param: torch.Tensor, name: str, *_: object) -> torch.Tensor:
    """The dense gradient currently in ``param.grad`` (what gradient regrowth ranks by magnitude)."""
    if param.grad is None:
        raise RuntimeError(
            f"gradient regrowth needs {name}.grad at an update step, but it is None: call "
            "sparsifier.step() after optimizer.step() and before optimizer.zero_grad()"
        )
    return param.grad.detach()


def gradient_scores(param: torch.Tensor, name: str, *_: object) -> torch.Tensor:
    """Grow score: ``|dL/dw|`` of the dense gradient currently in ``param.grad``."""
    return dense_gradient(param, name).abs()


def momentum_of(param: torch.Tensor, name: str, optimizer: Optional[torch.optim.Optimizer], *_: object) -> torch.Tensor:
    """The optimizer's momentum / first-moment buffer for ``param`` (what momentum regrowth ranks)."""
    buf = momentum_buffer(param, optimizer)
    if buf is None:
        raise RuntimeError(
            f"momentum regrowth needs a momentum buffer for {name}, but the optimizer state has none of "
            f"{MOMENTUM_KEYS}: use SGD with momentum > 0, Adam or AdamW, and step the optimizer first"
        )
    return buf.detach()


def momentum_scores(
    param: torch.Tensor, name: str, optimizer: Optional[torch.optim.Optimizer], *_: object
) -> torch.Tensor:
    """Grow score: ``|m|`` of the optimizer's momentum / first-moment buffer for ``param``."""
    return momentum_of(param, name, optimizer).abs()


def random_scores(param: torch.Tensor, name: str, optimizer: object, generator: RandomSource) -> torch.Tensor:
    """Grow score: uniform noise, the same on every device: drawn on the CPU and moved to ``param``'s
    device, or made there by a counter stream (``rng="device"``)."""
    return uniform(param.shape, generator, param.device)


ScoreFunction = Callable[[torch.Tensor, str, Optional[torch.optim.Optimizer], RandomSource], torch.Tensor]
MagnitudeSource = Callable[[torch.Tensor, str, Optional[torch.optim.Optimizer]], torch.Tensor]
DENSE_GRADIENT_NEEDS = ("never", "update_steps", "every_step")


@dataclass(frozen=True)
class Criterion:
    """A named score over one layer's entries: a prune or drop criterion (high = keep).

    Attributes:
        name: the name a configuration uses.
        score: ``score(param, name, optimizer, generator)`` returns a tensor shaped like ``param``
            (under FSDP, like the full parameter, or a DTensor sharded like it). Only the entries
            competing in a selection count (active ones for pruning and dropping); the others score
            -1 in the selection, so keep scores non-negative (as magnitudes are). Use
            ``generator`` (seeded by seed, purpose, step and layer) for any randomness, never the
            global RNG.
        magnitude_of: optional ``magnitude_of(param, name, optimizer)``, for a score that is exactly
            ``|t|`` of a tensor the criterion can name (the weight, the gradient, the momentum):
            selection then reads the magnitudes in place instead of a fresh float copy per layer.
            It must agree with ``score`` (``score(...) == magnitude_of(...).abs()``).
    """

    name: str
    score: ScoreFunction
    magnitude_of: Optional[MagnitudeSource] = field(default=None, kw_only=True)


@dataclass(frozen=True)
class GrowCriterion(Criterion):
    """A named grow score for drop-and-regrow: a :class:`Criterion` over the inactive entries
    (high = regrow first), plus what it needs from the training loop.

    Attributes:
        name, score, magnitude_of: as for :class:`Criterion`; only positions inactive after the drop
            are candidates.
        dense_gradient: when the score needs the dense weight gradient: ``"never"``,
            ``"update_steps"`` (read at topology updates only) or ``"every_step"`` (accumulated
            from every step, like momentum). The training-FLOPs ledger counts that cost.
        needs_momentum: the optimizer must keep a first-moment buffer (checked at construction).
    """

    dense_gradient: str = "update_steps"
    needs_momentum: bool = False

    def __post_init__(self) -> None:
        if self.dense_gradient not in DENSE_GRADIENT_NEEDS:
            raise ValueError(
                f"dense_gradient must be one of {', '.join(DENSE_GRADIENT_NEEDS)}, got {self.dense_gradient!r}"
            )


_GROW_CRITERIA: Registry[GrowCriterion] = Registry("grow criterion")
_DROP_CRITERIA: Registry[Criterion] = Registry("drop criterion")
_PRUNE_CRITERIA: Registry[Criterion] = Registry("prune criterion")


def register_grow_criterion(criterion: GrowCriterion) -> GrowCriterion:
    """Make ``criterion`` selectable by name (``grow=criterion.name``); names are unique."""
    if not isinstance(criterion, GrowCriterion):
        raise TypeError(f"register a GrowCriterion, not {type(criterion).__name__}")
    return _GROW_CRITERIA.register(criterion.name, criterion)


def list_grow_criteria() -> tuple[str, ...]:
    """Names of the registered grow criteria, sorted."""
    return _GROW_CRITERIA.names()


def get_grow_criterion(name: str) -> GrowCriterion:
    """The registered grow criterion ``name``; ``ValueError`` naming the valid ones otherwise."""
    return _GROW_CRITERIA.get(name)


def _checked(criterion: Criterion) -> Criterion:
    if not isinstance(criterion, Criterion):
        raise TypeError(f"register a Criterion, not {type(criterion).__name__}")
    return criterion


def register_drop_criterion(criterion: Criterion) -> Criterion:
    """Make ``criterion`` selectable as the drop score of drop-and-regrow (high = keep); names are unique."""
    return _DROP_CRITERIA.register(_checked(criterion).name, criterion)


def list_drop_criteria() -> tuple[str, ...]:
    """Names of the registered drop criteria, sorted."""
    return _DROP_CRITERIA.names()


def get_drop_criterion(name: str) -> Criterion:
    """The registered drop criterion ``name``; ``ValueError`` naming the valid ones otherwise."""
    return _DROP_CRITERIA.get(name)


def register_prune_criterion(criterion: Criterion) -> Criterion:
    """Make ``criterion`` selectable as the score of gradual pruning (high = keep); names are unique."""
    return _PRUNE_CRITERIA.register(_checked(criterion).name, criterion)


def list_prune_criteria() -> tuple[str, ...]:
    """Names of the registered prune criteria, sorted."""
    return _PRUNE_CRITERIA.names()


def get_prune_criterion(name: str) -> Criterion:
    """The registered prune criterion ``name``; ``ValueError`` naming the valid ones otherwise."""
    return _PRUNE_CRITERIA.get(name)


def momentum_buffer(param: torch.Tensor, optimizer: Optional[torch.optim.Optimizer]) -> Optional[torch.Tensor]:
    """The momentum / first-moment buffer the optimizer keeps for ``param``, if any."""
    if optimizer is None:
        return None
    state = optimizer.state.get(param, {})
    for key in MOMENTUM_KEYS:
        buf = state.get(key)
        if isinstance(buf, torch.Tensor) and buf.shape == param.shape:
            return buf
    return None


def require_momentum(optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Momentum regrowth needs an optimizer that keeps a first-moment buffer."""
    if optimizer is None:
        raise ValueError("momentum regrowth (snfs) needs the optimizer: pass it to the sparsifier")
    if isinstance(optimizer, torch.optim.SGD):
        if all(g.get("momentum", 0) == 0 for g in optimizer.param_groups):
            raise ValueError("momentum regrowth (snfs) needs SGD with momentum > 0")
    elif not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise ValueError(
            f"momentum regrowth (snfs) needs SGD with momentum, Adam or AdamW, not {type(optimizer).__name__}"
        )


register_grow_criterion(GrowCriterion("gradient", gradient_scores, dense_gradient="update_steps",
                                      magnitude_of=dense_gradient))
register_grow_criterion(GrowCriterion("momentum", momentum_scores, dense_gradient="every_step", needs_momentum=True,
                                      magnitude_of=momentum_of))
register_grow_criterion(GrowCriterion("random", random_scores, dense_gradient="never"))
#: The prune and drop criterion of every built-in method: ``|w|``, read in place.
MAGNITUDE = Criterion("magnitude", magnitude_scores, magnitude_of=weight_of)
register_prune_criterion(MAGNITUDE)
register_drop_criterion(MAGNITUDE)
