"""ImageNet (ILSVRC2012) and any dataset in the ImageFolder layout, decoded with Pillow.

Expected layout (``<data_dir>/imagenet`` or ``<data_dir>`` itself)::

    train/<class>/<image>.JPEG     e.g. train/n01440764/n01440764_10026.JPEG
    val/<class>/<image>.JPEG       the same class folder names as train/

Classes are the sorted sub-folder names of ``train/`` (label ``i`` is the ``i``-th name) and ``val/``
must have exactly the same sub-folders. The official validation images come as one flat folder; they
have to be moved into class folders first (e.g. with the widely used ``valprep.sh`` script).

Honest evaluation: ``val/`` (the official validation set) is used as the *test* split, and the
validation split used for model selection is held out from ``train/``. ImageNet needs a registration
at https://image-net.org, so it is never downloaded; ``download=True`` has no effect.

Transforms: training samples (when ``augment``) get a random-resized crop (``scale`` 0.08-1 of the
area, aspect ratio 3/4-4/3) to ``image_size`` and a horizontal flip; validation and test samples are
resized (shorter side ``resize_size``) and center-cropped to ``image_size``. Pillow is imported only
when this dataset is used.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .base import DatasetError, DatasetInfo, DatasetSplits, stratified_split
from .registry import register_dataset
from .transforms import (
    CenterCrop,
    Compose,
    Normalize,
    PILToTensor,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    require_pil,
)

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "build_imagenet", "load_rgb", "scan_image_folder"]

logger = logging.getLogger(__name__)

#: File extensions (lower case) recognised as images.
IMAGE_EXTENSIONS: Tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def load_rgb(path: Path) -> object:
    """Decode an image file as an RGB ``PIL.Image``.

    Args:
        path: Image file.

    Returns:
        The decoded RGB image (grayscale, palette and CMYK images are converted).

    Raises:
        ImportError: If Pillow is missing.
        DatasetError: If the file cannot be decoded.
    """
    image_module = require_pil()
    try:
        with open(path, "rb") as handle:
            # convert() forces the decode while the file is still open.
            return image_module.open(handle).convert("RGB")
    except (OSError, ValueError, image_module.DecompressionBombError) as exc:
        raise DatasetError(f"cannot decode image {path} ({exc})") from exc


def scan_image_folder(
    root: Path,
    classes: Optional[Sequence[str]] = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> Tuple[List[str], List[str], List[int]]:
    """List the images of an ImageFolder-style directory.

    Args:
        root: Directory with one sub-folder per class (images may be nested deeper).
        classes: Class folder names to use, in label order; default: the sorted sub-folder names.
        extensions: Accepted file extensions (compared case-insensitively).

    Returns:
        ``(classes, relative_paths, targets)``, with files sorted within each class so the order is
        deterministic across file systems.

    Raises:
        DatasetError: If a class folder is missing or holds no image.
    """
    exts = tuple(e.lower() for e in extensions)
    if classes is None:
        classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    paths: List[str] = []
    targets: List[int] = []
    for label, name in enumerate(classes):
        class_dir = root / name
        if not class_dir.is_dir():
            raise DatasetError(f"class folder {class_dir} is missing")
        before = len(paths)
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames.sort()
            for filename in sorted(filenames):
                if filename.lower().endswith(exts):
                    paths.append(os.path.relpath(os.path.join(dirpath, filename), root))
                    targets.append(label)
        if len(paths) == before:
            raise DatasetError(f"class folder {class_dir} holds no image files ({', '.join(exts)})")
    return list(classes), paths, targets


class ImageFolderDataset(Dataset):
    """Images decoded from files on demand, with a per-sample transform.

    Paths are kept in one numpy byte-string array rather than a list of Python strings: with
    ``fork``-ed ``DataLoader`` workers, touching millions of Python objects (reference counts) would
    copy their memory pages into every worker.

    Args:
        root: Directory the relative paths are relative to.
        paths: Relative image paths.
        targets: Label of each path.
        transform: Maps a decoded RGB ``PIL.Image`` to the normalised ``float32`` tensor.
        indices: Optional subset of the samples (default: all).
        classes: Class names in label order (kept for reference).
    """

    def __init__(
        self,
        root: Path,
        paths: Sequence[str],
        targets: Sequence[int],
        transform: Callable[[object], Tensor],
        indices: Optional[Tensor] = None,
        classes: Sequence[str] = (),
    ) -> None:
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        self.root = Path(root)
        self.paths = np.array([os.fsencode(p) for p in paths], dtype=np.bytes_) if len(paths) else np.array([], "S1")
        self.labels = torch.as_tensor(list(targets), dtype=torch.long)
        self.transform = transform
        self.indices = None if indices is None else indices.to(torch.long)
        self.classes = list(classes)

    def __len__(self) -> int:
        """Number of samples in this view."""
        return len(self.paths) if self.indices is None else self.indices.numel()

    def _position(self, index: int) -> int:
        """Map a position in this view to a row of the path array."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of size {len(self)}")
        return int(self.indices[index]) if self.indices is not None else int(index) % len(self.paths)

    def path(self, index: int) -> Path:
        """Full path of the ``index``-th sample of this view.

        Args:
            index: Position within this view.

        Returns:
            The image file path.
        """
        return self.root / os.fsdecode(bytes(self.paths[self._position(index)]))

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        """Decode, transform and return one sample.

        Args:
            index: Position within this view.

        Returns:
            The normalised ``float32`` ``(3, H, W)`` image and its label.
        """
        i = self._position(index)
        image = load_rgb(self.root / os.fsdecode(bytes(self.paths[i])))
        return self.transform(image), int(self.labels[i])

    def view(self, indices: Optional[Tensor], transform: Callable[[object], Tensor]) -> "ImageFolderDataset":
        """Return another view of the same files (sharing the path array) with its own subset and transform.

        Args:
            indices: Rows of the full file list to include (``None``: all).
            transform: Transform of the new view.

        Returns:
            The new dataset view.
        """
        other = copy.copy(self)
        other.indices = None if indices is None else indices.to(torch.long)
        other.transform = transform
        return other

    @property
    def targets(self) -> Tensor:
        """Labels of the samples of this view, in order."""
        return self.labels if self.indices is None else self.labels[self.indices]

    def __repr__(self) -> str:
        """Short description with the root, size and transform."""
        return f"{type(self).__name__}(root={str(self.root)!r}, size={len(self)}, transform={self.transform!r})"


