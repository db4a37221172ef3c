"""The configuration of a training run: ``TrainConfig``, its flat form, its checks, YAML loading and resume rules.

:class:`TrainConfig` is a frozen dataclass of sections: what to train (``method``, ``model``,
``seed``, ``init_from``, ``score_batches``), then :class:`DataConfig`, :class:`SparsityOptions`,
:class:`LotteryOptions`, :class:`OptimConfig`, :class:`MachineConfig` and :class:`OutputConfig`.
Every field carries its help text in its metadata (``granet train --help`` shows it).

Its serialised form is *flat*: one key per field, named like the field (``update_interval: 20``).
That is the form of YAML files, of the command line (``--update-interval 20``), of a run's
``config.yaml`` and of the ``config`` entry of its checkpoints. :meth:`TrainConfig.from_dict` is the
one way in from it: it refuses unknown keys, parses step values, and checks every value that can be
checked without the data, so a ``TrainConfig`` built by it is passed down and never checked again.
:meth:`TrainConfig.to_dict` is the way out.

Sparsity options are the :class:`~granet.sparsity.config.SparsityConfig` fields the user may set (every field
except ``method``, ``total_steps`` and ``seed``, which the run sets); their default ``None`` means
"the method's preset", so a method's own ΔT, t0, tf and r_0 are used unless the user sets them.
When the run's length is known, the trainer resolves them once into the ``SparsityConfig`` its
sparsifier is built from, and records the resolved values (:meth:`TrainConfig.with_sparsity`) in
``config.yaml`` and every checkpoint, so a resume rebuilds exactly the same sparsifier.

Layering, from weakest to strongest: the defaults ← the embedded digits recipe (only when no
``--config`` file is given, and only on its own dataset; see :data:`EMBEDDED_RECIPE`) ← ``--config FILE.yaml`` ←
command-line flags. A resume layers the checkpoint's config ← flags that do not change the result.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

from ..errors import ConfigError, short_repr
from ..registry import Registry, unknown_name
from ..safeyaml import MAX_BYTES, load_yaml
from ..sparsity.config import STEP_FIELDS, SparsityConfig, StepSpec, field_help, step_spec
from ..sparsity.structure import parse_structure

logger = logging.getLogger(__name__)

#: The embedded default job (``granet train`` with no arguments). Its sparsity settings belong to its
#: own dataset: the digits run is 600 optimizer steps, so the presets' ΔT of 100-1000 would update the
#: masks a few times or once; every method that updates its masks on a schedule
#: (:func:`granet.methods.updates_topology`) takes the recipe's ΔT on digits unless one is given.
EMBEDDED_RECIPE: dict[str, Any] = {"dataset": "digits", "method": "granet", "sparsity": {"update_interval": 20}}
#: How masked Linear layers compute (``execution``; see :mod:`granet.sparsity.execution`).
EXECUTION_MODES = ("dense", "sparse", "auto")
#: The density of a sparse method when none is given (the embedded recipe's 95% sparsity).
DEFAULT_DENSITY = 0.05

#: Methods that are training procedures rather than sparsifier presets: ``lth`` trains the network
#: R + 1 times (see :mod:`granet.train.lottery_run`).
#: Each entry is the module that implements the procedure (:mod:`granet.train.run` picks its trainer).
TRAINING_METHODS: Registry[str] = Registry("training method")
TRAINING_METHODS.register("lth", "granet.train.lottery_run",
                          "lottery ticket / iterative magnitude pruning with rewinding: R+1 trainings, global "
                          "magnitude pruning between them (--lth-rounds, --lth-prune-fraction, --lth-rewind)")
#: Pruning rounds of ``lth`` when none are given (4 trainings).
DEFAULT_LTH_ROUNDS = 3

# Keys that may differ between a run and its resumption (they do not change the result). ``threads``
# is the exception that is allowed anyway: it is a runtime setting of the machine the run continues on,
# but it changes the order of float sums, so :func:`granet.train.train` warns when it differs.
RESUMABLE_DIFFERENCES = frozenset({
    "device", "workers", "progress", "resume", "out", "data_dir", "download", "overwrite", "dist_timeout",
    "tensorboard", "fsdp", "threads",
})


def _key(default: Any, text: str, **meta: Any) -> Any:
    """A config field with its help text in ``metadata["help"]``; sequences default to ``()``."""
    return field(default=default, metadata={"help": text, **meta})


def _preset(name: str) -> Any:
    """A sparsity option: default ``None`` (the method's preset), help text from ``SparsityConfig``'s field."""
    return field(default=None, metadata={"help": field_help()[name], "preset": True})


# ---------------------------------------------------------------------------- the sections


@dataclass(frozen=True)
class DataConfig:
    """Which dataset a run trains on, where it lives and how it is split."""

    dataset: str = _key("digits", "dataset name (see `granet datasets`)")
    data_dir: Optional[str] = _key(None, "where datasets live (default $GRANET_DATA_DIR or ./data)")
    download: bool = _key(False, "download the dataset (checksum-verified) if it is missing")
    val_fraction: float = _key(0.1, "fraction of the training split held out for validation / model selection")
    augment: bool = _key(True, "training-set augmentation (crop/flip for CIFAR and ImageNet)")
    # A dict (not a read-only mapping) so that configs pickle into sweep workers; never mutated.
    dataset_options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "dataset-specific options as KEY=VALUE (e.g. image_size=64 for synthetic)"})


@dataclass(frozen=True)
class SparsityOptions:
    """The target density and the :class:`~granet.sparsity.config.SparsityConfig` fields a user may set.

    ``None`` means the method's preset (``density``: 1 for ``dense``, else :data:`DEFAULT_DENSITY`).
    The fields are those of ``SparsityConfig`` except ``method``, ``total_steps`` and ``seed``;
    ``tests/test_train_config.py`` keeps the two in step.
    """

    density: Optional[float] = _key(None, "final density of the sparsified weights (1 - sparsity), in (0, 1]; "
                                          "default 0.05 for sparse methods, N / M with an N:M --structure")
    init_density: Optional[float] = _preset("init_density")
    distribution: Optional[str] = _preset("distribution")
    erk_power_scale: Optional[float] = _preset("erk_power_scale")
    keep_dense: Optional[tuple[str, ...]] = _preset("keep_dense")
    prune: Optional[str] = _preset("prune")
    prune_start: Optional[StepSpec] = _preset("prune_start")
    prune_end: Optional[StepSpec] = _preset("prune_end")
    update_interval: Optional[int] = _preset("update_interval")
    drop_fraction: Optional[float] = _preset("drop_fraction")
    drop_fraction_end: Optional[float] = _preset("drop_fraction_end")
    drop_decay: Optional[str] = _preset("drop_decay")
    regrow_start: Optional[StepSpec] = _preset("regrow_start")
    regrow_end: Optional[StepSpec] = _preset("regrow_end")
    grow: Optional[str] = _preset("grow")
    prune_criterion: Optional[str] = _preset("prune_criterion")
    drop_criterion: Optional[str] = _preset("drop_criterion")
    redistribute: Optional[str] = _preset("redistribute")
    reinit_regrown: Optional[str] = _preset("reinit_regrown")
    protect_units: Optional[bool] = _preset("protect_units")
    mask_optimizer_state: Optional[bool] = _preset("mask_optimizer_state")
    rng: Optional[str] = _preset("rng")
    structure: Optional[str] = _preset("structure")
    ablation: Optional[float] = _preset("ablation")
    track_exploration: Optional[bool] = _preset("track_exploration")


@dataclass(frozen=True)
class LotteryOptions:
    """Lottery-ticket options (method ``lth`` only; ``None``: derived, see ``_check_lottery``)."""

    lth_rounds: Optional[int] = _key(None, "method lth: pruning rounds R (R+1 trainings: a dense one, then one "
                                           "per round); default 3")
    lth_prune_fraction: Optional[float] = _key(None, "method lth: fraction of the remaining weights pruned per round; "
                                                     "default 1 - density^(1/R), so the last round ends at --density "
                                                     "exactly")
    lth_rewind: Optional[StepSpec] = _key(None, "method lth: iteration k the survivors are reset to after each pruning "
                                                "(0: the initialisation), a step or a fraction of the schedule; later "
                                                "rounds train from k to the end (default 0)")


@dataclass(frozen=True)
class OptimConfig:
    """How long and how a run is optimised: epochs, batches, optimizer, learning-rate schedule."""

    epochs: int = _key(30, "training epochs")
    batch_size: int = _key(64, "GLOBAL batch size (split over torchrun processes and accumulation steps)")
    accumulation_steps: int = _key(1, "micro-batches per optimizer step (gradient accumulation)")
    max_steps: Optional[int] = _key(None, "stop after this many optimizer steps (smoke tests)")
    optimizer: str = _key("sgd", "sgd, adam or adamw")
    lr: float = _key(0.1, "base learning rate")
    momentum: float = _key(0.9, "SGD momentum")
    nesterov: bool = _key(True, "Nesterov momentum for SGD")
    weight_decay: float = _key(5e-4, "weight decay")
    lr_schedule: str = _key("cosine", "cosine, multistep or constant (after warm-up)")
    milestones: Optional[tuple[float, ...]] = _key(None, "multistep milestones: fractions of training (<= 1) or "
                                                         "epochs (> 1); default 0.5 0.75")
    gamma: float = _key(0.1, "multistep decay factor (> 0)")
    warmup_epochs: float = _key(0.0, "linear learning-rate warm-up, in epochs")
    label_smoothing: float = _key(0.0, "label smoothing of the cross-entropy loss")


@dataclass(frozen=True)
class MachineConfig:
    """Where a run executes: device, precision, processes and threads (results may depend on
    ``threads`` and ``amp``; the rest never changes them)."""

    device: str = _key("auto", "auto, cpu, cuda or cuda:N")
    amp: str = _key("auto", "mixed precision: auto (fp16 on CUDA), off, fp16 or bf16")
    channels_last: str = _key("auto", "channels-last memory format: auto (on for CUDA), on, off")
    workers: int = _key(0, "DataLoader worker processes")
    threads: Optional[int] = _key(
        None, "torch intra-op threads of each training process (default: torch's current setting, usually one "
              "per core); the count changes the order of float sums, so a run is bit-reproducible only at the "
              "same thread count. summary.json and config.yaml record the count used; --resume keeps the run's "
              "count unless given (a different one is allowed, with a warning)")
    dist_timeout: float = _key(600.0, "seconds a torchrun process waits for the others before failing (a dead or "
                                      "frozen rank)")
    fsdp: bool = _key(False, "shard the model with FSDP2 (torchrun, 2+ processes); checkpoints stay full-state")
    execution: str = _key("dense", "how masked nn.Linear layers compute on the CPU: dense (dense matrices with "
                                   "zeros, default), sparse (sparse kernels for every masked Linear) or auto (sparse "
                                   "where a layer is large and at most 0.05 dense); masks are the same, weights equal "
                                   "up to the order of float sums; see README 'Sparse execution'")


@dataclass(frozen=True)
class OutputConfig:
    """What a run writes, and where: its run directory, kept checkpoints, progress, TensorBoard."""

    out: Optional[str] = _key(None, "run directory (default runs/<dataset>-<model>-<method>-d<density>-s<seed>); "
                                    "must not hold another run")
    resume: Optional[str] = _key(None, "continue the interrupted run in this directory (with its checkpoint's config)")
    overwrite: bool = _key(False, "replace the run files in --out if it already holds a run")
    progress: str = _key("auto", "auto (bar when interactive), bar or log")
    keep_checkpoints: tuple[int, ...] = _key((), "epochs after which a copy checkpoint_epochN.pt is kept")
    tensorboard: bool = _key(False, "also write TensorBoard scalars and per-layer density histograms to "
                                    'RUN_DIR/tensorboard (pip install -c constraints.txt -e ".[tensorboard]")')


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs, in sections; the defaults are the embedded digits recipe.

    Build it from flat keys with :meth:`from_dict` (or :func:`load_config` / ``resume_point``), which
    checks it; change it with :meth:`with_values`. Constructing the dataclasses directly skips the
    checks (fine for tests and for the defaults).
    """

    method: str = _key("granet", "sparse-training method (see `granet methods`)")
    model: str = _key("digits_cnn", "model name (see `granet models`)")
    seed: int = _key(0, "seed of model init, data order and every sparsity choice")
    init_from: Optional[str] = _key(None, "continue from another run's checkpoint.pt with this config's method "
                                          "(a fresh sparsifier)")
    score_batches: int = _key(1, "training batches scored at initialisation by snip / grasp (synflow needs none)")
    data: DataConfig = field(default_factory=DataConfig)
    sparsity: SparsityOptions = field(default_factory=SparsityOptions)
    lottery: LotteryOptions = field(default_factory=LotteryOptions)
    optim: OptimConfig = field(default_factory=OptimConfig)
    machine: MachineConfig = field(default_factory=MachineConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    # ------------------------------------------------------------------ the flat form

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, check: bool = True) -> "TrainConfig":
        """The config of flat keys ``values`` over the defaults.

        Args:
            values: flat config keys (YAML keys), e.g. ``{"method": "rigl", "update_interval": 20}``.
            check: check every value (default). ``False`` only parses and type-checks: for reading the
                record of a finished run (``granet evaluate``), whose method need not be registered here.

        Raises:
            ConfigError: an unknown key, a value of the wrong type, or (with ``check``) any value that
                can be refused without the data; the message names the key.
        """
        flat = flat_values(values)
        sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        top: dict[str, Any] = {}
        for key in config_keys():
            value = flat[key.name]
            if not _conforms(value, key.hint):
                raise ConfigError(f"{key.name} must be {_describe(key.hint)}, got {short_repr(value)}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{key.name} must be a finite number, got {value!r}")
            (top if key.section is None else sections[key.section])[key.name] = _stored(value)
        config = cls(**top, **{name: section(**sections[name]) for name, section in _SECTIONS.items()})
        if check:
            config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """The flat form: every key, in :func:`config_keys` order, as plain YAML/JSON values."""
        return {key.name: _plain(getattr(self if key.section is None else getattr(self, key.section), key.name))
                for key in config_keys()}

    def with_values(self, **values: Any) -> "TrainConfig":
        """A copy with flat keys changed, checked like :meth:`from_dict`, e.g. ``config.with_values(lr=0.05)``."""
        return TrainConfig.from_dict({**self.to_dict(), **values})

    def with_run_values(self, **values: Any) -> "TrainConfig":
        """A copy with flat keys set to values that need no checking because the run (or the driver
        of many runs) determined them: the thread count in effect, the resolved sparsity and lottery
        settings, the values a resumed run continues with, its directory.

        Unlike :meth:`with_values` nothing is checked again.
        """
        where = {key.name: key for key in config_keys()}
        top: dict[str, Any] = {}
        changed: dict[str, dict[str, Any]] = {}
        for name, value in values.items():
            key = where[name]
            (top if key.section is None else changed.setdefault(key.section, {}))[name] = _stored(value)
        sections = {name: dataclasses.replace(getattr(self, name), **fields) for name, fields in changed.items()}
        return dataclasses.replace(self, **top, **sections)

    def with_sparsity(self, sparsity: SparsityConfig) -> "TrainConfig":
        """This config recording the values of ``sparsity``, the resolved config the sparsifier runs."""
        return self.with_run_values(density=sparsity.density, **{k: getattr(sparsity, k) for k in SPARSITY_KEYS})

    # ------------------------------------------------------------------ derived values

    @property
    def effective_density(self) -> float:
        """The target density: as given, else 1 for ``dense`` and the default for sparse methods."""
        density, fraction = self.sparsity.density, self.lottery.lth_prune_fraction
        if density is not None:
            return density
        nm = _nm_density(self.sparsity.structure)
        if nm is not None and self.method not in ("dense", "lth"):  # N:M fixes the final density at N / M
            return nm
        if self.method == "lth" and fraction is not None:
            return (1.0 - fraction) ** self.effective_lth_rounds
        return 1.0 if self.method == "dense" else DEFAULT_DENSITY

    @property
    def effective_lth_rounds(self) -> int:
        """Pruning rounds of ``lth``: as given, else :data:`DEFAULT_LTH_ROUNDS`."""
        rounds = self.lottery.lth_rounds
        return DEFAULT_LTH_ROUNDS if rounds is None else rounds

    def sparsity_options(self) -> dict[str, Any]:
        """The :class:`~granet.sparsity.config.SparsityConfig` overrides of this config (unset keys: the preset's)."""
        out = {name: getattr(self.sparsity, name) for name in SPARSITY_KEYS
               if getattr(self.sparsity, name) is not None}
        if self.method != "dense":
            out["density"] = self.effective_density
        return out

    def validate(self) -> None:
        """Check every value that can be checked without data (:meth:`from_dict` does);
        raises :class:`ConfigError`."""
        _check_names(self)
        _check_ranges(self)
        _check_schedule(self)
        _check_lottery(self)
        if self.method != "lth":
            _check_sparsity(self)


def _nm_density(structure: Optional[str]) -> Optional[float]:
    """N / M of an N:M ``structure``; ``None`` for none, the others, and text that is no structure
    (validation names it)."""
    if structure is None:
        return None
    try:
        return parse_structure(structure).density
    except ValueError:
        return None


#: The sections of TrainConfig: field name -> its dataclass.
_SECTIONS: dict[str, type] = {name: hint for name, hint in typing.get_type_hints(TrainConfig).items()
                              if isinstance(hint, type) and dataclasses.is_dataclass(hint)}
#: The sparsity options that are ``SparsityConfig`` fields (``density`` aside, which every method has).
SPARSITY_KEYS = tuple(f.name for f in dataclasses.fields(SparsityOptions) if f.name != "density")
#: The lottery-ticket keys (default None: derived, see ``_check_lottery``).
LTH_KEYS = tuple(f.name for f in dataclasses.fields(LotteryOptions))
#: Keys holding a step value (optimizer steps as an int, or a fraction of the run as a float).
STEP_KEYS = (*STEP_FIELDS, "lth_rewind")


@dataclass(frozen=True)
class ConfigKey:
    """One flat config key: where it lives in :class:`TrainConfig`, its type, default and help."""

    name: str
    section: Optional[str]  # the TrainConfig field holding it; None: a field of TrainConfig itself
    hint: Any
    default: Any  # as TrainConfig holds it (a tuple for a list)
    help: str
    preset: bool  # None means the method's preset


@functools.lru_cache(maxsize=None)
def config_keys() -> tuple[ConfigKey, ...]:
    """Every flat config key, in the order of ``config.yaml`` (TrainConfig's fields, sections expanded)."""
    keys = []
    for outer in dataclasses.fields(TrainConfig):
        cls = _SECTIONS.get(outer.name)
        section, fields = (outer.name, dataclasses.fields(cls)) if cls else (None, (outer,))
        hints = typing.get_type_hints(cls or TrainConfig)
        for f in fields:
            keys.append(ConfigKey(f.name, section, hints[f.name], _default(f), str(f.metadata.get("help", "")),
                                  bool(f.metadata.get("preset", False))))
    return tuple(keys)


def _default(f: "dataclasses.Field[Any]") -> Any:
    factory = f.default_factory
    return factory() if callable(factory) else f.default


def flat_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """Flat ``values`` over the flat defaults, step values parsed (as in a run's ``config.yaml``).

    Raises:
        ConfigError: an unknown key.
    """
    defaults = {key.name: _plain(key.default) for key in config_keys()}
    unknown = sorted(str(k) for k in set(values) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)} (see `granet train --help`)")
    return {**defaults, **{k: step_spec(v) if k in STEP_KEYS else v for k, v in values.items()}}


