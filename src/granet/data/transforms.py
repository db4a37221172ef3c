"""Image transforms implemented with torch and (lazily imported) Pillow.

Two kinds of transforms exist:

* tensor transforms (:class:`RandomCrop`, :class:`RandomHorizontalFlip`, :class:`Normalize`) act on a
  ``(C, H, W)`` tensor, usually still ``uint8`` so cropping and flipping move 4x less memory;
* Pillow transforms (:class:`RandomResizedCrop`, :class:`Resize`, :class:`CenterCrop`,
  :class:`PILToTensor`) act on decoded ``PIL.Image`` objects, for image-folder datasets.

Every random decision draws from torch's *global* RNG. ``DataLoader`` seeds that RNG differently in
each worker from the main process's generator, so ``torch.manual_seed`` makes augmentation
reproducible and workers do not repeat each other's crops.

All transforms are module-level classes rather than closures so datasets stay picklable for
``DataLoader`` workers started with ``spawn``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..errors import install_hint

__all__ = [
    "CenterCrop",
    "Compose",
    "Normalize",
    "PILToTensor",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "Resize",
    "require_pil",
]


def require_pil() -> Any:
    """Import and return ``PIL.Image``.

    Returns:
        The ``PIL.Image`` module.

    Raises:
        ImportError: If Pillow is not installed, with the command that installs it.
    """
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow is installed in the test environment
        raise ImportError(
            f"Pillow is required to decode image files (imagenet dataset): {install_hint('images', 'Pillow')}"
        ) from exc
    return Image


def _randint(high: int) -> int:
    """Uniform integer in ``[0, high)`` from torch's global RNG."""
    return int(torch.randint(0, high, (1,)).item())


def _uniform(low: float, high: float) -> float:
    """Uniform float in ``[low, high)`` from torch's global RNG."""
    return float(torch.empty(1).uniform_(low, high).item())


class Compose:
    """Apply transforms one after the other.

    Args:
        transforms: Callables applied in order.
    """

    def __init__(self, transforms: Sequence[Callable[[Any], Any]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: Any) -> Any:
        """Apply every transform in order.

        Args:
            x: Input image (tensor or PIL image).

        Returns:
            The transformed image.
        """
        for transform in self.transforms:
            x = transform(x)
        return x

    def __repr__(self) -> str:
        """List the composed transforms."""
        return f"Compose({', '.join(repr(t) for t in self.transforms)})"


class RandomCrop:
    """Random square crop of a ``(C, H, W)`` tensor after zero-padding each border.

    Matches the usual CIFAR augmentation (``size=32, padding=4``): the image is padded with zeros
    (black, as torchvision pads PIL images) and a window of ``size`` is taken at a uniformly random
    offset, so shifts of up to ``padding`` pixels in each direction are equally likely.

    Args:
        size: Side of the output crop.
        padding: Zero padding added to each border before cropping.

    Raises:
        ValueError: If ``size`` is not positive or ``padding`` is negative.
    """

    def __init__(self, size: int, padding: int = 0) -> None:
        if size <= 0 or padding < 0:
            raise ValueError(f"need size > 0 and padding >= 0, got size={size}, padding={padding}")
        self.size = int(size)
        self.padding = int(padding)

    def __call__(self, img: Tensor) -> Tensor:
        """Crop ``img``.

        Args:
            img: ``(C, H, W)`` tensor of any dtype.

        Returns:
            A ``(C, size, size)`` tensor (may be a view of a padded copy).

        Raises:
            ValueError: If the padded image is smaller than the crop.
        """
        c, h, w = img.shape
        p = self.padding
        if p:
            padded = img.new_zeros((c, h + 2 * p, w + 2 * p))
            padded[:, p : p + h, p : p + w] = img
            img = padded
            h, w = h + 2 * p, w + 2 * p
        if h < self.size or w < self.size:
            raise ValueError(f"padded image {h}x{w} is smaller than the crop size {self.size}")
        top = _randint(h - self.size + 1)
        left = _randint(w - self.size + 1)
        return img[:, top : top + self.size, left : left + self.size]

    def __repr__(self) -> str:
        """Parameters of the crop."""
        return f"RandomCrop(size={self.size}, padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror a ``(C, H, W)`` tensor left-right with probability ``p``.

    Args:
        p: Flip probability.
    """

    def __init__(self, p: float = 0.5) -> None:
        self.p = float(p)

    def __call__(self, img: Tensor) -> Tensor:
        """Possibly flip ``img``.

        Args:
            img: ``(C, H, W)`` tensor.

        Returns:
            The flipped tensor (a copy) or ``img`` itself.
        """
        # Always consume one random number so the RNG stream does not depend on p.
        if float(torch.rand(()).item()) < self.p:
            return img.flip(-1)
        return img

    def __repr__(self) -> str:
        """Flip probability."""
        return f"RandomHorizontalFlip(p={self.p})"


class Normalize:
    """Convert an integer image tensor to ``float32`` in ``[0, 1]`` and standardise each channel.

    Computes ``(img / max_value - mean[c]) / std[c]``.

    Args:
        mean: Per-channel mean (in ``[0, 1]`` pixel units).
        std: Per-channel standard deviation (in ``[0, 1]`` pixel units).
        max_value: Value of a white pixel (255 for 8-bit images, 16 for scikit-learn's digits).

    Raises:
        ValueError: If ``mean`` and ``std`` differ in length or a std is not positive.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], max_value: float = 255.0) -> None:
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean and std must have equal length and std > 0, got {mean}, {std}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.max_value = float(max_value)
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Tensor) -> Tensor:
        """Normalise ``img``.

        Args:
            img: ``(C, H, W)`` tensor with ``C == len(mean)`` (or 1 channel broadcast with 1 mean).

        Returns:
            A new ``float32`` tensor; ``img`` is never modified.
        """
        # copy=True: the in-place ops below must never write into the shared image storage.
        x = img.to(dtype=torch.float32, copy=True)
        return x.div_(self.max_value).sub_(self._mean).div_(self._std)

    def __repr__(self) -> str:
        """Normalisation constants."""
        return f"Normalize(mean={self.mean}, std={self.std}, max_value={self.max_value:g})"


