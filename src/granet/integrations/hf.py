"""Hugging Face ``Trainer`` integration: a ``TrainerCallback`` that runs a granet sparsifier.

Usage::

    from granet.integrations.hf import SparsityCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[SparsityCallback("granet", density=0.1)])
    trainer.train()                                   # or train(resume_from_checkpoint=True / path)

What it does:

* ``on_train_begin``: builds the sparsifier on the Trainer's model and optimizer (``total_steps``
  defaults to the Trainer's ``max_steps``); when the run resumes (``global_step > 0``) it restores the
  sparsifier state saved with the checkpoint, so the resumed run is bit-identical to an uninterrupted
  one. A missing, unreadable or foreign state file, a state of another method or one saved at another
  step is refused with a :class:`granet.errors.CheckpointError` naming the file (the rule of
  ``granet.integrations._common.check_resume_state``; the Trainer's ``global_step`` counts an
  optimizer step the AMP gradient scaler skipped, the sparsifier does not, and the saved state records
  the difference).
* ``on_optimizer_step`` (right after ``optimizer.step()``, gradients still present): steps the
  sparsifier. Only real optimizer steps count (the sparsifier's hook sits on the inner
  ``torch.optim`` optimizer): gradient-accumulation micro-batches and AMP steps skipped by the
  gradient scaler do not advance the schedule.
* ``on_save``: the Trainer does not pickle callbacks into checkpoints, so the sparsifier state is
  written (atomically) to ``granet_sparsifier.pt`` inside each ``checkpoint-N`` folder (deleted with
  it by ``save_total_limit``).
* ``on_log``: adds ``sparsity/density``, ``sparsity/target_density`` and, after an update,
  ``sparsity/pruned``, ``sparsity/regrown``, ``sparsity/exploration_rate`` to the logged values
  (``trainer.state.log_history``, and reporting callbacks placed after this one).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..rundir import load_file, save_file
from ._common import build_sparsifier, check_resume_state, require, saved_state, sparsity_metrics, unwrap_optimizer

_transformers = require("transformers", "hf", "granet.integrations.hf")
if TYPE_CHECKING:
    from transformers import TrainerCallback
else:
    TrainerCallback = _transformers.TrainerCallback

logger = logging.getLogger(__name__)

#: File name of the sparsifier state inside a Trainer checkpoint folder.
STATE_FILE = "granet_sparsifier.pt"
#: What to do when a checkpoint's sparsifier state cannot be resumed, for the error messages.
_REMEDY = f"pass resume_from=<the checkpoint folder holding {STATE_FILE}>, or train without resuming"


class SparsityCallback(TrainerCallback):
    """Run a granet sparsifier inside Hugging Face's ``Trainer``.

    Args:
        method: a granet method name (``granet``, ``rigl``, ``static``, ...).
        resume_from: checkpoint folder holding the sparsifier state to resume from; default: the
            Trainer's ``resume_from_checkpoint`` argument if it is a folder, else
            ``output_dir/checkpoint-<global_step>``.
        strict: on resume, refuse a sparsifier state saved with other options. ``False`` resumes it
            under the new options with a warning naming the differences (e.g. training on with more
            epochs, where ``total_steps`` differs).
        **options: :func:`granet.create_sparsifier` options (``density``, ``update_interval``,
            ``keep_dense``, ``include``, ...).
    """

    def __init__(self, method: str, resume_from: Optional[str] = None, strict: bool = True,
                 **options: Any) -> None:
        self.method = method
        self.strict = strict
        self.options = options
        self.resume_from = resume_from
        self.sparsifier: Any = None
        self._last_report: Any = None

    def _checkpoint_dir(self, args: Any, state: Any) -> str:
        if self.resume_from is not None:
            return self.resume_from
        given = getattr(args, "resume_from_checkpoint", None)
        if isinstance(given, str) and os.path.isdir(given):
            return given
        return os.path.join(args.output_dir, f"checkpoint-{state.global_step}")

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        """Build the sparsifier (restoring its saved state when the Trainer resumes).

        Raises:
            CheckpointError: resuming, and the state file is missing, unreadable, not a sparsifier
                state, made by another method or options, or saved at another step.
        """
        if model is None or optimizer is None:
            raise ValueError("SparsityCallback needs the Trainer's model and optimizer in on_train_begin")
        saved, source = None, "the checkpoint"
        if state.global_step > 0:  # resuming: the state saved with the checkpoint, checked (module docstring)
            path = Path(self._checkpoint_dir(args, state), STATE_FILE)
            found = load_file(path, "sparsifier state") if path.is_file() else None
            source = str(path) if found is not None else f"{path.parent} (no {STATE_FILE})"
            saved = check_resume_state(found, state.global_step, self.method, source, _REMEDY)
        self.sparsifier = build_sparsifier(
            self.method, model, unwrap_optimizer(optimizer), self.options, state.max_steps, saved, source,
            strict=self.strict,
        )
        logger.info("granet %s sparsifier on the Trainer's model: %s", self.method, self.sparsifier)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Step the sparsifier right after ``optimizer.step()`` (no-op for a skipped AMP step)."""
        report = self.sparsifier.step()
        if report is not None:
            self._last_report = report

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the sparsifier state into the checkpoint folder the Trainer just saved."""
        if self.sparsifier is None:
            return
        # Under FSDP state_dict() gathers the full masks from every rank's shard: all ranks take part.
        sharded, main = self.sparsifier.sharded, state.is_world_process_zero
        saved = saved_state(self.sparsifier, state.global_step) if sharded or main else None
        if not main:
            return  # one copy is enough (DDP masks are identical on every rank)
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        save_file(saved, Path(folder, STATE_FILE))  # atomic: a crash mid-write leaves no truncated file

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict] = None, **kwargs: Any) -> None:
        """Add the sparsity scalars to the values being logged."""
        if self.sparsifier is None or logs is None:
            return
        values = sparsity_metrics(self.sparsifier, self._last_report)
        self._last_report = None
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)  # the Trainer copied logs into the history already
