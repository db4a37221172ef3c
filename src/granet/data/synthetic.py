"""Seeded random images with learnable labels, for smoke tests and benchmarks.

Each class has a random prototype image (pixel intensities uniform in [0.25, 0.75]); a sample is
its class prototype plus Gaussian noise (standard deviation ``noise``), clipped and quantised to
``uint8``. The classes are therefore separable, so a smoke test can watch the loss fall, while the
tensors have exactly the shapes of a real dataset. Labels are balanced (``i % num_classes``,
shuffled). The data depends only on ``data_seed``; ``seed`` only controls the train/validation
split. No augmentation is applied (``augment`` has no effect).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Tuple

import torch
from torch import Tensor

from .base import DatasetSplits, make_in_memory_splits
from .registry import register_dataset

__all__ = ["build_synthetic"]

_SEED_SALT = 0x6772616E6574  # "granet" in ASCII
#: The most pixel values of one split (its float32 noise is drawn in one piece: 1 GiB at the limit).
MAX_VALUES = 1 << 28


def _sample(prototypes: Tensor, n: int, noise: float, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """Draw ``n`` balanced, shuffled samples around the class prototypes."""
    num_classes = prototypes.shape[0]
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=generator)]
    images = prototypes[labels] + noise * torch.randn((n,) + tuple(prototypes.shape[1:]), generator=generator)
    return images.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8), labels


@register_dataset("synthetic", "seeded random images with learnable labels, classes and size as options (no files)")
def build_synthetic(
    data_dir: Path,
    *,
    val_fraction: float,
    seed: int,
    download: bool,
    augment: bool,
    num_classes: int = 10,
    image_size: int = 32,
    in_channels: int = 3,
    num_train: int = 512,
    num_test: int = 128,
    noise: float = 0.15,
    data_seed: int = 0,
) -> DatasetSplits:
    """Build synthetic splits.

    Args:
        data_dir: Unused.
        val_fraction: Fraction of the ``num_train`` samples held out for validation.
        seed: Seed of the train/validation split.
        download: Unused.
        augment: Unused (no augmentation).
        num_classes: Number of classes.
        image_size: Height and width of the images.
        in_channels: Number of channels.
        num_train: Size of the "official" training split (before the validation hold-out).
        num_test: Size of the test split.
        noise: Standard deviation of the per-pixel noise, in ``[0, 1]`` pixel units.
        data_seed: Seed of the generated data.

    Returns:
        The splits of ``in_channels x image_size x image_size`` images.

    Raises:
        ValueError: If a size is not positive, a split would hold more than :data:`MAX_VALUES` pixel
            values, or ``noise`` is negative.
    """
    sizes = dict(num_classes=num_classes, image_size=image_size, in_channels=in_channels, num_train=num_train,
                 num_test=num_test)
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"synthetic dataset option {name} must be a positive integer, got {value!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise ValueError(f"synthetic dataset option noise must be a number >= 0, got {noise!r}")
    per_image = in_channels * image_size * image_size
    for name in ("num_train", "num_test"):
        if sizes[name] * per_image > MAX_VALUES:
            raise ValueError(f"synthetic dataset option {name}={sizes[name]:,} with {in_channels}x{image_size}x"
                             f"{image_size} images is {sizes[name] * per_image:,} pixel values; a split is "
                             f"limited to {MAX_VALUES:,} (2^28)")
    # Salt the seed: with a plain `manual_seed(data_seed)` the prototypes would be the very random
    # numbers `torch.manual_seed(0); nn.Linear(...)` draws for its weights, so an untrained model
    # would already "know" the classes.
    generator = torch.Generator().manual_seed(_SEED_SALT + int(data_seed))
    shape = (int(num_classes), int(in_channels), int(image_size), int(image_size))
    prototypes = 0.25 + 0.5 * torch.rand(shape, generator=generator)
    train_images, train_labels = _sample(prototypes, int(num_train), float(noise), generator)
    test_images, test_labels = _sample(prototypes, int(num_test), float(noise), generator)
    # Prototype pixels are U(0.25, 0.75) (variance 1/48) plus independent noise: the exact population
    # statistics, ignoring the rare clipping, so normalised inputs have roughly zero mean and unit variance.
    std = math.sqrt(1.0 / 48.0 + float(noise) ** 2)
    return make_in_memory_splits(
        "synthetic",
        train_images,
        train_labels,
        test_images,
        test_labels,
        num_classes=int(num_classes),
        mean=(0.5,) * int(in_channels),
        std=(std,) * int(in_channels),
        val_fraction=val_fraction,
        seed=seed,
    )
