"""``granet flops``: per-layer and total inference FLOPs of a (sparse) model, without training."""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Optional

from ._parser import add_bool, add_command

HELP = "per-layer and total inference FLOPs of a (sparse) model"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``granet flops``."""
    add_command(sub, "flops", _options, help=HELP, description=HELP[0].upper() + HELP[1:] + ", without training.")


def _options(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``granet flops`` options to ``parser``."""
    from ..accounting.flops import DEFAULT_DENSITY

    parser.add_argument("--model", required=True, help="model name (see `granet models`)")
    parser.add_argument("--dataset", default="cifar10",
                        help="dataset giving classes / channels / image size (default: cifar10; no data is loaded)")
    parser.add_argument("--method", default=None,
                        help="sparse-training method: uses its default layer-wise distribution")
    parser.add_argument("--distribution", choices=("uniform", "er", "erk"), default=None,
                        help="layer-wise density distribution (default: the method's, else erk)")
    parser.add_argument("--density", type=float, default=None,
                        help=f"overall density of the sparsified weights, in (0, 1] (default: {DEFAULT_DENSITY})")
    parser.add_argument("--keep-dense", nargs="+", action="extend", default=[], metavar="PATTERN",
                        help="fnmatch patterns of layers kept dense (e.g. conv1 fc)")
    add_bool(parser, "--json", help="print one JSON object instead of a table (default: false)")


def _resolve_method(args: argparse.Namespace) -> tuple[float, str, tuple[str, ...], Optional[str]]:
    """Density, distribution, keep-dense patterns and an optional note for the requested setting."""
    from ..accounting.flops import _NOMINAL_STEPS, DEFAULT_DENSITY, DEFAULT_DISTRIBUTION
    from ..methods import method_config

    keep = tuple(args.keep_dense or ())
    density = DEFAULT_DENSITY if args.density is None else args.density
    if args.method is None:
        return density, args.distribution or DEFAULT_DISTRIBUTION, keep, None
    try:
        cfg = method_config(args.method, density=density, keep_dense=keep, total_steps=_NOMINAL_STEPS)
    except ValueError:
        if args.density is not None:
            raise
        # A method that fixes its density (``dense``) rejects the default 0.1: use its own.
        cfg = method_config(args.method, keep_dense=keep, total_steps=_NOMINAL_STEPS)
    note = None
    if cfg.prune == "global" or cfg.distribution == "global":
        distribution = args.distribution or DEFAULT_DISTRIBUTION
        note = (
            f"note: {args.method} prunes with one global magnitude threshold, so its final layer densities "
            f"are only known after training; this table uses the {distribution} distribution at density "
            f"{cfg.density:g} as an estimate (granet report shows a finished run's real densities)"
        )
    else:
        distribution = args.distribution or cfg.distribution
    return cfg.density, distribution, tuple(cfg.keep_dense), note


def run(args: argparse.Namespace) -> int:
    """Run ``granet flops``: print the per-layer FLOPs table (or one JSON object with ``--json``).

    Returns:
        0 on success, 2 on bad input (a one-line message on stderr).
    """
    import torch

    from ..accounting.flops_table import flops_table, format_flops_table
    from ..data import dataset_input_shape
    from ..models import create_model
    from ..sparsity.distributions import layer_counts
    from ..sparsity.targets import sparsifiable_parameters

    try:
        if args.density is not None and not (math.isfinite(args.density) and 0.0 < args.density <= 1.0):
            raise ValueError(f"--density must be in (0, 1], got {args.density}")
        num_classes, shape = dataset_input_shape(args.dataset)
        density, distribution, keep, note = _resolve_method(args)
        model = create_model(args.model, num_classes=num_classes, in_channels=shape[0], input_size=shape[-1],
                             input_dims=len(shape) - 1)
        sparsified = sparsifiable_parameters(model, keep_dense=keep)
        if not sparsified:
            raise ValueError(f"model {args.model!r} has no sparsifiable weight outside --keep-dense")
        shapes = [tuple(p.shape) for _, p in sparsified]
        counts = layer_counts(distribution, shapes, density)
        layer_density = {n: c / p.numel() for (n, p), c in zip(sparsified, counts)}
        example = torch.zeros(1, *shape)
        table = flops_table(model, example, layer_density)
    except (ValueError, TypeError, KeyError) as exc:
        message = str(exc).strip().replace("\n", " ") or type(exc).__name__
        print(f"granet flops: error: {message}", file=sys.stderr)
        return 2
    meta = {
        "model": args.model,
        "dataset": args.dataset,
        "input_shape": list(shape),
        "num_classes": num_classes,
        "method": args.method,
        "distribution": distribution,
        "target_density": density,
        "keep_dense": list(keep),
        "estimated": note is not None,
        "note": note,
    }
    if args.json:
        print(json.dumps({**meta, **table}, indent=2))
        return 0
    print(
        f"{args.model} on {args.dataset} (input {'x'.join(map(str, shape))}, {num_classes} classes)"
        f"{', method ' + args.method if args.method else ''}: {distribution} distribution at density {density:g}"
        + (f", kept dense: {', '.join(keep)}" if keep else "")
    )
    if note:
        print(note)
    print(format_flops_table(table))
    return 0
