"""Which parameters a sparsifier masks, and a report of what is left dense and why.

Selection works on *parameters*, not only on modules, so that weights that are not a module's
``weight`` can be chosen and every tensor is accounted for:

==================  =============================================  ====================  ===================
kind                parameter                                      stored as             selected by default
==================  =============================================  ====================  ===================
``linear``          ``nn.Linear.weight``                           out × in              yes
``conv``            ``nn.Conv{1,2,3}d.weight``                     out × in/groups × k…  yes
``conv_transpose``  ``nn.ConvTranspose*d.weight``                  in × out/groups × k…  yes
``conv1d_hf``       ``transformers`` ``Conv1D.weight`` (GPT-2)     in × out              yes
``mha_in_proj``     ``nn.MultiheadAttention.in_proj_weight``       3·E × E (q, k, v)     yes (+ out_proj)
``rnn``             ``nn.LSTM/GRU/RNN.weight_ih_l*/weight_hh_l*``  gates·H × in          when asked
``embedding``       ``nn.Embedding/EmbeddingBag.weight``           num × dim             no (see below)
``other``           any other parameter with 2+ dimensions         unknown               only by name
==================  =============================================  ====================  ===================

Rules, in order (the first that applies gives a parameter's status and the reason shown):

1. Parameters with fewer than 2 dimensions (biases, norm scales) stay dense.
2. A parameter is a *candidate* if its owning module's type is in ``layer_types`` (and the parameter
   is a weight of that kind; a selected ``MultiheadAttention`` brings its ``out_proj`` too), or — when
   ``include`` patterns are given — if one of its names matches an ``include`` pattern (then only
   ``include`` decides, whatever the module type, so custom 2-D parameters can be named).
3. A candidate whose name (any of its names, or its module's name) matches ``keep_dense`` or
   ``exclude`` stays dense ("kept dense by pattern").
4. Embeddings, and any weight tied to an embedding (GPT-2's ``lm_head.weight`` *is*
   ``transformer.wte.weight``), stay dense while ``dense_embeddings=True`` (the default): pruning a
   token embedding zeroes whole input features of rare tokens, and masking a tied output layer masks
   the input embedding with it. ``dense_embeddings=False`` makes them ordinary candidates.

Tied (shared) parameters are one tensor with several names (``named_parameters(
remove_duplicate=False)``): the tensor is masked at most once, under its first name, every name is
shown in the report, and any name is accepted by ``keep_dense``/``include``/``exclude``.

What cannot work is refused at construction with the reason: an ``nn.Embedding(sparse=True)``
weight produces ``torch.sparse`` gradients, which the masked update cannot index; a non-floating
parameter cannot be masked by multiplication.

ERK and ER only use ``sum(shape) / prod(shape)`` and the first two dimensions, which do not depend on
which dimension is fan-in, so stored orientation (``Conv1D``'s in × out) gives the same counts as the
out × in ``nn.Linear`` layout; FLOPs are measured from the real forward pass. :attr:`Candidate.fan_in`
and :attr:`Candidate.fan_out` record the orientation of each selected weight for tools that need it.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from torch import nn

from .coverage import Coverage, ParameterEntry

logger = logging.getLogger(__name__)

LayerType = Union[type, str]

#: ``transformers``' GPT-2-style ``Conv1D``, named by class so that ``transformers`` is never imported.
HF_CONV1D = "transformers.pytorch_utils.Conv1D"
DEFAULT_LAYER_TYPES: tuple[LayerType, ...] = (nn.Linear, nn.modules.conv._ConvNd, HF_CONV1D, nn.MultiheadAttention)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MHA_IN = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_RNN_PREFIXES = ("weight_ih_l", "weight_hh_l", "weight_hr_l")
MASKABLE_KINDS = ("linear", "conv", "conv_transpose", "conv1d_hf", "mha_in_proj", "rnn", "embedding", "other")


def clean_name(name: str) -> str:
    """Strip DistributedDataParallel / ``torch.compile`` wrapper prefixes from a parameter name."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is (a subclass of) ``transformers``' ``Conv1D`` (checked without importing it)."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in type(module).__mro__)


