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

import fnmatch
import logging
import math
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from . import criteria
from . import distributed as _distributed
from .config import SparsityConfig
from .distributions import allocate_counts, layer_counts
from .schedules import DropFractionSchedule, PruningSchedule

logger = logging.getLogger(__name__)

DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
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


def _clean_name(name: str) -> str:
    """Strip DistributedDataParallel / torch.compile wrapper prefixes from a parameter name."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def sparsifiable_parameters(
    model: nn.Module,
    keep_dense: Sequence[str] = (),
    layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES,
) -> list[tuple[str, nn.Parameter]]:
    """The weights a sparsifier masks: every Conv/Linear ``weight``, minus ``keep_dense`` matches.

    Biases and normalisation layers are never sparsified. Shared (tied) weights are listed once.

    Args:
        model: the model (a DDP or ``torch.compile`` wrapper is fine: prefixes are stripped).
        keep_dense: ``fnmatch`` patterns matched against module names (``"conv1"``, ``"layer4.*"``)
            and parameter names (``"fc.weight"``).
        layer_types: module types whose ``weight`` is sparsified.

    Returns:
        ``(name, parameter)`` pairs in module order.

    Raises:
        ValueError: a ``keep_dense`` pattern matches no sparsifiable layer.
    """
    found: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    used_patterns: set[str] = set()
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, tuple(layer_types)) or not isinstance(weight, nn.Parameter):
            continue
        if weight.dim() < 2 or id(weight) in seen:
            continue
        clean_module = _clean_name(module_name + ".") [:-1] if module_name else ""
        name = f"{clean_module}.weight" if clean_module else "weight"
        matched = [p for p in keep_dense if fnmatch.fnmatchcase(clean_module, p) or fnmatch.fnmatchcase(name, p)]
        seen.add(id(weight))
        if matched:
            used_patterns.update(matched)
            continue
        found.append((name, weight))
    unused = [p for p in keep_dense if p not in used_patterns]
    if unused:
        raise ValueError(
            f"keep_dense pattern(s) {', '.join(map(repr, unused))} match no Conv/Linear layer of the model"
        )
    return found


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
        layer_types: module types whose ``weight`` is sparsified.
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
        layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES,
        distributed: Optional[bool] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__} {_short_repr(model)}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        self._config = config if config is not None else SparsityConfig()
        self._config.validate()
        self._steps = self._config.resolve_steps()
        self._optimizer = optimizer
        targets = sparsifiable_parameters(model, self._config.keep_dense, layer_types)
        if not targets:
            raise ValueError(
                "the model has no sparsifiable weights (no nn.Linear / nn.Conv* weight outside keep_dense)"
            )
        self._names = [n for n, _ in targets]
        self._params = [p for _, p in targets]
        self._sizes = [p.numel() for p in self._params]
        self._total = sum(self._sizes)

        cfg = self._config
        self._pruning: Optional[PruningSchedule] = None
        if cfg.prune is not None:
            self._pruning = PruningSchedule(
                init_density=cfg.effective_init_density,
                final_density=cfg.density,
                start=self._steps["prune_start"],
                end=self._steps["prune_end"],
                interval=cfg.update_interval,
            )
        self._regrowth: Optional[DropFractionSchedule] = None
        if cfg.drop_fraction > 0:
            self._regrowth = DropFractionSchedule(
                initial=cfg.drop_fraction,
                final=cfg.drop_fraction_end,
                start=self._steps["regrow_start"],
                end=self._steps["regrow_end"],
                interval=cfg.update_interval,
                decay=cfg.drop_decay,
            )
        if cfg.grow == "momentum" and self._regrowth is not None:
            _require_momentum(optimizer)
        if cfg.total_steps is not None and cfg.update_interval > cfg.total_steps and (self._pruning or self._regrowth):
            logger.warning(
                "update_interval=%d exceeds total_steps=%d: the topology will never be updated",
                cfg.update_interval, cfg.total_steps,
            )

        self._step_count = 0
        self._pending_steps = 0
        self._skipped_updates = 0
        self._last_update: Optional[UpdateReport] = None
        self._masks = self._initial_masks()
        self._counts = [int(torch.count_nonzero(m)) for m in self._masks]
        self._init_counts = list(self._counts)
        self._final_counts = self._final_layer_counts()
        self._ever_active: Optional[list[torch.Tensor]] = (
            [_pack_bits(m) for m in self._masks] if cfg.track_exploration else None
        )
        self._is_distributed = _distributed.is_distributed() if distributed is None else bool(distributed)
        if self._is_distributed and not _distributed.is_initialised():
            raise ValueError("distributed=True needs an initialised torch.distributed process group")
        self.apply_masks()
        if self._is_distributed:
            # Masks are a function of the config, but a rank built from another config or model would
            # silently train another network: rank 0's masks win (the broadcast checks the layout first).
            self.broadcast_masks()
        self._hook = optimizer.register_step_post_hook(self._on_optimizer_step) if optimizer is not None else None

    # ------------------------------------------------------------------ read-only views

    @property
    def config(self) -> SparsityConfig:
        """A copy of the configuration (changing it does not change the sparsifier)."""
        return self._config.replace()

    @property
    def optimizer(self) -> Optional[torch.optim.Optimizer]:
        """The optimizer whose steps are counted (``None``: every ``step()`` call counts)."""
        return self._optimizer

    @property
    def names(self) -> list[str]:
        """Names of the sparsified parameters, in model order (a copy)."""
        return list(self._names)

    @property
    def params(self) -> tuple[nn.Parameter, ...]:
        """The sparsified parameters, in the order of :attr:`names`."""
        return tuple(self._params)

    @property
    def sizes(self) -> list[int]:
        """Number of entries of each sparsified parameter (a copy)."""
        return list(self._sizes)

    @property
    def total(self) -> int:
        """Number of sparsified weights."""
        return self._total

    @property
    def masks(self) -> Mapping[str, torch.Tensor]:
        """Read-only ``{name: torch.bool mask}`` of the current topology.

        The tensors are the live masks (no copy): read them, never change them in place; use
        :meth:`set_masks` to install other masks.
        """
        return MappingProxyType(dict(zip(self._names, self._masks)))

    def mask_of(self, name: str) -> torch.Tensor:
        """The live ``torch.bool`` mask of parameter ``name`` (read it, do not change it in place)."""
        try:
            return self._masks[self._names.index(name)]
        except ValueError:
            raise KeyError(f"{name!r} is not sparsified; sparsified: {', '.join(self._names)}") from None

    @property
    def counts(self) -> list[int]:
        """Active weights per sparsified parameter (a copy)."""
        return list(self._counts)

    @property
    def init_counts(self) -> list[int]:
        """Per-layer active counts at construction (the start of layer-wise pruning), a copy."""
        return list(self._init_counts)

    @property
    def final_counts(self) -> list[int]:
        """Per-layer targets of layer-wise pruning (empty for other methods), a copy."""
        return list(self._final_counts)

    @property
    def ever_active(self) -> Optional[tuple[torch.Tensor, ...]]:
        """Bit-packed "ever active" masks per layer (``uint8``), or ``None`` if not tracked."""
        return None if self._ever_active is None else tuple(self._ever_active)

    @property
    def pruning(self) -> Optional[PruningSchedule]:
        """The gradual pruning schedule (frozen), or ``None`` for methods that do not prune."""
        return self._pruning

    @property
    def regrowth(self) -> Optional[DropFractionSchedule]:
        """The drop-fraction schedule of drop-and-regrow (frozen), or ``None`` without regrowth."""
        return self._regrowth

    @property
    def step_count(self) -> int:
        """Optimizer steps counted so far."""
        return self._step_count

    @property
    def skipped_updates(self) -> int:
        """Topology updates skipped because gradients were not finite."""
        return self._skipped_updates

    @property
    def last_update(self) -> Optional[UpdateReport]:
        """The report of the latest topology update (``None`` before the first)."""
        return self._last_update

    @property
    def distributed(self) -> bool:
        """Whether masks are kept identical across ``torch.distributed`` ranks."""
        return self._is_distributed

    @property
    def reached_final_density(self) -> bool:
        """Whether the schedule's final density has been reached (always, for constant-density methods).

        Model selection on validation accuracy is only fair among models at the final density.
        """
        return self._pruning is None or self._step_count >= self._pruning.end

    def is_update_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) prunes and/or drops and regrows."""
        return bool(
            (self._pruning is not None and self._pruning.is_prune_step(step))
            or (self._regrowth is not None and self._regrowth.is_update_step(step))
        )

    def needs_dense_gradient(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) of this method computes the dense weight gradient.

        Gradient regrowth (RigL, GraNet) needs it on its regrowth update steps; momentum regrowth
        (SNFS) needs dense momentum, hence the dense gradient, on every step while regrowth is
        configured; random regrowth (SET), pruning and static masks never do. The training-FLOPs
        ledger asks this before ``sparsifier.step()``, i.e. for ``step_count + 1``.
        """
        if self._regrowth is None:
            return False
        grow = self._config.grow
        if grow == "momentum":
            return True
        if grow == "gradient":
            return bool(self._regrowth.is_update_step(step))
        return False

    # ------------------------------------------------------------------ construction helpers

    def _initial_masks(self) -> list[torch.Tensor]:
        """Random masks at the initial density, with exact per-layer counts from the distribution."""
        cfg = self._config
        density = cfg.effective_init_density
        if density >= 1.0:
            return [torch.ones_like(p, dtype=torch.bool) for p in self._params]
        if cfg.distribution == "global":
            scores = torch.cat(
                [torch.rand(n, generator=criteria.seeded_generator(cfg.seed, "init", i)) for i, n in enumerate(self._sizes)]
            )
            keep = criteria.select_top(scores, round(density * self._total))
            return [m.view(p.shape).to(p.device) for m, p in zip(keep.split(self._sizes), self._params)]
        counts = self._distribution_counts(density)
        masks = []
        for i, (p, k) in enumerate(zip(self._params, counts)):
            scores = torch.rand(p.shape, generator=criteria.seeded_generator(cfg.seed, "init", i))
            masks.append(criteria.select_top(scores, k).to(p.device))
        return masks

    def _distribution_counts(self, density: float) -> list[int]:
        """Exact per-layer non-zero counts of the configured distribution at ``density``."""
        cfg = self._config
        return layer_counts(cfg.distribution, [tuple(p.shape) for p in self._params], density, cfg.erk_power_scale)

    def _final_layer_counts(self) -> list[int]:
        """Per-layer counts at the final density (the layer-wise pruning targets)."""
        cfg = self._config
        if cfg.prune != "layerwise":
            return []
        counts = self._distribution_counts(cfg.density)
        # A layer never grows under pruning: cap at its initial count and hand the excess to others.
        return allocate_counts(sum(counts), [float(c) for c in counts], self._init_counts)

    # ------------------------------------------------------------------ the training-loop API

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._pending_steps += 1

    def step(self) -> Optional[UpdateReport]:
        """Call after ``optimizer.step()``: re-zero pruned weights; update the topology when due.

        Returns:
            The :class:`UpdateReport` of the topology update made at this step, else ``None``.
        """
        if self._optimizer is None:
            new_steps = 1
        else:
            new_steps, self._pending_steps = self._pending_steps, 0
        if new_steps == 0:
            return None  # a skipped AMP step or an accumulation micro-step: nothing moved
        if new_steps > 1:
            logger.debug("%d optimizer steps since the last sparsifier.step()", new_steps)
        first = self._step_count + 1
        self._step_count += new_steps
        if not any(self.is_update_step(t) for t in range(first, self._step_count + 1)):
            self.apply_masks()
            return None
        return self._update(self._step_count)  # installs the new masks in the same pass

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every inactive weight (and its optimizer state, unless disabled) in place."""
        self._follow_param_devices()
        params, masks, states, state_masks = [], [], [], []
        for i, (p, m) in enumerate(zip(self._params, self._masks)):
            if self._counts[i] == self._sizes[i]:
                continue  # fully dense layer: nothing to zero
            params.append(p)
            masks.append(m)
            if self._config.mask_optimizer_state:
                for buf in self._state_tensors(p):
                    states.append(buf)
                    state_masks.append(m)
        if params:
            torch._foreach_mul_(params + states, masks + state_masks)

    def _follow_param_devices(self) -> None:
        """Move masks (and exploration bits) to their parameters' devices if the model was moved."""
        for i, (p, m) in enumerate(zip(self._params, self._masks)):
            if m.device != p.device:
                self._masks[i] = m.to(p.device)
                if self._ever_active is not None:
                    self._ever_active[i] = self._ever_active[i].to(p.device)

    def _state_tensors(self, param: torch.Tensor) -> list[torch.Tensor]:
        """Optimizer state tensors shaped like ``param`` (momentum, Adam moments, ...)."""
        if self._optimizer is None:
            return []
        state = self._optimizer.state.get(param)
        if not state:
            return []
        return [v for v in state.values() if isinstance(v, torch.Tensor) and v.shape == param.shape and v.is_floating_point()]

    # ------------------------------------------------------------------ topology updates

    @torch.no_grad()
    def _update(self, step: int) -> UpdateReport:
        """Prune and/or drop-and-regrow at ``step``, then zero weights and optimizer state in one pass."""
        report = UpdateReport(step=step, target_density=self.target_density(step))
        report.layers = {n: {"pruned": 0, "dropped": 0, "regrown": 0} for n in self._names}
        if not self._gradients_finite():
            self.apply_masks()
            report.skipped = True
            report.density = self.density()
            self._skipped_updates += 1
            self._last_update = report
            logger.warning("step %d: non-finite gradients, topology update skipped", step)
            if self._is_distributed:
                # Under DDP the all-reduced gradients are non-finite on every rank or on none, so all
                # ranks skip together. Verifying here too keeps the collective schedule a function of
                # the step alone: a rank that skipped alone raises instead of deadlocking the others.
                self.verify_masks()
            return report
        grown: list[Optional[torch.Tensor]] = [None] * len(self._params)
        if self._pruning is not None and self._pruning.is_prune_step(step):
            self._prune(step, report)
        if self._regrowth is not None and self._regrowth.is_update_step(step):
            grown = self._drop_and_grow(step, report)
        self._install(grown)
        report.pruned = sum(v["pruned"] for v in report.layers.values())
        report.dropped = sum(v["dropped"] for v in report.layers.values())
        report.regrown = sum(v["regrown"] for v in report.layers.values())
        if self._ever_active is not None:
            for i, m in enumerate(self._masks):
                self._ever_active[i] |= _pack_bits(m)
        report.density = self.density()
        self._last_update = report
        if self._is_distributed:
            self.verify_masks()  # one small all-reduce; raises MaskDivergenceError
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
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return True
        sums = torch.stack([g.sum(dtype=torch.float32).to(grads[0].device) for g in grads])
        if bool(torch.isfinite(sums).all()):
            return True
        return all(bool(torch.isfinite(g).all()) for g in grads)

    def _prune(self, step: int, report: UpdateReport) -> None:
        """Gradual magnitude pruning to the cubic schedule's target at ``step``."""
        assert self._pruning is not None
        if self._config.prune == "global":
            target = round(self._pruning.density(step) * self._total)
            if sum(self._counts) <= target:
                return
            device = self._params[0].device
            scores = torch.cat(
                [criteria.active_magnitudes(p, m).reshape(-1).to(device) for p, m in zip(self._params, self._masks)]
            )
            keep = criteria.select_top(scores, target, criteria.seeded_generator(self._config.seed, "prune", step))
            new_masks = [k.view(p.shape).to(p.device) for k, p in zip(keep.split(self._sizes), self._params)]
        else:
            new_masks = []
            for i, (p, m) in enumerate(zip(self._params, self._masks)):
                target = round(self._pruning.interpolate(step, self._init_counts[i], self._final_counts[i]))
                if self._counts[i] <= target:
                    new_masks.append(m)
                    continue
                gen = criteria.seeded_generator(self._config.seed, "prune", step, i)
                new_masks.append(criteria.select_top(criteria.active_magnitudes(p, m), target, gen))
        for i, new in enumerate(new_masks):
            count = int(torch.count_nonzero(new))
            report.layers[self._names[i]]["pruned"] = self._counts[i] - count
            self._masks[i], self._counts[i] = new, count

    def _drop_and_grow(self, step: int, report: UpdateReport) -> list[Optional[torch.Tensor]]:
        """Zero-cost neuroregeneration: per layer, drop r_t of the active weights and regrow as many.

        Returns:
            Per layer, the mask of regrown positions (``None`` where the layer was left alone).
        """
        assert self._regrowth is not None
        cfg = self._config
        fraction = self._regrowth.fraction(step)
        report.drop_fraction = fraction
        kept_masks: list[Optional[torch.Tensor]] = []
        drops: list[int] = []
        for i, (p, m) in enumerate(zip(self._params, self._masks)):
            active = self._counts[i]
            n_drop = int(fraction * active)
            if active == self._sizes[i] or n_drop == 0:
                kept_masks.append(None)  # dense layers and tiny ones are left alone
                drops.append(0)
                continue
            gen = criteria.seeded_generator(cfg.seed, "drop", step, i)
            kept_masks.append(criteria.select_top(criteria.active_magnitudes(p, m), active - n_drop, gen))
            drops.append(n_drop)
        grows = self._grow_counts(drops, kept_masks)
        grown_masks: list[Optional[torch.Tensor]] = [None] * len(self._params)
        for i, (p, kept) in enumerate(zip(self._params, kept_masks)):
            if kept is None:
                continue
            gen = criteria.seeded_generator(cfg.seed, "grow", step, i)
            scores = criteria.grow_scores(cfg.grow, p, self._names[i], self._optimizer, gen)
            # Candidates are all positions inactive after the drop (just-dropped ones included,
            # as in RigL); everything else scores -1 and is never picked.
            grown = criteria.select_top(torch.where(kept, -1.0, scores.to(p.dtype)), grows[i], gen)
            layer = report.layers[self._names[i]]
            layer["dropped"], layer["regrown"] = drops[i], grows[i]
            self._masks[i] = kept | grown
            self._counts[i] += grows[i] - drops[i]
            grown_masks[i] = grown
        return grown_masks

    def _grow_counts(self, drops: list[int], kept_masks: list[Optional[torch.Tensor]]) -> list[int]:
        """How many weights each layer regrows: its own drop count, or SNFS's momentum share."""
        if self._config.redistribute == "none":
            return list(drops)
        layers = [i for i, k in enumerate(kept_masks) if k is not None]
        weights, capacities = [], []
        for i in layers:
            kept = kept_masks[i]
            buf = criteria.momentum_buffer(self._params[i], self._optimizer)
            mean = float(buf.abs()[kept].mean()) if buf is not None and bool(kept.any()) else 0.0
            weights.append(mean if math.isfinite(mean) else 0.0)
            capacities.append(self._sizes[i] - (self._counts[i] - drops[i]))
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
        for i, (param, mask) in enumerate(zip(self._params, self._masks)):
            if grown[i] is None and self._counts[i] == self._sizes[i]:
                continue
            keep = mask if grown[i] is None else mask & ~grown[i]
            param.mul_(keep)
            for buf in self._state_tensors(param):
                if self._config.mask_optimizer_state:
                    buf.mul_(keep)
                elif grown[i] is not None:
                    buf.masked_fill_(grown[i], 0.0)

    # ------------------------------------------------------------------ statistics

    def target_density(self, step: Optional[int] = None) -> float:
        """The schedule's target density at ``step`` (default: the current step)."""
        step = self._step_count if step is None else step
        if self._pruning is None:
            return self._config.density
        return self._pruning.density(step)

    def density(self) -> float:
        """Fraction of the sparsified weights that are active."""
        return sum(self._counts) / self._total

    def layer_density(self) -> dict[str, float]:
        """Density of every sparsified tensor, by parameter name."""
        return {n: c / s for n, c, s in zip(self._names, self._counts, self._sizes)}

    def exploration_rate(self) -> Optional[float]:
        """Fraction of the sparsified weights that have ever been active (ITOP's R_s), if tracked."""
        if self._ever_active is None:
            return None
        return sum(_popcount(e) for e in self._ever_active) / self._total

    def stats(self) -> dict[str, Any]:
        """A JSON-friendly snapshot for logging."""
        last = self._last_update
        return {
            "step": self._step_count,
            "density": self.density(),
            "sparsity": 1.0 - self.density(),
            "target_density": self.target_density(),
            "active_weights": sum(self._counts),
            "sparsified_weights": self._total,
            "layer_density": self.layer_density(),
            "exploration_rate": self.exploration_rate(),
            "drop_fraction": self._regrowth.fraction(self._step_count) if self._regrowth else 0.0,
            "skipped_updates": self._skipped_updates,
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
            "config": self._config.to_dict(),
            "step": self._step_count,
            "names": list(self._names),
            "shapes": [list(p.shape) for p in self._params],
            "masks": {n: m.detach().cpu().clone() for n, m in zip(self._names, self._masks)},
            "ever_active": None if self._ever_active is None else {
                n: e.detach().cpu().clone() for n, e in zip(self._names, self._ever_active)
            },
            "init_counts": list(self._init_counts),
            "final_counts": list(self._final_counts),
            "skipped_updates": self._skipped_updates,
            "last_update": None if self._last_update is None else asdict(self._last_update),
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore a :meth:`state_dict`; the sparsified parameters must match by name and shape.

        Args:
            state: a dictionary from :meth:`state_dict`.
            strict: refuse a state made with another configuration (method, density, schedule,
                seed, ...). ``False`` loads it anyway with a warning naming the differing fields.

        Raises:
            TypeError: ``state`` is not a mapping.
            ValueError: parameters are missing, unexpected or differently shaped (all are named),
                masks are not boolean, or (``strict``) the configuration differs.
        """
        if not isinstance(state, Mapping):
            raise TypeError(
                f"a sparsifier state must be the mapping returned by Sparsifier.state_dict(), "
                f"got {type(state).__name__} {_short_repr(state)}"
            )
        masks = state.get("masks")
        if not isinstance(masks, Mapping):
            raise ValueError("not a granet sparsifier state: no 'masks' entry")
        checked = self._checked_masks(masks, "the state")
        self._check_config(state.get("config"), strict)
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"sparsifier state has an invalid step {step!r} (expected an int >= 0)")
        self._masks = [m.to(p.device).clone() for m, p in zip(checked, self._params)]
        self._counts = [int(torch.count_nonzero(m)) for m in self._masks]
        if state.get("ever_active") is not None and self._config.track_exploration:
            self._ever_active = [state["ever_active"][n].to(p.device).clone() for n, p in zip(self._names, self._params)]
        elif self._config.track_exploration:
            self._ever_active = [_pack_bits(m) for m in self._masks]
        self._init_counts = list(state.get("init_counts", self._init_counts))
        self._final_counts = list(state.get("final_counts", self._final_counts))
        self._step_count = step
        self._skipped_updates = int(state.get("skipped_updates", 0))
        last = state.get("last_update")
        self._last_update = UpdateReport(**last) if last else None
        self._pending_steps = 0
        self.apply_masks()
        if self._is_distributed:
            self.broadcast_masks()  # every rank resumes from rank 0's masks

    def _check_config(self, saved: Any, strict: bool) -> None:
        """Compare a state's config with this one: an error under ``strict``, else a warning."""
        if not isinstance(saved, Mapping):
            if strict:
                raise ValueError("sparsifier state has no 'config' entry; pass strict=False to load it anyway")
            return
        current = self._config.to_dict()
        # Fields the state predates are not compared: an older state stays loadable.
        differing = [f"{k}={saved[k]!r} in the state, {v!r} here" for k, v in current.items() if k in saved and saved[k] != v]
        if not differing:
            return
        if strict:
            raise ValueError(
                f"sparsifier state was made with another config ({'; '.join(differing)}); "
                "pass strict=False to load it anyway"
            )
        logger.warning("loading sparsifier state saved with a different config (%s)", "; ".join(differing))

    def _checked_masks(self, masks: Mapping[str, Any], source: str) -> list[torch.Tensor]:
        """``masks`` in parameter order, after checking names, shapes and dtype (all problems named)."""
        expected = dict(zip(self._names, (tuple(p.shape) for p in self._params)))
        problems = []
        missing = [n for n in self._names if n not in masks]
        unexpected = [str(n) for n in masks if n not in expected]
        if missing:
            problems.append(f"missing in {source}: {', '.join(missing)}")
        if unexpected:
            problems.append(f"not sparsified in this model: {', '.join(unexpected)}")
        present = [n for n in self._names if n in masks]
        not_tensors = [n for n in present if not isinstance(masks[n], torch.Tensor)]
        if not_tensors:
            problems.append(f"not tensors: {', '.join(not_tensors)}")
        tensors = [n for n in present if n not in not_tensors]
        shapes = [f"{n} ({source} {tuple(masks[n].shape)}, model {expected[n]})"
                  for n in tensors if tuple(masks[n].shape) != expected[n]]
        if shapes:
            problems.append(f"shape mismatch: {', '.join(shapes)}")
        dtypes = [f"{n} ({masks[n].dtype})" for n in tensors if masks[n].dtype != torch.bool]
        if dtypes:
            problems.append(f"not torch.bool: {', '.join(dtypes)}")
        if problems:
            raise ValueError(f"{source} do(es) not match the model's sparsified parameters: " + "; ".join(problems))
        return [masks[n] for n in self._names]

    @torch.no_grad()
    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Install the given boolean masks exactly, e.g. from a pruning-at-initialisation method.

        Weights outside the new masks, and their optimizer state, are zeroed; weights that become
        active keep their current values. The schedules and the step counter are unchanged. Under
        ``torch.distributed`` every rank must call it with the same masks (they are verified).

        Args:
            masks: ``{parameter name: torch.bool tensor of the parameter's shape}`` for every
                sparsified parameter (:attr:`names`), no more and no fewer.

        Raises:
            TypeError: ``masks`` is not a mapping.
            ValueError: names missing or unknown, shapes differ, or a mask is not ``torch.bool``.
        """
        if not isinstance(masks, Mapping):
            raise TypeError(f"masks must be a mapping {{name: bool tensor}}, got {type(masks).__name__}")
        checked = self._checked_masks(masks, "the given masks")
        self._masks = [m.to(p.device).clone() for m, p in zip(checked, self._params)]
        self._counts = [int(torch.count_nonzero(m)) for m in self._masks]
        for i, (param, mask) in enumerate(zip(self._params, self._masks)):
            if self._ever_active is not None:
                self._ever_active[i] |= _pack_bits(mask)
            param.mul_(mask)
            for buf in self._state_tensors(param):
                buf.mul_(mask)
        if self._is_distributed:
            self.verify_masks()

    def broadcast_masks(self, src: int = 0, group: Optional[Any] = None) -> None:
        """Make every rank's masks (and exploration bits) a copy of rank ``src``'s, then re-apply them.

        Runs by itself at construction and after :meth:`load_state_dict` when distributed; see
        :func:`granet.distributed.broadcast_masks`. Every rank must call it.
        """
        self._follow_param_devices()
        agree = {
            "sparsity config": self._config.to_dict(),
            "track_exploration": self._ever_active is not None,
            "per-layer pruning targets (init/final counts)": [self._init_counts, self._final_counts],
        }
        _distributed.broadcast_masks(
            self._names, self._masks, self._ever_active or [], step=self._step_count, agree=agree, src=src, group=group
        )
        self._counts = [int(torch.count_nonzero(m)) for m in self._masks]
        self.apply_masks()

    def verify_masks(self, group: Optional[Any] = None) -> None:
        """Raise :class:`~granet.distributed.MaskDivergenceError` unless every rank holds the same masks.

        Runs by itself after every topology update when distributed; see
        :func:`granet.distributed.verify_masks`. Every rank must call it.
        """
        self._follow_param_devices()
        _distributed.verify_masks(self._names, self._masks, self._step_count, self._skipped_updates, group)

    def remove(self) -> None:
        """Detach from the optimizer (removes the step hook); masks are left as they are."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __repr__(self) -> str:
        return (
            f"Sparsifier(method={self._config.method!r}, step={self._step_count}, layers={len(self._names)}, "
            f"density={self.density():.4f}, target={self._config.density})"
        )


def _short_repr(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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

