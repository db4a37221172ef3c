"""The run directories a report reads: one :class:`Run` per directory, loaded and grouped.

``granet report`` (:mod:`granet.reports.report`: tables) and its figures (:mod:`granet.reports.plots`)
both read runs through this module, so neither imports the other's internals: the report imports
the figures, and both import this.
"""
from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from ..rundir import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, read_metrics, run_files_in
from ..safeyaml import load_yaml

__all__ = ["Run", "RUN_FILES", "MAX_LAYER_PANELS", "PathLike", "GroupKey", "load_run", "load_runs", "group_runs",
           "accuracy_scale", "number", "holds_no_run", "per_seed", "seeds_text"]

logger = logging.getLogger(__name__)

#: Files every run directory must contain.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE)
#: At most this many runs get a per-layer density panel (one per method/density group first).
MAX_LAYER_PANELS = 6

PathLike = Union[str, Path]


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
        return number(self.summary.get("test_accuracy"))

    @property
    def best_val_accuracy(self) -> Optional[float]:
        """Best validation accuracy (fraction), ``None`` without a validation split."""
        return number(self.summary.get("best_val_accuracy"))

    @property
    def train_flops(self) -> Optional[float]:
        """Training FLOPs relative to dense training, if recorded."""
        return number(self.summary.get("train_flops"))

    @property
    def inference_flops(self) -> Optional[float]:
        """Inference FLOPs relative to the dense model, if recorded."""
        return number(self.summary.get("inference_flops"))

    @property
    def layer_density(self) -> dict[str, float]:
        """Per-layer densities of the selected model (empty if not recorded)."""
        value = self.summary.get("layer_density") or {}
        return {str(k): float(v) for k, v in value.items()}

    @property
    def health(self) -> dict[str, Any]:
        """``summary.json``'s health record (empty for runs written before health checks existed)."""
        value = self.summary.get("health")
        return value if isinstance(value, dict) else {}

    @property
    def health_flags(self) -> dict[str, dict[str, Any]]:
        """``{condition: {"step": ..., "epoch": ...}}`` of the health conditions the run found."""
        flags = self.health.get("flags")
        return {str(k): (v if isinstance(v, dict) else {}) for k, v in flags.items()} if isinstance(flags, dict) else {}

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """``(steps, values)`` of a per-epoch metric, skipping epochs where it is null."""
        steps, values = [], []
        for record in self.metrics:
            step, value = number(record.get("step")), number(record.get(key))
            if step is not None and value is not None:
                steps.append(step)
                values.append(value)
        return steps, values


def number(value: Any) -> Optional[float]:
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
        if value is not None and number(value) is None:
            raise ValueError(f"{root / 'summary.json'}: {key} must be a number or null, got {value!r}")
    layer_density = summary.get("layer_density")
    if layer_density is not None and (
        not isinstance(layer_density, dict) or any(number(v) is None for v in layer_density.values())
    ):
        raise ValueError(f"{root / 'summary.json'}: layer_density must map layer names to numbers")
    run = Run(path=root, name=root.resolve().name, config=config, metrics=metrics, summary=summary)
    absent = [k for k in ("method", "model", "dataset") if run._get(k) is None]
    if absent:
        raise ValueError(f"{root}: neither summary.json nor config.yaml gives {', '.join(absent)}")
    return run


def holds_no_run(path: PathLike) -> bool:
    """Whether ``path`` is a directory without any file of a run (empty, or only other files)."""
    root = Path(path)
    return root.is_dir() and not run_files_in(root)


def load_runs(paths: Iterable[PathLike], skip_empty: bool = False) -> list[Run]:
    """Read several run directories; a directory given twice is read once.

    Display names are directory names, prefixed by as many parent directories as it takes to make
    them unique (``a/seed0`` and ``b/seed0``).

    Args:
        paths: the run directories.
        skip_empty: skip a directory that holds no run at all (:func:`holds_no_run`, e.g. ``runs/*``
            matching a directory left by a run that never started), with one warning line naming it,
            instead of refusing the whole set. A directory with an incomplete run is still refused.

    Raises:
        ValueError: as :func:`load_run`, or no path is given, or (``skip_empty``) none of the
            directories holds a run.
    """
    runs: list[Run] = []
    seen: set[Path] = set()
    skipped: list[str] = []
    for path in paths:
        resolved = Path(path).resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        if skip_empty and holds_no_run(path):
            logger.warning("skipping %s: the directory holds no granet run", path)
            skipped.append(str(path))
            continue
        runs.append(load_run(path))
    if not runs and skipped:
        raise ValueError(f"none of the directories holds a granet run: {', '.join(skipped)}")
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


# ---------------------------------------------------------------------------------------------- groups


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


def per_seed(members: Sequence[Run], value: Callable[[Run], Optional[float]]) -> list[float]:
    """``value`` of a group's runs, one number per distinct seed: statistics "over seeds" count seeds.

    Runs that repeat a seed are duplicates (the same initialisation and data order), not more
    samples: their values are averaged into that seed's one number. Runs without a recorded seed
    count one each; runs whose value is ``None`` are left out.
    """
    by_seed: dict[Any, list[float]] = {}
    for index, run in enumerate(members):
        v = value(run)
        if v is not None:
            by_seed.setdefault(run.seed if run.seed is not None else ("no seed", index), []).append(v)
    return [statistics.fmean(values) if len(values) > 1 else values[0] for values in by_seed.values()]


def seeds_text(members: Sequence[Run]) -> str:
    """The distinct seeds of a group (``0, 1, 2``), and which of them were run more than once.

    ``0, 1 (seed 0: 2 runs, duplicates averaged)``; a run without a recorded seed is a dash.
    """
    counts: dict[int, int] = {}
    unseeded = 0
    for run in members:
        if run.seed is None:
            unseeded += 1
        else:
            counts[run.seed] = counts.get(run.seed, 0) + 1
    text = ", ".join([str(seed) for seed in sorted(counts)] + ["—"] * unseeded)
    repeated = [f"seed {seed}: {n} runs" for seed, n in sorted(counts.items()) if n > 1]
    return text + (f" ({', '.join(repeated)}, duplicates averaged)" if repeated else "")


def accuracy_scale(runs: Sequence[Run]) -> float:
    """100 when accuracies are fractions (all <= 1), else 1 (already percentages)."""
    values = [v for r in runs for v in (r.test_accuracy, r.best_val_accuracy) if v is not None]
    return 1.0 if any(v > 1.0 for v in values) else 100.0
