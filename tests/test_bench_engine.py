"""benchmarks/bench_engine.py: the --quick smoke run reports every measure, with exact memory figures."""
import json
from pathlib import Path

import pytest
from helpers import load_script

from granet.kernels import native

ROOT = Path(__file__).resolve().parents[1]


def _load():
    return load_script("benchmarks/bench_engine.py")


def test_floor_bytes_hand_worked():
    bench = _load()
    # prune 6 + drop 6 + grow 6 + weight and one momentum buffer 16 + mask read 1 + exploration 1 = 36
    assert bench.floor_bytes(1000, state_tensors=1, pruning=True) == 36_000
    assert bench.floor_bytes(1000, state_tensors=2, pruning=False) == 38_000
    assert bench.synthetic_mlp(3 * 64 * 64, width=64)[2].weight.shape == (64, 64)


@pytest.mark.slow
def test_quick_run_reports_every_measure(tmp_path, capsys):
    bench = _load()
    assert bench.main(["--quick", "--json", str(tmp_path / "r.json")]) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    kernels = ("native", "torch") if native.library() is not None else ("torch",)  # both where a compiler is
    assert [(u["model"], u["kernels"]) for u in results["update_cost"]] == [
        (model, kernel) for model in ("resnet20 (CIFAR)", "synthetic Linear stack") for kernel in kernels]
    for u in results["update_cost"]:
        assert u["mask_bytes_per_weight"] == 1.0
        for kind in ("prune_regrow", "regrow_only"):
            r = u[kind]
            assert r["updates"] >= 1 and r["update_s"] > 0 and r["naive_s"] > 0
            assert r["per_dense_step"] == r["update_s"] / u["dense_step_s"]
            assert r["naive_per_update"] == r["naive_s"] / r["update_s"]
    mlp = results["update_cost"][len(kernels)]
    assert mlp["sparsified_weights"] == 4 * 512 * 512 and mlp["largest_layer"] == 512 * 512
    assert mlp["exploration_bytes_per_weight"] == 0.125
    methods = results["methods"]
    assert methods["model"] == "resnet20 (CIFAR)" and list(methods["updates"]) == list(kernels)
    for rows in methods["updates"].values():
        assert [r["method"] for r in rows] == list(bench.METHOD_UPDATES)
        for r in rows:
            assert r["updates"] == 2 and r["per_dense_step"] == r["update_s"] / methods["dense_step_s"]
            if r["method"] in ("rigl", "set", "snfs"):  # constant density, exact counts
                assert abs(r["density_after"] - 0.1) < 1e-5, r
            else:  # pruned at every update, still on the way to 0.1
                assert 0.1 < r["density_after"] < 1.0, r
    overhead = results["step_overhead"]
    assert overhead["blocks"] == 2 and overhead["kernels"] == kernels[0]
    assert overhead["direct_ratio"] == 1 + overhead["sparsifier_step_s"] / overhead["dense_step_s"]
    table = capsys.readouterr().out
    assert f"| synthetic Linear stack (1,048,576 w) | prune + regrow, {kernels[0]} |" in table
    assert "| synthetic Linear stack (1,048,576 w) | regrow only, torch |" in table
    assert "step overhead (GraNet / dense, resnet20 (CIFAR), batch 16, 32x32)" in table
    assert "| snfs | " in table


def test_kernels_option_is_validated(capsys):
    bench = _load()
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--kernels", "native,fast"])
    assert "--kernels takes a comma-separated subset of native,torch, got 'native,fast'" in capsys.readouterr().err
