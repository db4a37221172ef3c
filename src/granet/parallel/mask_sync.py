"""Keeping sparsity masks identical on every rank of a distributed job.

The helpers here work on plain lists (layer names, boolean masks, step counters), not on the
sparsifier: :class:`~granet.sparsity.sparsifier.Sparsifier` calls them from its own
:meth:`~granet.sparsity.sparsifier.Sparsifier.broadcast_masks` and
:meth:`~granet.sparsity.sparsifier.Sparsifier.verify_masks`, so this module imports nothing from it.

Why masks *should* already agree: every random choice comes from
:func:`~granet.sparsity.criteria.seeded_generator` (seed, purpose, step, layer), never the rank; selection is
exact and deterministic; and under ``DistributedDataParallel`` the gradients, hence the weights and
the optimizer state, are identical on every rank after each optimizer step. Identical inputs give
identical topology updates, including the decision to skip an update on non-finite gradients (the
all-reduced gradients are finite on every rank or on none).

Why that is not enough: a rank that built its masks from a different checkpoint, a different config
or a model wrapped differently would silently train a different sparse network, and the all-reduce
would average gradients of mismatched topologies. So the sparsifier, when distributed:

* :func:`broadcast_masks` from rank 0 when it is built and after ``load_state_dict`` / ``set_masks``
  (one check of layout/config/step, then one broadcast of all masks and exploration bits in a
  single buffer);
* :func:`verify_masks` after every topology update: one all-reduce of a few int64 per layer (a
  checksum of each mask and its count); :class:`MaskDivergenceError` names the step, the layers and
  the ranks when they differ.

Usage needs nothing beyond the usual DDP set-up; with a process group of 2+ ranks initialised, the
sparsifier turns this on by itself (``distributed=None``)::

    dist.init_process_group("nccl")
    model = DistributedDataParallel(model.cuda(), device_ids=[local_rank])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = granet.create_sparsifier("granet", model, optimizer, density=0.1, total_steps=T)
    # the loop is unchanged; every rank must call sparsifier.step() after every optimizer step

Topology updates happen at the same optimizer steps on every rank (the schedules depend on the step
alone, not on the world size), so the collectives inside ``step()`` line up. Skipped updates
(non-finite gradients) are verified too, so that a rank that skipped alone raises
:class:`MaskDivergenceError` on every rank instead of leaving the others waiting in a collective.

Collectives run on the parameters' device, except with the ``gloo`` backend, whose collectives are
used on CPU tensors (``nccl`` needs CUDA tensors). Booleans travel as ``uint8``, which both support.
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = [
    "MaskDivergenceError", "broadcast_masks", "is_distributed", "is_initialised", "mask_checksum", "verify_masks",
]

# The checksum hashes flat indices with 31-bit arithmetic inside int64: every product of two values
# below 2^31 stays below 2^62, and a sum of fewer than 2^32 hashed values stays below 2^63, so no
# step can overflow on any device (int64 overflow is not something to rely on across backends).
_M31 = (1 << 31) - 1
_MIX = (0x2C1B3C6D, 0x297A2D39, 0x1B873593)  # odd multipliers (bijective mod 2^31)
_MAX_LISTED_RANKS = 8


class MaskDivergenceError(RuntimeError):
    """The ranks of a distributed job do not hold the same sparsifier masks (or layout, config, step)."""


def is_distributed(group: Optional[Any] = None) -> bool:
    """Whether a ``torch.distributed`` process group with more than one rank is initialised.

    Args:
        group: the process group (default: the world).

    Returns:
        True when collectives would involve other processes.
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def is_initialised() -> bool:
    """Whether a ``torch.distributed`` process group (of any size) is initialised."""
    return dist.is_available() and dist.is_initialized()


def _comm_device(device: torch.device, group: Optional[Any]) -> torch.device:
    """Device for collective buffers: the masks' device, or the CPU for gloo."""
    if device.type == "cpu":
        return device
    # gloo's collectives are written for CPU tensors; nccl (or a "cpu:gloo,cuda:nccl" mix) wants
    # tensors on the GPU that the rank uses, which is where its parameters live.
    return torch.device("cpu") if str(dist.get_backend(group)).lower() == "gloo" else device


