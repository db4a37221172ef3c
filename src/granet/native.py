"""Optional native kernels for the selection passes of a topology update (CPU, float32).

Most of a topology update on the CPU is a handful of passes over each layer: compare with two
bracket values, mask, count, and compact the few entries in the band with ``nonzero``. As torch
operations these are seven passes and a slow compaction (``nonzero`` costs about 1 ns per entry on
one core); fused, they are one pass at a fraction of the cost. The kernels here are that fusion,
in plain C (no torch headers), compiled on first use with the system C compiler (``$CC``, else
``cc``/``gcc``/``clang``) into a fresh private temporary directory, loaded with :mod:`ctypes` and
the directory deleted at once. Nothing is compiled at install time and nothing is cached on disk.

Without a compiler, or with ``GRANET_NATIVE=0`` in the environment, :mod:`granet.topk` runs the
torch operations instead. Both give the same bits: every output is defined by the torch expression
it replaces (tested on random inputs with ties, NaN and infinities). ctypes releases the GIL during
a call, so the kernels run in parallel on the layer threads of :mod:`granet.workers`.
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Optional, Sequence

import torch
from torch.autograd.graph import increment_version

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

#define BLOCK 256

/* Append position base+i and value x[i] for every byte flags[i] == 1 (bytes are 0 or 1), in
   ascending order; entries beyond cap are counted but not written. */
static inline int64_t emit(const uint8_t* flags, int64_t m, int64_t base, const float* x, int absolute,
                           int64_t k, int64_t* idx, float* vals, int64_t cap) {
    int64_t w = 0;
    for (; w + 8 <= m; w += 8) {
        uint64_t word;
        memcpy(&word, flags + w, 8);
        while (word) {
            int64_t i = w + (__builtin_ctzll(word) >> 3);
            if (k < cap) { idx[k] = base + i; if (vals) vals[k] = absolute ? fabsf(x[i]) : x[i]; }
            k++;
            word &= word - 1;
        }
    }
    for (; w < m; w++) {
        if (flags[w]) {
            if (k < cap) { idx[k] = base + w; if (vals) vals[k] = absolute ? fabsf(x[w]) : x[w]; }
            k++;
        }
    }
    return k;
}

/* One block of the band pass; absolute and has_valid are constants at each call site, so the
   compiler emits a vectorised loop for each combination. */
static inline int64_t band_block(const float* x, const uint8_t* ok, uint8_t inv, int64_t m,
                                 float hi, float lo, uint8_t no_lo, uint8_t* up, uint8_t* in,
                                 const int absolute, const int has_valid) {
    int64_t count = 0;
    for (int64_t i = 0; i < m; i++) {
        float v = absolute ? fabsf(x[i]) : x[i];
        uint8_t o = has_valid ? (uint8_t)(ok[i] ^ inv) : 1;
        uint8_t above_hi = v > hi;
        uint8_t u = above_hi & o;
        up[i] = u;
        count += u;
        in[i] = o & (uint8_t)!above_hi & ((uint8_t)(v > lo) | no_lo);
    }
    return count;
}

/* above = (v > hi) & valid (where above is not NULL), n_above its count; the band
   valid & !(v > hi) & (v > lo) as positions and values; v is |x| with absolute, valid is
   !valid with invert; no hi: hi = +inf; no lo: has_lo = 0. Returns the band's size. */
int64_t granet_band_f32(const float* x, int64_t n, int absolute, const uint8_t* valid, int invert,
                        float hi, int has_lo, float lo, uint8_t* above, int64_t* n_above,
                        int64_t* idx, float* vals, int64_t cap) {
    uint8_t up[BLOCK], in[BLOCK];
    uint8_t inv = (uint8_t)(invert & 1), no_lo = (uint8_t)!has_lo;
    int64_t k = 0, a = 0;
    for (int64_t s = 0; s < n; s += BLOCK) {
        int64_t m = n - s < BLOCK ? n - s : BLOCK;
        uint8_t* u = above ? above + s : up;
        const uint8_t* ok = valid ? valid + s : 0;
        if (absolute) {
            a += valid ? band_block(x + s, ok, inv, m, hi, lo, no_lo, u, in, 1, 1)
                       : band_block(x + s, ok, inv, m, hi, lo, no_lo, u, in, 1, 0);
        } else {
            a += valid ? band_block(x + s, ok, inv, m, hi, lo, no_lo, u, in, 0, 1)
                       : band_block(x + s, ok, inv, m, hi, lo, no_lo, u, in, 0, 0);
        }
        k = emit(in, m, s, x + s, absolute, k, idx, vals, cap);
    }
    *n_above = a;
    return k;
}

/* Order-preserving map of a float to an unsigned key (negative floats reversed). */
static inline uint32_t float_key(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* The j-th smallest (1-based, 1 <= j <= n) of x[0..n), as torch.kthvalue, by a radix select on
   the keys: three counting passes of 11, 11 and 10 bits, each over the entries that share the
   bits found so far (no data-dependent swaps, ties cost nothing; n < 2^32). NaN when x holds a NaN (the
   caller then leaves it to torch, which orders NaN last). -0.0 and 0.0 compare equal everywhere
   the result is used, so either may be returned for a tie between them. */
float granet_kth_f32(const float* x, int64_t n, int64_t j) {
    static const int shifts[3] = {21, 10, 0}, widths[3] = {11, 11, 10};
    uint32_t hist[2048];
    uint32_t prefix = 0, fixed = 0;
    int64_t rank = j - 1;
    for (int pass = 0; pass < 3; pass++) {
        int shift = shifts[pass];
        uint32_t bins = 1u << widths[pass], low = bins - 1;
        memset(hist, 0, sizeof(uint32_t) * bins);
        if (pass == 0) {
            int nan = 0;
            for (int64_t i = 0; i < n; i++) {
                nan |= x[i] != x[i];
                hist[float_key(x[i]) >> shift]++;
            }
            if (nan) return NAN;
        } else {
            for (int64_t i = 0; i < n; i++) {
                uint32_t key = float_key(x[i]);
                if ((key & fixed) == prefix) hist[(key >> shift) & low]++;
            }
        }
        uint32_t b = 0;
        while (rank >= (int64_t)hist[b]) rank -= hist[b++];
        prefix |= b << shift;
        fixed |= low << shift;
    }
    uint32_t u = (prefix & 0x80000000u) ? (prefix & 0x7FFFFFFFu) : ~prefix;
    float out;
    memcpy(&out, &u, 4);
    return out;
}

/* x *= (float)mask for each of the count tensors (one read of the mask per block, shared by all
   of them), then x *= 0.0f at the n_also flat positions also: the same bits as multiplying by
   the mask converted to 1.0 / 0.0 with those positions cleared. */
void granet_zero_outside_f32(const uint8_t* mask, int64_t n, float* const* tensors, int count,
                             const int64_t* also, int64_t n_also) {
    float keep[BLOCK];
    for (int64_t s = 0; s < n; s += BLOCK) {
        int64_t m = n - s < BLOCK ? n - s : BLOCK;
        for (int64_t i = 0; i < m; i++) keep[i] = (float)mask[s + i];
        for (int c = 0; c < count; c++) {
            float* x = tensors[c] + s;
            for (int64_t i = 0; i < m; i++) x[i] *= keep[i];
        }
    }
    for (int64_t j = 0; j < n_also; j++) {
        for (int c = 0; c < count; c++) tensors[c][also[j]] *= 0.0f;
    }
}

/* Positions of the set entries of a bool mask (of the clear ones with invert) and, where x is
   not NULL, x (|x| with absolute) there. Returns their number. */
int64_t granet_compact_f32(const uint8_t* mask, int64_t n, int invert, const float* x, int absolute,
                           int64_t* idx, float* vals, int64_t cap) {
    uint8_t flags[BLOCK];
    int64_t k = 0;
    for (int64_t s = 0; s < n; s += BLOCK) {
        int64_t m = n - s < BLOCK ? n - s : BLOCK;
        const uint8_t* f = mask + s;
        if (invert) {
            for (int64_t i = 0; i < m; i++) flags[i] = f[i] ^ 1;
            f = flags;
        }
        k = emit(f, m, s, x ? x + s : 0, absolute, k, idx, x ? vals : 0, cap);
    }
    return k;
}
"""

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_built = False
_SWITCH = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _from_environment() -> bool:
    value = os.environ.get("GRANET_NATIVE", "1")
    if value.strip().lower() not in _SWITCH:
        logger.warning("GRANET_NATIVE=%r is not one of 1/0, true/false, yes/no, on/off: the native kernels stay on",
                       value)
        return True
    return _SWITCH[value.strip().lower()]


