"""Optional native kernels for the selection passes of a topology update (CPU, float32).

Most of a topology update on the CPU is a handful of passes over each layer: compare with two
bracket values, mask, count, and compact the few entries in the band with ``nonzero``. As torch
operations these are seven passes and a slow compaction (``nonzero`` costs about 1 ns per entry on
one core); fused, they are one pass at a fraction of the cost. The kernels here are that fusion,
in plain C (``_native.c``, no torch headers), compiled when the package is built (``setup.py``) into
the extension module ``granet.kernels._native_kernels``. This module finds that file with importlib and
loads it with ``ctypes`` on first use (:mod:`.native_library`, the loader of granet's C libraries): no
compiler runs at import or run time. When loaded, the library picks the widest instruction set this
CPU runs (AVX-512 with or without VBMI, AVX2, or the portable baseline) and checks itself on a known
case, which a wrong byte order would fail.

Where the package was installed without a working C compiler the library is missing, and so it is
with ``GRANET_NATIVE=0`` in the environment: :mod:`granet.kernels.topk` then runs the torch operations
instead (a missing library is warned about once, at the first CPU selection that would have used
it). Both give the same bits: every output is defined by the torch expression it replaces (tested
on random inputs with ties, NaN and infinities). :func:`available` and :func:`status` say which
runs. Only contiguous CPU tensors of the expected dtypes ever reach the C code: :func:`supports`
tells the callers, and every kernel function checks its tensors again, since a CUDA pointer handed
to C would crash the process. ctypes releases the GIL during a call, so the kernels run in parallel
on the layer threads of :mod:`granet.kernels.layer_threads`.
"""
from __future__ import annotations

import ctypes
import logging
import os
from typing import Optional, Sequence

import torch
from torch.autograd.graph import increment_version

from .native_library import NOT_BUILT, NativeLibrary

logger = logging.getLogger(__name__)

_LEVELS = ("portable", "avx2", "avx512", "avx512vbmi")  # granet_kernels_use's levels, named in status()
_NOT_BUILT = NOT_BUILT
_warned = False


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, f32, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    lib.granet_kernels_self_test.restype = c_int
    lib.granet_kernels_self_test.argtypes = []
    lib.granet_band_f32.restype = i64
    lib.granet_band_f32.argtypes = [ptr, i64, c_int, ptr, c_int, f32, c_int, f32, ptr,
                                    ctypes.POINTER(i64), ptr, ptr, i64]
    lib.granet_kth_f32.restype = f32
    lib.granet_kth_f32.argtypes = [ptr, i64, i64]
    lib.granet_zero_outside_f32.restype = i64
    lib.granet_zero_outside_f32.argtypes = [ptr, i64, ctypes.POINTER(ctypes.c_void_p), c_int, ptr, i64]
    lib.granet_compact_f32.restype = i64
    lib.granet_compact_f32.argtypes = [ptr, i64, c_int, ptr, c_int, ptr, ptr, i64]


def _self_test(lib: ctypes.CDLL) -> str:
    """The library's own check on a known case (at the level in use), which a wrong byte order fails."""
    failed = lib.granet_kernels_self_test()
    return f"fails its self-test ({failed:#x}): built for another byte order?" if failed else ""


_LIBRARY = NativeLibrary(module="granet.kernels._native_kernels",
                         source=os.path.join(os.path.dirname(os.path.abspath(__file__)), "_native.c"),
                         prefix="granet_kernels", levels=_LEVELS, declare=_declare, self_test=_self_test,
                         log=logger, name="native selection kernels")


def set_enabled(flag: bool) -> bool:
    """Use the native kernels (where they are built) or not; returns the previous setting.

    The default comes from ``GRANET_NATIVE`` (``0`` turns them off). Results do not depend on it.
    """
    return _LIBRARY.set_enabled(flag)


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernels, or ``None`` (turned off, or not built: torch ops run)."""
    return _LIBRARY.library()


def available() -> bool:
    """Whether the native kernels are in use: built, loaded, and not turned off."""
    return _LIBRARY.available()


def status() -> str:
    """A short line for ``summary.json`` and ``granet --version``: ``"in use (avx512)"`` (or
    ``avx512vbmi``, ``avx2``, ``portable``), ``"off (GRANET_NATIVE=0)"``, ``"off (set_enabled(False))"``,
    ``"not built (...)"``, ``"stale (...)"`` or ``"unusable (...)"``."""
    return _LIBRARY.status()


def _load() -> tuple[Optional[ctypes.CDLL], str]:
    """The installed kernels and ``"in use (LEVEL)"``, or ``None`` and why not."""
    return _LIBRARY.load()


def _open(path: str, source: Optional[str]) -> tuple[Optional[ctypes.CDLL], str]:
    """The library at ``path`` loaded, checked (built from ``source`` where given; the self-test)
    and set to the widest instruction set this CPU runs; or ``None`` and why not."""
    return _LIBRARY.open(path, source)


def _warn_missing() -> None:
    global _warned
    with _LIBRARY.lock:  # the layer threads may all find the kernels missing at once
        if _warned:
            return
        _warned = True
    logger.warning("granet's native selection kernels are %s: topology updates on the CPU run torch operations "
                   "instead (the same masks, about 2x slower). Reinstall granet where a C compiler is available "
                   "to build them.", _LIBRARY.state)


def _fits(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the C code can take ``t``: a contiguous CPU tensor of ``dtype``. The one device
    check: a pointer into GPU (or meta) memory must never reach the kernels."""
    return t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous()


