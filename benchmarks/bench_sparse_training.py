"""Training benchmark: dense vs masked dense vs sparse execution of Linear layers on the CPU.

    python benchmarks/bench_sparse_training.py --section step                # ~1 min on 2 shared cores
    python benchmarks/bench_sparse_training.py --section run --threads 1     # ~1.5 min per thread count
    python benchmarks/bench_sparse_training.py --section kernels             # ~20-40 s
    python benchmarks/bench_sparse_training.py --section crossover --sizes large --densities 0.03,0.05,0.07,0.1
    python benchmarks/bench_sparse_training.py --quick                       # every section, few repeats

Sections (``--threads 1,2`` runs each at 1 and 2 intra-op threads, in the same process):

* ``kernels``: the candidate kernels of one sparse Linear layer at density 0.05, 2048 rows: the
  sparse product with int32 / int64 CSR indices and a row-major / column-major dense operand, and
  the weight gradient at the active positions by ``torch.sparse.sampled_addmm`` (the chosen one),
  by gathering operand rows per active weight and summing, by ``torch.bmm`` over padded rows, and
  by the dense product followed by a gather (the slow alternatives on 256 rows only, with the
  chosen kernel timed on the same 256 rows beside them);
* ``crossover``: one layer's forward + backward (input and weight gradients), dense ``F.linear``
  vs :func:`granet.kernels.sparse_linear.sparse_linear`, by density and shape: where auto mode's
  thresholds (:data:`granet.sparsity.execution.AUTO_MAX_DENSITY`, ``AUTO_MIN_SIZE``) come from;
* ``step``: one training step (forward, backward, SGD with momentum, ``sparsifier.step()``) of
  (a) the GPT-2-small MLP block 768 -> 3072 -> GELU -> 768 on 2048 rows (batch x tokens; the input
  needs its gradient, as in a transformer), (b) the digits ``mlp`` (64 -> 300 -> 100 -> 10, batch
  64) and ``mnist1d_mlp`` (40 -> 256 -> 256 -> 10, batch 100) of :mod:`granet.models`; each dense
  (no sparsifier), masked dense (a ``static`` sparsifier at the density, ERK layer densities:
  today's path, dense products and the masks re-applied after the step) and sparse
  (the same plus :class:`~granet.sparsity.execution.SparseExecution` in ``sparse`` mode); with
  ``sparseprop`` importable (installed in another environment, see ``--help``; its OpenMP runtime
  takes its thread count from ``OMP_NUM_THREADS``, so run one thread count per run) its
  ``SparseLinear`` layer (the active values are its parameter) on the same masks for (a);
* ``run``: a whole short GraNet-ST run (ERK 50% start, cubic pruning to density 0.05 by half of the
  run, layer-wise: one global magnitude threshold prunes the block's second layer away entirely at
  ``nn.Linear``'s default init, whose weights are half the first layer's; drop-and-regrow every ΔT
  with dense gradients at the regrowth steps) of the block (a):
  dense training, masked dense GraNet-ST and GraNet-ST with sparse execution in auto mode, each from
  the same weights and data; layout rebuilds and dense-gradient passes are counted, and the masks of
  the two GraNet-ST runs compared.

Timings are medians of interleaved repeats (dense, masked, sparse, dense, ...) taken in one run, so
machine load hits all variants alike; ratios are of medians, with the ratio of minima beside
(the uncontended case). ``OMP_WAIT_POLICY=PASSIVE`` is set before torch loads.

Targets (issue 32): >= 2x faster than dense per training step at density 0.05 on (a); a whole
GraNet-ST run >= 1.5x faster than dense at 0.05.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402  (the environment variable must be set before torch loads OpenMP)
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Any, Callable, Optional, Sequence  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_inference import interleaved  # noqa: E402  (the same timing loop)
from torch import nn  # noqa: E402

import granet  # noqa: E402
from granet.kernels.sparse_linear import LinearLayout, sampled_product, sparse_linear  # noqa: E402
from granet.models import create_model  # noqa: E402
from granet.sparsity.execution import SparseExecution  # noqa: E402

try:  # optional: the SparseProp library (IST-DASLab), in an environment where it is installed
    from sparseprop.modules.linear import SparseLinear as SparsePropLinear  # type: ignore[import-not-found]
except ImportError:
    SparsePropLinear = None

ROWS = 2048  # batch x tokens of the GPT-2 block
D_MODEL, D_FF = 768, 3072


def _ratio(base: list[float], other: list[float]) -> str:
    """``median ratio (minima ratio)`` of base / other: > 1 means ``other`` is faster."""
    return f"{statistics.median(base) / statistics.median(other):.2f}x ({min(base) / min(other):.2f}x)"


def _mask(shape: tuple[int, int], density: float, generator: torch.Generator) -> torch.Tensor:
    """A random mask with exactly ``round(density * numel)`` active entries."""
    numel = shape[0] * shape[1]
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=generator)[: round(density * numel)]] = True
    return mask.view(shape)


# ---------------------------------------------------------------------------------------------- kernels

def _gather_dot(layout: LinearLayout, gyt: torch.Tensor, xt: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    rows = torch.repeat_interleave(torch.arange(layout.shape[0]), layout.crow[1:].long() - layout.crow[:-1].long())
    cols = layout.col.long()
    out = torch.empty(layout.nnz)
    for s in range(0, layout.nnz, chunk):
        out[s: s + chunk] = (gyt[rows[s: s + chunk]] * xt[cols[s: s + chunk]]).sum(1)
    return out


def _padded_bmm(layout: LinearLayout, gyt: torch.Tensor, xt: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    counts = layout.crow[1:].long() - layout.crow[:-1].long()
    kmax = int(counts.max()) if layout.nnz else 0
    starts = layout.crow[:-1].long()
    slot = torch.arange(kmax)
    valid = slot[None, :] < counts[:, None]
    index = torch.where(valid, starts[:, None] + slot[None, :], torch.zeros((), dtype=torch.long))
    cols = layout.col.long()[index] if layout.nnz else index
    padded = torch.empty(layout.shape[0], kmax)
    for s in range(0, layout.shape[0], chunk):
        a = xt[cols[s: s + chunk]]  # rows x kmax x batch
        padded[s: s + chunk] = torch.bmm(a, gyt[s: s + chunk].unsqueeze(2)).squeeze(2)
    return padded[valid]


def _print_times(title: str, fns: dict[str, Callable[[], object]], repeats: int, budget_s: float) -> None:
    ms = [statistics.median(t) for t in interleaved(list(fns.values()), repeats, budget_s, minimum=3)]
    print(title)
    for name, m in zip(fns, ms):
        print(f"  {name:42s} {m:8.1f} ms  {m / ms[0]:5.2f}")


def _kernels_of(shape: tuple[int, int], threads: Sequence[int], repeats: int, g: torch.Generator) -> None:
    out_f, in_f = shape
    mask = _mask(shape, 0.05, g)
    weight = torch.randn(out_f, in_f, generator=g) * mask
    layout = LinearLayout.from_mask(mask)
    csr32 = layout.matrix(weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        csr64 = torch.sparse_csr_tensor(layout.crow.long(), layout.col.long(), layout.values(weight), layout.shape)
    x = torch.randn(ROWS, in_f, generator=g)
    gy = torch.randn(ROWS, out_f, generator=g)
    xt, gyt = x.t().contiguous(), gy.t().contiguous()
    small_xt, small_gyt = xt[:, :256].contiguous(), gyt[:, :256].contiguous()
    reference = (small_gyt @ small_xt.t()).reshape(-1)[layout.pos]
    for fn in (_gather_dot, _padded_bmm):  # correctness of the alternatives before timing them
        assert torch.allclose(fn(layout, small_gyt, small_xt), reference, rtol=1e-4, atol=1e-3)
    product = {
        "W@xT int32 CSR, row-major xT (chosen)": lambda: torch.sparse.mm(csr32, xt),
        "W@xT int32 CSR, column-major xT": lambda: torch.sparse.mm(csr32, x.t()),
        "transposing copy + row-major product": lambda: torch.sparse.mm(csr32, x.t().contiguous()),
        "W@xT int64 CSR, row-major xT": lambda: torch.sparse.mm(csr64, xt),
        "dense x@WT (for scale)": lambda: x @ weight.t(),
    }
    grads = {
        "sampled_addmm (chosen)": lambda: sampled_product(layout, gyt, xt),
        "dense gyT@x then gather": lambda: (gyt @ xt.t()).reshape(-1)[layout.pos],
    }
    slow = {
        "sampled_addmm (chosen)": lambda: sampled_product(layout, small_gyt, small_xt),
        "gather rows + multiply + sum (chunks)": lambda: _gather_dot(layout, small_gyt, small_xt),
        "bmm over padded rows": lambda: _padded_bmm(layout, small_gyt, small_xt),
    }
    for n in threads:
        torch.set_num_threads(n)
        where = f"{out_f}x{in_f}, {n} thread(s)"
        _print_times(f"{where}, forward product ({ROWS} rows):", product, repeats, 30.0)
        _print_times(f"{where}, weight gradient at the active positions ({ROWS} rows):", grads, repeats, 30.0)
        _print_times(f"{where}, weight gradient, 256 rows:", slow, 3, 20.0)


def section_kernels(threads: Sequence[int], repeats: int) -> None:
    print("## kernels at density 0.05 (median ms, ratio to the chosen kernel)\n")
    g = torch.Generator().manual_seed(0)
    for shape in ((D_FF, D_MODEL), (D_MODEL, D_FF)):
        _kernels_of(shape, threads, repeats, g)
        print()


# ---------------------------------------------------------------------------------------------- crossover

def _layer_ratio(out_f: int, in_f: int, rows: int, density: float, repeats: int, g: torch.Generator) -> str:
    """Dense / sparse time of one layer's forward + backward (ratio of medians)."""
    x = torch.randn(rows, in_f, generator=g).requires_grad_()
    weight = torch.randn(out_f, in_f, generator=g).requires_grad_()
    bias = torch.randn(out_f, generator=g).requires_grad_()
    gy = torch.randn(rows, out_f, generator=g)
    layout = LinearLayout.from_mask(_mask((out_f, in_f), density, g))

    def dense() -> None:
        F.linear(x, weight, bias).backward(gy)
        x.grad = weight.grad = bias.grad = None

    def sparse() -> None:
        sparse_linear(x, weight, layout, bias).backward(gy)
        x.grad = weight.grad = bias.grad = None

    ts = interleaved([dense, sparse], repeats, 8.0, minimum=3)
    return f"{statistics.median(ts[0]) / statistics.median(ts[1]):.2f}"


