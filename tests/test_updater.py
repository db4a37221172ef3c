"""The update policy on plain lists of tensors: hand-worked prune and drop-and-regrow results, with
the built-in pieces and with injected criteria and solver."""
from __future__ import annotations

from typing import Optional, Sequence

import pytest
import torch

from granet.methods import method_config
from granet.sparsity.config import SparsityConfig
from granet.sparsity.criteria import Criterion, get_grow_criterion, get_prune_criterion
from granet.sparsity.topology import LOCAL, Problem, UpdateReport
from granet.sparsity.updater import Criteria, TopologyUpdater


def _report(names: list[str]) -> UpdateReport:
    report = UpdateReport(step=1)
    report.layers = {n: {"pruned": 0, "dropped": 0, "regrown": 0} for n in names}
    return report


def test_global_prune_keeps_the_largest_magnitudes_over_all_layers() -> None:
    cfg = SparsityConfig(density=0.5, prune="global", prune_start=0, prune_end=10, update_interval=10,
                         drop_fraction=0.0, total_steps=10, init_density=1.0)
    updater = TopologyUpdater(cfg)
    a = torch.tensor([[0.1, -5.0], [3.0, 0.2]])
    b = torch.tensor([4.0, -0.3, 0.05, 2.0])
    masks = [torch.ones(2, 2, dtype=torch.bool), torch.ones(4, dtype=torch.bool)]
    assert updater.is_prune_step(10) and not updater.is_regrowth_step(10)
    assert updater.target_density(10) == 0.5
    new = updater.prune(10, [a, b], masks, [4, 4], [4, 4], [])
    # 8 weights, keep 4: |-5|, |4|, |3|, |2| -- three of them in one layer, one in the other.
    assert new[0].tolist() == [[False, True], [True, False]]
    assert new[1].tolist() == [True, False, False, True]


def test_layerwise_prune_leaves_a_layer_at_its_target_untouched() -> None:
    cfg = SparsityConfig(density=0.5, prune="layerwise", distribution="uniform", prune_start=0, prune_end=10,
                         update_interval=10, drop_fraction=0.0, total_steps=10, init_density=1.0)
    updater = TopologyUpdater(cfg)
    a, b = torch.tensor([1.0, -4.0, 2.0, 3.0]), torch.tensor([5.0, 6.0, 7.0, 8.0])
    done = torch.tensor([True, True, False, False])
    final = updater.final_layer_counts([(4,), (4,)], [4, 4])
    assert final == [2, 2]
    new = updater.prune(10, [a, b], [torch.ones(4, dtype=torch.bool), done], [4, 2], [4, 4], final)
    assert new[0].tolist() == [False, True, False, True]
    assert new[1] is done  # already at its target: the same tensor comes back


def test_drop_and_grow_resets_only_newly_active_positions() -> None:
    cfg = method_config("rigl", density=0.5, update_interval=1, drop_fraction=0.5, drop_decay="constant",
                        regrow_start=0, regrow_end=100, total_steps=100)
    updater = TopologyUpdater(cfg)
    weight = torch.nn.Parameter(torch.tensor([0.9, 0.1, 0.0, 0.0, 0.8, 0.2, 0.0, 0.0]))
    weight.grad = torch.tensor([0.0, 0.0, 5.0, 0.5, 0.0, 9.0, 0.4, 0.3])
    mask = torch.tensor([True, True, False, False, True, True, False, False])
    report = _report(["w"])
    fraction = updater.drop_fraction(1)
    n_drop = int(fraction * 4)
    assert fraction == 0.5 and n_drop == 2
    result = updater.drop_and_grow(1, ["w"], [weight], [mask], [4], None, report)
    # Drop the two smallest active (0.1 at 1 and 0.2 at 5); regrow the two largest |g| among the
    # inactive-after-drop positions: 9.0 at 5 (just dropped: keeps its value, not reset) and 5.0 at 2.
    assert result.masks[0].tolist() == [True, False, True, False, True, True, False, False]
    # 2 of 8 entries regrown: a mask (positions are for regrowing under 1/16 of a layer)
    assert result.reset[0].tolist() == [False, False, True, False, False, False, False, False]
    assert result.grown[0] is None
    assert report.layers["w"] == {"pruned": 0, "dropped": 2, "regrown": 2}
    assert report.drop_fraction == fraction


