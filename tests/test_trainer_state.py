"""``Trainer.state_dict()`` / ``load_state_dict()``: the checkpoint is a plain dict the trainer makes and
restores; a trainer loaded from another's state continues bit-exactly, with no file in between."""
import copy

import pytest
import torch

from granet.errors import CheckpointError
from granet.train import TrainConfig
from granet.train.checkpoint import REQUIRED
from granet.train.loop import Trainer

# 20 optimizer steps per epoch; RigL updates every 5 steps, so the second epoch changes the topology.
CONFIG = dict(model="mlp", method="rigl", density=0.1, update_interval=5, epochs=2, progress="log", threads=1)


def _epoch(trainer):
    """One epoch as Trainer.run trains it (no validation, nothing written)."""
    trainer.train_epoch(None)
    trainer.progress.epoch += 1


def _assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def test_a_loaded_trainer_continues_exactly(tmp_path):
    config = TrainConfig.from_dict(CONFIG)
    first = Trainer(config, tmp_path / "a")
    _epoch(first)
    state = copy.deepcopy(first.state_dict())  # model and optimizer entries share the live tensors
    assert set(REQUIRED) <= set(state) and state["progress"]["step"] == 20
    assert state["config"] == first.config.to_dict() and state["config"]["regrow_end"] == 30  # resolved: 0.75 x 40

    _epoch(first)
    expected = copy.deepcopy(first.state_dict())
    masks, later = state["sparsifier"]["masks"], expected["sparsifier"]["masks"]
    assert any(not torch.equal(masks[k], later[k]) for k in masks)  # the topology changes after the state

    # A fresh trainer (its constructor reseeds torch), loaded from the state taken after epoch 1.
    second = Trainer(config, tmp_path / "b")
    second.load_state_dict(state)
    _assert_same(second.state_dict(), state)
    _epoch(second)
    _assert_same(second.state_dict(), expected)


def test_a_state_that_does_not_fit_is_refused_naming_its_source(tmp_path):
    config = TrainConfig.from_dict(CONFIG)
    trainer = Trainer(config, tmp_path / "a")
    state = trainer.state_dict()
    with pytest.raises(CheckpointError) as info:
        trainer.load_state_dict(dict(state, optimizer={"state": {}, "param_groups": []}), source="x/checkpoint.pt")
    assert str(info.value).startswith("x/checkpoint.pt: optimizer or schedule state does not fit this run (")
    with pytest.raises(CheckpointError) as info:
        trainer.load_state_dict(dict(state, progress={"epoch": -1}), source="x/checkpoint.pt")
    assert str(info.value) == ("x/checkpoint.pt: sparsifier or run state does not fit this run "
                               "(progress.epoch must be an int >= 0, got -1)")
