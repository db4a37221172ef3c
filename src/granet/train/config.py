"""The configuration of a training run: ``TrainConfig``, its validation, YAML loading and resume rules.

Sparsity settings are not declared here: every :class:`~granet.config.SparsityConfig` field (except
``method``, ``total_steps`` and ``seed``, which the run sets) becomes a ``TrainConfig`` field of the
same name whose default ``None`` means "the method's preset". So a method's own ΔT, t0, tf and r_0 are
used unless the user sets them, and a field added to ``SparsityConfig`` is a config key and a flag
without further code.

Layering, from weakest to strongest: ``TrainConfig`` defaults ← the embedded digits recipe (only
when no ``--config`` file is given, and only for its own dataset and method) ← ``--config FILE.yaml``
← command-line flags. The run directory's ``config.yaml`` records the values actually used.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ..config import STEP_FIELDS, SparsityConfig, step_spec
from ..errors import ConfigError, short_repr
from ..safeyaml import MAX_BYTES, load_yaml

#: SparsityConfig fields that the run itself sets.
_RUN_OWNED = ("method", "total_steps", "seed")
#: SparsityConfig fields that are training-config keys (default None = the method's preset).
SPARSITY_KEYS = tuple(n for n in SparsityConfig.field_names() if n not in _RUN_OWNED and n != "density")

#: The embedded default job (``granet train`` with no arguments). Its sparsity settings belong to its
#: own dataset and method: the digits run is ~750 optimizer steps, so GraNet's ΔT of 1000 would prune
#: once; other methods on digits keep their presets.
EMBEDDED_RECIPE = {"dataset": "digits", "method": "granet", "sparsity": {"update_interval": 20}}
#: The density of a sparse method when none is given (the embedded recipe's 95% sparsity).
DEFAULT_DENSITY = 0.05

#: Methods that are training procedures rather than sparsifier presets: ``lth`` trains the network
#: R + 1 times (see :mod:`granet.train.lottery_run`).
TRAINING_METHODS = {"lth": "lottery ticket / iterative magnitude pruning with rewinding: R+1 trainings, global "
                           "magnitude pruning between them (--lth-rounds, --lth-prune-fraction, --lth-rewind)"}
#: The lottery-ticket keys (default None: derived, see :func:`_check_lottery`).
LTH_KEYS = ("lth_rounds", "lth_prune_fraction", "lth_rewind")
#: Keys holding a step value (optimizer steps as an int, or a fraction of the run as a float).
STEP_KEYS = (*STEP_FIELDS, "lth_rewind")
#: Pruning rounds of ``lth`` when none are given (4 trainings).
DEFAULT_LTH_ROUNDS = 3

# Keys that may differ between a run and its resumption (they do not change the result). ``threads``
# is the exception that is allowed anyway: it is a runtime setting of the machine the run continues on,
# but it changes the order of float sums, so :func:`granet.train.train` warns when it differs.
RESUMABLE_DIFFERENCES = frozenset({
    "device", "workers", "progress", "resume", "out", "data_dir", "download", "overwrite", "dist_timeout",
    "tensorboard", "fsdp", "threads",
})


def _sparsity_fields() -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(SparsityConfig)
    out = []
    for name in SPARSITY_KEYS:
        hint = hints[name]
        if name == "keep_dense":
            hint = list[str]
        out.append((name, Optional[hint], field(default=None)))
    return out


@dataclass
class _Head:
    """What to train (the first keys of a config)."""

    method: str = "granet"
    model: str = "digits_cnn"
    dataset: str = "digits"
    data_dir: Optional[str] = None
    download: bool = False
    val_fraction: float = 0.1
    augment: bool = True
    dataset_options: dict[str, Any] = field(default_factory=dict)
    density: Optional[float] = None


@dataclass
class _Lottery:
    """Lottery-ticket keys (method ``lth`` only)."""

    lth_rounds: Optional[int] = None
    lth_prune_fraction: Optional[float] = None
    lth_rewind: Optional[Union[int, float]] = None


@dataclass
class _Tail:
    """Optimisation and machinery (the last keys of a config)."""

    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    milestones: Optional[list[float]] = None
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    accumulation_steps: int = 1
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: str = "auto"
    workers: int = 0
    threads: Optional[int] = None
    out: Optional[str] = None
    resume: Optional[str] = None
    overwrite: bool = False
    progress: str = "auto"
    max_steps: Optional[int] = None
    keep_checkpoints: list[int] = field(default_factory=list)
    init_from: Optional[str] = None
    score_batches: int = 1
    tensorboard: bool = False
    dist_timeout: float = 600.0
    fsdp: bool = False


def _fields_of(cls: type) -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name], field(default=f.default) if f.default is not dataclasses.MISSING
             else field(default_factory=f.default_factory)) for f in dataclasses.fields(cls)]


class _TrainConfigMethods:
    """Methods of :class:`TrainConfig` (its fields are generated, see the module docstring)."""

    @classmethod
    def field_names(cls) -> list[str]:
        """All configuration keys."""
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, values: dict[str, Any], base: Optional[Any] = None) -> Any:
        """Apply ``values`` over ``base`` (default: the defaults); unknown keys are an error."""
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)} (see `granet train --help`)")
        values = {k: step_spec(v) if k in STEP_KEYS else v for k, v in values.items()}
        return dataclasses.replace(base or cls(), **values)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary for YAML."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @property
    def effective_density(self) -> float:
        """The target density: as given, else 1 for ``dense`` and the default for sparse methods."""
        if self.density is not None:  # type: ignore[attr-defined]
            return self.density  # type: ignore[attr-defined]
        if self.method == "lth" and self.lth_prune_fraction is not None:  # type: ignore[attr-defined]
            return (1.0 - self.lth_prune_fraction) ** self.effective_lth_rounds  # type: ignore[attr-defined]
        return 1.0 if self.method == "dense" else DEFAULT_DENSITY  # type: ignore[attr-defined]

    @property
    def effective_lth_rounds(self) -> int:
        """Pruning rounds of ``lth``: as given, else :data:`DEFAULT_LTH_ROUNDS`."""
        rounds = self.lth_rounds  # type: ignore[attr-defined]
        return DEFAULT_LTH_ROUNDS if rounds is None else rounds

    def sparsity_options(self) -> dict[str, Any]:
        """The :class:`~granet.config.SparsityConfig` overrides of this config (``None`` = the preset's)."""
        out = {name: getattr(self, name) for name in SPARSITY_KEYS if getattr(self, name) is not None}
        if self.method != "dense":  # type: ignore[attr-defined]
            out["density"] = self.effective_density
        return out

    def with_resolved_sparsity(self, config: SparsityConfig) -> Any:
        """This config with every sparsity key set to the value the sparsifier actually uses."""
        values = config.to_dict()
        values.update(config.resolve_steps())
        values["init_density"] = config.effective_init_density
        resolved = {name: values[name] for name in SPARSITY_KEYS}
        return dataclasses.replace(self, density=config.density, **resolved)  # type: ignore[type-var]

    def validate(self) -> None:
        """Check every value that can be checked without data; raises :class:`ConfigError`."""
        _check_types(self)
        _check_names(self)
        _check_ranges(self)
        _check_schedule(self)
        _check_lottery(self)
        if self.method != "lth":  # type: ignore[attr-defined]
            _check_sparsity(self)


TrainConfig = dataclasses.make_dataclass(
    "TrainConfig", _fields_of(_Head) + _sparsity_fields() + _fields_of(_Lottery) + _fields_of(_Tail),
    bases=(_TrainConfigMethods,),
)
TrainConfig.__module__ = __name__
TrainConfig.__doc__ = """Everything a training run needs. Defaults are the embedded digits recipe.

Sparsity keys are the :class:`~granet.config.SparsityConfig` fields; ``None`` means the method's
preset. Step-valued keys (``prune_start``, ``prune_end``, ``regrow_start``, ``regrow_end``) take
optimizer steps (int) or fractions of the run (float in [0, 1]).
"""
if typing.TYPE_CHECKING:  # pragma: no cover
    TrainConfig = _TrainConfigMethods  # type: ignore[misc,assignment]  # noqa: F811


# ---------------------------------------------------------------------------- validation


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        parts = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin in (list, tuple):
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping of KEY: VALUE"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _conforms(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is Union:
        return any(_conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    return isinstance(value, hint)


def _check_types(config: Any) -> None:
    hints = typing.get_type_hints(type(config))
    for name in config.field_names():
        value = getattr(config, name)
        if not _conforms(value, hints[name]):
            raise ConfigError(f"{name} must be {_describe(hints[name])}, got {short_repr(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")


def _check_names(config: Any) -> None:
    from ..data import list_datasets
    from ..methods import list_methods
    from ..models import list_models

    methods = sorted([*list_methods(), *TRAINING_METHODS])
    for name, valid in (("method", methods), ("model", list_models()), ("dataset", list_datasets())):
        if getattr(config, name) not in valid:
            raise ConfigError(f"unknown {name} {getattr(config, name)!r}; valid {name}s: {', '.join(valid)}")
    choices = {
        "optimizer": ("sgd", "adam", "adamw"),
        "lr_schedule": ("cosine", "multistep", "constant"),
        "amp": ("auto", "off", "fp16", "bf16"),
        "channels_last": ("auto", "on", "off"),
        "progress": ("auto", "bar", "log"),
    }
    for name, valid in choices.items():
        if getattr(config, name) not in valid:
            raise ConfigError(f"unknown {name} {getattr(config, name)!r}; valid: {', '.join(valid)}")


def _check_ranges(config: Any) -> None:
    for name in ("epochs", "batch_size", "accumulation_steps", "score_batches"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be a positive integer, got {getattr(config, name)!r}")
    if config.max_steps is not None and config.max_steps < 1:
        raise ConfigError(f"max_steps must be a positive integer, got {config.max_steps!r}")
    if config.workers < 0:
        raise ConfigError(f"workers must be >= 0, got {config.workers}")
    if not 0 <= config.seed < 2**32:
        raise ConfigError(f"seed must be an integer in [0, 2^32), got {short_repr(config.seed)}")
    check_threads(config.threads)
    # (name, low, high, low inclusive): every bound is a property of the quantity, e.g. momentum < 1.
    for name, lo, hi, lo_ok in (("lr", 0.0, math.inf, False), ("weight_decay", 0.0, math.inf, True),
                                ("momentum", 0.0, 1.0, True), ("label_smoothing", 0.0, 1.0, True),
                                ("val_fraction", 0.0, 1.0, True), ("gamma", 0.0, math.inf, False),
                                ("dist_timeout", 0.0, math.inf, False)):
        value = getattr(config, name)
        if not ((lo <= value if lo_ok else lo < value) and value < hi):
            interval = f"{'[' if lo_ok else '('}{lo:g}, {hi:g})"
            raise ConfigError(f"{name} must be in {interval}, got {value!r}")
    if any(e < 1 for e in config.keep_checkpoints):
        raise ConfigError(f"keep_checkpoints are epoch numbers >= 1, got {short_repr(config.keep_checkpoints)}")
    if config.fsdp and config.method == "lth":
        raise ConfigError("fsdp: true does not support method 'lth' (lottery tickets prune full, unsharded weights); "
                          "use DDP")
    if config.method == "dense" and config.density not in (None, 1, 1.0):
        raise ConfigError(f"method 'dense' trains at density 1; density={config.density} would be ignored "
                          f"(choose a sparse method, e.g. --method granet)")


def check_threads(threads: Any, name: str = "threads", optional: bool = True) -> None:
    """``threads`` is an int >= 1 (torch intra-op threads), or ``None`` if ``optional``; raises :class:`ConfigError`."""
    if threads is None and optional:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"{name} must be a positive integer (torch intra-op threads per process), got {threads!r}")


def _check_schedule(config: Any) -> None:
    if config.warmup_epochs < 0:
        raise ConfigError(f"warmup_epochs must be >= 0, got {config.warmup_epochs}")
    if config.milestones is None:
        return
    if config.lr_schedule != "multistep":
        raise ConfigError(f"milestones {config.milestones} only apply to lr_schedule multistep, "
                          f"not {config.lr_schedule!r}")
    for m in config.milestones:
        if not m > 0:
            raise ConfigError(f"milestone {m} must be > 0 (a fraction of training if <= 1, else an epoch)")
    if list(config.milestones) != sorted(set(config.milestones)):
        raise ConfigError(f"milestones must be strictly increasing, got {config.milestones}")


def _check_sparsity(config: Any) -> None:
    """Field ranges now; step values against the run's length once the data is known (the trainer)."""
    from ..methods import method_config

    # Step fields given in the same unit can be ordered now, with the numbers the user wrote.
    for first, second in (("prune_start", "prune_end"), ("regrow_start", "regrow_end")):
        a, b = getattr(config, first), getattr(config, second)
        if a is not None and b is not None and isinstance(a, int) == isinstance(b, int) and a >= b:
            raise ConfigError(f"{first} ({a}) must be before {second} ({b})")
    try:  # preset + options; the length of the run is not known yet, so any step count is accepted
        method_config(config.method, total_steps=_UNBOUNDED_STEPS, **config.sparsity_options())
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


_UNBOUNDED_STEPS = 10**12


def _check_lottery(config: Any) -> None:
    """``lth`` keys only with ``lth``; their ranges; sparsity keys that ``lth`` would silently ignore.

    What needs the run's length or weight count (the rewind step against the schedule, the final
    count of a given prune fraction against ``density``) is checked when the run is built.
    """
    given = [k for k in LTH_KEYS if getattr(config, k) is not None]
    if config.method != "lth":
        if given:
            raise ConfigError(f"{given[0]}={getattr(config, given[0])!r} only applies to method 'lth', "
                              f"not {config.method!r}")
        return
    ignored = [k for k in SPARSITY_KEYS if k != "keep_dense" and getattr(config, k) is not None]
    if ignored:
        raise ConfigError(f"method 'lth' prunes by global magnitude between whole trainings; "
                          f"{', '.join(f'{k}={getattr(config, k)!r}' for k in ignored)} does not apply to it "
                          f"(its keys: density, keep_dense, {', '.join(LTH_KEYS)})")
    if config.init_from:
        raise ConfigError(f"method 'lth' starts from its own dense initialisation; init_from={config.init_from!r} "
                          f"cannot be combined with it")
    if config.effective_lth_rounds < 1:
        raise ConfigError(f"lth_rounds must be a positive integer, got {config.lth_rounds!r}")
    p = config.lth_prune_fraction
    if p is not None and not 0.0 < p < 1.0:
        raise ConfigError(f"lth_prune_fraction must be in (0, 1), got {p!r}")
    if config.density is not None and not 0.0 < config.density < 1.0:
        raise ConfigError(f"method 'lth' prunes: density must be in (0, 1), got {config.density!r}")
    rewind = config.lth_rewind
    if isinstance(rewind, int) and rewind < 0:
        raise ConfigError(f"lth_rewind must be a step >= 0 or a fraction of the schedule, got {rewind!r}")
    if isinstance(rewind, float) and not 0.0 <= rewind < 1.0:
        raise ConfigError(f"lth_rewind={rewind!r} is a fraction of the schedule and must be in [0, 1); "
                          f"give steps as an int")


# ---------------------------------------------------------------------------- loading


def read_yaml_mapping(path: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; every failure is a :class:`ConfigError` naming the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text (UTF-8) file") from None
    loaded = load_yaml(text, f"config file {path}")
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must be a mapping of keys to values, got {type(loaded).__name__}")
    return loaded


def load_config(path: Optional[str], overrides: dict[str, Any]) -> Any:
    """Defaults ← embedded recipe (no file) ← the YAML file ← ``overrides``; validated."""
    values: dict[str, Any] = read_yaml_mapping(path) if path is not None else {}
    values.update(overrides)
    config = TrainConfig.from_dict(values)
    if path is None and (config.dataset, config.method) == (EMBEDDED_RECIPE["dataset"], EMBEDDED_RECIPE["method"]):
        recipe = {k: v for k, v in EMBEDDED_RECIPE["sparsity"].items() if k not in values}
        config = TrainConfig.from_dict(recipe, base=config)
    config.validate()
    return config


def resume_config(saved: dict[str, Any], overrides: dict[str, Any], source: str) -> Any:
    """The config of a resumed run: the one stored in its checkpoint, with harmless overrides.

    Raises:
        ConfigError: an override would change the result (the keys and both values are named).
    """
    base = TrainConfig.from_dict(saved)
    check_resume_compatible(base.to_dict(), TrainConfig.from_dict(overrides, base=base), source)
    config = TrainConfig.from_dict(overrides, base=base)
    config.validate()
    return config


def check_resume_compatible(saved: dict[str, Any], config: Any, source: str = "the run") -> None:
    """Refuse settings that would change the result of the run being resumed."""
    current = config.to_dict()
    differing = sorted(k for k in current if k not in RESUMABLE_DIFFERENCES and saved.get(k) != current[k])
    if differing:
        details = ", ".join(f"{k}: {source} has {saved.get(k)!r}, now {current[k]!r}" for k in differing)
        raise ConfigError(f"cannot resume: the config differs from the run's ({details})")


__all__ = ["TrainConfig", "load_config", "resume_config", "check_resume_compatible", "check_threads",
           "read_yaml_mapping", "SPARSITY_KEYS", "EMBEDDED_RECIPE", "DEFAULT_DENSITY", "TRAINING_METHODS", "LTH_KEYS",
           "STEP_KEYS", "DEFAULT_LTH_ROUNDS"]
