"""The device check: granet's CUDA paths in one run on one GPU, written to one JSON file.

    python benchmarks/device_check.py --out $OUT/device_check.json     # on a GPU machine (< 8 min)
    python benchmarks/device_check.py --dry-run --out /tmp/check.json  # rehearsal on the CPU (CI, ~1 min)

Parts, each recorded as ``ok`` / ``failed`` / ``skipped`` with its numbers (one failing part never
stops the others; the exit status is 1 when any part failed):

* ``cuda_tests`` — the CUDA tests of the suite (tests/test_cuda.py and the CUDA cases of
  test_inference.py, test_saliency.py and test_lottery.py): passed / failed / skipped counts.
* ``mask_equality`` — for every sparsifier method, the same run on the CPU and on the device, with
  the weights moved and the gradients set from one CPU generator so that every arithmetic operation
  is a single rounded IEEE operation on both (SGD with lr 0 keeps only momentum; weights change by
  ``p += delta``): the masks must be equal (``torch.equal``) after every step, and so must the
  weights at the end. The methods that score at initialisation (snip, grasp, synflow) score through
  forward and backward passes, whose float rounding differs between devices; for them the counts
  must be equal and the share of positions where the masks agree is reported.
* ``update_cost`` — one GraNet topology update (global prune + drop + gradient regrowth) on the
  ImageNet ResNet-50 over one dense training step at batch 64 (medians, synchronised), and the host
  synchronisations one update makes (counted with ``torch.cuda.set_sync_debug_mode``).
* ``step_overhead`` — GraNet training step / dense training step, CIFAR ResNet-20, batch 128
  (interleaved blocks, medians; one topology update per 100 steps).
* ``amp_bf16`` — GraNet training steps under bf16 autocast: finite loss, exact active counts,
  inactive weights and momentum exactly zero.
* ``semi_structured`` — 2:4 masks turned into ``torch.sparse`` semi-structured Linear layers
  (fp16, compute capability >= 8.0): output agreement with the dense layer and the speed ratio.

``--dry-run`` runs every part on the CPU with small models (the "device" is the CPU), so the script
itself is tested in CI; its numbers say nothing about a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

import granet
from granet.kernels import native
from granet.methods import list_methods
from granet.models import create_model

ROOT = Path(__file__).resolve().parents[1]
#: Methods that score at initialisation (masks follow device-dependent forward/backward rounding).
AT_INIT = ("snip", "grasp", "synflow")
#: The files holding the suite's CUDA tests, and the name filter that selects those tests in them.
CUDA_TESTS = ["tests/test_cuda.py", "tests/test_inference.py", "tests/test_saliency.py", "tests/test_lottery.py"]
CUDA_TEST_FILTER = "cuda or semi_structured"
PARTS = ("cuda_tests", "mask_equality", "update_cost", "step_overhead", "amp_bf16", "semi_structured")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------- parts


def cuda_tests() -> dict[str, Any]:
    """Run the suite's CUDA tests in a subprocess; counts from its JUnit XML."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-k",
                   CUDA_TEST_FILTER, f"--junitxml={report}", *CUDA_TESTS]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=360)
        elapsed = time.perf_counter() - start
        if not report.exists():
            return {"status": "failed", "error": "pytest wrote no report",
                    "tail": done.stdout[-2000:] + done.stderr[-2000:]}
        suite = ElementTree.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                  if case.find("failure") is not None or case.find("error") is not None]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    status = "failed" if failed or done.returncode not in (0, 5) else "ok"
    return {"status": status, "command": " ".join(command[1:]), "seconds": round(elapsed, 1), **counts,
            "failed_tests": failed}


def _small_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))


def _exact_run(method: str, device: torch.device, steps: int,
               seed: int) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """Masks after every step and the final weights (on the CPU) of a run whose arithmetic is exact."""
    torch.manual_seed(seed)
    model = _small_model().to(device)  # initialised on the CPU, then moved: the same weights everywhere
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    options = {} if method == "dense" else {"density": 0.1, "update_interval": 2}
    sparsifier = granet.create_sparsifier(method, model, opt, total_steps=steps, **options)
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(seed + 1)
    masks = []
    for _ in range(steps):
        with torch.no_grad():
            for p in params:
                p.add_((0.01 * torch.randn(p.shape, generator=generator)).to(device))
                p.grad = torch.randn(p.shape, generator=generator).to(device)
        opt.step()
        sparsifier.step()
        masks.append([m.cpu() for m in sparsifier.masks.values()])
    return masks, [p.detach().cpu() for p in params]


