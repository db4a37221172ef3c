"""Pieces as registered objects: grow criteria, distributions, drop decays and methods by name."""
import math

import pytest
import torch
from torch import nn

import granet
from granet import criteria, distributions, methods, schedules


@pytest.fixture
def registry_snapshot():
    """Undo every registration a test makes, so other tests see the built-in registries only."""
    pieces = (criteria._GROW_CRITERIA, criteria._DROP_CRITERIA, criteria._PRUNE_CRITERIA, distributions._DISTRIBUTIONS,
              schedules._DROP_DECAYS)
    saved_pieces = [registry.snapshot() for registry in pieces]
    saved = (dict(methods._REGISTRY), dict(methods._DESCRIPTIONS), dict(methods._LOCKED))
    yield
    for registry, old in zip(pieces, saved_pieces):
        registry.restore(old)
    for live, old in zip((methods._REGISTRY, methods._DESCRIPTIONS, methods._LOCKED), saved):
        live.clear()
        live.update(old)


def test_built_in_pieces_are_registered():
    assert granet.list_grow_criteria() == ("gradient", "momentum", "random")
    assert granet.list_drop_criteria() == ("magnitude",) == granet.list_prune_criteria()
    assert criteria.get_drop_criterion("magnitude") is criteria.get_prune_criterion("magnitude") is criteria.MAGNITUDE
    assert granet.list_distributions() == ("uniform", "er", "erk", "global")
    assert granet.list_drop_decays() == ("cosine", "constant")
    needs = {n: (criteria.get_grow_criterion(n).dense_gradient, criteria.get_grow_criterion(n).needs_momentum)
             for n in granet.list_grow_criteria()}
    assert needs == {"gradient": ("update_steps", False), "momentum": ("every_step", True), "random": ("never", False)}
    assert [distributions.get_distribution(n).per_layer for n in granet.list_distributions()] == [True, True, True, False]


def test_a_method_in_one_file_with_a_new_grow_criterion(registry_snapshot):
    # The register_method docstring's recipe, with a score whose choice is known by hand:
    # the highest flat index among the candidates is regrown first.
    def by_index(param, name, optimizer, generator):
        return torch.arange(param.numel(), dtype=torch.float32).view_as(param)

    granet.register_grow_criterion(granet.GrowCriterion("by-index", by_index, dense_gradient="never"))
    granet.register_method("index-rigl", "RigL regrowing by index", **dict(granet.method_preset("rigl"), grow="by-index"))
    assert "index-rigl" in granet.list_methods()
    layer = nn.Linear(6, 1, bias=False)
    s = granet.create_sparsifier("index-rigl", layer, None, density=0.5, drop_fraction=0.34, drop_decay="constant",
                                 update_interval=1, total_steps=10)
    config = s.state_dict()["config"]
    assert config["method"] == "index-rigl" and config["grow"] == "by-index"  # serialisable by name
    s.set_masks({"weight": torch.tensor([[True, False, True, False, True, False]])})
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0, 3.0, 0.0, 2.0, 0.0]]))
    assert not s.needs_dense_gradient(1) and s.is_update_step(1)
    report = s.step()
    # drop floor(0.34 * 3) = 1: index 0 (|w| = 1). Candidates {0, 1, 3, 5}: the highest index, 5, grows.
    assert (report.dropped, report.regrown) == (1, 1)
    assert s.mask_of("weight").tolist() == [[False, False, True, False, True, True]]
    assert layer.weight.tolist() == [[0.0, 0.0, 3.0, 0.0, 2.0, 0.0]]


def test_a_new_drop_criterion_is_one_registered_function(registry_snapshot):
    # Drop the active weights with the smallest |gradient| (magnitude would drop the smallest |w|).
    granet.register_drop_criterion(granet.Criterion("gradient-drop", lambda p, name, opt, gen: p.grad.abs()))
    assert granet.list_drop_criteria() == ("magnitude", "gradient-drop")
    layer = nn.Linear(6, 1, bias=False)
    config = granet.SparsityConfig(**granet.method_preset("rigl")).replace(
        density=0.5, drop_fraction=0.34, drop_decay="constant", update_interval=1, total_steps=10,
        drop_criterion="gradient-drop")
    s = granet.Sparsifier(layer, None, config)
    assert s.state_dict()["config"]["drop_criterion"] == "gradient-drop"  # serialisable by name
    s.set_masks({"weight": torch.tensor([[True, False, True, False, True, False]])})
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0, 3.0, 0.0, 2.0, 0.0]]))
    layer.weight.grad = torch.tensor([[5.0, 0.0, 0.1, 4.0, 2.0, 0.5]])
    report = s.step()
    # drop floor(0.34 * 3) = 1 of {0, 2, 4} by |g| 5, 0.1, 2: index 2 (|w| = 3, the largest weight).
    # Candidates {1, 2, 3, 5} have |g| 0, 0.1, 4, 0.5: index 3 regrows, at zero.
    assert (report.dropped, report.regrown) == (1, 1)
    assert s.mask_of("weight").tolist() == [[True, False, False, True, True, False]]
    assert layer.weight.tolist() == [[1.0, 0.0, 0.0, 0.0, 2.0, 0.0]]
    with pytest.raises(ValueError, match=r"unknown drop_criterion 'nope'; valid: magnitude, gradient-drop"):
        granet.Sparsifier(layer, None, config.replace(drop_criterion="nope"))


