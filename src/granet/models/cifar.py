"""CIFAR networks: He et al. ResNets (20/32/56), the kuangliu ResNet-18/50 layout, VGG-19 (BN)."""
from __future__ import annotations

from typing import List, Sequence, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import init_weights


# --------------------------------------------------------------------------------------------------
# He et al. (2016) CIFAR ResNets (resnet20/32/56), option-B shortcuts
# --------------------------------------------------------------------------------------------------
def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """A residual block's shortcut: identity (an empty Sequential), or 1x1 conv + BN when the shape changes."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(_conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))


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
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

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
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

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
