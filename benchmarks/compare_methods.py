"""Rerun the paper's comparisons at CPU scale: every method x final density x seed, on MNIST-1D and digits.

    python benchmarks/compare_methods.py --setting mnist1d --workers 2   # the MNIST-1D benchmark (see below)
    python benchmarks/compare_methods.py                       # both digits settings, 5 seeds (~40 min on 2 cores)
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
GraNet regrows with r_0 = 0.5 cosine-decayed to 0.005; RigL and SET use RigL's r_0 = 0.3 and SNFS
its preset's r_0 = 0.5, cosine-decayed to 0 at 75% of training). Lottery tickets (``lth``) train the
network ``LTH_ROUNDS + 1`` = 4 times over the same recipe (dense, then 3 rounds of global magnitude
pruning to the final density, each rewound to the initialisation), so they cost about 4 runs' wall
time; their training FLOPs are summed over all rounds and reported relative to one dense training.
Runs go to ``--out`` (default ``runs/compare``), one directory each; rerunning skips finished runs
and resumes interrupted ones. Outputs per setting:
``results.md`` (mean ± std over seeds, claims; a claim none of whose methods ran is left out),
``accuracy_vs_sparsity.png``, plus ``report/report.md`` (the per-run tables, no figures).

``mnist1d`` (the benchmark where the methods separate, docs/results.md) runs every method — dense,
static, gmp, gmp-layerwise, set, rigl, snfs, granet, granet-st, snip, grasp, synflow and lth — on
two networks, ``mnist1d_mlp_wide`` (``--out``/mnist1d/mlp) and ``mnist1d_cnn_64`` (.../cnn), with
the recipes ``configs/mnist1d_<method>.yaml`` (one per method, written by configs/make_recipes.py;
only model, density, seed and out change here): Adam lr 0.01 cosine-decayed, no weight decay,
batch 100, 10 epochs (360 steps), ΔT = 10 steps. Then the learning-rate check: granet, gmp, rigl and granet-st
at density 0.02 with the recipe's lr times each ``--lr-scales`` (default 0.3 and 3). It writes
``results.md`` (the full table per network, the paired-difference verdicts of the paper's claims,
the LR check), ``accuracy_vs_density.png`` and ``accuracy_vs_train_flops.png`` (one panel per network).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from granet.experiments.sweep import run_many
from granet.methods import list_methods
from granet.reports.report import load_runs, write_report
from granet.reports.stats import SIDE_BY_SIDE_NOTE, errorbar_side_by_side, figure, mean_std, paired_interval
from granet.train import TrainConfig
from granet.train.config import read_yaml_mapping

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

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: MNIST-1D networks: short name (output folder, table headings) -> registered model.
MNIST1D_MODELS = {"mlp": "mnist1d_mlp_wide", "cnn": "mnist1d_cnn_64"}
#: The learning-rate check: these methods at this density with the recipe's lr times each scale.
LR_CHECK_METHODS = ("granet", "gmp", "rigl", "granet-st")
LR_CHECK_DENSITY = 0.02
#: The paper's claims as paired comparisons (the first method minus the second, same seed).
MNIST1D_CLAIMS = (
    ("(i) GraNet (dense-to-sparse) beats GMP and the other dense-to-sparse methods",
     (("granet", "gmp"), ("granet", "gmp-layerwise"))),
    ("(ii) GraNet-ST (sparse-to-sparse) beats RigL and SET, and (the headline) the dense-to-sparse GMP",
     (("granet-st", "rigl"), ("granet-st", "set"), ("granet-st", "gmp"))),
    ("(iii) GraNet (during training) beats the before-training methods and approaches LTH",
     (("granet", "snip"), ("granet", "grasp"), ("granet", "synflow"), ("granet", "lth"))),
)


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
    """The paper's three claims, checked against the measured means (std in brackets).

    A section none of whose comparisons was run (``--methods`` without its methods) is left out.
    """

    def acc(method: str, d: float) -> Optional[tuple[float, float]]:
        row = table.get((method, round(d, 9)))
        return row["accuracy"] if row else None

    sections: list[tuple[str, list[str]]] = []
    lines = []
    for d in densities:
        g, m = acc("granet", d), acc("gmp", d)
        if g and m:
            lines.append(f"* density {d:g}: granet {g[0]:.2f} (±{g[1]:.2f}) vs gmp {m[0]:.2f} (±{m[1]:.2f}): "
                         f"difference {g[0] - m[0]:+.2f} points")
    sections.append(("Claim 1: GraNet (dense-to-sparse) beats GMP at the same final sparsity, most at high sparsity.",
                     lines))
    lines = []
    for d in densities:
        g, r, s = acc("granet-st", d), acc("rigl", d), acc("set", d)
        if g and r and s:
            lines.append(f"* density {d:g}: granet-st {g[0]:.2f} (±{g[1]:.2f}) vs rigl {r[0]:.2f} (±{r[1]:.2f}), "
                         f"set {s[0]:.2f} (±{s[1]:.2f}): {g[0] - r[0]:+.2f} / {g[0] - s[0]:+.2f} points")
    sections.append(("Claim 2: GraNet-ST (sparse-to-sparse) beats RigL and SET at the same sparsity and training "
                     "length.", lines))
    lines = []
    for d in densities:
        rows = {m: table.get((m, round(d, 9))) for m in DENSE_TO_SPARSE + SPARSE_TO_SPARSE}
        parts = [f"{m} {row['train_flops'][0]:.3f}" for m, row in rows.items() if row]
        if parts:
            lines.append(f"* density {d:g}: training FLOPs (x dense) " + ", ".join(parts))
    sections.append(("Claim 3: sparse-to-sparse methods need far fewer training FLOPs than dense-to-sparse ones.",
                     lines))
    lines = []
    for d in densities:
        t, g = table.get(("lth", round(d, 9))), table.get(("granet", round(d, 9)))
        if t and g:
            lines.append(f"* density {d:g}: lth {t['accuracy'][0]:.2f} (±{t['accuracy'][1]:.2f}) at "
                         f"{t['train_flops'][0]:.3f} x dense vs granet {g['accuracy'][0]:.2f} "
                         f"(±{g['accuracy'][1]:.2f}) at {g['train_flops'][0]:.3f} x dense")
    sections.append((f"Reference: lottery tickets ({LTH_ROUNDS + 1} trainings, FLOPs of all rounds) vs GraNet.",
                     lines))
    out = []
    for heading, bullets in sections:
        if bullets:
            out += [*([""] if out else []), heading, "", *bullets]
    return "\n".join(out) + "\n" if out else ""


def _density_panel(ax: Any, table: dict[tuple[str, float], dict[str, Any]], title: str, legend: bool = True) -> None:
    """One panel of accuracy (mean ± std) vs density on an inverted log axis; dense as a reference band.

    The methods share the densities, so they are drawn side by side (a few points apart, the data
    unchanged) and close accuracies stay visible; the figure's caption says so (SIDE_BY_SIDE_NOTE).
    """
    dense = table.get(("dense", 1.0))
    if dense:
        mean, std = dense["accuracy"]
        ax.axhspan(mean - std, mean + std, color="grey", alpha=0.15)
        ax.axhline(mean, color="grey", linestyle="--", label=f"dense {mean:.2f}%" if legend else "dense (± std band)")
        if not legend:  # a legend shared by several panels cannot hold each panel's dense accuracy
            ax.annotate(f"dense {mean:.2f}%", (0.01, mean), xycoords=("axes fraction", "data"), fontsize=8,
                        va="bottom", color="dimgrey")
    methods = sorted({m for m, _ in table if m != "dense"})
    for i, method in enumerate(methods):
        rows = sorted((d, row["accuracy"]) for (m, d), row in table.items() if m == method)
        # 10 colours repeat from the 11th method on: another marker keeps the lines apart.
        errorbar_side_by_side(ax, i, len(methods), [d for d, _ in rows], [a[0] for _, a in rows],
                              [a[1] for _, a in rows], marker="os^"[i // 10 % 3], capsize=3, label=method,
                              color=f"C{i % 10}", linestyle="-" if method.startswith("granet") else "--")
    ax.set_xscale("log")
    ax.invert_xaxis()
    densities = sorted({d for (m, d) in table if m != "dense"}, reverse=True)
    ax.set_xticks(densities)
    ax.set_xticklabels([f"{d:g}\n({100 * (1 - d):g}% sparse)" for d in densities], fontsize=8)
    ax.set_xlabel("final density (log scale)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8, loc="lower left")


def plot(table: dict[tuple[str, float], dict[str, Any]], path: Path, title: str) -> Any:
    """Accuracy (mean ± std) vs density on an inverted log axis; dense as a reference band. Returns the figure."""
    fig = figure(7.5, 5.0)
    _density_panel(fig.add_subplot(1, 1, 1), table, title)
    fig.supxlabel(SIDE_BY_SIDE_NOTE, fontsize=8, color="dimgrey")
    fig.savefig(path, dpi=120)
    return fig


def mnist1d_methods() -> list[str]:
    """Every method of the library, lottery tickets last."""
    return [*list_methods(), "lth"]


def mnist1d_recipe(method: str) -> dict[str, Any]:
    """The flat keys of ``configs/mnist1d_<method>.yaml``, the shared recipe of the MNIST-1D comparison."""
    return read_yaml_mapping(str(CONFIGS / f"mnist1d_{method}.yaml"))


def _lr_tag(scale: float) -> str:
    return f"-lrx{scale:g}"


def mnist1d_configs(densities: list[float], seeds: list[int], root: Path, epochs: Optional[int] = None,
                    methods: Optional[list[str]] = None, lr_scales: Sequence[float] = (0.3, 3.0),
                    ) -> list[tuple[dict[str, Any], TrainConfig]]:
    """``(key, config)`` for every MNIST-1D run: the matrix seed by seed, then the learning-rate check.

    ``key`` holds ``model`` (short name), ``method``, ``density``, ``seed`` and ``lr_scale`` (1 in the
    matrix). Runs go to ``root/<model>/<method>-d<density>-s<seed>[-lrx<scale>]``; ``methods`` filters.
    """
    wanted = [m for m in mnist1d_methods() if methods is None or m in methods]
    runs: list[tuple[dict[str, Any], TrainConfig]] = []

    def add(short: str, method: str, density: float, seed: int, scale: float = 1.0) -> None:
        values = dict(mnist1d_recipe(method), model=MNIST1D_MODELS[short], seed=seed,
                      **({"epochs": epochs} if epochs else {}))
        name = f"{method}-d{density:g}-s{seed}" + (_lr_tag(scale) if scale != 1.0 else "")
        if method != "dense":
            values["density"] = density
        values["lr"] = values["lr"] * scale
        values["out"] = str(root / short / name)
        values.setdefault("progress", "log")
        key = dict(model=short, method=method, density=density, seed=seed, lr_scale=scale)
        runs.append((key, TrainConfig.from_dict(values)))

    for seed in seeds:
        for short in MNIST1D_MODELS:
            for method in wanted:
                for density in ([1.0] if method == "dense" else densities):
                    add(short, method, density, seed)
    for seed in seeds:
        for short in MNIST1D_MODELS:
            for method in (m for m in LR_CHECK_METHODS if m in wanted):
                for scale in lr_scales:
                    add(short, method, LR_CHECK_DENSITY, seed, scale)
    return runs


def _accuracies(results: list[tuple[dict[str, Any], dict[str, Any]]], model: str, method: str, density: float,
                lr_scale: float = 1.0) -> dict[int, float]:
    """Seed -> test accuracy (%) of one (model, method, density, lr scale)."""
    return {k["seed"]: 100 * s["test_accuracy"] for k, s in results
            if (k["model"], k["method"], k["lr_scale"]) == (model, method, lr_scale)
            and round(k["density"], 9) == round(density, 9)}


def _comparison_row(results: list[tuple[dict[str, Any], dict[str, Any]]], model: str, first: str, second: str,
                    density: float, lr_scale: float = 1.0) -> Optional[str]:
    """``| ... | seeds | mean difference | 95% interval | verdict |`` over the seeds both methods finished."""
    a = _accuracies(results, model, first, density, lr_scale)
    b = _accuracies(results, model, second, density, lr_scale)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    if len(seeds) < 2:
        return f"| {len(seeds)} | {a[seeds[0]] - b[seeds[0]]:+.2f} | — | — (one seed) |"
    iv = paired_interval([a[s] for s in seeds], [b[s] for s in seeds])
    return f"| {iv.n} | {iv.mean:+.2f} ± {iv.std:.2f} | [{iv.low:+.2f}, {iv.high:+.2f}] | **{iv.verdict}** |"


def verdict_summary(results: list[tuple[dict[str, Any], dict[str, Any]]], densities: list[float]) -> str:
    """Markdown: one row per comparison, one column per (network, density): mean difference and verdict."""
    columns = [(short, d) for short in MNIST1D_MODELS for d in densities]
    out = ["| comparison | " + " | ".join(f"{short} {d:g}" for short, d in columns) + " |",
           "|---|" + "---|" * len(columns)]
    for _, pairs in MNIST1D_CLAIMS:
        for first, second in pairs:
            cells = []
            for short, d in columns:
                a = _accuracies(results, short, first, d)
                b = _accuracies(results, short, second, d)
                seeds = sorted(set(a) & set(b))
                if len(seeds) < 2:
                    cells.append("—")
                    continue
                iv = paired_interval([a[x] for x in seeds], [b[x] for x in seeds])
                cells.append(f"{iv.mean:+.1f} {dict(holds='✔', reversed='✘').get(iv.verdict, '·')}")
            out.append(f"| {first} − {second} | " + " | ".join(cells) + " |")
    return ("\n".join(out) + "\n\nMean difference in points; ✔ holds (95% interval above 0), ✘ reversed (below 0), "
            "· not separable.\n")


def mnist1d_verdicts(results: list[tuple[dict[str, Any], dict[str, Any]]], densities: list[float]) -> str:
    """Markdown: every claim's paired differences (points of test accuracy) per network and density."""
    out = [verdict_summary(results, densities),
           "Paired differences of test accuracy in points (first method minus second, same seeds), mean ± std "
           "over seeds, the 95% Student-t interval of the mean, and the verdict: holds (interval above 0), "
           "reversed (below 0), not separable (contains 0).", ""]
    for title, pairs in MNIST1D_CLAIMS:
        out += [f"### {title}", "", "| network | density | comparison | seeds | difference | 95% interval | verdict |",
                "|---|---|---|---|---|---|---|"]
        for short in MNIST1D_MODELS:
            for density in densities:
                for first, second in pairs:
                    row = _comparison_row(results, short, first, second, density)
                    if row:
                        out.append(f"| {short} | {density:g} | {first} − {second} " + row)
        out.append("")
    return "\n".join(out)


