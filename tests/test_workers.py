"""Layer threads (granet.kernels.layer_threads): order, fallbacks, errors, grad mode, and bit-identical updates."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import granet
from granet.kernels import layer_threads as workers


def test_layer_map_keeps_order_and_uses_the_pool(two_threads):
    names = workers.layer_map(lambda i: (i, threading.current_thread().name), 40, cpu=True)
    assert [i for i, _ in names] == list(range(40))
    assert all(name.startswith("granet-layer") for _, name in names)
    # Pool threads run their kernels on torch.get_num_threads() // pool threads (1 here).
    assert workers.layer_map(lambda i: torch.get_num_threads(), 4, cpu=True) == [1, 1, 1, 1]


def test_layer_map_runs_in_place_off_cpu_single_threaded_and_nested(two_threads):
    here = threading.current_thread().name
    assert {n for n in workers.layer_map(lambda i: threading.current_thread().name, 5, cpu=False)} == {here}
    # Nested calls run inside the layer thread that made them (no pool waiting on itself).
    nested = workers.layer_map(lambda i: workers.layer_map(lambda j: threading.current_thread().name, 3, True), 2, True)
    assert all(len(set(names)) == 1 and names[0].startswith("granet-layer") for names in nested)
    torch.set_num_threads(1)
    assert {n for n in workers.layer_map(lambda i: threading.current_thread().name, 5, cpu=True)} == {here}


def test_layer_map_reraises_and_carries_grad_mode(two_threads):
    def fail(i: int) -> int:
        if i == 3:
            raise RuntimeError("layer 3 failed")
        return i

    with pytest.raises(RuntimeError, match="layer 3 failed"):
        workers.layer_map(fail, 6, cpu=True)
    with torch.no_grad():
        assert workers.layer_map(lambda i: torch.is_grad_enabled(), 4, cpu=True) == [False] * 4
    assert workers.layer_map(lambda i: torch.is_grad_enabled(), 4, cpu=True) == [True] * 4


def _run(update_threads: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """GraNet on layers above the bracketed-selection size, 12 steps; the training steps run on one
    thread (identical floats), the sparsifier's steps on ``update_threads``."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(300, 400), nn.ReLU(), nn.Linear(400, 300), nn.ReLU(), nn.Linear(300, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        s = granet.create_sparsifier("granet", model, opt, density=0.1, total_steps=12, update_interval=2,
                                     prune_end=8, track_exploration=True)
        g = torch.Generator().manual_seed(1)
        for _ in range(12):
            x, y = torch.randn(32, 300, generator=g), torch.randint(0, 10, (32,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            torch.set_num_threads(update_threads)
            s.step()
            torch.set_num_threads(1)
        return list(s.masks.values()), [p.detach().clone() for p in s.params], list(s.counts)
    finally:
        torch.set_num_threads(before)


def test_updates_are_identical_on_one_and_two_threads():
    masks_1, weights_1, counts_1 = _run(1)
    masks_2, weights_2, counts_2 = _run(2)
    assert counts_1 == counts_2
    assert all(torch.equal(a, b) for a, b in zip(masks_1, masks_2))
    assert all(torch.equal(a, b) for a, b in zip(weights_1, weights_2))
    assert [int(m.sum()) for m in masks_1] == counts_1


def test_scratch_is_per_thread_and_counted_over_all_threads(two_threads):
    from granet.kernels import topk

    topk.release_scratch()
    assert topk.scratch_bytes() == 0

    def use(i: int) -> str:
        topk.scratch(4096, torch.float32, torch.device("cpu"), slot=7)
        return threading.current_thread().name

    threads = set(workers.layer_map(use, 8, cpu=True))
    assert topk.scratch_bytes() == 4096 * 4 * len(threads)
    topk.release_scratch()
    assert topk.scratch_bytes() == 0


def test_changing_the_thread_count_starts_a_new_pool_and_keeps_working(two_threads):
    assert workers.layer_map(lambda i: torch.get_num_threads(), 3, cpu=True) == [1, 1, 1]
    torch.set_num_threads(4)  # 4 layer threads of 1 intra-op thread each
    names = workers.layer_map(lambda i: (torch.get_num_threads(), threading.current_thread().name), 8, cpu=True)
    assert {t for t, _ in names} == {1} and all(n.startswith("granet-layer") for _, n in names)
    torch.set_num_threads(2)
    assert workers.layer_map(lambda i: i * i, 5, cpu=True, costs=[1, 5, 2, 4, 3]) == [0, 1, 4, 9, 16]


def test_threads_started_later_keep_the_callers_count(two_threads):
    torch.set_num_threads(3)  # a new pool: its threads start during this call
    workers.layer_map(lambda i: i, 3, cpu=True)
    seen = []
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert seen == [3] and torch.get_num_threads() == 3