def _at_init_masks(method: str, device: torch.device, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    model = _small_model().to(device)
    sparsifier = granet.create_sparsifier(method, model, None, density=0.1, total_steps=10)
    generator = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(16, 3, 16, 16, generator=generator), torch.randint(0, 10, (16,), generator=generator)
    granet.prune_at_init(sparsifier, model, (x.to(device), y.to(device)))
    return [m.cpu() for m in sparsifier.masks.values()]


def mask_equality(device: torch.device, steps: int = 12, seed: int = 0) -> dict[str, Any]:
    """Every method on the CPU and on ``device``: equal masks at every step (see the module docstring)."""
    rows, status = [], "ok"
    for method in list_methods():
        if method in AT_INIT:
            cpu, dev = _at_init_masks(method, torch.device("cpu"), seed), _at_init_masks(method, device, seed)
            same_counts = [int(a.sum()) for a in cpu] == [int(b.sum()) for b in dev]
            agree = sum(int((a == b).sum()) for a, b in zip(cpu, dev)) / sum(a.numel() for a in cpu)
            rows.append({"method": method, "kind": "scored at init", "counts_equal": same_counts,
                         "masks_equal": all(torch.equal(a, b) for a, b in zip(cpu, dev)), "agreement": agree})
            status = status if same_counts else "failed"
            continue
        (cpu_masks, cpu_weights), (dev_masks, dev_weights) = (_exact_run(method, torch.device("cpu"), steps, seed),
                                                              _exact_run(method, device, steps, seed))
        first_diff = next((t + 1 for t, (a, b) in enumerate(zip(cpu_masks, dev_masks))
                           if not all(torch.equal(x, y) for x, y in zip(a, b))), None)
        weights_equal = all(torch.equal(a, b) for a, b in zip(cpu_weights, dev_weights))
        moved = sum(int((a != b).sum()) for a, b in zip(cpu_masks[0], cpu_masks[-1]))
        rows.append({"method": method, "kind": "exact", "steps": steps, "masks_equal": first_diff is None,
                     "first_differing_step": first_diff, "weights_equal": weights_equal,
                     "mask_entries_changed_over_run": moved})
        if first_diff is not None or not weights_equal:
            status = "failed"
    return {"status": status, "methods": rows}


def update_cost(device: torch.device, small: bool) -> dict[str, Any]:
    """One GraNet update / one dense step on the ResNet-50, and the host syncs of one update."""
    torch.manual_seed(0)
    if small:
        model, batch, size = create_model("resnet20", num_classes=10, input_size=32), 8, 32
    else:
        model, batch, size = create_model("imagenet_resnet50", num_classes=1000, input_size=224), 64, 224
    model = model.to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def dense_step() -> None:
        opt.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):
        dense_step()
    updates = 3 if small else 8
    sparsifier = granet.create_sparsifier("granet", model, opt, density=0.1, total_steps=4 * updates + 4,
                                          update_interval=1, prune_end=2 * updates + 2)
    dense, update, syncs = [], [], []
    for t in range(updates + 1):
        dense.append(_timed(dense_step, device))
        if device.type == "cuda" and t > 0:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    elapsed = _timed(sparsifier.step, device)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs.append(sum("synchroniz" in str(w.message) for w in caught))
        else:
            elapsed = _timed(sparsifier.step, device)
        if t > 0:  # the first update allocates its scratch buffers
            update.append(elapsed)
    dense_s, update_s = statistics.median(dense), statistics.median(update)
    return {"status": "ok", "model": "resnet20 b8 (dry run)" if small else "imagenet_resnet50 b64",
            "dense_step_s": dense_s, "update_s": update_s, "update_per_dense_step": update_s / dense_s,
            "host_syncs_per_update": statistics.median(syncs) if syncs else None, "updates": len(update),
            "density_after": sparsifier.density()}


def step_overhead(device: torch.device, small: bool) -> dict[str, Any]:
    """GraNet step / dense step on the CIFAR ResNet-20 at batch 128 (interleaved blocks)."""
    torch.manual_seed(0)
    batch, blocks, block = (16, 3, 3) if small else (128, 15, 20)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    runs = {}
    for name in ("dense", "granet"):
        model = create_model("resnet20", num_classes=10, input_size=32).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        sparsifier = None if name == "dense" else granet.create_sparsifier(
            "granet", model, opt, density=0.1, total_steps=100 * blocks * block, update_interval=100,
            prune_end=50 * blocks * block)
        runs[name] = (model, opt, sparsifier, [])

    def run_block(model: nn.Module, opt: torch.optim.Optimizer, sparsifier: Optional[granet.Sparsifier]) -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(block):
            opt.zero_grad(set_to_none=False)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if sparsifier is not None:
                sparsifier.step()
        _sync(device)
        return (time.perf_counter() - start) / block

    for model, opt, sparsifier, _ in runs.values():  # warm-up
        run_block(model, opt, sparsifier)
    for _ in range(blocks):
        for model, opt, sparsifier, times in runs.values():
            times.append(run_block(model, opt, sparsifier))
    dense, sparse = statistics.median(runs["dense"][3]), statistics.median(runs["granet"][3])
    return {"status": "ok", "model": f"resnet20 b{batch}", "blocks": blocks, "block": block,
            "dense_step_s": dense, "granet_step_s": sparse, "ratio": sparse / dense}


