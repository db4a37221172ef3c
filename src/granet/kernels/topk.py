"""Exact top-k selection, fast on tens of millions of entries, with seeded tie-breaking.

The definition (:func:`select_top_plain`): the k-th largest value is the threshold; entries above
it are selected; the entries equal to it, taken in index order, fill the remaining slots, chosen by
``torch.randperm`` with the caller's generator (the lowest indices without one). Every faster path
here returns exactly that mask, and falls back to the definition whenever a shortcut does not apply.

Topology updates select among *some* entries of a tensor (the active weights when pruning, the
inactive ones when regrowing), historically by scoring the others ``-1`` in a float copy.
:func:`select_top_segments` gives the same mask without that copy, over one or several tensors at
once (a global threshold over all layers) without concatenating them:

1. a fixed-seed sample of the competing entries brackets the threshold between two sample values
   ``lo <= t <= hi`` (a Floyd-Rivest step; the bracket is ~8 binomial standard deviations wide);
2. one pass per tensor marks the entries surely selected (``> hi``) and collects the few inside
   ``(lo, hi]`` with their indices;
3. the exact threshold and the tie-breaking run on that thin band only, and its chosen entries are
   written into the marks. Ties at ``t`` all lie in the band, in index order, so the ``randperm``
   over them is the one the definition draws.

Sparse layers take a shorter way: when fewer than 1/8 of the entries compete, they are gathered
(index order) and selected among directly. The passes over several segments run on the layer
threads of :mod:`granet.kernels.layer_threads`. With ``as_index`` the result is the selected positions instead of
masks: a selection at the top end (regrowth) is then read off the band without any mask pass.
Scratch memory (:func:`scratch`) is a few buffers the size of the largest tensor seen, per thread,
dtype and device, reused across calls: fresh allocations of that size cost more in page faults
than the work done in them.
"""
from __future__ import annotations

import threading
import weakref
from typing import Callable, Optional, Sequence, cast

import torch

from . import native
from .counter_rng import RandomSource, permutation
from .layer_threads import layer_map, on_cpu

# Below this many entries a full kthvalue is cheap; above it, selection brackets the threshold.
_BRACKET_MIN_SIZE = 1 << 16
_MAX_SAMPLE_SIZE = 1 << 16
# With fewer competing entries than this in the sample, gather the competitors first instead.
_MIN_VALID_SAMPLE = 2048
# Below this fraction of competing entries, gather them instead of passing over every entry.
_COMPACT_BELOW = 0.125
# Thresholds within this fraction of either end use a one-sided band.
_ONE_SIDED = 0.05

Loader = Callable[[], torch.Tensor]
Gatherer = Callable[[torch.Tensor], torch.Tensor]


class Scores:
    """One segment's scores for :func:`select_top_segments`: a tensor, or its magnitudes with
    ``absolute`` (no float copy of them is kept).

    Called, it loads the flat scores (``|x|`` into float scratch memory, valid until the next
    load); :meth:`gather` reads them at a few positions. Passed as a loader, it also lets the
    selection passes run the fused kernels of :mod:`granet.kernels.native` on the tensor itself.
    """

    __slots__ = ("flat", "absolute")

    def __init__(self, tensor: torch.Tensor, absolute: bool = False) -> None:
        self.flat = tensor.detach().reshape(-1)
        self.absolute = absolute

    def __call__(self) -> torch.Tensor:
        if not self.absolute:
            return self.flat
        return torch.abs(self.flat, out=scratch(self.flat.numel(), self.flat.dtype, self.flat.device, slot=0))

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """The scores at flat ``index`` (on the tensor's device)."""
        values = self.flat.index_select(0, index.to(self.flat.device))
        return values.abs_() if self.absolute else values


def _native(load: Loader, *masks: Optional[torch.Tensor]) -> Optional[Scores]:
    """``load`` when the fused kernels can run on it and ``masks``, else ``None``."""
    return load if isinstance(load, Scores) and native.supports([load.flat], masks) else None


class _Buffers:
    """One thread's buffers, keyed by (dtype, device, slot), in an object that can be weakly
    referenced and is hashed and compared by identity (for the weak set of all threads' buffers)."""

    def __init__(self) -> None:
        self.by_key: dict[tuple[torch.dtype, torch.device, int], torch.Tensor] = {}


