"""Hugging Face Trainer callback: real Trainer, tiny GPT-2 from config, CPU, no downloads."""
from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from granet.errors import CheckpointError  # noqa: E402
from granet.integrations.hf import STATE_FILE, SparsityCallback  # noqa: E402

STEPS, SAVE_AT, E = 8, 4, 16


class TokenData(torch.utils.data.Dataset):
    """Fixed random token sequences (language modelling: labels are the inputs)."""

    def __init__(self) -> None:
        self.ids = torch.randint(0, 50, (32, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=8, n_embd=E, n_layer=1, n_head=2, bos_token_id=0,
                                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def run(output_dir: str, resume: bool = False, accumulation: int = 1, method: str = "granet-st",
        **callback_args) -> tuple[torch.nn.Module, SparsityCallback, object]:
    """Train ``STEPS`` steps (checkpoints every ``SAVE_AT``), or resume from ``checkpoint-SAVE_AT``."""
    model = make_model()
    args = transformers.TrainingArguments(
        output_dir=output_dir, max_steps=STEPS, save_steps=SAVE_AT, per_device_train_batch_size=2,
        gradient_accumulation_steps=accumulation, learning_rate=1e-2, use_cpu=True, report_to="none",
        logging_steps=1, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    callback = SparsityCallback(method, density=0.3, update_interval=2, **callback_args)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=[callback])
    trainer.train(resume_from_checkpoint=os.path.join(output_dir, f"checkpoint-{SAVE_AT}") if resume else None)
    return model, callback, trainer


@pytest.mark.slow
def test_resumed_training_is_bit_identical(tmp_path):
    full_model, full_cb, trainer = run(str(tmp_path / "full"))
    s = full_cb.sparsifier
    assert s.step_count == STEPS
    assert type(s.optimizer) is torch.optim.AdamW  # hooked on the optimizer inside accelerate's wrapper
    masked = 12 * E * E
    assert s.total == masked and sum(s.counts) == round(0.3 * masked)
    saved = torch.load(tmp_path / "full" / f"checkpoint-{SAVE_AT}" / STATE_FILE, weights_only=True)
    assert (saved["step"], saved["trainer_skipped_steps"]) == (SAVE_AT, 0)
    logged = [h for h in trainer.state.log_history if "sparsity/density" in h and "loss" in h]
    assert [h["step"] for h in logged] == list(range(1, STEPS + 1))
    assert logged[-1]["sparsity/density"] == sum(s.counts) / s.total
    assert [h["step"] for h in logged if "sparsity/regrown" in h] == [2, 4, 6]

    # The interrupted run: train to the checkpoint, then resume from it in a fresh Trainer.
    resumed_dir = tmp_path / "resumed"
    os.makedirs(resumed_dir)
    os.rename(tmp_path / "full" / f"checkpoint-{SAVE_AT}", resumed_dir / f"checkpoint-{SAVE_AT}")
    model, cb, _ = run(str(resumed_dir), resume=True)
    assert cb.sparsifier.step_count == STEPS
    for (name, a), b in zip(full_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(s.masks.values(), cb.sparsifier.masks.values()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_accumulation_counts_real_optimizer_steps_and_missing_state_refused(tmp_path):
    _, cb, _ = run(str(tmp_path / "acc"), accumulation=2)
    assert cb.sparsifier.step_count == STEPS  # 16 micro-batches, 8 optimizer steps
    os.remove(tmp_path / "acc" / f"checkpoint-{SAVE_AT}" / STATE_FILE)
    folder = tmp_path / "acc" / f"checkpoint-{SAVE_AT}"
    assert resume_error(tmp_path / "acc", accumulation=2) == (
        f"no granet sparsifier state in {folder} (no {STATE_FILE}), but the trainer resumes at step {SAVE_AT}: a "
        f"fresh 'granet-st' sparsifier would draw new masks over the trained weights and run {SAVE_AT} steps "
        f"behind; {REMEDY}"
    )


REMEDY = f"pass resume_from=<the checkpoint folder holding {STATE_FILE}>, or train without resuming"


def resume_error(output_dir, **run_args) -> str:
    """The one-line message with which resuming from ``output_dir/checkpoint-SAVE_AT`` is refused."""
    with pytest.raises(CheckpointError) as info:
        run(str(output_dir), resume=True, **run_args)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_unreadable_state_file_is_refused_naming_it(tmp_path, damage):
    run(str(tmp_path))
    path = tmp_path / f"checkpoint-{SAVE_AT}" / STATE_FILE
    data = path.read_bytes()
    path.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    assert resume_error(tmp_path) == (
        f"{path} is not a readable sparsifier state (not a torch save file: truncated, corrupt or foreign)"
    )


def test_state_of_another_method_or_step_is_refused(tmp_path):
    run(str(tmp_path))
    path = tmp_path / f"checkpoint-{SAVE_AT}" / STATE_FILE
    assert resume_error(tmp_path, method="granet") == (
        f"the sparsifier state in {path} was made by method 'granet-st', this callback runs 'granet': "
        f"resume with SparsityCallback('granet-st', ...) and the options of the run that saved it"
    )
    later = tmp_path / f"checkpoint-{STEPS}"  # the step-4 checkpoint resumed with the step-8 sparsifier state
    assert resume_error(tmp_path, resume_from=str(later)) == (
        f"the sparsifier state in {later / STATE_FILE} is at step {STEPS}, but the trainer resumes at step "
        f"{SAVE_AT}: it was saved with another checkpoint; {REMEDY}"
    )


def test_amp_skipped_step_through_accelerate_wrapper_does_not_count():
    """The Trainer's optimizer is accelerate's wrapper; a step its GradScaler skips is not counted."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    import granet
    from granet.integrations._common import unwrap_optimizer

    Accelerator(cpu=True)  # initialises the state AcceleratedOptimizer reads
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    wrapped = AcceleratedOptimizer(inner, device_placement=False, scaler=scaler)
    assert unwrap_optimizer(wrapped) is inner
    s = granet.create_sparsifier("static", model, unwrap_optimizer(wrapped), density=0.5)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    scaler.scale(model(x).sum()).backward()
    wrapped.step()
    s.step()
    wrapped.zero_grad()
    assert (wrapped.step_was_skipped, s.step_count) == (False, 1)
    scaler.scale(model(x).sum()).backward()
    model[0].weight.grad[0, 0] = float("inf")
    wrapped.step()
    s.step()
    assert (wrapped.step_was_skipped, s.step_count) == (True, 1)
