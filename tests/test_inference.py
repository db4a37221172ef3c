"""Sparse inference: CSR Linear / 1x1-conv modules equal the dense layers; the layer-selection rule."""
import math

import pytest
import torch
from torch import nn

import granet
from granet.deploy.inference import (
    LayerDecision,
    SparseConv1x1,
    SparseLinear,
    _is_two_four,
    plan_sparse_inference,
    to_semi_structured,
    to_sparse_inference,
)


def _sparsify(layer: nn.Module, density: float, seed: int) -> nn.Module:
    """Zero all but exactly round(density * numel) weights of ``layer`` (random positions)."""
    g = torch.Generator().manual_seed(seed)
    w = layer.weight
    keep = torch.randperm(w.numel(), generator=g)[: round(density * w.numel())]
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[keep] = True
    with torch.no_grad():
        w.mul_(mask.view(w.shape))
    return layer


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(5,), (1,), (2, 3), (1, 1)])  # one row takes the matrix-vector path
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_sparse_linear_equals_dense(dtype, atol, bias, lead, mode):
    torch.manual_seed(0)
    dense = _sparsify(nn.Linear(48, 40, bias=bias).to(dtype), 0.1, seed=1)
    sparse = SparseLinear.from_dense(dense)
    x = torch.randn(*lead, 48, dtype=dtype)
    with mode():
        y, ys = dense(x), sparse(x)
    assert ys.shape == y.shape == (*lead, 40) and ys.dtype == dtype
    torch.testing.assert_close(ys, y, atol=atol, rtol=0)
    assert sparse.weight.layout == torch.sparse_csr and sparse.weight._nnz() == 192  # 0.1 * 1920
    assert sparse.weight.col_indices().dtype == torch.int32


@pytest.mark.parametrize("stride, padding, bias", [(1, 0, True), (2, 0, False), (1, "same", True), (3, "valid", True)])
def test_sparse_conv1x1_equals_dense(stride, padding, bias):
    torch.manual_seed(0)
    conv = _sparsify(nn.Conv2d(12, 20, 1, stride=stride, padding=padding, bias=bias), 0.2, seed=2)
    sparse = SparseConv1x1(conv)
    x = torch.randn(3, 12, 7, 9)
    with torch.no_grad():
        y, ys = conv(x), sparse(x)
    assert ys.shape == y.shape
    torch.testing.assert_close(ys, y, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="needs a 1x1 Conv2d"):
        SparseConv1x1(nn.Conv2d(4, 4, 3))


