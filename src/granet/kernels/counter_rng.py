"""Counter-based random numbers computed on any device, bit for bit the same on every device.

A topology update draws random numbers for three things: the scores of an initial random mask, the
scores of random regrowth (SET), and the order among tied scores. By default they come from a CPU
``torch.Generator`` seeded by (seed, purpose, step, layer) (:func:`granet.sparsity.criteria.seeded_generator`)
and are copied to the weights' device: the masks are the same on every device, but a 100M-weight
model moves 400 MB from the host per update and draws them on one CPU core.

:class:`CounterGenerator` gives the same guarantees without the host: value ``i`` of a draw is
SplitMix64 (Steele, Lea & Flood, OOPSLA 2014) of ``key + (i + 1) * γ``, where ``key`` is the seed
of the purpose's generator and ``γ`` the golden-ratio increment, computed with 64-bit integer
tensor operations where the output lives. Integer arithmetic is exact on every device, so a draw is
a pure function of (key, position): identical on CPU and CUDA, across processes and after a resume,
with no generator state to save. A float is the top 24 bits times 2⁻²⁴ (uniform on a grid of 2²⁴
points in [0, 1), exactly representable in float32); a permutation orders the positions by their
full 64-bit values (:func:`torch.argsort`, stable, so even a collision has one answer).

The stream differs from the CPU generator's, so masks drawn with it differ from those drawn with
the default (``SparsityConfig(rng="device")`` chooses it; the default stays ``"cpu"``).
"""
from __future__ import annotations

from typing import Union

import torch

__all__ = ["CounterGenerator", "RandomSource", "permutation", "splitmix64_reference", "uniform"]

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _mix_(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function applied in place to int64 states (bits as unsigned 64-bit,
    wrapping arithmetic; torch's ``>>`` on int64 is arithmetic, so the shifted bits are masked)."""
    shifted = torch.empty_like(z)
    for bits, multiplier in ((30, _MIX1), (27, _MIX2), (31, None)):
        torch.bitwise_right_shift(z, bits, out=shifted)
        z.bitwise_xor_(shifted.bitwise_and_((1 << (64 - bits)) - 1))
        if multiplier is not None:
            z.mul_(_signed(multiplier))
    return z


def splitmix64_reference(key: int, count: int) -> list[int]:
    """The first ``count`` outputs of the stream ``key`` in Python integers (unsigned): the definition."""
    out = []
    for i in range(count):
        z = (key + (i + 1) * _GAMMA) & _MASK64
        z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
        z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
        out.append(z ^ (z >> 31))
    return out


class CounterGenerator:
    """A stateless stream of random numbers keyed by one 64-bit integer (see the module notes).

    Args:
        key: the stream's key (any int; taken modulo 2⁶⁴).
    """

    def __init__(self, key: int) -> None:
        self.key = key & _MASK64

    def initial_seed(self) -> int:
        """The key (named as :meth:`torch.Generator.initial_seed`, which it stands in for)."""
        return self.key

    def bits(self, count: int, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        """The first ``count`` 64-bit outputs of the stream as int64 on ``device``."""
        states = torch.arange(1, count + 1, dtype=torch.int64, device=device)
        return _mix_(states.mul_(_signed(_GAMMA)).add_(_signed(self.key)))

    def rand(self, shape: Union[torch.Size, tuple[int, ...]], device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        """Uniform float32 numbers in [0, 1) on a grid of 2⁻²⁴, shaped ``shape``, made on ``device``."""
        count = 1
        for size in shape:
            count *= int(size)
        top = self.bits(count, device).bitwise_right_shift_(40).bitwise_and_((1 << 24) - 1)
        return top.to(torch.float32).mul_(1.0 / (1 << 24)).reshape(shape)

    def randperm(self, n: int, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        """A permutation of ``range(n)`` (int64 on ``device``): positions ordered by their stream values."""
        return torch.argsort(self.bits(n, device), stable=True)

    def __repr__(self) -> str:
        return f"CounterGenerator(key={self.key:#018x})"


#: What every random choice of an update takes: a seeded CPU generator (the default) or a counter stream.
RandomSource = Union[torch.Generator, CounterGenerator]


def permutation(n: int, generator: RandomSource, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """``torch.randperm(n, generator=generator)`` moved to ``device``, or the counter stream's
    permutation made there."""
    if isinstance(generator, CounterGenerator):
        return generator.randperm(n, device)
    return torch.randperm(n, generator=generator).to(device)


def uniform(shape: Union[torch.Size, tuple[int, ...]], generator: RandomSource,
            device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """``torch.rand(shape, generator=generator)`` (float32, drawn on the CPU) moved to ``device``, or
    the counter stream's numbers made there."""
    if isinstance(generator, CounterGenerator):
        return generator.rand(shape, device)
    return torch.rand(shape, generator=generator).to(device)
