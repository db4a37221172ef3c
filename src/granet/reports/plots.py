"""The figures of ``granet report``: accuracy vs sparsity, training curves, per-layer density.

Each function takes the runs read by :func:`granet.reports.runs.load_runs` and writes one PNG with the Agg
renderer (:func:`granet.reports.stats.figure`); matplotlib is needed (``pip install 'granet[plots]'``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

from .runs import MAX_LAYER_PANELS, PathLike, Run, accuracy_scale, group_runs
from .stats import figure, mean_std


def _save(fig: Any, out: Path) -> None:
    """Write the figure atomically (a report being redrawn never shows a half-written PNG)."""
    from ..rundir import atomic_output

    with atomic_output(out) as tmp:
        fig.savefig(tmp, bbox_inches="tight", pad_inches=0.15, format=out.suffix.lstrip(".") or "png")

def _method_colors(runs: Sequence[Run]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(sorted({r.method for r in runs}))}


def plot_accuracy_vs_sparsity(runs: Sequence[Run], path: PathLike) -> Path:
    """Test accuracy vs target sparsity, one line per method, error bars = std over seeds.

    One panel per (model, dataset). Runs without a test accuracy fall back to their best validation
    accuracy (the y label says which was plotted).

    Returns:
        The written PNG's path.
    """
    scale = accuracy_scale(runs)
    use_test = any(r.test_accuracy is not None for r in runs)
    colors = _method_colors(runs)
    panels = sorted({(r.model, r.dataset) for r in runs}, key=lambda p: (p[1], p[0]))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = figure(5.5 * ncols, 4.2 * nrows)
    groups = group_runs(runs)
    for index, (model, dataset) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, index + 1)
        for method in sorted({r.method for r in runs if (r.model, r.dataset) == (model, dataset)}):
            xs, ys, errs = [], [], []
            for (m, mo, ds, density), members in groups.items():
                if (m, mo, ds) != (method, model, dataset):
                    continue
                values = [r.test_accuracy if use_test else r.best_val_accuracy for r in members]
                accs = [scale * a for a in values if a is not None]
                if not accs:
                    continue
                xs.append(100.0 * (1.0 - density))
                mean, std = mean_std(accs)
                ys.append(mean)
                errs.append(std)
            if xs:
                order = sorted(range(len(xs)), key=xs.__getitem__)
                ax.errorbar([xs[i] for i in order], [ys[i] for i in order], yerr=[errs[i] for i in order],
                            marker="o", capsize=4, color=colors[method], label=method)
        ax.set_title(f"{model} on {dataset}")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel(("test" if use_test else "best validation") + " accuracy (%)")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(title="method", fontsize=8)
    fig.suptitle("Accuracy vs sparsity (mean ± std over seeds)")
    out = Path(path)
    _save(fig, out)
    return out


def plot_training_curves(runs: Sequence[Run], path: PathLike) -> Path:
    """Sparsity and exploration rate over training (x = optimizer step), one line per run.

    Returns:
        The written PNG's path.
    """
    fig = figure(14, 4.8)
    colors = _method_colors(runs)
    axes = [fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)]
    styles = ["-", "--", ":", "-."]
    for key, ax, title, label in (
        ("sparsity", axes[0], "Sparsity over training", "sparsity (%)"),
        ("exploration_rate", axes[1], "Exploration rate over training", "exploration rate (%)"),
    ):
        per_method: dict[str, int] = {}
        for run in runs:
            steps, values = run.series(key)
            if not steps:
                continue
            # Seeds of one method share its colour and differ by line style.
            style = styles[per_method.get(run.method, 0) % len(styles)]
            per_method[run.method] = per_method.get(run.method, 0) + 1
            ax.plot(steps, [100.0 * v for v in values], style, marker=".", color=colors[run.method], label=run.name)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if not ax.get_legend_handles_labels()[0]:
            ax.text(0.5, 0.5, f"no {key.replace('_', ' ')} recorded", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1].get_legend_handles_labels()
    if handles:
        # One shared legend outside the plots, so many runs do not cover the curves.
        axes[1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, title="run",
                       ncol=1 if len(handles) <= 20 else 2)
    out = Path(path)
    _save(fig, out)
    return out


def layer_panel_runs(runs: Sequence[Run], limit: int) -> list[Run]:
    """Up to ``limit`` runs with layer densities: one per group first, then the other seeds."""
    groups = [[r for r in members if r.layer_density] for members in group_runs(runs).values()]
    chosen = [members[0] for members in groups if members][:limit]
    for members in groups:
        for run in members[1:]:
            if len(chosen) >= limit:
                return chosen
            chosen.append(run)
    return chosen


def plot_layer_density(runs: Sequence[Run], path: PathLike, max_runs: int = MAX_LAYER_PANELS) -> Optional[Path]:
    """Per-layer density bars of the selected model, one panel per run (at most ``max_runs``).

    When there are more runs, one run of each method/density group is shown first.

    Returns:
        The written PNG's path, or ``None`` when no run recorded layer densities.
    """
    chosen = layer_panel_runs(runs, max_runs)
    if not chosen:
        return None
    n_layers = max(len(r.layer_density) for r in chosen)
    width = min(24.0, max(8.0, 0.22 * n_layers + 2))
    fig = figure(width, 3.6 * len(chosen) + 0.6)
    colors = _method_colors(runs)
    for index, run in enumerate(chosen):
        ax = fig.add_subplot(len(chosen), 1, index + 1)
        names = list(run.layer_density)
        values = [run.layer_density[n] for n in names]
        ax.bar(range(len(names)), values, color=colors[run.method])
        ax.axhline(1.0 - run.sparsity, color="black", linestyle="--", linewidth=1,
                   label=f"overall density {1.0 - run.sparsity:.3f}")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.removesuffix(".weight") for n in names], rotation=90,
                           fontsize=7 if len(names) <= 40 else 6)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("density")
        ax.set_title(f"{run.name}: {run.method}, {run.model} on {run.dataset}, sparsity {100 * run.sparsity:.1f}%",
                     fontsize=10)
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle("Per-layer density of the selected model")
    out = Path(path)
    _save(fig, out)
    return out


__all__ = ["plot_accuracy_vs_sparsity", "plot_training_curves", "plot_layer_density"]
