"""The health checks (granet.sparsity.health): hand-worked dead units, zero layers, stuck weights and chance
loss; one warning per condition; the record in the sparsifier's state, its stats and update reports."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from helpers import tiny_mlp, train_step

import granet
from granet.sparsity.health import HealthMonitor, HealthThresholds
from granet.sparsity.layouts import SingleProcess

LAYOUT = SingleProcess()


def _monitor(shapes, dims=None, **thresholds) -> HealthMonitor:
    names = [f"l{i}" for i in range(len(shapes))]
    return HealthMonitor(names, shapes, dims or [0] * len(shapes), HealthThresholds(**thresholds))


def test_dead_units_are_rows_without_an_active_weight_and_columns_of_in_by_out_weights() -> None:
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, False, False], [False, False, False], [False, True, True], [False, False, False]])
    rows = _monitor([(4, 3)]).check(1, [w], [mask], [3], LAYOUT, update=False)
    assert (rows.units, rows.dead_units, rows.layer_dead_units, rows.layer_units) == (4, 2, {"l0": 2}, {"l0": 4})
    # The same weight stored in x out (transformers' Conv1D): units are its 3 columns, column 0 and 1
    # have an active weight, column 2 too: none dead; with the last column cleared, one.
    cols = _monitor([(4, 3)], dims=[1]).check(1, [w], [mask], [3], LAYOUT, update=False)
    assert (cols.units, cols.dead_units) == (3, 0)
    cleared = mask.clone()
    cleared[:, 2] = False
    assert _monitor([(4, 3)], dims=[1]).check(1, [w], [cleared], [2], LAYOUT, update=False).dead_units == 1
    # A conv weight: units are output channels (dimension 0), whatever the kernel.
    conv = torch.ones(2, 3, 2, 2)
    conv_mask = torch.zeros(2, 3, 2, 2, dtype=torch.bool)
    conv_mask[1, 2, 1, 0] = True
    assert _monitor([(2, 3, 2, 2)]).check(1, [conv], [conv_mask], [1], LAYOUT, update=False).dead_units == 1


def test_a_layer_whose_active_weights_are_all_zero_is_flagged() -> None:
    a = torch.tensor([[0.0, 5.0], [0.0, 0.0]])  # the 5 is inactive: only exact zeros are active
    b = torch.tensor([[0.0, 0.5], [2.0, 0.0]])
    mask_a = torch.tensor([[True, False], [True, True]])
    mask_b = torch.tensor([[True, True], [False, False]])
    report = _monitor([(2, 2), (2, 2)]).check(7, [a, b], [mask_a, mask_b], [3, 2], LAYOUT, update=False)
    assert report.zero_layers == ["l0"] and report.zero_active == 4 and report.active == 5
    assert report.flags == ["zero_layer"] and not report.healthy and report.step == 7
    assert report.dead_units == 1  # l1's second row


def test_stuck_weights_need_k_consecutive_update_checks() -> None:
    monitor = _monitor([(1, 8)], stuck_updates=3, stuck_fraction=0.0)
    mask = torch.tensor([[True, True, True, True, True, False, False, False]])

    def check(values, update=True):
        w = torch.tensor([values])
        return monitor.check(0, [w], [mask], [5], LAYOUT, update=update)

    assert check([0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]).stuck == 0  # first sighting of entries 0 and 1
    assert check([0.0, 0.3, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]).stuck == 0  # 0 twice; 1 moved; 2 new
    third = check([0.0, 0.0, 0.0, 1.0, 1.0, 5.0, 0.0, 0.0])  # 0 three times: stuck; 1 and 2 restart / twice
    assert (third.stuck, third.zero_active, third.flags) == (1, 3, ["stuck_weights"])
    assert check([0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]).stuck == 2  # 0 (4x) and 2 (3x)
    # A check between updates (an epoch's end) reports the record without advancing it.
    assert check([0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0], update=False).stuck == 2
    assert check([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]).stuck == 0


def test_stuck_with_k_one_counts_every_exact_zero_and_the_fraction_threshold() -> None:
    monitor = _monitor([(10,)], stuck_updates=1, stuck_fraction=0.2)
    w = torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    mask = torch.ones(10, dtype=torch.bool)
    report = monitor.check(0, [w], [mask], [10], LAYOUT, update=True)
    assert report.stuck == 2 and report.flags == []  # 2 is not more than 0.2 x 10
    w[2] = 0.0
    assert monitor.check(0, [w], [mask], [10], LAYOUT, update=True).flags == ["stuck_weights"]


def test_chance_loss_after_n_epochs_within_epsilon() -> None:
    monitor = _monitor([(2, 2)], loss_epsilon=0.01, chance_epochs=2)
    w, mask = torch.ones(2, 2), torch.ones(2, 2, dtype=torch.bool)
    chance = math.log(10)
    assert monitor.observe_loss(chance + 0.009, 10) == 1
    assert monitor.check(1, [w], [mask], [4], LAYOUT, update=False).flags == []
    assert monitor.observe_loss(chance - 0.01, 10) == 2
    assert monitor.check(2, [w], [mask], [4], LAYOUT, update=False).flags == ["chance_loss"]
    assert monitor.observe_loss(chance - 0.02, 10) == 0  # learning again: the count restarts
    assert monitor.observe_loss(float("nan"), 10) == 0
    with pytest.raises(ValueError, match="classes must be an integer >= 2, got 1"):
        monitor.observe_loss(1.0, 1)


def test_each_condition_is_warned_once(caplog) -> None:
    monitor = _monitor([(2, 2)])
    zero, mask = torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool)
    with caplog.at_level(logging.WARNING, logger="granet.sparsity.health"):
        for step in range(3):
            monitor.check(step, [zero], [mask], [4], LAYOUT, update=False)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["step 0: sparse network health: no active weight other than exactly 0 in l0; see docs/collapse.md"]
    assert monitor.first_seen == {"zero_layer": 0}


def test_thresholds_are_checked() -> None:
    with pytest.raises(ValueError, match="stuck_updates must be an integer >= 1, got 0"):
        HealthThresholds(stuck_updates=0)
    with pytest.raises(ValueError, match="stuck_fraction must be a number in \\[0, 1\\], got 2"):
        HealthThresholds(stuck_fraction=2)
    with pytest.raises(ValueError, match="loss_epsilon must be a number > 0, got 0"):
        HealthThresholds(loss_epsilon=0)


def test_the_record_round_trips_through_a_state_dict() -> None:
    mask = torch.ones(1, 8, dtype=torch.bool)
    w = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    a = _monitor([(1, 8)], stuck_updates=3, stuck_fraction=0.0)
    a.check(0, [w], [mask], [8], LAYOUT, update=True)
    a.observe_loss(math.log(10), 10)
    b = _monitor([(1, 8)], stuck_updates=3, stuck_fraction=0.0)
    b.load_state_dict(a.state_dict(LAYOUT, [mask]), LAYOUT)
    for m in (a, b):
        m.check(1, [w], [mask], [8], LAYOUT, update=True)
    assert a.check(2, [w], [mask], [8], LAYOUT, update=True) == b.check(2, [w], [mask], [8], LAYOUT, update=True)
    assert b.last.stuck == 2 and b.last.chance_epochs == 1
    with pytest.raises(ValueError, match="invalid health entry"):
        b.load_state_dict({"zero": [{"l0": torch.zeros(3, dtype=torch.uint8)}]}, LAYOUT)


# ------------------------------------------------------------------ in the sparsifier


def test_the_sparsifier_checks_at_every_update_and_reports_it() -> None:
    torch.manual_seed(0)
    model = tiny_mlp(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = granet.create_sparsifier("rigl", model, optimizer, density=0.2, total_steps=40, update_interval=10)
    assert sparsifier.health is None and sparsifier.stats()["health"] is None
    reports = []
    for t in range(20):
        train_step(model, optimizer, t)
        report = sparsifier.step()
        if report is not None:
            reports.append(report)
    assert [r.step for r in reports] == [10, 20]
    health = reports[-1].health
    assert health["step"] == 20 and health["active"] == sum(sparsifier.counts)
    assert health["units"] == 40 + 24 + 5
    assert sparsifier.stats()["health"] == health
    # An epoch-end check: the same counts from the network as it is now.
    now = sparsifier.check_health(loss=0.5, classes=5)
    assert now.step == 20 and now.chance_epochs == 0
    expected = sum(int((~sparsifier.mask_of(n).reshape(p.shape[0], -1).any(1)).sum())
                   for n, p in zip(sparsifier.names, sparsifier.params))
    assert now.dead_units == expected
    # The record is part of the state: a restored sparsifier reports the same.
    state = sparsifier.state_dict()
    assert state["health"]["last"] == now.to_dict()
    other = granet.create_sparsifier("rigl", tiny_mlp(1), None, density=0.2, total_steps=40, update_interval=10)
    other.load_state_dict(state)
    assert other.health == now
    # A state saved before the health checks existed loads, starting them afresh.
    del state["health"]
    other.load_state_dict(state)
    assert other.health is None and other.health_flags == {}


def test_a_bad_health_entry_leaves_the_sparsifier_as_it_was() -> None:
    model = tiny_mlp(1)
    sparsifier = granet.create_sparsifier("rigl", model, None, density=0.2, total_steps=40, update_interval=10)
    state = sparsifier.state_dict()
    state["step"] = 5
    state["health"] = "broken"
    with pytest.raises(ValueError, match="invalid health entry 'broken'"):
        sparsifier.load_state_dict(state)
    assert sparsifier.step_count == 0


def test_zero_positions_by_the_kernel_and_by_torch_agree() -> None:
    from granet.kernels import native
    from granet.sparsity.health import zero_positions

    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 30, generator=g)
    mask = torch.rand(40, 30, generator=g) < 0.3
    w[torch.rand(40, 30, generator=g) < 0.2] = 0.0
    w[0, :5] = float("nan")  # NaN is not exactly 0
    mask[0, :5] = True
    w[1, 3] = -0.0  # -0.0 is
    mask[1, 3] = True
    expected = ((w == 0) & mask).reshape(-1).nonzero().squeeze(1)
    assert torch.equal(zero_positions(w, mask), expected)
    before = native.set_enabled(False)
    try:
        assert torch.equal(zero_positions(w, mask), expected)
    finally:
        native.set_enabled(before)
    assert expected.numel() > 64  # more than the kernel's first guess of the band's size


# ------------------------------------------------------------------ in granet train


def test_a_collapsing_run_says_so_in_its_log_and_summary(tmp_path, caplog) -> None:
    """LeNet-300-100 on digits at density 0.05 with lr 2 (seed 0) diverges in its first epoch and
    ends at chance (10.03% test accuracy): every unit behind the explosion dead, the regrown weights
    never move and the loss sits at ln 10. The log says so once per condition, and so do
    metrics.jsonl, summary.json and granet report."""
    import json

    from granet.cli import main
    from granet.reports.report import load_runs, markdown_table

    out = tmp_path / "collapsed"
    with caplog.at_level(logging.WARNING, logger="granet.sparsity.health"):
        assert main(["train", "--model", "mlp", "--method", "granet-st", "--density", "0.05", "--epochs", "8",
                     "--update-interval", "10", "--lr", "2", "--seed", "0", "--threads", "1", "--out", str(out),
                     "--progress", "log"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "granet.sparsity.health"]
    assert len(warnings) == 2 and all(len(w.splitlines()) == 1 for w in warnings)
    assert warnings[0].startswith("step 30: sparse network health: ") and "stuck at exactly 0" in warnings[0]
    assert warnings[1] == ("step 160: sparse network health: training loss at chance level (ln classes) for 2 "
                           "epochs; see docs/collapse.md")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] < 0.11
    assert summary["health"]["healthy"] is False
    assert summary["health"]["flags"] == {"stuck_weights": {"step": 30, "epoch": 2},
                                          "chance_loss": {"step": 160, "epoch": 8}}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["health"]["chance_epochs"] for r in lines][-2:] == [1, 2]
    assert all(abs(r["train_loss"] - math.log(10)) <= 0.01 for r in lines[-2:])
    assert "chance_loss" in lines[-1]["health"]["flags"]
    assert "| collapsed | granet-st | stuck_weights (epoch 2), chance_loss (epoch 8) |" in \
        markdown_table(load_runs([out]))


def test_a_run_saved_before_health_checks_resumes_bit_identically(tmp_path) -> None:
    """A checkpoint without the health record (and without protect_units) resumes to the same weights,
    masks and optimizer state; its later epochs carry health checks."""
    import json
    import shutil

    from test_resume import _args

    from granet.cli import main

    ref = tmp_path / "reference"
    assert main(_args(ref, "rigl", epochs=3, extra=("--keep-checkpoints", "1", "--threads", "1"))) == 0
    old = tmp_path / "old"
    old.mkdir()
    state = torch.load(ref / "checkpoint_epoch1.pt", weights_only=True)
    del state["sparsifier"]["health"]
    for config in (state["config"], state["sparsifier"]["config"]):
        del config["protect_units"]
    for record in state["progress"]["history"]:
        del record["health"]
    torch.save(state, old / "checkpoint.pt")
    import yaml

    on_disk = yaml.safe_load((ref / "config.yaml").read_text())
    (old / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in on_disk.items() if k != "protect_units"}))
    assert main(["train", "--resume", str(old), "--progress", "log"]) == 0
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (ref, old))
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert all(torch.equal(v, b["sparsifier"]["masks"][k]) for k, v in a["sparsifier"]["masks"].items())
    assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for i, s in a["optimizer"]["state"].items()
               for k, v in s.items() if isinstance(v, torch.Tensor))
    ra, rb = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (ref, old))
    assert "health" not in rb[0] and [r["health"] for r in rb[1:]] == [r["health"] for r in ra[1:]]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("time_s", "health")}  # noqa: E731
    assert [strip(r) for r in ra] == [strip(r) for r in rb]
    shutil.rmtree(old)
