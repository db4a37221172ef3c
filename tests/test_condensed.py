"""Condensed fan-in inference: the layout, outputs against exact and dense results, native bits equal
to the torch operations, refusals, the plan's kernel choice, and the ``fan-in`` export layout."""
import json
import math
import re
import struct

import pytest
import torch
from torch import nn

from granet.deploy import condensed, inference
from granet.deploy.condensed import CondensedLinear, condense, condensed_linear, constant_fan_in
from granet.deploy.inference import LayerDecision, SparseLinear, plan_sparse_inference, to_sparse_inference

native = pytest.mark.skipif(not condensed.available(), reason=f"native condensed kernels {condensed.status()}")
U = 2.0**-24  # unit roundoff of float32


def _fan_in_weight(out_features: int, in_features: int, k: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """A weight whose every row holds exactly ``k`` non-zero values at random inputs."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.rand(out_features, in_features, generator=g).argsort(dim=1)[:, :k]
    values = torch.randn(out_features, k, generator=g)
    values = torch.where(values == 0, torch.ones(()), values)  # non-zero, so the fan-in is exactly k
    return torch.zeros(out_features, in_features).scatter_(1, picks, values).to(dtype)


def _fan_in_linear(in_features: int, out_features: int, k: int, seed: int, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(_fan_in_weight(out_features, in_features, k, seed))
    return layer


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


# ---------------------------------------------------------------------------- layout

def test_condense_and_blocked_layout_hand_worked():
    w = torch.tensor([[0.0, 2.0, 0.0, -1.0, 0.0],
                      [3.0, 0.0, 0.0, 0.0, 4.0],
                      [0.0, 0.0, 5.0, 6.0, 0.0]])
    values, index = condense(w)
    assert index.tolist() == [[1, 3], [0, 4], [2, 3]] and values.tolist() == [[2.0, -1.0], [3.0, 4.0], [5.0, 6.0]]
    layer = CondensedLinear(w)
    assert layer.fan_in == 2 and layer.index.dtype == torch.int16
    # one block of 16 rows: (blocks, k, 16), row r of the block in lane r, rows 3..15 padding (0 at input 0)
    assert layer.values.shape == layer.index.shape == (1, 2, 16)
    assert layer.values[0, :, :3].tolist() == [[2.0, 3.0, 5.0], [-1.0, 4.0, 6.0]]
    assert layer.index[0, :, :3].tolist() == [[1, 0, 2], [3, 4, 3]]
    assert not layer.values[0, :, 3:].any() and not layer.index[0, :, 3:].any()
    assert torch.equal(layer.to_dense(), w)
    x = torch.tensor([[1.0, 10.0, 100.0, 1000.0, 10000.0]])
    assert layer(x).tolist() == [[20.0 - 1000.0, 3.0 + 40000.0, 500.0 + 6000.0]]  # exact in float32


def test_constant_fan_in():
    assert constant_fan_in(torch.tensor([[1, 0, 1], [0, 1, 1]])) == 2
    assert constant_fan_in(torch.tensor([[1, 0, 1], [0, 0, 1]])) is None
    assert constant_fan_in(torch.zeros(0, 4)) == 0 and constant_fan_in(torch.zeros(3, 4)) == 0
    with pytest.raises(ValueError, match=r"constant_fan_in needs a 2-D mask, got shape \(4,\)"):
        constant_fan_in(torch.ones(4))


def test_mask_keeps_an_active_exact_zero():
    w = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])  # (1, 2) active in row 1 holds exactly 0.0
    mask = torch.tensor([[True, False, True], [False, True, True]])
    with pytest.raises(ValueError, match="'fc' has no constant fan-in"):
        CondensedLinear(w, name="fc")
    layer = CondensedLinear(w, mask=mask, name="fc")
    assert layer.fan_in == 2 and torch.equal(layer.to_dense(), w)
    assert layer.condensed()[1].tolist() == [[0, 2], [1, 2]]


# ---------------------------------------------------------------------------- outputs

def _exact(weight: torch.Tensor, bias, x: torch.Tensor) -> torch.Tensor:
    """x W^T + b in float64: every float32 product is exact there, and the sums err by ~1e-16."""
    y = x.double() @ weight.double().t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("shape, k", [((40, 37), 5), ((70_000, 9), 3), ((33, 1), 1), ((20, 50), 20)])
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 3), (9,), (40,)])
@pytest.mark.parametrize("bias", [True, False])
def test_outputs_within_the_rounding_bound_of_exact_and_dense(shape, k, lead, bias):
    """Recursive summation of k rounded products errs by at most gamma_k * sum |w_j x_j| with
    gamma_k = k u / (1 - k u) (Higham, Accuracy and Stability, eq. 3.4); adding the bias rounds once
    more (u |y|). Dense BLAS sums all in_features terms in its own order: gamma_in * sum |w| |x|."""
    in_features, out_features = shape
    dense = _fan_in_linear(in_features, out_features, k, seed=in_features + k, bias=bias)
    layer = CondensedLinear.from_dense(dense)
    assert layer.index.dtype == (torch.int16 if in_features <= 2**15 else torch.int32)
    x = torch.randn(*lead, in_features, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        y, yd = layer(x), dense(x)
    assert y.shape == yd.shape == (*lead, out_features) and y.dtype == torch.float32
    exact = _exact(dense.weight, dense.bias, x)
    magnitude = x.double().abs() @ dense.weight.double().abs().t()

    def gamma(n):
        return n * U / (1 - n * U)

    bound = gamma(k) * magnitude + U * y.double().abs() + 1e-12 * magnitude
    assert bool(((y.double() - exact).abs() <= bound).all())
    dense_bound = gamma(in_features) * magnitude + U * yd.double().abs()
    assert bool(((y.double() - yd.double()).abs() <= bound + dense_bound).all())


@pytest.mark.parametrize("in_features", [37, 40_000])  # int16 and int32 indices
def test_native_kernels_give_the_bits_of_the_torch_operations(in_features):
    if not condensed.available():
        pytest.skip(f"native condensed kernels {condensed.status()}")
    lib = condensed._library_or_none()
    weight = _fan_in_weight(35, in_features, 7, seed=3)  # 35 rows: the last block holds 3
    mask = weight != 0
    weight[0, mask[0]] = torch.tensor([float("inf"), -0.0, 1e-40, float("nan"), 3e38, -3e38, 1.0])
    values, index = condensed._blocked(*condense(weight, mask), in_features)
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(35, generator=g)
    bias[:2] = torch.tensor([float("-inf"), -0.0])
    for level in range(3):
        opened, state = condensed._open(lib._name, None, level)
        if opened is None:  # this CPU lacks the instruction set
            continue
        for batch in (1, 2, 7, 8, 9, 16, 31, 33):
            x = torch.randn(batch, in_features, generator=g) * 10
            x[0, :3] = torch.tensor([float("inf"), -0.0, 1e-39])
            for b in (None, bias):
                want = condensed._reference(values, index, x, 35, b)
                got = condensed._native(opened, values, index, x, 35, b)
                assert torch.equal(_bits(got), _bits(want)), (state, batch, b is None)
                split = condensed._native(opened, values, index, x, 35, b, threads=2)  # blocks 0-0 and 1-2
                assert torch.equal(_bits(split), _bits(want)), (state, batch, b is None)
    assert lib.granet_condensed_use(-1) >= 0  # the widest level again, for the other tests


@native
def test_one_row_alone_equals_its_row_of_a_batch():
    layer = CondensedLinear.from_dense(_fan_in_linear(300, 100, 11, seed=5))
    x = torch.randn(40, 300, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        batch = layer(x)  # broadcast kernel
        few = layer(x[:5])  # gather kernel
        rows = torch.cat([layer(x[i:i + 1]) for i in range(40)])
    assert torch.equal(_bits(batch), _bits(rows)) and torch.equal(_bits(few), _bits(rows[:5]))
    assert torch.equal(_bits(condensed_linear(layer.values, layer.index, x, 100, layer.bias, native=False)),
                       _bits(batch))
    lead = x.view(5, 8, 300)  # leading dimensions: the same rows
    assert torch.equal(_bits(layer(lead).view(40, 100)), _bits(batch))


def test_off_switch_runs_the_torch_operations():
    layer = CondensedLinear.from_dense(_fan_in_linear(64, 20, 4, seed=6))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    before = layer(x)
    previous = condensed.set_enabled(False)
    try:
        off = "off (set_enabled(False))" if previous else "off (GRANET_NATIVE=0)"
        assert not condensed.available() and condensed.status() == off
        assert torch.equal(_bits(layer(x)), _bits(before))
        with pytest.raises(RuntimeError, match=rf"^the native condensed kernels are {re.escape(off)}$"):
            condensed_linear(layer.values, layer.index, x, 20, native=True)
    finally:
        condensed.set_enabled(previous)


def test_granet_native_0_turns_the_kernels_off():
    import os
    import subprocess
    import sys

    code = "from granet.deploy import condensed; print(condensed.status(), condensed.available())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "GRANET_NATIVE": "0"})
    assert out.returncode == 0 and out.stdout == "off (GRANET_NATIVE=0) False\n", out.stderr


def test_casting_or_moving_a_condensed_layer_is_refused():
    layer = CondensedLinear(torch.eye(4), torch.zeros(4))
    assert layer.float() is layer and layer.to("cpu") is layer
    for cast in (layer.half, layer.double, lambda: layer.to(torch.bfloat16)):
        with pytest.raises(ValueError, match="^CondensedLinear runs float32 weights on the CPU; it cannot become"):
            cast()
    assert layer.values.dtype == layer.bias.dtype == torch.float32


def test_a_stale_library_is_refused(tmp_path):
    if not condensed.available():
        pytest.skip(f"native condensed kernels {condensed.status()}")
    source = tmp_path / "_condensed.c"
    source.write_text("/* another source */\n")
    lib, state = condensed._open(condensed._library_or_none()._name, str(source))
    assert lib is None and state.startswith("stale (") and state.endswith("reinstall granet)")


# ---------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("weight, message", [
    (torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
     r"^'enc.fc' has no constant fan-in \(row 1 has 2 active inputs, row 0 has 1; 1 of 2 rows differ from row 0\): "
     r"the condensed kernel needs"),
    (torch.ones(2, 3, dtype=torch.float64),
     r"^'enc.fc': CondensedLinear runs float32 weights on the CPU, got torch.float64"),
    (torch.ones(6), r"^'enc.fc': CondensedLinear needs a 2-D weight, got shape \(6,\)$"),
])
def test_refusals_are_one_line_naming_the_layer(weight, message):
    with pytest.raises(ValueError, match=message) as exc:
        CondensedLinear(weight, name="enc.fc")
    assert "\n" not in str(exc.value)


def test_a_state_with_indices_out_of_range_is_refused_before_loading():
    layer = CondensedLinear(_fan_in_weight(20, 30, 4, seed=9))
    state = {k: v.clone() for k, v in layer.state_dict().items()}  # state_dict() shares the buffers
    index = layer.index.clone()
    state["index"][0, 0, 0] = 30  # one past the last input
    with pytest.raises(ValueError, match=r"^index holds inputs outside \[0, 30\): not a state of this layer$"):
        layer.load_state_dict(state)
    assert torch.equal(layer.index, index)
    outer = nn.Sequential(layer)
    state = {k: v.clone() for k, v in outer.state_dict().items()}
    state["0.index"][0, 0, 0] = -1
    with pytest.raises(ValueError, match=r"^0.index holds inputs outside"):
        outer.load_state_dict(state)


def test_copies_and_assigned_buffers_never_use_stale_addresses():
    import copy
    import pickle

    layer = CondensedLinear.from_dense(_fan_in_linear(40, 24, 5, seed=10))
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(4))
    want = layer(x)
    twin, thawed = copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))
    del layer  # the copies own their buffers
    assert torch.equal(_bits(twin(x)), _bits(want)) and torch.equal(_bits(thawed(x)), _bits(want))
    twin.values = twin.values.clone()  # a new buffer: its address is taken on assignment
    assert torch.equal(_bits(twin(x)), _bits(want))
    with pytest.raises(ValueError, match="^condensed weights must be contiguous CPU tensors"):
        twin.values = twin.values.double()
    with pytest.raises(ValueError, match="^condensed weights must be contiguous CPU tensors"):
        twin(x)  # still refused: no call ever reads the refused buffer
    with pytest.raises(ValueError, match=r"^CondensedLinear: indices outside \[0, 40\)$"):
        thawed.index = torch.full_like(thawed.index, 40)


def test_bad_input_is_one_line():
    layer = CondensedLinear(torch.eye(4))
    for x in (torch.ones(2, 5), torch.ones(2, 4, dtype=torch.float64), torch.tensor(1.0)):
        with pytest.raises(ValueError, match=r"CondensedLinear needs float32 CPU input of shape \(\.\.\., 4\), got"):
            layer(x)


# ---------------------------------------------------------------------------- the plan

class _Net(nn.Module):
    """A fan-in Linear (64 -> 48, k 6) and an unstructured one (48 -> 40, about 10%; row 0 holds 9
    active weights, row 1 none)."""

    def __init__(self) -> None:
        super().__init__()
        self.fan = _fan_in_linear(64, 48, 6, seed=7)
        self.free = nn.Linear(48, 40)
        with torch.no_grad():
            mask = torch.rand(40, 48, generator=torch.Generator().manual_seed(8)) < 0.1
            mask[0], mask[1] = torch.arange(48) < 9, False
            self.free.weight.mul_(mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.free(torch.relu(self.fan(x)))


@pytest.fixture
def costs(monkeypatch):
    """A fake timer: calibration's clock advances only by the cost (seconds) set per module class."""
    now = [0.0]
    table: dict = {}
    monkeypatch.setattr(inference, "_clock", lambda: now[0])
    for cls in (nn.Linear, SparseLinear, CondensedLinear):
        def forward(self, *args, _cls=cls, _original=cls.forward, **kwargs):
            now[0] += table.get(_cls, 0.0)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(cls, "forward", forward)
    return table


def test_plan_picks_condensed_where_it_beats_dense_and_csr(costs):
    net = _Net()
    assert constant_fan_in(net.fan.weight) == 6 and constant_fan_in(net.free.weight) is None
    costs.update({nn.Linear: 2**-6, SparseLinear: 2**-8, CondensedLinear: 2**-9})  # seconds, exact in binary
    plan = plan_sparse_inference(net, max_density=0.3, repeats=3, vector_threads=None)
    fan, free = plan
    assert (fan.sparse, fan.kernel, fan.fan_in, fan.dense_ms, fan.sparse_ms, fan.csr_ms, fan.condensed_ms) == (
        True, "condensed", 6, 15.625, 1.953125, 3.90625, 1.953125)
    assert fan.reason == ("measured speed-up 8.00x >= min_speedup 1.1 (condensed kernel; fan-in 6: condensed 1.953 ms, "
                          "CSR 3.906 ms)")
    assert (free.sparse, free.kernel, free.fan_in, free.condensed_ms) == (True, "csr", None, None)
    assert free.reason == "measured speed-up 4.00x >= min_speedup 1.1"
    fast = to_sparse_inference(net, plan=plan)
    assert type(fast.fan) is CondensedLinear and type(fast.free) is SparseLinear
    costs.clear()
    x = torch.randn(4, 64)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), net(x), atol=1e-5, rtol=0)


