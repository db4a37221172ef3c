"""What a checkpoint holds, how it is written, and how it is read back safely.

A checkpoint is a plain dictionary of tensors, numbers, strings, lists and dicts, so it is read with
``torch.load(weights_only=True)``: a crafted file cannot run code. Anything else in a file — a
pickled Python object, random bytes, a truncated write — is refused with one line naming the file.

Restoring follows one order, because each step depends on the previous one: model weights →
optimizer → LR schedule → GradScaler → sparsifier (whose saved masks are applied to the *loaded*
weights: applying a fresh run's masks first would zero every weight regrown since the start) →
FLOPs ledger → RNG state (last, after everything that may draw random numbers).
"""
from __future__ import annotations

import dataclasses
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .. import __version__
from ..errors import CheckpointError
from ..rundir import EpochRecord, atomic_write
from . import fsdp

FORMAT = 2
_REQUIRED = ("config", "progress", "model", "optimizer", "scheduler", "scaler", "sparsifier", "flops", "rng")


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
        """Inverse of :meth:`to_dict`."""
        values = dict(values)
        values["history"] = [EpochRecord.from_dict(r) for r in values.get("history", [])]
        return cls(**values)


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


def read_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a run checkpoint and check that it has every part a resume needs."""
    state = load_file(path, "checkpoint", map_location)
    if "progress" not in state and "epoch" in state:  # format 1: progress at the top level
        state["progress"] = {"epoch": state["epoch"], "step": state["step"], "wall_time": state.get("wall_time", 0.0),
                             "best_val_accuracy": state.get("best", {}).get("val_accuracy"),
                             "best_epoch": state.get("best", {}).get("epoch")}
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a granet run checkpoint (missing {', '.join(missing)})")
    return state


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
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(rng["torch"].cpu())
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])


def make_checkpoint(trainer: Any) -> dict[str, Any]:
    """Everything that determines the rest of ``trainer``'s run."""
    return {
        "format": FORMAT,
        "granet_version": __version__,
        "config": trainer.config.to_dict(),
        "progress": trainer.progress.to_dict(),
        # FSDP: full (unsharded) state dicts gathered to rank 0, in the single-process format.
        "model": fsdp.full_model_state(trainer.model) if getattr(trainer, "fsdp", False) else trainer.model.state_dict(),
        "optimizer": (fsdp.full_optimizer_state(trainer.model, trainer.optimizer) if getattr(trainer, "fsdp", False)
                      else trainer.optimizer.state_dict()),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "sparsifier": trainer.sparsifier.state_dict(),
        "flops": trainer.ledger.state_dict(),
        "rng": capture_rng(),
        **trainer.extra_state(),  # e.g. the lottery ticket's rounds, rewind point and history
    }


def restore_training_state(trainer: Any, state: dict[str, Any], path: Path) -> None:
    """Model, optimizer, LR schedule and scaler from ``state`` (this run's or another run's)."""
    load_model_state(trainer.model, state["model"], path, sharded=getattr(trainer, "fsdp", False))
    try:
        if getattr(trainer, "fsdp", False):
            fsdp.load_full_optimizer_state(trainer.model, trainer.optimizer, state["optimizer"])
        else:
            trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.scaler.load_state_dict(state["scaler"])
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: optimizer or schedule state does not fit this run ({exc})") from None


def restore_checkpoint(trainer: Any, state: dict[str, Any], path: Path) -> None:
    """Continue ``trainer`` from its own run's checkpoint, bit-exactly (see the module docstring)."""
    restore_training_state(trainer, state, path)
    try:
        trainer.sparsifier.load_state_dict(state["sparsifier"])
        trainer.ledger.load_state_dict(state["flops"])
        trainer.progress = Progress.from_dict(state["progress"])
        trainer.load_extra_state(state)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: sparsifier or run state does not fit this run ({exc})") from None
    restore_rng(state["rng"])


__all__ = ["Progress", "save_file", "load_file", "read_checkpoint", "load_model_state", "make_checkpoint",
           "restore_checkpoint", "restore_training_state", "capture_rng", "restore_rng", "FORMAT"]
