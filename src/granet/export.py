"""Compressed export of sparse models to ``safetensors``.

``safetensors`` stores dense tensors only, so a sparsified tensor is written as dense pieces:

* ``bitmask`` layout: ``NAME::values`` (the active values, row-major order, original dtype) and
  ``NAME::mask`` (the boolean mask bit-packed into uint8, least significant bit first, i.e.
  ``numpy.packbits(..., bitorder="little")``), ``ceil(numel / 8)`` bytes.
* ``csr`` layout: the tensor viewed as ``(shape[0], numel / shape[0])``; ``NAME::values``,
  ``NAME::crow`` (row pointers) and ``NAME::col`` (column indices, int16 when the row is shorter
  than 2**15, else int32; row pointers int32 unless there are 2**31 active values).

Every other tensor of the state dict is stored as usual under its own name. Training zeroes
inactive weights by multiplying with the mask, which leaves ``-0.0`` where a weight was negative;
to restore the dense-stored tensors bit for bit, those sign bits are kept as ``NAME::negzero``
(bit-packed like the mask, written only for tensors that hold such zeros; ``keep_zero_signs=False``
drops them and inactive weights come back as ``+0.0``, which computes identically).

The safetensors header metadata holds ``format`` (``granet-sparse``), ``format_version``, ``layout``,
``keys`` (state-dict order), ``sparse`` (name -> shape, dtype, number of active values) and ``user``
(the caller's JSON metadata). Size of the data section, exactly:
``sum(dense numel * itemsize) + sum(sparse nnz * itemsize + ceil(numel / 8) [+ ceil(numel / 8)])``
for ``bitmask``; the file adds 8 bytes plus the JSON header.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

FORMAT_NAME = "granet-sparse"
FORMAT_VERSION = 1
LAYOUTS = ("bitmask", "csr")
_SEP = "::"
_INSTALL_HINT = "granet export needs the safetensors package: pip install granet[export]"


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
            raise ValueError(f"state-dict key {key!r} must be a string without {_SEP!r}")
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            raise TypeError(f"state-dict entry {key!r} must be a dense tensor, got {type(value).__name__}")
        out[key] = value.detach().cpu()
    return out


def _check_masks(state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a mapping of name -> torch.bool tensor, got {type(masks).__name__}")
    checked = {}
    for name, mask in masks.items():
        if name not in state:
            raise ValueError(f"mask {name!r} names no tensor of the state dict")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            kind = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"mask {name!r} must be a torch.bool tensor, got {kind}")
        if mask.shape != state[name].shape:
            raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)} but the tensor has shape "
                             f"{tuple(state[name].shape)}")
        mask = mask.detach().cpu()
        outside = (state[name] != 0) & ~mask
        if bool(outside.any()):
            raise ValueError(f"{name!r} has {int(outside.sum())} non-zero values outside its mask "
                             f"(apply the mask before exporting)")
        checked[name] = mask
    return checked


def _csr_pieces(tensor: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Row pointers and column indices of ``mask`` viewed as (shape[0], rest)."""
    rows, cols = _csr_shape(tensor.shape)
    m2 = mask.reshape(rows, cols)
    nnz = int(mask.sum())
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = m2.sum(dim=1).cumsum(0)
    col = m2.nonzero()[:, 1]
    return {"crow": crow.to(torch.int32 if nnz < 2**31 else torch.int64),
            "col": col.to(torch.int16 if cols <= 2**15 else torch.int32)}


def _csr_shape(shape: torch.Size) -> tuple[int, int]:
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
    else:
        pieces.update({f"{name}{_SEP}{k}": v for k, v in _csr_pieces(tensor, mask).items()})
    if keep_zero_signs and tensor.is_floating_point():
        negzero = torch.signbit(tensor) & ~mask  # inactive weights are +-0 (checked); keep the sign
        if bool(negzero.any()):
            pieces[f"{name}{_SEP}negzero"] = pack_bits(negzero)
    return pieces


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
        layout: ``"bitmask"`` or ``"csr"`` (see the module docstring).
        keep_zero_signs: keep the sign of ``-0.0`` inactive weights, for a bit-identical restore.

    Raises:
        TypeError / ValueError: one line naming the offending key, mask or option.
        ImportError: safetensors is not installed.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    state = _state_dict_of(state_dict_or_model)
    checked = _check_masks(state, masks)
    try:
        user = json.dumps(dict(metadata or {}), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"metadata must be a JSON-serialisable mapping ({exc})") from None
    st = _safetensors()
    tensors: dict[str, torch.Tensor] = {}
    sparse_info: dict[str, dict[str, Any]] = {}
    storages: set[int] = set()
    for key, tensor in state.items():
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
    header = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "layout": layout,
              "keys": json.dumps(list(state)), "sparse": json.dumps(sparse_info), "user": user}
    st.save_file(tensors, str(path), metadata=header)
    total = sum(math.prod(v["shape"]) for v in sparse_info.values())
    return ExportInfo(path=str(path), layout=layout, file_bytes=Path(path).stat().st_size,
                      dense_bytes=sum(t.numel() * t.element_size() for t in state.values()),
                      total_weights=total, active_weights=sum(v["nnz"] for v in sparse_info.values()),
                      sparse_tensors=len(sparse_info))


