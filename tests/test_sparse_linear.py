"""Sparse execution of masked Linear layers (granet.kernels.sparse_linear, granet.sparsity.execution).

Tolerances: a float32 sum of n terms computed in any order (any blocking, FMA or not) differs from
the exact sum by at most γ_n = n·u / (1 - n·u) times the sum of the terms' magnitudes (u = 2⁻²⁴;
Higham, Accuracy and Stability of Numerical Algorithms, §3.1). The sparse kernels and the dense
BLAS sum in different orders, so each is checked against a float64 reference within that bound,
element by element: no tolerance wider than the arithmetic allows, and a wrong term (a missing or
extra weight, a wrong index) misses it by orders of magnitude. What involves no sum is compared
bit for bit: zeros off the mask, values read at active positions only, masks of whole runs.
"""
from __future__ import annotations

import logging
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import granet
from granet.errors import ConfigError
from granet.kernels.sparse_linear import LinearLayout, sparse_linear
from granet.sparsity.execution import SparseExecution, SparseLinear

U = 2.0**-24


def _gamma(n: int) -> float:
    return n * U / (1 - n * U)


def _mask(shape: tuple[int, int], density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    numel = shape[0] * shape[1]
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=g)[: round(density * numel)]] = True
    return mask.view(shape)


def _within(value: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor, terms: int) -> None:
    """``value`` (float32) is within the float32 summation bound of ``exact`` (float64)."""
    excess = (value.detach().double() - exact).abs() - _gamma(terms) * magnitude
    worst = float(excess.max()) if excess.numel() else 0.0
    assert worst <= 0, f"off by {worst:.3g} more than the bound"


# ---------------------------------------------------------------------------------------------- layout

def test_layout_of_a_hand_worked_mask():
    mask = torch.tensor([[1, 0, 1, 0],
                         [0, 0, 0, 0],
                         [0, 1, 1, 1]], dtype=torch.bool)
    layout = LinearLayout.from_mask(mask)
    assert layout.shape == (3, 4) and layout.nnz == 5
    assert layout.crow.tolist() == [0, 2, 2, 5] and layout.col.tolist() == [0, 2, 1, 2, 3]
    assert layout.pos.tolist() == [0, 2, 9, 10, 11]
    # transposed (4 x 3), column by column of the weight
    assert layout.crow_t.tolist() == [0, 1, 2, 4, 5] and layout.col_t.tolist() == [0, 2, 0, 2, 2]
    assert layout.pos_t.tolist() == [0, 9, 2, 10, 11]
    assert layout.crow.dtype == layout.col.dtype == layout.crow_t.dtype == layout.col_t.dtype == torch.int32
    weight = torch.arange(12.0).view(3, 4)
    assert torch.equal(layout.matrix(weight).to_dense(), weight * mask)
    assert torch.equal(layout.transposed(weight).to_dense(), (weight * mask).t())
    assert torch.equal(layout.scatter(layout.values(weight)), weight * mask)


# ---------------------------------------------------------------------------------------------- kernel

CASES = [  # (out, in, leading dims of x, density, bias)
    ((40, 30), (16,), 0.3, True),
    ((40, 30), (4, 5), 0.05, False),  # batch x tokens x features
    ((17, 64), (3, 2, 7), 1.0, True),
    ((64, 17), (33,), 0.5, True),
    ((8, 8), (5,), 0.0, True),  # an empty layer: the output is the bias
]


@pytest.mark.parametrize("shape,lead,density,with_bias", CASES)
def test_outputs_and_gradients_match_the_masked_dense_layer(shape, lead, density, with_bias):
    out_f, in_f = shape
    g = torch.Generator().manual_seed(1)
    mask = _mask(shape, density, 2)
    weight = torch.randn(shape, generator=g).requires_grad_()
    bias = torch.randn(out_f, generator=g).requires_grad_() if with_bias else None
    x = torch.randn(*lead, in_f, generator=g).requires_grad_()
    gy = torch.randn(*lead, out_f, generator=g)

    y = sparse_linear(x, weight, LinearLayout.from_mask(mask), bias)
    assert y.shape == (*lead, out_f) and y.dtype == torch.float32
    y.backward(gy)
    # float64 references of the masked dense layer
    w64, x64, gy64 = (weight.detach() * mask).double(), x.detach().double(), gy.double()
    b64 = bias.detach().double() if bias is not None else torch.zeros(out_f, dtype=torch.float64)
    rows = x64.reshape(-1, in_f).shape[0]
    _within(y, F.linear(x64, w64, b64), F.linear(x64.abs(), w64.abs(), b64.abs()), in_f + 1)
    _within(x.grad, gy64 @ w64, gy64.abs() @ w64.abs(), out_f)
    gw64 = gy64.reshape(-1, out_f).t() @ x64.reshape(-1, in_f)
    magnitude = gy64.reshape(-1, out_f).abs().t() @ x64.reshape(-1, in_f).abs()
    assert torch.equal(weight.grad[~mask], torch.zeros(int((~mask).sum())))  # exactly zero off the mask
    _within(weight.grad[mask], gw64[mask], magnitude[mask], rows)
    if bias is not None:
        _within(bias.grad, gy64.reshape(-1, out_f).sum(0), gy64.reshape(-1, out_f).abs().sum(0), rows)


