"""granet works without the optional frameworks, and each integration names the extra to install."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

# Blocks the optional packages as if they were not installed, then checks granet and its integrations.
SCRIPT = r'''
import importlib, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "lightning", "tensorboard"):
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
import torch, granet
s = granet.create_sparsifier("static", torch.nn.Sequential(torch.nn.Linear(4, 4)), density=0.5)
assert sum(s.counts) == 8
assert not [m for m in sys.modules if m.split(".")[0] in ("transformers", "lightning")]
for module in ("granet.integrations.hf", "granet.integrations.lightning", "granet.train.tensorboard"):
    try:
        importlib.import_module(module)
    except ImportError as exc:
        print(module, "|", exc)
    else:
        print(module, "| imported")
'''


def test_import_without_optional_packages():
    env = dict(os.environ, PYTHONPATH=SRC)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "granet.integrations.hf | granet.integrations.hf needs the 'transformers' package: "
        'pip install -c constraints.txt -e ".[hf]" in the granet checkout (or pip install transformers)',
        "granet.integrations.lightning | granet.integrations.lightning needs the 'lightning.pytorch' package: "
        'pip install -c constraints.txt -e ".[lightning]" in the granet checkout (or pip install lightning)',
        "granet.train.tensorboard | granet.train.tensorboard needs the 'tensorboard' package: "
        'pip install -c constraints.txt -e ".[tensorboard]" in the granet checkout (or pip install tensorboard)',
    ]


# The resume rule both callbacks share runs on plain dictionaries: tested here without either framework.

def static_state(step: int = 0, **extra) -> dict:
    import torch

    import granet

    state = granet.create_sparsifier("static", torch.nn.Sequential(torch.nn.Linear(4, 4)), density=0.5).state_dict()
    return {**state, "step": step, **extra}


def refusal(state, trainer_step: int, method: str = "static") -> str:
    import pytest

    from granet.errors import CheckpointError
    from granet.integrations._common import check_resume_state

    with pytest.raises(CheckpointError) as info:
        check_resume_state(state, trainer_step, method, "ckpt.pt", "do X")
    return str(info.value)


def test_resume_rule_accepts_only_the_state_of_the_checkpoint():
    from granet.integrations._common import SKIPPED_STEPS, check_resume_state

    assert check_resume_state(None, 0, "static", "ckpt.pt", "do X") is None  # nothing trained: start fresh
    assert check_resume_state({}, 0, "static", "ckpt.pt", "do X") is None
    for state, trainer_step in ((static_state(5), 5), (static_state(3, **{SKIPPED_STEPS: 2}), 5)):  # no record: 0
        accepted = check_resume_state(state, trainer_step, "static", "ckpt.pt", "do X")
        assert type(accepted) is dict and accepted.keys() == state.keys()
        assert all(accepted[k] is v for k, v in state.items())
    assert refusal(None, 5) == (
        "no granet sparsifier state in ckpt.pt, but the trainer resumes at step 5: a fresh 'static' sparsifier "
        "would draw new masks over the trained weights and run 5 steps behind; do X"
    )
    assert refusal(static_state(0), 5) == (
        "the sparsifier state in ckpt.pt is at step 0, but the trainer resumes at step 5: "
        "it was saved with another checkpoint; do X"
    )
    assert refusal(static_state(4, **{SKIPPED_STEPS: 2}), 5) == (
        "the sparsifier state in ckpt.pt is at step 4 + 2 skipped by the gradient scaler, but the trainer "
        "resumes at step 5: it was saved with another checkpoint; do X"
    )
    assert refusal(static_state(5), 5, "rigl") == (
        "the sparsifier state in ckpt.pt was made by method 'static', this callback runs 'rigl': "
        "resume with SparsityCallback('static', ...) and the options of the run that saved it"
    )
    assert refusal({"step": 5}, 5) == "ckpt.pt does not hold a granet sparsifier state (no 'masks' entry); do X"
    assert refusal([1, 2], 5) == "ckpt.pt does not hold a granet sparsifier state (a list); do X"
    assert refusal(static_state(True), 1) == "the sparsifier state in ckpt.pt has an invalid step True; do X"
    assert refusal(static_state(5, **{SKIPPED_STEPS: -1}), 4) == (
        "the sparsifier state in ckpt.pt has an invalid trainer_skipped_steps -1; do X"
    )


def test_saved_state_records_the_steps_the_sparsifier_did_not_count():
    import torch

    import granet
    from granet.integrations._common import SKIPPED_STEPS, saved_state

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    s = granet.create_sparsifier("static", model, optimizer, density=0.5)
    for _ in range(3):
        model(torch.ones(1, 4)).sum().backward()
        optimizer.step()
        s.step()
    state = saved_state(s, 5)  # the trainer counted 5 optimizer steps, 2 of them skipped
    assert (state["step"], state[SKIPPED_STEPS]) == (3, 2)
    assert {k: v for k, v in state.items() if k != SKIPPED_STEPS}.keys() == s.state_dict().keys()


def test_state_that_does_not_fit_the_options_is_refused_naming_the_checkpoint():
    import pytest
    import torch

    from granet.errors import CheckpointError
    from granet.integrations._common import build_sparsifier

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(CheckpointError) as info:
        build_sparsifier("static", model, optimizer, {"density": 0.25}, None, static_state(0), "ckpt.pt")
    assert str(info.value) == (
        "the sparsifier state in ckpt.pt does not fit this model and callback: sparsifier state was made with "
        "another config (density=0.5 in the state, 0.25 here); pass strict=False to the callback to resume with the new options"
    )
