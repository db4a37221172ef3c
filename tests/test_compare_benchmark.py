"""benchmarks/compare_methods.py: every method reported, claims computed, reruns train nothing."""
import json
from pathlib import Path

import pytest
from helpers import load_script

from granet.reports.stats import paired_interval

ROOT = Path(__file__).resolve().parents[1]


def _load():
    return load_script("benchmarks/compare_methods.py")


def test_tiny_comparison_and_resume(tmp_path, capsys):
    compare = _load()
    args = ["--setting", "mlp", "--seeds", "1", "--densities", "0.05", "--epochs", "2", "--workers", "1",
            "--out", str(tmp_path)]
    assert compare.main(args) == 0
    text = (tmp_path / "mlp" / "results.md").read_text()
    from granet.methods import list_methods

    methods = [m for m in list_methods() if m != "gmp-layerwise"] + ["lth"]  # dense once, every sparse method
    for method in methods:
        assert f"| {method} |" in text
    assert "Claim 1" in text and "granet" in text and "difference" in text
    assert (tmp_path / "mlp" / "accuracy_vs_sparsity.png").read_bytes()[:4] == b"\x89PNG"
    summaries = sorted((tmp_path / "mlp").glob("*/summary.json"))
    assert len(summaries) == len(methods) == 12
    assert "lth" in text.split("Reference: lottery tickets (4 trainings")[1]
    stamps = [p.stat().st_mtime_ns for p in summaries]
    assert compare.main(args) == 0  # everything finished: nothing is retrained
    assert [p.stat().st_mtime_ns for p in summaries] == stamps


def test_mnist1d_comparison_verdicts_lr_check_and_resume(tmp_path, capsys):
    compare = _load()
    args = ["--setting", "mnist1d", "--seeds", "2", "--densities", "0.02", "--epochs", "1", "--workers", "1",
            "--methods", "dense", "gmp", "granet", "--lr-scales", "3", "--out", str(tmp_path)]
    assert compare.main(args) == 0
    root = tmp_path / "mnist1d"
    summaries = sorted(root.glob("*/*/summary.json"))
    # 2 networks x 2 seeds x (dense + gmp + granet), then the LR check: 2 networks x 2 seeds x (gmp, granet) x 1 scale.
    assert len(summaries) == 12 + 8
    runs = {p.parent.relative_to(root).as_posix(): json.loads(p.read_text()) for p in summaries}
    assert {s["threads"] for s in runs.values()} == {1}  # one torch thread per run, whatever --workers
    assert {s["model"] for k, s in runs.items() if k.startswith("cnn/")} == {"mnist1d_cnn_64"}
    assert {s["model"] for k, s in runs.items() if k.startswith("mlp/")} == {"mnist1d_mlp_wide"}
    assert "mlp/granet-d0.02-s1-lrx3" in runs and "cnn/gmp-d0.02-s0-lrx3" in runs
    text = (root / "results.md").read_text()
    assert "## mlp: mnist1d_mlp_wide" in text and "## cnn: mnist1d_cnn_64" in text
    # The verdict row is the paired interval of the two methods' per-seed accuracies (points).
    for net in ("mlp", "cnn"):
        for suffix, tag in (("", "0.02"), ("-lrx3", "×3")):
            a = [100 * runs[f"{net}/granet-d0.02-s{s}{suffix}"]["test_accuracy"] for s in (0, 1)]
            b = [100 * runs[f"{net}/gmp-d0.02-s{s}{suffix}"]["test_accuracy"] for s in (0, 1)]
            iv = paired_interval(a, b)
            row = (f"| {net} | {tag} | granet − gmp | 2 | {iv.mean:+.2f} ± {iv.std:.2f} | "
                   f"[{iv.low:+.2f}, {iv.high:+.2f}] | **{iv.verdict}** |")
            assert row in text, row
    assert "## Learning-rate check" in text
    for name in ("accuracy_vs_density.png", "accuracy_vs_train_flops.png"):
        assert (root / name).read_bytes()[:4] == b"\x89PNG"
    stamps = [p.stat().st_mtime_ns for p in summaries]
    assert compare.main(args) == 0  # everything finished: nothing is retrained
    assert [p.stat().st_mtime_ns for p in summaries] == stamps
    capsys.readouterr()
    for bad, message in ((["--methods", "granet", "nosuch"], "error: unknown method(s) nosuch; known: dense, "),
                         (["--lr-scales", "0"], "error: --lr-scales must be positive, got 0"),
                         (["--seeds", "0"], "error: --seeds must be at least 1, got 0")):
        with pytest.raises(SystemExit) as info:
            compare.main(["--setting", "mnist1d", *bad, "--out", str(tmp_path)])
        assert info.value.code == 2 and message in capsys.readouterr().err.splitlines()[-1]


def _row(acc, flops):
    return {"seeds": 2, "accuracy": (acc, 0.5), "sparsity": (95.0, 0.0), "train_flops": (flops, 0.0),
            "inference_flops": (0.05, 0.0), "wall_time": (1.0, 0.0)}


def test_claims_leave_out_sections_whose_methods_did_not_run():
    compare = _load()
    table = {("gmp", 0.05): _row(80.0, 0.6), ("granet", 0.05): _row(81.5, 0.5)}
    text = compare.claims(table, [0.05])
    assert text == ("Claim 1: GraNet (dense-to-sparse) beats GMP at the same final sparsity, most at high sparsity.\n"
                    "\n"
                    "* density 0.05: granet 81.50 (±0.50) vs gmp 80.00 (±0.50): difference +1.50 points\n"
                    "\n"
                    "Claim 3: sparse-to-sparse methods need far fewer training FLOPs than dense-to-sparse ones.\n"
                    "\n"
                    "* density 0.05: training FLOPs (x dense) gmp 0.600, granet 0.500\n")
    with_lth = compare.claims({**table, ("lth", 0.05): _row(82.0, 3.2)}, [0.05])
    assert with_lth.endswith("Reference: lottery tickets (4 trainings, FLOPs of all rounds) vs GraNet.\n\n"
                             "* density 0.05: lth 82.00 (±0.50) at 3.200 x dense vs granet 81.50 (±0.50) at 0.500 "
                             "x dense\n")
    assert compare.claims({}, [0.05]) == ""


def test_density_plot_draws_methods_side_by_side_and_says_so(tmp_path):
    from granet.reports.stats import SIDE_BY_SIDE_NOTE, side_by_side_offsets

    compare = _load()
    table = {("dense", 1.0): _row(90.0, 1.0)}
    for method in ("gmp", "granet", "granet-st"):
        for density in (0.05, 0.01):
            table[(method, density)] = _row(80.0, 0.5)  # equal accuracies: the points would coincide
    fig = compare.plot(table, tmp_path / "a.png", "title")
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    ax = fig.axes[0]
    assert [c.get_label() for c in ax.containers] == ["gmp", "granet", "granet-st"]
    shifts = []
    for container in ax.containers:
        line = container.lines[0]
        assert sorted(line.get_xdata()) == [0.01, 0.05] and list(line.get_ydata()) == [80.0, 80.0]
        point = (0.05, 80.0)
        shifts.append(float(line.get_transform().transform(point)[0] - ax.transData.transform(point)[0]))
    assert [s * 72.0 / fig.dpi for s in shifts] == pytest.approx(side_by_side_offsets(3)) == [-5.0, 0.0, 5.0]
    assert fig.get_supxlabel() == SIDE_BY_SIDE_NOTE
    low, high = ax.get_ylim()
    assert low < 79.5 and high > 80.5  # the side-by-side points are inside the axes' limits