def test_drop_and_grow_gives_positions_when_few_are_regrown() -> None:
    cfg = method_config("rigl", density=0.5, update_interval=1, drop_fraction=0.5, drop_decay="constant",
                        regrow_start=0, regrow_end=100, total_steps=100)
    updater = TopologyUpdater(cfg)
    # 64 weights, 4 active: drop 2, regrow 2 (2 * 16 < 64: positions).
    weight = torch.nn.Parameter(torch.zeros(64))
    weight.data[[0, 10, 20, 30]] = torch.tensor([0.9, 0.1, 0.8, 0.2])
    weight.grad = torch.zeros(64)
    weight.grad[[10, 40, 41]] = torch.tensor([9.0, 5.0, 0.5])
    mask = torch.zeros(64, dtype=torch.bool)
    mask[[0, 10, 20, 30]] = True
    result = updater.drop_and_grow(1, ["w"], [weight], [mask], [4], None, _report(["w"]))
    # Drop 0.1 at 10 and 0.2 at 30; regrow 9.0 at 10 (just dropped: not reset) and 5.0 at 40.
    assert result.masks[0].nonzero().squeeze(1).tolist() == [0, 10, 20, 40]
    assert sorted(result.grown[0].tolist()) == [10, 40]
    assert result.reset[0].tolist() == [40]  # flat positions, only the newly active one


def test_dense_gradient_needs_follow_the_grow_criterion() -> None:
    common = dict(density=0.1, update_interval=10, total_steps=100)
    rigl = TopologyUpdater(method_config("rigl", **common))
    snfs = TopologyUpdater(method_config("snfs", **common))
    set_ = TopologyUpdater(method_config("set", **common))
    static = TopologyUpdater(method_config("static", **common))
    steps = range(1, 101)
    rigl_steps = [t for t in steps if rigl.needs_dense_gradient(t)]
    assert rigl_steps == [t for t in steps if rigl.is_regrowth_step(t)] and rigl_steps[0] == 10
    assert all(snfs.needs_dense_gradient(t) for t in steps)
    assert not any(set_.needs_dense_gradient(t) or static.needs_dense_gradient(t) for t in steps)
    assert static.reached_final_density(0) and static.drop_fraction(10) == 0.0


def _rigl_one_layer(**criteria: Criterion) -> TopologyUpdater:
    cfg = method_config("rigl", density=0.5, update_interval=1, drop_fraction=0.5, drop_decay="constant",
                        regrow_start=0, regrow_end=100, total_steps=100)
    return TopologyUpdater(cfg, criteria=Criteria(**dict(Criteria.of(cfg).__dict__, **criteria)))


def test_an_injected_drop_criterion_decides_what_is_dropped() -> None:
    # The weights, gradient and mask of test_drop_and_grow_resets_only_newly_active_positions, but the
    # drop keeps the active weights with the largest |gradient| instead of the largest |w|.
    updater = _rigl_one_layer(drop=Criterion("gradient-drop", lambda p, name, opt, gen: p.grad.abs()))
    weight = torch.nn.Parameter(torch.tensor([0.9, 0.1, 0.0, 0.0, 0.8, 0.2, 0.0, 0.0]))
    weight.grad = torch.tensor([3.0, 0.5, 5.0, 0.0, 0.1, 9.0, 0.4, 0.3])
    mask = torch.tensor([True, True, False, False, True, True, False, False])
    report = _report(["w"])
    result = updater.drop_and_grow(1, ["w"], [weight], [mask], [4], None, report)
    # Active 0, 1, 4, 5 have |g| 3, 0.5, 0.1, 9: drop 4 and 1. Candidates {1, 2, 3, 4, 6, 7} have |g|
    # 0.5, 5, 0, 0.1, 0.4, 0.3: regrow 2 (new: reset) and 1 (just dropped: keeps its value).
    assert result.masks[0].tolist() == [True, True, True, False, False, True, False, False]
    assert result.reset[0].tolist() == [False, False, True, False, False, False, False, False]
    assert report.layers["w"] == {"pruned": 0, "dropped": 2, "regrown": 2}


