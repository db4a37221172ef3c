"""The model registry: register a builder by name, list, describe and create models."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch.nn as nn

from ..registry import Registry, first_doc_line

logger = logging.getLogger("granet.models")

ModelBuilder = Callable[[int, int, int], nn.Module]
"""Signature of a registered builder: ``fn(num_classes, in_channels, input_size) -> nn.Module``."""


@dataclass(frozen=True)
class _Entry:
    builder: ModelBuilder
    input_dims: int = 2  # 2: images (C, H, W); 1: signals (C, L)


_MODELS: Registry[_Entry] = Registry("model")


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------
def register_model(
    name: str, description: Optional[str] = None, input_dims: int = 2
) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator registering a model builder under ``name``.

    Args:
        name: Registry name (non-empty, unique).
        description: One-line description shown by :func:`describe_model`. Defaults to the
            first line of the builder's docstring.
        input_dims: Spatial dimensions of the inputs the model takes: 2 for images
            ``(N, C, H, W)`` (``input_size`` = H = W), 1 for signals ``(N, C, L)`` (``input_size`` = L).

    Returns:
        A decorator that registers the builder and returns it unchanged.

    Raises:
        ValueError: If ``name`` is empty or already registered.
    """
    _MODELS.require_new(name)
    if input_dims not in (1, 2):
        raise ValueError(f"input_dims must be 1 (signals) or 2 (images), got {input_dims!r}")

    def decorator(fn: ModelBuilder) -> ModelBuilder:
        desc = description if description is not None else first_doc_line(fn) or name
        return _MODELS.register(name, _Entry(builder=fn, input_dims=input_dims), desc).builder

    return decorator


def list_models() -> List[str]:
    """Return the names of all registered models.

    Returns:
        The registered names, sorted alphabetically.
    """
    return list(_MODELS.names())


def describe_model(name: str) -> str:
    """Return a one-line description of a registered model.

    Args:
        name: Registry name.

    Returns:
        The description string.

    Raises:
        ValueError: If ``name`` is not registered (the message lists the valid names).
    """
    return _MODELS.describe(name)


def model_input_dims(name: str) -> int:
    """Spatial dimensions of the inputs a registered model takes: 2 (images) or 1 (signals).

    Raises:
        ValueError: If ``name`` is not registered (the message lists the valid names).
    """
    return _MODELS.get(name).input_dims


def _check_positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{what} must be >= 1, got {value}")
    return value


def _require_min_size(model: str, input_size: int, minimum: int) -> None:
    if input_size < minimum:
        raise ValueError(
            f"input_size={input_size} is too small for {model!r}: it needs input_size >= {minimum}"
        )


def create_model(
    name: str, num_classes: int = 10, in_channels: int = 3, input_size: int = 32, input_dims: Optional[int] = None
) -> nn.Module:
    """Build a registered model.

    Args:
        name: Registry name (see :func:`list_models`).
        num_classes: Number of output logits (>= 1).
        in_channels: Number of input image channels (>= 1).
        input_size: Height (= width) of the square input images, or the length of 1-D signals (>= 1,
            and large enough for the architecture).
        input_dims: The data's spatial dimensions (2: images, 1: signals), checked against the
            model's when given.

    Returns:
        The freshly initialised model (in training mode).

    Raises:
        ValueError: If the name is unknown (the message lists the valid names), if an argument is
            not a positive integer, if ``input_size`` is too small for the architecture, or if the
            model takes inputs of other dimensions than ``input_dims`` (the message lists the
            models that fit).
    """
    entry = _MODELS.get(name)
    if input_dims is not None and input_dims != entry.input_dims:
        kinds = {1: "1-D signals (N, C, L)", 2: "images (N, C, H, W)"}
        fitting = [n for n, e in _MODELS.items() if e.input_dims == input_dims]
        raise ValueError(f"{name!r} takes {kinds[entry.input_dims]}, the data are {kinds[input_dims]}; "
                         f"models for them: {', '.join(fitting)}")
    num_classes = _check_positive_int(num_classes, "num_classes")
    in_channels = _check_positive_int(in_channels, "in_channels")
    input_size = _check_positive_int(input_size, "input_size")
    model = entry.builder(num_classes, in_channels, input_size)
    if logger.isEnabledFor(logging.DEBUG):
        n_params = sum(p.numel() for p in model.parameters())
        logger.debug(
            "created model %s (classes=%d, in_channels=%d, input_size=%d) with %d parameters",
            name,
            num_classes,
            in_channels,
            input_size,
            n_params,
        )
    return model


# --------------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------------
def init_weights(model: nn.Module) -> None:
    """Apply the library's standard initialisation in place.

    Convolutions get Kaiming-normal weights (``mode="fan_out"``, ReLU gain) and zero biases;
    batch-norm layers get weight 1 and bias 0. Linear layers keep PyTorch's default
    initialisation (as in torchvision).

    Args:
        model: The module to initialise.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
