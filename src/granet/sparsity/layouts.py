"""How a sparsifier keeps its masks consistent with the process layout: one process, DDP or FSDP2.

A :class:`~granet.sparsity.sparsifier.Sparsifier` owns one of these strategies (chosen by
:func:`process_layout` from its parameters and ``distributed`` option) besides its
:class:`~granet.sparsity.masking.MaskState`; the strategy is the only thing that differs between the layouts:

=======================  ==========================  ================================================
                         masks held                  consistency
=======================  ==========================  ================================================
:class:`SingleProcess`   whole tensors               none needed (``broadcast_masks`` /
                                                     ``verify_masks`` still work when called)
:class:`Replicated`      whole tensors, every rank   broadcast from rank 0 at construction, on load
                                                     and in ``set_masks``; checksums verified after
                                                     every update (:mod:`granet.parallel.mask_sync`)
:class:`Sharded`         this rank's rows (FSDP2)    selections solved on the shards
                                                     (:class:`~granet.sparsity.fsdp_layout.ShardedSolver`); ranks
                                                     agree on step and counts after every update
=======================  ==========================  ================================================

A strategy provides the update policy's top-k ``solver``, the local part of a tensor, whole-layer
counts, full masks for a state dict and local rows from one, the finite-gradient vote, and the
broadcast / verify / adopt collectives. It works on a :class:`~granet.sparsity.masking.MaskState` through
its public operations only.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import torch

from ..parallel import mask_sync as _distributed
from .fsdp_layout import ShardedSolver, ShardLayout, local
from .masking import MaskState
from .topology import LOCAL, TopKSolver, finite


class SingleProcess:
    """Masks of whole tensors in this process; nothing is kept in step with other ranks by itself.

    ``broadcast`` and ``verify`` still act when called (the public ``broadcast_masks`` /
    ``verify_masks`` of a sparsifier built with ``distributed=False``), and do nothing without an
    initialised process group.
    """

    sharded = False
    replicated = False

    @property
    def solver(self) -> TopKSolver:
        """Exact local top-k (:data:`~granet.sparsity.topology.LOCAL`)."""
        return LOCAL

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor itself (this process holds all of it)."""
        return tensor

    def sum_counts(self, values: Sequence[int]) -> list[int]:
        """The counts themselves (whole layers are held here)."""
        return list(values)

    def full(self, tensors: Sequence[torch.Tensor], packed: bool = False) -> list[torch.Tensor]:
        """Full masks (or bit-packed masks): the tensors themselves."""
        return list(tensors)

    def rows(self, full: torch.Tensor, i: int, packed: bool = False) -> torch.Tensor:
        """This process's part of layer ``i``'s full mask (or bit-packed mask): all of it."""
        return full

    def gradients_finite(self, params: Sequence[torch.Tensor]) -> bool:
        """Whether every available gradient is finite (see :func:`granet.sparsity.topology.finite`)."""
        return finite([p.grad for p in params if p.grad is not None])

    def adopt(self, state: MaskState, masks: Sequence[torch.Tensor], step: int, skipped: int,
              agree: Mapping[str, Any]) -> list[torch.Tensor]:
        """The masks this process installs from full ``masks`` given to ``set_masks``: those."""
        return list(masks)

    def broadcast(self, state: MaskState, step: int, agree: Mapping[str, Any], src: int = 0,
                  group: Optional[Any] = None) -> None:
        """Copy rank ``src``'s masks and exploration bits into every rank's, then recount and re-apply
        (:func:`granet.parallel.mask_sync.broadcast_masks`; a no-op without a process group)."""
        state.follow_param_devices()
        _distributed.broadcast_masks(state.names, list(state.masks.values()), list(state.ever_active or ()),
                                     step=step, agree=agree, src=src, group=group)
        state.recount()
        state.apply()

    def verify(self, state: MaskState, step: int, skipped: int, group: Optional[Any] = None) -> None:
        """Raise :class:`~granet.parallel.mask_sync.MaskDivergenceError` unless every rank holds the same
        masks (:func:`granet.parallel.mask_sync.verify_masks`; a no-op without a process group)."""
        state.follow_param_devices()
        _distributed.verify_masks(state.names, list(state.masks.values()), step, skipped, group)


