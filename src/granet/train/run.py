"""Running a training run end to end: ``train(config)`` and ``evaluate_run(run_dir)``.

:func:`train` owns the run directory (see :mod:`granet.rundir`): it refuses to reuse a directory
that holds another run, writes the resolved ``config.yaml``, keeps ``status.json`` current, turns
SIGINT/SIGTERM into a clean stop that leaves the last checkpoint loadable, and writes
``summary.json`` after testing the selected model once. A run that fails before its first
checkpoint leaves no trace: the directories it created are removed again (see :func:`train`).
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import yaml

from ..accounting.flops import inference_flops, inference_flops_relative
from ..errors import CheckpointError, ConfigError, Interrupted, PeerFailure, RunDirError, short_text
from ..kernels import native
from ..rundir import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    COVERAGE_FILE,
    KEPT_CHECKPOINT,
    LOCK_FILE,
    METRICS_FILE,
    MODEL_FILE,
    STATUS_FILE,
    SUMMARY_FILE,
    RunLock,
    RunSummary,
    atomic_write_text,
    prepare_run_dir,
    remove_temporary_files,
    run_files_in,
    write_status,
)
from .checkpoint import checkpointed_epoch, load_file, read_checkpoint
from .config import (
    LTH_KEYS,
    SPARSITY_KEYS,
    TrainConfig,
    check_resume_compatible,
    flat_values,
    read_yaml_mapping,
    resume_config,
)
from .loop import Trainer
from .lottery_run import LotteryTrainer
from .parts import build_model, evaluate, load_data
from .runtime import Dist, SignalGuard, intra_op_threads, resolve_device

logger = logging.getLogger(__name__)


def default_out_dir(config: TrainConfig) -> Path:
    """``runs/<dataset>-<model>-<method>-d<density>-s<seed>``."""
    name = f"{config.data.dataset}-{config.model}-{config.method}-d{config.effective_density:g}-s{config.seed}"
    return Path("runs") / name


def resume_point(run_dir: str, overrides: Mapping[str, Any]) -> tuple[TrainConfig, Optional[dict[str, Any]]]:
    """The config to continue ``run_dir`` with, and its checkpoint (``None`` before the first one).

    Pass both to :func:`train` (``train(config, checkpoint=state)``) so the checkpoint is read once.

    Raises:
        ConfigError: no run there, ``config.yaml`` was edited after the run started, or an override
            would change the result.
        CheckpointError: the checkpoint is unreadable or refused.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise ConfigError(f"cannot resume from {root}: no such directory")
    overrides = dict(overrides, resume=str(root))
    on_disk = read_yaml_mapping(str(root / CONFIG_FILE)) if (root / CONFIG_FILE).is_file() else None
    if (root / CHECKPOINT_FILE).is_file():
        state = read_checkpoint(root / CHECKPOINT_FILE)
        saved = state["config"]
        if on_disk is not None:
            try:
                check_resume_compatible(saved, flat_values(on_disk), "the checkpoint")
            except ConfigError as exc:
                raise ConfigError(f"{root / CONFIG_FILE} was changed after the run started; resuming uses the "
                                  f"config stored in the checkpoint, so restore the file or start a new run "
                                  f"({str(exc).split('(', 1)[-1]}") from None
        return resume_config(saved, overrides, "the checkpoint"), state
    if on_disk is None:
        raise ConfigError(f"cannot resume from {root}: it holds neither {CHECKPOINT_FILE} nor {CONFIG_FILE}")
    return resume_config(on_disk, overrides, CONFIG_FILE), None  # train() refuses it if it holds results


def check_restartable(root: Path) -> None:
    """Refuse to start a run again from its beginning when its directory holds results.

    A run interrupted before its first checkpoint has nothing to lose and starts again; a run whose
    ``checkpoint.pt`` is gone but which holds results (a selected model, a summary, metrics lines,
    kept checkpoints) would lose them.

    Raises:
        RunDirError: results are present (named), with what to do instead.
    """
    results = [name for name in run_files_in(root)
               if name in (MODEL_FILE, SUMMARY_FILE) or KEPT_CHECKPOINT.fullmatch(name)]
    metrics = root / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size > 0:
        results.insert(0, METRICS_FILE)
    if results:
        kept = [n for n in results if KEPT_CHECKPOINT.fullmatch(n)]
        hint = (f"copy a kept checkpoint ({kept[-1]}) to {CHECKPOINT_FILE} to continue from it, "
                if kept else "")
        raise RunDirError(
            f"cannot resume {root}: it has no {CHECKPOINT_FILE} to continue from, but holds results "
            f"({', '.join(results)}) that starting again would delete; {hint}evaluate it with "
            f"`granet evaluate {root}`, or train it again from the beginning with --overwrite"
        )


