"""`granet train --method lth`: exact counts per round, LR restarting at the rewind step, one FLOPs
ledger over all rounds, selection in the last round only, bit-exact resume mid-round and between rounds,
one-line errors for bad values.

One reference run (LeNet-300-100 on digits: N = 50,200 weights, 20 steps per epoch, T = 40 steps)
with R = 2 rounds and rewind step k = 5: round 0 trains steps 0-40 (epochs 1, 2), rounds 1 and 2 train
5-40 (a partial epoch 5-20, then 20-40), so the run has 6 epochs and 40 + 2 x 35 = 110 steps.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

from granet.cli import main
from granet.train import TrainConfig, lr_factor
from test_resume import assert_same_run

N, SPE, T, K, R, DENSITY = 50_200, 20, 40, 5, 2, 0.1
DENSE_FORWARD = 2 * N  # the MLP's forward pass: 2 FLOPs per weight (no other counted op)


def _args(out, *extra):
    return ["train", "--model", "mlp", "--method", "lth", "--density", str(DENSITY), "--lth-rounds", str(R),
            "--lth-rewind", str(K), "--epochs", "2", "--out", str(out), "--progress", "log", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lth") / "reference"
    assert main(_args(out, "--keep-checkpoints", "2", "3", "4")) == 0
    return out


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_counts_per_round_are_exact_and_the_last_is_the_density(reference):
    summary = _summary(reference)
    p = summary["lth_prune_fraction"]
    assert p == 1 - DENSITY ** (1 / R)
    history = summary["rounds"]
    assert [h["round"] for h in history] == [0, 1, 2]
    # Round r trains round((1 - p)^r N) weights: what the end of round r - 1 pruned to.
    assert [h["active"] for h in history] == [N, round((1 - p) * N), round((1 - p) ** 2 * N)] == [N, 15_875, 5_020]
    assert history[-1]["active"] == round(DENSITY * N)
    assert summary["density"] == summary["target_density"] == DENSITY
    model = torch.load(reference / "model.pt", weights_only=True)
    assert sum(int(m.sum()) for m in model["masks"].values()) == round(DENSITY * N)
    for name, mask in model["masks"].items():
        assert torch.count_nonzero(model["model"][name][~mask]) == 0, name
    # The checkpoint at the end of round 0 is already pruned to round 1's count and rewound.
    kept = torch.load(reference / "checkpoint_epoch2.pt", weights_only=True)
    assert sum(int(m.sum()) for m in kept["sparsifier"]["masks"].values()) == 15_875
    assert (kept["lottery"]["round"], kept["lottery"]["iteration"]) == (1, K)
    rewind = kept["lottery"]["rewind_state"]
    for name, mask in kept["sparsifier"]["masks"].items():
        assert torch.equal(kept["model"][name], torch.where(mask, rewind[name], torch.zeros_like(rewind[name])))


def test_epochs_carry_their_round_and_the_lr_restarts_at_the_rewind_step(reference):
    records = _records(reference)
    assert [r["round"] for r in records] == [0, 0, 1, 1, 2, 2]
    assert [r["step"] for r in records] == [20, 40, 55, 75, 90, 110]
    config = TrainConfig(lr_schedule="cosine")
    ends = [20, 40, 20, 40, 20, 40]  # the ticket's iteration at the end of each epoch
    assert [r["lr"] for r in records] == [0.1 * lr_factor(config, i, SPE, T) for i in ends]
    # After a round the LR is the schedule's at k (the next step runs at it), the optimizer state is empty.
    for epoch in (2, 4):
        kept = torch.load(reference / f"checkpoint_epoch{epoch}.pt", weights_only=True)
        assert kept["optimizer"]["param_groups"][0]["lr"] == 0.1 * lr_factor(config, K, SPE, T)
        assert kept["optimizer"]["state"] == {}
    mid = torch.load(reference / "checkpoint_epoch3.pt", weights_only=True)
    assert (mid["lottery"]["round"], mid["lottery"]["iteration"]) == (1, SPE)


def test_flops_are_one_ledger_over_all_rounds(reference):
    summary = _summary(reference)
    history = summary["rounds"]
    assert [h["steps"] for h in history] == [T, T - K, T - K]
    # Every step of round r costs 3 sparse forwards at its count: 3 x 2 x active FLOPs per example.
    assert [h["round_flops"] for h in history] == [h["steps"] * 3 * 2 * h["active"] for h in history]
    total = sum(h["round_flops"] for h in history)
    assert summary["train_flops_total"] == total == history[-1]["training_flops"]
    assert summary["train_flops"] == total / (3 * DENSE_FORWARD * T)  # relative to ONE dense training
    assert _records(reference)[-1]["train_flops"] == summary["train_flops"]
    assert summary["steps"] == T + R * (T - K) and summary["trainings"] == R + 1


def test_selection_only_among_epochs_of_the_last_round(reference):
    records, summary = _records(reference), _summary(reference)
    last = [r for r in records if r["round"] == R]
    assert summary["selected_epoch"] in [r["epoch"] for r in last]
    assert summary["best_val_accuracy"] == max(r["val_accuracy"] for r in last)


@pytest.mark.parametrize("epoch", [2, 3], ids=["between-rounds", "mid-round"])
def test_resume_is_bit_exact(reference, epoch, tmp_path):
    res = tmp_path / "resumed"
    res.mkdir()
    shutil.copy(reference / "config.yaml", res / "config.yaml")
    shutil.copy(reference / f"checkpoint_epoch{epoch}.pt", res / "checkpoint.pt")
    assert main(["train", "--resume", str(res), "--progress", "log"]) == 0
    assert_same_run(reference, res)
    a, b = (torch.load(run / "checkpoint.pt", weights_only=True)["lottery"] for run in (reference, res))
    assert all(torch.equal(v, b["rewind_state"][k]) for k, v in a["rewind_state"].items())
    assert (a["round"], a["iteration"], a["done"]) == (b["round"], b["iteration"], b["done"]) == (R, T, True)
    assert _summary(reference)["rounds"] == _summary(res)["rounds"]
    assert _summary(reference)["train_flops_total"] == _summary(res)["train_flops_total"]


@pytest.mark.parametrize("extra, message", [
    (["--lth-rounds", "0"], "lth_rounds must be a positive integer, got 0"),
    (["--lth-prune-fraction", "1.5"], "lth_prune_fraction must be in (0, 1), got 1.5"),
    (["--lth-prune-fraction", "0"], "lth_prune_fraction must be in (0, 1), got 0"),
    (["--lth-prune-fraction", "0.2"], "prune_fraction=0.2 over 2 rounds keeps 32128 of 50200 weights"),
    (["--lth-rewind", "40"], "lth_rewind=40 resolves to step 40, but the schedule has 40 steps"),
    (["--lth-rewind", "1.0"], "lth_rewind=1.0 is a fraction of the schedule and must be in [0, 1)"),
    (["--lth-rewind", "-3"], "lth_rewind must be a step >= 0 or a fraction of the schedule, got -3"),
    (["--update-interval", "5"], "update_interval=5 does not apply to it"),
    (["--distribution", "uniform"], "distribution='uniform' does not apply to it"),
    (["--density", "1"], "method 'lth' prunes: density must be in (0, 1), got 1"),
    (["--init-from", "x.pt"], "init_from='x.pt' cannot be combined with it"),
    (["--keep-dense", "nothing*"], "method 'lth': "),
])
def test_bad_values_are_one_line_errors(extra, message, tmp_path, capsys):
    code = main(_args(tmp_path / "run", *extra))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err


def test_lth_keys_with_another_method_are_refused(tmp_path, capsys):
    code = main(["train", "--model", "mlp", "--method", "rigl", "--lth-rounds", "2", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "lth_rounds=2 only applies to method 'lth', not 'rigl'" in err


def test_prune_fraction_alone_sets_the_density(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--model", "mlp", "--method", "lth", "--lth-rounds", "1", "--lth-prune-fraction", "0.5",
                 "--epochs", "1", "--max-steps", "3", "--out", str(run), "--progress", "log"]) == 0
    summary = _summary(run)
    assert summary["density"] == round(0.5 * N) / N and [h["active"] for h in summary["rounds"]] == [N, N // 2]
    assert summary["steps"] == 6 and [r["round"] for r in _records(run)] == [0, 1]
