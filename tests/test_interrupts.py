"""Stopping a run: SIGTERM and Ctrl-C stop cleanly and say how to continue; a frozen or dead rank of a
torchrun job makes the others fail within the configured timeout; a 4-process resume is bit-identical."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import kill_tree, torchrun
from test_resume import ROOT, _args, assert_same_run

from granet.cli import main


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS=str(torch.get_num_threads()))


def _wait_for(predicate, proc, seconds=180):
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigterm_stops_cleanly_and_resumes_bit_identically(tmp_path, capsys):
    ref = tmp_path / "reference"
    assert main(_args(ref, "rigl", epochs=6)) == 0
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "granet", *_args(run, "rigl", epochs=6)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: _lines(run / "metrics.jsonl") >= 2, proc), "the run ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    err = proc.stderr.read().strip().splitlines()[-1]
    epoch = torch.load(run / "checkpoint.pt", weights_only=True)["progress"]["epoch"]
    assert err == (f"granet: interrupted by SIGTERM; epoch {epoch} is checkpointed in {run}: "
                   f"continue with `granet train --resume {run}`")
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["signal"], status["checkpoint_epoch"]) == ("interrupted", "SIGTERM", epoch)
    assert not list(run.glob("*.tmp"))
    assert main(["train", "--resume", str(run), "--progress", "log"]) == 0
    assert_same_run(ref, run)


def test_ctrl_c_before_the_first_checkpoint_says_so(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--epochs", "2", "--out", str(run), "--progress", "log"]  # digits_cnn: a slow first epoch
    proc = subprocess.Popen([sys.executable, "-m", "granet", *args], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: (run / "status.json").exists(), proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert not (run / "checkpoint.pt").exists()
    assert proc.stderr.read().strip().splitlines()[-1] == (
        f"granet: interrupted by SIGINT before the first epoch ended; nothing was checkpointed: "
        f"`granet train --resume {run}` starts the run again from the beginning")
    assert main(["train", "--resume", str(run), "--progress", "log", "--max-steps", "3"]) == 2  # a result-changing key
    assert main(["train", "--resume", str(run), "--progress", "log"]) == 0
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.slow
def test_four_process_resume_is_bit_identical(tmp_path):
    """Over 3+ ranks a gradient's sum depends on its place in DDP's buckets; resume must keep it."""
    args = ["train", "--model", "mlp", "--method", "granet", "--density", "0.1", "--epochs", "3",
            "--update-interval", "10", "--device", "cpu", "--progress", "log"]
    ref = tmp_path / "reference"
    proc = torchrun(4, [*args, "--out", str(ref), "--keep-checkpoints", "1"])
    assert proc.wait(timeout=400) == 0, proc.stderr.read()[-3000:]
    res = tmp_path / "resumed"
    res.mkdir()
    (res / "config.yaml").write_bytes((ref / "config.yaml").read_bytes())
    (res / "checkpoint.pt").write_bytes((ref / "checkpoint_epoch1.pt").read_bytes())
    proc = torchrun(4, ["train", "--resume", str(res), "--progress", "log"])
    assert proc.wait(timeout=400) == 0, proc.stderr.read()[-3000:]
    assert_same_run(ref, res)
    assert json.loads((res / "summary.json").read_text())["world_size"] == 4


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _rank_pid(launcher: int, rank: int) -> int:
    for child in _children(launcher):
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return child
    raise AssertionError(f"no rank {rank} under {launcher}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc to find the ranks")
def test_frozen_rank_fails_the_job_within_the_timeout(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--model", "mlp", "--method", "rigl", "--epochs", "30", "--update-interval", "5",
            "--device", "cpu", "--progress", "log", "--out", str(run), "--dist-timeout", "5"]
    proc = torchrun(2, args)
    frozen = None
    try:
        assert _wait_for(lambda: _lines(run / "metrics.jsonl") >= 1, proc)
        frozen = _rank_pid(proc.pid, 1)
        os.kill(frozen, signal.SIGSTOP)
        stopped = time.time()
        proc.wait(timeout=120)  # dist_timeout + torchrun's 30 s grace before it SIGKILLs the frozen rank
        assert time.time() - stopped < 90
        assert proc.returncode != 0
        message = [x for x in proc.stderr.read().splitlines() if x.startswith("granet: error:")]
        assert len(message) == 1 and "rank 0: another process of the job died or stopped responding" in message[0]
        assert "dist_timeout=5 s" in message[0] and f"--resume {run}" in message[0]
        epoch = torch.load(run / "checkpoint.pt", weights_only=True)["progress"]["epoch"]
        assert f"; epoch {epoch} is checkpointed in {run}" in message[0]
        status = json.loads((run / "status.json").read_text())
        assert (status["state"], status["error"], status["checkpoint_epoch"]) == ("failed", "PeerFailure", epoch)
        assert status["message"] == message[0].removeprefix("granet: error: ")
    finally:
        if frozen is not None:
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGKILL)
        if proc.poll() is None:
            kill_tree(proc.pid)
    # the run is resumable afterwards (here on one process: the batch is global)
    assert main(["train", "--resume", str(run), "--progress", "log", "--max-steps", "60"]) == 2  # result-changing
    assert main(["train", "--resume", str(run), "--progress", "log"]) == 0


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc to find the ranks")
def test_killed_rank_zero_every_survivor_names_the_checkpointed_epoch(tmp_path):
    """Rank 0 (the writer) dies: the other three ranks name the epoch on disk, and one of them records
    in status.json how the run ended (rank 0's lock is free, so rank 0 is gone)."""
    run = tmp_path / "run"
    args = ["train", "--model", "mlp", "--method", "rigl", "--epochs", "40", "--update-interval", "5",
            "--device", "cpu", "--progress", "log", "--out", str(run), "--dist-timeout", "10"]
    proc = torchrun(4, args)
    try:
        assert _wait_for(lambda: _lines(run / "metrics.jsonl") >= 1, proc)
        os.kill(_rank_pid(proc.pid, 0), signal.SIGKILL)
        proc.wait(timeout=150)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    assert proc.returncode != 0
    epoch = torch.load(run / "checkpoint.pt", weights_only=True)["progress"]["epoch"]
    assert epoch >= 1
    lines = [x for x in proc.stderr.read().splitlines() if x.startswith("granet:")]
    # Each survivor ends with one line: a failed collective, or torchrun's SIGTERM after rank 0 died.
    assert len(lines) == 3, lines
    for line in lines:
        assert f"epoch {epoch} is checkpointed in {run}: continue with `granet train --resume {run}`" in line, line
    status = json.loads((run / "status.json").read_text())
    assert status["state"] in ("failed", "interrupted") and status["checkpoint_epoch"] == epoch, status
    assert not (run / ".granet.lock").exists() or status["state"] != "running"


def test_two_runs_into_one_directory_exactly_one_runs(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--model", "mlp", "--epochs", "2", "--progress", "log", "--out", str(run)]
    procs = [subprocess.Popen([sys.executable, "-m", "granet", *args], env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    codes = [p.wait(timeout=300) for p in procs]
    errors = [p.stderr.read().strip().splitlines() for p in procs]
    assert sorted(codes) == [0, 2], errors
    loser = errors[codes.index(2)][-1]
    # Started together, the second one meets either the first one's lock or (if it came later) its files.
    assert loser.startswith("granet: error: ") and (
        f"{run} is in use by another granet process" in loser or f"{run} already holds a run" in loser), loser
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_second_run_is_refused_while_the_first_is_running(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--model", "mlp", "--epochs", "30", "--progress", "log", "--out", str(run)]
    first = subprocess.Popen([sys.executable, "-m", "granet", *args], env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(lambda: (run / "status.json").exists(), first)
        for second in (args, [*args, "--overwrite", "true"], ["train", "--resume", str(run)]):
            assert main(second) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert err == [f"granet: error: {run} is in use by another granet process (pid {first.pid}): wait for "
                           f"it to end, or choose another --out"], err
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.kill()
        first.wait()
