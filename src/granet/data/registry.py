"""Name-based registry of dataset builders and the :func:`build_datasets` entry point.

A builder is a function ``builder(data_dir, *, val_fraction, seed, download, augment, **options)``
returning :class:`~granet.data.base.DatasetSplits`; its extra keyword-only parameters are the
dataset-specific ``options`` accepted by :func:`build_datasets`.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any, Callable, List, Optional, Union

from ..registry import Registry, first_doc_line
from .base import DatasetSplits, default_data_dir

__all__ = ["build_datasets", "dataset_input_shape", "dataset_shape", "describe_dataset", "list_datasets",
           "register_dataset"]

#: Datasets whose samples are 1-D signals ``(C, L)`` rather than images ``(C, H, W)``.
SIGNAL_DATASETS = frozenset({"mnist1d"})

logger = logging.getLogger(__name__)

DatasetBuilder = Callable[..., DatasetSplits]

_COMMON_PARAMETERS = ("data_dir", "val_fraction", "seed", "download", "augment")


def _normalise_name(name: str) -> str:
    """Canonical registry key: lower case with ``-`` replaced by ``_`` (``Fashion-MNIST`` works)."""
    return name.strip().lower().replace("-", "_")


_DATASETS: Registry[DatasetBuilder] = Registry("dataset", normalise=_normalise_name)


def register_dataset(name: str, description: Optional[str] = None) -> Callable[[DatasetBuilder], DatasetBuilder]:
    """Decorator registering a dataset builder under ``name``.

    Args:
        name: Registry name.
        description: One line for listings (``granet datasets``); defaults to the first line of the
            builder's docstring.

    Returns:
        A decorator that registers the builder and returns it unchanged.

    Raises:
        ValueError: If ``name`` is already registered to a different builder.
    """

    def decorator(builder: DatasetBuilder) -> DatasetBuilder:
        if name in _DATASETS and _DATASETS.get(name) is builder:
            return builder  # registering the same builder again changes nothing
        return _DATASETS.register(name, builder, first_doc_line(builder) if description is None else description)

    return decorator


def list_datasets() -> List[str]:
    """Return the names of all registered datasets, sorted.

    Returns:
        The dataset names accepted by :func:`build_datasets`.
    """
    return list(_DATASETS.names())


def describe_dataset(name: str) -> str:
    """One-line description of a registered dataset (case-insensitive, ``-`` or ``_``).

    Raises:
        ValueError: If ``name`` is unknown (the message lists the valid names).
    """
    return _DATASETS.describe(name)


def _dataset_options(builder: DatasetBuilder) -> List[str]:
    """Names of the dataset-specific keyword options accepted by ``builder``."""
    return [
        p.name
        for p in inspect.signature(builder).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _COMMON_PARAMETERS
    ]


def build_datasets(
    name: str,
    data_dir: Union[str, os.PathLike, None] = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    download: bool = False,
    augment: bool = True,
    **options: Any,
) -> DatasetSplits:
    """Build the train, validation and test splits of a dataset.

    The validation split is held out (stratified by class, seeded by ``seed``) from the official
    *training* split, and the test split is the official test split, so model selection never sees
    test data. With ``val_fraction == 0`` the ``val`` split is ``None`` and model selection has to
    fall back to the last epoch. Only training samples are augmented (when ``augment``); validation
    and test samples always go through the deterministic evaluation transform. Every sample is an
    ``(image, label)`` pair: a normalised ``float32`` ``(C, H, W)`` tensor and an ``int``.

    Args:
        name: Dataset name, one of :func:`list_datasets` (case-insensitive, ``-`` or ``_``).
        data_dir: Root directory holding the dataset files (default: ``$GRANET_DATA_DIR`` or
            ``./data``). Each loader documents the layout it expects below this root.
        val_fraction: Fraction of the official training split held out for validation, in ``[0, 1)``.
        seed: Seed of the train/validation split (the test split never depends on it).
        download: Fetch missing files from the official (or mirror) locations where possible.
        augment: Apply the dataset's training augmentation to the ``train`` split.
        **options: Dataset-specific options (e.g. ``mirror`` for downloadable datasets,
            ``image_size`` for ``synthetic`` and ``imagenet``).

    Returns:
        The splits and their :class:`~granet.data.base.DatasetInfo`.

    Raises:
        ValueError: If ``name`` is unknown (the message lists valid names) or ``val_fraction`` is
            outside ``[0, 1)``.
        TypeError: If an option is not accepted by the dataset (the message lists valid options).
        DatasetError: If the dataset files are missing, corrupt or cannot be downloaded.
    """
    key = _DATASETS.key(name)
    builder = _DATASETS.get(key)
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    accepted = _dataset_options(builder)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"dataset {key!r} does not accept option(s) {', '.join(unknown)}; "
            f"valid options: {', '.join(accepted) or 'none'}"
        )
    root: Path = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    splits = builder(
        root,
        val_fraction=float(val_fraction),
        seed=int(seed),
        download=bool(download),
        augment=bool(augment),
        **options,
    )
    info = splits.info
    logger.info(
        "dataset %s: %d train / %d val / %d test samples, %d classes, input %s",
        info.name,
        info.num_train,
        info.num_val,
        info.num_test,
        info.num_classes,
        info.input_shape,
    )
    return splits


def dataset_shape(name: str) -> tuple[int, int, int]:
    """Return ``(num_classes, in_channels, image_size)`` of a dataset without loading any data.

    Used to build a model of the right shape (e.g. to count its FLOPs) when the dataset files are
    not at hand. The shapes of the built-in datasets are those their loaders produce; ``synthetic``
    (and any registered builder with ``num_classes``/``in_channels``/``image_size`` keyword defaults)
    reports its builder's defaults; ``imagenet`` is the standard 1000-class, 3 x 224 x 224 setting.

    Args:
        name: Dataset name, one of :func:`list_datasets` (case-insensitive, ``-`` or ``_``).

    Returns:
        ``(num_classes, in_channels, image_size)``; images are ``in_channels x image_size x image_size``.

    Raises:
        ValueError: If ``name`` is unknown (the message lists valid names), or the dataset's shape
            cannot be known without loading it.
    """
    known = {
        "digits": (10, 1, 8),
        "mnist": (10, 1, 28),
        "fashion_mnist": (10, 1, 28),
        "cifar10": (10, 3, 32),
        "cifar100": (100, 3, 32),
        "imagenet": (1000, 3, 224),
        "mnist1d": (10, 1, 40),  # 1-D signals of length 40 (see dataset_input_shape)
    }
    key = _DATASETS.key(name)
    builder = _DATASETS.get(key)
    if key in known:
        return known[key]
    defaults = {
        p.name: p.default
        for p in inspect.signature(builder).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
    }
    fields = ("num_classes", "in_channels", "image_size")
    if all(isinstance(defaults.get(f), int) for f in fields):
        return tuple(int(defaults[f]) for f in fields)  # type: ignore[return-value]
    raise ValueError(f"the shape of dataset {key!r} is only known after loading it")


def dataset_input_shape(name: str) -> tuple[int, tuple[int, ...]]:
    """``(num_classes, shape of one sample)`` of a dataset without loading any data.

    The sample shape is ``(C, H, W)`` for images and ``(C, L)`` for 1-D signals (MNIST-1D); see
    :func:`dataset_shape` for the errors.
    """
    num_classes, channels, size = dataset_shape(name)
    if _normalise_name(name) in SIGNAL_DATASETS:
        return num_classes, (channels, size)
    return num_classes, (channels, size, size)