def _global_rank(group: Optional[Any], group_rank: int) -> int:
    if group is None or group is dist.GroupMember.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def _stable_hash(text: str) -> int:
    """A 62-bit hash of ``text`` that is the same in every process (unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 2


def _layer_salt(index: int, name: str, shape: tuple[int, ...]) -> int:
    """Per-layer 31-bit salt: the same mask pattern in two layers hashes differently."""
    return _stable_hash(f"{index}:{name}:{shape}") & _M31


def _hash_positions(flat_index: torch.Tensor, salt: int) -> torch.Tensor:
    """A bijective 31-bit integer mix of each flat index (multiply / xor-shift rounds, murmur-style).

    Being a bijection, distinct positions of a layer below 2^31 entries never share a hash; the
    xor-shifts make it non-polynomial, so structured changes (shifted or mirrored masks) do not
    cancel in the sum the way they can with a linear or low-degree weighting. Works in place on
    ``flat_index`` (a fresh ``nonzero()`` result): half the time of allocating at every operation.
    """
    x = flat_index.add_(salt).bitwise_and_(_M31)
    for multiplier, shift in zip(_MIX, (16, 13, 16)):
        x.mul_(multiplier).bitwise_and_(_M31)
        x.bitwise_xor_(x >> shift)
    return x


@torch.no_grad()
def mask_checksum(
    names: Sequence[str], masks: Sequence[torch.Tensor], step: int = 0, skipped_updates: int = 0
) -> torch.Tensor:
    """An order-sensitive checksum of every mask, computed where the masks live.

    For layer ``i`` with mask ``m``: ``sum(h_i(j) for j in flatnonzero(m))`` where ``h_i`` is a
    salted bijective 31-bit hash of the flat index ``j``, and ``count(m)``. Two different masks of a
    layer collide with probability about 2^-31 (equal counts assumed), so a real divergence is
    missed essentially never. Exact for layers below 2^31 entries (larger ones wrap the index).

    Args:
        names: layer names, one per mask (they salt the hash, so equal masks of two layers differ).
        masks: boolean masks, all on one device.
        step: the sparsifier's step counter.
        skipped_updates: the number of topology updates skipped for non-finite gradients.

    Returns:
        ``int64`` tensor of shape ``(len(masks) + 1, 2)`` on the first mask's device: row ``i`` is
        ``[hash, active count]`` of layer ``i``; the last row is ``[step, skipped_updates]`` so
        that ranks whose schedules or skip decisions drifted apart are caught too.
    """
    _check_lists(names, masks)
    device = masks[0].device
    hashes, counts = [], []
    for i, (name, mask) in enumerate(zip(names, masks)):
        positions = mask.reshape(-1).nonzero().squeeze(1)  # int64, on the mask's device
        counts.append(positions.numel())
        hashes.append(_hash_positions(positions, _layer_salt(i, name, tuple(mask.shape))).sum().to(device))
    hashes.append(torch.tensor(int(step), dtype=torch.int64, device=device))
    counts.append(int(skipped_updates))
    # The counts are host integers already (nonzero sized its output): one host-to-device copy.
    return torch.stack([torch.stack(hashes), torch.tensor(counts, dtype=torch.int64).to(device)], dim=1)


def _check_lists(names: Sequence[str], masks: Sequence[torch.Tensor]) -> None:
    """Names and masks must pair up one to one, and there must be at least one."""
    if len(names) != len(masks) or not masks:
        raise ValueError(f"need one name per mask and at least one mask, got {len(names)} names, {len(masks)} masks")


def _agree(values: torch.Tensor, group: Optional[Any]) -> bool:
    """One all-reduce: max of ``[v, -v]`` gives every entry's max and min over ranks at once."""
    both = torch.cat([values, -values])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    n = values.numel()
    return bool(torch.equal(both[:n], -both[n:]))


