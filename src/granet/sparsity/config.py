"""The configuration of a sparsifier: one flat, validated dataclass.

A method (``granet``, ``rigl``, ...) is a preset of these fields (see :mod:`granet.methods`); every
field can be overridden. Step-valued fields (``prune_start``, ``prune_end``, ``regrow_start``,
``regrow_end``) accept an ``int`` (optimizer steps) or a ``float`` in [0, 1] (a fraction of
``total_steps``); nothing is ever derived from epochs, loader lengths or world size.

A configuration is checked and its steps resolved **once**, by :meth:`SparsityConfig.resolve`, into a
frozen :class:`ResolvedSparsity`: the value the sparsifier and its update policy are built from and
read, never checking or resolving it again (a :class:`~granet.sparsity.sparsifier.Sparsifier` given a
plain ``SparsityConfig`` resolves it itself, once).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

from .criteria import list_drop_criteria, list_grow_criteria, list_prune_criteria
from .distributions import get_distribution, list_distributions
from .schedules import list_drop_decays
from .structure import Structure, parse_structure

logger = logging.getLogger(__name__)

StepSpec = Union[int, float]

PRUNE_SCOPES = ("global", "layerwise")
REDISTRIBUTIONS = ("none", "momentum")
REINIT_REGROWN = ("new", "all")
RNG_SOURCES = ("cpu", "device")
STEP_FIELDS = ("prune_start", "prune_end", "regrow_start", "regrow_end")


def _field(default: Any, text: str) -> Any:
    """A dataclass field with its help text in ``metadata["help"]`` (the one place it is written)."""
    return field(default=default, metadata={"help": text})


class SavedConfigMismatch(ValueError):
    """A sparsifier state made with another configuration, or with none: ``reason`` says which; the
    message adds the way out that :meth:`~granet.sparsity.sparsifier.Sparsifier.load_state_dict` offers
    (callers offering another way, like the trainer callbacks, word their own from ``reason``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{reason}; pass strict=False to load it anyway")
        self.reason = reason


@dataclass
class SparsityConfig:
    """Everything that defines a sparse-training method.

    Each field's meaning is its ``help`` metadata (one place, read by :func:`field_help`, shown by
    ``granet train --help`` and :func:`granet.train.config.config_keys`). Step-valued fields take optimizer
    steps (``int``) or fractions of ``total_steps`` (``float`` in [0, 1]); :meth:`resolved` turns them
    into steps.
    """

    method: str = _field("custom", "name of the preset this configuration came from (informational).")
    density: float = _field(1.0, "final density of the sparsified weights, in (0, 1].")
    init_density: Optional[float] = _field(
        None, "density at the start; ``None`` means ``density`` for constant-density methods. Must equal "
              "``density`` unless ``prune`` is set.")
    distribution: str = _field(
        "erk", "layer-wise split of the initial (and, for layer-wise pruning, final) density: a registered "
               ":class:`~granet.sparsity.distributions.Distribution` (``uniform``, ``er``, ``erk``, ``global``, ...).")
    erk_power_scale: float = _field(1.0, "exponent on the ER/ERK raw densities.")
    keep_dense: tuple[str, ...] = _field(
        (), "name patterns (``fnmatch``, matched against module and parameter names) of layers that stay dense; "
            "each must match at least one layer.")
    prune: Optional[str] = _field(
        None, "gradual magnitude pruning scope, ``global`` / ``layerwise``, or ``None`` for none.")
    prune_start: StepSpec = _field(0, "t0, step where gradual pruning starts.")
    prune_end: StepSpec = _field(0.5, "tf, step where the final density is reached.")
    update_interval: int = _field(100, "ΔT, optimizer steps between topology updates (pruning and regrowth).")
    drop_fraction: float = _field(
        0.0, "r_0, fraction of each layer's active weights dropped and regrown per update; 0 disables regrowth.")
    drop_fraction_end: float = _field(0.0, "value r_t decays to at ``regrow_end`` (cosine decay).")
    drop_decay: str = _field(
        "cosine", "a registered decay of r_t (``cosine``, ``constant``, ...; see "
                  ":func:`~granet.sparsity.schedules.register_drop_decay`).")
    regrow_start: Optional[StepSpec] = _field(
        None, "step where r_t's decay starts, and the first step of drop-and-regrow updates, which never come "
              "before ``prune_start`` (t0) for pruning methods; ``None`` means ``prune_start`` for pruning methods "
              "and 0 otherwise.")
    regrow_end: StepSpec = _field(1.0, "updates happen strictly before this step.")
    grow: str = _field(
        "gradient", "a registered :class:`~granet.sparsity.criteria.GrowCriterion` (``gradient``, ``momentum``, "
                    "``random``, ...).")
    prune_criterion: str = _field(
        "magnitude", "a registered prune :class:`~granet.sparsity.criteria.Criterion` (high = keep): what gradual "
                     "pruning ranks active weights by; ``magnitude`` is ``|w|``.")
    drop_criterion: str = _field(
        "magnitude", "a registered drop :class:`~granet.sparsity.criteria.Criterion` (high = keep): what the drop "
                     "phase ranks active weights by; ``magnitude`` is ``|w|``.")
    redistribute: str = _field(
        "none", "``none`` keeps every layer's count; ``momentum`` (SNFS) moves regrowth between layers in "
                "proportion to their mean momentum magnitude.")
    reinit_regrown: str = _field(
        "new", "which regrown weights start afresh (value 0, optimizer state 0): ``new`` (default) resets only "
               "weights that were inactive before the update, so a weight dropped and regrown in the same update "
               "keeps its value and optimizer state, as in GraNet's code and RigL (``reinit_when_same=False``); "
               "``all`` resets every regrown weight.")
    protect_units: bool = _field(
        False, "keep every output unit's largest active incoming weight at gradual pruning and at the drop, so a "
               "unit (a row of a Linear weight, an output channel of a convolution) never loses its last input "
               "while the budget allows (below it, the units with the strongest best weight keep theirs). Off by "
               "default, as in GraNet's code; harmful when a network keeps fewer weights than it has units; see "
               "docs/collapse.md.")
    mask_optimizer_state: bool = _field(
        True, "zero the optimizer state of inactive weights after every step. SNFS turns it off because it "
              "regrows by the momentum that inactive weights accumulate.")
    rng: str = _field(
        "cpu", "where the random numbers of an update (initial mask, random regrowth, tie-breaking) are made: "
               "``cpu`` (default: a seeded CPU generator, moved to the weights' device) or ``device`` (a counter-based "
               "stream made on the weights' device, no host transfer; slower than ``cpu`` on a CPU). Both give the "
               "same masks on every device; their masks differ from each other.")
    structure: str = _field(
        "unstructured", "where each layer's active weights may be: ``unstructured`` (anywhere), ``N:M`` such as "
                        "``2:4`` (exactly N active in every M consecutive inputs of an output unit; the final "
                        "density must be N/M and every layer follows n_t:M, so ``distribution`` does not apply) "
                        "or ``fan-in`` (every output unit of a layer keeps the same number of inputs; under "
                        "global pruning each layer's share is rounded to whole inputs per unit). See "
                        ":mod:`granet.sparsity.structure`.")
    ablation: float = _field(
        0.0, "neuron ablation for ``structure='fan-in'`` (SRigL's γ_sal, which uses 0.3), in [0, 1); 0 (default) "
             "turns it off. At each drop-and-regrow update an output unit (every layer but the last) with fewer "
             "than ``max(1, floor(γ · k))`` salient weights (kept, or among what the unstructured update would "
             "regrow; k the layer's fan-in with no unit ablated) loses all its weights for good, and the layer's "
             "other units share its budget (a larger fan-in, rounded). See :mod:`granet.sparsity.structure`.")
    total_steps: Optional[int] = _field(
        None, "number of optimizer steps of the whole run; needed when a step field is a fraction.")
    seed: int = _field(0, "seed of every random choice (initial mask, random regrowth, tie-breaking).")
    track_exploration: bool = _field(True, 'keep a bit-packed "ever active" mask for the exploration rate.')

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of all configuration fields."""
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, **changes: Any) -> "SparsityConfig":
        """A copy with ``changes`` applied; unknown field names raise ``ValueError``."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ValueError(
                f"unknown sparsity option(s) {', '.join(unknown)}; valid: {', '.join(self.field_names())}"
            )
        if "keep_dense" in changes and changes["keep_dense"] is not None:
            value = changes["keep_dense"]
            changes["keep_dense"] = (value,) if isinstance(value, str) else tuple(value)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dictionary (YAML/JSON friendly)."""
        out = dataclasses.asdict(self)
        out["keep_dense"] = list(self.keep_dense)
        return out

    def differences(self, saved: Mapping[str, Any]) -> list[str]:
        """``"field=saved in the state, current here"`` for every field ``saved`` holds with another value.

        Fields that ``saved`` lacks are not compared, so a state written before a field existed
        stays loadable.
        """
        current = self.to_dict()
        return [f"{k}={saved[k]!r} in the state, {v!r} here"
                for k, v in current.items() if k in saved and saved[k] != v]

    def check_saved(self, saved: Any, strict: bool) -> None:
        """Compare the config stored in a sparsifier state with this one.

        Raises:
            SavedConfigMismatch: under ``strict``, ``saved`` is not a config or differs (fields named);
                without ``strict`` a difference is only logged as a warning.
        """
        if not isinstance(saved, Mapping):
            if strict:
                raise SavedConfigMismatch("sparsifier state has no 'config' entry")
            return
        differing = self.differences(saved)
        if differing and strict:
            raise SavedConfigMismatch(f"sparsifier state was made with another config ({'; '.join(differing)})")
        if differing:
            logger.warning("loading sparsifier state saved with a different config (%s)", "; ".join(differing))

    @property
    def parsed_structure(self) -> Structure:
        """:attr:`structure` parsed (:func:`~granet.sparsity.structure.parse_structure`).

        Raises:
            ValueError: not a structure, naming the value.
        """
        return parse_structure(self.structure)

    @property
    def effective_init_density(self) -> float:
        """The initial density after applying the ``None`` default."""
        return self.density if self.init_density is None else self.init_density

    def validate(self) -> None:
        """Check ranges and consistency; raises ``ValueError`` with a message naming the field."""
        for name in ("density", "init_density"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
        init = self.effective_init_density
        if self.prune is None and init != self.density:
            raise ValueError(
                f"method {self.method!r} keeps the density constant (no gradual pruning), so init_density "
                f"({init}) must equal density ({self.density}); set prune='global' to prune gradually"
            )
        if self.prune is not None and self.density > init:
            raise ValueError(
                f"final density {self.density} is above the initial density {init}: "
                f"{self.method!r} prunes, so density must be <= init_density"
            )
        _check_choice("distribution", self.distribution, list_distributions())
        if self.prune is not None:
            _check_choice("prune", self.prune, PRUNE_SCOPES)
        _check_choice("grow", self.grow, list_grow_criteria())
        _check_choice("prune_criterion", self.prune_criterion, list_prune_criteria())
        _check_choice("drop_criterion", self.drop_criterion, list_drop_criteria())
        _check_choice("redistribute", self.redistribute, REDISTRIBUTIONS)
        _check_choice("reinit_regrown", self.reinit_regrown, REINIT_REGROWN)
        _check_choice("rng", self.rng, RNG_SOURCES)
        if not isinstance(self.protect_units, bool):
            raise ValueError(f"protect_units must be true or false, got {self.protect_units!r}")
        _check_choice("drop_decay", self.drop_decay, list_drop_decays())
        interval = self.update_interval
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"update_interval must be a positive integer, got {self.update_interval!r}")
        for name in ("drop_fraction", "drop_fraction_end"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if self.erk_power_scale < 0:
            raise ValueError(f"erk_power_scale must be >= 0, got {self.erk_power_scale}")
        if self.total_steps is not None and (
            isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int) or self.total_steps < 1
        ):
            raise ValueError(f"total_steps must be a positive integer (optimizer steps), got {self.total_steps!r}")
        if self.prune == "layerwise" and not get_distribution(self.distribution).per_layer:
            per_layer = [n for n in list_distributions() if get_distribution(n).per_layer]
            raise ValueError(
                f"layer-wise pruning needs a per-layer distribution ({', '.join(per_layer)}), not {self.distribution!r}"
            )
        self._check_structure()
        self._check_ablation()

    def _check_ablation(self) -> None:
        """γ_sal in [0, 1), and only where units can be ablated (fan-in, without ``protect_units``)."""
        gamma = self.ablation
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma < 1.0:
            raise ValueError(f"ablation must be a number in [0, 1), got {gamma!r}")
        if gamma > 0 and self.parsed_structure.kind != "fan-in":
            raise ValueError(f"ablation={gamma!r} removes output units of constant fan-in layers: it needs "
                             f"structure='fan-in', got structure={self.structure!r}")
        if gamma > 0 and self.protect_units:
            raise ValueError(f"ablation={gamma!r} removes output units, which protect_units keeps alive: "
                             "use one of the two")

    def _check_structure(self) -> None:
        """The rules of a structure (see the README's "Structured sparsity")."""
        structure = self.parsed_structure
        if not structure.structured:
            return
        if structure.kind == "n:m" and abs(self.density - structure.n / structure.m) > 1e-9:
            raise ValueError(f"structure {structure} keeps {structure.n} of every {structure.m} weights, so the final "
                             f"density must be {structure.n}/{structure.m}, got density={self.density!r}: pass "
                             f"density={structure.n / structure.m!r}")
        if self.redistribute != "none":
            raise ValueError(f"redistribute={self.redistribute!r} moves regrowth between layers, which structure "
                             f"{structure} does not allow (every group or row regrows what it lost): use "
                             "redistribute='none'")
        if structure.kind == "fan-in":
            if not get_distribution(self.distribution).per_layer:
                raise ValueError(f"structure fan-in needs per-layer densities, which distribution "
                                 f"{self.distribution!r} does not give: pass a per-layer distribution such as 'erk'")

    def unused_fields(self) -> list[str]:
        """The fields that have no effect on this configuration, in field order: the pruning schedule's
        without ``prune``, the regrowth's without ``drop_fraction``, and ΔT and ``protect_units`` when
        the masks never change after the initial one (``static``, ``dense``), and the layer-wise
        distribution under an N:M structure (every layer's density is then n_t / M)."""
        unused = set()
        if self.prune is None:
            unused |= {"prune_start", "prune_end", "prune_criterion"}
        if self.drop_fraction <= 0:
            unused |= {"regrow_start", "regrow_end", "drop_fraction_end", "drop_decay", "grow", "drop_criterion",
                       "redistribute", "reinit_regrown", "ablation"}
        if self.prune is None and self.drop_fraction <= 0:
            unused |= {"update_interval", "protect_units"}
        if isinstance(self.structure, str) and ":" in self.structure:
            unused |= {"distribution", "erk_power_scale"}  # N:M: every layer follows n_t:M
        return [name for name in self.field_names() if name in unused]

    def uses_field(self, name: str) -> bool:
        """Whether a step field matters for this configuration."""
        if name in ("prune_start", "prune_end"):
            return self.prune is not None
        if name in ("regrow_start", "regrow_end"):
            return self.drop_fraction > 0
        return True

    def resolve_steps(self) -> dict[str, int]:
        """Turn the step fields into optimizer steps.

        Returns:
            ``{field: step}`` for the fields this configuration uses.

        Raises:
            ValueError: a fraction is given without ``total_steps``, a value is out of range, or
                t0 >= tf.
        """
        resolved: dict[str, int] = {}
        for name in STEP_FIELDS:
            if not self.uses_field(name):
                continue
            value = getattr(self, name)
            if value is None and name == "regrow_start":
                value = resolved.get("prune_start", 0) if self.prune is not None else 0
            resolved[name] = self._to_step(name, value)
        if self.total_steps is not None:
            beyond = [n for n, v in resolved.items() if v > self.total_steps]
            if beyond:
                name = beyond[0]
                raise ValueError(
                    f"{name}={getattr(self, name)!r} resolves to step {resolved[name]}, beyond total_steps="
                    f"{self.total_steps}: the run would end before it; give a step <= total_steps or a fraction"
                )
        if self.prune is not None and resolved["prune_start"] >= resolved["prune_end"]:
            raise ValueError(
                f"prune_start (t0={resolved['prune_start']}) must be before prune_end "
                f"(tf={resolved['prune_end']})"
            )
        if "regrow_start" in resolved and resolved["regrow_start"] > resolved["regrow_end"]:
            raise ValueError(
                f"regrow_start (step {resolved['regrow_start']}) must not be after regrow_end "
                f"(step {resolved['regrow_end']})"
            )
        return resolved

    def resolve(self) -> "ResolvedSparsity":
        """Check this config (:meth:`validate`) and resolve its steps (:meth:`resolve_steps`), once.

        Raises:
            ValueError: as :meth:`validate` and :meth:`resolve_steps`, naming the field.
        """
        self.validate()
        steps = self.resolve_steps()
        given = self.replace()
        return ResolvedSparsity(given, given.replace(**steps, init_density=self.effective_init_density), steps)

    def resolved(self) -> "SparsityConfig":
        """This config as a sparsifier runs it: step fields in optimizer steps, ``init_density`` explicit
        (:attr:`ResolvedSparsity.config` of :meth:`resolve`).

        Step fields the configuration does not use (see :meth:`uses_field`) keep their values.
        Resolving a resolved config gives an equal one, so the values a run records rebuild exactly
        the same sparsifier.

        Raises:
            ValueError: as :meth:`resolve`.
        """
        return self.resolve().config

    def _to_step(self, name: str, value: StepSpec) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a step (int) or a fraction of training (float), got {value!r}")
        if isinstance(value, int):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
            return value
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value} is a fraction of training and must be in [0, 1]; give steps as an int")
        if self.total_steps is None:
            raise ValueError(
                f"{name}={value} is a fraction of training, so {self.method!r} needs total_steps "
                f"(the number of optimizer steps of the run); pass total_steps=... or give {name} in steps"
            )
        return int(round(value * self.total_steps))


