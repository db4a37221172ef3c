"""Tests for :mod:`granet.models` (registry, architectures, exact parameter counts)."""

from __future__ import annotations

import math
from typing import Dict, Iterator, Tuple

import pytest
import torch
import torch.nn as nn

from granet.models import (
    DigitsCNN,
    ImageNetResNet,
    create_model,
    describe_model,
    list_models,
    model_input_dims,
    register_model,
)

EXPECTED_MODELS = [
    "digits_cnn",
    "imagenet_resnet50",
    "lenet5",
    "mlp",
    "mnist1d_cnn",
    "mnist1d_cnn_64",
    "mnist1d_cnn_wide",
    "mnist1d_mlp",
    "mnist1d_mlp_wide",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet50",
    "resnet56",
    "vgg19",
]

# (in_channels, input_size) used by the generic build/forward/backward test.
SMALL_SETTINGS: Dict[str, Tuple[int, int]] = {
    "digits_cnn": (1, 8),
    "imagenet_resnet50": (3, 64),  # small input keeps the forward cheap
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prunable_weights(model: nn.Module) -> list:
    return [m.weight for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]


@pytest.fixture(scope="module")
def imagenet_r50() -> nn.Module:
    torch.manual_seed(0)
    return create_model("imagenet_resnet50", num_classes=1000, in_channels=3, input_size=224)


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------
def test_list_models_is_sorted_and_complete() -> None:
    names = list_models()
    assert names == sorted(names)
    assert names == EXPECTED_MODELS


@pytest.mark.parametrize("name", EXPECTED_MODELS)
def test_describe_model_is_one_nonempty_line(name: str) -> None:
    desc = describe_model(name)
    assert isinstance(desc, str)
    assert desc.strip() == desc and len(desc) > 10
    assert "\n" not in desc


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="resnet20") as excinfo:
        create_model("resnet21")
    msg = str(excinfo.value)
    assert "resnet21" in msg
    # every valid name is listed, in sorted order
    positions = [msg.index(n) for n in ["digits_cnn", "imagenet_resnet50", "vgg19"]]
    assert positions == sorted(positions)
    for n in EXPECTED_MODELS:
        assert n in msg
    with pytest.raises(ValueError, match="lenet5"):
        describe_model("nope")


@pytest.mark.parametrize("bad", [0, -1, 2.5, "10", True, None])
def test_bad_num_classes_raises(bad: object) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        create_model("mlp", num_classes=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -3, 1.0])
def test_bad_in_channels_raises(bad: object) -> None:
    with pytest.raises(ValueError, match="in_channels"):
        create_model("resnet20", in_channels=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name,size",
    [("mlp", 0), ("lenet5", 11), ("vgg19", 16), ("vgg19", 31), ("digits_cnn", 1), ("resnet20", -4)],
)
def test_too_small_input_size_raises(name: str, size: int) -> None:
    with pytest.raises(ValueError, match="input_size"):
        create_model(name, input_size=size)


def test_smallest_accepted_input_sizes_work() -> None:
    for name, size, ch in [("lenet5", 12, 1), ("vgg19", 32, 3), ("digits_cnn", 2, 1)]:
        model = create_model(name, num_classes=3, in_channels=ch, input_size=size)
        model.eval()
        with torch.no_grad():
            out = model(torch.randn(2, ch, size, size))
        assert out.shape == (2, 3)


@pytest.fixture
def scratch_registry() -> Iterator[None]:
    from granet.models import registry

    saved = registry._MODELS.snapshot()
    yield
    registry._MODELS.restore(saved)


def test_register_model_roundtrip_and_duplicates(scratch_registry: None) -> None:
    @register_model("tiny_test_net")
    def _tiny(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
        """A tiny linear model used only by the tests."""
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size**2, num_classes))

    assert "tiny_test_net" in list_models()
    assert describe_model("tiny_test_net") == "A tiny linear model used only by the tests."
    model = create_model("tiny_test_net", num_classes=4, in_channels=2, input_size=5)
    assert n_params(model) == 2 * 25 * 4 + 4
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny_test_net")
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp")
    with pytest.raises(ValueError):
        register_model("")


