"""Boolean masks over named parameters: the state a sparsifier owns, its read-only views, and
the in-place zeroing of weights and optimizer state.

:class:`MaskState` is a component the :class:`~granet.sparsity.sparsifier.Sparsifier` owns (not a base
class). It keeps the masks, counts and exploration bits private and hands out read-only views (a
mapping of live masks, copies of counts); the sparsifier changes them only through the state's
named operations (:meth:`~MaskState.start`, :meth:`~MaskState.replace`, :meth:`~MaskState.install`,
:meth:`~MaskState.install_exactly`, :meth:`~MaskState.load`, ...). Keeping every change in one
place is what lets the counts, the exploration bits and the zeroed weights always agree with the
masks. Where the process holds only part of each tensor (FSDP2), the state asks its
:class:`Layout` (the sparsifier's process-layout strategy, :mod:`granet.sparsity.layouts`) for the local part
of a tensor and for whole-layer counts.

Masks are ``torch.bool`` (1 byte per weight); the "ever active" set used for the exploration rate
is bit-packed (1/8 byte per weight).
"""
from __future__ import annotations

import math
import sys
from types import MappingProxyType
from typing import Any, Mapping, Optional, Protocol, Sequence

import torch
from torch import nn

from ..kernels import native
from ..kernels.layer_threads import layer_map, on_cpu
from ..kernels.topk import scratch

_BIT_VALUES = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor into uint8 bytes (8 entries per byte, little-endian bit order)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad == 0 and flat.storage_offset() % 8 == 0 and sys.byteorder == "little":
        # Eight bools are one int64 whose byte j is entry j (0 or 1). Three shift-ORs move byte
        # j's bit (bit 8j) to bit j of the low byte: after x |= x >> 7, >> 14, >> 28, bit j of
        # byte 0 collects exactly bit 8j (shifts by 7s for s = 0..7); higher bytes are dropped.
        x = flat.view(torch.int64)
        x = x | (x >> 7)
        x |= x >> 14
        x |= x >> 28
        return x.to(torch.uint8)
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8).to(torch.uint8) * _BIT_VALUES.to(flat.device)
    return bits.sum(dim=1, dtype=torch.uint8)


@torch.no_grad()
def zero_outside(tensors: Sequence[torch.Tensor], mask: torch.Tensor, also: Optional[torch.Tensor] = None) -> None:
    """``t.mul_(mask)`` for every tensor in ``tensors`` (all shaped like ``mask``), bit for bit; with
    ``also`` (flat int64 positions), the mask is taken as ``False`` at those positions too.

    Multiplying by a bool tensor runs a slow mixed-dtype kernel; the mask is instead converted
    once (per dtype) into a reusable float buffer (1.0 / 0.0, so every product is the same as with the bool:
    ``x * 1.0 == x``, ``x * 0.0 == copysign(0, x)``, NaN stays NaN) and multiplied in the tensors'
    own dtype, several times faster on large layers. Float32 CPU tensors go through one native pass
    instead (:mod:`granet.kernels.native`: the mask read once for all tensors, the same bits).
    """
    if (also is None or also.device.type == "cpu") and native.supports(tensors, [mask]):
        native.zero_outside(list(tensors), mask, also)  # one pass, the mask read once
        return
    converted: dict[torch.dtype, torch.Tensor] = {}
    for t in tensors:
        if t.dtype not in converted:
            buf = scratch(mask.numel(), t.dtype, mask.device, slot=3)
            # From the uint8 view: converting bool to float is ~6x slower in torch than uint8 to float.
            buf.view(mask.shape).copy_(mask.view(torch.uint8) if mask.dtype == torch.bool else mask)
            if also is not None and also.numel():
                buf.index_fill_(0, also, 0.0)
            converted[t.dtype] = buf.view(mask.shape)
        t.mul_(converted[t.dtype])


