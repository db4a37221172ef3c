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
or extra last line can never make a run unresumable.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Optional

from .errors import RunDirError

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

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary (one JSON line); ``round`` only for runs that have rounds."""
        out = dataclasses.asdict(self)
        if out["round"] is None:
            del out["round"]
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


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(file)``: temporary file, fsync, rename, fsync of the directory.

    Raises:
        RunDirError: the file could not be written (the previous file, if any, is left intact and
            the temporary file is removed).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            try:
                write(fh)
            except RuntimeError as exc:  # torch.save reports a failed write without its cause
                raise _probe_write(fh) or exc
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, (OSError, RuntimeError)):
            kept = " (the previous version is intact)" if path.exists() else ""
            raise RunDirError(f"cannot write {path}: {_reason(exc)}{kept}") from None
        raise
    _fsync_dir(path.parent)


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


def prepare_run_dir(root: Path, overwrite: bool) -> None:
    """Create a new run directory, refusing to reuse one that holds a run.

    Raises:
        RunDirError: ``root`` is a file, cannot be created, or already holds run files and
            ``overwrite`` is false (the message says how to resume or replace it).
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise RunDirError(f"--out {root} is a file, not a directory")
    present = [name for name in RUN_FILES if (root / name).exists()]
    if present and not overwrite:
        raise RunDirError(
            f"{root} already holds a run ({', '.join(present)}): continue it with --resume {root}, "
            f"or pass --overwrite to replace it"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        for name in present:
            (root / name).unlink()
        if present:  # replacing a run (overwrite): its kept checkpoints and TensorBoard logs go too
            for stale in root.glob("checkpoint_epoch*.pt"):
                stale.unlink()
            shutil.rmtree(root / "tensorboard", ignore_errors=True)
    except OSError as exc:
        raise RunDirError(f"cannot create run directory {root}: {_reason(exc)}") from None


__all__ = [
    "EpochRecord", "RunSummary", "RUN_FILES", "CONFIG_FILE", "METRICS_FILE", "CHECKPOINT_FILE", "MODEL_FILE",
    "SUMMARY_FILE", "STATUS_FILE", "COVERAGE_FILE", "atomic_write", "atomic_write_text", "append_metrics", "write_metrics",
    "read_metrics", "write_status", "prepare_run_dir",
]
