"""The steps of one topology update, as functions of tensors: pruning, dropping, regrowing.

:class:`~granet.sparsifier.Sparsifier` calls these in order at an update step and installs the
result. Every selection goes through :func:`~granet.criteria.select_top` (exact counts, seeded
tie-breaking), so each function returns masks with exactly the requested number of active entries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .criteria import active_magnitudes, momentum_buffer, seeded_generator, select_top
from . import native
from .topk import _BRACKET_MIN_SIZE, Scores, scratch, select_top_segments
from .workers import layer_map, on_cpu
from .distributions import allocate_counts, get_distribution, layer_counts


@dataclass
class UpdateReport:
    """What one topology update did.

    Attributes:
        step: optimizer step of the update.
        pruned: weights removed by gradual pruning (density goes down by this much).
        dropped: weights removed by the drop phase of drop-and-regrow.
        regrown: weights activated by regrowth (equal to ``dropped``: zero-cost).
        density: overall density of the sparsified weights after the update.
        target_density: the schedule's target density at this step.
        drop_fraction: r_t used by the drop phase (0 when there was none).
        skipped: True when the update was skipped because gradients were not finite.
        layers: per-layer ``{name: {"pruned": n, "dropped": n, "regrown": n}}``.
    """

    step: int
    pruned: int = 0
    dropped: int = 0
    regrown: int = 0
    density: float = 1.0
    target_density: float = 1.0
    drop_fraction: float = 0.0
    skipped: bool = False
    layers: dict[str, dict[str, int]] = field(default_factory=dict)


def random_masks(
    params: Sequence[torch.Tensor], distribution: str, density: float, seed: int, power_scale: float = 1.0
) -> list[torch.Tensor]:
    """Random masks at ``density`` with exact counts: per layer from ``distribution``, or one draw
    over all layers for a distribution without per-layer quotas (``global``).

    Layer ``i``'s scores come from the generator seeded by (seed, "init", i), so the masks are a
    function of the arguments alone (the same on every rank and after a restart).
    """
    if density >= 1.0:
        return [torch.ones_like(p, dtype=torch.bool) for p in params]
    sizes = [p.numel() for p in params]
    if not get_distribution(distribution).per_layer:
        scores = torch.cat([torch.rand(n, generator=seeded_generator(seed, "init", i)) for i, n in enumerate(sizes)])
        keep = select_top(scores, round(density * sum(sizes)))
        return [m.view(p.shape).to(p.device) for m, p in zip(keep.split(sizes), params)]
    counts = layer_counts(distribution, [tuple(p.shape) for p in params], density, power_scale)
    masks = []
    for i, (p, k) in enumerate(zip(params, counts)):
        scores = torch.rand(p.shape, generator=seeded_generator(seed, "init", i))
        masks.append(select_top(scores, k).to(p.device))
    return masks


def gradients_finite(params: Sequence[torch.Tensor]) -> bool:
    """Whether every available gradient of ``params`` is finite.

    A sum is non-finite whenever any term is (NaN propagates, inf + finite = inf, inf - inf =
    NaN), so finite sums prove finite gradients at the cost of one cheap reduction per tensor;
    only a non-finite sum (or a float overflow of the sum) pays for the exact elementwise check.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    sums = torch.stack([g.sum(dtype=torch.float32).to(grads[0].device) for g in grads])
    if bool(torch.isfinite(sums).all()):
        return True
    return all(bool(torch.isfinite(g).all()) for g in grads)


def prune_global(
    params: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], target: int, generator: torch.Generator,
    counts: Optional[Sequence[int]] = None,
) -> list[torch.Tensor]:
    """Keep the ``target`` largest-magnitude active weights over all layers (one threshold).

    Exactly ``select_top(cat(active_magnitudes(p, m)), target, generator)`` split per layer, computed
    layer by layer (no concatenated copy: scratch is O(largest layer)). ``counts``: the active
    weights of each layer, when the caller knows them (saves a counting pass).
    """
    scores = [Scores(p, absolute=True) for p in params]
    out = select_top_segments(
        scores, [s.gather for s in scores], [m.reshape(-1) for m in masks], [p.numel() for p in params], target,
        generator, competitors=counts,
    )
    return [k.view(p.shape).to(p.device) for k, p in zip(out, params)]


