"""The run directory of ``granet train``: its files, its two record types, and safe writes.

A run directory holds::

    config.yaml      the resolved configuration (every key, the values actually used)
    metrics.jsonl    one :class:`EpochRecord` per line
    checkpoint.pt    everything needed to resume bit-exactly (see :mod:`granet.train.checkpoint`)
    model.pt         the selected sparse model (state_dict + masks + config)
    summary.json     the :class:`RunSummary` (test accuracy is measured once, at the end)
    status.json      ``running`` / ``interrupted`` / ``finished``, with the epoch and a message
    coverage.json    which weights are under masks and which stay dense, and why
    tensorboard/     TensorBoard scalars and histograms (with ``--tensorboard true``)

The writer (the training loop) and the readers (``granet report``, ``granet evaluate``, the comparison
benchmark) share the record definitions below, so they agree by construction, not by convention.

Every file is written to a temporary name, flushed and ``fsync``-ed, renamed over the old one, and the
directory is ``fsync``-ed: a crash, a kill or a power loss leaves either the old or the new file, never a
torn one; a failed write (full disk) removes the temporary file and leaves the old file intact.
``metrics.jsonl`` is appended after the checkpoint that covers its epoch has been written, and every
checkpoint carries the metric history, so a resumed run rewrites the file from its checkpoint: a torn
or extra last line can never make a run unresumable. Writers that take a file name go through
:func:`atomic_output`; torch files are written by :func:`save_file` and read by :func:`load_file`
(``weights_only=True``: a crafted file cannot run code), which checkpoints, model files, exports
and the framework callbacks share.

A run holds :class:`RunLock` on its directory for its whole life, and :func:`refuse_run_file` keeps
other commands' outputs off a run's own files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pickle
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional

import torch

from .errors import CheckpointError, RunDirError, short_text

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"
SUMMARY_FILE = "summary.json"
STATUS_FILE = "status.json"
COVERAGE_FILE = "coverage.json"
#: Files whose presence marks a directory as holding a run.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, MODEL_FILE, SUMMARY_FILE, STATUS_FILE, COVERAGE_FILE)
#: The lock file a running run holds (see :class:`RunLock`); it exists only while the run does.
LOCK_FILE = ".granet.lock"
#: Kept checkpoints (``--keep-checkpoints``): ``checkpoint_epoch<N>.pt``.
KEPT_CHECKPOINT = re.compile(r"checkpoint_epoch(\d+)\.pt")


def kept_checkpoint_name(epoch: int) -> str:
    """The file name of the checkpoint kept for ``epoch``."""
    return f"checkpoint_epoch{epoch}.pt"


@dataclass
class EpochRecord:
    """One line of ``metrics.jsonl``: the state of the run at the end of an epoch."""

    epoch: int
    step: int
    lr: float
    train_loss: float
    train_accuracy: float
    val_loss: Optional[float]
    val_accuracy: Optional[float]
    density: float
    sparsity: float
    exploration_rate: Optional[float]
    train_flops: Optional[float]
    topology_updates: int = 0
    pruned: int = 0
    regrown: int = 0
    time_s: float = 0.0
    round: Optional[int] = None  # lottery tickets: the training round (0 = dense) this epoch belongs to
    health: Optional[dict[str, Any]] = None  # granet.sparsity.health.HealthReport of the epoch's end, as a dict

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary (one JSON line); ``round`` only for runs that have rounds, ``health``
        only where it was checked."""
        out = dataclasses.asdict(self)
        for key in ("round", "health"):
            if out[key] is None:
                del out[key]
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EpochRecord":
        """Build from a parsed line; unknown keys are ignored, missing required keys raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(values))
        if missing:
            raise ValueError(f"metrics record lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class RunSummary:
    """``summary.json``: the final numbers of a finished run."""

    method: str
    model: str
    dataset: str
    seed: int
    target_density: float
    density: float
    sparsity: float
    layer_density: dict[str, float]
    selected_epoch: Optional[int]
    best_val_accuracy: Optional[float]
    test_accuracy: float
    test_loss: float
    epochs: int
    steps: int
    wall_time_s: float
    exploration_rate: Optional[float] = None
    train_flops: Optional[float] = None
    inference_flops: Optional[float] = None
    train_flops_total: Optional[float] = None
    inference_flops_total: Optional[float] = None
    dense_inference_flops: Optional[float] = None
    device: str = "cpu"
    world_size: int = 1
    threads: Optional[int] = None  # torch intra-op threads per process (results depend on it)
    native_kernels: Optional[str] = None  # granet.kernels.native.status(): whether the fused C kernels ran
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary (``extra`` merged in at the top level)."""
        out = dataclasses.asdict(self)
        out.update(out.pop("extra"))
        return out


# ---------------------------------------------------------------------------- safe writes


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    detail = text[-1] if text else type(exc).__name__
    return f"{detail} (is the disk full?)" if "write" in detail.lower() else detail


