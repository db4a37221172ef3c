"""benchmarks/compare_methods.py: every method reported, claims computed, reruns train nothing."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("compare_methods", ROOT / "benchmarks" / "compare_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
