"""Lottery tickets as a training run: ``granet train --method lth`` (see :mod:`granet.baselines.lottery`).

:class:`LotteryTrainer` is the :class:`~granet.train.loop.Trainer` with a
:class:`~granet.baselines.lottery.LotteryTicket` in place of the sparsifier. With ``R = lth_rounds``, the run
trains the network ``R + 1`` times over the same schedule of ``T`` steps (``epochs`` epochs, or
``max_steps``):

* round 0 trains the dense network from step 0 to ``T``; round ``r >= 1`` trains the ticket from the
  rewind step ``k = lth_rewind`` to ``T``. The LR schedule is a function of the ticket's iteration,
  so it restarts at ``k`` every round, and the data order too: iteration ``i`` of every round sees the
  batches of iteration ``i`` of round 0 (a round that starts mid-epoch starts mid-way through that
  epoch's order). A step that GradScaler skips (fp16 overflow) does not advance the iteration, so
  the round trains one more batch: the next epoch continues that epoch's order where the iteration
  stands.
* at the end of each round the weights are pruned by global magnitude to ``round((1 - p)^(r+1) N)``
  active weights, rewound to their values at iteration ``k`` and the optimizer state is cleared; the
  last round ends at exactly ``round(density * N)`` (``p = 1 - density^(1/R)`` unless given).
* every epoch (of every round) is validated and checkpointed with the ticket's state, and its metrics
  line carries the round; only epochs of the last round, at the final density, can be selected, and
  the selected model is tested once.
* one FLOPs ledger records every step of every round at the density it ran at; the summary's
  ``train_flops`` is that total relative to *one* dense training of ``T`` steps (so it exceeds 1 when
  the rounds together cost more than a dense run) and ``train_flops_total`` the absolute sum.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

from ..baselines.lottery import LotteryTicket
from ..errors import ConfigError
from ..rundir import EpochRecord
from ..sparsity.config import StepSpec
from ..sparsity.sparsifier import Sparsifier
from . import runtime
from .config import TrainConfig
from .loop import Trainer, metrics_text

logger = logging.getLogger(__name__)


class _WithoutRoundLine(logging.Filter):
    """Drops the ticket's own "lottery round" line (see :meth:`LotteryTrainer.after_selection`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and str(record.msg).startswith("lottery round"))


def resolve_rewind(value: Optional[StepSpec], total_steps: int) -> int:
    """The rewind iteration ``k`` of ``lth_rewind`` (steps, or a fraction of the ``total_steps`` schedule).

    Raises:
        ConfigError: ``k`` is not before the end of the schedule (later rounds would train nothing).
    """
    step = 0 if value is None else value if isinstance(value, int) else int(round(value * total_steps))
    if step >= total_steps:
        raise ConfigError(f"lth_rewind={value!r} resolves to step {step}, but the schedule has {total_steps} steps: "
                          f"rounds after the first would train nothing; give a step below {total_steps}")
    return step


