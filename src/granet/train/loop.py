"""The training loop: a :class:`Trainer` builds a run from its config and trains it epoch by epoch.

One optimizer step reads top-down in :meth:`Trainer.optimizer_step`: forward and backward over the
accumulation micro-batches, ``optimizer.step()``, FLOPs ledger, ``sparsifier.step()`` (re-zero pruned
weights, update the topology every ΔT), LR schedule. At the end of each epoch: validation, then the
checkpoint (:meth:`Trainer.state_dict`), the selected model and the metrics line, in that order (see
:mod:`granet.rundir`).

The trainer takes a checked :class:`~granet.train.config.TrainConfig` and resolves its sparsity
options once, when the run's length is known, into the :class:`~granet.sparsity.config.SparsityConfig` the
sparsifier is built from; ``trainer.config`` then records the resolved values.

Honest evaluation: the validation split (held out from the official training split) selects the
model; only epochs at which the sparsity schedule has reached its final density are eligible, so a
denser intermediate network can never be picked. The test split is evaluated once, on the selected
model.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import typing
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import torch
from torch import nn

from .. import __version__
from ..accounting.flops import TrainingFlopsLedger, layer_flops, scoring_flops
from ..baselines.saliency import needs_init_scoring, require_scoring_before_training
from ..errors import CheckpointError, ConfigError, short_text
from ..methods import resolve_method
from ..rundir import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    MODEL_FILE,
    EpochRecord,
    append_metrics,
    atomic_write,
    kept_checkpoint_name,
    write_metrics,
    write_status,
)
from ..sparsity.sparsifier import Sparsifier
from . import fsdp, runtime
from .checkpoint import (
    FORMAT,
    Progress,
    capture_rng,
    load_file,
    load_model_state,
    read_checkpoint,
    restore_rng,
    save_file,
)
from .config import TrainConfig
from .parts import build_model, dataset_size, evaluate, load_data

logger = logging.getLogger(__name__)


def metrics_text(train: Mapping[str, float], val: Optional[Mapping[str, float]]) -> str:
    """``train loss L acc A | val loss L acc A`` (no validation part without ``val``), as the epoch lines
    of the run log print an epoch's results."""
    text = f"train loss {train['loss']:.4f} acc {train['accuracy']:.4f}"
    return text if val is None else f"{text} | val loss {val['loss']:.4f} acc {val['accuracy']:.4f}"


