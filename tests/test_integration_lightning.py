"""Lightning callback: real Trainer on a small CNN, CPU."""
from __future__ import annotations

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning.pytorch")

from granet.errors import CheckpointError  # noqa: E402
from granet.integrations.lightning import SparsityCallback  # noqa: E402

STEPS = 8  # two epochs of 4 batches: the step-4 checkpoint ends an epoch (Lightning resumes at epoch ends)


class SmallCNN(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class SkippingCNN(SmallCNN):
    """Skips the optimizer step at global step 1, as the AMP gradient scaler does after an overflow:
    the trainer counts the step, the sparsifier (hooked on ``optimizer.step``) does not."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        if self.trainer.global_step == 1:
            optimizer_closure()  # forward and backward run, the step does not
            return
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)


class ValCNN(SmallCNN):
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.training_step(batch, batch_idx))


def loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)


def fit(tmp_path, max_steps: int, ckpt_path=None, accumulate: int = 1, save: bool = False, method="rigl",
        module_type=SmallCNN, **callback_options):
    """Fit with ``SparsityCallback(method)`` (none when ``method`` is None); ``save``: checkpoints every 4 steps."""
    module = module_type()
    callback = None if method is None else SparsityCallback(method, density=0.3, update_interval=2, **callback_options)
    callbacks = [callback] if callback else []
    if save:
        callbacks.append(L.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1))
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=L.loggers.CSVLogger(tmp_path),
                        enable_checkpointing=save, enable_progress_bar=False, enable_model_summary=False,
                        accumulate_grad_batches=accumulate, log_every_n_steps=1, callbacks=callbacks)
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return module, callback, trainer


@pytest.mark.slow
def test_resumed_fit_is_bit_identical_and_logs(tmp_path):
    full, cb, trainer = fit(tmp_path / "a", STEPS, save=True)
    s = cb.sparsifier
    assert s.step_count == STEPS
    assert s.total == 8 * 9 + 8 * 8 * 9 + 4 * 8 and sum(s.counts) == round(0.3 * s.total)
    assert trainer.callback_metrics["sparsity/density"].item() == torch.tensor(s.density()).item()  # float32
    assert trainer.callback_metrics["sparsity/regrown"].item() == s.last_update.regrown
    resumed, cb2, trainer2 = fit(tmp_path / "b", STEPS, ckpt_path=str(tmp_path / "a" / "epoch=0-step=4.ckpt"))
    assert cb2.sparsifier.step_count == trainer2.global_step == STEPS
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(s.masks.values(), cb2.sparsifier.masks.values()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_accumulation_counts_optimizer_steps(tmp_path):
    _, cb, trainer = fit(tmp_path, 4, accumulate=2)
    assert trainer.global_step == 4
    assert cb.sparsifier.step_count == 4  # 8 batches, 4 optimizer steps
    assert cb.sparsifier.last_update.step == 2  # rigl regrows at multiples of 2 before 0.75 * 4 steps


def resume_error(tmp_path, ckpt, method: str = "rigl") -> str:
    """The one-line message with which resuming ``ckpt`` under ``SparsityCallback(method)`` is refused."""
    with pytest.raises(CheckpointError) as info:
        fit(tmp_path / "resumed", STEPS, ckpt_path=str(ckpt), method=method)
    message = str(info.value)
    assert "\n" not in message
    return message


SKIPPED = "trainer_skipped_steps"  # saved with the state: optimizer steps the trainer counted, the sparsifier not
REMEDY = "resume with the SparsityCallback that saved the checkpoint, or fit without ckpt_path to start over"


def test_resume_from_checkpoint_without_sparsifier_state_is_refused(tmp_path):
    fit(tmp_path, STEPS, save=True, method=None)  # a dense fit: its checkpoint has no sparsifier state
    ckpt = tmp_path / "epoch=0-step=4.ckpt"
    assert resume_error(tmp_path, ckpt) == (
        f"no granet sparsifier state in checkpoint {ckpt}, but the trainer resumes at step 4: a fresh 'rigl' "
        f"sparsifier would draw new masks over the trained weights and run 4 steps behind; {REMEDY}"
    )


def test_resume_from_checkpoint_of_another_method_is_refused(tmp_path):
    fit(tmp_path, STEPS, save=True, method="set")
    ckpt = tmp_path / "epoch=0-step=4.ckpt"
    keys = torch.load(ckpt, weights_only=True)["callbacks"]
    assert [k for k in keys if k.startswith("granet")] == ["granet.SparsityCallback[set]"]
    assert resume_error(tmp_path, ckpt, "rigl") == (
        f"the sparsifier state in checkpoint {ckpt} was made by method 'set', this callback runs 'rigl': "
        f"resume with SparsityCallback('set', ...) and the options of the run that saved it"
    )


@pytest.mark.parametrize("step", [0, 8])
def test_resume_from_state_saved_at_another_step_is_refused(tmp_path, step):
    """A step-4 checkpoint whose sparsifier state says step 0 (never stepped) or 8 (a later checkpoint's)."""
    fit(tmp_path, STEPS, save=True)
    checkpoint = torch.load(tmp_path / "epoch=0-step=4.ckpt", weights_only=True)
    checkpoint["callbacks"]["granet.SparsityCallback[rigl]"]["step"] = step
    ckpt = tmp_path / "edited.ckpt"
    torch.save(checkpoint, ckpt)
    assert resume_error(tmp_path, ckpt) == (
        f"the sparsifier state in checkpoint {ckpt} is at step {step}, but the trainer resumes at step 4: "
        f"it was saved with another checkpoint; {REMEDY}"
    )


@pytest.mark.parametrize("accumulate", [1, 2])
def test_resume_after_a_skipped_optimizer_step_is_exact(tmp_path, accumulate):
    """The trainer counts a skipped step, the sparsifier does not; the saved difference makes resume exact.

    With ``accumulate_grad_batches`` both count optimizer steps (the step-4 checkpoint ends epoch 1 or 2).
    """
    full, cb, trainer = fit(tmp_path / "a", STEPS, save=True, module_type=SkippingCNN, accumulate=accumulate)
    ckpt = tmp_path / "a" / f"epoch={accumulate - 1}-step=4.ckpt"
    assert (trainer.global_step, cb.sparsifier.step_count) == (STEPS, STEPS - 1)
    state = torch.load(ckpt, weights_only=True)["callbacks"][cb.state_key]
    assert (state["step"], state[SKIPPED]) == (3, 1)
    resumed, cb2, trainer2 = fit(tmp_path / "b", STEPS, ckpt_path=str(ckpt), module_type=SkippingCNN,
                                 accumulate=accumulate)
    assert (trainer2.global_step, cb2.sparsifier.step_count) == (STEPS, STEPS - 1)
    assert cb2.state_dict()[SKIPPED] == 1
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(cb.sparsifier.masks.values(), cb2.sparsifier.masks.values()):
        assert torch.equal(a, b)


def test_validating_a_checkpoint_is_not_checked(tmp_path):
    """The check is for resuming a fit: validating a dense checkpoint with the callback attached is fine."""
    fit(tmp_path, STEPS, save=True, method=None)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[SparsityCallback("rigl", density=0.3)])
    (metrics,) = trainer.validate(ValCNN(), loader(), ckpt_path=str(tmp_path / "epoch=0-step=4.ckpt"))
    assert set(metrics) == {"val_loss"}


def test_resuming_with_more_steps_needs_strict_false_and_then_continues_the_masks(tmp_path, caplog):
    """A fit resumed with a larger max_steps has another total_steps: refused by default (naming the
    field and the option), resumed with strict=False from exactly the checkpoint's masks and step."""
    fit(tmp_path / "a", STEPS, save=True)
    ckpt = tmp_path / "a" / "epoch=1-step=8.ckpt"
    saved = torch.load(ckpt, weights_only=True)["callbacks"]["granet.SparsityCallback[rigl]"]
    with pytest.raises(CheckpointError) as info:
        fit(tmp_path / "b", 2 * STEPS, ckpt_path=str(ckpt))
    message = str(info.value)
    assert "\n" not in message and "total_steps" in message
    assert message.endswith("pass strict=False to the callback to resume with the new options")
    captured = {}

    class Spy(SparsityCallback):
        def on_train_start(self, trainer, pl_module):
            super().on_train_start(trainer, pl_module)
            captured["masks"] = {n: m.clone() for n, m in self.sparsifier.masks.items()}
            captured["step"] = self.sparsifier.step_count

    module = SmallCNN()
    spy = Spy("rigl", density=0.3, update_interval=2, strict=False)
    trainer = L.Trainer(max_steps=2 * STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[spy])
    with caplog.at_level("WARNING", logger="granet"):
        trainer.fit(module, loader(), ckpt_path=str(ckpt))
    assert captured["step"] == STEPS
    assert captured["masks"].keys() == saved["masks"].keys()
    assert all(torch.equal(captured["masks"][n], saved["masks"][n]) for n in saved["masks"])
    assert spy.sparsifier.step_count == trainer.global_step == 2 * STEPS
    assert spy.sparsifier.config.total_steps == 2 * STEPS
    assert sum(spy.sparsifier.counts) == round(0.3 * spy.sparsifier.total)
    assert any("different config" in r.getMessage() and "total_steps" in r.getMessage() for r in caplog.records)