# --------------------------------------------------------------------------------------------------
# Generic build / forward / backward over every registered model
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    in_channels, size = SMALL_SETTINGS.get(name, (3, 32))
    num_classes = 7
    model = create_model(name, num_classes=num_classes, in_channels=in_channels, input_size=size)
    assert isinstance(model, nn.Module)
    assert model.training
    x = torch.randn(2, in_channels, *[size] * model_input_dims(name))  # images (N, C, H, W), signals (N, C, L)
    out = model(x)
    assert out.shape == (2, num_classes)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out.sum().backward()
    weights = prunable_weights(model)
    assert len(weights) >= 3
    for w in weights:
        assert w.grad is not None and w.grad.shape == w.shape
        assert torch.isfinite(w.grad).all()
    # Every parameter of the model is a Conv/Linear weight, a bias, or a BatchNorm affine param.
    allowed = {id(w) for w in weights}
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            allowed |= {id(p) for p in m.parameters(recurse=False)}
    assert all(id(p) in allowed for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_standard_initialisation(name: str) -> None:
    in_channels, size = SMALL_SETTINGS.get(name, (3, 32))
    model = create_model(name, num_classes=5, in_channels=in_channels, input_size=size)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_conv_init_is_kaiming_fan_out(imagenet_r50: nn.Module) -> None:
    w = imagenet_r50.layer4[0].conv2.weight  # 512x512x3x3: 2.36M samples
    fan_out = w.shape[0] * w.shape[2] * w.shape[3]
    expected_std = math.sqrt(2.0 / fan_out)
    assert abs(w.std().item() / expected_std - 1.0) < 0.01
    assert abs(w.mean().item()) < 0.01 * expected_std


# --------------------------------------------------------------------------------------------------
# Exact parameter counts
# --------------------------------------------------------------------------------------------------
def test_imagenet_resnet50_counts(imagenet_r50: nn.Module) -> None:
    assert n_params(imagenet_r50) == 25_557_032
    weights = prunable_weights(imagenet_r50)
    assert len(weights) == 54  # 53 convs + fc
    assert sum(w.numel() for w in weights) == 25_502_912


def test_imagenet_resnet50_torchvision_naming(imagenet_r50: nn.Module) -> None:
    sd = imagenet_r50.state_dict()
    for key in [
        "conv1.weight",
        "bn1.weight",
        "bn1.running_mean",
        "bn1.num_batches_tracked",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.running_var",
        "layer2.3.bn3.bias",
        "layer3.5.conv2.weight",
        "layer4.2.conv3.weight",
        "fc.weight",
        "fc.bias",
    ]:
        assert key in sd, key
    # torchvision's resnet50 state_dict: 161 parameters + 53 BNs x 3 buffers = 320 entries.
    assert len(sd) == 320
    assert "layer4.3.conv1.weight" not in sd and "layer1.1.downsample.0.weight" not in sd
    assert tuple(sd["conv1.weight"].shape) == (64, 3, 7, 7)
    assert tuple(sd["layer4.2.conv3.weight"].shape) == (2048, 512, 1, 1)
    assert tuple(sd["fc.weight"].shape) == (1000, 2048)
    # v1.5: the stride-2 is on the 3x3 conv, not on the first 1x1 conv
    assert imagenet_r50.layer2[0].conv1.stride == (1, 1)
    assert imagenet_r50.layer2[0].conv2.stride == (2, 2)
    assert imagenet_r50.layer2[0].downsample[0].stride == (2, 2)
    assert imagenet_r50.conv1.stride == (2, 2) and isinstance(imagenet_r50.maxpool, nn.MaxPool2d)


def test_imagenet_resnet50_zero_init_residual_option() -> None:
    default = ImageNetResNet(num_classes=10)
    assert torch.equal(default.layer1[0].bn3.weight, torch.ones(256))
    zeroed = ImageNetResNet(num_classes=10, zero_init_residual=True)
    stages = [zeroed.layer1, zeroed.layer2, zeroed.layer3, zeroed.layer4]
    bn3s = [blk.bn3.weight for stage in stages for blk in stage]
    assert len(bn3s) == 16
    assert all(torch.count_nonzero(w) == 0 for w in bn3s)
    assert torch.equal(zeroed.bn1.weight, torch.ones(64))


def test_resnet20_exact_count() -> None:
    # He et al. CIFAR ResNet-20 (n = 3), 3-channel input, 10 classes, convs without bias,
    # option-B (1x1 conv + BN) projection shortcuts at the two stage transitions:
    #   stem:    conv 3->16 3x3 = 3*16*9 = 432,           bn1 = 2*16 = 32
    #   stage 1: 3 blocks x (2 * 16*16*9 + 2 * 2*16)      = 3 * 4_672          = 14_016
    #   stage 2: first block 16*32*9 + 32*32*9 + 2*2*32   = 4_608+9_216+128    = 13_952
    #            + shortcut 16*32 (1x1) + 2*32             = 512 + 64           =    576
    #            2 more blocks x (2 * 32*32*9 + 2*2*32)    = 2 * 18_560         = 37_120
    #   stage 3: first block 32*64*9 + 64*64*9 + 2*2*64   = 18_432+36_864+256  = 55_552
    #            + shortcut 32*64 + 2*64                   = 2_048 + 128        =  2_176
    #            2 more blocks x (2 * 64*64*9 + 2*2*64)    = 2 * 73_984         = 147_968
    #   linear:  64*10 + 10                                                      =    650
    stem = 3 * 16 * 9 + 2 * 16
    stage1 = 3 * (2 * 16 * 16 * 9 + 2 * 2 * 16)
    stage2 = (16 * 32 * 9 + 32 * 32 * 9 + 2 * 2 * 32) + (16 * 32 + 2 * 32) \
        + 2 * (2 * 32 * 32 * 9 + 2 * 2 * 32)
    stage3 = (32 * 64 * 9 + 64 * 64 * 9 + 2 * 2 * 64) + (32 * 64 + 2 * 64) \
        + 2 * (2 * 64 * 64 * 9 + 2 * 2 * 64)
    linear = 64 * 10 + 10
    expected = stem + stage1 + stage2 + stage3 + linear
    assert expected == 272_474
    model = create_model("resnet20", num_classes=10, in_channels=3, input_size=32)
    assert n_params(model) == expected
    # 19 3x3 convs + 2 projection convs + linear
    assert len(prunable_weights(model)) == 22
    # option B: exactly two 1x1 projection convs, both stride 2
    projections = [
        m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
    ]
    assert [m.stride for m in projections] == [(2, 2), (2, 2)]


@pytest.mark.parametrize(
    "name,kwargs,expected",
    [
        # LeNet-300-100 on MNIST: 784*300+300 + 300*100+100 + 100*10+10
        ("mlp", dict(in_channels=1, input_size=28), 266_610),
        # classic LeNet-5: 156 + 2_416 + 48_120 + 10_164 + 850
        ("lenet5", dict(in_channels=1, input_size=32), 61_706),
        # 28x28 with the padded first conv has the same geometry and parameter count
        ("lenet5", dict(in_channels=1, input_size=28), 61_706),
        ("resnet32", dict(), 466_906),
        ("resnet56", dict(), 855_770),
        # kuangliu/pytorch-cifar reference counts
        ("resnet18", dict(), 11_173_962),
        ("resnet50", dict(), 23_520_842),
        ("vgg19", dict(), 20_040_522),
        # digits CNN: convs 1*64*9 + 64*128*9 + 128*256*9, linear 256*10+10, BN 2*(64+128+256)
        ("digits_cnn", dict(in_channels=1, input_size=8), 372_682),
    ],
)
def test_exact_param_counts(name: str, kwargs: dict, expected: int) -> None:
    model = create_model(name, num_classes=10, **kwargs)
    assert n_params(model) == expected


def test_mlp_input_features_follow_settings() -> None:
    model = create_model("mlp", num_classes=10, in_channels=3, input_size=32)
    first = prunable_weights(model)[0]
    assert tuple(first.shape) == (300, 3 * 32 * 32)
    assert [tuple(w.shape) for w in prunable_weights(model)[1:]] == [(100, 300), (10, 100)]


def test_lenet5_28_and_32_forward() -> None:
    for size, pad in [(28, 2), (32, 0)]:
        model = create_model("lenet5", num_classes=10, in_channels=1, input_size=size)
        assert model.conv1.padding == (pad, pad)
        assert model.fc1.in_features == 16 * 5 * 5
        model.eval()
        with torch.no_grad():
            assert model(torch.randn(3, 1, size, size)).shape == (3, 10)


def test_vgg19_structure() -> None:
    model = create_model("vgg19", num_classes=100)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128] + [256] * 4 + [512] * 8
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 16
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(512, 100)]


def test_digits_cnn_weights_and_other_sizes() -> None:
    model = create_model("digits_cnn", num_classes=10, in_channels=1, input_size=8)
    assert isinstance(model, DigitsCNN)
    assert sum(w.numel() for w in prunable_weights(model)) == 371_776
    other = create_model("digits_cnn", num_classes=4, in_channels=3, input_size=15)
    other.eval()
    with torch.no_grad():
        assert other(torch.randn(2, 3, 15, 15)).shape == (2, 4)


def test_in_channels_is_respected() -> None:
    for name in ["resnet20", "resnet18", "vgg19", "lenet5"]:
        model = create_model(name, num_classes=10, in_channels=1, input_size=32)
        assert prunable_weights(model)[0].shape[1] == 1
    r50 = ImageNetResNet(num_classes=10, in_channels=1)
    assert tuple(r50.conv1.weight.shape) == (64, 1, 7, 7)
