"""Model registry and the network architectures used in sparse-training experiments.

Every model is a plain :class:`torch.nn.Module` built only from :class:`~torch.nn.Conv2d`,
:class:`~torch.nn.Linear`, :class:`~torch.nn.BatchNorm2d`, ReLU and pooling layers, so that a
sparsity masker can treat "the weights of every Conv2d and Linear layer" as the prunable set.

Models are looked up by name::

    from granet.models import create_model, list_models

    model = create_model("resnet32", num_classes=100, in_channels=3, input_size=32)
    print(list_models())

New architectures are added with the :func:`register_model` decorator. A builder receives
``(num_classes, in_channels, input_size)`` (already validated to be positive integers) and returns
an ``nn.Module`` whose ``forward`` accepts a float tensor of shape
``(N, in_channels, input_size, input_size)`` and returns logits of shape ``(N, num_classes)``.

Registered models:

* ``mlp`` -- LeNet-300-100.
* ``lenet5`` -- LeNet-5 (ReLU, max-pooling), for 28x28 (padded first conv) or 32x32 inputs.
* ``resnet20`` / ``resnet32`` / ``resnet56`` -- He et al. (2016) CIFAR ResNets with 1x1
  convolution projection shortcuts (option B).
* ``resnet18`` / ``resnet50`` -- the CIFAR ResNets of the kuangliu/pytorch-cifar layout.
* ``vgg19`` -- VGG-19 with batch normalisation, CIFAR form (global average pool + one Linear).
* ``imagenet_resnet50`` -- ResNet-50 (v1.5) with torchvision's exact layout and parameter names.
* ``digits_cnn`` -- a small, wide CNN for scikit-learn's 8x8 digits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ModelBuilder",
    "register_model",
    "create_model",
    "list_models",
    "describe_model",
    "init_weights",
    "MLP",
    "LeNet5",
    "CifarResNet",
    "CifarBasicBlock",
    "ResNet",
    "BasicBlock",
    "Bottleneck",
    "VGG",
    "VGG19_CFG",
    "ImageNetResNet",
    "ImageNetBottleneck",
    "DigitsCNN",
]

logger = logging.getLogger(__name__)

ModelBuilder = Callable[[int, int, int], nn.Module]
"""Signature of a registered builder: ``fn(num_classes, in_channels, input_size) -> nn.Module``."""


@dataclass(frozen=True)
class _Entry:
    builder: ModelBuilder
    description: str


_REGISTRY: Dict[str, _Entry] = {}


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------
def register_model(
    name: str, description: Optional[str] = None
) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator registering a model builder under ``name``.

    Args:
        name: Registry name (non-empty, unique).
        description: One-line description shown by :func:`describe_model`. Defaults to the
            first line of the builder's docstring.

    Returns:
        A decorator that registers the builder and returns it unchanged.

    Raises:
        ValueError: If ``name`` is empty or already registered.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"a model named {name!r} is already registered")

    def decorator(fn: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY:
            raise ValueError(f"a model named {name!r} is already registered")
        desc = description
        if desc is None:
            doc = (fn.__doc__ or "").strip()
            desc = doc.splitlines()[0].strip() if doc else name
        _REGISTRY[name] = _Entry(builder=fn, description=desc)
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
    name: str, num_classes: int = 10, in_channels: int = 3, input_size: int = 32
) -> nn.Module:
    """Build a registered model.

    Args:
        name: Registry name (see :func:`list_models`).
        num_classes: Number of output logits (>= 1).
        in_channels: Number of input image channels (>= 1).
        input_size: Height (= width) of the square input images (>= 1, and large enough for
            the architecture).

    Returns:
        The freshly initialised model (in training mode).

    Raises:
        ValueError: If the name is unknown (the message lists the valid names), if an argument is
            not a positive integer, or if ``input_size`` is too small for the architecture.
    """
    entry = _lookup(name)
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


# --------------------------------------------------------------------------------------------------
# LeNet-300-100 and LeNet-5
# --------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """LeNet-300-100: flatten -> Linear(300) -> ReLU -> Linear(100) -> ReLU -> Linear(classes).

    Args:
        num_classes: Number of output logits.
        in_features: Flattened input size (``in_channels * input_size ** 2``).
        hidden: Widths of the hidden layers.
    """

    def __init__(
        self, num_classes: int = 10, in_features: int = 784, hidden: Sequence[int] = (300, 100)
    ) -> None:
        super().__init__()
        widths = [in_features, *hidden]
        layers: List[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for a batch of images of any shape ``(N, ...)``."""
        return self.layers(torch.flatten(x, 1))


