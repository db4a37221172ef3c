"""``granet report``: tables and plots from finished training runs.

A run directory written by ``granet train`` holds ``config.yaml`` (the resolved configuration),
``metrics.jsonl`` (one JSON object per epoch) and ``summary.json`` (the final numbers, including the
per-layer densities of the selected model). This module reads any number of them and produces:

* a Markdown table with one row per run (:func:`markdown_table`), and a second one that groups runs
  of the same method, target density, model and dataset and gives mean ± sample standard deviation
  (``n - 1`` in the denominator) over their distinct seeds (runs that repeat a seed are duplicates:
  averaged into one value, and the seeds column says so); runs whose health checks found signs of a
  collapse get a third one (:func:`health_table`, see :mod:`granet.sparsity.health`);
* PNG figures (matplotlib, Agg renderer, no display needed): accuracy vs sparsity per method with
  error bars over seeds, sparsity and exploration rate over training, and per-layer densities;
* ``report.md`` tying them together (:func:`write_report`).

Accuracies are stored as fractions in [0, 1] by ``granet train``; they are shown in percent. (If any
accuracy in the report is above 1 the values are taken to be percentages already.) FLOPs are
relative to the dense model (1.0 = dense cost), as in RigL and GraNet.

Usage::

    granet report runs/rigl-s0 runs/rigl-s1 runs/granet-s0 --out report
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import RunDirError, install_hint
from ..rundir import atomic_write_text
from .runs import (
    MAX_LAYER_PANELS,
    RUN_FILES,
    PathLike,
    Run,
    accuracy_scale,
    group_runs,
    load_run,
    load_runs,
    per_seed,
    seeds_text,
)
from .stats import MISSING, format_mean_std

logger = logging.getLogger(__name__)

__all__ = [
    "Run",
    "RUN_FILES",
    "load_run",
    "load_runs",
    "group_runs",
    "markdown_table",
    "health_table",
    "write_report",
]

#: Figure file names written by :func:`write_report`.
ACCURACY_PNG = "accuracy_vs_sparsity.png"
CURVES_PNG = "training_curves.png"
LAYERS_PNG = "layer_density.png"


# ---------------------------------------------------------------------------------------------- loading


# ---------------------------------------------------------------------------------------------- tables


def _fmt(value: Optional[float], digits: int) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def _scaled(value: Optional[float], scale: float) -> Optional[float]:
    return None if value is None else scale * value


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], right_from: int) -> str:
    # Numeric columns (from ``right_from`` on) are right-aligned.
    rule = ["---" if i < right_from else "---:" for i in range(len(header))]
    return "\n".join([_md_row(header), "| " + " | ".join(rule) + " |"] + [_md_row(r) for r in rows])


def markdown_table(runs: Sequence[Run]) -> str:
    """Markdown tables of the runs: one row per run, then mean ± std over seeds per group.

    Sparsity and accuracies are in percent with two decimals; FLOPs relative to dense with three.
    A dash marks a value the run did not record.

    Args:
        runs: the runs (see :func:`load_runs`).

    Returns:
        Two Markdown tables with short headings.
    """
    scale = accuracy_scale(runs)
    groups = group_runs(runs)
    per_run_header = ["run", "method", "model", "dataset", "seed", "sparsity (%)", "test acc (%)",
                      "best val acc (%)", "train FLOPs (× dense)", "inference FLOPs (× dense)"]
    rows = []
    for members in groups.values():
        for r in members:
            rows.append([
                r.name, r.method, r.model, r.dataset, MISSING if r.seed is None else str(r.seed),
                _fmt(100.0 * r.sparsity, 2),
                _fmt(None if r.test_accuracy is None else scale * r.test_accuracy, 2),
                _fmt(None if r.best_val_accuracy is None else scale * r.best_val_accuracy, 2),
                _fmt(r.train_flops, 3), _fmt(r.inference_flops, 3),
            ])
    group_header = ["method", "model", "dataset", "target sparsity (%)", "seeds", "test acc (%)",
                    "best val acc (%)", "train FLOPs (× dense)", "inference FLOPs (× dense)"]
    group_rows = []
    for (method, model, dataset, density), members in groups.items():
        group_rows.append([
            method, model, dataset, _fmt(100.0 * (1.0 - density), 2), seeds_text(members),
            format_mean_std(per_seed(members, lambda r: _scaled(r.test_accuracy, scale)), 2),
            format_mean_std(per_seed(members, lambda r: _scaled(r.best_val_accuracy, scale)), 2),
            format_mean_std(per_seed(members, lambda r: r.train_flops), 3),
            format_mean_std(per_seed(members, lambda r: r.inference_flops), 3),
        ])
    tables = [
        "### Runs", "", _md_table(per_run_header, rows, right_from=4), "",
        "### Mean ± std over seeds", "", _md_table(group_header, group_rows, right_from=3),
    ]
    unhealthy = [r for members in groups.values() for r in members if r.health_flags]
    if unhealthy:
        tables += ["", "### Health warnings", "", health_table(unhealthy)]
    return "\n".join(tables)


def health_table(runs: Sequence[Run]) -> str:
    """One row per run with health warnings: the conditions found (and the epoch each was first
    found), and the last check's dead units and stuck weights (see :mod:`granet.sparsity.health`)."""
    rows = []
    for r in runs:
        found = ", ".join(f"{flag} (epoch {MISSING if info.get('epoch') is None else info['epoch']})"
                          for flag, info in r.health_flags.items())
        last_check = r.health.get("last")
        last: dict[str, Any] = last_check if isinstance(last_check, dict) else {}
        units = f"{last['dead_units']} / {last['units']}" if "dead_units" in last and "units" in last else MISSING
        stuck = f"{last['stuck']} / {last['active']}" if "stuck" in last and "active" in last else MISSING
        rows.append([r.name, r.method, found, units, stuck])
    return _md_table(["run", "method", "conditions (first epoch)", "dead units at the end", "stuck weights"], rows,
                     right_from=3)


