"""The sparsifier: boolean masks over a model's weights, kept in step with any training loop.

Usage (the whole integration)::

    sparsifier = granet.create_sparsifier("granet", model, optimizer, density=0.1, total_steps=T)
    for x, y in loader:
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()        # or scaler.step(optimizer)
        sparsifier.step()       # zero pruned weights, update the topology every ΔT steps
        optimizer.zero_grad()

Design choices (and why):

* **Plain weights, zeroed in place.** Inactive weights are stored as zeros in the ordinary parameter,
  not hidden behind a ``weight * mask`` parametrisation, so the backward pass produces the *dense*
  gradient that gradient regrowth needs, and ``model.state_dict()`` keys stay unchanged.
* **Never owns ``optimizer.step()``.** The sparsifier counts real optimizer steps through
  ``Optimizer.register_step_post_hook``: a step that ``GradScaler`` skips (inf/NaN gradients) never
  fires the hook, and gradient-accumulation micro-steps call no ``optimizer.step()``, so neither
  advances the schedule. Calling ``sparsifier.step()`` more often than the optimizer is harmless.
* **Masks are ``torch.bool``** (1 byte per weight). The "ever active" set used for the exploration
  rate is bit-packed (1/8 byte per weight).
* **Every random choice** comes from a generator seeded by (seed, purpose, step, layer): resumes and
  distributed ranks reproduce it without saving or sharing RNG state. Under ``torch.distributed``
  the masks are still broadcast from rank 0 at start and verified after every update
  (:mod:`granet.distributed`), so a rank that drifted raises instead of training another network.

Order inside one ``step()`` at optimizer step t:

1. zero inactive weights (and, unless SNFS-style, their optimizer state) that the optimizer moved;
2. if t is a pruning step (multiple of ΔT in (t0, tf], or tf): magnitude-prune to the cubic target
   ``d(t)``, globally (one threshold over all sparsified tensors) or per layer;
3. if t is a regrowth step: in each sparse layer drop ``floor(r_t * active)`` smallest-magnitude
   active weights and regrow as many inactive ones with the highest grow score. Regrown weights
   start at zero with zeroed optimizer state (``mask_optimizer_state=False`` keeps the momentum of
   inactive weights, which SNFS uses as its grow signal, but regrown positions are still zeroed).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from . import criteria
from . import distributed as _distributed
from .config import SparsityConfig
from .coverage import Coverage, log_coverage
from .distributions import allocate_counts, layer_counts
from .schedule_check import schedule_warnings
from .schedules import DropFractionSchedule, PruningSchedule
from .selection import DEFAULT_LAYER_TYPES, LayerType, select_parameters

logger = logging.getLogger(__name__)

_BIT_VALUES = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


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


def sparsifiable_parameters(
    model: nn.Module,
    keep_dense: Sequence[str] = (),
    layer_types: Sequence[LayerType] = DEFAULT_LAYER_TYPES,
) -> list[tuple[str, nn.Parameter]]:
    """The weights a sparsifier masks (see :func:`granet.selection.select_parameters` for the rules).

    Args:
        model: the model (a DDP or ``torch.compile`` wrapper is fine: prefixes are stripped).
        keep_dense: ``fnmatch`` patterns matched against module and parameter names (any name of a
            tied weight).
        layer_types: module types (or class names) whose weights are sparsified.

    Returns:
        ``(name, parameter)`` pairs in model order; tied weights once, under their first name.

    Raises:
        ValueError: a ``keep_dense`` pattern matches no weight of the selected types.
    """
    return select_parameters(model, layer_types, keep_dense).selected


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor into uint8 bytes (8 entries per byte, little-endian bit order)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8).to(torch.uint8) * _BIT_VALUES.to(flat.device)
    return bits.sum(dim=1, dtype=torch.uint8)


def _popcount(packed: torch.Tensor) -> int:
    """Number of set bits in a uint8 tensor."""
    return int(_POPCOUNT.to(packed.device)[packed.long()].sum())


class Sparsifier:
    """Keeps a model's Conv/Linear weights sparse and evolves their masks during training.

    Prefer :func:`granet.create_sparsifier` to build one from a method name.

    Args:
        model: the model to sparsify (its weights are zeroed in place where masks are False).
        optimizer: the training optimizer. It is used to count real optimizer steps (so skipped AMP
            steps and gradient-accumulation micro-steps do not count), to zero the optimizer state of
            pruned and regrown weights, and for momentum regrowth. ``None`` makes every ``step()``
            call count as one optimizer step and leaves optimizer state alone.
        config: the method's configuration.
        layer_types: module types (or class names) whose weights are sparsified; the default covers
            ``nn.Linear``, ``nn.Conv*``, ``transformers``' ``Conv1D`` and ``nn.MultiheadAttention``.
        include: parameter-name patterns selecting the masked tensors instead of ``layer_types``.
        exclude: parameter-name patterns kept dense (like ``config.keep_dense``).
        dense_embeddings: keep embeddings and weights tied to them dense (default).
        distributed: keep the masks identical across the ranks of ``torch.distributed``: broadcast
            them from rank 0 now and after :meth:`load_state_dict`, and verify them (one small
            all-reduce) after every topology update. ``None`` (default) turns it on when a process
            group with more than one rank is initialised. See :mod:`granet.distributed`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        config: Optional[SparsityConfig] = None,
        layer_types: Sequence[LayerType] = DEFAULT_LAYER_TYPES,
        distributed: Optional[bool] = None,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        dense_embeddings: bool = True,
    ) -> None:
        self.config = config if config is not None else SparsityConfig()
        self.config.validate()
        self._steps = self.config.resolve_steps()
        self.optimizer = optimizer
        self.selection = select_parameters(
            model, layer_types, self.config.keep_dense, include, exclude, dense_embeddings
        )
        targets = self.selection.selected
        if not targets:
            raise ValueError("the model has no sparsifiable weights: " + self.selection.coverage().dense_reasons())
        self.names = [n for n, _ in targets]
        self.params = [p for _, p in targets]
        self.sizes = [p.numel() for p in self.params]
        self.total = sum(self.sizes)

        cfg = self.config
        self.pruning: Optional[PruningSchedule] = None
        if cfg.prune is not None:
            self.pruning = PruningSchedule(
                init_density=cfg.effective_init_density,
                final_density=cfg.density,
                start=self._steps["prune_start"],
                end=self._steps["prune_end"],
                interval=cfg.update_interval,
            )
        self.regrowth: Optional[DropFractionSchedule] = None
        if cfg.drop_fraction > 0:
            self.regrowth = DropFractionSchedule(
                initial=cfg.drop_fraction,
                final=cfg.drop_fraction_end,
                start=self._steps["regrow_start"],
                end=self._steps["regrow_end"],
                interval=cfg.update_interval,
                decay=cfg.drop_decay,
            )
        if cfg.grow == "momentum" and self.regrowth is not None:
            _require_momentum(optimizer)
        for message in schedule_warnings(self.pruning, self.regrowth, cfg.total_steps):
            logger.warning(message)

        self.step_count = 0
        self._pending_steps = 0
        self.skipped_updates = 0
        self.last_update: Optional[UpdateReport] = None
        self.masks = self._initial_masks()
        self.counts = [int(torch.count_nonzero(m)) for m in self.masks]
        self.init_counts = list(self.counts)
        self.final_counts = self._final_layer_counts()
        self.ever_active: Optional[list[torch.Tensor]] = (
            [_pack_bits(m) for m in self.masks] if cfg.track_exploration else None
        )
        self.distributed = _distributed.is_distributed() if distributed is None else bool(distributed)
        if self.distributed and not _distributed.is_initialised():
            raise ValueError("distributed=True needs an initialised torch.distributed process group")
        self.apply_masks()
        if self.distributed:
            # Masks are a function of the config, but a rank built from another config or model would
            # silently train another network: rank 0's masks win (the broadcast checks the layout first).
            _distributed.broadcast_masks(self)
        self._hook = optimizer.register_step_post_hook(self._on_optimizer_step) if optimizer is not None else None
        log_coverage(self.coverage())

    # ------------------------------------------------------------------ construction helpers

    def _initial_masks(self) -> list[torch.Tensor]:
        """Random masks at the initial density, with exact per-layer counts from the distribution."""
        cfg = self.config
        density = cfg.effective_init_density
        if density >= 1.0:
            return [torch.ones_like(p, dtype=torch.bool) for p in self.params]
        if cfg.distribution == "global":
            scores = torch.cat(
                [torch.rand(n, generator=criteria.seeded_generator(cfg.seed, "init", i)) for i, n in enumerate(self.sizes)]
            )
            keep = criteria.select_top(scores, round(density * self.total))
            return [m.view(p.shape).to(p.device) for m, p in zip(keep.split(self.sizes), self.params)]
        counts = self._distribution_counts(density)
        masks = []
        for i, (p, k) in enumerate(zip(self.params, counts)):
            scores = torch.rand(p.shape, generator=criteria.seeded_generator(cfg.seed, "init", i))
            masks.append(criteria.select_top(scores, k).to(p.device))
        return masks

    def _distribution_counts(self, density: float) -> list[int]:
        """Exact per-layer non-zero counts of the configured distribution at ``density``."""
        cfg = self.config
        return layer_counts(cfg.distribution, [tuple(p.shape) for p in self.params], density, cfg.erk_power_scale)

    def _final_layer_counts(self) -> list[int]:
        """Per-layer counts at the final density (the layer-wise pruning targets)."""
        cfg = self.config
        if cfg.prune != "layerwise":
            return []
        counts = self._distribution_counts(cfg.density)
        # A layer never grows under pruning: cap at its initial count and hand the excess to others.
        return allocate_counts(sum(counts), [float(c) for c in counts], self.init_counts)

    # ------------------------------------------------------------------ the training-loop API

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._pending_steps += 1

    def step(self) -> Optional[UpdateReport]:
        """Call after ``optimizer.step()``: re-zero pruned weights; update the topology when due.

        Returns:
            The :class:`UpdateReport` of the topology update made at this step, else ``None``.
        """
        if self.optimizer is None:
            new_steps = 1
        else:
            new_steps, self._pending_steps = self._pending_steps, 0
        if new_steps == 0:
            return None  # a skipped AMP step or an accumulation micro-step: nothing moved
        if new_steps > 1:
            logger.debug("%d optimizer steps since the last sparsifier.step()", new_steps)
        first = self.step_count + 1
        self.step_count += new_steps
        if not any(self._is_update_step(t) for t in range(first, self.step_count + 1)):
            self.apply_masks()
            return None
        return self._update(self.step_count)  # installs the new masks in the same pass

    def _is_update_step(self, step: int) -> bool:
        return bool(
            (self.pruning is not None and self.pruning.is_prune_step(step))
            or (self.regrowth is not None and self.regrowth.is_update_step(step))
        )

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every inactive weight (and its optimizer state, unless disabled) in place."""
        params, masks, states, state_masks = [], [], [], []
        for i, (p, m) in enumerate(zip(self.params, self.masks)):
            if m.device != p.device:  # the model was moved after the sparsifier was built
                m = self.masks[i] = m.to(p.device)
                if self.ever_active is not None:
                    self.ever_active[i] = self.ever_active[i].to(p.device)
            if self.counts[i] == self.sizes[i]:
                continue  # fully dense layer: nothing to zero
            params.append(p)
            masks.append(m)
            if self.config.mask_optimizer_state:
                for buf in self._state_tensors(p):
                    states.append(buf)
                    state_masks.append(m)
        if params:
            torch._foreach_mul_(params + states, masks + state_masks)

    def _state_tensors(self, param: torch.Tensor) -> list[torch.Tensor]:
        """Optimizer state tensors shaped like ``param`` (momentum, Adam moments, ...)."""
        if self.optimizer is None:
            return []
        state = self.optimizer.state.get(param)
        if not state:
            return []
        return [v for v in state.values() if isinstance(v, torch.Tensor) and v.shape == param.shape and v.is_floating_point()]

    # ------------------------------------------------------------------ topology updates

    @torch.no_grad()
    def _update(self, step: int) -> UpdateReport:
        """Prune and/or drop-and-regrow at ``step``, then zero weights and optimizer state in one pass."""
        report = UpdateReport(step=step, target_density=self.target_density(step))
        report.layers = {n: {"pruned": 0, "dropped": 0, "regrown": 0} for n in self.names}
        if not self._gradients_finite():
            self.apply_masks()
            report.skipped = True
            report.density = self.density()
            self.skipped_updates += 1
            self.last_update = report
            logger.warning("step %d: non-finite gradients, topology update skipped", step)
            if self.distributed:
                # Under DDP the all-reduced gradients are non-finite on every rank or on none, so all
                # ranks skip together. Verifying here too keeps the collective schedule a function of
                # the step alone: a rank that skipped alone raises instead of deadlocking the others.
                _distributed.verify_masks(self)
            return report
        grown: list[Optional[torch.Tensor]] = [None] * len(self.params)
        if self.pruning is not None and self.pruning.is_prune_step(step):
            self._prune(step, report)
        if self.regrowth is not None and self.regrowth.is_update_step(step):
            grown = self._drop_and_grow(step, report)
        self._install(grown)
        report.pruned = sum(v["pruned"] for v in report.layers.values())
        report.dropped = sum(v["dropped"] for v in report.layers.values())
        report.regrown = sum(v["regrown"] for v in report.layers.values())
        if self.ever_active is not None:
            for i, m in enumerate(self.masks):
                self.ever_active[i] |= _pack_bits(m)
        report.density = self.density()
        self.last_update = report
        if self.distributed:
            _distributed.verify_masks(self)  # one small all-reduce; raises MaskDivergenceError
        logger.debug(
            "step %d: pruned %d, dropped %d, regrew %d, density %.5f",
            step, report.pruned, report.dropped, report.regrown, report.density,
        )
        return report

    def _gradients_finite(self) -> bool:
        """Whether every available gradient of the sparsified weights is finite.

        A sum is non-finite whenever any term is (NaN propagates, inf + finite = inf, inf - inf =
        NaN), so finite sums prove finite gradients at the cost of one cheap reduction per tensor;
        only a non-finite sum (or a float overflow of the sum) pays for the exact elementwise check.
        """
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return True
        sums = torch.stack([g.sum(dtype=torch.float32).to(grads[0].device) for g in grads])
        if bool(torch.isfinite(sums).all()):
            return True
        return all(bool(torch.isfinite(g).all()) for g in grads)

    def _prune(self, step: int, report: UpdateReport) -> None:
        """Gradual magnitude pruning to the cubic schedule's target at ``step``."""
        assert self.pruning is not None
        if self.config.prune == "global":
            target = round(self.pruning.density(step) * self.total)
            if sum(self.counts) <= target:
                return
            device = self.params[0].device
            scores = torch.cat(
                [criteria.active_magnitudes(p, m).reshape(-1).to(device) for p, m in zip(self.params, self.masks)]
            )
            keep = criteria.select_top(scores, target, criteria.seeded_generator(self.config.seed, "prune", step))
            new_masks = [k.view(p.shape).to(p.device) for k, p in zip(keep.split(self.sizes), self.params)]
        else:
            new_masks = []
            for i, (p, m) in enumerate(zip(self.params, self.masks)):
                target = round(self.pruning.interpolate(step, self.init_counts[i], self.final_counts[i]))
                if self.counts[i] <= target:
                    new_masks.append(m)
                    continue
                gen = criteria.seeded_generator(self.config.seed, "prune", step, i)
                new_masks.append(criteria.select_top(criteria.active_magnitudes(p, m), target, gen))
        for i, new in enumerate(new_masks):
            count = int(torch.count_nonzero(new))
            report.layers[self.names[i]]["pruned"] = self.counts[i] - count
            self.masks[i], self.counts[i] = new, count

    def _drop_and_grow(self, step: int, report: UpdateReport) -> list[Optional[torch.Tensor]]:
        """Zero-cost neuroregeneration: per layer, drop r_t of the active weights and regrow as many.

        Returns:
            Per layer, the mask of regrown positions (``None`` where the layer was left alone).
        """
        assert self.regrowth is not None
        cfg = self.config
        fraction = self.regrowth.fraction(step)
        report.drop_fraction = fraction
        kept_masks: list[Optional[torch.Tensor]] = []
        drops: list[int] = []
        for i, (p, m) in enumerate(zip(self.params, self.masks)):
            active = self.counts[i]
            n_drop = int(fraction * active)
            if active == self.sizes[i] or n_drop == 0:
                kept_masks.append(None)  # dense layers and tiny ones are left alone
                drops.append(0)
                continue
            gen = criteria.seeded_generator(cfg.seed, "drop", step, i)
            kept_masks.append(criteria.select_top(criteria.active_magnitudes(p, m), active - n_drop, gen))
            drops.append(n_drop)
        grows = self._grow_counts(drops, kept_masks)
        grown_masks: list[Optional[torch.Tensor]] = [None] * len(self.params)
        for i, (p, kept) in enumerate(zip(self.params, kept_masks)):
            if kept is None:
                continue
            gen = criteria.seeded_generator(cfg.seed, "grow", step, i)
            scores = criteria.grow_scores(cfg.grow, p, self.names[i], self.optimizer, gen)
            # Candidates are all positions inactive after the drop (just-dropped ones included,
            # as in RigL); everything else scores -1 and is never picked.
            grown = criteria.select_top(torch.where(kept, -1.0, scores.to(p.dtype)), grows[i], gen)
            layer = report.layers[self.names[i]]
            layer["dropped"], layer["regrown"] = drops[i], grows[i]
            self.masks[i] = kept | grown
            self.counts[i] += grows[i] - drops[i]
            grown_masks[i] = grown
        return grown_masks

    def _grow_counts(self, drops: list[int], kept_masks: list[Optional[torch.Tensor]]) -> list[int]:
        """How many weights each layer regrows: its own drop count, or SNFS's momentum share."""
        if self.config.redistribute == "none":
            return list(drops)
        layers = [i for i, k in enumerate(kept_masks) if k is not None]
        weights, capacities = [], []
        for i in layers:
            kept = kept_masks[i]
            buf = criteria.momentum_buffer(self.params[i], self.optimizer)
            mean = float(buf.abs()[kept].mean()) if buf is not None and bool(kept.any()) else 0.0
            weights.append(mean if math.isfinite(mean) else 0.0)
            capacities.append(self.sizes[i] - (self.counts[i] - drops[i]))
        shares = allocate_counts(sum(drops), weights, capacities)
        out = [0] * len(drops)
        for i, share in zip(layers, shares):
            out[i] = share
        return out

    def _install(self, grown: list[Optional[torch.Tensor]]) -> None:
        """Make weights and optimizer state agree with the current masks, in one pass per layer.

        Weights outside the mask, and regrown weights (including a dropped-then-regrown one), become
        zero. Optimizer state is zeroed at the same places; with ``mask_optimizer_state=False`` only
        regrown positions are reset, so inactive weights keep accumulating momentum (SNFS).
        """
        for i, (param, mask) in enumerate(zip(self.params, self.masks)):
            if grown[i] is None and self.counts[i] == self.sizes[i]:
                continue
            keep = mask if grown[i] is None else mask & ~grown[i]
            param.mul_(keep)
            for buf in self._state_tensors(param):
                if self.config.mask_optimizer_state:
                    buf.mul_(keep)
                elif grown[i] is not None:
                    buf.masked_fill_(grown[i], 0.0)

    # ------------------------------------------------------------------ statistics

    def target_density(self, step: Optional[int] = None) -> float:
        """The schedule's target density at ``step`` (default: the current step)."""
        step = self.step_count if step is None else step
        if self.pruning is None:
            return self.config.density
        return self.pruning.density(step)

    def density(self) -> float:
        """Fraction of the sparsified weights that are active."""
        return sum(self.counts) / self.total

    def layer_density(self) -> dict[str, float]:
        """Density of every sparsified tensor, by parameter name."""
        return {n: c / s for n, c, s in zip(self.names, self.counts, self.sizes)}

    def coverage(self) -> Coverage:
        """Which of the model's weights are under masks (with current densities), which are dense and why."""
        return self.selection.coverage(self.layer_density())

    def exploration_rate(self) -> Optional[float]:
        """Fraction of the sparsified weights that have ever been active (ITOP's R_s), if tracked."""
        if self.ever_active is None:
            return None
        return sum(_popcount(e) for e in self.ever_active) / self.total

    def stats(self) -> dict[str, Any]:
        """A JSON-friendly snapshot for logging."""
        last = self.last_update
        return {
            "step": self.step_count,
            "density": self.density(),
            "sparsity": 1.0 - self.density(),
            "target_density": self.target_density(),
            "active_weights": sum(self.counts),
            "sparsified_weights": self.total,
            "layer_density": self.layer_density(),
            "exploration_rate": self.exploration_rate(),
            "drop_fraction": self.regrowth.fraction(self.step_count) if self.regrowth else 0.0,
            "skipped_updates": self.skipped_updates,
            "last_update": None if last is None else {
                "step": last.step, "pruned": last.pruned, "dropped": last.dropped,
                "regrown": last.regrown, "skipped": last.skipped,
            },
        }

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly: config, step, masks, exploration bits, counts.

        Random choices are functions of (seed, step, layer), so no generator state is needed.
        """
        return {
            "format": 1,
            "config": self.config.to_dict(),
            "step": self.step_count,
            "names": list(self.names),
            "shapes": [list(p.shape) for p in self.params],
            "masks": {n: m.detach().cpu().clone() for n, m in zip(self.names, self.masks)},
            "ever_active": None if self.ever_active is None else {
                n: e.detach().cpu().clone() for n, e in zip(self.names, self.ever_active)
            },
            "init_counts": list(self.init_counts),
            "final_counts": list(self.final_counts),
            "skipped_updates": self.skipped_updates,
            "last_update": None if self.last_update is None else asdict(self.last_update),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the sparsified parameters must match by name and shape.

        Raises:
            ValueError: parameters are missing, unexpected or differently shaped (all are named).
        """
        masks = state.get("masks")
        if not isinstance(masks, dict):
            raise ValueError("not a granet sparsifier state: no 'masks' entry")
        expected = dict(zip(self.names, (tuple(p.shape) for p in self.params)))
        problems = []
        missing = [n for n in self.names if n not in masks]
        unexpected = [n for n in masks if n not in expected]
        if missing:
            problems.append(f"missing in the state: {', '.join(missing)}")
        if unexpected:
            problems.append(f"not sparsified in this model: {', '.join(unexpected)}")
        shapes = [
            f"{n} (state {tuple(masks[n].shape)}, model {expected[n]})"
            for n in self.names if n in masks and tuple(masks[n].shape) != expected[n]
        ]
        if shapes:
            problems.append(f"shape mismatch: {', '.join(shapes)}")
        if problems:
            raise ValueError("sparsifier state does not match the model's sparsified parameters: " + "; ".join(problems))
        saved_config = state.get("config", {})
        differing = sorted(k for k, v in self.config.to_dict().items() if k in saved_config and saved_config[k] != v)
        if differing:
            logger.warning("loading sparsifier state saved with a different config (%s)", ", ".join(differing))
        self.masks = [masks[n].to(device=p.device, dtype=torch.bool).clone() for n, p in zip(self.names, self.params)]
        self.counts = [int(torch.count_nonzero(m)) for m in self.masks]
        if state.get("ever_active") is not None and self.config.track_exploration:
            self.ever_active = [state["ever_active"][n].to(p.device).clone() for n, p in zip(self.names, self.params)]
        elif self.config.track_exploration:
            self.ever_active = [_pack_bits(m) for m in self.masks]
        self.init_counts = list(state.get("init_counts", self.init_counts))
        self.final_counts = list(state.get("final_counts", self.final_counts))
        self.step_count = int(state["step"])
        self.skipped_updates = int(state.get("skipped_updates", 0))
        last = state.get("last_update")
        self.last_update = UpdateReport(**last) if last else None
        self._pending_steps = 0
        self.apply_masks()
        if self.distributed:
            _distributed.broadcast_masks(self)  # every rank resumes from rank 0's masks

    def remove(self) -> None:
        """Detach from the optimizer (removes the step hook); masks are left as they are."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __repr__(self) -> str:
        return (
            f"Sparsifier(method={self.config.method!r}, step={self.step_count}, layers={len(self.names)}, "
            f"density={self.density():.4f}, target={self.config.density})"
        )


def _require_momentum(optimizer: Optional[torch.optim.Optimizer]) -> None:
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