def keep_largest(param: torch.Tensor, mask: torch.Tensor, keep: int, generator: torch.Generator,
                 active: Optional[int] = None) -> torch.Tensor:
    """The ``keep`` largest-magnitude active weights of one layer (layer-wise pruning and the drop).

    Exactly ``select_top(active_magnitudes(param, mask), keep, generator)``, without the float copy.
    ``active``: the number of active weights, when the caller knows it (saves a counting pass).
    """
    if param.numel() < _BRACKET_MIN_SIZE:  # small layers: the plain definition is cheapest
        return select_top(active_magnitudes(param, mask), keep, generator)
    w = Scores(param, absolute=True)
    out = select_top_segments([w], [w.gather], [mask.reshape(-1)], [param.numel()],
                              keep, generator, competitors=None if active is None else [active])
    return out[0].view(param.shape)


def grow_positions(scores: torch.Tensor, kept: torch.Tensor, n_grow: int, generator: torch.Generator,
                   free: Optional[int] = None, magnitude: bool = False) -> torch.Tensor:
    """Flat positions (int64, in no particular order) of the ``n_grow`` highest-scoring entries
    outside ``kept`` (the mask after the drop); the scores are ``|scores|`` with ``magnitude``.

    Candidates are all positions inactive after the drop (just-dropped ones included, as in RigL);
    everything else scores -1, below any score, and is never picked: the positions set in
    ``select_top(torch.where(kept, -1.0, scores), n_grow, generator)``, computed without a float
    copy or a pass over a mask. ``free``: the number of candidates, when the caller knows it.
    """
    return _grow(scores, kept, n_grow, generator, free, magnitude, as_index=True)


def grow_layer(scores: torch.Tensor, kept: torch.Tensor, n_grow: int, generator: torch.Generator,
               free: Optional[int] = None, magnitude: bool = False) -> torch.Tensor:
    """:func:`grow_positions` as a mask shaped like ``scores`` (cheaper when many are regrown)."""
    return _grow(scores, kept, n_grow, generator, free, magnitude, as_index=False).view(scores.shape)


def _grow(scores, kept, n_grow, generator, free, magnitude, as_index) -> torch.Tensor:
    flat = scores.detach().reshape(-1)
    if flat.numel() < _BRACKET_MIN_SIZE:
        values = flat.abs() if magnitude else flat
        grown = select_top(torch.where(kept.reshape(-1), -1.0, values), n_grow, generator)
        return grown.nonzero().squeeze(1) if as_index else grown
    candidates = scratch(flat.numel(), torch.bool, flat.device, slot=2)  # ~kept
    torch.logical_not(kept.reshape(-1), out=candidates)
    source = Scores(flat, absolute=magnitude)
    return select_top_segments([source], [source.gather], [candidates], [flat.numel()], n_grow, generator,
                               competitors=None if free is None else [free], as_index=as_index)[0]


def momentum_shares(
    params: Sequence[torch.Tensor],
    optimizer: Optional[torch.optim.Optimizer],
    kept_masks: Sequence[Optional[torch.Tensor]],
    drops: Sequence[int],
    kept_counts: Optional[Sequence[int]] = None,
) -> list[int]:
    """SNFS's redistribution: split ``sum(drops)`` regrowths between layers by mean momentum.

    A layer's weight is the mean ``|momentum|`` of its kept weights; it can regrow at most its
    inactive positions after the drop. Layers left alone (``kept_masks[i] is None``) get 0.
    ``kept_counts``: the active entries of each kept mask, when the caller knows them (saves a
    counting pass). The layers run on the layer threads.
    """
    layers = [i for i, k in enumerate(kept_masks) if k is not None]

    def weight_and_capacity(j: int) -> tuple[float, int]:
        i = layers[j]
        kept = kept_masks[i]
        assert kept is not None
        count = int(torch.count_nonzero(kept)) if kept_counts is None else kept_counts[i]
        buf = momentum_buffer(params[i], optimizer)
        mean = 0.0
        if buf is not None and count > 0:
            # |m| of the kept entries only, in index order (the same values in the same order as
            # ``buf[kept].abs()``, so the same mean bit for bit), gathered in one pass where it can.
            if kept_counts is not None and native.supports([buf], [kept]):
                kept_values = native.compact(kept.reshape(-1), count, x=buf.reshape(-1), absolute=True)[1]
            else:
                kept_values = buf[kept].abs()
            mean = float(kept_values.mean())
        return (mean if math.isfinite(mean) else 0.0), params[i].numel() - count

    pairs = layer_map(weight_and_capacity, len(layers), on_cpu(list(kept_masks)), costs=[params[i].numel() for i in layers])
    shares = allocate_counts(sum(drops), [w for w, _ in pairs], [c for _, c in pairs])
    out = [0] * len(drops)
    for i, share in zip(layers, shares):
        out[i] = share
    return out
