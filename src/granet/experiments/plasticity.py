"""The pruning-plasticity study (Section 3 of the GraNet paper), as ``granet plasticity``.

*Pruning plasticity* is how well a network recovers its accuracy when it is pruned part-way
through training. The study:

1. trains a dense model once with the normal learning-rate schedule, keeping a checkpoint at each
   chosen pruning epoch;
2. for every pruning epoch t and pruning rate p (fraction of the Conv/Linear weights removed), and
   with and without neuroregeneration, takes the checkpoint at t, prunes it in one shot by weight
   magnitude (global or layer-wise) and continues training to the end of the *original* schedule
   (same optimizer state, same learning-rate curve) with the density fixed;
3. reports the plasticity of every trial::

       plasticity(t, p) = A_continue(t, p) / A_dense

   where ``A_continue`` is the test accuracy the pruned network recovers to at the end of the
   schedule and ``A_dense`` the test accuracy of the dense model trained with the same schedule —
   the paper's ratio of the accuracy after continued training to the accuracy of the unpruned
   model. Both are measured the same way (validation-selected model, test split once).

Neuroregeneration ("regenerate as many connections as were pruned", by gradient) is the zero-cost
drop-and-regrow step of GraNet: after the magnitude prune, a fraction r of the surviving weights
with the smallest magnitudes is dropped and the same number of inactive weights with the largest
gradient magnitudes is regrown, at zero, so density is unchanged. By default r is GraNet's own
r_t at the pruning time (0.5 cosine-decayed to 0.005 over the schedule). With
``regeneration: once`` (default) this happens right after pruning and the mask then stays fixed;
``periodic`` repeats it every ``update_interval`` steps with a cosine-decaying fraction.

Trials are independent runs (``<out>/trials/<name>``) and run in parallel worker processes; an
interrupted study skips finished trials and resumes cut-off ones.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..errors import ConfigError, RunDirError
from ..methods import method_config
from ..reports.stats import figure
from ..rundir import atomic_output, atomic_write_text
from ..sparsity.schedules import DropFractionSchedule
from ..train import TrainConfig
from ..train.config import check_threads, read_yaml_mapping
from ..train.runtime import DEFAULT_MILESTONES
from .sweep import run_many, run_to_completion

logger = logging.getLogger(__name__)

DEFAULT_TRAIN = dict(
    model="mlp", dataset="digits", epochs=30, batch_size=64, optimizer="sgd", lr=0.1, momentum=0.9,
    nesterov=True, weight_decay=5e-4, lr_schedule="multistep", milestones=[0.5, 0.75], gamma=0.1,
    progress="log",
)


@dataclass
class PlasticityConfig:
    """The study's settings (YAML keys of ``granet plasticity --config``).

    Attributes:
        train: :class:`~granet.train.TrainConfig` keys of the dense run (model, dataset, epochs, lr
            schedule, ...); the trials inherit them.
        prune_epochs: epochs after which the dense model is pruned; cover the phases before and
            after each learning-rate decay.
        rates: pruning rates, the fraction of the sparsified weights removed (sparsity).
        scope: ``global`` (one magnitude threshold) or ``layerwise`` (every layer at the same rate).
        regeneration: ``once`` or ``periodic`` (see the module docstring).
        drop_fraction: fraction of the surviving weights dropped and regrown by regeneration;
            ``None`` (default) uses GraNet's own r_t at the pruning time: 0.5 cosine-decayed to
            0.005 over the schedule, so late pruning regenerates few connections.
        update_interval: steps between regenerations when ``periodic``.
        workers: parallel trial processes (default: one per CPU core, at most 4).
        threads: torch threads of the dense run and of every trial (unless ``train`` sets ``threads``),
            the same whatever ``workers`` is: results are bit-reproducible only at the same count.
        out: the study directory.
    """

    train: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_TRAIN))
    prune_epochs: list[int] = field(default_factory=lambda: [2, 6, 10, 14, 17, 21, 24, 27])
    rates: list[float] = field(default_factory=lambda: [0.9, 0.98, 0.995])
    scope: str = "global"
    regeneration: str = "once"
    drop_fraction: Optional[float] = None
    update_interval: int = 20
    workers: Optional[int] = None
    threads: int = 1
    out: str = "runs/plasticity"

    def validate(self) -> None:
        """Check ranges; raises :class:`ConfigError`."""
        epochs = TrainConfig.from_dict(dict(self.train, method="dense")).optim.epochs  # checks the train keys
        if not self.prune_epochs or any(not isinstance(e, int) or not 1 <= e < epochs for e in self.prune_epochs):
            raise ConfigError(f"prune_epochs must be integers in [1, epochs={epochs}), got {self.prune_epochs}")
        if not self.rates or any(not 0.0 < r < 1.0 for r in self.rates):
            raise ConfigError(f"rates (fractions of weights pruned) must be in (0, 1), got {self.rates}")
        if self.scope not in ("global", "layerwise"):
            raise ConfigError(f"unknown scope {self.scope!r}; valid: global, layerwise")
        if self.regeneration not in ("once", "periodic"):
            raise ConfigError(f"unknown regeneration {self.regeneration!r}; valid: once, periodic")
        if self.drop_fraction is not None and not 0.0 < self.drop_fraction < 1.0:
            raise ConfigError(f"drop_fraction must be in (0, 1), got {self.drop_fraction}")
        check_threads(self.threads, optional=False)
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise ConfigError(f"workers must be a positive integer (parallel trial processes), got {self.workers!r}")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"out {out} is a file, not a directory: give a study directory")


def load_study_config(path: Optional[str], overrides: dict[str, Any]) -> PlasticityConfig:
    """Defaults ← YAML file ← overrides; unknown keys are an error."""
    values: dict[str, Any] = {}
    if path:
        values.update(read_yaml_mapping(path))
    train_overrides = overrides.pop("train", {})
    values.update(overrides)
    names = [f.name for f in dataclasses.fields(PlasticityConfig)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown plasticity key(s): {', '.join(unknown)} (valid: {', '.join(names)})")
    train_values = dict(DEFAULT_TRAIN)
    train_values.update(values.pop("train", {}) or {})
    train_values.update(train_overrides)
    config = PlasticityConfig(train=train_values, **values)
    config.validate()
    return config


# ------------------------------------------------------------------------------------ trials


def _trial_name(epoch: int, rate: float, regenerate: bool) -> str:
    return f"e{epoch:03d}-p{rate:g}-{'regen' if regenerate else 'noregen'}"


def trial_configs(study: PlasticityConfig, root: Path) -> list[tuple[dict[str, Any], TrainConfig]]:
    """One pruned-and-continued :class:`TrainConfig` per (epoch, rate, regeneration)."""
    method = "gmp" if study.scope == "global" else "gmp-layerwise"
    out = []
    for epoch in study.prune_epochs:
        for rate in study.rates:
            for regenerate in (False, True):
                sparsity: dict[str, Any] = dict(
                    method=method, density=1.0 - rate, init_density=1.0, prune_start=0, prune_end=1,
                    update_interval=1, drop_fraction=None,
                )
                if regenerate:
                    periodic = study.regeneration == "periodic"
                    sparsity.update(
                        drop_fraction=study.drop_fraction or granet_drop_fraction(epoch, study),
                        grow="gradient", regrow_start=0,
                        regrow_end=1.0 if periodic else 2, drop_decay="cosine" if periodic else "constant",
                        drop_fraction_end=0.0,
                    )
                    if periodic:
                        sparsity["update_interval"] = study.update_interval
                name = _trial_name(epoch, rate, regenerate)
                values = dict(study.train, **sparsity, init_from=str(root / "dense" / f"checkpoint_epoch{epoch}.pt"),
                              out=str(root / "trials" / name))
                values = {k: v for k, v in values.items() if v is not None}
                out.append(({"name": name, "prune_epoch": epoch, "rate": rate, "regeneration": regenerate},
                            TrainConfig.from_dict(values)))
    return out


def granet_drop_fraction(epoch: int, study: PlasticityConfig) -> float:
    """GraNet's r_t at the end of ``epoch``, from the ``granet`` preset's own regrowth schedule.

    The schedule is resolved with the run's epochs as its steps, so r_t follows the preset's cosine
    decay (0.5 to 0.005 over the whole run) at epoch resolution.
    """
    epochs = int(study.train.get("epochs", DEFAULT_TRAIN["epochs"]))
    granet = method_config("granet", total_steps=epochs)
    steps = granet.resolve_steps()
    schedule = DropFractionSchedule(initial=granet.drop_fraction, final=granet.drop_fraction_end,
                                    start=steps["regrow_start"], end=steps["regrow_end"], interval=1,
                                    decay=granet.drop_decay)
    return schedule.fraction(epoch)


def run_study(study: PlasticityConfig) -> list[dict[str, Any]]:
    """Run (or finish) the study; returns one row per trial and writes the table and plot."""
    root = Path(study.out)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create the study directory {root}: {exc.strerror or exc}") from None
    atomic_write_text(root / "study.yaml", yaml.safe_dump(dataclasses.asdict(study), sort_keys=False))
    dense_config = TrainConfig.from_dict(dict(study.train, method="dense", keep_checkpoints=list(study.prune_epochs),
                                              out=str(root / "dense")))
    if dense_config.machine.threads is None:  # the trials' count (run_many), so the dense run is as reproducible
        dense_config = dense_config.with_run_values(threads=study.threads)  # checked by validate()
    logger.info("dense run (%d epochs) -> %s", dense_config.optim.epochs, dense_config.output.out)
    dense = run_to_completion(dense_config)
    missing = [e for e in study.prune_epochs if not (root / "dense" / f"checkpoint_epoch{e}.pt").exists()]
    if missing:
        raise ConfigError(f"the dense run in {root / 'dense'} has no checkpoints for epochs {missing}; "
                          "delete it to retrain it with these prune_epochs")
    trials = trial_configs(study, root)

    def progress(i: int, config: TrainConfig, summary: dict[str, Any]) -> None:
        logger.info("trial %d/%d: %s test accuracy %.4f", i + 1, len(trials), trials[i][0]["name"],
                    summary["test_accuracy"])

    summaries = run_many([c for _, c in trials], study.workers, on_done=progress, threads=study.threads)
    schedule = dense_config.optim  # the trials continue the dense run's schedule
    milestones = DEFAULT_MILESTONES if schedule.milestones is None else schedule.milestones
    decays = [m * schedule.epochs if m <= 1 else m for m in milestones] if schedule.lr_schedule == "multistep" else []
    rows = []
    for (meta, _), summary in zip(trials, summaries):
        rows.append(dict(
            meta, sparsity=summary["sparsity"], test_accuracy=summary["test_accuracy"],
            dense_test_accuracy=dense["test_accuracy"], plasticity=summary["test_accuracy"] / dense["test_accuracy"],
            after_lr_decay=sum(meta["prune_epoch"] >= d for d in decays),
        ))
    write_outputs(rows, root, decays, dense["test_accuracy"])
    return rows


# ------------------------------------------------------------------------------------ outputs


def write_outputs(rows: list[dict[str, Any]], root: Path, decays: list[float], dense_accuracy: float) -> None:
    """``plasticity.csv``, ``plasticity.md`` and ``plasticity.png`` in the study directory."""
    fields = ["prune_epoch", "rate", "regeneration", "after_lr_decay", "sparsity", "test_accuracy",
              "dense_test_accuracy", "plasticity"]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(root / "plasticity.csv", table.getvalue())
    atomic_write_text(root / "plasticity.md", markdown_table(rows, dense_accuracy, decays))
    plot(rows, root / "plasticity.png", decays)


def markdown_table(rows: list[dict[str, Any]], dense_accuracy: float, decays: list[float]) -> str:
    """Plasticity (%) by pruning epoch (rows) and rate × regeneration (columns)."""
    rates = sorted({r["rate"] for r in rows})
    epochs = sorted({r["prune_epoch"] for r in rows})
    value = {(r["prune_epoch"], r["rate"], r["regeneration"]): r["plasticity"] for r in rows}
    head = ["prune epoch"] + [f"p={rate:g} {'regen' if g else 'no regen'}" for rate in rates for g in (False, True)]
    lines = [
        f"Dense test accuracy: {dense_accuracy:.4f}. LR decays after epochs: "
        f"{', '.join(f'{d:g}' for d in decays) or 'none'}. Plasticity = A_continue / A_dense (%).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for epoch in epochs:
        cells = [f"{100 * value[(epoch, rate, g)]:.2f}" for rate in rates for g in (False, True)]
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, decays: list[float]) -> None:
    """Plasticity vs pruning epoch: one colour per rate, solid with regeneration, dashed without."""
    fig = figure(7.5, 4.5, constrained=False)
    ax = fig.add_subplot(1, 1, 1)
    rates = sorted({r["rate"] for r in rows})
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for i, rate in enumerate(rates):
        for regenerate in (False, True):
            pts = sorted((r["prune_epoch"], 100 * r["plasticity"]) for r in rows
                         if r["rate"] == rate and r["regeneration"] == regenerate)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colours[i % len(colours)],
                    linestyle="-" if regenerate else "--",
                    label=f"prune {rate:g} {'+ regeneration' if regenerate else '(no regeneration)'}")
    for d in decays:
        ax.axvline(d, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("pruning epoch (dotted: learning-rate decays)")
    ax.set_ylabel("pruning plasticity (% of dense accuracy)")
    ax.set_title("Pruning plasticity vs pruning time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
