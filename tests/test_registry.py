"""Pieces as registered objects: methods, models, datasets, criteria, distributions and drop decays by name.

Every registry of the library is a :class:`granet.registry.Registry`: names listed sorted, one message
for an unknown name and one for a name taken twice.
"""
import ast
import importlib
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import granet
from granet import methods
from granet.data import registry as data_registry
from granet.errors import ConfigError
from granet.models import registry as model_registry
from granet.registry import Registry
from granet.sparsity import criteria, distributions, schedules
from granet.train import config as train_config

#: Every registry of the library: kind, the registry, its public listing and its public look-up.
REGISTRIES = {
    "method": (methods._METHODS, granet.list_methods, lambda name: granet.method_config(name, total_steps=10)),
    "training method": (train_config.TRAINING_METHODS, train_config.TRAINING_METHODS.names,
                        train_config.TRAINING_METHODS.get),
    "model": (model_registry._MODELS, granet.models.list_models, granet.models.create_model),
    "dataset": (data_registry._DATASETS, granet.data.list_datasets, granet.data.build_datasets),
    "grow criterion": (criteria._GROW_CRITERIA, granet.list_grow_criteria, criteria.get_grow_criterion),
    "drop criterion": (criteria._DROP_CRITERIA, granet.list_drop_criteria, criteria.get_drop_criterion),
    "prune criterion": (criteria._PRUNE_CRITERIA, granet.list_prune_criteria, criteria.get_prune_criterion),
    "distribution": (distributions._DISTRIBUTIONS, granet.list_distributions, distributions.get_distribution),
    "drop decay": (schedules._DROP_DECAYS, granet.list_drop_decays,
                   lambda name: granet.DropFractionSchedule(0.5, 0.0, 0, 10, 1, decay=name)),
}


@pytest.fixture
def registry_snapshot():
    """Undo every registration a test makes, so other tests see the built-in registries only."""
    granet.data.list_datasets()  # the built-in datasets register when first listed
    saved = [(registry, registry.snapshot()) for registry, _, _ in REGISTRIES.values()]
    yield
    for registry, old in saved:
        registry.restore(old)


def test_built_in_pieces_are_registered():
    assert granet.list_grow_criteria() == ("gradient", "momentum", "random")
    assert granet.list_drop_criteria() == ("magnitude",) == granet.list_prune_criteria()
    assert criteria.get_drop_criterion("magnitude") is criteria.get_prune_criterion("magnitude") is criteria.MAGNITUDE
    assert granet.list_distributions() == ("er", "erk", "global", "uniform")
    assert granet.list_drop_decays() == ("constant", "cosine")
    needs = {n: (criteria.get_grow_criterion(n).dense_gradient, criteria.get_grow_criterion(n).needs_momentum)
             for n in granet.list_grow_criteria()}
    assert needs == {"gradient": ("update_steps", False), "momentum": ("every_step", True), "random": ("never", False)}
    per_layer = [distributions.get_distribution(n).per_layer for n in granet.list_distributions()]
    assert per_layer == [True, True, False, True]


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
    assert granet.list_drop_criteria() == ("gradient-drop", "magnitude")
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
    with pytest.raises(ValueError, match=r"unknown drop_criterion 'nope'; valid: gradient-drop, magnitude"):
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
    with pytest.raises(ValueError, match=r"unknown distribution 'bogus'; valid: er, erk, global, rows, uniform"):
        granet.layer_counts("bogus", [(2, 2)], 0.5)
    with pytest.raises(ValueError,
                       match=r"distribution 'global' has no per-layer counts; per-layer ones: er, erk, rows, uniform"):
        granet.layer_counts("global", [(2, 2)], 0.5)


def test_a_new_drop_decay_by_name(registry_snapshot):
    granet.register_drop_decay("linear", lambda progress, initial, final: initial + (final - initial) * progress)
    s = granet.DropFractionSchedule(initial=0.5, final=0.1, start=0, end=100, interval=10, decay="linear")
    expected = [0.5 + (0.1 - 0.5) * p for p in (0.0, 0.25, 1.0, 1.0)]  # progress clamps at 1
    assert [s.fraction(t) for t in (0, 25, 100, 150)] == expected
    config = granet.method_config("rigl", drop_decay="linear", total_steps=100)
    assert config.to_dict()["drop_decay"] == "linear"
    with pytest.raises(ValueError, match=r"unknown drop_decay 'cubic'; valid: constant, cosine, linear"):
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


# --------------------------------------------------------------------------------------------------
# One registry type for every kind of piece
# --------------------------------------------------------------------------------------------------
def _module_sources():
    """``(dotted module name, parsed source)`` of every module of granet."""
    package = Path(granet.__file__).parent
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), ast.parse(path.read_text(encoding="utf-8"))


def _registries_in_source():
    """``(module, name)`` of every module-level ``name = Registry(...)`` in granet (read, not imported, so
    optional frameworks need not be installed)."""
    found = set()
    for module, tree in _module_sources():
        for node in tree.body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Call):
                func = node.value.func
                if (func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)) == "Registry":
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    found.update((module, t.id) for t in targets if isinstance(t, ast.Name))
    return found


