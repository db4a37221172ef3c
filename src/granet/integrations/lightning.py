"""Lightning integration: a ``Callback`` that runs a granet sparsifier inside ``Trainer.fit``.

Usage::

    from granet.integrations.lightning import SparsityCallback
    trainer = L.Trainer(max_epochs=10, callbacks=[SparsityCallback("granet", density=0.1)])
    trainer.fit(module, loader)                       # resume: trainer.fit(module, loader, ckpt_path=...)

What it does:

* ``on_fit_start``: builds the sparsifier on the LightningModule and its (single) optimizer;
  ``total_steps`` defaults to ``trainer.estimated_stepping_batches`` (optimizer steps, so
  ``accumulate_grad_batches`` is accounted for).
* ``on_train_batch_end``: steps the sparsifier. It counts *real* optimizer steps through a hook on
  the optimizer, so accumulation micro-batches and AMP steps skipped by the gradient scaler do not
  advance the schedule; gradients of the step are still present (Lightning zeroes them at the start
  of the next step), as gradient regrowth needs.
* Logging through the LightningModule's logger, at every optimizer step: ``sparsity/density``,
  ``sparsity/target_density``; after a topology update also ``sparsity/pruned``,
  ``sparsity/regrown``, ``sparsity/exploration_rate``.
* ``state_dict`` / ``load_state_dict``: the sparsifier state goes into Lightning checkpoints
  (``checkpoint["callbacks"]``, under :attr:`SparsityCallback.state_key`, one key per method), so
  ``fit(..., ckpt_path=...)`` resumes bit-identically.
* ``on_load_checkpoint``: refuses (:class:`granet.errors.CheckpointError`) a checkpoint the fit
  cannot continue from (the rule of ``granet.integrations._common.check_resume_state``).

Resuming. Lightning calls ``on_load_checkpoint(trainer, module, checkpoint)`` on every callback when
``fit`` restores a checkpoint holding callback states (``ckpt_path``; ``trainer.ckpt_path`` names the
file), then ``load_state_dict`` with this callback's entry if there is one. With the default
strategies both come before ``on_fit_start``; strategies that restore after setup call them after it,
and ``load_state_dict`` then loads into the sparsifier already built. ``trainer.global_step`` is
restored only after ``on_fit_start``, so the check reads ``checkpoint["global_step"]``, the step
the fit resumes at. ``global_step`` counts optimizer steps: with ``accumulate_grad_batches=k`` one per
``k`` batches, as the sparsifier counts; an optimizer step the AMP gradient scaler skips is counted by
the trainer but not by the sparsifier, so the callback saves the difference with the state and a
resume requires ``sparsifier step + skipped == checkpoint["global_step"]``. A checkpoint with no state
for this callback (made without it, or by ``SparsityCallback`` of another method), or with a state
saved at another step, is refused when the trainer has stepped; at step 0 the sparsifier starts fresh.
Checkpoints saved with ``save_weights_only`` hold no callback states; Lightning itself refuses to
resume a fit from them.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional

from ._common import build_sparsifier, check_resume_state, require, saved_state, sparsity_metrics, unwrap_optimizer

_pl = require("lightning.pytorch", "lightning", "granet.integrations.lightning", "lightning")
if TYPE_CHECKING:
    from lightning.pytorch import Callback
else:
    Callback = _pl.Callback

logger = logging.getLogger(__name__)

#: Checkpoint keys of the callback's states begin with this; the method name and "]" follow.
STATE_KEY_PREFIX = "granet.SparsityCallback["
#: What to do when a checkpoint cannot be resumed, for the error messages.
_REMEDY = "resume with the SparsityCallback that saved the checkpoint, or fit without ckpt_path to start over"


class SparsityCallback(Callback):
    """Run a granet sparsifier inside Lightning's ``Trainer``.

    Args:
        method: a granet method name (``granet``, ``rigl``, ``static``, ...).
        log: log the sparsity scalars through ``LightningModule.log_dict``.
        strict: on resume, refuse a sparsifier state saved with other options. ``False`` resumes it
            under the new options with a warning naming the differences: the way to continue a fit
            with more epochs (``total_steps`` follows ``max_epochs``/``max_steps``, so it differs).
        **options: :func:`granet.create_sparsifier` options (``density``, ``update_interval``,
            ``keep_dense``, ``include``, ...).
    """

    def __init__(self, method: str, log: bool = True, strict: bool = True, **options: Any) -> None:
        super().__init__()
        self.method = method
        self.strict = strict
        self.options = options
        self.log = log
        self.sparsifier: Any = None
        self._saved: Optional[dict[str, Any]] = None
        self._trainer_step = 0  # the trainer's global step when the sparsifier last stepped

    @property
    def state_key(self) -> str:
        """Checkpoint key: one sparsifier per method."""
        return f"{STATE_KEY_PREFIX}{self.method}]"

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose sparsifier state cannot continue this fit (see the module docstring).

        Raises:
            CheckpointError: the trainer resumes at a step > 0 and the checkpoint holds no state for this
                callback, the state of another method, or a state saved at another step.
        """
        if trainer.state.fn != "fit":
            return  # validate / test / predict build no sparsifier
        states = checkpoint.get("callbacks") or {}
        state = states.get(self.state_key) or next(  # another method's state: refused, naming its method
            (s for k, s in states.items() if isinstance(k, str) and k.startswith(STATE_KEY_PREFIX) and s), None
        )
        check_resume_state(state, int(checkpoint.get("global_step", 0)), self.method,
                           f"checkpoint {trainer.ckpt_path}", _REMEDY)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Build the sparsifier (restored from the checkpoint's state when resuming).

        Raises:
            CheckpointError: the checkpoint's state does not fit the module or the callback's options.
        """
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"SparsityCallback needs exactly one optimizer, the module configures {len(optimizers)}")
        steps = trainer.estimated_stepping_batches
        total = int(steps) if steps is not None and steps != float("inf") else None
        self.sparsifier = build_sparsifier(
            self.method, pl_module, unwrap_optimizer(optimizers[0]), self.options, total, self._saved,
            f"checkpoint {trainer.ckpt_path}", strict=self.strict,
        )
        self._saved = None
        logger.info("granet %s sparsifier on %s: %s", self.method, type(pl_module).__name__, self.sparsifier)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Note the trainer's step once the checkpoint (if any) is fully restored."""
        self._trainer_step = trainer.global_step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Step the sparsifier after the batch (a no-op unless the optimizer really stepped)."""
        before = self.sparsifier.step_count
        report = self.sparsifier.step()
        self._trainer_step = trainer.global_step
        if self.log and self.sparsifier.step_count != before:
            pl_module.log_dict(sparsity_metrics(self.sparsifier, report), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        """The sparsifier's state and the optimizer steps it did not count (Lightning saves it in the checkpoint)."""
        if self.sparsifier is None:
            return dict(self._saved or {})
        return saved_state(self.sparsifier, self._trainer_step)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the state for :meth:`on_fit_start` (or load it now if the sparsifier exists)."""
        if not state_dict:
            return
        if self.sparsifier is not None:
            self.sparsifier.load_state_dict(state_dict)  # strategies that restore after setup
        else:
            self._saved = dict(state_dict)
