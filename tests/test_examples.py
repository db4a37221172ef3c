"""The scripts in examples/ run to completion and reach their target density (no downloads)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_gpt2_granet_loop():
    pytest.importorskip("transformers")
    out = run_example("gpt2_granet_loop.py")
    # 2 blocks of width 64: 12 * 64 * 64 masked weights per block; 20% of them active.
    assert f"final density 0.2000 (target 0.2), active {round(0.2 * 2 * 12 * 64 * 64)} of {2 * 12 * 64 * 64}" in out
    assert "transformer.wte.weight = lm_head.weight" in out


@pytest.mark.slow
def test_lightning_cnn():
    pytest.importorskip("lightning")
    out = run_example("lightning_cnn.py")
    # 256 images / batch 32 = 8 batches per epoch, 2 epochs, accumulation 2: 8 optimizer steps.
    masked = 16 * 9 + 32 * 16 * 9 + 10 * 32
    assert re.search(rf"optimizer steps 8, density {round(0.2 * masked) / masked:.4f} \(target 0.2\)", out), out


@pytest.mark.slow
def test_hf_trainer_bert(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = run_example("hf_trainer_bert.py", str(tmp_path))
    assert "optimizer steps 12, density 0.2500 (target 0.25), 14 masked tensors" in out
    assert (tmp_path / "checkpoint-6" / "granet_sparsifier.pt").is_file()