def _type_matches(module: nn.Module, layer_type: LayerType) -> bool:
    """``isinstance`` for a type; for a string, a class in the MRO named ``module.Name`` or ``Name``."""
    if isinstance(layer_type, str):
        if layer_type == HF_CONV1D:
            return _is_hf_conv1d(module)
        return any(layer_type in (c.__name__, f"{c.__module__}.{c.__qualname__}") for c in type(module).__mro__)
    return isinstance(module, layer_type)


def _type_label(layer_type: LayerType) -> str:
    if isinstance(layer_type, str):
        return layer_type.rsplit(".", 1)[-1]
    return "Conv*" if layer_type is nn.modules.conv._ConvNd else layer_type.__name__


def parameter_kind(module: nn.Module, attr: str) -> str:
    """The kind (see the module docstring) of parameter ``attr`` of ``module``."""
    if attr == "weight":
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            return "conv_transpose"
        if isinstance(module, nn.modules.conv._ConvNd):
            return "conv"
        if isinstance(module, nn.Linear):
            return "linear"
        if _is_hf_conv1d(module):
            return "conv1d_hf"
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            return "embedding"
    if isinstance(module, nn.MultiheadAttention) and attr in _MHA_IN:
        return "mha_in_proj"
    if isinstance(module, nn.RNNBase) and attr.startswith(_RNN_PREFIXES):
        return "rnn"
    return "other"


def fan_in_out(kind: str, shape: Sequence[int]) -> tuple[Optional[int], Optional[int]]:
    """``(fan_in, fan_out)`` of a weight of ``kind`` and ``shape``; ``(None, None)`` when unknown."""
    receptive = 1
    for d in shape[2:]:
        receptive *= int(d)
    if kind in ("linear", "conv", "mha_in_proj", "rnn"):
        return int(shape[1]) * receptive, int(shape[0]) * receptive
    if kind == "conv_transpose":
        return int(shape[0]) * receptive, int(shape[1]) * receptive
    if kind == "conv1d_hf":
        return int(shape[0]), int(shape[1])
    if kind == "embedding":
        return int(shape[0]), int(shape[1])
    return None, None


@dataclass
class Candidate:
    """One distinct parameter tensor of the model and the decision about it.

    Attributes:
        names: every name of the tensor (several when tied), first name first.
        param: the parameter.
        kind: see the module docstring.
        owners: ``(module name, module)`` for every name.
        selected: whether it is masked.
        reason: why it is dense (empty when selected).
        fan_in: input features the weight sees (orientation-aware), ``None`` when unknown.
        fan_out: output features, ``None`` when unknown.
    """

    names: list[str]
    param: nn.Parameter
    kind: str
    owners: list[tuple[str, nn.Module]] = field(default_factory=list)
    selected: bool = False
    reason: str = ""
    fan_in: Optional[int] = None
    fan_out: Optional[int] = None


