"""Sparse execution: run the masked ``nn.Linear`` layers of a sparsifier's model on sparse kernels.

A sparsifier keeps inactive weights at zero, but the layers still multiply the whole dense matrix.
:class:`SparseExecution` switches the masked ``nn.Linear`` layers to
:func:`granet.kernels.sparse_linear.sparse_linear`: forward, input gradient and weight gradient cost
O(active weights) instead of O(all weights) on the CPU. The parameters stay ordinary dense
parameters (state-dict keys, optimizer, checkpoints, DDP unchanged); their gradient is zero at the
inactive positions and, at the active ones, that of the masked dense layer up to the order of the
float sums::

    sparsifier = granet.create_sparsifier("granet-st", model, optimizer, density=0.05, total_steps=T)
    execution = SparseExecution(model, sparsifier)          # mode="auto"
    for x, y in loader:                                     # the loop is unchanged
        loss = criterion(model(x), y)
        ...

What it does before every forward pass of ``model`` (a forward pre-hook; :meth:`SparseExecution.refresh`
does the same by hand), from the sparsifier's public state only:

* **masks changed** (a topology update, ``set_masks``, ``load_state_dict``): a layer's layout is
  rebuilt when its mask is another tensor, or the same tensor changed in place (its version);
* **dense gradients**: when ``sparsifier.needs_dense_gradient(sparsifier.upcoming_step)`` (the
  coming optimizer step is a regrowth update ranking inactive weights by their gradient: RigL,
  GraNet; every step for SNFS) the layers compute the dense weight gradient (forward and input
  gradient stay sparse). The same question the training-FLOPs ledger asks. Micro-batches of one
  accumulated step all ask it at the same step count, so they agree;
* ``mode="auto"``: a layer runs sparse while its density is at most ``max_density``
  (:data:`AUTO_MAX_DENSITY`) and its weight has at least ``min_size`` entries
  (:data:`AUTO_MIN_SIZE`), dense otherwise (a dense-to-sparse run switches its layers as pruning
  takes them below the threshold). ``"sparse"`` runs every eligible layer sparse, ``"dense"`` none
  (the masked dense path, bit for bit).

Which layers: the modules whose class is exactly ``nn.Linear`` and whose weight the sparsifier
masks. Everything else stays dense, with its reason in :meth:`SparseExecution.plan`: convolutions
(also named in one log line: sparse execution covers Linear layers), subclasses of ``nn.Linear``
(their forward may differ: ``nn.MultiheadAttention``'s ``out_proj`` is never called as a module),
other masked weights, and, in auto mode, weights that are not float32. Refused with a one-line
error: a layer already switched by another :class:`SparseExecution`, a sharded (FSDP)
sparsifier, a model on CUDA (this is CPU execution; use ``mode="dense"``) and, with
``mode="sparse"``, a float weight other than float32.

A switched layer's class becomes :class:`SparseLinear` (a subclass of ``nn.Linear``; the same way
``torch.nn.utils.parametrize`` re-classes a module), keeping its parameters, hooks and name;
:meth:`SparseExecution.remove` restores it. Outputs of sparse layers are stored features-major
(see :mod:`granet.kernels.sparse_linear`): pass ``contiguous_output=True`` where the model views a
Linear output in a way only a row-major tensor allows (``.view(-1)``, merging the feature dimension).

Differences from the masked dense path, by design: the gradient at inactive positions is zero on
steps that do not need it (the optimizer then moves no inactive weight, and the sparsifier zeroes
them anyway); with ``mask_optimizer_state=False`` the optimizer state of inactive weights is part
of the method (SNFS), so every step then computes the dense gradient. Measure FLOPs
(:func:`granet.accounting.flops.layer_flops`) before switching: a sparse layer reads a copy of its
active values, which the FLOPs counter does not attribute to the weight.

The auto thresholds (:data:`AUTO_MAX_DENSITY`, :data:`AUTO_MIN_SIZE`) were measured with
``benchmarks/bench_sparse_training.py --section crossover``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, short_repr
from ..kernels.sparse_linear import LinearLayout, sparse_linear
from .sparsifier import Sparsifier

logger = logging.getLogger(__name__)

MODES = ("auto", "dense", "sparse")
#: Auto mode runs a layer sparse at this density or below. One layer's forward + backward (768x3072
#: and 3072x768 at 2048 rows, 1024x1024 at 256 rows; 1 and 2 threads), dense time / sparse time:
#: 0.94-2.14 at density 0.05, 0.94-1.63 at 0.07, 0.67-1.55 at 0.1 (``bench_sparse_training.py
#: --section crossover``, on a loaded 2-core machine).
AUTO_MAX_DENSITY = 0.05
#: ... and only if its weight has at least this many entries: at density 0.05, layers of 65,536
#: entries and fewer were slower sparse (0.42-0.73 of dense at 64-100 rows), of 235,200 and more
#: mostly faster (0.92-1.56 at 64 rows, 1.23-1.24 for 512x512 at 128 rows).
AUTO_MIN_SIZE = 2**17


class _LayerState:
    """What a :class:`SparseLinear` needs for its next forward pass (set by :class:`SparseExecution`)."""

    __slots__ = ("layout", "dense_grad", "contiguous_output")

    def __init__(self, contiguous_output: bool) -> None:
        self.layout: Optional[LinearLayout] = None  # None: run dense
        self.dense_grad = False
        self.contiguous_output = contiguous_output


class SparseLinear(nn.Linear):
    """An ``nn.Linear`` run by :func:`~granet.kernels.sparse_linear.sparse_linear` while it has a layout.

    Never built directly: :class:`SparseExecution` re-classes the model's own ``nn.Linear`` modules.
    """

    _sparse_state: _LayerState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x Wᵀ + b``: sparse while the execution gives the layer a layout, else ``F.linear``."""
        state = self._sparse_state
        if state.layout is None:
            return F.linear(x, self.weight, self.bias)
        return sparse_linear(x, self.weight, state.layout, self.bias, dense_grad=state.dense_grad,
                             contiguous_output=state.contiguous_output)


