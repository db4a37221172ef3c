"""granet: sparse training for PyTorch.

GraNet (gradual magnitude pruning + zero-cost neuroregeneration, Liu et al., NeurIPS 2021), its
sparse-to-sparse form GraNet-ST, and the methods it is compared with (dense, static, GMP, SET, RigL,
SNFS; SNIP, GraSP and SynFlow via :func:`prune_at_init`; lottery tickets via :class:`LotteryTicket`),
as a sparsifier you step after ``optimizer.step()`` in your own training loop::

    import granet
    sparsifier = granet.create_sparsifier("granet", model, optimizer, density=0.1, total_steps=T)
    ...
    optimizer.step()
    sparsifier.step()

Importing ``granet`` is cheap: each public name is imported from its module on first use (PEP 562),
so the ``granet`` command answers ``--help`` without loading torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each name is imported on first use
    from .baselines.lottery import LotteryTicket
    from .baselines.saliency import prune_at_init
    from .deploy.export import ExportInfo, export_run, export_sparse, load_masks, load_sparse
    from .deploy.inference import plan_sparse_inference, to_semi_structured, to_sparse_inference
    from .methods import (
        create_sparsifier,
        describe_method,
        list_methods,
        method_config,
        method_preset,
        register_method,
    )
    from .parallel.mask_sync import MaskDivergenceError, broadcast_masks, mask_checksum, verify_masks
    from .sparsity.config import SparsityConfig
    from .sparsity.coverage import Coverage, ParameterEntry
    from .sparsity.criteria import (
        Criterion,
        GrowCriterion,
        list_drop_criteria,
        list_grow_criteria,
        list_prune_criteria,
        register_drop_criterion,
        register_grow_criterion,
        register_prune_criterion,
    )
    from .sparsity.distributions import (
        Distribution,
        allocate_counts,
        layer_counts,
        list_distributions,
        register_distribution,
    )
    from .sparsity.schedules import DropFractionSchedule, PruningSchedule, list_drop_decays, register_drop_decay
    from .sparsity.sparsifier import Sparsifier
    from .sparsity.targets import describe_sparsity, select_parameters, sparsifiable_parameters
    from .sparsity.topology import UpdateReport

__version__ = "0.1.0"

#: Each public name and the module (of this package) that defines it.
_EXPORTS: dict[str, str] = {name: module for module, names in {
    "sparsity.config": "SparsityConfig",
    "sparsity.criteria": (
        "Criterion GrowCriterion list_drop_criteria list_grow_criteria list_prune_criteria register_drop_criterion "
        "register_grow_criterion register_prune_criterion"),
    "sparsity.coverage": "Coverage ParameterEntry",
    "parallel.mask_sync": "MaskDivergenceError broadcast_masks mask_checksum verify_masks",
    "sparsity.distributions": "Distribution allocate_counts layer_counts list_distributions register_distribution",
    "deploy.export": "ExportInfo export_run export_sparse load_masks load_sparse",
    "deploy.inference": "plan_sparse_inference to_semi_structured to_sparse_inference",
    "baselines.lottery": "LotteryTicket",
    "methods": "create_sparsifier describe_method list_methods method_config method_preset register_method",
    "baselines.saliency": "prune_at_init",
    "sparsity.targets": "describe_sparsity select_parameters sparsifiable_parameters",
    "sparsity.schedules": "DropFractionSchedule PruningSchedule list_drop_decays register_drop_decay",
    "sparsity.sparsifier": "Sparsifier",
    "sparsity.topology": "UpdateReport",
}.items() for name in names.split()}


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule) on first use."""
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = _EXPORTS.get(name)
    if module is None:
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "SparsityConfig",
    "Sparsifier",
    "UpdateReport",
    "PruningSchedule",
    "DropFractionSchedule",
    "MaskDivergenceError",
    "broadcast_masks",
    "mask_checksum",
    "verify_masks",
    "allocate_counts",
    "Distribution",
    "Criterion",
    "GrowCriterion",
    "list_distributions",
    "list_drop_decays",
    "list_drop_criteria",
    "list_grow_criteria",
    "list_prune_criteria",
    "method_preset",
    "register_distribution",
    "register_drop_decay",
    "register_drop_criterion",
    "register_grow_criterion",
    "register_prune_criterion",
    "layer_counts",
    "create_sparsifier",
    "describe_method",
    "list_methods",
    "method_config",
    "register_method",
    "sparsifiable_parameters",
    "ExportInfo",
    "export_run",
    "export_sparse",
    "load_masks",
    "load_sparse",
    "plan_sparse_inference",
    "to_semi_structured",
    "to_sparse_inference",
    "prune_at_init",
    "LotteryTicket",
    "select_parameters",
    "describe_sparsity",
    "Coverage",
    "ParameterEntry",
]