def amp_bf16(device: torch.device, steps: int = 20) -> dict[str, Any]:
    """GraNet under bf16 autocast: finite loss, exact counts, inactive weights and momentum zero."""
    torch.manual_seed(0)
    model = _small_model().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sparsifier = granet.create_sparsifier("granet", model, opt, density=0.1, total_steps=steps, update_interval=4)
    losses, problems = [], []
    for t in range(steps):
        x = torch.randn(16, 3, 16, 16, device=device)
        y = torch.randint(0, 10, (16,), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsifier.step()
        losses.append(float(loss.detach()))
        for name, p, m in zip(sparsifier.names, sparsifier.params, sparsifier.masks.values()):
            if torch.count_nonzero(p[~m]) or torch.count_nonzero(opt.state[p]["momentum_buffer"][~m]):
                problems.append(f"step {t + 1}: {name} has non-zero inactive weights or momentum")
    target = round(sparsifier.target_density() * sparsifier.total)
    counts_exact = sum(sparsifier.counts) == target
    finite = all(map(lambda v: v == v and abs(v) != float("inf"), losses))
    ok = finite and counts_exact and not problems
    return {"status": "ok" if ok else "failed", "steps": steps, "final_loss": losses[-1], "losses_finite": finite,
            "active": sum(sparsifier.counts), "target_active": target, "problems": problems[:5]}


def semi_structured(device: torch.device) -> dict[str, Any]:
    """2:4 Linear layers through torch's semi-structured kernels (CUDA, compute capability >= 8.0)."""
    if device.type != "cuda":
        return {"status": "skipped", "reason": "2:4 semi-structured kernels need CUDA"}
    if torch.cuda.get_device_capability(device) < (8, 0):
        return {"status": "skipped", "reason": f"compute capability {torch.cuda.get_device_capability(device)} < 8.0"}
    from granet.deploy.inference import to_semi_structured
    from granet.sparsity.structure import keep_top_per_group

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096)).half().to(device).eval()
    with torch.no_grad():
        for layer in (model[0], model[2]):  # the library's 2:4 mask: the 2 largest of every 4 consecutive inputs
            layer.weight.mul_(keep_top_per_group(layer.weight.float().abs(), 4, 2))
    sparse = to_semi_structured(model)
    x = torch.randn(1024, 4096, device=device, dtype=torch.float16)
    with torch.inference_mode():
        dense_out, sparse_out = model(x), sparse(x)
        error = float((dense_out - sparse_out).abs().max() / dense_out.abs().max())
        dense_t = statistics.median(_timed(lambda: model(x), device) for _ in range(20))
        sparse_t = statistics.median(_timed(lambda: sparse(x), device) for _ in range(20))
    return {"status": "ok" if error < 1e-2 else "failed", "shape": "2 x Linear(4096, 4096) fp16, batch 1024",
            "max_relative_error": error, "dense_s": dense_t, "sparse_s": sparse_t, "speedup": dense_t / sparse_t}


# ---------------------------------------------------------------------------- driver


def _part(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    print(f"[device_check] {name} ...", flush=True)
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # one failing part never stops the others; the JSON keeps the reason
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc(limit=8)[-3000:]}
    result["seconds"] = round(time.perf_counter() - start, 2)
    print(f"[device_check] {name}: {result['status']} ({result['seconds']} s)", flush=True)
    return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every part on the CPU with small models (tests the script; no GPU figures)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts to run (default: all)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device is available; use --dry-run to rehearse on the CPU")
    if args.out.parent and not args.out.parent.is_dir():
        parser.error(f"--out: directory {args.out.parent} does not exist")
    device = torch.device("cpu" if args.dry_run else "cuda")
    small = args.dry_run
    parts: dict[str, Callable[[], dict[str, Any]]] = {
        "cuda_tests": cuda_tests,
        "mask_equality": lambda: mask_equality(device),
        "update_cost": lambda: update_cost(device, small),
        "step_overhead": lambda: step_overhead(device, small),
        "amp_bf16": lambda: amp_bf16(device),
        "semi_structured": lambda: semi_structured(device),
    }
    chosen = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in parts]
    if unknown:
        parser.error(f"--parts: unknown part {unknown[0]!r}; valid: {', '.join(parts)}")
    start = time.perf_counter()
    results = {name: _part(name, parts[name]) for name in chosen}
    record = {
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "granet": granet.__version__,
        "native_kernels": native.status(),
        "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "wall_s": round(time.perf_counter() - start, 1), "parts": results,
    }
    args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    failed = [name for name, r in results.items() if r["status"] == "failed"]
    print(f"[device_check] wrote {args.out}; " + (f"FAILED: {', '.join(failed)}" if failed else "no part failed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
