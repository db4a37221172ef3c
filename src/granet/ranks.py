"""Keeping a sparsifier's masks consistent across ranks: DDP copies and FSDP shards.

:class:`RankChecks` is a mixin of :class:`~granet.sparsifier.Sparsifier` holding its two public
rank-consistency methods. Under DDP every rank holds the same masks: they are broadcast from rank 0
and verified by checksum (:mod:`granet.distributed`). Under FSDP every rank holds its own rows of
the masks: nothing is broadcast, and verification checks that all ranks agree on the step and the
global per-layer counts (:mod:`granet.fsdp`).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from . import distributed as _distributed


class RankChecks:
    """``broadcast_masks`` / ``verify_masks`` for a sparsifier (uses its masks, config and counters,
    and :class:`~granet.masking.MaskedParameters`' ``apply_masks`` / ``_follow_param_devices``)."""

    _names: list
    _masks: list
    _ever_active: Optional[list]
    _counts: list
    _config: Any
    _init_counts: list
    _final_counts: list
    _step_count: int
    _skipped_updates: int
    _layout: Any
    apply_masks: Any
    _follow_param_devices: Any

    def broadcast_masks(self, src: int = 0, group: Optional[Any] = None) -> None:
        """Make every rank's masks (and exploration bits) a copy of rank ``src``'s, then re-apply them.

        Runs by itself at construction and after :meth:`load_state_dict` when distributed; see
        :func:`granet.distributed.broadcast_masks`. Every rank must call it.
        """
        if self._layout is not None:
            raise ValueError("broadcast_masks: under FSDP every rank holds its own rows of the masks; nothing to copy")
        self._follow_param_devices()
        agree = {
            "sparsity config": self._config.to_dict(),
            "track_exploration": self._ever_active is not None,
            "per-layer pruning targets (init/final counts)": [self._init_counts, self._final_counts],
        }
        _distributed.broadcast_masks(
            self._names, self._masks, self._ever_active or [], step=self._step_count, agree=agree, src=src, group=group
        )
        self._counts = [int(torch.count_nonzero(m)) for m in self._masks]
        self.apply_masks()

    def verify_masks(self, group: Optional[Any] = None) -> None:
        """Raise :class:`~granet.distributed.MaskDivergenceError` unless every rank holds the same masks.

        Runs by itself after every topology update when distributed; see
        :func:`granet.distributed.verify_masks`. Every rank must call it.
        """
        self._follow_param_devices()
        if self._layout is not None:  # sharded: the ranks must agree on step and global counts
            self._layout.verify(self._step_count, self._skipped_updates, self._counts)
            return
        _distributed.verify_masks(self._names, self._masks, self._step_count, self._skipped_updates, group)

