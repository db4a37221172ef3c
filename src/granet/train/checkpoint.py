"""What a checkpoint holds, how it is written, and how it is read back safely.

A checkpoint is the plain dictionary :meth:`granet.train.loop.Trainer.state_dict` returns — tensors,
numbers, strings, lists and dicts: ``format``, ``granet_version``, ``config`` (the run's flat config),
``progress`` (:class:`Progress`), ``model``, ``optimizer``, ``scheduler``, ``scaler``, ``sparsifier``,
``flops``, ``rng`` and the entries a trainer adds (the lottery ticket). It is written atomically with
:func:`save_file` and read with :func:`read_checkpoint` (``torch.load(weights_only=True)``: a crafted
file cannot run code). Anything else in a file — a pickled Python object, random bytes, a truncated
write — is refused with one line naming the file. This module works on those dictionaries; the
trainer fills its objects from one (:meth:`~granet.train.loop.Trainer.load_state_dict`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeGuard

import torch
from torch import nn

from ..errors import CheckpointError, short_repr, short_text
from ..rundir import EpochRecord, load_file, save_file
from . import fsdp

FORMAT = 2
#: The entries every run checkpoint has.
REQUIRED = ("config", "progress", "model", "optimizer", "scheduler", "scaler", "sparsifier", "flops", "rng")


@dataclass
class Progress:
    """Where a run stands: everything besides the model, optimizer and sparsifier state."""

    epoch: int = 0
    step: int = 0
    best_val_accuracy: Optional[float] = None
    best_epoch: Optional[int] = None
    wall_time: float = 0.0
    history: list[EpochRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint."""
        out = dataclasses.asdict(self)
        out["history"] = [r.to_dict() for r in self.history]
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Progress":
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: an entry is missing, unknown or of the wrong type (named).
        """
        if not isinstance(values, dict):
            raise ValueError(f"progress is a {type(values).__name__}, not a mapping")
        values = dict(values)
        unknown = sorted(str(k) for k in values if k not in {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"progress has unknown entries {short_text(', '.join(unknown))}")
        for key in ("epoch", "step"):
            if not _is_int(values.get(key)) or values[key] < 0:
                raise ValueError(f"progress.{key} must be an int >= 0, got {short_repr(values.get(key))}")
        best = values.get("best_epoch")
        if best is not None and (not _is_int(best) or not 0 <= best <= values["epoch"]):
            raise ValueError(f"progress.best_epoch must be an epoch of the run or None, got {short_repr(best)}")
        for key, optional in (("best_val_accuracy", True), ("wall_time", False)):
            value = values.get(key, None if optional else 0.0)
            if not (value is None and optional) and (not _is_real(value) or not math.isfinite(value)):
                raise ValueError(f"progress.{key} must be a finite number, got {short_repr(value)}")
        history = values.get("history", [])
        if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
            raise ValueError("progress.history must be a list of metrics records")
        values["history"] = [EpochRecord.from_dict(r) for r in history]
        return cls(**values)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a run checkpoint and check that it has every part a resume needs."""
    state = load_file(path, "checkpoint", map_location)
    if "progress" not in state and "epoch" in state:  # format 1: progress at the top level
        saved_best = state.get("best")
        best: dict[str, Any] = saved_best if isinstance(saved_best, dict) else {}
        state["progress"] = {"epoch": state["epoch"], "step": state.get("step"),
                             "wall_time": state.get("wall_time", 0.0),
                             "best_val_accuracy": best.get("val_accuracy"), "best_epoch": best.get("epoch")}
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a granet run checkpoint (missing {', '.join(missing)})")
    malformed = [k for k in ("config", "progress", "sparsifier", "model", "rng") if not isinstance(state[k], dict)]
    if malformed:
        raise CheckpointError(f"{path} is not a granet run checkpoint (malformed {', '.join(malformed)})")
    return state


def checkpointed_epoch(run_dir: Path) -> Optional[int]:
    """The epoch held by ``run_dir``'s ``checkpoint.pt``, or ``None`` (no checkpoint, or not readable).

    Memory-maps the file, so only the small ``progress`` entry is read from disk.
    """
    path = Path(run_dir) / "checkpoint.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        epoch = state["progress"]["epoch"]
    except Exception:  # noqa: BLE001 - any failure means "no usable checkpoint" here
        return None
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch > 0 else None


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path, sharded: bool = False) -> None:
    """``model.load_state_dict`` with a one-line error naming the parameters that do not fit.

    ``sharded``: the model is FSDP-sharded and ``state`` a full state dict (DTensor shapes are the
    full shapes, so the same checks apply); every rank keeps its shard.
    """
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the model entry is not a state dict")
    own = model.state_dict()
    problems = []
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})" for k in own
              if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape]
    for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if names:
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            problems.append(f"{label}: {', '.join(names[:5])}{more}")
    if problems:
        raise CheckpointError(f"{path} does not fit the model ({'; '.join(problems)})")
    if sharded:
        fsdp.load_full_model_state(model, state)
    else:
        model.load_state_dict(state)


def capture_rng() -> dict[str, Any]:
    """The global RNG states (torch CPU and, where present, CUDA)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(rng: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`.

    Raises:
        ValueError: ``rng`` is not a saved RNG state of this torch build (checked before anything is set).
    """
    own = torch.get_rng_state()
    saved = rng.get("torch") if isinstance(rng, dict) else None
    if not isinstance(saved, torch.Tensor) or saved.dtype != own.dtype or saved.shape != own.shape:
        got = f"{saved.dtype} {tuple(saved.shape)}" if isinstance(saved, torch.Tensor) else type(saved).__name__
        raise ValueError(f"the saved RNG state is {got}, not a torch RNG state ({own.dtype} {tuple(own.shape)})")
    cuda = rng.get("cuda")
    if cuda is not None and (not isinstance(cuda, list) or not all(isinstance(t, torch.Tensor) for t in cuda)):
        raise ValueError("the saved CUDA RNG state is not a list of tensors")
    torch.set_rng_state(saved.cpu())
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])


__all__ = ["Progress", "save_file", "load_file", "read_checkpoint", "checkpointed_epoch", "load_model_state",
           "capture_rng", "restore_rng", "FORMAT", "REQUIRED"]
