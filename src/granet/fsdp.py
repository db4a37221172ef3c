"""Sparsity masks on FSDP2 shards: the sharded layout and the sharded update policy.

With ``torch.distributed.fsdp.fully_shard`` every parameter is a ``DTensor`` placed ``Shard(0)``
on a 1-D device mesh: rank r holds a contiguous block of rows (see :mod:`granet.sharded`). A
:class:`~granet.sparsifier.Sparsifier` built on such a model (after ``fully_shard``, with the
optimizer over the sharded parameters) detects the DTensors and:

* stores **only this rank's rows of each mask** (``torch.bool``, shaped like ``p.to_local()``) and
  zeroes the local shards of weights and optimizer state (also DTensors) under ``no_grad``;
* keeps **global counts** (one all-reduce of a count vector whenever masks change);
* computes every topology update exactly as on one process (:class:`ShardedTopologyUpdater`):
  global magnitude thresholds and per-layer drop / regrow top-k over the *whole* tensor with the
  distributed threshold search of :func:`~granet.sharded.select_top_sharded` (no weight or score
  is gathered), ties broken by the same seeded permutation, random scores drawn in full from the
  same seeded generator on every rank and sliced. The masks assembled from the shards equal, bit
  for bit, those of a single process with the same model, data and seed;
* agrees on skipping an update with non-finite gradients (one all-reduce), and after each update
  checks that every rank holds the same step and counts (:meth:`ShardLayout.verify`), instead of
  the DDP mask broadcast/checksum, which assume identical masks on every rank.

``state_dict()`` gathers the full masks (the same format as single-process and DDP runs, so
checkpoints are interchangeable) and ``load_state_dict()`` keeps this rank's rows; both are
collectives that every rank must call.

Not supported (a clear error at construction): placements other than ``Shard(0)`` on a 1-D mesh
(HSDP, ``shard_placement_fn``), a mix of sharded and plain sparsified parameters, and SNFS-style
momentum redistribution (``redistribute="momentum"``).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from .config import SparsityConfig
from .criteria import active_magnitudes, seeded_generator
from .distributions import get_distribution, layer_counts
from .masking import pack_bits
from .sharded import RowShard, all_gather, all_reduce, row_shard, select_top_sharded
from .topology import UpdateReport
from .updater import Regrowth, TopologyUpdater

__all__ = ["ShardLayout", "ShardedTopologyUpdater", "is_dtensor", "unpack_bits"]


def is_dtensor(tensor: Any) -> bool:
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
    """Inverse of :func:`~granet.masking.pack_bits`: the first ``n`` bits as a flat bool tensor."""
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
        mesh = params[0].device_mesh
        for n, p in zip(names, params):
            if p.device_mesh != mesh or mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise ValueError(
                    f"FSDP: {n} is placed {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh; granet supports "
                    "fully_shard's default Shard(0) placement on one 1-D mesh (no HSDP, no shard_placement_fn)"
                )
        self.group = mesh.get_group()
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.shards: list[RowShard] = [row_shard(p.shape, self.rank, self.world) for p in params]
        for n, p, s in zip(names, params, self.shards):
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
        """Raise :class:`~granet.distributed.MaskDivergenceError` unless all ranks agree on step and counts."""
        from .distributed import MaskDivergenceError

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
        for i, (s, pad) in enumerate(zip(self.shards, pads)):
            parts = [rows[r, offset:offset + row_shard(s.shape, r, self.world).rows * s.row_numel]
                     for r in range(self.world)]
            out.append(torch.cat(parts).bool().view(s.shape))
            offset += pad
        return out

    def gather_packed(self, packed: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Full bit-packed masks from every rank's bit-packed rows."""
        local_masks = [unpack_bits(b.cpu(), s.rows * s.row_numel).view(s.local_shape) for b, s in zip(packed, self.shards)]
        return [pack_bits(m) for m in self.gather(local_masks)]

    def slice_packed(self, packed: torch.Tensor, i: int) -> torch.Tensor:
        """This rank's rows of layer ``i``'s full bit-packed mask, packed again."""
        s = self.shards[i]
        flat = unpack_bits(packed.cpu(), s.shape[0] * s.row_numel)
        return pack_bits(flat[s.start * s.row_numel:(s.start + s.rows) * s.row_numel])