def test_a_new_prune_criterion_is_one_registered_function(registry_snapshot):
    # Prune by distance from the layer's mean weight instead of from zero (a made-up, non-negative score).
    granet.register_prune_criterion(granet.Criterion(
        "centred", lambda p, name, opt, gen: (p.detach() - p.detach().mean()).abs()))
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, -0.9, 0.3, 0.0], [-0.5, 0.2, 0.8, 0.7]]))
    config = granet.SparsityConfig(**granet.method_preset("gmp")).replace(
        density=0.5, prune_start=0, prune_end=1, update_interval=1, total_steps=10, prune_criterion="centred")
    s = granet.Sparsifier(layer, None, config)
    report = s.step()
    # mean 0.0875: |w - mean| = 0.0125, 0.9875, 0.2125, 0.0875, 0.5875, 0.1125, 0.7125, 0.6125: keep 4.
    assert report.pruned == 4
    assert s.mask_of("weight").tolist() == [[False, True, False, False], [True, False, True, True]]


def test_a_new_distribution_gives_exact_counts(registry_snapshot):
    # Density proportional to the number of output rows: counts proportional to rows * size.
    granet.register_distribution(granet.Distribution("rows", lambda shape, power: float(shape[0])))
    assert granet.layer_counts("rows", [(2, 10), (4, 10)], 0.5) == [6, 24]  # 30 split 2*20 : 4*40 = 1:4
    model = nn.Sequential(nn.Linear(10, 2, bias=False), nn.Linear(2, 4, bias=False))
    s = granet.create_sparsifier("static", model, distribution="rows", density=0.5)
    # Sizes 20 and 8; budget 14 split by 2*20 : 4*8 = 40 : 32 -> 7.78 : 6.22 -> 8 and 6 (largest remainder).
    assert s.counts == [8, 6]
    with pytest.raises(ValueError, match="distribution 'rows' is already registered"):
        granet.register_distribution(granet.Distribution("rows", None))
    with pytest.raises(ValueError, match=r"unknown distribution 'bogus'; valid: uniform, er, erk, global, rows"):
        granet.layer_counts("bogus", [(2, 2)], 0.5)
    with pytest.raises(ValueError, match=r"distribution 'global' has no per-layer counts; per-layer ones: uniform, er, erk, rows"):
        granet.layer_counts("global", [(2, 2)], 0.5)


def test_a_new_drop_decay_by_name(registry_snapshot):
    granet.register_drop_decay("linear", lambda progress, initial, final: initial + (final - initial) * progress)
    s = granet.DropFractionSchedule(initial=0.5, final=0.1, start=0, end=100, interval=10, decay="linear")
    expected = [0.5 + (0.1 - 0.5) * p for p in (0.0, 0.25, 1.0, 1.0)]  # progress clamps at 1
    assert [s.fraction(t) for t in (0, 25, 100, 150)] == expected
    config = granet.method_config("rigl", drop_decay="linear", total_steps=100)
    assert config.to_dict()["drop_decay"] == "linear"
    with pytest.raises(ValueError, match=r"unknown drop_decay 'cubic'; valid: cosine, constant, linear"):
        granet.method_config("rigl", drop_decay="cubic", total_steps=100)


def test_registration_errors(registry_snapshot):
    with pytest.raises(ValueError, match="grow criterion 'gradient' is already registered"):
        granet.register_grow_criterion(granet.GrowCriterion("gradient", criteria.gradient_scores))
    with pytest.raises(TypeError, match="register a GrowCriterion, not function"):
        granet.register_grow_criterion(criteria.gradient_scores)
    with pytest.raises(ValueError, match=r"dense_gradient must be one of never, update_steps, every_step, got 'often'"):
        granet.GrowCriterion("x", criteria.gradient_scores, dense_gradient="often")
    with pytest.raises(ValueError, match=r"unknown grow criterion 'nope'; valid: gradient, momentum, random"):
        criteria.get_grow_criterion("nope")
    with pytest.raises(ValueError, match="drop criterion 'magnitude' is already registered"):
        granet.register_drop_criterion(granet.Criterion("magnitude", criteria.magnitude_scores))
    with pytest.raises(TypeError, match="register a Criterion, not function"):
        granet.register_prune_criterion(criteria.magnitude_scores)
    with pytest.raises(ValueError, match=r"unknown prune criterion 'nope'; valid: magnitude"):
        criteria.get_prune_criterion("nope")
    with pytest.raises(ValueError, match="drop decay 'cosine' is already registered"):
        granet.register_drop_decay("cosine", lambda p, i, f: i)
    with pytest.raises(ValueError, match="method 'rigl' is already registered"):
        granet.register_method("rigl", "again", **granet.method_preset("rigl"))


def test_cosine_decay_is_the_closed_form():
    s = granet.DropFractionSchedule(initial=0.5, final=0.005, start=0, end=1000, interval=100)
    for t in (0, 100, 333, 999, 1000):
        assert s.fraction(t) == 0.005 + 0.5 * (0.5 - 0.005) * (1.0 + math.cos(math.pi * t / 1000))
