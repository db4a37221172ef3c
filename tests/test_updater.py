"""The update policy on plain lists of tensors: hand-worked prune and drop-and-regrow results."""
from __future__ import annotations

import torch

from granet.config import SparsityConfig
from granet.methods import method_config
from granet.topology import UpdateReport
from granet.updater import TopologyUpdater


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