class _ScratchBuffers(threading.local):
    """Per-thread reusable buffers; every live thread's are also in ``_ALL_BUFFERS`` (weakly: they
    are freed with their thread) for the memory accounting."""

    def __init__(self) -> None:
        self.buffers = _Buffers()
        with _ALL_LOCK:
            _ALL_BUFFERS.add(self.buffers)


_ALL_BUFFERS: "weakref.WeakSet[_Buffers]" = weakref.WeakSet()
_ALL_LOCK = threading.Lock()
_SCRATCH = _ScratchBuffers()


def scratch(numel: int, dtype: torch.dtype, device: torch.device, slot: int = 0) -> torch.Tensor:
    """A reusable 1-D buffer of ``numel`` entries (contents undefined, valid until the next call
    for the same dtype, device and slot in this thread). It grows to the largest size asked for."""
    key = (dtype, torch.device(device), slot)
    buffers = _SCRATCH.buffers.by_key
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = buffers[key] = torch.empty(0, dtype=dtype, device=device)  # free the old one first
        buf = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def scratch_bytes() -> int:
    """Bytes held by the scratch buffers of every thread (the caller's and the layer threads')."""
    with _ALL_LOCK:
        return sum(b.numel() * b.element_size() for buffers in _ALL_BUFFERS for b in list(buffers.by_key.values()))


def release_scratch() -> None:
    """Free the scratch buffers of every thread (they are re-created on demand); call it between
    updates, not during one."""
    with _ALL_LOCK:
        for buffers in _ALL_BUFFERS:
            buffers.by_key.clear()