def _gather(values: torch.Tensor, group: Optional[Any]) -> torch.Tensor:
    """Every rank's ``values`` as a CPU tensor of shape ``(world_size, *values.shape)``."""
    out = [torch.empty_like(values) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, values, group=group)
    return torch.stack(out).cpu()


def _ranks_differ(ranks: list[int]) -> str:
    """``"rank 1 differs"`` / ``"ranks 1, 3 differ"`` (at most a few listed)."""
    shown = ", ".join(str(r) for r in ranks[:_MAX_LISTED_RANKS])
    more = f" and {len(ranks) - _MAX_LISTED_RANKS} more" if len(ranks) > _MAX_LISTED_RANKS else ""
    return f"ranks {shown}{more} differ" if len(ranks) > 1 else f"rank {shown} differs"


def _per_rank(values: torch.Tensor, group: Optional[Any]) -> str:
    """``"rank 0: 12, rank 1: 11"`` for the first few ranks (values: one per rank)."""
    items = [f"rank {_global_rank(group, r)}: {int(v)}" for r, v in enumerate(values.tolist()[:_MAX_LISTED_RANKS])]
    return ", ".join(items) + (", ..." if values.numel() > _MAX_LISTED_RANKS else "")


def _differing_ranks(rows: torch.Tensor, group: Optional[Any]) -> list[int]:
    """Global ranks whose row differs from the first rank's (rows: ``(world_size, ...)``)."""
    reference = rows[0]
    return [_global_rank(group, r) for r in range(rows.shape[0]) if not torch.equal(rows[r], reference)]


def verify_masks(
    names: Sequence[str],
    masks: Sequence[torch.Tensor],
    step: int = 0,
    skipped_updates: int = 0,
    group: Optional[Any] = None,
) -> None:
    """Check that every rank holds the same masks; raise naming the layers and ranks if not.

    Cost: :func:`mask_checksum` plus one all-reduce of ``2 * (num_layers + 1) * 2`` int64. Only when
    the ranks disagree (and then on every rank, since all see the same reduced values) a second
    collective gathers the checksums to name the culprits. Every rank of ``group`` must call it.
    A no-op without an initialised process group.

    Args:
        names: layer names, one per mask.
        masks: the boolean masks to compare.
        step: the step counter, compared too.
        skipped_updates: the number of skipped updates, compared too.
        group: the process group (default: the world).

    Raises:
        MaskDivergenceError: on every rank, when any rank's masks, counts, step counter or number of
            skipped updates differ from the others'.
    """
    if not is_initialised():
        return
    local = mask_checksum(names, masks, step, skipped_updates).to(_comm_device(masks[0].device, group))
    if _agree(local.reshape(-1), group):
        return
    table = _gather(local, group)  # (world, layers + 1, 2)
    reference = _global_rank(group, 0)
    problems = []
    for i, name in enumerate(names):
        ranks = _differing_ranks(table[:, i], group)
        if ranks:
            problems.append(
                f"layer {name} ({_ranks_differ(ranks)} from rank {reference}; "
                f"active weights {_per_rank(table[:, i, 1], group)})"
            )
    if _differing_ranks(table[:, -1, 0], group):
        problems.append(f"step counter ({_per_rank(table[:, -1, 0], group)})")
    if _differing_ranks(table[:, -1, 1], group):
        problems.append(
            f"skipped updates, i.e. non-finite gradients on some ranks only ({_per_rank(table[:, -1, 1], group)})"
        )
    message = (
        f"sparsifier masks diverged across ranks at step {step}: "
        + "; ".join(problems)
        + ". Every rank must see the same gradients (wrap the model in DistributedDataParallel), use "
        "the same sparsity config and call sparsifier.step() after the same optimizer steps."
    )
    raise MaskDivergenceError(message)


