"""Shared pieces of the framework callbacks: building, resuming and logging a sparsifier."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..methods import create_sparsifier
from ..sparsifier import Sparsifier, UpdateReport


def require(package: str, extra: str, module: str, distribution: Optional[str] = None) -> Any:
    """Import ``package`` or raise an ImportError that says which extra (or distribution) to install."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(
            f"{module} needs the '{package}' package: pip install granet[{extra}] "
            f"(or pip install {distribution or package})"
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
    total_steps: Optional[int], state: Optional[Mapping[str, Any]] = None,
) -> Sparsifier:
    """Create the sparsifier; with ``state``, restore it on a model that already holds resumed weights.

    Building a sparsifier zeroes the weights (and optimizer state) outside its *initial* masks. On
    resume the model and optimizer already hold the checkpoint's values, which are active under the
    checkpoint's masks, so they are copied aside, the sparsifier is built, the values are put back and
    the saved masks are loaded: the result is the checkpointed state, bit for bit.
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
    sparsifier.load_state_dict(dict(state))
    return sparsifier


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
