"""Cost of scoring at initialisation (SNIP, GraSP, SynFlow) relative to one dense training step.

Every number is a ratio of timings taken in the same run, interleaved (one repeat of every
measurement per pass), medians over the passes::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_saliency.py            # ResNet-20, CIFAR shape
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_saliency.py --quick    # fewer passes, SynFlow 10 rounds

Measured: one dense training step (forward + backward + SGD step, batch 128, 32x32), SNIP on one
batch of 128, GraSP on one batch of 128 (gradient pass + Hessian-gradient pass), SynFlow with its
default 100 rounds (float64, one all-ones example per round). All three include the exact global
top-k selection. The ratio says how many dense training steps each one-off scoring costs.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import nn

import granet
from granet.baselines import saliency
from granet.models import create_model


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 passes and SynFlow with 10 rounds")
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args(argv)
    passes, rounds = (3, 10) if args.quick else (args.passes, 100)
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, input_size=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    names = [n for n, _ in granet.sparsifiable_parameters(model)]
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    ce = nn.functional.cross_entropy

    def dense_step() -> None:
        opt.zero_grad()
        ce(model(x), y).backward()
        opt.step()

    work = {
        "dense step": dense_step,
        "snip": lambda: saliency.snip(model, names, (x, y), ce, 0.1),
        "grasp": lambda: saliency.grasp(model, names, (x, y), ce, 0.1),
        f"synflow ({rounds} rounds)": lambda: saliency.synflow(model, names, (3, 32, 32), 0.1, rounds=rounds),
    }
    for fn in work.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in work}
    for _ in range(passes):
        for name, fn in work.items():
            times[name].append(_timed(fn))
    base = statistics.median(times["dense step"])
    print(f"ResNet-20, {sum(p.numel() for p in model.parameters()):,} parameters, {passes} passes, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'measure':<24}{'median s':>10}{'/ dense step':>14}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<24}{median:>10.3f}{median / base:>14.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