def _stored(value: Any) -> Any:
    """A flat value as the frozen config holds it: sequences as tuples, mappings copied."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    if isinstance(value, dict):
        return dict(value)
    return value


def _plain(value: Any) -> Any:
    """A held value in its flat (YAML) form: tuples as lists, mappings as (new) dicts."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


# ---------------------------------------------------------------------------- checks


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


def _check_names(config: TrainConfig) -> None:
    from ..data import list_datasets
    from ..methods import list_methods
    from ..models import list_models

    methods = sorted([*list_methods(), *TRAINING_METHODS.names()])
    for name, value, valid in (("method", config.method, methods), ("model", config.model, list_models()),
                               ("dataset", config.data.dataset, list_datasets())):
        if value not in valid:
            raise ConfigError(unknown_name(name, value, valid))
    choices = (
        ("optimizer", config.optim.optimizer, ("sgd", "adam", "adamw")),
        ("lr_schedule", config.optim.lr_schedule, ("cosine", "multistep", "constant")),
        ("amp", config.machine.amp, ("auto", "off", "fp16", "bf16")),
        ("channels_last", config.machine.channels_last, ("auto", "on", "off")),
        ("progress", config.output.progress, ("auto", "bar", "log")),
    )
    for name, value, options in choices:
        if value not in options:
            raise ConfigError(f"unknown {name} {value!r}; valid: {', '.join(options)}")