class _Net(nn.Module):
    """A 1x1 conv (density 0.1), a 3x3 conv (0.05, never a candidate), Linear layers at 0.05 / 0.2 / 0.5
    (sizes chosen so the densities are exact: 16/160, 512/10240, 240/1200, 150/300)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pw = _sparsify(nn.Conv2d(8, 20, 1), 0.1, seed=3)
        self.conv = _sparsify(nn.Conv2d(20, 16, 3, padding=1), 0.05, seed=4)
        self.head = nn.Sequential(nn.Flatten(), _sparsify(nn.Linear(16 * 4 * 4, 40), 0.05, seed=5), nn.ReLU(),
                                  _sparsify(nn.Linear(40, 30), 0.2, seed=6), nn.ReLU())
        self.out = _sparsify(nn.Linear(30, 10), 0.5, seed=7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.head(self.conv(torch.relu(self.pw(x)))))


def test_density_rule_picks_exactly_the_layers_at_or_below_max_density():
    net = _Net()
    plan = plan_sparse_inference(net, max_density=0.2, calibrate=False)
    assert [(d.name, d.kind, d.sparse) for d in plan] == [
        ("pw", "conv1x1", True), ("head.1", "linear", True), ("head.3", "linear", True), ("out", "linear", False)]
    assert [d.density for d in plan] == [0.1, 0.05, 0.2, 0.5]
    assert plan[3].reason == "density 0.5000 > max_density 0.2"
    assert all(d.dense_ms is None and d.speedup is None for d in plan)
    sparse = to_sparse_inference(net, max_density=0.2, calibrate=False)
    kinds = {n: type(m).__name__ for n, m in sparse.named_modules() if n in ("pw", "conv", "head.1", "head.3", "out")}
    assert kinds == {"pw": "SparseConv1x1", "conv": "Conv2d", "head.1": "SparseLinear", "head.3": "SparseLinear",
                     "out": "Linear"}
    assert type(net.pw) is nn.Conv2d and type(net.head[1]) is nn.Linear  # the original is left as it was
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), net(x), atol=1e-5, rtol=0)


def test_calibration_keeps_layers_dense_below_min_speedup():
    net = _Net()
    x = torch.randn(2, 8, 4, 4)
    always = plan_sparse_inference(net, max_density=0.3, min_speedup=0.0, example_input=x, repeats=3)
    never = plan_sparse_inference(net, max_density=0.3, min_speedup=math.inf, repeats=3)
    assert [d.sparse for d in always] == [True, True, True, False]
    assert [d.sparse for d in never] == [False, False, False, False]
    for plan in (always, never):
        timed = [d for d in plan if d.density <= 0.3]
        assert len(timed) == 3 and all(d.dense_ms > 0 and d.sparse_ms > 0 for d in timed)
        assert plan[3].dense_ms is None  # over max_density: never timed
    assert never[0].reason.startswith("measured speed-up") and "< min_speedup inf" in never[0].reason
    # A plan made once applies as it is; the model changes in place with inplace=True.
    same = to_sparse_inference(net, plan=always, inplace=True)
    assert same is net and isinstance(net.pw, SparseConv1x1) and isinstance(net.out, nn.Linear)


def test_calibration_picks_a_5_percent_dense_4096_layer_under_a_stalling_clock(monkeypatch):
    """Four of every seven timed calls stall for a second (another process holding the core), far
    longer than the calls themselves, so the medians of both sides are stalls and their ratio is ~1;
    the fastest calls still show the layer's real speed-up."""
    import time

    from granet.deploy import inference

    calls, stalled = [0], [0.0]

    def stalling_clock() -> float:
        calls[0] += 1
        if calls[0] % 2 == 0 and (calls[0] // 2) % 7 in (1, 3, 5, 6):  # the end of a stalled interval
            stalled[0] += 1.0
        return time.perf_counter() + stalled[0]

    monkeypatch.setattr(inference, "_clock", stalling_clock)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4096, 4096))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(4096, 4096) < 0.05)
    plan = plan_sparse_inference(model, batch_size=1)
    intervals = calls[0] // 2
    assert intervals % 7 == 0 and stalled[0] == pytest.approx(intervals * 4 / 7)  # 4 in 7 calls stalled
    assert plan[0].sparse, plan[0].reason
    assert plan[0].speedup >= 1.1


def test_layers_the_kernel_cannot_run_stay_dense():
    half = nn.Sequential(_sparsify(nn.Linear(16, 16), 0.05, seed=0)).to(torch.bfloat16)
    (d,) = plan_sparse_inference(half, calibrate=False)
    assert not d.sparse and d.reason == "dtype torch.bfloat16 (the CPU sparse kernel runs float32/float64)"
    grouped = nn.Sequential(nn.Conv2d(4, 4, 1, groups=2), nn.Conv2d(4, 4, 1, padding=1))
    assert plan_sparse_inference(grouped, calibrate=False) == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_density=0.0), r"max_density must be in \(0, 1\], got 0.0"),
    (dict(max_density=1.5), r"max_density must be in \(0, 1\], got 1.5"),
    (dict(min_speedup=-1.0), "need min_speedup >= 0"),
    (dict(batch_size=0), "batch_size >= 1"),
])
def test_bad_options_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        to_sparse_inference(_Net(), **kwargs)


