"""Resume integrity: every method, every kill moment, torn metrics, reused and edited run directories.

Every comparison is exact (``torch.equal`` on every model tensor, mask and optimizer-state tensor;
metrics lines equal except wall time). Sparse-start methods are resumed at an epoch after regrowth has
moved weights that were inactive at initialisation.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from granet.cli import main
from granet.methods import list_methods

ROOT = Path(__file__).resolve().parents[1]
REGROWING_SPARSE_START = ("set", "rigl", "snfs", "granet-st")
FIXED_MASK = ("static", "snip", "grasp", "synflow")
METHODS = ("dense", "static", "gmp", "gmp-layerwise", "set", "rigl", "snfs", "granet", "granet-st", "snip", "grasp",
           "synflow")


def _args(out, method, epochs=4, extra=()):
    density = [] if method == "dense" else ["--density", "0.05"]
    return ["train", "--model", "mlp", "--method", method, *density, "--epochs", str(epochs), "--update-interval", "5",
            "--out", str(out), "--progress", "log", *extra]


def _load(path):
    return torch.load(path, weights_only=True)


def assert_same_run(ref: Path, res: Path) -> None:
    """Bit-identical final state, metrics and summary."""
    a, b = _load(ref / "checkpoint.pt"), _load(res / "checkpoint.pt")
    assert a["progress"]["step"] == b["progress"]["step"]
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["sparsifier"]["masks"].items():
        assert torch.equal(v, b["sparsifier"]["masks"][k]), k
    for i, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b["optimizer"]["state"][i][key]), (i, key)
    strip = lambda text: [dict(json.loads(line), time_s=None) for line in text.splitlines()]  # noqa: E731
    assert strip((ref / "metrics.jsonl").read_text()) == strip((res / "metrics.jsonl").read_text())
    sa, sb = json.loads((ref / "summary.json").read_text()), json.loads((res / "summary.json").read_text())
    for key in ("test_accuracy", "best_val_accuracy", "selected_epoch", "train_flops", "layer_density"):
        assert sa[key] == sb[key], key
    assert json.loads((res / "status.json").read_text())["state"] == "finished"


def _reference(tmp_path: Path, method: str, epochs=4, keep=(2,)) -> Path:
    ref = tmp_path / "reference"
    keep_args = ["--keep-checkpoints", *map(str, keep)] if keep else []
    assert main(_args(ref, method, epochs, keep_args)) == 0
    return ref


def test_every_method_is_covered():
    assert sorted(METHODS) == sorted(list_methods())


@pytest.mark.parametrize("method", METHODS)
def test_resume_from_kept_epoch_checkpoint(method, tmp_path):
    ref = _reference(tmp_path, method)
    kept = _load(ref / "checkpoint_epoch2.pt")
    regrown = sum(r["regrown"] for r in kept["progress"]["history"])
    if method in REGROWING_SPARSE_START:  # weights inactive at initialisation were regrown before the resume
        assert regrown > 0
    if method in FIXED_MASK:
        assert regrown == 0
    res = tmp_path / "resumed"
    res.mkdir()
    shutil.copy(ref / "config.yaml", res / "config.yaml")
    shutil.copy(ref / "checkpoint_epoch2.pt", res / "checkpoint.pt")
    assert main(["train", "--resume", str(res), "--progress", "log"]) == 0
    assert_same_run(ref, res)


def _run_killed(args, moment, epoch, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "killer.py"), moment, str(epoch), *args],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


@pytest.mark.parametrize("method", METHODS)
def test_kill_after_metrics_line_and_resume(method, tmp_path):
    ref = _reference(tmp_path, method, keep=())
    killed = tmp_path / "killed"
    _run_killed(_args(killed, method), "after_metrics", 2, tmp_path)
    assert not (killed / "summary.json").exists()
    assert main(["train", "--resume", str(killed), "--progress", "log"]) == 0
    assert_same_run(ref, killed)


@pytest.mark.parametrize("method, moment", [
    ("rigl", "checkpoint_tmp"), ("rigl", "after_checkpoint"), ("rigl", "model_tmp"),
    ("granet-st", "checkpoint_tmp"), ("granet-st", "after_checkpoint"), ("granet-st", "model_tmp"),
])
def test_kill_during_end_of_epoch_writes(method, moment, tmp_path):
    ref = _reference(tmp_path, method, keep=())
    killed = tmp_path / "killed"
    _run_killed(_args(killed, method), moment, 3, tmp_path)
    if moment == "checkpoint_tmp":
        assert (killed / "checkpoint.pt.tmp").exists()  # the kill really came mid-write
        assert _load(killed / "checkpoint.pt")["progress"]["epoch"] == 2
    assert main(["train", "--resume", str(killed), "--progress", "log"]) == 0
    assert not list(killed.glob("*.tmp"))  # the resume removed what the kill left behind
    assert_same_run(ref, killed)


def _same_checkpoint(a: Path, b: Path) -> None:
    x, y = _load(a), _load(b)
    assert dict(x["progress"], wall_time=None, history=None) == dict(y["progress"], wall_time=None, history=None)
    for part in ("model",):
        assert x[part].keys() == y[part].keys()
        assert all(torch.equal(v, y[part][k]) for k, v in x[part].items())
    assert all(torch.equal(v, y["sparsifier"]["masks"][k]) for k, v in x["sparsifier"]["masks"].items())


def test_kill_during_kept_checkpoint_copy_completes_it_on_resume(tmp_path):
    ref = _reference(tmp_path, "rigl", keep=(2,))
    killed = tmp_path / "killed"
    _run_killed(_args(killed, "rigl", extra=("--keep-checkpoints", "2")), "kept_tmp", 2, tmp_path)
    assert (killed / "checkpoint_epoch2.pt.tmp").exists()  # the kill really came inside the copy
    assert not (killed / "checkpoint_epoch2.pt").exists()
    assert main(["train", "--resume", str(killed), "--progress", "log"]) == 0
    assert not list(killed.glob("*.tmp"))
    _same_checkpoint(ref / "checkpoint_epoch2.pt", killed / "checkpoint_epoch2.pt")
    assert_same_run(ref, killed)


@pytest.mark.parametrize("gone", ["checkpoint.pt", "checkpoint.pt and status.json"])
def test_resume_never_deletes_the_results_of_a_run_without_its_checkpoint(gone, tmp_path, capsys):
    run = _reference(tmp_path, "rigl", epochs=2, keep=(1,))
    (run / "checkpoint.pt").unlink()
    if "status" in gone:
        (run / "status.json").unlink()
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["train", "--resume", str(run), "--progress", "log"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"granet: error: cannot resume {run}: it has no checkpoint.pt to continue from, but holds results "
                   f"(metrics.jsonl, model.pt, summary.json, checkpoint_epoch1.pt) that starting again would delete; "
                   f"copy a kept checkpoint (checkpoint_epoch1.pt) to checkpoint.pt to continue from it, evaluate it "
                   f"with `granet evaluate {run}`, or train it again from the beginning with --overwrite"]
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing deleted, nothing added


def test_resume_of_a_finished_run_reports_it_unchanged(tmp_path):
    run = _reference(tmp_path, "rigl", epochs=2, keep=())
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name not in ("summary.json", "status.json")}
    summary = json.loads((run / "summary.json").read_text())
    assert main(["train", "--resume", str(run), "--progress", "log"]) == 0
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name not in ("summary.json", "status.json")} == before
    again = json.loads((run / "summary.json").read_text())
    assert {k: v for k, v in again.items()} == summary  # the same test, the same numbers
    assert json.loads((run / "status.json").read_text())["state"] == "finished"


def test_torn_metrics_line_is_dropped_on_resume(tmp_path, monkeypatch):
    """Also: `granet train --resume` reads the checkpoint file once (config and state from one read)."""
    import granet.train.run as run_module

    reads: list[Path] = []
    real_read = run_module.read_checkpoint

    def counting_read(path, *args, **kwargs):
        reads.append(Path(path))
        return real_read(path, *args, **kwargs)

    ref = _reference(tmp_path, "rigl", keep=(2,))
    monkeypatch.setattr(run_module, "read_checkpoint", counting_read)
    res = tmp_path / "resumed"
    res.mkdir()
    shutil.copy(ref / "config.yaml", res / "config.yaml")
    shutil.copy(ref / "checkpoint_epoch2.pt", res / "checkpoint.pt")
    lines = (ref / "metrics.jsonl").read_text().splitlines()
    (res / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:17])  # a write torn by a full disk
    assert main(["train", "--resume", str(res), "--progress", "log"]) == 0
    assert reads == [res / "checkpoint.pt"]
    assert_same_run(ref, res)


def test_reused_out_directory_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    args = _args(run, "granet", epochs=1)
    assert main(args) == 0
    (run / "checkpoint.pt").unlink()
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "metrics.jsonl", "summary.json")}
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{run} already holds a run" in err and "--overwrite" in err
    assert {name: (run / name).read_bytes() for name in before} == before  # nothing lost
    assert main(args + ["--overwrite", "true"]) == 0
    assert (run / "checkpoint.pt").exists()
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_edited_config_yaml_is_refused_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(run, "granet", epochs=1)) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump(dict(saved, method="rigl", lr=0.5)))
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.yaml was changed after the run started" in err
    assert "lr: the checkpoint has 0.1, now 0.5" in err and "method: the checkpoint has 'granet', now 'rigl'" in err


def test_resume_with_result_changing_flag_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(run, "granet", epochs=1)) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--update-interval", "7"]) == 2
    assert "update_interval: the checkpoint has 5, now 7" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--workers", "0", "--progress", "log"]) == 0  # harmless keys


def test_config_yaml_records_the_values_used(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--model", "mlp", "--method", "rigl", "--epochs", "1", "--max-steps", "3",
                 "--out", str(run), "--progress", "log"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert None not in [saved[k] for k in ("update_interval", "drop_fraction", "regrow_start", "regrow_end",
                                           "distribution", "init_density", "density")]
    # ΔT: the embedded recipe's on digits; r_0 and tf: rigl's preset (tf = 0.75 x 3 steps)
    assert (saved["update_interval"], saved["drop_fraction"], saved["regrow_end"]) == (20, 0.3, 2)


def test_library_resume_with_the_unresolved_config(tmp_path):
    """`train(config.with_values(resume=DIR))` with the config as first given (sparsity keys None, as
    the sweep and plasticity drivers do) continues the run exactly."""
    from granet.train import load_config, train

    ref = tmp_path / "reference"
    config = load_config(None, dict(model="mlp", method="rigl", epochs=3, progress="log", keep_checkpoints=[1]))
    assert config.sparsity.drop_fraction is None  # the preset's, resolved only when the run starts
    train(config.with_values(out=str(ref)))
    res = tmp_path / "resumed"
    res.mkdir()
    shutil.copy(ref / "config.yaml", res / "config.yaml")
    shutil.copy(ref / "checkpoint_epoch1.pt", res / "checkpoint.pt")
    train(config.with_values(resume=str(res)))
    assert_same_run(ref, res)
