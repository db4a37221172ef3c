"""GraNet-ST's update window: r_t decays over [regrow_start, regrow_end] ([0, T] for GraNet) while
drop-and-regrow updates begin at t0 = prune_start, as in the authors' code; t0 = 0 keeps every mask
and weight bit-identical to the behaviour before the window was separated."""
from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from helpers import tiny_cnn, train_step

import granet
from granet.methods import list_methods, method_config
from granet.sparsity.schedule_check import regrowth_steps
from granet.sparsity.schedules import DropFractionSchedule
from granet.sparsity.updater import TopologyUpdater, first_regrowth_step

T, DT = 1000, 50


def _cosine(t: int, start: int = 0, end: int = T, initial: float = 0.5, final: float = 0.005) -> float:
    progress = min(1.0, max(0.0, (t - start) / (end - start)))
    return final + 0.5 * (initial - final) * (1 + math.cos(math.pi * progress))




# ------------------------------------------------------------------ closed form


def test_t0_zero_updates_every_interval_with_the_whole_run_cosine() -> None:
    updater = TopologyUpdater(method_config("granet-st", density=0.1, update_interval=DT, total_steps=T))
    assert updater.regrowth.first_update == 0 and updater.regrowth.start == 0 and updater.regrowth.end == T
    steps = [t for t in range(T + 1) if updater.is_update_step(t)]
    assert steps == list(range(50, 1000, 50))  # 19 updates: step 0 never, T excluded
    assert [updater.drop_fraction(t) for t in steps] == [_cosine(t) for t in steps]
    assert updater.drop_fraction(50) == pytest.approx(0.005 + 0.2475 * (1 + math.cos(math.pi / 20)), abs=1e-15)


def test_t0_at_a_fifth_of_the_run_moves_the_updates_not_the_cosine() -> None:
    t0 = T // 5
    updater = TopologyUpdater(method_config("granet-st", density=0.1, update_interval=DT, total_steps=T,
                                            prune_start=t0))
    assert (updater.regrowth.start, updater.regrowth.first_update, updater.pruning.start) == (0, t0, t0)
    regrowth = [t for t in range(T + 1) if updater.is_regrowth_step(t)]
    pruning = [t for t in range(T + 1) if updater.is_prune_step(t)]
    assert regrowth == list(range(200, 1000, 50))  # 16 updates, the first at t0
    assert pruning == list(range(250, 501, 50))  # (t0, tf], tf = T/2
    # r_t at t0 is the whole-run cosine's value there, 0.005 + 0.2475 (1 + cos(pi / 5)), not r_0.
    assert updater.drop_fraction(t0) == _cosine(t0)
    assert updater.drop_fraction(t0) == pytest.approx(0.005 + 0.2475 * (1 + math.cos(math.pi / 5)), abs=1e-15)
    assert updater.drop_fraction(t0) == pytest.approx(0.4527, abs=1e-4)
    assert [updater.drop_fraction(t) for t in regrowth] == [_cosine(t) for t in regrowth]
    assert regrowth_steps(updater.regrowth, T) == 16


def test_the_first_update_step_of_every_method() -> None:
    """max(regrow_start, t0) for pruning methods, regrow_start otherwise (RigL/SET/SNFS with a start)."""
    assert first_regrowth_step({"regrow_start": 0, "prune_start": 200}) == 200
    assert first_regrowth_step({"regrow_start": 300, "prune_start": 200}) == 300
    assert first_regrowth_step({"regrow_start": 150}) == 150
    for method in ("rigl", "set", "snfs"):
        updater = TopologyUpdater(method_config(method, density=0.1, update_interval=DT, total_steps=T,
                                                regrow_start=200))
        steps = [t for t in range(T + 1) if updater.is_update_step(t)]
        assert steps == list(range(200, 750, 50)), method  # [200, 750): regrow_end = 0.75 T
        # their cosine spans [regrow_start, regrow_end]: r_0 = 0.3 (0.5 for SNFS) at the first update
        assert updater.drop_fraction(200) == updater.config.drop_fraction == (0.5 if method == "snfs" else 0.3)


def test_a_first_step_before_the_decay_and_bad_values() -> None:
    s = DropFractionSchedule(initial=0.5, final=0.0, start=100, end=400, interval=50, first=200)
    assert [t for t in range(500) if s.is_update_step(t)] == [200, 250, 300, 350]
    assert s.fraction(200) == pytest.approx(0.25 * (1 + math.cos(math.pi / 3)))
    assert DropFractionSchedule(0.5, 0.0, 100, 400, 50).first_update == 100
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="first update step must be an int >= 0"):
            DropFractionSchedule(0.5, 0.0, 0, 400, 50, first=bad)


def test_with_t0_zero_every_preset_keeps_the_update_steps_it_had() -> None:
    """Before the update window was separated, updates were the multiples of ΔT in [regrow_start, end)."""
    for method in list_methods():
        updater = TopologyUpdater(method_config(method, update_interval=DT, total_steps=T,
                                                **({} if method == "dense" else {"density": 0.1})))
        if updater.regrowth is None:
            continue
        r = updater.regrowth
        before = [t for t in range(T + 1) if r.initial > 0 and r.start <= t < r.end and t > 0 and t % DT == 0]
        assert [t for t in range(T + 1) if updater.is_regrowth_step(t)] == before, method


# ------------------------------------------------------------------ whole runs


