"""FLOPs accounting for sparse networks, the way RigL and GraNet report results.

Three quantities are reported in the sparse-training literature (Evci et al., "Rigging the Lottery",
ICML 2020, appendix H; Liu et al., GraNet, NeurIPS 2021):

* **Dense inference FLOPs** ``f_D``: the FLOPs of one forward pass of one example through the dense
  model. They are *measured* here from a real forward pass with PyTorch's own
  :class:`torch.utils.flop_counter.FlopCounterMode`, which counts 2 FLOPs per multiply-add for
  convolutions and matrix products (RigL's convention): a ``Conv2d`` costs
  ``2 * (C_in / groups) * k_h * k_w * C_out * H_out * W_out`` and a ``Linear``
  ``2 * in_features * out_features``. Each op's share is attributed to the sparsified weight it reads
  (matched by tensor storage, so ``Conv1D``, ``MultiheadAttention``'s ``in_proj_weight`` and RNN
  weights count too); whatever else the counter sees (``bmm``, attention, ...) is ``other``.
  PyTorch's counter sees no FLOPs inside the fused CPU/cuDNN RNN kernels, so ``nn.LSTM``/``nn.GRU``
  weights measure 0 FLOPs (they are still masked and counted as parameters).
  Bias additions, normalisation, activations and pooling are not counted by ``FlopCounterMode``.
* **Sparse inference FLOPs** ``f_S``: every Conv/Linear layer's dense FLOPs scaled by its density
  (a layer with density ``d_l`` does ``d_l`` of the multiply-adds), ``other`` counted dense::

      f_S = sum_l d_l * f_l + f_other

* **Training FLOPs**, summed over the real mask trajectory (:class:`TrainingFlopsLedger`). One
  training step is a forward pass, the backward pass w.r.t. activations and the backward pass w.r.t.
  weights, each costing about one forward pass at the current masks: ``3 * f_S``. A step that needs
  the *dense* gradient (RigL/GraNet gradient-regrowth steps; every SNFS step, since SNFS keeps dense
  momentum) computes the weight gradient densely: ``2 * f_S + f_D``. Per-step averages follow:

      SET / static:          3 f_S
      RigL (ΔT, 1 update):   (3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1)
      SNFS:                  2 f_S + f_D
      pruning (GMP, GraNet): 3 f_D (1 - mean sparsity) for a single layer (f_S tracks the masks)

  Dense-to-sparse methods pay the dense cost during their dense phase automatically, because
  ``f_S = f_D`` while the masks are dense.

Agreement with RigL's published ImageNet ResNet-50 numbers: the dense forward pass measures
8,178,368,512 FLOPs (RigL: 8.2e9). With every Conv/Linear weight sparsified by ERK, the inference
FLOPs ratio is 0.414 at 80% sparsity and 0.242 at 90% (RigL Table 2: 0.42 and 0.24); with uniform
sparsity and ``conv1`` kept dense (``fc`` sparse at the same sparsity, as in RigL's counting colab
``Resnet_50_Param_Flops_Counting.ipynb``) it is 0.223 and 0.126 (RigL: 0.23 and 0.13). The small,
consistently low residual comes from RigL counting with the MicroNet-challenge counter, which adds a
dense bias addition and a ReLU per output element of *every* Conv/Dense layer
(``counting.Conv2D(..., use_bias=True, activation='relu')`` in ``rigl/sparse_utils.py:get_stats``):
about 2 x 11.1M = 22.2M extra dense FLOPs, which moves our ratios to 0.415, 0.244, 0.225 and 0.128.
We do not add those: they are not operations the PyTorch models perform (most convolutions have no
bias), and the brief is to measure what the forward pass actually does.

Command line: ``granet flops --model M [--dataset D] [--method NAME] [--distribution uniform|er|erk]
[--density 0.1] [--keep-dense PATTERN ...] [--json]`` (see :func:`granet.cli.flops.add_arguments`).
"""
from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union, cast

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from ..sparsity.sparsifier import Sparsifier
from ..sparsity.targets import DEFAULT_LAYER_TYPES, sparsifiable_parameters

