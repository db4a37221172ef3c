"""Sparsity masks on FSDP2 shards: the sharded layout and the sharded solver.

With ``torch.distributed.fsdp.fully_shard`` every parameter is a ``DTensor`` placed ``Shard(0)``
on a 1-D device mesh: rank r holds a contiguous block of rows (see :mod:`granet.parallel.sharded_topk`). A
:class:`~granet.sparsity.sparsifier.Sparsifier` built on such a model (after ``fully_shard``, with the
optimizer over the sharded parameters) detects the DTensors and (through
:class:`granet.sparsity.layouts.Sharded`):

* stores **only this rank's rows of each mask** (``torch.bool``, shaped like ``p.to_local()``) and
  zeroes the local shards of weights and optimizer state (also DTensors) under ``no_grad``;
* keeps **global counts** (one all-reduce of a count vector whenever masks change);
* runs the one update policy of :class:`~granet.sparsity.updater.TopologyUpdater` with
  :class:`ShardedSolver` as its solver: global magnitude thresholds and per-layer drop / regrow
  top-k over the *whole* tensor with the distributed threshold search of
  :func:`~granet.parallel.sharded_topk.select_top_sharded` (no weight or score is gathered), ties broken by the
  same seeded permutation, random scores drawn in full from the same seeded generator on every
  rank and sliced; SNFS's per-layer momentum means are taken over the kept momentum values gathered
  in flat order (:meth:`ShardLayout.gather_rows`), the one place values travel. The masks assembled
  from the shards equal, bit for bit, those of a single process with the same model, data and seed;
* agrees on skipping an update with non-finite gradients (one all-reduce), and after each update
  checks that every rank holds the same step and counts (:meth:`ShardLayout.verify`), instead of
  the DDP mask broadcast/checksum, which assume identical masks on every rank.

``state_dict()`` gathers the full masks (the same format as single-process and DDP runs, so
checkpoints are interchangeable) and ``load_state_dict()`` keeps this rank's rows; both are
collectives that every rank must call.

Not supported (a clear error at construction): placements other than ``Shard(0)`` on a 1-D mesh
(HSDP, ``shard_placement_fn``) and a mix of sharded and plain sparsified parameters.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence, cast

import torch
import torch.distributed as dist

from ..parallel.sharded_topk import RowShard, all_gather, all_reduce, row_shard, select_top_sharded
from .masking import pack_bits
from .topology import Problem

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor
    from typing_extensions import TypeGuard

__all__ = ["ShardLayout", "ShardedSolver", "is_dtensor", "local", "unpack_bits"]

#: At most this many values travel in one all-gather of :meth:`ShardLayout.gather_rows` (64 MiB of float32).
GATHER_ENTRIES = 1 << 24


def is_dtensor(tensor: Any) -> TypeGuard[DTensor]:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 parameters are)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view sharing its storage under ``no_grad``), else the tensor."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`~granet.sparsity.masking.pack_bits`: the first ``n`` bits as a flat bool tensor."""
    bits = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=packed.device)
    return ((packed.reshape(-1, 1) & bits) != 0).reshape(-1)[:n]