def select_top_plain(scores: torch.Tensor, k: int, generator: Optional[RandomSource] = None) -> torch.Tensor:
    """The definition of exact top-k: full ``kthvalue`` threshold, ``randperm`` among the ties."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    # kthvalue(j) is the j-th smallest, so the k-th largest is the (n - k + 1)-th smallest.
    threshold = _kth_smallest(flat, n - k + 1)
    mask = flat >= threshold
    extra = int(torch.count_nonzero(mask)) - k
    if extra > 0:  # ties at the threshold: keep only as many of them as there are slots left
        ties = (flat == threshold).nonzero().squeeze(1)
        keep = ties.numel() - extra
        if generator is not None:
            ties = ties[permutation(ties.numel(), generator, ties.device)]
        mask[ties[keep:]] = False
    return mask.view_as(scores)


def _kth_smallest(flat: torch.Tensor, j: int) -> torch.Tensor:
    """``flat.kthvalue(j).values`` (a native radix select where :mod:`granet.kernels.native` takes ``flat``:
    about 3 ns per entry, where torch's takes about 13 above 32K entries)."""
    if flat.numel() < 1 << 32 and native.supports([flat]):
        value = native.kth_smallest(flat, j)
        if value is not None:
            return value
    return flat.kthvalue(j).values


def select_top(scores: torch.Tensor, k: int, generator: Optional[RandomSource] = None) -> torch.Tensor:
    """Boolean mask selecting exactly the ``k`` largest entries of ``scores`` (see the module notes).

    Args:
        scores: tensor of any shape; must not contain NaN.
        k: number of entries to select, clamped to [0, numel].
        generator: optional CPU generator for tie-breaking.

    Returns:
        A ``torch.bool`` tensor of the same shape with exactly ``min(max(k, 0), numel)`` True.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if n < _BRACKET_MIN_SIZE or k <= 0 or k >= n:
        return select_top_plain(scores, k, generator)
    source = Scores(flat)
    out = select_top_segments([source], [source.gather], [None], [n], k, generator, sentinel=None)
    return out[0].view_as(scores)


def select_top_segments(
    loads: Sequence[Loader],
    gathers: Sequence[Gatherer],
    valids: Sequence[Optional[torch.Tensor]],
    sizes: Sequence[int],
    k: int,
    generator: Optional[RandomSource],
    sentinel: Optional[float] = -1.0,
    competitors: Optional[Sequence[int]] = None,
    as_index: bool = False,
) -> list[torch.Tensor]:
    """Exactly ``select_top(cat(where(valid_i, values_i, sentinel)), k, generator).split(sizes)``.

    Segment ``i`` has ``sizes[i]`` entries; ``loads[i]()`` returns its values as a flat float
    tensor (it may live in scratch memory: it is used before the next load), ``gathers[i](index)``
    its values at a few flat (CPU) indices, on its device, and ``valids[i]`` (flat ``torch.bool``,
    or ``None`` when all compete) marks the entries that compete; the others score ``sentinel``
    (which may be ``None`` only when every ``valids[i]`` is ``None``).

    Args:
        competitors: the number of ``True`` entries of each ``valids[i]``, when the caller knows
            them (saves a counting pass per segment); counted otherwise.
        as_index: return the flat positions of the selected entries (int64, in no particular
            order) instead of masks: cheaper when few are selected, since a selection near the
            top of the order is then read from the thin band alone, without a mask pass.

    Returns:
        One flat ``torch.bool`` mask per segment (or one index tensor, with ``as_index``).
    """
    n = sum(sizes)
    if n < _BRACKET_MIN_SIZE or k <= 0 or k >= n:
        return _definition(loads, valids, sizes, k, generator, sentinel, as_index)
    if competitors is None:
        competitors = [size if v is None else int(torch.count_nonzero(v)) for v, size in zip(valids, sizes)]
    m = sum(competitors)
    # k >= competitors: the threshold is the sentinel itself or the least competitor (rare).
    # Otherwise every shortcut returns None where it cannot prove it matches the definition.
    out = None
    if k < m:
        if m < _COMPACT_BELOW * n:  # few competitors (a sparse layer's active weights): gather them
            out = _compacted(loads, gathers, valids, sizes, competitors, k, generator, sentinel, as_index)
        else:
            out = _bracketed(loads, gathers, valids, sizes, competitors, k, generator, sentinel, as_index)
    return out if out is not None else _definition(loads, valids, sizes, k, generator, sentinel, as_index)


def _definition(loads, valids, sizes, k, generator, sentinel, as_index=False) -> list[torch.Tensor]:
    """The plain definition on the concatenated, sentinel-filled scores (small or rare cases)."""
    parts = []
    for load, valid in zip(loads, valids):
        values = load()
        parts.append(values.clone() if valid is None else torch.where(valid, values, sentinel))
    keep = select_top_plain(torch.cat(parts) if len(parts) > 1 else parts[0], k, generator)
    masks = list(keep.split(list(sizes))) if len(parts) > 1 else [keep]
    return [m.nonzero().squeeze(1) for m in masks] if as_index else masks


def _sample(gathers, valids, sizes, k) -> torch.Tensor:
    """Competing values at fixed-seed random positions (the seed never changes the result)."""
    n = sum(sizes)
    sampler = torch.Generator().manual_seed(n * 1_000_003 + k)
    # ~n/64 samples (at most 65,536): the band then holds a few percent of the entries, and the
    # sample's selection stays cheap next to the passes over the full tensors.
    size = min(_MAX_SAMPLE_SIZE, max(4096, n // 64))
    parts: list[torch.Tensor] = []
    for gather, valid, seg in zip(gathers, valids, sizes):
        local = torch.randint(seg, (-(-size * seg // n),), generator=sampler)  # proportional share
        values = gather(local)
        if valid is not None:
            values = values[valid.index_select(0, local.to(valid.device))]
        parts.append(values.to(parts[0].device if parts else values.device))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _bracketed(loads, gathers, valids, sizes, competitors, k, generator, sentinel,
               as_index=False) -> Optional[list[torch.Tensor]]:
    """Exact selection through a sampled bracket (``sum(competitors)`` of them, ``0 < k <`` that);
    ``None`` when it misses (then the caller falls back to the definition)."""
    sample = _sample(gathers, valids, sizes, k)
    s, m = sample.numel(), sum(competitors)
    if s < _MIN_VALID_SAMPLE:
        return _compacted(loads, gathers, valids, sizes, competitors, k, generator, sentinel, as_index)
    p = k / m
    # Rank of the threshold in the sample, widened by ~8 binomial standard deviations each side;
    # rank r (0-based, descending) is the (s - r)-th smallest.
    rank = s * p
    margin = 8.0 * (s * p * (1 - p)) ** 0.5 + 16
    hi_rank, lo_rank = int(rank - margin), int(rank + margin)
    # A threshold near either end: a one-sided band (all entries above lo, or all below hi) is
    # still thin and saves a comparison pass per tensor.
    if p < _ONE_SIDED:
        hi_rank = -1
    elif p > 1 - _ONE_SIDED:
        lo_rank = s
    hi = _kth_smallest(sample, s - hi_rank) if hi_rank >= 0 else None
    lo = _kth_smallest(sample, s - lo_rank) if lo_rank < s else None
    if sentinel is not None and ((hi is not None and hi < sentinel) or (lo is not None and lo <= sentinel)):
        return None  # the threshold may reach the sentinel: the non-competing entries would count
    # The band's expected share of each segment's competitors (a guess for the native kernel's output).
    share = (min(lo_rank, s) - max(hi_rank, 0)) / s
    capacities = [int(1.5 * share * c) + 1024 for c in competitors]
    marks, above_counts, band_index, band_values = _band_pass(loads, valids, sizes, hi, lo, capacities)
    n_above = sum(above_counts)
    need = k - n_above
    values = band_values[0] if len(band_values) == 1 else torch.cat([v.to(band_values[0].device) for v in band_values])
    if need < 0:
        return None
    if values.numel() >= need:
        # The threshold t is inside the band (or above hi when need == 0): select there. With a
        # lower bracket, t > lo > sentinel; without one, check that t is above the sentinel.
        chosen = _select_band(values, need, generator, sum(sizes))
        if sentinel is not None and lo is None and need > 0 and not bool(values[chosen].min() > sentinel):
            return None
        return _finish(marks, above_counts, band_index, chosen, sizes, as_index)
    if lo is None:
        return None
    # Fewer than k entries above lo: the threshold is lo itself, tied with a mass of entries (zeros).
    ties = [((load() == lo) if valid is None else (load() == lo) & valid).nonzero().squeeze(1)
            for load, valid in zip(loads, valids)]
    n_ties = sum(t.numel() for t in ties)
    if n_above + values.numel() + n_ties < k:
        return None
    _mark(marks, band_index, torch.ones(values.numel(), dtype=torch.bool), sizes)
    keep = need - values.numel()
    # As in the definition: the lowest indices without a generator; randperm only if some tie loses.
    chosen = torch.zeros(n_ties, dtype=torch.bool)
    if generator is None or keep == n_ties:
        chosen[:keep] = True
    else:
        chosen[permutation(n_ties, generator)[:keep]] = True
    return _finish(marks, None, ties, chosen, sizes, as_index)


def _band_pass(loads, valids, sizes, hi, lo, capacities) -> tuple[list[Optional[torch.Tensor]], list[int],
                                                                  list[torch.Tensor], list[torch.Tensor]]:
    """One pass per segment: marks of the entries above ``hi`` (``None`` without ``hi``), their
    counts, and index and value of those in (lo, hi]. Segments run on the layer threads
    (:mod:`granet.kernels.layer_threads`), as one fused kernel each where :mod:`granet.kernels.native` can take them."""
    def segment(i: int) -> tuple[Optional[torch.Tensor], int, torch.Tensor, torch.Tensor]:
        source = _native(loads[i], valids[i])
        if source is not None:
            above = None if hi is None else torch.empty(sizes[i], dtype=torch.bool)
            n_above, index, values = native.band(source.flat, source.absolute, valids[i], False,
                                                 None if hi is None else float(hi), None if lo is None else float(lo),
                                                 above, capacities[i])
            return above, n_above, index, values
        values, valid = loads[i](), valids[i]
        above = None
        if hi is not None:
            above = torch.gt(values, hi.to(values.device))
            if valid is not None:
                above &= valid
        band = scratch(values.numel(), torch.bool, values.device, slot=1)
        if lo is None:
            assert above is not None, "a band pass has a lower bound, an upper bound or both"
            torch.logical_not(above, out=band)
        else:
            torch.gt(values, lo.to(values.device), out=band)
            if above is not None:
                band ^= above  # above is inside (lo, inf): remove it
        if valid is not None:
            band &= valid
        index = _nonzero(band)
        return above, 0 if above is None else int(torch.count_nonzero(above)), index, values.index_select(0, index)

    cpu = on_cpu([hi, lo, *valids])
    marks, counts, band_index, band_values = zip(*layer_map(segment, len(loads), cpu, costs=sizes))
    return list(marks), list(counts), list(band_index), list(band_values)


def _nonzero(flags: torch.Tensor) -> torch.Tensor:
    """Positions of the set entries of a flat bool tensor."""
    return flags.nonzero().squeeze(1)


def _finish(marks, above_counts, index, chosen, sizes, as_index) -> list[torch.Tensor]:
    """Masks (or positions) of the entries above the band (``above_counts`` of them per segment,
    when known) plus the ``chosen`` ones of ``index``."""
    if as_index and all(mark is None for mark in marks):  # every selected entry is in the band
        return [idx[pick.to(idx.device)] for idx, pick in zip(index, chosen.split([i.numel() for i in index]))]
    _mark(marks, index, chosen, sizes)
    filled = cast("list[torch.Tensor]", marks)  # _mark leaves no mark None
    if not as_index:
        return filled
    if above_counts is None or not native.supports([], marks):
        return [_nonzero(mark) for mark in filled]
    picked = [int(p.sum()) for p in chosen.split([i.numel() for i in index])]
    return [native.compact(mark, n + p)[0] for mark, n, p in zip(filled, above_counts, picked)]


def _mark(marks: list[Optional[torch.Tensor]], index: list[torch.Tensor], chosen: torch.Tensor,
          sizes: Sequence[int]) -> None:
    """Set ``marks[i][index[i][c]]`` for the chosen entries ``c`` of the concatenated indices
    (a missing mark starts all ``False``). The marks are ``False`` at every index (band and tie
    positions are never above the band), so writing ``chosen`` there is the same, and a scatter
    of all of them is several times faster than selecting the chosen ones first."""
    for i, (idx, pick) in enumerate(zip(index, chosen.split([i.numel() for i in index]))):
        mark = marks[i]
        if mark is None:
            mark = marks[i] = torch.zeros(sizes[i], dtype=torch.bool, device=idx.device)
        if idx.numel():
            mark.scatter_(0, idx, pick.to(idx.device))


def _select_band(values: torch.Tensor, k: int, generator: Optional[RandomSource], parent: int) -> torch.Tensor:
    """Top-k of a band or competitor list gathered from ``parent`` entries: one kthvalue when small
    or hardly thinner than its parent (a mass of ties), else bracketed again."""
    if values.numel() < _BRACKET_MIN_SIZE or 2 * values.numel() > parent:
        return select_top_plain(values, k, generator)
    return select_top(values, k, generator)


def _compacted(loads, gathers, valids, sizes, competitors, k, generator, sentinel,
               as_index=False) -> Optional[list[torch.Tensor]]:
    """Few competitors: gather them (index order), select among them, scatter back."""
    def collect(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if valids[i] is None:
            idx = torch.arange(sizes[i])
            return idx, gathers[i](idx)
        source = _native(loads[i], valids[i])
        if source is not None:  # positions and values in one pass
            idx, values = native.compact(valids[i], competitors[i], x=source.flat, absolute=source.absolute)
            assert values is not None  # x was given
            return idx, values
        idx = _nonzero(valids[i])
        return idx, gathers[i](idx)

    index, gathered = (list(t) for t in zip(*layer_map(collect, len(sizes), on_cpu(valids), costs=sizes)))
    values = gathered[0] if len(gathered) == 1 else torch.cat([g.to(gathered[0].device) for g in gathered])
    if k >= values.numel():
        return None  # the threshold is the sentinel (or the least competitor): left to the definition
    chosen = _select_band(values, k, generator, sum(sizes))
    if sentinel is not None and not bool(values.min() > sentinel) and not bool(values[chosen].min() > sentinel):
        return None
    index = [i.to(g.device) for i, g in zip(index, gathered)]
    picks = chosen.split([i.numel() for i in index])
    if as_index:
        return [idx[pick.to(idx.device)] for idx, pick in zip(index, picks)]
    def scatter(i: int) -> torch.Tensor:
        idx = index[i]
        return torch.zeros(sizes[i], dtype=torch.bool, device=idx.device).scatter_(0, idx, picks[i].to(idx.device))

    return layer_map(scatter, len(sizes), on_cpu(valids), costs=sizes)
