"""The run config: one typed, frozen, nested ``TrainConfig`` whose flat form is what users have on disk
and type (YAML keys, ``--flags``, ``config.yaml``, the checkpoint's ``config``), checked once."""
import argparse
import dataclasses
import typing
from typing import Optional

import pytest
import torch
import yaml

from granet.cli import build_parser, main
from granet.cli.train import add_config_arguments
from granet.errors import ConfigError
from granet.sparsity.config import SparsityConfig, field_help
from granet.train import OptimConfig, SparsityOptions, TrainConfig
from granet.train.config import SPARSITY_KEYS, config_keys

#: Every flat key of the run config as it was before the config was nested (config.yaml of the runs
#: users have), in that version's order.
FLAT_KEYS = [
    "method", "model", "dataset", "data_dir", "download", "val_fraction", "augment", "dataset_options", "density",
    "init_density", "distribution", "erk_power_scale", "keep_dense", "prune", "prune_start", "prune_end",
    "update_interval", "drop_fraction", "drop_fraction_end", "drop_decay", "regrow_start", "regrow_end", "grow",
    "redistribute", "reinit_regrown", "mask_optimizer_state", "track_exploration", "lth_rounds", "lth_prune_fraction",
    "lth_rewind", "epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov", "weight_decay", "lr_schedule",
    "milestones", "gamma", "warmup_epochs", "label_smoothing", "accumulation_steps", "seed", "device", "amp",
    "channels_last", "workers", "threads", "out", "resume", "overwrite", "progress", "max_steps", "keep_checkpoints",
    "init_from", "score_batches", "tensorboard", "dist_timeout", "fsdp",
]
#: Keys added since (a config.yaml without them reads as the method's preset, the behaviour it had).
NEW_KEYS = ["prune_criterion", "drop_criterion", "protect_units", "rng", "structure", "ablation", "execution"]

#: A config.yaml as that version wrote it (`granet train --model mlp --method rigl --epochs 2
#: --update-interval 5 --density 0.05 --lr-schedule multistep --milestones 0.5 0.75 --keep-checkpoints 1`):
#: sparsity keys resolved, lists as YAML lists.
OLD_CONFIG_YAML = """\
method: rigl
model: mlp
dataset: digits
data_dir: null
download: false
val_fraction: 0.1
augment: true
dataset_options: {}
density: 0.05
init_density: 0.05
distribution: erk
erk_power_scale: 1.0
keep_dense: []
prune: null
prune_start: 0
prune_end: 0.5
update_interval: 5
drop_fraction: 0.3
drop_fraction_end: 0.0
drop_decay: cosine
regrow_start: 0
regrow_end: 30
grow: gradient
redistribute: none
reinit_regrown: new
mask_optimizer_state: true
track_exploration: true
lth_rounds: null
lth_prune_fraction: null
lth_rewind: null
epochs: 2
batch_size: 64
optimizer: sgd
lr: 0.1
momentum: 0.9
nesterov: true
weight_decay: 0.0005
lr_schedule: multistep
milestones:
- 0.5
- 0.75
gamma: 0.1
warmup_epochs: 0.0
label_smoothing: 0.0
accumulation_steps: 1
seed: 0
device: auto
amp: auto
channels_last: auto
workers: 0
threads: 2
out: /tmp/ref/rigl
resume: null
overwrite: false
progress: auto
max_steps: null
keep_checkpoints:
- 1
init_from: null
score_batches: 1
tensorboard: false
dist_timeout: 600.0
fsdp: false
"""


def test_the_flat_keys_are_those_users_have():
    assert sorted(k.name for k in config_keys()) == sorted(FLAT_KEYS + NEW_KEYS)
    assert sorted(TrainConfig().to_dict()) == sorted(FLAT_KEYS + NEW_KEYS)


def test_an_old_config_yaml_reads_back_to_the_same_flat_dict():
    old = yaml.safe_load(OLD_CONFIG_YAML)
    config = TrainConfig.from_dict(old)
    # every value, lists as lists; new keys unset (the sparsity keys: the preset's) or at their default
    assert config.to_dict() == dict(old, **dict(dict.fromkeys(NEW_KEYS), execution="dense"))
    assert (config.method, config.data.dataset, config.sparsity.regrow_end, config.optim.milestones,
            config.output.keep_checkpoints, config.machine.threads) == ("rigl", "digits", 30, (0.5, 0.75), (1,), 2)
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_every_key_is_a_flag_and_nothing_else():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    flags = {opt for action in parser._actions for opt in action.option_strings}
    bools = ("download", "augment", "mask_optimizer_state", "track_exploration", "nesterov", "fsdp", "overwrite",
             "tensorboard", "protect_units")  # boolean keys also have their --no- form
    assert flags == {"-h", "--help"} | {"--" + k.replace("_", "-") for k in FLAT_KEYS + NEW_KEYS} | \
        {"--no-" + k.replace("_", "-") for k in bools}
    args = build_parser().parse_args(["train", "--update-interval", "20", "--keep-dense", "fc1", "--lr", "0.5"])
    assert TrainConfig.from_dict({k: v for k, v in vars(args).items() if k in FLAT_KEYS}).to_dict() == \
        dict(TrainConfig().to_dict(), update_interval=20, keep_dense=["fc1"], lr=0.5)


