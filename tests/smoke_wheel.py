"""Smoke test of an installed granet (not collected by pytest): CI builds a wheel, installs it into
a clean virtual environment and runs this there, from outside the source tree.

It trains a small sparse model twice, in this process with the native kernels (which must be
built into the wheel, loaded and actually called) and in a child process with ``GRANET_NATIVE=0``
(the torch operations a machine without the kernels runs), and checks that the masks are equal::

    python tests/smoke_wheel.py            # exit status 0: both runs agree, the kernels ran
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import granet
from granet.kernels import native


def train() -> list[torch.Tensor]:
    """GraNet on layers above the size where selections run as bracketed passes (the kernels' part)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)  # one thread: the same floats in both runs
    model = nn.Sequential(nn.Linear(300, 400), nn.ReLU(), nn.Linear(400, 300), nn.ReLU(), nn.Linear(300, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier = granet.create_sparsifier("granet", model, opt, density=0.05, total_steps=14, update_interval=2,
                                          prune_end=10)
    g = torch.Generator().manual_seed(1)
    for _ in range(14):
        x, y = torch.randn(32, 300, generator=g), torch.randint(0, 10, (32,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sparsifier.step()
    return [m.clone() for m in sparsifier.masks.values()]


def _count_calls(names: list[str]) -> dict[str, int]:
    """Wrap granet.kernels.native's kernel functions (looked up on the module by their callers) to count calls."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        def counted(*args, _name=name, _fn=getattr(native, name), **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)
        setattr(native, name, counted)
    return calls


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--torch-masks":  # the child: GRANET_NATIVE=0
        assert not native.available() and native.status() == "off (GRANET_NATIVE=0)", native.status()
        torch.save(train(), sys.argv[2])
        return 0
    source_tree = Path(__file__).resolve().parents[1] / "src"
    assert source_tree not in Path(granet.__file__).resolve().parents, f"granet imported from {granet.__file__}"
    assert native.available() and native.status().startswith("in use ("), native.status()
    calls = _count_calls(["band", "compact", "zero_outside"])
    masks = train()
    assert all(calls.values()), f"kernels not called: {calls}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "masks.pt")
        subprocess.run([sys.executable, __file__, "--torch-masks", path], check=True,
                       env={**os.environ, "GRANET_NATIVE": "0"})
        reference = torch.load(path, weights_only=True)
    assert len(masks) == len(reference) == 3
    assert all(torch.equal(a, b) for a, b in zip(masks, reference)), "masks differ with and without the kernels"
    active = sum(int(m.sum()) for m in masks)
    print(f"wheel smoke test: granet {granet.__version__} from {Path(granet.__file__).parent}, native kernels "
          f"{native.status()} (calls: {calls}); masks equal to the torch operations' ({active} active weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
