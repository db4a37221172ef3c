"""Exact top-k selection over tensors split by rows across the ranks of a process group.

Under fully sharded data parallel training (FSDP2) every rank holds a contiguous block of rows of
each weight (``Shard(0)``: rank r owns rows ``[r*c, min((r+1)*c, rows))`` with ``c = ceil(rows /
world)``, so the last ranks may hold fewer rows or none). :func:`select_top_sharded` returns, on
every rank, its rows of the mask that :func:`~granet.sparsity.criteria.select_top` would return on the
full tensor, bit for bit, without gathering the scores:

1. **Threshold.** Scores become order-preserving integer keys (the IEEE bits of a float, with the
   magnitude bits of negative values flipped, so integer order is float order). A radix select
   finds the k-th largest key, 8 bits per round: each rank histograms its candidate keys by their
   next 8 bits, one all-reduce sums the 256-bucket histograms, and every rank keeps only the keys
   in the bucket that holds the k-th largest. All problems of one call (e.g. every layer's drop)
   go together, so a selection costs 4 all-reduces of ``2 KiB x problems`` for float32 scores (8
   for float64), whatever the number of layers, and ~4 passes over the local scores, most of them
   over a shrinking candidate set.
2. **Ties.** ``select_top`` keeps every entry above the threshold and fills the remaining slots
   from the entries *equal* to it: the tie list in flat index order, permuted by
   ``torch.randperm(n_ties, generator=g)``, first slots win. Flat index order of a row-sharded
   tensor is rank order, and of a concatenation (the global prune) segment-major then rank-major,
   so one all-gather of per-rank tie counts gives every local tie its global tie index; every rank
   draws the same permutation from the same generator state and keeps its chosen ties. The
   generator is consumed exactly as ``select_top`` consumes it (one ``randperm`` only when there
   are more ties than slots), so later draws from it agree too.

Bytes sent by the collectives issued here are counted in :data:`COMM` (for benchmarks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from ..kernels.counter_rng import RandomSource, permutation

__all__ = ["COMM", "CommCounter", "RowShard", "row_shard", "order_keys", "select_top_sharded"]

#: Key bits resolved per round of the threshold search: 4 rounds for float32 scores, 8 for float64.
RADIX_BITS = 8


class CommCounter:
    """Running totals of the collectives issued by granet's sharded code on this rank."""

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0

    def reset(self) -> None:
        """Start counting from zero."""
        self.calls = 0
        self.bytes = 0

    def add(self, tensor: torch.Tensor) -> None:
        """Record one collective to which this rank contributes ``tensor``."""
        self.calls += 1
        self.bytes += tensor.numel() * tensor.element_size()


#: Collectives issued by this module and :mod:`granet.sparsity.fsdp_layout`: calls, and bytes this rank contributes.
COMM = CommCounter()


def all_reduce(tensor: torch.Tensor, group: Optional[Any], op: Any = None) -> torch.Tensor:
    """In-place all-reduce (sum by default), counted in :data:`COMM`."""
    COMM.add(tensor)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return tensor


def all_gather(tensor: torch.Tensor, group: Optional[Any]) -> torch.Tensor:
    """Every rank's ``tensor`` stacked along a new first dimension (equal shapes on all ranks)."""
    world = dist.get_world_size(group)
    out = [torch.empty_like(tensor) for _ in range(world)]
    COMM.add(tensor)
    dist.all_gather(out, tensor, group=group)
    return torch.stack(out)