def test_plan_keeps_csr_or_dense_where_condensed_does_not_win(costs):
    net = _Net()
    costs.update({nn.Linear: 2**-6, SparseLinear: 2**-9, CondensedLinear: 2**-8})
    fan = plan_sparse_inference(net, max_density=0.3, repeats=3, vector_threads=None)[0]
    assert (fan.sparse, fan.kernel, fan.sparse_ms, fan.csr_ms, fan.condensed_ms) == (
        True, "csr", 1.953125, 1.953125, 3.90625)
    assert type(to_sparse_inference(net, max_density=0.3, repeats=3, vector_threads=None).fan) is SparseLinear
    costs.update({nn.Linear: 2**-8, SparseLinear: 2**-7, CondensedLinear: 31 * 2**-13})  # 32/31 = 1.03x < 1.1
    fan = plan_sparse_inference(net, max_density=0.3, repeats=3, vector_threads=None)[0]
    assert not fan.sparse and fan.kernel == "condensed"
    assert fan.reason.startswith("measured speed-up 1.03x < min_speedup 1.1 (condensed kernel; fan-in 6")
    costs.update({nn.Linear: 2**-6, SparseLinear: 2**-8, CondensedLinear: 2**-9})
    off = plan_sparse_inference(net, max_density=0.3, repeats=3, vector_threads=None, condensed=False)[0]
    assert (off.kernel, off.condensed_ms, off.csr_ms) == ("csr", None, None)


