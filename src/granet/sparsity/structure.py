"""Structured sparsity: N:M and constant fan-in masks, and their exact selection.

A *structure* constrains where a layer's active weights may be (:class:`Structure`,
:func:`parse_structure`):

* ``unstructured``: anywhere (the library's default; nothing here applies);
* ``N:M`` (such as ``2:4``, the format of GPUs' sparse tensor cores): every group of ``M``
  consecutive input weights of an output unit holds exactly ``N`` active ones;
* ``fan-in`` (SRigL): every output unit has the same number ``k`` of active inputs.

**Rows and groups.** A weight's *row* is everything one output unit sees: the weight with its
output-unit dimension ``unit_dim`` moved first (0 for ``nn.Linear`` and convolutions; 1 for the
in × out layouts of ``transformers``' ``Conv1D`` and of transposed convolutions), each unit's slice
flattened in index order (:func:`rows_view`). A convolution weight (out, in, kh, kw) has rows of
``in * kh * kw`` entries, in the order (in, kh, kw), and an N:M group is ``M`` consecutive entries
of that row. For 1 × 1 kernels (and every linear layer) these are ``M`` consecutive input
channels, the grouping of sparse tensor cores. For larger kernels a group runs over kernel
positions first and may span two input channels: it is exactly N:M over the weight's own memory
order, but kernels that group channels at a fixed kernel position (channels-last implicit GEMM)
need the weight permuted to (out, kh, kw, in) and grouped there, which these masks do not promise.
N:M needs a row length that is a multiple of ``M`` (:func:`check_layer` refuses the others, e.g.
a first convolution over 3 channels with 3 × 3 kernels, 27 per row: keep such a layer dense).

Rows follow the output units because FSDP2 gives each rank a block of rows of dim 0: for a layer
with ``unit_dim == 0`` every row, so every group, is on one rank, and structured selection needs no
collective beyond the tie count (see the tie rule below). Layers with ``unit_dim == 1`` have their
rows across ranks under FSDP2.

**Exact selection and its tie rule.** :func:`select_per_row` keeps, in every row, exactly
``count[r]`` of the competing entries (all entries, those of ``among``, or with ``outside`` those
not in ``among``) with the highest scores; :func:`select_per_group` does the same in every group
(:func:`keep_top_per_row` / :func:`keep_top_per_group`: the same with one count for all and every
entry competing). Per row the threshold is the ``count[r]``-th highest competing score; entries
above it are kept; entries equal to it fill the remaining slots. A row whose ties all fit keeps
them all. The ties of the rows where they do not (the *contested* ties) form one list in the flat
order of the row view, exactly as :func:`granet.kernels.topk.select_top_plain` lists a tensor's
ties, and one ``torch.randperm`` of that list, drawn from the caller's generator (none: the
identity, i.e. the lowest indices win), orders them: a tie earlier in the permutation wins before
a later one of the same row. With one row this is ``select_top_plain`` bit for bit, generator use
included (a permutation is drawn only when some tie loses). Scores must not be NaN.

Under FSDP2 a rank holds a contiguous block of rows, hence a contiguous stretch of the tie list:
each rank counts its contested ties (:func:`contested_ties`), the counts are all-gathered, and each
rank passes ``tie_offset`` (the ties on lower ranks) and ``tie_total``; every rank draws the same
permutation of ``tie_total`` and uses its stretch, so the rows assembled from the ranks equal one
process's result bit for bit.

**Drop and regrow within the structure** (:func:`drop_and_regrow`). The drop is the library's
unstructured one: the ``n_drop`` active weights of the layer with the lowest drop scores
(``select_top`` among the active ones, as :func:`granet.sparsity.topology.keep_largest`). Each
group (N:M) or row (fan-in) then regrows exactly as many as it lost, its *room*, among its
positions inactive after the drop (just-dropped ones included, as in RigL), by the grow score.
Every group holds the same count after the update as before it, so a structured mask stays
structured, the layer's count is unchanged (zero-cost) and no group is ever given more than its
room. Dropping per group instead would drop ``floor(r * N)`` per group: nothing at all for 2:4
and r < 0.5.

**The gradual schedule onto a structure.** GraNet's cubic schedule gives a target density
``d_t`` at every pruning step. Onto a structure it maps as follows.

* N:M: every group keeps ``n_t = nm_count(d_t, N, M) = min(M, max(N, round(d_t * M)))`` actives
  (Python's ``round``, halves to even, as the library's other counts). The mask is exactly n_t:M
  at every step: N:M at the end (``d_t = N / M`` exactly at tf), n_t:M with ``n_t`` from ``M``
  (dense, or ``round(d_0 * M)`` for a sparse start) down to ``N`` before. ``n_t`` never rises, since
  ``d_t`` does not, so a pruning step only removes weights (the lowest prune scores of each group:
  ``select_per_group(scores, M, n_t, among=mask)``). Every layer then has density ``n_t / M``: a
  structure fixes each layer's density, so per-layer distributions (ERK, ER) and the choice between
  global and layer-wise pruning do not apply to N:M layers (a config should refuse a non-uniform
  distribution with N:M rather than ignore it), and the final density is ``N / M``. A mixed mask
  (some groups at ``n_t``, some at ``n_t - 1``) would follow ``d_t`` more closely, but it is no
  hardware format and cannot be checked as one after every update.
  For 2:4 from dense: ``d_t >= 0.875`` keeps 4, ``0.625 < d_t < 0.875`` keeps 3, and ``d_t <= 0.625``
  keeps 2 (0.875 * 4 = 3.5 rounds to 4, 0.625 * 4 = 2.5 to 2).
* fan-in: a layer at density ``d`` keeps ``k = fan_in_count(d, L) = min(L, max(1, round(d * L)))``
  inputs per output unit (``L`` the row length; at least one, so no unit is cut off). The layer's
  density is then ``k / L``, and the overall density ``sum_i rows_i * k_i / sum_i numel_i``, which
  differs from the target by the rounding (at most half an entry per row, more where the minimum
  of one applies). Per-layer densities (ERK etc.) do apply: ``d`` is the layer's density that the
  distribution and the schedule give (for gradual pruning, the layer's cubic schedule between its
  initial and final densities, evaluated at the step), and the row count follows it. Under global
  pruning a layer's ``d`` is the share of its weights that one threshold over all layers keeps at
  the update (the update policy solves that unstructured selection first), so the budget moves
  between layers as without structure and each layer's share is then rounded to a row count.

**Initial masks.** Sparse-to-sparse methods start from a random mask: :func:`random_structured_mask`
draws uniform scores on the CPU from the caller's generator (so CPU and CUDA runs get the same
mask) and keeps exactly ``count`` per group or row.

**Neuron ablation** (fan-in, SRigL's γ_sal: ``SparsityConfig.ablation``, 0 = off). At every
drop-and-regrow update of a fan-in layer (not the last sparsified layer, whose units are the
model's outputs, as in SRigL's code) :func:`ablate_units` may remove whole output units. Let ``T``
be the layer's active weights before the update, ``R`` its rows and ``L`` its live rows (those
holding weights). After the drop (the layer's ``T - n_drop`` highest drop scores, as above), a
weight is *salient* when it is kept or among the ``n_drop`` highest grow scores of the entries not
kept (what the unstructured update would regrow; ties broken by the generator of (seed, "ablate",
step, layer), so the regrowth's own draws are those of a run without ablation; SRigL's code ranks the
grow scores over all entries, here over those not kept, so no weight counts twice). A live row
with fewer than ``max(1, floor(γ · T / R))`` salient weights is ablated
(``T / R``: the fan-in of the layer's budget with no unit ablated, as in SRigL's code;
γ is read as its decimal text, :func:`ablation_threshold`), but at least ``max(1, ceil(T / row_len))``
rows stay live: when more rows qualify, those with the fewest salient weights go first, then the
lowest row index. An ablated row loses its kept weights and regrows none. The ``L'`` live rows take
the budget: each holds ``k' = round(T / L')`` (half to even, :func:`fan_in_after_ablation`), so
``k' >= k`` and the layer holds ``L' · k'`` weights, within ``L' / 2`` of ``T`` (exactly ``T`` when
``L'`` divides it; each ablating update rounds once); each live row regrows ``k'`` minus what it kept,
by the grow score, as above. Ablated units stay ablated (SRigL's code recomputes the ablated set at
every update, so a unit whose gradients rank high can come back there; here no update regrows a
row of 0): the ablated units are the rows of 0 of the mask, so resuming needs no state beyond the
masks. Gradual pruning spreads a layer's scheduled total ``R · k_t`` over its live rows
(``min(k, round(R · k_t / L))`` each, ablated rows keep 0). With ablation the structure checks
(after every update, ``set_masks``, ``load_state_dict``) accept rows of 0: every live row holds the
same ``k``, ablated rows none (``structure_violations(..., ablated=True)``). A mask with ablated
rows has no constant fan-in for the condensed inference layer
(:func:`granet.deploy.condensed.constant_fan_in` returns ``None`` and ``condense`` refuses the layer
in one line); dropping the ablated rows (and their outputs) is left to the user.

:func:`is_structured` and :func:`structure_violations` check a mask (after every update, in tests).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Sequence, Union

import torch

from ..kernels.counter_rng import RandomSource, permutation, uniform
from ..kernels.topk import select_top

__all__ = [
    "KINDS",
    "UNSTRUCTURED",
    "Structure",
    "Violation",
    "ablate_units",
    "ablation_threshold",
    "active_counts",
    "check_layer",
    "contested_ties",
    "drop_and_regrow",
    "fan_in_after_ablation",
    "fan_in_count",
    "from_rows",
    "group_counts",
    "is_structured",
    "keep_top_per_group",
    "keep_top_per_row",
    "nm_count",
    "parse_structure",
    "random_structured_mask",
    "room",
    "row_counts",
    "row_shape",
    "rows_view",
    "select_per_group",
    "select_per_row",
    "select_structured",
    "structure_violations",
]

#: The kinds of :class:`Structure`.
KINDS = ("unstructured", "n:m", "fan-in")

Count = Union[int, torch.Tensor]

_NM = re.compile(r"(\d+):(\d+)")


@dataclass(frozen=True)
class Structure:
    """Where a layer's active weights may be.

    Attributes:
        kind: ``"unstructured"``, ``"n:m"`` or ``"fan-in"``.
        n: active weights per group (``"n:m"`` only; 0 otherwise).
        m: weights per group, consecutive along a row (``"n:m"`` only; 0 otherwise).

    Raises:
        ValueError: an unknown kind, or ``n`` / ``m`` outside ``1 <= n < m`` for N:M (0 for the others).
    """

    kind: str
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"structure kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "n:m":
            if not (isinstance(self.n, int) and isinstance(self.m, int) and 1 <= self.n < self.m):
                raise ValueError(f"an N:M structure needs whole numbers 1 <= N < M, got N={self.n!r}, M={self.m!r}")
        elif self.n != 0 or self.m != 0:
            raise ValueError(f"a {self.kind} structure has no N and M, got N={self.n!r}, M={self.m!r}")

    def __str__(self) -> str:
        """The text :func:`parse_structure` reads back (``"2:4"``, ``"fan-in"``, ``"unstructured"``)."""
        return f"{self.n}:{self.m}" if self.kind == "n:m" else self.kind

    @property
    def structured(self) -> bool:
        """Whether the structure constrains anything (not ``unstructured``)."""
        return self.kind != "unstructured"

    @property
    def density(self) -> Optional[float]:
        """N / M for N:M (every layer's final density); ``None`` for the others."""
        return self.n / self.m if self.kind == "n:m" else None


#: The default structure (no constraint).
UNSTRUCTURED = Structure("unstructured")


def parse_structure(text: object) -> Structure:
    """The structure named by ``text``: ``"unstructured"``, ``"fan-in"`` or ``"N:M"`` (``"2:4"``).

    Args:
        text: the name, as a config or flag gives it.

    Returns:
        The :class:`Structure`.

    Raises:
        ValueError: one line naming the value: not text (an unquoted ``2:4`` in YAML 1.1 is the
            base-60 integer 124), not one of the forms, ``N`` of 0, ``M`` of 0, ``N > M``, or
            ``N = M`` (every weight kept: dense is not a structure).
    """
    if not isinstance(text, str):
        hint = ""
        if isinstance(text, int) and not isinstance(text, bool) and text >= 60:
            hint = f" (YAML reads an unquoted {text // 60}:{text % 60} as the base-60 number {text}: quote it)"
        raise ValueError(f"structure must be text such as '2:4', got {text!r}{hint}")
    if text in ("unstructured", "fan-in"):
        return Structure(text)
    match = _NM.fullmatch(text)
    if match is None:
        raise ValueError(f"structure {text!r} is not unstructured, fan-in or N:M (such as 2:4)")
    n, m = int(match.group(1)), int(match.group(2))
    if m == 0:
        raise ValueError(f"structure {text!r} has groups of 0 weights: M must be at least 1")
    if n == 0:
        raise ValueError(f"structure {text!r} keeps no weight: N must be at least 1")
    if n > m:
        raise ValueError(f"structure {text!r} asks for {n} active weights in groups of {m}: N must be at most M")
    if n == m:
        raise ValueError(f"structure {text!r} keeps every weight: dense is not a structure (N must be less than M)")
    return Structure("n:m", n, m)


# ---------------------------------------------------------------------------------------------- rows and groups

def _check_unit_dim(shape: Sequence[int], unit_dim: int, what: str) -> None:
    if len(shape) < 2:
        raise ValueError(f"{what} has shape {tuple(shape)}: structured sparsity needs a weight of 2 or more dimensions")
    if not (isinstance(unit_dim, int) and 0 <= unit_dim < len(shape)):
        raise ValueError(f"{what} has {len(shape)} dimensions: unit_dim must be in [0, {len(shape)}), got {unit_dim!r}")


def row_shape(shape: Sequence[int], unit_dim: int = 0) -> tuple[int, int]:
    """``(rows, row_len)`` of a weight of ``shape``: its output units and the entries each one sees.

    Args:
        shape: the weight's shape (2 or more dimensions).
        unit_dim: the dimension of its output units (0 for out × in weights, 1 for in × out ones).

    Returns:
        ``(shape[unit_dim], prod(other dimensions))``.

    Raises:
        ValueError: fewer than 2 dimensions, or ``unit_dim`` out of range.
    """
    _check_unit_dim(shape, unit_dim, f"a weight of shape {tuple(shape)}")
    rows = int(shape[unit_dim])
    return rows, math.prod(int(s) for i, s in enumerate(shape) if i != unit_dim)


def check_layer(structure: Structure, name: str, shape: Sequence[int], unit_dim: int = 0) -> None:
    """Refuse a layer the structure cannot apply to, in one line naming it.

    N:M needs rows (all input entries of one output unit, see the module notes) whose length is a
    multiple of ``M``; convolution weights (out, in, kh, kw) have rows of ``in * kh * kw`` entries,
    grouped in that order. Fan-in and unstructured fit every weight of 2 or more dimensions.

    Args:
        structure: the structure.
        name: the layer's parameter name (for the message).
        shape: its shape.
        unit_dim: the dimension of its output units.

    Raises:
        ValueError: fewer than 2 dimensions, ``unit_dim`` out of range, or N:M rows that are not a
            multiple of ``M``.
    """
    if not structure.structured:
        return
    _check_unit_dim(shape, unit_dim, name)
    _, row_len = row_shape(shape, unit_dim)
    if structure.kind == "n:m" and row_len % structure.m:
        inputs = " × ".join(str(int(s)) for i, s in enumerate(shape) if i != unit_dim)
        raise ValueError(
            f"structure {structure} does not fit {name} (shape {tuple(int(s) for s in shape)}): each output unit has "
            f"{row_len} inputs ({inputs}), not a multiple of {structure.m}; keep the layer dense")


def rows_view(tensor: torch.Tensor, unit_dim: int = 0) -> torch.Tensor:
    """``tensor`` as ``(rows, row_len)``: row ``r`` is output unit ``r``'s entries, in index order.

    A view (no copy) whenever the layout allows: always for a contiguous tensor with
    ``unit_dim == 0`` and for a contiguous 2-D tensor with either ``unit_dim``; a copy otherwise (e.g. a 4-D transposed
    convolution's weight, ``unit_dim == 1``), so writing into the result writes ``tensor`` only
    when it is a view.

    Args:
        tensor: a weight, mask or score tensor (2 or more dimensions).
        unit_dim: the dimension of its output units.

    Returns:
        The ``(rows, row_len)`` tensor.

    Raises:
        ValueError: fewer than 2 dimensions, or ``unit_dim`` out of range.
    """
    rows, row_len = row_shape(tensor.shape, unit_dim)
    moved = tensor.movedim(unit_dim, 0) if unit_dim else tensor
    return moved.reshape(rows, row_len)


def from_rows(rows: torch.Tensor, shape: Sequence[int], unit_dim: int = 0) -> torch.Tensor:
    """The inverse of :func:`rows_view`: a ``(rows, row_len)`` tensor back in a weight's ``shape``.

    A view of ``rows`` when it can be (``unit_dim == 0`` with contiguous rows, or any 2-D shape;
    not necessarily contiguous), a copy otherwise.

    Args:
        rows: the ``(rows, row_len)`` tensor.
        shape: the weight's shape.
        unit_dim: the dimension of its output units.

    Returns:
        A tensor of ``shape``.

    Raises:
        ValueError: ``rows`` does not hold ``shape``'s rows.
    """
    expected = row_shape(shape, unit_dim)
    if tuple(rows.shape) != expected:
        raise ValueError(f"rows of shape {tuple(rows.shape)} do not make a weight of shape {tuple(shape)} "
                         f"with unit_dim {unit_dim} (expected {expected})")
    moved = [int(shape[unit_dim])] + [int(s) for i, s in enumerate(shape) if i != unit_dim]
    out = rows.reshape(moved)
    return out.movedim(0, unit_dim) if unit_dim else out


def _groups_view(tensor: torch.Tensor, m: int, unit_dim: int) -> torch.Tensor:
    """``(rows * row_len / m, m)``: every group of ``m`` consecutive row entries as one row."""
    rows, row_len = row_shape(tensor.shape, unit_dim)
    if row_len % m:
        raise ValueError(f"a weight of shape {tuple(tensor.shape)} has rows of {row_len} entries, "
                         f"not a multiple of the group size {m}")
    return rows_view(tensor, unit_dim).reshape(rows * (row_len // m), m)


def row_counts(mask: torch.Tensor, unit_dim: int = 0) -> torch.Tensor:
    """Active entries of each output unit of ``mask``.

    Args:
        mask: a ``torch.bool`` mask (2 or more dimensions).
        unit_dim: the dimension of its output units.

    Returns:
        ``(rows,)`` int64 counts.
    """
    return rows_view(mask, unit_dim).sum(dim=1)


def group_counts(mask: torch.Tensor, m: int, unit_dim: int = 0) -> torch.Tensor:
    """Active entries of every group of ``m`` consecutive row entries of ``mask``.

    Args:
        mask: a ``torch.bool`` mask whose row length is a multiple of ``m``.
        m: the group size.
        unit_dim: the dimension of its output units.

    Returns:
        ``(rows, row_len // m)`` int64 counts.

    Raises:
        ValueError: the row length is not a multiple of ``m``.
    """
    rows, row_len = row_shape(mask.shape, unit_dim)
    return _groups_view(mask, m, unit_dim).sum(dim=1).view(rows, row_len // m)


# ---------------------------------------------------------------------------------------------- exact selection

@dataclass
class _Prepared:
    """One selection up to its tie-breaking: the entries surely kept and the contested rows' ties."""

    mask: torch.Tensor  # (R, L) bool: entries above their row's threshold, and the ties of uncontested rows
    rows: torch.Tensor  # (C,) int64: the contested rows, ascending
    ties: torch.Tensor  # (C, L) bool: their ties (row-major, the order of the tie list)
    slots: torch.Tensor  # (C,) int64: the ties each of them keeps (at least 1)
    count: int  # the contested ties (the length of the tie list)


def _counts_tensor(count: Count, rows: int, shape: tuple[int, ...], device: torch.device, what: str) -> torch.Tensor:
    """``count`` as ``(rows,)`` int64 on ``device``: an int or 0-d tensor for all, or a tensor of ``shape``."""
    if isinstance(count, torch.Tensor):
        if count.is_floating_point() or count.is_complex() or count.dtype == torch.bool:
            raise ValueError(f"{what} counts must be integers, got a {count.dtype} tensor")
        if count.dim() and tuple(count.shape) != shape:
            raise ValueError(f"{what} counts must be a number or a tensor of shape {shape}, "
                             f"got shape {tuple(count.shape)}")
        return count.to(device=device, dtype=torch.int64).reshape(-1).expand(rows)
    if isinstance(count, bool) or not isinstance(count, int):
        raise ValueError(f"{what} count must be an integer or an integer tensor, got {count!r}")
    return torch.full((rows,), count, dtype=torch.int64, device=device)


def _nothing(rows: int, length: int, device: torch.device, mask: Optional[torch.Tensor] = None) -> _Prepared:
    """A selection with no contested tie."""
    none = torch.zeros(0, dtype=torch.int64, device=device)
    return _Prepared(torch.zeros(rows, length, dtype=torch.bool, device=device) if mask is None else mask, none,
                     torch.zeros(0, length, dtype=torch.bool, device=device), none, 0)


def _prepare(values: torch.Tensor, valid: Optional[torch.Tensor], counts: torch.Tensor, what: str) -> _Prepared:
    """Thresholds, surely kept entries and contested ties of a per-row selection of ``values`` (R, L)."""
    rows, length = values.shape
    competing = torch.full((rows,), length, dtype=torch.int64, device=values.device) if valid is None \
        else valid.sum(dim=1)
    bad = ((counts < 0) | (counts > competing)).nonzero()
    if bad.numel():
        r = int(bad[0, 0])
        raise ValueError(f"{what} {r} cannot keep {int(counts[r])} of its {int(competing[r])} competing entries")
    if rows == 0 or length == 0:
        return _nothing(rows, length, values.device)
    # contiguous (a copy for an in × out weight's rows): flat positions below are in row order
    ranked = values.contiguous() if valid is None else values.contiguous().masked_fill(~valid, -math.inf)
    lowest, highest = int(counts.min()), int(counts.max())
    if lowest == highest:  # one count for all rows: its k-th largest value per row
        if highest == 0:
            return _nothing(rows, length, values.device)
        threshold = ranked.kthvalue(length - highest + 1, dim=1, keepdim=True).values
    else:
        ordered = ranked.sort(dim=1, descending=True).values
        threshold = ordered.gather(1, (counts - 1).clamp(min=0).unsqueeze(1))
    above = ranked > threshold
    ties = ranked == threshold
    if valid is not None:  # a competing -inf ties with the non-competing entries' fill: only competitors tie
        ties &= valid
    if lowest == 0:  # a row keeping nothing has no threshold (and draws no tie, as select_top_plain)
        nothing = (counts == 0).unsqueeze(1)
        above &= ~nothing
        ties &= ~nothing
    slots = counts - above.sum(dim=1)
    contested = ties.sum(dim=1) > slots  # slots >= 1 there: the row's k-th value is one of its ties
    kept = (above | (ties & ~contested.unsqueeze(1))).contiguous()
    if not bool(contested.any()):
        return _nothing(rows, length, values.device, kept)
    which = contested.nonzero().squeeze(1)
    ties = ties.index_select(0, which)
    return _Prepared(kept, which, ties, slots.index_select(0, which), int(ties.sum()))


def _break_ties(prepared: _Prepared, generator: Optional[RandomSource], tie_offset: int,
                tie_total: Optional[int]) -> torch.Tensor:
    """The selection's mask (R, L): the sure entries plus, per contested row, the ``slots`` ties that
    come first in one permutation of the tie list (see the module notes)."""
    mask, local = prepared.mask, prepared.count
    total = local if tie_total is None else tie_total
    if tie_offset < 0 or tie_offset + local > total:
        raise ValueError(f"tie_offset {tie_offset} with {local} contested ties here does not fit in tie_total {total}")
    if total == 0:
        return mask
    device = mask.device
    if generator is None:  # the lowest indices win: the tie list's own order
        priority = torch.arange(tie_offset, tie_offset + local, device=device)
    else:  # tie j of the list wins before tie i when j comes earlier in the permutation
        perm = permutation(total, generator)  # torch.randperm, or the counter stream's
        rank = torch.empty_like(perm)
        rank[perm] = torch.arange(total)
        priority = rank[tie_offset:tie_offset + local].to(device)
    if local == 0:
        return mask
    # Each contested row keeps its ties of the ``slots`` lowest priorities (all distinct): lay the
    # priorities out as the rows (``total`` where no tie, above every priority) and cut each row at
    # its slots-th smallest.
    ties, slots = prepared.ties, prepared.slots
    order = torch.full(ties.shape, total, dtype=torch.int64, device=device).masked_scatter_(ties, priority)
    low, high = int(slots.min()), int(slots.max())
    if low == high:
        cut = order.kthvalue(low, dim=1, keepdim=True).values
    else:
        cut = order.sort(dim=1).values.gather(1, (slots - 1).unsqueeze(1))
    mask.index_put_((prepared.rows,), mask.index_select(0, prepared.rows) | (ties & (order <= cut)))
    return mask


def _competitors(scores: torch.Tensor, among: Optional[torch.Tensor], outside: bool) -> Optional[torch.Tensor]:
    """The competing entries (``None``: all), checked against ``scores``."""
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor, got {scores.dtype}")
    if bool(torch.isnan(scores).any()):
        raise ValueError(f"scores of shape {tuple(scores.shape)} contain NaN; selection needs ordered scores")
    if among is None:
        if outside:
            raise ValueError("outside=True needs the mask it refers to: pass among")
        return None
    if among.dtype != torch.bool or among.shape != scores.shape:
        raise ValueError(f"among must be a torch.bool mask shaped like the scores {tuple(scores.shape)}, "
                         f"got {among.dtype} of shape {tuple(among.shape)}")
    return ~among if outside else among


def _tie_args(tie_offset: int, tie_total: Optional[int]) -> None:
    if isinstance(tie_offset, bool) or not isinstance(tie_offset, int) or tie_offset < 0:
        raise ValueError(f"tie_offset must be a non-negative integer, got {tie_offset!r}")
    if tie_total is not None and (isinstance(tie_total, bool) or not isinstance(tie_total, int) or tie_total < 0):
        raise ValueError(f"tie_total must be a non-negative integer or None, got {tie_total!r}")


def _as_groups(scores: torch.Tensor, m: int, count: Count, among: Optional[torch.Tensor], outside: bool,
               unit_dim: int) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Scores, competitors and counts of a per-group selection, one group per row."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"group size m must be a positive integer, got {m!r}")
    valid = _competitors(scores, among, outside)
    rows, row_len = row_shape(scores.shape, unit_dim)
    values = _groups_view(scores.detach(), m, unit_dim)
    valid = None if valid is None else _groups_view(valid, m, unit_dim)
    counts = _counts_tensor(count, values.shape[0], (rows, row_len // m), values.device, "group")
    return values, valid, counts


def _as_rows(scores: torch.Tensor, count: Count, among: Optional[torch.Tensor], outside: bool,
             unit_dim: int) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Scores, competitors and counts of a per-row selection."""
    valid = _competitors(scores, among, outside)
    values = rows_view(scores.detach(), unit_dim)
    valid = None if valid is None else rows_view(valid, unit_dim)
    counts = _counts_tensor(count, values.shape[0], (values.shape[0],), values.device, "row")
    return values, valid, counts


def _finish(selected: torch.Tensor, shape: torch.Size, unit_dim: int) -> torch.Tensor:
    return from_rows(selected.reshape(row_shape(shape, unit_dim)), shape, unit_dim).contiguous()


def select_per_group(scores: torch.Tensor, m: int, count: Count, generator: Optional[RandomSource] = None, *,
                     among: Optional[torch.Tensor] = None, outside: bool = False, unit_dim: int = 0,
                     tie_offset: int = 0, tie_total: Optional[int] = None) -> torch.Tensor:
    """In every group of ``m`` consecutive row entries, the ``count`` highest-scoring competing ones.

    Ties follow the module's rule (a group is a row of the group view; ``select_top_plain`` when
    there is one group).

    Args:
        scores: floating-point scores shaped like the weight (no NaN).
        m: the group size; the row length must be a multiple of it.
        count: entries to keep per group: one integer for all, or an integer tensor of shape
            ``(rows, row_len // m)`` (as :func:`group_counts` returns), each within ``[0, competing]``.
        generator: breaks ties (``None``: the lowest indices win).
        among: ``torch.bool`` mask shaped like ``scores``: only its entries compete (the drop and
            pruning: the active weights); ``None``: all entries.
        outside: the entries *not* in ``among`` compete instead (regrowth: the inactive ones).
        unit_dim: the dimension of the weight's output units.
        tie_offset, tie_total: for a block of rows of a larger weight (FSDP2): the contested ties of
            the rows before this block, and of all rows (see :func:`contested_ties`).

    Returns:
        A contiguous ``torch.bool`` mask shaped like ``scores`` with exactly ``count`` entries set in
        every group, all of them competing.

    Raises:
        ValueError: a bad ``m``, ``count``, ``among``, ``unit_dim`` or tie span, NaN scores, a row
            length that is not a multiple of ``m``, or a group asked to keep more than it has competing.
    """
    _tie_args(tie_offset, tie_total)
    values, valid, counts = _as_groups(scores, m, count, among, outside, unit_dim)
    prepared = _prepare(values, valid, counts, "group")
    return _finish(_break_ties(prepared, generator, tie_offset, tie_total), scores.shape, unit_dim)


def select_per_row(scores: torch.Tensor, count: Count, generator: Optional[RandomSource] = None, *,
                   among: Optional[torch.Tensor] = None, outside: bool = False, unit_dim: int = 0,
                   tie_offset: int = 0, tie_total: Optional[int] = None) -> torch.Tensor:
    """In every row (output unit), the ``count`` highest-scoring competing entries.

    Ties follow the module's rule (``select_top_plain`` on a weight of one row).

    Args:
        scores: floating-point scores shaped like the weight (no NaN).
        count: entries to keep per row: one integer for all, or an integer tensor of shape
            ``(rows,)`` (as :func:`row_counts` returns), each within ``[0, competing]``.
        generator: breaks ties (``None``: the lowest indices win).
        among, outside: which entries compete, as for :func:`select_per_group`.
        unit_dim: the dimension of the weight's output units.
        tie_offset, tie_total: as for :func:`select_per_group`.

    Returns:
        A contiguous ``torch.bool`` mask shaped like ``scores`` with exactly ``count`` entries set in
        every row, all of them competing.

    Raises:
        ValueError: a bad ``count``, ``among``, ``unit_dim`` or tie span, NaN scores, or a row asked
            to keep more than it has competing.
    """
    _tie_args(tie_offset, tie_total)
    values, valid, counts = _as_rows(scores, count, among, outside, unit_dim)
    prepared = _prepare(values, valid, counts, "row")
    return _finish(_break_ties(prepared, generator, tie_offset, tie_total), scores.shape, unit_dim)


def keep_top_per_group(scores: torch.Tensor, m: int, n: int, generator: Optional[RandomSource] = None, *,
                       unit_dim: int = 0) -> torch.Tensor:
    """The ``n`` highest scores of every group of ``m`` consecutive row entries (an N:M mask).

    Args:
        scores: floating-point scores shaped like the weight (no NaN).
        m: the group size (the row length must be a multiple of it).
        n: entries kept per group, in ``[0, m]``.
        generator: breaks ties (``None``: the lowest indices win).
        unit_dim: the dimension of the weight's output units.

    Returns:
        A ``torch.bool`` mask shaped like ``scores``, exactly ``n`` set in every group.

    Raises:
        ValueError: as :func:`select_per_group`.
    """
    return select_per_group(scores, m, n, generator, unit_dim=unit_dim)


def keep_top_per_row(scores: torch.Tensor, k: int, generator: Optional[RandomSource] = None, *,
                     unit_dim: int = 0) -> torch.Tensor:
    """The ``k`` highest scores of every row (a constant fan-in mask).

    Args:
        scores: floating-point scores shaped like the weight (no NaN).
        k: entries kept per row, in ``[0, row_len]``.
        generator: breaks ties (``None``: the lowest indices win).
        unit_dim: the dimension of the weight's output units.

    Returns:
        A ``torch.bool`` mask shaped like ``scores``, exactly ``k`` set in every row.

    Raises:
        ValueError: as :func:`select_per_row`.
    """
    return select_per_row(scores, k, generator, unit_dim=unit_dim)


def _structured(structure: Structure) -> None:
    if not structure.structured:
        raise ValueError("an unstructured layer has no per-group or per-row selection: use the layer-wise top-k")


def select_structured(scores: torch.Tensor, structure: Structure, count: Count,
                      generator: Optional[RandomSource] = None, *, among: Optional[torch.Tensor] = None,
                      outside: bool = False, unit_dim: int = 0, tie_offset: int = 0,
                      tie_total: Optional[int] = None) -> torch.Tensor:
    """:func:`select_per_group` (group size ``M``) for N:M, :func:`select_per_row` for fan-in.

    Args:
        scores, count, generator, among, outside, unit_dim, tie_offset, tie_total: as for those.
        structure: the layer's structure (``unstructured`` is refused).

    Returns:
        The mask, as those return it.

    Raises:
        ValueError: an unstructured ``structure``, or as those.
    """
    _structured(structure)
    if structure.kind == "n:m":
        return select_per_group(scores, structure.m, count, generator, among=among, outside=outside,
                                unit_dim=unit_dim, tie_offset=tie_offset, tie_total=tie_total)
    return select_per_row(scores, count, generator, among=among, outside=outside, unit_dim=unit_dim,
                          tie_offset=tie_offset, tie_total=tie_total)


def contested_ties(scores: torch.Tensor, structure: Structure, count: Count, *,
                   among: Optional[torch.Tensor] = None, outside: bool = False, unit_dim: int = 0) -> int:
    """The contested ties of :func:`select_structured` with these arguments: the length of the tie
    list its permutation orders.

    Under FSDP2 each rank counts its own rows' ties; rank ``r`` then passes ``tie_offset`` = the
    sum over lower ranks and ``tie_total`` = the sum over all ranks (one all-gather of one integer
    per layer), so that the ranks' masks together equal one process's.

    Args:
        scores, structure, count, among, outside, unit_dim: as for :func:`select_structured`.

    Returns:
        The number of contested ties (0: the generator is not used).

    Raises:
        ValueError: as :func:`select_structured`.
    """
    _structured(structure)
    if structure.kind == "n:m":
        values, valid, counts = _as_groups(scores, structure.m, count, among, outside, unit_dim)
        return _prepare(values, valid, counts, "group").count
    values, valid, counts = _as_rows(scores, count, among, outside, unit_dim)
    return _prepare(values, valid, counts, "row").count


# ---------------------------------------------------------------------------------------------- the update

def active_counts(mask: torch.Tensor, structure: Structure, unit_dim: int = 0) -> torch.Tensor:
    """Per group (N:M, ``(rows, row_len // M)``) or per row (fan-in, ``(rows,)``), the active entries."""
    _structured(structure)
    return group_counts(mask, structure.m, unit_dim) if structure.kind == "n:m" else row_counts(mask, unit_dim)


def room(before: torch.Tensor, after: torch.Tensor, structure: Structure, unit_dim: int = 0) -> torch.Tensor:
    """Per group (N:M) or row (fan-in), the entries ``after`` lacks to hold what ``before`` held.

    After a drop (``after`` = the kept mask, a subset of ``before``) this is what each group or row
    regrows, so that the regrown mask holds the same counts as ``before``.

    Args:
        before: the mask before the drop.
        after: the mask after it.
        structure: the layer's structure (N:M or fan-in).
        unit_dim: the dimension of the weight's output units.

    Returns:
        int64 counts shaped as :func:`group_counts` (N:M) or :func:`row_counts` (fan-in) return them.

    Raises:
        ValueError: an unstructured ``structure``, or ``after`` holding more than ``before`` somewhere.
    """
    gap = active_counts(before, structure, unit_dim) - active_counts(after, structure, unit_dim)
    if bool((gap < 0).any()):
        raise ValueError("room: the mask after the drop holds more active entries than the mask before it")
    return gap


def drop_and_regrow(drop_scores: torch.Tensor, grow_scores: torch.Tensor, mask: torch.Tensor, structure: Structure,
                    n_drop: int, drop_generator: Optional[RandomSource] = None,
                    grow_generator: Optional[RandomSource] = None, *,
                    unit_dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's drop-and-regrow within its structure (see the module notes).

    The drop keeps the ``active - n_drop`` active entries with the highest drop scores over the
    whole layer (``select_top`` of the scores, -1 where inactive: the library's unstructured drop);
    every group (N:M) or row (fan-in) then regrows exactly what it lost, among its entries inactive
    after the drop, by the grow scores. The new mask ``kept | grown`` has the counts of ``mask`` in
    every group and row.

    Args:
        drop_scores: high = keep (non-negative, as the library's criteria), shaped like ``mask``.
        grow_scores: high = regrow first, shaped like ``mask``.
        mask: the ``torch.bool`` mask before the update.
        structure: the layer's structure (N:M or fan-in).
        n_drop: active entries to drop, in ``[0, active]``.
        drop_generator, grow_generator: break the drop's and the regrowth's ties.
        unit_dim: the dimension of the weight's output units.

    Returns:
        ``(kept, grown)``: the mask after the drop, and the regrown entries (disjoint from ``kept``).

    Raises:
        ValueError: an unstructured ``structure``, ``n_drop`` out of range, or as :func:`select_structured`.
    """
    _structured(structure)
    active = int(mask.sum())
    if isinstance(n_drop, bool) or not isinstance(n_drop, int) or not 0 <= n_drop <= active:
        raise ValueError(f"n_drop must be an integer in [0, {active}] (the active entries), got {n_drop!r}")
    if not drop_scores.is_floating_point() or bool(torch.isnan(drop_scores).any()):
        raise ValueError("drop scores must be floating point without NaN")
    kept = select_top(torch.where(mask, drop_scores.detach(), -1.0), active - n_drop, drop_generator).view(mask.shape)
    grown = select_structured(grow_scores, structure, room(mask, kept, structure, unit_dim), grow_generator,
                              among=kept, outside=True, unit_dim=unit_dim)
    return kept, grown


# ---------------------------------------------------------------------------------------------- neuron ablation

def _ablation(gamma: float) -> Fraction:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma < 1.0:
        raise ValueError(f"ablation must be a number in [0, 1), got {gamma!r}")
    return Fraction(repr(float(gamma)))


def ablation_threshold(gamma: float, total: int, rows: int) -> int:
    """The salient weights a unit needs to stay live: ``max(1, floor(γ · total / rows))``.

    ``total / rows`` is the fan-in the layer's budget gives when no unit is ablated; ``γ`` is read
    as its shortest decimal text (``0.29 · 100`` is 29, not the 28.99... of binary floating point).

    Args:
        gamma: γ_sal, in [0, 1).
        total: the layer's active weights.
        rows: its output units (at least 1).

    Returns:
        The threshold (at least 1).

    Raises:
        ValueError: ``gamma`` outside [0, 1).
    """
    return max(1, math.floor(_ablation(gamma) * Fraction(int(total), max(int(rows), 1))))


def fan_in_after_ablation(total: int, live: int, row_len: int) -> int:
    """The count of every live row when ``live`` rows share ``total`` active weights:
    ``clamp(round(total / live), 1, row_len)``, rounded half to even (the library's rounding)."""
    if live < 1:
        raise ValueError(f"a layer needs a live row to hold weights, got {live!r} live rows")
    return min(int(row_len), max(1, round(Fraction(int(total), int(live)))))


def ablate_units(mask: torch.Tensor, kept: torch.Tensor, regrowable: torch.Tensor, gamma: float,
                 unit_dim: int = 0) -> tuple[torch.Tensor, int]:
    """The ablated units of a fan-in layer after one drop-and-regrow update, and the live rows' new count
    (the rule is in the module notes, "Neuron ablation").

    Args:
        mask: the ``torch.bool`` mask before the update (every live row holds the same count, ablated rows 0).
        kept: the mask after the drop.
        regrowable: the entries the unstructured update would regrow (outside ``kept``).
        gamma: γ_sal, in [0, 1).
        unit_dim: the dimension of the weight's output units.

    Returns:
        ``(ablated, k)``: ``(rows,)`` bool, every row without weights after the update (those already
        at 0 included), and the count of every other row.

    Raises:
        ValueError: ``gamma`` outside [0, 1).
    """
    counts = row_counts(mask, unit_dim)
    rows, row_len = row_shape(mask.shape, unit_dim)
    total, live = int(counts.sum()), counts > 0
    n_live = int(live.sum())
    if n_live == 0:
        return ~live, 0
    threshold = ablation_threshold(gamma, total, rows)
    salient = row_counts(kept, unit_dim) + row_counts(regrowable, unit_dim)
    candidates = (live & (salient < threshold)).nonzero().squeeze(1)
    most = n_live - max(1, -(-total // row_len))  # keep enough live rows for the budget to fit
    if candidates.numel() > most:  # the fewest salient weights first, then the lowest row index
        order = (salient[candidates] * rows + candidates).argsort()
        candidates = candidates[order[:max(most, 0)]]
    ablated = ~live
    ablated[candidates] = True
    return ablated, fan_in_after_ablation(total, n_live - int(candidates.numel()), row_len)


# ---------------------------------------------------------------------------------------------- schedule and init

def _density(density: float) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    return float(density)


def nm_count(density: float, n: int, m: int) -> int:
    """Active entries per group of ``m`` at ``density`` under the N:M schedule: ``clamp(round(d * m), n, m)``.

    Args:
        density: the schedule's density at a step, in (0, 1].
        n, m: the structure's N and M (``1 <= n < m``).

    Returns:
        ``n_t`` in ``[n, m]``: ``m`` at density 1, ``n`` at density ``n / m`` and below.

    Raises:
        ValueError: a density outside (0, 1], or ``n``, ``m`` not a structure.
    """
    structure = Structure("n:m", n, m)
    return min(structure.m, max(structure.n, round(_density(density) * structure.m)))


def fan_in_count(density: float, row_len: int) -> int:
    """Active inputs per output unit at ``density``: ``clamp(round(d * row_len), 1, row_len)``.

    Args:
        density: the layer's density, in (0, 1].
        row_len: the entries of one row (a unit's inputs), at least 1.

    Returns:
        ``k`` in ``[1, row_len]``; the layer's density is then ``k / row_len``.

    Raises:
        ValueError: a density outside (0, 1] or a row length below 1.
    """
    if isinstance(row_len, bool) or not isinstance(row_len, int) or row_len < 1:
        raise ValueError(f"row_len must be a positive integer, got {row_len!r}")
    return min(row_len, max(1, round(_density(density) * row_len)))


def random_structured_mask(shape: Sequence[int], structure: Structure, count: int, generator: RandomSource, *,
                           unit_dim: int = 0, device: Optional[torch.device] = None) -> torch.Tensor:
    """A random mask with exactly ``count`` active entries in every group (N:M) or row (fan-in).

    Uniform scores are drawn on the CPU from ``generator`` (the same mask for CPU and CUDA weights),
    and each group or row keeps its ``count`` highest (exact ties, which float draws make rare, go
    to the lowest indices, as the library's random initial masks).

    Args:
        shape: the weight's shape.
        structure: N:M or fan-in.
        count: per group (``nm_count``) or per row (``fan_in_count``).
        generator: a seeded CPU generator (e.g. from (seed, "init", layer)), or a
            :class:`~granet.kernels.counter_rng.CounterGenerator` (its stream, drawn on the CPU).
        unit_dim: the dimension of the weight's output units.
        device: where the mask goes (default: the CPU).

    Returns:
        The ``torch.bool`` mask.

    Raises:
        ValueError: an unstructured ``structure``, a layer the structure does not fit, or a count
            out of range.
    """
    _structured(structure)
    check_layer(structure, f"a weight of shape {tuple(shape)}", shape, unit_dim)
    scores = uniform(tuple(int(s) for s in shape), generator)  # torch.rand on the CPU, or the counter stream
    mask = select_structured(scores, structure, count, None, unit_dim=unit_dim)
    return mask if device is None else mask.to(device)


# ---------------------------------------------------------------------------------------------- checks

@dataclass(frozen=True)
class Violation:
    """The first row or group of a mask that breaks its structure.

    Attributes:
        row: the output unit.
        group: the group within the row (N:M), ``None`` for fan-in.
        found: its active entries.
        expected: what the structure asks for.
        offending: how many rows (fan-in) or groups (N:M) break it in all.
    """

    row: int
    group: Optional[int]
    found: int
    expected: int
    offending: int

    def __str__(self) -> str:
        where = f"row {self.row}" if self.group is None else f"row {self.row} group {self.group}"
        kind = "row" if self.group is None else "group"
        return (f"{where} holds {self.found} active entries, expected {self.expected} "
                f"({self.offending} {kind}{'s' if self.offending != 1 else ''} in all)")


def structure_violations(mask: torch.Tensor, structure: Structure, unit_dim: int = 0,
                         count: Optional[int] = None, *, ablated: bool = False) -> Optional[Violation]:
    """The first row (fan-in) or group (N:M) of ``mask`` that breaks ``structure``, or ``None``.

    Args:
        mask: a ``torch.bool`` mask.
        structure: the structure it should have (``unstructured``: never broken).
        unit_dim: the dimension of the weight's output units.
        count: the count every group or row must hold; default ``N`` for N:M (pass ``n_t`` during
            the gradual schedule) and, for fan-in, the count of row 0 (every row the same), with
            ``ablated`` the count of the first row that has one.
        ablated: fan-in with neuron ablation: rows of 0 (ablated units) are allowed, every other
            row must hold ``count``.

    Returns:
        A :class:`Violation` (first in row order), or ``None`` when the mask has the structure.

    Raises:
        ValueError: a mask the structure cannot apply to (see :func:`check_layer`), or ``ablated``
            with a structure other than fan-in.
    """
    if ablated and structure.kind != "fan-in":
        raise ValueError(f"ablated rows exist only under structure fan-in, got {structure}")
    if not structure.structured:
        return None
    check_layer(structure, f"a mask of shape {tuple(mask.shape)}", mask.shape, unit_dim)
    counts = active_counts(mask, structure, unit_dim)
    if counts.numel() == 0:
        return None
    if count is not None:
        expected = count
    elif structure.kind == "n:m":
        expected = structure.n
    else:
        nonzero = counts[counts > 0] if ablated else counts
        expected = int(nonzero[0]) if nonzero.numel() else 0
    wrong = counts != expected
    if ablated:
        wrong &= counts != 0
    offending = int(wrong.sum())
    if offending == 0:
        return None
    first = int(wrong.reshape(-1).nonzero()[0, 0])
    if structure.kind == "n:m":
        row, group = divmod(first, counts.shape[1])
        return Violation(row, group, int(counts[row, group]), expected, offending)
    return Violation(first, None, int(counts[first]), expected, offending)


def is_structured(mask: torch.Tensor, structure: Structure, unit_dim: int = 0, count: Optional[int] = None, *,
                  ablated: bool = False) -> bool:
    """Whether ``mask`` has ``structure`` exactly (see :func:`structure_violations`).

    Args:
        mask: a ``torch.bool`` mask.
        structure: the structure.
        unit_dim: the dimension of the weight's output units.
        count: the count every group or row must hold (defaults as :func:`structure_violations`).
        ablated: allow rows of 0 (fan-in with neuron ablation).

    Returns:
        ``True`` when no row or group breaks it.

    Raises:
        ValueError: a mask the structure cannot apply to.
    """
    return structure_violations(mask, structure, unit_dim, count, ablated=ablated) is None
