"""`granet train --execution sparse|auto`: the same masks as the dense path, resume, refusals."""
import shutil

import pytest
import torch
from test_resume import assert_same_run

from granet.cli import main
from granet.errors import ConfigError
from granet.train import TrainConfig

# Big enough layers for auto mode to switch (>= 2^17 entries at density <= 0.05): 1024 -> 256 -> 10.
ARGS = ["--model", "mlp", "--method", "rigl", "--density", "0.05", "--epochs", "3", "--update-interval", "5",
        "--progress", "log", "--threads", "1"]


def _checkpoint(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)


@pytest.mark.parametrize("mode", ["sparse", "auto"])
def test_sparse_execution_trains_the_masks_of_the_dense_path(mode, tmp_path, caplog):
    dense, sparse = tmp_path / "dense", tmp_path / mode
    assert main(["train", *ARGS, "--out", str(dense)]) == 0
    with caplog.at_level("INFO", logger="granet"):
        assert main(["train", *ARGS, "--execution", mode, "--out", str(sparse)]) == 0
    plan = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sparse execution")]
    # LeNet-300-100 on 8x8 digits has no layer of 2^17 entries: auto keeps all three dense
    assert plan == [f"sparse execution ({mode}{', max density 0.05, min size 131072' if mode == 'auto' else ''}): "
                    f"{3 if mode == 'sparse' else 0} of 3 masked weights run sparse, {0 if mode == 'sparse' else 3} dense"]
    a, b = _checkpoint(dense), _checkpoint(sparse)
    assert a["progress"]["step"] == b["progress"]["step"] == 60
    for name, mask in a["sparsifier"]["masks"].items():  # 12 updates, every mask the same
        assert torch.equal(mask, b["sparsifier"]["masks"][name]), name
    for name, weight in a["model"].items():  # float sums in another order: equal to rounding
        torch.testing.assert_close(b["model"][name], weight, rtol=1e-4, atol=1e-5)
    assert b["config"]["execution"] == mode and a["config"]["execution"] == "dense"


def test_a_sparse_execution_run_resumes_bit_identically_and_keeps_its_mode(tmp_path, capsys):
    ref, res = tmp_path / "reference", tmp_path / "resumed"
    args = [*ARGS, "--execution", "sparse", "--keep-checkpoints", "1"]
    assert main(["train", *args, "--out", str(ref)]) == 0
    res.mkdir()
    shutil.copy(ref / "config.yaml", res / "config.yaml")
    shutil.copy(ref / "checkpoint_epoch1.pt", res / "checkpoint.pt")
    assert main(["train", "--resume", str(res), "--progress", "log"]) == 0
    assert_same_run(ref, res)
    capsys.readouterr()
    assert main(["train", "--resume", str(res), "--execution", "dense"]) == 2
    assert "execution: the checkpoint has 'sparse', now 'dense'" in capsys.readouterr().err


@pytest.mark.parametrize("values, message", [
    ({"execution": "fast"}, "execution must be one of dense, sparse, auto, got 'fast'"),
    ({"execution": "sparse", "fsdp": True}, "execution=sparse runs whole layers on one CPU process; it does not "
                                            "combine with fsdp: true (use execution: dense)"),
    ({"execution": "auto", "method": "dense"}, "execution=auto follows a sparsifier's masks; method 'dense' has none "
                                               "(use execution: dense)"),
    ({"execution": "sparse", "method": "lth"}, "execution=sparse follows a sparsifier's masks; method 'lth' rebuilds "
                                               "its masks between trainings (use execution: dense)"),
    ({"execution": "sparse", "device": "cuda"}, "execution=sparse is CPU execution; on cuda use execution: dense "
                                                "(unstructured sparsity gives no speed-up on GPUs)"),
])
def test_bad_execution_settings_are_one_line_errors(values, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(values)
    assert str(info.value) == message


def test_sparse_execution_under_ddp_keeps_the_masks_of_the_dense_path(tmp_path):
    # Two gloo processes: the sparse layers' weight gradients are all-reduced like any dense gradient
    # (zero off the mask), the sparsifier verifies identical masks on both ranks after every update.
    from helpers import torchrun

    common = ["train", *ARGS, "--device", "cpu"]
    runs = {}
    for mode in ("dense", "sparse"):
        runs[mode] = tmp_path / mode
        proc = torchrun(2, [*common, "--execution", mode, "--out", str(runs[mode])])
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    a, b = _checkpoint(runs["dense"]), _checkpoint(runs["sparse"])
    assert a["progress"]["step"] == b["progress"]["step"] and b["config"]["execution"] == "sparse"
    for name, mask in a["sparsifier"]["masks"].items():
        assert torch.equal(mask, b["sparsifier"]["masks"][name]), name
    for name, weight in a["model"].items():
        torch.testing.assert_close(b["model"][name], weight, rtol=1e-4, atol=1e-5)