class Replicated(SingleProcess):
    """DDP: every rank holds the same whole masks, broadcast from rank 0 and verified by checksum."""

    replicated = True

    def adopt(self, state: MaskState, masks: Sequence[torch.Tensor], step: int, skipped: int,
              agree: Mapping[str, Any]) -> list[torch.Tensor]:
        """Rank 0's masks, broadcast into every rank *before* anything is zeroed, so a rank that
        computed other masks (e.g. scored its own data) loses no weight that rank 0 keeps."""
        state.overwrite(masks)
        self.broadcast(state, step, agree)
        return list(state.masks.values())


class Sharded:
    """FSDP2: every rank holds its rows of the masks; selections and counts are collectives.

    Args:
        layout: the rows of the sparsified DTensor parameters held here, and their process group.
    """

    sharded = True
    replicated = False

    def __init__(self, layout: ShardLayout) -> None:
        self.layout = layout
        self._solver = ShardedSolver(layout)

    @property
    def solver(self) -> TopKSolver:
        """Exact top-k over the full tensors, solved on the shards (:class:`.fsdp_layout.ShardedSolver`)."""
        return self._solver

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """A DTensor's local shard (a view sharing its storage under ``no_grad``)."""
        return local(tensor)

    def sum_counts(self, values: Sequence[int]) -> list[int]:
        """Per-layer counts summed over the ranks (one all-reduce)."""
        return self.layout.sum_counts(values)

    def full(self, tensors: Sequence[torch.Tensor], packed: bool = False) -> list[torch.Tensor]:
        """Full masks (or bit-packed masks) from every rank's rows: a collective."""
        return self.layout.gather_packed(tensors) if packed else self.layout.gather(list(tensors))

    def rows(self, full: torch.Tensor, i: int, packed: bool = False) -> torch.Tensor:
        """This rank's rows of layer ``i``'s full mask (or bit-packed mask)."""
        return self.layout.slice_packed(full, i) if packed else self.layout.local_rows(full, i)

    def gradients_finite(self, params: Sequence[torch.Tensor]) -> bool:
        """Whether every rank's local gradient shards are finite (agreed by one all-reduce)."""
        return self.layout.all_true(finite([local(p.grad) for p in params if p.grad is not None]))

    def adopt(self, state: MaskState, masks: Sequence[torch.Tensor], step: int, skipped: int,
              agree: Mapping[str, Any]) -> list[torch.Tensor]:
        """This rank's rows of full ``masks`` that every rank must pass alike (checked: a collective)."""
        _distributed.verify_masks(state.names, list(masks), step, skipped, self.layout.group)
        return [self.rows(m, i) for i, m in enumerate(masks)]

    def broadcast(self, state: MaskState, step: int, agree: Mapping[str, Any], src: int = 0,
                  group: Optional[Any] = None) -> None:
        """Refused: every rank holds its own rows of the masks."""
        raise ValueError("broadcast_masks: under FSDP every rank holds its own rows of the masks; nothing to copy")

    def verify(self, state: MaskState, step: int, skipped: int, group: Optional[Any] = None) -> None:
        """Raise :class:`~granet.parallel.mask_sync.MaskDivergenceError` unless all ranks agree on step,
        skipped updates and whole-layer counts (one all-reduce)."""
        state.follow_param_devices()
        self.layout.verify(step, skipped, state.counts)


ProcessLayout = Union[SingleProcess, Replicated, Sharded]


def process_layout(names: Sequence[str], params: Sequence[torch.Tensor], distributed: Optional[bool]) -> ProcessLayout:
    """The strategy for these parameters: :class:`Sharded` for FSDP2 (DTensor) weights, else
    :class:`Replicated` when ``distributed`` (``None``: a process group of 2+ ranks is initialised),
    else :class:`SingleProcess`.

    Raises:
        ValueError: sharded weights with ``distributed=False``, ``distributed=True`` without an
            initialised process group, or an unsupported FSDP placement (see :class:`ShardLayout`).
    """
    layout = ShardLayout.detect(names, params)
    if layout is not None:
        if distributed is False:
            raise ValueError("distributed=False: the model's weights are FSDP shards, whose masks need collectives")
        return Sharded(layout)
    replicated = _distributed.is_distributed() if distributed is None else bool(distributed)
    if replicated and not _distributed.is_initialised():
        raise ValueError("distributed=True needs an initialised torch.distributed process group")
    return Replicated() if replicated else SingleProcess()


__all__ = ["ProcessLayout", "Replicated", "Sharded", "SingleProcess", "process_layout"]
