"""Engine benchmark: topology-update cost, step overhead and mask memory, as ratios from one run.

Every figure is a ratio of two timings taken in the same run on the same machine (medians of
repeats, the two sides interleaved), so it does not depend on how fast or how busy the machine is::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_engine.py            # full run (~9 min, 2 cores)
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_engine.py --quick    # small models, smoke test

Measured (issue: fast topology updates):

* **update cost**: one GraNet update (global magnitude prune + per-layer drop + gradient regrowth,
  and the regrowth-only kind) on the ImageNet ResNet-50 (25.5M sparsified weights) and on a
  100M-weight stack of Linear layers, as (a) seconds, (b) / one dense training step at batch 8
  (target <= 0.1 for the ResNet-50), (c) / the same update written the way research code does it
  (float masks, ``torch.sort`` / ``topk`` over everything, per-layer Python loops; target >= 10x),
  and (d) / the memory-bandwidth floor: the bytes an update must move at the measured copy bandwidth.
* **every method**: one update of each dynamic method (GraNet, GraNet-ST, GMP, RigL, SET, SNFS)
  on the ResNet-50 / the dense step, with the native kernels and with torch operations only.
* **memory**: mask bytes per sparsified weight (target <= 1), selection scratch / largest layer.
* **step overhead**: GraNet step (masks re-applied to weights and optimizer state every step,
  one update per 100 steps amortised) / dense step, ResNet-20, batch 128 (target <= 1.02): as
  the ratio of the two step times (a difference of two noisy timings), and as 1 + the time spent
  in ``sparsifier.step()`` per step / the dense step (the added work timed directly).
  ``benchmarks/bench_transformer.py`` measures the same on a GPT-2-shaped model.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

import granet
from granet.kernels import native, topk
from granet.models import create_model

logger = logging.getLogger("bench_engine")


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """One dense training step; returns its wall time in seconds."""
    start = time.perf_counter()
    opt.zero_grad(set_to_none=False)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return time.perf_counter() - start


def copy_bandwidth(megabytes: int = 256, repeats: int = 7) -> float:
    """Measured memory bandwidth in bytes/s: a large tensor copy reads and writes every byte."""
    n = megabytes * (1 << 20) // 4
    src, dst = torch.rand(n), torch.empty(n)
    dst.copy_(src)  # touch the pages once
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * n * 4 / statistics.median(times)


def floor_bytes(total: int, state_tensors: int, pruning: bool) -> int:
    """Bytes one update must move at least, for ``total`` sparsified float32 weights.

    Per weight: prune (if any) reads |w| and the mask and writes a mask (4 + 1 + 1); the drop does
    the same (6); regrowth reads the grow score and the kept mask and writes a mask (6); installing
    reads and writes the weight and each optimizer state tensor (8 each) and reads the mask (1);
    the exploration record reads the mask (1).
    """
    per_weight = (6 if pruning else 0) + 6 + 6 + 8 * (1 + state_tensors) + 1 + 1
    return per_weight * total


# ---------------------------------------------------------------------------- the naive reference


class NaiveGraNet:
    """A GraNet update written the way research code does it (the comparison point, not library code).

    Float masks in a dict; global pruning by ``torch.topk`` over the concatenated ``|w| * mask`` of
    every layer; per layer, the drop by a full ``torch.sort`` of ``|w|`` and the regrowth by a full
    ``torch.sort`` of the masked gradient; then ``w *= mask`` and ``momentum *= mask``.
    """

    def __init__(self, weights: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
                 masks: list[torch.Tensor]) -> None:
        self.weights, self.grads, self.bufs = weights, grads, bufs
        self.masks = {i: m.float() for i, m in enumerate(masks)}

    @torch.no_grad()
    def update(self, prune_to: Optional[int], drop_fraction: float) -> None:
        """Prune globally to ``prune_to`` active weights (if given), then drop and regrow per layer."""
        if prune_to is not None:
            scores = torch.cat([(w.abs() * self.masks[i]).flatten() for i, w in enumerate(self.weights)])
            threshold = torch.topk(scores, prune_to, sorted=True)[0][-1]
            for i, w in enumerate(self.weights):
                self.masks[i] = ((w.abs() * self.masks[i]) >= threshold).float()
        for i, (w, g) in enumerate(zip(self.weights, self.grads)):
            mask = self.masks[i]
            active = mask.sum().item()
            n_drop = math.ceil(drop_fraction * active)
            if n_drop == 0 or active == mask.numel():
                continue
            n_zeros = mask.numel() - active
            _, idx = torch.sort(torch.abs(w * mask).view(-1))
            new_mask = mask.clone()
            new_mask.view(-1)[idx[: int(n_zeros + n_drop)]] = 0.0
            grad = g * (new_mask == 0).float()
            _, idx = torch.sort(torch.abs(grad).flatten(), descending=True)
            new_mask.view(-1)[idx[:n_drop]] = 1.0
            self.masks[i] = new_mask
        for i, (w, b) in enumerate(zip(self.weights, self.bufs)):
            w.mul_(self.masks[i])
            b.mul_(self.masks[i])


# ---------------------------------------------------------------------------- update cost


def synthetic_mlp(weights: int, width: int = 4096) -> nn.Module:
    """A bias-free stack of ``width x width`` Linear layers holding about ``weights`` weights."""
    layers = max(1, round(weights / (width * width)))
    return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])


def _peak_rss_reset() -> Optional[int]:
    """Reset the process's peak-RSS mark (Linux); the current RSS in bytes, or None elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _rss("VmRSS")
    except OSError:
        return None