def test_plan_without_calibration_uses_condensed_where_the_native_kernels_are(monkeypatch):
    net = _Net()
    monkeypatch.setattr(condensed, "available", lambda: True)
    plan = plan_sparse_inference(net, max_density=0.3, calibrate=False)
    assert [(d.kernel, d.fan_in) for d in plan] == [("condensed", 6), ("csr", None)]
    assert plan[0].reason.startswith("density 0.0938 <= max_density 0.3; condensed, fan-in 6 (native kernels ")
    monkeypatch.setattr(condensed, "available", lambda: False)
    assert [d.kernel for d in plan_sparse_inference(net, max_density=0.3, calibrate=False)] == ["csr", "csr"]
    with pytest.raises(ValueError, match="condensed must be True or False, got 'yes'"):
        plan_sparse_inference(net, condensed="yes")


def test_a_plan_whose_kernel_does_not_fit_is_refused_and_leaves_the_model():
    net = _Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bad = [LayerDecision("fan", "linear", (48, 64), 0.09, True, "x", kernel="condensed"),
           LayerDecision("free", "linear", (40, 48), 0.1, True, "x", kernel="condensed")]
    with pytest.raises(ValueError, match=r"^'free' has no constant fan-in \(row 1 has") as exc:
        to_sparse_inference(net, plan=bad, inplace=True)
    assert "\n" not in str(exc.value)
    assert type(net.fan) is nn.Linear and all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(ValueError, match=r"plan entry 'fan': kernel 'coo' is not one of csr, condensed for its Linear"):
        to_sparse_inference(net, plan=[LayerDecision("fan", "linear", (48, 64), 0.09, True, "x", kernel="coo")])


