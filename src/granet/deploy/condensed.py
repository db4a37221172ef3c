"""Condensed inference for Linear layers with constant fan-in (every output unit reads k inputs).

A constant fan-in weight (``structure="fan-in"``, SRigL) is stored as ``values`` and ``index``, both
``out x k``: row ``o`` reads inputs ``index[o, :]`` (ascending) with weights ``values[o, :]``, and

    y[b, o] = sum_j values[o, j] * x[b, index[o, j]] + bias[o]

General CSR needs row pointers because rows differ in length; here every row has the same length,
so 16 rows can be processed in lockstep by one vector register. :class:`CondensedLinear` stores the
rows in blocks of 16, each block holding for each ``j`` the ``j``-th weight of its 16 rows side by
side (``(blocks, k, 16)``, the last block padded with weight 0 at input 0), and indices as int16
when ``in_features <= 2**15`` (int32 otherwise): 6 bytes per active weight instead of CSR's 8.

The products run in native code (``_condensed.c``, built with the package by ``setup.py`` into
``granet.deploy._condensed_kernels`` and loaded with ctypes; AVX-512, AVX2 or plain C, picked for
the CPU at load). What every kernel computes, for each output row and input row: each product
rounded to float32, then summed in the order of ``j`` starting from +0.0. The same additions in
torch operations (:func:`condensed_linear` with ``native=False``) are the fallback where the library
was not built (no C compiler at install) or is turned off (``GRANET_NATIVE=0``, as for granet's other
native kernels, or :func:`set_enabled`): the same bits, more slowly. When loaded, the library is
checked against the torch operations on a small case and refused if one bit differs. The result does
not depend on the batch size: row ``b`` of a batch equals the product of that row alone.

Why native code (measured on 2 shared cores, one thread, float32, 4096x4096 at density 0.05; see
``benchmarks/bench_inference.py`` and the README): for one input row, torch's condensed formulations
all took longer than CSR's ``torch.mv`` (0.58-0.68 ms): ``index_select`` of x, multiply and sum over
k 1.01-1.30 ms (the gather alone 0.45-0.52), ``bmm`` or ``linalg.vecdot`` on the gathered inputs
0.90-1.13, the same blocked over outputs or with a k-major gather 0.83-1.05, and ``F.embedding_bag``
with ``per_sample_weights`` (one fused gather-scale-sum) 3.0-7.1. The kernels here gather 16 rows per
instruction for one row (AVX-512: two blocks in flight): 1.5-1.7x faster than CSR there, 1.1-1.5x
on the GPT-2 MLP shapes (768x3072, 3072x768). For 32 rows they broadcast each weight over a row of
x^T and run about as fast as CSR (0.7-1.2x); ``F.embedding_bag`` (FBGEMM) ran 1.0-1.3x faster than
CSR at 32 rows, but would need a second, row-major int32 copy of the weights and gives up
batch-independent bits.

Sums run in a different order than dense BLAS, so outputs match the dense layer within float
rounding, not bit for bit. For inference only: no gradients flow.
"""
from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import torch
from torch import nn

from ..errors import short_repr
from ..kernels.native_library import NativeLibrary

__all__ = ["CondensedLinear", "available", "condense", "condensed_linear", "constant_fan_in", "index_dtype",
           "set_enabled", "status"]

LANES = 16  #: rows per block of the blocked layout (one AVX-512 register of float32)
#: Batches of at most this many rows use the gather kernel (x row-major); larger ones the broadcast
#: kernel (x transposed). Both give the same bits; the split is where their times crossed
#: (4096x4096 and 768x3072 at density 0.05: the gather kernel costs about one vector gather per 16
#: weights and batch row, the broadcast kernel one cache-line load of x^T per weight and 16 rows).
GATHER_MAX_BATCH = 8

_LEVELS = ("portable", "avx2", "avx512")  # granet_condensed_use's levels, named in status()


# ---------------------------------------------------------------------------- the native library