@dataclass
class Selection:
    """The outcome of :func:`select_parameters`: the masked tensors and every decision.

    Attributes:
        candidates: one :class:`Candidate` per distinct parameter tensor, in model order.
        layer_types: the module types that were selected by type.
        user_dense: patterns the user gave to keep weights dense (for the report).
    """

    candidates: list[Candidate]
    layer_types: tuple[LayerType, ...] = DEFAULT_LAYER_TYPES
    user_dense: tuple[str, ...] = ()

    @property
    def selected(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of the masked tensors, in model order (tied tensors once)."""
        return [(c.names[0], c.param) for c in self.candidates if c.selected]

    def coverage(self, layer_density: Optional[dict[str, float]] = None) -> Coverage:
        """The :class:`~granet.sparsity.coverage.Coverage` report (densities of the masked tensors if given)."""
        entries = []
        for c in self.candidates:
            density = None
            if c.selected:
                density = 1.0 if layer_density is None else float(layer_density[c.names[0]])
            entries.append(ParameterEntry(
                name=c.names[0], aliases=tuple(c.names[1:]), shape=tuple(c.param.shape),
                numel=c.param.numel(), kind=c.kind, selected=c.selected, reason=c.reason, density=density,
            ))
        return Coverage(entries=entries, layer_types=tuple(_type_label(t) for t in self.layer_types))


def _collect(model: nn.Module) -> list[Candidate]:
    """Every distinct parameter tensor with all its names and owning modules."""
    modules = dict(model.named_modules(remove_duplicate=False))
    by_id: dict[int, Candidate] = {}
    for raw_name, param in model.named_parameters(remove_duplicate=False):
        module_name, _, attr = raw_name.rpartition(".")
        module = modules[module_name]
        name = clean_name(raw_name)
        cand = by_id.get(id(param))
        if cand is None:
            cand = by_id[id(param)] = Candidate(names=[], param=param, kind=parameter_kind(module, attr))
        if name not in cand.names:
            cand.names.append(name)
            cand.owners.append((clean_name(module_name + ".")[:-1] if module_name else "", module))
        if cand.kind == "other":  # a tied tensor takes the most specific kind among its owners
            cand.kind = parameter_kind(module, attr)
    return list(by_id.values())


def _type_selected(model: nn.Module, layer_types: Sequence[LayerType]) -> set[int]:
    """Ids of the parameters that ``layer_types`` select."""
    chosen: set[int] = set()
    for module in model.modules():
        if not any(_type_matches(module, t) for t in layer_types):
            continue
        for attr, param in module.named_parameters(recurse=False):
            if param.dim() >= 2 and parameter_kind(module, attr) != "other":
                chosen.add(id(param))
        if isinstance(module, nn.MultiheadAttention) and isinstance(module.out_proj.weight, nn.Parameter):
            chosen.add(id(module.out_proj.weight))  # applied functionally by MHA, part of the layer
    return chosen


def _matches(cand: Candidate, patterns: Sequence[str], with_modules: bool) -> list[str]:
    keys = list(cand.names) + ([m for m, _ in cand.owners] if with_modules else [])
    return [p for p in patterns if any(fnmatch.fnmatchcase(k, p) for k in keys)]


def _refuse_unmaskable(cand: Candidate) -> None:
    """Raise for a selected tensor that the masked update cannot handle."""
    for module_name, module in cand.owners:
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse:
            raise ValueError(
                f"cannot sparsify {cand.names[0]!r}: {type(module).__name__} {module_name!r} has sparse=True, "
                f"so its gradient is a torch.sparse tensor that mask updates cannot index; "
                f"use sparse=False or keep it dense (keep_dense=[{module_name!r}])"
            )
    if not cand.param.is_floating_point():
        raise ValueError(f"cannot sparsify {cand.names[0]!r}: dtype {cand.param.dtype} is not floating point")


def select_parameters(
    model: nn.Module,
    layer_types: Sequence[LayerType] = DEFAULT_LAYER_TYPES,
    keep_dense: Sequence[str] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    dense_embeddings: bool = True,
) -> Selection:
    """Decide which parameters of ``model`` are masked (rules in the module docstring).

    Args:
        model: the model (DDP / ``torch.compile`` wrapper prefixes are stripped from names).
        layer_types: module types (or class names, e.g. :data:`HF_CONV1D`) whose weights are selected.
        keep_dense: ``fnmatch`` patterns on module and parameter names kept dense.
        include: ``fnmatch`` patterns on parameter names; when given they replace ``layer_types``.
        exclude: ``fnmatch`` patterns on parameter names kept dense.
        dense_embeddings: keep embeddings and weights tied to them dense.

    Returns:
        The :class:`Selection`.

    Raises:
        ValueError: a pattern matches no candidate (the candidates' types are named), an entry of
            ``layer_types`` has no maskable weight in the model, or a selected tensor cannot be masked.
    """
    layer_types = tuple(layer_types)
    for t in layer_types:
        if not isinstance(t, (type, str)):
            raise TypeError(f"layer_types entries must be module classes or class names, got {t!r}")
    cands = _collect(model)
    by_type = _type_selected(model, layer_types)
    used: set[str] = set()
    for c in cands:
        c.fan_in, c.fan_out = fan_in_out(c.kind, tuple(c.param.shape))
        if c.param.dim() < 2:
            c.reason = "1-D (bias / norm)"
            continue
        if include:
            hit = _matches(c, include, with_modules=False)
            used.update(hit)
            if not hit:
                c.reason = "not matched by include"
                continue
        elif id(c.param) not in by_type:
            owners = ", ".join(sorted({type(m).__name__ for _, m in c.owners}))
            if c.kind == "embedding" and dense_embeddings:
                c.reason = "embedding"
            elif c.kind == "other":
                c.reason = f"not a layer weight ({owners})"
            else:
                c.reason = f"type not selected ({owners})"
            continue
        pats = _matches(c, keep_dense, with_modules=True) + _matches(c, exclude, with_modules=False)
        if pats:
            used.update(pats)
            c.reason = f"kept dense by pattern {pats[0]!r}"
            continue
        embedding = next((n for n, (_, m) in zip(c.names, c.owners)
                          if isinstance(m, (nn.Embedding, nn.EmbeddingBag))), None)
        if dense_embeddings and embedding is not None:
            c.reason = ("embedding" if embedding == c.names[0] and len(c.names) == 1
                        else f"tied to embedding {embedding}")
            continue
        _refuse_unmaskable(c)
        c.selected = True
    _check_patterns(cands, layer_types, keep_dense, include, exclude, used)
    _check_types(model, layer_types, by_type, include)
    return Selection(cands, layer_types, tuple(keep_dense) + tuple(exclude))


def _check_patterns(
    cands: list[Candidate], layer_types: tuple[LayerType, ...], keep_dense: Sequence[str],
    include: Sequence[str], exclude: Sequence[str], used: set[str],
) -> None:
    """Every user pattern must match something it could act on; say what the candidates were."""
    for label, patterns in (("keep_dense", keep_dense), ("exclude", exclude), ("include", include)):
        unused = [p for p in patterns if p not in used]
        if not unused:
            continue
        if label == "include":
            scope = "any parameter with 2+ dimensions"
        elif include:
            scope = "any parameter selected by include"
        else:
            scope = "any weight of the selected layer types (" + ", ".join(_type_label(t) for t in layer_types) + ")"
        raise ValueError(f"{label} pattern(s) {', '.join(map(repr, unused))} match no name of {scope}")


def _check_types(model: nn.Module, layer_types: tuple[LayerType, ...], by_type: set[int],
                 include: Sequence[str]) -> None:
    """An explicitly requested type present in the model must have something maskable."""
    if include or layer_types == DEFAULT_LAYER_TYPES:
        return
    for t in layer_types:
        present = [m for m in model.modules() if _type_matches(m, t)]
        if present and not any(id(p) in by_type for m in present for p in m.parameters(recurse=False)):
            shapes = sorted({f"{a}: {p.dim()}-D" for m in present for a, p in m.named_parameters(recurse=False)})
            raise ValueError(
                f"layer_types entry {_type_label(t)} has no weight the sparsifier can mask "
                f"(its parameters: {', '.join(shapes) or 'none'}; masks need a weight with 2+ dimensions)"
            )


def describe_sparsity(model: nn.Module, sparsifier: Any = None, **selection: Any) -> Coverage:
    """Coverage report of ``model``: what a sparsifier masks (or would mask) and what stays dense.

    Args:
        model: the model.
        sparsifier: a :class:`granet.Sparsifier` on ``model``: its selection and current densities are
            reported. Without one, the selection ``select_parameters(model, **selection)`` is reported
            with every selected tensor at density 1.
        **selection: arguments of :func:`select_parameters` (ignored when ``sparsifier`` is given).

    Returns:
        The :class:`~granet.sparsity.coverage.Coverage` (``str()`` renders it as text).
    """
    if sparsifier is not None:
        return sparsifier.coverage()
    return select_parameters(model, **selection).coverage()


def sparsifiable_parameters(
    model: nn.Module,
    keep_dense: Sequence[str] = (),
    layer_types: Sequence[LayerType] = DEFAULT_LAYER_TYPES,
) -> list[tuple[str, nn.Parameter]]:
    """The weights a sparsifier masks (see :func:`select_parameters` for the rules).

    Args:
        model: the model (a DDP or ``torch.compile`` wrapper is fine: prefixes are stripped).
        keep_dense: ``fnmatch`` patterns matched against module and parameter names (any name of a
            tied weight).
        layer_types: module types (or class names) whose weights are sparsified.

    Returns:
        ``(name, parameter)`` pairs in model order; tied weights once, under their first name.

    Raises:
        ValueError: a ``keep_dense`` pattern matches no weight of the selected types.
    """
    return select_parameters(model, layer_types, keep_dense).selected
