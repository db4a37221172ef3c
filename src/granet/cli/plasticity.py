"""``granet plasticity``: the pruning-plasticity study (see :mod:`granet.plasticity`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import plasticity
from ..plasticity import load_study_config, run_study

HELP = "the pruning-plasticity study (prune a dense run at several times)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``granet plasticity``."""
    p = sub.add_parser("plasticity", help=HELP, description=plasticity.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``granet plasticity``."""
    parser.add_argument("--config", metavar="FILE.yaml", help="study YAML (keys: train, prune_epochs, rates, ...)")
    parser.add_argument("--prune-epochs", type=int, nargs="+", dest="prune_epochs", default=argparse.SUPPRESS,
                        help="epochs after which the dense model is pruned")
    parser.add_argument("--rates", type=float, nargs="+", default=argparse.SUPPRESS,
                        help="pruning rates (fraction of weights removed)")
    parser.add_argument("--scope", choices=("global", "layerwise"), default=argparse.SUPPRESS)
    parser.add_argument("--regeneration", choices=("once", "periodic"), default=argparse.SUPPRESS)
    parser.add_argument("--drop-fraction", type=float, dest="drop_fraction", default=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=argparse.SUPPRESS, help="parallel trial processes")
    parser.add_argument("--threads", type=int, default=argparse.SUPPRESS,
                        help="torch threads of the dense run and of every trial (default 1), the same for any "
                             "--workers: results are bit-reproducible only at the same thread count")
    parser.add_argument("--out", default=argparse.SUPPRESS, help="study directory (default runs/plasticity)")
    parser.add_argument("--model", default=argparse.SUPPRESS, help="model of the dense run")
    parser.add_argument("--dataset", default=argparse.SUPPRESS, help="dataset of the dense run")
    parser.add_argument("--epochs", type=int, default=argparse.SUPPRESS, help="epochs of the dense schedule")
    parser.add_argument("--data-dir", dest="data_dir", default=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``granet plasticity``."""
    values = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func", "verbose")}
    train_overrides = {k: values.pop(k) for k in ("model", "dataset", "epochs", "data_dir") if k in values}
    study = load_study_config(args.config, dict(values, train=train_overrides))
    rows = run_study(study)
    root = Path(study.out)
    print((root / "plasticity.md").read_text())
    print(f"wrote {root / 'plasticity.csv'}, {root / 'plasticity.md'}, {root / 'plasticity.png'} ({len(rows)} trials)")
    return 0

