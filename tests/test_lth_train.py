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
from test_resume import assert_same_run

from granet.cli import main
from granet.train import OptimConfig, TrainConfig, lr_factor

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
    config = OptimConfig(lr_schedule="cosine")
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


def _agree_worker(rank: int, init_method: str, out_dir: str) -> None:
    """Spawned rank: identical kept positions pass, then rank 1 keeps another position and both must raise."""
    import datetime
    import os

    import torch.distributed as dist

    from granet.baselines.lottery import _check_ranks_agree

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    keep = torch.tensor([True, False, True, False, False, True])
    _check_ranks_agree(keep, 1)
    if rank == 1:
        keep = torch.tensor([True, False, True, False, True, False])  # the same count, other positions
    try:
        _check_ranks_agree(keep, 2)
        outcome = "passed"
    except RuntimeError as exc:
        outcome = str(exc)
    (Path(out_dir) / f"rank{rank}.txt").write_text(outcome)
    dist.barrier()
    os._exit(0)  # see tests/test_distributed.py: gloo's teardown can abort after the last collective


@pytest.mark.slow
def test_ranks_that_prune_different_weights_are_stopped(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_agree_worker, args=(r, f"file://{tmp_path / 'rdv'}", str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    for rank in (0, 1):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        assert text == (f"lottery round 2: the ranks pruned different weights (rank {rank} kept 3); "
                        f"their weights had drifted apart")


@pytest.mark.slow
def test_torchrun_two_processes_train_one_ticket(tmp_path):
    from helpers import torchrun

    out = tmp_path / "two"
    proc = torchrun(2, ["train", "--model", "mlp", "--method", "lth", "--density", "0.1", "--lth-rounds", "1",
                        "--epochs", "1", "--device", "cpu", "--progress", "log", "--out", str(out)])
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]  # each round's masks agreed on both ranks
    summary = _summary(out)
    assert summary["world_size"] == 2 and [h["active"] for h in summary["rounds"]] == [N, round(0.1 * N)]
    assert summary["density"] == 0.1 and summary["steps"] == 2 * SPE


def test_rewind_is_a_step_value_like_the_other_step_keys():
    from granet.train.lottery_run import resolve_rewind

    def rewind(value):
        return TrainConfig.from_dict({"method": "lth", "lth_rewind": value}).lottery.lth_rewind

    assert rewind("10") == 10 and isinstance(rewind("10"), int)
    assert rewind("0.05") == 0.05
    assert rewind(30.0) == 30 and isinstance(rewind(30.0), int)  # a YAML float that counts steps
    assert (resolve_rewind(None, 400), resolve_rewind(0.05, 400), resolve_rewind(0.0, 400), resolve_rewind(399, 400)) \
        == (0, 20, 0, 399)
