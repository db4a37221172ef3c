"""Lightning callback: real Trainer on a small CNN, CPU."""
from __future__ import annotations

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning.pytorch")

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


def loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)


def fit(tmp_path, max_steps: int, ckpt_path=None, accumulate: int = 1, save: bool = False):
    module = SmallCNN()
    callback = SparsityCallback("rigl", density=0.3, update_interval=2)
    callbacks = [callback]
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
    resumed, cb2, _ = fit(tmp_path / "b", STEPS, ckpt_path=str(tmp_path / "a" / "epoch=0-step=4.ckpt"))
    assert cb2.sparsifier.step_count == STEPS
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
