"""Shared pieces of the framework callbacks: building, resuming and logging a sparsifier.

The resume rule both callbacks apply (:func:`check_resume_state`): a trainer that resumes at optimizer
step ``N > 0`` needs the sparsifier state saved with the same checkpoint, made by the same method, at
sparsifier step ``N - skipped``, where ``skipped`` counts the optimizer steps the trainer counted but
the sparsifier did not (AMP steps the gradient scaler skipped; recorded in the saved state as
:data:`SKIPPED_STEPS`). Anything else is refused: a fresh sparsifier would draw new masks over the
trained weights and run its schedules ``N`` steps behind the trainer. At ``N == 0`` nothing has been
trained yet and a fresh sparsifier is the right one.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..errors import CheckpointError, install_hint, short_repr
from ..methods import create_sparsifier
from ..sparsity.config import SavedConfigMismatch
from ..sparsity.sparsifier import Sparsifier, UpdateReport

#: Added by the callbacks to the sparsifier state they save: the optimizer steps the trainer counted
#: but the sparsifier did not (steps the AMP gradient scaler skipped), so that a resume can check the
#: state against the trainer's step exactly. ``Sparsifier.load_state_dict`` ignores the entry.
SKIPPED_STEPS = "trainer_skipped_steps"


def require(package: str, extra: str, module: str, distribution: Optional[str] = None) -> Any:
    """Import ``package`` or raise an ImportError that says which extra (or distribution) to install."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(
            f"{module} needs the '{package}' package: {install_hint(extra, distribution or package)}"
        ) from exc


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside framework wrappers (accelerate, Lightning).

    The sparsifier's step hook must sit on the optimizer whose ``step()`` really runs: a wrapper
    whose ``step`` skips the inner step (AMP overflow) must not count as an optimizer step.
    """
    inner = optimizer
    while not type(inner).__module__.startswith("torch.optim") and isinstance(
        getattr(inner, "optimizer", None), torch.optim.Optimizer
    ):
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer (or a wrapper of one), got {type(optimizer).__name__}")
    return inner


def build_sparsifier(
    method: str, model: nn.Module, optimizer: torch.optim.Optimizer, options: Mapping[str, Any],
    total_steps: Optional[int], state: Optional[Mapping[str, Any]] = None, source: str = "the checkpoint",
    strict: bool = True,
) -> Sparsifier:
    """Create the sparsifier; with ``state``, restore it on a model that already holds resumed weights.

    Building a sparsifier zeroes the weights (and optimizer state) outside its *initial* masks. On
    resume the model and optimizer already hold the checkpoint's values, which are active under the
    checkpoint's masks, so they are copied aside, the sparsifier is built, the values are put back and
    the saved masks are loaded: the result is the checkpointed state, bit for bit.

    With ``strict=False`` a state saved with other options (most often another ``total_steps``: the
    fit resumes with more epochs) is loaded with a warning naming the differing fields, and the
    schedule continues under the new options; the masks, counts and step are the checkpoint's.

    Raises:
        CheckpointError: ``state`` does not fit the model, or (``strict``) the options (``source`` named).
    """
    opts = dict(options)
    if "total_steps" not in opts and total_steps is not None and total_steps > 0:
        opts["total_steps"] = int(total_steps)
    if state is None:
        return create_sparsifier(method, model, optimizer, **opts)
    saved = [(p, p.detach().clone()) for p in model.parameters()]
    buffers = [
        (v, v.detach().clone())
        for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0
    ]
    sparsifier = create_sparsifier(method, model, optimizer, **opts)
    with torch.no_grad():
        for tensor, copy in saved + buffers:
            tensor.copy_(copy)
    try:
        sparsifier.load_state_dict(dict(state), strict=strict)
    except (ValueError, TypeError) as exc:
        sparsifier.remove()
        detail = (f"{exc.reason}; pass strict=False to the callback to resume with the new options"
                  if isinstance(exc, SavedConfigMismatch) else str(exc))
        raise CheckpointError(
            f"the sparsifier state in {source} does not fit this model and callback: {detail}") from None
    return sparsifier


def saved_state(sparsifier: Sparsifier, trainer_step: int) -> dict[str, Any]:
    """The sparsifier's state for a checkpoint the trainer takes at optimizer step ``trainer_step``."""
    state = sparsifier.state_dict()
    state[SKIPPED_STEPS] = int(trainer_step) - sparsifier.step_count
    return state


def check_resume_state(
    state: Optional[Mapping[str, Any]], trainer_step: int, method: str, source: str, remedy: str,
) -> Optional[dict[str, Any]]:
    """The state a callback running ``method`` resumes from at ``trainer_step`` (see the module docstring).

    Args:
        state: the sparsifier state saved with the checkpoint (``None`` or empty: it has none).
        trainer_step: the optimizer step the trainer resumes at (its global step).
        method: the callback's method.
        source: the checkpoint or file, as messages name it.
        remedy: what to do when the checkpoint's state cannot be used, for the messages.

    Returns:
        ``state`` as a dict, or ``None`` (no state, and nothing trained yet: start a fresh sparsifier).

    Raises:
        CheckpointError: no state while the trainer has stepped, a state of another method, or a state
            saved at another step (one line naming ``source``, the values and ``remedy``).
    """
    if not state:
        if trainer_step == 0:
            return None
        raise CheckpointError(
            f"no granet sparsifier state in {source}, but the trainer resumes at step {trainer_step}: a fresh "
            f"{method!r} sparsifier would draw new masks over the trained weights and run {trainer_step} steps "
            f"behind; {remedy}"
        )
    if not isinstance(state, Mapping) or not isinstance(state.get("masks"), Mapping):
        found = "no 'masks' entry" if isinstance(state, Mapping) else f"a {type(state).__name__}"
        raise CheckpointError(f"{source} does not hold a granet sparsifier state ({found}); {remedy}")
    step, skipped = state.get("step"), state.get(SKIPPED_STEPS, 0)
    for name, value in (("step", step), (SKIPPED_STEPS, skipped)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(
                f"the sparsifier state in {source} has an invalid {name} {short_repr(value)}; {remedy}")
    config = state.get("config")
    saved_method = config.get("method") if isinstance(config, Mapping) else None
    if saved_method is not None and saved_method != method:
        raise CheckpointError(
            f"the sparsifier state in {source} was made by method {saved_method!r}, this callback runs {method!r}: "
            f"resume with SparsityCallback({saved_method!r}, ...) and the options of the run that saved it"
        )
    if step + skipped != trainer_step:
        also = f" + {skipped} skipped by the gradient scaler" if skipped else ""
        raise CheckpointError(
            f"the sparsifier state in {source} is at step {step}{also}, but the trainer resumes at step "
            f"{trainer_step}: it was saved with another checkpoint; {remedy}"
        )
    return dict(state)


def sparsity_metrics(sparsifier: Sparsifier, report: Optional[UpdateReport] = None) -> dict[str, float]:
    """Scalars to log: density and target always; pruned / regrown / exploration after an update."""
    values = {
        "sparsity/density": sparsifier.density(),
        "sparsity/target_density": sparsifier.target_density(),
    }
    if report is not None:
        values["sparsity/pruned"] = float(report.pruned)
        values["sparsity/regrown"] = float(report.regrown)
        exploration = sparsifier.exploration_rate()
        if exploration is not None:
            values["sparsity/exploration_rate"] = exploration
    return values
