"""Multi-process tests of mask synchronisation (``granet.parallel.mask_sync``) on the gloo backend.

Each multi-process test spawns 2 fresh processes (``spawn`` start method, ``file://`` rendezvous in
a temporary directory) that run one *scenario* function of this module and write their results to
``rank<r>.pt``; an exception is written to ``rank<r>.err`` instead. A group that does not finish
within ``GROUP_TIMEOUT_S`` is killed and the test fails, so a deadlocked collective cannot block CI.
The training scenario runs once per session (a fixture shared by three tests, and by pytest-xdist
workers) because starting Python + torch in two processes is most of the cost.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from filelock import FileLock
from helpers import batch, run_rank, spawn_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import granet
from granet.baselines.saliency import needs_init_scoring
from granet.parallel import mask_sync as gd
from granet.sparsity.sparsifier import Sparsifier
from granet.sparsity.updater import TopologyUpdater

WORLD = 2
GROUP_TIMEOUT_S = 150  # whole spawned group, start-up included (2 shared CPU cores)
COLLECTIVE_TIMEOUT_S = 60  # gloo: a collective waiting this long raises in the worker
TRAIN_STEPS = 20
MATCH_STEPS = 30
INIT_METHODS = ["static", "rigl", "set", "granet-st"]
MATCH_METHODS = ["rigl", "granet"]


# ---------------------------------------------------------------------------------------------- helpers


def conv_net(seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Conv + Linear, no batch norm: DDP then keeps every rank's weights bit-identical."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5),
    ).to(dtype)


def options(method: str, steps: int) -> dict:
    out = dict(total_steps=steps, update_interval=5)
    if method != "dense":
        out["density"] = 0.2
    return out


def small_rigl(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, **kw: object) -> Sparsifier:
    return granet.create_sparsifier("rigl", model, optimizer, density=0.2, total_steps=12, update_interval=4, **kw)


def train(method: str, rank: int, world: int, steps: int, dtype: torch.dtype, global_batch: int) -> dict:
    """Train ``conv_net`` for ``steps`` steps; with ``world > 1`` under DDP on a slice of each batch.

    Every rank's model starts from a different seed (rank 0's is the single-process model): DDP's
    broadcast at wrap time, and the sparsifier's at construction, must make that irrelevant.
    """
    model: nn.Module = conv_net(seed=rank, dtype=dtype)
    if world > 1:
        model = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    s = granet.create_sparsifier(method, model, opt, **options(method, steps))
    assert s.distributed == (world > 1)
    local = global_batch // world
    if needs_init_scoring(method):  # each rank scores its own data; rank 0's mask must win
        x, y = batch(0, n=global_batch)
        granet.prune_at_init(s, model, (x[rank * local:(rank + 1) * local].to(dtype), y[rank * local:(rank + 1) * local]))
    updates = []
    for t in range(1, steps + 1):
        x, y = batch(t, n=global_batch)
        x, y = x[rank * local:(rank + 1) * local].to(dtype), y[rank * local:(rank + 1) * local]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        report = s.step()
        if report is not None:
            updates.append({"step": report.step, "skipped": report.skipped, "masks": [m.clone() for m in s.masks.values()]})
    return {
        "updates": updates,
        "masks": [m.clone() for m in s.masks.values()],
        "weights": [p.detach().clone() for p in model.parameters()],
        "exploration": s.exploration_rate(),
    }


def run_group(tmp: Path, scenario: str) -> list[dict]:
    """Run ``scenario`` on ``WORLD`` spawned gloo ranks; their results, by rank."""
    tmp.mkdir(parents=True, exist_ok=True)
    init_method = f"file://{tmp / 'rendezvous'}"
    procs, hung = spawn_ranks(run_rank, [(SCENARIOS[scenario], r, WORLD, init_method, str(tmp), COLLECTIVE_TIMEOUT_S)
                                        for r in range(WORLD)], GROUP_TIMEOUT_S)
    errors = {r: (tmp / f"rank{r}.err").read_text() for r in range(WORLD) if (tmp / f"rank{r}.err").exists()}
    if hung:
        pytest.fail(f"scenario {scenario!r}: rank(s) {hung} still running after {GROUP_TIMEOUT_S}s; errors: {errors}")
    saved = all((tmp / f"rank{r}.pt").exists() for r in range(WORLD))
    if errors or not saved:
        pytest.fail(f"scenario {scenario!r} failed (exit codes {[p.exitcode for p in procs]}): {errors}")
    if any(p.exitcode != 0 for p in procs):  # only possible after every result was saved
        codes = [p.exitcode for p in procs]
        warnings.warn(f"scenario {scenario!r}: exit codes {codes} after every rank saved its result")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def equal_lists(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------- scenarios


def scenario_init(rank: int) -> dict:
    """Ranks seeded differently, and rank 1 drawing *different* masks: construction must fix that."""
    out = {}
    original = TopologyUpdater.initial_masks
    for method in INIT_METHODS:
        drawn: list[torch.Tensor] = []

        def shifted(self: TopologyUpdater, params: list[torch.Tensor]) -> list[torch.Tensor]:
            # Same counts, other positions: what a rank with another RNG stream would have drawn.
            masks = [m.reshape(-1).roll(1).view_as(m) for m in original(self, params)]
            drawn.extend(m.clone() for m in masks)
            return masks

        if rank == 1:
            TopologyUpdater.initial_masks = shifted  # type: ignore[method-assign]
        try:
            torch.manual_seed(1234 + 17 * rank)
            model = conv_net(seed=10 + rank)  # different weights on each rank, no DDP
            s = granet.create_sparsifier(method, model, None, **options(method, 20))
        finally:
            TopologyUpdater.initial_masks = original  # type: ignore[method-assign]
        out[method] = {
            "distributed": s.distributed,
            "drawn": drawn,
            "masks": [m.clone() for m in s.masks.values()],
            "counts": list(s.counts),
            "ever_active": [e.clone() for e in s.ever_active],
            "zero_outside": all(int(torch.count_nonzero(p[~m])) == 0 for p, m in zip(s.params, s.masks.values())),
            "weights": [p.detach().clone() for p in s.params],
        }
    return out


def scenario_train(rank: int) -> dict:
    """Every method under DDP in float32, and the float64 runs compared with one process."""
    return {
        "train": {m: train(m, rank, WORLD, TRAIN_STEPS, torch.float32, 16) for m in granet.list_methods()},
        # float64: the 1-process run sums the per-sample gradients of 16 samples in one order, DDP
        # sums two means of 8 and halves; in float32 the last bits differ, which can flip a near-tie
        # in the magnitude/gradient ranking and fork the masks. In float64 those errors (~1e-16)
        # are far below any gap between the scores being ranked.
        "match": {m: train(m, rank, WORLD, MATCH_STEPS, torch.float64, 16) for m in MATCH_METHODS},
    }


def scenario_diverge(rank: int) -> dict:
    """Deliberate divergences: every one must raise on both ranks (and never deadlock)."""
    out: dict = {}
    model = conv_net(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    s = granet.create_sparsifier("rigl", model, opt, density=0.2, total_steps=20, update_interval=1)
    reference = [m.clone() for m in s.masks.values()]

    # 1. One flipped entry on rank 1 only.
    if rank == 1:
        s.mask_of(s.names[2]).view(-1)[7] ^= True  # corrupt the live mask on purpose
    try:
        s.verify_masks()
        out["flip"] = None
    except gd.MaskDivergenceError as err:
        out["flip"] = str(err)
    # Rank 0's masks win; afterwards verification passes again.
    s.broadcast_masks()
    s.verify_masks()
    out["healed"] = [m.clone() for m in s.masks.values()]
    out["healed_equal_reference"] = equal_lists(out["healed"], reference)

    # 2. A broadcast from rank 1 of masks only rank 1 changed (counts change too).
    if rank == 1:
        s.mask_of(s.names[0]).view(-1)[: s.sizes[0] // 2] = True
    s.broadcast_masks(src=1)
    out["from_rank1"] = [m.clone() for m in s.masks.values()]
    out["counts_from_rank1"] = list(s.counts)
    out["zero_outside"] = all(int(torch.count_nonzero(p[~m])) == 0 for p, m in zip(s.params, s.masks.values()))

    # 3. Non-finite gradients on rank 1 only (no DDP to all-reduce them): rank 1 skips the update,
    # rank 0 makes it, both verify, both raise (rather than rank 0 waiting forever).
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    if rank == 1:
        s.params[0].grad.view(-1)[0] = float("nan")
    opt.step()
    try:
        s.step()
        out["skip"] = None
    except gd.MaskDivergenceError as err:
        out["skip"] = str(err)
    out["skipped_updates"] = s.skipped_updates

    # 4. A different config on rank 1: construction refuses before broadcasting anything.
    try:
        granet.create_sparsifier("rigl", conv_net(seed=0), None, density=0.2, total_steps=20, update_interval=5,
                                 seed=rank)
        out["config"] = None
    except gd.MaskDivergenceError as err:
        out["config"] = str(err)

    # 5. Resume: rank 1 loads a checkpoint with other masks; load_state_dict leaves rank 0's on both.
    s2 = granet.create_sparsifier("rigl", conv_net(seed=0), None, density=0.2, total_steps=20, update_interval=5)
    state = s2.state_dict()
    out["saved"] = [m.clone() for m in state["masks"].values()]
    if rank == 1:
        state["masks"] = {n: m.reshape(-1).roll(3).view_as(m) for n, m in state["masks"].items()}
    s2.load_state_dict(state)
    out["resumed"] = [m.clone() for m in s2.masks.values()]
    # 6. Checkpoints of different steps: refused, naming the steps.
    state["step"] = 3 + rank
    try:
        s2.load_state_dict(state)
        out["resume_step"] = None
    except gd.MaskDivergenceError as err:
        out["resume_step"] = str(err)
    return out


SCENARIOS = {"init": scenario_init, "train": scenario_train, "diverge": scenario_diverge}


# ---------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The training scenario's results, computed once per test session.

    Under pytest-xdist every worker would run a module fixture again; the workers' temporary
    directories share a per-session parent, so the first worker runs the group under a file lock
    and the others load its results.
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return run_group(tmp_path_factory.mktemp("train"), "train")
    shared = tmp_path_factory.getbasetemp().parent / "distributed-train"
    with FileLock(str(shared) + ".lock"):  # filelock: a dependency of torch
        if not (shared / "complete").exists():
            results = run_group(shared, "train")
            (shared / "complete").touch()
            return results
    return [torch.load(shared / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_masks_broadcast_at_construction(tmp_path: Path) -> None:
    results = run_group(tmp_path, "init")
    for method in INIT_METHODS:
        r0, r1 = results[0][method], results[1][method]
        assert r0["distributed"] and r1["distributed"]
        assert r0["drawn"] == [] and len(r1["drawn"]) == len(r1["masks"])
        assert not equal_lists(r1["drawn"], r1["masks"]), "rank 1 drew other masks: the test must see a fix"
        assert equal_lists(r0["masks"], r1["masks"]), method
        assert equal_lists(r0["ever_active"], r1["ever_active"]), method
        assert r0["counts"] == r1["counts"] == [int(m.sum()) for m in r1["masks"]]
        assert r0["zero_outside"] and r1["zero_outside"], "weights outside rank 0's masks must be zero"
        assert not equal_lists(r0["weights"], r1["weights"]), "weights are not synchronised (no DDP here)"
        # Rank 0 kept what it drew: the method's own seeded masks.
        local = granet.create_sparsifier(method, conv_net(seed=0), None, distributed=False, **options(method, 20))
        assert equal_lists(r0["masks"], list(local.masks.values()))


def test_masks_identical_after_updates_for_every_method(trained: list[dict]) -> None:
    r0, r1 = trained[0]["train"], trained[1]["train"]
    assert set(r0) == set(granet.list_methods())
    for method in granet.list_methods():
        a, b = r0[method], r1[method]
        assert [u["step"] for u in a["updates"]] == [u["step"] for u in b["updates"]]
        for ua, ub in zip(a["updates"], b["updates"]):
            assert not ua["skipped"] and not ub["skipped"]
            assert equal_lists(ua["masks"], ub["masks"]), f"{method}: masks differ at step {ua['step']}"
        assert equal_lists(a["masks"], b["masks"]), method
        # DDP all-reduces gradients, so the weights (and the sparsity) are bit-identical too.
        assert equal_lists(a["weights"], b["weights"]), method
        assert a["exploration"] == b["exploration"], method
        if method not in ("dense", "static") and not needs_init_scoring(method):  # fixed masks
            assert a["updates"], f"{method}: no topology update in {TRAIN_STEPS} steps"
            changed = any(not equal_lists(u["masks"], a["updates"][0]["masks"]) for u in a["updates"][1:])
            assert changed, f"{method}: masks never changed, the test proves nothing"


def test_two_processes_match_one_process(trained: list[dict]) -> None:
    for method in MATCH_METHODS:
        single = train(method, rank=0, world=1, steps=MATCH_STEPS, dtype=torch.float64, global_batch=16)
        for rank in range(WORLD):
            multi = trained[rank]["match"][method]
            assert [u["step"] for u in multi["updates"]] == [u["step"] for u in single["updates"]]
            for um, us in zip(multi["updates"], single["updates"]):
                assert equal_lists(um["masks"], us["masks"]), f"{method}: masks differ at step {us['step']}"
            assert equal_lists(multi["masks"], single["masks"]), method
            for wm, ws in zip(multi["weights"], single["weights"]):
                torch.testing.assert_close(wm, ws, rtol=1e-9, atol=1e-12)
            assert multi["exploration"] == single["exploration"]


def test_schedules_do_not_depend_on_world_size(trained: list[dict]) -> None:
    for method in granet.list_methods():
        single = train(method, rank=0, world=1, steps=TRAIN_STEPS, dtype=torch.float32, global_batch=16)
        expected = [u["step"] for u in single["updates"]]
        for rank in range(WORLD):
            assert [u["step"] for u in trained[rank]["train"][method]["updates"]] == expected, method


def test_divergence_is_detected_on_every_rank(tmp_path: Path) -> None:
    results = run_group(tmp_path, "diverge")
    names = small_rigl(conv_net(seed=0)).names
    for rank, r in enumerate(results):
        message = r["flip"]
        assert message is not None, f"rank {rank} did not raise"
        assert "at step 0" in message and f"layer {names[2]} " in message
        assert "rank 1 differs from rank 0" in message
        assert all(f"layer {n} " not in message for n in (names[0], names[1], names[3]))
        assert r["healed_equal_reference"]
        assert "skipped updates" in r["skip"] and "at step 1" in r["skip"], r["skip"]
        assert "sparsity config (rank 1 differs from rank 0)" in r["config"], r["config"]
    assert results[0]["skipped_updates"] == 0 and results[1]["skipped_updates"] == 1
    assert equal_lists(results[0]["from_rank1"], results[1]["from_rank1"])
    assert results[0]["counts_from_rank1"] == results[1]["counts_from_rank1"]
    assert results[0]["counts_from_rank1"][0] >= results[0]["from_rank1"][0].numel() // 2
    assert results[0]["zero_outside"] and results[1]["zero_outside"]
    assert equal_lists(results[0]["resumed"], results[0]["saved"])
    assert equal_lists(results[1]["resumed"], results[0]["saved"])
    for r in results:
        assert "step counter (rank 1 differs from rank 0)" in r["resume_step"]
        assert "(steps rank 0: 3, rank 1: 4)" in r["resume_step"], r["resume_step"]


# ---------------------------------------------------------------------------------------------- single process


def test_single_process_makes_no_collectives(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not dist.is_initialized() and not gd.is_distributed()

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("no collective may run in a single process")

    for name in ("all_reduce", "all_gather", "broadcast"):
        monkeypatch.setattr(dist, name, forbidden)
    model = conv_net(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    s = granet.create_sparsifier("rigl", model, opt, density=0.2, total_steps=12, update_interval=3)
    assert s.distributed is False
    for t in range(1, 13):
        x, y = batch(t)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        s.step()
    s.load_state_dict(s.state_dict())
    s.verify_masks()  # no process group: a no-op, not an error
    s.broadcast_masks()
    gd.verify_masks(s.names, list(s.masks.values()))
    gd.broadcast_masks(s.names, list(s.masks.values()))
    with pytest.raises(ValueError, match="needs an initialised torch.distributed process group"):
        small_rigl(conv_net(seed=0), distributed=True)


def test_mask_checksum_sees_every_change() -> None:
    s = small_rigl(conv_net(seed=0))
    masks = [m.clone() for m in s.masks.values()]

    def checksum(step: int = 0, skipped: int = 0) -> torch.Tensor:
        return gd.mask_checksum(s.names, masks, step, skipped)

    base = checksum()
    assert base.dtype == torch.int64 and base.shape == (len(s.names) + 1, 2)
    assert base[:-1, 1].tolist() == s.counts and base[-1].tolist() == [0, 0]
    twin = small_rigl(conv_net(seed=5))
    assert torch.equal(gd.mask_checksum(twin.names, list(twin.masks.values())), base), "a function of the masks alone"
    for layer in range(len(s.names)):
        for index in (0, 1, s.sizes[layer] - 1):
            masks[layer].view(-1)[index] ^= True
            changed = checksum()
            masks[layer].view(-1)[index] ^= True
            assert not torch.equal(changed[layer], base[layer]), (layer, index)
            others = [i for i in range(len(s.names) + 1) if i != layer]
            assert torch.equal(changed[others], base[others]), "only the changed layer's row moves"
        # Same count, other positions: the mask shifted by one place.
        mask = masks[layer].view(-1)
        saved = mask.clone()
        mask.copy_(saved.roll(1))
        assert checksum()[layer, 1] == base[layer, 1] and checksum()[layer, 0] != base[layer, 0]
        mask.copy_(saved)
    # Two sets with equal counts and equal index sums, which an index-weighted linear sum cannot tell apart.
    flat = masks[0].view(-1)
    saved = flat.clone()
    flat[:8] = torch.tensor([0, 1, 0, 0, 1, 0, 0, 0], dtype=torch.bool)  # active {1, 4}
    before = checksum()[0, 0]
    flat[:8] = torch.tensor([0, 0, 1, 1, 0, 0, 0, 0], dtype=torch.bool)  # active {2, 3}: same sum, count
    assert checksum()[0, 0] != before
    flat.copy_(saved)
    assert torch.equal(checksum(), base)
    assert checksum(skipped=1)[-1].tolist() == [0, 1]
    assert checksum(step=7)[-1].tolist() == [7, 0]


def test_world_of_one_is_not_distributed(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert gd.is_initialised() and not gd.is_distributed()
        assert small_rigl(conv_net(seed=0)).distributed is False
        # Forced on, every collective works with a single rank.
        s = small_rigl(conv_net(seed=0), distributed=True)
        before = [m.clone() for m in s.masks.values()]
        s.load_state_dict(s.state_dict())
        s.verify_masks()
        assert equal_lists(before, list(s.masks.values()))
    finally:
        dist.destroy_process_group()