# ---------------------------------------------------------------------------------------------- report


def write_report(runs: Sequence[Run], out_dir: PathLike, plots: bool = True) -> list[Path]:
    """Write ``report.md`` and the figures into ``out_dir`` (created if needed).

    Args:
        runs: the runs.
        out_dir: output directory.
        plots: draw the PNG figures (skipped with a warning when matplotlib is not installed).

    Returns:
        The written files, ``report.md`` first.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create the report directory {out}: {exc.strerror or exc}") from None
    figures: list[tuple[str, Path, str]] = []  # (title, file, caption)
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            logger.warning("matplotlib is not installed: report.md is written without figures (%s)",
                           install_hint("plots", "matplotlib"))
            plots = False
    if plots:
        from .plots import (
            ACCURACY_CAPTION,
            CURVES_CAPTION,
            layer_panel_caption,
            plot_accuracy_vs_sparsity,
            plot_layer_density,
            plot_training_curves,
        )

        figures.append(("Accuracy vs sparsity", plot_accuracy_vs_sparsity(runs, out / ACCURACY_PNG), ACCURACY_CAPTION))
        figures.append(("Sparsity and exploration rate over training", plot_training_curves(runs, out / CURVES_PNG),
                        CURVES_CAPTION))
        layers = plot_layer_density(runs, out / LAYERS_PNG)
        if layers is not None:
            figures.append(("Per-layer density", layers, layer_panel_caption(runs, MAX_LAYER_PANELS)))
    lines = [
        "# granet report", "",
        f"{len(runs)} run(s): " + ", ".join(f"`{r.path}`" for r in runs), "",
        "Sparsity is the achieved sparsity of the selected model's sparsified weights; accuracies are in "
        "percent; FLOPs are relative to the dense model (RigL's accounting). Mean ± sample std over distinct "
        "seeds.",
        "", markdown_table(runs), "",
    ]
    for title, png, caption in figures:
        lines += [f"## {title}", "", f"![{title}]({png.name})", "", caption, ""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    if figures:
        logger.info("wrote %s and %d figure(s): %s", report, len(figures), ", ".join(png.name for _, png, _ in figures))
    else:
        logger.info("wrote %s (no figures)", report)
    return [report] + [png for _, png, _ in figures]
