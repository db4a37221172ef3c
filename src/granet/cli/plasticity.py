"""``granet plasticity``: the pruning-plasticity study (see :mod:`granet.experiments.plasticity`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._parser import add_command, describe

HELP = "the pruning-plasticity study (prune a dense run at several times)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``granet plasticity``."""
    add_command(sub, "plasticity", _options, help=HELP)


def _options(parser: argparse.ArgumentParser) -> None:
    from ..experiments import plasticity

    describe(parser, plasticity.__doc__, raw=True)
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``granet plasticity``."""
    parser.add_argument("--config", metavar="FILE.yaml", help="study YAML (keys: train, prune_epochs, rates, ...)")
    parser.add_argument("--prune-epochs", type=int, nargs="+", dest="prune_epochs", default=argparse.SUPPRESS,
                        help="epochs after which the dense model is pruned")
    parser.add_argument("--rates", type=float, nargs="+", default=argparse.SUPPRESS,
                        help="pruning rates (fraction of weights removed)")
    parser.add_argument("--scope", choices=("global", "layerwise"), default=argparse.SUPPRESS,
                        help="global: one magnitude threshold over all layers; layerwise: every layer pruned at the "
                             "same rate (default: global)")
    parser.add_argument("--regeneration", choices=("once", "periodic"), default=argparse.SUPPRESS,
                        help="regenerate right after pruning and keep the mask (once), or every update interval "
                             "with a decaying fraction (periodic) (default: once)")
    parser.add_argument("--drop-fraction", type=float, dest="drop_fraction", default=argparse.SUPPRESS,
                        help="fraction of the surviving weights dropped and regrown, in (0, 1) (default: GraNet's "
                             "decaying r_t at the pruning time)")
    parser.add_argument("--workers", type=int, default=argparse.SUPPRESS,
                        help="parallel trial processes (default: one per CPU core, at most 4)")
    parser.add_argument("--threads", type=int, default=argparse.SUPPRESS,
                        help="torch threads of the dense run and of every trial (default 1), the same for any "
                             "--workers: results are bit-reproducible only at the same thread count")
    parser.add_argument("--out", default=argparse.SUPPRESS, help="study directory (default runs/plasticity)")
    parser.add_argument("--model", default=argparse.SUPPRESS, help="model of the dense run")
    parser.add_argument("--dataset", default=argparse.SUPPRESS, help="dataset of the dense run")
    parser.add_argument("--epochs", type=int, default=argparse.SUPPRESS, help="epochs of the dense schedule")
    parser.add_argument("--data-dir", dest="data_dir", default=argparse.SUPPRESS,
                        help="where the dataset lives (default $GRANET_DATA_DIR or ./data)")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``granet plasticity``."""
    from ..experiments.plasticity import load_study_config, run_study

    values = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func", "verbose")}
    train_overrides = {k: values.pop(k) for k in ("model", "dataset", "epochs", "data_dir") if k in values}
    study = load_study_config(args.config, dict(values, train=train_overrides))
    rows = run_study(study)
    root = Path(study.out)
    print((root / "plasticity.md").read_text())
    print(f"wrote {root / 'plasticity.csv'}, {root / 'plasticity.md'}, {root / 'plasticity.png'} ({len(rows)} trials)")
    return 0

