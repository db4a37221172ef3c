"""Runtime set-up of a training run: device, process group, seeding, data order, optimizer, LR
schedule, mixed precision and signal handling. Nothing here knows about sparsity."""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..errors import ConfigError, Interrupted
from .config import OptimConfig

logger = logging.getLogger(__name__)

#: Multistep milestones when none are given: fractions of training.
DEFAULT_MILESTONES = (0.5, 0.75)


@dataclass
class Dist:
    """The process's place in a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 owns every file of the run."""
        return self.rank == 0


def setup_distributed(device: torch.device, timeout_s: float) -> Dist:
    """Join the ``torchrun`` process group when launched by it (NCCL on CUDA, gloo on CPU).

    ``timeout_s`` bounds every collective: a rank that dies or freezes makes the others fail with
    a timeout error after that many seconds instead of hanging the job forever.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)))


@contextlib.contextmanager
def intra_op_threads(threads: Optional[int]) -> Iterator[int]:
    """Run the block with ``threads`` torch intra-op threads (``None``: as set); yields the count in effect.

    The previous count is restored on leaving, also on an exception, because the setting is
    process-wide and :func:`granet.train.train` may be one of many runs in a process (the sweeps).
    """
    previous = torch.get_num_threads()
    if threads is not None and threads != previous:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def resolve_device(spec: str) -> torch.device:
    """``auto`` → the process's CUDA device if there is one, else CPU; otherwise as given."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "auto":
        spec = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif spec == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        spec = f"cuda:{local_rank}"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"invalid device {spec!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} requested but CUDA is not available on this machine")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA) and Python's RNG."""
    import random

    random.seed(seed)
    torch.manual_seed(seed)


def epoch_order(num_samples: int, seed: int, epoch: int, dist: Dist) -> list[int]:
    """This rank's sample order for ``epoch``: a seeded permutation, padded and strided over ranks.

    A pure function of (seed, epoch, rank), so a resumed run sees the same data in the same order.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_samples, generator=g).tolist()
    if dist.world_size > 1:
        pad = (-len(order)) % dist.world_size
        order = order + order[:pad]
        order = order[dist.rank::dist.world_size]
    return order


def build_optimizer(optim: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (optionally Nesterov), Adam or AdamW over all parameters, as in the paper's recipes."""
    params = model.parameters()
    if optim.optimizer == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum,
                               nesterov=optim.nesterov and optim.momentum > 0, weight_decay=optim.weight_decay)
    if optim.optimizer == "adam":
        return torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)


def milestone_step(milestone: float, steps_per_epoch: int, total_steps: int) -> float:
    """A milestone as an optimizer step: a fraction of training (<= 1) or an epoch (> 1)."""
    return milestone * total_steps if milestone <= 1 else milestone * steps_per_epoch


def lr_factor(optim: OptimConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the base lr at optimizer step ``step``: linear warm-up, then ``optim``'s schedule."""
    warmup = int(round(optim.warmup_epochs * steps_per_epoch))
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if optim.lr_schedule == "constant":
        return 1.0
    if optim.lr_schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    milestones = DEFAULT_MILESTONES if optim.milestones is None else optim.milestones
    passed = sum(step >= milestone_step(m, steps_per_epoch, total_steps) for m in milestones)
    return optim.gamma ** passed


def amp_mode(amp: str, device: torch.device) -> str:
    """The mixed precision of setting ``amp`` on ``device``: ``off``, ``fp16`` or ``bf16``; ``auto``
    means fp16 on CUDA; CPU always runs fp32."""
    mode = ("fp16" if device.type == "cuda" else "off") if amp == "auto" else amp
    if mode != "off" and device.type != "cuda":
        logger.warning("AMP (%s) requested on %s: mixed precision is only used on CUDA; running fp32", mode, device)
        return "off"
    return mode


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """The autocast context of an AMP mode (a no-op for ``off``)."""
    if amp in ("fp16", "bf16"):
        return torch.autocast(device_type=device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16)
    return contextlib.nullcontext()


def progress_enabled(mode: str, dist: Dist) -> bool:
    """Whether to draw a progress bar: ``auto`` draws one on an interactive terminal (rank 0 only)."""
    if not dist.is_main:
        return False
    if mode == "auto":
        return sys.stderr.isatty()
    return mode == "bar"


class SignalGuard:
    """Turns SIGINT and SIGTERM into :class:`~granet.errors.Interrupted`, never inside a file write.

    Inside :meth:`protect` (checkpoint and model writes) a signal is held back and raised when the
    block ends, so an interruption can never leave a half-written checkpoint behind; elsewhere it is
    raised at once. A second signal while one is held back raises immediately (after the atomic
    writer has removed its temporary file, the previous file is still intact).
    """

    def __init__(self) -> None:
        self._depth = 0
        self._pending: Optional[str] = None
        self._ignoring = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._ignoring:
            logger.info("%s received while the run is already ending: ignored", name)
            return
        if self._depth > 0 and self._pending is None:
            self._pending = name
            return
        raise Interrupted(name)

    @contextlib.contextmanager
    def installed(self) -> Iterator["SignalGuard"]:
        """Install the handlers for the duration of the block (main thread only; else a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handler)
        try:
            yield self
        finally:
            for number, handler in self._previous.items():
                signal.signal(number, handler)
            self._previous.clear()

    @contextlib.contextmanager
    def protect(self) -> Iterator[None]:
        """Hold signals back until the block ends."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._depth == 0 and self._pending is not None:
            name, self._pending = self._pending, None
            raise Interrupted(name)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Ignore signals for the block: the run is already ending (with an error, or done) and
        recording how; a signal now must not replace that outcome."""
        ignoring, self._ignoring = self._ignoring, True
        try:
            yield
        finally:
            self._ignoring = ignoring


__all__ = ["Dist", "setup_distributed", "intra_op_threads", "resolve_device", "seed_everything", "epoch_order",
           "build_optimizer", "lr_factor", "milestone_step", "amp_mode", "autocast", "progress_enabled", "SignalGuard",
           "DEFAULT_MILESTONES"]