def _require(t: torch.Tensor, dtype: torch.dtype, numel: int, what: str) -> None:
    if not _fits(t, dtype) or t.numel() != numel:
        raise ValueError(f"granet.kernels.native: {what} must be a contiguous CPU {dtype} tensor of {numel} entries, "
                         f"got {t.dtype} of shape {tuple(t.shape)} on {t.device}")


def _kernels() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"granet.kernels.native: the kernels are {status()} (check supports() first)")
    return lib


def supports(values: Sequence[torch.Tensor], masks: Sequence[Optional[torch.Tensor]] = ()) -> bool:
    """Whether the kernels are in use and can take these float32 ``values`` and bool ``masks``
    (CPU, contiguous; ``None`` masks skipped). Never loads the kernels for other tensors; the first
    call with CPU tensors they could take warns (once) when they are missing but not turned off."""
    for tensors, dtype in ((values, torch.float32), (masks, torch.bool)):
        for t in tensors:
            if t is not None and not _fits(t, dtype):
                return False
    lib = library()
    if lib is None and _LIBRARY.enabled:
        _warn_missing()
    return lib is not None


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def band(x: torch.Tensor, absolute: bool, valid: Optional[torch.Tensor], invert: bool,
         hi: Optional[float], lo: Optional[float], above: Optional[torch.Tensor],
         capacity: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """One fused pass over flat float32 ``x`` (check :func:`supports` first).

    With ``v = |x|`` (``absolute``) or ``x``, and ``ok = valid`` (``~valid`` with ``invert``,
    everything when ``None``): writes ``above = (v > hi) & ok`` into ``above`` (when given) and
    returns its count, and the positions (ascending) and values ``v`` of the band
    ``ok & ~(v > hi) & (v > lo)``; a missing ``hi`` or ``lo`` drops its comparison.
    ``capacity`` is a guess of the band's size: a larger band costs a second pass.
    """
    lib = _kernels()
    n = x.numel()
    _require(x, torch.float32, n, "x")
    for t, what in ((valid, "valid"), (above, "above")):
        if t is not None:
            _require(t, torch.bool, n, what)
    n_above = ctypes.c_int64()
    top = float("inf") if hi is None else hi
    capacity = max(1, min(capacity, n))
    while True:
        index = torch.empty(capacity, dtype=torch.int64)
        values = torch.empty(capacity, dtype=torch.float32)
        size = lib.granet_band_f32(x.data_ptr(), n, int(absolute), _ptr(valid), int(invert), top,
                                   int(lo is not None), 0.0 if lo is None else lo, _ptr(above),
                                   ctypes.byref(n_above), index.data_ptr(), values.data_ptr(), capacity)
        if size <= capacity:
            return n_above.value, index[:size], values[:size]
        capacity = size


def kth_smallest(x: torch.Tensor, j: int) -> Optional[torch.Tensor]:
    """``x.kthvalue(j).values`` of flat float32 ``x`` (``1 <= j <= numel < 2**32``) as a 0-d
    tensor, or ``None`` when ``x`` holds a NaN (check :func:`supports` first)."""
    lib = _kernels()
    _require(x, torch.float32, x.numel(), "x")
    if not 1 <= j <= x.numel() < 1 << 32:
        raise ValueError(f"granet.kernels.native.kth_smallest: j={j} for {x.numel()} entries (1 <= j <= numel < 2**32)")
    value = lib.granet_kth_f32(x.data_ptr(), x.numel(), j)
    return None if value != value else torch.tensor(value, dtype=torch.float32)


def zero_outside(tensors: list[torch.Tensor], mask: torch.Tensor, also: Optional[torch.Tensor] = None) -> None:
    """``t.mul_(mask)`` for every float32 tensor in ``tensors`` (contiguous, shaped like the bool
    ``mask``), and ``t.view(-1)[also] *= 0`` for the flat int64 positions ``also``: one pass that
    reads the mask once for all tensors (check :func:`supports` first). A position outside
    ``[-numel, numel)`` raises IndexError before anything is written, as torch's ``index_fill_``."""
    lib = _kernels()
    n = mask.numel()
    _require(mask, torch.bool, n, "mask")
    for t in tensors:
        _require(t, torch.float32, n, "each tensor")
    positions = None if also is None else also.contiguous()
    if positions is not None:
        _require(positions, torch.int64, positions.numel(), "also")
    pointers = (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
    bad = lib.granet_zero_outside_f32(mask.data_ptr(), n, pointers, len(tensors), _ptr(positions),
                                      0 if positions is None else positions.numel())
    if bad >= 0:
        assert positions is not None
        raise IndexError(f"index {int(positions[bad])} is out of bounds for dimension 0 with size {n}")
    for t in tensors:  # as torch's own in-place ops do: autograd then sees the write
        increment_version(t)


def compact(mask: torch.Tensor, count: int, invert: bool = False, x: Optional[torch.Tensor] = None,
            absolute: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Positions (ascending) of the ``count`` set entries of flat bool ``mask`` (clear ones with
    ``invert``), i.e. ``nonzero``, and ``x`` (``|x|`` with ``absolute``) there when ``x`` is given."""
    lib = _kernels()
    n = mask.numel()
    _require(mask, torch.bool, n, "mask")
    if x is not None:
        _require(x, torch.float32, n, "x")
    index = torch.empty(count, dtype=torch.int64)
    values = None if x is None else torch.empty(count, dtype=torch.float32)
    size = lib.granet_compact_f32(mask.data_ptr(), n, int(invert), _ptr(x), int(absolute),
                                  index.data_ptr(), _ptr(values), count)
    if size != count:
        raise ValueError(f"compact: the mask has {size} {'clear' if invert else 'set'} entries, not {count}")
    return index, values
