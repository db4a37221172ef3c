"""Sparse training of a masked Linear layer on the CPU: ``y = x W_maskedᵀ + b`` at O(nnz) cost.

A sparse-to-sparse method keeps most of a Linear weight at zero, yet the dense path multiplies the
whole matrix. :func:`sparse_linear` computes the same layer from the active entries only:

* **forward** ``yᵀ = W xᵀ``: a CSR copy of the active weights (int32 indices; values gathered from
  the dense weight at the active positions on every call, O(nnz)) times the dense input, by
  ``torch.addmm`` (MKL's sparse BLAS on x86 builds);
* **input gradient** ``dxᵀ = Wᵀ dyᵀ``: the same product with the transposed CSR;
* **weight gradient** at the active positions only, the sampled product
  ``G[o, i] = Σ_b dy[b, o] x[b, i]`` for each active ``(o, i)`` (``torch.sparse.sampled_addmm``),
  written into a dense tensor shaped like the weight, zero elsewhere; so the optimizer, DDP's
  all-reduce, checkpoints and a sparsifier see an ordinary dense parameter whose gradient at the
  active positions is that of the masked dense layer (up to the order of the float sums);
* ``dense_grad=True``: forward and input gradient as above, the weight gradient dense
  (``dyᵀ x``, one dense matrix product), for the steps whose regrowth ranks the inactive positions
  by their gradient (RigL, GraNet).

Only the active positions of ``weight`` are read: the result is that of ``x (weight * mask)ᵀ + b``
whatever the inactive entries hold. The layout (:class:`LinearLayout`) depends on the mask alone and
is rebuilt only when the mask changes. No double backward (a Hessian-vector product through the
layer, as GraSP scores take, raises: keep such layers dense while scoring).

Choices, measured with ``benchmarks/bench_sparse_training.py --section kernels`` (768x3072 and
3072x768 weights at density 0.05, 2048 rows, 1 and 2 threads, on a shared 2-core machine):

* the dense operand of each product is passed row-major (``xᵀ``, ``dyᵀ`` contiguous): MKL's product
  with a column-major operand took 1.07-1.38x the time, a transposing copy plus the row-major
  product 1.06-1.32x. The product gives ``yᵀ`` row-major, so the layer's output is stored
  features-major (``y.reshape(-1, out).t()`` is contiguous; merging or splitting the leading
  dimensions stays a view): no copy, and the next sparse layer, and the backward pass, find their
  operand in the order they need. ``contiguous_output=True`` returns a row-major output instead
  (one transposing copy), for code that views a Linear output in ways this layout does not allow;
* int32 indices: int64 ones took 1.00-1.15x the time and twice the index memory;
* the sampled product: ``torch.sparse.sampled_addmm`` (one vectorised dot product of length
  rows per active weight) was the fastest: the dense product followed by a gather took 1.34-1.75x
  its time, gathering the operand rows per active weight and summing
  (``(dyᵀ[rows] * xᵀ[cols]).sum(1)``, in chunks) 15-23x, ``torch.bmm`` over padded rows 23-35x;
  a hand-written AVX-512 C kernel (rows of the CSR, blocks of 256-2048 rows of the operands,
  4 active weights per pass) was not consistently faster than ``sampled_addmm`` or MKL, so there is
  no native code here;
* the weight gradient is scattered into a fresh zero tensor, which autograd hands to ``.grad``.

float32 only: other dtypes raise (a one-line ``ValueError``); under CPU autocast the layer runs in
float32 (lower-precision inputs are cast up) and returns float32. CUDA tensors raise: this is CPU
execution (on GPUs, dense or 2:4 semi-structured products are the fast path).
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch.autograd.function import once_differentiable

__all__ = ["LinearLayout", "sparse_linear", "sampled_product"]

#: Index dtype of the CSR arrays: int32 halves the index bytes read per active weight (MKL's LP64
#: interface takes it directly).
_INDEX = torch.int32
_INT32_LIMIT = 2**31 - 1


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": nothing the caller can act on
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape)


class LinearLayout:
    """The index arrays of a masked ``out x in`` Linear weight, for :func:`sparse_linear`.

    Built once per mask (:meth:`from_mask`, O(out x in)); the values are read from the dense
    weight on every call (O(nnz)). Holds:

    * ``crow``, ``col``: the CSR row pointers and column indices of the mask (row-major order);
    * ``pos``: the flat positions ``o * in + i`` of the active entries, in that order (where the
      values are gathered and the weight gradient scattered);
    * ``crow_t``, ``col_t``, ``pos_t``: the same for the transposed mask (``in x out``; ``pos_t``
      are positions in the weight, ordered column by column) for the input gradient.

    Indices are int32 when they fit (``nnz`` and both dimensions below 2**31), int64 otherwise.
    """

    __slots__ = ("shape", "nnz", "crow", "col", "pos", "crow_t", "col_t", "pos_t", "_zeros")

    def __init__(self, shape: tuple[int, int], crow: torch.Tensor, col: torch.Tensor, pos: torch.Tensor,
                 crow_t: torch.Tensor, col_t: torch.Tensor, pos_t: torch.Tensor) -> None:
        self.shape = shape
        self.nnz = int(pos.numel())
        self.crow, self.col, self.pos = crow, col, pos
        self.crow_t, self.col_t, self.pos_t = crow_t, col_t, pos_t
        self._zeros = torch.zeros(self.nnz)  # the sampled product's (ignored) input values

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "LinearLayout":
        """The layout of a 2-D boolean CPU ``mask`` (``out x in``, True = active).

        Raises:
            ValueError: ``mask`` is not a 2-D ``torch.bool`` tensor on the CPU.
        """
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
            got = (f"{mask.dtype} of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor)
                   else type(mask).__name__)
            raise ValueError(f"a Linear layout needs a 2-D torch.bool mask (out x in), got {got}")
        if mask.device.type != "cpu":
            raise ValueError(f"sparse execution runs on the CPU; the mask is on {mask.device}")
        out_f, in_f = (int(s) for s in mask.shape)
        flat = mask.reshape(-1)
        pos = flat.nonzero().squeeze(1)  # row-major: the CSR order
        nnz = int(pos.numel())
        index = _INDEX if max(nnz, out_f, in_f) <= _INT32_LIMIT else torch.int64
        crow = torch.zeros(out_f + 1, dtype=torch.int64)
        torch.cumsum(mask.sum(1), 0, out=crow[1:])
        col = (pos % in_f).to(index)
        flat_t = mask.t().contiguous().reshape(-1).nonzero().squeeze(1)  # i * out + o, column by column
        rows_t, cols_t = flat_t // out_f, flat_t % out_f  # (i, o) of the transposed mask
        pos_t = cols_t * in_f + rows_t
        crow_t = torch.zeros(in_f + 1, dtype=torch.int64)
        torch.cumsum(mask.sum(0), 0, out=crow_t[1:])
        return cls((out_f, in_f), crow.to(index), col, pos, crow_t.to(index), cols_t.to(index), pos_t)

    @property
    def density(self) -> float:
        """Fraction of the weight's entries that are active."""
        return self.nnz / max(1, self.shape[0] * self.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes held by the index arrays."""
        return sum(t.numel() * t.element_size() for t in
                   (self.crow, self.col, self.pos, self.crow_t, self.col_t, self.pos_t, self._zeros))

    def values(self, weight: torch.Tensor) -> torch.Tensor:
        """The active entries of ``weight`` in CSR order (a copy, O(nnz))."""
        return weight.detach().reshape(-1).index_select(0, self.pos)

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` at the active positions as an ``out x in`` CSR tensor (values copied)."""
        return _csr(self.crow, self.col, self.values(weight), self.shape)

    def transposed(self, weight: torch.Tensor) -> torch.Tensor:
        """``weightᵀ`` at the active positions as an ``in x out`` CSR tensor (values copied)."""
        values = weight.detach().reshape(-1).index_select(0, self.pos_t)
        return _csr(self.crow_t, self.col_t, values, (self.shape[1], self.shape[0]))

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """A dense ``out x in`` tensor holding ``values`` (CSR order) at the active positions, zero elsewhere."""
        dense = torch.zeros(self.shape[0] * self.shape[1], dtype=values.dtype)
        dense.index_copy_(0, self.pos, values)
        return dense.view(self.shape)

    def __repr__(self) -> str:
        return f"LinearLayout(shape={self.shape}, nnz={self.nnz}, density={self.density:.4f})"


def sampled_product(layout: LinearLayout, gyt: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """``(gyt @ xtᵀ)`` at the layout's active positions, in CSR order: for each active ``(o, i)``,
    ``Σ_b gyt[o, b] xt[i, b]`` (``gyt``: ``out x batch``, ``xt``: ``in x batch``, both row-major)."""
    pattern = _csr(layout.crow, layout.col, layout._zeros, layout.shape)
    return torch.sparse.sampled_addmm(pattern, gyt, xt.t(), beta=0.0).values()


def _product(csr: torch.Tensor, dense: torch.Tensor, bias: Optional[torch.Tensor] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``csr @ dense (+ bias[:, None])``, written into ``out`` (row-major) or new memory.

    ``addmm`` with ``beta=0`` ignores its input (NaN in it does not propagate) and so skips the
    zero fill that ``torch.sparse.mm`` makes of its result (one pass fewer over it).
    """
    if out is None:
        out = dense.new_empty(csr.shape[0], dense.shape[1])
    if bias is None:
        return torch.addmm(out, csr, dense, beta=0.0, out=out)
    return torch.addmm(bias.detach().unsqueeze(1), csr, dense, out=out)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _transposed_output(lead: tuple[int, ...], features: int) -> torch.Tensor:
    """An uninitialised ``(*lead, features)`` tensor stored features-major (its rows, the lead
    dimensions, contiguous among themselves): ``.view(-1, features).t()`` is row-major."""
    rows = 1
    strides = []
    for size in reversed(lead):
        strides.append(rows)
        rows *= size
    return torch.empty_strided((*lead, features), (*reversed(strides), rows))


class _SparseLinear(torch.autograd.Function):
    """The autograd function behind :func:`sparse_linear`.

    The output is a tensor made here (never a view of one: autograd refuses in-place changes,
    such as ``ReLU(inplace=True)``, to views made inside a custom function).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                layout: LinearLayout, dense_grad: bool, contiguous_output: bool) -> torch.Tensor:
        out_f, in_f = layout.shape
        lead = tuple(x.shape[:-1])
        xt = _row_major(x.reshape(-1, in_f).t())  # in x rows; free when x is itself features-major
        w = layout.matrix(weight)
        if contiguous_output:
            y = x.new_empty(*lead, out_f)
            y.view(-1, out_f).copy_(_product(w, xt, bias).t())
        else:
            y = _transposed_output(lead, out_f)
            _product(w, xt, bias, out=y.view(-1, out_f).t())
        ctx.save_for_backward(xt, weight)  # the weight's version is checked when backward reads it
        ctx.layout, ctx.dense_grad, ctx.has_bias, ctx.x_shape = layout, dense_grad, bias is not None, x.shape
        return y

    @staticmethod
    @once_differentiable  # no double backward (e.g. GraSP's Hessian-vector products)
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        xt, weight = ctx.saved_tensors
        layout: LinearLayout = ctx.layout
        gyt = _row_major(gy.reshape(-1, layout.shape[0]).t())  # out x rows; free for a features-major gy
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _product(layout.transposed(weight), gyt).t().reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            gw = gyt @ xt.t() if ctx.dense_grad else layout.scatter(sampled_product(layout, gyt, xt))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gyt.sum(1)
        return gx, gw, gb, None, None, None


def _describe(t: torch.Tensor) -> str:
    return f"{t.dtype} of shape {tuple(t.shape)} on {t.device}"


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, layout: LinearLayout, bias: Optional[torch.Tensor] = None,
                  dense_grad: bool = False, contiguous_output: bool = False) -> torch.Tensor:
    """``x (weight ⊙ mask)ᵀ + bias`` from the active entries only (see the module notes).

    Args:
        x: input of shape ``(..., in)`` (float32; any dtype under CPU autocast, cast to float32).
        weight: the dense ``out x in`` float32 weight; only its active positions are read, and its
            gradient is zero elsewhere (``dense_grad=False``).
        layout: :meth:`LinearLayout.from_mask` of the mask.
        bias: optional ``out`` float32 bias.
        dense_grad: compute the full dense weight gradient (forward and input gradient stay sparse).
        contiguous_output: return a row-major output (a copy) instead of the transposed view.

    Returns:
        ``(..., out)`` float32 output.

    Raises:
        ValueError: a CUDA (or other non-CPU) tensor, a dtype other than float32, or shapes that do
            not match the layout; the message names the tensor and what it is.
    """
    if not isinstance(layout, LinearLayout):
        raise ValueError(f"layout must be a LinearLayout (LinearLayout.from_mask(mask)), got {type(layout).__name__}")
    out_f, in_f = layout.shape
    autocast = torch.is_autocast_enabled("cpu")
    named = [("x", x), ("weight", weight)] + ([] if bias is None else [("bias", bias)])
    for what, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"sparse_linear: {what} must be a tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"sparse execution runs on the CPU; {what} is on {t.device} (keep this layer dense on "
                             "GPUs)")
        if t.dtype != torch.float32 and not (what == "x" and autocast and t.is_floating_point()):
            raise ValueError(f"sparse execution needs float32 tensors; {what} is {t.dtype} (keep this layer dense "
                             "for other dtypes)")
    if tuple(weight.shape) != (out_f, in_f):
        raise ValueError(f"sparse_linear: weight is {_describe(weight)}, the layout is for {out_f} x {in_f}")
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"sparse_linear: x is {_describe(x)}, expected (..., {in_f})")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"sparse_linear: bias is {_describe(bias)}, expected ({out_f},)")
    return _SparseLinear.apply(x, weight, bias, layout, bool(dense_grad), bool(contiguous_output))
