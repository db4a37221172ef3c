"""Lottery tickets: iterative magnitude pruning (IMP) with weight rewinding, as a training-loop driver.

Frankle & Carbin (ICLR 2019), with rewinding from Frankle et al. (ICML 2020). With ``N`` sparsified
weights, prune fraction ``p``, ``R`` rounds and rewind iteration ``k``:

* round 0 trains the dense network; the full model state (parameters and buffers) at iteration
  ``k`` is saved (``k = 0``: the initialisation, the original lottery ticket);
* at the end of round ``r`` (``r < R``) the weights are pruned by global magnitude to exactly
  ``round((1 - p) ** (r + 1) * N)`` active weights, i.e. about ``p`` of the remaining ones (the count
  is defined from ``N`` so the final density is exact, without compounding rounding); the whole
  model is reset to the saved iteration-``k`` state, pruned weights are zeroed, and the optimizer
  state is cleared;
* round ``r >= 1`` trains from iteration ``k`` (:attr:`LotteryTicket.iteration` starts there, so the
  learning-rate schedule resumes at ``k`` too) to the end of the schedule;
* after round ``R`` the ticket has ``round((1 - p) ** R * N)`` weights. Training cost: ``R + 1``
  trainings (the dense one and one per pruning round), all recorded in one FLOPs ledger.

Given a final ``density`` instead of ``p``, ``p = 1 - density ** (1 / R)`` and the last round keeps
exactly ``round(density * N)`` weights (the same count up to floating-point rounding of ``p``).
Under ``torch.distributed`` every rank prunes its own (identical) weights; the kept positions are
compared across ranks (one small all-reduce per round) before rank 0's masks are installed.

``rewind_step=None`` keeps the trained values instead of rewinding: with ``rounds=1`` this is
one-shot magnitude pruning after training followed by fine-tuning.

Usage in a plain loop (the trainer owns the optimizer, the LR schedule and evaluation)::

    ledger = TrainingFlopsLedger(layer_flops(model, example))
    ticket = LotteryTicket(model, optimizer, rounds=5, prune_fraction=0.2, rewind_step=k, ledger=ledger)
    while not ticket.done:
        while ticket.iteration < T:          # iteration = step of the LR schedule
            set_lr(optimizer, schedule(ticket.iteration))
            loss_fn(model(x), y).backward(); optimizer.step(); ticket.step(); optimizer.zero_grad()
        ticket.next_round({"accuracy": evaluate(model)})   # log the round, prune + rewind
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from ..accounting.flops import TrainingFlopsLedger
from ..sparsity import criteria
from ..sparsity.config import SparsityConfig
from ..sparsity.sparsifier import DEFAULT_LAYER_TYPES, Sparsifier
from ..sparsity.targets import LayerType

logger = logging.getLogger(__name__)

__all__ = ["LotteryTicket"]


class LotteryTicket:
    """Iterative magnitude pruning with rewinding, driven from any training loop.

    Call :meth:`step` after every ``optimizer.step()`` and :meth:`next_round` at the end of every
    round's training (the last one included). Masks are kept by an internal :class:`Sparsifier`:
    pruned weights and their optimizer state stay zero after every step.

    Args:
        model: the model; its Conv/Linear weights (minus ``keep_dense``) are pruned.
        optimizer: the training optimizer (its steps are counted; its state is cleared at a rewind).
        rounds: R, the number of pruning rounds (R + 1 trainings in all), >= 1.
        prune_fraction: p in (0, 1), the fraction of the remaining weights pruned per round; default 0.2,
            or ``1 - density ** (1 / rounds)`` when ``density`` is given.
        rewind_step: k, the iteration of round 0 whose state survivors are reset to (0: original
            lottery ticket); ``None``: no rewinding (prune and fine-tune).
        keep_dense: ``fnmatch`` patterns of layers never pruned (see :func:`granet.sparsifiable_parameters`).
        layer_types: module types whose ``weight`` is pruned.
        seed: seed of the tie-breaking among equal magnitudes.
        ledger: a :class:`~granet.accounting.flops.TrainingFlopsLedger` that every step is recorded in (all
            rounds add up); saved and restored with this object's state.
        distributed: as for :class:`Sparsifier`.
        density: the final density in (0, 1): the last round keeps exactly ``round(density * N)``
            weights. With ``prune_fraction`` too, the two must end at the same count.

    Attributes:
        iteration: the current round's iteration, the step its learning-rate schedule follows: counted
            by :meth:`step`, set back to ``rewind_step`` (0 without rewinding) by :meth:`next_round`.
        history: the summaries :meth:`next_round` returned, one per finished round.
    """

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], *, rounds: int,
                 prune_fraction: Optional[float] = None, rewind_step: Optional[int] = 0,
                 keep_dense: Sequence[str] = (), layer_types: Sequence[LayerType] = DEFAULT_LAYER_TYPES,
                 seed: int = 0, ledger: Optional[TrainingFlopsLedger] = None, distributed: Optional[bool] = None,
                 density: Optional[float] = None) -> None:
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
        if density is not None and (isinstance(density, bool) or not isinstance(density, (int, float))
                                    or not 0.0 < density < 1.0):
            raise ValueError(f"density must be a number in (0, 1), got {density!r}")
        if prune_fraction is None:
            prune_fraction = 0.2 if density is None else 1.0 - density ** (1.0 / rounds)
        if isinstance(prune_fraction, bool) or not isinstance(prune_fraction, (int, float)) \
                or not 0.0 < prune_fraction < 1.0:
            raise ValueError(f"prune_fraction must be a number in (0, 1), got {prune_fraction!r}")
        if rewind_step is not None and (isinstance(rewind_step, bool) or not isinstance(rewind_step, int)
                                        or rewind_step < 0):
            raise ValueError(f"rewind_step must be an integer >= 0 or None, got {rewind_step!r}")
        if ledger is not None and not isinstance(ledger, TrainingFlopsLedger):
            raise TypeError(f"ledger must be a TrainingFlopsLedger, got {type(ledger).__name__}")
        self.model, self.optimizer, self.ledger = model, optimizer, ledger
        self.rounds, self.prune_fraction, self.rewind_step, self.seed = rounds, float(prune_fraction), rewind_step, seed
        self.density_target = None if density is None else float(density)
        config = SparsityConfig(method="lth", density=1.0, keep_dense=tuple(keep_dense), seed=seed,
                                track_exploration=False)
        self.sparsifier = Sparsifier(model, optimizer, config, layer_types=layer_types, distributed=distributed)
        if density is not None and self.target_count(rounds) != self._count(rounds) \
                and not math.isclose((1.0 - self.prune_fraction) ** rounds, density, rel_tol=1e-9):
            n, kept = self.sparsifier.total, self._count(rounds)
            raise ValueError(f"prune_fraction={prune_fraction} over {rounds} rounds keeps {kept} of {n} weights "
                             f"(density {kept / n:.6g}), not density={density} ({self.target_count(rounds)}); "
                             f"give only one of them")
        if self.target_count(rounds) < 1:
            raise ValueError(f"{rounds} rounds of prune_fraction={prune_fraction} leave no weight of "
                             f"{self.sparsifier.total}; use fewer rounds or a smaller fraction")
        self.round = 0
        self.iteration = 0
        self.round_steps = 0
        self.done = False
        self.history: list[dict[str, Any]] = []
        self._round_start_flops = 0.0
        self._rewind_state: Optional[dict[str, torch.Tensor]] = None
        if rewind_step == 0:
            self._rewind_state = self._snapshot()

    # ------------------------------------------------------------------ counts

    def _count(self, round_index: int) -> int:
        return round((1.0 - self.prune_fraction) ** round_index * self.sparsifier.total)

    def target_count(self, round_index: int) -> int:
        """Active weights during round ``round_index``: ``round((1 - p) ** round_index * N)``; the last
        round's is ``round(density * N)`` when a final density was given."""
        if round_index == self.rounds and self.density_target is not None:
            return round(self.density_target * self.sparsifier.total)
        return self._count(round_index)

    @property
    def final_density(self) -> float:
        """Density after the last round: ``round((1 - p) ** R * N) / N`` (or ``round(density * N) / N``)."""
        return self.target_count(self.rounds) / self.sparsifier.total

    def density(self) -> float:
        """Current density of the pruned weights."""
        return self.sparsifier.density()

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The current masks by parameter name."""
        return dict(self.sparsifier.masks)

    # ------------------------------------------------------------------ the training-loop API

    def step(self) -> None:
        """Call after ``optimizer.step()``: keep pruned weights zero, count and record the step.

        In round 0 the model state is saved when :attr:`iteration` reaches ``rewind_step``.
        """
        if self.done:
            raise RuntimeError("all lottery-ticket rounds are finished; step() has nothing left to train")
        before = self.sparsifier.step_count
        self.sparsifier.step()
        new = self.sparsifier.step_count - before
        if new == 0:
            return  # a skipped AMP step or an accumulation micro-step
        self.iteration += new
        self.round_steps += new
        if self.ledger is not None:
            self.ledger.record(self.sparsifier.layer_density(), steps=new)
        if self.round == 0 and self.rewind_step is not None and self._rewind_state is None:
            if self.iteration == self.rewind_step:
                self._rewind_state = self._snapshot()
            elif self.iteration > self.rewind_step:
                raise RuntimeError(f"iteration jumped from {self.iteration - new} to {self.iteration} past "
                                   f"rewind_step={self.rewind_step}: call step() after every optimizer step")

    def next_round(self, metrics: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        """End the current round: log it, then (unless it was the last) prune, rewind, reset the optimizer.

        Args:
            metrics: values to log with the round (e.g. ``{"accuracy": 0.91}``).

        Returns:
            The round's summary (also appended to :attr:`history`): round, density, active weights,
            steps, the round's training FLOPs and the running total (``None`` without a ledger).
        """
        if self.done:
            raise RuntimeError("all lottery-ticket rounds are finished")
        total = self.ledger.total if self.ledger is not None else None
        summary: dict[str, Any] = {
            "round": self.round, "density": self.density(), "active": sum(self.sparsifier.counts),
            "steps": self.round_steps, "training_flops": total,
            "round_flops": None if total is None else total - self._round_start_flops,
        }
        summary.update(dict(metrics or {}))
        self.history.append(summary)
        logger.info("lottery round %d: density %.5f, %d steps%s", self.round, summary["density"], self.round_steps,
                    "".join(f", {k} {v}" for k, v in (metrics or {}).items()))
        if self.round == self.rounds:
            self.done = True
            return summary
        if self.rewind_step is not None and self._rewind_state is None:
            raise RuntimeError(f"round 0 ended at iteration {self.iteration}, before rewind_step={self.rewind_step}")
        self._prune_and_rewind(self.round + 1)
        self.round += 1
        self.iteration = self.rewind_step if self.rewind_step is not None else 0
        self.round_steps = 0
        self._round_start_flops = total if total is not None else 0.0
        return summary

    @torch.no_grad()
    def _prune_and_rewind(self, round_index: int) -> None:
        """Global magnitude pruning to the round's count, then reset survivors to the saved state."""
        s = self.sparsifier
        scores = torch.cat([criteria.active_magnitudes(p, m).reshape(-1).to(s.params[0].device)
                            for p, m in zip(s.params, s.masks.values())])
        keep = criteria.select_top(scores, self.target_count(round_index),
                                   criteria.seeded_generator(self.seed, "lth", round_index))
        if s.distributed:
            _check_ranks_agree(keep, round_index)
        masks = {n: k.view(p.shape).to(p.device) for n, k, p in zip(s.names, keep.split(s.sizes), s.params)}
        if self._rewind_state is not None:
            self.model.load_state_dict(self._rewind_state)  # copies in place: the optimizer's tensors stay
        if self.optimizer is not None:
            self.optimizer.state.clear()  # fresh momentum / Adam moments, as a new training run
        s.set_masks(masks)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything to resume mid-round bit-exactly (with the model's and optimizer's own states).

        Holds the saved iteration-k state (one copy of the model), the masks and the ledger.
        """
        return {
            "format": 1,
            "rounds": self.rounds, "prune_fraction": self.prune_fraction, "rewind_step": self.rewind_step,
            "seed": self.seed, "density": self.density_target, "round": self.round, "iteration": self.iteration,
            "round_steps": self.round_steps,
            "done": self.done, "history": [dict(h) for h in self.history],
            "round_start_flops": self._round_start_flops,
            "rewind_state": None if self._rewind_state is None else {
                k: v.detach().cpu().clone() for k, v in self._rewind_state.items()},
            "sparsifier": self.sparsifier.state_dict(),
            "ledger": None if self.ledger is None else self.ledger.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (load the model and optimizer states as well, in any order).

        Raises:
            ValueError: the state is not a lottery-ticket state, or was saved with other rounds,
                prune fraction, rewind step or seed (named), or with/without a ledger unlike this one.
        """
        if not isinstance(state, Mapping) or "sparsifier" not in state or "rounds" not in state:
            raise ValueError("not a granet LotteryTicket state (no 'rounds' / 'sparsifier' entries)")
        mine = {"rounds": self.rounds, "prune_fraction": self.prune_fraction,
                "rewind_step": self.rewind_step, "seed": self.seed, "density": self.density_target}
        differing = [f"{k} (state {state.get(k)!r}, here {v!r})" for k, v in mine.items()
                     if state.get(k) != v and not (isinstance(v, float) and isinstance(state.get(k), float)
                                                  and math.isclose(state[k], v))]
        if differing:
            raise ValueError("lottery-ticket state has other settings: " + ", ".join(differing))
        if (state.get("ledger") is None) != (self.ledger is None):
            raise ValueError("lottery-ticket state and this driver disagree on having a FLOPs ledger")
        self.sparsifier.load_state_dict(state["sparsifier"])
        if self.ledger is not None:
            self.ledger.load_state_dict(state["ledger"])
        device = self.sparsifier.params[0].device
        rewind = state.get("rewind_state")
        self._rewind_state = None if rewind is None else {k: v.to(device).clone() for k, v in rewind.items()}
        self.round, self.iteration = int(state["round"]), int(state["iteration"])
        self.round_steps, self.done = int(state["round_steps"]), bool(state["done"])
        self.history = [dict(h) for h in state["history"]]
        self._round_start_flops = float(state["round_start_flops"])

    def __repr__(self) -> str:
        return (f"LotteryTicket(round={self.round}/{self.rounds}, iteration={self.iteration}, "
                f"density={self.density():.5f}, final={self.final_density:.5f})")


def _check_ranks_agree(keep: torch.Tensor, round_index: int) -> None:
    """Raise unless every rank chose the same positions (DDP keeps the weights identical, so they must).

    A fingerprint (count and two position sums) is compared by one MIN and one MAX all-reduce.
    """
    import torch.distributed as dist

    positions = torch.arange(keep.numel(), device=keep.device, dtype=torch.float64)
    kept = keep.to(torch.float64)
    fingerprint = torch.stack([kept.sum(), (positions * kept).sum(), (torch.remainder(positions, 9973) * kept).sum()])
    low, high = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"lottery round {round_index}: the ranks pruned different weights (rank "
                           f"{dist.get_rank()} kept {int(fingerprint[0])}); their weights had drifted apart")
