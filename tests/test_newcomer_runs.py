"""What a new user meets when a run starts, fails, draws its progress bar, or runs lottery tickets.

* a run that fails before its first checkpoint leaves no directory behind (only what it created,
  only when nothing else is there); a run that got further, or was interrupted, keeps its directory;
* while the progress bar is drawn, log lines go through tqdm (never on a line with the bar);
* the lottery-ticket rounds are logged after the epoch line that ends them, formatted like it.
"""
from __future__ import annotations

import io
import json
import logging
import re
import sys
from pathlib import Path

import pytest

from granet.cli import main
from granet.errors import Interrupted
from granet.train import TrainConfig, train
from granet.train.loop import Trainer

FAST = dict(model="mlp", epochs=2, update_interval=10, progress="log", threads=1)


def _config(out: Path, **values: object) -> TrainConfig:
    return TrainConfig.from_dict(dict(FAST, out=str(out), **values))


def _fail_in_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int, error: BaseException, before=None) -> None:
    """Make ``Trainer.train_epoch`` raise ``error`` when it starts epoch ``epoch`` (1-based)."""
    original = Trainer.train_epoch

    def train_epoch(self: Trainer, bar: object) -> dict[str, float]:
        if self.progress.epoch + 1 == epoch:
            if before is not None:
                before(self)
            raise error
        return original(self, bar)

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)


def test_a_run_that_cannot_start_leaves_no_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    # No data and no download: refused while the data is loaded, before any file is written.
    code = main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--progress", "log"])
    assert code == 2 and "MNIST not found" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither runs/<name> nor runs/ is left


