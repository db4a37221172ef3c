"""GraNet on a tiny BERT classifier trained by the Hugging Face ``Trainer``.

Runs in seconds on a CPU (model from config, random tokens, no download)::

    python examples/hf_trainer_bert.py [output_dir]

The sparsifier state is saved as ``granet_sparsifier.pt`` inside every ``checkpoint-N`` folder and
restored by ``trainer.train(resume_from_checkpoint=...)``.
"""
from __future__ import annotations

import sys
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from granet.integrations.hf import SparsityCallback


class Tokens(torch.utils.data.Dataset):
    """Random token sequences; the label is whether token 1 occurs (learnable)."""

    def __init__(self, n: int = 128) -> None:
        self.ids = torch.randint(0, 32, (n, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": (self.ids[i] == 1).any().long()}


def main(output_dir: str) -> None:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=2)
    args = TrainingArguments(output_dir=output_dir, max_steps=12, save_steps=6, per_device_train_batch_size=8,
                             learning_rate=2e-3, use_cpu=True, report_to="none", logging_steps=4, disable_tqdm=True)
    callback = SparsityCallback("granet", density=0.25, update_interval=2)
    trainer = Trainer(model=BertForSequenceClassification(config), args=args, train_dataset=Tokens(),
                      callbacks=[callback])
    trainer.train()
    s = callback.sparsifier
    print(f"optimizer steps {s.step_count}, density {s.density():.4f} (target 0.25), "
          f"{len(s.names)} masked tensors")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(tmp)
