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
  (``checkpoint["callbacks"]``), so ``fit(..., ckpt_path=...)`` resumes bit-identically.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from ._common import build_sparsifier, require, sparsity_metrics, unwrap_optimizer

_pl = require("lightning.pytorch", "lightning", "granet.integrations.lightning", "lightning")

logger = logging.getLogger(__name__)


class SparsityCallback(_pl.Callback):
    """Run a granet sparsifier inside Lightning's ``Trainer``.

    Args:
        method: a granet method name (``granet``, ``rigl``, ``static``, ...).
        log: log the sparsity scalars through ``LightningModule.log_dict``.
        **options: :func:`granet.create_sparsifier` options (``density``, ``update_interval``,
            ``keep_dense``, ``include``, ...).
    """

    def __init__(self, method: str, log: bool = True, **options: Any) -> None:
        super().__init__()
        self.method = method
        self.options = options
        self.log = log
        self.sparsifier: Any = None
        self._saved: Optional[dict[str, Any]] = None

    @property
    def state_key(self) -> str:
        """Checkpoint key: one sparsifier per method."""
        return f"granet.SparsityCallback[{self.method}]"

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Build the sparsifier (restored from the checkpoint's state when resuming)."""
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"SparsityCallback needs exactly one optimizer, the module configures {len(optimizers)}")
        steps = trainer.estimated_stepping_batches
        total = int(steps) if steps is not None and steps != float("inf") else None
        self.sparsifier = build_sparsifier(
            self.method, pl_module, unwrap_optimizer(optimizers[0]), self.options, total, self._saved
        )
        self._saved = None
        logger.info("granet %s sparsifier on %s: %s", self.method, type(pl_module).__name__, self.sparsifier)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Step the sparsifier after the batch (a no-op unless the optimizer really stepped)."""
        before = self.sparsifier.step_count
        report = self.sparsifier.step()
        if self.log and self.sparsifier.step_count != before:
            pl_module.log_dict(sparsity_metrics(self.sparsifier, report), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        """The sparsifier's state (saved by Lightning under ``checkpoint["callbacks"]``)."""
        if self.sparsifier is None:
            return dict(self._saved or {})
        return self.sparsifier.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the state for :meth:`on_fit_start` (or load it now if the sparsifier exists)."""
        if not state_dict:
            return
        if self.sparsifier is not None:
            self.sparsifier.load_state_dict(state_dict)  # strategies that restore after setup
        else:
            self._saved = dict(state_dict)
