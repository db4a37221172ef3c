"""Sparsity on FSDP2 shards (``granet.sparsity.fsdp_layout``, ``granet.parallel.sharded_topk``) with real gloo process groups.

One spawned group of 2 and one of 4 processes each run every scenario once (process start-up is
most of the cost). Every rank trains on the *same* full batch, so FSDP's averaged gradients equal a
single process's bit for bit, and the masks assembled from the shards must equal, with
``torch.equal``, the masks of a single-process run of the same model, data and seed. The models
have layers whose rows do not split evenly (and, on 4 ranks, a layer with an empty shard).
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from helpers import batch, run_rank, spawn_ranks
from torch import nn

import granet
from granet.parallel.sharded_topk import COMM, row_shard, select_top_sharded
from granet.sparsity.criteria import select_top

pytestmark = pytest.mark.slow  # spawned process groups: ~45 s for the module on 2 CPU cores

GROUP_TIMEOUT_S = 240
COLLECTIVE_TIMEOUT_S = 90
STEPS = 13
METHODS = ["granet", "granet-st", "rigl", "set", "snfs", "gmp", "gmp-layerwise"]
RESUME_AT = 6
# Topology updates every 3 steps while the schedules run (pruning to 0.5 T, regrowth to 0.75 T or T).
UPDATE_STEPS = {"granet": [3, 6, 9, 12], "granet-st": [3, 6, 9, 12], "rigl": [3, 6, 9], "set": [3, 6, 9],
                "snfs": [3, 6, 9], "gmp": [3, 6], "gmp-layerwise": [3, 6]}


def mlp(seed: int) -> nn.Module:
    """Conv + Linear layers with 8, 10 and 3 rows (uneven over 4 ranks; 3 rows leave rank 3 empty)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(32, 10), nn.ReLU(), nn.Linear(10, 3),
    )


def shard(model: nn.Module) -> nn.Module:
    """FSDP2: every Conv/Linear module its own unit, then the root."""
    from torch.distributed.fsdp import fully_shard

    for m in model:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fully_shard(m)
    return fully_shard(model)


def make(method: str, sharded: bool, seed: int = 0, adam: bool = False, **options):
    model = mlp(seed)
    if sharded:
        shard(model)
    opt = (torch.optim.Adam(model.parameters(), lr=1e-2) if adam
           else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4))
    s = granet.create_sparsifier(method, model, opt, **dict(dict(density=0.2, total_steps=STEPS, update_interval=3),
                                                             **options))
    return model, opt, s


def train(model: nn.Module, opt: torch.optim.Optimizer, s, steps: range) -> list[dict]:
    """Train on the full batch of each step; the full masks and counts after every update."""
    updates = []
    for t in steps:
        x, y = batch(t, n=8, classes=3)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        report = s.step()
        if report is not None:
            state = s.state_dict()  # a collective under FSDP: the full masks
            updates.append({"step": t, "masks": list(state["masks"].values()), "counts": s.counts,
                            "density": s.density(), "layers": {n: dict(v) for n, v in report.layers.items()},
                            "health": report.health, "epoch_health": s.check_health(loss=1.0, classes=3).to_dict(),
                            "health_state": state["health"]})
    return updates


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor().detach().clone() if hasattr(t, "full_tensor") else t.detach().clone()


def zero_outside(model: nn.Module, opt: torch.optim.Optimizer, s) -> int:
    """Nonzero entries of this rank's weight and optimizer-state shards outside its mask rows (the
    weight's only where the method keeps the state of inactive weights, as SNFS does)."""
    bad = 0
    for p, m in zip(s.params, s.masks.values()):
        states = opt.state[p].values() if s.config.mask_optimizer_state else []
        tensors = [p] + [v for v in states if isinstance(v, torch.Tensor) and v.shape == p.shape]
        for t in tensors:
            local = t.to_local() if hasattr(t, "to_local") else t
            assert local.shape == m.shape
            bad += int(torch.count_nonzero(local.detach()[~m]))
    return bad


