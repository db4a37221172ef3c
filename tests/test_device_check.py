"""The prepared device check (benchmarks/device_check.py): its CPU rehearsal runs every part, and a
device whose masks differ from the CPU's is reported as a failure."""
import json
from pathlib import Path

import pytest
import torch
from helpers import load_script

from granet.methods import list_methods

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def device_check():
    return load_script("benchmarks/device_check.py")


@pytest.mark.slow
def test_dry_run_runs_every_part_and_writes_one_json(device_check, tmp_path):
    out = tmp_path / "check.json"
    assert device_check.main(["--dry-run", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["dry_run"] is True and set(record["parts"]) == set(device_check.PARTS)
    parts = record["parts"]
    tests = parts["cuda_tests"]
    assert tests["status"] == "ok" and tests["failures"] == tests["errors"] == 0
    assert tests["tests"] == tests["passed"] + tests["skipped"] and tests["tests"] >= 9
    rows = {row["method"]: row for row in parts["mask_equality"]["methods"]}
    assert set(rows) == set(list_methods())
    for method, row in rows.items():
        assert row["masks_equal"] is True, method
        if method in device_check.AT_INIT:
            assert row["counts_equal"] is True and row["agreement"] == 1.0
        else:
            assert row["weights_equal"] is True and row["first_differing_step"] is None
    # The protocol really moves the masks of the dynamic methods (a check of nothing would pass too).
    for method in ("gmp", "granet", "granet-st", "rigl", "set", "snfs"):
        assert rows[method]["mask_entries_changed_over_run"] > 0, method
    assert rows["static"]["mask_entries_changed_over_run"] == rows["dense"]["mask_entries_changed_over_run"] == 0
    assert parts["update_cost"]["status"] == "ok" and parts["update_cost"]["update_per_dense_step"] > 0
    assert parts["update_cost"]["density_after"] < 1.0
    assert parts["step_overhead"]["status"] == "ok" and parts["step_overhead"]["ratio"] > 0
    amp = parts["amp_bf16"]
    assert amp["status"] == "ok" and amp["active"] == amp["target_active"] and amp["problems"] == []
    assert parts["semi_structured"] == {"status": "skipped", "reason": "2:4 semi-structured kernels need CUDA",
                                        "seconds": parts["semi_structured"]["seconds"]}


def test_masks_that_differ_on_the_device_fail_the_check(device_check, tmp_path, monkeypatch):
    real = device_check._exact_run
    calls = []

    def second_call_differs(method, device, steps, seed):
        masks, weights = real(method, device, steps, seed)
        calls.append(method)
        if method == "rigl" and calls.count("rigl") == 2:  # the "device" run of rigl: one entry flipped at step 5
            masks[4][0] = masks[4][0].clone()
            masks[4][0].view(-1)[0] ^= True
        return masks, weights

    monkeypatch.setattr(device_check, "_exact_run", second_call_differs)
    result = device_check.mask_equality(torch.device("cpu"), steps=6)
    rows = {row["method"]: row for row in result["methods"]}
    assert result["status"] == "failed"
    assert rows["rigl"]["masks_equal"] is False and rows["rigl"]["first_differing_step"] == 5
    assert all(row["masks_equal"] for m, row in rows.items() if m != "rigl")


def test_a_failing_part_is_recorded_and_the_others_still_run(device_check, tmp_path, monkeypatch):
    def broken(device, small):
        raise RuntimeError("no kernel image is available")

    monkeypatch.setattr(device_check, "update_cost", broken)
    out = tmp_path / "check.json"
    assert device_check.main(["--dry-run", "--out", str(out), "--parts", "update_cost,amp_bf16"]) == 1
    parts = json.loads(out.read_text())["parts"]
    assert parts["update_cost"]["status"] == "failed"
    assert parts["update_cost"]["error"] == "RuntimeError: no kernel image is available"
    assert parts["amp_bf16"]["status"] == "ok"


def test_bad_arguments_are_one_line_errors(device_check, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        device_check.main(["--dry-run", "--out", str(tmp_path / "x.json"), "--parts", "mask_equality,warp"])
    assert exit_info.value.code == 2
    assert "--parts: unknown part 'warp'; valid: cuda_tests, mask_equality" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        device_check.main(["--dry-run", "--out", str(tmp_path / "missing" / "x.json")])
    assert f"--out: directory {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            device_check.main(["--out", str(tmp_path / "x.json")])
        assert "no CUDA device is available; use --dry-run" in capsys.readouterr().err