def test_every_registry_of_the_library_is_a_registry():
    found = {(module, name): getattr(importlib.import_module(module), name) for module, name in _registries_in_source()}
    assert sorted(registry.kind for registry in found.values()) == sorted(REGISTRIES)
    assert {id(r) for r in found.values()} == {id(registry) for registry, _, _ in REGISTRIES.values()}
    for kind, (registry, listing, _) in REGISTRIES.items():
        assert isinstance(registry, Registry) and registry.kind == kind
        names = tuple(listing())
        assert names == registry.names() == tuple(sorted(names)) and len(names) == len(registry) > 0, kind


def test_every_register_function_fills_a_registry():
    # A hand-rolled table comes with its own register_* function: each one must be one of these,
    # whose registries the test above checks.
    expected = {"register_method", "register_model", "register_dataset", "register_grow_criterion",
                "register_drop_criterion", "register_prune_criterion", "register_distribution", "register_drop_decay"}
    found = {node.name for _, tree in _module_sources() for node in tree.body
             if isinstance(node, ast.FunctionDef) and node.name.startswith("register")}
    assert found == expected


@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_an_unknown_name_gives_the_uniform_message(kind):
    registry, listing, lookup = REGISTRIES[kind]
    expected = f"unknown {kind} 'no-such-name'; valid: {', '.join(listing())}"
    for look_up in (lookup, registry.get, registry.describe):
        with pytest.raises(ValueError) as info:
            look_up("no-such-name")
        assert str(info.value) == expected
    with pytest.raises(ValueError) as info:
        registry.get(None)
    assert str(info.value) == f"unknown {kind} None; valid: {', '.join(listing())}"


def _noop_model(num_classes, in_channels, input_size):
    """A builder that is never called."""
    raise AssertionError("not called")


def _noop_dataset(data_dir, *, val_fraction, seed, download, augment):
    """A builder that is never called."""
    raise AssertionError("not called")


# How each kind registers a piece through its public function (the piece itself is never used).
REGISTER = {
    "method": lambda name: granet.register_method(name, "again", **granet.method_preset("rigl")),
    "training method": lambda name: train_config.TRAINING_METHODS.register(name, "granet.train.lottery_run"),
    "model": lambda name: granet.models.register_model(name)(_noop_model),
    "dataset": lambda name: granet.data.register_dataset(name)(_noop_dataset),
    "grow criterion": lambda name: granet.register_grow_criterion(granet.GrowCriterion(name, criteria.gradient_scores)),
    "drop criterion": lambda name: granet.register_drop_criterion(granet.Criterion(name, criteria.magnitude_scores)),
    "prune criterion": lambda name: granet.register_prune_criterion(granet.Criterion(name, criteria.magnitude_scores)),
    "distribution": lambda name: granet.register_distribution(granet.Distribution(name, None)),
    "drop decay": lambda name: granet.register_drop_decay(name, lambda p, i, f: i),
}


@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_a_name_taken_twice_gives_the_uniform_message(kind, registry_snapshot):
    registry, listing, _ = REGISTRIES[kind]
    taken = listing()[0]
    with pytest.raises(ValueError) as info:
        REGISTER[kind](taken)
    assert str(info.value) == f"{kind} {taken!r} is already registered"
    before = registry.names()
    REGISTER[kind]("zz_new")
    assert registry.names() == (*before, "zz_new")  # listed sorted, after the built-in names
    with pytest.raises(ValueError) as info:
        REGISTER[kind]("")
    assert str(info.value) == f"{kind} name must be a non-empty string, got ''"


def test_registry_lists_sorted_and_describes():
    registry = Registry("piece")
    registry.register("b", 2, "the second")
    registry.register("a", 1)
    assert registry.names() == ("a", "b") and list(registry.items()) == [("a", 1), ("b", 2)]
    assert list(registry.descriptions()) == [("a", ""), ("b", "the second")]
    assert "a" in registry and "c" not in registry and None not in registry and len(registry) == 2
    with pytest.raises(ValueError) as info:
        registry.register("c", 3, "two\nlines")
    assert str(info.value) == "the description of piece 'c' must be one line of text, got 'two\\nlines'"
    assert registry.names() == ("a", "b")


def test_a_normalised_registry_takes_every_spelling_of_a_name():
    registry = Registry("dataset", normalise=lambda name: name.lower().replace("-", "_"))
    registry.register("Fashion-MNIST", 1)
    assert registry.names() == ("fashion_mnist",)
    assert registry.get("fashion-mnist") == registry.get("FASHION_MNIST") == 1 and "Fashion_Mnist" in registry
    with pytest.raises(ValueError) as info:
        registry.register("fashion_mnist", 2)
    assert str(info.value) == "dataset 'fashion_mnist' is already registered"
    with pytest.raises(ValueError) as info:
        registry.get("SVHN")
    assert str(info.value) == "unknown dataset 'SVHN'; valid: fashion_mnist"  # the name as given
    assert granet.data.describe_dataset("Fashion-MNIST") == granet.data.describe_dataset("fashion_mnist")


def test_the_run_config_names_unknown_methods_models_and_datasets_uniformly():
    methods_and_procedures = sorted([*granet.list_methods(), *train_config.TRAINING_METHODS.names()])
    for key, valid in (("method", methods_and_procedures), ("model", granet.models.list_models()),
                       ("dataset", granet.data.list_datasets())):
        with pytest.raises(ConfigError) as info:
            train_config.TrainConfig.from_dict({key: "nope"})
        assert str(info.value) == f"unknown {key} 'nope'; valid: {', '.join(valid)}"