def mnist1d_lr_check(results: list[tuple[dict[str, Any], dict[str, Any]]], lr_scales: Sequence[float]) -> str:
    """Markdown: the LR-check accuracies and the density-0.02 verdicts at every learning-rate scale."""
    base = mnist1d_recipe("granet")["lr"]
    scales = [1.0, *lr_scales]
    out = [f"Density {LR_CHECK_DENSITY:g}; the recipe's lr {base:g} times 0.3 and 3 (test accuracy %, mean ± std "
           "over seeds).", "", "| network | method | " + " | ".join(f"lr {base * x:g} (×{x:g})" for x in scales) + " |",
           "|---|---|" + "---|" * len(scales)]
    for short in MNIST1D_MODELS:
        for method in LR_CHECK_METHODS:
            cells = []
            for x in scales:
                acc = list(_accuracies(results, short, method, LR_CHECK_DENSITY, x).values())
                cells.append(f"{mean_std(acc)[0]:.2f} ± {mean_std(acc)[1]:.2f} ({len(acc)})" if acc else "—")
            out.append(f"| {short} | {method} | " + " | ".join(cells) + " |")
    out += ["", "| network | lr | comparison | seeds | difference | 95% interval | verdict |",
            "|---|---|---|---|---|---|---|"]
    for short in MNIST1D_MODELS:
        for x in scales:
            for first, second in (("granet", "gmp"), ("granet-st", "rigl"), ("granet-st", "gmp")):
                row = _comparison_row(results, short, first, second, LR_CHECK_DENSITY, x)
                if row:
                    out.append(f"| {short} | ×{x:g} | {first} − {second} " + row)
    return "\n".join(out) + "\n"


