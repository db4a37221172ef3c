"""The granet command.

    granet train                                  # the embedded default: GraNet on digits, ~15 s on CPU
    granet train --config configs/cifar10_resnet50_granet_d0.1.yaml --seed 1 --out runs/r50-s1
    granet train --resume runs/r50-s1             # continue an interrupted run
    granet evaluate runs/r50-s1                   # re-test a saved model
    granet models | methods | datasets            # what is available
    granet flops --model imagenet_resnet50 --dataset imagenet --density 0.2
    granet report runs/*                          # markdown table + plots
    granet plasticity --config configs/plasticity_digits.yaml   # the pruning-plasticity study

Every configuration key is also a flag (prune_end -> --prune-end); a key that does not
exist is an error, never silently ignored. Errors in user input are reported as one line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing
from typing import Any, Callable, Optional, Sequence

from . import __version__

logger = logging.getLogger("granet")

_HELP = {
    "method": "sparse-training method (see `granet methods`)",
    "model": "model name (see `granet models`)",
    "dataset": "dataset name (see `granet datasets`)",
    "data_dir": "where datasets live (default $GRANET_DATA_DIR or ./data)",
    "download": "download the dataset (checksum-verified) if it is missing",
    "val_fraction": "fraction of the training split held out for validation / model selection",
    "augment": "training-set augmentation (crop/flip for CIFAR and ImageNet)",
    "dataset_options": "dataset-specific options as KEY=VALUE (e.g. image_size=64 for synthetic)",
    "density": "final density of the sparsified weights (1 - sparsity), in (0, 1]",
    "init_density": "initial density (pruning methods; granet-st defaults to 0.5)",
    "distribution": "layer-wise density: uniform, er, erk or global",
    "erk_power_scale": "exponent on ER/ERK raw densities",
    "keep_dense": "name patterns of layers kept dense (e.g. conv1 fc)",
    "prune": "gradual pruning scope: global or layerwise",
    "prune_start": "t0: int = optimizer step, float in [0, 1] = fraction of training",
    "prune_end": "tf: int = optimizer step, float in [0, 1] = fraction of training",
    "update_interval": "ΔT: optimizer steps between topology updates (default 20 for digits; recipes set theirs)",
    "drop_fraction": "r_0: fraction of active weights dropped and regrown per update",
    "drop_fraction_end": "value the drop fraction decays to",
    "drop_decay": "cosine or constant",
    "regrow_start": "first regrowth step (int steps or float fraction)",
    "regrow_end": "regrowth stops before this step (int steps or float fraction)",
    "grow": "grow criterion: gradient, momentum or random",
    "redistribute": "none or momentum (SNFS)",
    "mask_optimizer_state": "zero optimizer state of inactive weights every step",
    "epochs": "training epochs",
    "batch_size": "GLOBAL batch size (split over torchrun processes and accumulation steps)",
    "optimizer": "sgd, adam or adamw",
    "lr": "base learning rate",
    "momentum": "SGD momentum",
    "nesterov": "Nesterov momentum for SGD",
    "weight_decay": "weight decay",
    "lr_schedule": "cosine, multistep or constant (after warm-up)",
    "milestones": "multistep milestones: fractions of training (<= 1) or epochs (> 1)",
    "gamma": "multistep decay factor",
    "warmup_epochs": "linear learning-rate warm-up, in epochs",
    "label_smoothing": "label smoothing of the cross-entropy loss",
    "accumulation_steps": "micro-batches per optimizer step (gradient accumulation)",
    "seed": "seed of model init, data order and every sparsity choice",
    "device": "auto, cpu, cuda or cuda:N",
    "amp": "mixed precision: auto (fp16 on CUDA), off, fp16 or bf16",
    "channels_last": "channels-last memory format: auto (on for CUDA), on, off",
    "workers": "DataLoader worker processes",
    "out": "run directory (default runs/<dataset>-<model>-<method>-d<density>-s<seed>)",
    "resume": "continue the interrupted run in this directory",
    "progress": "auto (bar when interactive), bar or log",
    "max_steps": "stop after this many optimizer steps (smoke tests)",
    "keep_checkpoints": "epochs after which a copy checkpoint_epochN.pt is kept",
    "init_from": "continue from another run's checkpoint.pt with this config's method (a fresh sparsifier)",
}


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def inner(text: str) -> Any:
        return None if text.lower() in ("none", "null") else parse(text)

    inner.__name__ = getattr(parse, "__name__", "value")
    return inner


def _number(text: str) -> Any:
    """An int if it looks like one (steps), else a float (fractions)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _key_value(text: str) -> tuple[str, Any]:
    """``image_size=64`` -> ("image_size", 64) (values parsed as YAML scalars)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field, defaulting to 'not given' so YAML values survive."""
    from .train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        # Unwrap Optional[X] only; list[float] or dict[str, Any] stay what they are.
        base = next(a for a in args if a is not type(None)) if optional else hint
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": _HELP.get(f.name, "")}
        origin = typing.get_origin(base)
        if origin is dict:
            kwargs.update(nargs="*", metavar="KEY=VALUE", type=_key_value)
            parser.add_argument(flag, **kwargs)
            continue
        if origin is list:
            kwargs.update(nargs="*", metavar="VALUE")
            kwargs["type"] = {"milestones": _number, "keep_checkpoints": int}.get(f.name, str)
        elif f.name in ("prune_start", "prune_end", "regrow_start", "regrow_end"):
            kwargs["type"] = _optional(_number) if optional else _number
            kwargs["metavar"] = "STEP|FRACTION"
        elif base is bool:
            kwargs["type"] = _optional(_parse_bool) if optional else _parse_bool
            kwargs["metavar"] = "BOOL"
        elif base in (int, float, str):
            kwargs["type"] = _optional(base) if optional else base
            kwargs["metavar"] = base.__name__.upper()
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if kwargs["help"]:
            kwargs["help"] += f" (default: {default})"
        parser.add_argument(flag, **kwargs)


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import load_config, train

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func", "verbose")}
    if "dataset_options" in overrides:
        overrides["dataset_options"] = dict(overrides["dataset_options"])
    config_path = args.config
    if config_path is None and "resume" in overrides and overrides["resume"]:
        config_path = str(_resume_config_path(overrides["resume"]))
    config = load_config(config_path, overrides)
    summary = train(config)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(json.dumps({k: summary[k] for k in ("method", "model", "dataset", "sparsity", "best_val_accuracy",
                                               "test_accuracy", "steps", "wall_time_s")}, indent=2))
    return 0


