"""configs/mnist1d_*.yaml: one recipe per method, loadable by `granet train --config`, as make_recipes writes them."""
from pathlib import Path

import pytest
from helpers import load_script

from granet.methods import list_methods
from granet.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("mnist1d_*.yaml"))


def _make_recipes():
    return load_script("configs/make_recipes.py")


def test_one_recipe_per_method_of_the_library():
    assert sorted(p.name for p in RECIPES) == sorted(f"mnist1d_{m}.yaml" for m in [*list_methods(), "lth"])
    assert len(RECIPES) == 13


def test_the_files_are_what_make_recipes_writes(tmp_path):
    _make_recipes().write_mnist1d(tmp_path)
    written = sorted(tmp_path.iterdir())
    assert [p.name for p in written] == [p.name for p in RECIPES]
    for new, committed in zip(written, RECIPES):
        assert new.read_bytes() == committed.read_bytes(), committed.name


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_validates_with_the_shared_recipe(path):
    config = load_config(str(path), {})  # what `granet train --config path` builds
    method = path.stem[len("mnist1d_"):]
    assert config.method == method
    assert (config.data.dataset, config.model) == ("mnist1d", "mnist1d_cnn_64")
    optim = config.optim
    assert (optim.optimizer, optim.lr, optim.weight_decay, optim.lr_schedule) == ("adam", 0.01, 0.0, "cosine")
    assert (config.schedule.epochs if hasattr(config, "schedule") else config.to_dict()["epochs"]) == 10
    flat = config.to_dict()
    assert (flat["batch_size"], flat["epochs"], flat["seed"], flat["val_fraction"]) == (100, 10, 0, 0.1)
    if method == "dense":
        assert config.effective_density == 1.0
    else:
        assert flat["density"] == 0.02
    if method == "lth":
        assert flat["lth_rounds"] == 3
    else:
        assert flat["update_interval"] == 10 and flat["prune_start"] is None  # None: the preset's t0 = 0
    # Another network and density, as the benchmark sets them, still validate.
    other = load_config(str(path), {"model": "mnist1d_mlp_wide", **({"density": 0.01} if method != "dense" else {})})
    assert other.model == "mnist1d_mlp_wide"
