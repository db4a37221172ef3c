"""CUDA-only paths: AMP (fp16 + GradScaler, bf16), channels-last, NCCL mask sync.

Skipped on machines without CUDA (the CI machine has none); run them on a GPU machine with
`python -m pytest tests/test_cuda.py -n 0`.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import granet
from granet.cli import main

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


@cuda
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_amp_training_run_on_cuda(amp, tmp_path):
    out = tmp_path / amp
    code = main(["train", "--device", "cuda", "--amp", amp, "--channels-last", "on", "--epochs", "3",
                 "--out", str(out), "--progress", "log"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"].startswith("cuda")
    assert summary["sparsity"] == pytest.approx(0.95, abs=1e-5)
    assert summary["test_accuracy"] > 0.8


@cuda
def test_sparsifier_on_cuda_keeps_inactive_weights_and_state_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 30 * 30, 10)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cuda")
    s = granet.create_sparsifier("rigl", model, opt, density=0.1, total_steps=50, update_interval=5)
    for _ in range(20):
        x = torch.randn(8, 3, 32, 32, device="cuda")
        y = torch.randint(0, 10, (8,), device="cuda")
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        s.step()
        for p, m in zip(s.params, s.masks.values()):
            assert m.device == p.device
            assert torch.count_nonzero(p[~m]) == 0
            assert torch.count_nonzero(opt.state[p]["momentum_buffer"][~m]) == 0
    assert sum(s.counts) == round(0.1 * s.total)


@two_gpus
def test_nccl_two_processes_identical_masks(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    out = tmp_path / "nccl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "granet", "train",
           "--device", "cuda", "--method", "set", "--epochs", "3", "--out", str(out), "--progress", "log"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["sparsity"] == pytest.approx(0.95, abs=1e-5)


@cuda
def test_the_counter_stream_is_the_same_on_cuda_and_cpu():
    from granet.kernels.counter_rng import CounterGenerator

    for key in (0, 12345, (1 << 64) - 1):
        g = CounterGenerator(key)
        assert torch.equal(g.bits(1_000_003, "cuda").cpu(), g.bits(1_000_003))
        assert torch.equal(g.rand((1000, 1001), "cuda").cpu(), g.rand((1000, 1001)))
        assert torch.equal(g.randperm(100_000, "cuda").cpu(), g.randperm(100_000))


@cuda
@pytest.mark.parametrize("method", ["set", "static"])
def test_device_randomness_gives_the_cpu_masks_on_cuda(method):
    # lr 0: the weights stay the initial ones (made on the CPU), so every choice is the magnitudes'
    # (identical), the counter stream's (initial masks, SET's regrowth) or its tie order (regrown zeros).
    def masks(device):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        sparsifier = granet.create_sparsifier(method, model, optimizer, density=0.1, update_interval=2,
                                              total_steps=20, rng="device")
        g = torch.Generator().manual_seed(1)
        for _ in range(20):
            x, y = torch.randn(16, 64, generator=g).to(device), torch.randint(0, 10, (16,), generator=g).to(device)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            sparsifier.step()
        return {n: m.cpu() for n, m in sparsifier.masks.items()}

    on_cpu, on_cuda = masks("cpu"), masks("cuda")
    assert all(torch.equal(on_cpu[n], on_cuda[n]) for n in on_cpu)
