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
* **The sparsifier owns its state** (boolean masks, counts, exploration bits; see
  :mod:`granet.masking`): callers read views and ask named questions such as
  :meth:`Sparsifier.needs_dense_gradient`; only ``step()``, ``load_state_dict()`` and ``set_masks()``
  change the topology.
* **Every random choice** comes from a generator seeded by (seed, purpose, step, layer): resumes and
  distributed ranks reproduce it without saving or sharing RNG state. Under ``torch.distributed``
  the masks are still broadcast from rank 0 at start and verified after every update
  (:mod:`granet.distributed`), so a rank that drifted raises instead of training another network.

Inside one ``step()`` at optimizer step t the sparsifier zeroes the inactive weights (and, unless
SNFS-style, their optimizer state) that the optimizer moved; at an update step it first asks its
:class:`~granet.updater.TopologyUpdater` for the new masks (pruning, then drop-and-regrow; see
:mod:`granet.updater` for the order and rules) and installs them in the same pass.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import asdict
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from . import distributed as _distributed
from .fsdp import ShardedTopologyUpdater, ShardLayout
from .criteria import require_momentum
from .config import SparsityConfig
from .coverage import Coverage, log_coverage
from .errors import short_repr
from .masking import MaskedParameters, pack_bits
from .ranks import RankChecks
from .schedule_check import schedule_warnings
from .schedules import DropFractionSchedule, PruningSchedule
from .selection import DEFAULT_LAYER_TYPES, LayerType, select_parameters
from .selection import sparsifiable_parameters  # noqa: F401  (re-exported: granet.sparsifier.sparsifiable_parameters)
from .topology import UpdateReport
from .updater import TopologyUpdater

logger = logging.getLogger(__name__)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _count_entry(value: Any, key: str) -> int:
    """A state entry that must be an int >= 0 (step, skipped updates)."""
    if not _is_count(value):
        raise ValueError(f"sparsifier state has an invalid {key} {short_repr(value)} (expected an int >= 0)")
    return int(value)


