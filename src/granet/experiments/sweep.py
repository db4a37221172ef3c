"""Run many training configurations in parallel worker processes, resumably.

Each configuration is an independent run directory. A run whose ``summary.json`` exists is read,
not retrained; one with a ``checkpoint.pt`` is resumed; one that never finished an epoch is started
again. Used by ``granet plasticity`` and ``benchmarks/compare_methods.py``.

Every run gets a fixed torch thread count (its config's ``threads``, else :func:`run_many`'s
``threads``, default 1), whether it runs in this process or in a worker: the count changes the order
of float sums, so it must not depend on how many runs go in parallel.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..train import TrainConfig, train
from ..train.config import check_threads
from ..train.run import check_restartable

logger = logging.getLogger(__name__)


def run_to_completion(config: TrainConfig) -> dict[str, Any]:
    """Train, resume, or just read the summary of a run that already finished (``config.output.out``)."""
    if config.output.out is None:
        raise ValueError("run_to_completion: the configuration needs its out directory")
    out = Path(config.output.out)
    summary = out / "summary.json"
    if summary.exists():
        result: dict[str, Any] = json.loads(summary.read_text())
        return result
    if (out / "checkpoint.pt").exists():
        return train(config.with_run_values(resume=str(out)))
    if out.exists():  # started, but no epoch finished: start over (under the run's lock; never over results)
        check_restartable(out)
        config = config.with_run_values(overwrite=True)
    return train(config)


def _worker(config: TrainConfig) -> dict[str, Any]:
    """Process-pool entry (the run sets its own thread count, see :func:`run_many`)."""
    logging.basicConfig(level=logging.WARNING)
    return run_to_completion(config)


def default_workers() -> int:
    """One worker per CPU core, at most 4."""
    return max(1, min(4, multiprocessing.cpu_count()))


def run_many(
    configs: Sequence[TrainConfig],
    workers: Optional[int] = None,
    on_done: Optional[Callable[[int, TrainConfig, dict[str, Any]], None]] = None,
    threads: int = 1,
) -> list[dict[str, Any]]:
    """Run every config (skipping finished ones) and return their summaries in order.

    Args:
        configs: training configurations, each with its own ``out`` directory.
        workers: parallel processes (default :func:`default_workers`); 1 runs in this process.
        on_done: called as ``on_done(index, config, summary)`` (the config as run) when a run finishes.
        threads: torch threads of every run whose config leaves ``threads`` unset, in this process and
            in the workers alike, so results do not depend on ``workers``. Keep ``workers × threads``
            at most the number of cores.
    """
    check_threads(threads, "run_many: threads", optional=False)
    configs = [c if c.machine.threads is not None else c.with_run_values(threads=threads) for c in configs]
    outs = [c.output.out for c in configs]
    if any(o is None for o in outs) or len(set(outs)) != len(outs):
        raise ValueError("every configuration needs its own out directory")
    done = sum((Path(o) / "summary.json").exists() for o in outs if o is not None)
    workers = workers or default_workers()
    logger.info("%d runs (%d already done), %d worker process(es), %d thread(s) per run unless its config says",
                len(configs), done, workers, threads)
    summaries: list[dict[str, Any]] = []
    if workers > 1 and len(configs) - done > 1:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers) as pool:
            for i, summary in enumerate(pool.imap(_worker, configs)):
                summaries.append(summary)
                if on_done:
                    on_done(i, configs[i], summary)
    else:
        for i, config in enumerate(configs):
            summaries.append(run_to_completion(config))
            if on_done:
                on_done(i, config, summaries[-1])
    return summaries
