"""Core types shared by every dataset loader: metadata, split containers, errors and splitting.

The loaders keep the decoded images of small datasets (digits, MNIST, CIFAR) in one ``uint8`` tensor
and hand out *views* of it (an index tensor plus a transform), so the train and validation subsets of
the official training split share memory while applying different transforms.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import GranetError
from .transforms import Compose, Normalize

__all__ = [
    "DATA_DIR_ENV_VAR",
    "DatasetError",
    "DatasetInfo",
    "DatasetSplits",
    "InMemoryImageDataset",
    "InMemorySignalDataset",
    "default_data_dir",
    "make_in_memory_splits",
    "make_signal_splits",
    "stratified_split",
]

#: Environment variable naming the default root directory for dataset files.
DATA_DIR_ENV_VAR = "GRANET_DATA_DIR"


class DatasetError(GranetError):
    """A dataset is missing, incomplete, corrupt or could not be downloaded.

    The message is a single line that names the expected files, the directory where they belong and,
    where the dataset can be fetched automatically, how to download it.
    """


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a built dataset.

    Attributes:
        name: Registry name of the dataset (e.g. ``"cifar10"``).
        num_classes: Number of target classes; labels are ``0 .. num_classes - 1``.
        in_channels: Number of image channels of the returned tensors.
        image_size: Height and width (images are square) of the returned tensors.
        mean: Per-channel mean subtracted during normalisation (pixels scaled to ``[0, 1]``).
        std: Per-channel standard deviation divided out during normalisation.
        num_train: Number of training samples (official train split minus the validation hold-out).
        num_val: Number of validation samples held out from the official train split (0 if none).
        num_test: Number of samples in the official test split.
        signal: ``True`` for 1-D signals: a sample is ``(C, L)`` with ``L = image_size`` (MNIST-1D).
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    num_train: int
    num_val: int
    num_test: int
    signal: bool = False

    @property
    def input_shape(self) -> Tuple[int, ...]:
        """Shape of one sample: ``(C, H, W)`` for images, ``(C, L)`` for 1-D signals."""
        if self.signal:
            return (self.in_channels, self.image_size)
        return (self.in_channels, self.image_size, self.image_size)

    @property
    def input_dims(self) -> int:
        """Spatial dimensions of a sample: 2 for images, 1 for signals."""
        return 1 if self.signal else 2


@dataclass
class DatasetSplits:
    """The three splits of a dataset plus its metadata.

    Attributes:
        train: Training samples (augmented when requested).
        val: Validation samples held out from the official training split, never augmented; ``None``
            when ``val_fraction`` is 0, in which case model selection falls back to the last epoch.
        test: The official test split, never augmented and never used for model selection.
        info: Metadata describing the dataset and the split sizes.
    """

    train: Dataset
    val: Optional[Dataset]
    test: Dataset
    info: DatasetInfo


def default_data_dir() -> Path:
    """Return the default dataset root directory.

    Returns:
        ``$GRANET_DATA_DIR`` when set, otherwise ``./data`` relative to the working directory.
    """
    return Path(os.environ.get(DATA_DIR_ENV_VAR) or "data").expanduser()


def stratified_split(targets: Tensor, fraction: float, seed: int) -> Tuple[Tensor, Tensor]:
    """Split sample indices into a kept part and a held-out part, stratified by class.

    The held-out size is ``round(fraction * n)`` (at least 1 and at most ``n - 1`` when
    ``fraction > 0``). It is shared among classes proportionally to their sizes using the
    largest-remainder method, so the total is exact and every class is represented in proportion.
    Within each class, the held-out samples are chosen by a permutation drawn from a private
    generator seeded with ``seed``: the split depends only on ``targets``, ``fraction`` and ``seed``,
    never on the global RNG state.

    Args:
        targets: 1-D integer tensor with the class of every sample.
        fraction: Fraction of samples to hold out, in ``[0, 1)``.
        seed: Seed of the permutation.

    Returns:
        ``(kept, held_out)``: sorted ``int64`` index tensors that partition ``range(len(targets))``.

    Raises:
        ValueError: If ``fraction`` is outside ``[0, 1)`` or ``targets`` is not 1-D.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    if targets.dim() != 1:
        raise ValueError(f"targets must be 1-D, got shape {tuple(targets.shape)}")
    n = targets.numel()
    n_held = int(round(fraction * n))
    if fraction > 0.0 and n >= 2:
        # A positive fraction must produce a usable (non-empty) hold-out and leave something to train on.
        n_held = min(max(n_held, 1), n - 1)
    elif n < 2:
        n_held = 0
    if n_held == 0:
        return torch.arange(n, dtype=torch.long), torch.empty(0, dtype=torch.long)

    targets = targets.to(torch.long)
    # Group indices by class without a per-class scan (matters for ImageNet's 1.28M samples).
    order = torch.argsort(targets, stable=True)
    _, counts = torch.unique_consecutive(targets[order], return_counts=True)
    quotas = counts.to(torch.float64) * (n_held / n)
    per_class = torch.floor(quotas).to(torch.long)
    shortfall = n_held - int(per_class.sum())
    if shortfall > 0:
        # Largest remainder first; the stable sort breaks ties by class order so the split is deterministic.
        by_remainder = torch.argsort(-(quotas - per_class.to(torch.float64)), stable=True)
        per_class[by_remainder[:shortfall]] += 1

    generator = torch.Generator().manual_seed(int(seed))
    kept, held = [], []
    for group, k in zip(torch.split(order, counts.tolist()), per_class.tolist()):
        shuffled = group[torch.randperm(group.numel(), generator=generator)]
        held.append(shuffled[:k])
        kept.append(shuffled[k:])
    return torch.sort(torch.cat(kept)).values, torch.sort(torch.cat(held)).values


