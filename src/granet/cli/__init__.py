"""The granet command.

    granet train                                  # the embedded default: GraNet on digits, ~27 s on 2 CPU cores
    granet train --config configs/cifar10_resnet50_granet_d0.1.yaml --seed 1 --out runs/r50-s1
    granet train --resume runs/r50-s1             # continue an interrupted run
    granet evaluate runs/r50-s1                   # re-test a saved model
    granet models | methods | datasets            # what is available
    granet flops --model imagenet_resnet50 --dataset imagenet --density 0.2
    granet report runs/*                          # markdown table + plots
    granet export runs/r50-s1                     # compressed sparse checkpoint (safetensors)
    granet plasticity --config configs/plasticity_digits.yaml   # the pruning-plasticity study

Every configuration key is also a flag (prune_end -> --prune-end); a key that does not
exist is an error, never silently ignored. Boolean flags take any of --overwrite,
--no-overwrite, --overwrite true|false. Errors in user input are reported as one line.

Environment: granet sets OMP_WAIT_POLICY=PASSIVE unless it is set (to a non-empty value; OpenMP
rejects an empty one): OpenMP's default busy-waiting makes torch's threads spin against other
processes on a shared machine. GRANET_DATA_MIRROR points dataset downloads at a mirror;
GRANET_NATIVE=0 turns off the fused C kernels of topology updates (compiled when granet is
installed, where a C compiler was present; `granet --version` says whether they are in use; the
torch operations that replace them give the same results, more slowly).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Optional, Sequence

from .. import __version__
from ..errors import GranetError
from ._parser import Parser, add_bool
from ._parser import one_line as _one_line

logger = logging.getLogger("granet")

#: Exit status when the reader of the output went away (``granet flops --json | head -1``): 128 + SIGPIPE,
#: what a shell reports for a command stopped by a closed pipe.
BROKEN_PIPE = 141


class _Version(argparse.Action):
    """``--version``: the version and whether the native kernels are in use (loading them imports torch)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: Optional[str] = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        from ..kernels import native

        sys.stdout.write(f"granet {__version__} (native kernels: {native.status()})\n")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The ``granet`` argument parser with all sub-commands (one module per sub-command).

    A sub-command's options are added when it is parsed (or its help shown), so building this
    parser imports neither torch nor the registries; ``granet.cli._parser.command_parsers``
    adds them all.
    """
    from . import export, flops, plasticity, report, train

    parser = Parser(prog="granet")
    parser.describe(__doc__, raw=True)
    parser.add_argument("--version", action=_Version,
                        help="print the version and whether the native kernels are in use, and exit")
    add_bool(parser, "-v", "--verbose", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands",
                                help="one of the following (`granet COMMAND --help` for its options)")
    train.add_parsers(sub)
    for module in (flops, report, plasticity, export):
        module.add_parser(sub)
    return parser


def _passive_openmp() -> None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it (to a non-empty value: OpenMP rejects an empty one).

    OpenMP reads it when torch loads it, so this runs before anything imports torch. Waiting threads
    then sleep instead of spinning, which on a shared machine leaves the cores to the threads that
    have work; results do not depend on it. Child processes (torchrun ranks, sweep and study
    workers) inherit it.
    """
    if not os.environ.get("OMP_WAIT_POLICY", "").strip():
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null so that flushing what is left at exit cannot raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor (a captured stream): nothing to flush
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``granet`` command; returns the exit status.

    A closed output pipe (``granet flops --json | head -1``) ends the command quietly with status 141.
    """
    _passive_openmp()
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # here, not at exit, so a closed pipe is reported below
    except BrokenPipeError:
        _stdout_to_devnull()
        return BROKEN_PIPE


def _main(argv: Optional[Sequence[str]]) -> int:
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
