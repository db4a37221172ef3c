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
