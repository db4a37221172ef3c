"""``granet report``: compare run directories in a markdown table and PNG plots."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._parser import add_bool, add_command

HELP = "compare runs: markdown table and plots"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``granet report``."""
    add_command(sub, "report", _options, help=HELP,
                description="Compare run directories: a markdown table and PNG plots.")


def _options(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``granet report`` arguments to ``parser``."""
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run directories written by granet train (a directory that holds no run is skipped, "
                             "with a warning)")
    parser.add_argument("--out", default="report",
                        help="output directory for report.md and the PNGs (default: ./report)")
    add_bool(parser, "--plots", default=True,
             help="write the PNG figures beside report.md (default: true; --no-plots: report.md only)")


def run(args: argparse.Namespace) -> int:
    """Run ``granet report``: write ``report.md`` and PNGs into ``--out``, print the tables.

    Returns:
        0 on success, 2 on bad input (a one-line message on stderr).
    """
    from ..reports.report import load_runs, markdown_table, write_report

    try:
        runs = load_runs(args.runs, skip_empty=True)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a directory")
        write_report(runs, out, plots=getattr(args, "plots", True))
    except (ValueError, OSError) as exc:
        message = str(exc).strip().replace("\n", " ") or type(exc).__name__
        print(f"granet report: error: {message}", file=sys.stderr)
        return 2
    print(markdown_table(runs))
    return 0
