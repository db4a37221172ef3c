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
"""
from .config import SparsityConfig
from .criteria import (
    Criterion, GrowCriterion, list_drop_criteria, list_grow_criteria, list_prune_criteria, register_drop_criterion,
    register_grow_criterion, register_prune_criterion,
)
from .coverage import Coverage, ParameterEntry
from .distributed import MaskDivergenceError, broadcast_masks, mask_checksum, verify_masks
from .distributions import Distribution, allocate_counts, layer_counts, list_distributions, register_distribution
from .export import ExportInfo, export_run, export_sparse, load_masks, load_sparse
from .inference import plan_sparse_inference, to_semi_structured, to_sparse_inference
from .lottery import LotteryTicket
from .methods import (
    create_sparsifier, describe_method, list_methods, method_config, method_preset, register_method,
)
from .saliency import prune_at_init
from .selection import describe_sparsity, select_parameters, sparsifiable_parameters
from .schedules import DropFractionSchedule, PruningSchedule, list_drop_decays, register_drop_decay
from .sparsifier import Sparsifier
from .topology import UpdateReport

__version__ = "0.1.0"

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
