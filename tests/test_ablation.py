"""Neuron ablation for constant fan-in (SRigL; issue 31, item 2): a unit with too few salient weights
is removed at a drop-and-regrow update and its budget moves to the layer's other units; ablated
units stay ablated, every live row keeps the same count, counts stay exact, resumes are bit-identical."""
from __future__ import annotations

import copy
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from test_structure_training import NETS, mlp
from torch import nn

import granet
from granet.cli import main
from granet.deploy.condensed import condense, constant_fan_in
from granet.sparsity.config import SparsityConfig
from granet.sparsity.structure import (
    Structure,
    ablate_units,
    ablation_threshold,
    fan_in_after_ablation,
    row_counts,
    structure_violations,
)

STEPS = 30
FAN_IN = Structure("fan-in")




def options(method: str, ablation: float = 0.9) -> dict:
    out: dict = dict(structure="fan-in", density=0.2, total_steps=STEPS, update_interval=5, ablation=ablation)
    if method in ("granet", "granet-st", "gmp"):
        out["prune"] = "layerwise"
    return out


def batch(step: int, shape: tuple[int, ...], n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn((n, *shape), generator=g), torch.randint(0, 8, (n,), generator=g)


def live_and_k(mask: torch.Tensor) -> tuple[int, int]:
    """Live rows and their common count; asserts that every row holds k or 0."""
    counts = row_counts(mask)
    live = counts[counts > 0]
    k = int(live[0]) if live.numel() else 0
    assert bool((live == k).all()), counts.tolist()
    return int(live.numel()), k


def check(s: granet.Sparsifier, before: list[int], dead_before: list[torch.Tensor], pruning: bool) -> None:
    """The ablation invariant after a step: live rows alike, dead rows stay dead, exact counts, and
    (without pruning) a layer's new total is its old total spread over its live rows, rounded."""
    assert s.counts == [int(m.sum()) for m in s.masks.values()]
    masks = list(s.masks.values())
    for i, (mask, p) in enumerate(zip(masks, s.params)):
        live, k = live_and_k(mask)
        dead = row_counts(mask) == 0
        assert bool(dead[dead_before[i]].all())  # ablated units stay ablated
        assert int(torch.count_nonzero(p.detach()[~mask])) == 0
        if i == len(masks) - 1:
            assert not bool(dead.any())  # the output layer is never ablated
        if not pruning:
            expected = before[i] if torch.equal(dead, dead_before[i]) else live * round(Fraction(before[i], live))
            assert s.counts[i] == expected == live * k


def train(model: nn.Module, opt: torch.optim.Optimizer, s: granet.Sparsifier, shape: tuple[int, ...],
          steps: range, pruning: bool) -> None:
    for t in steps:
        before = list(s.counts)
        dead_before = [row_counts(m) == 0 for m in s.masks.values()]
        x, y = batch(t, shape)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        report = s.step()
        if report is not None and not pruning:
            assert sum(s.counts) - sum(before) == report.regrown - report.dropped
        check(s, before, dead_before, pruning)


def dead_rows(s: granet.Sparsifier) -> int:
    return sum(int((row_counts(m) == 0).sum()) for m in s.masks.values())


# ---------------------------------------------------------------------------------------------- the rule


def test_threshold_and_fan_in_after_ablation_are_exact() -> None:
    assert ablation_threshold(0.3, 320, 32) == 3  # floor(0.3 * 10), read as decimals
    assert ablation_threshold(0.29, 3200, 32) == 29  # 0.29 * 100 is 28.999... in binary floating point
    assert ablation_threshold(0.05, 320, 32) == 1  # at least one
    assert fan_in_after_ablation(320, 30, 16) == 11  # 10.67 -> 11
    assert fan_in_after_ablation(100, 8, 16) == 12  # 12.5 -> 12 (half to even)
    assert fan_in_after_ablation(100, 5, 16) == 16  # capped at the row length
    with pytest.raises(ValueError, match=r"^ablation must be a number in \[0, 1\), got 1\.0$"):
        ablation_threshold(1.0, 10, 2)


def test_ablate_units_removes_the_rows_with_too_few_salient_weights() -> None:
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[:, :4] = True  # k = 4 everywhere, T = 16
    kept = mask.clone()
    kept[0, :4] = False  # row 0 lost everything at the drop
    kept[1, :3] = False  # row 1 keeps 1
    regrowable = torch.zeros_like(mask)
    regrowable[1, 5] = True  # row 1: 2 salient
    regrowable[2, 6] = True
    dead, k = ablate_units(mask, kept, regrowable, 0.5)  # threshold floor(0.5 * 4) = 2
    assert dead.tolist() == [True, False, False, False] and k == round(Fraction(16, 3)) == 5
    dead, k = ablate_units(mask, kept, regrowable, 0.75)  # threshold 3: rows 0 and 1
    assert dead.tolist() == [True, True, False, False] and k == 8
    # at least ceil(T / row_len) = 2 rows stay live: the fewest salient go first
    dead, k = ablate_units(mask, torch.zeros_like(mask), regrowable, 0.75)
    assert dead.tolist() == [True, False, False, True] and k == 8
    # rows already at 0 stay ablated and do not count as live
    mask[3] = False
    kept[3] = False
    dead, k = ablate_units(mask, kept, regrowable, 0.25)  # threshold 1: row 0 (0 salient)
    assert dead.tolist() == [True, False, False, True] and k == 6


def test_structure_violations_allow_ablated_rows_only_when_asked() -> None:
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[1:, :3] = True
    assert str(structure_violations(mask, FAN_IN)) == "row 1 holds 3 active entries, expected 0 (3 rows in all)"
    assert structure_violations(mask, FAN_IN, ablated=True) is None
    mask[2, 5] = True
    assert str(structure_violations(mask, FAN_IN, ablated=True)) == ("row 2 holds 4 active entries, expected 3 "
                                                                     "(1 row in all)")
    with pytest.raises(ValueError, match=r"^ablated rows exist only under structure fan-in, got 2:4$"):
        structure_violations(mask, Structure("n:m", 2, 4), ablated=True)


# ---------------------------------------------------------------------------------------------- training


def test_units_without_salient_weights_are_ablated_and_their_budget_moves() -> None:
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # no momentum: a zeroed row with zero gradients stays 0
    s = granet.create_sparsifier("rigl", model, opt, **dict(options("rigl", 0.3), density=0.5))
    train(model, opt, s, (16,), range(1, 5), pruning=False)
    assert dead_rows(s) == 0
    assert s.counts[0] == 32 * 7  # 32 units of 7 inputs
    chosen = [3, 7, 11, 15]
    with torch.no_grad():
        model[0].weight[chosen] = 0
    x, y = batch(5, (16,))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    model[0].weight.grad[chosen] = 0
    opt.step()
    report = s.step()
    assert report is not None and report.step == 5
    mask = s.masks["0.weight"]
    assert (row_counts(mask) == 0).nonzero().squeeze(1).tolist() == chosen
    assert live_and_k(mask) == (28, 8)  # their 4 * 7 inputs went to the 28 others: 224 / 28 = 8 each
    assert s.counts[0] == int(mask.sum()) == 32 * 7
    assert int(torch.count_nonzero(model[0].weight[chosen])) == 0
    assert report.layers["0.weight"]["regrown"] == report.layers["0.weight"]["dropped"] > 4 * 7
    assert dead_rows(s) == 4  # the output layer keeps every unit
    train(model, opt, s, (16,), range(6, STEPS + 1), pruning=False)  # ablated units stay ablated
    assert bool((row_counts(s.masks["0.weight"])[chosen] == 0).all())


def test_rounding_to_whole_rows_can_lose_part_of_the_budget() -> None:
    # one unit of 32 ablated at k = 7: 224 / 31 = 7.2 rounds to 7, so the layer keeps 31 * 7 = 217
    mask = torch.zeros(32, 16, dtype=torch.bool)
    mask[:, :7] = True
    kept = mask.clone()
    kept[3] = False
    dead, k = ablate_units(mask, kept, torch.zeros_like(mask), 0.3)
    assert dead.nonzero().squeeze(1).tolist() == [3] and k == 7


def test_ablation_zero_gives_the_masks_of_a_run_without_the_option() -> None:
    runs = []
    for extra in ({}, {"ablation": 0.0}):
        model = mlp(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        s = granet.create_sparsifier("rigl", model, opt, structure="fan-in", density=0.2, total_steps=STEPS,
                                     update_interval=5, **extra)
        history = []
        for t in range(1, STEPS + 1):
            x, y = batch(t, (16,))
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            s.step()
            history.append([m.clone() for m in s.masks.values()])
        runs.append(history)
    assert all(torch.equal(a, b) for x, y in zip(*runs) for a, b in zip(x, y))
    assert not torch.equal(runs[0][0][0], runs[0][-1][0])  # the masks did change


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("method", ["rigl", "set", "granet", "granet-st"])
def test_every_method_keeps_the_ablation_invariant_after_every_step(net: str, method: str) -> None:
    make, shape = NETS[net]
    model = make(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    s = granet.create_sparsifier(method, model, opt, **options(method))
    train(model, opt, s, shape, range(1, STEPS + 1), pruning=method in ("granet", "granet-st"))
    assert dead_rows(s) > 0  # units were ablated


def test_resume_with_ablation_is_bit_identical() -> None:
    shape = (16,)
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    s = granet.create_sparsifier("rigl", model, opt, **options("rigl"))
    train(model, opt, s, shape, range(1, 13), pruning=False)
    assert dead_rows(s) > 0
    saved = ({k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(opt.state_dict()), s.state_dict())
    train(model, opt, s, shape, range(13, STEPS + 1), pruning=False)
    model2 = mlp(7)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    s2 = granet.create_sparsifier("rigl", model2, opt2, **options("rigl"))
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    s2.load_state_dict(saved[2])
    train(model2, opt2, s2, shape, range(13, STEPS + 1), pruning=False)
    assert s2.counts == s.counts
    assert all(torch.equal(a, b) for a, b in zip(s.masks.values(), s2.masks.values()))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_set_masks_accepts_ablated_rows_only_with_ablation() -> None:
    masks = {n: m.clone() for n, m in granet.create_sparsifier(
        "static", mlp(0), None, structure="fan-in", density=0.2).masks.items()}
    masks["0.weight"][5] = False
    with pytest.raises(ValueError, match=r"^the mask of 0\.weight in the mapping given to set_masks breaks "
                                         r"structure fan-in: row 5 holds 0 active entries, expected \d+ "
                                         r"\(1 row in all\)$"):
        granet.create_sparsifier("static", mlp(0), None, structure="fan-in", density=0.2).set_masks(masks)
    s = granet.create_sparsifier("rigl", mlp(0), None, **options("rigl"))
    s.set_masks(masks)
    assert s.counts == [int(m.sum()) for m in masks.values()]
    assert constant_fan_in(masks["0.weight"]) is None  # the condensed layer refuses ablated rows, in one line
    with pytest.raises(ValueError, match=r"^'0\.weight' has no constant fan-in \(row 5 has 0 active inputs, [^\n]*$"):
        condense(torch.ones(masks["0.weight"].shape), masks["0.weight"], "0.weight")


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("changes,message", [
    (dict(ablation=1.0), "ablation must be a number in [0, 1), got 1.0"),
    (dict(ablation=-0.1), "ablation must be a number in [0, 1), got -0.1"),
    (dict(ablation=float("nan")), "ablation must be a number in [0, 1), got nan"),
    (dict(ablation="0.3"), "ablation must be a number in [0, 1), got '0.3'"),
    (dict(ablation=True), "ablation must be a number in [0, 1), got True"),
    (dict(ablation=0.3, structure="unstructured"),
     "ablation=0.3 removes output units of constant fan-in layers: it needs structure='fan-in', "
     "got structure='unstructured'"),
    (dict(ablation=0.3, structure="2:4", density=0.5),
     "ablation=0.3 removes output units of constant fan-in layers: it needs structure='fan-in', got structure='2:4'"),
    (dict(ablation=0.3, protect_units=True),
     "ablation=0.3 removes output units, which protect_units keeps alive: use one of the two"),
])
def test_bad_ablation_values_are_one_line_errors(changes: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        SparsityConfig(total_steps=10, structure="fan-in", density=0.2).replace(**changes).validate()
    assert str(info.value) == message


def test_ablation_without_regrowth_is_an_unused_field() -> None:
    assert "ablation" in SparsityConfig(structure="fan-in", density=0.2, ablation=0.3).unused_fields()
    assert "ablation" not in SparsityConfig(structure="fan-in", density=0.2, drop_fraction=0.3).unused_fields()


def test_cli_run_with_ablation_ends_structured(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", "--structure", "fan-in", "--ablation", "0.3", "--epochs", "2", "--out", str(run),
                 "--progress", "log"]) == 0
    state = torch.load(run / "checkpoint.pt", weights_only=True)["sparsifier"]
    assert state["config"]["ablation"] == 0.3 and state["config"]["structure"] == "fan-in"
    for mask in state["masks"].values():  # every live row alike (this short run ablates no unit)
        live_and_k(mask.reshape(mask.shape[0], -1))
    assert "ablation: 0.3" in (run / "config.yaml").read_text()
