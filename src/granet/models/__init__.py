"""Model registry and the network architectures used in sparse-training experiments.

Every model is a plain :class:`torch.nn.Module` built only from :class:`~torch.nn.Conv2d` (or
:class:`~torch.nn.Conv1d` for 1-D signals), :class:`~torch.nn.Linear`, :class:`~torch.nn.BatchNorm2d`,
ReLU and pooling layers, so that a sparsity masker can treat "the weights of every convolution and
Linear layer" as the prunable set.

Models are looked up by name::

    from granet.models import create_model, list_models

    model = create_model("resnet32", num_classes=100, in_channels=3, input_size=32)
    print(list_models())

New architectures are added with the :func:`register_model` decorator. A builder receives
``(num_classes, in_channels, input_size)`` (already validated to be positive integers) and returns
an ``nn.Module`` whose ``forward`` accepts a float tensor of shape
``(N, in_channels, input_size, input_size)`` (or ``(N, in_channels, input_size)`` for a model
registered with ``input_dims=1``) and returns logits of shape ``(N, num_classes)``.

Registered models:

* ``mlp`` -- LeNet-300-100.
* ``lenet5`` -- LeNet-5 (ReLU, max-pooling), for 28x28 (padded first conv) or 32x32 inputs.
* ``resnet20`` / ``resnet32`` / ``resnet56`` -- He et al. (2016) CIFAR ResNets with 1x1
  convolution projection shortcuts (option B).
* ``resnet18`` / ``resnet50`` -- the CIFAR ResNets of the kuangliu/pytorch-cifar layout.
* ``vgg19`` -- VGG-19 with batch normalisation, CIFAR form (global average pool + one Linear).
* ``imagenet_resnet50`` -- ResNet-50 (v1.5) with torchvision's exact layout and parameter names.
* ``digits_cnn`` -- a small, wide CNN for scikit-learn's 8x8 digits.
* ``mnist1d_mlp`` / ``mnist1d_cnn`` -- the MNIST-1D paper's MLP (hidden 256) and 1-D CNN (25
  channels), their wide variants ``mnist1d_mlp_wide`` (hidden 512) / ``mnist1d_cnn_wide`` (200
  channels), and ``mnist1d_cnn_64`` (64 channels, the CNN of the method comparison); they take 1-D
  signals ``(N, in_channels, input_size)`` (``input_dims=1``).
"""
from __future__ import annotations

import torch.nn as nn

from .cifar import VGG, VGG19_CFG, BasicBlock, Bottleneck, CifarBasicBlock, CifarResNet, ResNet
from .imagenet import ImageNetBottleneck, ImageNetResNet
from .mnist1d import SignalCNN, SignalMLP
from .registry import (
    ModelBuilder,
    _require_min_size,
    create_model,
    describe_model,
    init_weights,
    list_models,
    model_input_dims,
    register_model,
)
from .small import MLP, DigitsCNN, LeNet5

__all__ = [
    "ModelBuilder",
    "register_model",
    "create_model",
    "list_models",
    "describe_model",
    "model_input_dims",
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
    "SignalMLP",
    "SignalCNN",
]

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


# MNIST-1D (1-D signals): the paper's networks and wider variants.
def _signal_mlp(hidden: int) -> ModelBuilder:
    def build(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
        return SignalMLP(num_classes, in_channels * input_size, hidden)
    return build


def _signal_cnn(channels: int) -> ModelBuilder:
    def build(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
        return SignalCNN(num_classes, in_channels, input_size, channels)
    return build


for _name, _hidden in (("mnist1d_mlp", 256), ("mnist1d_mlp_wide", 512)):
    register_model(_name, description=f"MNIST-1D MLP: flatten -> {_hidden} -> {_hidden} -> classes (ReLU), for 1-D "
                                      "signals", input_dims=1)(_signal_mlp(_hidden))
for _name, _channels in (("mnist1d_cnn", 25), ("mnist1d_cnn_64", 64), ("mnist1d_cnn_wide", 200)):
    register_model(_name, description=f"MNIST-1D CNN: three Conv1d of {_channels} channels (kernels 5/3/3, stride 2) "
                                      "and a Linear head, for 1-D signals", input_dims=1)(_signal_cnn(_channels))
del _name, _hidden, _channels