def _check_ranges(config: TrainConfig) -> None:
    optim, machine = config.optim, config.machine
    for name, count in (("epochs", optim.epochs), ("batch_size", optim.batch_size),
                        ("accumulation_steps", optim.accumulation_steps), ("score_batches", config.score_batches)):
        if count < 1:
            raise ConfigError(f"{name} must be a positive integer, got {count!r}")
    if optim.max_steps is not None and optim.max_steps < 1:
        raise ConfigError(f"max_steps must be a positive integer, got {optim.max_steps!r}")
    if machine.workers < 0:
        raise ConfigError(f"workers must be >= 0, got {machine.workers}")
    if not 0 <= config.seed < 2**32:
        raise ConfigError(f"seed must be an integer in [0, 2^32), got {short_repr(config.seed)}")
    check_threads(machine.threads)
    # (name, value, low, high, low inclusive): every bound is a property of the quantity, e.g. momentum < 1.
    for name, value, lo, hi, lo_ok in (("lr", optim.lr, 0.0, math.inf, False),
                                       ("weight_decay", optim.weight_decay, 0.0, math.inf, True),
                                       ("momentum", optim.momentum, 0.0, 1.0, True),
                                       ("label_smoothing", optim.label_smoothing, 0.0, 1.0, True),
                                       ("val_fraction", config.data.val_fraction, 0.0, 1.0, True),
                                       ("gamma", optim.gamma, 0.0, math.inf, False),
                                       ("dist_timeout", machine.dist_timeout, 0.0, math.inf, False)):
        if not ((lo <= value if lo_ok else lo < value) and value < hi):
            interval = f"{'[' if lo_ok else '('}{lo:g}, {hi:g})"
            raise ConfigError(f"{name} must be in {interval}, got {value!r}")
    if any(e < 1 for e in config.output.keep_checkpoints):
        kept = list(config.output.keep_checkpoints)  # named as the user wrote them: a list
        raise ConfigError(f"keep_checkpoints are epoch numbers >= 1, got {short_repr(kept)}")
    if machine.execution not in EXECUTION_MODES:
        raise ConfigError(f"execution must be one of {', '.join(EXECUTION_MODES)}, got {short_repr(machine.execution)}")
    if machine.execution != "dense":
        if machine.fsdp:
            raise ConfigError(f"execution={machine.execution} runs whole layers on one CPU process; it does not "
                              "combine with fsdp: true (use execution: dense)")
        if config.method in ("lth", "dense"):
            raise ConfigError(f"execution={machine.execution} follows a sparsifier's masks; method {config.method!r} "
                              f"{'has none' if config.method == 'dense' else 'rebuilds its masks between trainings'} "
                              "(use execution: dense)")
        if machine.device.startswith("cuda"):
            raise ConfigError(f"execution={machine.execution} is CPU execution; on {machine.device} use execution: "
                              "dense (unstructured sparsity gives no speed-up on GPUs)")
    if machine.fsdp and config.method == "lth":
        raise ConfigError("fsdp: true does not support method 'lth' (lottery tickets prune full, unsharded weights); "
                          "use DDP")
    density = config.sparsity.density
    if config.method == "dense" and density not in (None, 1, 1.0):
        raise ConfigError(f"method 'dense' trains at density 1; density={density} would be ignored "
                          f"(choose a sparse method, e.g. --method granet)")