def test_an_injected_prune_criterion_sets_the_global_threshold() -> None:
    # Connection sensitivity |w * g| instead of |w|, on the weights of the first test.
    cfg = SparsityConfig(density=0.5, prune="global", prune_start=0, prune_end=10, update_interval=10,
                         drop_fraction=0.0, total_steps=10, init_density=1.0)
    seen = []

    def sensitivity(param: torch.Tensor, name: str, optimizer: object, generator: torch.Generator) -> torch.Tensor:
        seen.append((name, optimizer))
        return (param.detach() * param.grad).abs()

    criteria = Criteria(prune=Criterion("sensitivity", sensitivity), drop=get_prune_criterion("magnitude"),
                        grow=get_grow_criterion("gradient"))
    updater = TopologyUpdater(cfg, criteria=criteria)
    a = torch.nn.Parameter(torch.tensor([[0.1, -5.0], [3.0, 0.2]]))
    b = torch.nn.Parameter(torch.tensor([4.0, -0.3, 0.05, 2.0]))
    a.grad = torch.tensor([[10.0, 0.1], [1.0, 1.0]])
    b.grad = torch.tensor([0.1, 10.0, 100.0, 1.0])
    masks = [torch.ones(2, 2, dtype=torch.bool), torch.ones(4, dtype=torch.bool)]
    opt = torch.optim.SGD([a, b], lr=0.1)
    new = updater.prune(10, [a, b], masks, [4, 4], [4, 4], [], names=["a", "b"], optimizer=opt)
    # |w g|: a 1, 0.5, 3, 0.2; b 0.4, 3, 5, 2. Keep 4 of 8: 5, 3, 3, 2 (|w| would keep -5, 4, 3, 2).
    assert new[0].tolist() == [[False, False], [True, False]]
    assert new[1].tolist() == [False, True, True, True]
    assert seen == [("a", opt), ("b", opt)]