def test_sparsity_options_mirror_the_sparsity_config():
    """Declared explicitly (type checkers see them), kept in step with SparsityConfig here."""
    core = typing.get_type_hints(SparsityConfig)
    ours = typing.get_type_hints(SparsityOptions)
    expected = [n for n in SparsityConfig.field_names() if n not in ("method", "total_steps", "seed")]
    assert [f.name for f in dataclasses.fields(SparsityOptions)] == expected
    assert {n: ours[n] for n in expected} == {n: Optional[core[n]] for n in expected}
    assert list(SPARSITY_KEYS) == [n for n in expected if n != "density"]
    assert all(f.default is None for f in dataclasses.fields(SparsityOptions))  # None: the method's preset


def test_help_text_lives_in_the_fields():
    assert field_help() == {f.name: f.metadata["help"] for f in dataclasses.fields(SparsityConfig)}
    keys = {k.name: k for k in config_keys()}
    assert all(k.help for k in keys.values()), [k.name for k in keys.values() if not k.help]
    assert {n: keys[n].help for n in SPARSITY_KEYS} == {n: field_help()[n] for n in SPARSITY_KEYS}
    assert [n for n, k in keys.items() if k.preset] == list(SPARSITY_KEYS)


def test_the_config_is_frozen_and_changed_only_through_checked_copies():
    config = TrainConfig.from_dict({"method": "rigl", "lr": 0.2})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim.lr = 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.method = "set"
    assert config.with_values(lr=0.3).to_dict() == dict(config.to_dict(), lr=0.3)
    with pytest.raises(ConfigError) as info:
        config.with_values(lr=0)
    assert str(info.value) == "lr must be in (0, inf), got 0"
    with pytest.raises(ConfigError) as info:
        config.with_values(colour="red")
    assert str(info.value) == "unknown config key(s): colour (see `granet train --help`)"
    # The values a run determines itself are recorded as they are.
    assert config.with_run_values(threads=3).to_dict() == dict(config.to_dict(), threads=3)


def test_from_dict_checks_and_check_false_only_parses():
    values = {"method": "my-unregistered-method", "milestones": [1, 2]}
    with pytest.raises(ConfigError, match="unknown method 'my-unregistered-method'"):
        TrainConfig.from_dict(values)
    record = TrainConfig.from_dict(values, check=False)  # e.g. the record of a finished run, to evaluate it
    assert record.method == "my-unregistered-method" and record.optim.milestones == (1, 2)
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({"workers": "2"}, check=False)  # types are always checked
    assert str(info.value) == "workers must be an integer, got '2'"


def test_recorded_sparsity_is_the_resolved_config():
    config = TrainConfig.from_dict({"method": "granet", "density": 0.1, "update_interval": 20})
    resolved = SparsityConfig(method="granet", density=0.1, prune="global", prune_end=0.5, drop_fraction=0.5,
                              total_steps=100).resolved()
    assert (resolved.prune_end, resolved.regrow_start, resolved.regrow_end, resolved.init_density) == (50, 0, 100, 0.1)
    assert resolved.resolved() == resolved
    recorded = config.with_sparsity(resolved)
    assert {k: recorded.to_dict()[k] for k in ("density", *SPARSITY_KEYS)} == \
        {k: v for k, v in resolved.to_dict().items() if k in ("density", *SPARSITY_KEYS)}


def test_lr_factor_takes_the_optimisation_section():
    from granet.train import lr_factor

    optim = TrainConfig.from_dict({"lr_schedule": "multistep", "milestones": [2]}).optim
    assert isinstance(optim, OptimConfig)
    assert [lr_factor(optim, s, 10, 40) for s in (19, 20)] == [1.0, pytest.approx(0.1)]


