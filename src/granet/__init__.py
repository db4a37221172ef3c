"""granet: sparse training for PyTorch.

GraNet (gradual magnitude pruning + zero-cost neuroregeneration, Liu et al., NeurIPS 2021), its
sparse-to-sparse form GraNet-ST, and the methods it is compared with (dense, static, GMP, SET, RigL,
SNFS), as a sparsifier you step after ``optimizer.step()`` in your own training loop::

    import granet
    sparsifier = granet.create_sparsifier("granet", model, optimizer, density=0.1, total_steps=T)
    ...
    optimizer.step()
    sparsifier.step()
"""
from .config import SparsityConfig
from .coverage import Coverage, ParameterEntry
from .distributed import MaskDivergenceError, broadcast_masks, mask_checksum, verify_masks
from .distributions import allocate_counts, layer_counts
from .methods import create_sparsifier, describe_method, list_methods, method_config, register_method
from .schedules import DropFractionSchedule, PruningSchedule
from .selection import describe_sparsity, select_parameters
from .sparsifier import Sparsifier, UpdateReport, sparsifiable_parameters

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
    "layer_counts",
    "create_sparsifier",
    "describe_method",
    "list_methods",
    "method_config",
    "register_method",
    "sparsifiable_parameters",
    "select_parameters",
    "describe_sparsity",
    "Coverage",
    "ParameterEntry",
]