class InMemoryImageDataset(Dataset):
    """A view of in-memory ``uint8`` images with a per-sample transform.

    Several views can share one image tensor (e.g. the train and validation parts of the official
    training split), each with its own index subset and transform.

    Args:
        images: ``uint8`` tensor of shape ``(N, C, H, W)``.
        labels: Integer tensor of shape ``(N,)``.
        transform: Maps one ``uint8`` ``(C, H, W)`` image to the normalised ``float32`` tensor.
        indices: Optional 1-D index tensor selecting the samples of this view (default: all).

    Raises:
        ValueError: If the shapes or dtypes are inconsistent.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        transform: Callable[[Tensor], Tensor],
        indices: Optional[Tensor] = None,
    ) -> None:
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        if labels.dim() != 1 or labels.numel() != images.shape[0]:
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.long)
        self.transform = transform
        self.indices = None if indices is None else indices.to(torch.long)

    def __len__(self) -> int:
        """Number of samples in this view."""
        return self.images.shape[0] if self.indices is None else self.indices.numel()

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        """Return ``(image, label)`` with the transform applied to the image.

        Args:
            index: Position within this view.

        Returns:
            The normalised ``float32`` ``(C, H, W)`` image and its integer label.
        """
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of size {len(self)}")
        i = int(self.indices[index]) if self.indices is not None else int(index) % self.images.shape[0]
        return self.transform(self.images[i]), int(self.labels[i])

    @property
    def targets(self) -> Tensor:
        """Labels of the samples of this view, in order."""
        return self.labels if self.indices is None else self.labels[self.indices]

    def __repr__(self) -> str:
        """Short description with the size and the transform."""
        shape = tuple(self.images.shape[1:])
        return f"{type(self).__name__}(size={len(self)}, image_shape={shape}, transform={self.transform!r})"


def make_in_memory_splits(
    name: str,
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    val_fraction: float,
    seed: int,
    train_augmentation: Optional[Callable[[Tensor], Tensor]] = None,
    max_value: float = 255.0,
) -> DatasetSplits:
    """Build :class:`DatasetSplits` from in-memory official train and test splits.

    The validation subset is held out from the official training split with
    :func:`stratified_split`; train and validation share the training image tensor.

    Args:
        name: Dataset name recorded in the info.
        train_images: ``uint8`` ``(N, C, H, W)`` images of the official training split.
        train_labels: ``(N,)`` labels of the official training split.
        test_images: ``uint8`` ``(M, C, H, W)`` images of the official test split.
        test_labels: ``(M,)`` labels of the official test split.
        num_classes: Number of classes.
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation standard deviation.
        val_fraction: Fraction of the training split held out for validation, in ``[0, 1)``.
        seed: Seed of the train/validation split.
        train_augmentation: Random ``uint8`` tensor transform applied to training samples before
            normalisation, or ``None`` for no augmentation.
        max_value: Pixel value mapped to 1.0 before normalisation.

    Returns:
        The splits; ``val`` is ``None`` when ``val_fraction`` is 0.
    """
    normalize = Normalize(mean, std, max_value=max_value)
    train_transform: Callable[[Tensor], Tensor] = (
        normalize if train_augmentation is None else Compose([train_augmentation, normalize])
    )
    train_idx, val_idx = stratified_split(train_labels, val_fraction, seed)
    train = InMemoryImageDataset(train_images, train_labels, train_transform, train_idx)
    val = InMemoryImageDataset(train_images, train_labels, normalize, val_idx) if val_idx.numel() else None
    test = InMemoryImageDataset(test_images, test_labels, normalize)
    info = DatasetInfo(
        name=name,
        num_classes=int(num_classes),
        in_channels=int(train_images.shape[1]),
        image_size=int(train_images.shape[2]),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        num_train=len(train),
        num_val=0 if val is None else len(val),
        num_test=len(test),
    )
    return DatasetSplits(train=train, val=val, test=test, info=info)


class InMemorySignalDataset(Dataset):
    """A view of in-memory, already normalised ``float32`` samples (1-D signals ``(C, L)``).

    Args:
        samples: ``float32`` tensor of shape ``(N, C, L)``.
        labels: Integer tensor of shape ``(N,)``.
        indices: Optional 1-D index tensor selecting the samples of this view (default: all).

    Raises:
        ValueError: If the shapes or dtypes are inconsistent.
    """

    def __init__(self, samples: Tensor, labels: Tensor, indices: Optional[Tensor] = None) -> None:
        if samples.dim() != 3 or samples.dtype != torch.float32:
            raise ValueError(f"samples must be a float32 (N, C, L) tensor, got {samples.dtype} {tuple(samples.shape)}")
        if labels.dim() != 1 or labels.numel() != samples.shape[0]:
            raise ValueError(f"labels must have shape ({samples.shape[0]},), got {tuple(labels.shape)}")
        self.samples = samples
        self.labels = labels.to(torch.long)
        self.indices = None if indices is None else indices.to(torch.long)

    def __len__(self) -> int:
        """Number of samples in this view."""
        return self.samples.shape[0] if self.indices is None else self.indices.numel()

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        """Return ``(sample, label)`` (the sample is a view: never modify it in place)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of size {len(self)}")
        i = int(self.indices[index]) if self.indices is not None else int(index) % self.samples.shape[0]
        return self.samples[i], int(self.labels[i])

    @property
    def targets(self) -> Tensor:
        """Labels of the samples of this view, in order."""
        return self.labels if self.indices is None else self.labels[self.indices]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={len(self)}, sample_shape={tuple(self.samples.shape[1:])})"


def make_signal_splits(
    name: str,
    train_samples: Tensor,
    train_labels: Tensor,
    test_samples: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int,
    val_fraction: float,
    seed: int,
) -> DatasetSplits:
    """:func:`make_in_memory_splits` for normalised 1-D signals ``(N, C, L)`` (no transform, no augmentation).

    The validation subset is held out from the official training split with :func:`stratified_split`.
    """
    train_idx, val_idx = stratified_split(train_labels, val_fraction, seed)
    train = InMemorySignalDataset(train_samples, train_labels, train_idx)
    val = InMemorySignalDataset(train_samples, train_labels, val_idx) if val_idx.numel() else None
    test = InMemorySignalDataset(test_samples, test_labels)
    channels = int(train_samples.shape[1])
    info = DatasetInfo(
        name=name, num_classes=int(num_classes), in_channels=channels, image_size=int(train_samples.shape[2]),
        mean=(0.0,) * channels, std=(1.0,) * channels, num_train=len(train), num_val=0 if val is None else len(val),
        num_test=len(test), signal=True,
    )
    return DatasetSplits(train=train, val=val, test=test, info=info)
