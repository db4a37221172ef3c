"""MNIST and Fashion-MNIST from the original IDX files.

Expected layout (``.gz`` or uncompressed; the uncompressed file wins when both exist)::

    <data_dir>/mnist/train-images-idx3-ubyte[.gz]      <data_dir>/fashion_mnist/...
    <data_dir>/mnist/train-labels-idx1-ubyte[.gz]
    <data_dir>/mnist/t10k-images-idx3-ubyte[.gz]
    <data_dir>/mnist/t10k-labels-idx1-ubyte[.gz]

torchvision's layout (``<data_dir>/MNIST/raw``, ``<data_dir>/FashionMNIST/raw``) and the files
directly in ``<data_dir>`` are also accepted, so existing downloads can be reused. ``download=True``
fetches the official ``.gz`` files into ``<data_dir>/mnist`` (resp. ``fashion_mnist``); ``.gz`` files
already present are then checked against the published MD5 checksums and fetched again if they do
not match. Without ``download``, files are only validated structurally (see below).

The IDX format is a big-endian header (magic number ``0x0000TTDD``: type ``TT`` = 0x08 for unsigned
bytes, ``DD`` dimensions; 2051 for images, 2049 for labels), one 32-bit size per dimension, then the
raw row-major data. The header is validated against the file length, so truncated files are
reported as corrupt instead of being silently misread.

Images are 1 x 28 x 28, normalised with the usual training-set statistics. Like the reference
implementations, no augmentation is used for these datasets, so ``augment`` has no effect.
"""

from __future__ import annotations

import gzip
import logging
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .base import DatasetError, DatasetSplits, make_in_memory_splits
from .download import MirrorSpec, ensure_file
from .registry import register_dataset

__all__ = ["IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC", "build_fashion_mnist", "build_mnist", "read_idx"]

logger = logging.getLogger(__name__)

#: Magic number of an IDX file of unsigned bytes with 3 dimensions (images).
IDX_IMAGES_MAGIC = 2051
#: Magic number of an IDX file of unsigned bytes with 1 dimension (labels).
IDX_LABELS_MAGIC = 2049

_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_IMAGE_SIZE = 28
_NUM_CLASSES = 10


@dataclass(frozen=True)
class _IdxSpec:
    """Where an IDX dataset lives and how to normalise it."""

    name: str
    title: str
    folder: str
    torchvision_folder: str
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


