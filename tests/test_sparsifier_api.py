"""The sparsifier's public surface: read-only views, named queries, set_masks and strict loading."""
import logging

import pytest
import torch
from helpers import tiny_mlp
from torch import nn

import granet


def _linear(weights, momentum=None):
    """A bias-free Linear with the given weights and, optionally, a seeded SGD momentum buffer."""
    layer = nn.Linear(len(weights[0]), len(weights), bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weights))
    opt = torch.optim.SGD(layer.parameters(), lr=0.0, momentum=0.9)
    if momentum is not None:
        opt.state[layer.weight]["momentum_buffer"] = torch.tensor(momentum)
    return layer, opt


def test_views_are_read_only_and_copies():
    s = granet.create_sparsifier("rigl", tiny_mlp(), None, density=0.2, total_steps=10)
    with pytest.raises(TypeError):
        s.masks["1.weight"] = torch.ones(40, 108, dtype=torch.bool)  # type: ignore[index]
    for name in ("masks", "counts", "step_count", "pruning", "regrowth", "names", "total", "skipped_updates"):
        with pytest.raises(AttributeError):
            setattr(s, name, None)
    counts = s.counts
    counts[0] = -1
    assert s.counts == granet.layer_counts("erk", [(40, 108), (24, 40), (5, 24)], 0.2)  # untouched
    assert s.counts[0] == int(s.mask_of("1.weight").sum())
    s.config.density = 0.9
    assert s.config.density == 0.2
    assert list(s.masks) == s.names == ["1.weight", "3.weight", "5.weight"]
    assert s.mask_of("3.weight") is s.masks["3.weight"]
    with pytest.raises(KeyError, match="'nope' is not sparsified; sparsified: 1.weight, 3.weight, 5.weight"):
        s.mask_of("nope")


def test_named_queries_follow_the_schedules_exactly():
    # granet, T=100, ΔT=10: pruning at 10..50 (tf=50), regrowth at multiples of 10 in [0, 100).
    s = granet.create_sparsifier("granet", tiny_mlp(), None, density=0.1, total_steps=100, update_interval=10)
    assert [t for t in range(0, 120) if s.is_update_step(t)] == list(range(10, 100, 10))
    assert [t for t in range(0, 120) if s.needs_dense_gradient(t)] == list(range(10, 100, 10))
    rigl = granet.create_sparsifier("rigl", tiny_mlp(), None, density=0.1, total_steps=100, update_interval=10)
    assert [t for t in range(0, 120) if rigl.needs_dense_gradient(t)] == list(range(10, 75, 10))
    set_ = granet.create_sparsifier("set", tiny_mlp(), None, density=0.1, total_steps=100, update_interval=10)
    assert [t for t in range(0, 120) if set_.is_update_step(t)] == list(range(10, 75, 10))
    assert not any(set_.needs_dense_gradient(t) for t in range(120))
    static = granet.create_sparsifier("static", tiny_mlp(), None, density=0.1)
    assert static.reached_final_density and not any(static.is_update_step(t) for t in range(200))
    reached = []
    for t in range(1, 61):
        reached.append(s.reached_final_density)
        model_grads(s)
        s.step()
    assert reached.index(True) == 50  # before the 51st step(), i.e. once step_count == tf == 50
    assert s.step_count == 60 and s.reached_final_density


def model_grads(s):
    """Give every sparsified weight a deterministic gradient (regrowth needs one)."""
    for i, p in enumerate(s.params):
        p.grad = torch.linspace(-1.0, 1.0, p.numel()).view_as(p) * (i + 1)


