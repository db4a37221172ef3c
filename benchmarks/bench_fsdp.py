"""Topology update under FSDP2 (sharded masks) versus DDP (replicated masks), in one run.

Spawns ``--world`` gloo processes on this machine (CPU) and builds, on every rank, the same
GPT-2-small-shaped model twice: once wrapped with DistributedDataParallel, once sharded with FSDP2
``fully_shard`` (one unit per transformer block). 12 blocks x 768 wide (qkv 768x2304, projection
768x768, MLP 768x3072 and 3072x768): 85M sparsified weights (the token embedding, here with a
1,024-token vocabulary, stays dense as in any granet run). Each gets a RigL sparsifier (density
0.1, drop fraction 0.3, an update at every step). Repetitions alternate DDP and FSDP; each does
one training step (forward, backward, SGD step; not timed into the update) and then times
``sparsifier.step()``, which performs the topology update, and counts the bytes this rank sends
into ``torch.distributed`` collectives during it (every all-reduce / all-gather / broadcast is
wrapped for the measurement). Reported: the slowest rank's median update time, the bytes per
update, and the memory the masks and weights take on one rank::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_fsdp.py              # 2 ranks, 5 repetitions
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_fsdp.py --layers 4  # smaller, faster
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

import granet

VOCAB, WIDTH, SEQ = 1024, 768, 64


class Block(nn.Module):
    """A GPT-2 block: causal self-attention and a 4x MLP, pre-norm."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.heads = width // 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention then MLP, each with a residual connection."""
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.out(nn.functional.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Token + position embeddings, ``layers`` blocks, a final norm and an untied head."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, WIDTH), nn.Embedding(SEQ, WIDTH)
        self.blocks = nn.ModuleList(Block(WIDTH) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits for every position of the token batch ``idx``."""
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


class Bytes:
    """Counts the bytes this rank passes to collectives while :attr:`on` is set."""

    def __init__(self) -> None:
        self.on, self.count = False, 0
        for name in ("all_reduce", "all_gather", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor"):
            setattr(dist, name, self._wrap(getattr(dist, name)))

    def _wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            """The collective, after adding its payload to the count."""
            if self.on:
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                lists = [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
                # the sent payload: the input tensor (all_gather's list is the output)
                sent = tensors[-1] if tensors else lists[0]
                self.count += sent.numel() * sent.element_size()
            return fn(*args, **kwargs)

        return counted


def build(kind: str, layers: int) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, granet.Sparsifier]:
    """The seeded model, its DDP or FSDP2 wrapper, SGD and a RigL sparsifier updating at every step."""
    torch.manual_seed(0)
    model = GPT(layers)
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        wrapped = fully_shard(model)
    else:
        wrapped = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    s = granet.create_sparsifier("rigl", model, opt, density=0.1, total_steps=10_000, update_interval=1,
                                 drop_fraction=0.3, regrow_end=1.0)
    return model, wrapped, opt, s


def _worker(rank: int, world: int, init: str, out: str, layers: int, repeats: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=1800))
    counter = Bytes()
    runs = {kind: build(kind, layers) for kind in ("ddp", "fsdp")}
    times: dict[str, list[float]] = {k: [] for k in runs}
    steps: dict[str, list[float]] = {k: [] for k in runs}
    sent: dict[str, list[int]] = {k: [] for k in runs}
    g = torch.Generator().manual_seed(1)
    for _ in range(repeats):
        idx = torch.randint(VOCAB, (2, SEQ), generator=g)  # the same batch on every rank and variant
        for kind, (model, wrapped, opt, s) in runs.items():
            dist.barrier()
            start = time.perf_counter()
            logits = wrapped(idx[:, :-1])
            nn.functional.cross_entropy(logits.reshape(-1, VOCAB), idx[:, 1:].reshape(-1)).backward()
            opt.step()
            steps[kind].append(time.perf_counter() - start)
            dist.barrier()
            counter.on, counter.count = True, 0
            start = time.perf_counter()
            report = s.step()
            times[kind].append(time.perf_counter() - start)
            counter.on = False
            sent[kind].append(counter.count)
            assert report is not None and report.regrown > 0
            opt.zero_grad(set_to_none=True)
    local_bytes = {kind: (sum(m.numel() for m in s.masks.values()),
                          sum((p.to_local() if hasattr(p, "to_local") else p).numel() * 4 for p in s.params))
                   for kind, (_, _, _, s) in runs.items()}
    result = {"times": times, "steps": steps, "sent": sent, "local": local_bytes,
              "sparsified": runs["ddp"][3].total, "density": {k: r[3].density() for k, r in runs.items()}}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    """Spawn the ranks, collect their measurements and print the summary as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(r, args.world, f"file://{tmp}/rdv", tmp, args.layers, args.repeats))
                 for r in range(args.world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            sys.exit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(args.world)]
    out: dict[str, Any] = {"world": args.world, "layers": args.layers, "repeats": args.repeats,
                           "sparsified_weights": ranks[0]["sparsified"]}
    for kind in ("ddp", "fsdp"):
        # a collective ends when the slowest rank arrives: the slowest rank's median
        out[f"{kind}_update_s"] = max(statistics.median(r["times"][kind]) for r in ranks)
        out[f"{kind}_train_step_s"] = max(statistics.median(r["steps"][kind]) for r in ranks)
        out[f"{kind}_bytes_per_update"] = max(statistics.median(r["sent"][kind]) for r in ranks)
        out[f"{kind}_mask_bytes_rank0"], out[f"{kind}_weight_bytes_rank0"] = ranks[0]["local"][kind]
        out[f"{kind}_density"] = ranks[0]["density"][kind]
    out["update_time_fsdp_over_ddp"] = out["fsdp_update_s"] / out["ddp_update_s"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
