"""Engine benchmark: training-step overhead, topology-update cost and mask memory.

Every number is a ratio of two timings taken in the same run, on the same machine, so the result
does not depend on how fast (or how busy) the machine is::

    python benchmarks/bench_engine.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/bench_engine.py --quick    # fewer steps, for a smoke test

Targets (issue: sparsity engine):
* step overhead: mean GraNet step time (mask application every step + one topology update per
  100 steps, amortised) / mean dense step time, ResNet-20-shaped CNN, 32x32 inputs, batch 128 <= 1.05
* update cost: one GraNet topology update (global prune + drop + regrow) on the ImageNet ResNet-50
  (25.5M sparsified weights) / one dense training step of that model at batch 8 <= 0.5
* mask memory: <= 1 byte per sparsified weight
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import granet
from granet.models import create_model


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=False)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def step_overhead(steps: int, block: int) -> dict:
    """Dense vs GraNet mean step time on a CIFAR ResNet-20, timed in alternating blocks."""
    torch.manual_seed(0)
    x = torch.randn(128, 3, 32, 32)
    y = torch.randint(0, 10, (128,))
    runs = {}
    for name in ("dense", "granet"):
        model = create_model("resnet20", num_classes=10, input_size=32)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        sparsifier = None
        if name == "granet":
            # Updates every 100 steps, inside the pruning phase (the costlier kind of update).
            sparsifier = granet.create_sparsifier(
                "granet", model, opt, density=0.1, total_steps=10 * steps, update_interval=100, prune_end=5 * steps
            )
        runs[name] = (model, opt, sparsifier, [])
    for name, (model, opt, sparsifier, _) in runs.items():  # warm-up (allocator, threads)
        for _ in range(3):
            _train_step(model, opt, x, y)
            if sparsifier is not None:
                sparsifier.step()
    updates = 0
    done = 0
    while done < steps:
        for name, (model, opt, sparsifier, times) in runs.items():
            for _ in range(block):
                start = time.perf_counter()
                _train_step(model, opt, x, y)
                if sparsifier is not None and sparsifier.step() is not None:
                    updates += 1
                times.append(time.perf_counter() - start)
        done += block
    dense = statistics.fmean(runs["dense"][3])
    sparse = statistics.fmean(runs["granet"][3])
    return {
        "model": "resnet20 (CIFAR), batch 128, 32x32",
        "steps_each": len(runs["dense"][3]),
        "topology_updates_in_timed_steps": updates,
        "dense_step_s": dense,
        "granet_step_s": sparse,
        "ratio": sparse / dense,
        "target": 1.05,
    }


def update_cost(repeats: int) -> dict:
    """One GraNet update on the ImageNet ResNet-50 vs one dense training step at batch 8."""
    torch.manual_seed(0)
    model = create_model("imagenet_resnet50", num_classes=1000, input_size=224)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(8, 3, 224, 224)
    y = torch.randint(0, 1000, (8,))
    _train_step(model, opt, x, y)
    dense_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _train_step(model, opt, x, y)
        dense_times.append(time.perf_counter() - start)
    # Every step is an update step: pruning (global) + drop/regrow during [1, prune_end], then
    # drop/regrow only. Each update follows a real training step, so gradients are realistic.
    sparsifier = granet.create_sparsifier(
        "granet", model, opt, density=0.1, total_steps=4 * repeats, update_interval=1, prune_end=2 * repeats
    )
    prune_times, regrow_times = [], []
    for t in range(1, 4 * repeats):
        _train_step(model, opt, x, y)
        start = time.perf_counter()
        report = sparsifier.step()
        elapsed = time.perf_counter() - start
        assert report is not None
        if t == 1:
            continue  # the first update prunes from dense (once per run); report steady state
        (prune_times if report.pruned > 0 else regrow_times).append(elapsed)
    dense = statistics.median(dense_times)
    return {
        "model": "imagenet_resnet50, 25,502,912 sparsified weights, dense step at batch 8",
        "sparsified_weights": sparsifier.total,
        "dense_step_s": dense,
        "update_with_pruning_s": statistics.median(prune_times),
        "update_regrow_only_s": statistics.median(regrow_times),
        "ratio_with_pruning": statistics.median(prune_times) / dense,
        "ratio_regrow_only": statistics.median(regrow_times) / dense,
        "target": 0.5,
        "mask_bytes_per_weight": sum(m.numel() * m.element_size() for m in sparsifier.masks.values()) / sparsifier.total,
        "exploration_bits_bytes_per_weight": sum(e.numel() for e in sparsifier.ever_active) / sparsifier.total,
        "mask_memory_target": 1.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps (smoke test, noisier ratios)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    steps, block, repeats = (20, 10, 3) if args.quick else (200, 25, 5)
    results = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "step_overhead": step_overhead(steps, block),
        "update_cost": update_cost(repeats),
    }
    o, u = results["step_overhead"], results["update_cost"]
    print(f"torch {results['torch']}, {results['threads']} threads")
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| step overhead (GraNet / dense step, ResNet-20 b128) | {o['ratio']:.3f} "
          f"({o['granet_step_s'] * 1e3:.1f} / {o['dense_step_s'] * 1e3:.1f} ms, "
          f"{o['topology_updates_in_timed_steps']} update(s) in {o['steps_each']} steps) | <= 1.05 |")
    print(f"| update cost, prune + regrow (/ dense ResNet-50 step b8) | {u['ratio_with_pruning']:.3f} "
          f"({u['update_with_pruning_s'] * 1e3:.0f} / {u['dense_step_s'] * 1e3:.0f} ms) | <= 0.5 |")
    print(f"| update cost, regrow only (/ dense ResNet-50 step b8) | {u['ratio_regrow_only']:.3f} "
          f"({u['update_regrow_only_s'] * 1e3:.0f} ms) | <= 0.5 |")
    print(f"| mask memory (bytes / sparsified weight) | {u['mask_bytes_per_weight']:.3f} "
          f"(+{u['exploration_bits_bytes_per_weight']:.3f} exploration bits) | <= 1 |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