def _resume_config_path(run_dir: str) -> Any:
    from pathlib import Path

    from .train import ConfigError

    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise ConfigError(f"cannot resume from {run_dir}: no config.yaml there")
    return path


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .train import evaluate_run

    results = [evaluate_run(run, device=args.device, data_dir=args.data_dir) for run in args.runs]
    for r in results:
        print(f"{r['run']}: test accuracy {r['test_accuracy']:.4f}, test loss {r['test_loss']:.4f}, "
              f"sparsity {r['sparsity']:.4f} (epoch {r['epoch']})")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import describe_model, list_models

    for name in list_models():
        print(f"{name:20s} {describe_model(name)}")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from .methods import describe_method, list_methods

    for name in list_methods():
        print(f"{name:15s} {describe_method(name)}")
    return 0


def _cmd_datasets(args: argparse.Namespace) -> int:
    from .data import list_datasets

    for name in list_datasets():
        print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``granet`` argument parser with all sub-commands."""
    parser = argparse.ArgumentParser(
        prog="granet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"granet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a sparse model (no arguments: GraNet on digits)",
                       description="Train a sparse model. Defaults are the embedded digits recipe; "
                                   "--config FILE.yaml overrides them and flags override the file.")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of config keys (see configs/)")
    add_config_arguments(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="re-evaluate saved runs on their test split")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    p.set_defaults(func=_cmd_evaluate)

    for name, func, text in (("models", _cmd_models, "list the models"),
                             ("methods", _cmd_methods, "list the sparse-training methods"),
                             ("datasets", _cmd_datasets, "list the datasets")):
        sub.add_parser(name, help=text).set_defaults(func=func)

    from . import flops, plasticity, report

    p = sub.add_parser("flops", help="per-layer and total inference FLOPs of a (sparse) model",
                       description="Per-layer and total inference FLOPs of a (sparse) model, without training.")
    flops.add_flops_arguments(p)
    p.set_defaults(func=flops.run_flops_command)
    p = sub.add_parser("report", help="compare runs: markdown table and plots",
                       description="Compare run directories: a markdown table and PNG plots.")
    report.add_report_arguments(p)
    p.set_defaults(func=report.run_report_command)
    p = sub.add_parser("plasticity", help="the pruning-plasticity study (prune a dense run at several times)",
                       description=plasticity.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    plasticity.add_plasticity_arguments(p)
    p.set_defaults(func=plasticity.run_plasticity_command)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``granet`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Under torchrun only rank 0 logs progress; the other ranks report warnings and errors.
    main_rank = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(
        level=(logging.DEBUG if getattr(args, "verbose", False) else logging.INFO) if main_rank else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .data import DatasetError
    from .train import ConfigError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, DatasetError) as exc:
        print(f"granet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("granet: interrupted; the last completed epoch is checkpointed: continue with --resume RUN_DIR",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