def selection_cases(rank: int, world: int) -> list[tuple[str, bool]]:
    """Sharded top-k against select_top on tensors with heavy ties (the result and generator use)."""
    out = []
    g = torch.Generator().manual_seed(7)
    shapes = [(7, 3), (3, 5), (1, 4), (2,), (300, 250)]  # the last is over select_top's bracket size
    for case in range(12):
        layers = [shapes[i] for i in torch.randperm(len(shapes), generator=g)[: 1 + case % 3].tolist()]
        levels = [1, 3, 50][case % 3]  # few distinct values: ties everywhere
        dtype = torch.float64 if case % 3 == 1 else torch.float32
        full_scores = [(torch.randint(0, levels, s, generator=g) - (case % 2)).to(dtype) for s in layers]
        if case % 4 == 1:  # -0.0 and +0.0 are equal scores (ties), as for select_top
            full_scores = [torch.where(torch.rand(t.shape, generator=g) < 0.5, -t, t) for t in full_scores]
        sizes = [t.numel() for t in full_scores]
        k = int(torch.randint(0, sum(sizes) + 2, (1,), generator=g))
        tie_gen = None if case % 4 == 3 else torch.Generator().manual_seed(100 + case)
        ref_gen = None if tie_gen is None else torch.Generator().manual_seed(100 + case)
        expected = select_top(torch.cat([t.reshape(-1) for t in full_scores]), k, ref_gen).split(sizes)
        local = [row_shard(t.shape, rank, world).local_rows(t) for t in full_scores]
        got = select_top_sharded(local, [0] * len(local), [sum(sizes)], [k], [tie_gen])
        same = all(torch.equal(gm, row_shard(t.shape, rank, world).local_rows(e.view(t.shape)))
                   for gm, e, t in zip(got, expected, full_scores))
        if tie_gen is not None:
            same = same and torch.equal(tie_gen.get_state(), ref_gen.get_state())
        out.append((f"global case {case} k={k} shapes={layers}", same))
        # The same layers as independent problems (per-layer selection, batched).
        ks = [min(k, n) for n in sizes]
        gens = [torch.Generator().manual_seed(i) for i in range(len(sizes))]
        expected = [select_top(t, kk, torch.Generator().manual_seed(i)) for i, (t, kk) in enumerate(zip(full_scores, ks))]
        got = select_top_sharded(local, list(range(len(local))), sizes, ks, gens)
        same = all(torch.equal(gm, row_shard(t.shape, rank, world).local_rows(e)) for gm, e, t in zip(got, expected, full_scores))
        out.append((f"per-layer case {case} ks={ks}", same))
    return out


def initial_masks(sharded: bool) -> dict:
    """Random initial masks with per-layer (ERK, uniform) and global quotas."""
    out = {}
    for distribution in ("erk", "uniform", "global"):
        model = mlp(0)
        if sharded:
            shard(model)
        s = granet.create_sparsifier("static", model, None, density=0.3, distribution=distribution, total_steps=STEPS)
        out[distribution] = list(s.state_dict()["masks"].values())
    return out