def train(config: TrainConfig, checkpoint: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Run (or, with ``config.resume``, continue) a training run and return its summary.

    The run uses ``config.threads`` torch intra-op threads (``None``: the process's current count; on
    a resume, the count the run was started with) and gives the process its previous count back when
    it ends, also on an error. Every rank of a ``torchrun`` job sets the same count. The count in
    effect is recorded in ``config.yaml``, the checkpoints and ``summary.json``: float sums, and so
    the results, are bit-reproducible only at the same thread count.

    Args:
        config: the run's checked :class:`TrainConfig` (from :meth:`TrainConfig.from_dict`,
            :func:`~granet.train.load_config` or :func:`resume_point`); it is not checked again.
        checkpoint: the run's checkpoint when already read (see :func:`resume_point`); by default
            a resume reads ``checkpoint.pt`` from ``config.output.resume``.

    A new run that fails (any error but an interruption, which says how to resume) before its first
    checkpoint was written removes what it wrote (``config.yaml``, the empty ``metrics.jsonl``,
    ``coverage.json``, ``status.json``, its TensorBoard event file) and the directories it created
    (the run directory and any parents, ``runs/`` included), so a failed start leaves no empty
    directory behind. A directory that existed before, or holds anything else, stays.
    """
    resume, given_out = config.output.resume, config.output.out
    resuming = resume is not None
    out = Path(resume) if resume is not None else Path(given_out) if given_out else default_out_dir(config)
    if checkpoint is not None and not resuming:
        raise ConfigError("train(): a checkpoint was given but config.resume is not set")
    if resuming and not out.is_dir():
        raise ConfigError(f"cannot resume from {out}: no such directory")
    # Rank 0 owns the run directory: it holds the directory's lock from before its files are looked
    # at until the run has ended, so two runs can never write one directory.
    main_rank = int(os.environ.get("RANK", "0")) == 0
    created = _missing_directories(out) if main_rank and not resuming else []
    try:
        with RunLock(out) if main_rank else contextlib.nullcontext():
            state = checkpoint
            if state is None and resuming and (out / CHECKPOINT_FILE).is_file():
                state = read_checkpoint(out / CHECKPOINT_FILE)
            if state is not None:
                config = _resumed_config(config, state["config"])
            if main_rank:
                _prepare(out, config, state)
            try:
                with intra_op_threads(config.machine.threads) as threads:
                    return _run(config.with_run_values(threads=threads), out, state)
            except BaseException as exc:
                if created and not isinstance(exc, KeyboardInterrupt):  # an interruption says how to resume
                    with contextlib.suppress(OSError):  # never hide the error that ended the run
                        _discard_failed_start(out)
                raise
    except BaseException:
        # The lock has removed the run directory if it is empty; its new parents go the same way.
        for directory in created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # fails, as it should, unless the directory is empty
        raise


def _missing_directories(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first (what creating it creates)."""
    missing = []
    for directory in (path, *path.parents):
        if directory.exists() or directory.is_symlink():
            break
        missing.append(directory)
    return missing


#: What a new run writes before its first checkpoint: nothing of it can be resumed, reported or evaluated.
_BEFORE_FIRST_CHECKPOINT = (CONFIG_FILE, METRICS_FILE, COVERAGE_FILE, STATUS_FILE)


