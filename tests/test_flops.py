"""FLOPs accounting: measured dense FLOPs, sparse inference FLOPs, RigL's training ledger, the CLI."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn

import granet
from granet.accounting.flops import (
    LayerFlops,
    TrainingFlopsLedger,
    inference_flops,
    inference_flops_relative,
    layer_flops,
    step_needs_dense_gradient,
)
from granet.accounting.flops_table import flops_table, format_flops_table, human_readable
from granet.cli import flops as cli_flops
from granet.models import create_model

# ------------------------------------------------------------------ a hand-worked tiny model

# Conv2d(3 -> 8, kernel 3x5, stride 2, padding 1) on 17x20: H_out = (17 + 2 - 3) // 2 + 1 = 9,
# W_out = (20 + 2 - 5) // 2 + 1 = 9; then Linear(8 * 9 * 9 = 648 -> 10).
CONV_FLOPS = 2 * 3 * 3 * 5 * 8 * 9 * 9  # 2 * C_in * k_h * k_w * C_out * H_out * W_out = 58,320
LINEAR_FLOPS = 2 * 648 * 10  # 2 * in * out = 12,960


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=(3, 5), stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(648, 10)
    )


def test_dense_flops_of_hand_worked_model() -> None:
    model = tiny()
    flops = layer_flops(model, torch.zeros(1, 3, 17, 20))
    assert flops.layers == {"0.weight": CONV_FLOPS, "3.weight": LINEAR_FLOPS}
    assert CONV_FLOPS == 58_320 and LINEAR_FLOPS == 12_960
    assert flops.other == 0  # bias, ReLU and flatten are not counted
    assert flops.dense == CONV_FLOPS + LINEAR_FLOPS
    assert flops.shapes == {"0.weight": (8, 3, 3, 5), "3.weight": (10, 648)}
    assert list(flops.layers) == [n for n, _ in granet.sparsifiable_parameters(model)]


def test_flops_are_per_example_and_mode_is_restored() -> None:
    model = tiny().train()
    batched = layer_flops(model, torch.zeros(4, 3, 17, 20))
    assert batched.layers == {"0.weight": CONV_FLOPS, "3.weight": LINEAR_FLOPS}
    assert model.training
    model.eval()
    layer_flops(model, torch.zeros(1, 3, 17, 20))
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_grouped_conv_reused_module_and_other_ops() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=False)  # C_in / groups = 2
            self.fc = nn.Linear(8, 8, bias=False)
            self.extra = nn.Parameter(torch.randn(8, 5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x).mean(dim=(2, 3))
            x = self.fc(self.fc(x))  # called twice: both calls count under one name
            return x @ self.extra  # a matmul outside any Conv/Linear: "other"

    flops = layer_flops(Net(), torch.zeros(1, 4, 6, 6))
    assert flops.layers == {"conv.weight": 2 * 2 * 3 * 3 * 8 * 6 * 6, "fc.weight": 2 * (2 * 8 * 8)}
    assert flops.other == 2 * 8 * 5
    # other ops are counted dense whatever the densities
    assert inference_flops(flops, {"conv.weight": 0.0, "fc.weight": 0.0}) == 2 * 8 * 5


def test_wrapper_prefixes_are_stripped() -> None:
    wrapper = nn.Module()
    wrapper.module = tiny()  # the layout DistributedDataParallel gives
    wrapper.forward = wrapper.module.forward  # type: ignore[method-assign]
    flops = layer_flops(wrapper, torch.zeros(1, 3, 17, 20))
    assert flops.layers == {"0.weight": CONV_FLOPS, "3.weight": LINEAR_FLOPS}


def test_inference_flops_at_given_densities() -> None:
    flops = layer_flops(tiny(), torch.zeros(1, 3, 17, 20))
    density = {"0.weight": 0.5, "3.weight": 0.25}
    assert inference_flops(flops, density) == 0.5 * CONV_FLOPS + 0.25 * LINEAR_FLOPS == 32_400
    assert inference_flops_relative(flops, density) == 32_400 / 71_280
    assert inference_flops(flops, {"3.weight": 0.25}) == CONV_FLOPS + 0.25 * LINEAR_FLOPS  # missing = dense
    assert inference_flops(flops, {}) == flops.dense
    assert inference_flops_relative(flops, {}) == 1.0
    with pytest.raises(ValueError, match="nope.weight"):
        inference_flops(flops, {"nope.weight": 0.5})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        inference_flops(flops, {"0.weight": 1.5})
    assert LayerFlops.from_dict(json.loads(json.dumps(flops.to_dict()))) == flops


def test_flops_table_and_text() -> None:
    model = tiny()
    table = flops_table(model, torch.zeros(1, 3, 17, 20), {"0.weight": 0.5})
    params = sum(p.numel() for p in model.parameters())
    assert table["params"] == params == 8 * 3 * 3 * 5 + 8 + 648 * 10 + 10
    assert table["sparsified_params"] == 360
    assert table["active_params"] == params - 180
    assert table["density"] == 0.5
    assert table["dense_inference_flops"] == CONV_FLOPS + LINEAR_FLOPS
    assert table["inference_flops"] == 0.5 * CONV_FLOPS + LINEAR_FLOPS
    assert table["inference_flops_relative"] == (0.5 * CONV_FLOPS + LINEAR_FLOPS) / (CONV_FLOPS + LINEAR_FLOPS)
    assert [r["name"] for r in table["layers"]] == ["0.weight", "3.weight"]
    assert table["layers"][0] == {
        "name": "0.weight", "shape": [8, 3, 3, 5], "params": 360, "density": 0.5, "sparsified": True,
        "dense_flops": CONV_FLOPS, "flops": 0.5 * CONV_FLOPS,
    }
    assert table["layers"][1]["sparsified"] is False and table["layers"][1]["density"] == 1.0
    text = format_flops_table(table)
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "shape", "params", "density", "dense", "FLOPs", "FLOPs"]
    assert "0.weight" in lines[2] and "8x3x3x5" in lines[2] and "58.32K" in lines[2] and "29.16K" in lines[2]
    assert "1.0000*" in lines[3]
    assert len({len(line) for line in lines[:5]}) <= 2  # aligned columns (trailing cells may be trimmed)


def test_human_readable() -> None:
    assert human_readable(8_178_368_512) == "8.18G"
    assert human_readable(8_210_000_000) == "8.21G"
    assert human_readable(25_502_912) == "25.50M"
    assert human_readable(58_320) == "58.32K"
    assert human_readable(512) == "512"
    assert human_readable(0.5) == "0.50"
    assert human_readable(3.2e18) == "3200.00P"


# ------------------------------------------------------------------ ImageNet ResNet-50 vs RigL


@pytest.fixture(scope="module")
def resnet50() -> tuple[nn.Module, LayerFlops]:
    model = create_model("imagenet_resnet50", num_classes=1000, input_size=224)
    return model, layer_flops(model, torch.zeros(1, 3, 224, 224))


def _densities(model: nn.Module, kind: str, density: float, keep_dense: tuple[str, ...] = ()) -> dict[str, float]:
    params = granet.sparsifiable_parameters(model, keep_dense)
    counts = granet.layer_counts(kind, [tuple(p.shape) for _, p in params], density)
    return {n: c / p.numel() for (n, p), c in zip(params, counts)}


def test_resnet50_dense_flops(resnet50: tuple[nn.Module, LayerFlops]) -> None:
    model, flops = resnet50
    params = granet.sparsifiable_parameters(model)
    assert len(params) == len(flops.layers) == 54
    assert sum(p.numel() for _, p in params) == 25_502_912
    assert flops.dense == 8_178_368_512
    assert abs(flops.dense - 8.2e9) / 8.2e9 < 0.01
    assert flops.other == 0
    assert flops.layers["conv1.weight"] == 2 * 3 * 7 * 7 * 64 * 112 * 112
    assert flops.layers["fc.weight"] == 2 * 2048 * 1000


@pytest.mark.parametrize(
    "kind, sparsity, keep_dense, published",
    [
        ("erk", 0.8, (), 0.42),
        ("erk", 0.9, (), 0.24),
        ("uniform", 0.8, ("conv1",), 0.23),
        ("uniform", 0.9, ("conv1",), 0.13),
    ],
)
def test_rigl_published_inference_flops(
    resnet50: tuple[nn.Module, LayerFlops], kind: str, sparsity: float, keep_dense: tuple[str, ...], published: float
) -> None:
    # RigL Table 2 (ImageNet ResNet-50 test FLOPs). Uniform keeps conv1 dense and sparsifies fc
    # (RigL's counting colab); see granet.accounting.flops' docstring for the small residual differences.
    model, flops = resnet50
    ratio = inference_flops_relative(flops, _densities(model, kind, 1.0 - sparsity, keep_dense))
    assert abs(ratio - published) <= 0.01, ratio


# ------------------------------------------------------------------ training FLOPs ledger

F_D = 1000  # two layers of 600 + 400 dense FLOPs
DENSITY = {"a": 0.5, "b": 0.25}
F_S = 0.5 * 600 + 0.25 * 400  # 400


def two_layer() -> LayerFlops:
    return LayerFlops(layers={"a": 600, "b": 400}, shapes={"a": (6, 100), "b": (4, 100)})


def test_ledger_set_is_three_sparse_forwards() -> None:
    ledger = TrainingFlopsLedger(two_layer())
    assert ledger.relative is None and ledger.steps == 0
    added = ledger.record(DENSITY, steps=10)
    assert added == ledger.total == 10 * 3 * F_S == 12_000
    assert ledger.dense_total == 10 * 3 * F_D
    assert ledger.relative == F_S / F_D == 0.4
    assert ledger.steps == 10


def test_ledger_rigl_average_over_an_interval() -> None:
    delta_t = 100
    ledger = TrainingFlopsLedger(two_layer())
    ledger.record(DENSITY, steps=delta_t)
    ledger.record(DENSITY, dense_gradient=True)
    per_step = ledger.total / ledger.steps
    assert per_step == (3 * F_S * delta_t + 2 * F_S + F_D) / (delta_t + 1)
    assert ledger.total == 3 * F_S * delta_t + 2 * F_S + F_D == 121_800


def test_ledger_snfs_needs_the_dense_gradient_every_step() -> None:
    ledger = TrainingFlopsLedger(two_layer())
    ledger.record(DENSITY, steps=7, dense_gradient=True)
    assert ledger.total == 7 * (2 * F_S + F_D)
    assert ledger.relative == (2 * F_S + F_D) / (3 * F_D)


def test_ledger_pruning_trajectory_one_layer_model() -> None:
    model = nn.Linear(16, 8, bias=False)
    flops = layer_flops(model, torch.zeros(1, 16))
    f_d = 2 * 16 * 8
    assert flops.dense == f_d
    ledger = TrainingFlopsLedger(flops)
    trajectory = [1.0, 1.0, 0.75, 0.5, 0.25, 0.125, 0.125, 0.125]  # dense phase, then pruning
    for d in trajectory:
        ledger.record({"weight": d})
    mean_sparsity = sum(1 - d for d in trajectory) / len(trajectory)
    assert ledger.total == 3 * f_d * len(trajectory) * (1 - mean_sparsity)
    assert ledger.relative == 1 - mean_sparsity
    # the dense phase costs exactly dense training
    dense_phase = TrainingFlopsLedger(flops)
    dense_phase.record({"weight": 1.0}, steps=5)
    assert dense_phase.total == dense_phase.dense_total == 5 * 3 * f_d and dense_phase.relative == 1.0


def test_ledger_resume_and_validation() -> None:
    full = TrainingFlopsLedger(two_layer())
    first = TrainingFlopsLedger(two_layer())
    for ledger in (full, first):
        ledger.record(DENSITY, steps=3)
        ledger.record({"a": 1.0}, dense_gradient=True)
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints may go through JSON/YAML
    resumed = TrainingFlopsLedger(two_layer())
    resumed.load_state_dict(state)
    for ledger in (full, resumed):
        ledger.record(DENSITY, steps=2)
    assert resumed.total == full.total and resumed.steps == full.steps == 6
    assert resumed.relative == full.relative
    other_model = TrainingFlopsLedger(LayerFlops(layers={"a": 1}))
    with pytest.raises(ValueError, match="dense forward FLOPs"):
        other_model.load_state_dict(state)
    with pytest.raises(ValueError, match="not a TrainingFlopsLedger state"):
        resumed.load_state_dict({"steps": 1})
    with pytest.raises(ValueError, match="non-negative"):
        resumed.record(DENSITY, steps=-1)
    assert resumed.record(DENSITY, steps=0) == 0.0


def test_step_needs_dense_gradient() -> None:
    def make(method: str, **options: object) -> granet.Sparsifier:
        model = tiny()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return granet.create_sparsifier(method, model, optimizer, density=0.5, total_steps=1000, **options)

    rigl = make("rigl")
    assert step_needs_dense_gradient(rigl, 100) and step_needs_dense_gradient(rigl, 700)
    assert not step_needs_dense_gradient(rigl, 101)
    assert not step_needs_dense_gradient(rigl, 800)  # regrowth ends at 75% of training
    assert not any(step_needs_dense_gradient(make("set"), t) for t in range(1, 1001))
    assert all(step_needs_dense_gradient(make("snfs"), t) for t in (1, 50, 100, 999))
    assert not any(step_needs_dense_gradient(make("static"), t) for t in (1, 100))
    granet_sp = make("granet", update_interval=100)
    assert step_needs_dense_gradient(granet_sp, 100) and not step_needs_dense_gradient(granet_sp, 150)


# ------------------------------------------------------------------ CLI


def test_dataset_shape_without_loading_data() -> None:
    from granet.data import dataset_shape

    assert dataset_shape("cifar10") == (10, 3, 32)
    assert dataset_shape("cifar100") == (100, 3, 32)
    assert dataset_shape("imagenet") == (1000, 3, 224)
    assert dataset_shape("Fashion-MNIST") == (10, 1, 28)
    assert dataset_shape("mnist") == (10, 1, 28)
    assert dataset_shape("digits") == (10, 1, 8)
    assert dataset_shape("synthetic") == (10, 3, 32)  # the builder's defaults
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        dataset_shape("nope")


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="granet flops")
    cli_flops.add_arguments(parser)
    return cli_flops.run(parser.parse_args(argv))


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "mlp", "--dataset", "mnist", "--density", "0.25", "--distribution", "uniform", "--json"]
    assert _run(argv) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)  # one JSON object and nothing else
    for key in ("params", "sparsified_params", "dense_inference_flops", "inference_flops",
                "inference_flops_relative", "layers"):
        assert key in data
    assert data["dense_inference_flops"] == 2 * (784 * 300 + 300 * 100 + 100 * 10)
    assert data["inference_flops_relative"] == pytest.approx(0.25, abs=1e-6)
    assert data["sparsified_params"] == 784 * 300 + 300 * 100 + 100 * 10
    assert data["input_shape"] == [1, 28, 28] and data["estimated"] is False


def test_cli_method_and_estimate_note(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "mlp", "--dataset", "mnist", "--method", "gmp-layerwise", "--density", "0.2", "--json"]
    assert _run(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["distribution"] == "uniform" and data["note"] is None
    assert data["inference_flops_relative"] == pytest.approx(0.2, abs=1e-6)

    assert _run(["--model", "mlp", "--dataset", "mnist", "--method", "granet"]) == 0
    out = capsys.readouterr().out
    assert "estimate" in out and "erk" in out and "inference FLOPs" in out

    assert _run(["--model", "mlp", "--dataset", "mnist", "--method", "dense", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["inference_flops_relative"] == 1.0 and data["target_density"] == 1.0

    assert _run(["--model", "mlp", "--dataset", "mnist", "--keep-dense", "layers.4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["sparsified"] for r in data["layers"]] == [True, True, False]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--model", "no_such_model"], "unknown model 'no_such_model'"),
        (["--model", "mlp", "--dataset", "no_such_data"], "unknown dataset 'no_such_data'"),
        (["--model", "mlp", "--method", "no_such_method"], "unknown method 'no_such_method'"),
        (["--model", "mlp", "--density", "0"], "--density must be in (0, 1]"),
        (["--model", "mlp", "--density", "1.5"], "--density must be in (0, 1]"),
        (["--model", "mlp", "--keep-dense", "nothing*"], "nothing*"),
    ],
)
def test_cli_errors(capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str) -> None:
    assert _run(argv + ["--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and fragment in captured.err
    assert "Traceback" not in captured.err
