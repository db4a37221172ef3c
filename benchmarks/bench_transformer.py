"""Sparsifier overhead on a GPT-2-shaped model built from a ``transformers`` config.

Measures, in one run on one machine (so the result does not depend on how busy the machine is):

* step overhead: median GraNet training-step time / median dense step time. The two models are
  timed in alternating blocks of steps (interleaved), so drifts in machine load hit both alike; the
  GraNet step includes ``sparsifier.step()`` (mask application every step and a topology update every
  ``update_interval`` steps, amortised in the block medians of block means); and 1 + the mean time
  spent in ``sparsifier.step()`` per step / the dense step (the added work timed directly, free of
  the noise of a difference of two step times);
* achieved density: after the run passes tf, the density of the sparsified weights equals the
  target exactly (``sum(counts) == round(density * total)``) and so does the number of non-zero
  weights actually in the tensors.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_transformer.py            # a few minutes on 2 cores
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_transformer.py --quick    # smoke test
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import granet
from granet.kernels import native


def build(seed: int = 0) -> GPT2LMHeadModel:
    """GPT-2-shaped: 4 blocks of width 256, 4 heads, 1024-token vocabulary, 128 positions."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=1024, n_positions=128, n_embd=256, n_layer=4, n_head=4,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def step(model: GPT2LMHeadModel, opt: torch.optim.Optimizer, ids: torch.Tensor, sparsifier=None) -> float:
    """One training step (forward, backward, optimizer step, sparsifier step); returns the seconds
    spent in ``sparsifier.step()``."""
    model(ids, labels=ids).loss.backward()
    opt.step()
    spent = 0.0
    if sparsifier is not None:
        start = time.perf_counter()
        sparsifier.step()
        spent = time.perf_counter() - start
    opt.zero_grad(set_to_none=False)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (smoke test)")
    args = parser.parse_args()
    blocks, per_block, interval = (4, 5, 5) if args.quick else (12, 10, 10)
    total = blocks * per_block  # timed steps; the 2 warm-up steps are optimizer steps too
    ids = torch.randint(0, 1024, (8, 128), generator=torch.Generator().manual_seed(0))
    native.library()  # loading the selection kernels (once) is not a step cost
    runs = {}
    for name in ("dense", "granet"):
        model = build()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sparsifier = None
        if name == "granet":
            sparsifier = granet.create_sparsifier(
                "granet", model, opt, density=0.1, total_steps=total + 2, update_interval=interval
            )
        for _ in range(2):  # warm-up: allocator, thread pool, optimizer state
            step(model, opt, ids, sparsifier)
        runs[name] = (model, opt, sparsifier, [])
    in_sparsifier = 0.0
    for _ in range(blocks):
        for name, (model, opt, sparsifier, times) in runs.items():
            start = time.perf_counter()
            for _ in range(per_block):
                in_sparsifier += step(model, opt, ids, sparsifier)
            times.append((time.perf_counter() - start) / per_block)
    dense, sparse = statistics.median(runs["dense"][3]), statistics.median(runs["granet"][3])
    added = in_sparsifier / total  # mean: the update steps are part of the cost
    s = runs["granet"][2]
    # Masked-out positions must hold exact zeros; an active weight may be zero too (regrown at zero
    # and not moved yet, or a zero gradient), so "non-zero" is at most "active".
    outside = sum(int(torch.count_nonzero(p[~m])) for p, m in zip(s.params, s.masks.values()))
    nonzero = sum(int(torch.count_nonzero(p)) for p in s.params)
    result = {
        "model": "GPT-2-shaped, 4x256, vocab 1024, seq 128, batch 8, AdamW",
        "masked_tensors": len(s.names),
        "masked_weights": s.total,
        "steps_per_run": s.step_count,
        "update_interval": interval,
        "dense_step_s_median": round(dense, 4),
        "granet_step_s_median": round(sparse, 4),
        "step_overhead_ratio": round(sparse / dense, 4),
        "sparsifier_step_s_mean": round(added, 5),
        "step_overhead_from_sparsifier_time": round(1 + added / dense, 4),
        "target_density": 0.1,
        "achieved_density": s.density(),
        "active_equals_target": sum(s.counts) == round(0.1 * s.total),
        "active_weights": sum(s.counts),
        "nonzero_weights": nonzero,
        "nonzero_outside_masks": outside,
        "torch_threads": torch.get_num_threads(),
        "native_kernels": native.library() is not None,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