# ---------------------------------------------------------------------------- load

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
        raise ValueError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a granet sparse export (no 'format: {FORMAT_NAME}' metadata)")
    if meta.get("format_version") != str(FORMAT_VERSION) or meta.get("layout") not in LAYOUTS:
        raise ValueError(f"{path}: unsupported granet sparse format version {meta.get('format_version')!r} "
                         f"/ layout {meta.get('layout')!r} (this granet reads version {FORMAT_VERSION})")
    return meta, handle


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _decode_mask(pieces: dict[str, torch.Tensor], shape: list[int], layout: str) -> torch.Tensor:
    """The boolean mask of one sparsified tensor, validated against its stored pieces."""
    numel = math.prod(shape)
    if layout == "bitmask":
        return unpack_bits(pieces["mask"], numel).view(shape)
    rows, cols = _csr_shape(torch.Size(shape))
    crow, col = pieces["crow"].long(), pieces["col"].long()
    nnz = pieces["values"].numel()
    counts = crow.diff()
    if crow.shape != (rows + 1,) or int(crow[0]) != 0 or int(crow[-1]) != nnz or bool((counts < 0).any()):
        raise ValueError("bad CSR row pointers")
    if col.shape != (nnz,) or (nnz and (int(col.min()) < 0 or int(col.max()) >= cols)):
        raise ValueError("bad CSR column indices")
    flat = torch.repeat_interleave(torch.arange(rows), counts) * cols + col
    if nnz > 1 and not bool((flat[1:] > flat[:-1]).all()):
        raise ValueError("CSR column indices are not strictly increasing within rows")
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[flat] = True
    return mask.view(shape)


def _decode(pieces: dict[str, torch.Tensor], info: dict[str, Any], layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense tensor, mask) of one sparsified tensor."""
    shape, dtype = list(info["shape"]), _dtype(info["dtype"])
    values = pieces["values"]
    if values.dtype != dtype or values.shape != (int(info["nnz"]),):
        raise ValueError(f"values are {values.dtype} {tuple(values.shape)}, expected {dtype} ({info['nnz']},)")
    mask = _decode_mask(pieces, shape, layout)
    if int(mask.sum()) != values.numel():
        raise ValueError(f"mask has {int(mask.sum())} active positions for {values.numel()} values")
    dense = torch.zeros(shape, dtype=dtype)
    dense[mask] = values
    if "negzero" in pieces:
        negzero = unpack_bits(pieces["negzero"], dense.numel()).view(shape)
        if bool((negzero & mask).any()):
            raise ValueError("negative-zero bits overlap the mask")
        dense.masked_fill_(negzero, -0.0)
    return dense, mask


def _read(path: Union[str, Path]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """(state dict in the original key order, masks, header metadata) of an export."""
    meta, handle = _open(path)
    try:
        keys, sparse = json.loads(meta["keys"]), json.loads(meta["sparse"])
        names = set(handle.keys())
        state, masks = {}, {}
        for key in keys:
            if key not in sparse:
                state[key] = handle.get_tensor(key)
                continue
            prefix = f"{key}{_SEP}"
            pieces = {n[len(prefix):]: handle.get_tensor(n) for n in names if n.startswith(prefix)}
            state[key], masks[key] = _decode(pieces, sparse[key], meta["layout"])
    except Exception as exc:  # any decoding failure (incl. safetensors' own error type) means a corrupt file
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path} is a corrupt granet sparse export ({detail})") from None
    return state, masks, meta


def load_sparse(path: Union[str, Path], model: Optional[nn.Module] = None) -> dict[str, torch.Tensor]:
    """Restore the dense state dict of an export (bit-identical to the exported tensors).

    With ``model``, the state dict is also loaded into it (strict: every key must match).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a granet sparse export, an unsupported version, a corrupt file, or keys
            that do not fit ``model``.
    """
    state, _, _ = _read(path)
    if model is not None:
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"{path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:  # shape mismatches: torch lists them over several lines
            detail = " ".join(str(exc).split())
            raise ValueError(f"{path} does not fit the model: {detail}") from None
    return state


def load_masks(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The boolean masks stored in an export (``{state-dict key: torch.bool tensor}``)."""
    return _read(path)[1]


def read_metadata(path: Union[str, Path]) -> dict[str, Any]:
    """The ``metadata`` mapping given to :func:`export_sparse` (empty if none)."""
    meta, _ = _open(path)
    try:
        return json.loads(meta.get("user", "{}"))
    except ValueError:
        raise ValueError(f"{path} is a corrupt granet sparse export (user metadata is not JSON)") from None


# ---------------------------------------------------------------------------- runs

def export_run(run_dir: Union[str, Path], out_path: Optional[Union[str, Path]] = None,
               layout: str = "bitmask", keep_zero_signs: bool = True) -> ExportInfo:
    """Export a granet run directory's ``model.pt`` (the selected sparse model).

    ``out_path`` defaults to ``RUN_DIR/model.sparse.safetensors``. The run's config, epoch, step and
    layer densities go into the metadata. ``model.pt`` is read with ``weights_only=True``.
    """
    path = Path(run_dir) / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no model.pt (is it a granet run directory?)")
    try:
        artifact = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; all mean "not a model artifact"
        raise ValueError(f"{path} is not a readable granet model file ({str(exc).splitlines()[0]})") from None
    if not isinstance(artifact, dict) or not {"model", "masks"} <= set(artifact):
        raise ValueError(f"{path} is not a granet model file (needs 'model' and 'masks' entries)")
    metadata = {k: artifact[k] for k in ("config", "epoch", "step", "layer_density") if k in artifact}
    out = Path(out_path) if out_path is not None else Path(run_dir) / "model.sparse.safetensors"
    return export_sparse(artifact["model"], artifact["masks"], out, metadata=metadata, layout=layout,
                         keep_zero_signs=keep_zero_signs)


__all__ = ["ExportInfo", "FORMAT_NAME", "FORMAT_VERSION", "LAYOUTS", "export_run", "export_sparse",
           "load_masks", "load_sparse", "pack_bits", "read_metadata", "unpack_bits"]
