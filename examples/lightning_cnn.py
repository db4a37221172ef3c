"""RigL on a small CNN trained by Lightning, through ``granet.integrations.lightning``.

Runs in seconds on a CPU (synthetic images)::

    python examples/lightning_cnn.py
"""
from __future__ import annotations

import lightning.pytorch as L
import torch
from torch import nn

from granet.integrations.lightning import SparsityCallback


class SmallCNN(L.LightningModule):
    """Two conv layers and a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 1, 16, 16)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()  # a learnable synthetic label
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    callback = SparsityCallback("rigl", density=0.2, update_interval=4)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accumulate_grad_batches=2, callbacks=[callback])
    trainer.fit(SmallCNN(), loader)
    s = callback.sparsifier
    print(f"optimizer steps {s.step_count}, density {s.density():.4f} (target 0.2), "
          f"regrown at last update {s.last_update.regrown}")


if __name__ == "__main__":
    main()
