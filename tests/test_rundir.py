"""The run directory's writes: atomic, durable (fsync of the file and its directory), and a failed
write leaves the previous file intact with no temporary file behind."""
import errno
import json
import os

import pytest

from granet import rundir
from granet.errors import RunDirError


def test_atomic_write_fsyncs_file_then_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / "checkpoint.pt"
    rundir.atomic_write(target, lambda fh: fh.write(b"payload"))
    assert target.read_bytes() == b"payload"
    # the data reached the disk under the temporary name, then the rename was made durable
    assert synced == [str(tmp_path / "checkpoint.pt.tmp"), str(tmp_path)]


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"good")

    def fail(fh):
        fh.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(RunDirError) as info:
        rundir.atomic_write(target, fail)
    assert str(info.value) == f"cannot write {target}: No space left on device (the previous version is intact)"
    assert target.read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_interrupted_write_removes_the_temporary_file(tmp_path):
    target = tmp_path / "model.pt"

    def interrupted(fh):
        fh.write(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rundir.atomic_write(target, interrupted)
    assert list(tmp_path.iterdir()) == []


def test_metrics_reader_drops_only_a_torn_last_line(tmp_path):
    record = rundir.EpochRecord(epoch=1, step=10, lr=0.1, train_loss=1.0, train_accuracy=0.5, val_loss=None,
                                val_accuracy=None, density=0.1, sparsity=0.9, exploration_rate=0.2, train_flops=0.3)
    path = tmp_path / "metrics.jsonl"
    rundir.write_metrics(path, [record])
    assert rundir.read_metrics(path) == [record]
    with open(path, "a") as fh:
        fh.write('{"epoch": 2, "st')
    assert rundir.read_metrics(path) == [record]
    path.write_text('{"epoch": 1\n' + json.dumps(record.to_dict()) + "\n")
    with pytest.raises(ValueError, match="line 1 is not a valid metrics record"):
        rundir.read_metrics(path)
