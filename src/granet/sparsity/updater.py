"""The update policy of a sparsifier: when the topology changes and how the new masks are chosen.

A :class:`TopologyUpdater` is composed of injected pieces (the JaxPruner shape):

* the **criteria** (:class:`Criteria`): the prune score of gradual pruning, the drop score and the
  grow score of drop-and-regrow, registered functions chosen by name
  (:mod:`granet.sparsity.criteria`); a method is a preset of pieces, and a new criterion is one registered
  function;
* the **schedules** of the config: gradual pruning and the drop fraction r_t;
* the **solver** (:class:`~granet.sparsity.topology.TopKSolver`): exact local top-k
  (:data:`~granet.sparsity.topology.LOCAL`, one process or DDP) or the sharded one
  (:class:`granet.sparsity.fsdp_layout.ShardedSolver`, FSDP2). The policy is written once; where the masks live is
  the solver's business.

It answers the questions the training loop asks (:meth:`~TopologyUpdater.is_update_step`,
:meth:`~TopologyUpdater.needs_dense_gradient`, the target density), and computes the masks of one
update from the current weights, masks and counts. It never stores masks: the
:class:`~granet.sparsity.sparsifier.Sparsifier` owns them and installs what the updater returns, so the
policy can be tested (and replaced) on plain lists of tensors.

Updates happen at the multiples of ΔT in [first, end) (:func:`first_regrowth_step`: t0 for a
pruning method, whose r_t may start decaying earlier). Order inside one update at optimizer step t:

1. if t is a pruning step (multiple of ΔT in (t0, tf], or tf): prune to the cubic target ``d(t)``
   by the prune score, globally (one threshold over all sparsified tensors) or per layer;
2. if t is a regrowth step: in each sparse layer drop ``floor(r_t * active)`` active weights with
   the lowest drop score and regrow as many inactive ones (just-dropped ones included) with the
   highest grow score (SNFS-style redistribution shares the regrowths between layers by mean
   momentum). Newly active weights start at zero with zeroed optimizer state; a weight dropped and
   regrown in the same update keeps its value and state, as in GraNet and RigL
   (``reinit_regrown="all"`` resets it too).

Each phase is one call of the solver with one problem per layer (one for a global prune); a
layer's regrowth is the follow-up of its drop (:attr:`~granet.sparsity.topology.Problem.then`), so in one
process a layer's drop, regrowth and new mask run on one layer thread, and a sharded update costs
a fixed number of collectives whatever the number of layers. Every random
choice (tie-breaking, random regrowth) comes from a generator seeded by (seed, purpose, step,
layer), so an update is a function of its inputs alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from ..kernels.counter_rng import RandomSource
from ..kernels.layer_threads import on_cpu
from ..kernels.topk import select_top
from . import topology
from .config import ResolvedSparsity, SparsityConfig
from .criteria import (
    Criterion,
    GrowCriterion,
    get_drop_criterion,
    get_grow_criterion,
    get_prune_criterion,
    seeded_generator,
)
from .distributions import allocate_counts, layer_counts
from .schedules import DropFractionSchedule, PruningSchedule
from .structure import (
    Violation,
    ablate_units,
    active_counts,
    fan_in_after_ablation,
    fan_in_count,
    from_rows,
    nm_count,
    random_structured_mask,
    room,
    row_counts,
    row_shape,
    select_structured,
    structure_violations,
)
from .topology import LOCAL, Problem, Segment, TopKSolver, UpdateReport

# Regrowth of fewer than 1/_POSITIONS_BELOW of a layer's entries is handled as positions, more as a mask.
_POSITIONS_BELOW = 16


def first_regrowth_step(steps: Mapping[str, int]) -> int:
    """The first step of drop-and-regrow updates, from a config's resolved steps.

    ``regrow_start`` (where r_t's decay starts), but never before t0 = ``prune_start`` when the
    method prunes: GraNet's r_t decays over [0, T] while its updates, as in the authors' code
    (CIFAR and ImageNet cores alike), begin at t0. With t0 = 0 this is ``regrow_start``.
    """
    return max(steps["regrow_start"], steps.get("prune_start", 0))


def protect_units(scores: torch.Tensor, among: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``scores`` with each unit's highest-scoring entry of ``among`` raised above every other score.

    Units are the slices along ``dim`` (rows of an out × in weight; 1 for in × out weights); a unit
    with no entry in ``among`` has nothing to protect; the first highest entry of a unit (in flat
    order) is the one raised. A raised score ``s >= 0`` becomes ``C (1 + s / (1 + s))`` with
    ``C = 2**(maxexp - 2)`` of the dtype (2**126 for float32): above any score below ``C``, and in
    the order of ``s`` among themselves, so when fewer are kept than there are units, the units with
    the strongest best weight keep theirs. No statistic of the whole layer is needed, so the
    protection is the same on FSDP row shards as in one process.
    """
    if scores.dim() < 2:
        return scores
    out = scores.clone()
    moved = out.movedim(dim, 0) if dim else out  # a view: writing it writes ``out``
    keep = among.movedim(dim, 0) if dim else among
    units, fan_in = moved.shape[0], math.prod(moved.shape[1:])  # explicit: an FSDP rank may hold 0 rows
    ranked = torch.where(keep, moved, torch.full_like(moved, -1.0)).reshape(units, fan_in)
    best = ranked.argmax(dim=1)
    alive = keep.reshape(units, fan_in).any(dim=1).nonzero().squeeze(1)
    at = (alive, *torch.unravel_index(best[alive], moved.shape[1:]))
    value = moved[at].clamp(min=0)
    big = 2.0 ** (math.frexp(torch.finfo(out.dtype).max)[1] - 2)  # 2**126 for float32
    moved[at] = big * (1 + value / (1 + value))  # index_put_ on the view writes ``out``
    return out


@dataclass(frozen=True)
class Criteria:
    """The scores of a method: what gradual pruning keeps, what the drop keeps, what regrows.

    Attributes:
        prune: scores active weights at a pruning step (high = keep).
        drop: scores active weights at a regrowth step (high = keep; the lowest are dropped).
        grow: scores inactive weights at a regrowth step (high = regrow first).
    """

    prune: Criterion
    drop: Criterion
    grow: GrowCriterion

    @staticmethod
    def of(config: SparsityConfig) -> "Criteria":
        """The registered criteria a config names (``grow``; ``prune_criterion`` and ``drop_criterion``
        where the config has them, else magnitude, the score of every built-in method)."""
        # getattr: SparsityConfig is to gain the two fields; until then every method ranks by |w|.
        return Criteria(
            prune=get_prune_criterion(config.prune_criterion),
            drop=get_drop_criterion(config.drop_criterion),
            grow=get_grow_criterion(config.grow),
        )


@dataclass
class Regrowth:
    """The result of one drop-and-regrow phase.

    Attributes:
        masks: per layer, the mask after the drop and regrowth.
        reset: per layer, the regrown positions that start afresh (zero value and optimizer
            state), ``None`` where the layer was left alone: a mask shaped like the layer, or the
            flat positions (int64).
        grown: per layer, the flat positions regrown (``None``: left alone or given as a mask), when
            known; the exploration record then sets their bits instead of packing the whole mask.
    """

    masks: list[torch.Tensor]
    reset: list[Optional[torch.Tensor]]
    grown: Optional[list[Optional[torch.Tensor]]] = None


class TopologyUpdater:
    """Schedules, criteria and top-k solver of a sparsity config, and the mask computations of an update.

    Masks passed in and returned are as the solver holds them (under FSDP this rank's rows; see
    :mod:`granet.sparsity.fsdp_layout`); counts are always whole-layer counts. With a sharded solver every method
    that computes masks is a collective: all ranks call it at the same step.

    Args:
        config: the resolved configuration (:meth:`SparsityConfig.resolve
            <granet.sparsity.config.SparsityConfig.resolve>`); a plain ``SparsityConfig`` is resolved here.
        solver: how selections are solved (default :data:`~granet.sparsity.topology.LOCAL`).
        criteria: the scores (default: those the config names, :meth:`Criteria.of`).
        unit_dims: per layer, the dimension of its output units, for ``protect_units`` (default:
            0 for every layer, the out × in layout of ``nn.Linear`` and convolutions).
    """

    def __init__(self, config: Union[ResolvedSparsity, SparsityConfig], solver: Optional[TopKSolver] = None,
                 criteria: Optional[Criteria] = None, unit_dims: Optional[Sequence[int]] = None) -> None:
        resolved = config if isinstance(config, ResolvedSparsity) else config.resolve()
        self.config = config = resolved.config
        self.unit_dims = None if unit_dims is None else list(unit_dims)
        #: Where each layer's active weights may be (:mod:`granet.sparsity.structure`).
        self.structure = config.parsed_structure
        steps = resolved.steps
        self.criteria = Criteria.of(config) if criteria is None else criteria
        self.solver: TopKSolver = LOCAL if solver is None else solver
        #: ``generator(seed, *tags)``: every random choice's source (see :func:`.criteria.seeded_generator`).
        self.generator: Callable[..., RandomSource] = partial(seeded_generator, counter=config.rng == "device")
        self.pruning: Optional[PruningSchedule] = None if config.prune is None else PruningSchedule(
            init_density=config.effective_init_density, final_density=config.density,
            start=steps["prune_start"], end=steps["prune_end"], interval=config.update_interval,
        )
        self.regrowth: Optional[DropFractionSchedule] = None if config.drop_fraction <= 0 else DropFractionSchedule(
            initial=config.drop_fraction, final=config.drop_fraction_end, start=steps["regrow_start"],
            end=steps["regrow_end"], interval=config.update_interval, decay=config.drop_decay,
            first=first_regrowth_step(steps),
        )

    @property
    def grow(self) -> GrowCriterion:
        """The grow criterion (``criteria.grow``)."""
        return self.criteria.grow

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
        """Whether optimizer step ``step`` (1-based) computes the dense weight gradient (see the grow
        criterion; prune and drop scores rank active weights, whose gradient sparse training has)."""
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

    # ------------------------------------------------------------------ masks

    def initial_masks(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Random masks at the initial density, with exact per-layer counts from the distribution."""
        cfg = self.config
        if self.structure.structured:
            return self._initial_structured(params)
        return topology.random_masks(params, cfg.distribution, cfg.effective_init_density, cfg.seed,
                                     cfg.erk_power_scale, solver=self.solver, counter=cfg.rng == "device")

    def _dim(self, i: int) -> int:
        """Layer ``i``'s output-unit dimension."""
        return 0 if self.unit_dims is None else self.unit_dims[i]

    def structured_count(self, i: int, shape: Sequence[int], density: float) -> int:
        """Layer ``i``'s count per group (N:M: :func:`~.structure.nm_count` of ``density``) or per row
        (fan-in: :func:`~.structure.fan_in_count` of the layer's ``density``)."""
        structure = self.structure
        if structure.kind == "n:m":
            return nm_count(density, structure.n, structure.m)
        return fan_in_count(density, row_shape(shape, self._dim(i))[1])

    def structured_total(self, i: int, shape: Sequence[int], count: int) -> int:
        """Layer ``i``'s active weights when every group (N:M) or row (fan-in) holds ``count``."""
        rows, row_len = row_shape(shape, self._dim(i))
        return rows * (row_len // self.structure.m) * count if self.structure.kind == "n:m" else rows * count

    def _layer_densities(self, shapes: Sequence[Sequence[int]], density: float) -> list[float]:
        """Per layer, the density ``density`` gives it: ``density`` itself under N:M (every layer alike),
        the distribution's exact count over the layer's size for fan-in (at least one weight)."""
        if self.structure.kind == "n:m":
            return [density] * len(shapes)
        cfg = self.config
        counts = layer_counts(cfg.distribution, [tuple(s) for s in shapes], density, cfg.erk_power_scale)
        return [max(c, 1) / math.prod(s) for c, s in zip(counts, shapes)]

    def _initial_structured(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Random structured masks: each layer's count per group or row at its initial density, drawn
        in full from (seed, "init", layer) on every process, then this process's part."""
        cfg = self.config
        densities = self._layer_densities([tuple(p.shape) for p in params], cfg.effective_init_density)
        masks = []
        for i, (p, d) in enumerate(zip(params, densities)):
            if d >= 1.0:
                mask = torch.ones(p.shape, dtype=torch.bool)
            else:
                mask = random_structured_mask(p.shape, self.structure, self.structured_count(i, p.shape, d),
                                              self.generator(cfg.seed, "init", i), unit_dim=self._dim(i))
            masks.append(self.solver.local(mask, i).to(p.device))
        return masks

    def structure_violation(self, i: int, mask: torch.Tensor) -> Optional[Violation]:
        """The first group (N:M) or row (fan-in) of layer ``i``'s ``mask`` whose count differs from the
        layer's mean count, rounded (every group holds ``n_t`` during the N:M schedule, ``N`` at its
        end; every row the layer's ``k``), or ``None``."""
        if not self.structure.structured or mask.numel() == 0:
            return None
        counts = active_counts(mask, self.structure, self._dim(i))
        if self.config.ablation > 0:  # fan-in with ablated units: every live row alike, ablated rows 0
            live = int(torch.count_nonzero(counts))
            expected = round(int(counts.sum()) / live) if live else 0
            return structure_violations(mask, self.structure, self._dim(i), expected, ablated=True)
        return structure_violations(mask, self.structure, self._dim(i), round(int(counts.sum()) / counts.numel()))

    def check_structure(self, names: Sequence[str], masks: Sequence[torch.Tensor]) -> None:
        """Raise ``RuntimeError`` naming the first layer whose mask breaks the structure (an internal
        error: every update keeps it); nothing to check when unstructured."""
        for i, (name, mask) in enumerate(zip(names, masks)):
            violation = self.structure_violation(i, mask)
            if violation is not None:
                raise RuntimeError(f"internal error: the mask of {name} lost structure {self.structure}: {violation}")

    def final_layer_counts(self, shapes: Sequence[Sequence[int]], init_counts: Sequence[int]) -> list[int]:
        """Per-layer counts at the final density (layer-wise pruning targets; empty for other methods)."""
        cfg = self.config
        if cfg.prune != "layerwise":
            return []
        if self.structure.kind == "n:m":  # every layer ends at N:M
            return [self.structured_total(i, s, self.structure.n) for i, s in enumerate(shapes)]
        counts = layer_counts(cfg.distribution, [tuple(s) for s in shapes], cfg.density, cfg.erk_power_scale)
        # A layer never grows under pruning: cap at its initial count and hand the excess to others.
        final = allocate_counts(sum(counts), [float(c) for c in counts], list(init_counts))
        if self.structure.kind == "fan-in":  # a whole number of inputs per output unit
            return [self.structured_total(i, s, self.structured_count(i, s, max(c, 1) / math.prod(s)))
                    for i, (c, s) in enumerate(zip(final, shapes))]
        return final

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
        *,
        names: Optional[Sequence[str]] = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
    ) -> list[torch.Tensor]:
        """Gradual pruning to the cubic schedule's target at ``step``, by the prune score.

        ``names`` and ``optimizer`` are what the prune criterion is called with (layer indices as
        names by default; magnitude needs neither).

        Returns:
            Per layer, the new mask (the given one where the layer is already at its target).
        """
        assert self.pruning is not None
        seed, cpu = self.config.seed, on_cpu(params)
        names = [str(i) for i in range(len(params))] if names is None else names
        if self.structure.structured:
            return self._prune_structured(step, params, masks, counts, init_counts, final_counts, names, optimizer)
        segments = partial(self._prune_segments, step, params, masks, counts, names, optimizer)
        if self.config.prune == "global":
            pruned_globally = self._prune_global(step, params, masks, counts, names, optimizer)
            return list(masks) if pruned_globally is None else pruned_globally
        pruning = self.pruning
        problems: list[Problem] = []
        pruned: list[int] = []
        for i in range(len(params)):
            target = round(pruning.interpolate(step, init_counts[i], final_counts[i]))
            if counts[i] > target:
                generator = self.generator(seed, "prune", step, i)
                problems.append(Problem(target, generator, partial(segments, i, generator=generator), params[i].numel(),
                                        cpu))
                pruned.append(i)
        new = list(masks)
        for i, (mask,) in zip(pruned, self.solver(problems)):
            new[i] = mask
        return new

    def _prune_global(self, step: int, params: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                      counts: Sequence[int], names: Sequence[str],
                      optimizer: Optional[torch.optim.Optimizer]) -> Optional[list[torch.Tensor]]:
        """Global pruning to the schedule's target at ``step``: one threshold over all layers' prune
        scores (``None``: already at or below the target)."""
        target = self.global_prune_target(step, params, counts)
        if target is None:
            return None
        segments = partial(self._prune_segments, step, params, masks, counts, names, optimizer, *range(len(params)))
        problem = Problem(target, self.generator(self.config.seed, "prune", step), segments,
                          sum(p.numel() for p in params), on_cpu(params))
        return [m.to(p.device) for m, p in zip(self.solver([problem])[0], params)]

    def _prune_segments(self, step: int, params: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                        counts: Sequence[int], names: Sequence[str], optimizer: Optional[torch.optim.Optimizer],
                        *layers: int, generator: Optional[RandomSource] = None) -> list[Segment]:
        """The layers' prune scores among their active weights; their generators are ``generator``
        (one layer's: the score's, then the ties'), else one per layer, made only if the score
        function runs."""
        return [self._segment(self.criteria.prune, i, params[i], names[i], optimizer,
                              partial(self.generator, self.config.seed, "prune", step, i) if generator is None else
                              (lambda: generator), among=masks[i], count=counts[i],
                              protect=self.config.protect_units) for i in layers]

    def _prune_structured(self, step: int, params: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                          counts: Sequence[int], init_counts: Sequence[int], final_counts: Sequence[int],
                          names: Sequence[str], optimizer: Optional[torch.optim.Optimizer]) -> list[torch.Tensor]:
        """Gradual pruning within the structure: every group keeps ``nm_count(d_t)`` (N:M), every row
        ``fan_in_count`` of the layer's density (fan-in): its scheduled density under layer-wise pruning,
        and under global pruning the share of the layer's weights that one global threshold over all
        layers keeps (so the budget moves between layers as in unstructured global pruning, and each
        layer's share is then rounded to a whole number of inputs per unit), by the prune score."""
        assert self.pruning is not None
        new = list(masks)
        shares: Optional[list[int]] = None
        if self.structure.kind == "fan-in" and self.config.prune == "global":
            pruned_globally = self._prune_global(step, params, masks, counts, names, optimizer)
            if pruned_globally is None:
                return new
            shares = [int(m.sum()) for m in pruned_globally]
        for i, param in enumerate(params):
            shape = tuple(param.shape)
            if self.structure.kind == "n:m":
                density = self.pruning.density(step)
            elif shares is not None:
                density = max(shares[i], 1) / param.numel()
            else:
                density = max(round(self.pruning.interpolate(step, init_counts[i], final_counts[i])), 1) / param.numel()
            count: Union[int, torch.Tensor] = self.structured_count(i, shape, density)
            ablated = self._ablated_rows(i, masks[i])
            if ablated is not None:  # the layer's scheduled total over its live rows, never more than they hold
                live, held = int((~ablated).sum()), counts[i] // int((~ablated).sum())
                k = min(held, fan_in_after_ablation(self.structured_total(i, shape, int(count)), live,
                                                    row_shape(shape, self._dim(i))[1]))
                if counts[i] <= live * k:
                    continue
                count = torch.where(ablated, 0, k)
            elif counts[i] <= self.structured_total(i, shape, int(count)):
                continue
            generator = self.generator(self.config.seed, "prune", step, i)  # the score's, then the ties'
            (segment,) = self._prune_segments(step, params, masks, counts, names, optimizer, i, generator=generator)
            scores = segment.values.detach().abs() if segment.absolute else segment.values
            new[i] = select_structured(scores, self.structure, count, generator, among=masks[i],
                                       unit_dim=self._dim(i))
        return new

    def drop_and_grow(
        self,
        step: int,
        names: Sequence[str],
        params: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        counts: Sequence[int],
        optimizer: Optional[torch.optim.Optimizer],
        report: UpdateReport,
        alive: Optional[Sequence[int]] = None,
    ) -> Regrowth:
        """Zero-cost neuroregeneration: per layer, drop r_t of the active weights and regrow as many.

        Fills ``report.drop_fraction`` and the per-layer ``dropped`` / ``regrown`` counts. Regrown
        positions that start afresh are all regrown ones with ``reinit_regrown="all"``; with
        ``"new"`` only those inactive before the drop, so a weight dropped and regrown at once is
        untouched. With ``protect_units``, ``alive`` gives each layer's units that have an active
        weight: the drop keeps one weight per such unit (each unit's best by the drop score), so it
        drops at most ``counts - alive``.
        """
        cfg = self.config
        seed, cpu, n = cfg.seed, on_cpu(params), len(params)
        fraction = self.drop_fraction(step)
        report.drop_fraction = fraction
        result = Regrowth(masks=list(masks), reset=[None] * n, grown=[None] * n)
        # floor, as in RigL; dense layers (and tiny ones, n_drop = 0) are left alone
        drops = [0 if counts[i] == p.numel() else int(fraction * counts[i]) for i, p in enumerate(params)]
        if cfg.protect_units and alive is not None:  # never a unit's last weight
            drops = [max(0, min(d, c - a)) for d, c, a in zip(drops, counts, alive)]
        layers = [i for i in range(n) if drops[i] > 0]
        if not layers:
            return result
        sizes = [params[i].numel() for i in layers]

        def drop(j: int, then: Optional[Callable[[list[torch.Tensor]], Problem]] = None) -> Problem:
            i, generator = layers[j], self.generator(seed, "drop", step, layers[j])
            return Problem(counts[i] - drops[i], generator, lambda: [self._segment(
                self.criteria.drop, i, params[i], names[i], optimizer, lambda: generator, among=masks[i],
                count=counts[i],
                protect=cfg.protect_units,
            )], sizes[j], cpu, then=then)

        def grow(j: int, kept: torch.Tensor, n_grow: int) -> Problem:
            i, generator = layers[j], self.generator(seed, "grow", step, layers[j])  # the score's, then the ties'

            def combine(grown: list[torch.Tensor]) -> None:
                self._combine(result, i, masks[i], kept, grown[0])

            # candidates: every position inactive after the drop
            return Problem(n_grow, generator, lambda: [self._segment(
                self.criteria.grow, i, params[i], names[i], optimizer, lambda: generator, among=kept, outside=True,
                count=sizes[j] - counts[i] + drops[i],
            )], sizes[j], cpu, positions=n_grow * _POSITIONS_BELOW < sizes[j], then=combine)

        def regrow_dropped(j: int, kept: list[torch.Tensor]) -> Problem:
            return grow(j, kept[0], drops[layers[j]])

        if self.structure.structured:  # every group or row regrows what it lost (redistribution is refused)
            grows = list(drops)
            for j, (kept_mask,) in enumerate(self.solver([drop(j) for j in range(len(layers))])):
                i = layers[j]
                moved = self._regrow_structured(result, i, names[i], params[i], masks[i], kept_mask, step, optimizer,
                                                ablate=self._ablates(i, n))
                if moved is not None:  # with ablation: the weights the layer lost and regrew
                    drops[i], grows[i] = moved
        elif cfg.redistribute == "none":  # each layer regrows what it dropped: drop, regrowth, new mask in one chain
            grows = drops
            self.solver([drop(j, then=partial(regrow_dropped, j)) for j in range(len(layers))])
        else:  # the regrowth shares need every layer's drop first
            kept = [m for (m,) in self.solver([drop(j) for j in range(len(layers))])]
            kept_masks: list[Optional[torch.Tensor]] = [None] * n
            for i, k in zip(layers, kept):
                kept_masks[i] = k
            grows = topology.momentum_shares(params, optimizer, kept_masks, drops,
                                             [c - d for c, d in zip(counts, drops)], solver=self.solver)
            self.solver([grow(j, kept[j], grows[i]) for j, i in enumerate(layers)])
        for i in layers:
            report.layers[names[i]].update(dropped=drops[i], regrown=grows[i])
        return result

    def _ablates(self, i: int, n: int) -> bool:
        """Whether layer ``i`` of ``n`` may lose units at a drop-and-regrow update (neuron ablation: fan-in
        only, never the last layer, whose units are the model's outputs)."""
        return self.config.ablation > 0 and self.structure.kind == "fan-in" and i != n - 1

    def _ablated_rows(self, i: int, mask: torch.Tensor) -> Optional[torch.Tensor]:
        """Layer ``i``'s ablated rows (``(rows,)`` bool), or ``None`` when ablation is off or no row is ablated."""
        if self.config.ablation <= 0:
            return None
        empty = row_counts(mask, self._dim(i)) == 0
        return empty if bool(empty.any()) and not bool(empty.all()) else None

    def _regrow_structured(self, result: Regrowth, i: int, name: str, param: torch.Tensor, old: torch.Tensor,
                           kept: torch.Tensor, step: int, optimizer: Optional[torch.optim.Optimizer],
                           ablate: bool = False) -> Optional[tuple[int, int]]:
        """Layer ``i``'s regrowth within the structure: each group (N:M) or row (fan-in) regrows its
        room, the entries it lost at the drop, among its entries inactive after the drop, by the grow score.
        With ``ablate`` (neuron ablation, :func:`~.structure.ablate_units`), ablated rows lose what they
        kept and the live rows regrow to the new fan-in; it then returns ``(dropped, regrown)``."""
        generator = self.generator(self.config.seed, "grow", step, i)  # the score's, then the ties'
        kept = kept.view(old.shape)
        segment = self._segment(self.criteria.grow, i, param, name, optimizer, lambda: generator, among=kept,
                                outside=True, count=param.numel() - int(kept.sum()))
        scores = segment.values.detach().abs() if segment.absolute else segment.values
        dim = self._dim(i)
        if not ablate:
            grown = select_structured(scores, self.structure, room(old, kept, self.structure, dim), generator,
                                      among=kept, outside=True, unit_dim=dim)
            self._combine(result, i, old, kept, grown)
            return None
        # salient: kept, or among what the unstructured update would regrow (its own generator: the
        # regrowth's draws are those of a run without ablation)
        regrowable = select_top(scores.detach().masked_fill(kept, -math.inf), int(old.sum()) - int(kept.sum()),
                                self.generator(self.config.seed, "ablate", step, i)).view(old.shape)
        ablated, k = ablate_units(old, kept, regrowable, self.config.ablation, dim)
        rows, row_len = row_shape(old.shape, dim)
        kept = kept & from_rows((~ablated).unsqueeze(1).expand(rows, row_len), old.shape, dim)
        counts = torch.where(ablated, 0, k - row_counts(kept, dim))
        grown = select_structured(scores, self.structure, counts, generator, among=kept, outside=True, unit_dim=dim)
        self._combine(result, i, old, kept, grown)
        return int(old.sum()) - int(kept.sum()), int(grown.sum())

    def _segment(self, criterion: Criterion, i: int, param: torch.Tensor, name: str,
                 optimizer: Optional[torch.optim.Optimizer], generator: Callable[[], RandomSource],
                 among: torch.Tensor, count: int, outside: bool = False, protect: bool = False) -> Segment:
        """Layer ``i``'s scores by ``criterion``, as the solver holds them: the magnitudes of a tensor
        the criterion names, read in place, or its scores in the parameter's dtype. ``generator``
        makes the layer's generator (only called when the score function runs). With ``protect``
        (``protect_units``), each unit's highest-scoring active entry outranks every other entry."""
        source = None if criterion.magnitude_of is None else criterion.magnitude_of(param, name, optimizer)
        if source is not None and source.dtype == param.dtype and source.shape == param.shape:
            if not protect:
                return Segment(self.solver.local(source, i), absolute=True, among=among, outside=outside, count=count)
            scores = self.solver.local(source, i).detach().abs()
        else:
            scores = self.solver.local(criterion.score(param, name, optimizer, generator()).to(param.dtype), i)
        if protect:
            dim = 0 if self.unit_dims is None else self.unit_dims[i]
            scores = protect_units(scores.detach(), among, dim)
        return Segment(scores, among=among, outside=outside, count=count)

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
        result.masks[i], result.grown[i] = new, grown  # type: ignore[index]
