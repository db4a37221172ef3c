"""Bad input, as a new user or a hostile environment would give it: one line naming the problem,
exit status 2, no traceback, nothing executed from a loaded file, no file of an earlier run lost."""
import json
import os
import pickle
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from granet.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "mlp", "--epochs", "1", "--max-steps", "2", "--progress", "log"]


def run_cli(args, capsys):
    try:
        code = main(args)
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_line(code, err, fragment):
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("granet") and ": error: " in err, err
    assert fragment in err, err


# ---------------------------------------------------------------------------- flags and values

FLAG_CASES = [
    (["--density", "0"], "density must be a number in (0, 1], got 0"),
    (["--density", "-0.5"], "density must be a number in (0, 1], got -0.5"),
    (["--density", "1.5"], "density must be a number in (0, 1], got 1.5"),
    (["--density", "nan"], "density must be a finite number, got nan"),
    (["--method", "lth", "--fsdp", "true"], "fsdp: true does not support method 'lth' (lottery tickets prune full, "
                                             "unsharded weights); use DDP"),
    (["--density", "inf"], "density must be a finite number, got inf"),
    (["--density", "abc"], "argument --density: invalid float value: 'abc'"),
    (["--init-density", "2"], "init_density must be a number in (0, 1], got 2"),
    (["--method", "nope"], "unknown method 'nope'; valid: dense"),
    (["--model", "nope"], "unknown model 'nope'; valid: digits_cnn"),
    (["--dataset", "nope"], "unknown dataset 'nope'; valid: cifar10"),
    (["--distribution", "nope"], "unknown distribution 'nope'"),
    (["--optimizer", "lbfgs"], "unknown optimizer 'lbfgs'; valid: sgd, adam, adamw"),
    (["--prune-start", "0.6", "--prune-end", "0.5"], "prune_start (0.6) must be before prune_end (0.5)"),
    (["--prune-start", "500", "--prune-end", "100"], "prune_start (500) must be before prune_end (100)"),
    (["--prune-end", "100000"], "prune_end=100000 resolves to step 100000, beyond total_steps=2: the run would end before it"),
    (["--regrow-start", "0.8", "--regrow-end", "0.2"], "regrow_start (0.8) must be before regrow_end (0.2)"),
    (["--prune-end", "soon"], "argument --prune-end: expected a step (int) or a fraction of training (float)"),
    (["--epochs", "0"], "epochs must be a positive integer, got 0"),
    (["--epochs", "-3"], "epochs must be a positive integer, got -3"),
    (["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
    (["--batch-size", "100000"], "batch_size 100000 is larger than the training set"),
    (["--lr", "0"], "lr must be in (0, inf), got 0.0"),
    (["--lr", "-1"], "lr must be in (0, inf), got -1.0"),
    (["--momentum", "1.5"], "momentum must be in [0, 1), got 1.5"),
    (["--label-smoothing", "-0.1"], "label_smoothing must be in [0, 1), got -0.1"),
    (["--update-interval", "0"], "update_interval must be a positive integer, got 0"),
    (["--drop-fraction", "1.5"], "drop_fraction must be in [0, 1), got 1.5"),
    (["--gamma", "-1", "--lr-schedule", "multistep"], "gamma must be in (0, inf), got -1.0"),
    (["--warmup-epochs", "-3"], "warmup_epochs must be >= 0, got -3.0"),
    (["--lr-schedule", "multistep", "--milestones", "-5", "2"], "milestone -5.0 must be > 0 (a fraction of training if <= 1, else an epoch)"),
    (["--lr-schedule", "multistep", "--milestones", "0.75", "0.5"], "milestones must be strictly increasing"),
    (["--milestones", "0.5"], "milestones [0.5] only apply to lr_schedule multistep, not 'cosine'"),
    (["--method", "dense", "--density", "0.5"], "method 'dense' trains at density 1; density=0.5 would be ignored"),
    (["--method", "granet-st", "--density", "0.7"], "above the initial density"),
    (["--keep-dense", "conv9"], "conv9"),
    (["--workers", "-1"], "workers must be >= 0, got -1"),
    (["--dist-timeout", "0"], "dist_timeout must be in (0, inf), got 0.0"),
    (["--model", "vgg19", "--dataset", "digits"], "model 'vgg19' on dataset 'digits': input_size=8 is too small"),
    (["--model", "resnet50", "--dataset", "synthetic", "--dataset-options", "image_size=224"],
     "use 'imagenet_resnet50' for ImageNet's ResNet-50"),
    (["--dataset", "synthetic", "--dataset-options", "image_size=big"],
     "synthetic dataset option image_size must be a positive integer, got 'big'"),
    (["--dataset", "synthetic", "--dataset-options", "num_train=-5"],
     "synthetic dataset option num_train must be a positive integer, got -5"),
    (["--dataset", "synthetic", "--dataset-options", "colour=red"], "colour"),
    (["--colour", "red"], "unrecognized arguments: --colour red"),
    (["--device", "tpu:7"], "invalid device 'tpu:7'"),
    (["--density", "1e-9"], "density 1e-09 keeps no weight: 1e-09 x 50,200 sparsified weights rounds to 0 (the "
                            "lowest usable density here is 1.99e-05)"),
    (["--keep-checkpoints", "1000"], "keep_checkpoints [1000]: the run has 1 epochs, so no checkpoint of those "
                                     "epochs would ever be written"),
    (["--seed", "100000000000000000000"], "seed must be an integer in [0, 2^32), got 100000000000000000000"),
    (["--seed", "-1"], "seed must be an integer in [0, 2^32), got -1"),
    (["--dataset", "synthetic", "--dataset-options", "num_test=1000000000"],
     "synthetic dataset option num_test=1,000,000,000 with 3x32x32 images is 3,072,000,000,000 pixel values; a split "
     "is limited to 268,435,456 (2^28)"),
]


@pytest.mark.parametrize("args, fragment", FLAG_CASES, ids=[" ".join(a) for a, _ in FLAG_CASES])
def test_bad_flag(args, fragment, tmp_path, capsys):
    code, err = run_cli(["train", *FAST, *args, "--out", str(tmp_path / "run")], capsys)
    assert_one_line(code, err, fragment)
    assert not (tmp_path / "run").exists()  # a refused run leaves no directory behind


def test_a_field_the_method_locks_is_refused_before_the_data_is_loaded(tmp_path, capsys):
    code, err = run_cli(["train", *FAST, "--method", "snip", "--prune-end", "0.7", "--out", str(tmp_path / "run")],
                        capsys)
    assert_one_line(code, err, "method 'snip' requires prune_end=1, got 0.7")
    assert err.rstrip().endswith("got 0.7")  # no "(this run has N optimizer steps)": it needs no run length
    assert "dataset digits" not in err  # refused before the data was loaded


# ---------------------------------------------------------------------------- YAML files

YAML_CASES = [
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "is not a text (UTF-8) file"),
    (b"- method\n- granet\n", "must be a mapping of keys to values, got list"),
    (b"method: [granet\n", "is not valid YAML"),
    (b"method: granet\ncolour: red\n", "unknown config key(s): colour"),
    (b"lr_schedule: multistep\nmilestones: 0.5\n", "milestones must be a list of numbers or null, got 0.5"),
    (b"workers: '2'\n", "workers must be an integer, got '2'"),
    (b"nesterov: maybe\n", "nesterov must be true/false, got 'maybe'"),
    (b"epochs: 2.5\n", "epochs must be an integer, got 2.5"),
    (b"density: '0.1'\n", "density must be a number or null, got '0.1'"),
    (b"keep_dense: conv1\n", "keep_dense must be a list of strings or null, got 'conv1'"),
    (b"dataset_options: [1, 2]\n", "dataset_options must be a mapping of KEY: VALUE, got [1, 2]"),
]


@pytest.mark.parametrize("content, fragment", YAML_CASES, ids=[f[:30] for _, f in YAML_CASES])
def test_bad_yaml_config(content, fragment, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    code, err = run_cli(["train", "--config", str(path), "--out", str(tmp_path / "run")], capsys)
    assert_one_line(code, err, fragment)


def test_missing_config_file(tmp_path, capsys):
    code, err = run_cli(["train", "--config", str(tmp_path / "missing.yaml")], capsys)
    assert_one_line(code, err, f"cannot read config file {tmp_path / 'missing.yaml'}: No such file or directory")


# ---------------------------------------------------------------------------- checkpoints and model files


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", *FAST, "--out", str(run)]) == 0
    return run


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


class _Payload:
    """Unpickling this creates a file: what a crafted checkpoint would do to a careless loader."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _malicious(path: Path, marker: Path) -> None:
    torch.save({"config": {}, "model": _Payload(marker), "progress": {}}, path)


def _damage(path: Path, how: str, marker: Path, donor: Path) -> None:
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "random":
        path.write_bytes(os.urandom(4096))
    elif how == "pickle":
        _malicious(path, marker)
    elif how == "plain-pickle":
        path.write_bytes(pickle.dumps(_Payload(marker)))
    elif how == "foreign":  # another model's weights
        state = torch.load(path, weights_only=True)
        state["model"] = torch.load(donor, weights_only=True)["model"]
        torch.save(state, path)
    elif how == "not-a-dict":
        torch.save([1, 2, 3], path)


DAMAGE = [("empty", "is not a readable"), ("truncated", "is not a readable"), ("random", "is not a readable"),
          ("pickle", "refused to load"), ("plain-pickle", "is not a readable"), ("not-a-dict", "holds a list")]


@pytest.fixture(scope="module")
def donor_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("donor") / "run"
    assert main(["train", *FAST, "--model", "digits_cnn", "--out", str(run)]) == 0
    return run


@pytest.mark.parametrize("how, fragment", DAMAGE + [("foreign", "does not fit the model")])
def test_resume_from_bad_checkpoint(how, fragment, finished_run, donor_run, tmp_path, capsys):
    run = _copy_run(finished_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    _damage(run / "checkpoint.pt", how, marker, donor_run / "checkpoint.pt")
    before = sorted(p.name for p in run.iterdir())
    code, err = run_cli(["train", "--resume", str(run)], capsys)
    assert_one_line(code, err, fragment)
    assert str(run / "checkpoint.pt") in err
    assert not marker.exists()
    assert sorted(p.name for p in run.iterdir()) == before


@pytest.mark.parametrize("how, fragment", DAMAGE)
def test_init_from_bad_file(how, fragment, finished_run, donor_run, tmp_path, capsys):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes((finished_run / "checkpoint.pt").read_bytes())
    marker = tmp_path / "pwned"
    _damage(bad, how, marker, donor_run / "checkpoint.pt")
    code, err = run_cli(["train", *FAST, "--init-from", str(bad), "--out", str(tmp_path / "run")], capsys)
    assert_one_line(code, err, fragment)
    assert not marker.exists()


@pytest.mark.parametrize("how, fragment", DAMAGE + [("foreign", "does not fit the model")])
def test_evaluate_bad_model_file(how, fragment, finished_run, donor_run, tmp_path, capsys):
    run = _copy_run(finished_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    _damage(run / "model.pt", how, marker, donor_run / "model.pt")
    code, err = run_cli(["evaluate", str(run)], capsys)
    assert_one_line(code, err, fragment)
    assert not marker.exists()


def test_evaluate_model_with_weights_outside_its_mask(finished_run, tmp_path, capsys):
    run = _copy_run(finished_run, tmp_path / "run")
    artifact = torch.load(run / "model.pt", weights_only=True)
    name = next(iter(artifact["masks"]))
    artifact["model"][name] = torch.ones_like(artifact["model"][name])
    torch.save(artifact, run / "model.pt")
    code, err = run_cli(["evaluate", str(run)], capsys)
    assert_one_line(code, err, f"weights outside the saved mask of {name} are non-zero")


def test_resume_without_run(tmp_path, capsys):
    code, err = run_cli(["train", "--resume", str(tmp_path / "nothing")], capsys)
    assert_one_line(code, err, f"cannot resume from {tmp_path / 'nothing'}: no such directory")
    (tmp_path / "empty").mkdir()
    code, err = run_cli(["train", "--resume", str(tmp_path / "empty")], capsys)
    assert_one_line(code, err, "it holds neither checkpoint.pt nor config.yaml")


def test_resume_with_config_file_is_refused(finished_run, tmp_path, capsys):
    code, err = run_cli(["train", "--resume", str(finished_run), "--config", str(tmp_path / "x.yaml")], capsys)
    assert_one_line(code, err, "--config cannot be combined with it")


# ---------------------------------------------------------------------------- output directories


def test_out_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep me")
    code, err = run_cli(["train", *FAST, "--out", str(target)], capsys)
    assert_one_line(code, err, f"--out {target} is a file, not a directory")
    assert target.read_text() == "keep me"


def test_out_under_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = run_cli(["train", *FAST, "--out", str(tmp_path / "file" / "run")], capsys)
    assert_one_line(code, err, "cannot create run directory")


@pytest.mark.skipif(os.access("/sys", os.W_OK) and not Path("/sys/kernel").exists(), reason="needs a read-only /sys")
def test_out_on_read_only_file_system(capsys):
    code, err = run_cli(["train", *FAST, "--out", "/sys/granet-run"], capsys)
    assert_one_line(code, err, "cannot create run directory /sys/granet-run")


def _limited_run(args, limit_bytes):
    """Run granet with a file-size limit: writes past it fail with EFBIG, as on a full disk."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "granet", *args], env=env, capture_output=True, text=True,
                          preexec_fn=limit, timeout=300)


def test_full_disk_while_checkpointing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()  # a directory the run did not create keeps its record of the failure (test_newcomer_runs.py)
    proc = _limited_run(["train", *FAST, "--model", "digits_cnn", "--out", str(run)], 200_000)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert err[-1] == f"granet: error: cannot write {run / 'checkpoint.pt'}: File too large"
    assert "Traceback" not in proc.stderr
    assert not list(run.glob("*.tmp"))
    status = json.loads((run / "status.json").read_text())  # says how the run ended, not "running"
    assert status == {"state": "failed", "epoch": 0, "checkpoint_epoch": None, "error": "RunDirError",
                      "message": f"cannot write {run / 'checkpoint.pt'}: File too large"}


def test_full_disk_on_resume_keeps_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--model", "digits_cnn", "--epochs", "2", "--max-steps", "25", "--progress", "log",
                 "--keep-checkpoints", "1", "--out", str(run)]) == 0
    before = (run / "checkpoint_epoch1.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(before)  # back to the end of epoch 1
    (run / "summary.json").unlink()
    proc = _limited_run(["train", "--resume", str(run), "--progress", "log"], len(before) // 2)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"granet: error: cannot write {run}")
    assert (run / "checkpoint.pt").read_bytes() == before
    assert not list(run.glob("*.tmp"))


# ---------------------------------------------------------------------------- data files


@pytest.mark.parametrize("content", [b"", b"\x00\x00\x08\x03" + b"\x00" * 7, bytes(range(256)) * 3], ids=["empty", "truncated", "garbage"])
def test_garbage_idx_files(content, tmp_path, capsys):
    root = tmp_path / "data" / "mnist"
    root.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (root / name).write_bytes(content)
    code, err = run_cli(["train", *FAST, "--model", "lenet5", "--dataset", "mnist", "--data-dir",
                         str(tmp_path / "data"), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and "mnist" in err.lower(), err


def test_malicious_cifar_pickle(tmp_path, capsys):
    root = tmp_path / "data" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    marker = tmp_path / "pwned"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (root / name).write_bytes(pickle.dumps(_Payload(marker)))
    code, err = run_cli(["train", *FAST, "--model", "resnet20", "--dataset", "cifar10", "--data-dir",
                         str(tmp_path / "data"), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert not marker.exists()


# ---------------------------------------------------------------------------- resource bombs and crafted state

# 432 bytes that describe 9^9 (387 million) strings through nested aliases.
YAML_BOMB = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    + ["density: *i"]) + "\n"


def _peak_python_memory(call):
    import tracemalloc

    tracemalloc.start()
    try:
        result = call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return result, peak


def test_yaml_alias_bomb_in_a_config_file(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(YAML_BOMB)
    assert len(YAML_BOMB) < 500
    (code, err), peak = _peak_python_memory(lambda: run_cli(["train", "--config", str(path)], capsys))
    assert_one_line(code, err, f"config file {path} expands to 926,177,115 values through its aliases (more than "
                               f"100,000); write the values out instead of nesting aliases")
    assert peak < 20 * 2**20  # the expansion is counted, never built


def test_yaml_alias_bomb_in_a_flag_value(tmp_path, capsys):
    value = "{" + YAML_BOMB.replace("\n", ", ").rstrip(", ").replace("density: *i", "n: *i") + "}"
    code, err = run_cli(["train", *FAST, "--dataset", "synthetic", "--dataset-options", f"opts={value}",
                         "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and err.count("\n") == 1 and "expands to" in err and len(err) < 400, err


def test_self_referencing_yaml(tmp_path, capsys):
    path = tmp_path / "loop.yaml"
    path.write_text("keep_dense: &a [*a]\n")
    code, err = run_cli(["train", "--config", str(path)], capsys)
    assert_one_line(code, err, f"config file {path} refers to itself through an alias: it has no finite value")


def test_yaml_alias_bomb_in_a_run_directory_given_to_report(finished_run, tmp_path, capsys):
    run = _copy_run(finished_run, tmp_path / "run")
    (run / "config.yaml").write_text(YAML_BOMB)
    (code, err), peak = _peak_python_memory(lambda: run_cli(["report", str(run), "--out", str(tmp_path / "r")], capsys))
    assert code == 2 and err.count("\n") == 1 and f"{run / 'config.yaml'} expands to 926,177,115 values" in err, err
    assert peak < 20 * 2**20


def test_large_value_in_an_error_message_is_cut(tmp_path, capsys):
    path = tmp_path / "big.yaml"
    path.write_text("epochs: [" + ", ".join(["1"] * 50_000) + "]\n")
    code, err = run_cli(["train", "--config", str(path)], capsys)
    assert_one_line(code, err, "epochs must be an integer, got <list of 50000 items>")


def test_evaluate_model_asking_for_huge_synthetic_data(finished_run, tmp_path, capsys):
    run = _copy_run(finished_run, tmp_path / "run")
    artifact = torch.load(run / "model.pt", weights_only=True)
    artifact["config"].update(dataset="synthetic", dataset_options={"num_test": 10**9, "image_size": 8,
                                                                    "in_channels": 1})
    torch.save(artifact, run / "model.pt")
    (code, err), peak = _peak_python_memory(lambda: run_cli(["evaluate", str(run)], capsys))
    assert_one_line(code, err, "synthetic dataset option num_test=1,000,000,000 with 1x8x8 images is "
                               "64,000,000,000 pixel values; a split is limited to 268,435,456 (2^28)")


def _craft(path: Path, edit) -> None:
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


CRAFTED = [
    ("rng state of 3 bytes", lambda s: s["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)),
     "the saved RNG state is torch.uint8 (3,), not a torch RNG state"),
    ("progress epoch 'x'", lambda s: s["progress"].update(epoch="x"), "progress.epoch must be an int >= 0, got 'x'"),
    ("progress step -1", lambda s: s["progress"].update(step=-1), "progress.step must be an int >= 0, got -1"),
    ("best epoch after the run", lambda s: s["progress"].update(best_epoch=99),
     "progress.best_epoch must be an epoch of the run or None, got 99"),
    ("ever_active of a wrong size",
     lambda s: s["sparsifier"]["ever_active"].update({k: torch.zeros(3, dtype=torch.uint8)
                                                      for k in s["sparsifier"]["ever_active"]}),
     "ever_active of layers.0.weight is torch.uint8 (3,), expected uint8 (2400,) (8 weights per byte)"),
    ("ever_active not a mapping", lambda s: s["sparsifier"].update(ever_active=[1, 2]),
     "sparsifier state has an invalid ever_active entry"),
    ("init_counts too large", lambda s: s["sparsifier"].update(init_counts=[10**9] * len(s["sparsifier"]["init_counts"])),
     "sparsifier state has an invalid init_counts [1000000000, 1000000000, 1000000000] (expected 3 counts, each "
     "between 0 and its layer's size)"),
    ("init_counts of another model", lambda s: s["sparsifier"].update(init_counts=[1]),
     "sparsifier state has an invalid init_counts [1]"),
    ("last_update with unknown fields", lambda s: s["sparsifier"].update(last_update={"step": 1, "colour": "red"}),
     "sparsifier state has an invalid last_update {'step': 1, 'colour': 'red'}"),
    ("skipped_updates 'many'", lambda s: s["sparsifier"].update(skipped_updates="many"),
     "sparsifier state has an invalid skipped_updates 'many' (expected an int >= 0)"),
]


@pytest.mark.parametrize("edit, fragment", [c[1:] for c in CRAFTED], ids=[c[0] for c in CRAFTED])
def test_resume_from_crafted_plain_data_checkpoint(edit, fragment, finished_run, tmp_path, capsys):
    run = _copy_run(finished_run, tmp_path / "run")
    _craft(run / "checkpoint.pt", edit)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, err = run_cli(["train", "--resume", str(run)], capsys)
    assert_one_line(code, err, fragment)
    assert str(run / "checkpoint.pt") in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


# ---------------------------------------------------------------------------- the plasticity study's input


def test_plasticity_config_with_a_python_tag(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    marker = tmp_path / "pwned"
    path.write_text(f"out: !!python/object/apply:os.system ['touch {marker}']\n")
    code, err = run_cli(["plasticity", "--config", str(path)], capsys)
    assert_one_line(code, err, f"config file {path} is not valid YAML: could not determine a constructor for the "
                               f"tag 'tag:yaml.org,2002:python/object/apply:os.system'")
    assert not marker.exists()


def test_plasticity_out_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("keep me")
    code, err = run_cli(["plasticity", "--epochs", "2", "--prune-epochs", "1", "--out", str(tmp_path / "file")], capsys)
    assert_one_line(code, err, f"out {tmp_path / 'file'} is a file, not a directory: give a study directory")
    assert (tmp_path / "file").read_text() == "keep me"


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_plasticity_workers_must_be_positive(workers, tmp_path, capsys):
    code, err = run_cli(["plasticity", "--epochs", "2", "--prune-epochs", "1", "--workers", workers,
                         "--out", str(tmp_path / "study")], capsys)
    assert_one_line(code, err, f"workers must be a positive integer (parallel trial processes), got {workers}")
    assert not (tmp_path / "study").exists()