_SPECS = {
    "mnist": _IdxSpec("mnist", "MNIST", "mnist", "MNIST/raw", (0.1307,), (0.3081,)),
    "fashion_mnist": _IdxSpec(
        "fashion_mnist", "Fashion-MNIST", "fashion_mnist", "FashionMNIST/raw", (0.2860,), (0.3530,)
    ),
}


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (optionally gzip-compressed).

    Args:
        path: File to read; a ``.gz`` suffix means gzip compression.
        expected_magic: Magic number the header must have (2051 images, 2049 labels).

    Returns:
        A ``uint8`` array with the dimensions given in the header.

    Raises:
        DatasetError: If the file cannot be decompressed, has the wrong magic number, or its length
            does not match the header.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                data = handle.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"cannot read {path} ({exc})") from exc
    if len(data) < 4:
        raise DatasetError(f"{path} is too short to be an IDX file ({len(data)} bytes)")
    (magic,) = struct.unpack(">I", data[:4])
    if magic != expected_magic:
        raise DatasetError(f"{path} has IDX magic number {magic}, expected {expected_magic}; wrong or corrupt file")
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DatasetError(f"{path} is truncated inside its IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    expected_len = header_len + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected_len:
        raise DatasetError(
            f"{path} holds {len(data) - header_len} data bytes but its IDX header {dims} implies "
            f"{expected_len - header_len}; truncated or corrupt file"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


def _find_file(directory: Path, stem: str) -> Optional[Path]:
    """Return ``directory/stem`` or ``directory/stem.gz``, preferring the uncompressed file."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _locate(spec: _IdxSpec, data_dir: Path) -> Optional[List[Path]]:
    """Return the four files from the first candidate directory that has all of them."""
    for directory in (data_dir / spec.folder, data_dir / spec.torchvision_folder, data_dir):
        found = [_find_file(directory, stem) for stem in _FILES]
        if all(path is not None for path in found):
            return [path for path in found if path is not None]
    return None


def _load_split(images_path: Path, labels_path: Path) -> Tuple[Tensor, Tensor]:
    """Read and cross-validate one images/labels pair."""
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if images.shape[1:] != (_IMAGE_SIZE, _IMAGE_SIZE):
        raise DatasetError(f"{images_path} holds {images.shape[1]}x{images.shape[2]} images, expected 28x28")
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= _NUM_CLASSES:
        raise DatasetError(f"{labels_path} contains label {int(labels.max())}, expected 0..9")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _build(
    spec: _IdxSpec,
    data_dir: Path,
    val_fraction: float,
    seed: int,
    download: bool,
    mirror: MirrorSpec,
) -> DatasetSplits:
    """Locate (or download) and load an IDX dataset."""
    files = _locate(spec, data_dir)
    if download:
        target = files[0].parent if files is not None else data_dir / spec.folder
        for stem in _FILES:
            # ensure_file verifies an existing archive against the published MD5 and re-fetches it if it
            # does not match. An uncompressed file is used as is: there is no published checksum for it.
            if not (target / stem).is_file():
                ensure_file(spec.name, f"{stem}.gz", target, mirror=mirror)
        files = _locate(spec, data_dir)
    if files is None:
        expected = ", ".join(f"{stem}[.gz]" for stem in _FILES)
        raise DatasetError(
            f"{spec.title} not found: expected {expected} in {data_dir / spec.folder} "
            f"(or {data_dir / spec.torchvision_folder}); pass download=True (CLI: --download) to fetch them"
        )
    logger.info("loading %s from %s", spec.title, files[0].parent)
    try:
        train_images, train_labels = _load_split(files[0], files[1])
        test_images, test_labels = _load_split(files[2], files[3])
    except DatasetError as exc:
        # Say how to recover, not only what is wrong.
        raise DatasetError(
            f"{exc}; delete the {spec.title} files in {files[0].parent} and pass download=True (CLI: --download)"
        ) from exc
    return make_in_memory_splits(
        spec.name,
        train_images,
        train_labels,
        test_images,
        test_labels,
        num_classes=_NUM_CLASSES,
        mean=spec.mean,
        std=spec.std,
        val_fraction=val_fraction,
        seed=seed,
    )


def _register(name: str, title: str) -> Callable[..., DatasetSplits]:
    """Define and register the builder of one IDX dataset; MNIST and Fashion-MNIST differ only in their files."""

    def builder(
        data_dir: Path,
        *,
        val_fraction: float,
        seed: int,
        download: bool,
        augment: bool,
        mirror: MirrorSpec = None,
    ) -> DatasetSplits:
        return _build(_SPECS[name], data_dir, val_fraction, seed, download, mirror)

    builder.__name__ = builder.__qualname__ = f"build_{name}"
    builder.__doc__ = f"""Build the {title} splits (60000 train incl. validation, 10000 test, 1 x 28 x 28).

    Args:
        data_dir: Root directory (files in ``<data_dir>/{name}``).
        val_fraction: Fraction of the official training images held out for validation.
        seed: Seed of the train/validation split.
        download: Fetch the official files if they are missing.
        augment: Unused (no augmentation for {title}).
        mirror: Base URL(s) replacing the official download locations.

    Raises:
        DatasetError: If the files are missing, corrupt or cannot be downloaded.
    """
    return register_dataset(name, f"{title}: 1 x 28 x 28, 10 classes (IDX files, downloadable)")(builder)


build_mnist = _register("mnist", "MNIST")
build_fashion_mnist = _register("fashion_mnist", "Fashion-MNIST")