def scenario_edges(rank: int) -> dict:
    """Non-finite gradients on one rank only, set_masks (agreeing and not), distributed=False."""
    out: dict = {}
    model, opt, s = make("granet", sharded=True)
    train(model, opt, s, range(1, 3))
    x, y = batch(3, n=8, classes=3)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    if rank == 0:
        s.params[1].grad.to_local()[0, 0] = float("nan")  # only rank 0's shard is non-finite
    opt.step()
    report = s.step()
    out["skipped"] = (report.step, report.skipped, s.skipped_updates)
    # The collectives of one RigL update (3 layers): counted by granet.parallel.sharded_topk.COMM.
    model, opt, s = make("rigl", sharded=True)
    train(model, opt, s, range(1, 3))
    x, y = batch(3, n=8, classes=3)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    COMM.reset()
    assert s.step() is not None
    out["comm"] = (COMM.calls, COMM.bytes)
    # set_masks: every rank passes the same full masks; each keeps its rows.
    model, opt, s = make("rigl", sharded=True)
    target = {n: torch.rand(m.shape, generator=torch.Generator().manual_seed(3)) < 0.3
              for n, m in s.state_dict()["masks"].items()}
    s.set_masks(target)
    out["set_masks"] = (s.state_dict()["masks"], s.counts, zero_outside(model, opt, s))
    try:  # pickling would gather the masks (a collective) inside pickle.dumps: refused
        import pickle

        pickle.dumps(s)
        out["pickled"] = ""
    except TypeError as exc:
        out["pickled"] = str(exc)
    mine = target if rank == 0 else {n: m.roll(1) for n, m in target.items()}
    try:
        s.set_masks(mine)
        out["diverged"] = ""
    except granet.MaskDivergenceError as exc:
        out["diverged"] = str(exc)
    # Built before fully_shard: the sparsifier would hold the replaced tensors; its first step says so.
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stale = granet.create_sparsifier("rigl", model, opt, density=0.2, total_steps=STEPS)
    shard(model)
    try:
        train(model, opt, stale, range(1, 2))
        out["stale"] = ""
    except RuntimeError as exc:
        out["stale"] = str(exc)
    out["refused"] = []
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    mixed = mlp(0)
    fully_shard(mixed[4])  # only one layer sharded: the others stay plain tensors
    by_columns = nn.Sequential(nn.Linear(8, 4))  # FSDP itself needs even shards on dims other than 0
    fully_shard(by_columns, shard_placement_fn=lambda p: Shard(p.dim() - 1))
    for bad in (mixed, by_columns):
        try:
            granet.create_sparsifier("rigl", bad, None, density=0.2, total_steps=STEPS)
            out["refused"].append("")
        except ValueError as exc:
            out["refused"].append(str(exc))
    snip_model = shard(mlp(0))
    snip = granet.create_sparsifier("snip", snip_model, None, density=0.2, total_steps=STEPS)
    try:
        granet.prune_at_init(snip, snip_model, batch(0, n=8, classes=3))
        out["snip"] = ""
    except ValueError as exc:
        out["snip"] = str(exc)
    try:
        granet.create_sparsifier("rigl", model, opt, density=0.2, total_steps=STEPS, distributed=False)
        out["not_distributed"] = ""
    except ValueError as exc:
        out["not_distributed"] = str(exc)
    try:  # structured sparsity is solved in one process or under DDP only
        granet.create_sparsifier("rigl", shard(mlp(0)), None, density=0.5, structure="2:4", total_steps=STEPS)
        out["structure"] = ""
    except ValueError as exc:
        out["structure"] = str(exc)
    return out


def scenario(rank: int, world: int) -> dict:
    result: dict = {"selection": selection_cases(rank, world), "runs": {}}
    for method in METHODS:
        model, opt, s = make(method, sharded=True, adam=method == "set")
        updates = train(model, opt, s, range(1, STEPS + 1))
        result["runs"][method] = {
            "updates": updates,
            "zero_outside": zero_outside(model, opt, s),
            "weights": [full(p) for p in model.parameters()],
            "state": s.state_dict(),
            "exploration": s.exploration_rate(),
        }
    # SNFS again with one all-gather per layer for its kept momentum values (the grouping of layers
    # into gathers must not change anything).
    from granet.sparsity import fsdp_layout as fsdp

    budget, fsdp.GATHER_ENTRIES = fsdp.GATHER_ENTRIES, 1
    try:
        model, opt, s = make("snfs", sharded=True)
        result["snfs_per_layer_gathers"] = train(model, opt, s, range(1, STEPS + 1))
    finally:
        fsdp.GATHER_ENTRIES = budget
    result["initial"] = initial_masks(sharded=True)
    result["protect"] = train(*make("granet-st", sharded=True, protect_units=True, density=0.05),
                              range(1, STEPS + 1))
    result["rng_device"] = train(*make("set", sharded=True, adam=True, rng="device"), range(1, STEPS + 1))
    result.update(scenario_edges(rank))
    # Resume: save at RESUME_AT (full state dicts), rebuild from another seed, load, continue.
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model, opt, s = make("granet", sharded=True)
    train(model, opt, s, range(1, RESUME_AT + 1))
    saved = (get_model_state_dict(model, options=options), get_optimizer_state_dict(model, opt, options=options),
             s.state_dict())
    train(model, opt, s, range(RESUME_AT + 1, STEPS + 1))
    model2, opt2, s2 = make("granet", sharded=True, seed=5)
    # cpu_offload puts the full state on rank 0 only (what the trainer writes); rank 0 broadcasts it.
    load = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model2, saved[0], options=load)
    set_optimizer_state_dict(model2, opt2, saved[1], options=load)
    s2.load_state_dict(saved[2])
    train(model2, opt2, s2, range(RESUME_AT + 1, STEPS + 1))
    result["resume"] = {
        "uninterrupted": (s.state_dict(), [full(p) for p in model.parameters()]),
        "resumed": (s2.state_dict(), [full(p) for p in model2.parameters()]),
    }
    return result


