"""The training loop behind ``granet train``: one config in, a run directory out.

A run directory holds::

    config.yaml      the resolved configuration (every field, defaults included)
    metrics.jsonl    one JSON line per epoch (losses, accuracies, lr, density, exploration, FLOPs)
    checkpoint.pt    everything needed to resume bit-exactly (written atomically every epoch)
    model.pt         the selected sparse model (state_dict + masks + config)
    summary.json     the final numbers (test accuracy is measured once, at the end)

Honest evaluation: the validation split (held out from the official training split) selects the
model; only epochs at which the sparsity schedule has reached its final density are eligible, so a
denser intermediate network can never be picked. The test split is evaluated once, on the selected
model.

Schedules are in optimizer steps. ``batch_size`` is the *global* batch (split evenly over the
processes of a ``torchrun`` job), so the number of optimizer steps — and therefore every sparsity
schedule — is the same on 1 or N processes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import yaml
from torch import nn

from . import __version__
from .data import DatasetError, build_datasets
from .flops import TrainingFlopsLedger, inference_flops, inference_flops_relative, layer_flops, step_needs_dense_gradient
from .methods import create_sparsifier, list_methods, method_config
from .models import create_model, list_models
from .sparsifier import Sparsifier

logger = logging.getLogger(__name__)

# Sparsity fields that may be set in a training config; None means "the method's default".
SPARSITY_FIELDS = (
    "distribution", "erk_power_scale", "keep_dense", "prune", "prune_start", "prune_end",
    "update_interval", "drop_fraction", "drop_fraction_end", "drop_decay", "regrow_start",
    "regrow_end", "grow", "redistribute", "mask_optimizer_state",
)


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults are the embedded digits recipe.

    Step-valued sparsity fields (``prune_start``, ``prune_end``, ``regrow_start``, ``regrow_end``)
    take optimizer steps (int) or fractions of the run (float in [0, 1]).
    """

    # what to train
    method: str = "granet"
    model: str = "digits_cnn"
    dataset: str = "digits"
    data_dir: Optional[str] = None
    download: bool = False
    val_fraction: float = 0.1
    augment: bool = True
    dataset_options: dict[str, Any] = field(default_factory=dict)
    # sparsity
    density: float = 0.05
    init_density: Optional[float] = None
    distribution: Optional[str] = None
    erk_power_scale: Optional[float] = None
    keep_dense: Optional[list[str]] = None
    prune: Optional[str] = None
    prune_start: Optional[float] = None
    prune_end: Optional[float] = None
    update_interval: Optional[int] = 20
    drop_fraction: Optional[float] = None
    drop_fraction_end: Optional[float] = None
    drop_decay: Optional[str] = None
    regrow_start: Optional[float] = None
    regrow_end: Optional[float] = None
    grow: Optional[str] = None
    redistribute: Optional[str] = None
    mask_optimizer_state: Optional[bool] = None
    # optimisation
    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    accumulation_steps: int = 1
    # machinery
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: str = "auto"
    workers: int = 0
    out: Optional[str] = None
    resume: Optional[str] = None
    progress: str = "auto"
    max_steps: Optional[int] = None
    keep_checkpoints: list[int] = field(default_factory=list)
    init_from: Optional[str] = None

    @classmethod
    def field_names(cls) -> list[str]:
        """All configuration keys."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], base: Optional["TrainConfig"] = None) -> "TrainConfig":
        """Apply ``values`` over ``base`` (default: the defaults); unknown keys are an error."""
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ConfigError(
                f"unknown config key(s): {', '.join(unknown)} (valid keys: {', '.join(cls.field_names())})"
            )
        return dataclasses.replace(base or cls(), **values)

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary for YAML."""
        return dataclasses.asdict(self)

    def sparsity_options(self) -> dict[str, Any]:
        """The :class:`~granet.config.SparsityConfig` overrides this config sets (None fields left to the method)."""
        out: dict[str, Any] = {}
        for name in SPARSITY_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if name in ("prune_start", "prune_end", "regrow_start", "regrow_end"):
                value = _step_spec(name, value)
            out[name] = value
        if self.method != "dense":
            out["density"] = self.density
            if self.init_density is not None:
                out["init_density"] = self.init_density
        return out

    def validate(self) -> None:
        """Check every field that can be checked without data; raises :class:`ConfigError`."""
        if self.method not in list_methods():
            raise ConfigError(f"unknown method {self.method!r}; valid methods: {', '.join(list_methods())}")
        if self.model not in list_models():
            raise ConfigError(f"unknown model {self.model!r}; valid models: {', '.join(list_models())}")
        from .data import list_datasets

        if self.dataset not in list_datasets():
            raise ConfigError(f"unknown dataset {self.dataset!r}; valid datasets: {', '.join(list_datasets())}")
        for name in ("epochs", "batch_size", "accumulation_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ConfigError(f"max_steps must be a positive integer, got {self.max_steps!r}")
        if not isinstance(self.dataset_options, dict):
            raise ConfigError(f"dataset_options must be a mapping, got {self.dataset_options!r}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        for name, lo, hi in (("lr", 0.0, math.inf), ("weight_decay", 0.0, math.inf), ("momentum", 0.0, 1.0),
                             ("label_smoothing", 0.0, 1.0), ("val_fraction", 0.0, 1.0)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not lo <= value < hi or (name == "lr" and value == 0):
                raise ConfigError(f"{name} must be in [{lo}, {hi}) (lr > 0), got {value!r}")
        choices = {
            "optimizer": ("sgd", "adam", "adamw"),
            "lr_schedule": ("cosine", "multistep", "constant"),
            "amp": ("auto", "off", "fp16", "bf16"),
            "channels_last": ("auto", "on", "off"),
            "progress": ("auto", "bar", "log"),
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}; valid: {', '.join(valid)}")
        try:
            method_config(self.method, total_steps=1_000_000, **self.sparsity_options())
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


class ConfigError(ValueError):
    """A configuration problem the user must fix (reported as one line, no traceback)."""


def _step_spec(name: str, value: Any) -> Any:
    """YAML gives 0.5 or 1000; keep ints as steps and floats in [0, 1] as fractions."""
    if isinstance(value, float) and value.is_integer() and value > 1:
        return int(value)
    return value


# ---------------------------------------------------------------------------- config files


def load_config(path: Optional[str], overrides: dict[str, Any]) -> TrainConfig:
    """Defaults, then the YAML file, then command-line overrides; validated."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as fh:
                loaded = yaml.safe_load(fh) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must be a mapping of keys to values")
        values.update(loaded)
    values.update(overrides)
    config = TrainConfig.from_dict(values)
    config.validate()
    return config


# Keys that may differ between a run and its resumption (they do not change the result).
RESUMABLE_DIFFERENCES = {"device", "workers", "progress", "resume", "out", "data_dir", "download"}


def check_resume_compatible(saved: dict[str, Any], config: TrainConfig) -> None:
    """Refuse to resume a run with settings that would change its result."""
    current = config.to_dict()
    differing = sorted(
        k for k in current if k not in RESUMABLE_DIFFERENCES and k in saved and saved[k] != current[k]
    )
    if differing:
        details = ", ".join(f"{k}: run has {saved[k]!r}, now {current[k]!r}" for k in differing)
        raise ConfigError(f"cannot resume: the config differs from the run's config ({details})")


# ---------------------------------------------------------------------------- machinery


@dataclass
class Dist:
    """The process's place in a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> Dist:
    """Join the ``torchrun`` process group when launched by it (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)))


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


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (optionally Nesterov), Adam or AdamW over all parameters, as in the paper's recipes."""
    params = model.parameters()
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(config: TrainConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the base lr at optimizer step ``step``: linear warm-up, then the schedule.

    ``milestones`` are fractions of training (<= 1) or epochs (> 1).
    """
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if config.lr_schedule == "constant":
        return 1.0
    if config.lr_schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    passed = 0
    for m in config.milestones:
        at = m * total_steps if m <= 1 else m * steps_per_epoch
        passed += step >= at
    return config.gamma ** passed


def build_model(config: TrainConfig, info: Any) -> nn.Module:
    """The config's model, shaped for the dataset (classes, channels, image size)."""
    return create_model(config.model, num_classes=info.num_classes, in_channels=info.in_channels,
                        input_size=info.image_size)


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp in ("fp16", "bf16"):
        return torch.autocast(device_type=device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16)
    return contextlib.nullcontext()


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a torn checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _progress_enabled(mode: str, dist: Dist) -> bool:
    if not dist.is_main:
        return False
    if mode == "auto":
        return sys.stderr.isatty()
    return mode == "bar"


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Any, config: TrainConfig, device: torch.device, dist: Dist,
             channels_last: bool = False) -> dict[str, float]:
    """Loss and accuracy over ``dataset`` (sharded over ranks and all-reduced)."""
    was_training = model.training
    model.eval()
    indices = list(range(dist.rank, len(dataset), dist.world_size))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=max(1, config.batch_size // dist.world_size) * 2,
        shuffle=False, num_workers=config.workers, pin_memory=device.type == "cuda",
    )
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    amp = _amp_mode(config, device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            out = model(x)
        totals[0] += nn.functional.cross_entropy(out.float(), y, reduction="sum")
        totals[1] += (out.argmax(1) == y).sum()
        totals[2] += y.numel()
    if dist.world_size > 1:
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    count = max(1.0, float(totals[2]))
    return {"loss": float(totals[0]) / count, "accuracy": float(totals[1]) / count}


def _amp_mode(config: TrainConfig, device: torch.device) -> str:
    if config.amp == "auto":
        return "fp16" if device.type == "cuda" else "off"
    return config.amp


# ---------------------------------------------------------------------------- the run


class Trainer:
    """Builds everything for a config and runs (or resumes) it. See :func:`train`."""

    def __init__(self, config: TrainConfig, out_dir: Path) -> None:
        self.config = config
        self.out = out_dir
        self.device = resolve_device(config.device)
        self.dist = setup_distributed(self.device)
        if config.batch_size % (self.dist.world_size * config.accumulation_steps):
            raise ConfigError(
                f"batch_size {config.batch_size} (global) must be divisible by world size "
                f"{self.dist.world_size} x accumulation_steps {config.accumulation_steps}"
            )
        self.micro_batch = config.batch_size // (self.dist.world_size * config.accumulation_steps)
        seed_everything(config.seed)
        try:
            self.data = build_datasets(config.dataset, config.data_dir, val_fraction=config.val_fraction,
                                       seed=config.seed, download=config.download and self.dist.is_main,
                                       augment=config.augment, **config.dataset_options)
        except (DatasetError, TypeError) as exc:
            raise ConfigError(str(exc)) from None
        info = self.data.info
        self.model = build_model(config, info).to(self.device)
        self.amp = _amp_mode(config, self.device)
        if self.amp != "off" and self.device.type != "cuda":
            logger.warning("AMP (%s) requested on %s: mixed precision is only used on CUDA; running fp32", self.amp, self.device)
            self.amp = "off"
        self.channels_last = config.channels_last == "on" or (config.channels_last == "auto" and self.device.type == "cuda")
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(config, self.model)
        self.steps_per_epoch = len(self.data.train) // config.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"batch_size {config.batch_size} is larger than the training set ({len(self.data.train)})")
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        start = self._read_init_from() if config.init_from else None
        # Continuing another run: the sparsity schedule counts from the restart (its step 1 is the
        # first step after the checkpoint) and spans the remaining steps.
        sparse_steps = self.total_steps - (start["step"] if start else 0)
        if sparse_steps < 1:
            raise ConfigError(f"{config.init_from} is already at step {start['step']}: nothing left to train")
        self.sparsifier: Sparsifier = create_sparsifier(
            config.method, self.model, self.optimizer, total_steps=sparse_steps, seed=config.seed,
            **config.sparsity_options(),
        )
        # FLOPs of every layer from one real forward pass; the ledger then follows the real masks.
        example = torch.zeros(1, info.in_channels, info.image_size, info.image_size, device=self.device)
        self.layer_flops = layer_flops(self.model, example)
        self.ledger = TrainingFlopsLedger(self.layer_flops)
        self._layer_density = self.sparsifier.layer_density()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(config, s, self.steps_per_epoch, self.total_steps)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.ddp_model: nn.Module = self.model
        if self.dist.world_size > 1:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.epoch = 0
        self.step = 0
        self.best: dict[str, Any] = {"val_accuracy": None, "epoch": None}
        self.wall_time = 0.0
        self.updates: list[dict[str, Any]] = []
        if start is not None:
            self._continue_from(start)

    def _read_init_from(self) -> dict[str, Any]:
        """Load the checkpoint named by ``init_from`` and check that it belongs to a compatible run."""
        path = Path(self.config.init_from)
        if not path.is_file():
            raise ConfigError(f"init_from: no checkpoint file at {path}")
        state = torch.load(path, map_location=self.device, weights_only=False)
        theirs = state.get("config", {})
        keys = ("model", "dataset", "epochs", "batch_size", "optimizer", "lr_schedule", "milestones", "dataset_options")
        differing = [k for k in keys if theirs.get(k) != getattr(self.config, k)]
        if differing:
            raise ConfigError(f"init_from {path}: its run differs in {', '.join(differing)}; they must match to continue it")
        return state

    def _continue_from(self, state: dict[str, Any]) -> None:
        """Take model, optimizer, LR schedule, scaler, RNG and position from a checkpoint: this run's
        (resume) or another run's (``init_from``). The current sparsifier's masks are re-applied."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self._restore_rng(state["rng"])
        self.sparsifier.apply_masks()

    # -------------------------------------------------------------- checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything that determines the rest of the run."""
        return {
            "granet_version": __version__,
            "config": self.config.to_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sparsifier": self.sparsifier.state_dict(),
            "flops": self.ledger.state_dict(),
            "best": dict(self.best),
            "wall_time": self.wall_time,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }

    def load_checkpoint(self, path: Path) -> None:
        """Restore a :meth:`checkpoint_state` written by an earlier (interrupted) run."""
        state = torch.load(path, map_location=self.device, weights_only=False)
        self._continue_from(state)
        self.sparsifier.load_state_dict(state["sparsifier"])
        self.ledger.load_state_dict(state["flops"])
        self._layer_density = self.sparsifier.layer_density()
        self.best = state["best"]
        self.wall_time = state["wall_time"]

    @staticmethod
    def _restore_rng(rng: dict[str, Any]) -> None:
        torch.set_rng_state(rng["torch"].cpu())
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])

    # -------------------------------------------------------------- epochs

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(len(self.data.train), self.config.seed, self.epoch, self.dist)
        usable = self.steps_per_epoch * self.config.accumulation_steps * self.micro_batch
        order = order[:usable]  # drop the ragged tail: every optimizer step sees a full global batch
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(self.data.train, order), batch_size=self.micro_batch, shuffle=False,
            num_workers=self.config.workers, pin_memory=self.device.type == "cuda", drop_last=True,
            generator=torch.Generator().manual_seed(self.config.seed * 7919 + self.epoch),
            persistent_workers=False,
        )
        yield from loader

    def train_epoch(self, progress: Any) -> dict[str, float]:
        """One pass over this rank's share of the training set."""
        self.ddp_model.train()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, count
        accum = self.config.accumulation_steps
        for micro, (x, y) in enumerate(self._batches()):
            if self.step >= self.total_steps:
                break
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            last_micro = (micro + 1) % accum == 0
            sync = contextlib.nullcontext() if last_micro or self.dist.world_size == 1 else self.ddp_model.no_sync()
            with sync:
                with _autocast(self.device, self.amp):
                    out = self.ddp_model(x)
                    loss = self.criterion(out, y)
                self.scaler.scale(loss / accum).backward()
            sums[0] += loss.detach().float() * y.numel()
            sums[1] += (out.argmax(1) == y).sum()
            sums[2] += y.numel()
            if not last_micro:
                continue
            self.scaler.step(self.optimizer)
            self.scaler.update()
            # This step's forward/backward ran on the masks from before its update (RigL accounting).
            dense_gradient = step_needs_dense_gradient(self.sparsifier, self.sparsifier.step_count + 1)
            self.ledger.record(self._layer_density, dense_gradient=dense_gradient)
            report = self.sparsifier.step()
            if report is not None:
                self._layer_density = self.sparsifier.layer_density()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.step += 1
            if report is not None:
                self.updates.append({"step": report.step, "pruned": report.pruned, "dropped": report.dropped,
                                     "regrown": report.regrown, "skipped": report.skipped})
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{float(loss):.3f}", density=f"{self.sparsifier.density():.4f}")
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(sums)
        count = max(1.0, float(sums[2]))
        return {"loss": float(sums[0]) / count, "accuracy": float(sums[1]) / count}

    def at_final_density(self) -> bool:
        """Whether the sparsity schedule has reached its final density (model selection is allowed)."""
        s = self.sparsifier
        return s.pruning is None or s.step_count >= s.pruning.end

    def run(self) -> dict[str, Any]:
        """Train to the end (from wherever the checkpoint left off), then test once."""
        cfg = self.config
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out / "metrics.jsonl"
        bar = None
        if _progress_enabled(cfg.progress, self.dist):
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True, leave=False)
        logger.info(
            "%s | %s on %s | density %.4g | %d epochs x %d steps = %d steps | global batch %d | %s, %d process(es)",
            cfg.method, cfg.model, cfg.dataset, cfg.density if cfg.method != "dense" else 1.0, cfg.epochs,
            self.steps_per_epoch, self.total_steps, cfg.batch_size, self.device, self.dist.world_size,
        )
        try:
            while self.step < self.total_steps:
                start = time.perf_counter()
                self.updates = []
                train = self.train_epoch(bar)
                self.epoch += 1
                val = evaluate(self.model, self.data.val, cfg, self.device, self.dist, self.channels_last) \
                    if self.data.val is not None and len(self.data.val) > 0 else None
                self.wall_time += time.perf_counter() - start
                self._end_of_epoch(train, val, metrics_path)
        finally:
            if bar is not None:
                bar.close()
        return self._finish()

    def _end_of_epoch(self, train: dict[str, float], val: Optional[dict[str, float]], metrics_path: Path) -> None:
        stats = self.sparsifier.stats()
        eligible = self.at_final_density()
        if eligible and (val is None or self.best["val_accuracy"] is None or val["accuracy"] > self.best["val_accuracy"]):
            # Without a validation split the last eligible epoch is selected.
            self.best = {"val_accuracy": None if val is None else val["accuracy"], "epoch": self.epoch}
            if self.dist.is_main:
                atomic_save(self._model_artifact(), self.out / "model.pt")
        record = {
            "epoch": self.epoch,
            "step": self.step,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": train["loss"],
            "train_accuracy": train["accuracy"],
            "val_loss": None if val is None else val["loss"],
            "val_accuracy": None if val is None else val["accuracy"],
            "density": stats["density"],
            "sparsity": stats["sparsity"],
            "exploration_rate": stats["exploration_rate"],
            "train_flops": self.ledger.relative,
            "topology_updates": len(self.updates),
            "pruned": sum(u["pruned"] for u in self.updates),
            "regrown": sum(u["regrown"] for u in self.updates),
            "time_s": self.wall_time,
        }
        if self.dist.is_main:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            atomic_save(self.checkpoint_state(), self.out / "checkpoint.pt")
            if self.epoch in self.config.keep_checkpoints:
                import shutil

                shutil.copyfile(self.out / "checkpoint.pt", self.out / f"checkpoint_epoch{self.epoch}.pt")
            val_text = "" if val is None else f" | val loss {val['loss']:.4f} acc {val['accuracy']:.4f}"
            logger.info(
                "epoch %d/%d step %d | train loss %.4f acc %.4f%s | density %.4f | lr %.4g | %.1fs",
                self.epoch, self.config.epochs, self.step, train["loss"], train["accuracy"], val_text,
                stats["density"], record["lr"], self.wall_time,
            )

    def _model_artifact(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "masks": self.sparsifier.state_dict()["masks"],
            "layer_density": self.sparsifier.layer_density(),
        }

    def _finish(self) -> dict[str, Any]:
        """Test the selected model once; write summary.json."""
        if self.best["epoch"] is None:  # the run ended before the final density was reached
            logger.warning("training ended before the final density was reached; testing the last model")
            self.best = {"val_accuracy": None, "epoch": self.epoch}
            if self.dist.is_main:
                atomic_save(self._model_artifact(), self.out / "model.pt")
        if self.dist.world_size > 1:
            torch.distributed.barrier()
        artifact = torch.load(self.out / "model.pt", map_location=self.device, weights_only=False)
        selected = build_model(self.config, self.data.info).to(self.device)
        selected.load_state_dict(artifact["model"])
        test = evaluate(selected, self.data.test, self.config, self.device, self.dist)
        layer_density = artifact["layer_density"]
        sizes = dict(zip(self.sparsifier.names, self.sparsifier.sizes))
        active = sum(layer_density[n] * sizes[n] for n in sizes)
        summary = {
            "method": self.config.method,
            "model": self.config.model,
            "dataset": self.config.dataset,
            "seed": self.config.seed,
            "target_density": self.sparsifier.config.density,
            "density": active / self.sparsifier.total,
            "sparsity": 1.0 - active / self.sparsifier.total,
            "layer_density": layer_density,
            "selected_epoch": artifact["epoch"],
            "best_val_accuracy": self.best["val_accuracy"],
            "test_accuracy": test["accuracy"],
            "test_loss": test["loss"],
            "epochs": self.epoch,
            "steps": self.step,
            "wall_time_s": self.wall_time,
            "exploration_rate": self.sparsifier.exploration_rate(),
            "train_flops": self.ledger.relative,
            "inference_flops": inference_flops_relative(self.layer_flops, layer_density),
            "train_flops_total": self.ledger.total,
            "inference_flops_total": inference_flops(self.layer_flops, layer_density),
            "dense_inference_flops": self.layer_flops.dense,
            "device": str(self.device),
            "world_size": self.dist.world_size,
        }
        if self.dist.is_main:
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
            logger.info(
                "done: test accuracy %.4f at sparsity %.4f (selected epoch %s, best val %s) in %.1fs -> %s",
                summary["test_accuracy"], summary["sparsity"], summary["selected_epoch"],
                "n/a" if summary["best_val_accuracy"] is None else f"{summary['best_val_accuracy']:.4f}",
                self.wall_time, self.out,
            )
        return summary