def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.granet_condensed_gather_f32.restype = c_int
    lib.granet_condensed_gather_f32.argtypes = [ptr, ptr, c_int, ptr, i64, ptr, ptr, i64, i64, i64, i64, i64, i64]
    lib.granet_condensed_broadcast_f32.restype = c_int
    lib.granet_condensed_broadcast_f32.argtypes = [ptr, ptr, c_int, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64]


def _self_test(lib: ctypes.CDLL) -> str:
    """The library's self-test: ``""`` when both kernels give the torch operations' bits on small
    cases (both index widths, a partial last block, one row, a few rows and a batch with a partial
    lane block), else the reason, naming the first case that differs."""
    gen = torch.Generator().manual_seed(0)
    for in_features, out_features, k in ((37, 21, 5), (40_000, 18, 3)):
        weight = torch.zeros(out_features, in_features)
        picks = torch.rand(out_features, in_features, generator=gen).argsort(dim=1)[:, :k]
        weight.scatter_(1, picks, torch.randn(out_features, k, generator=gen))
        values, index = _blocked(*condense(weight), in_features)
        bias = torch.randn(out_features, generator=gen)
        for batch in (1, 3, 37):
            x = torch.randn(batch, in_features, generator=gen)
            for b in (None, bias):
                got = _native(lib, values, index, x, out_features, b)
                want = _reference(values, index, x, out_features, b)
                if not torch.equal(got.view(torch.int32), want.view(torch.int32)):
                    return (f"differs from the torch operations ({index.dtype} indices, batch {batch}, "
                            f"{'a' if b is not None else 'no'} bias); built with FMA contraction?")
    return ""


_LIBRARY = NativeLibrary(module="granet.deploy._condensed_kernels",
                         source=os.path.join(os.path.dirname(os.path.abspath(__file__)), "_condensed.c"),
                         prefix="granet_condensed", levels=_LEVELS, declare=_declare, self_test=_self_test)

_library_or_none = _LIBRARY.library  # the checked library, or None: the torch operations run
_load = _LIBRARY.load


def set_enabled(flag: bool) -> bool:
    """Use the native condensed kernels (where built) or the torch operations; returns the previous
    setting. The default comes from ``GRANET_NATIVE``. Results do not depend on it."""
    return _LIBRARY.set_enabled(flag)


def available() -> bool:
    """Whether the native condensed kernels are in use (built, loaded, checked, not turned off)."""
    return _LIBRARY.available()


def status() -> str:
    """``"in use (avx512)"`` (or ``avx2``, ``portable``), ``"off (GRANET_NATIVE=0)"``,
    ``"off (set_enabled(False))"``, ``"not built (...)"``, ``"stale (...)"`` or ``"unusable (...)"``."""
    return _LIBRARY.status()


def _open(path: str, source: Optional[str], level: int = -1) -> tuple[Optional[ctypes.CDLL], str]:
    """The library at ``path`` loaded, checked (built from ``source`` where given; the bits of the
    torch operations on a small case) and set to ``level`` (-1: the widest this CPU runs)."""
    return _LIBRARY.open(path, source, level)


# ---------------------------------------------------------------------------- layouts

def index_dtype(in_features: int) -> torch.dtype:
    """The index dtype for rows of ``in_features`` inputs: int16 up to 2**15, else int32."""
    return torch.int16 if in_features <= 2**15 else torch.int32


def constant_fan_in(mask: torch.Tensor) -> Optional[int]:
    """The number of active entries every row of the 2-D ``mask`` holds, or ``None`` when rows differ.

    ``mask`` may be boolean or any tensor (non-zero entries are active). A matrix without rows has
    fan-in 0.
    """
    if mask.dim() != 2:
        raise ValueError(f"constant_fan_in needs a 2-D mask, got shape {tuple(mask.shape)}")
    counts = (mask != 0).sum(dim=1)
    if counts.numel() == 0:
        return 0
    first = int(counts[0])
    return first if bool((counts == first).all()) else None


