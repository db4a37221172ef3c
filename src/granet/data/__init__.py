"""Datasets for granet: a name registry and loaders returning ``torch.utils.data.Dataset`` splits.

Use :func:`build_datasets` with one of :func:`list_datasets`::

    splits = build_datasets("cifar10", "data", val_fraction=0.1, seed=0, download=True)
    loader = DataLoader(splits.train, batch_size=128, shuffle=True)

Evaluation protocol: ``splits.val`` is held out (stratified by class, seeded by ``seed``) from the
official *training* split and is the split to use for model selection (best epoch, hyper-parameters);
``splits.test`` is the official test split and is only for reporting. With ``val_fraction=0`` there is
no validation split (``splits.val is None``) and model selection falls back to the last epoch.
Training samples are augmented when ``augment=True``; validation and test samples never are.
Every sample is ``(image, label)``: a normalised ``float32`` ``(C, H, W)`` tensor and an ``int``
(``(C, L)`` for 1-D signals: ``info.signal`` is true and ``info.input_shape`` says which).
Augmentation draws from torch's global RNG, so ``torch.manual_seed`` plus the ``DataLoader``'s
per-worker seeding make runs reproducible.

Datasets (layout below ``data_dir``, default ``$GRANET_DATA_DIR`` or ``./data``):

* ``digits``: scikit-learn's bundled 8x8 digits (no files needed), fixed 20% test split.
* ``synthetic``: seeded random images with learnable labels (no files needed).
* ``mnist`` / ``fashion_mnist``: IDX files in ``mnist/`` / ``fashion_mnist/`` (downloadable).
* ``cifar10`` / ``cifar100``: pickle batches in ``cifar-10-batches-py/`` / ``cifar-100-python/``
  (downloadable as the official ``.tar.gz``).
* ``imagenet``: ``imagenet/train/<class>/*`` and ``imagenet/val/<class>/*`` (needs Pillow; not
  downloadable).
* ``mnist1d``: MNIST-1D, 1-D signals ``(1, 40)`` generated offline by the ``mnist1d`` package
  (the ``[mnist1d]`` extra) and cached in ``mnist1d/`` with a checksum; option ``num_samples``.

Missing or corrupt files raise :class:`DatasetError` with a one-line message naming the expected
files, their directory and, where possible, how to download them. Downloads are checked against the
published MD5 checksums; set ``GRANET_DATA_MIRROR`` (or pass ``mirror=...``) to use a mirror.
"""

from __future__ import annotations

# The built-in loaders register their datasets when imported (they import the registry, never the reverse).
from . import cifar, digits, imagenet, mnist, mnist1d, synthetic  # noqa: F401
from .base import (
    DATA_DIR_ENV_VAR,
    DatasetError,
    DatasetInfo,
    DatasetSplits,
    InMemoryImageDataset,
    InMemorySignalDataset,
    default_data_dir,
    stratified_split,
)
from .download import CHECKSUMS, MIRROR_ENV_VAR, MIRRORS, check_integrity, md5sum
from .imagenet import ImageFolderDataset
from .registry import (
    build_datasets,
    dataset_input_shape,
    dataset_shape,
    describe_dataset,
    list_datasets,
    register_dataset,
)

__all__ = [
    "CHECKSUMS",
    "DATA_DIR_ENV_VAR",
    "MIRRORS",
    "MIRROR_ENV_VAR",
    "DatasetError",
    "DatasetInfo",
    "DatasetSplits",
    "ImageFolderDataset",
    "InMemoryImageDataset",
    "InMemorySignalDataset",
    "build_datasets",
    "check_integrity",
    "dataset_input_shape",
    "dataset_shape",
    "default_data_dir",
    "describe_dataset",
    "list_datasets",
    "md5sum",
    "register_dataset",
    "stratified_split",
]
