"""Structured sparsity (N:M, constant fan-in) as a sparsifier option: every method keeps every mask
exactly structured after every step, with exact counts; resumes, DDP and the CLI (issue 31, step 2)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import run_rank, spawn_ranks
from torch import nn

import granet
from granet.cli import main
from granet.sparsity.config import SparsityConfig
from granet.sparsity.structure import active_counts, group_counts, parse_structure, row_counts, rows_view

STEPS = 30
METHODS = ["granet", "granet-st", "rigl", "set", "gmp", "static"]
PRUNING = ("granet", "granet-st", "gmp")


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def conv(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 8))


NETS = {"mlp": (mlp, (16,)), "conv": (conv, (4, 4, 4))}


def options(method: str, structure: str) -> dict:
    """2:4 at density 0.5 (granet-st: 1:4 from its 50% start, so that it prunes); fan-in at 0.2,
    layer-wise for the pruning methods."""
    out: dict = dict(structure=structure, total_steps=STEPS, update_interval=5)
    if structure == "2:4":
        out["density"] = 0.5
        if method == "granet-st":
            out.update(structure="1:4", density=0.25)
    else:
        out["density"] = 0.2
        if method in PRUNING:
            out["prune"] = "layerwise"
    return out


def batch(step: int, shape: tuple[int, ...], n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn((n, *shape), generator=g), torch.randint(0, 8, (n,), generator=g)


def expected_counts(mask: torch.Tensor, structure: str) -> torch.Tensor:
    parsed = parse_structure(structure)
    return group_counts(mask, parsed.m) if parsed.kind == "n:m" else row_counts(mask)


def assert_structured(s: granet.Sparsifier, structure: str) -> None:
    """Every group (N:M) or row (fan-in) of every mask holds the same count, and the tracked counts are exact."""
    for name, mask in s.masks.items():
        counts = expected_counts(mask, structure)
        assert bool((counts == counts.reshape(-1)[0]).all()), (s.step_count, name)
    assert s.counts == [int(m.sum()) for m in s.masks.values()]
    assert s.density() == sum(s.counts) / s.total


def train(model: nn.Module, opt: torch.optim.Optimizer, s: granet.Sparsifier, shape: tuple[int, ...],
          steps: range, structure: str) -> int:
    updates = 0
    for t in steps:
        x, y = batch(t, shape)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        updates += s.step() is not None
        assert_structured(s, structure)
    return updates


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("structure", ["2:4", "fan-in"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_keeps_the_structure_after_every_step(net: str, structure: str, method: str) -> None:
    make, shape = NETS[net]
    model = make(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opts = options(method, structure)
    s = granet.create_sparsifier(method, model, opt, **opts)
    structure = opts["structure"]
    assert_structured(s, structure)
    updates = train(model, opt, s, shape, range(1, STEPS + 1), structure)
    # ΔT = 5: regrowth at 5 ... 25 (granet), 5 ... 20 (before regrow_end 22); pruning at 5, 10, 15 (tf)
    assert updates == {"granet": 5, "granet-st": 5, "rigl": 4, "set": 4, "gmp": 3, "static": 0}[method]
    for p, m in zip(s.params, s.masks.values()):
        assert int(torch.count_nonzero(p.detach()[~m])) == 0
    parsed = parse_structure(structure)
    if parsed.kind == "n:m":  # final density exactly N / M, every group exactly N
        assert s.density() == parsed.n / parsed.m
        assert all(bool((group_counts(m, parsed.m) == parsed.n).all()) for m in s.masks.values())
        assert s.layer_density() == {n: parsed.n / parsed.m for n in s.names}
    else:  # every row k_i; the pruning methods end at their per-layer targets
        ks = [int(row_counts(m)[0]) for m in s.masks.values()]
        assert s.counts == [k * m.shape[0] for k, m in zip(ks, s.masks.values())]
        if method in PRUNING:
            assert s.counts == s.final_counts
    if method in ("rigl", "set", "granet"):
        assert s.last_update is not None and s.last_update.regrown == s.last_update.dropped


def test_ties_of_zero_weights_stay_structured_and_deterministic() -> None:
    """All weights zero and no learning: every prune, drop and regrowth is decided by ties only."""
    def run() -> list[torch.Tensor]:
        model = mlp(0)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        s = granet.create_sparsifier("granet", model, opt, **options("granet", "2:4"))
        train(model, opt, s, (16,), range(1, STEPS + 1), "2:4")
        assert s.density() == 0.5
        return [m.clone() for m in s.masks.values()]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(rows_view(m)[0], rows_view(m)[1]) for m in first)  # a seeded draw, not index order


def test_regrown_weights_start_at_zero_and_the_group_counts_hold() -> None:
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    s = granet.create_sparsifier("rigl", model, opt, **options("rigl", "2:4"))
    train(model, opt, s, (16,), range(1, 5), "2:4")
    before = [m.clone() for m in s.masks.values()]
    train(model, opt, s, (16,), range(5, 6), "2:4")
    report = s.last_update
    assert report is not None and report.step == 5 and report.dropped == report.regrown > 0
    for p, old, new in zip(s.params, before, s.masks.values()):
        assert torch.equal(group_counts(old, 4), group_counts(new, 4))
        fresh = new & ~old
        assert bool(fresh.any()) and int(torch.count_nonzero(p.detach()[fresh])) == 0


@pytest.mark.parametrize("method,structure", [("granet", "2:4"), ("rigl", "fan-in"), ("granet", "fan-in"),
                                              ("set", "2:4")])
def test_resume_is_bit_identical(method: str, structure: str) -> None:
    shape = (16,)
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    s = granet.create_sparsifier(method, model, opt, **options(method, structure))
    train(model, opt, s, shape, range(1, 13), structure)
    saved = ({k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(opt.state_dict()), s.state_dict())
    train(model, opt, s, shape, range(13, STEPS + 1), structure)
    model2 = mlp(7)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    s2 = granet.create_sparsifier(method, model2, opt2, **options(method, structure))
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    s2.load_state_dict(saved[2])
    train(model2, opt2, s2, shape, range(13, STEPS + 1), structure)
    assert s2.counts == s.counts
    assert all(torch.equal(a, b) for a, b in zip(s.masks.values(), s2.masks.values()))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_rng_device_keeps_the_structure() -> None:
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    s = granet.create_sparsifier("set", model, opt, rng="device", **options("set", "2:4"))
    train(model, opt, s, (16,), range(1, STEPS + 1), "2:4")
    cpu = granet.create_sparsifier("set", mlp(0), None, **options("set", "2:4"))
    assert s.density() == 0.5
    assert not all(torch.equal(a, b) for a, b in zip(s.masks.values(), cpu.masks.values()))


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("text,message", [
    ("4:2", "structure '4:2' asks for 4 active weights in groups of 2: N must be at most M"),
    ("2-4", "structure '2-4' is not unstructured, fan-in or N:M (such as 2:4)"),
    (124, "structure must be text such as '2:4', got 124 (YAML reads an unquoted 2:4 as the base-60 number 124: "
          "quote it)"),
    ("4:4", "structure '4:4' keeps every weight: dense is not a structure (N must be less than M)"),
])
def test_bad_structure_strings_are_one_line_errors(text: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        granet.create_sparsifier("rigl", mlp(0), None, density=0.5, structure=text, total_steps=10)
    assert str(info.value) == message


def test_a_layer_the_structure_does_not_fit_is_named() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError) as info:
        granet.create_sparsifier("rigl", model, None, density=0.5, structure="2:4", total_steps=10)
    assert str(info.value) == ("structure 2:4 does not fit 0.weight (shape (8, 6)): each output unit has 6 inputs "
                               "(6), not a multiple of 4; keep the layer dense")
    kept = granet.create_sparsifier("rigl", model, None, density=0.5, structure="2:4", total_steps=10,
                                    keep_dense=("0",))
    assert kept.names == ["2.weight"]


@pytest.mark.parametrize("changes,message", [
    (dict(structure="2:4", density=0.05),
     "structure 2:4 keeps 2 of every 4 weights, so the final density must be 2/4, got density=0.05: pass density=0.5"),
    (dict(structure="2:4", density=0.5, redistribute="momentum", grow="momentum", drop_fraction=0.3),
     "redistribute='momentum' moves regrowth between layers, which structure 2:4 does not allow (every group or "
     "row regrows what it lost): use redistribute='none'"),
    (dict(structure="fan-in", density=0.1, distribution="global"),
     "structure fan-in needs per-layer densities, which distribution 'global' does not give: pass a per-layer "
     "distribution such as 'erk'"),
])
def test_config_rules_are_one_line_errors(changes: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        SparsityConfig(total_steps=10).replace(**changes).validate()
    assert str(info.value) == message


def test_nm_makes_the_distribution_unused_and_set_masks_checks_the_structure() -> None:
    config = SparsityConfig(structure="2:4", density=0.5, distribution="erk")
    config.validate()
    assert {"distribution", "erk_power_scale"} <= set(config.unused_fields())
    assert "distribution" not in SparsityConfig(structure="fan-in", density=0.5).unused_fields()
    s = granet.create_sparsifier("static", mlp(0), None, density=0.5, structure="2:4")
    masks = {n: m.clone() for n, m in s.masks.items()}
    first = masks["0.weight"]
    row = first[0].clone()
    first[0] = torch.roll(row, 1) | row  # more than 2 in some group of row 0
    with pytest.raises(ValueError, match=r"^the mask of 0\.weight in the mapping given to set_masks breaks "
                                         r"structure 2:4: row 0 group \d+ holds [34] active entries, "
                                         r"expected 2 \(\d+ groups? in all\)$"):
        s.set_masks(masks)


# ---------------------------------------------------------------------------------------------- DDP

WORLD = 2


def _ddp_scenario(rank: int) -> dict:
    """One rank: granet 2:4 and rigl fan-in under DDP, the structure checked after every step."""
    result = {}
    for method, structure in (("granet", "2:4"), ("rigl", "fan-in")):
        model = conv(rank)  # every rank starts elsewhere: DDP and the sparsifier broadcast rank 0's
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        s = granet.create_sparsifier(method, ddp, opt, **options(method, structure))
        assert s.distributed
        for t in range(1, STEPS + 1):
            x, y = batch(t, (4, 4, 4))
            x, y = x[rank * 16:(rank + 1) * 16], y[rank * 16:(rank + 1) * 16]
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
            s.step()
            assert_structured(s, structure)
        result[f"{method} {structure}"] = [m.clone() for m in s.masks.values()]
    return result


def test_ddp_masks_are_identical_on_both_ranks(tmp_path: Path) -> None:
    init_method = f"file://{tmp_path / 'rendezvous'}"
    args = [(_ddp_scenario, r, WORLD, init_method, str(tmp_path), 60) for r in range(WORLD)]
    _, hung = spawn_ranks(run_rank, args, 150)
    errors = {r: (tmp_path / f"rank{r}.err").read_text() for r in range(WORLD)
              if (tmp_path / f"rank{r}.err").exists()}
    assert not hung and not errors, (hung, errors)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert sorted(results[0]) == ["granet 2:4", "rigl fan-in"]
    for key, masks in results[0].items():
        assert all(torch.equal(a, b) for a, b in zip(masks, results[1][key])), key
        for m in masks:
            counts = active_counts(m, parse_structure(key.split()[1]))
            assert bool((counts == counts.reshape(-1)[0]).all())
    assert all(bool((group_counts(m, 4) == 2).all()) for m in results[0]["granet 2:4"])


# ---------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("structure,extra", [("2:4", ["--keep-dense", "features.0"]), ("fan-in", []),
                                             ("fan-in", ["--prune", "layerwise"])])
def test_cli_runs_end_with_exact_structure(tmp_path: Path, structure: str, extra: list) -> None:
    run = tmp_path / "run"
    assert main(["train", "--method", "granet", "--structure", structure, "--epochs", "2", "--out", str(run),
                 "--progress", "log", *extra]) == 0
    state = torch.load(run / "checkpoint.pt", weights_only=True)["sparsifier"]
    assert state["config"]["structure"] == structure
    masks = state["masks"]
    assert "features.0.weight" not in masks if structure == "2:4" else "features.0.weight" in masks
    for name, mask in masks.items():
        if structure == "2:4":
            assert bool((group_counts(mask, 4) == 2).all()), name
        else:
            counts = row_counts(mask)
            assert bool((counts == counts[0]).all()), name
    if structure == "2:4":
        assert sum(int(m.sum()) for m in masks.values()) * 2 == sum(m.numel() for m in masks.values())
    config = (run / "config.yaml").read_text()
    assert f"structure: '{structure}'" in config or f"structure: {structure}" in config


def test_cli_without_density_follows_nm_and_refuses_a_layer_that_does_not_fit(tmp_path: Path, capsys) -> None:
    assert main(["train", "--method", "rigl", "--structure", "2:4", "--epochs", "1", "--out", str(tmp_path / "r"),
                 "--progress", "log"]) == 2
    err = capsys.readouterr().err
    assert "structure 2:4 does not fit features.0.weight (shape (64, 1, 3, 3)): each output unit has 9 inputs" in err
    assert err.count("\n") <= 2


@pytest.mark.parametrize("method", ["snip", "grasp", "synflow"])
def test_the_methods_that_score_at_initialisation_refuse_a_structure_in_one_line(method):
    # Their scores choose an unstructured mask; the method locks structure to say so before any scoring.
    with pytest.raises(ValueError, match=rf"^method '{method}' requires structure='unstructured', got '2:4'$"):
        granet.method_config(method, density=0.5, structure="2:4")
    assert granet.method_config(method, density=0.5).structure == "unstructured"


@pytest.mark.parametrize("method", ["granet", "granet-st", "gmp"])
def test_fan_in_under_global_pruning_moves_the_budget_between_layers_in_whole_rows(method: str) -> None:
    # The presets prune globally: one threshold over all layers decides each layer's share, which is
    # then a whole number of inputs per output unit.
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    s = granet.create_sparsifier(method, model, opt, structure="fan-in", density=0.2, total_steps=STEPS,
                                 update_interval=5)
    assert s.config.prune == "global" and s.final_counts == []
    train(model, opt, s, (16,), range(1, STEPS + 1), "fan-in")  # asserts the structure after every step
    ks = [int(row_counts(m)[0]) for m in s.masks.values()]
    rows = [m.shape[0] for m in s.masks.values()]
    assert s.counts == [k * r for k, r in zip(ks, rows)]
    # the target up to rounding each layer's share to whole rows (at most half a row per unit and layer)
    assert abs(sum(s.counts) - round(0.2 * s.total)) <= sum(r / 2 for r in rows) + len(rows)
    assert len(set(s.layer_density().values())) > 1  # not a uniform split: the threshold chose the shares