def _fan_in_problem(mask: torch.Tensor) -> str:
    """Why ``mask`` (2-D, active = non-zero) has no constant fan-in: its first row that differs from row 0."""
    counts = (mask != 0).sum(dim=1)
    row = int((counts != counts[0]).nonzero()[0, 0])
    return (f"row {row} has {int(counts[row])} active inputs, row 0 has {int(counts[0])}; "
            f"{int((counts != counts[0]).sum())} of {counts.numel()} rows differ from row 0")


def condense(weight: torch.Tensor, mask: Optional[torch.Tensor] = None,
             name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, index)`` of a constant fan-in ``weight`` (out x in): both ``out x k``, row-major.

    Row ``o`` holds its active inputs in ascending order (``index``, int64) and their weights
    (``values``, the weight's dtype). The active entries are ``mask`` (a bool tensor) where given,
    else the non-zero weights (a weight that is active but exactly zero needs the mask).

    Raises:
        ValueError: not 2-D, a mask of another shape, or rows with different numbers of active
            entries; one line naming ``name``.
    """
    if weight.dim() != 2:
        raise ValueError(f"{short_repr(name)}: a condensed layer needs a 2-D weight, got shape {tuple(weight.shape)}")
    active = weight.detach() != 0 if mask is None else mask.detach()
    if active.shape != weight.shape or active.dtype != torch.bool:
        raise ValueError(f"{short_repr(name)}: the mask must be a torch.bool tensor of shape {tuple(weight.shape)}, "
                         f"got {active.dtype} {tuple(active.shape)}")
    k = constant_fan_in(active)
    if k is None:
        raise ValueError(f"{short_repr(name)} has no constant fan-in ({_fan_in_problem(active)}): "
                         f"the condensed kernel needs the same number of active inputs in every row")
    out_features = weight.shape[0]
    index = active.nonzero()[:, 1].reshape(out_features, k)  # row-major: ascending within each row
    values = weight.detach().gather(1, index)
    return values, index


def _blocked(values: torch.Tensor, index: torch.Tensor,
             in_features: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(blocks, k, 16)`` layout of ``out x k`` values and indices (module docstring)."""
    out_features, k = values.shape
    blocks = -(-out_features // LANES)
    pad = blocks * LANES - out_features
    if in_features is None:
        in_features = int(index.max()) + 1 if index.numel() else 1
    dtype = index_dtype(in_features)
    v = torch.cat([values, values.new_zeros(pad, k)]) if pad else values
    i = torch.cat([index, index.new_zeros(pad, k)]) if pad else index
    return (v.reshape(blocks, LANES, k).transpose(1, 2).contiguous(),
            i.reshape(blocks, LANES, k).transpose(1, 2).to(dtype).contiguous())


def _unblocked(values: torch.Tensor, index: torch.Tensor, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_blocked`: ``out x k`` values and int64 indices."""
    blocks, k, _ = values.shape
    return (values.transpose(1, 2).reshape(blocks * LANES, k)[:out_features],
            index.transpose(1, 2).reshape(blocks * LANES, k)[:out_features].long())


# ---------------------------------------------------------------------------- the product

#: Products of at least this many (active weights x input rows) split their row blocks among torch's
#: intra-op threads; smaller ones run on one thread. Measured on 2 shared cores with 2 torch
#: threads: handing half of the rows to a second thread costs tens of microseconds (one row of
#: 768x3072 at density 0.1, 236k: 0.24 ms split, 0.16 ms not), and it pays off on larger products
#: (one row of 4096x4096 at density 0.1, 1.7M: 0.48 ms split, 0.75 ms not; 32 rows of 768x3072 at
#: density 0.05, 0.93M: 0.52 ms split, 0.65 ms not). On a loaded machine a split call waits for the
#: slower thread, as CSR's one-row product does (``SparseLinear.vector_threads``).
MIN_PARALLEL_WORK = 1 << 20

_pool: Optional[ThreadPoolExecutor] = None
_pool_lock = threading.Lock()
_pool_key = (0, 0)  # (process id, workers): a forked child or a larger thread count builds a new pool


def _workers(count: int) -> ThreadPoolExecutor:
    """A pool of at least ``count`` threads for the parts of a product after the first."""
    global _pool, _pool_key
    with _pool_lock:
        if _pool is None or _pool_key[0] != os.getpid() or _pool_key[1] < count:
            _pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="granet-condensed")
            _pool_key = (os.getpid(), count)
        return _pool


def _static(values: torch.Tensor, index: torch.Tensor, bias: Optional[torch.Tensor],
            out_features: int) -> tuple[int, int, int, Optional[int], int, int]:
    """What every call passes the kernels about a weight, after checking that the kernels may read it:
    (values, index, index width, bias or None, blocks, k).

    Raises:
        ValueError: tensors the kernels cannot read (dtype, device, layout or shape), in one line.
    """
    ok = (values.dtype is torch.float32 and values.is_cpu and values.is_contiguous() and values.dim() == 3
          and values.shape[2] == LANES and values.shape[0] * LANES >= out_features > (values.shape[0] - 1) * LANES
          and index.dtype in (torch.int16, torch.int32) and index.is_cpu and index.is_contiguous()
          and index.shape == values.shape)
    ok = ok and (bias is None or (bias.dtype is torch.float32 and bias.is_cpu and bias.is_contiguous()
                                  and tuple(bias.shape) == (out_features,)))
    if not ok:
        raise ValueError(f"condensed weights must be contiguous CPU tensors: float32 values and int16/int32 "
                         f"indices of shape (blocks, k, 16) for {out_features} rows and a float32 bias; got "
                         f"{values.dtype} {tuple(values.shape)}, {index.dtype} {tuple(index.shape)}, "
                         f"{None if bias is None else (bias.dtype, tuple(bias.shape))}")
    return (values.data_ptr(), index.data_ptr(), index.element_size(),
            None if bias is None else bias.data_ptr(), int(values.shape[0]), int(values.shape[1]))


def _call(lib: ctypes.CDLL, static: tuple[int, int, int, Optional[int], int, int], x: torch.Tensor,
          out_features: int, threads: Optional[int] = None) -> torch.Tensor:
    """``x W^T (+ bias)`` by the C kernels, shaped ``(*x.shape[:-1], out_features)``; ``static`` from
    :func:`_static` (whose tensors must still be alive), ``x`` a contiguous float32 CPU tensor.

    ``threads``: split the row blocks among this many threads (ctypes releases the GIL); ``None``: as
    :data:`MIN_PARALLEL_WORK` says. Every row is computed the same way whatever the split, so the
    bits do not depend on it."""
    # Every line here runs once per call, after the other layers have evicted the caches (where a
    # torch call costs ~10 us): keep it short.
    values, index, width, bias, blocks, k = static
    in_features = x.shape[-1]
    y = torch.empty(x.shape[:-1] + (out_features,))
    batch = x.numel() // in_features if in_features else y.numel() // max(1, out_features)
    if batch == 0 or out_features == 0:
        return y
    if batch <= GATHER_MAX_BATCH:
        kernel, source = lib.granet_condensed_gather_f32, x
        head: tuple[Any, ...] = (values, index, width, x.data_ptr(), in_features)
    else:
        kernel, source = lib.granet_condensed_broadcast_f32, x.reshape(batch, in_features).t().contiguous()
        head = (values, index, width, source.data_ptr())
    tail = (bias, y.data_ptr(), out_features, blocks, k, batch)
    if threads is None:
        threads = torch.get_num_threads() if blocks * LANES * k * batch >= MIN_PARALLEL_WORK else 1
    if threads <= 1 or blocks < 2:
        code = kernel(*head, *tail, 0, blocks)
    else:
        parts = min(threads, blocks)
        bounds = [blocks * i // parts for i in range(parts + 1)]
        pool = _workers(parts - 1)
        pending = [pool.submit(kernel, *head, *tail, bounds[i], bounds[i + 1]) for i in range(1, parts)]
        codes = [kernel(*head, *tail, bounds[0], bounds[1])] + [p.result() for p in pending]
        code = max(codes, key=abs)
    del source  # alive until every part has read it
    if code:
        raise ValueError(f"condensed kernels: error {code} (index width {width} bytes)")
    return y


def _native(lib: ctypes.CDLL, values: torch.Tensor, index: torch.Tensor, x: torch.Tensor, out_features: int,
            bias: Optional[torch.Tensor] = None, threads: Optional[int] = None) -> torch.Tensor:
    """:func:`_call` on tensors (checked here)."""
    if x.dtype is not torch.float32 or not x.is_cpu or x.dim() == 0:
        raise ValueError(f"condensed kernels need float32 CPU input, got {x.dtype} on {x.device}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= x.shape[-1]):
        raise ValueError(f"condensed kernels: indices outside [0, {x.shape[-1]})")
    return _call(lib, _static(values, index, bias, out_features), x.contiguous(), out_features, threads)


#: Elements of the product tensor the torch operations build per step (bounds their memory).
_REFERENCE_CHUNK = 1 << 22


def _reference(values: torch.Tensor, index: torch.Tensor, x: torch.Tensor, out_features: int,
               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x W^T (+ bias)`` in torch operations with the kernels' additions: per output and input row,
    the products (each rounded to float32) summed in the order of ``j`` from +0.0, then the bias."""
    blocks, k, _ = values.shape
    lead, in_features = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, in_features)
    batch = x.shape[0]
    acc = x.new_zeros(batch, blocks, LANES)
    step = max(1, _REFERENCE_CHUNK // max(1, batch * blocks * LANES))
    for j0 in range(0, k, step):
        j1 = min(k, j0 + step)
        picked = index[:, j0:j1].reshape(-1).to(torch.int32)
        gathered = x.index_select(1, picked).view(batch, blocks, j1 - j0, LANES)
        products = values[:, j0:j1] * gathered  # (batch, blocks, j1 - j0, 16), each rounded once
        for t in range(j1 - j0):
            acc.add_(products[:, :, t])
    y = acc.view(batch, blocks * LANES)[:, :out_features]
    return (y if bias is None else y + bias).reshape(*lead, out_features)


def condensed_linear(values: torch.Tensor, index: torch.Tensor, x: torch.Tensor, out_features: int,
                     bias: Optional[torch.Tensor] = None, native: Optional[bool] = None) -> torch.Tensor:
    """``x W^T + bias`` for a weight in the blocked layout (module docstring), as CondensedLinear runs it.

    Args:
        values, index: ``(blocks, k, 16)`` float32 weights and int16/int32 inputs, as CondensedLinear
            holds them (``index`` within ``[0, in_features)``: not checked here).
        x: the input, ``(..., in_features)`` float32 on the CPU.
        out_features: the weight's rows (the blocks' rows past it are padding).
        bias: ``(out_features,)`` float32, or ``None``.
        native: ``True`` the C kernels (which must be :func:`available`), ``False`` the torch
            operations, ``None`` the C kernels where available. The bits are the same.

    Returns:
        ``(..., out_features)`` float32.
    """
    lib = _library_or_none() if native is None or native else None
    if native and lib is None:
        raise RuntimeError(f"the native condensed kernels are {status()}")
    if lib is None:
        return _reference(values, index, x, out_features, bias)
    return _native(lib, values.contiguous(), index.contiguous(), x, out_features,
                   None if bias is None else bias.contiguous())


# ---------------------------------------------------------------------------- the module

class CondensedLinear(nn.Module):
    """``y = x W^T + b`` for a weight with constant fan-in, stored condensed (module docstring).

    Built from a float32 CPU weight whose rows all hold the same number ``k`` of active entries (the
    non-zero weights, or ``mask``); any other weight is refused in one line naming ``name``.
    """

    values: torch.Tensor  # (blocks, k, 16) float32
    index: torch.Tensor  # (blocks, k, 16) int16 or int32
    bias: Optional[torch.Tensor]

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                 name: str = "weight") -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"{short_repr(name)}: CondensedLinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise ValueError(f"{short_repr(name)}: CondensedLinear runs float32 weights on the CPU, got "
                             f"{weight.dtype} on {weight.device}")
        if weight.shape[1] >= 2**31:
            raise ValueError(f"{short_repr(name)}: {weight.shape[1]} inputs are too many for int32 indices")
        if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (weight.shape[0],)):
            raise ValueError(f"{short_repr(name)}: the bias must be float32 of shape ({weight.shape[0]},), got "
                             f"{bias.dtype} {tuple(bias.shape)}")
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        values, index = condense(weight, mask, name)
        self.fan_in = int(values.shape[1])
        blocked_values, blocked_index = _blocked(values, index, self.in_features)
        self.register_buffer("values", blocked_values)
        self.register_buffer("index", blocked_index)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._refresh()

    def _refresh(self) -> tuple[int, int, int, Optional[int], int, int]:
        """Check the buffers the kernels read and keep what every call passes them (their addresses
        included: ``.to()``, ``load_state_dict`` and assigning a buffer call this again)."""
        self.__dict__.pop("_kernel_args", None)  # never a stale address, even when the check fails
        args = _static(self.values, self.index, self.bias, self.out_features)
        index = self.index
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= max(1, self.in_features)):
            raise ValueError(f"CondensedLinear: indices outside [0, {self.in_features})")
        self.__dict__["_kernel_args"] = args
        return args

    def __getstate__(self) -> dict[str, Any]:
        # a copy (copy.deepcopy, pickle) has buffers of its own: it finds their addresses on first use
        state = self.__dict__.copy()
        state.pop("_kernel_args", None)
        return state

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in ("values", "index", "bias") and "fan_in" in self.__dict__:
            self._refresh()

    @classmethod
    def from_dense(cls, layer: nn.Linear, mask: Optional[torch.Tensor] = None,
                   name: str = "weight") -> "CondensedLinear":
        """The condensed equivalent of ``layer`` (weights copied)."""
        return cls(layer.weight, layer.bias, mask=mask, name=name)

    def _apply(self, fn: Any, recurse: bool = True) -> "CondensedLinear":
        # .to() / .half() / .cuda() apply fn to every buffer: the kernels read float32 CPU memory, so
        # refuse what would change that (before any buffer changes) instead of computing garbage.
        probe = fn(self.values[:0, :0])
        if probe.dtype is not torch.float32 or not probe.is_cpu:
            raise ValueError(f"CondensedLinear runs float32 weights on the CPU; it cannot become {probe.dtype} on "
                             f"{probe.device} (convert the dense model instead)")
        result = super()._apply(fn, recurse)
        self._refresh()
        return result

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        # The kernels read x at every stored index: refuse indices outside [0, in_features) before
        # they are copied in (torch checks the shapes).
        index = state_dict.get(prefix + "index")
        if isinstance(index, torch.Tensor) and index.numel() and (
                int(index.min()) < 0 or int(index.max()) >= max(1, self.in_features)):
            raise ValueError(f"{prefix}index holds inputs outside [0, {self.in_features}): not a state of this layer")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh()

    def condensed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, index)``, both ``out x k`` (index int64, ascending in each row)."""
        return _unblocked(self.values, self.index, self.out_features)

    def to_dense(self) -> torch.Tensor:
        """The ``out x in`` weight (zeros outside the active entries)."""
        values, index = self.condensed()
        return values.new_zeros(self.out_features, self.in_features).scatter_(1, index, values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to ``x`` of shape ``(..., in_features)``, float32 on the CPU."""
        if x.dtype is not torch.float32 or not x.is_cpu or x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"CondensedLinear needs float32 CPU input of shape (..., {self.in_features}), got "
                             f"{x.dtype} {tuple(x.shape)} on {x.device}")
        args = self.__dict__.get("_kernel_args") or self._refresh()  # the buffers, checked once
        lib = _library_or_none()
        if lib is None:
            return _reference(self.values, self.index, x, self.out_features, self.bias)
        return _call(lib, args, x if x.is_contiguous() else x.contiguous(), self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fan_in={self.fan_in}, index={str(self.index.dtype).removeprefix('torch.')}")