_enabled = _from_environment()


def set_enabled(flag: bool) -> bool:
    """Use the native kernels (when they build) or not; returns the previous setting.

    The default comes from ``GRANET_NATIVE`` (``0`` turns them off). Results do not depend on it.
    """
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, or ``None`` (turned off, or no working C compiler: torch ops run)."""
    global _library, _built
    if not _enabled:
        return None
    if not _built:
        with _lock:
            if not _built:
                _library = _build()
                _built = True
    return _library


def _compilers() -> list[str]:
    found = [os.environ["CC"]] if os.environ.get("CC") else []
    return found + [c for c in (shutil.which(n) for n in ("cc", "gcc", "clang")) if c is not None]


def _build() -> Optional[ctypes.CDLL]:
    """Compile and load the kernels; ``None`` (logged once) when that is not possible here.

    The system temporary directory comes first; where it does not allow loading a library (a
    ``noexec`` mount, common on clusters), ``$XDG_RUNTIME_DIR`` and then ``~/.cache/granet`` (mode
    0700) hold the fresh private directory instead.
    """
    start = time.perf_counter()
    compilers, errors = _compilers(), []
    if compilers:
        for parent in _build_parents():
            lib = _build_in(parent, compilers, errors)
            if lib is not None:
                logger.debug("native selection kernels built in %s in %.2f s", parent, time.perf_counter() - start)
                return lib
    logger.info("native selection kernels unavailable (%s); using torch operations",
                "; ".join(errors) if errors else "no C compiler found")
    return None


def _build_parents() -> list[str]:
    parents = [tempfile.gettempdir(), os.environ.get("XDG_RUNTIME_DIR", ""),
               os.path.join(os.path.expanduser("~"), ".cache", "granet")]
    return list(dict.fromkeys(p for p in parents if p))


def _build_in(parent: str, compilers: list[str], errors: list[str]) -> Optional[ctypes.CDLL]:
    """The kernels built in a fresh private directory under ``parent`` (deleted before returning),
    or ``None`` with the reasons appended to ``errors``."""
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="granet-native-", dir=parent) as tmp:
            source, target = os.path.join(tmp, "kernels.c"), os.path.join(tmp, "kernels.so")
            with open(source, "w") as f:
                f.write(_SOURCE)
            for cc in compilers:
                # -march=native: the library runs only on the machine that builds it (never cached).
                for flags in (["-O3", "-march=native"], ["-O3"]):
                    try:
                        subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", target, source],
                                       check=True, capture_output=True, timeout=120)
                    except (OSError, subprocess.SubprocessError) as e:
                        errors.append(f"{cc} {' '.join(flags)}: {e}")
                        continue
                    lib = ctypes.CDLL(target)  # mapped: the file may go with the directory
                    _declare(lib)
                    return lib
    except OSError as e:  # the directory is not writable, or libraries cannot be loaded from it
        errors.append(f"{parent}: {e}")
    return None


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, f32, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    lib.granet_band_f32.restype = i64
    lib.granet_band_f32.argtypes = [ptr, i64, c_int, ptr, c_int, f32, c_int, f32, ptr,
                                    ctypes.POINTER(i64), ptr, ptr, i64]
    lib.granet_kth_f32.restype = f32
    lib.granet_kth_f32.argtypes = [ptr, i64, i64]
    lib.granet_zero_outside_f32.restype = None
    lib.granet_zero_outside_f32.argtypes = [ptr, i64, ctypes.POINTER(ctypes.c_void_p), c_int, ptr, i64]
    lib.granet_compact_f32.restype = i64
    lib.granet_compact_f32.argtypes = [ptr, i64, c_int, ptr, c_int, ptr, ptr, i64]


def supports(values: Sequence[torch.Tensor], masks: Sequence[Optional[torch.Tensor]] = ()) -> bool:
    """Whether the kernels are available and can take these float32 ``values`` and bool ``masks``
    (CPU, contiguous; ``None`` masks skipped)."""
    for tensors, dtype in ((values, torch.float32), (masks, torch.bool)):
        for t in tensors:
            if t is not None and (t.device.type != "cpu" or not t.is_contiguous() or t.dtype != dtype):
                return False
    return library() is not None


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
    lib = library()
    assert lib is not None
    n_above = ctypes.c_int64()
    top = float("inf") if hi is None else hi
    capacity = max(1, min(capacity, x.numel()))
    while True:
        index = torch.empty(capacity, dtype=torch.int64)
        values = torch.empty(capacity, dtype=torch.float32)
        size = lib.granet_band_f32(x.data_ptr(), x.numel(), int(absolute), _ptr(valid), int(invert), top,
                                   int(lo is not None), 0.0 if lo is None else lo, _ptr(above),
                                   ctypes.byref(n_above), index.data_ptr(), values.data_ptr(), capacity)
        if size <= capacity:
            return n_above.value, index[:size], values[:size]
        capacity = size


def kth_smallest(x: torch.Tensor, j: int) -> Optional[torch.Tensor]:
    """``x.kthvalue(j).values`` of flat float32 ``x`` (``1 <= j <= numel``) as a 0-d tensor, or
    ``None`` when ``x`` holds a NaN (check :func:`supports` first)."""
    lib = library()
    assert lib is not None and 1 <= j <= x.numel() < 1 << 32
    value = lib.granet_kth_f32(x.data_ptr(), x.numel(), j)
    return None if value != value else torch.tensor(value, dtype=torch.float32)


def zero_outside(tensors: list[torch.Tensor], mask: torch.Tensor, also: Optional[torch.Tensor] = None) -> None:
    """``t.mul_(mask)`` for every float32 tensor in ``tensors`` (contiguous, shaped like the bool
    ``mask``), and ``t.view(-1)[also] *= 0`` for the flat int64 positions ``also``: one pass that
    reads the mask once for all tensors (check :func:`supports` first)."""
    lib = library()
    assert lib is not None and all(t.numel() == mask.numel() for t in tensors)
    pointers = (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
    positions = None if also is None else also.contiguous()
    lib.granet_zero_outside_f32(mask.data_ptr(), mask.numel(), pointers, len(tensors), _ptr(positions),
                                0 if positions is None else positions.numel())
    for t in tensors:  # as torch's own in-place ops do: autograd then sees the write
        increment_version(t)


def compact(mask: torch.Tensor, count: int, invert: bool = False, x: Optional[torch.Tensor] = None,
            absolute: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Positions (ascending) of the ``count`` set entries of flat bool ``mask`` (clear ones with
    ``invert``), i.e. ``nonzero``, and ``x`` (``|x|`` with ``absolute``) there when ``x`` is given."""
    lib = library()
    assert lib is not None
    index = torch.empty(count, dtype=torch.int64)
    values = None if x is None else torch.empty(count, dtype=torch.float32)
    size = lib.granet_compact_f32(mask.data_ptr(), mask.numel(), int(invert), _ptr(x), int(absolute),
                                  index.data_ptr(), _ptr(values), count)
    if size != count:
        raise ValueError(f"compact: the mask has {size} {'clear' if invert else 'set'} entries, not {count}")
    return index, values