def test_dense_grad_mode_gives_the_dense_weight_gradient():
    g = torch.Generator().manual_seed(3)
    mask = _mask((24, 40), 0.1, 4)
    weight = (torch.randn(24, 40, generator=g) * mask).requires_grad_()
    x, gy = torch.randn(50, 40, generator=g), torch.randn(50, 24, generator=g)
    sparse_linear(x, weight, LinearLayout.from_mask(mask), dense_grad=True).backward(gy)
    exact = gy.double().t() @ x.double()
    _within(weight.grad, exact, gy.double().abs().t() @ x.double().abs(), 50)
    assert int((weight.grad[~mask] != 0).sum()) == int((~mask).sum())  # every inactive position has its gradient


def test_only_the_active_positions_of_the_weight_are_read():
    g = torch.Generator().manual_seed(5)
    mask = _mask((20, 30), 0.2, 6)
    clean = torch.randn(20, 30, generator=g) * mask
    dirty = torch.where(mask, clean, torch.full_like(clean, float("nan")))
    x = torch.randn(7, 30, generator=g)
    layout = LinearLayout.from_mask(mask)
    results = []
    for w in (clean, dirty):
        w = w.clone().requires_grad_()
        xi = x.clone().requires_grad_()
        y = sparse_linear(xi, w, layout)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), xi.grad, w.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_output_layouts_hold_the_same_values():
    g = torch.Generator().manual_seed(7)
    mask = _mask((12, 9), 0.4, 8)
    weight, x = torch.randn(12, 9, generator=g), torch.randn(3, 5, 9, generator=g)
    layout = LinearLayout.from_mask(mask)
    view = sparse_linear(x, weight, layout)
    copy = sparse_linear(x, weight, layout, contiguous_output=True)
    assert copy.is_contiguous() and not view.is_contiguous()
    assert torch.equal(view, copy)


