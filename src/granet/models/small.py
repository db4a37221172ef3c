"""Small networks: LeNet-300-100 (``mlp``), LeNet-5 and the digits CNN."""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cifar import _conv3x3
from .registry import _require_min_size, init_weights


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