def _locate(data_dir: Path) -> Optional[Path]:
    """Return the first candidate directory holding both ``train/`` and ``val/``."""
    for candidate in (data_dir / "imagenet", data_dir):
        if (candidate / "train").is_dir() and (candidate / "val").is_dir():
            return candidate
    return None


def _check_val_classes(root: Path, classes: List[str]) -> None:
    """Raise a clear error unless ``val/`` has exactly the class folders of ``train/``."""
    val_dir = root / "val"
    val_classes = sorted(entry.name for entry in os.scandir(val_dir) if entry.is_dir())
    if val_classes == classes:
        return
    if not val_classes:
        raise DatasetError(
            f"{val_dir} has no class sub-folders; move the validation images into one folder per class "
            f"named like those in {root / 'train'} (e.g. with the valprep.sh script)"
        )
    missing = sorted(set(classes) - set(val_classes))
    extra = sorted(set(val_classes) - set(classes))
    raise DatasetError(
        f"{val_dir} must have the same class folders as {root / 'train'}: "
        f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]})"
    )


@register_dataset("imagenet", "ImageNet from train/ and val/ image folders (needs Pillow; not downloadable)")
def build_imagenet(
    data_dir: Path,
    *,
    val_fraction: float,
    seed: int,
    download: bool,
    augment: bool,
    image_size: int = 224,
    resize_size: Optional[int] = None,
    scale: Tuple[float, float] = (0.08, 1.0),
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> DatasetSplits:
    """Build ImageNet splits from ``train/`` and ``val/`` image folders.

    Args:
        data_dir: Root directory (``<data_dir>/imagenet/{train,val}`` or ``<data_dir>/{train,val}``).
        val_fraction: Fraction of ``train/`` held out (stratified) for validation; about 0.01-0.02
            (13-26k images) is plenty for model selection on ImageNet.
        seed: Seed of the train/validation split.
        download: Has no effect: ImageNet cannot be downloaded without registration.
        augment: Random-resized crop and horizontal flip for training samples.
        image_size: Side of the crops fed to the network.
        resize_size: Shorter side after resizing for evaluation (default ``image_size / 0.875``,
            i.e. 256 for 224).
        scale: Area range of the random-resized crop.
        ratio: Aspect-ratio range of the random-resized crop.

    Returns:
        The splits; ``test`` is the official ``val/`` folder.

    Raises:
        ImportError: If Pillow is missing.
        DatasetError: If the folders are missing or inconsistent.
    """
    require_pil()  # fail before scanning a million files if images could not be decoded anyway
    root = _locate(data_dir)
    if root is None:
        raise DatasetError(
            f"ImageNet not found: expected train/ and val/ folders of class sub-folders in {data_dir / 'imagenet'} "
            f"(or {data_dir}); it cannot be downloaded automatically (--download/download=True does not apply): "
            f"get ILSVRC2012 from https://image-net.org"
        )
    if download:
        logger.warning("download=True ignored for imagenet: it requires registration at image-net.org")
    logger.info("scanning ImageNet folders in %s", root)
    classes, train_paths, train_targets = scan_image_folder(root / "train")
    if not classes:
        raise DatasetError(f"{root / 'train'} has no class sub-folders")
    _check_val_classes(root, classes)
    _, test_paths, test_targets = scan_image_folder(root / "val", classes)

    if resize_size is None:
        resize_size = int(round(image_size / 0.875))
    normalize = Normalize(_MEAN, _STD)
    eval_transform = Compose([Resize(resize_size), CenterCrop(image_size), PILToTensor(), normalize])
    train_transform = (
        Compose([RandomResizedCrop(image_size, scale, ratio), PILToTensor(), RandomHorizontalFlip(), normalize])
        if augment
        else eval_transform
    )

    full_train = ImageFolderDataset(root / "train", train_paths, train_targets, eval_transform, None, classes)
    train_idx, val_idx = stratified_split(full_train.labels, val_fraction, seed)
    train = full_train.view(train_idx, train_transform)
    val = full_train.view(val_idx, eval_transform) if val_idx.numel() else None
    test = ImageFolderDataset(root / "val", test_paths, test_targets, eval_transform, None, classes)
    info = DatasetInfo(
        name="imagenet",
        num_classes=len(classes),
        in_channels=3,
        image_size=int(image_size),
        mean=_MEAN,
        std=_STD,
        num_train=len(train),
        num_val=0 if val is None else len(val),
        num_test=len(test),
    )
    return DatasetSplits(train=train, val=val, test=test, info=info)
