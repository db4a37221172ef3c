"""TensorBoard writer: events written and read back with TensorBoard's own reader."""
from __future__ import annotations

import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from granet.train.tensorboard import TensorBoardWriter  # noqa: E402


def test_log_epoch_scalars_and_layer_density_histogram(tmp_path):
    record = {"epoch": 1, "step": 20, "lr": 0.05, "train_loss": 1.25, "val_loss": None, "density": 0.5,
              "pruned": 12, "regrown": 3, "exploration_rate": 0.75, "flag": True, "train_flops": float("nan")}
    with TensorBoardWriter(tmp_path) as writer:
        assert writer.log_epoch(record, step=20, layer_density={"a.weight": 0.25, "b.weight": 0.75}) == 8
        assert writer.log_epoch({"lr": 0.01}, step=40) == 1
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert sorted(tags["scalars"]) == sorted(
        ["lr", "train_loss", "density", "pruned", "regrown", "exploration_rate", "layer_density/a.weight",
         "layer_density/b.weight"])
    assert [(e.step, e.value) for e in events.Scalars("lr")] == [(20, 0.05000000074505806), (40, 0.009999999776482582)]
    assert [(e.step, e.value) for e in events.Scalars("pruned")] == [(20, 12.0)]
    (hist,) = events.Histograms("layer_density")
    assert (hist.step, hist.histogram_value.num, hist.histogram_value.min, hist.histogram_value.max) == (20, 2, 0.25, 0.75)
    assert hist.histogram_value.sum == 1.0


def test_disabled_writer_writes_nothing_and_bad_step_refused(tmp_path):
    writer = TensorBoardWriter(tmp_path / "off", enabled=False)
    assert writer.log_epoch({"lr": 0.1}, step=1) == 0
    assert not (tmp_path / "off").exists()
    with pytest.raises(ValueError, match="step must be a non-negative int, got -1"):
        writer.log_epoch({"lr": 0.1}, step=-1)
