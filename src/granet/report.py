"""``granet report``: tables and plots from finished training runs.

A run directory written by ``granet train`` holds ``config.yaml`` (the resolved configuration),
``metrics.jsonl`` (one JSON object per epoch) and ``summary.json`` (the final numbers, including the
per-layer densities of the selected model). This module reads any number of them and produces:

* a Markdown table with one row per run (:func:`markdown_table`), and a second one that groups runs
  of the same method, target density, model and dataset and gives mean ± sample standard deviation
  (``n - 1`` in the denominator) over their seeds;
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

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from .errors import RunDirError
from .rundir import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, atomic_write_text, read_metrics
from .safeyaml import load_yaml
from .stats import MISSING, format_mean_std

logger = logging.getLogger(__name__)

__all__ = [
    "Run",
    "RUN_FILES",
    "load_run",
    "load_runs",
    "group_runs",
    "markdown_table",
    "write_report",
]

#: Files every run directory must contain.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE)
#: Figure file names written by :func:`write_report`.
ACCURACY_PNG = "accuracy_vs_sparsity.png"
CURVES_PNG = "training_curves.png"
LAYERS_PNG = "layer_density.png"
#: At most this many runs get a per-layer density panel (one per method/density group first).
MAX_LAYER_PANELS = 6

PathLike = Union[str, Path]


# ---------------------------------------------------------------------------------------------- loading


@dataclass
class Run:
    """One training run, as read from its directory.

    Attributes:
        path: the run directory.
        name: a short display name (the directory name, made unique by :func:`load_runs`).
        config: ``config.yaml``'s mapping.
        metrics: ``metrics.jsonl``'s records, one per epoch, in file order.
        summary: ``summary.json``'s mapping.
    """

    path: Path
    name: str
    config: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def _get(self, key: str, *config_keys: str) -> Any:
        if self.summary.get(key) is not None:
            return self.summary[key]
        for k in config_keys or (key,):
            if self.config.get(k) is not None:
                return self.config[k]
        return None

    @property
    def method(self) -> str:
        """Method name (``summary.json``, else ``config.yaml``)."""
        return str(self._get("method"))

    @property
    def model(self) -> str:
        """Model name."""
        return str(self._get("model"))

    @property
    def dataset(self) -> str:
        """Dataset name."""
        return str(self._get("dataset"))

    @property
    def seed(self) -> Optional[int]:
        """Seed of the run (``None`` if not recorded)."""
        value = self._get("seed")
        return None if value is None else int(value)

    @property
    def target_density(self) -> float:
        """Final target density of the sparsified weights (``summary.target_density``, else ``config.density``)."""
        value = self._get("target_density", "density")
        return 1.0 if value is None else float(value)

    @property
    def sparsity(self) -> float:
        """Achieved sparsity of the selected model (falls back to ``1 - target_density``)."""
        value = self.summary.get("sparsity")
        return 1.0 - self.target_density if value is None else float(value)

    @property
    def test_accuracy(self) -> Optional[float]:
        """Test accuracy of the selected model (fraction), if measured."""
        return _number(self.summary.get("test_accuracy"))

    @property
    def best_val_accuracy(self) -> Optional[float]:
        """Best validation accuracy (fraction), ``None`` without a validation split."""
        return _number(self.summary.get("best_val_accuracy"))

    @property
    def train_flops(self) -> Optional[float]:
        """Training FLOPs relative to dense training, if recorded."""
        return _number(self.summary.get("train_flops"))

    @property
    def inference_flops(self) -> Optional[float]:
        """Inference FLOPs relative to the dense model, if recorded."""
        return _number(self.summary.get("inference_flops"))

    @property
    def layer_density(self) -> dict[str, float]:
        """Per-layer densities of the selected model (empty if not recorded)."""
        value = self.summary.get("layer_density") or {}
        return {str(k): float(v) for k, v in value.items()}

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """``(steps, values)`` of a per-epoch metric, skipping epochs where it is null."""
        steps, values = [], []
        for record in self.metrics:
            step, value = _number(record.get("step")), _number(record.get(key))
            if step is not None and value is not None:
                steps.append(step)
                values.append(value)
        return steps, values


def _number(value: Any) -> Optional[float]:
    """``value`` as a float; ``None`` for null / non-numbers (booleans are not numbers here)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


# Summary fields that must be numbers (or null) when present: a string here means a broken file.
_NUMERIC_SUMMARY = ("target_density", "sparsity", "test_accuracy", "best_val_accuracy", "train_flops",
                    "inference_flops", "steps", "wall_time_s")