@dataclasses.dataclass
class LayerPlan:
    """One masked weight: whether it runs sparse now, and why (or why not)."""

    name: str
    shape: tuple[int, ...]
    density: float
    sparse: bool
    reason: str


@dataclasses.dataclass
class _Layer:
    name: str  # the sparsifier's parameter name
    module: nn.Linear
    state: _LayerState
    mask: Optional[torch.Tensor] = None  # the mask the layout was built from
    version: int = -1
    active: int = 0  # active weights under that mask
    density: float = 1.0


class SparseExecution:
    """Runs a sparsifier's masked ``nn.Linear`` layers on sparse CPU kernels (see the module notes).

    Args:
        model: the model the sparsifier was built on.
        sparsifier: the model's :class:`~granet.sparsity.sparsifier.Sparsifier` (read only).
        mode: ``"auto"`` (by density and size), ``"sparse"`` (every eligible layer) or ``"dense"``.
        max_density: auto mode's density threshold (a layer at or below it may run sparse).
        min_size: auto mode's smallest weight (entries) to run sparse.
        contiguous_output: sparse layers return row-major outputs (one copy) instead of features-major ones.

    Raises:
        ConfigError: an unknown mode, a threshold out of range, a sharded sparsifier, a CUDA model
            (modes other than ``"dense"``), or a non-float32 masked Linear weight in ``"sparse"`` mode.
        TypeError: ``model`` or ``sparsifier`` of the wrong type.
    """

    def __init__(self, model: nn.Module, sparsifier: Sparsifier, mode: str = "auto",
                 max_density: float = AUTO_MAX_DENSITY, min_size: int = AUTO_MIN_SIZE,
                 contiguous_output: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(sparsifier, Sparsifier):
            raise TypeError(f"sparsifier must be a granet Sparsifier, got {type(sparsifier).__name__}")
        if mode not in MODES:
            raise ConfigError(f"unknown execution mode {short_repr(mode)}; valid: {', '.join(MODES)}")
        if isinstance(max_density, bool) or not isinstance(max_density, (int, float)) or not 0 <= max_density <= 1:
            raise ConfigError(f"max_density must be a number in [0, 1], got {short_repr(max_density)}")
        if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
            raise ConfigError(f"min_size must be an int >= 0, got {short_repr(min_size)}")
        if sparsifier.sharded:
            raise ConfigError("sparse execution needs whole weights; this sparsifier is sharded (FSDP): use "
                              "mode='dense' or train without --fsdp")
        self.mode, self.max_density, self.min_size = mode, float(max_density), min_size
        self._sparsifier = sparsifier
        self._model = model
        self._dense_every_step = not sparsifier.config.mask_optimizer_state
        self.rebuilds = 0  # layouts built (at construction and after every mask change)
        self.dense_gradient_passes = 0  # forward passes whose weight gradient was dense
        self._layers: list[_Layer] = []
        self._skipped: list[LayerPlan] = []
        self._find_layers(model, contiguous_output)
        self._hook: Optional[Any] = None
        if self._layers:
            for layer in self._layers:
                layer.module.__class__ = SparseLinear
                setattr(layer.module, "_sparse_state", layer.state)  # noqa: B010  (nn.Module's typing)
            self._hook = model.register_forward_pre_hook(self._before_forward)
            self.refresh()
        logger.info("%s", self.summary())

    # ------------------------------------------------------------------ layers

    def _find_layers(self, model: nn.Module, contiguous_output: bool) -> None:
        names = self._sparsifier.names
        by_param = {id(p): (n, i) for i, (n, p) in enumerate(zip(names, self._sparsifier.params))}
        masks = self._sparsifier.masks
        found: set[str] = set()
        convs: list[str] = []
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or id(weight) not in by_param:
                continue
            name, _ = by_param[id(weight)]
            shape = tuple(weight.shape)
            density = float(masks[name].sum()) / max(1, weight.numel())
            if isinstance(module, SparseLinear):
                raise ConfigError(f"the layer of {name} is already run by another SparseExecution: remove() it first")
            if isinstance(module, nn.modules.conv._ConvNd):
                convs.append(name)
                self._skip(name, shape, density, "a convolution (sparse execution covers nn.Linear)", found)
                continue
            if type(module) is not nn.Linear:
                self._skip(name, shape, density, f"a {type(module).__name__}, not an nn.Linear (its forward may "
                                                 "differ)", found)
                continue
            if self.mode != "dense" and weight.device.type != "cpu":
                raise ConfigError(f"sparse execution runs on the CPU; {name} is on {weight.device} (use "
                                  "mode='dense' on GPUs)")
            if weight.dtype != torch.float32:
                if self.mode == "sparse":
                    raise ConfigError(f"sparse execution needs float32 weights; {name} is {weight.dtype} (use "
                                      "mode='auto' to keep it dense, or mode='dense')")
                self._skip(name, shape, density, f"{weight.dtype} (sparse kernels are float32)", found)
                continue
            if name in found:
                continue  # one module per weight: a shared weight is switched in its first module
            found.add(name)
            self._layers.append(_Layer(name, module, _LayerState(contiguous_output)))
        for name, param in zip(names, self._sparsifier.params):
            if name not in found:
                self._skip(name, tuple(param.shape), self._sparsifier.layer_density()[name],
                           "not the weight of a module (used functionally)", found)
        if convs and self.mode != "dense":
            log = logger.warning if self.mode == "sparse" else logger.info
            log("sparse execution: %d convolution weight%s stay dense (%s%s): sparse execution covers nn.Linear",
                len(convs), "" if len(convs) == 1 else "s", ", ".join(convs[:3]), " ..." if len(convs) > 3 else "")

    def _skip(self, name: str, shape: tuple[int, ...], density: float, reason: str, found: set[str]) -> None:
        if name not in found:
            found.add(name)
            self._skipped.append(LayerPlan(name, shape, density, False, reason))

    def _wanted(self, layer: _Layer) -> tuple[bool, str]:
        """Whether ``layer`` runs sparse at its current density, and why."""
        if self.mode == "dense":
            return False, "mode dense"
        if self.mode == "sparse":
            return True, "mode sparse"
        if layer.module.weight.numel() < self.min_size:
            return False, f"smaller than {self.min_size} entries (auto)"
        if layer.active > round(self.max_density * layer.module.weight.numel()):  # the count a density d keeps
            return False, f"density above {self.max_density:g} (auto)"
        return True, f"density at most {self.max_density:g} (auto)"

    # ------------------------------------------------------------------ every forward pass

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Bring every layer in line with the sparsifier now: rebuild the layouts of changed masks,
        apply auto mode's thresholds, and set the weight-gradient mode of the coming optimizer step.
        Runs by itself before every forward pass of the model."""
        sparsifier = self._sparsifier
        masks = sparsifier.masks
        dense_grad = self._dense_every_step or sparsifier.needs_dense_gradient(sparsifier.upcoming_step)
        any_sparse = False
        for layer in self._layers:
            mask = masks[layer.name]
            if mask is not layer.mask or mask._version != layer.version:
                self._check_mask(layer, mask)
                layer.mask, layer.version = mask, mask._version
                layer.active = int(mask.sum())
                layer.density = layer.active / max(1, mask.numel())
                layer.state.layout = None
            sparse, _ = self._wanted(layer)
            if sparse and layer.state.layout is None:
                layer.state.layout = LinearLayout.from_mask(mask)
                self.rebuilds += 1
            elif not sparse:
                layer.state.layout = None
            layer.state.dense_grad = dense_grad
            any_sparse |= sparse
        if any_sparse and dense_grad and torch.is_grad_enabled():
            self.dense_gradient_passes += 1

    @staticmethod
    def _check_mask(layer: _Layer, mask: torch.Tensor) -> None:
        weight = layer.module.weight
        if mask.device.type != "cpu" or tuple(mask.shape) != tuple(weight.shape):
            raise ConfigError(f"sparse execution: the mask of {layer.name} is {tuple(mask.shape)} on {mask.device}, "
                              f"its weight {tuple(weight.shape)} on {weight.device}")

    # ------------------------------------------------------------------ views

    def plan(self) -> list[LayerPlan]:
        """Every masked weight, in model order of discovery: sparse now or not, and why."""
        out = []
        for layer in self._layers:
            sparse, reason = self._wanted(layer)
            out.append(LayerPlan(layer.name, tuple(layer.module.weight.shape), layer.density, sparse, reason))
        densities = self._sparsifier.layer_density()
        return out + [dataclasses.replace(p, density=densities[p.name]) for p in self._skipped]

    @property
    def sparse_layers(self) -> list[str]:
        """Names of the weights whose layers run sparse now."""
        return [layer.name for layer in self._layers if layer.state.layout is not None]

    def summary(self) -> str:
        """One line: the mode and how many masked weights run sparse."""
        plans = self.plan()
        sparse = sum(p.sparse for p in plans)
        auto = f", max density {self.max_density:g}, min size {self.min_size}" if self.mode == "auto" else ""
        grads = "; dense weight gradients every step (mask_optimizer_state=False)" if self._dense_every_step else ""
        return (f"sparse execution ({self.mode}{auto}): {sparse} of {len(plans)} masked weights run sparse, "
                f"{len(plans) - sparse} dense{grads}")

    def remove(self) -> None:
        """Give the layers back their ``nn.Linear`` class and stop following the sparsifier."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for layer in self._layers:
            layer.module.__class__ = nn.Linear
            del layer.module._sparse_state
        self._layers = []

    def __repr__(self) -> str:
        return f"SparseExecution({self.summary()})"