def _discard_failed_start(out: Path) -> None:
    """Empty ``out``, a directory this run created, when the run failed before its first checkpoint
    and the directory holds nothing but what the run wrote (then the run's lock removes it).

    A run that got further (a checkpoint, a metrics line) keeps everything, and so does a directory
    that holds anything else (a file some user put there): nothing is removed then.
    """
    events = out / "tensorboard"
    event_files = sorted(events.glob("events.out.tfevents.*")) if events.is_dir() else []
    written = {*_BEFORE_FIRST_CHECKPOINT, LOCK_FILE, *(["tensorboard"] if events.is_dir() else [])}
    foreign = [p.name for p in out.iterdir() if p.name not in written and p.suffix != ".tmp"]
    if events.is_dir() and len(event_files) != len(list(events.iterdir())):
        foreign.append("tensorboard")
    metrics = out / METRICS_FILE
    if foreign or (metrics.is_file() and metrics.stat().st_size > 0):
        return
    removed = [name for name in _BEFORE_FIRST_CHECKPOINT if (out / name).is_file()]
    for name in removed:
        (out / name).unlink()
    remove_temporary_files(out)
    for event_file in event_files:  # the TensorBoard writer's file: no epoch was logged yet
        event_file.unlink()
    if events.is_dir():
        events.rmdir()
    if removed:
        logger.info("%s: the run failed before its first checkpoint; removed what it wrote (%s)",
                    out, ", ".join(removed))


def _prepare(out: Path, config: TrainConfig, state: Optional[dict[str, Any]]) -> None:
    """Make ``out`` ready for the run (rank 0, under the run's lock)."""
    if state is not None:  # continuing: complete what a kill may have left half done
        removed = remove_temporary_files(out)
        if removed:
            logger.info("%s: removed %s left by an interrupted write", out, ", ".join(removed))
        return
    resuming = config.output.resume is not None
    if resuming:
        if not (out / CONFIG_FILE).is_file():
            raise ConfigError(f"cannot resume from {out}: it holds neither {CHECKPOINT_FILE} nor {CONFIG_FILE}")
        check_restartable(out)
        logger.info("%s has no checkpoint yet: starting the run again from the beginning", out)
    prepare_run_dir(out, overwrite=config.output.overwrite or resuming)


def _resumed_config(config: TrainConfig, saved: Mapping[str, Any]) -> TrainConfig:
    """``config`` with the keys it leaves unset taken from the checkpoint's ``saved`` config, checked against it."""
    # Sparsity keys left unset (None = the method's preset) take the values the run resolved them to;
    # an unset thread count takes the run's own, so a plain resume continues bit-exactly. A config
    # from resume_point already holds them all: then it is only compared.
    keys = ("density", *SPARSITY_KEYS, *LTH_KEYS, "threads")
    current = config.to_dict()
    unset = {k: saved[k] for k in keys if current[k] is None and saved.get(k) is not None}
    if unset:
        config = config.with_run_values(**unset)
    check_resume_compatible(saved, config.to_dict(), "the checkpoint")
    threads, saved_threads = config.machine.threads, saved.get("threads")
    if saved_threads is not None and threads != saved_threads:
        logger.warning("threads: the run so far used %d torch thread(s), it continues with %d; float sums change "
                       "order, so the result will not be bit-identical to an uninterrupted run",
                       saved_threads, threads)
    return config