def test_a_run_checks_its_config_once_and_resolves_its_sparsity_once(tmp_path, monkeypatch):
    """`granet train` and `granet train --resume`: one TrainConfig check; the sparsity settings checked
    once without the run's length (when the config is loaded) and resolved once with it, into the
    ResolvedSparsity the sparsifier and its update policy are built from (neither checks it again)."""
    import granet.train.loop as loop

    counted = {"TrainConfig.validate": (TrainConfig, "validate"), "resolve_method": (loop, "resolve_method"),
               "SparsityConfig.validate": (SparsityConfig, "validate"),
               "SparsityConfig.resolve": (SparsityConfig, "resolve"),
               "SparsityConfig.resolve_steps": (SparsityConfig, "resolve_steps")}
    calls = dict.fromkeys(counted, 0)

    def counting(name, function):
        def inner(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return inner

    for name, (owner, attribute) in counted.items():
        monkeypatch.setattr(owner, attribute, counting(name, getattr(owner, attribute)))
    once = {"TrainConfig.validate": 1, "resolve_method": 1, "SparsityConfig.validate": 2,
            "SparsityConfig.resolve": 1, "SparsityConfig.resolve_steps": 1}
    run = tmp_path / "run"
    assert main(["train", "--model", "mlp", "--method", "rigl", "--epochs", "1", "--max-steps", "3",
                 "--update-interval", "2", "--out", str(run), "--progress", "log"]) == 0
    assert calls == once
    calls.update(dict.fromkeys(counted, 0))
    assert main(["train", "--resume", str(run), "--workers", "0", "--progress", "log"]) == 0
    assert calls == once
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["sparsifier"]["config"]["update_interval"] == state["config"]["update_interval"] == 2


def test_a_run_saved_before_the_criterion_keys_resumes_bit_identically(tmp_path):
    """Checkpoints and config.yaml written before prune_criterion / drop_criterion existed lack them."""
    import shutil

    import torch
    from test_resume import _args, assert_same_run

    from granet.cli import main

    ref = tmp_path / "reference"
    assert main(_args(ref, "rigl", epochs=3, extra=("--keep-checkpoints", "1"))) == 0
    old = tmp_path / "old"
    old.mkdir()
    state = torch.load(ref / "checkpoint_epoch1.pt", weights_only=True)
    for config in (state["config"], state["sparsifier"]["config"]):
        for key in NEW_KEYS:
            config.pop(key, None)  # the sparsifier's config never had the run's keys (execution)
    torch.save(state, old / "checkpoint.pt")
    on_disk = yaml.safe_load((ref / "config.yaml").read_text())
    (old / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in on_disk.items() if k not in NEW_KEYS}))
    shutil.copy(ref / "checkpoint_epoch1.pt", old / "checkpoint_epoch1.pt")
    assert main(["train", "--resume", str(old), "--progress", "log"]) == 0
    assert_same_run(ref, old)


def test_an_unknown_criterion_is_one_line(tmp_path, capsys):
    from test_bad_inputs import FAST, assert_one_line, run_cli

    code, err = run_cli(["train", *FAST, "--method", "rigl", "--drop-criterion", "nope", "--out", str(tmp_path / "r")],
                        capsys)
    assert_one_line(code, err, "unknown drop_criterion 'nope'; valid: magnitude")


def test_the_embedded_recipe_gives_every_scheduled_method_its_update_interval_on_digits(tmp_path):
    from granet.methods import list_methods, updates_topology
    from granet.train.config import EMBEDDED_RECIPE, load_config

    scheduled = [m for m in list_methods() if updates_topology(m)]
    assert scheduled == ["gmp", "gmp-layerwise", "granet", "granet-st", "rigl", "set", "snfs"]
    recipe = EMBEDDED_RECIPE["sparsity"]["update_interval"]
    for method in list_methods():
        got = load_config(None, {"method": method}).sparsity.update_interval
        assert got == (recipe if method in scheduled else None), method
    assert load_config(None, {"method": "lth"}).sparsity.update_interval is None
    assert load_config(None, {"method": "rigl", "update_interval": 7}).sparsity.update_interval == 7  # given wins
    assert load_config(None, {"method": "rigl", "dataset": "mnist1d"}).sparsity.update_interval is None  # digits only
    path = tmp_path / "recipe.yaml"
    path.write_text("method: rigl\n")
    assert load_config(str(path), {}).sparsity.update_interval is None  # a file is the user's recipe


@pytest.mark.parametrize("method, values, warning", [
    ("static", {"update_interval": 5}, "update_interval=5 has no effect on method 'static' "
                                       "(its masks never change after the initial one)"),
    ("gmp", {"grow": "random", "regrow_end": 0.5}, "regrow_end=0.5, grow='random' has no effect on method 'gmp' "
                                                   "(it does not regrow)"),
    ("rigl", {"prune_end": 0.3}, "prune_end=0.3 has no effect on method 'rigl' (it does not prune)"),
    ("granet", {"update_interval": 5, "grow": "random"}, None),
])
def test_a_sparsity_option_the_method_does_not_use_is_named_in_a_warning(method, values, warning, caplog):
    from granet.train.config import load_config

    with caplog.at_level("WARNING", logger="granet.train.config"):
        load_config(None, {"method": method, **values})
    assert [r.getMessage() for r in caplog.records if r.name == "granet.train.config"] == \
        ([warning] if warning else [])