CROSSOVER_CASES = {"large": ((D_FF, D_MODEL, ROWS), (D_MODEL, D_FF, ROWS), (1024, 1024, 256)),
                   "small": ((512, 512, 128), (300, 784, 64), (256, 256, 100), (300, 64, 64))}


def section_crossover(threads: Sequence[int], repeats: int, densities: Sequence[float], sizes: Sequence[str]) -> None:
    print("## one layer, forward + backward: dense / sparse time (ratio of medians; > 1: sparse faster)\n")
    cases = [case for size in sizes for case in CROSSOVER_CASES[size]]
    g = torch.Generator().manual_seed(0)
    print("out x in, rows | threads | " + " | ".join(f"d={d:g}" for d in densities))
    for out_f, in_f, rows in cases:
        for n in threads:
            torch.set_num_threads(n)
            cells = [_layer_ratio(out_f, in_f, rows, d, repeats, g) for d in densities]
            print(f"{out_f}x{in_f}, {rows} | {n} | " + " | ".join(cells), flush=True)
    print()


# ---------------------------------------------------------------------------------------------- step

def _block() -> nn.Module:
    return nn.Sequential(nn.Linear(D_MODEL, D_FF), nn.GELU(), nn.Linear(D_FF, D_MODEL))


class _Trainer:
    """One model, optimizer, optional sparsifier and execution; ``step()`` is one training step."""

    def __init__(self, build: Callable[[], nn.Module], inputs: torch.Tensor, targets: torch.Tensor, loss: str,
                 method: Optional[str] = None, execution: Optional[str] = None, **options: Any) -> None:
        torch.manual_seed(0)
        self.model = build()
        self.inputs, self.targets, self.loss = inputs, targets, loss
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.sparsifier = (granet.create_sparsifier(method, self.model, self.optimizer, **options)
                           if method is not None else None)
        self.execution = (SparseExecution(self.model, self.sparsifier, mode=execution)
                          if execution is not None and self.sparsifier is not None else None)

    def step(self, i: int = 0) -> None:
        x = self.inputs[i % len(self.inputs)]
        out = self.model(x)
        target = self.targets[i % len(self.targets)]
        loss = F.mse_loss(out, target) if self.loss == "mse" else F.cross_entropy(out, target)
        loss.backward()
        self.optimizer.step()
        if self.sparsifier is not None:
            self.sparsifier.step()
        self.optimizer.zero_grad()


