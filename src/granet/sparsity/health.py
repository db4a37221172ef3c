"""Health of a sparse network while it trains: the signs of a collapse, found when it happens.

A very sparse network can die without an error: a layer whose units have lost their inputs, or
whose active weights all sit at exactly zero, passes nothing on; every gradient upstream of it is
then exactly zero, gradient regrowth has nothing to rank (ties are broken at random), regrown
weights start at zero and stay there, and the loss stays at ln(classes), the loss of a uniform
prediction. The active counts stay exact, so density and the update reports look normal.
``docs/collapse.md`` shows such a run step by step.

A :class:`HealthMonitor` (owned by the :class:`~granet.sparsity.sparsifier.Sparsifier`) checks, in one pass
over each layer's mask and weight:

* **dead units** — output units with no active incoming weight: rows of a weight stored out × in
  (``nn.Linear``, convolutions: output features or channels), columns of one stored in × out
  (``transformers``' ``Conv1D``, transposed convolutions). Such a unit's output is a constant.
  Reported, not flagged: at extreme sparsity most units of a healthy network can have none.
* **zero layers** — layers whose active weights are all exactly 0 (or that have none left).
* **stuck weights** — active weights found exactly 0 at ``stuck_updates`` consecutive topology
  updates. A weight regrown at zero moves with its first non-zero gradient (weight decay keeps 0 at
  0), so an active weight still exactly 0 a whole update interval later had no gradient at all.
* **chance loss** — the training loss within ``loss_epsilon`` of ln(classes) for ``chance_epochs``
  consecutive epochs (:meth:`HealthMonitor.observe_loss`; the training loop feeds it).

The sparsifier runs the check at the start of every topology update (on the network that trained
since the previous one; :attr:`~granet.sparsity.topology.UpdateReport.health`) and whenever
:meth:`~granet.sparsity.sparsifier.Sparsifier.check_health` is called (``granet train``: every epoch). Each
condition that trips (:data:`FLAGS`) is logged once, as one warning line. Right after an update
the regrown weights are exactly 0 by construction: an epoch check made then counts them in
``zero_active``; ``stuck`` only counts weights found at 0 by update checks, after training.

Process layouts: under DDP every rank holds the same masks and weights and computes the same
numbers; under FSDP2 each rank checks its rows and one all-reduce sums the counts (columns of in ×
out weights are summed per column), so every rank reports the whole network. The stuck-weight
record holds the positions of the exactly-zero active weights seen at the last ``stuck_updates - 1``
update checks (none in a healthy network) and is saved in the sparsifier's state dict. On float32
CPU weights the zero search is one fused native pass per layer (:func:`zero_positions`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Protocol, Sequence

import torch

from ..kernels import native

logger = logging.getLogger(__name__)

#: The conditions a check can flag, with the words of their warning.
FLAGS = {
    "zero_layer": "layers whose active weights are all exactly 0",
    "stuck_weights": "active weights stuck at exactly 0",
    "chance_loss": "training loss at chance level",
}

#: Parameter kinds (:mod:`granet.sparsity.targets`) stored in × out: their units are columns (dimension 1).
IN_BY_OUT_KINDS = ("conv1d_hf", "conv_transpose")


@dataclass(frozen=True)
class HealthThresholds:
    """When a check flags a condition.

    Attributes:
        stuck_updates: k, consecutive topology updates at which an active weight must be found
            exactly 0 to count as stuck (>= 1).
        stuck_fraction: flag ``stuck_weights`` when stuck weights are more than this fraction of
            the active weights (0: any stuck weight).
        loss_epsilon: a training loss within this of ln(classes) is at chance level.
        chance_epochs: N, consecutive epochs at chance level that flag ``chance_loss``.
    """

    stuck_updates: int = 2
    stuck_fraction: float = 0.01
    loss_epsilon: float = 0.01
    chance_epochs: int = 2

    def __post_init__(self) -> None:
        for name in ("stuck_updates", "chance_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        value = self.stuck_fraction
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"stuck_fraction must be a number in [0, 1], got {value!r}")
        if isinstance(self.loss_epsilon, bool) or not isinstance(self.loss_epsilon, (int, float)) \
                or not self.loss_epsilon > 0:
            raise ValueError(f"loss_epsilon must be a number > 0, got {self.loss_epsilon!r}")


@dataclass
class HealthReport:
    """One health check of the sparsified layers.

    Attributes:
        step: optimizer step of the check.
        units: output units over all sparsified layers.
        dead_units: units with no active incoming weight, over all layers.
        layer_dead_units: per layer with dead units, how many (of ``layer_units``).
        layer_units: units of every layer that has dead units.
        zero_layers: layers whose active weights are all exactly 0 (or that have none).
        zero_active: active weights that are exactly 0.
        stuck: active weights found exactly 0 at the last ``stuck_updates`` topology updates (as of
            the latest update check).
        active: active weights.
        chance_epochs: consecutive epochs so far with the training loss at chance level.
        flags: the conditions of :data:`FLAGS` this check found.
    """

    step: int
    units: int = 0
    dead_units: int = 0
    layer_dead_units: dict[str, int] = field(default_factory=dict)
    layer_units: dict[str, int] = field(default_factory=dict)
    zero_layers: list[str] = field(default_factory=list)
    zero_active: int = 0
    stuck: int = 0
    active: int = 0
    chance_epochs: int = 0
    flags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy."""
        return asdict(self)

    @property
    def healthy(self) -> bool:
        """Whether no condition was flagged."""
        return not self.flags


