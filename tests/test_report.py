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
    assert _cli([str(empty), "--out", str(tmp_path / "r")]) == 2  # no directory holds a run: refused
    assert capsys.readouterr().err == f"granet report: error: none of the directories holds a granet run: {empty}\n"
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("method: rigl\n")
    assert _cli([str(runs[0]), str(unfinished), "--out", str(tmp_path / "r")]) == 2  # a run, incomplete: refused
    err = capsys.readouterr().err
    assert "missing metrics.jsonl, summary.json" in err and str(unfinished) in err
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
    """reports/: report -> plots -> runs, and report -> runs: no module imports back."""
    import ast

    import granet

    root = Path(granet.__file__).parent / "reports"

    def imports(name: str) -> set[str]:
        tree = ast.parse((root / f"{name}.py").read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1
                and node.module}

    assert "report" not in imports("plots") and "report" not in imports("runs")
    assert "plots" not in imports("runs")
    assert {"runs", "plots"} <= imports("report")


# ---------------------------------------------------------------------------------------------- issue 30


def test_report_skips_directories_that_hold_no_run(runs: list[Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    empty = tmp_path / "left-by-a-failed-start"
    empty.mkdir()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("not a run\n")
    out = tmp_path / "r"
    with caplog.at_level("WARNING", logger="granet.reports.runs"):
        assert _cli([str(empty), *map(str, runs), str(notes), "--out", str(out), "--no-plots"]) == 0
    assert [r.getMessage() for r in caplog.records] == [
        f"skipping {empty}: the directory holds no granet run", f"skipping {notes}: the directory holds no granet run"]
    per_run = rows(capsys.readouterr().out, "### Runs")
    assert sorted(r[0] for r in per_run[1:]) == ["granet-s0", "rigl-s0", "rigl-s1"]
    assert (notes / "todo.txt").read_text() == "not a run\n" and empty.is_dir()  # skipped, never touched
    with pytest.raises(ValueError, match="no run directories given"):
        load_runs([])
    with pytest.raises(ValueError) as info:  # the library call refuses unless told to skip
        load_runs([*runs, empty])
    assert str(info.value) == f"{empty} is not a complete granet run directory: missing config.yaml, metrics.jsonl, " \
                              f"summary.json"


def _seed_runs(root: Path, accuracies: list[tuple[int, float]], method: str = "rigl") -> list[Path]:
    return [make_run(root, f"{method}-{i}-s{seed}", method=method, seed=seed, density=0.1, sparsity=0.9, test=acc,
                     val=acc, train_flops=0.3 + 0.01 * i, inference_flops=0.25)
            for i, (seed, acc) in enumerate(accuracies)]


def test_a_repeated_seed_is_a_duplicate_run_not_another_seed(tmp_path: Path) -> None:
    # Seed 0 twice (90 and 92) and seed 1 (95): two seeds, seed 0's value is the mean of its duplicates.
    grouped = rows(markdown_table(load_runs(_seed_runs(tmp_path / "a", [(0, 0.90), (0, 0.92), (1, 0.95)]))),
                   "### Mean ± std over seeds")
    # mean of 91 and 95 = 93, sample std sqrt(2 * 2^2 / 1) = 2.828...; FLOPs: seed 0 (0.30 + 0.31) / 2 = 0.305,
    # seed 1 0.32: mean 0.3125, std 0.015 / sqrt(2) = 0.0106
    assert grouped[1][4:] == ["0, 1 (seed 0: 2 runs, duplicates averaged)", "93.00 ± 2.83", "93.00 ± 2.83",
                              "0.312 ± 0.011", "0.250 ± 0.000"]
    only_duplicates = rows(markdown_table(load_runs(_seed_runs(tmp_path / "b", [(0, 0.90), (0, 0.92)]))),
                           "### Mean ± std over seeds")
    assert only_duplicates[1][4:6] == ["0 (seed 0: 2 runs, duplicates averaged)", "91.00"]  # one seed: no "± 0.00"
    distinct = rows(markdown_table(load_runs(_seed_runs(tmp_path / "c", [(0, 0.90), (1, 0.92)]))),
                    "### Mean ± std over seeds")
    assert distinct[1][4:6] == ["0, 1", "91.00 ± 1.41"]


def _matrix(root: Path) -> list[Path]:
    """8 runs: four methods x seeds 0 and 1 at density 0.1, plus rigl at density 0.05 (seed 0)."""
    paths = []
    for method in ("gmp", "granet", "rigl", "set"):
        for seed in (0, 1):
            paths.append(make_run(root, f"{method}-s{seed}", method=method, seed=seed, density=0.1,
                                  sparsity=0.9, test=0.9 + 0.01 * seed, val=0.9, train_flops=0.3,
                                  inference_flops=0.2))
    paths.append(make_run(root, "rigl-d0.05-s0", method="rigl", seed=0, density=0.05, sparsity=0.95, test=0.85,
                          val=0.85, train_flops=0.2, inference_flops=0.1))
    return paths


def test_training_curves_draw_every_run_distinguishably_with_a_legend_that_says_which(tmp_path: Path) -> None:
    from matplotlib.colors import to_rgb

    from granet.reports.plots import curves_figure

    loaded = load_runs(_matrix(tmp_path))
    fig = curves_figure(loaded)
    sparsity_axes = fig.axes[0]
    lines = sparsity_axes.get_lines()
    assert len(lines) == 9
    looks = [(to_rgb(line.get_color()), line.get_linestyle(), line.get_marker()) for line in lines]
    assert len(set(looks)) == 9  # no two runs drawn alike
    by_run = dict(zip((r.name for r in loaded), looks))
    assert by_run["rigl-s0"][0] == by_run["rigl-s1"][0] and by_run["rigl-s0"][1] != by_run["rigl-s1"][1]
    assert by_run["rigl-s0"][1] == by_run["set-s0"][1] and by_run["rigl-s0"][0] != by_run["set-s0"][0]
    # rigl at 0.05 is rigl's colour, lighter (sparser) than rigl at 0.1, and seed 0's line style
    denser, sparser = by_run["rigl-s0"][0], by_run["rigl-d0.05-s0"][0]
    assert all(s > d for s, d in zip(sparser, denser)) and by_run["rigl-d0.05-s0"][1] == by_run["rigl-s0"][1]
    legend = fig.axes[1].get_legend()
    names = {r.name: f"{r.method}, density {r.target_density:g}, seed {r.seed}" for r in loaded}
    assert [t.get_text() for t in legend.get_texts()] == [names[r.name] for r in loaded]
    assert legend.get_title().get_text() == "method, density, seed\n(colour, shade, line style)"
    handles = legend.legend_handles
    assert [(to_rgb(h.get_color()), h.get_linestyle()) for h in handles] == [look[:2] for look in looks]


def test_duplicate_runs_are_named_in_the_curve_legend(tmp_path: Path) -> None:
    from granet.reports.plots import curve_styles

    loaded = load_runs(_seed_runs(tmp_path, [(0, 0.90), (0, 0.92), (1, 0.95)]))
    assert [s["label"] for s in curve_styles(loaded)] == [
        "rigl, density 0.1, seed 0 (rigl-0-s0)", "rigl, density 0.1, seed 0 (rigl-1-s0)", "rigl, density 0.1, seed 1"]


def test_accuracy_plot_draws_methods_side_by_side_at_their_exact_values(tmp_path: Path) -> None:
    from granet.reports.plots import ACCURACY_CAPTION, accuracy_figure
    from granet.reports.stats import SIDE_BY_SIDE_NOTE, side_by_side_offsets

    loaded = load_runs(_matrix(tmp_path))
    fig = accuracy_figure(loaded)
    ax = fig.axes[0]
    data_lines = [c.lines[0] for c in ax.containers]  # one errorbar container per method
    assert [c.get_label() for c in ax.containers] == ["gmp", "granet", "rigl", "set"]
    assert [list(line.get_xdata()) for line in data_lines] == [[90.0], [90.0], [90.0, 95.0], [90.0]]
    # mean over the two seeds (90 and 91), std sqrt(0.5) over them; rigl at 95% sparsity: one seed
    assert list(data_lines[0].get_ydata()) == pytest.approx([90.5])
    assert list(data_lines[2].get_ydata()) == pytest.approx([90.5, 85.0])
    # every method is shifted by its own offset on the screen, the data untouched
    shifts = []
    for line in data_lines:
        point = (float(line.get_xdata()[0]), float(line.get_ydata()[0]))
        shifted, plain = line.get_transform().transform(point), ax.transData.transform(point)
        assert shifted[1] == pytest.approx(plain[1])
        shifts.append(float(shifted[0] - plain[0]) * 72.0 / fig.dpi)  # pixels -> points
    assert shifts == pytest.approx(side_by_side_offsets(4)) and side_by_side_offsets(4) == [-7.5, -2.5, 2.5, 7.5]
    # the caption is in the figure, and under it in report.md
    assert fig.get_supxlabel() == SIDE_BY_SIDE_NOTE and SIDE_BY_SIDE_NOTE in ACCURACY_CAPTION
    assert side_by_side_offsets(13) == pytest.approx([(i - 6) * 2.5 for i in range(13)])  # at most 30 points wide


def test_layer_density_figure_says_which_runs_it_shows_and_why(tmp_path: Path) -> None:
    from granet.reports.plots import LAYER_LABEL_SIZE, layer_density_figure, layer_panel_caption

    loaded = load_runs(_matrix(tmp_path))
    fig = layer_density_figure(loaded, max_runs=6)
    titles = [ax.get_title().split(":")[0] for ax in fig.axes]
    # one per group (method, density; lowest seed) first, in group order, then the groups' second seeds
    assert titles == ["gmp-s0", "granet-s0", "rigl-s0", "rigl-d0.05-s0", "set-s0", "gmp-s1"]
    assert layer_panel_caption(loaded, 6) == (
        "6 of the 9 runs with per-layer densities, as the figure holds at most 6 panels: one run per method and "
        "target density first (its lowest seed), then further seeds in the same order. Shown: `gmp-s0`, "
        "`granet-s0`, `rigl-s0`, `rigl-d0.05-s0`, `set-s0`, `gmp-s1`. Not shown: `granet-s1`, `rigl-s1`, `set-s1`.")
    assert fig.get_suptitle() == ("Per-layer density of the selected model\n6 of 9 runs: one per method and "
                                        "density first (lowest seed), then further seeds")
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "fc"]
        assert {t.get_fontsize() for t in ax.get_xticklabels()} == {LAYER_LABEL_SIZE} == {9}
    few = load_runs(_matrix(tmp_path / "few")[:2])
    assert layer_panel_caption(few, 6) == "One panel per run: `gmp-s0`, `gmp-s1`."


def test_report_md_carries_the_captions_and_the_log_names_the_figures(runs: list[Path], tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    from granet.reports.plots import ACCURACY_CAPTION, CURVES_CAPTION

    with caplog.at_level("INFO", logger="granet.reports.report"):
        write_report(load_runs(runs), tmp_path / "with")
        write_report(load_runs(runs), tmp_path / "without", plots=False)
    assert [r.getMessage() for r in caplog.records] == [
        f"wrote {tmp_path / 'with' / 'report.md'} and 3 figure(s): accuracy_vs_sparsity.png, training_curves.png, "
        f"layer_density.png",
        f"wrote {tmp_path / 'without' / 'report.md'} (no figures)"]
    report = (tmp_path / "with" / "report.md").read_text()
    assert f"![Accuracy vs sparsity](accuracy_vs_sparsity.png)\n\n{ACCURACY_CAPTION}\n" in report
    assert f"(training_curves.png)\n\n{CURVES_CAPTION}\n" in report
    assert "(layer_density.png)\n\nOne panel per run: `granet-s0`, `rigl-s0`, `rigl-s1`.\n" in report