def check_threads(threads: Any, name: str = "threads", optional: bool = True) -> None:
    """``threads`` is an int >= 1 (torch intra-op threads), or ``None`` if ``optional``; raises :class:`ConfigError`."""
    if threads is None and optional:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"{name} must be a positive integer (torch intra-op threads per process), got {threads!r}")


def _check_schedule(config: TrainConfig) -> None:
    optim = config.optim
    if optim.warmup_epochs < 0:
        raise ConfigError(f"warmup_epochs must be >= 0, got {optim.warmup_epochs}")
    if optim.milestones is None:
        return
    milestones = list(optim.milestones)  # named as the user wrote them: a list
    if optim.lr_schedule != "multistep":
        raise ConfigError(f"milestones {milestones} only apply to lr_schedule multistep, not {optim.lr_schedule!r}")
    for m in milestones:
        if not m > 0:
            raise ConfigError(f"milestone {m} must be > 0 (a fraction of training if <= 1, else an epoch)")
    if milestones != sorted(set(milestones)):
        raise ConfigError(f"milestones must be strictly increasing, got {milestones}")


def _check_sparsity(config: TrainConfig) -> None:
    """The method's preset with this config's options, checked without the run's length.

    The fields a method locks (e.g. ``snip``'s schedule) are checked here. Steps given as fractions
    are turned into steps, and checked against each other and the run's length, when the run is
    built and its length known (the trainer).
    """
    from ..methods import check_locked, method_preset

    try:  # the fields the method locks (e.g. snip's one-step schedule): no run length needed
        check_locked(config.method, config.sparsity_options())
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    options = config.sparsity
    # Step fields given in the same unit can be ordered now, with the numbers the user wrote.
    for first, second in (("prune_start", "prune_end"), ("regrow_start", "regrow_end")):
        a, b = getattr(options, first), getattr(options, second)
        if a is not None and b is not None and isinstance(a, int) == isinstance(b, int) and a >= b:
            raise ConfigError(f"{first} ({a}) must be before {second} ({b})")
    try:
        sparsity = SparsityConfig().replace(**method_preset(config.method)).replace(**config.sparsity_options())
        sparsity.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    given = [k for k in sparsity.unused_fields() if k in SPARSITY_KEYS and getattr(options, k) is not None]
    by_structure = [k for k in given if k in ("distribution", "erk_power_scale") and _nm_density(sparsity.structure)]
    if by_structure:  # N:M gives every layer the density n_t / M
        logger.warning("%s has no effect with structure %s (every layer's density is n_t / M)",
                       ", ".join(f"{k}={getattr(options, k)!r}" for k in by_structure), sparsity.structure)
        given = [k for k in given if k not in by_structure]
    if given:
        never = "its masks never change after the initial one" if "update_interval" in sparsity.unused_fields() \
            else "it does not " + ("prune" if sparsity.prune is None else "regrow")
        logger.warning("%s has no effect on method %r (%s)",
                       ", ".join(f"{k}={getattr(options, k)!r}" for k in given), config.method, never)