def _probe_write(fh: IO[bytes]) -> Optional[OSError]:
    """The operating system's reason why writing to ``fh`` fails (full disk, quota, file-size limit)."""
    try:
        fh.write(b"\0")
        fh.flush()
        os.fsync(fh.fileno())
    except OSError as exc:
        return exc
    return None


def _umask() -> int:
    """The process's file-creation mask, read without changing it where the system says it
    (``os.umask`` sets it process-wide, which other threads would see for a moment)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Write ``path`` through a temporary name: ``with atomic_output(path) as tmp: writer(tmp)``.

    For writers that take a file name (``safetensors``, ``matplotlib``); see :func:`atomic_write` for
    writers that take an open file. On success the temporary file is fsync-ed, renamed over ``path``
    and the directory fsync-ed; on any failure it is removed and ``path`` is left as it was. The file
    gets the permissions of a plain ``open`` (``0o666`` less the umask), whatever the writer used
    (``safetensors`` creates its files ``0o600``).

    Raises:
        RunDirError: the file could not be written (full disk, read-only file system, missing directory,
            file-size limit); the message names the file and the reason.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, (OSError, RuntimeError)) or type(exc).__name__ == "SafetensorError":
            kept = " (the previous version is intact)" if path.exists() else ""
            raise RunDirError(f"cannot write {path}: {_reason(exc)}{kept}") from None
        raise
    _fsync_dir(path.parent)


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through ``write(file)``: temporary file, fsync, rename, fsync of the directory.

    Raises:
        RunDirError: the file could not be written (the previous file, if any, is left intact and
            the temporary file is removed).
    """
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        try:
            write(fh)
        except RuntimeError as exc:  # torch.save reports a failed write without its cause
            cause = _probe_write(fh)
            if cause is None:
                raise
            raise cause from exc
        fh.flush()


