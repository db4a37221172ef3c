"""Scores that decide which weights are pruned and which are regrown, and exact top-k selection.

The prune criterion (:func:`active_magnitudes`) scores *active* weights (high = keep); a grow criterion scores *inactive* weights
(high = regrow). Selection is always exact: :func:`select_top` (implemented in :mod:`granet.topk`) returns a
mask with exactly ``k`` entries set, breaking ties at the threshold with a seeded generator, so
counts never depend on sampling and every rank of a distributed job picks the same set.

Grow criteria are registered :class:`GrowCriterion` objects, chosen by name in
:class:`~granet.config.SparsityConfig` (``grow="gradient"``) so presets stay serialisable. A grow
criterion knows its score function and when it needs the dense gradient (for the FLOPs ledger).
Built in:

* ``gradient`` (RigL, GraNet): ``|dL/dw|`` of the dense gradient. Inactive weights are plain zeros in
  the parameter (not hidden behind a ``weight * mask`` product), so their gradient is available.
* ``momentum`` (SNFS): ``|m|`` of the optimizer's first-moment buffer (SGD ``momentum_buffer``,
  Adam/AdamW ``exp_avg``).
* ``random`` (SET): uniform scores from a generator seeded by (seed, step, layer), never the rank.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from .registry import Registry
from .topk import select_top, select_top_plain  # noqa: F401  (re-exported: the selection API)

# Optimizer state keys holding a first-moment estimate, in order of preference.
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


def seeded_generator(seed: int, *tags: object) -> torch.Generator:
    """A CPU generator whose seed is a stable hash of ``seed`` and ``tags``.

    Used for every random choice (initial masks, random regrowth, tie-breaking) so the choice is a
    pure function of (seed, purpose, step, layer): identical across processes and resumes, and
    independent of the device the weights live on.
    """
    text = ":".join(str(t) for t in (seed, *tags)).encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def active_magnitudes(param: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Prune score: ``|w|`` of the active weights; inactive entries score -1.

    -1 is below every magnitude, so selecting the top k (k <= active count) keeps only active
    weights, and ties between inactive zeros and active zeros (just-regrown weights) cannot occur.
    """
    return torch.where(mask, param.detach().abs(), -1.0)


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


def random_scores(param: torch.Tensor, name: str, optimizer: object, generator: torch.Generator) -> torch.Tensor:
    """Grow score: uniform noise drawn on the CPU (device-independent), moved to ``param``'s device."""
    return torch.rand(param.shape, generator=generator).to(param.device)


ScoreFunction = Callable[[torch.Tensor, str, Optional[torch.optim.Optimizer], torch.Generator], torch.Tensor]
DENSE_GRADIENT_NEEDS = ("never", "update_steps", "every_step")


@dataclass(frozen=True)
class GrowCriterion:
    """A named grow score for drop-and-regrow.

    Attributes:
        name: the name used in :class:`~granet.config.SparsityConfig` (``grow=...``).
        score: ``score(param, name, optimizer, generator)`` returns a tensor shaped like ``param``;
            higher regrows first. Only positions inactive after the drop are candidates. Use
            ``generator`` (seeded by seed, step and layer) for any randomness, never the global RNG.
        dense_gradient: when the score needs the dense weight gradient: ``"never"``,
            ``"update_steps"`` (read at topology updates only) or ``"every_step"`` (accumulated
            from every step, like momentum). The training-FLOPs ledger counts that cost.
        needs_momentum: the optimizer must keep a first-moment buffer (checked at construction).
        magnitude_of: optional ``magnitude_of(param, name, optimizer)``, for a score that is exactly
            ``|t|`` of a tensor the criterion can name (the gradient, the momentum): the update then
            reads magnitudes into reusable scratch memory instead of a fresh float copy per layer.
            It must agree with ``score`` (``score(...) == magnitude_of(...).abs()``).
    """

    name: str
    score: ScoreFunction
    dense_gradient: str = "update_steps"
    needs_momentum: bool = False
    magnitude_of: Optional[Callable[[torch.Tensor, str, Optional[torch.optim.Optimizer]], torch.Tensor]] = None

    def __post_init__(self) -> None:
        if self.dense_gradient not in DENSE_GRADIENT_NEEDS:
            raise ValueError(
                f"dense_gradient must be one of {', '.join(DENSE_GRADIENT_NEEDS)}, got {self.dense_gradient!r}"
            )


_GROW_CRITERIA: Registry[GrowCriterion] = Registry("grow criterion")


def register_grow_criterion(criterion: GrowCriterion) -> GrowCriterion:
    """Make ``criterion`` selectable by name (``grow=criterion.name``); names are unique."""
    if not isinstance(criterion, GrowCriterion):
        raise TypeError(f"register a GrowCriterion, not {type(criterion).__name__}")
    return _GROW_CRITERIA.register(criterion.name, criterion)


def list_grow_criteria() -> tuple[str, ...]:
    """Names of the registered grow criteria, in registration order."""
    return _GROW_CRITERIA.names()


def get_grow_criterion(name: str) -> GrowCriterion:
    """The registered grow criterion ``name``; ``ValueError`` naming the valid ones otherwise."""
    return _GROW_CRITERIA.get(name)


def grow_scores(
    criterion: str,
    param: torch.Tensor,
    name: str,
    optimizer: Optional[torch.optim.Optimizer],
    generator: torch.Generator,
) -> torch.Tensor:
    """Scores of the named grow criterion for every position of ``param`` (higher = regrow first)."""
    return get_grow_criterion(criterion).score(param, name, optimizer, generator)


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