def test_plan_for_another_model_is_refused():
    plan = plan_sparse_inference(_Net(), max_density=0.2, calibrate=False)
    with pytest.raises(ValueError, match="plan entry 'pw' names no Linear / 1x1 Conv2d layer of the model"):
        to_sparse_inference(nn.Sequential(nn.Linear(2, 2)), plan=plan)
    with pytest.raises(ValueError, match="pass a plan or planning options, not both .got plan and max_density."):
        to_sparse_inference(_Net(), plan=plan, max_density=0.5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_densty'"):
        to_sparse_inference(_Net(), max_densty=0.5)


def test_refused_plan_leaves_an_in_place_model_as_it_was():
    net = _Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    plan = plan_sparse_inference(net, max_density=0.2, calibrate=False)
    assert [d.name for d in plan if d.sparse] == ["pw", "head.1", "head.3"]
    stale = LayerDecision(name="block." * 1000, kind="linear", shape=(1, 1), density=0.0, sparse=True, reason="old")
    with pytest.raises(ValueError) as exc:
        to_sparse_inference(net, plan=[*plan, stale], inplace=True)
    assert str(exc.value) == f"plan entry '{'block.' * 9}bl... names no Linear / 1x1 Conv2d layer of the model"
    # The three layers before the stale entry were not converted: the model is exactly as it was.
    layers = (net.pw, net.conv, net.head[1], net.head[3], net.out)
    assert [type(m) for m in layers] == [nn.Conv2d, nn.Conv2d, nn.Linear, nn.Linear, nn.Linear]
    after = net.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_two_four_pattern_hand_worked():
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0],
                      [0.0, 4.0, 5.0, 0.0, 6.0, 7.0, 0.0, 0.0]])
    assert _is_two_four(w)
    w[1, 6] = 8.0  # three non-zeros in the second group of four
    assert not _is_two_four(w)
    assert not _is_two_four(torch.zeros(2, 6))  # input dimension not a multiple of 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_semi_structured_needs_cuda():
    with pytest.raises(RuntimeError, match="2:4 semi-structured kernels need a CUDA device"):
        to_semi_structured(nn.Linear(8, 8))


def _library_two_four_model(device: str = "cpu", width: int = 32) -> nn.Sequential:
    """Two Linear layers masked by the library's 2:4 selection (the 2 largest of every 4 inputs)."""
    from granet.sparsity.structure import keep_top_per_group, parse_structure, structure_violations

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2 * width, width), nn.ReLU(), nn.Linear(width, width)).to(device)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            mask = keep_top_per_group(layer.weight.abs(), 4, 2)
            assert structure_violations(mask, parse_structure("2:4")) is None
            layer.weight.mul_(mask)
    return model


def test_library_two_four_masks_are_two_four_and_refused_without_cuda(monkeypatch):
    model = _library_two_four_model()
    assert _is_two_four(model[0].weight) and _is_two_four(model[2].weight)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError) as exc:
            to_semi_structured(model)
        assert str(exc.value) == ("2:4 semi-structured kernels need a CUDA device; none is available "
                                  "(use to_sparse_inference for the CPU)")
    # A CUDA device too old for the kernels, and a model left on the CPU of a machine that has one:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(RuntimeError, match=r"^2:4 semi-structured kernels need a CUDA device of compute capability "
                                           r"8.0 or newer; this one has 7.5$"):
        to_semi_structured(model)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.raises(ValueError, match=r"^0: a 2:4 layer on cpu; move the model to the CUDA device first"):
        to_semi_structured(model, inplace=True)
    assert isinstance(model[0].weight, nn.Parameter) and model[0].weight.layout == torch.strided


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured kernels need CUDA")
def test_library_two_four_masks_convert_on_cuda():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 semi-structured kernels need compute capability 8.0")
    model = _library_two_four_model("cuda", width=128).half()  # the shapes of the test above
    x = torch.randn(64, 256, dtype=torch.half, device="cuda")
    sparse = to_semi_structured(model)
    assert type(sparse[0].weight).__name__.startswith("SparseSemiStructuredTensor")
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model(x), atol=1e-2, rtol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured kernels need CUDA")
def test_semi_structured_matches_dense_on_cuda():
    torch.manual_seed(0)
    layer = nn.Linear(128, 128).half().cuda()
    with torch.no_grad():  # keep the two largest of every four weights along the input dimension
        groups = layer.weight.view(128, 32, 4)
        drop = groups.abs().argsort(dim=-1)[..., :2]
        groups.scatter_(-1, drop, 0.0)
    model = nn.Sequential(layer)
    x = torch.randn(64, 128, dtype=torch.half, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(to_semi_structured(model)(x), model(x), atol=1e-2, rtol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured kernels need CUDA")
def test_semi_structured_refusal_leaves_an_in_place_model_as_it_was(monkeypatch):
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)).half().cuda()
    with torch.no_grad():
        for layer in model:
            layer.weight.view(8, 2, 4)[..., 2:] = 0.0  # 2:4 along the input dimension
    before = [layer.weight for layer in model]
    saved = [w.detach().clone() for w in before]

    def convert(weight: torch.Tensor) -> torch.Tensor:  # the kernels refuse the second layer
        if len(convert.calls) == 1:
            raise RuntimeError("shape not supported")
        convert.calls.append(weight)
        return weight.clone()

    convert.calls = []
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", convert)
    with pytest.raises(ValueError) as exc:
        to_semi_structured(model, inplace=True)
    assert str(exc.value) == "1: not convertible to 2:4 semi-structured (shape not supported)"
    assert len(convert.calls) == 1 and all(layer.weight is w for layer, w in zip(model, before))
    assert all(torch.equal(w, s) for w, s in zip(before, saved))