class LotteryTrainer(Trainer):
    """Iterative magnitude pruning with rewinding over full training runs (see the module docstring)."""

    ticket: LotteryTicket
    rewind: int  # k, the iteration every round after the first starts from

    def __init__(self, config: TrainConfig, out_dir: Path, guard: Optional[runtime.SignalGuard] = None) -> None:
        self._round_lines: list[str] = []  # the end of a round, logged after the epoch line that ends it
        super().__init__(config, out_dir, guard)
        self.ticket.ledger = self.ledger  # one ledger for every round (the ticket is built before it)
        # Cost of one dense training of the schedule: the unit of the run's train_flops.
        self.one_dense_run = 3.0 * self.layer_flops.dense * self.total_steps

    def _build_sparsifier(self, start: Optional[Mapping[str, Any]]) -> Sparsifier:
        """The ticket's sparsifier; records the ticket's resolved settings in the config."""
        cfg = self.config
        self.rewind = rewind = resolve_rewind(cfg.lottery.lth_rewind, self.total_steps)
        try:
            self.ticket = LotteryTicket(
                self.model, self.optimizer, rounds=cfg.effective_lth_rounds,
                prune_fraction=cfg.lottery.lth_prune_fraction, density=cfg.effective_density, rewind_step=rewind,
                keep_dense=cfg.sparsity.keep_dense or (), seed=cfg.seed)
        except ValueError as exc:
            raise ConfigError(f"method 'lth': {exc}") from None
        # config.yaml and the checkpoints record the values used (a resume rebuilds the same ticket).
        self.config = cfg.with_run_values(density=cfg.effective_density, lth_rounds=self.ticket.rounds,
                                          lth_prune_fraction=self.ticket.prune_fraction, lth_rewind=rewind)
        return self.ticket.sparsifier

    # -------------------------------------------------------------- the Trainer's hooks

    def schedule_position(self, scheduler_steps: int) -> int:
        """The LR schedule follows the ticket's iteration, which restarts at the rewind step every round."""
        return self.ticket.iteration

    def training_left(self) -> bool:
        """Until the last round has been trained."""
        return not self.ticket.done

    def epoch_finished(self) -> bool:
        """An epoch also ends with its round."""
        return self.ticket.iteration >= self.total_steps

    def data_position(self) -> tuple[int, int]:
        """Iteration ``i`` of every round sees the data of iteration ``i`` of round 0."""
        return divmod(self.ticket.iteration, self.steps_per_epoch)

    def planned_steps(self) -> int:
        """``T`` steps of round 0, ``T - k`` steps of every later round."""
        t, rounds, rewind = self.total_steps, self.ticket.rounds, self.rewind
        return t + rounds * (t - rewind)

    def planned_epochs(self) -> int:
        """Round 0's epochs, then those from the rewind step's epoch on, per later round."""
        per_round = -(-self.total_steps // self.steps_per_epoch)
        return per_round + self.ticket.rounds * (per_round - self.rewind // self.steps_per_epoch)

    def at_final_density(self) -> bool:
        """Only the last round's epochs can be selected."""
        return self.ticket.round == self.ticket.rounds

    def optimizer_step(self) -> None:
        """Optimizer, then the ticket (re-zero pruned weights, count the iteration, record FLOPs), LR."""
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ticket.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.progress.step += 1

    def epoch_record(self, train: dict[str, float], val: Optional[dict[str, float]]) -> EpochRecord:
        """The base record, with the round and training FLOPs relative to one dense training."""
        record = super().epoch_record(train, val)
        record.round = self.ticket.round
        record.train_flops = self.ledger.total / self.one_dense_run
        return record

    def after_selection(self, train: dict[str, float], val: Optional[dict[str, float]]) -> None:
        """At the end of a round: record it; unless it was the last, prune, rewind and restart the LR schedule.

        The round's lines are logged by :meth:`end_epoch` after the line of the epoch that ended it.
        """
        if self.ticket.iteration < self.total_steps:
            return
        t = self.ticket
        metrics = {"epoch": self.progress.epoch, "train_loss": train["loss"], "train_accuracy": train["accuracy"],
                   "val_loss": None if val is None else val["loss"],
                   "val_accuracy": None if val is None else val["accuracy"]}
        self._round_lines.append(f"lottery round {t.round} of {t.rounds} ended | epoch {self.progress.epoch} step "
                                 f"{self.progress.step} | {metrics_text(train, val)} | density {t.density():.4f} | "
                                 f"{t.round_steps} steps")
        # The ticket's own line for the round (raw values, before the epoch line) gives way to the one above.
        ticket_log, without = logging.getLogger(LotteryTicket.__module__), _WithoutRoundLine()
        ticket_log.addFilter(without)
        try:
            t.next_round(metrics)
        finally:
            ticket_log.removeFilter(without)
        if not t.done:
            self.scheduler.step()  # the LR of the rewind iteration for the next round's first step
            self._round_lines.append(f"lottery round {t.round} of {t.rounds}: {sum(self.sparsifier.counts)} weights "
                                     f"active (density {self.sparsifier.density():.4f}), rewound to iteration "
                                     f"{t.iteration}")

    def end_epoch(self, train: dict[str, float], val: Optional[dict[str, float]]) -> None:
        """The base epoch end, then the lines of a round that ended with the epoch (rank 0 logs them)."""
        super().end_epoch(train, val)
        if self.dist.is_main:
            for line in self._round_lines:
                logger.info("%s", line)
        self._round_lines.clear()

    def extra_state(self) -> dict[str, Any]:
        """The ticket's state (round, iteration, saved rewind weights, masks, history, ledger)."""
        return {"lottery": self.ticket.state_dict()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore the ticket (its settings must be this run's)."""
        self.ticket.load_state_dict(state["lottery"])

    def summary_overrides(self) -> dict[str, Any]:
        """The asked density, FLOPs relative to one dense training, and the rounds."""
        return {
            "target_density": self.config.sparsity.density,
            "train_flops": self.ledger.total / self.one_dense_run,
            "extra": {"lth_rounds": self.ticket.rounds, "lth_prune_fraction": self.ticket.prune_fraction,
                      "lth_rewind": self.ticket.rewind_step, "trainings": self.ticket.rounds + 1,
                      "rounds": [dict(h) for h in self.ticket.history]},
        }

    def run(self) -> None:
        """Train every round to the end, from wherever the checkpoint left off."""
        t = self.ticket
        logger.info("lth: %d pruning rounds (%d trainings of %d steps, later ones from the rewind step %d), "
                    "pruning %.4f of the remaining weights per round to density %.5f (%d of %d weights)",
                    t.rounds, t.rounds + 1, self.total_steps, self.rewind, t.prune_fraction,
                    t.final_density, t.target_count(t.rounds), t.sparsifier.total)
        super().run()


__all__ = ["LotteryTrainer", "resolve_rewind"]
