"""What a structure costs in accuracy: unstructured vs N:M vs constant fan-in at the same density.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/structure_accuracy.py --workers 2     # ~8 min on 2 cores
    python benchmarks/structure_accuracy.py --settings mnist1d --seeds 2 --epochs 2  # a smoke run

GraNet, GraNet-ST and RigL each train three ways that differ only in ``structure``: ``unstructured``,
``N:M`` and ``fan-in``, at density 0.5 (2:4) and 0.25 (1:4), 5 seeds each (the same seeds for every
structure, so differences are paired), on two settings:

* ``digits`` — LeNet-300-100 (``mlp``) on the 8x8 digits with the shared recipe of
  ``compare_methods.py`` (SGD + Nesterov, lr 0.1 cosine, weight decay 5e-4, batch 64, 20 epochs,
  ΔT = 20 steps);
* ``mnist1d`` — ``mnist1d_mlp_wide`` with the recipe of ``configs/mnist1d_<method>.yaml`` (Adam lr
  0.01 cosine, batch 100, 10 epochs, ΔT = 10).

What is held equal so that only the structure differs: every run prunes layer-wise
(``prune="layerwise"``; fan-in needs per-layer targets) with the ``uniform`` distribution (N:M gives
every layer the density N/M anyway), so every layer of every run ends at the same density. The
row lengths of both networks are multiples of 4, so the three structures keep exactly the same
number of weights. GraNet here is therefore its layer-wise, uniform variant, not the preset's
global pruning.

Writes ``results.md`` in ``--out`` (default ``runs/structure``): test accuracy mean ± std per cell,
and per (setting, method, density) the paired difference of each structure from unstructured with its
95% t-interval and verdict. Rerunning skips finished runs.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from granet.experiments.sweep import run_many
from granet.reports.stats import format_mean_std, paired_interval
from granet.train import TrainConfig
from granet.train.config import read_yaml_mapping

logger = logging.getLogger("structure_accuracy")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DIGITS_RECIPE = dict(dataset="digits", model="mlp", epochs=20, batch_size=64, optimizer="sgd", lr=0.1, momentum=0.9,
                     nesterov=True, weight_decay=5e-4, lr_schedule="cosine", update_interval=20)
METHODS = ("granet", "granet-st", "rigl")
#: density -> the N:M structure of that density
DENSITIES = {0.5: "2:4", 0.25: "1:4"}
STRUCTURES = ("unstructured", "n:m", "fan-in")


def recipe(setting: str, method: str) -> dict[str, Any]:
    if setting == "digits":
        return dict(DIGITS_RECIPE)
    values = read_yaml_mapping(str(CONFIGS / f"mnist1d_{method}.yaml"))
    return dict(values, model="mnist1d_mlp_wide")


def plan(settings: list[str], seeds: int, out: Path, epochs: int | None) -> list[tuple[tuple, TrainConfig]]:
    runs = []
    for setting in settings:
        for method in METHODS:
            for density, nm in DENSITIES.items():
                for structure in STRUCTURES:
                    for seed in range(seeds):
                        values = dict(recipe(setting, method), method=method, density=density, seed=seed,
                                      structure=nm if structure == "n:m" else structure, distribution="uniform",
                                      progress="log", out=str(out / setting / f"{method}-d{density:g}-{structure}-s{seed}"))
                        if method != "rigl":
                            values["prune"] = "layerwise"
                        if epochs is not None:
                            values["epochs"] = epochs
                        runs.append(((setting, method, density, structure, seed), TrainConfig.from_dict(values)))
    return runs


def table(results: dict[tuple, float], settings: list[str], seeds: int) -> str:
    lines = ["| setting | method | density | unstructured | N:M | fan-in | N:M − unstr. (95% CI) | fan-in − unstr. (95% CI) |",
             "|---|---|---|---|---|---|---|---|"]
    for setting in settings:
        for method in METHODS:
            for density, nm in DENSITIES.items():
                acc = {s: [100 * results[(setting, method, density, s, seed)] for seed in range(seeds)] for s in STRUCTURES}
                cells = [format_mean_std(acc[s], 2) for s in STRUCTURES]
                diffs = []
                for s in ("n:m", "fan-in"):
                    if seeds < 2:
                        diffs.append("—")
                        continue
                    d = paired_interval(acc[s], acc["unstructured"])
                    said = "worse" if d.high < 0 else "better" if d.low > 0 else "not separable"
                    diffs.append(f"{d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}] {said}")
                lines.append(f"| {setting} | {method} | {density:g} ({nm}) | " + " | ".join(cells + diffs) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", choices=("digits", "mnist1d"), default=["mnist1d", "digits"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="override the recipes' epochs (smoke runs)")
    parser.add_argument("--out", type=Path, default=Path("runs/structure"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    runs = plan(args.settings, args.seeds, args.out, args.epochs)
    summaries = run_many([c for _, c in runs], args.workers, threads=1)
    results = {key: s["test_accuracy"] for (key, _), s in zip(runs, summaries)}
    text = (f"Test accuracy (%) by structure, {args.seeds} seeds, layer-wise uniform pruning "
            "(benchmarks/structure_accuracy.py)\n\n" + table(results, args.settings, args.seeds) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
