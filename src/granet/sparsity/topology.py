"""The steps of one topology update, as functions of tensors: selection problems and their exact
local solution, pruning, dropping, regrowing, SNFS's regrowth shares.

Every choice an update makes is a *selection problem* (:class:`Problem`): keep or regrow exactly
``k`` entries of one layer, or of several layers under one threshold, ranked by a criterion's
scores among the competing entries (:class:`Segment`). The update policy
(:class:`~granet.sparsity.updater.TopologyUpdater`) states the problems of a phase (every layer's drop, say,
each followed by that layer's regrowth: :attr:`Problem.then`) and hands them to a
:class:`TopKSolver` in one call:

* :data:`LOCAL` (:class:`LocalSolver`) solves them in this process, on the layer threads of
  :mod:`granet.kernels.layer_threads` (a layer's chain on one thread), each with the fastest exact path below
  (:func:`keep_largest`, :func:`grow_positions` / :func:`grow_layer`, :func:`select_over`);
* :class:`granet.sparsity.fsdp_layout.ShardedSolver` solves all first problems at once on FSDP2 row shards, with
  the distributed threshold search of :mod:`granet.parallel.sharded_topk`, then all follow-ups at once.

Both return exactly ``select_top(concatenated definition scores, k, generator)`` (see
:meth:`Segment.definition`): exact counts, ties broken by the same seeded permutation, so masks are
identical in one process, under DDP and under FSDP.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Optional, Protocol, Sequence, Union

import torch

from ..kernels import native
from ..kernels.counter_rng import RandomSource, uniform
from ..kernels.layer_threads import layer_map, on_cpu
from ..kernels.topk import _BRACKET_MIN_SIZE, Scores, scratch, select_top_segments
from .criteria import momentum_buffer, seeded_generator, select_top
from .distributions import allocate_counts, get_distribution, layer_counts


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
        health: the health check of the network that trained since the previous update, made
            before this one changed it (:class:`granet.sparsity.health.HealthReport` as a dict; ``None``
            when the update was skipped).
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
    health: Optional[dict[str, Any]] = None


@dataclass
class Segment:
    """One layer's part of a selection problem: its scores and which of its entries compete.

    The definition a selection follows is :meth:`definition`: competing entries score their value
    (``|values|`` with ``absolute``), every other entry -1, below any magnitude.

    Attributes:
        values: the scores as this process holds them (a layer's local rows under FSDP), or, with
            ``absolute``, the tensor whose magnitudes are the scores (read in place, never copied).
        absolute: the scores are ``|values|``.
        among: ``torch.bool`` shaped like ``values``: the competing entries (``None``: all).
        outside: the competing entries are those *not* in ``among`` (regrowth: outside the mask
            after the drop), so no inverted mask is materialised.
        count: the number of competing entries over the whole layer, when known (saves a pass).
    """

    values: torch.Tensor
    absolute: bool = False
    among: Optional[torch.Tensor] = None
    outside: bool = False
    count: Optional[int] = None

    def definition(self) -> torch.Tensor:
        """The scores the selection ranks, as a float tensor: -1 where an entry does not compete."""
        values = self.values.detach().abs() if self.absolute else self.values.detach()
        if self.among is None:
            return values
        return torch.where(self.among, -1.0, values) if self.outside else torch.where(self.among, values, -1.0)


@dataclass
class Problem:
    """Select exactly ``k`` entries: the highest definition scores over the segments, concatenated.

    Attributes:
        k: entries to select (clamped to [0, size]).
        generator: breaks ties at the threshold (``None``: lowest flat indices win). A score drawn
            from the same generator (random regrowth) is drawn first, as in one process.
        segments: the segments, or a function returning them, called where the problem is solved
            (on a layer thread in one process), so a layer's scores exist only while it is selected.
        size: the number of entries of all segments' full tensors (under FSDP more than held here).
        cpu: the tensors are on the CPU (the problems of a call may run on the layer threads).
        positions: the caller would rather have flat positions than a mask (few entries selected);
            a selector may return either (a ``torch.bool`` mask or int64 positions).
        then: what follows from this problem's result, in the same solver call: a follow-up
            problem (a layer's regrowth after its drop), or ``None`` when the chain ends (after any
            per-layer work it does, such as combining masks). In one process a layer's whole chain
            runs on one layer thread while its tensors are in cache; a sharded solver solves every
            chain's first problems together, then every follow-up together.
    """

    k: int
    generator: Optional[RandomSource]
    segments: Union[Sequence[Segment], Callable[[], Sequence[Segment]]]
    size: int
    cpu: bool = True
    positions: bool = False
    then: Optional[Callable[[list[torch.Tensor]], Optional["Problem"]]] = None

    def resolve(self) -> list[Segment]:
        """The segments (calling the function that makes them, if that is what was given)."""
        return list(self.segments() if callable(self.segments) else self.segments)


class TopKSolver(Protocol):
    """Solves the selection problems of one phase of an update (see the module notes).

    ``solver(problems)`` returns, per problem, one result per segment: a ``torch.bool`` mask shaped
    like the segment's values (or, where the problem asked for ``positions``, possibly the flat int64
    positions); for a chain (:attr:`Problem.then`), the results of its last problem. Every chain
    of one call must have the same length on every process. ``local(tensor, layer)`` is the part of a
    layer's tensor this process selects on;
    ``gather_rows(pieces)`` concatenates each layer's 1-D pieces from every process in the full
    tensor's flat order (a collective under FSDP; ``None`` pieces stay ``None``).
    """

    sharded: bool

    def __call__(self, problems: Sequence[Problem]) -> list[list[torch.Tensor]]: ...

    def local(self, tensor: torch.Tensor, layer: int) -> torch.Tensor: ...

    def gather_rows(self, pieces: Sequence[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]: ...


class LocalSolver:
    """Exact top-k selection in one process: each problem by the fastest exact path, the problems of
    one call on the layer threads (largest first)."""

    sharded = False

    def __call__(self, problems: Sequence[Problem]) -> list[list[torch.Tensor]]:
        return layer_map(lambda j: self.chain(problems[j]), len(problems), all(p.cpu for p in problems),
                         costs=[p.size for p in problems])

    @classmethod
    def chain(cls, problem: Problem) -> list[torch.Tensor]:
        """A problem and its follow-ups (:attr:`Problem.then`), one after the other on this thread."""
        while True:
            result = cls.solve(problem)
            follow = None if problem.then is None else problem.then(result)
            if follow is None:
                return result
            problem = follow

    def local(self, tensor: torch.Tensor, layer: int) -> torch.Tensor:
        """The tensor itself: one process holds all of it."""
        return tensor

    def gather_rows(self, pieces: Sequence[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
        """The pieces themselves: one process holds all of every layer."""
        return list(pieces)

    @staticmethod
    def solve(problem: Problem) -> list[torch.Tensor]:
        """One problem, by the path that fits it (every path returns the definition's result)."""
        segments, k, generator = problem.resolve(), problem.k, problem.generator
        if len(segments) > 1:
            if all(s.among is None for s in segments):  # one draw over several tensors (a global initial mask)
                keep = select_top(torch.cat([s.definition().reshape(-1) for s in segments]), k, generator)
                parts = keep.split([s.values.numel() for s in segments])
                return [m.view(s.values.shape) for m, s in zip(parts, segments)]
            return select_over(segments, k, generator)
        s = segments[0]
        if s.among is None:
            return [select_top(s.definition(), k, generator)]
        if s.outside:
            grow = grow_positions if problem.positions else grow_layer
            return [grow(s.values, s.among, k, generator, free=s.count, magnitude=s.absolute)]
        return [keep_largest(s.values, s.among, k, generator, active=s.count, absolute=s.absolute)]


#: The exact local selector (one process, or DDP, where every rank holds all of every tensor).
LOCAL = LocalSolver()


def select_over(segments: Sequence[Segment], k: int, generator: Optional[RandomSource]) -> list[torch.Tensor]:
    """One threshold over several segments (the global prune), computed segment by segment (no
    concatenated copy: scratch is O(largest segment)): a mask per segment, shaped like its values."""
    loads = [Scores(s.values, absolute=s.absolute) for s in segments]
    valids = [None if s.among is None else (~s.among if s.outside else s.among).reshape(-1) for s in segments]
    counts = [s.count for s in segments]
    competitors = None if any(c is None for c in counts) else [int(c) for c in counts if c is not None]
    out = select_top_segments(loads, [load.gather for load in loads], valids, [s.values.numel() for s in segments],
                              k, generator, competitors=competitors)
    return [m.view(s.values.shape).to(s.values.device) for m, s in zip(out, segments)]


def random_masks(
    params: Sequence[torch.Tensor], distribution: str, density: float, seed: int, power_scale: float = 1.0,
    solver: Optional[TopKSolver] = None, counter: bool = False,
) -> list[torch.Tensor]:
    """Random masks at ``density`` with exact counts: per layer from ``distribution``, or one draw
    over all layers for a distribution without per-layer quotas (``global``).

    Layer ``i``'s scores come from the generator seeded by (seed, "init", i), drawn in full on every
    process (and sliced by ``solver.local``), so the masks are a function of the arguments alone
    (the same on every rank and after a restart). ``solver``: :data:`LOCAL` by default. With
    ``counter`` the scores are the counter stream of the same seed, made on the parameter's device.
    """
    solver = LOCAL if solver is None else solver
    if density >= 1.0:
        return [torch.ones_like(solver.local(p, i), dtype=torch.bool) for i, p in enumerate(params)]
    sizes = [p.numel() for p in params]
    cpu = on_cpu(params)

    def scores(*layers: int) -> list[Segment]:
        return [Segment(solver.local(uniform(params[i].shape, seeded_generator(seed, "init", i, counter=counter),
                                             params[i].device if counter else "cpu"), i))
                for i in layers]

    if not get_distribution(distribution).per_layer:
        everything = range(len(params))
        masks = solver([Problem(round(density * sum(sizes)), None, lambda: scores(*everything), sum(sizes), cpu)])[0]
    else:
        counts = layer_counts(distribution, [tuple(p.shape) for p in params], density, power_scale)
        problems = [Problem(k, None, partial(scores, i), n, cpu) for i, (n, k) in enumerate(zip(sizes, counts))]
        masks = [m for (m,) in solver(problems)]
    return [m.to(p.device) for m, p in zip(masks, params)]


def finite(grads: Sequence[torch.Tensor]) -> bool:
    """Whether every entry of every tensor in ``grads`` is finite.

    A sum is non-finite whenever any term is (NaN propagates, inf + finite = inf, inf - inf =
    NaN), so finite sums prove finite gradients at the cost of one cheap reduction per tensor;
    only a non-finite sum (or a float overflow of the sum) pays for the exact elementwise check.
    """
    if not grads:
        return True
    sums = torch.stack([g.sum(dtype=torch.float32).to(grads[0].device) for g in grads])
    if bool(torch.isfinite(sums).all()):
        return True
    return all(bool(torch.isfinite(g).all()) for g in grads)


def gradients_finite(params: Sequence[torch.Tensor]) -> bool:
    """Whether every available gradient of ``params`` is finite (see :func:`finite`)."""
    return finite([p.grad for p in params if p.grad is not None])


def prune_global(
    params: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], target: int, generator: RandomSource,
    counts: Optional[Sequence[int]] = None,
) -> list[torch.Tensor]:
    """Keep the ``target`` largest-magnitude active weights over all layers (one threshold).

    Exactly ``select_top(cat(active_magnitudes(p, m)), target, generator)`` split per layer, computed
    layer by layer (:func:`select_over`). ``counts``: the active weights of each layer, when the
    caller knows them (saves a counting pass).
    """
    return select_over([Segment(p, absolute=True, among=m, count=None if counts is None else counts[i])
                        for i, (p, m) in enumerate(zip(params, masks))], target, generator)