def set_bits(packed: torch.Tensor, positions: torch.Tensor) -> None:
    """``packed |= pack_bits(m)`` in place, for the mask ``m`` set exactly at flat ``positions``
    (distinct), touching only their bytes."""
    if positions.numel() == 0:
        return
    byte = positions // 8
    bit = torch.bitwise_left_shift(torch.ones_like(positions), positions % 8).to(torch.uint8)
    fresh = (packed[byte] & bit) == 0
    # Distinct positions in one byte are distinct bits, none set yet: their sum is their OR.
    packed.index_put_((byte[fresh],), bit[fresh], accumulate=True)


def popcount(packed: torch.Tensor) -> int:
    """Number of set bits in a uint8 tensor."""
    return int(_POPCOUNT.to(packed.device)[packed.long()].sum())


class Layout(Protocol):
    """What a :class:`MaskState` needs to know about the process layout (see :mod:`granet.sparsity.layouts`)."""

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """The part of ``tensor`` this process holds (a DTensor's local shard; else the tensor)."""
        ...

    def sum_counts(self, values: Sequence[int]) -> list[int]:
        """Per-layer integers summed over the processes holding parts of the layers."""
        ...


#: Devices on which :meth:`MaskState.apply` re-applies every layer's mask with one fused multiply per
#: (device, dtype) group, ``torch._foreach_mul_`` (kernel launches, not bandwidth, dominate there). It
#: multiplies by float copies of the masks (1.0 / 0.0, the same bits as :func:`zero_outside`), kept
#: until a mask changes: one extra weight-sized tensor per mask and dtype (4 bytes per float32
#: weight) in device memory. The CPU keeps the per-layer pass (native kernels, layer threads).
FUSED_APPLY_DEVICES = ("cuda",)


