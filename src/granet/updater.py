"""The update policy of a sparsifier: when the topology changes and how the new masks are chosen.

A :class:`TopologyUpdater` is built from a :class:`~granet.config.SparsityConfig`. It holds the
schedules (gradual pruning, drop fraction) and the grow criterion, answers the questions the
training loop asks (:meth:`~TopologyUpdater.is_update_step`,
:meth:`~TopologyUpdater.needs_dense_gradient`, the target density), and computes the masks of one
update from the current weights, masks and counts. It never stores masks: the
:class:`~granet.sparsifier.Sparsifier` owns them and installs what the updater returns, so the
policy can be tested (and replaced) on plain lists of tensors.

Order inside one update at optimizer step t:

1. if t is a pruning step (multiple of ΔT in (t0, tf], or tf): magnitude-prune to the cubic target
   ``d(t)``, globally (one threshold over all sparsified tensors) or per layer;
2. if t is a regrowth step: in each sparse layer drop ``floor(r_t * active)`` smallest-magnitude
   active weights and regrow as many inactive ones (just-dropped ones included) with the highest
   grow score (SNFS-style redistribution shares the regrowths between layers by mean momentum).
   Newly active weights start at zero with zeroed optimizer state; a weight dropped and regrown in
   the same update keeps its value and state, as in GraNet and RigL (``reinit_regrown="all"``
   resets it too).

Every random choice (tie-breaking, random regrowth) comes from a generator seeded by (seed,
purpose, step, layer), so an update is a function of its inputs alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import topology
from .config import SparsityConfig
from .criteria import GrowCriterion, get_grow_criterion, seeded_generator
from .distributions import allocate_counts, layer_counts
from .schedules import DropFractionSchedule, PruningSchedule
from .topology import UpdateReport
from .workers import layer_map, on_cpu


# Regrowth of fewer than 1/_POSITIONS_BELOW of a layer's entries is handled as positions, more as a mask.
_POSITIONS_BELOW = 16


@dataclass
class Regrowth:
    """The result of one drop-and-regrow phase.

    Attributes:
        masks: per layer, the mask after the drop and regrowth.
        reset: per layer, the regrown positions that start afresh (zero value and optimizer
            state), ``None`` where the layer was left alone: a mask shaped like the layer, or the
            flat positions (int64).
        grown: per layer, the flat positions regrown (``None``: left alone), when known; the
            exploration record then sets their bits instead of packing the whole mask.
    """

    masks: list[torch.Tensor]
    reset: list[Optional[torch.Tensor]]
    grown: Optional[list[Optional[torch.Tensor]]] = None


class TopologyUpdater:
    """Schedules and grow criterion of a sparsity config, and the mask computations of an update.

    Args:
        config: a validated sparsity configuration.
    """

    def __init__(self, config: SparsityConfig) -> None:
        self.config = config
        steps = config.resolve_steps()
        self.grow: GrowCriterion = get_grow_criterion(config.grow)
        self.pruning: Optional[PruningSchedule] = None if config.prune is None else PruningSchedule(
            init_density=config.effective_init_density, final_density=config.density,
            start=steps["prune_start"], end=steps["prune_end"], interval=config.update_interval,
        )
        self.regrowth: Optional[DropFractionSchedule] = None if config.drop_fraction <= 0 else DropFractionSchedule(
            initial=config.drop_fraction, final=config.drop_fraction_end, start=steps["regrow_start"],
            end=steps["regrow_end"], interval=config.update_interval, decay=config.drop_decay,
        )

    # ------------------------------------------------------------------ questions about a step

    def is_prune_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) prunes."""
        return self.pruning is not None and self.pruning.is_prune_step(step)

    def is_regrowth_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) drops and regrows."""
        return self.regrowth is not None and self.regrowth.is_update_step(step)

    def is_update_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) prunes and/or drops and regrows."""
        return bool(self.is_prune_step(step) or self.is_regrowth_step(step))

    def needs_dense_gradient(self, step: int) -> bool:
        """Whether optimizer step ``step`` computes the dense weight gradient (see the grow criterion)."""
        if self.regrowth is None or self.grow.dense_gradient == "never":
            return False
        if self.grow.dense_gradient == "every_step":
            return True
        return bool(self.regrowth.is_update_step(step))

    def target_density(self, step: int) -> float:
        """The schedule's target density at ``step`` (the final density for constant-density methods)."""
        return self.config.density if self.pruning is None else self.pruning.density(step)

    def reached_final_density(self, step: int) -> bool:
        """Whether the final density is reached after ``step`` optimizer steps."""
        return self.pruning is None or step >= self.pruning.end

    def drop_fraction(self, step: int) -> float:
        """r_t of the drop phase at ``step`` (0 without regrowth)."""
        return self.regrowth.fraction(step) if self.regrowth is not None else 0.0

    def gradients_finite(self, params: Sequence[torch.Tensor]) -> bool:
        """Whether every available gradient is finite (an update with non-finite ones is skipped)."""
        return topology.gradients_finite(params)

    # ------------------------------------------------------------------ masks

    def initial_masks(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Random masks at the initial density, with exact per-layer counts from the distribution."""
        cfg = self.config
        return topology.random_masks(
            params, cfg.distribution, cfg.effective_init_density, cfg.seed, cfg.erk_power_scale
        )

    def final_layer_counts(self, shapes: Sequence[Sequence[int]], init_counts: Sequence[int]) -> list[int]:
        """Per-layer counts at the final density (layer-wise pruning targets; empty for other methods)."""
        cfg = self.config
        if cfg.prune != "layerwise":
            return []
        counts = layer_counts(cfg.distribution, [tuple(s) for s in shapes], cfg.density, cfg.erk_power_scale)
        # A layer never grows under pruning: cap at its initial count and hand the excess to others.
        return allocate_counts(sum(counts), [float(c) for c in counts], list(init_counts))

    def global_prune_target(self, step: int, params: Sequence[torch.Tensor], counts: Sequence[int]) -> Optional[int]:
        """Active weights to keep over all layers at ``step`` (``None``: already at or below it)."""
        assert self.pruning is not None
        target = round(self.pruning.density(step) * sum(p.numel() for p in params))
        return None if sum(counts) <= target else target

    def prune(
        self,
        step: int,
        params: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        counts: Sequence[int],
        init_counts: Sequence[int],
        final_counts: Sequence[int],
    ) -> list[torch.Tensor]:
        """Gradual magnitude pruning to the cubic schedule's target at ``step``.

        Returns:
            Per layer, the new mask (the given one where the layer is already at its target).
        """
        assert self.pruning is not None
        seed = self.config.seed
        if self.config.prune == "global":
            target = self.global_prune_target(step, params, counts)
            if target is None:
                return list(masks)
            return topology.prune_global(params, masks, target, seeded_generator(seed, "prune", step), counts)
        pruning = self.pruning

        def prune_layer(i: int) -> torch.Tensor:
            target = round(pruning.interpolate(step, init_counts[i], final_counts[i]))
            if counts[i] <= target:
                return masks[i]
            return topology.keep_largest(params[i], masks[i], target, seeded_generator(seed, "prune", step, i),
                                         active=counts[i])

        return layer_map(prune_layer, len(params), on_cpu(params), costs=[p.numel() for p in params])

    def drop_and_grow(
        self,
        step: int,
        names: Sequence[str],
        params: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        counts: Sequence[int],
        optimizer: Optional[torch.optim.Optimizer],
        report: UpdateReport,
    ) -> Regrowth:
        """Zero-cost neuroregeneration: per layer, drop r_t of the active weights and regrow as many.

        Fills ``report.drop_fraction`` and the per-layer ``dropped`` / ``regrown`` counts. Regrown
        positions that start afresh are all regrown ones with ``reinit_regrown="all"``; with
        ``"new"`` only those inactive before the drop, so a weight dropped and regrown at once is
        untouched.
        """
        seed = self.config.seed
        fraction = self.drop_fraction(step)
        report.drop_fraction = fraction
        # floor, as in RigL; dense layers (and tiny ones, n_drop = 0) are left alone
        drops = [0 if counts[i] == p.numel() else int(fraction * counts[i]) for i, p in enumerate(params)]

        def drop(i: int) -> Optional[torch.Tensor]:
            if drops[i] == 0:
                return None
            return topology.keep_largest(params[i], masks[i], counts[i] - drops[i],
                                         seeded_generator(seed, "drop", step, i), active=counts[i])

        def grow(i: int, kept: Optional[torch.Tensor], n_grow: int) -> None:
            if kept is None:
                return
            grown = self._grow(params[i], names[i], optimizer, seeded_generator(seed, "grow", step, i), kept,
                               n_grow, params[i].numel() - counts[i] + drops[i])
            report.layers[names[i]].update(dropped=drops[i], regrown=n_grow)
            self._combine(result, i, masks[i], kept, grown)

        result = Regrowth(masks=list(masks), reset=[None] * len(params), grown=[None] * len(params))
        cpu, sizes = on_cpu(params), [p.numel() for p in params]
        if self.config.redistribute == "none":  # each layer regrows what it dropped: one task per layer
            layer_map(lambda i: grow(i, drop(i), drops[i]), len(params), cpu, costs=sizes)
        else:  # the regrowth shares need every layer's drop first
            kept_masks = layer_map(drop, len(params), cpu, costs=sizes)
            kept_counts = [counts[i] - drops[i] for i in range(len(params))]
            grows = topology.momentum_shares(params, optimizer, kept_masks, drops, kept_counts)
            layer_map(lambda i: grow(i, kept_masks[i], grows[i]), len(params), cpu, costs=sizes)
        return result

    def _combine(self, result: Regrowth, i: int, old: torch.Tensor, kept: torch.Tensor, grown: torch.Tensor) -> None:
        """Layer ``i``'s new mask and reset positions from the mask after the drop and the regrown
        ones (a mask, or flat positions, which also go to ``result.grown``). Called on the layer
        threads: it writes entry ``i`` of the result only."""
        fresh_only = self.config.reinit_regrown == "new"
        if grown.dtype == torch.bool:  # a mask (many regrown)
            result.reset[i] = grown & ~old if fresh_only else grown
            result.masks[i] = kept | grown
            return
        result.reset[i] = grown[~old.reshape(-1).index_select(0, grown)] if fresh_only else grown
        new = kept.clone() if kept is old else kept  # a fresh mask: filled in place
        new.view(-1).index_fill_(0, grown, True)
        result.masks[i], result.grown[i] = new, grown

    def _grow(self, param: torch.Tensor, name: str, optimizer: Optional[torch.optim.Optimizer],
              generator: torch.Generator, kept: torch.Tensor, n_grow: int, free: int) -> torch.Tensor:
        """The ``n_grow`` best candidates outside ``kept`` by the grow score: flat positions when
        few are regrown, a mask shaped like ``param`` when many are (positions then cost more)."""
        grow = topology.grow_positions if n_grow * _POSITIONS_BELOW < param.numel() else topology.grow_layer
        source = None if self.grow.magnitude_of is None else self.grow.magnitude_of(param, name, optimizer)
        if source is not None and source.dtype == param.dtype and source.shape == param.shape:
            return grow(source, kept, n_grow, generator, free=free, magnitude=True)
        scores = self.grow.score(param, name, optimizer, generator)
        return grow(scores.to(param.dtype), kept, n_grow, generator, free=free)
