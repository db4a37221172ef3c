"""CIFAR-10 and CIFAR-100 from the official "python version" pickle batches.

Expected layout (what the official archives extract to)::

    <data_dir>/cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch
    <data_dir>/cifar-100-python/train, test

Each batch is a pickled dict with ``b"data"`` (``uint8`` array ``N x 3072``: 1024 red, 1024 green then
1024 blue values of a 32x32 image in row-major order) and ``b"labels"`` (CIFAR-10) or
``b"fine_labels"`` (CIFAR-100). The official files were written by Python 2, so they are read with
``encoding="latin1"`` and both ``str`` and ``bytes`` keys are accepted.

If the extracted folder is missing but the official archive (``cifar-10-python.tar.gz`` /
``cifar-100-python.tar.gz``) is in ``<data_dir>``, the archive is checked against its published MD5
and extracted. ``download=True`` fetches (or re-fetches a corrupt) archive first.

Pickle can execute code, so batches are read with an unpickler that only allows the few numpy
functions needed to rebuild arrays.

Training augmentation (when ``augment``): random 32x32 crop of the image zero-padded by 4 pixels,
then a horizontal flip with probability 0.5.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch
from torch import Tensor

from .base import DatasetError, DatasetSplits, make_in_memory_splits
from .download import CHECKSUMS, MirrorSpec, check_integrity, ensure_file, extract_tar
from .registry import register_dataset
from .transforms import Compose, RandomCrop, RandomHorizontalFlip

__all__ = ["build_cifar10", "build_cifar100", "load_cifar_batch"]

logger = logging.getLogger(__name__)

_IMAGE_SIZE = 32
_PIXELS = 3 * _IMAGE_SIZE * _IMAGE_SIZE


@dataclass(frozen=True)
class _CifarSpec:
    """Files, label key and statistics of one CIFAR variant."""

    name: str
    title: str
    archive: str
    folder: str
    train_files: Tuple[str, ...]
    test_files: Tuple[str, ...]
    label_key: str
    num_classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


_SPECS = {
    "cifar10": _CifarSpec(
        "cifar10",
        "CIFAR-10",
        "cifar-10-python.tar.gz",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "labels",
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": _CifarSpec(
        "cifar100",
        "CIFAR-100",
        "cifar-100-python.tar.gz",
        "cifar-100-python",
        ("train",),
        ("test",),
        "fine_labels",
        100,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
    ),
}

# (module, name) pairs a CIFAR batch may reference: numpy's array reconstruction helpers (old and
# numpy>=2 module paths) and the codec Python 3 uses to pickle bytes with protocol 2.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except numpy's array-rebuilding helpers."""

    def find_class(self, module: str, name: str) -> Any:
        """Resolve an allowed global, mapping numpy 1.x module paths to numpy 2.x ones.

        Args:
            module: Module path recorded in the pickle.
            name: Attribute name recorded in the pickle.

        Returns:
            The referenced object.

        Raises:
            pickle.UnpicklingError: If the global is not allowed.
        """
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            # numpy>=2 moved numpy.core to numpy._core; the old path only emits deprecation warnings.
            module = "numpy._core." + module[len("numpy.core.") :]
        return super().find_class(module, name)


def load_cifar_batch(path: Path, label_key: str) -> Tuple[Tensor, Tensor]:
    """Read one CIFAR pickle batch.

    Args:
        path: Batch file.
        label_key: ``"labels"`` (CIFAR-10) or ``"fine_labels"`` (CIFAR-100).

    Returns:
        ``uint8`` images of shape ``(N, 3, 32, 32)`` and ``int64`` labels of shape ``(N,)``.

    Raises:
        DatasetError: If the file is not a valid CIFAR batch.
    """
    try:
        with open(path, "rb") as handle:
            raw = _RestrictedUnpickler(handle, encoding="latin1").load()
    except Exception as exc:  # pickle raises many types (UnpicklingError, EOFError, ValueError, ...)
        raise DatasetError(f"{path} is not a valid CIFAR batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(raw, dict):
        raise DatasetError(f"{path} is not a valid CIFAR batch (a {type(raw).__name__}, expected a dict)")
    batch: Dict[str, Any] = {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in raw.items()}
    if "data" not in batch or label_key not in batch:
        raise DatasetError(f"{path} lacks the keys 'data' and {label_key!r} (has {sorted(batch)})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise DatasetError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, {_PIXELS})")
    if labels.shape != (data.shape[0],):
        raise DatasetError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}")
    images = torch.from_numpy(data.reshape(-1, 3, _IMAGE_SIZE, _IMAGE_SIZE).copy())
    return images, torch.from_numpy(labels)


