"""The scoring passes of SNIP / GraSP / SynFlow are training FLOPs: exact counts in the ledger and in runs.

LeNet-300-100 on digits (``mlp``): N = 50,200 weights and a forward pass of 2 FLOPs per weight
(f_D = 100,400 per example, nothing else counted), so every number below is worked out by hand.
"""
import json

import pytest
import torch
from torch import nn

from granet.accounting.flops import SCORING_PASSES, LayerFlops, TrainingFlopsLedger, layer_flops, scoring_flops
from granet.cli import main

F_D, ACTIVE = 100_400, round(0.05 * 50_200)  # dense forward per example; weights kept at density 0.05
STEPS_COST = 2 * 3 * 2 * ACTIVE  # two training steps of 3 sparse forwards (2 FLOPs per active weight)


def test_scoring_flops_per_method() -> None:
    flops = LayerFlops(layers={"a.weight": 600, "b.weight": 300}, other=100)  # f_D = 1000
    assert scoring_flops("snip", flops, examples=64) == 3 * 1000 * 64
    assert scoring_flops("grasp", flops, examples=10) == 12 * 1000 * 10
    assert scoring_flops("synflow", flops, examples=64) == 3 * 1000 * 100  # one all-ones example per round
    assert scoring_flops("synflow", flops, examples=1, rounds=7) == 3 * 1000 * 7
    assert SCORING_PASSES == {"snip": 3.0, "grasp": 12.0, "synflow": 3.0}
    with pytest.raises(ValueError, match="no scoring cost is known for 'rigl'; valid: snip, grasp, synflow"):
        scoring_flops("rigl", flops, examples=1)
    with pytest.raises(ValueError, match="examples must be a positive integer, got 0"):
        scoring_flops("snip", flops, examples=0)
    with pytest.raises(ValueError, match="rounds must be a positive integer, got 0"):
        scoring_flops("synflow", flops, examples=1, rounds=0)


def test_ledger_extra_work_is_in_the_total_not_the_steps() -> None:
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False))
    ledger = TrainingFlopsLedger(layer_flops(model, torch.zeros(1, 4)))  # f_D = 2*12 + 2*6 = 36
    assert ledger.flops.dense == 36
    ledger.record({"0.weight": 0.5, "2.weight": 1.0}, steps=2)  # 2 x 3 x (12 + 12)
    assert ledger.record_extra(54.0, "scoring") == 54.0
    ledger.record_extra(6.0, "scoring")
    assert (ledger.total, ledger.steps, ledger.extra) == (144.0 + 60.0, 2, {"scoring": 60.0})
    assert ledger.relative == (144.0 + 60.0) / (3 * 36 * 2)
    restored = TrainingFlopsLedger(ledger.flops)
    restored.load_state_dict(ledger.state_dict())
    assert (restored.total, restored.steps, restored.extra) == (204.0, 2, {"scoring": 60.0})
    old = {k: v for k, v in ledger.state_dict().items() if k != "extra"}  # a state saved before "extra" existed
    restored.load_state_dict(old)
    assert restored.extra == {} and restored.total == 204.0
    for bad in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="flops must be a finite number >= 0"):
            ledger.record_extra(bad, "scoring")
    with pytest.raises(ValueError, match="label must be a non-empty string"):
        ledger.record_extra(1.0, "")


@pytest.mark.parametrize("method, extra, scoring", [
    ("snip", [], 3 * F_D),                                    # one batch of 64 = one global batch
    ("snip", ["--score-batches", "2"], 3 * F_D * 2),          # two batches of 64
    ("snip", ["--accumulation-steps", "2"], 3 * F_D / 2),     # one micro-batch of 32 of a 64 batch
    ("grasp", [], 12 * F_D),
    ("synflow", [], 3 * F_D * 100 / 64),                      # 100 rounds of one example
])
def test_runs_count_their_scoring_passes(method, extra, scoring, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--model", "mlp", "--method", method, "--density", "0.05", "--epochs", "1",
                 "--max-steps", "2", "--out", str(run), "--progress", "log", *extra]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_flops_total"] == STEPS_COST + scoring
    assert summary["train_flops"] == (STEPS_COST + scoring) / (3 * F_D * 2)
    state = torch.load(run / "checkpoint.pt", weights_only=True)["flops"]
    assert state["extra"] == {"scoring": scoring}