# ---------------------------------------------------------------------------- export

def _fan_in_state() -> tuple[dict, dict]:
    """A fan-in Linear weight (12 x 10, k 3, an active exact zero, NaN, inf and -0.0 at inactive
    places), a fan-in conv weight (6 x 3 x 3 x 3, k 5 per output channel) and a dense bias."""
    g = torch.Generator().manual_seed(0)
    mw = torch.zeros(12, 10, dtype=torch.bool).scatter_(1, torch.rand(12, 10, generator=g).argsort(1)[:, :3], True)
    w = torch.randn(12, 10, generator=g) * mw  # -0.0 where a negative value is masked
    active = mw[0].nonzero()[:, 0]
    w[0, active[0]], w[0, active[1]], w[1, mw[1].nonzero()[0, 0]] = 0.0, float("nan"), float("inf")
    mc = torch.zeros(6, 27, dtype=torch.bool).scatter_(1, torch.rand(6, 27, generator=g).argsort(1)[:, :5], True)
    c = torch.randn(6, 27, generator=g) * mc
    state = {"fc.weight": w, "fc.bias": torch.randn(12, generator=g), "conv.weight": c.view(6, 3, 3, 3)}
    return state, {"fc.weight": mw, "conv.weight": mc.view(6, 3, 3, 3)}


