"""Sparse-training methods as named presets of :class:`~granet.sparsity.config.SparsityConfig`.

Every method is the same engine with different pieces: a distribution for the initial mask, an
optional gradual pruning schedule, and an optional drop-and-regrow rule with a grow criterion.
Gradual pruning and the drop phase rank active weights by the prune and drop criteria, magnitude
``|w|`` for every method below (:func:`granet.register_prune_criterion` /
:func:`granet.register_drop_criterion` add others; see :mod:`granet.sparsity.criteria`).

method            initial mask   gradual prune    regrowth (r_t decay)   grow score  ΔT, r_0     regrown
================  =============  ===============  =====================  ==========  ==========  =========
``dense``         dense          —                —                      —           —           —
``static``        ERK random     —                —                      —           —           —
``gmp``           dense          global cubic     —                      —           1000        —
``gmp-layerwise`` dense          per-layer cubic  —                      —           1000        —
``set``           ERK random     —                [0, 75%) cosine → 0    random      100, 0.3    new
``rigl``          ERK random     —                [0, 75%) cosine → 0    gradient    100, 0.3    new
``snfs``          ERK random     —                [0, 75%), moved        momentum    100, 0.5    new
``granet``        dense (s_i=0)  global cubic     [0, end) cosine→0.005  gradient    1000, 0.5   new
``granet-st``     ERK 50%        global cubic     [0, end) cosine→0.005  gradient    1000, 0.5   new
``snip``          scored, global —                —                      —           —           —
``grasp``         scored, global —                —                      —           —           —
``synflow``       scored, global —                —                      —           —           —
================  =============  ===============  =====================  ==========  ==========  =========

"regrown = new" (``reinit_regrown="new"``): only weights that were inactive before the update start
at zero with zeroed optimizer state; a weight dropped and regrown in the same update keeps its value
and state, as in GraNet's code and RigL (``reinit_when_same=False``). ``reinit_regrown="all"``
resets every regrown weight (the behaviour before the option existed). "moved": SNFS redistributes regrowth between
layers by mean momentum.

GraNet's defaults follow the paper's CIFAR recipe: t0 = 0, tf = half of training, ΔT = 1000, r_t
cosine-decayed from 0.5 to 0.005 over the whole run [0, T] (also when t0 > 0: ``regrow_start=0``).
RigL/SET/SNFS follow RigL's defaults. Every field can be overridden:
``create_sparsifier("granet", ..., update_interval=100, prune_end=0.75)``. Intended differences from
the authors' code are listed in ``docs/differences.md``.

``snip``, ``grasp`` and ``synflow`` prune once at initialisation: the sparsifier starts dense (the
weights are left intact for scoring) and :func:`granet.prune_at_init` installs the scored global mask
before the first step; it never changes afterwards (see :mod:`granet.baselines.saliency`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from .baselines.saliency import needs_init_scoring, require_scoring_before_training
from .registry import Registry
from .sparsity.config import ResolvedSparsity, SparsityConfig
from .sparsity.sparsifier import DEFAULT_LAYER_TYPES, Sparsifier


@dataclass(frozen=True)
class _Method:
    preset: dict[str, Any]  # the SparsityConfig fields it sets, ``method`` included
    locked: dict[str, Any]  # the fields that cannot be overridden


_METHODS: Registry[_Method] = Registry("method")


def register_method(name: str, description: str, locked: Optional[dict[str, Any]] = None, **preset: Any) -> None:
    """Register a method as a preset of :class:`SparsityConfig` fields.

    A method is a composition of registered pieces chosen by name (a distribution, a grow
    criterion, a drop-fraction decay) plus schedule values, so presets stay plain, serialisable
    dictionaries. Adding a method is one file: register any new piece, then the preset.

    Example::

        # my_method.py: RigL that regrows by |gradient| x |weight of the same input unit|, say
        import granet
        from granet.sparsity.criteria import GrowCriterion, gradient_scores, register_grow_criterion

        def scaled_gradient(param, name, optimizer, generator):
            return gradient_scores(param, name) * param.detach().abs().mean(dim=0, keepdim=True)

        register_grow_criterion(GrowCriterion("scaled-gradient", scaled_gradient, dense_gradient="update_steps"))
        granet.register_method(
            "my-rigl", "RigL with a scaled gradient grow score",
            **dict(granet.method_preset("rigl"), grow="scaled-gradient"),
        )
        sparsifier = granet.create_sparsifier("my-rigl", model, optimizer, density=0.1, total_steps=T)

    Args:
        name: the method name users pass to :func:`create_sparsifier`.
        description: one line for listings.
        locked: fields that define the method and cannot be overridden (``dense`` locks
            ``density=1``); overriding one with another value is an error.
        **preset: field values; unknown fields raise ``ValueError``. ``method`` is set to ``name``.
    """
    SparsityConfig().replace(**preset, **(locked or {}))  # validates the field names
    preset.pop("method", None)  # a preset copied from another method names that method
    _METHODS.register(name, _Method(dict(preset, **(locked or {}), method=name), dict(locked or {}, method=name)),
                      description)


def method_preset(name: str) -> dict[str, Any]:
    """A copy of method ``name``'s preset: the :class:`SparsityConfig` fields it sets, as registered.

    Step fields keep their registered form (a float is a fraction of ``total_steps``), so the
    preset can seed another method or a recipe without knowing the run length.
    """
    return dict(_METHODS.get(name).preset)


def updates_topology(name: str) -> bool:
    """Whether method ``name`` changes its masks while training, every ΔT (``update_interval``) steps
    by a schedule (pruning or drop-and-regrow), unlike ``dense``, ``static`` and the methods that fix
    their mask at initialisation (``snip``, ``grasp``, ``synflow``: their one-step schedule is locked).

    Raises:
        ValueError: unknown method.
    """
    method = _METHODS.get(name)
    config = SparsityConfig().replace(**method.preset)
    return "update_interval" not in config.unused_fields() and "prune_end" not in method.locked


def list_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    return list(_METHODS.names())


def describe_method(name: str) -> str:
    """One-line description of a method."""
    return _METHODS.describe(name)


def check_locked(name: str, overrides: Mapping[str, Any]) -> None:
    """Refuse ``overrides`` that change a field method ``name`` locks (``dense``'s density,
    the one-step schedule of the methods that score at initialisation); needs no run length.

    Raises:
        ValueError: unknown method, or the first overridden locked field, named with both values.
    """
    for key, value in _METHODS.get(name).locked.items():
        if key in overrides and overrides[key] != value:
            raise ValueError(f"method {name!r} requires {key}={value!r}, got {overrides[key]!r}")


def resolve_method(name: str, **overrides: Any) -> ResolvedSparsity:
    """Method ``name``'s preset with ``overrides`` applied, checked and resolved once
    (:meth:`SparsityConfig.resolve`): what a :class:`Sparsifier` is built from.

    Raises:
        ValueError: unknown method (valid ones listed), a field the method locks, unknown option, or
            invalid values.
    """
    method = _METHODS.get(name)
    check_locked(name, overrides)
    return SparsityConfig().replace(**method.preset).replace(**overrides).resolve()


def method_config(name: str, **overrides: Any) -> SparsityConfig:
    """The :class:`SparsityConfig` of method ``name`` with ``overrides`` applied and validated.

    Raises:
        ValueError: unknown method (valid ones listed), unknown option, or invalid values.
    """
    return resolve_method(name, **overrides).given


def create_sparsifier(
    method: str,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    *,
    layer_types: tuple[Any, ...] = DEFAULT_LAYER_TYPES,
    distributed: Optional[bool] = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    dense_embeddings: bool = True,
    **options: Any,
) -> Sparsifier:
    """Build a :class:`Sparsifier` for ``model`` by method name.

    Example::

        sparsifier = granet.create_sparsifier("granet", model, optimizer, density=0.1, total_steps=T)
        ...
        optimizer.step()
        sparsifier.step()

    Args:
        method: one of :func:`list_methods`.
        model: the model whose Conv/Linear weights are sparsified.
        optimizer: the training optimizer (see :class:`Sparsifier`).
        layer_types: module types (or class names) whose weights are sparsified.
        distributed: keep masks identical across ``torch.distributed`` ranks (``None``: when a process
            group with 2+ ranks is initialised); see :class:`Sparsifier`.
        include, exclude, dense_embeddings: parameter-level selection, see
            :func:`granet.sparsity.targets.select_parameters`.
        **options: :class:`SparsityConfig` fields, e.g. ``density``, ``init_density``, ``total_steps``,
            ``update_interval``, ``distribution``, ``keep_dense``, ``seed``.

    Returns:
        The sparsifier; the model's inactive weights are already zero.
    """
    sparsifier = Sparsifier(
        model, optimizer, resolve_method(method, **options), layer_types=layer_types, distributed=distributed,
        include=include, exclude=exclude, dense_embeddings=dense_embeddings,
    )
    if optimizer is not None and needs_init_scoring(method):
        require_scoring_before_training(sparsifier, optimizer)
    return sparsifier


_DST: dict[str, Any] = dict(
    update_interval=100, drop_fraction=0.3, drop_fraction_end=0.0, regrow_start=0, regrow_end=0.75,
)
# regrow_start=0: GraNet's r_t decays over the whole run from step 0, whatever t0 is.
_GRANET: dict[str, Any] = dict(
    prune="global", prune_start=0, prune_end=0.5, update_interval=1000, regrow_start=0,
    drop_fraction=0.5, drop_fraction_end=0.005, regrow_end=1.0, grow="gradient",
)

register_method("dense", "dense training (no masks change; reference point)",
                locked=dict(density=1.0, init_density=1.0))
register_method("static", "static sparse: a fixed random ERK mask at the target density")
register_method("gmp", "gradual magnitude pruning (Zhu & Gupta cubic schedule), global threshold",
                init_density=1.0, prune="global", update_interval=1000, prune_end=0.5)
register_method("gmp-layerwise", "gradual magnitude pruning with per-layer (uniform) targets",
                init_density=1.0, prune="layerwise", distribution="uniform", update_interval=1000, prune_end=0.5)
register_method("set", "SET: constant density, magnitude drop, random regrowth", grow="random", **_DST)
register_method("rigl", "RigL: constant density, magnitude drop, dense-gradient regrowth", grow="gradient", **_DST)
register_method("snfs", "SNFS: magnitude drop, momentum regrowth redistributed across layers by momentum",
                grow="momentum", redistribute="momentum", mask_optimizer_state=False,
                **dict(_DST, drop_fraction=0.5))
register_method("granet", "GraNet: dense-to-sparse gradual global pruning + zero-cost gradient regrowth",
                init_density=1.0, **_GRANET)
register_method("granet-st", "GraNet-ST: sparse-to-sparse (ERK 50% start) gradual pruning + regrowth",
                init_density=0.5, distribution="erk", **_GRANET)

# Pruning at initialisation: start dense so the scores see the untouched initial weights;
# granet.prune_at_init installs the scored mask at step 0. The locked one-step "schedule" only makes
# the target density d from step 1 on; with the mask already at d it never prunes anything. With an
# optimizer, a first optimizer step without the scored mask raises (create_sparsifier installs the
# check); without one, step 1 would fall back to global magnitude pruning.
_AT_INIT: dict[str, Any] = dict(init_density=1.0, prune="global", prune_start=0, prune_end=1, drop_fraction=0.0,
                               structure="unstructured")  # the scores choose an unstructured mask
register_method("snip", "SNIP: prune once at init by connection sensitivity |g*w|, global; mask fixed",
                distribution="global", locked=_AT_INIT)
register_method("grasp", "GraSP: prune once at init keeping gradient flow, score -w*(Hg), global; mask fixed",
                distribution="global", locked=_AT_INIT)
register_method("synflow", "SynFlow: data-free iterative pruning at init by synaptic flow, global; mask fixed",
                distribution="global", locked=_AT_INIT)
