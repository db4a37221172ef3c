"""A frozen, deliberately plain copy of the topology-update algorithm: the test oracle for the
optimised code in ``granet.sparsity.criteria`` / ``granet.sparsity.topology`` / ``granet.sparsity.masking``.

Everything here follows the written definition with no shortcuts: float score copies, one full
``kthvalue`` for the threshold, ties at the threshold broken by ``torch.randperm`` over the tied
positions in index order, per-layer Python loops. The update orchestration (prune, then drop and
regrow, then install) is copied from the sparsifier as it was when the optimisations started, so
the comparison keeps working wherever the orchestration lives.

Do not optimise this file: its only job is to be obviously right.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from granet.sparsity.criteria import momentum_buffer, seeded_generator
from granet.sparsity.distributions import allocate_counts, get_distribution, layer_counts


def select_top(scores: torch.Tensor, k: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Exactly the ``k`` largest entries; ties at the k-th value broken by ``randperm`` (index order)."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = flat.kthvalue(n - k + 1).values
    mask = flat >= threshold
    extra = int(torch.count_nonzero(mask)) - k
    if extra > 0:
        ties = (flat == threshold).nonzero().squeeze(1)
        keep = ties.numel() - extra
        if generator is not None:
            ties = ties[torch.randperm(ties.numel(), generator=generator)]
        mask[ties[keep:]] = False
    return mask.view_as(scores)


def active_magnitudes(param: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``|w|`` where active, -1 elsewhere."""
    return torch.where(mask, param.detach().abs(), -1.0)


def random_masks(params: Sequence[torch.Tensor], distribution: str, density: float, seed: int,
                 power_scale: float = 1.0) -> list[torch.Tensor]:
    """Random exact-count masks (per layer, or one global draw)."""
    if density >= 1.0:
        return [torch.ones_like(p, dtype=torch.bool) for p in params]
    sizes = [p.numel() for p in params]
    if not get_distribution(distribution).per_layer:
        scores = torch.cat([torch.rand(n, generator=seeded_generator(seed, "init", i)) for i, n in enumerate(sizes)])
        keep = select_top(scores, round(density * sum(sizes)))
        return [m.view(p.shape) for m, p in zip(keep.split(sizes), params)]
    counts = layer_counts(distribution, [tuple(p.shape) for p in params], density, power_scale)
    return [select_top(torch.rand(p.shape, generator=seeded_generator(seed, "init", i)), k)
            for i, (p, k) in enumerate(zip(params, counts))]


def prune_global(params, masks, target: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One magnitude threshold over all layers."""
    scores = torch.cat([active_magnitudes(p, m).reshape(-1) for p, m in zip(params, masks)])
    keep = select_top(scores, target, generator)
    return [k.view(p.shape) for k, p in zip(keep.split([p.numel() for p in params]), params)]


def keep_largest(param, mask, keep: int, generator: torch.Generator) -> torch.Tensor:
    """The ``keep`` largest active magnitudes of one layer."""
    return select_top(active_magnitudes(param, mask), keep, generator)


def grow_layer(scores, kept, n_grow: int, generator: torch.Generator) -> torch.Tensor:
    """The ``n_grow`` highest scores outside ``kept``."""
    return select_top(torch.where(kept, -1.0, scores), n_grow, generator)


def momentum_shares(params, optimizer, kept_masks, drops) -> list[int]:
    """SNFS redistribution by mean |momentum| of kept weights."""
    layers = [i for i, k in enumerate(kept_masks) if k is not None]
    weights, capacities = [], []
    for i in layers:
        kept = kept_masks[i]
        buf = momentum_buffer(params[i], optimizer)
        mean = float(buf.abs()[kept].mean()) if buf is not None and bool(kept.any()) else 0.0
        weights.append(mean if math.isfinite(mean) else 0.0)
        capacities.append(params[i].numel() - int(torch.count_nonzero(kept)))
    shares = allocate_counts(sum(drops), weights, capacities)
    out = [0] * len(drops)
    for i, share in zip(layers, shares):
        out[i] = share
    return out


def reference_update(sparsifier, step: int, masks: list[torch.Tensor], counts: list[int],
                     grow_score) -> tuple[list[torch.Tensor], list[Optional[torch.Tensor]]]:
    """The masks and reset positions one update at ``step`` must produce, from the state before it.

    ``sparsifier`` supplies configuration, schedules, parameters and optimizer (read only);
    ``masks`` / ``counts`` are copies of its masks and counts before the update, and
    ``grow_score(param, name, optimizer, generator)`` is the method's grow score.
    """
    cfg = sparsifier.config
    params, names, sizes = list(sparsifier.params), sparsifier.names, sparsifier.sizes
    masks, counts = [m.clone() for m in masks], list(counts)
    pruning, regrowth = sparsifier.pruning, sparsifier.regrowth
    if pruning is not None and pruning.is_prune_step(step):
        if cfg.prune == "global":
            target = round(pruning.density(step) * sum(sizes))
            if sum(counts) > target:
                masks = prune_global(params, masks, target, seeded_generator(cfg.seed, "prune", step))
        else:
            for i, (p, m) in enumerate(zip(params, masks)):
                target = round(pruning.interpolate(step, sparsifier.init_counts[i], sparsifier.final_counts[i]))
                if counts[i] > target:
                    masks[i] = keep_largest(p, m, target, seeded_generator(cfg.seed, "prune", step, i))
        counts = [int(m.sum()) for m in masks]
    reset: list[Optional[torch.Tensor]] = [None] * len(params)
    if regrowth is not None and regrowth.is_update_step(step):
        fraction = regrowth.fraction(step)
        kept_masks, drops = [], []
        for i, (p, m) in enumerate(zip(params, masks)):
            n_drop = int(fraction * counts[i])
            if counts[i] == sizes[i] or n_drop == 0:
                kept_masks.append(None)
                drops.append(0)
                continue
            kept_masks.append(keep_largest(p, m, counts[i] - n_drop, seeded_generator(cfg.seed, "drop", step, i)))
            drops.append(n_drop)
        if cfg.redistribute == "none":
            grows = list(drops)
        else:
            grows = momentum_shares(params, sparsifier.optimizer, kept_masks, drops)
        for i, (p, kept) in enumerate(zip(params, kept_masks)):
            if kept is None:
                continue
            gen = seeded_generator(cfg.seed, "grow", step, i)
            scores = grow_score(p, names[i], sparsifier.optimizer, gen)
            grown = grow_layer(scores.to(p.dtype), kept, grows[i], gen)
            reset[i] = grown & ~masks[i] if cfg.reinit_regrown == "new" else grown
            masks[i] = kept | grown
    return masks, reset
