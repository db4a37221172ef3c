"""``granet report``: loading run directories, the Markdown tables, the PNG figures, the CLI."""
from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml

from granet.cli import report as cli_report
from granet.reports.report import (
    load_run,
    load_runs,
    markdown_table,
    write_report,
)
from granet.rundir import EpochRecord, write_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = ["conv1.weight", "layer1.0.conv1.weight", "layer1.0.conv2.weight", "fc.weight"]


def make_run(
    root: Path,
    name: str,
    *,
    method: str,
    seed: int,
    density: float,
    sparsity: float,
    test: Optional[float],
    val: Optional[float],
    train_flops: Optional[float],
    inference_flops: Optional[float],
    exploration: bool = True,
    model: str = "resnet20",
    dataset: str = "cifar10",
) -> Path:
    """A run directory in exactly the format ``granet train`` writes."""
    run = root / name
    run.mkdir(parents=True)
    config = {"method": method, "model": model, "dataset": dataset, "density": density,
              "init_density": 1.0 if method == "granet" else None, "seed": seed, "epochs": 3}
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    records = []
    for epoch in (1, 2, 3):
        # dense-to-sparse methods reach the target over training, the others start there
        s = sparsity * epoch / 3 if method == "granet" else sparsity
        records.append(EpochRecord(
            epoch=epoch, step=100 * epoch, lr=0.1, train_loss=1.0 / epoch,
            train_accuracy=0.5 + 0.1 * epoch, val_loss=None if val is None else 0.9 / epoch,
            val_accuracy=None if val is None else val - 0.01 * (3 - epoch),
            density=1.0 - s, sparsity=s,
            exploration_rate=(1.0 - sparsity) * (1 + 0.2 * epoch) if exploration else None,
            train_flops=train_flops, time_s=10.0 * epoch,
        ))
    write_metrics(run / "metrics.jsonl", records)
    layer_density = dict(zip(LAYERS, [1.0, 0.2, 0.05, 0.5]))
    summary = {
        "method": method, "model": model, "dataset": dataset, "seed": seed, "target_density": density,
        "sparsity": sparsity, "layer_density": layer_density, "best_val_accuracy": val, "test_accuracy": test,
        "steps": 300, "wall_time_s": 30.0, "train_flops": train_flops, "inference_flops": inference_flops,
        "selected_epoch": 3,  # extra keys are allowed
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    return run


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    return [
        make_run(tmp_path, "rigl-s0", method="rigl", seed=0, density=0.1, sparsity=0.9, test=0.90, val=0.91,
                 train_flops=0.30, inference_flops=0.25),
        make_run(tmp_path, "rigl-s1", method="rigl", seed=1, density=0.1, sparsity=0.9, test=0.92, val=0.93,
                 train_flops=0.32, inference_flops=0.25),
        make_run(tmp_path, "granet-s0", method="granet", seed=0, density=0.1, sparsity=0.90012, test=0.9345,
                 val=None, train_flops=None, inference_flops=None, exploration=False),
    ]


def rows(markdown: str, heading: str) -> list[list[str]]:
    """Cells of the table under ``heading`` (header row first, alignment row dropped)."""
    lines = markdown.splitlines()
    start = lines.index(heading)
    table = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.strip("|").split(" | ")])
    return [table[0]] + table[2:]


def test_load_run(runs: list[Path]) -> None:
    run = load_run(runs[0])
    assert run.name == "rigl-s0"
    assert (run.method, run.model, run.dataset, run.seed) == ("rigl", "resnet20", "cifar10", 0)
    assert run.target_density == 0.1 and run.sparsity == 0.9
    assert run.test_accuracy == 0.90 and run.best_val_accuracy == 0.91
    assert run.train_flops == 0.30 and run.inference_flops == 0.25
    assert len(run.metrics) == 3 and run.config["epochs"] == 3
    assert run.layer_density["layer1.0.conv2.weight"] == 0.05
    assert run.series("sparsity") == ([100.0, 200.0, 300.0], [0.9, 0.9, 0.9])
    granet_run = load_run(runs[2])
    assert granet_run.best_val_accuracy is None and granet_run.train_flops is None
    assert granet_run.series("exploration_rate") == ([], [])


def test_markdown_tables(runs: list[Path]) -> None:
    markdown = markdown_table(load_runs(runs))
    per_run = rows(markdown, "### Runs")
    assert per_run[0] == ["run", "method", "model", "dataset", "seed", "sparsity (%)", "test acc (%)",
                          "best val acc (%)", "train FLOPs (× dense)", "inference FLOPs (× dense)"]
    by_name = {r[0]: r for r in per_run[1:]}
    assert by_name["rigl-s0"] == ["rigl-s0", "rigl", "resnet20", "cifar10", "0", "90.00", "90.00", "91.00",
                                  "0.300", "0.250"]
    assert by_name["rigl-s1"][4:] == ["1", "90.00", "92.00", "93.00", "0.320", "0.250"]
    assert by_name["granet-s0"][4:] == ["0", "90.01", "93.45", "—", "—", "—"]
    grouped = rows(markdown, "### Mean ± std over seeds")
    assert grouped[0] == ["method", "model", "dataset", "target sparsity (%)", "seeds", "test acc (%)",
                          "best val acc (%)", "train FLOPs (× dense)", "inference FLOPs (× dense)"]
    groups = {r[0]: r for r in grouped[1:]}
    assert len(grouped) == 3  # header + granet + rigl
    # mean of 90 and 92 is 91, sample std sqrt(((90-91)^2 + (92-91)^2) / (2-1)) = 1.414...
    assert groups["rigl"] == ["rigl", "resnet20", "cifar10", "90.00", "0, 1", "91.00 ± 1.41", "92.00 ± 1.41",
                              "0.310 ± 0.014", "0.250 ± 0.000"]
    assert groups["granet"] == ["granet", "resnet20", "cifar10", "90.00", "0", "93.45", "—", "—", "—"]