def keep_largest(param: torch.Tensor, mask: torch.Tensor, keep: int, generator: Optional[RandomSource],
                 active: Optional[int] = None, absolute: bool = True) -> torch.Tensor:
    """The ``keep`` highest-scoring active entries of one layer (layer-wise pruning and the drop).

    The scores are ``|param|`` (magnitude; ``absolute``) or ``param`` itself (a criterion's scores):
    exactly ``select_top(torch.where(mask, scores, -1.0), keep, generator)``, without the float
    copy. ``active``: the number of active weights, when the caller knows it (saves a counting pass).
    """
    if param.numel() < _BRACKET_MIN_SIZE:  # small layers: the plain definition is cheapest
        return select_top(Segment(param, absolute=absolute, among=mask).definition(), keep, generator)
    w = Scores(param, absolute=absolute)
    out = select_top_segments([w], [w.gather], [mask.reshape(-1)], [param.numel()],
                              keep, generator, competitors=None if active is None else [active])
    return out[0].view(param.shape)


def grow_positions(scores: torch.Tensor, kept: torch.Tensor, n_grow: int, generator: Optional[RandomSource],
                   free: Optional[int] = None, magnitude: bool = False) -> torch.Tensor:
    """Flat positions (int64, in no particular order) of the ``n_grow`` highest-scoring entries
    outside ``kept`` (the mask after the drop); the scores are ``|scores|`` with ``magnitude``.

    Candidates are all positions inactive after the drop (just-dropped ones included, as in RigL);
    everything else scores -1, below any score, and is never picked: the positions set in
    ``select_top(torch.where(kept, -1.0, scores), n_grow, generator)``, computed without a float
    copy or a pass over a mask. ``free``: the number of candidates, when the caller knows it.
    """
    return _grow(scores, kept, n_grow, generator, free, magnitude, as_index=True)


