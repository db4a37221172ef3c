"""The granet command.

    granet train                                  # the embedded default: GraNet on digits, ~15 s on CPU
    granet train --config configs/cifar10_resnet50_granet_d0.1.yaml --seed 1 --out runs/r50-s1
    granet train --resume runs/r50-s1             # continue an interrupted run
    granet evaluate runs/r50-s1                   # re-test a saved model
    granet models | methods | datasets            # what is available
    granet flops --model imagenet_resnet50 --dataset imagenet --density 0.2
    granet report runs/*                          # markdown table + plots
    granet export runs/r50-s1                     # compressed sparse checkpoint (safetensors)
    granet plasticity --config configs/plasticity_digits.yaml   # the pruning-plasticity study

Every configuration key is also a flag (prune_end -> --prune-end); a key that does not
exist is an error, never silently ignored. Errors in user input are reported as one line.

Environment: GRANET_DATA_MIRROR points dataset downloads at a mirror; GRANET_NATIVE=0 turns off
the fused C kernels of topology updates (compiled when granet is installed, where a C compiler was
present; `granet --version` says whether they are in use; the torch operations that replace them
give the same results, more slowly).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from typing import Optional, Sequence

from .. import __version__, native
from ..errors import GranetError

logger = logging.getLogger("granet")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> "typing.NoReturn":
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``granet`` argument parser with all sub-commands (one module per sub-command)."""
    from . import export, flops, plasticity, report, train

    parser = _Parser(prog="granet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"granet {__version__} (native kernels: {native.status()})")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    train.add_parsers(sub)
    for module in (flops, report, plasticity, export):
        module.add_parser(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


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
    try:
        return int(args.func(args) or 0)
    except GranetError as exc:
        print(f"granet: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        from ..errors import Interrupted

        if isinstance(exc, Interrupted):
            print(f"granet: {exc.message()}", file=sys.stderr)
            return exc.exit_code
        print("granet: interrupted", file=sys.stderr)
        return 130


__all__ = ["main", "build_parser"]