def default_out_dir(config: TrainConfig) -> Path:
    """``runs/<dataset>-<model>-<method>-d<density>-s<seed>``."""
    return Path("runs") / f"{config.dataset}-{config.model}-{config.method}-d{config.density:g}-s{config.seed}"


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or, with ``config.resume``, continue) a training run and return its summary."""
    if config.resume is not None:
        out = Path(config.resume)
        saved_path = out / "config.yaml"
        if not (out / "checkpoint.pt").exists() or not saved_path.exists():
            raise ConfigError(f"cannot resume from {out}: no checkpoint.pt and config.yaml there")
        saved = yaml.safe_load(saved_path.read_text())
        check_resume_compatible(saved, config)
    else:
        out = Path(config.out) if config.out else default_out_dir(config)
        if (out / "checkpoint.pt").exists():
            raise ConfigError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
    try:
        return _train(config, out)
    finally:
        # Tear the process group down explicitly: left to interpreter exit, gloo can abort the
        # process after the run has finished ("terminate called without an active exception").
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            import gc

            gc.collect()  # free the DDP wrapper (held in a cycle by the LR lambda) before its group
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def _train(config: TrainConfig, out: Path) -> dict[str, Any]:
    trainer = Trainer(config, out)
    if config.resume is not None:
        trainer.load_checkpoint(out / "checkpoint.pt")
        if trainer.dist.is_main:  # rank 0 owns every file of the run
            _truncate_metrics(out / "metrics.jsonl", trainer.epoch)
        logger.info("resumed %s at epoch %d, step %d", out, trainer.epoch, trainer.step)
    elif trainer.dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("")
        resolved = dict(config.to_dict(), out=str(out))
        atomic_write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    return trainer.run()


def _truncate_metrics(path: Path, epochs: int) -> None:
    """Drop metric lines written after the checkpoint (an epoch that was cut short)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["epoch"] <= epochs]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def evaluate_run(run_dir: str, device: str = "auto", data_dir: Optional[str] = None) -> dict[str, Any]:
    """Re-evaluate a saved run's selected model on its test split; returns accuracy and sparsity."""
    path = Path(run_dir) / "model.pt"
    if not path.exists():
        raise ConfigError(f"{run_dir} has no model.pt (is it a granet run directory?)")
    artifact = torch.load(path, map_location="cpu", weights_only=False)
    config = TrainConfig.from_dict(artifact["config"])
    if data_dir is not None:
        config = dataclasses.replace(config, data_dir=data_dir)
    dev = resolve_device(device)
    try:
        data = build_datasets(config.dataset, config.data_dir, val_fraction=config.val_fraction, seed=config.seed,
                              download=False, augment=False, **config.dataset_options)
    except DatasetError as exc:
        raise ConfigError(str(exc)) from None
    model = build_model(config, data.info).to(dev)
    model.load_state_dict(artifact["model"])
    masks = artifact["masks"]
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if bool(params[name].detach()[~mask.to(dev)].any()):
            raise ConfigError(f"{path}: weights outside the saved mask of {name} are non-zero")
    result = evaluate(model, data.test, config, dev, Dist())
    total = sum(m.numel() for m in masks.values())
    active = sum(int(m.sum()) for m in masks.values())
    return {"run": str(run_dir), "test_accuracy": result["accuracy"], "test_loss": result["loss"],
            "density": active / total, "sparsity": 1 - active / total, "epoch": artifact["epoch"]}


__all__ = ["TrainConfig", "ConfigError", "train", "evaluate_run", "load_config"]