def test_set_masks_installs_exactly_and_zeroes_weights_and_state():
    layer, opt = _linear([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]],
                         momentum=[[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    s = granet.create_sparsifier("static", layer, opt, density=0.5)
    initial = s.mask_of("weight").clone()
    new = torch.tensor([[True, False, False, True], [False, False, True, False]])
    s.set_masks({"weight": new})
    assert torch.equal(s.mask_of("weight"), new) and s.mask_of("weight").dtype == torch.bool
    assert s.mask_of("weight") is not new  # installed as a copy
    assert s.counts == [3] and s.density() == 3 / 8
    # Weights outside the new mask are zero; inside it they keep their values (zero where the
    # initial mask had already zeroed them).
    expected_w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]) * (new & initial)
    assert torch.equal(layer.weight.detach(), expected_w)
    buf = opt.state[layer.weight]["momentum_buffer"]
    expected_m = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]]) * (new & initial)
    assert torch.equal(buf, expected_m)
    # before the first optimizer step the initial mask never trained: exploration restarts from `new`
    assert s.exploration_rate() == int(new.sum()) / 8 and int((initial | new).sum()) > int(new.sum())
    opt.step()
    s.step()  # step 1: from now on installed masks add to the record
    newer = torch.tensor([[False, True, False, False], [False, False, False, True]])
    s.set_masks({"weight": newer})
    assert s.exploration_rate() == int((new | newer).sum()) / 8 == 5 / 8


@pytest.mark.parametrize("masks, error, message", [
    ({}, ValueError, r"missing in the mapping given to set_masks: weight"),
    ({"weight": torch.ones(2, 4, dtype=torch.bool), "bias": torch.ones(2, dtype=torch.bool)}, ValueError,
     r"not sparsified in this model: bias"),
    ({"weight": torch.ones(4, 2, dtype=torch.bool)}, ValueError, r"shape mismatch: weight \(given \(4, 2\), model \(2, 4\)\)$"),
    ({"weight": torch.ones(2, 4)}, ValueError, r"not torch.bool: weight \(torch.float32\)"),
    ({"weight": [[True] * 4] * 2}, ValueError, r"not tensors: weight"),
    ([torch.ones(2, 4, dtype=torch.bool)], TypeError, r"masks must be a mapping \{name: bool tensor\}, got list"),
])
def test_set_masks_rejects_bad_masks(masks, error, message):
    layer, opt = _linear([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    s = granet.create_sparsifier("static", layer, opt, density=0.5)
    before = s.mask_of("weight").clone()
    with pytest.raises(error, match=message):
        s.set_masks(masks)
    assert torch.equal(s.mask_of("weight"), before)


def test_load_state_dict_is_strict_about_the_config(caplog):
    source = granet.create_sparsifier("rigl", tiny_mlp(), None, density=0.2, total_steps=10)
    state = source.state_dict()
    target = granet.create_sparsifier("rigl", tiny_mlp(), None, density=0.1, total_steps=10)
    before = [m.clone() for m in target.masks.values()]
    with pytest.raises(ValueError, match=r"^sparsifier state was made with another config \(density=0.2 in the "
                                         r"state, 0.1 here\); pass strict=False to load it anyway$"):
        target.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(before, target.masks.values()))
    other = granet.create_sparsifier("set", tiny_mlp(), None, density=0.2, total_steps=10)
    with pytest.raises(ValueError, match=r"method='rigl' in the state, 'set' here; grow='gradient' in the state, "
                                         r"'random' here\)"):
        other.load_state_dict(state)
    with caplog.at_level(logging.WARNING, logger="granet.sparsity.sparsifier"):
        target.load_state_dict(state, strict=False)
    assert "different config (density=0.2 in the state, 0.1 here)" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(source.masks.values(), target.masks.values()))
    assert target.counts == source.counts


@pytest.mark.parametrize("state, error, message", [
    ([1, 2], TypeError, r"must be the mapping returned by Sparsifier.state_dict\(\), got list \[1, 2\]"),
    ("state.pt", TypeError, r"got str 'state.pt'"),
    ({"step": 3}, ValueError, r"not a granet sparsifier state: no 'masks' entry"),
])
def test_load_state_dict_rejects_non_states(state, error, message):
    s = granet.create_sparsifier("rigl", tiny_mlp(), None, density=0.2, total_steps=10)
    with pytest.raises(error, match=message):
        s.load_state_dict(state)