def test_exported_model_runs_sparse_with_the_same_outputs(tmp_path):
    pytest.importorskip("safetensors")
    net = _Net()
    masks = {f"{n}.weight": m.weight != 0 for n, m in net.named_modules() if n in ("pw", "conv", "head.1", "head.3")}
    granet.export_sparse(net, masks, tmp_path / "net.safetensors")
    fresh = _Net()
    for p in fresh.parameters():
        nn.init.normal_(p)
    granet.load_sparse(tmp_path / "net.safetensors", model=fresh)
    fast = granet.to_sparse_inference(fresh, max_density=0.3, calibrate=False)
    x = torch.randn(4, 8, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), atol=1e-5, rtol=0)


class _ThreadRecordingLinear(SparseLinear):
    """SparseLinear that records torch's thread count inside its matrix-vector product."""

    def _mv(self, v):
        self.seen.append(torch.get_num_threads())
        return super()._mv(v)


def test_vector_threads_apply_only_inside_the_one_row_product(two_threads):
    dense = _sparsify(nn.Linear(32, 16), 0.1, seed=0)
    layer = _ThreadRecordingLinear(dense.weight, dense.bias, vector_threads=1)
    layer.seen = []
    x = torch.randn(1, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=0)
        layer(torch.randn(3, 32))  # several rows: sparse.mm, no thread change
    assert layer.seen == [1] and torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="vector_threads must be None or >= 1, got 0"):
        SparseLinear(dense.weight, vector_threads=0)


def test_vector_threads_in_the_plan(two_threads):
    net = _Net()
    fixed = plan_sparse_inference(net, max_density=0.3, calibrate=False, vector_threads=1)
    assert [(d.kind, d.vector_threads) for d in fixed] == [("conv1x1", None), ("linear", 1), ("linear", 1),
                                                            ("linear", 1)]
    sparse = to_sparse_inference(net, plan=fixed)
    assert sparse.head[1].vector_threads == 1 and sparse.head[3].vector_threads == 1
    # "auto" tries one thread only where a Linear layer sees one row and torch runs more than one.
    batch4 = plan_sparse_inference(net, max_density=0.3, min_speedup=0.0, batch_size=4, repeats=3)
    assert [d.vector_threads for d in batch4] == [None, None, None, None]
    torch.set_num_threads(1)
    single = plan_sparse_inference(net, max_density=0.3, min_speedup=0.0, batch_size=1, repeats=3)
    assert [d.vector_threads for d in single] == [None, None, None, None]
    with pytest.raises(ValueError, match="vector_threads must be 'auto', None or an int >= 1, got 'all'"):
        plan_sparse_inference(net, vector_threads="all")
    with pytest.raises(ValueError, match="vector_threads must be 'auto', None or an int >= 1, got True"):
        plan_sparse_inference(net, vector_threads=True)
