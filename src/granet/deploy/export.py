"""Compressed export of sparse models to ``safetensors``.

``safetensors`` stores dense tensors only, so a sparsified tensor is written as dense pieces:

* ``bitmask`` layout: ``NAME::values`` (the active values, row-major order, original dtype) and
  ``NAME::mask`` (the boolean mask bit-packed into uint8, least significant bit first, i.e.
  ``numpy.packbits(..., bitorder="little")``), ``ceil(numel / 8)`` bytes.
* ``csr`` layout: the tensor viewed as ``(shape[0], numel / shape[0])``; ``NAME::values``,
  ``NAME::crow`` (row pointers) and ``NAME::col`` (column indices, int16 when a row holds at most
  2**15 weights, else int32; row pointers int32 unless there are 2**31 active values).
* ``fan-in`` layout (condensed, for masks with constant fan-in): the tensor viewed as in ``csr``,
  every row holding the same number ``k`` of active weights; ``NAME::values`` and ``NAME::index``,
  ``(rows, k)``: each row's column indices in ascending order, dtype as ``csr``'s column indices.
  It is ``csr`` without the row pointers (row ``r`` starts at ``r * k``), the form
  :class:`granet.deploy.condensed.CondensedLinear` computes with. Every sparsified tensor of the
  export must have constant fan-in (refused otherwise, naming the tensor).

Every other tensor of the state dict is stored as usual under its own name, except a tensor that is
the same tensor as an earlier key's (tied weights, e.g. a language model's output layer and its token
embedding): it is stored once, and the later key is listed in ``tied`` (key -> earlier key) and
restored as the same tensor (files without ties keep format version 1; with ties, version 2; the
``fan-in`` layout, with or without ties, is version 3, so that a granet which predates it refuses it
by its version). Training zeroes
inactive weights by multiplying with the mask, which leaves ``-0.0`` where a weight was negative;
to restore the dense-stored tensors bit for bit, those sign bits are kept as ``NAME::negzero``
(bit-packed like the mask, written only for tensors that hold such zeros; ``keep_zero_signs=False``
drops them and inactive weights come back as ``+0.0``, which computes identically).

The safetensors header metadata holds ``format`` (``granet-sparse``), ``format_version``, ``layout``,
``keys`` (state-dict order), ``sparse`` (name -> shape, dtype, number of active values), ``tied``
(version 2 only) and ``user``
(the caller's JSON metadata). Size of the data section, exactly:
``sum(dense numel * itemsize) + sum(sparse nnz * itemsize + ceil(numel / 8) [+ ceil(numel / 8)])``
for ``bitmask``; the file adds 8 bytes plus the JSON header.

Reading never trusts the header: every declared shape, dtype and active-value count is checked
against the sizes of the stored pieces (a bitmask of ``numel`` weights holds ``ceil(numel / 8)``
bytes, a CSR tensor ``rows + 1`` row pointers and one column index per active value) and, when a
model is given, against the model's tensors, before any tensor is allocated. A CSR file legitimately
describes tensors far larger than itself (a fully pruned layer is its row pointers), so without a
model its dense size is bounded only by the machine's memory, which is checked too. Writing goes
through a temporary file and a rename, and never replaces a file of a run directory.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

import torch
from torch import nn

from ..errors import CheckpointError, GranetError, RunDirError, install_hint, short_repr, short_text
from ..rundir import MODEL_FILE, atomic_output, load_file, refuse_run_file
from .condensed import constant_fan_in

if TYPE_CHECKING:
    from typing_extensions import TypeGuard

FORMAT_NAME = "granet-sparse"
FORMAT_VERSION = 3
#: The versions this granet reads: 1 (no tied tensors), 2 (``tied`` metadata) and 3 (the ``fan-in``
#: layout; ``tied`` where there are ties).
READABLE_VERSIONS = ("1", "2", "3")
#: The layouts for any mask.
LAYOUTS = ("bitmask", "csr")
#: The layouts for masks with constant fan-in only.
STRUCTURED_LAYOUTS = ("fan-in",)
_ALL_LAYOUTS = LAYOUTS + STRUCTURED_LAYOUTS
_SEP = "::"
_MAX_CSR_COLS = 2**31  # CSR column indices are at most int32
_INSTALL_HINT = f"granet export needs the safetensors package: {install_hint('export', 'safetensors')}"


class SparseExportError(GranetError, ValueError):
    """A sparse export that cannot be read or written, or that does not fit the model (one line).

    Also a ``ValueError``, the type these errors had before, so existing ``except ValueError`` code
    keeps working.
    """


def _safetensors() -> Any:
    """Import ``safetensors.torch`` lazily so that ``import granet`` works without it."""
    try:
        import safetensors.torch as st
    except ImportError:
        raise ImportError(_INSTALL_HINT) from None
    return st


@dataclasses.dataclass
class ExportInfo:
    """What :func:`export_sparse` wrote: sizes in bytes and weight counts."""

    path: str
    layout: str
    file_bytes: int
    dense_bytes: int  # sum of numel * itemsize over the state dict: the tensor data of a dense file
    total_weights: int  # elements of the sparsified tensors
    active_weights: int
    sparse_tensors: int

    @property
    def ratio(self) -> float:
        """File size / dense tensor bytes."""
        return self.file_bytes / self.dense_bytes if self.dense_bytes else float("nan")


# ---------------------------------------------------------------------------- bit packing

def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor (flattened, row-major) into uint8, least significant bit first.

    Bit ``i`` of the flat mask is bit ``i % 8`` of byte ``i // 8``; the last byte is zero-padded.
    Eight shifted ORs keep the scratch at one byte per element (no int64 intermediate).
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_bits needs a torch.bool tensor, got {mask.dtype}")
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8).to(torch.uint8)
    packed = bits[:, 0].clone()
    for i in range(1, 8):
        packed |= bits[:, i] << i
    return packed


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` bits as a flat boolean tensor."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != math.ceil(numel / 8):
        raise ValueError(f"packed bits must be a 1-D uint8 tensor of {math.ceil(numel / 8)} bytes, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = ((packed.unsqueeze(1) >> shifts) & 1).view(-1)
    if bool(bits[numel:].any()):
        raise ValueError("packed bits have non-zero padding")
    return bits[:numel].bool()


# ---------------------------------------------------------------------------- export

def _state_dict_of(obj: Union[nn.Module, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise TypeError(f"export_sparse needs an nn.Module or a state dict, got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str) or _SEP in key:
            raise ValueError(f"state-dict key {short_repr(key)} must be a string without {_SEP!r}")
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            raise TypeError(f"state-dict entry {short_repr(key)} must be a dense tensor, "
                            f"got {short_text(type(value).__name__)}")
        out[key] = value.detach().cpu()
    return out


def _ties(state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{key: earlier key}`` for the entries that are the same tensor as an earlier entry (same
    storage, offset, shape, strides and dtype) with the same mask or none on both."""
    first: dict[tuple[Any, ...], str] = {}
    tied = {}
    for key, tensor in state.items():
        if not tensor.numel():
            continue
        identity = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                    tensor.stride(), tensor.dtype)
        source = first.setdefault(identity, key)
        if source == key:
            continue
        if (key in masks) == (source in masks) and (key not in masks or torch.equal(masks[key], masks[source])):
            tied[key] = source
    return tied