class Trainer:
    """Builds everything for a config and runs (or resumes) it. See :func:`granet.train.train`."""

    def __init__(self, config: TrainConfig, out_dir: Path, guard: Optional[runtime.SignalGuard] = None) -> None:
        self.config = config
        self.out = out_dir
        self.guard = guard or runtime.SignalGuard()
        optim, machine = config.optim, config.machine
        self.device = runtime.resolve_device(machine.device)
        self.dist = runtime.setup_distributed(self.device, machine.dist_timeout)
        if optim.batch_size % (self.dist.world_size * optim.accumulation_steps):
            raise ConfigError(
                f"batch_size {optim.batch_size} (global) must be divisible by world size "
                f"{self.dist.world_size} x accumulation_steps {optim.accumulation_steps}"
            )
        self.micro_batch = optim.batch_size // (self.dist.world_size * optim.accumulation_steps)
        runtime.seed_everything(config.seed)
        self.data = load_data(config, download=config.data.download and self.dist.is_main, augment=config.data.augment)
        self.model = build_model(config, self.data.info).to(self.device)
        self.amp = runtime.amp_mode(machine.amp, self.device)
        if machine.channels_last == "on" and self.data.info.input_dims != 2:
            raise ConfigError(f"channels_last on: dataset {config.data.dataset!r} holds 1-D signals; the channels-last "
                              f"layout is for images (use auto or off)")
        self.channels_last = self.data.info.input_dims == 2 and (
            machine.channels_last == "on" or (machine.channels_last == "auto" and self.device.type == "cuda"))
        if self.channels_last:
            # torch's type stubs lack Module.to's memory_format keyword
            self.model = typing.cast(Any, self.model).to(memory_format=torch.channels_last)
        info = self.data.info
        example = torch.zeros(1, *info.input_shape, device=self.device)
        self.fsdp = machine.fsdp
        if self.fsdp:  # shard before the optimizer and sparsifier are built: they must see the shards
            self._shard(example)
        self.optimizer = runtime.build_optimizer(optim, self.model)
        if self.fsdp:  # BatchNorm statistics as under DDP (rank 0's before each step's first forward)
            fsdp.broadcast_buffers_like_ddp(self.model, self.optimizer)
        train_size = dataset_size(self.data.train)
        self.steps_per_epoch = train_size // optim.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"batch_size {optim.batch_size} is larger than the training set ({train_size})")
        self.total_steps = optim.epochs * self.steps_per_epoch
        if optim.max_steps is not None:
            self.total_steps = min(self.total_steps, optim.max_steps)
        init_from = Path(config.init_from) if config.init_from else None
        start = self._read_init_from(init_from) if init_from is not None else None
        # From here on the config holds the values the sparsifier uses (written to config.yaml and
        # every checkpoint), so a resume is checked against what actually ran.
        self.sparsifier = self._build_sparsifier(start)
        self._layer_density = self.sparsifier.layer_density()  # what the next forward pass runs at (FLOPs)
        # FLOPs of every layer from one real forward pass; the ledger then follows the real masks.
        if not self.fsdp:
            self.layer_flops = layer_flops(self.model, example)
        self.ledger = TrainingFlopsLedger(self.layer_flops)
        self.execution: Optional[Any] = None
        if machine.execution != "dense":  # after layer_flops: a sparse layer's FLOPs are not counted by the hooks
            from ..sparsity.execution import SparseExecution

            self.execution = SparseExecution(self.model, self.sparsifier, mode=machine.execution)  # logs its plan
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: runtime.lr_factor(optim, self.schedule_position(s), self.steps_per_epoch, self.total_steps),
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.ddp_model = self._wrap_ddp()
        self.criterion = nn.CrossEntropyLoss(label_smoothing=optim.label_smoothing)
        self.progress = Progress()
        self.updates: list[dict[str, Any]] = []
        self.checkpoint_epoch: Optional[int] = None  # epoch of the last checkpoint on disk
        self.tensorboard: Any = None
        if config.output.tensorboard and self.dist.is_main:
            from .tensorboard import TensorBoardWriter

            self.tensorboard = TensorBoardWriter(self.out / "tensorboard", enabled=True)
        if init_from is not None and start is not None:  # continuing another run
            self._load_training_state(start, init_from)
            self.progress = Progress(epoch=start["progress"]["epoch"], step=start["progress"]["step"])
            self.sparsifier.apply_masks()  # the new method's masks on the other run's weights
        beyond = [e for e in config.output.keep_checkpoints if e > self.planned_epochs()]
        if beyond:
            raise ConfigError(f"keep_checkpoints {short_text(str(beyond))}: the run has {self.planned_epochs()} "
                              f"epochs, so no checkpoint of those epochs would ever be written")

    def _shard(self, example: torch.Tensor) -> None:
        """FSDP2: refuse what it cannot do, count FLOPs on the full model (by shapes), then shard it."""
        fsdp.check_fsdp(self.dist.world_size, self.amp, self.config.method)
        self.layer_flops = layer_flops(self.model, example)
        self.model = fsdp.shard_model(self.model)

    def _build_sparsifier(self, start: Optional[Mapping[str, Any]]) -> Sparsifier:
        """The run's sparsifier, from its sparsity options resolved once; records the resolved values."""
        # Continuing another run: the sparsity schedule counts from the restart (its step 1 is the
        # first step after the checkpoint) and spans the remaining steps.
        done = start["progress"]["step"] if start else 0
        sparse_steps = self.total_steps - done
        if sparse_steps < 1:
            raise ConfigError(f"{self.config.init_from} is already at step {done}: nothing left to train")
        cfg = self.config
        try:
            # The method's preset with the run's options, its steps resolved now that the run's length
            # is known: the one SparsityConfig of the run. Its values are recorded in config.yaml and
            # every checkpoint, so a resumed run builds exactly the same sparsifier.
            sparsity = resolve_method(cfg.method, total_steps=sparse_steps, seed=cfg.seed,
                                      **cfg.sparsity_options()).explicit()
            sparsifier = Sparsifier(self.model, self.optimizer, sparsity)
        except ValueError as exc:
            raise ConfigError(f"{exc} (this run has {sparse_steps} optimizer steps)") from None
        if needs_init_scoring(cfg.method):  # a scored method must not train before its mask is installed
            require_scoring_before_training(sparsifier, self.optimizer)
        self.config = cfg.with_sparsity(sparsity.config)
        return sparsifier

    # -------------------------------------------------------------- hooks (the lottery-ticket trainer overrides them)

    def schedule_position(self, scheduler_steps: int) -> int:
        """The step of the LR schedule after ``scheduler_steps`` scheduler steps (one per optimizer step)."""
        return scheduler_steps

    def training_left(self) -> bool:
        """Whether another epoch is to be trained."""
        return self.progress.step < self.total_steps

    def epoch_finished(self) -> bool:
        """Whether the epoch being trained ends before the next batch (the run's last step reached)."""
        return self.progress.step >= self.total_steps

    def data_position(self) -> tuple[int, int]:
        """(epoch of the data order, optimizer steps of it already trained) for the next epoch."""
        return self.progress.epoch, 0

    def after_selection(self, train: dict[str, float], val: Optional[dict[str, float]]) -> None:
        """Called at the end of an epoch after model selection, before anything is written."""

    def extra_state(self) -> dict[str, Any]:
        """Entries added to the checkpoint (see :meth:`state_dict`)."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`extra_state` added (the checkpoint's other entries are already loaded)."""

    def summary_overrides(self) -> dict[str, Any]:
        """:class:`~granet.rundir.RunSummary` fields that differ from the single-run defaults."""
        return {}

    def _wrap_ddp(self) -> nn.Module:
        if self.dist.world_size == 1 or self.fsdp:
            return self.model
        ddp = nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
        )
        # DDP regroups its gradient buckets after the first backward pass, and an all-reduce over
        # 3+ ranks sums each element in an order that depends on its position in the bucket. One
        # backward pass here (eval mode: no BatchNorm statistics change, no dropout draws) makes every
        # training step — the first one of a resumed run too — use the regrouped buckets.
        was_training = self.model.training
        self.model.eval()
        info = self.data.info
        x = torch.zeros(1, *info.input_shape, device=self.device)
        ddp(x).float().sum().backward()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.train(was_training)
        return ddp

    def _read_init_from(self, path: Path) -> dict[str, Any]:
        """Load the checkpoint ``init_from`` and check that it belongs to a compatible run."""
        state = read_checkpoint(path, map_location=self.device)
        theirs, ours = state.get("config", {}), self.config.to_dict()
        keys = ("model", "dataset", "epochs", "batch_size", "optimizer", "lr_schedule", "milestones", "dataset_options")
        differing = [k for k in keys if theirs.get(k) != ours[k]]
        if differing:
            raise ConfigError(
                f"init_from {path}: its run differs in {', '.join(differing)}; they must match to continue it")
        return state

    def score_at_init(self) -> None:
        """SNIP / GraSP / SynFlow: score the initial weights on the run's first training batches and
        fix the mask (a fresh start only; a resumed run restores the scored mask)."""
        from ..baselines.saliency import needs_init_scoring, prune_at_init

        if not needs_init_scoring(self.config.method):
            return
        batches = []
        for x, y in self._batches():
            batches.append((x.to(self.device), y.to(self.device)))
            if len(batches) == self.config.score_batches:
                break
        prune_at_init(self.sparsifier, self.model, batches, loss_fn=self.criterion)
        self._layer_density = self.sparsifier.layer_density()
        # Scoring is dense work before training: every process scores (its own batches, or SynFlow's
        # all-ones input); the ledger counts FLOPs per example of a global training batch.
        examples = sum(int(x.shape[0]) for x, _ in batches)
        cost = scoring_flops(self.config.method, self.layer_flops, examples) * self.dist.world_size
        self.ledger.record_extra(cost / self.config.optim.batch_size, "scoring")
        scored = "data-free" if self.config.method == "synflow" else f"{len(batches)} training batch(es)"
        logger.info("%s: scored at initialisation (%s); mask fixed at density %.4f",
                    self.config.method, scored, self.sparsifier.density())

    # -------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Everything that determines the rest of the run, as one plain dict: the checkpoint.

        Under FSDP the model and optimizer entries are full state dicts gathered to rank 0 (a
        collective: every rank calls this), in the single-process format; other ranks get ``{}`` there.
        """
        return {
            "format": FORMAT,
            "granet_version": __version__,
            "config": self.config.to_dict(),
            "progress": self.progress.to_dict(),
            "model": fsdp.full_model_state(self.model) if self.fsdp else self.model.state_dict(),
            "optimizer": (fsdp.full_optimizer_state(self.model, self.optimizer) if self.fsdp
                          else self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sparsifier": self.sparsifier.state_dict(),
            "flops": self.ledger.state_dict(),
            "rng": capture_rng(),
            **self.extra_state(),  # e.g. the lottery ticket's rounds, rewind point and history
        }

    def load_state_dict(self, state: Mapping[str, Any], source: Union[str, Path] = "the checkpoint") -> None:
        """Continue exactly where :meth:`state_dict` of this run's trainer left off.

        One order, because each step depends on the previous one: model weights → optimizer → LR
        schedule → GradScaler → sparsifier (whose saved masks are applied to the *loaded* weights:
        applying a fresh run's masks first would zero every weight regrown since the start) → FLOPs
        ledger → progress → :meth:`load_extra_state` → RNG state (last, after everything that may draw
        random numbers).

        Raises:
            CheckpointError: a part does not fit this run; the message names ``source`` (the file).
        """
        self._load_training_state(state, source)
        try:
            self.sparsifier.load_state_dict(state["sparsifier"])
            self.ledger.load_state_dict(state["flops"])
            self.progress = Progress.from_dict(state["progress"])
            self.load_extra_state(state)
            restore_rng(state["rng"])
            self._layer_density = self.sparsifier.layer_density()
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
            detail = short_text(" ".join(str(exc).split()) or type(exc).__name__, 300)
            raise CheckpointError(f"{source}: sparsifier or run state does not fit this run ({detail})") from None

    def _load_training_state(self, state: Mapping[str, Any], source: Union[str, Path]) -> None:
        """Model, optimizer, LR schedule and scaler from ``state`` (this run's or, for ``init_from``,
        another run's)."""
        load_model_state(self.model, state["model"], Path(source), sharded=self.fsdp)
        try:
            if self.fsdp:
                fsdp.load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
            else:
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
            detail = short_text(" ".join(str(exc).split()) or type(exc).__name__, 300)
            raise CheckpointError(f"{source}: optimizer or schedule state does not fit this run ({detail})") from None

    def resume(self, state: Mapping[str, Any]) -> None:
        """Continue from this run's checkpoint; completes the writes that a crash may have cut short
        (metrics lines, the selected model, the kept copy of the checkpoint)."""
        self.load_state_dict(state, self.out / CHECKPOINT_FILE)
        self.checkpoint_epoch = self.progress.epoch
        rewrite = self.progress.best_epoch == self.progress.epoch  # a crash may have come before model.pt
        artifact = self.model_artifact() if rewrite and self._gathers() else None
        if self.dist.is_main:  # rank 0 owns every file of the run
            write_metrics(self.out / METRICS_FILE, self.progress.history)
            with self.guard.protect():
                if rewrite:
                    save_file(artifact, self.out / MODEL_FILE)
                if not (self.out / kept_checkpoint_name(self.progress.epoch)).exists():
                    self._keep_checkpoint()

    def _keep_checkpoint(self) -> None:
        """Copy ``checkpoint.pt`` to ``checkpoint_epoch<N>.pt`` when ``keep_checkpoints`` asks for epoch N."""
        epoch = self.progress.epoch
        if epoch in self.config.output.keep_checkpoints:
            with open(self.out / CHECKPOINT_FILE, "rb") as src:
                atomic_write(self.out / kept_checkpoint_name(epoch), lambda fh: shutil.copyfileobj(src, fh))

    def write_status(self, state: str) -> None:
        """``status.json``: the run's state, its epoch, the epoch on disk and the process id (rank 0)."""
        write_status(self.out, state, epoch=self.progress.epoch, checkpoint_epoch=self.checkpoint_epoch,
                     pid=os.getpid())

    # -------------------------------------------------------------- steps and epochs

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, done = self.data_position()
        accum = self.config.optim.accumulation_steps
        order = runtime.epoch_order(dataset_size(self.data.train), self.config.seed, epoch, self.dist)
        usable = self.steps_per_epoch * accum * self.micro_batch
        order = order[:usable]  # drop the ragged tail: every optimizer step sees a full global batch
        order = order[done * accum * self.micro_batch:]  # steps already trained
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(self.data.train, order), batch_size=self.micro_batch, shuffle=False,
            num_workers=self.config.machine.workers, pin_memory=self.device.type == "cuda", drop_last=True,
            generator=torch.Generator().manual_seed(self.config.seed * 7919 + epoch),
            persistent_workers=False,
        )
        yield from loader

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor, sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # DDP all-reduces only on the last micro-batch; FSDP reduce-scatters every micro-batch's
        # gradients (no no_sync): the same sums, more traffic.
        ddp = self.ddp_model
        no_sync = (ddp.no_sync() if not sync and isinstance(ddp, nn.parallel.DistributedDataParallel)
                   else contextlib.nullcontext())
        with no_sync:
            with runtime.autocast(self.device, self.amp):
                out = self.ddp_model(x)
                loss = self.criterion(out, y)
            self.scaler.scale(loss / self.config.optim.accumulation_steps).backward()
        return loss.detach(), (out.argmax(1) == y).sum()

    def optimizer_step(self) -> None:
        """Optimizer, FLOPs ledger, sparsifier and LR schedule after the step's backward passes."""
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # This step's forward/backward ran on the masks from before its update (RigL accounting).
        dense_gradient = self.sparsifier.needs_dense_gradient(self.sparsifier.step_count + 1)
        self.ledger.record(self._layer_density, dense_gradient=dense_gradient)
        report = self.sparsifier.step()
        if report is not None:
            self._layer_density = self.sparsifier.layer_density()
            self.updates.append({"pruned": report.pruned, "regrown": report.regrown})
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.progress.step += 1

    def train_epoch(self, bar: Any) -> dict[str, float]:
        """One pass over this rank's share of the training set."""
        self.ddp_model.train()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, count
        accum = self.config.optim.accumulation_steps
        for micro, (x, y) in enumerate(self._batches()):
            if self.epoch_finished():
                break
            last_micro = (micro + 1) % accum == 0
            loss, correct = self._forward_backward(x, y, sync=last_micro)
            sums[0] += loss.float() * y.numel()
            sums[1] += correct
            sums[2] += y.numel()
            if not last_micro:
                continue
            self.optimizer_step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss):.3f}", density=f"{self.sparsifier.density():.4f}")
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(sums)
        count = max(1.0, float(sums[2]))
        return {"loss": float(sums[0]) / count, "accuracy": float(sums[1]) / count}

    def planned_steps(self) -> int:
        """Optimizer steps of the whole run."""
        return self.total_steps

    def planned_epochs(self) -> int:
        """Epochs of the whole run (the last may be partial when ``max_steps`` ends it)."""
        return -(-self.total_steps // self.steps_per_epoch)

    def at_final_density(self) -> bool:
        """Whether the sparsity schedule has reached its final density (model selection is allowed)."""
        return self.sparsifier.reached_final_density

    def run(self) -> None:
        """Train to the end, from wherever the checkpoint left off."""
        cfg = self.config
        bar = None
        redirect: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if runtime.progress_enabled(cfg.output.progress, self.dist):
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            bar = tqdm(total=self.planned_steps(), initial=self.progress.step, unit="step", dynamic_ncols=True,
                       leave=False)
            # While the bar is drawn, console log records go through tqdm.write, which clears the bar,
            # writes the line and draws the bar again below it: a log line never shares a line with it.
            redirect = logging_redirect_tqdm(tqdm_class=tqdm)
        with redirect:
            logger.info(
                "%s | %s on %s | density %.4g | %d epochs x %d steps = %d steps | global batch %d | %s, %d process(es)",
                cfg.method, cfg.model, cfg.data.dataset, self.sparsifier.config.density, cfg.optim.epochs,
                self.steps_per_epoch, self.total_steps, cfg.optim.batch_size, self.device, self.dist.world_size,
            )
            try:
                while self.training_left():
                    start = time.perf_counter()
                    self.updates = []
                    train = self.train_epoch(bar)
                    self.progress.epoch += 1
                    val = None
                    if self.data.val is not None and dataset_size(self.data.val) > 0:
                        val = evaluate(self.model, self.data.val, cfg, self.device, self.dist, self.channels_last,
                                       lockstep=self.fsdp)
                    self.progress.wall_time += time.perf_counter() - start
                    self.end_epoch(train, val)
            finally:
                if bar is not None:
                    bar.close()
                if self.tensorboard is not None:
                    self.tensorboard.close()

    def epoch_record(self, train: dict[str, float], val: Optional[dict[str, float]]) -> EpochRecord:
        """The metrics line of the epoch that just ended, with the network's health check (which
        logs a condition once, the first time it is found; :mod:`granet.sparsity.health`)."""
        health = self.sparsifier.check_health(loss=train["loss"], classes=self.data.info.num_classes)
        stats = self.sparsifier.stats()
        return EpochRecord(
            epoch=self.progress.epoch, step=self.progress.step, lr=self.optimizer.param_groups[0]["lr"],
            train_loss=train["loss"], train_accuracy=train["accuracy"],
            val_loss=None if val is None else val["loss"], val_accuracy=None if val is None else val["accuracy"],
            density=stats["density"], sparsity=stats["sparsity"], exploration_rate=stats["exploration_rate"],
            train_flops=self.ledger.relative, topology_updates=len(self.updates),
            pruned=sum(u["pruned"] for u in self.updates), regrown=sum(u["regrown"] for u in self.updates),
            time_s=self.progress.wall_time, health={k: v for k, v in health.to_dict().items() if k != "step"},
        )

    def end_epoch(self, train: dict[str, float], val: Optional[dict[str, float]]) -> None:
        """Select, then write checkpoint → model.pt → metrics line (each atomic; see granet.rundir)."""
        p = self.progress
        record = self.epoch_record(train, val)
        p.history.append(record)
        selected = self.at_final_density() and (
            val is None or p.best_val_accuracy is None or val["accuracy"] > p.best_val_accuracy)
        if selected:  # without a validation split the last eligible epoch is selected
            p.best_val_accuracy, p.best_epoch = (None if val is None else val["accuracy"]), p.epoch
        self.after_selection(train, val)
        # Under FSDP gathering the full state is a collective: every rank builds it, rank 0 writes it.
        checkpoint = self.state_dict() if self._gathers() else None
        artifact = self.model_artifact() if selected and self._gathers() else None
        if self.dist.is_main:
            with self.guard.protect():
                save_file(checkpoint, self.out / CHECKPOINT_FILE)
                self.checkpoint_epoch = p.epoch
                if selected:
                    save_file(artifact, self.out / MODEL_FILE)
                append_metrics(self.out / METRICS_FILE, record)
                if self.tensorboard is not None:
                    self.tensorboard.log_epoch(record.to_dict(), step=record.step,
                                               layer_density=self.sparsifier.layer_density())
                self._keep_checkpoint()
                self.write_status("running")
            logger.info("epoch %d/%d step %d | %s | density %.4f | lr %.4g | %.1fs", p.epoch, self.planned_epochs(),
                        p.step, metrics_text(train, val), record.density, record.lr, p.wall_time)

    def _gathers(self) -> bool:
        """Whether this rank builds the full checkpoint / model file (rank 0; every rank under FSDP)."""
        return self.dist.is_main or self.fsdp

    def model_artifact(self) -> dict[str, Any]:
        """``model.pt``: the selected model with its masks and config (a collective under FSDP)."""
        return {
            "config": self.config.to_dict(),
            "epoch": self.progress.epoch,
            "step": self.progress.step,
            "model": fsdp.full_model_state(self.model) if self.fsdp else self.model.state_dict(),
            "masks": self.sparsifier.state_dict()["masks"],
            "layer_density": self.sparsifier.layer_density(),
        }

    def test_selected(self) -> tuple[dict[str, Any], dict[str, float]]:
        """Evaluate the selected model (``model.pt``) once on the test split."""
        if self.progress.best_epoch is None:  # the run ended before the final density was reached
            logger.warning("training ended before the final density was reached; testing the last model")
            self.progress.best_epoch = self.progress.epoch
            artifact = self.model_artifact() if self._gathers() else None
            if self.dist.is_main:
                with self.guard.protect():
                    save_file(artifact, self.out / MODEL_FILE)
        if self.dist.world_size > 1:
            torch.distributed.barrier()
        artifact = load_file(self.out / MODEL_FILE, "model file", map_location=self.device)
        selected = build_model(self.config, self.data.info).to(self.device)
        selected.load_state_dict(artifact["model"])
        return artifact, evaluate(selected, self.data.test, self.config, self.device, self.dist)


__all__ = ["Trainer", "evaluate", "build_model", "load_data", "metrics_text"]
