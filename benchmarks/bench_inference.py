"""Inference benchmark: dense vs CSR-sparse latency of Linear layers on the CPU.

    python benchmarks/bench_inference.py            # ~1-3 minutes on 2 CPU cores
    python benchmarks/bench_inference.py --quick    # fewer repeats and densities, for a smoke test
    python benchmarks/bench_inference.py --threads 1
    python benchmarks/bench_inference.py --structured-only   # the fan-in table alone, 1 and 2 threads

For each layer shape (in -> out: the GPT-2 MLP's 768 -> 3072 and 3072 -> 768, and 4096 -> 4096),
each batch size (1, 64) and each density, a random unstructured mask of exactly
``round(density * numel)`` weights is drawn and the dense ``nn.Linear`` is timed against
``granet.deploy.inference.SparseLinear`` (``torch.sparse.mm`` on a CSR weight; ``torch.mv`` for one row,
at batch 1 also with ``vector_threads=1``). The whole GPT-2 MLP block (768 -> 3072, GELU,
3072 -> 768) converted by ``granet.to_sparse_inference`` is timed the same way, and so are three
ResNet-50 1x1 convolutions at batch 1 (``SparseConv1x1``).

Timings are medians of interleaved repeats (dense, sparse, dense, ...) taken in one run, so machine
load hits both sides alike; every sparse variant runs right after a dense call (which evicts the
caches), so none finds its weight left in cache by another. The printed speed-up is the ratio
dense / sparse of the medians (> 1: sparse is faster), with the ratio of the minima beside it (the
uncontended case: on a shared machine preemption adds milliseconds to some calls). A first section
compares the candidate kernels at density 0.05 (why CSR). ``OMP_WAIT_POLICY=PASSIVE`` is set before
torch loads: with spinning OpenMP threads on a shared machine, small sparse calls take milliseconds.

Goal (issue: sparse models out): >= 3x at 95% sparsity (density 0.05) for the large shapes, batch 1.

The structured table (``structured``) compares, for the same three shapes, batch 1 and 32, densities
0.1 and 0.05, on 1 and then 2 torch threads: dense ``nn.Linear``; CSR (``SparseLinear``) on a random
unstructured mask with the same number of active weights as the fan-in mask (``out * k``,
``k = round(density * in)``), at batch 1 on 2 threads also its one-thread matrix-vector variant (the
faster CSR variant counts); CSR on the fan-in mask itself; and ``CondensedLinear`` on the fan-in mask.
Every variant runs right after a dense call, interleaved, medians. Goal (issue 31): condensed >= 1.3x
faster than unstructured CSR at the same nnz.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402  (the environment variable must be set before torch loads OpenMP)
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Callable, Sequence  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from granet.deploy import condensed  # noqa: E402
from granet.deploy.condensed import CondensedLinear  # noqa: E402
from granet.deploy.inference import SparseConv1x1, SparseLinear, to_sparse_inference  # noqa: E402

SHAPES = ((768, 3072), (3072, 768), (4096, 4096))  # (in_features, out_features)
BATCHES = (1, 64)


def interleaved(fns: Sequence[Callable[[], object]], repeats: int, budget_s: float,
                minimum: int = 7) -> list[list[float]]:
    """Milliseconds of each function, run in turn ``repeats`` times (at least ``minimum``, fewer past
    ``budget_s``); also the timing loop of bench_sparse_training.py."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    for r in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        if r >= minimum - 1 and time.perf_counter() - start > budget_s:
            break
    return times


def _after_dense(dense: Callable[[], object], variants: Sequence[Callable[[], object]],
                 repeats: int) -> tuple[list[float], list[list[float]]]:
    """Times of ``dense`` and of each sparse variant, every variant run right after a dense call.

    The dense call evicts the caches, so no variant profits from a previous sparse call having
    left the (small) sparse weight in cache; the dense times of all positions are pooled.
    """
    fns: list[Callable[[], object]] = []
    for v in variants:
        fns += [dense, v]
    times = interleaved(fns, repeats, budget_s=3.0 * len(variants))
    return [t for ts in times[0::2] for t in ts], times[1::2]


def _medians(fns: Sequence[Callable[[], object]], repeats: int, budget_s: float) -> list[float]:
    return [statistics.median(ts) for ts in interleaved(fns, repeats, budget_s)]


