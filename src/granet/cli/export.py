"""``granet export RUN_DIR``: write a run's sparse model as a compressed ``safetensors`` checkpoint.

    granet export runs/r50-s1                         # -> runs/r50-s1/model.sparse.safetensors
    granet export runs/r50-s1 --out r50.safetensors --format csr

Prints the file size and its ratio to the dense checkpoint (the run's ``model.pt``) and to the dense
tensor bytes. ``granet.load_sparse(FILE, model)`` restores the model bit for bit.

``--out`` never replaces one of the run's own files (``model.pt``, ``checkpoint.pt``, ...), and the
file is written under a temporary name and renamed, so a failed export leaves nothing half-written.
Every problem the user can fix (a missing or corrupt ``model.pt``, a refused ``--out``, a full or
read-only disk) is one line ``granet export: error: ...`` and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import GranetError
from ._parser import add_bool, add_command, describe
from ._parser import one_line as _one_line


def add_parser(subparsers: Any) -> None:
    """Register the ``export`` sub-command on an ``argparse`` sub-parsers object."""
    add_command(subparsers, "export", _options, help="write a run's sparse model as a compressed safetensors file")


def _options(p: argparse.ArgumentParser) -> None:
    from ..deploy.export import LAYOUTS, STRUCTURED_LAYOUTS

    describe(p, __doc__, raw=True)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a granet run directory (holds model.pt)")
    p.add_argument("--out", metavar="FILE", default=None,
                   help="output file (default RUN_DIR/model.sparse.safetensors)")
    p.add_argument("--format", dest="layout", choices=(*LAYOUTS, *STRUCTURED_LAYOUTS), default="bitmask",
                   help="bitmask: active values + 1 bit per weight; csr: values + row pointers + column indices; "
                        "fan-in: values + one row of input indices per output unit (a run trained with "
                        "--structure fan-in; its layers load as condensed layers)")
    add_bool(p, "--drop-zero-signs",
             help="store inactive weights as +0.0 even where the run holds -0.0 (smaller file; identical outputs, "
                  "but not bit-identical tensors; default: false)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export ``args.run_dir``; print sizes and ratios. Returns the exit status (2 on bad input)."""
    from ..deploy.export import export_run

    checkpoint = Path(args.run_dir) / "model.pt"
    try:
        info = export_run(args.run_dir, args.out, layout=args.layout, keep_zero_signs=not args.drop_zero_signs)
        checkpoint_bytes = checkpoint.stat().st_size
    except (GranetError, ValueError, TypeError, ImportError, OSError) as exc:  # all one line; anything else is a bug
        print(f"granet export: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    density = info.active_weights / info.total_weights if info.total_weights else 1.0
    print(f"wrote {info.path} ({info.layout}, {info.file_bytes:,} bytes)")
    print(f"density {density:.4f}: {info.active_weights:,} of {info.total_weights:,} weights in "
          f"{info.sparse_tensors} sparse tensors")
    print(f"size ratio {info.file_bytes / checkpoint_bytes:.4f} vs the dense checkpoint {checkpoint} "
          f"({checkpoint_bytes:,} bytes)")
    print(f"size ratio {info.ratio:.4f} vs the dense tensors ({info.dense_bytes:,} bytes)")
    return 0