@dataclass(frozen=True)
class ResolvedSparsity:
    """A :class:`SparsityConfig` checked, with its steps resolved: what a sparsifier runs.

    Made by :meth:`SparsityConfig.resolve` only. The sparsifier and its update policy read it and
    never check or resolve it again.

    Attributes:
        given: the configuration as given: what :attr:`Sparsifier.config
            <granet.sparsity.sparsifier.Sparsifier.config>` returns and a sparsifier's state records.
        config: the configuration as it runs: step fields in optimizer steps, ``init_density`` explicit.
        steps: ``{step field: optimizer step}`` for the step fields the configuration uses.
    """

    given: SparsityConfig
    config: SparsityConfig
    steps: Mapping[str, int]

    def explicit(self) -> "ResolvedSparsity":
        """This resolution with its resolved values as the given configuration: what a training run
        records (``config.yaml``, checkpoints), so that a resume rebuilds exactly the same sparsifier."""
        return dataclasses.replace(self, given=self.config)


def _check_choice(name: str, value: object, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def step_spec(value: Any) -> Any:
    """Normalise a step-valued setting as it comes from YAML or the command line.

    The one parser of step values: ``"1000"``/``1000``/``1000.0`` are optimizer steps (``int``),
    ``"0.5"``/``0.5`` a fraction of the run (``float``); ``None`` and anything else pass through
    unchanged (validation names them). A float with an integral value above 1 is a step count that
    YAML or a calculation produced as a float.
    """
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return value
    if isinstance(value, float) and value.is_integer() and value > 1:
        return int(value)
    return value


def field_help() -> dict[str, str]:
    """One line of help per field: its ``help`` metadata."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(SparsityConfig)}


__all__ = ["ResolvedSparsity", "SavedConfigMismatch", "SparsityConfig", "PRUNE_SCOPES", "REDISTRIBUTIONS",
           "REINIT_REGROWN", "RNG_SOURCES", "STEP_FIELDS", "step_spec", "field_help"]
