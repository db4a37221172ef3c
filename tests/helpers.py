"""Small models and loops shared by the engine tests."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


def tiny_cnn(seed: int = 0, classes: int = 5) -> nn.Module:
    """Conv + BN + Linear: exercises conv kernels, dense norm layers and biases."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, classes),
    )


def tiny_mlp(seed: int = 0, classes: int = 5) -> nn.Module:
    """A bias-free-BN MLP on 3x6x6 inputs."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(108, 40), nn.ReLU(), nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, classes))


def batch(step: int, n: int = 8, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic batch that depends only on the step (so resumed runs see the same data)."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, classes, (n,), generator=g)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Forward, backward and optimizer step on the step's batch (grads left in place)."""
    x, y = batch(step)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a torchrun rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, args: list, **popen):
    """Start ``torchrun --nproc_per_node=nproc -m granet ARGS`` on 127.0.0.1 in its own session (one torch
    thread per process); stderr is piped for the caller's assertions."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root / "src"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "granet", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **popen)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts each worker in a session of its own, so killing
    the launcher's process group does not reach them)."""
    from pathlib import Path

    out = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                out += [int(child), *descendants(int(child))]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it, workers first (a power cut for a torchrun job)."""
    import contextlib
    import os
    import signal

    for victim in [*reversed(descendants(pid)), pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def spawn_ranks(target, args_per_rank: list, timeout_s: float) -> tuple[list, list[int]]:
    """Run ``target(*args)`` in one spawned process per rank, all waited for within ``timeout_s``.

    Returns the processes and the ranks still running at the deadline (killed and reaped here; only
    the processes this call started are touched).
    """
    import multiprocessing
    import time

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=args) for args in args_per_rank]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    return procs, hung


def run_rank(scenario, rank: int, world: int, init_method: str, out_dir: str, timeout_s: float) -> None:
    """Spawned entry point of one gloo rank: join the group, save ``scenario(rank)``'s result as
    ``out_dir/rank{rank}.pt`` (or the traceback as ``rank{rank}.err``), then leave at once.

    gloo's teardown (destroy_process_group, then interpreter finalisation with its threads still
    alive) occasionally aborts with "terminate called without an active exception" when the peer
    has just exited (seen once in a few dozen runs). The result is on disk and every rank is past
    its last collective (the barrier), so the process exits without that teardown.
    """
    import datetime
    import os
    import sys
    import traceback

    import torch.distributed as dist

    torch.set_num_threads(1)  # the ranks share the CPU cores
    out = Path(out_dir)
    try:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        torch.save(scenario(rank), out / f"rank{rank}.part")
        (out / f"rank{rank}.part").replace(out / f"rank{rank}.pt")  # never a half-written result
        dist.barrier()  # no rank closes its sockets while another still talks to it
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str) -> ModuleType:
    """A script of the repository that is not part of the package (``benchmarks/x.py``,
    ``configs/make_recipes.py``), imported as a module."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class AtenCalls(TorchDispatchMode):
    """Records the aten operations run inside ``with AtenCalls() as calls:``: ``calls.names``, and
    ``calls.calls`` as ``(name, args)`` pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func), args))
        return func(*args, **(kwargs or {}))