@dataclass(frozen=True)
class RowShard:
    """Where one rank's rows of a row-sharded tensor sit in the full tensor.

    Attributes:
        shape: the full (global) shape.
        start: the first full-tensor row held locally.
        rows: the number of rows held locally (0 on ranks past the end).
    """

    shape: tuple[int, ...]
    start: int
    rows: int

    @property
    def row_numel(self) -> int:
        """Entries per row (1 for a 1-D tensor)."""
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n

    @property
    def local_shape(self) -> tuple[int, ...]:
        """Shape of the local block."""
        return (self.rows, *self.shape[1:])

    def local_rows(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full tensor (a view)."""
        return full.narrow(0, self.start, self.rows)


def row_shard(shape: Sequence[int], rank: int, world: int) -> RowShard:
    """The rows rank ``rank`` of ``world`` holds under ``Shard(0)`` (``torch.chunk`` sizes)."""
    rows = int(shape[0])
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    return RowShard(tuple(int(d) for d in shape), start, min(start + chunk, rows) - start)


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """Integer keys with the order (and equalities) of the float ``scores``; -0.0 and +0.0 share a key.

    float16/bfloat16/float32 scores give int32 keys (widened to float32 exactly), float64 int64.
    """
    if scores.dtype == torch.float64:
        bits = (scores + 0.0).view(torch.int64)  # + 0.0 turns -0.0 into +0.0
        flip = (bits >> 63).bitwise_and_(0x7FFF_FFFF_FFFF_FFFF)
    else:
        bits = (scores.float() + 0.0).view(torch.int32)
        flip = (bits >> 31).bitwise_and_(0x7FFF_FFFF)
    return flip.bitwise_xor_(bits)  # negative floats: magnitude bits flipped, so larger |x| sorts lower


def _key_range(dtype: torch.dtype) -> tuple[int, int]:
    """A key range [lo, hi) containing every key of ``dtype`` scores."""
    if dtype == torch.float64:
        return -(1 << 63), (1 << 63)
    return -(1 << 31), (1 << 31)


def _thresholds(
    keys: list[torch.Tensor], owner: list[int], ks: list[int], lo: int, hi: int, group: Optional[Any],
    device: torch.device
) -> list[int]:
    """Per problem p, the ks[p]-th largest key over all ranks (needs 0 < k <= n): a radix select.

    Invariant per problem: the answer lies in ``[low, low + span)`` and is the ``need``-th largest
    key there. Each round splits the interval into ``2**RADIX_BITS`` buckets by the key's next bits,
    all-reduces the bucket counts of every problem at once, keeps the bucket holding the answer
    and drops, locally, every key outside it (``band``).
    """
    n_problems, buckets = len(ks), 1 << RADIX_BITS
    lows, spans, need = [lo] * n_problems, [hi - lo] * n_problems, list(ks)
    band = list(keys)
    while any(span > 1 for span in spans):
        shifts = [max(0, (span - 1).bit_length() - RADIX_BITS) for span in spans]
        hist = torch.zeros(n_problems, buckets, dtype=torch.int64)
        digits: list[Optional[torch.Tensor]] = []
        for s, b in enumerate(band):
            p = owner[s]
            if spans[p] <= 1:
                digits.append(None)
                continue
            # lows[p] is a multiple of 2**shift, so this is (b - low) >> shift without overflowing
            # the key dtype; it is < buckets because span - 1 < 2**(shift + RADIX_BITS).
            digit = (b >> shifts[p]).sub_(lows[p] >> shifts[p])
            hist[p] += torch.bincount(digit, minlength=buckets).cpu()
            digits.append(digit)
        hist = all_reduce(hist.to(device), group).cpu()
        chosen = [0] * n_problems
        for p in range(n_problems):
            if spans[p] <= 1:
                continue
            from_top = hist[p].flip(0).cumsum(0)  # from_top[i]: keys in buckets >= buckets - 1 - i
            i = int(torch.searchsorted(from_top, need[p]))  # first i with from_top[i] >= need
            chosen[p] = buckets - 1 - i
            need[p] -= int(from_top[i]) - int(hist[p, chosen[p]])
            new_low = lows[p] + (chosen[p] << shifts[p])
            spans[p] = min(1 << shifts[p], lows[p] + spans[p] - new_low)
            lows[p] = new_low
        for s, kept_digit in enumerate(digits):
            if kept_digit is not None:
                band[s] = band[s][kept_digit == chosen[owner[s]]]
    return lows


def _chosen_ties(ties: torch.Tensor, keep: int, generator: Optional[RandomSource], rank: int) -> list[torch.Tensor]:
    """Which of this rank's ties at the threshold to keep, per segment of one problem.

    ``ties[r, j]`` is rank r's tie count in segment j. The global tie list is segment-major, then
    rank-major, then flat order (the flat order of the concatenated full tensors); ``select_top``
    keeps the ties at positions ``randperm(n_ties, generator)[:keep]`` of it (the first ``keep``
    without a generator) and draws no permutation when every tie fits.
    """
    n_ties = int(ties.sum())
    if keep == n_ties:
        chosen = torch.ones(n_ties, dtype=torch.bool)
    else:
        chosen = torch.zeros(n_ties, dtype=torch.bool)
        winners = permutation(n_ties, generator)[:keep] if generator is not None else torch.arange(keep)
        chosen[winners] = True
    picks, offset = [], 0
    for j in range(ties.shape[1]):
        first = offset + int(ties[:rank, j].sum())  # this segment's ties on lower ranks come first
        picks.append(chosen[first:first + int(ties[rank, j])])
        offset += int(ties[:, j].sum())
    return picks


def select_top_sharded(
    segments: Sequence[torch.Tensor],
    owner: Sequence[int],
    sizes: Sequence[int],
    ks: Sequence[int],
    generators: Sequence[Optional[RandomSource]],
    group: Optional[Any] = None,
) -> list[torch.Tensor]:
    """Local masks of exact top-k selections over row-sharded scores, one selection per problem.

    Problem p is the concatenation (in order) of the full tensors of the segments ``s`` with
    ``owner[s] == p``; ``segments[s]`` is this rank's rows of segment s. The result on each rank is
    its rows of ``select_top(concatenation, ks[p], generators[p])``, split back into segments.
    Every rank of ``group`` must call this with the same problems, sizes, ks and generator states.

    Args:
        segments: local score blocks (any float dtype, the same dtype for all; no NaN).
        owner: the problem index of each segment (segments of one problem in flat order).
        sizes: full numel of each problem.
        ks: entries to select per problem (clamped to [0, size]).
        generators: tie-breaking generator per problem (``None``: lowest flat indices win).
        group: the process group over which the rows are split.

    Returns:
        Per segment, a ``torch.bool`` tensor shaped like ``segments[s]``.
    """
    owner = list(owner)
    device = segments[0].device
    comm_device = torch.device("cpu") if dist.get_backend(group) == "gloo" else device
    flat = [s.reshape(-1) for s in segments]
    out = [torch.zeros(f.numel(), dtype=torch.bool, device=device) for f in flat]
    full = [p for p, k in enumerate(ks) if k >= sizes[p]]
    for s, p in enumerate(owner):
        if p in full:
            out[s].fill_(True)
    active = [p for p, k in enumerate(ks) if 0 < k < sizes[p]]
    if not active:
        return [o.view_as(s) for o, s in zip(out, segments)]
    # Renumber the problems that need a search: 0..len(active)-1.
    index = {p: j for j, p in enumerate(active)}
    segs = [s for s, p in enumerate(owner) if p in index]
    keys = [order_keys(flat[s]) for s in segs]
    lo, hi = _key_range(segments[0].dtype)
    thresholds = _thresholds(keys, [index[owner[s]] for s in segs], [ks[p] for p in active], lo, hi, group, comm_device)
    # Per segment on this rank: entries strictly above the threshold, and ties at it.
    local = torch.zeros(len(segs), 2, dtype=torch.int64)
    ties: list[torch.Tensor] = []
    for j, (s, key) in enumerate(zip(segs, keys)):
        t = thresholds[index[owner[s]]]
        out[s] = key > t
        ties.append((key == t).nonzero().squeeze(1))
        local[j, 0] = int(torch.count_nonzero(out[s]))
        local[j, 1] = ties[-1].numel()
    table = all_gather(local.to(comm_device), group).cpu()  # (world, segments, 2)
    rank = dist.get_rank(group)
    for p in active:
        mine = [j for j, s in enumerate(segs) if owner[s] == p]
        keep = ks[p] - int(table[:, mine, 0].sum())
        for j, pick in zip(mine, _chosen_ties(table[:, mine, 1], keep, generators[p], rank)):
            out[segs[j]][ties[j][pick.to(device)]] = True
    return [o.view_as(s) for o, s in zip(out, segments)]