def save_file(obj: Any, path: Path) -> None:
    """``torch.save`` atomically and durably (temporary file, fsync, rename)."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def load_file(path: Path, what: str = "checkpoint", map_location: Any = "cpu") -> dict[str, Any]:
    """Read a file written by :func:`save_file` without running any code from it.

    Raises:
        CheckpointError: missing, unreadable, truncated, corrupt, or holding Python objects other than
            tensors and plain data (refused: loading them could run code).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no {what} file at {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is refused unread
        raise CheckpointError(f"{path} is not a readable {what} (not a torch save file: truncated, corrupt or foreign)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(
                f"refused to load {path}: it holds Python objects other than tensors and plain data, "
                f"and loading them could run code"
            ) from None
        raise CheckpointError(f"{path} is not a readable {what} (corrupt file)") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path} is not a readable {what} (truncated or corrupt: {detail})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a granet {what} (it holds a {type(state).__name__})")
    return state


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically and durably (see :func:`atomic_write`)."""
    atomic_write(path, lambda fh: fh.write(text.encode()))


def append_metrics(path: Path, record: EpochRecord) -> None:
    """Append one record to ``metrics.jsonl`` and flush it to disk."""
    try:
        with open(path, "a") as fh:
            fh.write(json.dumps(record.to_dict()) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise RunDirError(f"cannot append to {path}: {_reason(exc)}") from None


def write_metrics(path: Path, records: list[EpochRecord]) -> None:
    """Rewrite ``metrics.jsonl`` from ``records`` (used on resume, from the checkpoint's history)."""
    atomic_write_text(path, "".join(json.dumps(r.to_dict()) + "\n" for r in records))


def read_metrics(path: Path) -> list[EpochRecord]:
    """Parse ``metrics.jsonl``.

    A last line that is not valid JSON (a write torn by a crash or a full disk) is dropped with a
    warning; an invalid line anywhere else is an error.

    Raises:
        ValueError: a line other than the last is not a valid record (file and line named).
    """
    lines = Path(path).read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            values = json.loads(line)
            if not isinstance(values, dict):
                raise ValueError("not a JSON object")
            records.append(EpochRecord.from_dict(values))
        except ValueError as exc:
            if number == len(lines):
                logger.warning("%s: ignoring a torn last line (%s)", path, exc)
                break
            raise ValueError(f"{path} line {number} is not a valid metrics record: {exc}") from None
    return records


def write_status(root: Path, state: str, **info: Any) -> None:
    """Record the run's state (``running``, ``interrupted``, ``finished``) in ``status.json``."""
    atomic_write_text(Path(root) / STATUS_FILE, json.dumps(dict(state=state, **info), indent=2) + "\n")


def is_run_file(path: Path) -> bool:
    """Whether ``path`` names one of the files of a run directory that holds a run.

    Symbolic links are followed, so a link to a run's ``model.pt`` counts as that file.
    """
    path = Path(path)
    target = path.resolve() if path.exists() or path.is_symlink() else path.parent.resolve() / path.name
    own = (target.name in RUN_FILES or target.name in (LOCK_FILE, "tensorboard")
           or KEPT_CHECKPOINT.fullmatch(target.name) is not None)
    return own and any((target.parent / name).exists() for name in RUN_FILES)


def refuse_run_file(path: Path, what: str = "--out") -> None:
    """Refuse to write ``path`` where it would replace a file of a run (``model.pt``, ``checkpoint.pt``, ...).

    Raises:
        RunDirError: ``path`` is one of a run directory's own files (the message names it).
    """
    if is_run_file(path):
        raise RunDirError(f"{what} {path} is one of the files of the run in {Path(path).parent}: "
                          f"writing it would destroy the run; choose another file name")


class RunLock:
    """An exclusive operating-system lock on a run directory, held for the life of a run.

    The lock is ``flock`` on :data:`LOCK_FILE` inside the directory: the kernel drops it when the
    process ends, however it ends (a ``SIGKILL`` included), so a killed run never leaves a stale lock.
    A second process that asks for the lock while it is held is refused at once (never waits).
    The file holds the holder's pid, for the message. On release the file is removed, and so is the
    directory when the lock created it and nothing else was written there (a run that failed before
    writing anything leaves no empty directory behind).

    Where ``fcntl`` is not available (Windows) no lock is taken.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._fd: Optional[int] = None
        self._created = False

    def acquire(self) -> "RunLock":
        """Take the lock, creating the directory if needed.

        Raises:
            RunDirError: another process holds the lock (its pid named), or the directory cannot be
                created or written.
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        root, path = self.root, self.root / LOCK_FILE
        if root.exists() and not root.is_dir():
            raise RunDirError(f"--out {root} is a file, not a directory")
        try:
            self._created = not root.exists()
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"cannot create run directory {root}: {_reason(exc)}") from None
        try:
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise RunDirError(f"{root} is in use by another granet process (pid {short_text(holder, 12)}): "
                                      f"wait for it to end, or choose another --out") from None
                # The previous holder may have removed the file between our open and our lock: then
                # the lock is on a file nobody else sees, and we must lock the file at that path.
                try:
                    same = os.fstat(fd).st_ino == os.stat(path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:
            raise RunDirError(f"cannot lock run directory {root}: {_reason(exc)}") from None
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file (and the directory, if the lock made it and it is still empty); unlock."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            (self.root / LOCK_FILE).unlink()
        if self._created:
            with contextlib.suppress(OSError):
                self.root.rmdir()  # fails, as it should, unless the directory is empty
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def run_files_in(root: Path) -> list[str]:
    """The run files (:data:`RUN_FILES` and kept checkpoints) present in ``root``, in a stable order."""
    root = Path(root)
    present = [name for name in RUN_FILES if (root / name).exists()]
    kept = sorted((p.name for p in root.glob("checkpoint_epoch*.pt") if KEPT_CHECKPOINT.fullmatch(p.name)),
                  key=lambda n: int(KEPT_CHECKPOINT.fullmatch(n).group(1)))  # type: ignore[union-attr]
    return present + kept


def prepare_run_dir(root: Path, overwrite: bool) -> None:
    """Create a new run directory, refusing to reuse one that holds a run.

    Call it while holding the directory's :class:`RunLock`, so that no other run can be writing there.

    Raises:
        RunDirError: ``root`` is a file, cannot be created, or already holds run files and
            ``overwrite`` is false (the message says how to resume or replace it).
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise RunDirError(f"--out {root} is a file, not a directory")
    present = run_files_in(root) if root.is_dir() else []
    if present and not overwrite:
        raise RunDirError(
            f"{root} already holds a run ({', '.join(present)}): continue it with --resume {root}, "
            f"or pass --overwrite to replace it"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        for name in present:
            (root / name).unlink()
        if present:  # replacing a run (overwrite): its TensorBoard logs and stale temporary files go too
            shutil.rmtree(root / "tensorboard", ignore_errors=True)
            remove_temporary_files(root)
    except OSError as exc:
        raise RunDirError(f"cannot create run directory {root}: {_reason(exc)}") from None


def remove_temporary_files(root: Path) -> list[str]:
    """Delete the ``*.tmp`` files that a killed write left in ``root``; returns their names."""
    removed = []
    for tmp in Path(root).glob("*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp.name)
    return sorted(removed)


__all__ = [
    "EpochRecord", "RunSummary", "RUN_FILES", "CONFIG_FILE", "METRICS_FILE", "CHECKPOINT_FILE", "MODEL_FILE",
    "SUMMARY_FILE", "STATUS_FILE", "COVERAGE_FILE", "atomic_write", "atomic_write_text", "append_metrics",
    "write_metrics",
    "read_metrics", "write_status", "prepare_run_dir", "atomic_output", "is_run_file", "refuse_run_file", "RunLock",
    "LOCK_FILE", "KEPT_CHECKPOINT", "save_file", "load_file", "kept_checkpoint_name", "run_files_in",
    "remove_temporary_files",
]
