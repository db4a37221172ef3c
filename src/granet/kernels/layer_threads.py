"""Per-layer work of a topology update spread over CPU threads.

Most of an update's time on a CPU goes to operations that use one core however many torch has
(``nonzero``, ``kthvalue``, gathers, and the many small operations of small layers), so the other
cores sit idle. :func:`layer_map` runs independent per-layer computations on a small pool of
threads instead (torch releases the GIL inside its kernels). Each layer's result is a function of
its inputs alone, so the masks are identical to a sequential run, bit for bit.

The pool has ``min(torch.get_num_threads(), 4)`` threads, each running its kernels on
``torch.get_num_threads() // pool`` threads (intra-op threads are per thread in torch), so the
update uses the cores torch was given and no more.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence, TypeVar

import torch

#: The type of the result of one layer's work.
T = TypeVar("T")

#: At most this many layer threads: beyond it the largest layer dominates and intra-op threads help more.
MAX_LAYER_THREADS = 4

_pool: Optional[ThreadPoolExecutor] = None
_pool_key = (0, 0)
_lock = threading.Lock()
_inside = threading.local()  # .layer_thread is True on the pool's own threads


def _forget_pool() -> None:
    """In a forked child the pool's threads do not exist: start a new pool on demand."""
    global _pool, _pool_key
    _pool, _pool_key = None, (0, 0)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _get_pool(size: int, intra: int) -> ThreadPoolExecutor:
    global _pool, _pool_key
    with _lock:
        if _pool is None or _pool_key != (size, intra):
            # The old pool is only dropped, not shut down: a caller may still be submitting to it;
            # its threads exit once it is garbage-collected and its queue is empty.
            _pool = ThreadPoolExecutor(size, thread_name_prefix="granet-layer",
                                       initializer=_start_layer_thread, initargs=(intra,))
            _pool_key = (size, intra)
        return _pool


def _start_layer_thread(intra: int) -> None:
    _inside.layer_thread = True
    # torch sets a thread's intra-op count lazily, from the process-wide value, at its first use;
    # trigger that first, so that a later change of the process-wide value (another thread calling
    # torch.set_num_threads) cannot override the count set here.
    torch.get_num_threads()
    torch.set_num_threads(intra)


def on_cpu(tensors: Sequence[Optional[torch.Tensor]]) -> bool:
    """Whether every given tensor (``None`` entries skipped) is on the CPU."""
    return all(t is None or t.device.type == "cpu" for t in tensors)


def layer_map(fn: Callable[[int], T], n: int, cpu: bool, costs: Optional[Sequence[int]] = None) -> list[T]:
    """``[fn(i) for i in range(n)]``, on the layer threads when ``cpu`` (the work is on CPU tensors).

    ``costs`` (e.g. layer sizes) orders the work largest first, so that a large layer does not
    start last and leave the other threads idle; results come back in index order either way.
    Runs in order on the calling thread when ``cpu`` is false, when torch uses one thread, and
    inside a layer thread (pools never nest: a layer thread waiting for its own pool could
    deadlock). Grad mode, which is per thread, is carried over; the first exception raised by
    ``fn`` is re-raised here.
    """
    threads = torch.get_num_threads()
    if not cpu or threads < 2 or n < 2 or getattr(_inside, "layer_thread", False):
        return [fn(i) for i in range(n)]
    size = min(threads, MAX_LAYER_THREADS)
    grad = torch.is_grad_enabled()

    def call(i: int) -> T:
        with torch.set_grad_enabled(grad):
            return fn(i)

    order = list(range(n)) if costs is None else sorted(range(n), key=lambda i: -costs[i])
    pool = _get_pool(size, max(1, threads // size))
    futures = {i: pool.submit(call, i) for i in order}
    try:
        return [futures[i].result() for i in range(n)]
    finally:
        # A layer thread that just started set torch's process-wide count (the one threads started
        # later begin with) to its own: put back this thread's, which is unchanged.
        torch.set_num_threads(threads)
