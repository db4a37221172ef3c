"""The `granet` command and training loop: default job, resume after a kill, recipes, errors."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import kill_tree, torchrun

from granet.cli import main
from granet.train import OptimConfig, TrainConfig, load_config, lr_factor, train

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("plasticity_"))
SUMMARY_KEYS = {"method", "model", "dataset", "seed", "target_density", "sparsity", "layer_density",
                "best_val_accuracy", "test_accuracy", "steps", "wall_time_s", "train_flops", "inference_flops",
                "threads"}
METRIC_KEYS = {"epoch", "step", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "density",
               "sparsity", "exploration_rate", "train_flops", "time_s"}


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_default_job_reaches_target(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["train", "--progress", "log"], capsys)
    assert code == 0, err
    run = tmp_path / "runs" / "digits-digits_cnn-granet-d0.05-s0"
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["test_accuracy"] >= 0.97
    # dense-to-sparse training costs less than dense training; the sparse model far less to run
    assert 0.1 < summary["train_flops"] < 1.0
    assert 0.0 < summary["inference_flops"] < 0.2
    weights = sum(torch.load(run / "model.pt", weights_only=True)["masks"][n].numel() for n in summary["layer_density"])
    assert summary["sparsity"] == pytest.approx(1 - round(0.05 * weights) / weights, abs=1e-12)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(1, 31))
    assert METRIC_KEYS <= set(metrics[0])
    assert metrics[-1]["density"] == pytest.approx(0.05, abs=1e-5)
    # model selection only among epochs at the final density, and never on the test set
    selected = summary["selected_epoch"]
    assert metrics[selected - 1]["density"] == pytest.approx(0.05, abs=1e-5)
    assert summary["best_val_accuracy"] == max(m["val_accuracy"] for m in metrics if abs(m["density"] - 0.05) < 1e-5)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"] == "granet" and saved["density"] == 0.05 and saved["out"] == str(Path("runs") / run.name)
    # evaluate re-tests the saved model and gets the same number
    code, out, err = run_cli(["evaluate", str(run), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out[out.index("["):])[0]["test_accuracy"] == summary["test_accuracy"]


def _args(out, epochs=40, extra=()):
    return ["train", "--model", "mlp", "--epochs", str(epochs), "--update-interval", "10", "--out", str(out),
            "--progress", "log", *extra]


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, capsys):
    reference = tmp_path / "reference"
    assert main(_args(reference)) == 0
    killed = tmp_path / "killed"
    # Bit-exactness holds for the same thread count (float reduction order), so the subprocess
    # uses as many torch threads as this process.
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, "-m", "granet", *_args(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "summary.json").exists()
    code, out, err = run_cli(["train", "--resume", str(killed), "--progress", "log"], capsys)
    assert code == 0, err
    ref = torch.load(reference / "checkpoint.pt", weights_only=True)
    res = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert ref["progress"]["step"] == res["progress"]["step"]
    for k, v in ref["model"].items():
        assert torch.equal(v, res["model"][k]), k
    for k, v in ref["sparsifier"]["masks"].items():
        assert torch.equal(v, res["sparsifier"]["masks"][k]), k
    a = json.loads((reference / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert (a["test_accuracy"], a["best_val_accuracy"], a["selected_epoch"], a["train_flops"]) == \
        (b["test_accuracy"], b["best_val_accuracy"], b["selected_epoch"], b["train_flops"])
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, 41))


@pytest.mark.parametrize("args, message", [
    (["train", "--model", "nope"], "unknown model 'nope'; valid: digits_cnn"),
    (["train", "--dataset", "nope"], "unknown dataset 'nope'; valid: cifar10"),
    (["train", "--method", "nope"], "unknown method 'nope'; valid: dense"),
    (["train", "--density", "1.5"], r"density must be a number in (0, 1]"),
    (["train", "--density", "0"], r"density must be a number in (0, 1]"),
    (["train", "--method", "granet-st", "--density", "0.7"], "above the initial density"),
    (["train", "--prune-start", "0.6", "--prune-end", "0.4"], "must be before prune_end"),
    (["train", "--dataset", "mnist", "--model", "lenet5", "--data-dir", "{tmp}/nothing"], "{tmp}/nothing"),
    (["train", "--resume", "{tmp}/nothing"], "cannot resume from"),
    (["train", "--config", "{tmp}/bad.yaml"], "unknown config key(s): colour"),
    (["train", "--config", "{tmp}/missing.yaml"], "cannot read config file"),
])
def test_bad_input_is_one_line_error(args, message, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("method: granet\ncolour: red\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args] + ["--out", str(tmp_path / "run")]
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert err.startswith("granet: error: ") and err.count("\n") == 1, err
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert "Traceback" not in err


def test_resume_with_incompatible_config_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(run, epochs=1)) == 0
    code, out, err = run_cli(["train", "--resume", str(run), "--lr", "0.5"], capsys)
    assert code == 2 and "cannot resume: the config differs" in err and "lr: the checkpoint has 0.1, now 0.5" in err
    code, out, err = run_cli(_args(run, epochs=1), capsys)
    assert code == 2 and "already holds a run" in err


def test_unknown_flag_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--colour", "red"])
    assert exc.value.code == 2
    assert "--colour" in capsys.readouterr().err


def test_help_lists_required_flags(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--method", "--density", "--init-density", "--model", "--dataset", "--data-dir", "--epochs",
                 "--batch-size", "--lr", "--seed", "--device", "--out", "--resume", "--config", "--prune-end"):
        assert flag in text


def test_listings(capsys):
    from granet.data import list_datasets
    from granet.methods import list_methods
    from granet.models import list_models

    methods = [*list_methods(), "lth"]  # the sparsifier presets, then the training procedures
    for command, names in (("models", list_models()), ("methods", methods), ("datasets", list_datasets())):
        assert main([command]) == 0
        assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == names, command


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_runs_on_synthetic_data(recipe, tmp_path):
    raw = yaml.safe_load(recipe.read_text())
    # Image recipes run on synthetic images; the MNIST-1D ones on a small set made by its generator.
    data = (dict(dataset_options=dict(num_samples=200)) if raw["dataset"] == "mnist1d" else
            dict(dataset="synthetic", dataset_options=dict(num_train=24, num_test=8, image_size=32, num_classes=10)))
    overrides = dict(data, batch_size=8, max_steps=2, epochs=1, workers=0, download=False, val_fraction=0.25,
                     out=str(tmp_path / "run"), data_dir=str(tmp_path / "data"), progress="log")
    config = load_config(str(recipe), overrides)
    assert config.method == raw["method"] and config.model == raw["model"]
    if "density" in raw:  # dense recipes leave it out
        assert config.sparsity.density == raw["density"]
    summary = train(config)
    trainings = config.effective_lth_rounds + 1 if raw["method"] == "lth" else 1  # lth: R+1 trainings
    assert summary["steps"] == 2 * trainings
    assert summary["method"] == raw["method"]


def test_accumulation_adamw_warmup_multistep(tmp_path):
    config = TrainConfig.from_dict(dict(
        model="mlp", method="rigl", density=0.2, epochs=2, batch_size=64, accumulation_steps=4, optimizer="adamw",
        lr=0.01, lr_schedule="multistep", milestones=[0.5], warmup_epochs=0.5, label_smoothing=0.1,
        update_interval=5, out=str(tmp_path / "run"), progress="log"))
    config.validate()
    summary = train(config)
    per_epoch = math.floor(1294 / 64)  # digits train split at val_fraction 0.1 (1438 - 144)
    assert summary["steps"] == 2 * per_epoch
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["lr"] == pytest.approx(0.001)
    assert summary["sparsity"] == pytest.approx(0.8, abs=1e-4)


def test_lr_factor_schedules():
    c = OptimConfig(lr_schedule="multistep", milestones=(0.5, 0.75), gamma=0.1, warmup_epochs=1)
    assert lr_factor(c, 0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(c, 9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(c, 49, 10, 100) == 1.0 and lr_factor(c, 50, 10, 100) == pytest.approx(0.1)
    assert lr_factor(c, 75, 10, 100) == pytest.approx(0.01)
    e = OptimConfig(lr_schedule="multistep", milestones=(3, 6), gamma=0.5)
    assert lr_factor(e, 29, 10, 100) == 1.0 and lr_factor(e, 30, 10, 100) == 0.5 and lr_factor(e, 60, 10, 100) == 0.25
    cos = OptimConfig(lr_schedule="cosine")
    assert lr_factor(cos, 0, 10, 100) == 1.0 and lr_factor(cos, 100, 10, 100) == pytest.approx(0.0)
    assert lr_factor(cos, 50, 10, 100) == pytest.approx(0.5)


@pytest.mark.slow
def test_torchrun_two_processes_matches_one_process_schedule(tmp_path):
    """`torchrun --nproc_per_node=2 -m granet train` on CPU (gloo): same steps and sparsity as 1 process."""
    common = ["train", "--model", "mlp", "--method", "rigl", "--density", "0.1", "--epochs", "2",
              "--update-interval", "5", "--device", "cpu", "--progress", "log"]
    two = tmp_path / "two"
    proc = torchrun(2, [*common, "--out", str(two)])
    proc.wait(timeout=300)
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
    one = tmp_path / "one"
    assert main([*common, "--out", str(one)]) == 0
    a = json.loads((one / "summary.json").read_text())
    b = json.loads((two / "summary.json").read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert a["steps"] == b["steps"]
    assert a["sparsity"] == b["sparsity"]
    ma = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [m["topology_updates"] for m in ma] == [m["topology_updates"] for m in mb]
    # same global batch on 1 and 2 processes: only float reduction order differs (359 test images)
    assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 0.02


@pytest.mark.slow
def test_resume_under_torchrun_matches_uninterrupted_run(tmp_path):
    args = ["train", "--model", "mlp", "--method", "set", "--density", "0.1", "--epochs", "30",
            "--update-interval", "10", "--device", "cpu", "--progress", "log"]
    reference = tmp_path / "reference"
    proc = torchrun(2, [*args, "--out", str(reference)])
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    killed = tmp_path / "killed"
    proc = torchrun(2, [*args, "--out", str(killed)])
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            kill_tree(proc.pid)  # the launcher and both ranks
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    proc = torchrun(2, ["train", "--resume", str(killed), "--progress", "log"])
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    ref = torch.load(reference / "checkpoint.pt", weights_only=True)
    res = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert ref["progress"]["step"] == res["progress"]["step"]
    assert all(torch.equal(v, res["model"][k]) for k, v in ref["model"].items())
    assert all(torch.equal(v, res["sparsifier"]["masks"][k]) for k, v in ref["sparsifier"]["masks"].items())
    a = json.loads((reference / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert (a["test_accuracy"], a["world_size"]) == (b["test_accuracy"], b["world_size"]) == (a["test_accuracy"], 2)


def test_list_and_mapping_flags_parse():
    from granet.cli import build_parser

    args = build_parser().parse_args(["train", "--milestones", "0.5", "80", "--keep-checkpoints", "3", "7",
                                      "--dataset-options", "image_size=64", "num_classes=5",
                                      "--keep-dense", "conv1", "fc", "--prune-end", "0.5", "--update-interval", "100"])
    assert args.milestones == [0.5, 80] and args.keep_checkpoints == [3, 7]
    assert dict(args.dataset_options) == {"image_size": 64, "num_classes": 5}
    assert args.keep_dense == ["conv1", "fc"] and args.prune_end == 0.5 and args.update_interval == 100


@pytest.mark.parametrize("method", ["dense", "static", "gmp", "gmp-layerwise", "set", "rigl", "snfs", "granet",
                                    "granet-st", "snip", "grasp", "synflow"])
def test_method_presets_win_over_command_defaults(method, tmp_path):
    """`granet train --method M` runs M's own t0, tf and r_0, and its ΔT except on digits, where every
    scheduled method takes the embedded recipe's; config.yaml records them resolved."""
    from granet.methods import method_config, updates_topology
    from granet.train.config import EMBEDDED_RECIPE, SPARSITY_KEYS

    run = tmp_path / "run"
    assert main(["train", "--model", "mlp", "--method", method, "--max-steps", "4", "--out", str(run),
                 "--progress", "log"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    density = 1.0 if method == "dense" else 0.05
    preset = method_config(method, total_steps=4, **({} if method == "dense" else {"density": density}))
    expected = dict(preset.to_dict(), **preset.resolve_steps(), init_density=preset.effective_init_density)
    if updates_topology(method):  # the embedded digits recipe's ΔT (no --config, dataset digits)
        expected["update_interval"] = EMBEDDED_RECIPE["sparsity"]["update_interval"]
    assert {k: saved[k] for k in SPARSITY_KEYS} == {k: expected[k] for k in SPARSITY_KEYS}
    assert saved["density"] == density
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["sparsifier"]["config"]["update_interval"] == expected["update_interval"]


def test_tensorboard_and_coverage_are_written(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(["train", "--model", "mlp", "--epochs", "2", "--out", str(run), "--progress", "log",
                 "--tensorboard", "true"]) == 0
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0}).Reload()
    for key in ("train_loss", "val_accuracy", "density", "lr", "exploration_rate", "pruned", "regrown"):
        points = events.Scalars(key)
        assert [p.step for p in points] == [m["step"] for m in metrics], key
        assert [p.value for p in points] == pytest.approx([m[key] for m in metrics], rel=1e-6), key
    assert [h.step for h in events.Histograms("layer_density")] == [m["step"] for m in metrics]
    coverage = json.loads((run / "coverage.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    # the MLP's three Linear weights are masked, its biases dense: 50,200 of 50,610 parameters
    assert (coverage["masked_params"], coverage["total_params"]) == (50_200, 50_610)
    assert sorted(summary["layer_density"]) == ["layers.0.weight", "layers.2.weight", "layers.4.weight"]


def test_the_run_log_says_what_is_sparse_once(tmp_path, caplog):
    with caplog.at_level("INFO", logger="granet"):
        assert main(["train", "--model", "mlp", "--max-steps", "2", "--out", str(tmp_path / "run"),
                     "--progress", "log"]) == 0
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert text.count("tensors under masks:") == 1  # the summary line (logged when the sparsifier is built)
    table = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("what is sparse:"))
    assert table.splitlines()[1].split() == ["parameter", "shape", "params", "status"]
    assert len(table.splitlines()) == 1 + 1 + 3 + 1  # title, header, LeNet-300-100's 3 weights, the 1-D line
