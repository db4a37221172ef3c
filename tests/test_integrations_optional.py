"""granet works without the optional frameworks, and each integration names the extra to install."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

# Blocks the optional packages as if they were not installed, then checks granet and its integrations.
SCRIPT = r'''
import importlib, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "lightning", "tensorboard"):
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
import torch, granet
s = granet.create_sparsifier("static", torch.nn.Sequential(torch.nn.Linear(4, 4)), density=0.5)
assert sum(s.counts) == 8
assert not [m for m in sys.modules if m.split(".")[0] in ("transformers", "lightning")]
for module in ("granet.integrations.hf", "granet.integrations.lightning", "granet.tensorboard"):
    try:
        importlib.import_module(module)
    except ImportError as exc:
        print(module, "|", exc)
    else:
        print(module, "| imported")
'''


def test_import_without_optional_packages():
    env = dict(os.environ, PYTHONPATH=SRC)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "granet.integrations.hf | granet.integrations.hf needs the 'transformers' package: "
        "pip install granet[hf] (or pip install transformers)",
        "granet.integrations.lightning | granet.integrations.lightning needs the 'lightning.pytorch' package: "
        "pip install granet[lightning] (or pip install lightning)",
        "granet.tensorboard | granet.tensorboard needs the 'tensorboard' package: "
        "pip install granet[tensorboard] (or pip install tensorboard)",
    ]
