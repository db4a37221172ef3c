"""The pruning-plasticity study: outputs, metric definition, parallel trials, resume."""
import csv
import json
import math
from pathlib import Path

import pytest

from granet.cli import main
from granet.experiments.plasticity import (
    PlasticityConfig,
    granet_drop_fraction,
    load_study_config,
    run_study,
    trial_configs,
)
from granet.train import ConfigError

TINY = dict(train=dict(model="mlp", dataset="digits", epochs=4, batch_size=64, lr_schedule="multistep",
                       milestones=[0.5], progress="log"),
            prune_epochs=[1, 3], rates=[0.9], workers=1)


def test_study_outputs_and_definition(tmp_path, capsys):
    out = tmp_path / "study"
    code = main(["plasticity", "--epochs", "4", "--prune-epochs", "1", "3", "--rates", "0.9", "--workers", "1",
                 "--out", str(out)])
    assert code == 0
    rows = list(csv.DictReader(open(out / "plasticity.csv")))
    assert len(rows) == 4
    dense = json.loads((out / "dense" / "summary.json").read_text())
    for row in rows:
        trial = out / "trials" / f"e{int(row['prune_epoch']):03d}-p0.9-{'regen' if row['regeneration'] == 'True' else 'noregen'}"
        summary = json.loads((trial / "summary.json").read_text())
        assert float(row["plasticity"]) == pytest.approx(summary["test_accuracy"] / dense["test_accuracy"])
        assert summary["sparsity"] == pytest.approx(0.9, abs=1e-4)
        metrics = [json.loads(x) for x in (trial / "metrics.jsonl").read_text().splitlines()]
        # continued from the dense checkpoint: the first epoch of the trial is prune_epoch + 1
        assert metrics[0]["epoch"] == int(row["prune_epoch"]) + 1 and metrics[-1]["epoch"] == 4
    # default milestones 50% and 75% of 4 epochs: epoch 1 is before both decays, epoch 3 after both
    assert {(r["prune_epoch"], r["after_lr_decay"]) for r in rows} == {("1", "0"), ("3", "2")}
    assert (out / "plasticity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = [line for line in (out / "plasticity.md").read_text().splitlines() if line.startswith("| ")]
    value = {(r["prune_epoch"], r["regeneration"]): 100 * float(r["plasticity"]) for r in rows}
    for epoch in ("1", "3"):
        cells = next(line for line in table if line.startswith(f"| {epoch} |")).strip("| ").split(" | ")
        assert cells == [epoch, f"{value[(epoch, 'False')]:.2f}", f"{value[(epoch, 'True')]:.2f}"]
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"wrote {out / 'plasticity.csv'}")


def test_resume_redoes_only_missing_trials_and_runs_in_parallel(tmp_path):
    study = load_study_config(None, dict(TINY, out=str(tmp_path / "s")))
    run_study(study)
    trials = sorted((tmp_path / "s" / "trials").iterdir())
    stamps = {t.name: (t / "summary.json").stat().st_mtime_ns for t in trials}
    victim = trials[0]
    for f in victim.iterdir():
        f.unlink()
    victim.rmdir()
    rows = run_study(dataclass_replace(study, workers=2))
    assert len(rows) == 4
    for t in sorted((tmp_path / "s" / "trials").iterdir()):
        if t.name == victim.name:
            assert (t / "summary.json").exists()
        else:
            assert (t / "summary.json").stat().st_mtime_ns == stamps[t.name], "finished trials must not rerun"


def dataclass_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def test_trial_configs_prune_once_and_regenerate_with_granet_rate(tmp_path):
    study = load_study_config(None, dict(TINY))
    configs = trial_configs(study, tmp_path)
    assert len(configs) == 2 * 1 * 2
    by_name = {meta["name"]: cfg for meta, cfg in configs}
    plain, regen = by_name["e003-p0.9-noregen"], by_name["e003-p0.9-regen"]
    assert plain.sparsity.density == pytest.approx(0.1) and plain.sparsity.prune_end == 1
    assert plain.sparsity.drop_fraction is None
    expected = 0.005 + 0.5 * 0.495 * (1 + math.cos(math.pi * 3 / 4))
    assert regen.sparsity.drop_fraction == pytest.approx(expected) == pytest.approx(granet_drop_fraction(3, study))
    assert regen.sparsity.regrow_end == 2 and regen.init_from.endswith("checkpoint_epoch3.pt")


@pytest.mark.parametrize("values, message", [
    (dict(prune_epochs=[0]), "prune_epochs must be integers in [1, epochs=4)"),
    (dict(prune_epochs=[4]), "prune_epochs must be integers"),
    (dict(rates=[1.0]), "rates"),
    (dict(scope="weird"), "unknown scope"),
    (dict(colour="red"), "unknown plasticity key(s): colour"),
])
def test_bad_study_config(values, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_study_config(None, dict(TINY, **values))


def test_default_study_config_is_valid():
    study = PlasticityConfig()
    study.validate()
    epochs = study.train["epochs"]
    decays = [m * epochs for m in study.train["milestones"]]
    # pruning times cover before the first decay, between decays, and after the last one
    assert any(e < decays[0] for e in study.prune_epochs)
    assert any(decays[0] <= e < decays[1] for e in study.prune_epochs)
    assert any(e >= decays[1] for e in study.prune_epochs)


@pytest.mark.parametrize("name", ["plasticity_digits.yaml", "plasticity_cifar10_vgg19.yaml"])
def test_study_recipes_load(name):
    study = load_study_config(str(Path(__file__).resolve().parents[1] / "configs" / name), {})
    assert study.rates and study.prune_epochs