class RandomResizedCrop:
    """Crop a random area and aspect ratio of a PIL image and resize it to a square.

    The sampling follows the Inception / torchvision recipe: up to 10 attempts draw an area fraction
    uniformly from ``scale`` and an aspect ratio log-uniformly from ``ratio``; if none fits, a
    center crop with the aspect ratio clamped to ``ratio`` is used.

    Args:
        size: Output side in pixels.
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the crop aspect ratio (width / height).

    Raises:
        ValueError: If the ranges are empty or out of bounds.
    """

    def __init__(
        self,
        size: int,
        scale: Tuple[float, float] = (0.08, 1.0),
        ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    ) -> None:
        if not (0.0 < scale[0] <= scale[1] <= 1.0) or not (0.0 < ratio[0] <= ratio[1]):
            raise ValueError(f"invalid scale {scale} or ratio {ratio}")
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))

    def get_params(self, width: int, height: int) -> Tuple[int, int, int, int]:
        """Draw a crop box.

        Args:
            width: Image width.
            height: Image height.

        Returns:
            ``(top, left, crop_height, crop_width)``.
        """
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * _uniform(*self.scale)
            aspect = math.exp(_uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return _randint(height - h + 1), _randint(width - w + 1), h, w
        # Fallback: the largest centered crop whose aspect ratio lies within `ratio`.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Any) -> Any:
        """Crop and resize a PIL image.

        Args:
            img: A ``PIL.Image``.

        Returns:
            A ``size`` x ``size`` ``PIL.Image``.
        """
        image_module = require_pil()
        top, left, h, w = self.get_params(*img.size)
        # resize(box=...) crops and resamples in one pass (with antialiasing when shrinking).
        return img.resize((self.size, self.size), image_module.BILINEAR, box=(left, top, left + w, top + h))

    def __repr__(self) -> str:
        """Parameters of the crop."""
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class Resize:
    """Resize a PIL image so its shorter side equals ``size``, keeping the aspect ratio.

    Args:
        size: Target length of the shorter side.
    """

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, img: Any) -> Any:
        """Resize a PIL image.

        Args:
            img: A ``PIL.Image``.

        Returns:
            The resized ``PIL.Image`` (``img`` itself if already the right size).
        """
        image_module = require_pil()
        w, h = img.size
        if w <= h:
            new_w, new_h = self.size, int(self.size * h / w)
        else:
            new_w, new_h = int(self.size * w / h), self.size
        if (new_w, new_h) == (w, h):
            return img
        return img.resize((new_w, new_h), image_module.BILINEAR)

    def __repr__(self) -> str:
        """Target size."""
        return f"Resize(size={self.size})"


class CenterCrop:
    """Crop the central ``size`` x ``size`` square of a PIL image (zero-filled if it is smaller).

    Args:
        size: Side of the crop.
    """

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, img: Any) -> Any:
        """Crop a PIL image.

        Args:
            img: A ``PIL.Image``.

        Returns:
            The cropped ``PIL.Image``.
        """
        w, h = img.size
        top = int(round((h - self.size) / 2.0))
        left = int(round((w - self.size) / 2.0))
        # PIL fills any part of the box outside the image with zeros, which pads small images.
        return img.crop((left, top, left + self.size, top + self.size))

    def __repr__(self) -> str:
        """Crop size."""
        return f"CenterCrop(size={self.size})"


class PILToTensor:
    """Convert a PIL image to a ``uint8`` ``(C, H, W)`` tensor without rescaling."""

    def __call__(self, img: Any) -> Tensor:
        """Convert ``img``.

        Args:
            img: A ``PIL.Image`` (any mode with 8-bit channels).

        Returns:
            A contiguous ``uint8`` tensor of shape ``(C, H, W)``.
        """
        array = np.array(img, dtype=np.uint8, copy=True)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def __repr__(self) -> str:
        """Name of the transform."""
        return "PILToTensor()"