def _sparse_linear(fan_in: int, fan_out: int, density: float, gen: torch.Generator) -> nn.Linear:
    """A Linear layer with exactly round(density * numel) non-zero weights at random positions."""
    layer = nn.Linear(fan_in, fan_out)
    numel = fan_in * fan_out
    keep = torch.randperm(numel, generator=gen)[: round(density * numel)]
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[keep] = True
    with torch.no_grad():
        layer.weight.mul_(mask.view(fan_out, fan_in))
    return layer


def _fan_in_linear(fan_in: int, fan_out: int, k: int, gen: torch.Generator) -> nn.Linear:
    """A Linear layer whose every output unit has exactly ``k`` non-zero weights at random inputs."""
    layer = nn.Linear(fan_in, fan_out)
    picks = torch.rand(fan_out, fan_in, generator=gen).argsort(dim=1)[:, :k]
    mask = torch.zeros(fan_out, fan_in, dtype=torch.bool).scatter_(1, picks, True)
    with torch.no_grad():
        layer.weight.copy_(torch.where(mask, layer.weight, torch.zeros(())))
        layer.weight[mask & (layer.weight == 0)] = 1.0  # keep exactly k non-zeros per row
    return layer


def _linear_with_nnz(fan_in: int, fan_out: int, nnz: int, gen: torch.Generator) -> nn.Linear:
    """A Linear layer with exactly ``nnz`` non-zero weights at random positions (unstructured)."""
    layer = nn.Linear(fan_in, fan_out)
    mask = torch.zeros(fan_in * fan_out, dtype=torch.bool)
    mask[torch.randperm(fan_in * fan_out, generator=gen)[:nnz]] = True
    with torch.no_grad():
        layer.weight.copy_(torch.where(mask.view(fan_out, fan_in), layer.weight, torch.zeros(())))
        layer.weight[mask.view(fan_out, fan_in) & (layer.weight == 0)] = 1.0
    return layer


