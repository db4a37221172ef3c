"""``granet train --fsdp true`` under torchrun (2 gloo processes on CPU).

With 2 ranks FSDP's reduce-scatter averages the same two micro-batch gradients that DDP's
all-reduce averages (``a/2 + b/2``), so an FSDP run equals a DDP run of the same config bit for
bit: weights, optimizer state and masks. The checkpoints are in the same format, so a run resumed
from an FSDP checkpoint under FSDP *or* under DDP ends where the uninterrupted FSDP run ended.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import torchrun

from granet.cli import main

ARGS = ["train", "--model", "mlp", "--method", "granet", "--density", "0.1", "--epochs", "3",
        "--update-interval", "5", "--device", "cpu", "--progress", "log", "--keep-checkpoints", "1"]


def run(args: list[str]) -> None:
    proc = torchrun(2, args)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]


def same_checkpoint(a: Path, b: Path) -> None:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert x["progress"]["step"] == y["progress"]["step"] == 60
    assert x["model"].keys() == y["model"].keys()
    assert all(torch.equal(v, y["model"][k]) for k, v in x["model"].items())
    assert x["sparsifier"]["masks"].keys() == y["sparsifier"]["masks"].keys()
    assert all(torch.equal(v, y["sparsifier"]["masks"][k]) for k, v in x["sparsifier"]["masks"].items())
    assert x["optimizer"]["state"].keys() == y["optimizer"]["state"].keys()
    for k, state in x["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], y["optimizer"]["state"][k]["momentum_buffer"])


def resume_copy(run_dir: Path, target: Path) -> Path:
    """``run_dir`` as it was at the end of epoch 1 (its kept checkpoint), ready for ``--resume``."""
    shutil.copytree(run_dir, target)
    (target / "checkpoint_epoch1.pt").replace(target / "checkpoint.pt")
    (target / "summary.json").unlink()
    return target


@pytest.mark.slow
def test_fsdp_equals_ddp_and_resumes_bit_exactly(tmp_path: Path) -> None:
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    run([*ARGS, "--fsdp", "true", "--out", str(fsdp)])
    run([*ARGS, "--out", str(ddp)])
    same_checkpoint(fsdp / "checkpoint.pt", ddp / "checkpoint.pt")
    # Resume the FSDP run from its epoch-1 checkpoint, once under FSDP and once under DDP.
    again = resume_copy(fsdp, tmp_path / "again")
    run(["train", "--resume", str(again), "--progress", "log"])
    same_checkpoint(fsdp / "checkpoint.pt", again / "checkpoint.pt")
    switched = resume_copy(fsdp, tmp_path / "switched")
    run(["train", "--resume", str(switched), "--fsdp", "false", "--progress", "log"])
    same_checkpoint(fsdp / "checkpoint.pt", switched / "checkpoint.pt")


def test_fsdp_needs_torchrun(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main([*ARGS, "--fsdp", "true", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "fsdp: true needs 2 or more processes: launch with torchrun --nproc_per_node=N (N >= 2)" in err


@pytest.mark.slow
def test_snfs_under_fsdp_equals_ddp(tmp_path: Path) -> None:
    """SNFS's momentum redistribution (layer shares from global momentum means) under FSDP2."""
    args = [a if a != "granet" else "snfs" for a in ARGS]
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    run([*args, "--fsdp", "true", "--out", str(fsdp)])
    run([*args, "--out", str(ddp)])
    same_checkpoint(fsdp / "checkpoint.pt", ddp / "checkpoint.pt")
    history = torch.load(fsdp / "checkpoint.pt", weights_only=True)["progress"]["history"]
    assert sum(r["regrown"] for r in history) > 0  # topology updates really moved weights


def _validation(run_dir: Path) -> list[tuple]:
    import json

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r.get("val_loss"), r.get("val_accuracy")) for r in records]


@pytest.mark.slow
def test_fsdp_validation_metrics_and_selected_epoch_equal_ddp_with_batchnorm(tmp_path: Path) -> None:
    """digits_cnn has BatchNorm: its running statistics are buffers, not sharded; rank 0's are
    broadcast before each step as DDP does, so every rank validates with DDP's statistics."""
    import json

    args = ["train", "--model", "digits_cnn", "--method", "granet", "--density", "0.1", "--epochs", "3",
            "--update-interval", "5", "--device", "cpu", "--progress", "log"]
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    run([*args, "--fsdp", "true", "--out", str(fsdp)])
    run([*args, "--out", str(ddp)])
    assert _validation(fsdp) == _validation(ddp)
    assert all(v[1] is not None for v in _validation(ddp))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (fsdp, ddp))
    for key in ("selected_epoch", "best_val_accuracy", "test_accuracy", "test_loss"):
        assert a[key] == b[key], key
    x, y = (torch.load(d / "checkpoint.pt", weights_only=True)["model"] for d in (fsdp, ddp))
    assert [k for k in x if "running" in k]  # the model really has BatchNorm statistics
    assert all(torch.equal(v, y[k]) for k, v in x.items())
