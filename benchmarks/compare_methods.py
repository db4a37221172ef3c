"""Rerun the paper's comparisons at CPU scale: every method x final density x seed, on digits.

    python benchmarks/compare_methods.py                       # both settings, 5 seeds (~40 min on 2 cores)
    python benchmarks/compare_methods.py --setting mlp --seeds 2 --densities 0.05 0.01
    python benchmarks/compare_methods.py --setting cnn --methods lth     # only these methods' runs

Two settings share everything except the network:

* ``cnn`` — the default recipe (digits_cnn, 0.37M sparsifiable weights, 30 epochs). Digits
  saturates: this network keeps ~99% accuracy far into the sparse regime, so it shows that the
  methods work, not which is best.
* ``mlp`` — LeNet-300-100 on the 8x8 digits (0.05M weights), 20 epochs. At 1-2% density it keeps
  only 500-1000 weights, where the choice of mask matters and the methods separate.

All methods share one recipe (SGD + Nesterov, lr 0.1 cosine, weight decay 5e-4, batch 64, ΔT = 20
steps); only the knobs that define each method differ (GraNet/GMP prune until half of training,
GraNet regrows with r_0 = 0.5 cosine-decayed to 0.005, RigL/SET/SNFS use RigL's r_0 = 0.3 until 75%
of training). Lottery tickets (``lth``) train the network ``LTH_ROUNDS + 1`` = 4 times over the same
recipe (dense, then 3 rounds of global magnitude pruning to the final density, each rewound to the
initialisation), so they cost about 4 runs' wall time; their training FLOPs are summed over all rounds
and reported relative to one dense training. Runs go to ``--out`` (default ``runs/compare``), one
directory each; rerunning skips finished runs and resumes interrupted ones. Outputs per setting: ``results.md`` (mean ± std over
seeds, claims), ``accuracy_vs_sparsity.png``, plus the per-run ``report.md``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

from granet.methods import list_methods
from granet.report import load_runs, write_report
from granet.stats import figure, mean_std
from granet.sweep import run_many
from granet.train import TrainConfig

logger = logging.getLogger("compare_methods")

RECIPE = dict(dataset="digits", batch_size=64, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True,
              weight_decay=5e-4, lr_schedule="cosine", update_interval=20, progress="log")
SETTINGS = {
    "cnn": dict(model="digits_cnn", epochs=30),
    "mlp": dict(model="mlp", epochs=20),
}
DENSE_TO_SPARSE = ("gmp", "granet")
#: Pruning rounds of the lottery-ticket runs (LTH_ROUNDS + 1 trainings; p = 1 - density^(1/3) per round).
LTH_ROUNDS = 3
SPARSE_TO_SPARSE = ("static", "set", "rigl", "snfs", "granet-st")


def configs_for(setting: str, densities: list[float], seeds: list[int], root: Path,
                epochs: Optional[int] = None, methods: Optional[list[str]] = None) -> list[TrainConfig]:
    """One :class:`TrainConfig` per (method, density, seed); dense once per seed; ``methods`` filters."""
    spec = dict(SETTINGS[setting], **({"epochs": epochs} if epochs else {}))
    # lth has no topology updates (update_interval would be refused as a key that does not apply to it).
    lth_recipe = {k: v for k, v in RECIPE.items() if k != "update_interval"}
    configs = []
    for seed in seeds:
        configs.append(TrainConfig.from_dict(dict(RECIPE, **spec, method="dense", density=1.0, seed=seed,
                                                  out=str(root / f"dense-d1-s{seed}"))))
        for density in densities:  # the long lottery-ticket runs first, so parallel workers finish together
            configs.append(TrainConfig.from_dict(dict(
                lth_recipe, **spec, method="lth", density=density, seed=seed, lth_rounds=LTH_ROUNDS,
                out=str(root / f"lth-d{density:g}-s{seed}"))))
        for method in list_methods():
            if method in ("dense", "gmp-layerwise"):
                continue
            for density in densities:
                configs.append(TrainConfig.from_dict(dict(
                    RECIPE, **spec, method=method, density=density, seed=seed,
                    out=str(root / f"{method}-d{density:g}-s{seed}"))))
    return [c for c in configs if methods is None or c.method in methods]


def aggregate(summaries: list[dict[str, Any]]) -> dict[tuple[str, float], dict[str, Any]]:
    """Mean and std over seeds of every (method, target density)."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for s in summaries:
        groups.setdefault((s["method"], round(s["target_density"], 9)), []).append(s)
    table = {}
    for key, runs in sorted(groups.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        table[key] = {
            "seeds": len(runs),
            "accuracy": mean_std([100 * r["test_accuracy"] for r in runs]),
            "sparsity": mean_std([100 * r["sparsity"] for r in runs]),
            "train_flops": mean_std([r["train_flops"] for r in runs]),
            "inference_flops": mean_std([r["inference_flops"] for r in runs]),
            "wall_time": mean_std([r["wall_time_s"] for r in runs]),
        }
    return table


def results_table(table: dict[tuple[str, float], dict[str, Any]]) -> str:
    """Markdown: one row per (density, method)."""
    lines = ["| density | method | seeds | test accuracy % | sparsity % | train FLOPs (x dense) | "
             "inference FLOPs (x dense) | wall time s |", "|---|---|---|---|---|---|---|---|"]
    for (method, density), row in table.items():
        acc, sp, tf, inf, wt = (row[k] for k in ("accuracy", "sparsity", "train_flops", "inference_flops", "wall_time"))
        lines.append(f"| {density:g} | {method} | {row['seeds']} | {acc[0]:.2f} ± {acc[1]:.2f} | {sp[0]:.2f} | "
                     f"{tf[0]:.3f} ± {tf[1]:.3f} | {inf[0]:.3f} ± {inf[1]:.3f} | {wt[0]:.1f} |")
    return "\n".join(lines) + "\n"


def claims(table: dict[tuple[str, float], dict[str, Any]], densities: list[float]) -> str:
    """The paper's three claims, checked against the measured means (std in brackets)."""

    def acc(method: str, d: float) -> Optional[tuple[float, float]]:
        row = table.get((method, round(d, 9)))
        return row["accuracy"] if row else None

    out = ["Claim 1: GraNet (dense-to-sparse) beats GMP at the same final sparsity, most at high sparsity.", ""]
    for d in densities:
        g, m = acc("granet", d), acc("gmp", d)
        if g and m:
            out.append(f"* density {d:g}: granet {g[0]:.2f} (±{g[1]:.2f}) vs gmp {m[0]:.2f} (±{m[1]:.2f}): "
                       f"difference {g[0] - m[0]:+.2f} points")
    out += ["", "Claim 2: GraNet-ST (sparse-to-sparse) beats RigL and SET at the same sparsity and training length.", ""]
    for d in densities:
        g, r, s = acc("granet-st", d), acc("rigl", d), acc("set", d)
        if g and r and s:
            out.append(f"* density {d:g}: granet-st {g[0]:.2f} (±{g[1]:.2f}) vs rigl {r[0]:.2f} (±{r[1]:.2f}), "
                       f"set {s[0]:.2f} (±{s[1]:.2f}): {g[0] - r[0]:+.2f} / {g[0] - s[0]:+.2f} points")
    out += ["", "Claim 3: sparse-to-sparse methods need far fewer training FLOPs than dense-to-sparse ones.", ""]
    for d in densities:
        rows = {m: table.get((m, round(d, 9))) for m in DENSE_TO_SPARSE + SPARSE_TO_SPARSE}
        parts = [f"{m} {row['train_flops'][0]:.3f}" for m, row in rows.items() if row]
        out.append(f"* density {d:g}: training FLOPs (x dense) " + ", ".join(parts))
    out += ["", f"Reference: lottery tickets ({LTH_ROUNDS + 1} trainings, FLOPs of all rounds) vs GraNet.", ""]
    for d in densities:
        t, g = table.get(("lth", round(d, 9))), table.get(("granet", round(d, 9)))
        if t and g:
            out.append(f"* density {d:g}: lth {t['accuracy'][0]:.2f} (±{t['accuracy'][1]:.2f}) at "
                       f"{t['train_flops'][0]:.3f} x dense vs granet {g['accuracy'][0]:.2f} "
                       f"(±{g['accuracy'][1]:.2f}) at {g['train_flops'][0]:.3f} x dense")
    return "\n".join(out) + "\n"


def plot(table: dict[tuple[str, float], dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy (mean ± std) vs density on an inverted log axis; dense as a reference band."""
    fig = figure(7.5, 4.8, constrained=False)
    ax = fig.add_subplot(1, 1, 1)
    dense = table.get(("dense", 1.0))
    if dense:
        mean, std = dense["accuracy"]
        ax.axhspan(mean - std, mean + std, color="grey", alpha=0.15)
        ax.axhline(mean, color="grey", linestyle="--", label=f"dense {mean:.2f}%")
    methods = sorted({m for m, _ in table if m != "dense"})
    for i, method in enumerate(methods):
        rows = sorted((d, row["accuracy"]) for (m, d), row in table.items() if m == method)
        # 10 colours repeat from the 11th method on: another marker keeps the lines apart.
        ax.errorbar([d for d, _ in rows], [a[0] for _, a in rows], yerr=[a[1] for _, a in rows],
                    marker="os^"[i // 10 % 3], capsize=3, label=method, color=f"C{i % 10}",
                    linestyle="-" if method.startswith("granet") else "--")
    ax.set_xscale("log")
    ax.invert_xaxis()
    densities = sorted({d for (m, d) in table if m != "dense"}, reverse=True)
    ax.set_xticks(densities)
    ax.set_xticklabels([f"{d:g}\n({100 * (1 - d):g}% sparse)" for d in densities], fontsize=8)
    ax.set_xlabel("final density (log scale)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _positive_int(text: str) -> int:
    """argparse type of ``--threads``: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=(*SETTINGS, "all"), default="all")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per (method, density)")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.05, 0.02, 0.01])
    parser.add_argument("--workers", type=int, default=None, help="parallel runs (default: CPU cores)")
    parser.add_argument("--threads", type=_positive_int, default=1,
                        help="torch threads of every run, the same for any --workers (default 1); results are "
                             "bit-reproducible only at the same thread count, recorded in each summary.json")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--epochs", type=int, default=None, help="override the settings' epochs (smoke tests)")
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods (dense included only if named)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    settings = list(SETTINGS) if args.setting == "all" else [args.setting]
    for setting in settings:
        root = args.out / setting
        configs = configs_for(setting, args.densities, list(range(args.seeds)), root, args.epochs, args.methods)
        start = time.perf_counter()

        def progress(i: int, config: TrainConfig, summary: dict[str, Any]) -> None:
            logger.info("[%s %d/%d] %s d=%g s=%d: test %.4f (%.0fs elapsed)", setting, i + 1, len(configs),
                        config.method, config.effective_density, config.seed, summary["test_accuracy"],
                        time.perf_counter() - start)

        summaries = run_many(configs, args.workers, on_done=progress, threads=args.threads)
        table = aggregate(summaries)
        runs = load_runs([c.output.out for c in configs if c.output.out is not None])
        write_report(runs, root / "report", plots=False)
        spec = SETTINGS[setting]
        epochs = args.epochs or spec["epochs"]
        plot(table, root / "accuracy_vs_sparsity.png",
             f"{spec['model']} on digits, {epochs} epochs, {args.seeds} seed(s) per point")
        text = (f"# {setting}: {spec['model']} on digits, {epochs} epochs, {args.seeds} seeds\n\n"
                + results_table(table) + "\n" + claims(table, args.densities))
        (root / "results.md").write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