def run_group(tmp: Path, world: int) -> list[dict]:
    """The scenario on ``world`` spawned gloo ranks; their results by rank."""
    tmp.mkdir(parents=True, exist_ok=True)
    init_method = f"file://{tmp / 'rendezvous'}"
    work = functools.partial(scenario, world=world)
    _, hung = spawn_ranks(run_rank, [(work, r, world, init_method, str(tmp), COLLECTIVE_TIMEOUT_S)
                                     for r in range(world)], GROUP_TIMEOUT_S)
    errors = {r: (tmp / f"rank{r}.err").read_text() for r in range(world) if (tmp / f"rank{r}.err").exists()}
    if hung or errors or not all((tmp / f"rank{r}.pt").exists() for r in range(world)):
        pytest.fail(f"world {world}: hung ranks {hung}, errors {errors}")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module", params=[2, 4])
def group(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, list[dict]]:
    world = request.param
    return world, run_group(tmp_path_factory.mktemp(f"fsdp{world}"), world)


@pytest.fixture(scope="module")
def reference() -> dict:
    """Single-process runs of every method (and the weights they end with), on one thread like the ranks
    (the thread count can change the summation order inside conv/matmul kernels)."""
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in METHODS:
            model, opt, s = make(method, sharded=False, adam=method == "set")
            updates = train(model, opt, s, range(1, STEPS + 1))
            out[method] = {"updates": updates, "weights": [full(p) for p in model.parameters()],
                           "state": s.state_dict(), "exploration": s.exploration_rate()}
        out["protect"] = train(*make("granet-st", sharded=False, protect_units=True, density=0.05),
                               range(1, STEPS + 1))
        out["rng_device"] = train(*make("set", sharded=False, adam=True, rng="device"), range(1, STEPS + 1))
    finally:
        torch.set_num_threads(threads)
    return out


def test_sharded_selection_equals_select_top(group: tuple[int, list[dict]]) -> None:
    world, results = group
    for rank, res in enumerate(results):
        wrong = [name for name, same in res["selection"] if not same]
        assert len(res["selection"]) == 24
        assert wrong == [], f"world {world} rank {rank}: {wrong}"


@pytest.mark.parametrize("method", METHODS)
def test_masks_equal_single_process(group: tuple[int, list[dict]], reference: dict, method: str) -> None:
    world, results = group
    ref = reference[method]
    assert [u["step"] for u in ref["updates"]] == UPDATE_STEPS[method]
    for rank, res in enumerate(results):
        run = res["runs"][method]
        assert [u["step"] for u in run["updates"]] == [u["step"] for u in ref["updates"]]
        for got, exp in zip(run["updates"], ref["updates"]):
            assert all(torch.equal(a, b) for a, b in zip(got["masks"], exp["masks"])), (world, rank, got["step"])
            assert got["counts"] == exp["counts"] == [int(m.sum()) for m in got["masks"]]
            assert got["density"] == exp["density"]
            assert got["layers"] == exp["layers"]
        assert all(torch.equal(a, b) for a, b in zip(run["weights"], ref["weights"])), (world, rank)
        assert run["zero_outside"] == 0
        assert run["exploration"] == ref["exploration"]
        assert run["state"]["ever_active"].keys() == ref["state"]["ever_active"].keys()
        assert all(torch.equal(run["state"]["ever_active"][n], e) for n, e in ref["state"]["ever_active"].items())