def test_groups_split_by_density_and_names_are_unique(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", "seed0", method="set", seed=0, density=0.2, sparsity=0.8, test=0.9, val=0.9,
                 train_flops=0.4, inference_flops=0.4)
    b = make_run(tmp_path / "b", "seed0", method="set", seed=0, density=0.05, sparsity=0.95, test=0.8,
                 val=0.8, train_flops=0.1, inference_flops=0.1)
    loaded = load_runs([a, b, a])  # a directory given twice is read once
    assert [r.name for r in loaded] == ["a/seed0", "b/seed0"]
    grouped = rows(markdown_table(loaded), "### Mean ± std over seeds")
    assert [r[3] for r in grouped[1:]] == ["80.00", "95.00"]  # increasing sparsity


def test_percent_accuracies_are_not_rescaled(tmp_path: Path) -> None:
    run = make_run(tmp_path, "pct", method="static", seed=0, density=0.5, sparsity=0.5, test=93.5, val=94.0,
                   train_flops=None, inference_flops=None)
    per_run = rows(markdown_table(load_runs([run])), "### Runs")
    assert per_run[1][6:8] == ["93.50", "94.00"]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_write_report_and_figures(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    written = write_report(load_runs(runs), out)
    assert [p.name for p in written] == ["report.md", "accuracy_vs_sparsity.png", "training_curves.png",
                                         "layer_density.png"]
    for png in written[1:]:
        assert png.stat().st_size > 10_000
        width, height = png_size(png)
        assert width >= 500 and height >= 300
    assert png_size(out / "layer_density.png")[1] > png_size(out / "training_curves.png")[1]  # 3 stacked panels
    report = (out / "report.md").read_text()
    assert report.startswith("# granet report")
    assert "![Accuracy vs sparsity](accuracy_vs_sparsity.png)" in report
    assert "91.00 ± 1.41" in report


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="granet report")
    cli_report.add_arguments(parser)
    return cli_report.run(parser.parse_args(argv))


def test_cli(runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli-report"
    assert _cli([str(p) for p in runs] + ["--out", str(out), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "| rigl-s0 | rigl |" in printed and "91.00 ± 1.41" in printed
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]


def _break(run: Path, what: str) -> None:
    if what == "no summary":
        (run / "summary.json").unlink()
    elif what == "bad metrics":  # a damaged line before the last (a torn last line is skipped)
        lines = (run / "metrics.jsonl").read_text().splitlines()
        (run / "metrics.jsonl").write_text("\n".join([*lines[:2], "{not json", lines[2]]) + "\n")
    elif what == "bad config":
        (run / "config.yaml").write_text("- just\n- a list\n")
    elif what == "bad summary":
        summary: dict[str, Any] = json.loads((run / "summary.json").read_text())
        summary["test_accuracy"] = "high"
        (run / "summary.json").write_text(json.dumps(summary))


@pytest.mark.parametrize(
    "what, fragment",
    [
        ("no summary", "missing summary.json (the run may be unfinished)"),
        ("bad metrics", "metrics.jsonl line 3 is not a valid metrics record"),
        ("bad config", "config.yaml does not hold a mapping"),
        ("bad summary", "test_accuracy must be a number or null"),
    ],
)
def test_invalid_run_dirs(runs: list[Path], what: str, fragment: str) -> None:
    _break(runs[0], what)
    with pytest.raises(ValueError) as info:
        load_run(runs[0])
    assert fragment in str(info.value) and str(runs[0]) in str(info.value)


def test_cli_errors(runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert _cli([str(runs[0]), str(missing), "--out", str(tmp_path / "r")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert f"run directory {missing} does not exist" in captured.err and "Traceback" not in captured.err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _cli([str(empty)]) == 2
    err = capsys.readouterr().err
    assert "missing config.yaml, metrics.jsonl, summary.json" in err and str(empty) in err
    assert not (tmp_path / "r").exists()


def test_runs_with_health_warnings_get_a_table(runs: list[Path]) -> None:
    assert "### Health warnings" not in markdown_table(load_runs(runs))  # healthy runs: no table
    summary_path = runs[1] / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["health"] = {"healthy": False,
                         "flags": {"stuck_weights": {"step": 180, "epoch": 2}, "chance_loss": {"step": 300, "epoch": 3}},
                         "last": {"units": 458, "dead_units": 12, "stuck": 290, "active": 1908}}
    summary_path.write_text(json.dumps(summary))
    loaded = load_runs(runs)
    assert loaded[1].health_flags == {"stuck_weights": {"step": 180, "epoch": 2}, "chance_loss": {"step": 300, "epoch": 3}}
    assert loaded[0].health_flags == {} and loaded[0].health == {}
    table = rows(markdown_table(loaded), "### Health warnings")
    assert table == [["run", "method", "conditions (first epoch)", "dead units at the end", "stuck weights"],
                     ["rigl-s1", "rigl", "stuck_weights (epoch 2), chance_loss (epoch 3)", "12 / 458", "290 / 1908"]]


def test_the_report_modules_import_one_way() -> None:
    """report -> report_plots -> report_runs, and report -> report_runs: no module imports back."""
    import ast

    import granet

    root = Path(granet.__file__).parent

    def imports(name: str) -> set[str]:
        tree = ast.parse((root / f"{name}.py").read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1
                and node.module}

    assert "report" not in imports("report_plots") and "report" not in imports("report_runs")
    assert "report_plots" not in imports("report_runs")
    assert {"report_runs", "report_plots"} <= imports("report")