@pytest.mark.parametrize("lead", [(), (6,), (2, 3)])
def test_in_place_changes_of_the_output(lead):
    # ReLU(inplace=True) after a Linear layer (LeNet-300-100): the output must not be a view made
    # inside the autograd function, which autograd forbids changing in place.
    g = torch.Generator().manual_seed(15)
    mask = _mask((9, 5), 0.5, 16)
    layout = LinearLayout.from_mask(mask)
    weight, x = torch.randn(9, 5, generator=g), torch.randn(*lead, 5, generator=g)
    grads = []
    for inplace in (False, True):
        w, xi = weight.clone().requires_grad_(), x.clone().requires_grad_()
        y = sparse_linear(xi, w, layout)
        y = y.relu_() if inplace else y.relu()
        (y * torch.arange(9.0)).sum().backward()
        grads.append((y.detach(), xi.grad, w.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_an_empty_batch():
    mask = _mask((6, 4), 0.5, 9)
    weight = torch.randn(6, 4).requires_grad_()
    x = torch.zeros(0, 4, requires_grad=True)
    y = sparse_linear(x, weight, LinearLayout.from_mask(mask), torch.zeros(6, requires_grad=True))
    y.sum().backward()
    assert y.shape == (0, 6) and torch.equal(weight.grad, torch.zeros(6, 4))


def test_autocast_runs_in_float32():
    g = torch.Generator().manual_seed(10)
    mask = _mask((16, 8), 0.5, 11)
    weight, x = torch.randn(16, 8, generator=g), torch.randn(4, 8, generator=g).bfloat16()
    layout = LinearLayout.from_mask(mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse_linear(x, weight, layout)
    assert y.dtype == torch.float32
    assert torch.equal(y, sparse_linear(x.float(), weight, layout))


def test_the_weight_changed_before_backward_is_refused():
    mask = _mask((6, 4), 0.5, 12)
    weight = torch.randn(6, 4, requires_grad=True)
    y = sparse_linear(torch.randn(3, 4), weight, LinearLayout.from_mask(mask))
    with torch.no_grad():
        weight.mul_(2)  # an optimizer step between forward and backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def _one_line_error(kind, match, fn):
    with pytest.raises(kind, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def test_bad_inputs_give_one_line_errors():
    mask = _mask((6, 4), 0.5, 13)
    layout = LinearLayout.from_mask(mask)
    w, x = torch.randn(6, 4), torch.randn(3, 4)
    _one_line_error(ValueError, "float32 tensors; weight is torch.float64",
                    lambda: sparse_linear(x, w.double(), layout))
    _one_line_error(ValueError, "float32 tensors; x is torch.float16", lambda: sparse_linear(x.half(), w, layout))
    _one_line_error(ValueError, "runs on the CPU; x is on meta", lambda: sparse_linear(x.to("meta"), w, layout))
    _one_line_error(ValueError, r"weight is torch.float32 of shape \(4, 6\)", lambda: sparse_linear(x, w.t(), layout))
    _one_line_error(ValueError, r"expected \(\.\.\., 4\)", lambda: sparse_linear(torch.randn(3, 5), w, layout))
    _one_line_error(ValueError, r"expected \(6,\)", lambda: sparse_linear(x, w, layout, torch.zeros(5)))
    _one_line_error(ValueError, "layout must be a LinearLayout", lambda: sparse_linear(x, w, mask))  # type: ignore
    _one_line_error(ValueError, "2-D torch.bool mask", lambda: LinearLayout.from_mask(mask.float()))
    _one_line_error(ValueError, "2-D torch.bool mask", lambda: LinearLayout.from_mask(mask.view(-1)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_are_refused():
    mask = _mask((6, 4), 0.5, 14)
    _one_line_error(ValueError, "runs on the CPU", lambda: sparse_linear(
        torch.randn(3, 4, device="cuda"), torch.randn(6, 4, device="cuda"), LinearLayout.from_mask(mask)))


# ---------------------------------------------------------------------------------------------- execution

def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def _run(method: str, mode: Optional[str], steps: int = 50):
    """A short run: masks after every step, the final model and the execution."""
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier = granet.create_sparsifier(method, model, optimizer, density=0.2, total_steps=steps,
                                          update_interval=10)
    execution = SparseExecution(model, sparsifier, mode=mode) if mode else None
    g = torch.Generator().manual_seed(1)
    masks, dense_steps, changed = [], 0, 0
    for _ in range(steps):
        dense_steps += sparsifier.needs_dense_gradient(sparsifier.step_count + 1)
        x, y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        before = dict(sparsifier.masks)
        sparsifier.step()
        optimizer.zero_grad()
        changed += sum(not torch.equal(before[n], m) for n, m in sparsifier.masks.items())
        masks.append({n: m.clone() for n, m in sparsifier.masks.items()})
    return masks, model, execution, dense_steps, changed


@pytest.mark.parametrize("method", ["rigl", "granet-st"])
def test_a_run_has_the_masks_of_the_masked_dense_run(method, one_thread):
    # 50 steps, ΔT = 10: every update prunes or drops and regrows from weights (and dense gradients
    # at regrowth steps) that differ from the masked dense run's only by summation order; in this
    # setting no score lies within that rounding of a selection threshold, so the masks are equal.
    reference, dense_model, _, dense_steps, _ = _run(method, None)
    masks, model, execution, _, changed = _run(method, "sparse")
    assert len(masks) == 50
    for step, (a, b) in enumerate(zip(reference, masks), 1):
        assert all(torch.equal(a[n], b[n]) for n in a), f"masks differ after step {step}"
    assert changed > 0 and execution.rebuilds == 3 + changed  # built once, then once per changed mask
    assert execution.dense_gradient_passes == dense_steps > 0
    for p, q in zip(dense_model.parameters(), model.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-5)


def test_layouts_follow_set_masks_and_load_state_dict():
    model = _mlp()
    sparsifier = granet.create_sparsifier("static", model, density=0.2)
    execution = SparseExecution(model, sparsifier, mode="sparse")
    assert execution.rebuilds == 3
    state = sparsifier.state_dict()
    x = torch.randn(5, 64)

    def masked_dense() -> torch.Tensor:
        h = x
        for i, layer in enumerate((model[0], model[2], model[4])):
            m = sparsifier.masks[f"{i * 2}.weight"]
            h = F.linear(h, layer.weight * m, layer.bias)
            h = h.relu() if i < 2 else h
        return h

    new = {n: _mask(tuple(m.shape), 0.1, 20 + i) for i, (n, m) in enumerate(sparsifier.masks.items())}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # weights active under the new masks are non-zero
    sparsifier.set_masks(new)
    y = model(x)
    assert execution.rebuilds == 6
    assert all(torch.equal(sparsifier.masks[n], new[n]) for n in new)
    # three layers of float32 sums in two orders: relative differences of a few u, far below what a
    # stale layout (other weights) gives
    assert torch.allclose(y, masked_dense(), rtol=1e-5, atol=0)
    sparsifier.load_state_dict(state)
    model(x)
    assert execution.rebuilds == 9
    model(x)
    assert execution.rebuilds == 9  # nothing changed: nothing rebuilt


def test_dense_mode_is_the_masked_dense_model_bit_for_bit():
    model, reference = _mlp(), _mlp()
    sparsifier = granet.create_sparsifier("static", model, density=0.2)
    granet.create_sparsifier("static", reference, density=0.2)
    execution = SparseExecution(model, sparsifier, mode="dense")
    x = torch.randn(9, 64)
    assert execution.sparse_layers == [] and torch.equal(model(x), reference(x))


def test_auto_mode_by_density_and_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 16))
    sparsifier = granet.create_sparsifier("static", model, density=0.05, distribution="uniform")
    execution = SparseExecution(model, sparsifier, mode="auto", max_density=0.05, min_size=100_000)
    plan = {p.name: p for p in execution.plan()}
    assert plan["0.weight"].sparse and not plan["2.weight"].sparse  # 262,144 vs 16,384 entries
    assert "smaller than 100000" in plan["2.weight"].reason
    assert execution.sparse_layers == ["0.weight"]
    _one_line_error(ConfigError, "already run by another SparseExecution", lambda: SparseExecution(model, sparsifier))
    execution.remove()
    execution = SparseExecution(model, sparsifier, mode="auto", max_density=0.04, min_size=0)
    assert execution.sparse_layers == []
    assert all("density above 0.04" in p.reason for p in execution.plan())
    # a layer pruned to density d keeps round(d * size) weights, a density a hair above d: still sparse
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(124, 19))
    sparsifier = granet.create_sparsifier("static", model, density=0.05)
    assert sparsifier.counts == [118] and sparsifier.density() > 0.05  # 0.05 x 2356 = 117.8
    assert SparseExecution(model, sparsifier, max_density=0.05, min_size=0).sparse_layers == ["0.weight"]


def test_layers_are_reclassed_and_restored():
    model = _mlp()
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    sparsifier = granet.create_sparsifier("static", model, density=0.2)
    execution = SparseExecution(model, sparsifier, mode="sparse")
    assert all(type(model[i]) is SparseLinear for i in (0, 2, 4))
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    execution.remove()
    assert all(type(model[i]) is nn.Linear for i in (0, 2, 4))
    model(torch.randn(2, 64))
    assert execution.rebuilds == 3


def test_convolutions_stay_dense_with_one_line(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    sparsifier = granet.create_sparsifier("static", model, density=0.5)
    with caplog.at_level(logging.INFO, logger="granet.sparsity.execution"):
        execution = SparseExecution(model, sparsifier, mode="sparse")
    lines = [r.getMessage() for r in caplog.records if "convolution" in r.getMessage()]
    assert lines == ["sparse execution: 1 convolution weight stay dense (0.weight): sparse execution covers nn.Linear"]
    assert execution.sparse_layers == ["2.weight"] and type(model[0]) is nn.Conv2d
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_bad_settings_give_one_line_errors():
    model = _mlp()
    sparsifier = granet.create_sparsifier("static", model, density=0.2)
    _one_line_error(ConfigError, "unknown execution mode 'fast'; valid: auto, dense, sparse",
                    lambda: SparseExecution(model, sparsifier, mode="fast"))
    _one_line_error(ConfigError, "max_density must be a number in", lambda: SparseExecution(model, sparsifier,
                                                                                           max_density=1.5))
    _one_line_error(ConfigError, "min_size must be an int", lambda: SparseExecution(model, sparsifier, min_size=-1))
    _one_line_error(TypeError, "sparsifier must be a granet Sparsifier", lambda: SparseExecution(model, object()))
    model64 = _mlp().double()
    sparsifier64 = granet.create_sparsifier("static", model64, density=0.2)
    _one_line_error(ConfigError, "needs float32 weights; 0.weight is torch.float64",
                    lambda: SparseExecution(model64, sparsifier64, mode="sparse"))
    execution = SparseExecution(model64, sparsifier64, mode="auto")  # auto: dense, with the reason
    assert execution.sparse_layers == [] and all("torch.float64" in p.reason for p in execution.plan())
