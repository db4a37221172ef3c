"""Run sparse models with real sparse kernels on the CPU.

:func:`to_sparse_inference` swaps sparse ``nn.Linear`` layers (and 1x1 ``nn.Conv2d`` layers, which
are a Linear over channels) for modules that store the weight as a ``torch.sparse_csr`` tensor and
compute ``W @ x^T`` with ``torch.sparse.mm`` (MKL's sparse BLAS on x86 builds; ``torch.mv`` for a
single input row, about 3x faster there than ``sparse.mm``). CSR is the kernel:
on unstructured masks BSR is slower (a 4x4-block BSR of a 5%-dense random mask stores ~56% of the
blocks, and MKL refuses non-square blocks), and ``dense @ sparse`` and ``F.linear`` with a CSR
weight take slow generic paths; see ``benchmarks/bench_inference.py``.

Which layers become sparse (:func:`plan_sparse_inference`), in order:

1. the layer is an ``nn.Linear`` or a 1x1 ``nn.Conv2d`` (no padding, groups 1), with a float32 or
   float64 weight on the CPU; anything else stays as it is;
2. its density (fraction of non-zero weights) is at most ``max_density``;
3. with ``calibrate=True`` (default), dense and sparse forward passes of the layer are timed on its
   real input (captured from one forward pass of ``example_input``) or, without one, on random input
   of ``batch_size`` rows (1x1 convs: ``batch_size x C x 7 x 7``); the fastest of ``repeats``
   interleaved runs of each (other processes only ever add time to a call, so the fastest call is
   the estimate a loaded machine disturbs least; medians moved with the load), and as many again when
   the ratio lands within 25% of the threshold. The layer becomes sparse only if dense time / sparse
   time >= ``min_speedup``. A Linear
   layer that sees one row is timed with torch's thread setting and with one thread for its
   matrix-vector product (``vector_threads="auto"``, see :class:`SparseLinear`); the faster is kept.

A float32 Linear layer whose weight has constant fan-in (every row the same number k of non-zero
weights, as ``structure="fan-in"`` trains them) has a second sparse kernel,
:class:`~granet.deploy.condensed.CondensedLinear` (``values`` and ``index``, out x k, native code;
see :mod:`granet.deploy.condensed`). With ``condensed=True`` (default) calibration times it beside
CSR and keeps the faster of the two; the layer becomes sparse by the rule above, with the faster
kernel, and ``LayerDecision.kernel`` says which. Without calibration such a layer runs condensed
where the native kernels are built (for one input row on one thread measured 1.1-1.7x faster than
CSR on the benchmark's shapes; at 32 rows 0.7-1.2x), else CSR. Rows whose counts of non-zero
weights differ (an active weight that is exactly zero included) run CSR.

The kernels sum in a different order than dense BLAS, so outputs match the dense model within
float rounding (not bit for bit). The modules are for inference: no gradients flow to the weights.

:func:`to_semi_structured` is the GPU path: 2:4 semi-structured sparsity
(``torch.sparse.to_sparse_semi_structured``) for Linear layers whose masks satisfy an N:M = 2:4
constraint; it needs CUDA and fp16/bf16 weights.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import time
import warnings
from typing import Any, Callable, Optional, Union, cast

import torch
from torch import nn

from ..errors import short_repr, short_text
from . import condensed as _condensed
from .condensed import CondensedLinear, constant_fan_in

logger = logging.getLogger(__name__)

_SPARSE_DTYPES = (torch.float32, torch.float64)
_KERNELS = ("csr", "condensed")


def _to_csr(weight: torch.Tensor) -> torch.Tensor:
    """CSR copy of a 2-D weight, with int32 indices when they fit.

    int32 indices cut the bytes read per active weight from 12 to 8 (float32 value + index); the
    matmul is memory-bound at batch 1, and MKL's LP64 interface takes int32 directly (measured
    ~1.4x faster than int64 indices at 4096x4096, density 0.05, batch 1).
    """
    with warnings.catch_warnings():  # "sparse CSR support is in beta": nothing the caller can act on
        warnings.simplefilter("ignore", UserWarning)
        csr = weight.detach().to_sparse_csr()
        if csr.values().numel() < 2**31 and weight.shape[1] < 2**31:
            csr = torch.sparse_csr_tensor(csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32),
                                          csr.values(), csr.shape)
    return csr


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored as CSR; computed as ``(W @ x^T)^T`` by ``torch.sparse.mm``.

    ``vector_threads``: intra-op threads for the one-row (matrix-vector) product; ``None`` leaves
    torch's setting alone. The product reads only ~8 bytes per active weight, gains nothing from a
    second thread on a 2-core machine, and with two threads every call waits for the slower one: on
    a loaded machine the median call was 5-8x slower than on one thread (measured). Setting it calls
    ``torch.set_num_threads`` around the product (process-wide; restored afterwards).
    """

    weight: torch.Tensor  # CSR buffer
    bias: Optional[torch.Tensor]

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 vector_threads: Optional[int] = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        if vector_threads is not None and vector_threads < 1:
            raise ValueError(f"vector_threads must be None or >= 1, got {vector_threads}")
        self.out_features, self.in_features = weight.shape
        self.vector_threads = vector_threads
        self.register_buffer("weight", _to_csr(weight))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_dense(cls, layer: nn.Linear, vector_threads: Optional[int] = None) -> "SparseLinear":
        """The sparse equivalent of ``layer`` (weights copied)."""
        return cls(layer.weight, layer.bias, vector_threads=vector_threads)

    def _mv(self, v: torch.Tensor) -> torch.Tensor:
        return torch.mv(self.weight, v) if self.bias is None else torch.addmv(self.bias, self.weight, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to ``x`` of shape ``(..., in_features)``."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 1:
            # One row: sparse matrix-vector product, ~3x faster than sparse.mm with a one-column
            # right-hand side (measured at 4096x4096 and 768x3072, density 0.05).
            threads = torch.get_num_threads()
            if self.vector_threads is None or self.vector_threads == threads:
                return self._mv(x2[0]).reshape(*lead, self.out_features)
            torch.set_num_threads(self.vector_threads)
            try:
                return self._mv(x2[0]).reshape(*lead, self.out_features)
            finally:
                torch.set_num_threads(threads)
        # CSR (out, in) @ dense (in, M): MKL's sparse-times-dense; the transpose is a free view.
        y = torch.sparse.mm(self.weight, x2.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        nnz = self.weight._nnz()
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"density={nnz / max(1, self.in_features * self.out_features):.4f}, "
                f"vector_threads={self.vector_threads}")


class SparseConv1x1(nn.Module):
    """A 1x1 ``Conv2d`` (no padding, groups 1) as a CSR matmul over channels."""

    weight: torch.Tensor  # CSR buffer (out_channels, in_channels)
    bias: Optional[torch.Tensor]

    def __init__(self, layer: nn.Conv2d) -> None:
        super().__init__()
        if not _is_conv1x1(layer):
            raise ValueError(f"SparseConv1x1 needs a 1x1 Conv2d without padding and groups, got {layer}")
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.stride = tuple(layer.stride)
        self.register_buffer("weight", _to_csr(layer.weight.reshape(layer.out_channels, layer.in_channels)))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the convolution to ``x`` of shape ``(N, C, H, W)``."""
        if self.stride != (1, 1):
            x = x[:, :, :: self.stride[0], :: self.stride[1]]  # a strided 1x1 conv samples the grid
        n, c, h, w = x.shape
        cols = x.transpose(0, 1).reshape(c, n * h * w)
        y = torch.sparse.mm(self.weight, cols)  # (out, N*H*W)
        if self.bias is not None:
            y = y + self.bias.unsqueeze(1)
        return y.view(self.out_channels, n, h, w).transpose(0, 1)

    def extra_repr(self) -> str:
        nnz = self.weight._nnz()
        return (f"{self.in_channels}, {self.out_channels}, stride={self.stride}, "
                f"density={nnz / max(1, self.in_channels * self.out_channels):.4f}")


def _is_conv1x1(layer: nn.Module) -> bool:
    if not isinstance(layer, nn.Conv2d):
        return False
    # "valid" and "same" both mean no padding for a 1x1 kernel; dilation does nothing to it.
    no_padding = isinstance(layer.padding, str) or tuple(layer.padding) == (0, 0)
    return tuple(layer.kernel_size) == (1, 1) and layer.groups == 1 and no_padding


@dataclasses.dataclass
class LayerDecision:
    """Why one layer is (or is not) run sparse."""

    name: str
    kind: str  # "linear" or "conv1x1"
    shape: tuple[int, ...]
    density: float
    sparse: bool
    reason: str
    dense_ms: Optional[float] = None
    sparse_ms: Optional[float] = None
    vector_threads: Optional[int] = None  # SparseLinear's one-row thread count (None: torch's setting)
    fan_in: Optional[int] = None  # k of a float32 Linear weight whose rows all hold k non-zeros, else None
    kernel: str = "csr"  # the sparse module: "csr" (SparseLinear / SparseConv1x1) or "condensed" (CondensedLinear)
    csr_ms: Optional[float] = None  # where the condensed kernel was timed too: the fastest CSR time
    condensed_ms: Optional[float] = None  # and the condensed time

    @property
    def speedup(self) -> Optional[float]:
        """Measured dense time / sparse time (None when not calibrated)."""
        if self.dense_ms is None or self.sparse_ms is None or self.sparse_ms <= 0:
            return None
        return self.dense_ms / self.sparse_ms


#: The clock of the calibration (a test replaces it with one that stalls at random).
_clock = time.perf_counter


def _times_after_dense(dense: Callable[[], object], variants: list[Callable[[], object]],
                       repeats: int) -> tuple[float, list[float]]:
    """Fastest milliseconds of ``dense`` and of each variant, run in turn (dense, variant 1, dense,
    variant 2, ...) so that load changes hit all alike and every variant starts after a dense call
    (no variant finds the sparse weight left in cache by another)."""
    fns: list[Callable[[], object]] = []
    for v in variants:
        fns += [dense, v]
    for fn in fns:
        fn()  # warm-up: first calls allocate and pick kernels
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = _clock()
            fn()
            ts.append((_clock() - t0) * 1e3)
    return min(t for ts in times[0::2] for t in ts), [min(ts) for ts in times[1::2]]


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) or _is_conv1x1(m)}


def _capture_inputs(model: nn.Module, names: list[str], example_input: torch.Tensor) -> dict[str, torch.Tensor]:
    """The first input each named layer sees in one forward pass of ``example_input``."""
    captured: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_pre_hook(
        lambda mod, args, n=n: captured.setdefault(n, args[0].detach())) for n in names]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
    return captured


def _weight(layer: nn.Module) -> torch.Tensor:
    """The weight of a candidate layer (a Linear or 1x1 Conv2d)."""
    return cast(torch.Tensor, layer.weight)


def _sparse_module(layer: nn.Module, vector_threads: Optional[int] = None, kernel: str = "csr",
                   name: str = "weight") -> nn.Module:
    if kernel == "condensed":
        return CondensedLinear.from_dense(cast(nn.Linear, layer), name=name)
    if isinstance(layer, nn.Linear):
        return SparseLinear.from_dense(layer, vector_threads=vector_threads)
    return SparseConv1x1(cast(nn.Conv2d, layer))


def _calibration_input(layer: nn.Module, batch_size: int) -> torch.Tensor:
    w = _weight(layer)
    if isinstance(layer, nn.Linear):
        return torch.randn(batch_size, layer.in_features, dtype=w.dtype, device=w.device)
    return torch.randn(batch_size, cast(nn.Conv2d, layer).in_channels, 7, 7, dtype=w.dtype, device=w.device)


def _decide(name: str, layer: nn.Module, max_density: float) -> LayerDecision:
    """Steps 1 and 2 of the rule (module docstring): eligibility and the density threshold."""
    w = _weight(layer)
    kind = "linear" if isinstance(layer, nn.Linear) else "conv1x1"
    density = float((w != 0).sum()) / max(1, w.numel())
    d = LayerDecision(name, kind, tuple(w.shape), density, sparse=False, reason="")
    if w.dtype not in _SPARSE_DTYPES:
        d.reason = f"dtype {w.dtype} (the CPU sparse kernel runs float32/float64)"
    elif w.device.type != "cpu":
        d.reason = f"on {w.device} (the CSR path is for the CPU; see to_semi_structured for CUDA)"
    elif density > max_density:
        d.reason = f"density {density:.4f} > max_density {max_density}"
    else:
        d.sparse, d.reason = True, f"density {density:.4f} <= max_density {max_density}"
    if kind == "linear" and w.dtype == torch.float32 and w.device.type == "cpu":
        d.fan_in = constant_fan_in(w.detach())  # a fan-in layer can also run condensed
    return d


def _calibrate(layer: nn.Module, x: torch.Tensor, vector_threads: Union[int, str, None], repeats: int,
               min_speedup: float, condensed: bool = False,
               name: str = "weight") -> tuple[float, float, Optional[int], str, Optional[float], Optional[float]]:
    """(dense ms, best sparse ms, its vector_threads, its kernel, and where ``condensed`` asks to time
    CondensedLinear as well: the best CSR ms and the condensed ms) of ``layer`` on input ``x``."""
    linear = isinstance(layer, nn.Linear)
    one_row = linear and x.numel() == layer.in_features
    options: list[Optional[int]]
    if isinstance(vector_threads, str):  # "auto" (checked by the caller): try torch's setting and
        # one thread for the one-row product (see SparseLinear)
        options = [None, 1] if one_row and torch.get_num_threads() > 1 else [None]
    else:
        options = [vector_threads if linear else None]
    variants: list[tuple[Optional[int], str]] = [(t, "csr") for t in options]
    if condensed:
        variants.append((None, "condensed"))
    modules = [_sparse_module(layer, t, kernel, name) for t, kernel in variants]
    calls: list[Callable[[], object]] = [functools.partial(m, x) for m in modules]
    dense_ms, sparse_ms = _times_after_dense(lambda: layer(x), calls, repeats)
    if sparse_ms and 0.8 * min_speedup <= dense_ms / max(min(sparse_ms), 1e-9) <= 1.25 * min_speedup:
        more_dense, more_sparse = _times_after_dense(lambda: layer(x), calls, repeats)  # close call: look again
        dense_ms, sparse_ms = min(dense_ms, more_dense), [min(a, b) for a, b in zip(sparse_ms, more_sparse)]
    best = min(range(len(variants)), key=lambda i: sparse_ms[i])
    csr_ms, condensed_ms = (min(sparse_ms[:-1]), sparse_ms[-1]) if condensed else (None, None)
    return dense_ms, sparse_ms[best], variants[best][0], variants[best][1], csr_ms, condensed_ms


@torch.no_grad()
def plan_sparse_inference(model: nn.Module, max_density: float = 0.3, min_speedup: float = 1.1,
                          calibrate: bool = True, example_input: Optional[torch.Tensor] = None,
                          batch_size: int = 1, repeats: int = 7,
                          vector_threads: Union[int, str, None] = "auto",
                          condensed: bool = True) -> list[LayerDecision]:
    """Decide, layer by layer, which Linear / 1x1-conv layers run faster sparse (rule: module docstring).

    Args:
        model: any module; only its Linear and 1x1 Conv2d layers are considered.
        max_density: layers denser than this stay dense without timing.
        min_speedup: with calibration, the measured dense/sparse time ratio a layer needs.
        calibrate: time each remaining candidate; without it, the density threshold decides alone.
        example_input: one model input; calibration then times each layer on the input it really sees.
        batch_size: rows of the random calibration input when ``example_input`` is not given.
        repeats: interleaved timing repeats per layer (the fastest calls are compared; as many again
            when the ratio is within 25% of ``min_speedup``).
        vector_threads: threads for one-row products of SparseLinear (see there): an int, ``None``
            (torch's setting) or ``"auto"``: calibration tries torch's setting and 1 and keeps the
            faster (without calibration, ``"auto"`` means ``None``).
        condensed: consider the condensed kernel for float32 Linear layers with constant fan-in
            (module docstring): calibration times it beside CSR and keeps the faster; without
            calibration it is used where the native condensed kernels are built.
    """
    is_count = isinstance(vector_threads, int) and not isinstance(vector_threads, bool) and vector_threads >= 1
    if not (is_count or vector_threads is None or vector_threads == "auto"):
        raise ValueError(f"vector_threads must be 'auto', None or an int >= 1, got {vector_threads!r}")
    if not 0 < max_density <= 1:
        raise ValueError(f"max_density must be in (0, 1], got {max_density}")
    if min_speedup < 0 or batch_size < 1 or repeats < 1:
        raise ValueError(f"need min_speedup >= 0, batch_size >= 1, repeats >= 1; got {min_speedup}, "
                         f"{batch_size}, {repeats}")
    if not isinstance(condensed, bool):
        raise ValueError(f"condensed must be True or False, got {short_repr(condensed)}")
    layers = _candidates(model)
    plan = [_decide(name, layer, max_density) for name, layer in layers.items()]
    if not calibrate:
        native = condensed and any(d.sparse and d.fan_in is not None for d in plan) and _condensed.available()
        for d in plan:
            if d.kind == "linear" and not isinstance(vector_threads, str):  # "auto" means torch's setting
                d.vector_threads = vector_threads
            if native and d.sparse and d.fan_in is not None:
                d.kernel, d.vector_threads = "condensed", None
                d.reason += f"; condensed, fan-in {d.fan_in} (native kernels {_condensed.status()})"
        return plan
    todo = [d for d in plan if d.sparse]
    inputs = _capture_inputs(model, [d.name for d in todo], example_input) if example_input is not None else {}
    for d in todo:
        layer = layers[d.name]
        x = inputs.get(d.name)
        if x is None:  # no example input, or the layer did not run in the example forward pass
            x = _calibration_input(layer, batch_size)
        timed_condensed = condensed and d.fan_in is not None
        d.dense_ms, d.sparse_ms, d.vector_threads, d.kernel, d.csr_ms, d.condensed_ms = _calibrate(
            layer, x, vector_threads, repeats, min_speedup, timed_condensed, d.name)
        d.sparse = d.speedup is not None and d.speedup >= min_speedup
        d.reason = (f"measured speed-up {d.speedup:.2f}x {'>=' if d.sparse else '<'} min_speedup {min_speedup}"
                    if d.speedup is not None else "sparse time not measurable")
        if d.condensed_ms is not None:
            d.reason += (f" ({d.kernel} kernel; fan-in {d.fan_in}: condensed {d.condensed_ms:.3f} ms, "
                         f"CSR {d.csr_ms:.3f} ms)")
    return plan


def to_sparse_inference(model: nn.Module, plan: Optional[list[LayerDecision]] = None, inplace: bool = False,
                        **options: Any) -> nn.Module:
    """A copy of ``model`` (or ``model`` itself with ``inplace=True``) whose sparse layers run sparse kernels.

    Each layer the plan makes sparse becomes a :class:`SparseLinear` / :class:`SparseConv1x1` (CSR) or,
    where the plan's ``kernel`` is ``"condensed"``, a :class:`~granet.deploy.condensed.CondensedLinear`.
    ``options`` are those of :func:`plan_sparse_inference` (``max_density``, ``min_speedup``,
    ``calibrate``, ``example_input``, ``batch_size``, ``repeats``, ``vector_threads``, ``condensed``); or pass a
    ``plan`` it made. The decisions are logged at INFO level. Put the result in ``eval()`` mode and
    call it under ``torch.inference_mode()``: the sparse modules hold their weights as buffers,
    without gradients.

    Every sparse module is built before the first layer is replaced, so with ``inplace=True`` a
    refused plan leaves ``model`` as it was (never half converted).

    Raises:
        ValueError: bad options, both ``plan`` and options, a plan naming a layer the model lacks, or
            a plan's kernel that does not fit its layer (``"condensed"`` for a layer without constant
            fan-in, not float32, or not a Linear layer); one line naming the layer.
    """
    if plan is not None and options:
        raise ValueError(f"pass a plan or planning options, not both (got plan and {', '.join(sorted(options))})")
    if plan is None:
        plan = plan_sparse_inference(model, **options)
    modules = dict(model.named_modules())
    swaps = []
    for d in plan:
        if not d.sparse:
            continue
        if d.name not in modules or not (isinstance(modules[d.name], nn.Linear) or _is_conv1x1(modules[d.name])):
            raise ValueError(f"plan entry {short_repr(d.name)} names no Linear / 1x1 Conv2d layer of the model")
        if d.kernel not in _KERNELS or (d.kernel == "condensed" and not isinstance(modules[d.name], nn.Linear)):
            raise ValueError(f"plan entry {short_repr(d.name)}: kernel {short_repr(d.kernel)} is not one of "
                             f"{', '.join(_KERNELS)} for its {type(modules[d.name]).__name__} layer")
        # copies the weights; a layer without constant fan-in is refused here, naming it
        swaps.append((d.name, _sparse_module(modules[d.name], d.vector_threads, d.kernel, d.name)))
    for d in plan:
        logger.info("%s %s %s: %s (%s)", d.name, d.kind, d.shape,
                    (f"sparse, {d.kernel}" if d.kernel != "csr" else "sparse") if d.sparse else "dense", d.reason)
    target = model if inplace else copy.deepcopy(model)
    for name, new in swaps:
        _replace(target, name, new)
    return target


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _is_two_four(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive weights along the input dimension."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight != 0).view(weight.shape[0], -1, 4).sum(-1) <= 2).all())


def to_semi_structured(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Run Linear layers whose weights are 2:4 sparse with ``torch.sparse.to_sparse_semi_structured``.

    Needs a CUDA device of compute capability 8.0 or newer (the semi-structured kernels are
    GPU-only) and the model's weights on it, fp16/bf16; layers whose weights are not 2:4 stay dense.
    A mask the library trains with ``structure="2:4"`` is 2:4 in this sense (2 of every 4
    consecutive inputs of an output unit).

    Raises:
        RuntimeError: CUDA is not available, or its compute capability is below 8.0.
        ValueError: a 2:4 layer that is not on a CUDA device, or whose shape or dtype the
            semi-structured kernels do not support; one line naming it.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("2:4 semi-structured kernels need a CUDA device; none is available "
                           "(use to_sparse_inference for the CPU)")
    capability = tuple(torch.cuda.get_device_capability())
    if capability < (8, 0):
        raise RuntimeError(f"2:4 semi-structured kernels need a CUDA device of compute capability 8.0 or newer; "
                           f"this one has {capability[0]}.{capability[1]}")
    from torch.sparse import to_sparse_semi_structured

    target = model if inplace else copy.deepcopy(model)
    converted = []  # all layers first, then assigned: a refused layer leaves an in-place model as it was
    for name, layer in target.named_modules():
        if not isinstance(layer, nn.Linear) or not _is_two_four(layer.weight):
            continue
        if layer.weight.device.type != "cuda":
            raise ValueError(f"{name}: a 2:4 layer on {layer.weight.device}; move the model to the CUDA device "
                             f"first (model.half().cuda())")
        try:
            converted.append((name, layer, to_sparse_semi_structured(layer.weight.detach())))
        except Exception as exc:  # the kernels reject shapes/dtypes with various error types
            detail = short_text((str(exc).strip().splitlines() or [type(exc).__name__])[0], 160)
            raise ValueError(f"{name}: not convertible to 2:4 semi-structured ({detail})") from None
    for name, layer, weight in converted:
        layer.weight = nn.Parameter(weight, requires_grad=False)
        logger.info("%s %s: 2:4 semi-structured", name, tuple(layer.weight.shape))
    return target


__all__ = ["LayerDecision", "SparseConv1x1", "SparseLinear", "plan_sparse_inference", "to_semi_structured",
           "to_sparse_inference"]