class HealthLayout(Protocol):
    """What the monitor needs from the process layout (:mod:`granet.sparsity.layouts`)."""

    sharded: bool

    def local(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def sum_counts(self, values: Sequence[int]) -> list[int]: ...

    def full(self, tensors: Sequence[torch.Tensor], packed: bool = False) -> list[torch.Tensor]: ...

    def rows(self, full: torch.Tensor, i: int, packed: bool = False) -> torch.Tensor: ...


class HealthMonitor:
    """Runs the health checks of a sparsifier's layers and remembers what they need across checks.

    Args:
        names: the sparsified parameters' names.
        shapes: their full shapes.
        unit_dims: per layer, the dimension of its output units (0, or 1 for in × out weights).
        thresholds: when a condition is flagged.
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]], unit_dims: Sequence[int],
                 thresholds: Optional[HealthThresholds] = None) -> None:
        self.names = list(names)
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.unit_dims = [int(d) if len(s) > 1 else 0 for d, s in zip(unit_dims, self.shapes)]
        self.thresholds = thresholds or HealthThresholds()
        self._zero = self._no_record()
        self._stuck = 0
        self._chance_epochs = 0
        self._warned: list[str] = []
        self._first_seen: dict[str, int] = {}
        self._last: Optional[HealthReport] = None

    def _no_record(self) -> list[list[Optional[torch.Tensor]]]:
        """The empty stuck-weight record: ``record[j][i]`` holds the flat positions (this process's
        part, ascending int64) of layer ``i``'s active weights found exactly 0 at each of the last
        ``j + 1`` update checks, ``None`` where there are none in the whole layer."""
        return [[None] * len(self.names) for _ in range(self.thresholds.stuck_updates - 1)]

    @property
    def last(self) -> Optional[HealthReport]:
        """The latest check (``None`` before the first)."""
        return self._last

    @property
    def first_seen(self) -> dict[str, int]:
        """``{flag: optimizer step of the first check that found it}`` (a copy)."""
        return dict(self._first_seen)

    # ------------------------------------------------------------------ the checks

    @torch.no_grad()
    def check(self, step: int, params: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
              counts: Sequence[int], layout: HealthLayout, update: bool) -> HealthReport:
        """Check the layers; with ``update``, also advance the stuck-weight record (a topology update).

        ``masks`` are as the sparsifier holds them (this rank's rows under FSDP), ``counts`` whole-layer
        active counts. Under FSDP every rank must call it at the same point (one all-reduce).
        """
        k = self.thresholds.stuck_updates
        # Per layer, in order: the per-column active counts (sharded in x out layers only), then
        # (dead units here, active weights exactly 0 here, of them stuck): summed over ranks at once.
        local_ints: list[int] = []
        zero_now: list[torch.Tensor] = []
        columns_summed: list[int] = []  # per layer: how many per-column sums lead its entries (0: none)
        for i, (param, mask) in enumerate(zip(params, masks)):
            weight = layout.local(param).detach()
            # max over the uint8 view: torch's any() over a bool dimension is some 25x slower
            flags = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
            if self.unit_dims[i] == 0:
                rows = flags.reshape(mask.shape[0], math.prod(mask.shape[1:]))  # explicit: a rank may hold 0 rows
                dead = int(mask.shape[0] - torch.count_nonzero(rows.amax(dim=1)))
                columns_summed.append(0)
            else:
                columns = self.shapes[i][1]
                per_column = flags.reshape(mask.shape[0], columns, math.prod(mask.shape[2:])).amax(dim=2).bool()
                if layout.sharded:  # a column's weights are spread over the ranks' rows
                    local_ints.extend(per_column.sum(dim=0).tolist())
                    columns_summed.append(columns)
                    dead = 0
                else:
                    dead = int(columns - torch.count_nonzero(per_column.any(dim=0)))
                    columns_summed.append(0)
            positions = zero_positions(weight, mask)
            stuck = 0
            if update and positions.numel():
                older = None if k == 1 else self._zero[k - 2][i]
                stuck = (positions.numel() if k == 1 else 0 if older is None
                         else int(torch.isin(positions, older).sum()))
            zero_now.append(positions)
            local_ints.extend((dead, int(positions.numel()), stuck))
        summed = layout.sum_counts(local_ints)
        report = HealthReport(step=step, active=int(sum(counts)))
        pos, total_stuck = 0, 0
        zero_counts: list[int] = []
        for i, name in enumerate(self.names):
            units = self.shapes[i][self.unit_dims[i]]
            columns = columns_summed[i]
            dead = sum(1 for c in summed[pos:pos + columns] if c == 0) + summed[pos + columns]
            zero_count, stuck = summed[pos + columns + 1], summed[pos + columns + 2]
            pos += columns + 3
            zero_counts.append(zero_count)
            total_stuck += stuck
            report.units += units
            report.dead_units += dead
            if dead:
                report.layer_dead_units[name] = dead
                report.layer_units[name] = units
            if zero_count == counts[i]:  # an empty layer too: it passes nothing on either
                report.zero_layers.append(name)
            report.zero_active += zero_count
        if update:
            self._advance(zero_now, zero_counts)
            self._stuck = total_stuck
        report.stuck = self._stuck
        report.chance_epochs = self._chance_epochs
        report.flags = self._flags(report)
        self._record(report)
        return report

    def _advance(self, zero_now: list[torch.Tensor], zero_counts: list[int]) -> None:
        """Shift the stuck-weight record by one update check. A layer's entry is kept (on every rank
        alike, possibly empty here) only where the whole layer has exactly-zero active weights."""
        previous = self._zero
        record = self._no_record()
        for i, now in enumerate(zero_now):
            if zero_counts[i] == 0:
                continue
            for j in range(len(record)):
                older = None if j == 0 else previous[j - 1][i]
                if j == 0:
                    record[j][i] = now
                elif older is not None:
                    record[j][i] = now[torch.isin(now, older)]
                else:
                    record[j][i] = now[:0]
        self._zero = record

    def observe_loss(self, loss: float, classes: int) -> int:
        """Record one epoch's training loss: returns the consecutive epochs at chance level so far
        (``|loss - ln(classes)| <= loss_epsilon``)."""
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
            raise ValueError(f"classes must be an integer >= 2, got {classes!r}")
        at_chance = math.isfinite(loss) and abs(loss - math.log(classes)) <= self.thresholds.loss_epsilon
        self._chance_epochs = self._chance_epochs + 1 if at_chance else 0
        return self._chance_epochs

    def _flags(self, report: HealthReport) -> list[str]:
        t = self.thresholds
        flags = []
        if report.zero_layers:
            flags.append("zero_layer")
        if report.stuck > t.stuck_fraction * report.active:
            flags.append("stuck_weights")
        if report.chance_epochs >= t.chance_epochs:
            flags.append("chance_loss")
        return flags

    def _record(self, report: HealthReport) -> None:
        """Keep the report, note new flags, and warn once per flag (one line)."""
        self._last = report
        new = [f for f in report.flags if f not in self._warned]
        for flag in report.flags:
            self._first_seen.setdefault(flag, report.step)
        if not new:
            return
        self._warned.extend(new)
        logger.warning("step %d: sparse network health: %s; see docs/collapse.md", report.step,
                       "; ".join(describe(report, f) for f in new))

    # ------------------------------------------------------------------ state

    def state_dict(self, layout: HealthLayout, masks: Sequence[torch.Tensor]) -> dict[str, Any]:
        """What the next checks depend on, positions in the full tensors' flat order (a collective
        under FSDP when there are any). ``masks``: the sparsifier's (this process's part of each layer)."""
        zero: list[Optional[dict[str, torch.Tensor]]] = []
        for level in self._zero:
            present = [i for i, positions in enumerate(level) if positions is not None]
            if not present:  # the same on every rank: entries are kept where the whole layer has zeros
                zero.append(None)
                continue
            if layout.sharded:  # this rank's positions -> full bitmaps (the gather takes every layer)
                local = [_positions_mask(positions, m) for positions, m in zip(level, masks)]
                full = [m.reshape(-1).nonzero().squeeze(1) for m in layout.full(local)]
            else:
                full = list(level)  # type: ignore[arg-type]
            zero.append({self.names[i]: full[i].detach().cpu().clone() for i in present})
        return {
            "zero": zero,
            "stuck": self._stuck,
            "chance_epochs": self._chance_epochs,
            "warned": list(self._warned),
            "first_seen": dict(self._first_seen),
            "last": None if self._last is None else self._last.to_dict(),
        }

    def load_state_dict(self, state: Optional[Mapping[str, Any]], layout: HealthLayout) -> None:
        """Restore :meth:`state_dict` (checked by :meth:`parse_state`); ``None`` (a state saved before
        health checks existed) starts afresh."""
        self.restore(self.parse_state(state, layout))

    def parse_state(self, state: Optional[Mapping[str, Any]], layout: HealthLayout) -> dict[str, Any]:
        """A checked copy of a :meth:`state_dict` (this process's part of the positions), ready for
        :meth:`restore`; ``None`` gives a fresh record.

        Raises:
            ValueError: the entry is not such a state (what is wrong named).
        """
        zero = self._no_record()
        parsed: dict[str, Any] = {"zero": zero, "stuck": 0, "chance_epochs": 0, "warned": [], "first_seen": {},
                                  "last": None}
        if state is None:
            return parsed
        if not isinstance(state, Mapping):
            raise ValueError(f"sparsifier state has an invalid health entry ({type(state).__name__})")
        try:
            for j, level in enumerate(list(state.get("zero") or [])[: len(zero)]):
                for name, positions in dict(level or {}).items():
                    i = self.names.index(name)
                    size = math.prod(self.shapes[i])
                    if (not isinstance(positions, torch.Tensor) or positions.dtype != torch.int64
                            or positions.dim() != 1 or (positions.numel() and not (
                                0 <= int(positions.min()) and int(positions.max()) < size))):
                        raise ValueError(f"positions of {name}")
                    if layout.sharded:
                        full = torch.zeros(size, dtype=torch.bool).index_fill_(0, positions, True)
                        positions = layout.rows(full.view(self.shapes[i]), i).reshape(-1).nonzero().squeeze(1)
                    zero[j][i] = positions.clone()
            parsed.update(
                stuck=int(state.get("stuck", 0)), chance_epochs=int(state.get("chance_epochs", 0)),
                warned=[str(f) for f in state.get("warned", [])],
                first_seen={str(f): int(t) for f, t in dict(state.get("first_seen", {})).items()},
                last=None if not state.get("last") else HealthReport(**state["last"]),
            )
        except (ValueError, TypeError) as exc:
            raise ValueError(f"sparsifier state has an invalid health entry ({exc})") from None
        return parsed

    def restore(self, parsed: Mapping[str, Any]) -> None:
        """Take a record from :meth:`parse_state`."""
        self._zero = parsed["zero"]
        self._stuck, self._chance_epochs = parsed["stuck"], parsed["chance_epochs"]
        self._warned, self._first_seen, self._last = parsed["warned"], parsed["first_seen"], parsed["last"]


def zero_positions(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flat positions (ascending int64) of the active weights that are exactly 0.

    One fused pass on float32 CPU tensors (:func:`granet.kernels.native.band`: the positions of the band
    ``mask & not |w| > 0``, no full-size temporary, NaN then dropped); torch operations elsewhere.
    Inactive weights are not looked at: between an optimizer step and the sparsifier's they need not
    be 0.
    """
    if native.supports([weight], [mask]):
        _, positions, values = native.band(weight.reshape(-1), True, mask.reshape(-1), False, 0.0, None, None, 64)
        return positions[values == 0]
    return ((weight == 0) & mask).reshape(-1).nonzero().squeeze(1)


def _positions_mask(positions: Optional[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor shaped like ``mask``, True at the flat ``positions`` (none: all False)."""
    out = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    if positions is not None and positions.numel():
        out.index_fill_(0, positions.to(mask.device), True)
    return out.view(mask.shape)


def describe(report: HealthReport, flag: str) -> str:
    """The words of one flag of ``report``, with its numbers."""
    if flag == "zero_layer":
        return f"no active weight other than exactly 0 in {', '.join(report.zero_layers)}"
    if flag == "stuck_weights":
        return f"{report.stuck:,} of {report.active:,} active weights stuck at exactly 0"
    if flag == "chance_loss":
        return f"training loss at chance level (ln classes) for {report.chance_epochs} epochs"
    return FLAGS.get(flag, flag)


def alive_units(masks: Sequence[torch.Tensor], dims: Sequence[int], layout: HealthLayout) -> list[int]:
    """Per layer, the output units with at least one active incoming weight (whole layers: one
    all-reduce under FSDP, whose row shards hold whole units of out × in weights; in × out weights
    are counted per column here, so not under FSDP)."""
    alive = []
    for mask, dim in zip(masks, dims):
        flags = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        units = flags.movedim(dim, 0) if dim else flags
        alive.append(int(torch.count_nonzero(units.reshape(units.shape[0], math.prod(units.shape[1:])).amax(dim=1)))
                     if units.numel() else 0)
    return layout.sum_counts(alive)


def unit_dims(kinds: Sequence[str]) -> list[int]:
    """The dimension of the output units of each weight, from its kind (:mod:`granet.sparsity.targets`)."""
    return [1 if kind in IN_BY_OUT_KINDS else 0 for kind in kinds]


__all__ = ["FLAGS", "HealthMonitor", "HealthReport", "HealthThresholds", "alive_units", "describe", "unit_dims",
           "zero_positions"]
