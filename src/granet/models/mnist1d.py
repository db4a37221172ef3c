"""The MNIST-1D networks of Greydanus (2020), for 1-D signals ``(N, C, L)`` (L = 40 for MNIST-1D).

* :class:`SignalMLP`: flatten, two hidden Linear layers with ReLU, a Linear head. ``mnist1d_mlp``
  has hidden layers of 256, the width of the paper's code (``get_model_args``), whose published 68%
  it reproduces (with 100 it ends near 65%: see docs/results.md); ``mnist1d_mlp_wide`` has 512, so
  that density 0.01 still keeps 2,877 of its 287,744 weights.
* :class:`SignalCNN`: three 1-D convolutions with ReLU — kernel 5 stride 2, then kernel 3 stride 2
  twice, padding 1 — and a Linear head on the flattened features (no pooling, no normalisation).
  The paper's CNN has 25 channels (``mnist1d_cnn``: 5,125 weights); ``mnist1d_cnn_wide`` has 200
  (251,000 weights, 2,510 at density 0.01). ``mnist1d_cnn_64`` has 64 (28,096 weights, 281 at
  density 0.01): the CNN of the method comparison (benchmarks/compare_methods.py --setting mnist1d),
  whose 13 methods x 4 densities x 5 seeds fit in about an hour of two shared CPU cores where the
  200-channel network, about 5 times slower per step, does not (docs/results.md).

Both keep PyTorch's default initialisation, as the paper's code does.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def conv_output_length(length: int) -> int:
    """Length after the three convolutions: ``(L + 2 - 5) // 2 + 1``, then ``(L + 2 - 3) // 2 + 1`` twice."""
    length = (length - 3) // 2 + 1
    for _ in range(2):
        length = (length - 1) // 2 + 1
    return length


class SignalMLP(nn.Module):
    """Flatten -> Linear(hidden) -> ReLU -> Linear(hidden) -> ReLU -> Linear(classes).

    Args:
        num_classes: Number of output logits.
        in_features: Flattened input size (``C * L``).
        hidden: Width of both hidden layers.
    """

    def __init__(self, num_classes: int, in_features: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for signals of shape ``(N, C, L)``."""
        return self.layers(torch.flatten(x, 1))


class SignalCNN(nn.Module):
    """Three 1-D convolutions (``channels`` each, ReLU) and a Linear classifier.

    Args:
        num_classes: Number of output logits.
        in_channels: Channels of the input signal.
        length: Length of the input signal (at least 5).
        channels: Channels of every convolution.

    Raises:
        ValueError: If ``length`` is shorter than the first kernel.
    """

    MIN_LENGTH = 5

    def __init__(self, num_classes: int, in_channels: int, length: int, channels: int) -> None:
        super().__init__()
        if length < self.MIN_LENGTH:
            raise ValueError(f"input_size={length} is too short for a 1-D CNN: it needs signals of length "
                             f">= {self.MIN_LENGTH}")
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, channels, kernel_size=5, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1), nn.ReLU(),
        )
        self.classifier = nn.Linear(channels * conv_output_length(length), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for signals of shape ``(N, C, L)``."""
        return self.classifier(torch.flatten(self.features(x), 1))


__all__ = ["SignalMLP", "SignalCNN", "conv_output_length"]