def wide_table(table: dict[tuple[str, float], dict[str, Any]], densities: list[float]) -> str:
    """Markdown: one row per method, one column per density, test accuracy % (mean ± std over seeds)."""
    lines = ["| method | " + " | ".join(f"d = {d:g}" for d in densities) + " |", "|---|" + "---|" * len(densities)]
    dense = table.get(("dense", 1.0))
    if dense:
        acc = dense["accuracy"]
        lines.append(f"| dense (d = 1) | {acc[0]:.2f} ± {acc[1]:.2f} |" + " |" * (len(densities) - 1))
    # Grouped: dense-to-sparse, sparse-to-sparse, pruning before training, lottery tickets (after training).
    order = ("gmp", "gmp-layerwise", "granet", "static", "set", "rigl", "snfs", "granet-st", "snip", "grasp",
             "synflow", "lth")
    for method in (*order, *(m for m in mnist1d_methods() if m not in order and m != "dense")):
        cells = [table.get((method, round(d, 9))) for d in densities]
        if any(cells):
            lines.append(f"| {method} | " + " | ".join(
                f"{c['accuracy'][0]:.2f} ± {c['accuracy'][1]:.2f}" if c else "—" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _flops_panel(ax: Any, table: dict[tuple[str, float], dict[str, Any]], title: str, legend: bool = True) -> None:
    """Accuracy vs training FLOPs (x one dense training, log axis): one line per method through its densities."""
    dense = table.get(("dense", 1.0))
    if dense:
        ax.errorbar([dense["train_flops"][0]], [dense["accuracy"][0]], yerr=[dense["accuracy"][1]], marker="*",
                    markersize=10, capsize=3, color="grey", linestyle="none", label="dense")
    methods = sorted({m for m, _ in table if m != "dense"})  # the colours of the accuracy-vs-density panels
    for i, method in enumerate(methods):
        rows = sorted((row["train_flops"][0], row["accuracy"]) for (m, _), row in table.items() if m == method)
        ax.errorbar([f for f, _ in rows], [a[0] for _, a in rows], yerr=[a[1] for _, a in rows],
                    marker="os^"[i // 10 % 3], capsize=3, label=method, color=f"C{i % 10}",
                    linestyle="-" if method.startswith("granet") else "--")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (× one dense training, log scale)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    if legend:
        ax.legend(fontsize=7, loc="lower right")


def run_mnist1d(args: argparse.Namespace) -> int:
    """The MNIST-1D comparison: train (resumably), then write results.md and the two figures."""
    root = args.out / "mnist1d"
    runs = mnist1d_configs(args.densities, list(range(args.seeds)), root, args.epochs, args.methods, args.lr_scales)
    configs = [c for _, c in runs]
    start = time.perf_counter()

    def progress(i: int, config: TrainConfig, summary: dict[str, Any]) -> None:
        key = runs[i][0]
        logger.info("[mnist1d %d/%d] %s %s d=%g s=%d lr x%g: test %.4f (%.0fs elapsed)", i + 1, len(configs),
                    key["model"], key["method"], key["density"], key["seed"], key["lr_scale"],
                    summary["test_accuracy"], time.perf_counter() - start)

    summaries = run_many(configs, args.workers, on_done=progress, threads=args.threads)
    results = [(key, summary) for (key, _), summary in zip(runs, summaries)]
    recipe = mnist1d_recipe("granet")
    epochs = args.epochs or recipe["epochs"]
    text = [f"# mnist1d: {len(results)} runs, {args.seeds} seed(s), {epochs} epochs, "
            f"{time.perf_counter() - start:.0f} s this call\n"]
    tables = {}
    for short, model in MNIST1D_MODELS.items():
        matrix = [s for k, s in results if k["model"] == short and k["lr_scale"] == 1.0]
        if not matrix:
            continue
        tables[short] = aggregate(matrix)
        text += [f"## {short}: {model}\n", wide_table(tables[short], args.densities), results_table(tables[short])]
    text += ["## Verdicts\n", mnist1d_verdicts(results, args.densities)]
    if args.lr_scales and any(k["lr_scale"] != 1.0 for k, _ in results):
        text += ["## Learning-rate check\n", mnist1d_lr_check(results, args.lr_scales)]
    for name, panel in (("accuracy_vs_density.png", _density_panel), ("accuracy_vs_train_flops.png", _flops_panel)):
        fig = figure(6 * len(tables) + 1.6, 5.2)
        axes = [fig.add_subplot(1, len(tables), j + 1) for j in range(len(tables))]
        for ax, (short, table) in zip(axes, tables.items()):
            panel(ax, table, f"MNIST-1D {MNIST1D_MODELS[short]}, {epochs} epochs, {args.seeds} seed(s)", legend=False)
        if axes:  # one legend for both panels, outside them (13 methods)
            fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", fontsize=8)
        if panel is _density_panel:
            fig.supxlabel(SIDE_BY_SIDE_NOTE, fontsize=8, color="dimgrey")
        fig.savefig(root / name, dpi=110)
    (root / "results.md").write_text("\n".join(text))
    logger.info("wrote %s, %s and %s", root / "results.md", root / "accuracy_vs_density.png",
                root / "accuracy_vs_train_flops.png")
    print("\n".join(text))
    return 0


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
    parser.add_argument("--setting", choices=(*SETTINGS, "all", "mnist1d"), default="all",
                        help="cnn / mlp: digits; all: both digits settings (default); mnist1d: the MNIST-1D benchmark")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per (method, density)")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.05, 0.02, 0.01])
    parser.add_argument("--workers", type=int, default=None, help="parallel runs (default: CPU cores)")
    parser.add_argument("--threads", type=_positive_int, default=1,
                        help="torch threads of every run, the same for any --workers (default 1); results are "
                             "bit-reproducible only at the same thread count, recorded in each summary.json")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--epochs", type=int, default=None, help="override the settings' epochs (smoke tests)")
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods (dense included only if named)")
    parser.add_argument("--lr-scales", type=float, nargs="*", default=[0.3, 3.0],
                        help="mnist1d: learning-rate multipliers of the LR check (none: skip it)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    known = (*list_methods(), "lth")
    unknown = [m for m in args.methods or [] if m not in known]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(known)}")
    bad = [x for x in args.lr_scales if not x > 0]
    if bad:
        parser.error(f"--lr-scales must be positive, got {bad[0]:g}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.setting == "mnist1d":
        return run_mnist1d(args)
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
        logger.info("wrote %s and %s", root / "results.md", root / "accuracy_vs_sparsity.png")
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