class MaskState:
    """Masks over named parameters, with read-only views, statistics and in-place zeroing.

    Masks hold the part of each parameter this process holds (all of it, except under FSDP);
    counts are whole-layer counts.

    Args:
        names: parameter names (unique).
        params: the parameters, in the order of ``names``.
        optimizer: the optimizer whose state tensors shaped like a parameter are masked too.
        mask_optimizer_state: zero the optimizer state of inactive weights at every
            :meth:`apply` (SNFS turns it off: it regrows by the momentum of inactive weights).
        layout: the process layout (local parts, count sums).
    """

    def __init__(
        self,
        names: Sequence[str],
        params: Sequence[nn.Parameter],
        optimizer: Optional[torch.optim.Optimizer],
        mask_optimizer_state: bool,
        layout: Layout,
    ) -> None:
        self._names = list(names)
        self._params = list(params)
        self._shapes = [tuple(p.shape) for p in self._params]
        self._sizes = [p.numel() for p in self._params]
        self._total = sum(self._sizes)
        self._optimizer = optimizer
        self._mask_optimizer_state = mask_optimizer_state
        self._layout = layout
        self._masks: list[torch.Tensor] = []
        self._counts: list[int] = list(self._sizes)
        self._ever_active: Optional[list[torch.Tensor]] = None
        # (layer, dtype) -> (the mask it was made from, that mask's version, float copy): see FUSED_APPLY_DEVICES
        self._float_masks: dict[tuple[int, torch.dtype], tuple[torch.Tensor, int, torch.Tensor]] = {}

    @classmethod
    def restored(cls, names: Sequence[str], shapes: Sequence[Sequence[int]], masks: Sequence[torch.Tensor],
                 ever_active: Optional[Sequence[torch.Tensor]], layout: Layout) -> "MaskState":
        """A state without parameters (a sparsifier restored from a pickle): full masks and
        exploration bits as given, counts from the masks. Only the views and statistics work."""
        state = cls(names, [], None, True, layout)
        state._shapes = [tuple(int(d) for d in s) for s in shapes]
        state._sizes = [math.prod(s) for s in state._shapes]
        state._total = sum(state._sizes)
        state._masks = [m.clone() for m in masks]
        state._counts = [int(torch.count_nonzero(m)) for m in state._masks]
        state._ever_active = None if ever_active is None else [e.clone() for e in ever_active]
        return state

    # ------------------------------------------------------------------ read-only views

    @property
    def optimizer(self) -> Optional[torch.optim.Optimizer]:
        """The optimizer whose state is masked (``None``: none)."""
        return self._optimizer

    @property
    def names(self) -> list[str]:
        """Names of the masked parameters, in model order (a copy)."""
        return list(self._names)

    @property
    def params(self) -> tuple[nn.Parameter, ...]:
        """The masked parameters, in the order of :attr:`names`."""
        return tuple(self._params)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """The full shape of each masked parameter (a copy)."""
        return list(self._shapes)

    @property
    def sizes(self) -> list[int]:
        """Number of entries of each masked parameter (a copy)."""
        return list(self._sizes)

    @property
    def total(self) -> int:
        """Number of masked weights."""
        return self._total

    @property
    def masks(self) -> Mapping[str, torch.Tensor]:
        """Read-only ``{name: torch.bool mask}`` of the live masks (no copy: read them, never change
        them in place, except through a collective that must overwrite them, like a broadcast)."""
        return MappingProxyType(dict(zip(self._names, self._masks)))

    def mask_of(self, name: str) -> torch.Tensor:
        """The live ``torch.bool`` mask of parameter ``name``."""
        try:
            return self._masks[self._names.index(name)]
        except ValueError:
            raise KeyError(f"{name!r} is not sparsified; sparsified: {', '.join(self._names)}") from None

    @property
    def counts(self) -> list[int]:
        """Active weights per masked parameter (a copy)."""
        return list(self._counts)

    @property
    def ever_active(self) -> Optional[tuple[torch.Tensor, ...]]:
        """Bit-packed "ever active" masks per layer (``uint8``, live), or ``None`` if not tracked."""
        return None if self._ever_active is None else tuple(self._ever_active)

    # ------------------------------------------------------------------ statistics

    def density(self) -> float:
        """Fraction of the masked weights that are active."""
        return sum(self._counts) / self._total

    def layer_density(self) -> dict[str, float]:
        """Density of every masked tensor, by parameter name."""
        return {n: c / s for n, c, s in zip(self._names, self._counts, self._sizes)}

    def exploration_rate(self) -> Optional[float]:
        """Fraction of the masked weights that have ever been active (ITOP's R_s), if tracked."""
        if self._ever_active is None:
            return None
        return sum(self._layout.sum_counts([popcount(e) for e in self._ever_active])) / self._total

    def count(self, masks: Sequence[torch.Tensor]) -> list[int]:
        """Whole-layer active counts of ``masks`` (one all-reduce when sharded)."""
        return self._layout.sum_counts([int(torch.count_nonzero(m)) for m in masks])

    # ------------------------------------------------------------------ changing the masks

    def start(self, masks: Sequence[torch.Tensor], track_exploration: bool) -> None:
        """Take the initial masks (counted), the exploration record starting from them if tracked."""
        self._masks = list(masks)
        self._counts = self.count(self._masks)
        self._ever_active = [pack_bits(m) for m in self._masks] if track_exploration else None

    def changed(self, masks: Sequence[torch.Tensor]) -> list[int]:
        """The layers whose mask in ``masks`` is another tensor than the current one."""
        return [i for i, new in enumerate(masks) if new is not self._masks[i]]

    def replace(self, layers: Sequence[int], masks: Sequence[torch.Tensor], counts: Sequence[int]) -> None:
        """Take ``masks[j]`` (whose count is ``counts[j]``) as layer ``layers[j]``'s mask; weights are
        zeroed later, by :meth:`install`."""
        for i, mask, count in zip(layers, masks, counts):
            self._masks[i], self._counts[i] = mask, int(count)

    def overwrite(self, masks: Sequence[torch.Tensor]) -> None:
        """Take copies of ``masks`` on the parameters' devices, uncounted and with nothing zeroed: for
        a collective that overwrites them next (the DDP broadcast; then :meth:`recount`)."""
        self._masks = [m.to(p.device).clone() for m, p in zip(masks, self._params)]

    def recount(self) -> None:
        """Count the current masks again (after a collective overwrote them in place)."""
        self._counts = self.count(self._masks)

    def load(self, masks: Sequence[torch.Tensor], counts: Sequence[int],
             ever_active: Optional[Sequence[torch.Tensor]], track_exploration: bool) -> None:
        """Take copies of loaded masks (this process's part) with their whole-layer counts, and the
        loaded exploration bits (rebuilt from the masks when tracked but not given)."""
        self._masks = [m.to(p.device).clone() for m, p in zip(masks, self._params)]
        self._counts = [int(c) for c in counts]
        if ever_active is not None and track_exploration:
            self._ever_active = [e.to(p.device).clone() for e, p in zip(ever_active, self._params)]
        elif track_exploration:
            self._ever_active = [pack_bits(m) for m in self._masks]

    def reset_exploration(self) -> None:
        """Forget every position explored so far (masks installed before the first step never trained)."""
        if self._ever_active is not None:
            self._ever_active = [torch.zeros_like(e) for e in self._ever_active]

    # ------------------------------------------------------------------ zeroing in place

    def _local(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor masks apply to: the part of it this process holds."""
        return self._layout.local(tensor)

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every inactive weight (and its optimizer state, unless disabled) in place."""
        self.follow_param_devices()
        if self._masks and all(m.device.type in FUSED_APPLY_DEVICES for m in self._masks):
            self._apply_fused()
            return

        def apply(i: int) -> None:
            if self._counts[i] < self._sizes[i]:  # a fully dense layer has nothing to zero
                zero_outside(self._masked_tensors(self._params[i]), self._masks[i])

        layer_map(apply, len(self._params), on_cpu(self._masks), costs=self._sizes)

    def _apply_fused(self) -> None:
        """:meth:`apply` as one ``torch._foreach_mul_`` per (device, dtype) of the masked tensors."""
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for i, param in enumerate(self._params):
            if self._counts[i] == self._sizes[i]:  # a fully dense layer has nothing to zero
                continue
            for t in self._masked_tensors(param):
                tensors, factors = groups.setdefault((t.device, t.dtype), ([], []))
                tensors.append(t)
                factors.append(self._float_mask(i, t.dtype))
        for tensors, factors in groups.values():
            torch._foreach_mul_(tensors, factors)

    def _float_mask(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        """Layer ``i``'s mask as 1.0 / 0.0 in ``dtype``, made again only after the mask changed."""
        mask = self._masks[i]
        cached = self._float_masks.get((i, dtype))
        if cached is not None and cached[0] is mask and cached[1] == mask._version:
            return cached[2]
        factor = mask.view(torch.uint8).to(dtype)
        self._float_masks[(i, dtype)] = (mask, mask._version, factor)
        return factor

    def follow_param_devices(self) -> None:
        """Move masks (and exploration bits) to their parameters' devices if the model was moved."""
        for i, (p, m) in enumerate(zip(self._params, self._masks)):
            if m.device != p.device:
                self._masks[i] = m.to(p.device)
                if self._ever_active is not None:
                    self._ever_active[i] = self._ever_active[i].to(p.device)

    def _masked_tensors(self, param: torch.Tensor) -> list[torch.Tensor]:
        """What the mask zeroes: the weight (its local part), and its optimizer state unless
        ``mask_optimizer_state=False``."""
        states = self._state_tensors(param) if self._mask_optimizer_state else []
        return [self._local(t) for t in (param, *states)]

    def _state_tensors(self, param: torch.Tensor) -> list[torch.Tensor]:
        """Optimizer state tensors shaped like ``param`` (momentum, Adam moments, ...)."""
        if self._optimizer is None:
            return []
        state = self._optimizer.state.get(param)
        if not state:
            return []
        return [v for v in state.values()
                if isinstance(v, torch.Tensor) and v.shape == param.shape and v.is_floating_point()]

    @torch.no_grad()
    def install(self, reset: Sequence[Optional[torch.Tensor]]) -> None:
        """Make weights and optimizer state agree with the current masks, in one pass per layer.

        Weights outside the mask, and the ``reset`` positions of each layer (regrown weights that
        start afresh: a mask, or flat int64 positions), become zero. Optimizer state is zeroed at the
        same places; with ``mask_optimizer_state=False`` only ``reset`` positions are, so inactive
        weights keep accumulating momentum (SNFS).
        """
        def install(i: int) -> None:
            param, mask, positions = self._params[i], self._masks[i], reset[i]
            if positions is None and self._counts[i] == self._sizes[i]:
                return
            if positions is not None and positions.dtype == torch.bool:  # a mask: fold it into the keep mask
                mask, positions = mask & ~positions, None
            zero_outside(self._masked_tensors(param), mask, also=positions)
            fresh = reset[i]
            if not self._mask_optimizer_state and fresh is not None:  # SNFS: state zeroed at reset only
                for buf in (self._local(t) for t in self._state_tensors(param)):
                    if positions is None:
                        buf.masked_fill_(fresh, 0.0)
                    elif buf.is_contiguous():
                        buf.view(-1).index_fill_(0, positions, 0.0)
                    else:  # e.g. channels_last state: positions are in logical (row-major) order
                        at = torch.zeros(buf.numel(), dtype=torch.bool, device=buf.device)
                        buf.masked_fill_(at.index_fill_(0, positions, True).view(buf.shape), 0.0)

        layer_map(install, len(self._params), on_cpu(self._masks), costs=self._sizes)

    def explore(self, layers: list[int], grown: Optional[list[Optional[torch.Tensor]]]) -> None:
        """Add the regrown positions of ``layers`` to the exploration record (a layer the update
        left alone adds no new position): bit by bit for a few positions, else the packed mask."""
        assert self._ever_active is not None
        ever = self._ever_active

        def explore(j: int) -> None:
            i = layers[j]
            positions = None if grown is None else grown[i]
            if positions is None or 32 * positions.numel() > self._masks[i].numel():
                ever[i] |= pack_bits(self._masks[i])
            else:
                set_bits(ever[i], positions)

        layer_map(explore, len(layers), on_cpu(self._masks), costs=[self._sizes[i] for i in layers])

    @torch.no_grad()
    def install_exactly(self, masks: Sequence[torch.Tensor]) -> None:
        """Adopt ``masks`` (copies): zero weights and optimizer state outside them, mark them explored."""
        self._masks = [m.to(p.device).clone() for m, p in zip(masks, self._params)]
        self._counts = self.count(self._masks)
        for i, (param, mask) in enumerate(zip(self._params, self._masks)):
            if self._ever_active is not None:
                self._ever_active[i] |= pack_bits(mask)
            zero_outside([self._local(t) for t in (param, *self._state_tensors(param))], mask)

    # ------------------------------------------------------------------ checks

    def check_masks(self, masks: Mapping[str, Any], source: str) -> list[torch.Tensor]:
        """``masks`` in parameter order, after checking names, shapes and dtype (all problems named).

        Raises:
            ValueError: one line naming every missing, unexpected, non-tensor, misshapen or
                non-boolean entry.
        """
        expected = dict(zip(self._names, self._shapes))
        problems = []
        missing = [n for n in self._names if n not in masks]
        unexpected = [str(n) for n in masks if n not in expected]
        if missing:
            problems.append(f"missing in {source}: {', '.join(missing)}")
        if unexpected:
            problems.append(f"not sparsified in this model: {', '.join(unexpected)}")
        present = [n for n in self._names if n in masks]
        not_tensors = [n for n in present if not isinstance(masks[n], torch.Tensor)]
        if not_tensors:
            problems.append(f"not tensors: {', '.join(not_tensors)}")
        tensors = [n for n in present if n not in not_tensors]
        shapes = [f"{n} (given {tuple(masks[n].shape)}, model {expected[n]})"
                  for n in tensors if tuple(masks[n].shape) != expected[n]]
        if shapes:
            problems.append(f"shape mismatch: {', '.join(shapes)}")
        dtypes = [f"{n} ({masks[n].dtype})" for n in tensors if masks[n].dtype != torch.bool]
        if dtypes:
            problems.append(f"not torch.bool: {', '.join(dtypes)}")
        if problems:
            raise ValueError(f"{source} does not match the model's sparsified parameters: " + "; ".join(problems))
        return [masks[n] for n in self._names]
