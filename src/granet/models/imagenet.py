"""ResNet-50 (v1.5) for ImageNet with torchvision's exact layout and parameter names."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from .cifar import _conv1x1, _conv3x3
from .registry import init_weights


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
