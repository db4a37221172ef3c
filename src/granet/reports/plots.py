"""The figures of ``granet report``: accuracy vs sparsity, training curves, per-layer density.

Each ``plot_*`` function takes the runs read by :func:`granet.reports.runs.load_runs` and writes one PNG
with the Agg renderer (:func:`granet.reports.stats.figure`); the ``*_figure`` function beside it
returns the matplotlib ``Figure`` unsaved (what the tests read). matplotlib is needed
(``pip install -c constraints.txt -e ".[plots]"``). The captions below are written under the
figures in ``report.md``.

* Accuracy vs sparsity: one line per method through its target sparsities, mean ± std over distinct
  seeds; methods at the same sparsity are drawn side by side (:func:`~granet.reports.stats.side_by_side`).
* Training curves: one line per run; colour = method, shade = target density (lighter = sparser),
  line style = seed; the legend names method, density and seed of every line.
* Per-layer density: one panel per run, at most :data:`~granet.reports.runs.MAX_LAYER_PANELS`; which
  runs and why is said by :func:`layer_panel_caption`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

from .runs import MAX_LAYER_PANELS, PathLike, Run, accuracy_scale, group_runs, per_seed
from .stats import SIDE_BY_SIDE_NOTE, errorbar_side_by_side, figure, mean_std

#: Caption of ``accuracy_vs_sparsity.png``.
ACCURACY_CAPTION = (f"Mean ± sample std over distinct seeds, one line per method; {SIDE_BY_SIDE_NOTE} (the x "
                    f"values themselves are the groups' target sparsities).")
#: Caption of ``training_curves.png``.
CURVES_CAPTION = ("One line per run: colour = method, shade = target density (lighter = sparser), line style "
                  "(and, past six seeds, marker) = seed; the legend names each line's method, density and seed.")
#: Line styles of the seeds in the training curves (the n-th distinct seed of the report gets the n-th).
SEED_LINESTYLES: tuple[Any, ...] = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (8, 3)))
#: Markers of the seeds past the line styles (seed n: marker n // len(SEED_LINESTYLES)).
SEED_MARKERS = (".", "x", "+", "^")
#: Font size of the layer names under the per-layer density bars.
LAYER_LABEL_SIZE = 9


def _save(fig: Any, out: Path) -> None:
    """Write the figure atomically (a report being redrawn never shows a half-written PNG)."""
    from ..rundir import atomic_output

    with atomic_output(out) as tmp:
        fig.savefig(tmp, bbox_inches="tight", pad_inches=0.15, format=out.suffix.lstrip(".") or "png")


def _method_colors(runs: Sequence[Run]) -> dict[str, Any]:
    """One colour per method (tab10; tab20 when there are more than 10 methods)."""
    from matplotlib import colormaps

    methods = sorted({r.method for r in runs})
    cmap, size = (colormaps["tab10"], 10) if len(methods) <= 10 else (colormaps["tab20"], 20)
    return {m: cmap(i % size) for i, m in enumerate(methods)}


# ---------------------------------------------------------------------------------------------- accuracy


def accuracy_figure(runs: Sequence[Run]) -> Any:
    """The figure of :func:`plot_accuracy_vs_sparsity`, unsaved."""
    scale = accuracy_scale(runs)
    use_test = any(r.test_accuracy is not None for r in runs)
    colors = _method_colors(runs)
    panels = sorted({(r.model, r.dataset) for r in runs}, key=lambda p: (p[1], p[0]))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = figure(5.5 * ncols, 4.2 * nrows + 0.3)
    groups = group_runs(runs)
    for index, (model, dataset) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, index + 1)
        methods = sorted({r.method for r in runs if (r.model, r.dataset) == (model, dataset)})
        for position, method in enumerate(methods):
            xs, ys, errs = [], [], []
            for (m, mo, ds, density), members in groups.items():
                if (m, mo, ds) != (method, model, dataset):
                    continue
                accs = per_seed(members, lambda r: _accuracy(r, use_test, scale))
                if not accs:
                    continue
                xs.append(100.0 * (1.0 - density))
                mean, std = mean_std(accs)
                ys.append(mean)
                errs.append(std)
            if xs:
                order = sorted(range(len(xs)), key=xs.__getitem__)
                errorbar_side_by_side(ax, position, len(methods), [xs[i] for i in order], [ys[i] for i in order],
                                      [errs[i] for i in order], marker="o", capsize=4, color=colors[method],
                                      label=method)
        ax.set_title(f"{model} on {dataset}")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel(("test" if use_test else "best validation") + " accuracy (%)")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(title="method", fontsize=8)
    fig.suptitle("Accuracy vs sparsity (mean ± std over distinct seeds)")
    fig.supxlabel(SIDE_BY_SIDE_NOTE, fontsize=8, color="dimgrey")
    return fig


def _accuracy(run: Run, use_test: bool, scale: float) -> Optional[float]:
    value = run.test_accuracy if use_test else run.best_val_accuracy
    return None if value is None else scale * value


def plot_accuracy_vs_sparsity(runs: Sequence[Run], path: PathLike) -> Path:
    """Test accuracy vs target sparsity, one line per method, error bars = std over distinct seeds.

    One panel per (model, dataset). Runs without a test accuracy fall back to their best validation
    accuracy (the y label says which was plotted). Methods are drawn side by side (a few points
    apart) so that equal accuracies stay visible; see :data:`ACCURACY_CAPTION`.

    Returns:
        The written PNG's path.
    """
    out = Path(path)
    _save(accuracy_figure(runs), out)
    return out


# ---------------------------------------------------------------------------------------------- curves


def curve_styles(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """How :func:`plot_training_curves` draws each run: ``color``, ``linestyle``, ``marker``, ``label``.

    Colour = the method's colour, shaded by the run's target density among that method's densities
    (darker = denser, lighter = sparser); line style = the run's seed among the report's distinct
    seeds (:data:`SEED_LINESTYLES`, then :data:`SEED_MARKERS` as well past six seeds). So runs that
    differ in method, density or seed get different lines. The label is
    ``"<method>, density <d>, seed <s>"``; runs that share all three (duplicate runs) add their name.
    """
    from matplotlib.colors import to_rgb

    base = _method_colors(runs)
    densities: dict[str, list[float]] = {}
    for run in runs:
        densities.setdefault(run.method, [])
        if round(run.target_density, 9) not in densities[run.method]:
            densities[run.method].append(round(run.target_density, 9))
    seeds = sorted({r.seed for r in runs if r.seed is not None})
    labels = [f"{r.method}, density {r.target_density:g}, seed {'—' if r.seed is None else r.seed}" for r in runs]
    styles = []
    for run, label in zip(runs, labels):
        levels = sorted(densities[run.method], reverse=True)
        # From -0.35 (the densest: 35% of the way to black) to +0.45 (the sparsest: 45% to white).
        rank = levels.index(round(run.target_density, 9))
        shade = 0.0 if len(levels) == 1 else -0.35 + 0.8 * rank / (len(levels) - 1)
        rgb = to_rgb(base[run.method])
        color = tuple(c * (1 + shade) if shade < 0 else c + (1 - c) * shade for c in rgb)
        seed_index = len(seeds) if run.seed is None else seeds.index(run.seed)
        styles.append(dict(
            color=color, linestyle=SEED_LINESTYLES[seed_index % len(SEED_LINESTYLES)],
            marker=SEED_MARKERS[seed_index // len(SEED_LINESTYLES) % len(SEED_MARKERS)],
            label=label if labels.count(label) == 1 else f"{label} ({run.name})",
        ))
    return styles


def curves_figure(runs: Sequence[Run]) -> Any:
    """The figure of :func:`plot_training_curves`, unsaved."""
    fig = figure(14, 4.8)
    axes = [fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)]
    styles = curve_styles(runs)
    legend: dict[str, Any] = {}  # label -> line: every run drawn in either panel
    order: dict[str, int] = {}  # label -> the run's position, the legend's order
    for key, ax, title, label in (
        ("sparsity", axes[0], "Sparsity over training", "sparsity (%)"),
        ("exploration_rate", axes[1], "Exploration rate over training", "exploration rate (%)"),
    ):
        for index, (run, style) in enumerate(zip(runs, styles)):
            steps, values = run.series(key)
            if not steps:
                continue
            (line,) = ax.plot(steps, [100.0 * v for v in values], **style)
            legend.setdefault(style["label"], line)
            order.setdefault(style["label"], index)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if not ax.get_lines():
            ax.text(0.5, 0.5, f"no {key.replace('_', ' ')} recorded", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
    if legend:
        # One shared legend outside the plots, so many runs do not cover the curves.
        labels = sorted(legend, key=order.__getitem__)
        axes[1].legend([legend[x] for x in labels], labels, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                       fontsize=8, title="method, density, seed\n(colour, shade, line style)",
                       ncol=1 if len(labels) <= 20 else 2)
    return fig


def plot_training_curves(runs: Sequence[Run], path: PathLike) -> Path:
    """Sparsity and exploration rate over training (x = optimizer step), one line per run
    (styles: :func:`curve_styles`).

    Returns:
        The written PNG's path.
    """
    out = Path(path)
    _save(curves_figure(runs), out)
    return out


# ---------------------------------------------------------------------------------------------- layers


def layer_panel_runs(runs: Sequence[Run], limit: int) -> list[Run]:
    """Up to ``limit`` runs with layer densities: one per group first, then the other seeds.

    Groups (method, model, dataset, target density) in :func:`~granet.reports.runs.group_runs`'
    order, each group's runs by seed: first every group's lowest seed, so that as many methods and
    densities as possible are shown, then the groups' further seeds in the same order.
    """
    groups = [[r for r in members if r.layer_density] for members in group_runs(runs).values()]
    chosen = [members[0] for members in groups if members][:limit]
    for members in groups:
        for run in members[1:]:
            if len(chosen) >= limit:
                return chosen
            chosen.append(run)
    return chosen


def layer_panel_caption(runs: Sequence[Run], limit: int = MAX_LAYER_PANELS) -> str:
    """Which runs the per-layer density figure shows, and why (the caption of ``layer_density.png``)."""
    with_layers = [r for r in runs if r.layer_density]
    chosen = layer_panel_runs(runs, limit)
    names = ", ".join(f"`{r.name}`" for r in chosen)
    if len(chosen) == len(with_layers):
        return f"One panel per run: {names}."
    shown = {id(r) for r in chosen}
    left = ", ".join(f"`{r.name}`" for r in with_layers if id(r) not in shown)
    return (f"{len(chosen)} of the {len(with_layers)} runs with per-layer densities, as the figure holds at most "
            f"{limit} panels: one run per method and target density first (its lowest seed), then further "
            f"seeds in the same order. Shown: {names}. Not shown: {left}.")


def layer_density_figure(runs: Sequence[Run], max_runs: int = MAX_LAYER_PANELS) -> Optional[Any]:
    """The figure of :func:`plot_layer_density`, unsaved; ``None`` when no run recorded layer densities."""
    chosen = layer_panel_runs(runs, max_runs)
    if not chosen:
        return None
    n_layers = max(len(r.layer_density) for r in chosen)
    # About 0.3 inch per bar keeps 9-point layer names apart (up to 100 layers at the widest figure).
    width = min(32.0, max(8.0, 0.3 * n_layers + 2))
    fig = figure(width, 3.9 * len(chosen) + 0.8)
    colors = _method_colors(runs)
    for index, run in enumerate(chosen):
        ax = fig.add_subplot(len(chosen), 1, index + 1)
        names = list(run.layer_density)
        values = [run.layer_density[n] for n in names]
        ax.bar(range(len(names)), values, color=colors[run.method])
        ax.axhline(1.0 - run.sparsity, color="black", linestyle="--", linewidth=1,
                   label=f"overall density {1.0 - run.sparsity:.3f}")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.removesuffix(".weight") for n in names], rotation=90, fontsize=LAYER_LABEL_SIZE)
        ax.tick_params(axis="y", labelsize=LAYER_LABEL_SIZE)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("density")
        ax.set_title(f"{run.name}: {run.method}, {run.model} on {run.dataset}, sparsity {100 * run.sparsity:.1f}%",
                     fontsize=11)
        ax.legend(loc="upper right", fontsize=9)
    with_layers = sum(1 for r in runs if r.layer_density)
    which = ("" if len(chosen) == with_layers else f"\n{len(chosen)} of {with_layers} runs: one per method and "
             f"density first (lowest seed), then further seeds")
    fig.suptitle("Per-layer density of the selected model" + which)
    return fig


def plot_layer_density(runs: Sequence[Run], path: PathLike, max_runs: int = MAX_LAYER_PANELS) -> Optional[Path]:
    """Per-layer density bars of the selected model, one panel per run (at most ``max_runs``).

    When there are more runs, one run of each method/density group is shown first
    (:func:`layer_panel_runs`; :func:`layer_panel_caption` says which).

    Returns:
        The written PNG's path, or ``None`` when no run recorded layer densities.
    """
    fig = layer_density_figure(runs, max_runs)
    if fig is None:
        return None
    out = Path(path)
    _save(fig, out)
    return out


__all__ = ["plot_accuracy_vs_sparsity", "plot_training_curves", "plot_layer_density", "accuracy_figure",
           "curves_figure", "layer_density_figure", "curve_styles", "layer_panel_runs", "layer_panel_caption",
           "ACCURACY_CAPTION", "CURVES_CAPTION"]