def test_load_state_dict_rejects_a_bad_step_and_a_missing_config():
    s = granet.create_sparsifier("rigl", tiny_mlp(), None, density=0.2, total_steps=10)
    state = s.state_dict()
    state["step"] = -1
    with pytest.raises(ValueError, match=r"invalid step -1 \(expected an int >= 0\)"):
        s.load_state_dict(state)
    state = s.state_dict()
    del state["config"]
    with pytest.raises(ValueError, match="has no 'config' entry; pass strict=False"):
        s.load_state_dict(state)
    s.load_state_dict(state, strict=False)
    assert s.step_count == 0


@pytest.mark.parametrize("method, options, error, message", [
    ("rigl", dict(total_steps=10.5), ValueError, r"total_steps must be a positive integer \(optimizer steps\), got 10.5"),
    ("granet", dict(prune_end=5000), ValueError,
     r"^prune_end=5000 resolves to step 5000, beyond total_steps=100: the run would end before it"),
    ("rigl", dict(regrow_end=101), ValueError, r"^regrow_end=101 resolves to step 101, beyond total_steps=100"),
    ("rigl", dict(regrow_start=0.8, regrow_end=0.2), ValueError,
     r"^regrow_start \(step 80\) must not be after regrow_end \(step 20\)$"),
    ("dense", dict(density=0.5), ValueError, r"method 'dense' requires density=1.0, got 0.5"),
])
def test_bad_values_are_rejected(method, options, error, message):
    base = dict(total_steps=100)
    if method != "dense":
        base["density"] = 0.1
    with pytest.raises(error, match=message):
        granet.create_sparsifier(method, tiny_mlp(), None, **dict(base, **options))


def test_model_and_optimizer_must_be_the_right_types():
    with pytest.raises(TypeError, match=r"^model must be a torch.nn.Module, got str 'resnet18'$"):
        granet.create_sparsifier("rigl", "resnet18", None, density=0.1, total_steps=10)
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer or None, got dict"):
        granet.create_sparsifier("rigl", tiny_mlp(), {"lr": 0.1}, density=0.1, total_steps=10)


def test_a_config_is_checked_and_resolved_once_into_what_the_sparsifier_runs(monkeypatch):
    from granet.sparsity.config import ResolvedSparsity, SparsityConfig

    config = granet.method_config("granet", density=0.2, total_steps=400, update_interval=10)
    resolved = config.resolve()
    assert isinstance(resolved, ResolvedSparsity) and resolved.given == config
    assert (config.prune_end, resolved.config.prune_end, resolved.config.init_density) == (0.5, 200, 1.0)
    assert dict(resolved.steps) == {"prune_start": 0, "prune_end": 200, "regrow_start": 0, "regrow_end": 400}
    assert resolved.explicit().given == resolved.config == config.resolved()
    calls = []
    for name in ("validate", "resolve", "resolve_steps"):
        original = getattr(SparsityConfig, name)
        monkeypatch.setattr(SparsityConfig, name, lambda self, *a, _n=name, _f=original: calls.append(_n) or _f(self, *a))
    model = tiny_mlp()
    sparsifier = granet.Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), resolved)
    assert calls == []  # nothing checks or resolves it again
    assert sparsifier.config == config  # the config as given (fractions kept), as its state records
    assert sparsifier.state_dict()["config"] == config.to_dict()
    assert (sparsifier.pruning.end, sparsifier.target_density(200), sparsifier.target_density(100)) == (
        200, 0.2, pytest.approx(0.2 + 0.8 * (1 - 100 / 200) ** 3))
    granet.Sparsifier(model, None, config)  # a plain config: resolved by the sparsifier, once
    assert calls == ["resolve", "validate", "resolve_steps"]