def _check_masks(state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a mapping of name -> torch.bool tensor, got {type(masks).__name__}")
    checked = {}
    for name, mask in masks.items():
        if name not in state:
            raise ValueError(f"mask {short_repr(name)} names no tensor of the state dict")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            kind = mask.dtype if isinstance(mask, torch.Tensor) else short_text(type(mask).__name__)
            raise TypeError(f"mask {short_repr(name)} must be a torch.bool tensor, got {kind}")
        if mask.shape != state[name].shape:
            raise ValueError(f"mask {short_repr(name)} has shape {short_repr(tuple(mask.shape))} but the tensor "
                             f"has shape {short_repr(tuple(state[name].shape))}")
        mask = mask.detach().cpu()
        outside = (state[name] != 0) & ~mask
        if bool(outside.any()):
            raise ValueError(f"{short_repr(name)} has {int(outside.sum())} non-zero values outside its mask "
                             f"(apply the mask before exporting)")
        checked[name] = mask
    return checked


def _csr_pieces(name: str, tensor: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Row pointers and column indices of ``mask`` viewed as (shape[0], rest)."""
    rows, cols = _csr_shape(tensor.shape)
    if cols > _MAX_CSR_COLS:
        raise ValueError(f"{short_repr(name)}: rows of {cols} weights are too long for int32 column indices "
                         f"(use layout='bitmask')")
    m2 = mask.reshape(rows, cols)
    nnz = int(mask.sum())
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = m2.sum(dim=1).cumsum(0)
    col = m2.nonzero()[:, 1]
    return {"crow": crow.to(_crow_dtype(nnz)), "col": col.to(_col_dtype(cols))}


def _fan_in_index(name: str, tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(rows, k)`` column indices of a constant fan-in ``mask`` viewed as (shape[0], rest)."""
    rows, cols = _csr_shape(tensor.shape)
    if cols > _MAX_CSR_COLS:
        raise ValueError(f"{short_repr(name)}: rows of {cols} weights are too long for int32 column indices "
                         f"(use layout='bitmask')")
    m2 = mask.reshape(rows, cols)
    k = constant_fan_in(m2)
    if k is None:
        counts = m2.sum(dim=1)
        row = int((counts != counts[0]).nonzero()[0, 0])
        raise ValueError(f"{short_repr(name)} has no constant fan-in (row {row} holds {int(counts[row])} active "
                         f"weights, row 0 {int(counts[0])}): layout 'fan-in' needs the same count in every row "
                         f"(use layout='csr' or 'bitmask')")
    return m2.nonzero()[:, 1].reshape(rows, k).to(_col_dtype(cols))


def _crow_dtype(nnz: int) -> torch.dtype:
    """The row-pointer dtype of a CSR tensor with ``nnz`` active values (part of the format)."""
    return torch.int32 if nnz < 2**31 else torch.int64


def _col_dtype(cols: int) -> torch.dtype:
    """The column-index dtype of a CSR tensor with rows of ``cols`` weights (part of the format)."""
    return torch.int16 if cols <= 2**15 else torch.int32


def _csr_shape(shape: Union[torch.Size, tuple[int, ...]]) -> tuple[int, int]:
    numel = math.prod(shape)
    rows = shape[0] if len(shape) >= 1 else 1
    return rows, (numel // rows if rows else 0)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _encode(name: str, tensor: torch.Tensor, mask: torch.Tensor, layout: str,
            keep_zero_signs: bool) -> dict[str, torch.Tensor]:
    """The dense pieces that store one sparsified tensor."""
    pieces = {f"{name}{_SEP}values": tensor[mask].contiguous()}
    if layout == "bitmask":
        pieces[f"{name}{_SEP}mask"] = pack_bits(mask)
    elif layout == "fan-in":
        pieces[f"{name}{_SEP}index"] = _fan_in_index(name, tensor, mask)
    else:
        pieces.update({f"{name}{_SEP}{k}": v for k, v in _csr_pieces(name, tensor, mask).items()})
    if keep_zero_signs and tensor.is_floating_point():
        negzero = torch.signbit(tensor) & ~mask  # inactive weights are +-0 (checked); keep the sign
        if bool(negzero.any()):
            pieces[f"{name}{_SEP}negzero"] = pack_bits(negzero)
    return pieces


def _check_output_path(path: Union[str, Path]) -> None:
    """Refuse, before any work, an output file that cannot or must not be written.

    Raises:
        SparseExportError: ``path`` is a directory, its directory does not exist, or it is one of a
            run directory's own files (replacing ``model.pt`` or ``checkpoint.pt`` would destroy the run).
    """
    path = Path(path)
    try:
        refuse_run_file(path, what="output file")
    except RunDirError as exc:
        raise SparseExportError(str(exc)) from None
    if path.is_dir():
        raise SparseExportError(f"cannot write {path}: it is a directory (give a file name)")
    if not path.parent.is_dir():
        raise SparseExportError(f"cannot write {path}: directory {path.parent} does not exist")


def export_sparse(state_dict_or_model: Union[nn.Module, Mapping[str, torch.Tensor]],
                  masks: Mapping[str, torch.Tensor], path: Union[str, Path],
                  metadata: Optional[Mapping[str, Any]] = None, layout: str = "bitmask",
                  keep_zero_signs: bool = True) -> ExportInfo:
    """Write a compressed sparse checkpoint (``safetensors``) and return its sizes.

    Args:
        state_dict_or_model: the model or its state dict (tensors are copied to the CPU).
        masks: ``{state-dict key: torch.bool tensor}`` for the sparsified tensors; every value
            outside a mask must be zero.
        path: output file.
        metadata: JSON-serialisable mapping stored in the header (read back by :func:`read_metadata`).
        layout: ``"bitmask"``, ``"csr"`` or, where every mask has constant fan-in, ``"fan-in"``
            (see the module docstring).
        keep_zero_signs: keep the sign of ``-0.0`` inactive weights, for a bit-identical restore.

    The file is written to a temporary name, flushed to disk and renamed: a failed export leaves
    any earlier file at ``path`` as it was.

    Raises:
        TypeError: a model, state-dict entry, mask or ``metadata`` of the wrong type; one line naming it.
        ValueError: one line naming the offending key, mask or option.
        SparseExportError: ``path`` is a directory, is in a missing directory, or is one of a run
            directory's own files (``model.pt``, ``checkpoint.pt``, ...); checked before any work.
        RunDirError: the file could not be written (read-only or full disk, file-size limit).
        ImportError: safetensors is not installed.
    """
    if layout not in _ALL_LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(_ALL_LAYOUTS)}, got {short_repr(layout)}")
    path = Path(path)
    _check_output_path(path)
    original = state_dict_or_model.state_dict() if isinstance(state_dict_or_model, nn.Module) else state_dict_or_model
    state = _state_dict_of(original)
    checked = _check_masks(state, masks)
    tied = _ties({k: v for k, v in original.items() if k in state}, checked)  # on the tensors as given
    try:
        user = json.dumps(dict(metadata or {}), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"metadata must be a JSON-serialisable mapping ({exc})") from None
    st = _safetensors()
    tensors: dict[str, torch.Tensor] = {}
    sparse_info: dict[str, dict[str, Any]] = {}
    storages: set[int] = set()
    for key, tensor in state.items():
        if key in tied:
            continue
        if key in checked:
            tensors.update(_encode(key, tensor, checked[key], layout, keep_zero_signs))
            sparse_info[key] = {"shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype),
                                "nnz": int(checked[key].sum())}
            continue
        # safetensors refuses tensors that share memory (tied weights, views): copy those.
        ptr = tensor.untyped_storage().data_ptr()
        partial = tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size()
        copy = ptr in storages or partial or not tensor.is_contiguous()
        tensors[key] = tensor.clone(memory_format=torch.contiguous_format) if copy else tensor
        if tensor.numel():
            storages.add(ptr)
    version = "3" if layout in STRUCTURED_LAYOUTS else "2" if tied else "1"
    header = {"format": FORMAT_NAME, "format_version": version, "layout": layout,
              "keys": json.dumps(list(state)), "sparse": json.dumps(sparse_info), "user": user}
    if tied:
        header["tied"] = json.dumps(tied)
    with atomic_output(path) as tmp:
        st.save_file(tensors, str(tmp), metadata=header)
    total = sum(math.prod(v["shape"]) for v in sparse_info.values())
    return ExportInfo(path=str(path), layout=layout, file_bytes=Path(path).stat().st_size,
                      dense_bytes=sum(t.numel() * t.element_size() for k, t in state.items() if k not in tied),
                      total_weights=total, active_weights=sum(v["nnz"] for v in sparse_info.values()),
                      sparse_tensors=len(sparse_info))


# ---------------------------------------------------------------------------- load

# safetensors' dtype names -> torch dtypes (those this torch has).
_FILE_DTYPES = {code: getattr(torch, name) for code, name in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
    ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"),
    ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("C64", "complex64"),
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz")) if hasattr(torch, name)}
_DTYPES = {_dtype_name(d): d for d in _FILE_DTYPES.values()}  # the names the 'sparse' metadata uses


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One state-dict tensor as an export declares it, checked against the stored tensors' headers."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nnz: Optional[int] = None  # active values of a sparsified tensor; None: stored dense under ``key``
    pieces: tuple[str, ...] = ()  # the stored pieces of a sparsified tensor ("values", "mask", ...)
    tied_to: Optional[str] = None  # the earlier key whose tensor this one is (nothing stored under ``key``)

    @property
    def numel(self) -> int:
        """Elements of the restored tensor."""
        return math.prod(self.shape)


def _open(path: Union[str, Path]) -> tuple[dict[str, str], Any]:
    """Header metadata and an open safetensors handle; one clear error for foreign or broken files."""
    st = _safetensors()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        handle = st.safe_open(str(path), framework="pt", device="cpu")
        meta = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error type for every header problem
        raise SparseExportError(f"{path} is not a readable safetensors file ({_detail(exc)})") from None
    if meta.get("format") != FORMAT_NAME:
        raise SparseExportError(f"{path} is not a granet sparse export (no 'format: {FORMAT_NAME}' metadata)")
    if meta.get("format_version") not in READABLE_VERSIONS or meta.get("layout") not in _ALL_LAYOUTS:
        raise SparseExportError(
            f"{path}: unsupported granet sparse format version {short_repr(meta.get('format_version'))} "
            f"/ layout {short_repr(meta.get('layout'))} (this granet reads versions {', '.join(READABLE_VERSIONS)})")
    if meta["layout"] in STRUCTURED_LAYOUTS and meta["format_version"] != "3":
        raise SparseExportError(f"{path} is a corrupt granet sparse export (layout {meta['layout']!r} in a "
                                f"version-{meta['format_version']} file; it needs version 3)")
    return meta, handle


def _detail(exc: BaseException) -> str:
    """The first line of an exception's message, cut short (it may quote the file's contents)."""
    lines = str(exc).strip().splitlines()
    return short_text(lines[0], 160) if lines else type(exc).__name__


def _corrupt(path: Union[str, Path], exc: BaseException) -> SparseExportError:
    return SparseExportError(f"{path} is a corrupt granet sparse export ({_detail(exc)})")


def _describe(dtype: torch.dtype, shape: tuple[int, ...]) -> str:
    return f"{_dtype_name(dtype)} {short_repr(list(shape))}"


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _headers(handle: Any) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """``{stored tensor name: (dtype, shape)}`` from the file header, without reading any tensor."""
    out = {}
    for name in handle.keys():
        piece = handle.get_slice(name)
        dtype = _FILE_DTYPES.get(piece.get_dtype())
        if dtype is None:
            raise ValueError(f"stored tensor {short_repr(name)} has unsupported dtype {short_repr(piece.get_dtype())}")
        out[name] = (dtype, tuple(piece.get_shape()))
    return out


def _sparse_entry(key: str, info: Any, layout: str,
                  headers: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> _Entry:
    """A sparsified tensor's declaration, checked against the sizes of its stored pieces.

    Every piece's size follows from (shape, nnz): ``values`` (nnz,), ``mask`` and ``negzero``
    (ceil(numel / 8),) bytes, ``crow`` (rows + 1,), ``col`` (nnz,), ``index`` (rows, nnz / rows), so a
    declared shape is accepted
    only where the file holds the bytes it implies (CSR: the row pointers; the column-index dtype
    bounds the row length).
    """
    name = short_repr(key)
    if not isinstance(info, dict):
        raise ValueError(f"the 'sparse' entry of {name} is not a mapping")
    shape, nnz, dtype = info.get("shape"), info.get("nnz"), info.get("dtype")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)) or not _is_count(nnz):
        raise ValueError(f"{name} declares shape {short_repr(shape)} and nnz {short_repr(nnz)}: "
                         f"not non-negative integers")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ValueError(f"{name} declares unknown dtype {short_repr(dtype)}")
    dtype, numel = _DTYPES[dtype], math.prod(shape)
    if nnz > numel:
        raise ValueError(f"{name} declares {short_repr(nnz)} active values in shape {short_repr(shape)}")
    bitmap = (torch.uint8, (-(-numel // 8),))
    required: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {"values": (dtype, (nnz,))}
    if layout == "bitmask":
        required["mask"] = bitmap
    elif layout == "fan-in":
        rows, cols = _csr_shape(tuple(shape))
        if cols > _MAX_CSR_COLS:
            raise ValueError(f"{name} declares shape {short_repr(shape)}: rows too long for column indices")
        if rows and nnz % rows:
            raise ValueError(f"{name} declares {nnz} active values, not the same number in each of {rows} rows")
        required["index"] = (_col_dtype(cols), (rows, nnz // rows if rows else 0))
    else:
        rows, cols = _csr_shape(tuple(shape))
        if cols > _MAX_CSR_COLS:
            raise ValueError(f"{name} declares shape {short_repr(shape)}: rows too long for CSR column indices")
        required.update(crow=(_crow_dtype(nnz), (rows + 1,)), col=(_col_dtype(cols), (nnz,)))
    optional = {"negzero": bitmap} if dtype.is_floating_point else {}
    for piece, expected in {**required, **optional}.items():
        stored = headers.get(f"{key}{_SEP}{piece}")
        if stored is None and piece in required:
            raise ValueError(f"{name} has no stored {piece!r} piece")
        if stored is not None and stored != expected:
            raise ValueError(f"{short_repr(f'{key}{_SEP}{piece}')} is {_describe(*stored)}, but shape "
                             f"{short_repr(shape)} with {short_repr(nnz)} active values needs {_describe(*expected)}")
    pieces = tuple(p for p in (*required, *optional) if f"{key}{_SEP}{p}" in headers)
    return _Entry(key, tuple(shape), dtype, nnz, pieces)


def _entries(meta: Mapping[str, str], headers: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> list[_Entry]:
    """Every state-dict tensor of an export, in order; every stored tensor must belong to one."""
    try:
        keys, sparse = json.loads(meta["keys"]), json.loads(meta["sparse"])
    except (KeyError, ValueError):
        raise ValueError("its 'keys' or 'sparse' metadata is missing or not JSON") from None
    if (not isinstance(keys, list) or not all(isinstance(k, str) and _SEP not in k for k in keys)
            or len(set(keys)) != len(keys)):
        raise ValueError("its 'keys' metadata is not a list of distinct state-dict keys")
    if not isinstance(sparse, dict) or not set(sparse) <= set(keys):
        raise ValueError("its 'sparse' metadata names tensors missing from 'keys'")
    tied = _tied_metadata(meta, keys, sparse)
    entries: list[_Entry] = []
    by_key: dict[str, _Entry] = {}
    stored: set[str] = set()
    for key in keys:
        if key in tied:
            source = by_key[tied[key]]
            if key in headers:
                raise ValueError(f"tied tensor {short_repr(key)} is also stored")
            entry = _Entry(key, source.shape, source.dtype, source.nnz, tied_to=source.key)
        elif key in sparse:
            entry = _sparse_entry(key, sparse[key], meta["layout"], headers)
            stored.update(f"{key}{_SEP}{p}" for p in entry.pieces)
        elif key in headers:
            entry = _Entry(key, headers[key][1], headers[key][0])
            stored.add(key)
        else:
            raise ValueError(f"tensor {short_repr(key)} is not stored")
        entries.append(entry)
        by_key[key] = entry
    stray = sorted(set(headers) - stored)
    if stray:
        raise ValueError(f"{len(stray)} stored tensors belong to no key, e.g. {short_repr(stray[0])}")
    return entries


def _tied_metadata(meta: Mapping[str, str], keys: list[str], sparse: Mapping[str, Any]) -> dict[str, str]:
    """The ``tied`` metadata, checked: each key names an earlier, untied tensor and is not declared sparse itself.

    Version 1 has none, version 2 always some; version 3 has them where there are ties.
    """
    if meta["format_version"] == "1" or (meta["format_version"] == "3" and "tied" not in meta):
        if "tied" in meta:
            raise ValueError("its version-1 metadata has 'tied' entries")
        return {}
    try:
        tied = json.loads(meta["tied"])
    except (KeyError, ValueError, RecursionError):
        raise ValueError("its 'tied' metadata is missing or not JSON") from None
    position = {k: i for i, k in enumerate(keys)}
    if not isinstance(tied, dict) or not tied:
        raise ValueError("its 'tied' metadata is not a non-empty mapping")
    for key, source in tied.items():
        if (key not in position or not isinstance(source, str) or source not in position
                or position[source] >= position[key] or source in tied or key in sparse):
            raise ValueError(f"its 'tied' entry {short_repr(key)} -> {short_repr(source)} does not name an earlier, "
                             "untied tensor")
    return tied


def _some(keys: list[str], limit: int = 3) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(short_repr(k) for k in keys[:limit]) + more


def _check_model(path: Union[str, Path], entries: list[_Entry], model: nn.Module) -> None:
    """Every key, shape and dtype of the export against ``model``'s state dict (nothing is read yet).

    Raises:
        SparseExportError: the problems, in one line (missing / unexpected keys; tensors whose dtype
            or shape differ, with both).
    """
    own = model.state_dict()
    declared = {e.key: e for e in entries}
    problems = []
    missing = [k for k in own if k not in declared]
    unexpected = [k for k in declared if k not in own]
    mismatched = []
    for key, entry in declared.items():
        if key not in own:
            continue
        theirs = own[key]
        if not isinstance(theirs, torch.Tensor):
            mismatched.append(f"{short_repr(key)} is a tensor in the file, a {short_text(type(theirs).__name__)} "
                              f"in the model")
        elif (theirs.dtype, tuple(theirs.shape)) != (entry.dtype, entry.shape):
            mismatched.append(f"{short_repr(key)} is {_describe(entry.dtype, entry.shape)} in the file, "
                              f"{_describe(theirs.dtype, tuple(theirs.shape))} in the model")
    for label, found in (("missing", missing), ("unexpected", unexpected)):
        if found:
            problems.append(f"{label} {_some(found)}")
    if mismatched:
        more = f" and {len(mismatched) - 3} more" if len(mismatched) > 3 else ""
        problems.append("; ".join(mismatched[:3]) + more)
    if problems:
        raise SparseExportError(f"{path} does not fit the model ({'; '.join(problems)}); the model is unchanged")


def _physical_memory() -> Optional[int]:
    """Bytes of memory of this machine, or None where the operating system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not POSIX (Windows)
        return None


def _check_memory(path: Union[str, Path], entries: list[_Entry], dense: bool) -> None:
    """Refuse an export whose restored tensors (plus one byte per weight of mask) exceed this machine's memory."""
    need = sum((e.numel * e.dtype.itemsize if dense else 0) + (e.numel if e.nnz is not None else 0)
               for e in entries if e.tied_to is None)
    total = _physical_memory()
    if total is not None and need > total:
        largest = max(entries, key=lambda e: e.numel)
        raise SparseExportError(f"{path} declares tensors larger than this machine's {total:,} bytes of memory "
                                f"(e.g. {short_repr(largest.key)}: {_describe(largest.dtype, largest.shape)}); "
                                f"a corrupt or crafted file?")


def _csr_positions(crow: torch.Tensor, col: torch.Tensor, rows: int, cols: int, nnz: int) -> torch.Tensor:
    """Flat (row-major) positions of the active values, validated: int64, strictly increasing."""
    crow, col = crow.long(), col.long()
    counts = crow.diff()
    if int(crow[0]) != 0 or int(crow[-1]) != nnz or bool((counts < 0).any()):
        raise ValueError("bad CSR row pointers")
    if nnz and (int(col.min()) < 0 or int(col.max()) >= cols):
        raise ValueError("bad CSR column indices")
    flat = torch.repeat_interleave(torch.arange(rows), counts) * cols + col
    if nnz > 1 and not bool((flat[1:] > flat[:-1]).all()):
        raise ValueError("CSR column indices are not strictly increasing within rows")
    return flat


def _decode(handle: Any, entry: _Entry, layout: str, dense: bool,
            mask: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dense tensor, mask) of one sparsified tensor, each only if asked for; pieces read one at a time."""
    assert entry.nnz is not None
    numel = entry.numel

    def piece(name: str) -> torch.Tensor:
        return handle.get_tensor(f"{entry.key}{_SEP}{name}")

    if layout == "bitmask":
        active = unpack_bits(piece("mask"), numel)
        if int(active.sum()) != entry.nnz:
            raise ValueError(f"mask has {int(active.sum())} active positions for {entry.nnz} values")
        flat_mask: Optional[torch.Tensor] = active
    else:
        rows, cols = _csr_shape(entry.shape)
        if layout == "fan-in":  # CSR whose rows all hold k: row r starts at r * k
            index = piece("index")
            crow = torch.arange(rows + 1, dtype=torch.int64) * index.shape[1]
            active = _csr_positions(crow, index.reshape(-1), rows, cols, entry.nnz)
        else:
            active = _csr_positions(piece("crow"), piece("col"), rows, cols, entry.nnz)
        flat_mask = None
        if mask:
            flat_mask = torch.zeros(numel, dtype=torch.bool)
            flat_mask[active] = True
    values = None
    if dense:
        values = torch.zeros(numel, dtype=entry.dtype)
        values[active] = piece("values")
    if "negzero" in entry.pieces:
        negzero = unpack_bits(piece("negzero"), numel)
        if bool(negzero[active].any()):
            raise ValueError("negative-zero bits overlap the mask")
        if values is not None:
            values.masked_fill_(negzero, -0.0)
    return (None if values is None else values.view(entry.shape),
            None if flat_mask is None or not mask else flat_mask.view(entry.shape))


def _read(path: Union[str, Path], dense: bool = True, masks: bool = True,
          model: Optional[nn.Module] = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """(state dict in the original key order, masks, header metadata) of an export.

    The whole declaration is validated (against the file, ``model`` and the machine's memory) before
    any tensor is read; ``dense`` / ``masks`` select what is built.
    """
    meta, handle = _open(path)
    try:
        entries = _entries(meta, _headers(handle))
    except Exception as exc:  # safetensors' own error type included: a corrupt file either way
        raise _corrupt(path, exc) from None
    if model is not None:
        _check_model(path, entries, model)
    _check_memory(path, entries, dense)
    state: dict[str, torch.Tensor] = {}
    found: dict[str, torch.Tensor] = {}
    try:
        for entry in entries:
            if entry.tied_to is not None:  # the same tensor as an earlier key's, as when exported
                if entry.tied_to in state:
                    state[entry.key] = state[entry.tied_to]
                if entry.tied_to in found:
                    found[entry.key] = found[entry.tied_to]
                continue
            if entry.nnz is None:
                if dense:
                    state[entry.key] = handle.get_tensor(entry.key)
                continue
            tensor, mask = _decode(handle, entry, meta["layout"], dense, masks)
            if tensor is not None:
                state[entry.key] = tensor
            if mask is not None:
                found[entry.key] = mask
    except Exception as exc:  # any decoding failure (incl. safetensors' own error type) means a corrupt file
        raise _corrupt(path, exc) from None
    return state, found, meta


def load_sparse(path: Union[str, Path], model: Optional[nn.Module] = None) -> dict[str, torch.Tensor]:
    """Restore the dense state dict of an export (bit-identical to the exported tensors).

    With ``model``, the state dict is also loaded into it: every key, shape and dtype of the file
    is checked against the model before anything is read or copied, so a load either applies
    completely or leaves the model untouched (no dtype conversion: a float16 export does not load
    into a float32 model).

    Raises:
        FileNotFoundError: no such file.
        SparseExportError: (a ``ValueError``) not a granet sparse export, an unsupported version, a
            corrupt or inconsistent file, tensors larger than this machine's memory, or keys,
            shapes or dtypes that do not fit ``model``; one line.
    """
    state, _, _ = _read(path, dense=True, masks=False, model=model)
    if model is not None:
        model.load_state_dict(state)  # keys, shapes and dtypes were checked: the copy cannot stop half-way
    return state


def load_masks(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The boolean masks stored in an export (``{state-dict key: torch.bool tensor}``).

    Raises the errors of :func:`load_sparse`; the dense tensors are not built.
    """
    return _read(path, dense=False, masks=True)[1]


def read_metadata(path: Union[str, Path]) -> dict[str, Any]:
    """The ``metadata`` mapping given to :func:`export_sparse` (empty if none)."""
    meta, _ = _open(path)
    try:
        return json.loads(meta.get("user", "{}"))
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python's stack
        raise SparseExportError(f"{path} is a corrupt granet sparse export (user metadata is not JSON)") from None


# ---------------------------------------------------------------------------- runs

def export_run(run_dir: Union[str, Path], out_path: Optional[Union[str, Path]] = None,
               layout: str = "bitmask", keep_zero_signs: bool = True) -> ExportInfo:
    """Export a granet run directory's ``model.pt`` (the selected sparse model).

    ``out_path`` defaults to ``RUN_DIR/model.sparse.safetensors``. The run's config, epoch, step and
    layer densities go into the metadata. ``model.pt`` is read with ``weights_only=True``.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``model.pt``.
        SparseExportError: (a ``ValueError``) ``model.pt`` is unreadable, truncated, holds Python objects
            or lacks ``model`` / ``masks``; or ``out_path`` is refused (a directory, a missing
            directory, or one of a run's own files).
        RunDirError: and the other errors of :func:`export_sparse`.
    """
    path = Path(run_dir) / MODEL_FILE
    out = Path(out_path) if out_path is not None else Path(run_dir) / "model.sparse.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {MODEL_FILE} (is it a granet run directory?)")
    _check_output_path(out)  # before reading the model: a refused output costs nothing
    try:
        artifact = load_file(path, "granet model file")
    except CheckpointError as exc:
        raise SparseExportError(str(exc)) from None
    if not {"model", "masks"} <= set(artifact):
        raise SparseExportError(f"{path} is not a granet model file (needs 'model' and 'masks' entries)")
    metadata: dict[str, Any] = {k: artifact[k] for k in ("config", "epoch", "step", "layer_density") if k in artifact}
    return export_sparse(artifact["model"], artifact["masks"], out, metadata=metadata, layout=layout,
                         keep_zero_signs=keep_zero_signs)


__all__ = ["ExportInfo", "FORMAT_NAME", "FORMAT_VERSION", "LAYOUTS", "READABLE_VERSIONS", "STRUCTURED_LAYOUTS",
           "SparseExportError", "export_run",
           "export_sparse", "load_masks", "load_sparse", "pack_bits", "read_metadata", "unpack_bits"]