class _Recording:
    """A solver solving each call's problems round by round as a sharded solver does (first every
    chain's first problems, then every follow-up), with LOCAL's exact paths, recording what each
    round was asked. ``sharded``: present itself as sharded (SNFS then gathers its kept values)."""

    def __init__(self, sharded: bool = False) -> None:
        self.sharded = sharded
        self.calls: list[list[list[tuple[int, int, bool]]]] = []

    def __call__(self, problems: Sequence[Problem]) -> list[list[torch.Tensor]]:
        results: list[list[torch.Tensor]] = [[] for _ in problems]
        rounds, pending = [], list(enumerate(problems))
        while pending:
            rounds.append([(p.k, p.size, p.positions) for _, p in pending])
            follow = []
            for j, problem in pending:
                results[j] = LOCAL.solve(problem)
                after = None if problem.then is None else problem.then(results[j])
                if after is not None:
                    follow.append((j, after))
            pending = follow
        self.calls.append(rounds)
        return results

    def local(self, tensor: torch.Tensor, layer: int) -> torch.Tensor:
        return tensor

    def gather_rows(self, pieces: Sequence[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
        self.calls.append([[("gather", len(pieces), False)]])  # type: ignore[list-item]
        return list(pieces)


def test_one_selection_round_per_phase_with_one_problem_per_changed_layer() -> None:
    # What the sharded solver relies on for a fixed number of collectives: the drops of every layer
    # in one round, the regrowths in another (SNFS, sharded, gathers its kept momentum once in
    # between: with one rank, the same shares as the local path). The masks equal LOCAL's.
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 8, generator=g)) for _ in range(3)]
    params.append(torch.nn.Parameter(torch.randn(2, 2, generator=g)))
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    masks = [torch.rand(p.shape, generator=g) < 0.25 for p in params[:2]]
    masks += [torch.ones(64, 8, dtype=torch.bool), torch.tensor([[True, False], [False, False]])]
    counts = [int(m.sum()) for m in masks]  # a dense layer and a 1-weight layer (floor(0.5 * 1) = 0) stay
    for method in ("rigl", "snfs"):
        cfg = method_config(method, density=0.25, update_interval=1, drop_fraction=0.5, drop_decay="constant",
                            regrow_start=0, regrow_end=100, total_steps=100)
        recording = _Recording(sharded=method == "snfs")
        names = ["a", "b", "dense", "tiny"]
        got = TopologyUpdater(cfg, solver=recording).drop_and_grow(1, names, params, masks, counts, opt, _report(names))
        want = TopologyUpdater(cfg).drop_and_grow(1, names, params, masks, counts, opt, _report(names))
        assert all(torch.equal(x, y) for x, y in zip(got.masks, want.masks))
        assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(got.reset, want.reset))
        drops = [c // 2 for c in counts[:2]]
        drop_round = [(c - d, 512, False) for c, d in zip(counts, drops)]
        if method == "rigl":  # one call: every drop, then every regrowth (the follow-ups)
            assert recording.calls == [[drop_round, [(d, 512, d * 16 < 512) for d in drops]]]
        else:  # the drops; the kept momentum gathered once; the regrowths by the shares
            assert recording.calls[:2] == [[drop_round], [[("gather", 2, False)]]] and len(recording.calls) == 3
            grows = [k for k, _, _ in recording.calls[2][0]]
            assert sum(grows) == sum(drops) and recording.calls[2] == [[(k, 512, k * 16 < 512) for k in grows]]
        assert got.masks[2] is masks[2] and got.masks[3] is masks[3]  # left alone: the same tensors


def test_protect_units_keeps_each_units_best_weight_at_the_drop() -> None:
    cfg = method_config("rigl", density=0.5, update_interval=1, drop_fraction=0.6, drop_decay="constant",
                        regrow_start=0, regrow_end=100, total_steps=100)
    weight = torch.nn.Parameter(torch.tensor([[0.1, 0.05, 0.0, 0.0],
                                              [5.0, 4.0, 0.0, 0.0],
                                              [0.0, 0.0, 0.2, 0.0]]))
    weight.grad = torch.tensor([[0.0, 0.0, 1.0, 0.0],
                                [0.0, 0.0, 3.0, 2.0],
                                [7.0, 0.5, 0.0, 0.25]])
    mask = weight.detach() != 0
    # Without protection: drop floor(0.6 * 5) = 3 (0.05, 0.1, 0.2): units 0 and 2 lose every input,
    # and the 3 regrown go to the largest gradients (7.0, 3.0, 2.0).
    plain = TopologyUpdater(cfg).drop_and_grow(1, ["w"], [weight], [mask], [5], None, _report(["w"]))
    assert plain.masks[0].tolist() == [[False, False, False, False], [True, True, True, True],
                                       [True, False, False, False]]
    # Protected: each unit keeps its largest weight (0.1, 5.0, 0.2), so only 5 - 3 = 2 are dropped
    # (0.05 and 4.0) and 2 regrown (7.0 and 3.0).
    updater = TopologyUpdater(cfg.replace(protect_units=True))
    report = _report(["w"])
    result = updater.drop_and_grow(1, ["w"], [weight], [mask], [5], None, report, alive=[3])
    assert result.masks[0].tolist() == [[True, False, False, False], [True, False, True, False],
                                        [True, False, True, False]]
    assert report.layers["w"] == {"pruned": 0, "dropped": 2, "regrown": 2}


def test_protect_units_at_the_global_prune_and_for_in_by_out_weights() -> None:
    cfg = SparsityConfig(density=0.5, prune="global", prune_start=0, prune_end=10, update_interval=10,
                         drop_fraction=0.0, total_steps=10, init_density=1.0)
    c = torch.tensor([[0.1, 0.2], [3.0, 0.3]])
    b = torch.tensor([[4.0, -0.3], [0.05, 2.0]])
    full = [torch.ones(2, 2, dtype=torch.bool)] * 2
    # Keep 4 of 8 by magnitude: 4, 3, 2 and 0.3; c's first row loses both inputs.
    plain = TopologyUpdater(cfg).prune(10, [c, b], full, [4, 4], [4, 4], [])
    assert [m.tolist() for m in plain] == [[[False, False], [True, True]], [[True, False], [False, True]]]
    # Protected: every row's largest first (0.2, 3 | 4, 2), so 0.2 stays instead of 0.3.
    protected = TopologyUpdater(cfg.replace(protect_units=True)).prune(10, [c, b], full, [4, 4], [4, 4], [])
    assert [m.tolist() for m in protected] == [[[False, True], [True, False]], [[True, False], [False, True]]]
    # Weights stored in x out: c's units are its columns, whose largest are 3 and 0.3 (b's rows: 4, 2).
    columns = TopologyUpdater(cfg.replace(protect_units=True), unit_dims=[1, 0]).prune(10, [c, b], full, [4, 4],
                                                                                      [4, 4], [])
    assert [m.tolist() for m in columns] == [m.tolist() for m in plain]
    # Fewer kept than units: the units with the strongest best weight keep theirs (4 and 3, not 2 and 0.2).
    two = TopologyUpdater(cfg.replace(protect_units=True, density=0.25)).prune(10, [c, b], full, [4, 4], [4, 4], [])
    assert [m.reshape(-1).nonzero().squeeze(1).tolist() for m in two] == [[2], [0]]
    with pytest.raises(ValueError, match="protect_units must be true or false, got 'yes'"):
        method_config("rigl", protect_units="yes")
