"""``granet train``, ``granet evaluate`` and the listings (``models``, ``methods``, ``datasets``).

Every flat :class:`~granet.train.TrainConfig` key is a flag (``prune_end`` → ``--prune-end``),
generated from :func:`~granet.train.config.config_keys`: its type, default and help text (the
fields' metadata; sparsity options take theirs from :class:`~granet.sparsity.config.SparsityConfig`'s fields).
"""
from __future__ import annotations

import argparse
import json
import os
import typing
from typing import Any, Callable, Iterable, Optional

from ..errors import short_repr, short_text
from ._parser import add_bool, add_command, describe

_PRESET = " (default: the method's preset)"


def bool_keys() -> list[str]:
    """The config keys that are boolean flags (``bool`` or ``Optional[bool]``)."""
    from ..train.config import config_keys

    return [key.name for key in config_keys() if _bool_hint(key.hint) is not None]


def _bool_hint(hint: Any) -> Optional[bool]:
    """For a type hint: ``False`` if it is ``bool``, ``True`` if ``Optional[bool]``, else ``None``."""
    if hint is bool:
        return False
    if typing.get_origin(hint) is typing.Union and set(typing.get_args(hint)) == {bool, type(None)}:
        return True
    return None


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def inner(text: str) -> Any:
        return None if text.lower() in ("none", "null") else parse(text)

    inner.__name__ = getattr(parse, "__name__", "value")
    return inner


def _step(text: str) -> Any:
    from ..sparsity.config import step_spec

    value = step_spec(text)
    if isinstance(value, str):
        raise argparse.ArgumentTypeError(f"expected a step (int) or a fraction of training (float), got {text!r}")
    return value


def _number(text: str) -> float:
    return float(text)


def _key_value(text: str) -> tuple[str, Any]:
    """``image_size=64`` -> ("image_size", 64) (values parsed as YAML scalars)."""
    from ..errors import ConfigError
    from ..safeyaml import load_yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {short_repr(text)}")
    try:
        return key, load_yaml(value, f"the value of {short_text(key, 40)}")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config key, defaulting to 'not given' so YAML values survive."""
    from ..train.config import STEP_KEYS, config_keys

    for key in config_keys():
        flag = "--" + key.name.replace("_", "-")
        optional_bool = _bool_hint(key.hint)
        if optional_bool is not None:
            text = key.help.replace("%", "%%")
            if key.preset:
                text += _PRESET
            elif key.default is not None:
                text += f" (default: {str(key.default).lower()})"
            add_bool(parser, flag, dest=key.name, default=argparse.SUPPRESS, optional=optional_bool, help=text)
            continue
        args = typing.get_args(key.hint)
        optional = type(None) in args
        base = next(a for a in args if a is not type(None)) if optional and len(args) == 2 else key.hint
        kwargs: dict[str, Any] = {"dest": key.name, "default": argparse.SUPPRESS, "help": key.help.replace("%", "%%")}
        origin = typing.get_origin(base)
        if origin is dict:
            kwargs.update(nargs="*", metavar="KEY=VALUE", type=_key_value)
        elif origin is tuple:  # a list of values of one type
            item = typing.get_args(base)[0]
            kwargs.update(nargs="*", metavar="VALUE", type=_number if item is float else item)
        elif key.name in STEP_KEYS:
            kwargs.update(type=_optional(_step), metavar="STEP|FRACTION")
        elif base in (int, float, str):
            kwargs.update(type=_optional(base) if optional else base, metavar=base.__name__.upper())
        if key.preset:
            kwargs["help"] += _PRESET
        elif kwargs["help"] and key.default is not None and not isinstance(key.default, (tuple, dict)):
            kwargs["help"] += f" (default: {key.default})"
        parser.add_argument(flag, **kwargs)


def _cmd_train(args: argparse.Namespace) -> int:
    from ..train import load_config, resume_point, train

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func", "verbose")}
    if "dataset_options" in overrides:
        overrides["dataset_options"] = dict(overrides["dataset_options"])
    resume = overrides.pop("resume", None)
    if resume:
        if args.config is not None:
            from ..errors import ConfigError

            raise ConfigError("--resume takes the run's own config; --config cannot be combined with it")
        config, state = resume_point(resume, overrides)
    else:
        config, state = load_config(args.config, overrides), None
    summary = train(config, checkpoint=state)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(json.dumps({k: summary[k] for k in ("method", "model", "dataset", "sparsity", "best_val_accuracy",
                                               "test_accuracy", "steps", "wall_time_s")}, indent=2))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ..train import evaluate_run

    results = [evaluate_run(run, device=args.device, data_dir=args.data_dir) for run in args.runs]
    for r in results:
        print(f"{r['run']}: test accuracy {r['test_accuracy']:.4f}, test loss {r['test_loss']:.4f}, "
              f"sparsity {r['sparsity']:.4f} (epoch {r['epoch']})")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def _print_entries(entries: Iterable[tuple[str, str]], width: int) -> None:
    """One line per registry entry: its name, padded to ``width``, and its description."""
    for name, description in entries:
        print(f"{name:{width}s} {description}".rstrip())


def _cmd_models(args: argparse.Namespace) -> int:
    from ..models import describe_model, list_models

    _print_entries(((name, describe_model(name)) for name in list_models()), 20)
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from ..methods import describe_method, list_methods
    from ..train.config import TRAINING_METHODS

    _print_entries(((name, describe_method(name)) for name in list_methods()), 15)
    # then the training procedures of `granet train`, which are not sparsifier presets
    _print_entries(TRAINING_METHODS.descriptions(), 15)
    return 0


def _cmd_datasets(args: argparse.Namespace) -> int:
    from ..data import describe_dataset, list_datasets

    _print_entries(((name, describe_dataset(name)) for name in list_datasets()), 15)
    return 0


def _train_options(p: argparse.ArgumentParser) -> None:
    describe(p, "Train a sparse model. Defaults are the embedded digits recipe (GraNet, 95% sparsity, ΔT 20 steps, "
                 "the ΔT of every scheduled method on digits); "
                 "--config FILE.yaml overrides them and flags override the file. Sparsity options left unset take "
                 "the method's preset (see `granet methods`).")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of config keys (see configs/)")
    add_config_arguments(p)
    p.set_defaults(func=_cmd_train)


def _evaluate_options(p: argparse.ArgumentParser) -> None:
    describe(p, "Re-evaluate the selected model of saved runs on their test split; prints test accuracy, test loss "
                 "and sparsity, one line per run.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by `granet train`")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda or cuda:N (default: auto, a CUDA device if there is one)")
    p.add_argument("--data-dir", default=None,
                   help="where the datasets live (default: the directory each run was trained with)")
    add_bool(p, "--json", help="also print the results as JSON (default: false)")
    p.set_defaults(func=_cmd_evaluate)


def _listing(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.ArgumentParser], None]:
    return lambda p: p.set_defaults(func=func)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``train``, ``evaluate``, ``models``, ``methods`` and ``datasets``."""
    add_command(sub, "train", _train_options, help="train a sparse model (no arguments: GraNet on digits)")
    add_command(sub, "evaluate", _evaluate_options, help="re-evaluate saved runs on their test split")
    for name, func, text in (("models", _cmd_models, "list the models"),
                             ("methods", _cmd_methods, "list the sparse-training methods"),
                             ("datasets", _cmd_datasets, "list the datasets")):
        add_command(sub, name, _listing(func), help=text, description=text[0].upper() + text[1:] + ".")


__all__ = ["add_parsers", "add_config_arguments", "bool_keys"]