@pytest.mark.parametrize("method", METHODS)
def test_health_checks_equal_single_process(group: tuple[int, list[dict]], reference: dict, method: str) -> None:
    """Every rank reports the whole network's health, as one process does (counts summed over the
    rows), at each update and between updates, and saves the same record."""
    world, results = group
    expected = reference[method]["updates"]
    assert all(u["health"] is not None and u["health"]["units"] == 8 + 10 + 3 for u in expected)
    for rank, res in enumerate(results):
        got = res["runs"][method]["updates"]
        for key in ("health", "epoch_health"):
            assert [u[key] for u in got] == [u[key] for u in expected], (world, rank, method, key)
        def positions(state: dict) -> list:
            return [None if level is None else {n: t.tolist() for n, t in level.items()} for level in state["zero"]]

        for a, b in zip(got, expected):
            assert a["health_state"]["last"] == b["health_state"]["last"]
            assert positions(a["health_state"]) == positions(b["health_state"])


def test_protect_units_equals_single_process(group: tuple[int, list[dict]], reference: dict) -> None:
    world, results = group
    expected = reference["protect"]
    assert [u["step"] for u in expected] == UPDATE_STEPS["granet-st"]
    assert any(v["dropped"] for u in expected for v in u["layers"].values())
    for res in results:
        for got, exp in zip(res["protect"], expected):
            assert all(torch.equal(a, b) for a, b in zip(got["masks"], exp["masks"])), (world, got["step"])
            assert got["layers"] == exp["layers"] and got["health"] == exp["health"]


def test_device_randomness_equals_single_process(group: tuple[int, list[dict]], reference: dict) -> None:
    # rng="device": the counter stream is drawn for the full tensor on every rank and sliced, and
    # ties are ordered by it over the global tie list, as in one process.
    world, results = group
    expected = reference["rng_device"]
    assert [u["step"] for u in expected] == UPDATE_STEPS["set"]
    assert not all(torch.equal(a, b) for u, v in zip(expected, reference["set"]["updates"])
                   for a, b in zip(u["masks"], v["masks"]))  # another stream than the CPU generator's
    for res in results:
        for got, exp in zip(res["rng_device"], expected):
            assert all(torch.equal(a, b) for a, b in zip(got["masks"], exp["masks"])), (world, got["step"])
            assert got["layers"] == exp["layers"]


def test_exact_density(group: tuple[int, list[dict]]) -> None:
    _, results = group
    # gmp / granet reach density 0.2 of 8*27 + 10*32 + 3*10 = 566 weights at the end: round(113.2) = 113.
    for method in ("gmp", "granet", "granet-st"):
        last = results[0]["runs"][method]["updates"][-1]
        assert sum(last["counts"]) == 113 == sum(int(m.sum()) for m in last["masks"])


def test_state_dict_interchangeable_with_single_process(group: tuple[int, list[dict]], reference: dict) -> None:
    _, results = group
    state = results[0]["runs"]["rigl"]["state"]
    assert [tuple(s) for s in state["shapes"]] == [(8, 3, 3, 3), (10, 32), (3, 10)]
    model, opt, s = make("rigl", sharded=False)
    s.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(s.masks.values(), reference["rigl"]["state"]["masks"].values()))
    assert s.step_count == STEPS


def test_resume_bit_exact(group: tuple[int, list[dict]]) -> None:
    _, results = group
    for res in results:
        (s_a, w_a), (s_b, w_b) = res["resume"]["uninterrupted"], res["resume"]["resumed"]
        assert s_a["step"] == s_b["step"] == STEPS
        assert all(torch.equal(s_a["masks"][n], s_b["masks"][n]) for n in s_a["masks"])
        assert all(torch.equal(s_a["ever_active"][n], s_b["ever_active"][n]) for n in s_a["masks"])
        assert all(torch.equal(a, b) for a, b in zip(w_a, w_b))