def _check_lottery(config: TrainConfig) -> None:
    """``lth`` keys only with ``lth``; their ranges; sparsity keys that ``lth`` would silently ignore.

    What needs the run's length or weight count (the rewind step against the schedule, the final
    count of a given prune fraction against ``density``) is checked when the run is built.
    """
    lottery = config.lottery
    given = [k for k in LTH_KEYS if getattr(lottery, k) is not None]
    if config.method != "lth":
        if given:
            raise ConfigError(f"{given[0]}={getattr(lottery, given[0])!r} only applies to method 'lth', "
                              f"not {config.method!r}")
        return
    ignored = [k for k in SPARSITY_KEYS if k != "keep_dense" and getattr(config.sparsity, k) is not None]
    if ignored:
        raise ConfigError(f"method 'lth' prunes by global magnitude between whole trainings; "
                          f"{', '.join(f'{k}={getattr(config.sparsity, k)!r}' for k in ignored)} does not apply to "
                          f"it (its keys: density, keep_dense, {', '.join(LTH_KEYS)})")
    if config.init_from:
        raise ConfigError(f"method 'lth' starts from its own dense initialisation; init_from={config.init_from!r} "
                          f"cannot be combined with it")
    if config.effective_lth_rounds < 1:
        raise ConfigError(f"lth_rounds must be a positive integer, got {lottery.lth_rounds!r}")
    p = lottery.lth_prune_fraction
    if p is not None and not 0.0 < p < 1.0:
        raise ConfigError(f"lth_prune_fraction must be in (0, 1), got {p!r}")
    density = config.sparsity.density
    if density is not None and not 0.0 < density < 1.0:
        raise ConfigError(f"method 'lth' prunes: density must be in (0, 1), got {density!r}")
    rewind = lottery.lth_rewind
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