def grow_layer(scores: torch.Tensor, kept: torch.Tensor, n_grow: int, generator: Optional[RandomSource],
               free: Optional[int] = None, magnitude: bool = False) -> torch.Tensor:
    """:func:`grow_positions` as a mask shaped like ``scores`` (cheaper when many are regrown)."""
    return _grow(scores, kept, n_grow, generator, free, magnitude, as_index=False).view(scores.shape)


def _grow(scores, kept, n_grow, generator, free, magnitude, as_index) -> torch.Tensor:
    flat = scores.detach().reshape(-1)
    if flat.numel() < _BRACKET_MIN_SIZE:
        values = flat.abs() if magnitude else flat
        grown = select_top(torch.where(kept.reshape(-1), -1.0, values), n_grow, generator)
        return grown.nonzero().squeeze(1) if as_index else grown
    candidates = scratch(flat.numel(), torch.bool, flat.device, slot=2)  # ~kept
    torch.logical_not(kept.reshape(-1), out=candidates)
    source = Scores(flat, absolute=magnitude)
    return select_top_segments([source], [source.gather], [candidates], [flat.numel()], n_grow, generator,
                               competitors=None if free is None else [free], as_index=as_index)[0]


def momentum_shares(
    params: Sequence[torch.Tensor],
    optimizer: Optional[torch.optim.Optimizer],
    kept_masks: Sequence[Optional[torch.Tensor]],
    drops: Sequence[int],
    kept_counts: Optional[Sequence[int]] = None,
    solver: Optional[TopKSolver] = None,
) -> list[int]:
    """SNFS's redistribution: split ``sum(drops)`` regrowths between layers by mean momentum.

    A layer's weight is the mean ``|momentum|`` of its kept weights; it can regrow at most its
    inactive positions after the drop. Layers left alone (``kept_masks[i] is None``) get 0.
    ``kept_counts``: the active entries of each kept mask, when the caller knows them (saves a
    counting pass; required when sharded: the counts of the whole layers). The layers run on the
    layer threads.

    Under a sharded ``solver`` each rank holds some rows of each layer: the kept values are gathered
    in the full tensor's flat order (:meth:`TopKSolver.gather_rows`, a collective) and the mean is
    taken over them exactly as one process takes it (the same values, in the same order, in one
    float reduction), so the shares, hence the masks, equal a single process's bit for bit.
    """
    sharded = solver is not None and solver.sharded
    if sharded and kept_counts is None:
        raise ValueError("momentum_shares on shards needs the kept counts of the whole layers")
    layers = [i for i, k in enumerate(kept_masks) if k is not None]
    counts = [0] * len(kept_masks)

    def kept_values(j: int) -> Optional[torch.Tensor]:
        """|m| of layer ``layers[j]``'s kept entries held here, in flat order (``None``: no momentum)."""
        i = layers[j]
        kept = kept_masks[i]
        assert kept is not None
        counts[i] = int(torch.count_nonzero(kept)) if kept_counts is None else kept_counts[i]
        buf = momentum_buffer(params[i], optimizer)
        if buf is None or counts[i] == 0:
            return None
        if solver is not None:
            buf = solver.local(buf, i)
        # |m| of the kept entries only, in index order (the same values in the same order as
        # ``buf[kept].abs()``, so the same mean bit for bit), gathered in one pass where it can.
        if kept_counts is not None and not sharded and native.supports([buf], [kept]):
            return native.compact(kept.reshape(-1), counts[i], x=buf.reshape(-1), absolute=True)[1]
        return buf[kept].abs()

    def weight(values: Optional[torch.Tensor]) -> float:
        mean = 0.0 if values is None else float(values.mean())
        return mean if math.isfinite(mean) else 0.0

    cpu, costs = on_cpu(list(kept_masks)), [params[i].numel() for i in layers]
    if not sharded:  # one pass per layer, on the layer threads
        weights = layer_map(lambda j: weight(kept_values(j)), len(layers), cpu, costs=costs)
    else:  # every rank's rows of every layer first (collectives on this thread), then the means
        full = solver.gather_rows(layer_map(kept_values, len(layers), cpu, costs=costs))  # type: ignore[union-attr]
        weights = layer_map(lambda j: weight(full[j]), len(layers), cpu, costs=costs)
    shares = allocate_counts(sum(drops), weights, [params[i].numel() - counts[i] for i in layers])
    out = [0] * len(drops)
    for i, share in zip(layers, shares):
        out[i] = share
    return out
