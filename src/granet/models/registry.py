"""The model registry: register a builder by name, list, describe and create models."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch.nn as nn

logger = logging.getLogger("granet.models")

ModelBuilder = Callable[[int, int, int], nn.Module]
"""Signature of a registered builder: ``fn(num_classes, in_channels, input_size) -> nn.Module``."""


@dataclass(frozen=True)
class _Entry:
    builder: ModelBuilder
    description: str
    input_dims: int = 2  # 2: images (C, H, W); 1: signals (C, L)


_REGISTRY: Dict[str, _Entry] = {}


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
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"a model named {name!r} is already registered")
    if input_dims not in (1, 2):
        raise ValueError(f"input_dims must be 1 (signals) or 2 (images), got {input_dims!r}")

    def decorator(fn: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY:
            raise ValueError(f"a model named {name!r} is already registered")
        desc = description
        if desc is None:
            doc = (fn.__doc__ or "").strip()
            desc = doc.splitlines()[0].strip() if doc else name
        _REGISTRY[name] = _Entry(builder=fn, description=desc, input_dims=input_dims)
        return fn

    return decorator


def list_models() -> List[str]:
    """Return the names of all registered models.

    Returns:
        The registered names, sorted alphabetically.
    """
    return sorted(_REGISTRY)


def _lookup(name: str) -> _Entry:
    entry = _REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ValueError(
            f"unknown model {name!r}; valid names are: {', '.join(list_models())}"
        )
    return entry


def describe_model(name: str) -> str:
    """Return a one-line description of a registered model.

    Args:
        name: Registry name.

    Returns:
        The description string.

    Raises:
        ValueError: If ``name`` is not registered (the message lists the valid names).
    """
    return _lookup(name).description


def model_input_dims(name: str) -> int:
    """Spatial dimensions of the inputs a registered model takes: 2 (images) or 1 (signals).

    Raises:
        ValueError: If ``name`` is not registered (the message lists the valid names).
    """
    return _lookup(name).input_dims


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
    entry = _lookup(name)
    if input_dims is not None and input_dims != entry.input_dims:
        kinds = {1: "1-D signals (N, C, L)", 2: "images (N, C, H, W)"}
        fitting = [n for n in list_models() if _REGISTRY[n].input_dims == input_dims]
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