class ShardLayout:
    """This rank's rows of each sparsified DTensor parameter, and the collectives over its mesh.

    Args:
        names: parameter names (for error messages).
        params: the sparsified parameters, all ``DTensor`` placed ``Shard(0)`` on one 1-D mesh.

    Raises:
        ValueError: a parameter is not a DTensor, is placed otherwise, or lives on another mesh.
    """

    def __init__(self, names: Sequence[str], params: Sequence[torch.Tensor]) -> None:
        from torch.distributed.tensor import Shard

        plain = [n for n, p in zip(names, params) if not is_dtensor(p)]
        if plain:
            raise ValueError(
                "FSDP: some sparsified parameters are sharded DTensors and some are not "
                f"({', '.join(plain)}): apply fully_shard to every module holding a sparsified weight"
            )
        sharded = [cast("DTensor", p) for p in params]
        mesh = sharded[0].device_mesh
        for n, p in zip(names, sharded):
            if p.device_mesh != mesh or mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise ValueError(
                    f"FSDP: {n} is placed {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh; granet supports "
                    "fully_shard's default Shard(0) placement on one 1-D mesh (no HSDP, no shard_placement_fn)"
                )
        self.group = mesh.get_group()
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.shards: list[RowShard] = [row_shard(p.shape, self.rank, self.world) for p in params]
        for n, p, s in zip(names, sharded, self.shards):
            if tuple(p.to_local().shape) != s.local_shape:
                raise ValueError(f"FSDP: {n} has local shape {tuple(p.to_local().shape)}, expected rows of {s}")
        device = params[0].device
        self._comm_device = torch.device("cpu") if dist.get_backend(self.group) == "gloo" else device

    @staticmethod
    def detect(names: Sequence[str], params: Sequence[torch.Tensor]) -> Optional["ShardLayout"]:
        """The layout when any parameter is a DTensor (FSDP2), else ``None`` (plain tensors)."""
        return ShardLayout(names, params) if any(is_dtensor(p) for p in params) else None

    def local_rows(self, full: torch.Tensor, i: int) -> torch.Tensor:
        """This rank's rows of layer ``i``'s full-shape tensor (a view)."""
        return self.shards[i].local_rows(full)

    def sum_counts(self, counts: Sequence[int]) -> list[int]:
        """Element-wise sum over ranks of per-layer integers (one all-reduce)."""
        if not counts:
            return []
        return all_reduce(torch.tensor(list(counts), dtype=torch.int64, device=self._comm_device), self.group).tolist()

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (one all-reduce)."""
        value = torch.tensor([int(flag)], dtype=torch.int64, device=self._comm_device)
        return bool(all_reduce(value, self.group, dist.ReduceOp.MIN).item())

    def verify(self, step: int, skipped: int, counts: Sequence[int]) -> None:
        """Raise :class:`~granet.parallel.mask_sync.MaskDivergenceError` unless all ranks agree on step and counts."""
        from ..parallel.mask_sync import MaskDivergenceError

        values = torch.tensor([step, skipped, *counts], dtype=torch.int64, device=self._comm_device)
        both = all_reduce(torch.cat([values, -values]), self.group, dist.ReduceOp.MAX)
        if not torch.equal(both[: values.numel()], -both[values.numel():]):
            raise MaskDivergenceError(
                f"step {step}: the ranks of the sharded (FSDP) sparsifier disagree on the step, skipped "
                "updates or per-layer counts (a rank was resumed or configured differently)"
            )

    def gather(self, local_masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Full boolean masks (CPU) from every rank's rows: one all-gather of all layers' rows."""
        pads = [-(-s.shape[0] // self.world) * s.row_numel for s in self.shards]
        buf = torch.zeros(sum(pads), dtype=torch.uint8)
        offset = 0
        for m, pad in zip(local_masks, pads):
            flat = m.reshape(-1)
            buf[offset:offset + flat.numel()] = flat.to("cpu", torch.uint8)
            offset += pad
        rows = all_gather(buf.to(self._comm_device), self.group).cpu()  # (world, sum(pads))
        out, offset = [], 0
        for s, pad in zip(self.shards, pads):
            parts = [rows[r, offset:offset + row_shard(s.shape, r, self.world).rows * s.row_numel]
                     for r in range(self.world)]
            out.append(torch.cat(parts).bool().view(s.shape))
            offset += pad
        return out

    def gather_packed(self, packed: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Full bit-packed masks from every rank's bit-packed rows."""
        local_masks = [unpack_bits(b.cpu(), s.rows * s.row_numel).view(s.local_shape)
                       for b, s in zip(packed, self.shards)]
        return [pack_bits(m) for m in self.gather(local_masks)]

    def gather_rows(self, pieces: Sequence[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
        """Each layer's 1-D ``pieces`` from every rank, concatenated in rank order: for row shards,
        the full tensor's flat order. A collective: every rank passes ``None`` for the same layers.

        One all-gather of the piece lengths, then one all-gather per group of consecutive layers of
        one dtype holding at most :data:`GATHER_ENTRIES` values in all (so a huge model never
        gathers all of its values at once).
        """
        present = [j for j, piece in enumerate(pieces) if piece is not None]
        out: list[Optional[torch.Tensor]] = [None] * len(pieces)
        if not present:
            return out
        lengths = torch.tensor([pieces[j].numel() for j in present], dtype=torch.int64)  # type: ignore[union-attr]
        table = all_gather(lengths.to(self._comm_device), self.group).cpu()  # (world, layers)
        totals = table.sum(0).tolist()
        start = 0
        while start < len(present):
            dtype = pieces[present[start]].dtype  # type: ignore[union-attr]
            end, size = start + 1, totals[start]
            while (end < len(present) and pieces[present[end]].dtype == dtype  # type: ignore[union-attr]
                   and size + totals[end] <= GATHER_ENTRIES):
                size += totals[end]
                end += 1
            self._gather_group([pieces[j] for j in present[start:end]], table[:, start:end], dtype,  # type: ignore[misc]
                               out, present[start:end])
            start = end
        return out

    def _gather_group(self, pieces: list[torch.Tensor], table: torch.Tensor, dtype: torch.dtype,
                      out: list[Optional[torch.Tensor]], slots: list[int]) -> None:
        """One all-gather of the pieces of some layers (``table[r, t]``: rank r's length of layer t)."""
        device = pieces[0].device
        per_rank = table.sum(1)
        width = int(per_rank.max())
        if width == 0:  # nothing held anywhere (every rank agrees: the table is the same everywhere)
            for slot in slots:
                out[slot] = torch.empty(0, dtype=dtype, device=device)
            return
        buf = torch.zeros(width, dtype=dtype, device=self._comm_device)
        offset = 0
        for piece in pieces:
            buf[offset:offset + piece.numel()] = piece.reshape(-1).to(self._comm_device)
            offset += piece.numel()
        rows = all_gather(buf, self.group)  # (world, width)
        starts = torch.cat([torch.zeros(self.world, 1, dtype=torch.int64), table.cumsum(1)], dim=1)
        for t, slot in enumerate(slots):
            parts = [rows[r, int(starts[r, t]):int(starts[r, t + 1])] for r in range(self.world)]
            out[slot] = torch.cat(parts).to(device)

    def slice_packed(self, packed: torch.Tensor, i: int) -> torch.Tensor:
        """This rank's rows of layer ``i``'s full bit-packed mask, packed again."""
        s = self.shards[i]
        flat = unpack_bits(packed.cpu(), s.shape[0] * s.row_numel)
        return pack_bits(flat[s.start * s.row_numel:(s.start + s.rows) * s.row_numel])


class ShardedSolver:
    """The top-k solver of :class:`~granet.sparsity.updater.TopologyUpdater` on FSDP2 row shards.

    Every problem of one call goes into one :func:`~granet.parallel.sharded_topk.select_top_sharded` (4 all-reduces
    of the bucket histograms of all problems and one all-gather of tie counts for float32 scores,
    whatever the number of layers), and their follow-ups (:attr:`~granet.sparsity.topology.Problem.then`)
    into the next, so a call is a collective: every rank makes it with the same problems. Results
    are this rank's rows, as masks (a ``positions`` request is not needed here).

    Args:
        layout: the shard layout of the sparsified parameters.
    """

    sharded = True

    def __init__(self, layout: ShardLayout) -> None:
        self.layout = layout

    def __call__(self, problems: Sequence[Problem]) -> list[list[torch.Tensor]]:
        results: list[list[torch.Tensor]] = [[] for _ in problems]
        pending = list(enumerate(problems))
        while pending:  # every chain's first problems together, then every follow-up together
            follow = []
            for (j, problem), result in zip(pending, self._solve([p for _, p in pending])):
                results[j] = result
                after = None if problem.then is None else problem.then(result)
                if after is not None:
                    follow.append((j, after))
            pending = follow
        return results

    def _solve(self, problems: Sequence[Problem]) -> list[list[torch.Tensor]]:
        """All ``problems`` in one sharded selection (their definition scores, row-sharded)."""
        scores: list[torch.Tensor] = []
        owner: list[int] = []
        for j, problem in enumerate(problems):
            for segment in problem.resolve():
                scores.append(segment.definition())
                owner.append(j)
        masks = select_top_sharded(scores, owner, [p.size for p in problems], [p.k for p in problems],
                                   [p.generator for p in problems], self.layout.group)
        out: list[list[torch.Tensor]] = [[] for _ in problems]
        for j, mask in zip(owner, masks):
            out[j].append(mask)
        return out

    def local(self, tensor: torch.Tensor, layer: int) -> torch.Tensor:
        """This rank's rows: a DTensor's local shard (gradients, momentum, the weight), or the rows of
        a plain full-shape tensor (random scores, drawn in full on every rank)."""
        return local(tensor) if is_dtensor(tensor) else self.layout.local_rows(tensor, layer)

    def gather_rows(self, pieces: Sequence[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
        """See :meth:`ShardLayout.gather_rows` (a collective)."""
        return self.layout.gather_rows(pieces)
