"""Does sparse execution train to the accuracy of the masked dense path? Same runs, both ways.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/sparse_execution_accuracy.py --workers 2   # ~5 min on 2 cores

RigL and GraNet-ST at density 0.05 on LeNet-300-100 (``mlp``) with the digits recipe of
``compare_methods.py`` (SGD + Nesterov, lr 0.1 cosine, weight decay 5e-4, batch 64, 20 epochs,
ΔT = 20), 5 seeds, each trained with ``execution=dense`` (the masked dense path) and
``execution=sparse`` (every masked Linear on the sparse kernels). Prints test accuracy mean ± std,
the paired difference sparse − dense with its 95% t-interval, and on how many seeds the final masks
are identical.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from granet.experiments.sweep import run_many
from granet.reports.stats import format_mean_std, paired_interval
from granet.train import TrainConfig

RECIPE = dict(dataset="digits", model="mlp", epochs=20, batch_size=64, optimizer="sgd", lr=0.1, momentum=0.9,
              nesterov=True, weight_decay=5e-4, lr_schedule="cosine", update_interval=20, density=0.05,
              progress="log")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/sparse_execution"))
    args = parser.parse_args(argv)
    keys, configs = [], []
    for method in ("rigl", "granet-st"):
        for execution in ("dense", "sparse"):
            for seed in range(args.seeds):
                keys.append((method, execution, seed))
                configs.append(TrainConfig.from_dict(dict(RECIPE, method=method, execution=execution, seed=seed,
                                                          out=str(args.out / f"{method}-{execution}-s{seed}"))))
    summaries = run_many(configs, args.workers, threads=1)
    acc = {k: 100 * s["test_accuracy"] for k, s in zip(keys, summaries)}
    print("| method | dense execution | sparse execution | sparse − dense (95% CI) | identical final masks |")
    print("|---|---|---|---|---|")
    for method in ("rigl", "granet-st"):
        dense = [acc[(method, "dense", s)] for s in range(args.seeds)]
        sparse = [acc[(method, "sparse", s)] for s in range(args.seeds)]
        same = 0
        for seed in range(args.seeds):
            a, b = (torch.load(args.out / f"{method}-{e}-s{seed}" / "checkpoint.pt", weights_only=True)
                    for e in ("dense", "sparse"))
            same += all(torch.equal(m, b["sparsifier"]["masks"][n]) for n, m in a["sparsifier"]["masks"].items())
        d = paired_interval(sparse, dense)
        said = "equal on every seed" if sparse == dense else d.verdict
        print(f"| {method} | {format_mean_std(dense, 2)} | {format_mean_std(sparse, 2)} | "
              f"{d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}] {said} | {same} of {args.seeds} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