class _SparsePropTrainer:
    """The block (a) with SparseProp's ``SparseLinear`` layers (their active values are the parameters)."""

    def __init__(self, masks: Sequence[torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor) -> None:
        torch.manual_seed(0)
        block = _block()
        with torch.no_grad():
            for layer, mask in zip((block[0], block[2]), masks):
                layer.weight.mul_(mask)
            block[0], block[2] = SparsePropLinear.from_dense(block[0]), SparsePropLinear.from_dense(block[2])
        self.model, self.inputs, self.targets = block, inputs, targets
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)

    def step(self, i: int = 0) -> None:
        F.mse_loss(self.model(self.inputs[0]), self.targets[0]).backward()
        self.optimizer.step()
        self.optimizer.zero_grad()


def _case(name: str, build: Callable[[], nn.Module], rows: int, in_shape: tuple[int, ...], classes: int,
          g: torch.Generator) -> tuple[str, Callable[[], nn.Module], torch.Tensor, torch.Tensor, str]:
    inputs = torch.randn(1, rows, *in_shape, generator=g)
    if classes:
        return name, build, inputs, torch.randint(0, classes, (1, rows), generator=g), "ce"
    inputs.requires_grad_()  # the block's input needs its gradient (the residual stream of a transformer)
    return name, build, inputs, torch.randn(1, rows, D_MODEL, generator=g), "mse"