def test_snfs_momentum_redistribution_moves_regrowth_between_layers(group: tuple[int, list[dict]],
                                                                     reference: dict) -> None:
    # SNFS under FSDP: its per-layer shares come from momentum means over the gathered kept values;
    # they must really move regrowths between layers here (else the test above would not test them).
    _, results = group
    for run in (reference["snfs"], *(res["runs"]["snfs"] for res in results)):
        moved = [(u["step"], n) for u in run["updates"] for n, v in u["layers"].items() if v["regrown"] != v["dropped"]]
        assert len(moved) >= 2, moved
        assert all(sum(v["regrown"] for v in u["layers"].values()) == sum(v["dropped"] for v in u["layers"].values())
                   for u in run["updates"])
    for res in results:
        per_layer = res["snfs_per_layer_gathers"]
        assert [u["step"] for u in per_layer] == UPDATE_STEPS["snfs"]
        for got, exp in zip(per_layer, reference["snfs"]["updates"]):
            assert all(torch.equal(a, b) for a, b in zip(got["masks"], exp["masks"])) and got["layers"] == exp["layers"]


def test_edge_cases(group: tuple[int, list[dict]]) -> None:
    world, results = group
    for rank, res in enumerate(results):
        # Rank 0's NaN gradient makes every rank skip update 3 (the decision is all-reduced).
        assert res["skipped"] == (3, True, 1)
        # finite-gradient vote (1 int64), health check (3 x 3 int64), drop and grow selections (4 radix
        # rounds of a 3 x 256 int64 histogram, 1 gather of 3 x 2 int64 each), rank check (2 x 5 int64);
        # the new counts follow from the global drop/regrow counts, so no count all-reduce
        assert res["comm"] == (1 + 1 + 2 * (4 + 1) + 1,
                               8 + 3 * 3 * 8 + 2 * (4 * 3 * 256 * 8 + 3 * 2 * 8) + 2 * 5 * 8)
        masks, counts, nonzero = res["set_masks"]
        target = {n: torch.rand(m.shape, generator=torch.Generator().manual_seed(3)) < 0.3 for n, m in masks.items()}
        assert all(torch.equal(masks[n], target[n]) for n in target)
        assert counts == [int(m.sum()) for m in target.values()] and nonzero == 0
        assert res["pickled"] == ("a sharded (FSDP) sparsifier cannot be pickled: its state_dict() gathers the masks "
                                  "from every rank (a collective); pickle or save sparsifier.state_dict() instead")
        others = "rank 1 differs" if world == 2 else "ranks 1, 2, 3 differ"
        assert res["diverged"].startswith("sparsifier masks diverged across ranks at step 0: layer 0.weight "
                                          f"({others} from rank 0"), res["diverged"]
        assert res["stale"].startswith("the model's parameters 0.weight, 4.weight, 6.weight were replaced after "
                                       "the sparsifier was built (e.g. by fully_shard)"), res["stale"]
        assert res["refused"] == [
            "FSDP: some sparsified parameters are sharded DTensors and some are not (0.weight, 6.weight): "
            "apply fully_shard to every module holding a sparsified weight",
            "FSDP: 0.weight is placed (Shard(dim=1),) on a 1-D mesh; granet supports fully_shard's default "
            "Shard(0) placement on one 1-D mesh (no HSDP, no shard_placement_fn)",
        ]
        assert res["snip"] == ("prune_at_init (snip) does not support FSDP-sharded models: score an unsharded "
                               "copy of the initial model, then pass its masks to sparsifier.set_masks on every rank")
        assert res["not_distributed"] == (
            "distributed=False: the model's weights are FSDP shards, whose masks need collectives")
        assert res["structure"] == (
            "structure 2:4 is not supported under FSDP yet (its per-group and per-row selections are solved in one "
            "process or under DDP only): train with DDP or without a structure")


def test_replaced_parameters_are_refused_in_one_process() -> None:
    model, opt, s = make("rigl", sharded=False)
    model[4].weight = nn.Parameter(model[4].weight.detach().clone())  # what a wrapper applied later does
    with pytest.raises(RuntimeError, match=r"^the model's parameters 4\.weight were replaced after the sparsifier"):
        train(model, opt, s, range(1, 2))


def test_initial_masks_equal_single_process(group: tuple[int, list[dict]]) -> None:
    _, results = group
    expected = initial_masks(sharded=False)
    assert [sum(int(m.sum()) for m in masks) for masks in expected.values()] == [170, 170, 170]  # round(0.3 * 566)
    for res in results:
        for distribution, masks in expected.items():
            assert all(torch.equal(a, b) for a, b in zip(res["initial"][distribution], masks)), distribution