def test_a_run_that_fails_in_its_first_epoch_removes_what_it_created(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "a" / "b" / "run"
    seen = []
    _fail_in_epoch(monkeypatch, 1, RuntimeError("boom"),
                   before=lambda t: seen.append(sorted(p.name for p in t.out.iterdir())))
    with pytest.raises(RuntimeError, match="boom"):
        train(_config(out, tensorboard=True))
    # It had written its start-up files (and its TensorBoard directory) when it failed ...
    assert seen == [[".granet.lock", "config.yaml", "coverage.json", "metrics.jsonl", "status.json", "tensorboard"]]
    assert list(tmp_path.iterdir()) == []  # ... and removed them with a/, a/b/ and a/b/run, which it created


def test_a_failed_start_keeps_what_it_did_not_create(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The directory existed before the run: it keeps the run's record of how it ended.
    existing = tmp_path / "existing"
    existing.mkdir()
    _fail_in_epoch(monkeypatch, 1, RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        train(_config(existing))
    assert sorted(p.name for p in existing.iterdir()) == ["config.yaml", "coverage.json", "metrics.jsonl",
                                                          "status.json"]
    status = json.loads((existing / "status.json").read_text())
    assert (status["state"], status["error"], status["message"]) == ("failed", "RuntimeError", "boom")
    # A new directory into which something else was put while the run started: nothing is removed.
    crowded = tmp_path / "new" / "run"
    _fail_in_epoch(monkeypatch, 1, RuntimeError("boom"),
                   before=lambda t: (t.out / "notes.txt").write_text("mine\n"))
    with pytest.raises(RuntimeError, match="boom"):
        train(_config(crowded))
    assert sorted(p.name for p in crowded.iterdir()) == ["config.yaml", "coverage.json", "metrics.jsonl",
                                                         "notes.txt", "status.json"]
    assert (crowded / "notes.txt").read_text() == "mine\n"


def test_a_run_that_got_further_or_was_interrupted_keeps_its_directory(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    later = tmp_path / "later" / "run"
    _fail_in_epoch(monkeypatch, 2, RuntimeError("boom"))  # after the first checkpoint: resumable
    with pytest.raises(RuntimeError, match="boom"):
        train(_config(later))
    assert sorted(p.name for p in later.iterdir()) == ["checkpoint.pt", "config.yaml", "coverage.json",
                                                       "metrics.jsonl", "model.pt", "status.json"]
    stopped = tmp_path / "stopped" / "run"
    _fail_in_epoch(monkeypatch, 1, Interrupted("SIGTERM"))  # its message says how to start it again
    with pytest.raises(Interrupted):
        train(_config(stopped))
    assert sorted(p.name for p in stopped.iterdir()) == ["config.yaml", "coverage.json", "metrics.jsonl",
                                                         "status.json"]
    assert json.loads((stopped / "status.json").read_text())["state"] == "interrupted"


TIMESTAMPED = "%(asctime)s %(levelname)s %(message)s"


def test_log_lines_never_share_a_line_with_the_progress_bar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)  # the bar's and the console log's stream, as in a terminal
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(TIMESTAMPED, datefmt="%H:%M:%S"))
    records: list[str] = []
    recorder = logging.Handler()
    recorder.setFormatter(console.formatter)
    recorder.emit = lambda record: records.append(recorder.format(record))  # type: ignore[method-assign]
    root = logging.getLogger()
    level = root.level
    root.addHandler(console)
    root.addHandler(recorder)
    root.setLevel(logging.INFO)
    try:
        train(_config(tmp_path / "run", progress="bar", epochs=3))
    finally:
        root.removeHandler(console)
        root.removeHandler(recorder)
        root.setLevel(level)
    written = stream.getvalue()
    assert re.search(r"\| \d+/60 \[", written)  # the bar was drawn (60 steps)
    # What a terminal shows of each line is what follows its last carriage return (the bar redraws
    # itself after "\r"; tqdm.write erases it with "\r<spaces>\r"). What it shows is exactly the log,
    # line for line, and no log text was ever written on a line before a bar.
    shown = [line.split("\r")[-1] for line in written.split("\n")]
    assert [line for line in shown if line.strip()] == "\n".join(records).split("\n")
    assert len([r for r in records if " INFO epoch " in r]) == 3
    assert all(" INFO " not in segment for line in written.split("\n") for segment in line.split("\r")[:-1])


def test_lottery_rounds_are_logged_after_their_epoch_like_the_epoch_lines(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "lth"
    with caplog.at_level(logging.INFO, logger="granet"):
        summary = train(_config(out, method="lth", lth_rounds=2, update_interval=None))
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("granet.train")]
    assert not [r for r in caplog.records if r.name == "granet.baselines.lottery"]  # no raw-float line
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and [r["epoch"] for r in rounds] == [2, 4, 6]
    for entry in rounds:
        record = metrics[entry["epoch"] - 1]
        epoch_line = next(i for i, m in enumerate(messages) if m.startswith(f"epoch {entry['epoch']}/6 "))
        ended = (f"lottery round {entry['round']} of 2 ended | epoch {entry['epoch']} step {record['step']} | "
                 f"train loss {entry['train_loss']:.4f} acc {entry['train_accuracy']:.4f} | "
                 f"val loss {entry['val_loss']:.4f} acc {entry['val_accuracy']:.4f} | "
                 f"density {entry['density']:.4f} | {entry['steps']} steps")
        assert messages[epoch_line + 1] == ended
        # the epoch line shows the same numbers in the same format
        assert f"| train loss {entry['train_loss']:.4f} acc {entry['train_accuracy']:.4f} | val loss " \
               f"{entry['val_loss']:.4f} acc {entry['val_accuracy']:.4f} | density {entry['density']:.4f} |" \
               in messages[epoch_line]
        if entry["round"] < 2:
            following = rounds[entry["round"] + 1]
            assert messages[epoch_line + 2] == (
                f"lottery round {following['round']} of 2: {following['active']} weights active (density "
                f"{following['density']:.4f}), rewound to iteration 0")
        else:
            assert messages[epoch_line + 2].startswith("done: test accuracy")
