"""scikit-learn's bundled 8x8 handwritten digits (no download, ideal for fast real-data tests).

The 1797 images (pixel values 0..16, 10 classes) have no official test split, so a fixed stratified
20% (:data:`TEST_FRACTION`, drawn with :data:`TEST_SPLIT_SEED`) is used as the test split for every
run regardless of ``seed``; the validation split is then held out from the remaining 80% with
``seed``. No augmentation is applied: at 8x8 a one-pixel shift already moves 12% of the image, and
this dataset is meant for quick, deterministic experiments, so ``augment`` has no effect.
Normalisation uses the mean and standard deviation of the fixed non-test images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .base import DatasetSplits, make_in_memory_splits, stratified_split
from .registry import register_dataset

__all__ = ["TEST_FRACTION", "TEST_SPLIT_SEED", "build_digits"]

logger = logging.getLogger(__name__)

#: Fraction of the 1797 images used as the (fixed) test split.
TEST_FRACTION = 0.2
#: Seed of the fixed test split; independent of the ``seed`` argument on purpose.
TEST_SPLIT_SEED = 0
_MAX_VALUE = 16.0


@register_dataset("digits", "scikit-learn's 8x8 digits: 1797 images, 10 classes, fixed 20% test split (no files)")
def build_digits(
    data_dir: Path,
    *,
    val_fraction: float,
    seed: int,
    download: bool,
    augment: bool,
) -> DatasetSplits:
    """Build the digits splits.

    Args:
        data_dir: Unused (the data ships with scikit-learn).
        val_fraction: Fraction of the non-test images held out for validation.
        seed: Seed of the train/validation split.
        download: Unused (nothing to download).
        augment: Unused (no augmentation for 8x8 digits, see the module docstring).

    Returns:
        Splits of 1 x 8 x 8 images with 10 classes.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are small integers stored as float64; uint8 keeps memory and per-sample cost low.
    images = torch.from_numpy(bunch.images).round().to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(bunch.target).to(torch.long)
    rest_idx, test_idx = stratified_split(labels, TEST_FRACTION, TEST_SPLIT_SEED)
    rest_images = images[rest_idx]
    # Statistics of the non-test images only, so nothing about the test split leaks into training.
    scaled = rest_images.to(torch.float64) / _MAX_VALUE
    mean, std = (float(scaled.mean()),), (float(scaled.std()),)
    return make_in_memory_splits(
        "digits",
        rest_images,
        labels[rest_idx],
        images[test_idx],
        labels[test_idx],
        num_classes=10,
        mean=mean,
        std=std,
        val_fraction=val_fraction,
        seed=seed,
        train_augmentation=None,
        max_value=_MAX_VALUE,
    )