def section_step(threads: Sequence[int], repeats: int, densities: Sequence[float], models: Sequence[str]) -> None:
    print("## one training step (median ms; speed-up = dense / variant, ratio of medians (ratio of minima))\n")
    g = torch.Generator().manual_seed(0)
    cases = []
    if "block" in models:
        cases.append(_case("GPT-2 MLP block 768-3072-768, 2048 rows", _block, ROWS, (D_MODEL,), 0, g))
    if "mlp" in models:
        cases.append(_case("digits mlp 64-300-100-10, batch 64", lambda: create_model("mlp", 10, 1, 8), 64,
                           (1, 8, 8), 10, g))
    if "mnist1d_mlp" in models:
        cases.append(_case("mnist1d_mlp 40-256-256-10, batch 100", lambda: create_model("mnist1d_mlp", 10, 1, 40),
                           100, (1, 40), 10, g))
    for n in threads:
        torch.set_num_threads(n)
        for name, build, inputs, targets, loss in cases:
            print(f"{name}, {n} thread(s):")
            for d in densities:
                dense = _Trainer(build, inputs, targets, loss)
                masked = _Trainer(build, inputs, targets, loss, "static", density=d)
                sparse = _Trainer(build, inputs, targets, loss, "static", "sparse", density=d)
                trainers: list[Any] = [dense, masked, sparse]
                labels = ["dense", "masked dense", "sparse execution"]
                if SparsePropLinear is not None and build is _block:
                    masks = list(masked.sparsifier.masks.values())  # type: ignore[union-attr]
                    trainers.append(_SparsePropTrainer(masks, inputs, targets))
                    labels.append("sparseprop")
                ts = interleaved([t.step for t in trainers], repeats, 40.0, minimum=3)
                cells = [f"{label} {statistics.median(t):.1f} ms" + ("" if i == 0 else f" ({_ratio(ts[0], t)})")
                         for i, (label, t) in enumerate(zip(labels, ts))]
                print(f"  density {d:g}: " + "; ".join(cells) + f"; masked/sparse {_ratio(ts[1], ts[2])}; "
                      f"{len(ts[0])} repeats", flush=True)
        print()


# ---------------------------------------------------------------------------------------------- run

