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
* **The sparsifier owns its parts** (no mixins): the mask state (boolean masks, counts,
  exploration bits; :class:`~granet.sparsity.masking.MaskState`), a strategy for the process layout (one
  process, DDP or FSDP2; :mod:`granet.sparsity.layouts`) and the update policy
  (:class:`~granet.sparsity.updater.TopologyUpdater`, handed the layout's ``solver``). Callers read views and
  ask named questions such as :meth:`Sparsifier.needs_dense_gradient`; only ``step()``,
  ``load_state_dict()`` and ``set_masks()`` change the topology.
* **Every random choice** comes from a generator seeded by (seed, purpose, step, layer): resumes and
  distributed ranks reproduce it without saving or sharing RNG state. Under ``torch.distributed``
  the masks are still broadcast from rank 0 at start and verified after every update
  (:mod:`granet.parallel.mask_sync`), so a rank that drifted raises instead of training another network.

Inside one ``step()`` at optimizer step t the sparsifier zeroes the inactive weights (and, unless
SNFS-style, their optimizer state) that the optimizer moved; at an update step it first asks its
:class:`~granet.sparsity.updater.TopologyUpdater` for the new masks (pruning, then drop-and-regrow; see
:mod:`granet.sparsity.updater` for the order and rules) and installs them in the same pass.

A pickled sparsifier (``pickle.dumps(sparsifier)``, ``copy.deepcopy``) is its :meth:`Sparsifier.state_dict`:
unpickled, it holds the config, step, masks, counts and exploration bits, but no model, parameters
or optimizer (they belong to the training process), so :meth:`Sparsifier.state_dict`, the views and the
statistics work and everything that touches weights raises. To train on, build a sparsifier on the
model and ``load_state_dict(restored.state_dict())``.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import asdict
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import short_repr
from .config import ResolvedSparsity, SparsityConfig
from .coverage import Coverage, log_coverage
from .criteria import require_momentum
from .health import HealthMonitor, HealthReport, alive_units, unit_dims
from .layouts import ProcessLayout, SingleProcess, process_layout
from .masking import MaskState
from .schedule_check import schedule_warnings
from .schedules import DropFractionSchedule, PruningSchedule
from .structure import check_layer
from .targets import (
    DEFAULT_LAYER_TYPES,
    LayerType,
    Selection,
    select_parameters,
    sparsifiable_parameters,  # noqa: F401  (re-exported: granet.sparsity.sparsifier.sparsifiable_parameters)
)
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


def _health_entry(value: Any) -> Optional[Mapping[str, Any]]:
    """The state's health entry (``None`` when absent: saved before health checks existed)."""
    if value is not None and not isinstance(value, Mapping):
        raise ValueError(f"sparsifier state has an invalid health entry {short_repr(value)}")
    return value


_DETACHED = ("this sparsifier was restored from a pickle: it holds the state and config but no model, "
             "parameters or optimizer; build a sparsifier on the model and load_state_dict(restored.state_dict())")


class Sparsifier:
    """Keeps a model's Conv/Linear weights sparse and evolves their masks during training.

    Prefer :func:`granet.create_sparsifier` to build one from a method name.

    Args:
        model: the model to sparsify (its weights are zeroed in place where masks are False).
        optimizer: the training optimizer. It is used to count real optimizer steps (so skipped AMP
            steps and gradient-accumulation micro-steps do not count), to zero the optimizer state of
            pruned and regrown weights, and for momentum regrowth. ``None`` makes every ``step()``
            call count as one optimizer step and leaves optimizer state alone.
        config: the method's configuration, checked and resolved here (:meth:`SparsityConfig.resolve
            <granet.sparsity.config.SparsityConfig.resolve>`) unless it already is a resolution.
        layer_types: module types (or class names) whose weights are sparsified; the default covers
            ``nn.Linear``, ``nn.Conv*``, ``transformers``' ``Conv1D`` and ``nn.MultiheadAttention``.
        include: parameter-name patterns selecting the masked tensors instead of ``layer_types``.
        exclude: parameter-name patterns kept dense (like ``config.keep_dense``).
        dense_embeddings: keep embeddings and weights tied to them dense (default).
        distributed: keep the masks identical across the ranks of ``torch.distributed``: broadcast
            them from rank 0 now and after :meth:`load_state_dict`, and verify them (one small
            all-reduce) after every topology update. ``None`` (default) turns it on when a process
            group with more than one rank is initialised. See :mod:`granet.parallel.mask_sync`. Under FSDP2
            (DTensor weights) masks are sharded like the weights instead; see :mod:`granet.sparsity.fsdp_layout`.

    Pickling keeps the :meth:`state_dict` only (see the module notes); a sharded sparsifier is not
    picklable (its state dict is a collective).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        config: Optional[Union[SparsityConfig, ResolvedSparsity]] = None,
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
        resolved = config if isinstance(config, ResolvedSparsity) else (
            config if config is not None else SparsityConfig()).resolve()
        self._config = resolved.given
        self.selection: Optional[Selection] = select_parameters(
            model, layer_types, self._config.keep_dense, include, exclude, dense_embeddings
        )
        targets = self.selection.selected
        if not targets:
            raise ValueError("the model has no sparsifiable weights: " + self.selection.coverage().dense_reasons())
        names, params = [n for n, _ in targets], [p for _, p in targets]
        cfg = resolved.config
        total = sum(p.numel() for p in params)
        if round(cfg.density * total) < 1:
            raise ValueError(f"density {cfg.density:g} keeps no weight: {cfg.density:g} x {total:,} sparsified "
                             f"weights rounds to 0 (the lowest usable density here is {1 / total:.3g})")
        self._ranks: ProcessLayout = process_layout(names, params, distributed)
        self._state = MaskState(names, params, optimizer, cfg.mask_optimizer_state, self._ranks)
        self._model_ref: Optional[weakref.ReferenceType[nn.Module]] = weakref.ref(model)
        dims = unit_dims([c.kind for c in self.selection.candidates if c.selected])
        if cfg.protect_units and self._ranks.sharded and any(dims):
            in_by_out = [n for n, d in zip(names, dims) if d]
            raise ValueError(f"protect_units under FSDP needs weights stored out x in; {', '.join(in_by_out[:3])} "
                             "are in x out (transformers' Conv1D, transposed convolutions): keep them dense or "
                             "train without protect_units")
        structure = cfg.parsed_structure
        if structure.structured:
            if self._ranks.sharded:
                raise ValueError(f"structure {structure} is not supported under FSDP yet (its per-group and per-row "
                                 "selections are solved in one process or under DDP only): train with DDP or "
                                 "without a structure")
            for name, param, dim in zip(names, params, dims):
                check_layer(structure, name, tuple(param.shape), dim)
        self._unit_dims = dims
        self._updater = TopologyUpdater(resolved, solver=self._ranks.solver, unit_dims=dims)
        if self._updater.grow.needs_momentum and self._updater.regrowth is not None:
            require_momentum(optimizer)
        for message in schedule_warnings(self._updater.pruning, self._updater.regrowth, cfg.total_steps):
            logger.warning(message)

        self._step_count = 0
        self._pending_steps = 0
        self._skipped_updates = 0
        self._last_update: Optional[UpdateReport] = None
        self._detached = False
        self._state.start(self._updater.initial_masks(params), cfg.track_exploration)
        self._updater.check_structure(names, list(self._state.masks.values()))
        self._health = HealthMonitor(names, self._state.shapes, dims)
        self._init_counts = self._state.counts
        self._final_counts = self._updater.final_layer_counts(self._state.shapes, self._init_counts)
        self._state.apply()
        if self._ranks.replicated:
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
    def optimizer(self) -> Optional[torch.optim.Optimizer]:
        """The optimizer whose state is masked (``None``: none)."""
        return self._state.optimizer

    @property
    def names(self) -> list[str]:
        """Names of the sparsified parameters, in model order (a copy)."""
        return self._state.names

    @property
    def params(self) -> tuple[nn.Parameter, ...]:
        """The sparsified parameters, in the order of :attr:`names`."""
        self._require_model()
        return self._state.params

    @property
    def sizes(self) -> list[int]:
        """Number of entries of each sparsified parameter (a copy)."""
        return self._state.sizes

    @property
    def total(self) -> int:
        """Number of sparsified weights."""
        return self._state.total

    @property
    def masks(self) -> Mapping[str, torch.Tensor]:
        """Read-only ``{name: torch.bool mask}`` of the current topology.

        The tensors are the live masks (no copy): read them, never change them in place; install
        other masks with ``set_masks``. Under FSDP each is this rank's rows.
        """
        return self._state.masks

    def mask_of(self, name: str) -> torch.Tensor:
        """The live ``torch.bool`` mask of parameter ``name`` (read it, do not change it in place)."""
        return self._state.mask_of(name)

    @property
    def counts(self) -> list[int]:
        """Active weights per sparsified parameter (a copy)."""
        return self._state.counts

    @property
    def ever_active(self) -> Optional[tuple[torch.Tensor, ...]]:
        """Bit-packed "ever active" masks per layer (``uint8``), or ``None`` if not tracked."""
        return self._state.ever_active

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
    def upcoming_step(self) -> int:
        """The optimizer step (1-based) that the next backward pass computes gradients for: after the
        steps counted and those the optimizer took since the last :meth:`step` call."""
        return self._step_count + self._pending_steps + 1

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
        return self._ranks.replicated or self._ranks.sharded

    @property
    def sharded(self) -> bool:
        """Whether the weights are FSDP2 shards (masks then hold this rank's rows; see :mod:`.fsdp_layout`)."""
        return self._ranks.sharded

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

        The grow criterion says (:attr:`~granet.sparsity.criteria.GrowCriterion.dense_gradient`): gradient
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
        self._require_model()
        if self._state.optimizer is None:
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
            self._state.apply()
            return None
        return self._update(self._step_count)  # installs the new masks in the same pass

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every inactive weight (and its optimizer state, unless disabled) in place."""
        self._require_model()
        self._state.apply()

    # ------------------------------------------------------------------ topology updates

    @torch.no_grad()
    def _update(self, step: int) -> UpdateReport:
        """Prune and/or drop-and-regrow at ``step``, then zero weights and optimizer state in one pass."""
        self._check_params_current()
        state, names, params = self._state, self._state.names, self._state.params
        report = UpdateReport(step=step, target_density=self.target_density(step))
        report.layers = {n: {"pruned": 0, "dropped": 0, "regrown": 0} for n in names}
        if not self._ranks.gradients_finite(params):
            state.apply()
            report.skipped = True
            report.density = state.density()
            self._skipped_updates += 1
            self._last_update = report
            logger.warning("step %d: non-finite gradients, topology update skipped", step)
            if self.distributed:
                # Under DDP the all-reduced gradients are non-finite on every rank or on none, so all
                # ranks skip together. Verifying here too keeps the collective schedule a function of
                # the step alone: a rank that skipped alone raises instead of deadlocking the others.
                self.verify_masks()
            return report
        # The network that trained since the previous update, before this one changes it.
        report.health = self._health.check(step, params, list(state.masks.values()), state.counts, self._ranks,
                                           update=True).to_dict()
        reset: list[Optional[torch.Tensor]] = [None] * len(params)
        if self._updater.is_prune_step(step):  # pruning only removes positions: nothing new explored
            self._take(self._updater.prune(
                step, params, list(state.masks.values()), state.counts, self._init_counts, self._final_counts,
                names=names, optimizer=state.optimizer,
            ), report, pruning=True)
        if self._updater.is_regrowth_step(step):
            masks = list(state.masks.values())
            alive = alive_units(masks, self._unit_dims, self._ranks) if self._config.protect_units else None
            regrowth = self._updater.drop_and_grow(step, names, params, masks, state.counts, state.optimizer, report,
                                                   alive=alive)
            regrown = self._take(regrowth.masks, report, pruning=False)
            reset = regrowth.reset
            if state.ever_active is not None:
                state.explore(regrown, regrowth.grown)
        state.install(reset)
        self._updater.check_structure(names, list(state.masks.values()))
        for key in ("pruned", "dropped", "regrown"):
            setattr(report, key, sum(v[key] for v in report.layers.values()))
        report.density = state.density()
        self._last_update = report
        if self.distributed:
            self.verify_masks()  # one small all-reduce; raises MaskDivergenceError
        logger.debug(
            "step %d: pruned %d, dropped %d, regrew %d, density %.5f",
            step, report.pruned, report.dropped, report.regrown, report.density,
        )
        return report

    def _take(self, masks: list[torch.Tensor], report: UpdateReport, pruning: bool) -> list[int]:
        """Take the updater's masks (installed later); return the changed layers, in order. Pruned
        layers are recounted; after drop-and-regrow the count is exact from the report (no pass)."""
        changed = self._state.changed(masks)
        counts, names = self._state.counts, self._state.names
        if pruning:
            new_counts = self._state.count([masks[i] for i in changed])
            for i, count in zip(changed, new_counts):
                report.layers[names[i]]["pruned"] = counts[i] - count
        else:
            new_counts = [counts[i] + report.layers[names[i]]["regrown"] - report.layers[names[i]]["dropped"]
                          for i in changed]
        self._state.replace(changed, [masks[i] for i in changed], new_counts)
        return changed

    # ------------------------------------------------------------------ consistency across ranks

    def _agreement(self) -> dict[str, Any]:
        """What every rank must agree on before masks are broadcast (besides layers and step)."""
        return {
            "sparsity config": self._config.to_dict(),
            "track_exploration": self._state.ever_active is not None,
            "per-layer pruning targets (init/final counts)": [self._init_counts, self._final_counts],
        }

    def broadcast_masks(self, src: int = 0, group: Optional[Any] = None) -> None:
        """Make every rank's masks (and exploration bits) a copy of rank ``src``'s, then re-apply them.

        Runs by itself at construction and after :meth:`load_state_dict` when distributed; see
        :func:`granet.parallel.mask_sync.broadcast_masks`. Every rank must call it.

        Raises:
            ValueError: under FSDP (every rank holds its own rows; nothing to copy).
        """
        self._require_model()
        self._ranks.broadcast(self._state, self._step_count, self._agreement(), src=src, group=group)

    def verify_masks(self, group: Optional[Any] = None) -> None:
        """Raise :class:`~granet.parallel.mask_sync.MaskDivergenceError` unless every rank holds the same masks.

        Runs by itself after every topology update when distributed; see
        :func:`granet.parallel.mask_sync.verify_masks` (under FSDP: the ranks agree on step and counts).
        Every rank must call it.
        """
        self._require_model()
        self._ranks.verify(self._state, self._step_count, self._skipped_updates, group=group)

    # ------------------------------------------------------------------ statistics

    def density(self) -> float:
        """Fraction of the sparsified weights that are active."""
        return self._state.density()

    def layer_density(self) -> dict[str, float]:
        """Density of every sparsified tensor, by parameter name."""
        return self._state.layer_density()

    def exploration_rate(self) -> Optional[float]:
        """Fraction of the sparsified weights that have ever been active (ITOP's R_s), if tracked."""
        return self._state.exploration_rate()

    def target_density(self, step: Optional[int] = None) -> float:
        """The schedule's target density at ``step`` (default: the current step)."""
        return self._updater.target_density(self._step_count if step is None else step)

    @torch.no_grad()
    def check_health(self, loss: Optional[float] = None, classes: Optional[int] = None) -> HealthReport:
        """Check the network for the signs of a collapse now (see :mod:`granet.sparsity.health`).

        Topology updates run the check by themselves (``UpdateReport.health``); a training loop may
        call this at the end of each epoch, with the epoch's training loss and the number of
        classes to also follow how long the loss has been at chance level, ln(classes). Each
        condition found is logged once as a one-line warning. Under FSDP every rank must call it.

        Args:
            loss: the epoch's mean training loss (``None``: not followed).
            classes: the number of classes of that loss (needed with ``loss``).

        Returns:
            The report, also kept as :attr:`health` and in :meth:`stats`.

        Raises:
            ValueError: ``loss`` without a valid ``classes``.
        """
        self._require_model()
        if loss is not None:
            self._health.observe_loss(float(loss), classes)  # type: ignore[arg-type]
        state = self._state
        return self._health.check(self._step_count, state.params, list(state.masks.values()), state.counts,
                                  self._ranks, update=False)

    @property
    def health(self) -> Optional[HealthReport]:
        """The latest health check (at a topology update or :meth:`check_health`), ``None`` before one."""
        return self._health.last

    @property
    def health_flags(self) -> dict[str, int]:
        """``{condition: optimizer step it was first found}`` of every health condition found so far."""
        return self._health.first_seen

    def coverage(self) -> Coverage:
        """Which of the model's weights are under masks (with current densities), which are dense and why."""
        if self.selection is None:
            raise RuntimeError(_DETACHED)
        return self.selection.coverage(self.layer_density())

    def stats(self) -> dict[str, Any]:
        """A JSON-friendly snapshot for logging."""
        last = self._last_update
        return {
            "step": self._step_count,
            "density": self.density(),
            "sparsity": 1.0 - self.density(),
            "target_density": self.target_density(),
            "active_weights": sum(self._state.counts),
            "sparsified_weights": self._state.total,
            "layer_density": self.layer_density(),
            "exploration_rate": self.exploration_rate(),
            "drop_fraction": self._updater.drop_fraction(self._step_count),
            "skipped_updates": self._skipped_updates,
            "last_update": None if last is None else {
                "step": last.step, "pruned": last.pruned, "dropped": last.dropped,
                "regrown": last.regrown, "skipped": last.skipped,
            },
            "health": None if self._health.last is None else self._health.last.to_dict(),
            "health_flags": self._health.first_seen,
        }

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly: config, step, masks, exploration bits, counts.

        Random choices are functions of (seed, step, layer), so no generator state is needed. Under
        FSDP the full masks are gathered: a collective every rank must call.
        """
        state, names = self._state, self._state.names
        ever = state.ever_active
        return {
            "format": 1,
            "config": self._config.to_dict(),
            "step": self._step_count,
            "names": names,
            "shapes": [list(s) for s in state.shapes],
            "masks": {n: m.detach().cpu().clone() for n, m in zip(names, self._ranks.full(list(state.masks.values())))},
            "ever_active": None if ever is None else {
                n: e.detach().cpu().clone() for n, e in zip(names, self._ranks.full(list(ever), packed=True))
            },
            "init_counts": list(self._init_counts),
            "final_counts": list(self._final_counts),
            "skipped_updates": self._skipped_updates,
            "last_update": None if self._last_update is None else asdict(self._last_update),
            "health": self._health.state_dict(self._ranks, list(state.masks.values())),
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
        self._require_model()
        if not isinstance(state, Mapping):
            raise TypeError(
                f"a sparsifier state must be the mapping returned by Sparsifier.state_dict(), "
                f"got {type(state).__name__} {short_repr(state)}"
            )
        masks = state.get("masks")
        if not isinstance(masks, Mapping):
            raise ValueError("not a granet sparsifier state: no 'masks' entry")
        checked = self._state.check_masks(masks, "the state")
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
        self._check_given_structure(checked, "the state")
        counts = [int(torch.count_nonzero(m)) for m in checked]  # full masks: whole-layer counts
        rows = self._ranks.rows
        health = self._health.parse_state(_health_entry(state.get("health")), self._ranks)
        self._state.load(
            [rows(m, i) for i, m in enumerate(checked)], counts,
            None if ever_active is None else [rows(e, i, packed=True) for i, e in enumerate(ever_active)],
            self._config.track_exploration,
        )
        self._init_counts, self._final_counts = init_counts, final_counts
        self._step_count = step
        self._skipped_updates = skipped
        self._last_update = last_update
        self._health.restore(health)  # a state saved before health checks existed: afresh
        self._pending_steps = 0
        self._state.apply()
        if self._ranks.replicated:
            self.broadcast_masks()  # every rank resumes from rank 0's masks

    def _check_given_structure(self, masks: Sequence[torch.Tensor], what: str) -> None:
        """Refuse masks (full tensors) that break the configured structure, naming the first such layer."""
        for i, (name, mask) in enumerate(zip(self._state.names, masks)):
            violation = self._updater.structure_violation(i, mask)
            if violation is not None:
                raise ValueError(f"the mask of {name} in {what} breaks structure {self._updater.structure}: "
                                 f"{violation}")

    def _checked_ever_active(self, ever_active: Any) -> Optional[list[torch.Tensor]]:
        """The saved exploration bits in parameter order (``None`` if absent), checked against the layers."""
        if ever_active is None:
            return None
        names = self._state.names
        if not isinstance(ever_active, Mapping) or set(ever_active) != set(names):
            raise ValueError("sparsifier state has an invalid ever_active entry (expected the packed bits of "
                             "every sparsified parameter)")
        out = []
        for name, size in zip(names, self._state.sizes):
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
        sizes = self._state.sizes
        if (not isinstance(counts, (list, tuple)) or len(counts) != len(sizes)
                or not all(_is_count(c) and c <= n for c, n in zip(counts, sizes))):
            raise ValueError(f"sparsifier state has an invalid {key} {short_repr(counts)} (expected "
                             f"{len(sizes)} counts, each between 0 and its layer's size)")
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
        self._require_model()
        if not isinstance(masks, Mapping):
            raise TypeError(f"masks must be a mapping {{name: bool tensor}}, got {type(masks).__name__}")
        checked = self._state.check_masks(masks, "the mapping given to set_masks")
        self._check_given_structure(checked, "the mapping given to set_masks")
        if self._step_count == 0:
            self._state.reset_exploration()
        checked = self._ranks.adopt(self._state, checked, self._step_count, self._skipped_updates, self._agreement())
        self._state.install_exactly(checked)

    def remove(self) -> None:
        """Detach from the optimizer (removes the step hook); masks are left as they are."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ------------------------------------------------------------------ the model

    def _check_params_current(self) -> None:
        """Raise if the model no longer holds the masked parameters (e.g. ``fully_shard`` or another
        wrapper replaced them after the sparsifier was built): masks would act on dead tensors."""
        model = self._model_ref() if self._model_ref is not None else None
        if model is None:
            return
        live = {id(p) for p in model.parameters()}
        stale = [n for n, p in zip(self._state.names, self._state.params) if id(p) not in live]
        if stale:
            raise RuntimeError(
                f"the model's parameters {', '.join(stale[:3])}{' ...' if len(stale) > 3 else ''} were replaced "
                "after the sparsifier was built (e.g. by fully_shard): build the optimizer and the sparsifier "
                "after wrapping the model"
            )

    def _require_model(self) -> None:
        """Refuse what needs the weights on a sparsifier restored from a pickle."""
        if self._detached:
            raise RuntimeError(_DETACHED)

    # ------------------------------------------------------------------ pickling

    def __getstate__(self) -> dict[str, Any]:
        """The pickled form: the :meth:`state_dict` (see the module notes for what unpickling gives).

        Raises:
            TypeError: the sparsifier is sharded (its state dict is a collective; save
                ``state_dict()`` on every rank instead).
        """
        if self._ranks.sharded:
            raise TypeError("a sharded (FSDP) sparsifier cannot be pickled: its state_dict() gathers the masks "
                            "from every rank (a collective); pickle or save sparsifier.state_dict() instead")
        return {"pickled": 1, "state": self.state_dict()}

    def __setstate__(self, pickled: Mapping[str, Any]) -> None:
        """A detached sparsifier from :meth:`__getstate__`'s form: config, step, masks, counts and
        exploration bits; no model, parameters or optimizer (``step()`` and friends raise)."""
        state = pickled["state"]
        self._config = SparsityConfig().replace(**state["config"])
        self._ranks = SingleProcess()
        self._updater = TopologyUpdater(self._config.resolve())
        names = list(state["names"])
        ever = state["ever_active"]
        self._state = MaskState.restored(names, state["shapes"], [state["masks"][n] for n in names],
                                         None if ever is None else [ever[n] for n in names], self._ranks)
        self.selection = None
        self._model_ref = None
        self._hook = None
        self._detached = True
        self._step_count = int(state["step"])
        self._pending_steps = 0
        self._skipped_updates = int(state["skipped_updates"])
        last = state["last_update"]
        self._last_update = None if last is None else UpdateReport(**last)
        self._init_counts = list(state["init_counts"])
        self._final_counts = list(state["final_counts"])
        self._health = HealthMonitor(names, self._state.shapes, [0] * len(names))  # views only: no weights here
        self._health.load_state_dict(state.get("health"), self._ranks)

    def __repr__(self) -> str:
        return (
            f"Sparsifier(method={self._config.method!r}, step={self._step_count}, layers={len(self._state.names)}, "
            f"density={self.density():.4f}, target={self._config.density})"
        )