def _run(method: str, steps: int = 60, **options) -> tuple[list[int], list, str]:
    """Train a tiny CNN through the sparsifier API; the update steps, reports and a digest of the end."""
    model = tiny_cnn(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = granet.create_sparsifier(method, model, optimizer, density=0.1, total_steps=steps,
                                          update_interval=5, **options)
    reports = []
    for t in range(steps):
        train_step(model, optimizer, t)
        report = sparsifier.step()
        if report is not None:
            reports.append(report)
    digest = hashlib.sha256()
    for name in sparsifier.names:
        digest.update(sparsifier.mask_of(name).numpy().tobytes())
    for p in model.parameters():
        digest.update(p.detach().numpy().tobytes())
    return [r.step for r in reports], reports, digest.hexdigest()[:16]


#: (update steps, digest of the final masks and weights) recorded before the update window was
#: separated from r_t's decay, with one torch thread.
BEFORE = {
    "granet-st": ([5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55], "af6caaeb42a21fb4"),
    "granet": ([5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55], "ac0abd230cfada86"),
    "rigl": ([5, 10, 15, 20, 25, 30, 35, 40], "2f9f5ec75338cd94"),
    "set": ([5, 10, 15, 20, 25, 30, 35, 40], "1a55958676123efa"),
    "snfs": ([5, 10, 15, 20, 25, 30, 35, 40], "961c2ebc545c8e25"),
}


@pytest.mark.parametrize("method", sorted(BEFORE))
def test_t0_zero_runs_are_bit_identical_to_before(method: str, one_thread) -> None:
    steps, _, digest = _run(method)
    assert (steps, digest) == BEFORE[method]


def test_granet_st_makes_no_update_before_t0(one_thread) -> None:
    steps, reports, _ = _run("granet-st", prune_start=20)
    assert steps == [20, 25, 30, 35, 40, 45, 50, 55]  # none at 5, 10, 15
    first = reports[0]
    assert first.step == 20 and first.pruned == 0 and first.dropped == first.regrown > 0
    assert first.drop_fraction == _cosine(20, end=60)
    # Dense-start GraNet with the same t0: no (empty) report before t0 either.
    assert _run("granet", prune_start=20)[0] == [20, 25, 30, 35, 40, 45, 50, 55]


def test_granet_st_with_t0_through_granet_train(tmp_path) -> None:
    """The whole run through ``granet train``: no topology update in the epochs before t0."""
    from granet.cli import main

    out = tmp_path / "run"
    # digits: 20 steps per epoch at batch 64; t0 = step 40 (the end of epoch 2), tf = 60, T = 80
    assert main(["train", "--model", "mlp", "--method", "granet-st", "--epochs", "4", "--update-interval", "10",
                 "--prune-start", "40", "--prune-end", "60", "--density", "0.1", "--out", str(out),
                 "--progress", "log", "--threads", "1"]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [20, 40, 60, 80]
    assert [r["topology_updates"] for r in lines] == [0, 1, 2, 1]  # 40 | 50, 60 | 70 (none at T = 80)
    assert [r["regrown"] > 0 for r in lines] == [False, True, True, True]
    assert [r["pruned"] > 0 for r in lines] == [False, False, True, False]  # (t0, tf]: 50 and 60


# ------------------------------------------------------------------ the t0 step on still-dense layers


def test_the_t0_step_leaves_still_dense_layers_alone(one_thread) -> None:
    """At t0 the sparse layers drop and regrow; a layer still dense (ERK made it dense) is left as it
    was, bit for bit (the reference's drop-and-regrow there gives the same mask back)."""
    model = tiny_cnn(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = granet.create_sparsifier("granet-st", model, optimizer, density=0.1, total_steps=60,
                                          update_interval=5, prune_start=20)
    dense = [n for n, d in sparsifier.layer_density().items() if d == 1.0]
    assert dense == ["9.weight"]  # the 32->5 classifier: its ERK density is above 1 at 50%
    for t in range(19):
        train_step(model, optimizer, t)
        assert sparsifier.step() is None
    train_step(model, optimizer, 19)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = sparsifier.step()
    assert report is not None and report.step == 20
    assert report.layers["9.weight"] == {"pruned": 0, "dropped": 0, "regrown": 0}
    assert torch.equal(model.get_submodule("9").weight, before["9.weight"])
    assert bool(sparsifier.mask_of("9.weight").all())
    sparse = [n for n in sparsifier.names if n not in dense]
    assert all(report.layers[n]["dropped"] == report.layers[n]["regrown"] > 0 for n in sparse)


def _reference_drop_and_regrow(weight: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor,
                               rate: float) -> torch.Tensor:
    """The reference's drop and gradient regrowth of one layer, as its code states them: drop
    ceil(rate * active) weights by |w| (``|w| > k-th smallest``), regrow as many among the positions
    outside the mask after the drop, by |gradient|."""
    active = int(mask.sum())
    k = math.ceil(int((~mask).sum()) + math.ceil(rate * active))
    threshold = weight.abs().reshape(-1).sort().values[k - 1]
    kept = weight.abs() > threshold
    dropped = active - int(kept.sum())
    scores = (grad * (~kept)).abs().reshape(-1)
    new = kept.clone().reshape(-1)
    new[scores.sort(descending=True).indices[:dropped]] = True
    return new.view(mask.shape)


def test_the_reference_t0_step_on_a_dense_layer_gives_its_mask_back() -> None:
    """Why granet may skip still-dense layers: on a dense layer the positions outside the mask after
    the drop are exactly the dropped ones, so regrowing as many restores the mask."""
    g = torch.Generator().manual_seed(0)
    for rate in (0.5, 0.4527, 0.01):
        weight, grad = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)
        dense = torch.ones(32, 16, dtype=torch.bool)
        assert torch.equal(_reference_drop_and_regrow(weight, grad, dense, rate), dense)