def _layout_signature(
    names: Sequence[str], masks: Sequence[torch.Tensor], step: int, agree: Mapping[str, Any]
) -> tuple[list[str], torch.Tensor]:
    """Labels and one int64 each for what must agree before masks are broadcast.

    Always the layer layout (names and shapes) and the step counter, then one stable hash of the
    JSON form of every entry of ``agree`` (config, pruning targets, ...).
    """
    labels = ["sparsified layers (names or shapes)", "step counter", *agree]
    layout = json.dumps([(n, list(m.shape)) for n, m in zip(names, masks)])
    values = [_stable_hash(layout), int(step)]
    values += [_stable_hash(json.dumps(v, sort_keys=True, default=str)) for v in agree.values()]
    return labels, torch.tensor(values, dtype=torch.int64)


def _check_same_layout(
    names: Sequence[str], masks: Sequence[torch.Tensor], step: int, agree: Mapping[str, Any],
    group: Optional[Any], device: torch.device,
) -> None:
    """Raise on every rank if the ranks' layers, step or ``agree`` values differ.

    A broadcast between ranks whose buffers differ in size fails obscurely or hangs, and a config
    that differs (say ``seed``) would make later updates diverge: catch both here, once.
    """
    labels, signature = _layout_signature(names, masks, step, agree)
    signature = signature.to(device)
    if _agree(signature, group):
        return
    table = _gather(signature, group)
    problems = [f"{label} ({_ranks_differ(ranks)} from rank {_global_rank(group, 0)})"
                for k, label in enumerate(labels) if (ranks := _differing_ranks(table[:, k], group))]
    message = (
        "cannot synchronise sparsifier masks: the ranks differ in " + "; ".join(problems)
        + f" (steps {_per_rank(table[:, 1], group)}). Build the sparsifier from the same model and "
        "options on every rank, and load the same checkpoint everywhere."
    )
    raise MaskDivergenceError(message)


@torch.no_grad()
def broadcast_masks(
    names: Sequence[str],
    masks: Sequence[torch.Tensor],
    extra: Sequence[torch.Tensor] = (),
    *,
    step: int = 0,
    agree: Optional[Mapping[str, Any]] = None,
    src: int = 0,
    group: Optional[Any] = None,
) -> None:
    """Overwrite every rank's ``masks`` (and ``extra`` tensors) in place with rank ``src``'s.

    Masks (as ``uint8``) and the extra tensors (e.g. packed exploration bits) travel in one flat
    buffer, so the cost is one broadcast of their bytes, after one small all-reduce that checks the
    ranks agree on layers, ``step`` and every value of ``agree``. The caller re-derives whatever
    depends on the masks (counts, zeroed weights). Every rank of ``group`` must call it. A no-op
    without an initialised process group.

    Args:
        names: layer names, one per mask.
        masks: boolean masks, overwritten in place (they keep their storage and device).
        extra: further tensors to overwrite in place (any dtype of one byte per element or more).
        step: the step counter, which must agree across ranks.
        agree: ``{label: JSON-able value}`` that must agree across ranks (labels name it in errors).
        src: global rank whose tensors are kept.
        group: the process group (default: the world).

    Raises:
        MaskDivergenceError: on every rank, when the ranks' layers, step or ``agree`` values differ
            (nothing is broadcast then).
    """
    if not is_initialised():
        return
    _check_lists(names, masks)
    device = _comm_device(masks[0].device, group)
    _check_same_layout(names, masks, step, agree or {}, group, device)
    tensors = list(masks) + list(extra)
    # bool and uint8 have the same size: view(torch.uint8) reinterprets without copying.
    flat = [t.reshape(-1).view(torch.uint8) if t.dtype == torch.bool else t.reshape(-1) for t in tensors]
    buffer = torch.cat([f.to(device) for f in flat])
    dist.broadcast(buffer, src=src, group=group)
    if dist.get_rank() != src:
        offset = 0
        for t in tensors:  # copy in place: the masks keep their storage and device
            chunk = buffer[offset:offset + t.numel()]
            offset += t.numel()
            t.copy_((chunk.view(torch.bool) if t.dtype == torch.bool else chunk).view(t.shape))
    logger.debug("sparsifier masks broadcast from rank %d (%d bytes)", src, buffer.numel())
