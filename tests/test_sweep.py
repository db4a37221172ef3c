"""The torch thread count of a run: set by ``threads``, restored afterwards, recorded, and the same
for every run of a sweep whatever its number of worker processes.

The sweep check uses a run whose result really depends on the thread count (digits_cnn, one epoch:
its test loss differs in the last digits between 1 and 2 threads), so equal summaries at
``workers=1`` and ``workers=2`` show that both ran at the same count.
"""
import json
import logging
import shutil

import pytest
import torch
import yaml
from test_bad_inputs import assert_one_line, run_cli

from granet.cli import main
from granet.errors import ConfigError
from granet.experiments.sweep import run_many
from granet.train import TrainConfig, train

# 20 optimizer steps with 4 RigL updates: long enough for the convolutions' float sums to matter.
CNN = dict(model="digits_cnn", method="rigl", density=0.1, update_interval=5, epochs=1, progress="log")
TINY = dict(model="mlp", epochs=1, max_steps=3, progress="log")


@pytest.fixture
def torch_threads():
    """Restores the process's thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _configs(root, **extra):
    return [TrainConfig.from_dict(dict(CNN, seed=seed, out=str(root / f"s{seed}"), **extra)) for seed in (0, 1)]


def _without_time(summary):
    return {k: v for k, v in summary.items() if k != "wall_time_s"}


@pytest.mark.slow
def test_worker_count_does_not_change_results(tmp_path, torch_threads):
    # In this process torch would use 2 threads; the pool workers start with their own default.
    torch.set_num_threads(2)
    serial = run_many(_configs(tmp_path / "serial"), workers=1)
    assert torch.get_num_threads() == 2  # restored after every in-process run
    parallel = run_many(_configs(tmp_path / "parallel"), workers=2)
    assert [s["threads"] for s in serial] == [s["threads"] for s in parallel] == [1, 1]
    assert [_without_time(s) for s in serial] == [_without_time(s) for s in parallel]
    for sub in ("serial", "parallel"):
        for seed in (0, 1):
            assert yaml.safe_load((tmp_path / sub / f"s{seed}" / "config.yaml").read_text())["threads"] == 1
    # The same run at 2 threads ends elsewhere: the equality above is not a property of this run.
    two = train(_configs(tmp_path / "two", threads=2)[0])
    assert two["threads"] == 2 and two["test_loss"] != serial[0]["test_loss"]


def test_config_threads_win_over_run_many_threads(tmp_path, torch_threads):
    configs = [TrainConfig.from_dict(dict(TINY, out=str(tmp_path / "a"))),
               TrainConfig.from_dict(dict(TINY, out=str(tmp_path / "b"), threads=2))]
    seen = []
    summaries = run_many(configs, workers=1, on_done=lambda i, c, s: seen.append((i, c.machine.threads, s["threads"])),
                         threads=3)
    assert [s["threads"] for s in summaries] == [3, 2]
    assert seen == [(0, 3, 3), (1, 2, 2)]


@pytest.mark.parametrize("threads", [0, -1, None, 1.5, True])
def test_run_many_refuses_a_bad_thread_count(threads, tmp_path):
    with pytest.raises(ConfigError) as info:
        run_many([TrainConfig.from_dict(dict(TINY, out=str(tmp_path / "a")))], workers=1, threads=threads)
    assert str(info.value) == (f"run_many: threads must be a positive integer (torch intra-op threads per process), "
                               f"got {threads!r}")
    assert not (tmp_path / "a").exists()


def test_train_sets_records_and_restores_the_thread_count(tmp_path, torch_threads):
    torch.set_num_threads(1)
    summary = train(TrainConfig.from_dict(dict(TINY, threads=2, out=str(tmp_path / "run"))))
    assert torch.get_num_threads() == 1
    assert summary["threads"] == 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["threads"] == 2
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["threads"] == 2


def test_unset_threads_records_the_count_in_effect(tmp_path, torch_threads):
    torch.set_num_threads(3)
    summary = train(TrainConfig.from_dict(dict(TINY, out=str(tmp_path / "run"))))
    assert summary["threads"] == 3 and torch.get_num_threads() == 3
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["threads"] == 3


def test_thread_count_restored_when_the_run_fails(tmp_path, torch_threads):
    torch.set_num_threads(1)
    config = TrainConfig.from_dict(dict(TINY, threads=2, batch_size=100000, out=str(tmp_path / "run")))
    with pytest.raises(ConfigError, match="batch_size 100000 is larger than the training set"):
        train(config)  # fails inside the run, after the count was set
    assert torch.get_num_threads() == 1


def test_train_refuses_a_bad_thread_count_from_a_library_config(tmp_path):
    with pytest.raises(ConfigError) as info:
        train(TrainConfig.from_dict(dict(TINY, threads=0, out=str(tmp_path / "run"))))
    assert str(info.value) == "threads must be a positive integer (torch intra-op threads per process), got 0"


@pytest.mark.parametrize("value, fragment", [
    ("0", "threads must be a positive integer (torch intra-op threads per process), got 0"),
    ("-1", "threads must be a positive integer (torch intra-op threads per process), got -1"),
    ("two", "argument --threads: invalid int value: 'two'"),
])
def test_cli_refuses_a_bad_thread_count(value, fragment, tmp_path, capsys):
    code, err = run_cli(["train", "--model", "mlp", "--epochs", "1", "--threads", value,
                         "--out", str(tmp_path / "run")], capsys)
    assert_one_line(code, err, fragment)
    assert not (tmp_path / "run").exists()


def test_yaml_and_plasticity_refuse_a_bad_thread_count(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("threads: two\n")
    code, err = run_cli(["train", "--config", str(path), "--out", str(tmp_path / "run")], capsys)
    assert_one_line(code, err, "threads must be an integer or null, got 'two'")
    code, err = run_cli(["plasticity", "--threads", "0", "--out", str(tmp_path / "study")], capsys)
    assert_one_line(code, err, "threads must be a positive integer (torch intra-op threads per process), got 0")
    assert not (tmp_path / "study").exists()


def test_resume_keeps_the_run_thread_count_and_warns_when_changed(tmp_path, caplog, torch_threads):
    torch.set_num_threads(2)
    ref = tmp_path / "reference"
    config = TrainConfig.from_dict(dict(TINY, max_steps=None, epochs=2, threads=1, keep_checkpoints=[1],
                                        out=str(ref)))
    reference = train(config)
    for name, extra in (("same", []), ("changed", ["--threads", "2"])):
        res = tmp_path / name
        res.mkdir()
        shutil.copy(ref / "config.yaml", res / "config.yaml")
        shutil.copy(ref / "checkpoint_epoch1.pt", res / "checkpoint.pt")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="granet.train.run"):
            assert main(["train", "--resume", str(res), "--progress", "log", *extra]) == 0
        summary = json.loads((res / "summary.json").read_text())
        warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("threads:")]
        if name == "same":  # not given: the run's own count, not this process's 2
            assert summary["threads"] == 1 and warned == []
            assert _without_time(summary) == _without_time(reference)
        else:
            assert summary["threads"] == 2
            assert warned == ["threads: the run so far used 1 torch thread(s), it continues with 2; float sums change "
                              "order, so the result will not be bit-identical to an uninterrupted run"]
        assert torch.get_num_threads() == 2


def test_library_resume_with_unset_threads_takes_the_run_count(tmp_path, torch_threads):
    ref = tmp_path / "reference"
    config = TrainConfig.from_dict(dict(TINY, max_steps=None, epochs=2, threads=1, keep_checkpoints=[1],
                                        out=str(ref)))
    reference = train(config)
    res = tmp_path / "resumed"
    res.mkdir()
    shutil.copy(ref / "config.yaml", res / "config.yaml")
    shutil.copy(ref / "checkpoint_epoch1.pt", res / "checkpoint.pt")
    torch.set_num_threads(2)
    summary = train(config.with_values(out=None, threads=None, resume=str(res)))
    assert summary["threads"] == 1 and torch.get_num_threads() == 2
    assert _without_time(summary) == _without_time(reference)


def test_run_to_completion_starts_a_run_over_only_when_nothing_is_lost(tmp_path):
    from granet.errors import RunDirError
    from granet.experiments.sweep import run_to_completion
    from granet.rundir import RunLock

    config = TrainConfig.from_dict(dict(TINY, out=str(tmp_path / "run")))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: mlp\n")  # started, interrupted before its first checkpoint
    (run / "metrics.jsonl").write_text("")
    assert run_to_completion(config)["steps"] == 3
    # A run in progress in another process (its lock held) is never deleted to start it over.
    other = tmp_path / "busy"
    other.mkdir()
    (other / "config.yaml").write_text("model: mlp\n")
    with RunLock(other):
        with pytest.raises(RunDirError, match="is in use by another granet process"):
            run_to_completion(config.with_values(out=str(other)))
        assert (other / "config.yaml").read_text() == "model: mlp\n"
    # Results without a checkpoint are never deleted either.
    (run / "checkpoint.pt").unlink()
    (run / "summary.json").rename(run / "summary.old")
    with pytest.raises(RunDirError, match="holds results"):
        run_to_completion(config)
    assert (run / "model.pt").exists()