def load_run(path: PathLike) -> Run:
    """Read a run directory.

    Args:
        path: a directory written by ``granet train``.

    Returns:
        The run (named after the directory).

    Raises:
        ValueError: the directory does not exist, lacks one of :data:`RUN_FILES` (named in the
            message), or a file is not valid YAML / JSON of the expected shape.
    """
    root = Path(path)
    if not root.exists():
        raise ValueError(f"run directory {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"{root} is not a run directory (it is a file)")
    missing = [name for name in RUN_FILES if not (root / name).is_file()]
    if missing:
        hint = " (the run may be unfinished)" if missing == ["summary.json"] else ""
        raise ValueError(f"{root} is not a complete granet run directory: missing {', '.join(missing)}{hint}")
    config = load_yaml((root / "config.yaml").read_text(errors="replace"), str(root / "config.yaml"))
    if not isinstance(config, dict):
        raise ValueError(f"{root / 'config.yaml'} does not hold a mapping")
    # The writer's own record type and reader: a torn last line (a run still being written, or cut
    # by a crash) is skipped; a bad line anywhere else is an error naming it.
    metrics = [record.to_dict() for record in read_metrics(root / METRICS_FILE)]
    try:
        summary = json.loads((root / "summary.json").read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{root / 'summary.json'} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{root / 'summary.json'} is not a JSON object")
    for key in _NUMERIC_SUMMARY:
        value = summary.get(key)
        if value is not None and _number(value) is None:
            raise ValueError(f"{root / 'summary.json'}: {key} must be a number or null, got {value!r}")
    layer_density = summary.get("layer_density")
    if layer_density is not None and (
        not isinstance(layer_density, dict) or any(_number(v) is None for v in layer_density.values())
    ):
        raise ValueError(f"{root / 'summary.json'}: layer_density must map layer names to numbers")
    run = Run(path=root, name=root.resolve().name, config=config, metrics=metrics, summary=summary)
    absent = [k for k in ("method", "model", "dataset") if run._get(k) is None]
    if absent:
        raise ValueError(f"{root}: neither summary.json nor config.yaml gives {', '.join(absent)}")
    return run


def load_runs(paths: Iterable[PathLike]) -> list[Run]:
    """Read several run directories; a directory given twice is read once.

    Display names are directory names, prefixed by as many parent directories as it takes to make
    them unique (``a/seed0`` and ``b/seed0``).

    Raises:
        ValueError: as :func:`load_run`, or no path is given.
    """
    runs: list[Run] = []
    seen: set[Path] = set()
    for path in paths:
        resolved = Path(path).resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        runs.append(load_run(path))
    if not runs:
        raise ValueError("no run directories given")
    depth = 1
    while True:
        names = ["/".join(r.path.resolve().parts[-depth:]) for r in runs]
        if len(set(names)) == len(names) or depth >= max(len(r.path.resolve().parts) for r in runs):
            break
        depth += 1
    for run, name in zip(runs, names):
        run.name = name
    return runs


# ---------------------------------------------------------------------------------------------- tables


GroupKey = tuple[str, str, str, float]


def group_runs(runs: Sequence[Run]) -> dict[GroupKey, list[Run]]:
    """Runs keyed by ``(method, model, dataset, target_density)``, each group sorted by seed.

    Groups are ordered by dataset, model, method and decreasing target density (increasing sparsity).
    """
    groups: dict[GroupKey, list[Run]] = {}
    for run in runs:
        # Rounded so that 0.1 read back from YAML and JSON land in the same group.
        key = (run.method, run.model, run.dataset, round(run.target_density, 9))
        groups.setdefault(key, []).append(run)
    ordered = sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0], -kv[0][3]))
    return {k: sorted(v, key=lambda r: (r.seed is None, r.seed or 0, r.name)) for k, v in ordered}


def _accuracy_scale(runs: Sequence[Run]) -> float:
    """100 when accuracies are fractions (all <= 1), else 1 (already percentages)."""
    values = [v for r in runs for v in (r.test_accuracy, r.best_val_accuracy) if v is not None]
    return 1.0 if any(v > 1.0 for v in values) else 100.0


def _fmt(value: Optional[float], digits: int) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


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
    scale = _accuracy_scale(runs)
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
        seeds = ", ".join(MISSING if r.seed is None else str(r.seed) for r in members)
        group_rows.append([
            method, model, dataset, _fmt(100.0 * (1.0 - density), 2), seeds,
            format_mean_std([None if r.test_accuracy is None else scale * r.test_accuracy for r in members], 2),
            format_mean_std([None if r.best_val_accuracy is None else scale * r.best_val_accuracy for r in members], 2),
            format_mean_std([r.train_flops for r in members], 3),
            format_mean_std([r.inference_flops for r in members], 3),
        ])
    return "\n".join([
        "### Runs", "", _md_table(per_run_header, rows, right_from=4), "",
        "### Mean ± std over seeds", "", _md_table(group_header, group_rows, right_from=3),
    ])


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
    figures: list[tuple[str, Path]] = []
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            logger.warning("matplotlib is not installed: report.md is written without figures "
                           "(pip install 'granet[plots]')")
            plots = False
    if plots:
        from .report_plots import _layer_panel_runs, plot_accuracy_vs_sparsity, plot_layer_density, plot_training_curves

        figures.append(("Accuracy vs sparsity", plot_accuracy_vs_sparsity(runs, out / ACCURACY_PNG)))
        figures.append(("Sparsity and exploration rate over training", plot_training_curves(runs, out / CURVES_PNG)))
        layers = plot_layer_density(runs, out / LAYERS_PNG)
        if layers is not None:
            shown = len(_layer_panel_runs(runs, MAX_LAYER_PANELS))
            with_layers = sum(1 for r in runs if r.layer_density)
            title = "Per-layer density" + (f" ({shown} of {with_layers} runs)" if shown < with_layers else "")
            figures.append((title, layers))
    lines = [
        "# granet report", "",
        f"{len(runs)} run(s): " + ", ".join(f"`{r.path}`" for r in runs), "",
        "Sparsity is the achieved sparsity of the selected model's sparsified weights; accuracies are in "
        "percent; FLOPs are relative to the dense model (RigL's accounting). Mean ± sample std over seeds.",
        "", markdown_table(runs), "",
    ]
    for title, png in figures:
        lines += [f"## {title}", "", f"![{title}]({png.name})", ""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    logger.info("wrote %s and %d figure(s)", report, len(figures))
    return [report] + [f for _, f in figures]