def _run(config: TrainConfig, out: Path, state: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Train (or continue) the run in ``out`` with a checked config; see :func:`train`."""
    guard = SignalGuard()
    trainer: Optional[Trainer] = None
    started = False  # whether this process got the run under way (and so owns how it ends)
    with guard.installed():
        try:
            trainer = (LotteryTrainer if config.method == "lth" else Trainer)(config, out, guard)
            if state is not None:
                trainer.resume(state)
                logger.info("resumed %s at epoch %d, step %d", out, trainer.progress.epoch, trainer.progress.step)
            elif not config.init_from:
                trainer.score_at_init()
            if state is None and trainer.dist.is_main:
                atomic_write_text(out / METRICS_FILE, "")
                resolved = dict(trainer.config.to_dict(), out=str(out), resume=None, overwrite=False)
                atomic_write_text(out / CONFIG_FILE, yaml.safe_dump(resolved, sort_keys=False))
                coverage = trainer.sparsifier.coverage()
                logger.info("what is sparse:\n%s", coverage.table())  # its summary line was logged at build
                atomic_write_text(out / COVERAGE_FILE, _json(coverage.to_dict()))
            if trainer.dist.is_main:
                trainer.write_status("running")
            started = True
            trainer.run()
            summary = _finish(trainer)
        except BaseException as exc:
            # The run is ending: a signal now (torchrun stops the other ranks when one fails) must
            # not replace the error that ended it.
            with guard.held():
                error = _ending(exc, trainer, config, out, started)
                _teardown_process_group(clean=False)
            if error is exc:
                raise
            raise error from None
        with guard.held():
            _teardown_process_group(clean=True)
        return summary


def _ending(exc: BaseException, trainer: Optional[Trainer], config: TrainConfig, out: Path,
            started: bool) -> BaseException:
    """The error to report for ``exc``; once the run was ``started``, ``status.json`` says how it ended.

    Every rank names the epoch that is really checkpointed: rank 0 wrote it; the other ranks read it
    from ``checkpoint.pt`` where they can see the directory. A run refused before it started (a bad
    checkpoint, a bad value) leaves ``status.json`` as it was.
    """
    main_rank = trainer.dist.is_main if trainer is not None else int(os.environ.get("RANK", "0")) == 0
    epoch = trainer.checkpoint_epoch if trainer is not None and main_rank else checkpointed_epoch(out)
    error = exc
    if isinstance(exc, Interrupted):
        exc.run_dir, exc.checkpoint_epoch = str(out), epoch
        state, info = "interrupted", dict(signal=exc.signal_name, checkpoint_epoch=epoch, message=exc.message())
    else:
        if (isinstance(exc, RuntimeError) and trainer is not None and trainer.dist.world_size > 1
                and _is_peer_failure(exc)):
            where = (f"epoch {epoch} is checkpointed in {out}: continue with `granet train --resume {out}`"
                     if epoch else "no epoch was checkpointed yet")
            error = PeerFailure(
                f"rank {trainer.dist.rank}: another process of the job died or stopped responding (a collective "
                f"operation failed or waited longer than dist_timeout={config.machine.dist_timeout:g} s); {where}")
        state, info = "failed", dict(checkpoint_epoch=epoch, error=type(error).__name__,
                                     message=short_text(" ".join(str(error).split()) or type(error).__name__, 500))
    if started and (main_rank or out.is_dir()):
        # Rank 0 holds the run's lock and writes; another rank writes only when it can take the lock,
        # that is when rank 0 is gone (killed) and nobody else would say how the run ended, and the
        # directory is still there (rank 0 removes a run that failed before its first checkpoint).
        try:
            with contextlib.nullcontext() if main_rank else RunLock(out):
                write_status(out, state, epoch=epoch or 0, **info)
        except RunDirError as failed:  # e.g. the full disk that ended the run, or rank 0 alive
            if main_rank:
                logger.warning("could not record the end of the run in %s: %s", out / STATUS_FILE, failed)
    return error


_PEER_FAILURE_SIGNS = ("timed out", "timeout", "connection closed", "connection reset", "pair closure",
                       "broken pipe", "peer")


def _is_peer_failure(exc: RuntimeError) -> bool:
    """Whether a collective failed because another rank is gone (gloo/NCCL raise plain RuntimeErrors)."""
    if isinstance(exc, torch.distributed.DistError):
        return True
    text = str(exc).lower()
    return any(sign in text for sign in _PEER_FAILURE_SIGNS)


def _teardown_process_group(clean: bool) -> None:
    # Tear the process group down explicitly: left to interpreter exit, gloo can abort the process
    # after the run has finished ("terminate called without an active exception"). After a failure
    # no barrier: the other ranks may be gone.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()  # free the DDP wrapper (held in a cycle by the LR lambda) before its group
        try:
            if clean:
                torch.distributed.barrier()
        finally:
            with contextlib.suppress(RuntimeError):
                torch.distributed.destroy_process_group()


def _finish(trainer: Trainer) -> dict[str, Any]:
    """Test the selected model once; write summary.json and the final status."""
    artifact, test = trainer.test_selected()
    s, p = trainer.sparsifier, trainer.progress
    layer_density = artifact["layer_density"]
    sizes = dict(zip(s.names, s.sizes))
    active = sum(layer_density[n] * sizes[n] for n in sizes)
    cfg = trainer.config
    fields = dict(
        method=cfg.method, model=cfg.model, dataset=cfg.data.dataset, seed=cfg.seed, target_density=s.config.density,
        density=active / s.total, sparsity=1.0 - active / s.total, layer_density=layer_density,
        selected_epoch=artifact["epoch"], best_val_accuracy=p.best_val_accuracy, test_accuracy=test["accuracy"],
        test_loss=test["loss"], epochs=p.epoch, steps=p.step, wall_time_s=p.wall_time,
        exploration_rate=s.exploration_rate(), train_flops=trainer.ledger.relative,
        inference_flops=inference_flops_relative(trainer.layer_flops, layer_density),
        train_flops_total=trainer.ledger.total,
        inference_flops_total=inference_flops(trainer.layer_flops, layer_density),
        dense_inference_flops=trainer.layer_flops.dense, device=str(trainer.device), world_size=trainer.dist.world_size,
        threads=cfg.machine.threads, native_kernels=native.status(),
    )
    fields.update(trainer.summary_overrides())
    fields["extra"] = dict(fields.get("extra") or {}, health=_health_summary(trainer))
    summary = RunSummary(**fields).to_dict()
    if trainer.dist.is_main:
        atomic_write_text(trainer.out / SUMMARY_FILE, _json(summary))
        trainer.write_status("finished")
        logger.info(
            "done: test accuracy %.4f at sparsity %.4f (selected epoch %s, best val %s) in %.1fs -> %s",
            summary["test_accuracy"], summary["sparsity"], summary["selected_epoch"],
            "n/a" if summary["best_val_accuracy"] is None else f"{summary['best_val_accuracy']:.4f}",
            p.wall_time, trainer.out,
        )
    return summary


def _health_summary(trainer: Trainer) -> dict[str, Any]:
    """``summary.json``'s ``health``: every condition the run's health checks found, with the step and
    epoch it was first found, and the last check (see :mod:`granet.sparsity.health`)."""
    history = trainer.progress.history
    # The sparsifier counts steps from its own start (a run continued with init_from starts it later).
    offset = trainer.progress.step - trainer.sparsifier.step_count
    flags = {}
    for flag, step in sorted(trainer.sparsifier.health_flags.items(), key=lambda kv: kv[1]):
        epoch = next((r.epoch for r in history if r.step >= step + offset), None)  # the epoch that found it
        flags[flag] = {"step": step + offset, "epoch": epoch}
    last = trainer.sparsifier.health
    return {"healthy": not flags, "flags": flags, "last": None if last is None else last.to_dict()}


def _json(values: dict[str, Any]) -> str:
    return json.dumps(values, indent=2) + "\n"


def evaluate_run(run_dir: str, device: str = "auto", data_dir: Optional[str] = None) -> dict[str, Any]:
    """Re-evaluate a saved run's selected model on its test split; returns accuracy and sparsity."""
    path = Path(run_dir) / MODEL_FILE
    if not path.exists():
        raise ConfigError(f"{run_dir} has no {MODEL_FILE} (is it a granet run directory?)")
    artifact = load_file(path, "model file")
    missing = [k for k in ("config", "model", "masks", "epoch") if k not in artifact]
    if missing or not isinstance(artifact.get("config"), dict) or not isinstance(artifact.get("masks"), dict):
        raise CheckpointError(
            f"{path} is not a granet model file (missing or malformed {', '.join(missing) or 'entries'})")
    # The record of a finished run, read as it is: its method need not be registered in this process.
    values = dict(artifact["config"], **({} if data_dir is None else {"data_dir": data_dir}))
    config = TrainConfig.from_dict(values, check=False)
    dev = resolve_device(device)
    data = load_data(config, download=False, augment=False)
    model = build_model(config, data.info).to(dev)
    from .checkpoint import load_model_state

    load_model_state(model, artifact["model"], path)
    masks = artifact["masks"]
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params or not isinstance(mask, torch.Tensor) or mask.shape != params[name].shape:
            raise CheckpointError(f"{path}: the saved mask of {name} does not fit the model")
        if bool(params[name].detach()[~mask.to(device=dev, dtype=torch.bool)].any()):
            raise CheckpointError(f"{path}: weights outside the saved mask of {name} are non-zero")
    result = evaluate(model, data.test, config, dev, Dist())
    total = sum(m.numel() for m in masks.values())
    active = sum(int(m.sum()) for m in masks.values())
    return {"run": str(run_dir), "test_accuracy": result["accuracy"], "test_loss": result["loss"],
            "density": active / total, "sparsity": 1 - active / total, "epoch": artifact["epoch"]}


__all__ = ["train", "evaluate_run", "resume_point", "default_out_dir", "check_restartable"]