def _updates_topology(method: Any) -> bool:
    """:func:`granet.methods.updates_topology`, False for a name that is not a sparsifier method
    (``lth``, or an unknown name that validation then names)."""
    from ..methods import list_methods, updates_topology

    return method in list_methods() and updates_topology(method)


def load_config(path: Optional[str], overrides: Mapping[str, Any]) -> TrainConfig:
    """Defaults ← embedded recipe (no file) ← the YAML file ← ``overrides``; checked."""
    values: dict[str, Any] = read_yaml_mapping(path) if path is not None else {}
    values.update(overrides)
    defaults = TrainConfig()
    target = (values.get("dataset", defaults.data.dataset), values.get("method", defaults.method))
    if path is None and target[0] == EMBEDDED_RECIPE["dataset"] and _updates_topology(target[1]):
        values = {**EMBEDDED_RECIPE["sparsity"], **values}
    return TrainConfig.from_dict(values)


def resume_config(saved: Mapping[str, Any], overrides: Mapping[str, Any], source: str) -> TrainConfig:
    """The config of a resumed run: the one stored in its checkpoint, with harmless overrides; checked.

    Raises:
        ConfigError: an override would change the result (the keys and both values are named).
    """
    base = flat_values(saved)
    merged = flat_values({**base, **overrides})
    check_resume_compatible(base, merged, source)
    return TrainConfig.from_dict(merged)


def check_resume_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], source: str = "the run") -> None:
    """Refuse settings (flat keys, as :func:`flat_values` gives them) that would change the result of the
    run being resumed. ``saved`` may lack keys added since it was written: they count as their defaults."""
    saved = flat_values(saved)
    differing = sorted(k for k in current if k not in RESUMABLE_DIFFERENCES and saved.get(k) != current[k])
    if differing:
        details = ", ".join(f"{k}: {source} has {saved.get(k)!r}, now {current[k]!r}" for k in differing)
        raise ConfigError(f"cannot resume: the config differs from the run's ({details})")


__all__ = ["TrainConfig", "DataConfig", "SparsityOptions", "LotteryOptions", "OptimConfig", "MachineConfig",
           "OutputConfig", "ConfigKey", "config_keys", "flat_values", "load_config", "resume_config",
           "check_resume_compatible", "check_threads", "read_yaml_mapping", "SPARSITY_KEYS", "EMBEDDED_RECIPE",
           "DEFAULT_DENSITY", "TRAINING_METHODS", "LTH_KEYS", "STEP_KEYS", "DEFAULT_LTH_ROUNDS",
           "RESUMABLE_DIFFERENCES"]