def _missing(directory: Path, names: List[str]) -> List[str]:
    """Names of the files absent from ``directory``."""
    return [name for name in names if not (directory / name).is_file()]


def _prepare(spec: _CifarSpec, data_dir: Path, download: bool, mirror: MirrorSpec) -> Path:
    """Return the folder holding the batches, extracting or downloading the archive when needed."""
    needed = list(spec.train_files + spec.test_files)
    folder = data_dir / spec.folder
    if not _missing(folder, needed):
        return folder
    if not _missing(data_dir, needed):
        return data_dir  # data_dir points at the extracted folder itself
    archive = data_dir / spec.archive
    if download:
        ensure_file(spec.name, spec.archive, data_dir, mirror=mirror)
    elif archive.is_file():
        if not check_integrity(archive, CHECKSUMS[spec.name][spec.archive]):
            raise DatasetError(
                f"{archive} fails its MD5 check (expected {CHECKSUMS[spec.name][spec.archive]}); delete it and "
                f"pass download=True (CLI: --download) to fetch it again"
            )
    else:
        raise DatasetError(
            f"{spec.title} not found: expected {', '.join(needed)} in {folder} (or the archive {spec.archive} "
            f"in {data_dir}); pass download=True (CLI: --download) to fetch it"
        )
    logger.info("extracting %s into %s", archive, data_dir)
    extract_tar(archive, data_dir)
    missing = _missing(folder, needed)
    if missing:
        raise DatasetError(
            f"{archive} did not provide {', '.join(missing)} in {folder}; the archive is not {spec.title}"
        )
    return folder


def _build(
    spec: _CifarSpec,
    data_dir: Path,
    val_fraction: float,
    seed: int,
    download: bool,
    augment: bool,
    mirror: MirrorSpec,
) -> DatasetSplits:
    """Locate, extract or download, then load a CIFAR variant."""
    folder = _prepare(spec, data_dir, download, mirror)
    logger.info("loading %s from %s", spec.title, folder)

    def load(names: Tuple[str, ...]) -> Tuple[Tensor, Tensor]:
        try:
            parts = [load_cifar_batch(folder / name, spec.label_key) for name in names]
        except DatasetError as exc:
            # Say how to recover, not only what is wrong.
            raise DatasetError(
                f"{exc}; delete {folder} and pass download=True (CLI: --download) to fetch {spec.archive} again"
            ) from exc
        images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= spec.num_classes):
            raise DatasetError(
                f"{spec.title} labels in {folder} fall outside 0..{spec.num_classes - 1}; corrupt or wrong files"
            )
        return images, labels

    train_images, train_labels = load(spec.train_files)
    test_images, test_labels = load(spec.test_files)
    augmentation = Compose([RandomCrop(_IMAGE_SIZE, padding=4), RandomHorizontalFlip()]) if augment else None
    return make_in_memory_splits(
        spec.name,
        train_images,
        train_labels,
        test_images,
        test_labels,
        num_classes=spec.num_classes,
        mean=spec.mean,
        std=spec.std,
        val_fraction=val_fraction,
        seed=seed,
        train_augmentation=augmentation,
    )


def _register(name: str, title: str, folder: str, classes: int) -> Callable[..., DatasetSplits]:
    """Define and register the builder of one CIFAR dataset; CIFAR-10 and -100 differ only in their files."""

    def builder(
        data_dir: Path,
        *,
        val_fraction: float,
        seed: int,
        download: bool,
        augment: bool,
        mirror: MirrorSpec = None,
    ) -> DatasetSplits:
        return _build(_SPECS[name], data_dir, val_fraction, seed, download, augment, mirror)

    builder.__name__ = builder.__qualname__ = f"build_{name}"
    builder.__doc__ = f"""Build the {title} splits (50000 train incl. validation, 10000 test, 3 x 32 x 32,
    {classes} classes).

    Args:
        data_dir: Root directory (files in ``<data_dir>/{folder}``).
        val_fraction: Fraction of the official training images held out for validation.
        seed: Seed of the train/validation split.
        download: Fetch the official archive if the files are missing.
        augment: Random crop (padding 4) and horizontal flip for training samples.
        mirror: Base URL(s) replacing the official download location.

    Raises:
        DatasetError: If the files are missing, corrupt or cannot be downloaded.
    """
    return register_dataset(name, f"{title}: 3 x 32 x 32, {classes} classes (python batches, downloadable)")(builder)


build_cifar10 = _register("cifar10", "CIFAR-10", "cifar-10-batches-py", 10)
build_cifar100 = _register("cifar100", "CIFAR-100", "cifar-100-python", 100)
