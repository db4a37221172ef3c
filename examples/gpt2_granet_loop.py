"""GraNet on a GPT-2-shaped model built from a ``transformers`` config, in a plain training loop.

Runs in seconds on a CPU (random tokens, no download)::

    python examples/gpt2_granet_loop.py

The coverage report shows what is sparsified: the attention and MLP ``Conv1D`` weights; the token
embedding (tied to ``lm_head``) and the position embedding stay dense by default.
"""
from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import granet

STEPS = 20


def main() -> None:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sparsifier = granet.create_sparsifier(
        "granet", model, optimizer, density=0.2, total_steps=STEPS, update_interval=4
    )
    print(sparsifier.coverage())
    data = torch.randint(0, config.vocab_size, (STEPS, 4, 32), generator=torch.Generator().manual_seed(0))
    for step, ids in enumerate(data, 1):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        report = sparsifier.step()  # after optimizer.step(), before zero_grad (regrowth reads gradients)
        optimizer.zero_grad()
        if report is not None:
            print(f"step {step}: loss {loss.item():.3f} density {report.density:.4f} "
                  f"pruned {report.pruned} regrown {report.regrown}")
    print(f"final density {sparsifier.density():.4f} (target 0.2), "
          f"active {sum(sparsifier.counts)} of {sparsifier.total} masked weights")


if __name__ == "__main__":
    main()