def _header(path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        return size, json.loads(f.read(size))


def test_fan_in_export_round_trip_is_bit_identical(tmp_path):
    pytest.importorskip("safetensors")
    from granet.deploy.export import export_sparse, load_masks, load_sparse

    state, masks = _fan_in_state()
    assert bool(torch.signbit(state["fc.weight"][~masks["fc.weight"]]).any())  # -0.0 present
    path = tmp_path / "m.safetensors"
    info = export_sparse(state, masks, path, layout="fan-in")
    restored = load_sparse(path)
    assert list(restored) == list(state)
    for key in state:
        assert torch.equal(restored[key].view(torch.int32), state[key].view(torch.int32)), key
    assert all(torch.equal(load_masks(path)[k], masks[k]) for k in masks)
    size, header = _header(path)
    meta = header["__metadata__"]
    assert meta["format_version"] == "3" and meta["layout"] == "fan-in" and "tied" not in meta
    assert header["fc.weight::index"]["dtype"] == "I16" and header["fc.weight::index"]["shape"] == [12, 3]
    assert header["conv.weight::index"]["shape"] == [6, 5]
    # values + int16 indices + the sign plane of fc.weight (conv.weight's -0.0 too) + the dense bias
    negzero = sum(math.ceil(m.numel() / 8) for k, m in masks.items() if f"{k}::negzero" in header)
    assert path.stat().st_size == 8 + size + (36 + 30) * (4 + 2) + negzero + 12 * 4
    assert info.active_weights == 66 and info.layout == "fan-in"
    # the loaded weight runs condensed with the exported mask (its active zero kept)
    layer = CondensedLinear(restored["fc.weight"].nan_to_num(0.0, 0.0, 0.0), mask=load_masks(path)["fc.weight"])
    assert layer.fan_in == 3


def test_fan_in_export_refusals_and_crafted_files(tmp_path):
    pytest.importorskip("safetensors")
    import safetensors.torch as st

    from granet.deploy.export import SparseExportError, export_sparse, load_sparse

    state, masks = _fan_in_state()
    masks["conv.weight"].view(6, 27)[2, ~masks["conv.weight"].view(6, 27)[2]] = True
    state["conv.weight"] = state["conv.weight"] * masks["conv.weight"]
    with pytest.raises(ValueError) as exc:
        export_sparse(state, masks, tmp_path / "m.safetensors", layout="fan-in")
    assert str(exc.value) == ("'conv.weight' has no constant fan-in (row 2 holds 27 active weights, row 0 5): layout "
                              "'fan-in' needs the same count in every row (use layout='csr' or 'bitmask')")
    assert not (tmp_path / "m.safetensors").exists()
    w = torch.tensor([[0.5, 0.0, 2.0], [0.0, 1.5, 3.0]])
    good = tmp_path / "good.safetensors"
    export_sparse({"w": w}, {"w": w != 0}, good, layout="fan-in")
    with st.safe_open(str(good), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}

    def craft(name: str, meta_changes: dict, **pieces) -> str:
        path = tmp_path / name
        st.save_file({**tensors, **pieces}, str(path), metadata={**meta, **meta_changes})
        return str(path)

    sparse = json.loads(meta["sparse"])
    cases = [
        (craft("v1.st", {"format_version": "1"}), "is a corrupt granet sparse export (layout 'fan-in' in a version-1 "
                                                  "file; it needs version 3)"),
        (craft("order.st", {}, **{"w::index": torch.tensor([[2, 0], [1, 2]], dtype=torch.int16)}),
         "is a corrupt granet sparse export (CSR column indices are not strictly increasing within rows)"),
        (craft("range.st", {}, **{"w::index": torch.tensor([[0, 3], [1, 2]], dtype=torch.int16)}),
         "is a corrupt granet sparse export (bad CSR column indices)"),
        (craft("nnz.st", {"sparse": json.dumps({"w": {**sparse["w"], "nnz": 3}})}, **{"w::values": torch.ones(3)}),
         "is a corrupt granet sparse export ('w' declares 3 active values, not the same number in each of 2 rows)"),
        (craft("shape.st", {}, **{"w::index": torch.tensor([[0, 2, 1]], dtype=torch.int16)}),
         "is a corrupt granet sparse export ('w::index' is int16 [1, 3], but shape [2, 3] with 4 active values "
         "needs int16 [2, 2])"),
    ]
    for path, message in cases:
        with pytest.raises(SparseExportError) as exc:
            load_sparse(path)
        assert str(exc.value) == f"{path} {message}"


# ---------------------------------------------------------------------------- the build

@pytest.mark.slow
def test_setup_builds_the_condensed_kernels_and_without_a_compiler_still_installs(tmp_path):
    import os
    import shlex
    import shutil
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    command = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    if not command or shutil.which(command[0]) is None:
        pytest.skip("no C compiler")
    root = Path(__file__).resolve().parents[1]
    project = tmp_path / "project"
    for package in ("kernels", "deploy"):
        (project / "src" / "granet" / package).mkdir(parents=True)
        (project / "src" / "granet" / package / "__init__.py").write_text("")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(root / name, project / name)
    for source in ("kernels/_native.c", "deploy/_condensed.c"):
        shutil.copy(root / "src" / "granet" / source, project / "src" / "granet" / source)
    (project / "src" / "granet" / "__init__.py").write_text("")
    build = [sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--build-temp", str(tmp_path / "temp")]
    built = subprocess.run(build, cwd=project, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (library,) = (project / "src" / "granet" / "deploy").glob("_condensed_kernels*")
    lib, state = condensed._open(str(library), str(project / "src" / "granet" / "deploy" / "_condensed.c"))
    assert lib is not None and state.startswith("in use ("), state
    none = subprocess.run([*build, "--force"], cwd=project, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CC": str(tmp_path / "no-such-cc"), "PATH": str(tmp_path)})
    assert none.returncode == 0, none.stderr
    assert "WARNING: granet's native kernels were not built (" in none.stderr
    assert not library.exists()
