"""Cost of keeping sparsifier masks in sync across ranks, relative to a training step.

Spawns ``--world`` gloo processes on this machine (CPU), wraps a model with ~1M sparsified weights
in DistributedDataParallel and times, on every rank, with a barrier before each repetition:

* one DDP training step (forward, backward with the gradient all-reduce, SGD step);
* ``mask_checksum`` alone (local work only);
* ``verify_masks`` (checksum + one small all-reduce), which the sparsifier runs after every
  topology update;
* ``broadcast_masks`` (layout check + one broadcast of ~1.125 bytes per weight), which runs once at
  construction and after ``load_state_dict``;
* one RigL topology update (``Sparsifier.step()`` at an update step, its ``verify_masks`` included).

Ratios are medians over repetitions, the slowest rank's median taken (a collective ends when the
last rank arrives), so they do not depend on how fast the machine is::

    python benchmarks/bench_distributed.py            # ~1-2 minutes on 2 CPU cores
    python benchmarks/bench_distributed.py --quick    # fewer repetitions
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
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import granet
from granet.models import create_model
from granet.parallel import mask_sync as gd

# (registry name, input channels, input size, per-rank batch): ~1M sparsified weights each. The
# ResNet is a realistic step; the MLP is the worst case (a step that costs almost nothing).
MODELS = (("resnet56", 3, 32, 64), ("mlp", 3, 32, 64))


def _timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs, every rank starting together."""
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _measure(name: str, channels: int, size: int, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = DistributedDataParallel(create_model(name, num_classes=10, in_channels=channels, input_size=size))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sparsifier = granet.create_sparsifier(
        "rigl", model, opt, density=0.1, total_steps=10**6, update_interval=1, regrow_end=1.0
    )
    x = torch.randn(batch, channels, size, size)
    y = torch.randint(0, 10, (batch,))

    def train_step() -> None:
        opt.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(2):  # warm-up (allocator, threads, first collectives)
        train_step()
        sparsifier.step()
    updates = []
    for _ in range(repeats):
        train_step()
        dist.barrier()
        start = time.perf_counter()
        report = sparsifier.step()  # update_interval=1: every step is an update (then verify)
        updates.append(time.perf_counter() - start)
        assert report is not None and not report.skipped
    return {
        "model": name,
        "sparsified_weights": sparsifier.total,
        "batch_per_rank": batch,
        "step_s": _timed(train_step, repeats),
        "checksum_s": _timed(lambda: gd.mask_checksum(sparsifier.names, list(sparsifier.masks.values())), repeats),
        "verify_s": _timed(lambda: sparsifier.verify_masks(), repeats),
        "broadcast_s": _timed(lambda: sparsifier.broadcast_masks(), repeats),
        "update_s": statistics.median(updates),
    }


def _worker(rank: int, world: int, init_method: str, out_dir: str, repeats: int, threads: int) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    results = [_measure(*spec, repeats=repeats) for spec in MODELS]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()  # nobody closes its sockets while another rank still talks to it
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2, help="number of gloo processes (default 2)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (noisier ratios)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    repeats = 5 if args.quick else 15
    threads = max(1, (os.cpu_count() or 1) // args.world)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = multiprocessing.get_context("spawn")
        init_method = f"file://{Path(tmp) / 'rendezvous'}"
        procs = [ctx.Process(target=_worker, args=(r, args.world, init_method, tmp, repeats, threads))
                 for r in range(args.world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        # The results decide, not the exit codes: gloo's teardown can abort after the work is done.
        if not all(Path(tmp, f"rank{r}.json").exists() for r in range(args.world)):
            print(f"a rank failed (exit codes {[p.exitcode for p in procs]})", file=sys.stderr)
            return 1
        per_rank = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(args.world)]
    # The slowest rank's median: a collective is as slow as its last participant.
    results = [{k: (max(r[i][k] for r in per_rank) if k.endswith("_s") else v) for k, v in per_rank[0][i].items()}
               for i in range(len(MODELS))]
    print(f"torch {torch.__version__}, {args.world} gloo processes x {threads} thread(s), {repeats} repetitions")
    print("| model (sparsified weights, batch/rank) | step | verify / step | checksum / step "
          "| broadcast / step | verify / topology update |")
    print("|---|---|---|---|---|---|")
    for r in results:
        step = r["step_s"]
        print(f"| {r['model']} ({r['sparsified_weights']:,}, {r['batch_per_rank']}) | {step * 1e3:.1f} ms "
              f"| {r['verify_s'] / step:.4f} ({r['verify_s'] * 1e3:.2f} ms) "
              f"| {r['checksum_s'] / step:.4f} ({r['checksum_s'] * 1e3:.2f} ms) "
              f"| {r['broadcast_s'] / step:.4f} ({r['broadcast_s'] * 1e3:.2f} ms) "
              f"| {r['verify_s'] / r['update_s']:.3f} (update {r['update_s'] * 1e3:.1f} ms) |")
    if args.json:
        args.json.write_text(json.dumps({"world": args.world, "threads": threads, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
