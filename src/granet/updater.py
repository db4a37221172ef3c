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


@dataclass
class Regrowth:
    """The result of one drop-and-regrow phase.

    Attributes:
        masks: per layer, the mask after the drop and regrowth.
        reset: per layer, the regrown positions that start afresh (zero value and optimizer
            state), ``None`` where the layer was left alone.
    """

    masks: list[torch.Tensor]
    reset: list[Optional[torch.Tensor]]


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
            return topology.prune_global(params, masks, target, seeded_generator(seed, "prune", step))
        new_masks = []
        for i, (p, m) in enumerate(zip(params, masks)):
            target = round(self.pruning.interpolate(step, init_counts[i], final_counts[i]))
            if counts[i] <= target:
                new_masks.append(m)
                continue
            new_masks.append(topology.keep_largest(p, m, target, seeded_generator(seed, "prune", step, i)))
        return new_masks

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
        kept_masks: list[Optional[torch.Tensor]] = []
        drops: list[int] = []
        for i, (p, m) in enumerate(zip(params, masks)):
            n_drop = int(fraction * counts[i])  # floor, as in RigL
            if counts[i] == p.numel() or n_drop == 0:
                kept_masks.append(None)  # dense layers and tiny ones are left alone
                drops.append(0)
                continue
            kept_masks.append(topology.keep_largest(p, m, counts[i] - n_drop, seeded_generator(seed, "drop", step, i)))
            drops.append(n_drop)
        if self.config.redistribute == "none":
            grows = list(drops)
        else:
            grows = topology.momentum_shares(params, optimizer, kept_masks, drops)
        result = Regrowth(masks=list(masks), reset=[None] * len(params))
        for i, (p, kept) in enumerate(zip(params, kept_masks)):
            if kept is None:
                continue
            gen = seeded_generator(seed, "grow", step, i)
            scores = self.grow.score(p, names[i], optimizer, gen)
            grown = topology.grow_layer(scores.to(p.dtype), kept, grows[i], gen)
            layer = report.layers[names[i]]
            layer["dropped"], layer["regrown"] = drops[i], grows[i]
            result.reset[i] = grown & ~masks[i] if self.config.reinit_regrown == "new" else grown
            result.masks[i] = kept | grown
        return result