def _rss(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def update_cost(name: str, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], updates: int,
                bandwidth: float) -> dict:
    """GraNet updates on ``model`` vs its dense step at ``batch``, vs the naive reference, vs the floor."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x, y = batch
    _train_step(model, opt, x, y)
    # Every step is an update: global prune + drop/regrow until prune_end, then drop/regrow only.
    sparsifier = granet.create_sparsifier(
        "granet", model, opt, density=0.1, total_steps=4 * updates + 4, update_interval=1,
        prune_end=updates + 2, track_exploration=True,
    )
    ours: dict[bool, list[float]] = {True: [], False: []}
    naive: dict[bool, list[float]] = {True: [], False: []}
    dense, rss_growth = [], []
    for t in range(1, 2 * updates + 4):
        dense.append(_train_step(model, opt, x, y))
        step = sparsifier.step_count + 1
        pruning = sparsifier.pruning is not None and sparsifier.pruning.is_prune_step(step)
        target = round(sparsifier.target_density(step) * sparsifier.total) if pruning else None
        if t > 1:  # the first update prunes from dense (once per run); report the steady state
            reference = _naive_for(sparsifier, opt)
            naive[pruning].append(_timed(lambda: reference.update(target, sparsifier.regrowth.fraction(step))))
            del reference
        base = _peak_rss_reset()
        elapsed = _timed(sparsifier.step)
        if base is not None and _rss("VmHWM") is not None and t > 1:  # the first one allocates the scratch
            rss_growth.append(_rss("VmHWM") - base)
        if t > 1:
            ours[pruning].append(elapsed)
    params = list(sparsifier.params)
    states = len([v for v in opt.state[params[0]].values() if isinstance(v, torch.Tensor)])
    return _update_summary(name, sparsifier, dense, ours, naive, rss_growth, bandwidth, states)


def _naive_for(sparsifier: granet.Sparsifier, opt: torch.optim.Optimizer) -> NaiveGraNet:
    """A naive updater on copies of the current weights, gradients, momentum and masks (not timed)."""
    params = list(sparsifier.params)
    return NaiveGraNet([p.detach().clone() for p in params], [p.grad.detach().clone() for p in params],
                       [opt.state[p]["momentum_buffer"].clone() for p in params], list(sparsifier.masks.values()))


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _update_summary(name, sparsifier, dense, ours, naive, rss_growth, bandwidth, states) -> dict:
    """Medians and ratios of one :func:`update_cost` run."""
    dense_s = statistics.median(dense)
    out = {"model": name, "sparsified_weights": sparsifier.total,
           "largest_layer": max(sparsifier.sizes), "dense_step_s": dense_s}
    for pruning, kind in ((True, "prune_regrow"), (False, "regrow_only")):
        if not ours[pruning]:
            continue
        mine, ref = statistics.median(ours[pruning]), statistics.median(naive[pruning])
        floor = floor_bytes(sparsifier.total, states, pruning) / bandwidth
        out[kind] = {
            "updates": len(ours[pruning]), "update_s": mine, "per_dense_step": mine / dense_s,
            "naive_s": ref, "naive_per_update": ref / mine,
            "floor_bytes": floor_bytes(sparsifier.total, states, pruning), "floor_s": floor,
            "per_floor": mine / floor,
        }
    mask_bytes = sum(m.numel() * m.element_size() for m in sparsifier.masks.values())
    out["mask_bytes_per_weight"] = mask_bytes / sparsifier.total
    out["exploration_bytes_per_weight"] = sum(e.numel() for e in sparsifier.ever_active) / sparsifier.total
    out["scratch_bytes_per_largest_layer_weight"] = topk.scratch_bytes() / max(sparsifier.sizes)
    if rss_growth:
        out["update_peak_rss_growth_bytes_per_weight"] = max(rss_growth) / sparsifier.total
    return out


# ---------------------------------------------------------------------------- every method

#: Dynamic methods and their update kind: the pruning ones prune at every timed update.
METHOD_UPDATES = ("granet", "granet-st", "gmp", "rigl", "set", "snfs")


def method_updates(build: Callable[[], nn.Module], dense_s: float, updates: int) -> list[dict]:
    """One topology update of each dynamic method on the model ``build`` makes, in steady state
    (median over ``updates``, the first update left out), / the dense step ``dense_s``.

    Every step is an update (the pruning methods prune at each one). The gradients are random
    (timing does not depend on them), so no training step is run between updates.
    """
    out = []
    for method in METHOD_UPDATES:
        torch.manual_seed(0)
        model = build()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        total = 4 * updates + 4
        sparsifier = granet.create_sparsifier(method, model, opt, density=0.1, total_steps=total, update_interval=1,
                                              prune_end=total, regrow_end=total)
        params = [p for p in model.parameters() if p.requires_grad]
        times = []
        for t in range(updates + 1):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
            elapsed = _timed(sparsifier.step)
            if t > 0:
                times.append(elapsed)
        median = statistics.median(times)
        out.append({"method": method, "update_s": median, "per_dense_step": median / dense_s,
                    "updates": len(times), "density_after": sparsifier.density()})
        topk.release_scratch()
    return out


# ---------------------------------------------------------------------------- step overhead


def step_overhead(steps: int, block: int, batch: int = 128) -> dict:
    """Dense vs GraNet step time on a CIFAR ResNet-20: medians of interleaved block means, and the
    time of ``sparsifier.step()`` itself (the only work GraNet adds to a step) per step."""
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    runs = {}
    for name in ("dense", "granet"):
        model = create_model("resnet20", num_classes=10, input_size=32)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        sparsifier = None
        if name == "granet":  # updates every 100 steps, inside the pruning phase (the costlier kind)
            sparsifier = granet.create_sparsifier(
                "granet", model, opt, density=0.1, total_steps=10 * steps, update_interval=100, prune_end=5 * steps
            )
        runs[name] = (model, opt, sparsifier, [])
    for model, opt, sparsifier, _ in runs.values():  # warm-up (allocator, threads)
        for _ in range(3):
            _train_step(model, opt, x, y)
            if sparsifier is not None:
                sparsifier.step()
    updates, in_sparsifier = 0, []
    for _ in range(max(1, steps // block)):
        for model, opt, sparsifier, times in runs.values():
            start, spent = time.perf_counter(), 0.0
            for _ in range(block):
                _train_step(model, opt, x, y)
                if sparsifier is not None:
                    begin = time.perf_counter()
                    updates += sparsifier.step() is not None
                    spent += time.perf_counter() - begin
            times.append((time.perf_counter() - start) / block)
            if sparsifier is not None:
                in_sparsifier.append(spent / block)
    dense, sparse = statistics.median(runs["dense"][3]), statistics.median(runs["granet"][3])
    # Mean, not median: the rare update steps are part of the cost.
    added = statistics.fmean(in_sparsifier)
    return {"model": f"resnet20 (CIFAR), batch {batch}, 32x32", "blocks": len(runs["dense"][3]), "block": block,
            "topology_updates_in_timed_steps": updates, "dense_step_s": dense, "granet_step_s": sparse,
            "ratio": sparse / dense, "sparsifier_step_s": added, "direct_ratio": 1 + added / dense, "target": 1.02}


# ---------------------------------------------------------------------------- report


def _print_table(results: dict) -> None:
    bw = results["copy_bandwidth_bytes_per_s"]
    print(f"torch {results['torch']}, {results['threads']} threads, copy bandwidth {bw / 1e9:.2f} GB/s")
    print("| model | update | time | / dense step b8 | naive / ours | / bandwidth floor |")
    print("|---|---|---|---|---|---|")
    for u in results["update_cost"]:
        for kind in ("prune_regrow", "regrow_only"):
            if kind in u:
                r = u[kind]
                label = ("prune + regrow" if kind == "prune_regrow" else "regrow only") + f", {u['kernels']}"
                print(f"| {u['model']} ({u['sparsified_weights']:,} w) | {label} | "
                      f"{r['update_s'] * 1e3:.0f} ms | {r['per_dense_step']:.3f} ({u['dense_step_s'] * 1e3:.0f} ms) | "
                      f"{r['naive_per_update']:.1f}x ({r['naive_s'] * 1e3:.0f} ms) | {r['per_floor']:.1f}x "
                      f"({r['floor_s'] * 1e3:.0f} ms) |")
    for u in results["update_cost"]:
        rss = u.get("update_peak_rss_growth_bytes_per_weight")
        print(f"memory, {u['model']} ({u['kernels']}): masks {u['mask_bytes_per_weight']:.3f} B/weight "
              f"(+{u['exploration_bytes_per_weight']:.3f} exploration bits); selection scratch "
              f"{u['scratch_bytes_per_largest_layer_weight']:.1f} B per weight of the largest layer"
              + ("" if rss is None else f"; peak RSS growth during a later update {rss:.2f} B/weight (indicative:"
                                         " the allocator reuses freed memory)"))
    m = results.get("methods")
    if m is not None:
        kernels = list(m["updates"])
        print(f"\none update of each method, {m['model']} (every update prunes for granet, granet-st, gmp), "
              f"/ dense step b8 ({m['dense_step_s'] * 1e3:.0f} ms):")
        print("| method | " + " | ".join(kernels) + " |")
        print("|---|" + "---|" * len(kernels))
        for i, row in enumerate(m["updates"][kernels[0]]):
            cells = [f"{m['updates'][k][i]['update_s'] * 1e3:.0f} ms ({m['updates'][k][i]['per_dense_step']:.3f})"
                     for k in kernels]
            print(f"| {row['method']} | " + " | ".join(cells) + " |")
    o = results.get("step_overhead")
    if o is None:
        return
    print(f"step overhead (GraNet / dense, {o['model']}): {o['ratio']:.3f} ({o['granet_step_s'] * 1e3:.1f} / "
          f"{o['dense_step_s'] * 1e3:.1f} ms, {o['topology_updates_in_timed_steps']} update(s)); from the time "
          f"in sparsifier.step() ({o['sparsifier_step_s'] * 1e3:.2f} ms per step, updates included): "
          f"{o['direct_ratio']:.4f}; target <= 1.02")


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark and print its table (``--json`` also writes the raw results)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small models, few repeats (smoke test)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--parts", default="cnn,methods,synthetic,step",
                        help="comma-separated subset of cnn (ResNet-50 GraNet updates), methods (every dynamic "
                             "method's update on the ResNet-50), synthetic (Linear stack), step")
    parser.add_argument("--kernels", default=None,
                        help="comma-separated subset of native (granet.kernels.native's fused selection kernels) and torch "
                             "(torch operations only, as where granet was installed without a C compiler) to time "
                             "updates with; default: both where the native kernels are built, else torch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    g = torch.Generator().manual_seed(0)
    if args.quick:
        models = [("resnet20 (CIFAR)", lambda: create_model("resnet20", num_classes=10, input_size=32),
                   (torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))),
                  ("synthetic Linear stack", lambda: synthetic_mlp(1 << 20, width=512),
                   (torch.randn(8, 512, generator=g), torch.randint(0, 512, (8,), generator=g)))]
        updates, steps, block, step_batch = [2, 2], 4, 2, 16
    else:
        models = [("imagenet_resnet50", lambda: create_model("imagenet_resnet50", num_classes=1000, input_size=224),
                   (torch.randn(8, 3, 224, 224, generator=g), torch.randint(0, 1000, (8,), generator=g))),
                  ("synthetic Linear stack", lambda: synthetic_mlp(100_000_000),
                   (torch.randn(8, 4096, generator=g), torch.randint(0, 4096, (8,), generator=g)))]
        updates, steps, block, step_batch = [5, 2], 200, 20, 128
    parts = set(args.parts.split(","))
    if not parts or parts - {"cnn", "methods", "synthetic", "step"}:
        parser.error(f"--parts takes a comma-separated subset of cnn,methods,synthetic,step, got {args.parts!r}")
    cnn_name, cnn_build, cnn_batch = models[0]
    keep = [("cnn" in parts), ("synthetic" in parts)]
    models = [m for m, k in zip(models, keep) if k]
    updates = [u for u, k in zip(updates, keep) if k]
    kernels = _kernels(parser, args.kernels)  # loads the native kernels before any timing
    bandwidth = copy_bandwidth(64 if args.quick else 256)
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick,
               "copy_bandwidth_bytes_per_s": bandwidth, "update_cost": []}
    before = native.set_enabled(True)
    try:
        for (name, build, batch), n_updates in zip(models, updates):
            for kernel in kernels:
                native.set_enabled(kernel == "native")
                torch.manual_seed(0)
                results["update_cost"].append(dict(update_cost(name, build(), batch, n_updates, bandwidth),
                                                   kernels=kernel))
                logger.info("%s", json.dumps(results["update_cost"][-1]))
                topk.release_scratch()
        logging.getLogger("granet").setLevel(logging.ERROR)  # schedule warnings of the short runs
        if "methods" in parts:
            results["methods"] = _methods_part(cnn_name, cnn_build, cnn_batch, kernels, 2 if args.quick else 5)
        native.set_enabled(kernels[0] == "native")
        if "step" in parts:
            results["step_overhead"] = dict(step_overhead(steps, block, step_batch), kernels=kernels[0])
    finally:
        native.set_enabled(before)
    _print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _methods_part(name: str, build: Callable[[], nn.Module], batch: tuple[torch.Tensor, torch.Tensor],
                  kernels: list[str], updates: int) -> dict:
    """Every dynamic method's update on the ``cnn`` model, with each kernel choice."""
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    dense_s = statistics.median(_train_step(model, opt, *batch) for _ in range(4))
    del model, opt
    out = {"model": name, "dense_step_s": dense_s, "updates": {}}
    for kernel in kernels:
        native.set_enabled(kernel == "native")
        out["updates"][kernel] = method_updates(build, dense_s, updates)
        logger.info("%s", json.dumps(out["updates"][kernel]))
    return out


def _kernels(parser: argparse.ArgumentParser, value: Optional[str]) -> list[str]:
    """The --kernels choice, validated (native only where the kernels build here)."""
    available = native.library() is not None  # None when turned off (GRANET_NATIVE=0) or not built
    if value is None:
        return ["native", "torch"] if available else ["torch"]
    kernels = value.split(",")
    if not kernels or set(kernels) - {"native", "torch"} or len(set(kernels)) != len(kernels):
        parser.error(f"--kernels takes a comma-separated subset of native,torch, got {value!r}")
    if "native" in kernels and not available:
        parser.error(f"--kernels native: the native kernels are {native.status()}")
    return kernels


if __name__ == "__main__":
    sys.exit(main())
