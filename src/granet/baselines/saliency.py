"""Pruning at initialisation: SNIP, GraSP and SynFlow scores, and exact global masks from them.

Each method scores every sparsified weight once, before training, and keeps a fixed global mask
with exactly ``round(density * total)`` weights (ties at the threshold broken by a generator seeded
from ``seed``, so the mask is a pure function of weights, data and seed):

* **SNIP** (Lee et al., ICLR 2019): connection sensitivity ``|g ⊙ w|`` with ``g = ∂L/∂w``, the
  gradient of the loss averaged over the scoring batches. Keep the highest scores.
* **GraSP** (Wang et al., ICLR 2020): ``S = -w ⊙ (H g)`` with ``H`` the Hessian of the loss and
  ``g`` its gradient. ``Hg`` is one Hessian-vector product by double backward: ``g`` is computed and
  detached, then ``Hg = ∂(g · ∂L/∂w)/∂w``. Removing weight ``w_q`` changes the gradient norm
  ``gᵀg`` by about ``2 S_q``; GraSP removes the *highest* scores (the removals that reduce gradient
  flow least, or increase it) and keeps the lowest. As in the authors' released code, the logits are
  divided by ``temperature`` (200) before the loss; ``temperature=1`` is the plain loss.
* **SynFlow** (Tanaka et al., NeurIPS 2020), data-free: every floating parameter and buffer is
  replaced by its absolute value (a copy: the model is never modified, signs need no restoring),
  the network runs in eval mode (batch norm on running statistics) on one all-ones input, and
  ``R = sum(output)``. The score is ``|∂R/∂w ⊙ w|`` evaluated on the masked ``|w|``. Pruning is
  iterative: over ``n`` rounds (100 by default) the density follows ``density ** (j / n)`` and each
  round re-scores the surviving weights. The arithmetic runs in float64 because ``R`` is a product
  of every layer's weight magnitudes and over- or underflows float32 in deep networks.

SNIP and GraSP run the model in eval mode by default (as Tanaka et al.'s reference pruning loop
does), so batch-norm statistics and dropout are left alone; ``train_mode=True`` scores in training
mode and restores the batch-norm buffers afterwards. In every case the model's parameters, buffers,
train/eval flags, ``.grad`` fields and the global RNG state are the same after scoring as before.

Usage with a sparsifier (the methods ``snip``, ``grasp``, ``synflow`` start dense)::

    sparsifier = granet.create_sparsifier("snip", model, optimizer, density=0.1)
    granet.prune_at_init(sparsifier, model, batches, loss_fn=F.cross_entropy)
    # train as usual: optimizer.step(); sparsifier.step() -- the mask never changes again
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union, cast

import torch
from torch import nn
from torch.func import functional_call

from ..kernels.counter_rng import RandomSource
from ..sparsity import criteria
from ..sparsity.sparsifier import Sparsifier

logger = logging.getLogger(__name__)

__all__ = [
    "SCORING_METHODS",
    "needs_init_scoring",
    "require_scoring_before_training",
    "snip_scores",
    "grasp_scores",
    "synflow_scores",
    "snip",
    "grasp",
    "synflow",
    "prune_at_init",
]

#: Methods whose mask is scored once at initialisation by :func:`prune_at_init`.
SCORING_METHODS = ("snip", "grasp", "synflow")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = Sequence[torch.Tensor]
Params = Union[Sparsifier, Sequence[str]]
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def needs_init_scoring(method: str) -> bool:
    """Whether the registered method ``method`` needs :func:`prune_at_init` before training."""
    return method in SCORING_METHODS


def require_scoring_before_training(sparsifier: Sparsifier, optimizer: torch.optim.Optimizer) -> None:
    """Make the first ``optimizer.step()`` raise unless the scored mask is installed by then.

    A ``snip``/``grasp``/``synflow`` sparsifier starts dense; training it without
    :func:`prune_at_init` (or a ``load_state_dict`` of a scored run) would silently be another method.
    The check runs once, as an optimizer step pre-hook, and then removes itself.
    """
    method = sparsifier.config.method

    def check(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if sum(sparsifier.counts) != round(sparsifier.config.density * sparsifier.total):
            raise RuntimeError(f"method {method!r} prunes at initialisation: call granet.prune_at_init(sparsifier, "
                               "model, batches) before the first optimizer step")
        handle.remove()

    handle = optimizer.register_step_pre_hook(check)


# ---------------------------------------------------------------------------------------------- inputs


def _clean(name: str) -> str:
    """A parameter name without DDP / ``torch.compile`` prefixes (the sparsifier's naming)."""
    while name.startswith(_WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def _resolve(model: nn.Module, params: Params) -> list[tuple[str, str, nn.Parameter]]:
    """``(clean name, model name, parameter)`` for each sparsified parameter, in the given order."""
    if isinstance(params, Sparsifier):
        wanted = list(params.names)
    elif isinstance(params, str) or not all(isinstance(n, str) for n in params):
        raise TypeError("params must be a Sparsifier or a sequence of parameter names")
    else:
        wanted = list(params)
    if not wanted or len(set(wanted)) != len(wanted):
        raise ValueError(f"params must name each sparsified parameter once, got {wanted}")
    lookup = {_clean(n): (n, p) for n, p in model.named_parameters()}
    missing = [n for n in wanted if n not in lookup]
    if missing:
        raise ValueError(f"parameter(s) {', '.join(missing)} not found in the model")
    return [(n, *lookup[n]) for n in wanted]


def _as_batches(batches: Union[Batch, Iterable[Batch]]) -> list[Batch]:
    """A list of ``(input, target)`` batches; a single batch may be passed bare."""
    if isinstance(batches, (tuple, list)) and batches and isinstance(batches[0], torch.Tensor):
        batches = [batches]
    out = list(batches)
    if not out:
        raise ValueError("scoring needs at least one (input, target) batch, got none")
    for i, b in enumerate(out):
        if not isinstance(b, (tuple, list)) or len(b) != 2 or not all(isinstance(t, torch.Tensor) for t in b):
            raise ValueError(f"batch {i} must be an (input, target) pair of tensors, got {type(b).__name__}")
    return out


def _check_density(density: float) -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")


@contextlib.contextmanager
def _preserved(model: nn.Module, train_mode: bool) -> Iterator[None]:
    """Run scoring in train or eval mode; restore the modes, buffers and RNG state afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    # Only training-mode forwards write buffers (batch-norm running statistics).
    saved = {n: b.clone() for n, b in model.named_buffers()} if train_mode else {}
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        model.train(train_mode)
        try:
            yield
        finally:
            for module, mode in modes:
                module.training = mode
            with torch.no_grad():
                for name, buf in model.named_buffers():
                    if name in saved:
                        buf.copy_(saved[name])


def _keep_top(
    names: Sequence[str], scores: Sequence[torch.Tensor], keep: int, generator: RandomSource, what: str
) -> dict[str, torch.Tensor]:
    """Exact global top-``keep`` of the concatenated ``scores``, split back into named masks."""
    device = scores[0].device
    flat = torch.cat([s.detach().reshape(-1).to(device) for s in scores])
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(f"{what} scores are not finite (NaN/inf); the model's outputs over- or underflow")
    chosen = criteria.select_top(flat, keep, generator).split([s.numel() for s in scores])
    return {n: c.view(s.shape).to(s.device) for n, c, s in zip(names, chosen, scores)}


# ---------------------------------------------------------------------------------------------- scores


def _mean_gradient(model: nn.Module, weights: list[nn.Parameter], batches: list[Batch], loss_fn: LossFn,
                   scale: float, create_graph: bool = False) -> list[torch.Tensor]:
    """``∂L/∂w`` of the loss averaged over ``batches`` (logits divided by ``scale``)."""
    total = [torch.zeros_like(w) for w in weights]
    for x, y in batches:
        loss = loss_fn(model(x) / scale, y)
        grads = torch.autograd.grad(loss, weights, create_graph=create_graph)
        total = [t + g / len(batches) for t, g in zip(total, grads)]
    return total


def snip_scores(model: nn.Module, params: Params, batches: Union[Batch, Iterable[Batch]], loss_fn: LossFn,
                *, train_mode: bool = False) -> list[torch.Tensor]:
    """SNIP connection sensitivity ``|g ⊙ w|`` of each sparsified parameter.

    Args:
        model: the model at initialisation (not modified).
        params: the sparsifier, or the sparsified parameter names.
        batches: ``(input, target)`` batches (or one batch); ``g`` is the mean of their loss gradients.
        loss_fn: ``loss_fn(output, target)`` returning a scalar.
        train_mode: score in training mode (batch-norm buffers are restored afterwards).

    Returns:
        One score tensor per parameter, in the order of ``params``.
    """
    named = _resolve(model, params)
    weights = [p for _, _, p in named]
    data = _as_batches(batches)
    with _preserved(model, train_mode):
        grads = _mean_gradient(model, weights, data, loss_fn, 1.0)
    return [(g * w).detach().abs() for g, w in zip(grads, weights)]


def grasp_hessian_gradient(model: nn.Module, params: Params, batches: Union[Batch, Iterable[Batch]],
                           loss_fn: LossFn, *, temperature: float = 200.0,
                           train_mode: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The gradient ``g`` and the Hessian-gradient product ``Hg`` of the loss, by double backward.

    ``g`` is averaged over the batches and detached; then ``Hg = ∂(g · ∂L/∂w)/∂w`` for each batch's
    loss, averaged (the Hessian of the mean loss is the mean of the Hessians).

    Returns:
        ``(g, Hg)``, one tensor per parameter each, in the order of ``params``.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    named = _resolve(model, params)
    weights = [p for _, _, p in named]
    data = _as_batches(batches)
    with _preserved(model, train_mode):
        g = [t.detach() for t in _mean_gradient(model, weights, data, loss_fn, float(temperature))]
        hg = [torch.zeros_like(w) for w in weights]
        for x, y in data:
            grads = torch.autograd.grad(loss_fn(model(x) / temperature, y), weights, create_graph=True)
            dot = cast(torch.Tensor, sum((a * b).sum() for a, b in zip(grads, g)))
            hg = [h + d / len(data) for h, d in zip(hg, torch.autograd.grad(dot, weights))]
    return g, [h.detach() for h in hg]


def grasp_scores(model: nn.Module, params: Params, batches: Union[Batch, Iterable[Batch]], loss_fn: LossFn,
                 *, temperature: float = 200.0, train_mode: bool = False) -> list[torch.Tensor]:
    """GraSP scores ``S = -w ⊙ (H g)`` (high = removed first); arguments as :func:`snip_scores`.

    Args:
        temperature: logits are divided by it before the loss (200 in the GraSP authors' code).
    """
    named = _resolve(model, params)
    _, hg = grasp_hessian_gradient(model, params, batches, loss_fn, temperature=temperature, train_mode=train_mode)
    return [-(p.detach() * h) for (_, _, p), h in zip(named, hg)]


def synflow_scores(model: nn.Module, params: Params, input_shape: Sequence[int],
                   masks: Optional[Mapping[str, torch.Tensor]] = None,
                   dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """SynFlow scores ``|∂R/∂w ⊙ w|`` on the masked absolute-value network (one round, no pruning).

    Args:
        model: the model (not modified: absolute values are substituted with ``functional_call``).
        params: the sparsifier, or the sparsified parameter names.
        input_shape: shape of one input example, without the batch dimension (e.g. ``(3, 32, 32)``).
        masks: current masks by name (missing: dense); masked weights count as zero.
        dtype: arithmetic precision (float64 by default, see the module notes).

    Returns:
        One score tensor per parameter (``dtype``), in the order of ``params``.
    """
    named = _resolve(model, params)
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"input_shape must be positive sizes without the batch dimension, got {tuple(input_shape)}")
    device = named[0][2].device
    # Every floating parameter and buffer (biases, batch-norm affine and running statistics) by its |.|.
    state: dict[str, torch.Tensor] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        state[name] = t.detach().abs().to(dtype) if t.is_floating_point() else t
    weights = []
    for clean, name, _ in named:
        w = state[name]
        if masks is not None and clean in masks:
            w = w * masks[clean].to(w.device)
        state[name] = w.requires_grad_(True)
        weights.append(w)
    with _preserved(model, train_mode=False):
        out = functional_call(model, state, (torch.ones((1, *shape), dtype=dtype, device=device),))
        grads = torch.autograd.grad(out.sum(), weights, allow_unused=True)
    return [torch.zeros_like(w) if g is None else (g * w).detach().abs() for g, w in zip(grads, weights)]


# ---------------------------------------------------------------------------------------------- masks


def snip(model: nn.Module, params: Params, batches: Union[Batch, Iterable[Batch]], loss_fn: LossFn,
         density: float, *, seed: int = 0, train_mode: bool = False) -> dict[str, torch.Tensor]:
    """SNIP mask: the ``round(density * total)`` highest ``|g ⊙ w|`` over all sparsified weights.

    Returns:
        ``{name: torch.bool mask}`` for every sparsified parameter (exact global count).
    """
    _check_density(density)
    named = _resolve(model, params)
    scores = snip_scores(model, params, batches, loss_fn, train_mode=train_mode)
    keep = round(density * sum(s.numel() for s in scores))
    return _keep_top([n for n, _, _ in named], scores, keep, criteria.seeded_generator(seed, "snip"), "SNIP")


def grasp(model: nn.Module, params: Params, batches: Union[Batch, Iterable[Batch]], loss_fn: LossFn,
          density: float, *, seed: int = 0, temperature: float = 200.0,
          train_mode: bool = False) -> dict[str, torch.Tensor]:
    """GraSP mask: remove the highest ``-w ⊙ Hg``, i.e. keep the ``round(density * total)`` lowest.

    Returns:
        ``{name: torch.bool mask}`` for every sparsified parameter (exact global count).
    """
    _check_density(density)
    named = _resolve(model, params)
    scores = grasp_scores(model, params, batches, loss_fn, temperature=temperature, train_mode=train_mode)
    keep = round(density * sum(s.numel() for s in scores))
    negated = [-s for s in scores]  # keeping the lowest S = selecting the top of -S
    return _keep_top([n for n, _, _ in named], negated, keep, criteria.seeded_generator(seed, "grasp"), "GraSP")


def synflow(model: nn.Module, params: Params, input_shape: Sequence[int], density: float, *,
            rounds: int = 100, seed: int = 0, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """SynFlow mask: ``rounds`` rounds of re-scoring and global pruning to ``density ** (j / rounds)``.

    Round ``j`` keeps exactly ``round(density ** (j / rounds) * total)`` of the weights active after
    round ``j - 1``; the last round keeps ``round(density * total)``.

    Returns:
        ``{name: torch.bool mask}`` for every sparsified parameter (exact global count).
    """
    _check_density(density)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    named = _resolve(model, params)
    names = [n for n, _, _ in named]
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, _, p in named}
    total = sum(p.numel() for _, _, p in named)
    for j in range(1, rounds + 1):
        scores = synflow_scores(model, params, input_shape, masks, dtype)
        # Pruned weights score -1, below every real score: rounds only ever remove weights.
        scores = [torch.where(masks[n], s, -1.0) for n, s in zip(names, scores)]
        keep = round(density ** (j / rounds) * total)
        masks = _keep_top(names, scores, keep, criteria.seeded_generator(seed, "synflow", j), "SynFlow")
    return masks


def prune_at_init(sparsifier: Sparsifier, model: nn.Module, batches: Union[Batch, Iterable[Batch], None] = None,
                  *, loss_fn: Optional[LossFn] = None, method: Optional[str] = None,
                  input_shape: Optional[Sequence[int]] = None, **options: Any) -> dict[str, torch.Tensor]:
    """Score ``model`` at initialisation and install the mask in ``sparsifier`` (fixed from then on).

    Call once, after :func:`granet.create_sparsifier` and before the first optimizer step. The
    density and seed are the sparsifier's; a resumed run restores the mask with
    ``sparsifier.load_state_dict`` instead.

    Args:
        sparsifier: built for ``snip``, ``grasp`` or ``synflow`` (or any method with ``method=``).
        model: the model the sparsifier masks (a DDP wrapper is unwrapped for scoring; under
            ``torch.distributed`` rank 0's mask is installed on every rank).
        batches: ``(input, target)`` batches of training data (SNIP, GraSP); for SynFlow only the
            first batch's input shape is used, unless ``input_shape`` is given.
        loss_fn: ``loss_fn(output, target)``; default ``torch.nn.functional.cross_entropy``.
        method: ``snip``, ``grasp`` or ``synflow``; default the sparsifier's method.
        input_shape: SynFlow's input shape without the batch dimension.
        **options: passed to :func:`snip`, :func:`grasp` or :func:`synflow` (``rounds``,
            ``temperature``, ``train_mode``, ...).

    Returns:
        The installed masks by parameter name.

    Raises:
        ValueError: unknown method, the sparsifier already stepped, or missing batches.
    """
    method = sparsifier.config.method if method is None else method
    if method not in SCORING_METHODS:
        raise ValueError(f"prune_at_init scores with one of {', '.join(SCORING_METHODS)}, not {method!r}; "
                         "pass method=...")
    if sparsifier.sharded:
        raise ValueError(f"prune_at_init ({method}) does not support FSDP-sharded models: score an unsharded "
                         "copy of the initial model, then pass its masks to sparsifier.set_masks on every rank")
    if sparsifier.step_count != 0:
        raise ValueError(f"prune_at_init scores the initial network, but the sparsifier is at step "
                         f"{sparsifier.step_count}; on resume, load_state_dict restores the scored mask")
    if sparsifier.density() < 1.0:
        logger.warning("%s scores a network whose sparsified weights are already %.1f%% zero",
                       method, 100 * (1 - sparsifier.density()))
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    density, seed = sparsifier.config.density, sparsifier.config.seed
    if method == "synflow":
        if input_shape is None:
            if batches is None:
                raise ValueError("synflow needs input_shape (or batches to read it from)")
            input_shape = tuple(_as_batches(batches)[0][0].shape[1:])
        masks = synflow(model, sparsifier, input_shape, density, seed=seed, **options)
    else:
        if batches is None:
            raise ValueError(f"{method} scores with training data: pass batches=[(input, target), ...]")
        loss = loss_fn if loss_fn is not None else nn.functional.cross_entropy
        scorer = snip if method == "snip" else grasp
        masks = scorer(model, sparsifier, batches, loss, density, seed=seed, **options)
    sparsifier.set_masks(masks)
    logger.info("%s: kept %d of %d weights (density %.5f)", method, sum(sparsifier.counts), sparsifier.total,
                sparsifier.density())
    return masks