class ShardedTopologyUpdater(TopologyUpdater):
    """:class:`~granet.updater.TopologyUpdater` on this rank's rows: same schedules, same masks.

    Masks passed in and returned are local (shaped like ``p.to_local()``); counts are global. The
    collectives inside make every method a collective: all ranks call it at the same step.

    Args:
        config: a validated sparsity configuration (``redistribute="none"``).
        layout: the shard layout of the sparsified parameters.
    """

    def __init__(self, config: SparsityConfig, layout: ShardLayout) -> None:
        if config.redistribute != "none":
            raise ValueError(
                f"method {config.method!r}: redistribute={config.redistribute!r} (SNFS momentum redistribution) "
                "is not supported on FSDP-sharded parameters; use DDP or a single process"
            )
        super().__init__(config)
        self.layout = layout

    def _select(self, scores: list[torch.Tensor], owner: list[int], sizes: list[int], ks: list[int],
                gens: list[Optional[torch.Generator]]) -> list[torch.Tensor]:
        return select_top_sharded(scores, owner, sizes, ks, gens, self.layout.group)

    def gradients_finite(self, params: Sequence[torch.Tensor]) -> bool:
        """Whether every rank's local gradient shards are finite (agreed by one all-reduce)."""
        grads = [local(p.grad) for p in params if p.grad is not None]
        # As topology.gradients_finite: finite sums prove finite entries; only a non-finite sum pays
        # for the elementwise check.
        sums = [g.sum(dtype=torch.float32) for g in grads]
        finite = all(bool(torch.isfinite(x)) for x in sums) or all(bool(torch.isfinite(g).all()) for g in grads)
        return self.layout.all_true(finite)

    def initial_masks(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Local rows of :func:`~granet.topology.random_masks` (full scores drawn, then sliced)."""
        cfg = self.config
        density = cfg.effective_init_density
        if density >= 1.0:
            return [torch.ones_like(local(p), dtype=torch.bool) for p in params]
        n_layers = len(params)
        sizes = [p.numel() for p in params]
        per_layer = get_distribution(cfg.distribution).per_layer
        # Drawn exactly as topology.random_masks draws them (same calls, same generators), then sliced.
        scores = [self.layout.local_rows(torch.rand(p.shape if per_layer else (n,), generator=seeded_generator(
            cfg.seed, "init", i)).view(p.shape), i) for i, (n, p) in enumerate(zip(sizes, params))]
        if not per_layer:
            masks = self._select(scores, [0] * n_layers, [sum(sizes)], [round(density * sum(sizes))], [None])
        else:
            counts = layer_counts(cfg.distribution, [tuple(p.shape) for p in params], density, cfg.erk_power_scale)
            masks = self._select(scores, list(range(n_layers)), sizes, counts, [None] * n_layers)
        return [m.to(p.device) for m, p in zip(masks, params)]

    def prune(self, step: int, params: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], counts: Sequence[int],
              init_counts: Sequence[int], final_counts: Sequence[int]) -> list[torch.Tensor]:
        """Gradual magnitude pruning (global threshold or per layer) over the full tensors."""
        assert self.pruning is not None
        seed = self.config.seed
        if self.config.prune == "global":
            target = self.global_prune_target(step, params, counts)
            if target is None:
                return list(masks)
            scores = [active_magnitudes(local(p), m) for p, m in zip(params, masks)]
            total = sum(p.numel() for p in params)
            return self._select(scores, [0] * len(params), [total], [target], [seeded_generator(seed, "prune", step)])
        layers, targets = [], []
        for i in range(len(params)):
            target = round(self.pruning.interpolate(step, init_counts[i], final_counts[i]))
            if counts[i] > target:
                layers.append(i)
                targets.append(target)
        new_masks = list(masks)
        if layers:
            chosen = self._select(
                [active_magnitudes(local(params[i]), masks[i]) for i in layers], list(range(len(layers))),
                [params[i].numel() for i in layers], targets, [seeded_generator(seed, "prune", step, i) for i in layers],
            )
            for i, m in zip(layers, chosen):
                new_masks[i] = m
        return new_masks

    def _local_scores(self, scores: torch.Tensor, i: int) -> torch.Tensor:
        """A grow score's local rows: DTensor scores (gradient, momentum) are sharded already;
        plain full-shape scores (random) are sliced."""
        return local(scores) if is_dtensor(scores) else self.layout.local_rows(scores, i)

    def drop_and_grow(self, step: int, names: Sequence[str], params: Sequence[torch.Tensor],
                      masks: Sequence[torch.Tensor], counts: Sequence[int], optimizer: Optional[torch.optim.Optimizer],
                      report: UpdateReport) -> Regrowth:
        """Per layer: drop ``floor(r_t * active)`` smallest active weights, regrow as many by the grow score."""
        seed = self.config.seed
        fraction = self.drop_fraction(step)
        report.drop_fraction = fraction
        layers = [i for i, p in enumerate(params) if counts[i] != p.numel() and int(fraction * counts[i]) > 0]
        result = Regrowth(masks=list(masks), reset=[None] * len(params))
        if not layers:
            return result
        drops = [int(fraction * counts[i]) for i in layers]  # floor, as in RigL
        owner = list(range(len(layers)))
        sizes = [params[i].numel() for i in layers]
        kept = self._select(
            [active_magnitudes(local(params[i]), masks[i]) for i in layers], owner, sizes,
            [counts[i] - d for i, d in zip(layers, drops)], [seeded_generator(seed, "drop", step, i) for i in layers],
        )
        gens = [seeded_generator(seed, "grow", step, i) for i in layers]
        scores = []
        for j, i in enumerate(layers):
            p = params[i]
            raw = self._local_scores(self.grow.score(p, names[i], optimizer, gens[j]), i)
            scores.append(torch.where(kept[j], -1.0, raw.to(p.dtype)))
        grown = self._select(scores, owner, sizes, drops, gens)
        for j, i in enumerate(layers):
            layer = report.layers[names[i]]
            layer["dropped"], layer["regrown"] = drops[j], drops[j]
            result.reset[i] = grown[j] & ~masks[i] if self.config.reinit_regrown == "new" else grown[j]
            result.masks[i] = kept[j] | grown[j]
        return result