def section_run(threads: Sequence[int], steps: int, interval: int, density: float) -> None:
    print(f"## a whole GraNet-ST run of the block (a): {steps} steps, ΔT = {interval}, density {density:g}\n")
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(4, ROWS, D_MODEL, generator=g).requires_grad_()
    targets = torch.randn(4, ROWS, D_MODEL, generator=g)
    # Layer-wise pruning: one global magnitude threshold removes the 3072 -> 768 layer entirely here
    # (its initial weights are half the size of the first layer's, nn.Linear's default init).
    options = dict(density=density, total_steps=steps, update_interval=interval, prune="layerwise")
    for n in threads:
        torch.set_num_threads(n)
        runs = {
            "dense": _Trainer(_block, inputs, targets, "mse"),
            "masked dense GraNet-ST": _Trainer(_block, inputs, targets, "mse", "granet-st", **options),
            "GraNet-ST, sparse execution (auto)": _Trainer(_block, inputs, targets, "mse", "granet-st", "auto",
                                                           **options),
        }
        # The runs advance in lockstep, one step each in turn, so that load changes hit all alike.
        times: dict[str, list[float]] = {k: [] for k in runs}
        masks_equal = True
        for i in range(steps):
            for key, trainer in runs.items():
                t0 = time.perf_counter()
                trainer.step(i)
                times[key].append(time.perf_counter() - t0)
            a, b = (runs[k].sparsifier for k in list(runs)[1:])
            masks_equal &= all(torch.equal(a.masks[k], b.masks[k]) for k in a.names)  # type: ignore[union-attr]
        total = {k: sum(v) for k, v in times.items()}
        print(f"{n} thread(s):")
        for key, seconds in total.items():
            print(f"  {key:38s} {seconds:7.2f} s   dense / this {total['dense'] / seconds:5.2f}x")
        execution = runs["GraNet-ST, sparse execution (auto)"].execution
        assert execution is not None
        sparse_total = total["GraNet-ST, sparse execution (auto)"]
        print(f"  masked dense / sparse execution {total['masked dense GraNet-ST'] / sparse_total:.2f}x; "
              f"layout rebuilds "
              f"{execution.rebuilds}, dense-gradient passes {execution.dense_gradient_passes}, masks identical to "
              f"the masked dense run at every step: {masks_equal}")
        print(f"  {execution.summary()}\n", flush=True)


def _numbers(text: str, kind: Callable[[str], Any]) -> list[Any]:
    return [kind(v) for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="sparseprop: python -m venv V; V/bin/pip install wheel setuptools "
                                            "pybind11; V/bin/pip install --no-build-isolation --no-deps sparseprop; "
                                            "then run this script with V/bin/python and PYTHONPATH=src, torch "
                                            "visible to V (e.g. a .pth file naming this environment's "
                                            "site-packages)")
    parser.add_argument("--section", default="step", choices=("kernels", "crossover", "step", "run", "all"))
    parser.add_argument("--threads", default="1,2", help="intra-op thread counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--densities", default=None,
                        help="step: 0.1,0.05,0.02 by default; crossover: 0.02,0.05,0.1,0.2,0.3,0.5")
    parser.add_argument("--models", default="block,mlp,mnist1d_mlp")
    parser.add_argument("--sizes", default="large,small", help="crossover: the layer sizes (large, small)")
    parser.add_argument("--steps", type=int, default=40, help="run: optimizer steps")
    parser.add_argument("--interval", type=int, default=10, help="run: ΔT")
    parser.add_argument("--quick", action="store_true", help="every section, few repeats and steps")
    args = parser.parse_args()
    threads = _numbers(args.threads, int)
    densities = _numbers(args.densities, float) if args.densities else None
    print(f"torch {torch.__version__}, threads {threads}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"MKL {torch.backends.mkl.is_available()}, sparseprop {'yes' if SparsePropLinear is not None else 'no'}\n")
    sections = ("kernels", "crossover", "step", "run") if args.quick or args.section == "all" else (args.section,)
    repeats = 3 if args.quick else args.repeats
    for section in sections:
        if section == "kernels":
            section_kernels(threads, repeats)
        elif section == "crossover":
            grid = (0.05,) if args.quick else (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
            section_crossover(threads, repeats, densities or grid, _numbers(args.sizes, str))
        elif section == "step":
            section_step(threads, repeats, densities or (0.1, 0.05, 0.02), _numbers(args.models, str))
        else:
            section_run(threads, 20 if args.quick else args.steps, args.interval, 0.05)


if __name__ == "__main__":
    main()