class LeNet5(nn.Module):
    """LeNet-5: conv6 5x5, max-pool, conv16 5x5, max-pool, fc120, fc84, fc classes (ReLU).

    For inputs smaller than 32x32 (e.g. 28x28 MNIST) the first convolution is zero-padded by 2
    pixels, which reproduces the classic 32x32 geometry (16x5x5 features before the classifier).
    The classifier's input size is computed from ``input_size``.

    Args:
        num_classes: Number of output logits.
        in_channels: Number of input channels.
        input_size: Height (= width) of the input; must be >= 12.

    Raises:
        ValueError: If ``input_size`` is too small.
    """

    MIN_INPUT_SIZE = 12

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 32) -> None:
        super().__init__()
        _require_min_size("lenet5", input_size, self.MIN_INPUT_SIZE)
        padding = 2 if input_size < 32 else 0
        s = input_size + 2 * padding - 4  # conv1 (5x5)
        s = s // 2 - 4  # pool, conv2 (5x5)
        s = s // 2  # pool
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=padding)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * s * s, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for ``x`` of shape ``(N, in_channels, input_size, input_size)``."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


# --------------------------------------------------------------------------------------------------
# He et al. (2016) CIFAR ResNets (resnet20/32/56), option-B shortcuts
# --------------------------------------------------------------------------------------------------
def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class CifarBasicBlock(nn.Module):
    """Basic residual block (two 3x3 convs) with a 1x1-conv + BN projection when shapes change.

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first convolution (and of the projection).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes * self.expansion:
            self.shortcut = nn.Sequential(
                _conv1x1(in_planes, planes * self.expansion, stride),
                nn.BatchNorm2d(planes * self.expansion),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet of depth ``6n + 2`` (ResNet-20/32/44/56/110).

    A 3x3 stem conv with 16 channels, three stages of ``n`` basic blocks with 16/32/64 channels
    (stride 2 at the start of stages 2 and 3), global average pooling and a linear classifier.
    Shortcuts that change shape use a 1x1 convolution + BN projection ("option B"), so every
    weight tensor belongs to a Conv2d or Linear layer.

    Args:
        depth: Network depth; ``(depth - 2)`` must be divisible by 6.
        num_classes: Number of output logits.
        in_channels: Number of input channels.

    Raises:
        ValueError: If ``depth`` is not of the form ``6n + 2``.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.in_planes = 16
        self.conv1 = _conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, n, stride=1)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        init_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(CifarBasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for ``x`` of shape ``(N, in_channels, H, W)``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)


# --------------------------------------------------------------------------------------------------
# kuangliu/pytorch-cifar ResNet-18 / ResNet-50
# --------------------------------------------------------------------------------------------------
class BasicBlock(CifarBasicBlock):
    """Basic block of the kuangliu/pytorch-cifar ResNet-18/34 (same structure as
    :class:`CifarBasicBlock`)."""


class Bottleneck(nn.Module):
    """Bottleneck block (1x1, 3x3 with stride, 1x1 x4) of the kuangliu/pytorch-cifar ResNet-50.

    Args:
        in_planes: Input channels.
        planes: Bottleneck width; the block outputs ``4 * planes`` channels.
        stride: Stride of the 3x3 convolution (and of the projection).
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes * self.expansion:
            self.shortcut = nn.Sequential(
                _conv1x1(in_planes, planes * self.expansion, stride),
                nn.BatchNorm2d(planes * self.expansion),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet in the kuangliu/pytorch-cifar layout (used by most sparse-training papers).

    3x3 stem conv with 64 channels (no max-pool), four stages with 64/128/256/512 planes
    (stride 2 at the start of stages 2-4), adaptive average pooling and a linear classifier.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        num_blocks: Number of blocks in each of the four stages.
        num_classes: Number of output logits.
        in_channels: Number of input channels.
    """

    def __init__(
        self,
        block: Union[Type[BasicBlock], Type[Bottleneck]],
        num_blocks: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(num_blocks) != 4:
            raise ValueError(f"num_blocks must have 4 entries, got {list(num_blocks)}")
        self.in_planes = 64
        self.conv1 = _conv3x3(in_channels, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * block.expansion, num_classes)
        init_weights(self)

    def _make_layer(
        self,
        block: Union[Type[BasicBlock], Type[Bottleneck]],
        planes: int,
        blocks: int,
        stride: int,
    ) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for ``x`` of shape ``(N, in_channels, H, W)``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)


# --------------------------------------------------------------------------------------------------
# VGG-19 (BN), CIFAR form
# --------------------------------------------------------------------------------------------------
VGG19_CFG: List[Union[int, str]] = [
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, 256, "M",
    512, 512, 512, 512, "M",
    512, 512, 512, 512, "M",
]  # fmt: skip
"""VGG-19 configuration: output channels of each 3x3 conv, ``"M"`` for a 2x2 max-pool."""


class VGG(nn.Module):
    """VGG with batch normalisation in the common CIFAR form.

    Each entry of ``cfg`` is a 3x3 convolution (padding 1, with bias, as in
    kuangliu/pytorch-cifar) followed by BatchNorm and ReLU, or ``"M"`` for a 2x2 max-pool. After
    the features the map is average-pooled to 1x1 (adaptive, so inputs larger than 32x32 also
    work) and fed to a single ``Linear(512, num_classes)`` -- the CIFAR classifier of
    kuangliu/pytorch-cifar, rather than ImageNet VGG's three 4096-wide layers. With 10 classes
    this gives 20,040,522 parameters.

    Args:
        cfg: Layer configuration (default: :data:`VGG19_CFG`).
        num_classes: Number of output logits.
        in_channels: Number of input channels.
    """

    def __init__(
        self,
        cfg: Sequence[Union[int, str]] = tuple(VGG19_CFG),
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                assert isinstance(v, int)
                layers += [
                    nn.Conv2d(channels, v, kernel_size=3, padding=1),
                    nn.BatchNorm2d(v),
                    nn.ReLU(inplace=True),
                ]
                channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for ``x`` of shape ``(N, in_channels, H, W)``."""
        out = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(out)


# --------------------------------------------------------------------------------------------------
# torchvision-compatible ImageNet ResNet-50 (v1.5)
# --------------------------------------------------------------------------------------------------
class ImageNetBottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (v1.5: the stride is on the 3x3 convolution).

    Args:
        inplanes: Input channels.
        planes: Bottleneck width; the block outputs ``4 * planes`` channels.
        stride: Stride of the 3x3 convolution.
        downsample: Projection applied to the identity branch, or ``None``.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ImageNetResNet(nn.Module):
    """ResNet with exactly torchvision's module layout and parameter names.

    ``conv1`` (7x7, stride 2) + ``bn1`` + ``relu`` + ``maxpool`` (3x3, stride 2), ``layer1`` ..
    ``layer4`` of :class:`ImageNetBottleneck` blocks (projection in ``downsample.0/1``),
    ``avgpool`` and ``fc``. A ``state_dict`` is interchangeable with
    ``torchvision.models.resnet50()``'s when ``layers=(3, 4, 6, 3)``, 1000 classes and 3 channels.

    Args:
        layers: Number of bottleneck blocks per stage.
        num_classes: Number of output logits.
        in_channels: Number of input channels.
        zero_init_residual: If True, initialise the last BN of every block with gamma = 0.
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        num_classes: int = 1000,
        in_channels: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must have 4 entries, got {list(layers)}")
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * ImageNetBottleneck.expansion, num_classes)
        init_weights(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, ImageNetBottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        expansion = ImageNetBottleneck.expansion
        downsample: Optional[nn.Module] = None
        if stride != 1 or self.inplanes != planes * expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * expansion, stride),
                nn.BatchNorm2d(planes * expansion),
            )
        layers = [ImageNetBottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * expansion
        for _ in range(1, blocks):
            layers.append(ImageNetBottleneck(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for ``x`` of shape ``(N, in_channels, H, W)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


# --------------------------------------------------------------------------------------------------
# Small CNN for scikit-learn's 8x8 digits
# --------------------------------------------------------------------------------------------------
class DigitsCNN(nn.Module):
    """Small but wide CNN for scikit-learn's 8x8 digits, sized to survive 95% sparsity.

    ``conv(in->w1, 3x3) + BN + ReLU``, ``conv(w1->w2, 3x3) + BN + ReLU``, 2x2 max-pool,
    ``conv(w2->w3, 3x3) + BN + ReLU``, global average pool, ``Linear(w3, num_classes)``.
    Convolutions use padding 1 and no bias. The global pooling makes it work for any input size
    >= 2. With the default widths (64, 128, 256), one input channel and 10 classes it has
    371,776 Conv2d/Linear weights and 372,682 parameters in total.

    Args:
        num_classes: Number of output logits.
        in_channels: Number of input channels.
        widths: Output channels of the three convolutions.
    """

    MIN_INPUT_SIZE = 2

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (64, 128, 256),
    ) -> None:
        super().__init__()
        if len(widths) != 3:
            raise ValueError(f"widths must have 3 entries, got {list(widths)}")
        w1, w2, w3 = widths
        self.features = nn.Sequential(
            _conv3x3(in_channels, w1),
            nn.BatchNorm2d(w1),
            nn.ReLU(inplace=True),
            _conv3x3(w1, w2),
            nn.BatchNorm2d(w2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            _conv3x3(w2, w3),
            nn.BatchNorm2d(w3),
            nn.ReLU(inplace=True),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(w3, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for ``x`` of shape ``(N, in_channels, H, W)``."""
        out = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(out)


# --------------------------------------------------------------------------------------------------
# Registered builders
# --------------------------------------------------------------------------------------------------
@register_model("mlp")
def _mlp(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """LeNet-300-100 MLP (flatten -> 300 -> 100 -> classes)."""
    return MLP(num_classes, in_features=in_channels * input_size * input_size)


@register_model("lenet5")
def _lenet5(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """LeNet-5 CNN (conv6, conv16, fc120, fc84) for 28x28 or 32x32 inputs."""
    return LeNet5(num_classes, in_channels, input_size)


# CIFAR-family models keep the full resolution through a 3x3 stem (no stride-2 stem, no max-pool):
# on ImageNet-sized inputs they silently become another, ~50x more expensive network. Refuse that.
CIFAR_MAX_INPUT_SIZE = 64


def _require_cifar_size(model: str, input_size: int) -> None:
    if input_size > CIFAR_MAX_INPUT_SIZE:
        hint = " (use 'imagenet_resnet50' for ImageNet's ResNet-50)" if model == "resnet50" else ""
        raise ValueError(
            f"{model!r} is the CIFAR form of the network (3x3 stem, no down-sampling stem), built for 32x32 "
            f"inputs; input_size={input_size} > {CIFAR_MAX_INPUT_SIZE} would build a different, far larger "
            f"network{hint}"
        )


def _make_cifar_resnet_builder(depth: int) -> ModelBuilder:
    def build(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
        _require_cifar_size(f"resnet{depth}", input_size)
        return CifarResNet(depth, num_classes, in_channels)

    return build


for _depth in (20, 32, 56):
    register_model(
        f"resnet{_depth}",
        description=f"ResNet-{_depth} for CIFAR (He et al. 2016; 16/32/64 channels, "
        "1x1-conv projection shortcuts)",
    )(_make_cifar_resnet_builder(_depth))
del _depth


@register_model("resnet18")
def _resnet18(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """ResNet-18 for CIFAR (kuangliu layout: 3x3 stem, no max-pool, basic blocks [2,2,2,2])."""
    _require_cifar_size("resnet18", input_size)
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels)


@register_model("resnet50")
def _resnet50(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """ResNet-50 for CIFAR (kuangliu layout: 3x3 stem, no max-pool, bottlenecks [3,4,6,3])."""
    _require_cifar_size("resnet50", input_size)
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels)


@register_model("vgg19")
def _vgg19(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """VGG-19 with BatchNorm for CIFAR (global average pool + one Linear classifier)."""
    _require_min_size("vgg19", input_size, 32)  # five 2x2 max-pools
    _require_cifar_size("vgg19", input_size)
    return VGG(VGG19_CFG, num_classes, in_channels)


@register_model("imagenet_resnet50")
def _imagenet_resnet50(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """ResNet-50 v1.5 for ImageNet with torchvision's layout and parameter names."""
    return ImageNetResNet((3, 4, 6, 3), num_classes, in_channels)


@register_model("digits_cnn")
def _digits_cnn(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """Small wide CNN (64/128/256 channels) for scikit-learn's 8x8 digits."""
    _require_min_size("digits_cnn", input_size, DigitsCNN.MIN_INPUT_SIZE)
    return DigitsCNN(num_classes, in_channels)