logger = logging.getLogger(__name__)

__all__ = [
    "LayerFlops",
    "layer_flops",
    "inference_flops",
    "inference_flops_relative",
    "TrainingFlopsLedger",
    "step_needs_dense_gradient",
    "SCORING_PASSES",
    "scoring_flops",
]

ExampleInput = Union[torch.Tensor, Sequence[torch.Tensor]]

#: ``granet flops`` defaults: the overall density, and the distribution used when no method gives one
#: (and as the estimate for global-pruning methods, whose final layer densities are only known after
#: training).
DEFAULT_DENSITY = 0.1
DEFAULT_DISTRIBUTION = "erk"
# Methods give schedule positions as fractions of training; any run length resolves them for the
# validation that ``method_config`` does (a length of 1 step would collapse t0 = tf = 0 for pruning).
_NOMINAL_STEPS = 10_000


# ---------------------------------------------------------------------------------------------- measuring


@dataclass
class LayerFlops:
    """Dense forward FLOPs of one example, split by sparsifiable weight.

    Attributes:
        layers: dense FLOPs of every Conv/Linear weight, keyed by the parameter name
            :func:`granet.sparsifiable_parameters` uses (``"layer1.0.conv1.weight"``), in module
            order. A module called several times (or modules sharing a weight) add up under one name;
            a layer never called in the forward pass has 0.
        shapes: the shape of each of those weights.
        other: FLOPs of everything else the counter saw (not scaled by any density).
    """

    layers: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    other: int = 0

    @property
    def dense(self) -> int:
        """Dense forward FLOPs ``f_D`` of one example: all layers plus ``other``."""
        return sum(self.layers.values()) + self.other

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dictionary (JSON friendly)."""
        return {
            "layers": dict(self.layers),
            "shapes": {n: list(s) for n, s in self.shapes.items()},
            "other": self.other,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerFlops":
        """Inverse of :meth:`to_dict`."""
        return cls(
            layers={str(n): int(v) for n, v in data["layers"].items()},
            shapes={str(n): tuple(int(d) for d in s) for n, s in data.get("shapes", {}).items()},
            other=int(data.get("other", 0)),
        )


def _as_args(example_input: ExampleInput) -> tuple[torch.Tensor, ...]:
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    args = tuple(example_input)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise TypeError("example_input must be a tensor or a non-empty sequence of tensors")
    return args


class _ParameterFlops(TorchDispatchMode):
    """Attribute each counted op's FLOPs to the sparsified weight it reads (by tensor storage).

    Matching storages rather than modules also finds weights used functionally or through views:
    ``nn.MultiheadAttention``'s ``in_proj_weight`` (or its q/k/v chunks) and ``out_proj.weight``,
    the transposed ``Conv1D``/``Linear`` weight of ``addmm``, and RNN gate weights.
    """

    def __init__(self, storages: dict[int, str]) -> None:
        super().__init__()
        self.storages = storages
        self.flops: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in flop_registry:
            hits = {self.storages.get(a.untyped_storage().data_ptr()) for a in args if isinstance(a, torch.Tensor)}
            hits.discard(None)
            if len(hits) == 1:  # an op reading two sparsified weights at once cannot be split: "other"
                name = cast(str, hits.pop())
                self.flops[name] = self.flops.get(name, 0) + int(flop_registry[packet](*args, **kwargs, out_val=out))
        return out


def layer_flops(
    model: nn.Module,
    example_input: ExampleInput,
    layer_types: Sequence[Any] = DEFAULT_LAYER_TYPES,
) -> LayerFlops:
    """Measure the dense forward FLOPs of every Conv/Linear weight from a real forward pass.

    The model runs once in eval mode (batch-norm uses running statistics, so a batch of one works)
    under ``torch.no_grad()`` inside :class:`~torch.utils.flop_counter.FlopCounterMode`; its
    train/eval mode is restored afterwards. Every counted op that reads exactly one sparsified weight
    (or a view of it) adds its FLOPs to that weight.

    Args:
        model: the model (a DDP or ``torch.compile`` wrapper is fine: names are stripped of
            ``module.`` / ``_orig_mod.`` as by :func:`granet.sparsifiable_parameters`).
        example_input: one input example, a tensor of shape ``(1, ...)`` (or a sequence of tensors
            passed as positional arguments), on the model's device. FLOPs are reported per example:
            with a batch of ``B > 1`` (the first dimension of the first tensor) counts are divided by
            ``B``.
        layer_types: module types whose weights are attributed separately (as for the sparsifier).

    Returns:
        The per-layer and ``other`` FLOPs of one example.
    """
    args = _as_args(example_input)
    batch = int(args[0].shape[0]) if args[0].dim() > 0 else 1
    if batch < 1:
        raise ValueError("example_input has an empty batch dimension")
    # The same names (and tied-weight de-duplication) as the sparsifier uses.
    named = sparsifiable_parameters(model, layer_types=layer_types)
    raw: dict[str, int] = {n: 0 for n, _ in named}
    shapes = {n: tuple(int(d) for d in p.shape) for n, p in named}
    counter = FlopCounterMode(display=False)
    attributor = _ParameterFlops({p.untyped_storage().data_ptr(): n for n, p in named})
    was_training = model.training
    try:
        model.eval()
        # Grad mode on: under no_grad, MultiheadAttention takes a fused fast path and RNNs a fused
        # kernel whose FLOPs the counter does not see; with autograd on they run as counted matmuls.
        with torch.enable_grad(), counter, attributor:
            model(*args)
    finally:
        model.train(was_training)
    for name, value in attributor.flops.items():
        raw[name] += value
    total = int(counter.get_total_flops())
    other = total - sum(raw.values())

    def per_example(value: int) -> int:
        # Conv/matmul counts are exactly linear in the batch size, so this division is exact.
        return value // batch if value % batch == 0 else int(round(value / batch))

    result = LayerFlops(
        layers={n: per_example(v) for n, v in raw.items()}, shapes=shapes, other=per_example(other)
    )
    logger.debug(
        "measured %d dense forward FLOPs per example (%d Conv/Linear weights, %d other)",
        result.dense, len(result.layers), result.other,
    )
    return result


def _check_densities(flops: LayerFlops, layer_density: Mapping[str, float]) -> None:
    unknown = [n for n in layer_density if n not in flops.layers]
    if unknown:
        raise ValueError(
            f"layer_density names no measured Conv/Linear weight: {', '.join(unknown)} "
            f"(known: {', '.join(flops.layers) or 'none'})"
        )
    bad = [
        f"{n}={d!r}" for n, d in layer_density.items()
        if isinstance(d, bool) or not isinstance(d, numbers.Real) or not 0.0 <= float(d) <= 1.0
    ]
    if bad:
        raise ValueError(f"layer densities must be numbers in [0, 1]: {', '.join(bad)}")


def inference_flops(layer_flops: LayerFlops, layer_density: Mapping[str, float]) -> float:
    """Sparse forward FLOPs of one example: ``f_S = sum_l d_l * f_l + f_other``.

    Args:
        layer_flops: the measured dense FLOPs (:func:`layer_flops`).
        layer_density: density of each sparsified weight by name; missing names count dense.

    Returns:
        FLOPs of one sparse forward pass.

    Raises:
        ValueError: a name is not a measured weight, or a density is outside [0, 1].
    """
    flops = layer_flops
    _check_densities(flops, layer_density)
    return float(sum(f * float(layer_density.get(n, 1.0)) for n, f in flops.layers.items()) + flops.other)


def inference_flops_relative(layer_flops: LayerFlops, layer_density: Mapping[str, float]) -> float:
    """Sparse forward FLOPs relative to dense: ``f_S / f_D`` (1.0 = dense cost).

    Raises:
        ValueError: as :func:`inference_flops`, or the model performs no counted FLOPs.
    """
    if layer_flops.dense <= 0:
        raise ValueError("the model's forward pass performs no counted FLOPs; a ratio is undefined")
    return inference_flops(layer_flops, layer_density) / layer_flops.dense


# ---------------------------------------------------------------------------------------------- training


class TrainingFlopsLedger:
    """Accumulates training FLOPs over the real mask trajectory (RigL's accounting).

    Call :meth:`record` once per optimizer step (or once per run of steps with the same masks) with
    the densities the step ran at. Per example, a normal step costs ``3 * f_S``; a step that needs
    the dense gradient costs ``2 * f_S + f_D``; the dense reference costs ``3 * f_D`` per step.
    Multiply :attr:`total` by the number of examples per step for absolute FLOPs of a run.

    Args:
        layer_flops: the model's measured dense FLOPs (:func:`layer_flops`).

    Example::

        ledger = TrainingFlopsLedger(layer_flops(model, torch.zeros(1, 3, 32, 32)))
        ...
        optimizer.step()
        dense_grad = step_needs_dense_gradient(sparsifier, sparsifier.step_count + 1)
        sparsifier.step()
        ledger.record(sparsifier.layer_density(), dense_gradient=dense_grad)
        print(ledger.relative)  # e.g. 0.42 = 42% of dense training so far
    """

    def __init__(self, layer_flops: LayerFlops) -> None:
        self.flops = layer_flops
        self._total = 0.0
        self._steps = 0
        self._extra: dict[str, float] = {}

    def record(self, layer_density: Mapping[str, float], steps: int = 1, dense_gradient: bool = False) -> float:
        """Add ``steps`` training steps run at ``layer_density``.

        Args:
            layer_density: density of each sparsified weight by name (missing names are dense).
            steps: number of steps run at these masks (>= 0).
            dense_gradient: whether these steps compute the dense weight gradient (RigL/GraNet
                regrowth steps, every SNFS step): ``2 f_S + f_D`` instead of ``3 f_S`` per step.

        Returns:
            The FLOPs added.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        f_s = inference_flops(self.flops, layer_density)
        # forward (f_S) + grad w.r.t. activations (f_S) + grad w.r.t. weights (f_S, or f_D if dense)
        per_step = 2.0 * f_s + (self.flops.dense if dense_gradient else f_s)
        added = steps * per_step
        self._total += added
        self._steps += steps
        return added

    def record_extra(self, flops: float, label: str) -> float:
        """Add work done outside the training steps (e.g. scoring at initialisation) to :attr:`total`.

        Args:
            flops: the work in the ledger's unit, FLOPs per example of a training step: the absolute
                FLOPs divided by the number of examples per optimizer step (the global batch size).
            label: what the work was (``"scoring"``); :attr:`extra` sums the recorded work by label.

        Returns:
            The FLOPs added. The step count is unchanged, so :attr:`relative` compares the training
            steps *plus* this work with dense training over the same steps.
        """
        if isinstance(flops, bool) or not isinstance(flops, numbers.Real) or not 0.0 <= float(flops) < math.inf:
            raise ValueError(f"flops must be a finite number >= 0, got {flops!r}")
        if not isinstance(label, str) or not label:
            raise ValueError(f"label must be a non-empty string, got {label!r}")
        self._total += float(flops)
        self._extra[label] = self._extra.get(label, 0.0) + float(flops)
        return float(flops)

    @property
    def extra(self) -> dict[str, float]:
        """Work recorded with :meth:`record_extra`, by label (included in :attr:`total`)."""
        return dict(self._extra)

    @property
    def total(self) -> float:
        """Training FLOPs of one example per step, summed over the recorded steps (and extra work)."""
        return self._total

    @property
    def dense_total(self) -> float:
        """Dense training FLOPs over the same steps: ``3 * f_D * steps``."""
        return 3.0 * self.flops.dense * self._steps

    @property
    def relative(self) -> Optional[float]:
        """``total / dense_total`` (1.0 = dense training); ``None`` before any step is recorded."""
        dense = self.dense_total
        return self._total / dense if dense > 0 else None

    @property
    def steps(self) -> int:
        """Number of recorded steps."""
        return self._steps

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume the ledger."""
        return {"format": 1, "total": self._total, "steps": self._steps, "dense_forward": self.flops.dense,
                "extra": dict(self._extra)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`.

        Raises:
            ValueError: the state is malformed or was measured on a model with different dense FLOPs.
        """
        try:
            total, steps, dense = float(state["total"]), int(state["steps"]), state.get("dense_forward")
            extra = {str(k): float(v) for k, v in dict(state.get("extra") or {}).items()}  # absent before it existed
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a TrainingFlopsLedger state: {exc}") from None
        if dense is not None and not math.isclose(float(dense), self.flops.dense, rel_tol=1e-9):
            raise ValueError(
                f"ledger state was recorded for a model with {dense} dense forward FLOPs, "
                f"this one has {self.flops.dense}"
            )
        self._total, self._steps, self._extra = total, steps, extra

    def __repr__(self) -> str:
        rel = self.relative
        return f"TrainingFlopsLedger(steps={self._steps}, relative={'n/a' if rel is None else f'{rel:.4f}'})"


def step_needs_dense_gradient(sparsifier: Sparsifier, step: int) -> bool:
    """Whether optimizer step ``step`` of ``sparsifier``'s method computes the dense weight gradient.

    Gradient regrowth (RigL, GraNet) needs it on its regrowth update steps; momentum regrowth (SNFS)
    needs dense momentum, hence the dense gradient, on every step while regrowth is configured;
    random regrowth (SET), pruning and static masks never do. The sparsifier decides
    (:meth:`~granet.sparsity.sparsifier.Sparsifier.needs_dense_gradient`); this is kept for callers of the
    function.

    Args:
        sparsifier: the sparsifier.
        step: the 1-based optimizer step (``sparsifier.step_count + 1`` before ``sparsifier.step()``).
    """
    return sparsifier.needs_dense_gradient(step)


# ---------------------------------------------------------------------------------------------- scoring

#: Dense passes per scored example of pruning at initialisation, in the ledger's units (forward 1,
#: backward 2, as in a step's 3 f_S): SNIP one forward + backward (3); GraSP the gradient pass (3),
#: then a forward (1), a backward keeping its graph (2) and the double backward of the
#: Hessian-gradient product, which differentiates the backward graph (4) and the forward graph (2);
#: SynFlow one forward + backward of one all-ones example per round (3). ``FlopCounterMode`` around
#: the scoring of a 1-256-256-256-10 MLP measures 2.998 and 11.99 (the first layer's input
#: gradient, which autograd skips, is the difference; the ledger's 3 f_S counts it as well).
SCORING_PASSES = {"snip": 3.0, "grasp": 12.0, "synflow": 3.0}


def scoring_flops(method: str, layer_flops: LayerFlops, examples: int, rounds: int = 100) -> float:
    """Absolute FLOPs one process spends scoring at initialisation (all dense passes).

    Args:
        method: ``snip``, ``grasp`` or ``synflow``.
        layer_flops: the model's measured dense FLOPs (``f_D`` per example).
        examples: examples scored (SNIP and GraSP: the sum of the scoring batches' sizes; SynFlow
            ignores it: it scores one all-ones example per round).
        rounds: SynFlow's pruning rounds (:func:`granet.baselines.saliency.synflow`'s default is 100).

    Returns:
        ``SCORING_PASSES[method] * f_D * examples`` (SynFlow: ``* rounds``).

    Raises:
        ValueError: an unknown method, or a count below 1.
    """
    if method not in SCORING_PASSES:
        raise ValueError(f"no scoring cost is known for {method!r}; valid: {', '.join(SCORING_PASSES)}")
    count = rounds if method == "synflow" else examples
    name = "rounds" if method == "synflow" else "examples"
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{name} must be a positive integer, got {count!r}")
    return SCORING_PASSES[method] * layer_flops.dense * count
