"""The run directory's writes: atomic, durable (fsync of the file and its directory), and a failed
write leaves the previous file intact with no temporary file behind."""
import errno
import json
import os

import pytest
import torch

from granet import rundir
from granet.errors import RunDirError
from granet.rundir import atomic_output, atomic_write_text


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


# ---------------------------------------------------------------------------- the run directory's lock

_HOLD = """
import sys, time
from granet.rundir import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _holder(root):
    """A process that takes the lock of ``root`` and holds it until it is killed."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_refuses_a_second_process_and_dies_with_its_holder(tmp_path):
    import signal

    root = tmp_path / "run"
    holder = _holder(root)
    try:
        with pytest.raises(RunDirError) as info:
            rundir.RunLock(root).acquire()
        assert str(info.value) == (f"{root} is in use by another granet process (pid {holder.pid}): wait for it to "
                                   f"end, or choose another --out")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # A killed holder leaves its lock file behind, but no lock: the kernel released it with the process.
    assert (root / rundir.LOCK_FILE).exists()
    with rundir.RunLock(root):
        assert (root / rundir.LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert not (root / rundir.LOCK_FILE).exists()
    assert root.is_dir()  # it existed before this lock: kept


def test_lock_removes_the_directory_it_created_when_nothing_was_written(tmp_path):
    with rundir.RunLock(tmp_path / "a" / "run"):
        assert (tmp_path / "a" / "run").is_dir()
    assert not (tmp_path / "a" / "run").exists() and (tmp_path / "a").is_dir()
    with rundir.RunLock(tmp_path / "b"):
        (tmp_path / "b" / "config.yaml").write_text("x")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["config.yaml"]


def test_lock_taken_after_its_file_was_replaced_is_the_file_at_the_path(tmp_path, monkeypatch):
    """The holder removes the lock file on release; a process that opened the old file before the removal
    must not end up holding a lock on a file nobody else sees."""
    import fcntl

    root = tmp_path / "run"
    root.mkdir()
    stale = os.open(root / rundir.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    real_flock = fcntl.flock
    calls = []

    def flock(fd, op):
        calls.append(fd)
        if len(calls) == 1:  # the lock file is replaced between our open and our lock
            os.unlink(root / rundir.LOCK_FILE)
            os.close(os.open(root / rundir.LOCK_FILE, os.O_RDWR | os.O_CREAT))
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    lock = rundir.RunLock(root).acquire()
    try:
        assert len(calls) == 2  # retried on the file now at the path
        assert os.fstat(lock._fd).st_ino == os.stat(root / rundir.LOCK_FILE).st_ino
    finally:
        lock.release()
        os.close(stale)


def test_run_files_are_refused_as_outputs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes(b"model")
    for name in ("model.pt", "checkpoint.pt", "summary.json", "checkpoint_epoch3.pt", rundir.LOCK_FILE):
        with pytest.raises(RunDirError) as info:
            rundir.refuse_run_file(run / name)
        assert str(info.value) == (f"--out {run / name} is one of the files of the run in {run}: writing it would "
                                   f"destroy the run; choose another file name")
    (tmp_path / "link.pt").symlink_to(run / "model.pt")
    with pytest.raises(RunDirError):
        rundir.refuse_run_file(tmp_path / "link.pt")
    for fine in (run / "model.sparse.safetensors", run / "checkpoint_epochX.pt", tmp_path / "model.pt"):
        rundir.refuse_run_file(fine)  # not a run file, or not in a run directory


def test_atomic_output_turns_a_missing_directory_into_one_line(tmp_path):
    target = tmp_path / "missing" / "out.bin"
    with pytest.raises(RunDirError) as info:
        with rundir.atomic_output(target) as tmp:
            tmp.write_bytes(b"x")
    assert str(info.value) == f"cannot write {target}: No such file or directory"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_output_gives_files_the_permissions_of_a_plain_open(umask, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    previous = os.umask(umask)
    try:
        with atomic_output(tmp_path / "export.safetensors") as tmp:
            st.save_file({"w": torch.ones(2)}, str(tmp))  # safetensors itself creates files 0o600
        atomic_write_text(tmp_path / "summary.json", "{}")
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert (tmp_path / "plain").stat().st_mode & 0o777 == expected
    for name in ("export.safetensors", "summary.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