def structured(densities: Sequence[float], repeats: int, thread_counts: Sequence[int]) -> list[float]:
    """Condensed fan-in vs CSR (unstructured mask, same nnz) vs dense; returns condensed's speed-ups over CSR."""
    print(f"## Constant fan-in: condensed vs CSR at the same nnz vs dense (median ms; native kernels "
          f"{condensed.status()})\n")
    print("| threads | shape in->out | batch | density (k) | dense | CSR unstructured | CSR fan-in mask | condensed "
          "| condensed vs CSR unstructured | condensed vs dense | max abs diff | repeats |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    before = torch.get_num_threads()
    ratios: list[float] = []
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            gen = torch.Generator().manual_seed(3)
            for fan_in, fan_out in ((4096, 4096), (768, 3072), (3072, 768)):
                for density in densities:
                    k = max(1, round(density * fan_in))
                    fan = _fan_in_linear(fan_in, fan_out, k, gen)
                    free = _linear_with_nnz(fan_in, fan_out, fan_out * k, gen)
                    cond, csr_fan = CondensedLinear.from_dense(fan), SparseLinear.from_dense(fan)
                    csr_free = [SparseLinear.from_dense(free)]
                    for batch in (1, 32):
                        x = torch.randn(batch, fan_in, generator=gen)
                        csrs = csr_free + ([SparseLinear.from_dense(free, 1)] if batch == 1 and threads > 1 else [])
                        mods: list[nn.Module] = [*csrs, csr_fan, cond]
                        dense_ms, times = _after_dense(lambda f=fan, x=x: f(x),
                                                       [lambda m=m, x=x: m(x) for m in mods], repeats)
                        med = [statistics.median(ts) for ts in times]
                        csr_ms, fan_ms, cond_ms = min(med[:len(csrs)]), med[-2], med[-1]
                        d = statistics.median(dense_ms)
                        ratios.append(csr_ms / cond_ms)
                        diff = float((fan(x) - cond(x)).abs().max())
                        print(f"| {threads} | {fan_in}->{fan_out} | {batch} | {density:g} ({k}) | {d:.3f} "
                              f"| {csr_ms:.3f} | {fan_ms:.3f} | {cond_ms:.3f} | {csr_ms / cond_ms:.2f}x "
                              f"| {d / cond_ms:.2f}x | {diff:.1e} | {len(times[-1])} |", flush=True)
    finally:
        torch.set_num_threads(before)
    met = sum(r >= 1.3 for r in ratios)
    print(f"\ncondensed >= 1.3x faster than unstructured CSR (same nnz) in {met} of {len(ratios)} rows; "
          f"ratios {min(ratios):.2f}x-{max(ratios):.2f}x, median {statistics.median(ratios):.2f}x\n")
    return ratios


def kernels(repeats: int) -> None:
    """Candidate CPU kernels for y = x W^T at density 0.05 (median ms; lower is better)."""
    print("## kernels at density 0.05 (median ms)\n")
    print("| shape in->out | batch | dense F.linear | CSR int64 sparse.mm(W, x^T) | CSR int32 sparse.mm(W, x^T) "
          "| CSR int32 mv(W, x) | F.linear(x, W_csr) | x @ (W^T as CSR) | BSR 4x4 sparse.mm |")
    print("|---|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for fan_in, fan_out in ((768, 3072), (4096, 4096)):
        w = _sparse_linear(fan_in, fan_out, 0.05, gen).weight.detach()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            csr, csr_t, bsr = w.to_sparse_csr(), w.t().to_sparse_csr(), w.to_sparse_bsr((4, 4))
        csr32 = SparseLinear(w).weight  # int32 indices, as to_sparse_inference stores them
        for batch in BATCHES:
            x = torch.randn(batch, fan_in)
            fns = [lambda: nn.functional.linear(x, w), lambda: torch.sparse.mm(csr, x.t()),
                   lambda: torch.sparse.mm(csr32, x.t()), lambda: torch.mv(csr32, x[0]),
                   lambda: nn.functional.linear(x, csr), lambda: torch.mm(x, csr_t), lambda: torch.sparse.mm(bsr, x.t())]
            if batch != 1:
                fns[3] = None  # matrix-vector only for one row
            ms = _medians([f for f in fns if f is not None], max(3, repeats // 3), budget_s=6.0)
            cells = [f"{ms.pop(0):.3f}" if f is not None else "-" for f in fns]
            print(f"| {fan_in}->{fan_out} | {batch} | " + " | ".join(cells) + " |")
    print()


def _row(dense_ms: list[float], sparse_ms: list[float]) -> tuple[str, float]:
    """Table cells (medians, ratio of medians, ratio of minima, repeats) and the median ratio."""
    d, sp = statistics.median(dense_ms), statistics.median(sparse_ms)
    best = min(dense_ms) / min(sparse_ms)
    return f"{d:.3f} | {sp:.3f} | {d / sp:.2f}x | {best:.2f}x | {len(sparse_ms)}", d / sp


_HEADER = "dense ms | sparse ms | speed-up (medians) | speed-up (minima) | repeats"


def layers(densities: Sequence[float], repeats: int) -> dict[tuple[str, str], dict[float, float]]:
    """Dense vs SparseLinear per shape, batch and density; returns the median speed-ups.

    At batch 1 SparseLinear is also timed with ``vector_threads=1`` (its matrix-vector product on one
    thread), the variant ``to_sparse_inference``'s calibration tries beside torch's thread setting.
    """
    print("## Linear layers: dense vs CSR (ms; speed-up = dense / sparse)\n")
    print(f"| shape in->out | batch | sparse variant | density | {_HEADER} | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    speedups: dict[tuple[str, str], dict[float, float]] = {}
    for fan_in, fan_out in SHAPES:
        for density in densities:
            dense = _sparse_linear(fan_in, fan_out, density, gen)
            variants = {"default": SparseLinear.from_dense(dense), "mv 1 thread": SparseLinear.from_dense(dense, 1)}
            for batch in BATCHES:
                x = torch.randn(batch, fan_in, generator=gen)
                names = list(variants) if batch == 1 else ["default"]
                dense_ms, sparse_ms = _after_dense(lambda: dense(x), [lambda m=variants[n]: m(x) for n in names],
                                                   repeats)
                for name, sparse_ms in zip(names, sparse_ms):
                    cells, ratio = _row(dense_ms, sparse_ms)
                    diff = float((dense(x) - variants[name](x)).abs().max())
                    key = (f"{fan_in}->{fan_out}", f"batch {batch}, {name}")
                    speedups.setdefault(key, {})[density] = ratio
                    print(f"| {key[0]} | {batch} | {name} | {density:g} | {cells} | {diff:.1e} |")
    print()
    return speedups


def mlp_block(densities: Sequence[float], repeats: int) -> dict[tuple[str, str], dict[float, float]]:
    """The GPT-2 MLP block (768 -> 3072 -> GELU -> 768) dense vs to_sparse_inference(calibrate=False)."""
    print("## GPT-2 MLP block 768->3072->GELU->768 (ms; speed-up = dense / sparse)\n")
    print(f"| batch | sparse variant | density | {_HEADER} |")
    print("|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(1)
    speedups: dict[tuple[str, str], dict[float, float]] = {}
    for density in densities:
        block = nn.Sequential(_sparse_linear(768, 3072, density, gen), nn.GELU(), _sparse_linear(3072, 768, density, gen))
        variants = {"default": to_sparse_inference(block, max_density=1.0, calibrate=False, vector_threads=None),
                    "mv 1 thread": to_sparse_inference(block, max_density=1.0, calibrate=False, vector_threads=1)}
        for batch in BATCHES:
            x = torch.randn(batch, 768, generator=gen)
            names = list(variants) if batch == 1 else ["default"]
            dense_ms, sparse_ms = _after_dense(lambda: block(x), [lambda m=variants[n]: m(x) for n in names], repeats)
            for name, sparse_ms in zip(names, sparse_ms):
                cells, ratio = _row(dense_ms, sparse_ms)
                speedups.setdefault(("mlp-block", f"batch {batch}, {name}"), {})[density] = ratio
                print(f"| {batch} | {name} | {density:g} | {cells} |")
    print()
    return speedups


def conv1x1(densities: Sequence[float], repeats: int) -> None:
    """ResNet-50 bottleneck 1x1 convolutions (batch 1) dense vs SparseConv1x1."""
    print("## 1x1 convolutions, ResNet-50 bottleneck shapes, batch 1 (ms; speed-up = dense / sparse)\n")
    print(f"| conv in->out @ HxW | density | {_HEADER} | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(2)
    for c_in, c_out, size in ((256, 64, 56), (1024, 256, 14), (512, 2048, 7)):
        for density in densities:
            conv = nn.Conv2d(c_in, c_out, 1, bias=False)
            with torch.no_grad():
                conv.weight.copy_(_sparse_linear(c_in, c_out, density, gen).weight.view_as(conv.weight))
            sparse = SparseConv1x1(conv)
            x = torch.randn(1, c_in, size, size, generator=gen)
            cells, _ = _row(*interleaved([lambda: conv(x), lambda: sparse(x)], repeats, budget_s=3.0))
            diff = float((conv(x) - sparse(x)).abs().max())
            print(f"| {c_in}->{c_out} @ {size}x{size} | {density:g} | {cells} | {diff:.1e} |")
    print()


def crossover(speedups: dict[tuple[str, str], dict[float, float]]) -> None:
    """Per shape, batch and variant: the largest measured density at and below which sparse is faster."""
    print("## where sparse wins (ratio of medians)\n")
    for (shape, batch), by_density in speedups.items():
        wins = None
        for density in sorted(by_density):  # ascending: sparse must win at every lower density too
            if by_density[density] < 1.0:
                break
            wins = density
        text = f"density <= {wins:g}" if wins is not None else "at none of the measured densities"
        print(f"* {shape}, {batch}: sparse faster {text} (speed-up at 0.05: "
              f"{by_density.get(0.05, float('nan')):.2f}x)")


def main() -> None:
    """Run the benchmark and print markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and densities")
    parser.add_argument("--repeats", type=int, default=41, help="interleaved repeats per measurement (at most)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--structured-only", action="store_true",
                        help="only the constant fan-in table (condensed vs CSR vs dense), on 1 and 2 threads")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    densities = (0.1, 0.05) if args.quick else (0.3, 0.2, 0.1, 0.05, 0.02)
    repeats = 7 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, MKL {torch.backends.mkl.is_available()}\n")
    started = time.perf_counter()
    thread_counts = (1, 2) if args.threads is None else (args.threads,)
    if args.structured_only:
        with torch.inference_mode():
            structured((0.1, 0.05), repeats, thread_counts)
        print(f"total {time.perf_counter() - started:.0f} s")
        return
    with torch.inference_mode():
        structured((0.1, 0.05), repeats, thread_counts)
        kernels(repeats)
        speedups = layers(densities, repeats)
        speedups.update(mlp_block(densities, repeats))
        conv1x1(densities[-3:], repeats)
    crossover(speedups)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