class Sparsifier(RankChecks, MaskedParameters):
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
            group with more than one rank is initialised. See :mod:`granet.distributed`. Under FSDP2
            (DTensor weights) masks are sharded like the weights instead; see :mod:`granet.fsdp`.
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
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__} {short_repr(model)}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        self._config = config if config is not None else SparsityConfig()
        self._config.validate()
        self.selection = select_parameters(
            model, layer_types, self._config.keep_dense, include, exclude, dense_embeddings
        )
        targets = self.selection.selected
        if not targets:
            raise ValueError("the model has no sparsifiable weights: " + self.selection.coverage().dense_reasons())
        super().__init__([n for n, _ in targets], [p for _, p in targets], optimizer, self._config.mask_optimizer_state)
        cfg = self._config
        if round(cfg.density * self.total) < 1:
            raise ValueError(f"density {cfg.density:g} keeps no weight: {cfg.density:g} x {self.total:,} sparsified "
                             f"weights rounds to 0 (the lowest usable density here is {1 / self.total:.3g})")
        self._layout = ShardLayout.detect(self._names, self._params)
        self._model_ref = weakref.ref(model)
        self._updater = TopologyUpdater(cfg) if self._layout is None else ShardedTopologyUpdater(cfg, self._layout)
        if self._updater.grow.needs_momentum and self._updater.regrowth is not None:
            require_momentum(optimizer)
        for message in schedule_warnings(self._updater.pruning, self._updater.regrowth, cfg.total_steps):
            logger.warning(message)

        self._step_count = 0
        self._pending_steps = 0
        self._skipped_updates = 0
        self._last_update: Optional[UpdateReport] = None
        self._masks = self._updater.initial_masks(self._params)
        self._counts = self._count(self._masks)
        self._init_counts = list(self._counts)
        self._final_counts = self._updater.final_layer_counts([p.shape for p in self._params], self._init_counts)
        self._ever_active = [pack_bits(m) for m in self._masks] if cfg.track_exploration else None
        if self._layout is not None and distributed is False:
            raise ValueError("distributed=False: the model's weights are FSDP shards, whose masks need collectives")
        # Under FSDP masks differ per rank by design: the sharded checks replace the DDP ones.
        self._is_distributed = self._layout is None and (
            _distributed.is_distributed() if distributed is None else bool(distributed))
        if self._is_distributed and not _distributed.is_initialised():
            raise ValueError("distributed=True needs an initialised torch.distributed process group")
        self.apply_masks()
        if self._is_distributed:
            # Masks are a function of the config, but a rank built from another config or model would
            # silently train another network: rank 0's masks win (the broadcast checks the layout first).
            self.broadcast_masks()
        self._hook = optimizer.register_step_post_hook(self._on_optimizer_step) if optimizer is not None else None
        log_coverage(self.coverage())

    # ------------------------------------------------------------------ read-only views

    @property
    def config(self) -> SparsityConfig:
        """A copy of the configuration (changing it does not change the sparsifier)."""
        return self._config.replace()

    @property
    def init_counts(self) -> list[int]:
        """Per-layer active counts at construction (the start of layer-wise pruning), a copy."""
        return list(self._init_counts)

    @property
    def final_counts(self) -> list[int]:
        """Per-layer targets of layer-wise pruning (empty for other methods), a copy."""
        return list(self._final_counts)

    @property
    def pruning(self) -> Optional[PruningSchedule]:
        """The gradual pruning schedule (frozen), or ``None`` for methods that do not prune."""
        return self._updater.pruning

    @property
    def regrowth(self) -> Optional[DropFractionSchedule]:
        """The drop-fraction schedule of drop-and-regrow (frozen), or ``None`` without regrowth."""
        return self._updater.regrowth

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
        """Whether masks are kept consistent across ranks: identical (DDP) or sharded (FSDP)."""
        return self._is_distributed or self._layout is not None

    @property
    def sharded(self) -> bool:
        """Whether the weights are FSDP2 shards (masks then hold this rank's rows; see :mod:`granet.fsdp`)."""
        return self._layout is not None

    @property
    def reached_final_density(self) -> bool:
        """Whether the schedule's final density has been reached (always, for constant-density methods).

        Model selection on validation accuracy is only fair among models at the final density.
        """
        return self._updater.reached_final_density(self._step_count)

    def is_update_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) prunes and/or drops and regrows."""
        return self._updater.is_update_step(step)

    def needs_dense_gradient(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) of this method computes the dense weight gradient.

        The grow criterion says (:attr:`~granet.criteria.GrowCriterion.dense_gradient`): gradient
        regrowth (RigL, GraNet) needs it on its regrowth update steps; momentum regrowth (SNFS)
        needs dense momentum, hence the dense gradient, on every step while regrowth is
        configured; random regrowth (SET), pruning and static masks never do. The training-FLOPs
        ledger asks this before ``sparsifier.step()``, i.e. for ``step_count + 1``.
        """
        return self._updater.needs_dense_gradient(step)

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
        if first == 1:
            self._check_params_current()  # also at every update
        self._step_count += new_steps
        if not any(self.is_update_step(t) for t in range(first, self._step_count + 1)):
            self.apply_masks()
            return None
        return self._update(self._step_count)  # installs the new masks in the same pass

    # ------------------------------------------------------------------ topology updates

    @torch.no_grad()
    def _update(self, step: int) -> UpdateReport:
        """Prune and/or drop-and-regrow at ``step``, then zero weights and optimizer state in one pass."""
        self._check_params_current()
        report = UpdateReport(step=step, target_density=self.target_density(step))
        report.layers = {n: {"pruned": 0, "dropped": 0, "regrown": 0} for n in self._names}
        if not self._updater.gradients_finite(self._params):
            self.apply_masks()
            report.skipped = True
            report.density = self.density()
            self._skipped_updates += 1
            self._last_update = report
            logger.warning("step %d: non-finite gradients, topology update skipped", step)
            if self.distributed:
                # Under DDP the all-reduced gradients are non-finite on every rank or on none, so all
                # ranks skip together. Verifying here too keeps the collective schedule a function of
                # the step alone: a rank that skipped alone raises instead of deadlocking the others.
                self.verify_masks()
            return report
        reset: list[Optional[torch.Tensor]] = [None] * len(self._params)
        if self._updater.is_prune_step(step):  # pruning only removes positions: nothing new explored
            self._set_topology(self._updater.prune(
                step, self._params, self._masks, self._counts, self._init_counts, self._final_counts
            ), report, pruning=True)
        if self._updater.is_regrowth_step(step):
            regrowth = self._updater.drop_and_grow(
                step, self._names, self._params, self._masks, self._counts, self._optimizer, report
            )
            regrown = self._set_topology(regrowth.masks, report, pruning=False)
            reset = regrowth.reset
            if self._ever_active is not None:
                self._explore(sorted(regrown), regrowth.grown)
        self._install(reset)
        for key in ("pruned", "dropped", "regrown"):
            setattr(report, key, sum(v[key] for v in report.layers.values()))
        report.density = self.density()
        self._last_update = report
        if self.distributed:
            self.verify_masks()  # one small all-reduce; raises MaskDivergenceError
        logger.debug(
            "step %d: pruned %d, dropped %d, regrew %d, density %.5f",
            step, report.pruned, report.dropped, report.regrown, report.density,
        )
        return report

    def _set_topology(self, masks: list[torch.Tensor], report: UpdateReport, pruning: bool) -> set[int]:
        """Take the updater's masks (installed later); return the changed layers. Pruned layers are
        recounted; after drop-and-regrow the count is exact from the report (no pass over the mask)."""
        changed = [i for i, new in enumerate(masks) if new is not self._masks[i]]
        if pruning:
            for i, count in zip(changed, self._count([masks[i] for i in changed])):
                report.layers[self._names[i]]["pruned"] = self._counts[i] - count
                self._counts[i] = count
        else:
            for i in changed:
                layer = report.layers[self._names[i]]
                self._counts[i] += layer["regrown"] - layer["dropped"]
        for i in changed:
            self._masks[i] = masks[i]
        return set(changed)

    # ------------------------------------------------------------------ statistics

    def target_density(self, step: Optional[int] = None) -> float:
        """The schedule's target density at ``step`` (default: the current step)."""
        return self._updater.target_density(self._step_count if step is None else step)

    def coverage(self) -> Coverage:
        """Which of the model's weights are under masks (with current densities), which are dense and why."""
        return self.selection.coverage(self.layer_density())

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
            "drop_fraction": self._updater.drop_fraction(self._step_count),
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
            "masks": {n: m.detach().cpu().clone() for n, m in zip(self._names, self._full(self._masks))},
            "ever_active": None if self._ever_active is None else {
                n: e.detach().cpu().clone() for n, e in zip(self._names, self._full(self._ever_active, packed=True))
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
                f"got {type(state).__name__} {short_repr(state)}"
            )
        masks = state.get("masks")
        if not isinstance(masks, Mapping):
            raise ValueError("not a granet sparsifier state: no 'masks' entry")
        checked = self._checked_masks(masks, "the state")
        self._config.check_saved(state.get("config"), strict)
        # Everything is checked before anything is changed: a refused state leaves the sparsifier as it was.
        step = _count_entry(state.get("step"), "step")
        skipped = _count_entry(state.get("skipped_updates", 0), "skipped_updates")
        ever_active = self._checked_ever_active(state.get("ever_active"))
        init_counts = self._checked_counts(state.get("init_counts", self._init_counts), "init_counts")
        final = state.get("final_counts", self._final_counts)
        final_counts = [] if isinstance(final, list) and not final else self._checked_counts(final, "final_counts")
        last = state.get("last_update")
        try:
            last_update = UpdateReport(**last) if last else None
        except TypeError:
            raise ValueError(f"sparsifier state has an invalid last_update {short_repr(last)}") from None
        self._counts = [int(torch.count_nonzero(m)) for m in checked]  # full masks: global counts
        self._masks = [self._rows(m, i).to(p.device).clone() for i, (m, p) in enumerate(zip(checked, self._params))]
        if ever_active is not None and self._config.track_exploration:
            self._ever_active = [self._rows(e, i, packed=True).to(p.device).clone()
                                 for i, (e, p) in enumerate(zip(ever_active, self._params))]
        elif self._config.track_exploration:
            self._ever_active = [pack_bits(m) for m in self._masks]
        self._init_counts, self._final_counts = init_counts, final_counts
        self._step_count = step
        self._skipped_updates = skipped
        self._last_update = last_update
        self._pending_steps = 0
        self.apply_masks()
        if self._is_distributed:
            self.broadcast_masks()  # every rank resumes from rank 0's masks

    def _checked_ever_active(self, ever_active: Any) -> Optional[list[torch.Tensor]]:
        """The saved exploration bits in parameter order (``None`` if absent), checked against the layers."""
        if ever_active is None:
            return None
        if not isinstance(ever_active, Mapping) or set(ever_active) != set(self._names):
            raise ValueError("sparsifier state has an invalid ever_active entry (expected the packed bits of "
                             "every sparsified parameter)")
        out = []
        for name, size in zip(self._names, self._sizes):
            bits = ever_active[name]
            if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or tuple(bits.shape) != (-(-size // 8),):
                got = (f"{bits.dtype} {tuple(bits.shape)}" if isinstance(bits, torch.Tensor)
                       else type(bits).__name__)
                raise ValueError(f"sparsifier state: ever_active of {name} is {got}, expected uint8 "
                                 f"({-(-size // 8)},) (8 weights per byte)")
            out.append(bits)
        return out

    def _checked_counts(self, counts: Any, key: str) -> list[int]:
        """A per-layer count list of the state: one int in [0, layer size] per sparsified parameter."""
        if (not isinstance(counts, (list, tuple)) or len(counts) != len(self._sizes)
                or not all(_is_count(c) and c <= n for c, n in zip(counts, self._sizes))):
            raise ValueError(f"sparsifier state has an invalid {key} {short_repr(counts)} (expected "
                             f"{len(self._sizes)} counts, each between 0 and its layer's size)")
        return [int(c) for c in counts]

    @torch.no_grad()
    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Install the given boolean masks exactly, e.g. from a pruning-at-initialisation method.

        Weights outside the new masks, and their optimizer state, are zeroed; weights that become
        active keep their current values. The schedules and the step counter are unchanged. Before
        the first optimizer step the "ever active" record restarts from the new masks (the previous
        ones never trained); later it accumulates them. Under ``torch.distributed`` every rank must
        call it; rank 0's masks are installed everywhere *before* anything is zeroed, so a rank that
        computed other masks (e.g. scored its own data) loses no weight that rank 0 keeps.

        Args:
            masks: ``{parameter name: torch.bool tensor of the parameter's shape}`` for every
                sparsified parameter (:attr:`names`), no more and no fewer.

        Raises:
            TypeError: ``masks`` is not a mapping.
            ValueError: names missing or unknown, shapes differ, or a mask is not ``torch.bool``.
        """
        if not isinstance(masks, Mapping):
            raise TypeError(f"masks must be a mapping {{name: bool tensor}}, got {type(masks).__name__}")
        checked = self._checked_masks(masks, "the mapping given to set_masks")
        if self._step_count == 0 and self._ever_active is not None:
            self._ever_active = [torch.zeros_like(e) for e in self._ever_active]
        if self._is_distributed:
            self._masks = [m.to(p.device).clone() for m, p in zip(checked, self._params)]
            self.broadcast_masks()  # rank 0's masks on every rank, then applied
            checked = self._masks
        elif self._layout is not None:  # every rank must pass the same full masks: checked, then sliced
            _distributed.verify_masks(self._names, checked, self._step_count, self._skipped_updates, self._layout.group)
            checked = [self._rows(m, i) for i, m in enumerate(checked)]
        self._install_exactly(checked)

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

