"""Hand-worked exact cases for selection and every prune / grow criterion."""
import pytest
import torch
from torch import nn

import granet
from granet.sparsity import criteria


def test_select_top_exact_with_ties():
    scores = torch.tensor([0.5, -1.0, 3.0, 2.0, 2.0, 0.0, 7.0, 1.0])
    # k=3: 7 and 3 are above the threshold 2; one of the two 2s fills the last slot (lowest index).
    assert criteria.select_top(scores, 3).tolist() == [False, False, True, True, False, False, True, False]
    assert criteria.select_top(scores, 4).tolist() == [False, False, True, True, True, False, True, False]
    assert criteria.select_top(scores, 0).sum() == 0
    assert criteria.select_top(scores, 8).all()
    assert criteria.select_top(scores, 99).all()


def test_select_top_random_tie_breaking_is_seeded_and_exact():
    scores = torch.zeros(1000)
    a = criteria.select_top(scores, 100, criteria.seeded_generator(0, "x"))
    b = criteria.select_top(scores, 100, criteria.seeded_generator(0, "x"))
    c = criteria.select_top(scores, 100, criteria.seeded_generator(1, "x"))
    assert int(a.sum()) == int(c.sum()) == 100
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a[500:].any()  # ties are not all taken from the front


def _one_layer(weights, mask, method, optimizer=False, **options):
    """One bias-free Linear holding exactly ``weights`` under exactly ``mask`` (installed after the
    sparsifier's own random initial mask, which would otherwise zero some of the given weights)."""
    layer = nn.Linear(len(weights), 1, bias=False)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0, momentum=0.9) if optimizer else None
    s = granet.create_sparsifier(method, layer, opt, **options)
    s.set_masks({"weight": torch.tensor([mask])})
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weights]))
    return layer, opt, s


def test_global_magnitude_prune_hand_worked():
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, -0.9, 0.3, 0.0], [-0.5, 0.2, 0.8, -0.05]]))
    s = granet.create_sparsifier("gmp", layer, density=0.5, prune_start=0, prune_end=1, update_interval=1)
    report = s.step()
    assert report.pruned == 4
    assert s.mask_of("weight").tolist() == [[False, True, True, False], [True, False, True, False]]
    expected = torch.tensor([[0.0, -0.9, 0.3, 0.0], [-0.5, 0.0, 0.8, 0.0]])
    assert torch.equal(layer.weight.detach(), expected)


def test_gradient_regrowth_hand_worked():
    # Active {0, 2}; drop 1 of 2 (r = 0.5): the smaller |w| (index 0) goes. Candidates {0, 1, 3}
    # have |grad| 0.2, 0.1, 0.8 -> index 3 is regrown, at zero.
    layer, _, s = _one_layer([1.0, 0.0, 3.0, 0.0], [True, False, True, False], "rigl", density=0.5,
                             drop_fraction=0.5, drop_decay="constant", update_interval=1, regrow_end=10)
    layer.weight.grad = torch.tensor([[0.2, -0.1, 5.0, -0.8]])
    report = s.step()
    assert (report.dropped, report.regrown, report.pruned) == (1, 1, 0)
    assert s.mask_of("weight").tolist() == [[False, False, True, True]]
    assert layer.weight.tolist() == [[0.0, 0.0, 3.0, 0.0]]


@pytest.mark.parametrize("reinit, expected_w", [("new", 1.0), ("all", 0.0)])
def test_dropped_weight_can_be_regrown(reinit, expected_w):
    layer, _, s = _one_layer([1.0, 0.0, 3.0, 0.0], [True, False, True, False], "rigl", density=0.5,
                             drop_fraction=0.5, drop_decay="constant", update_interval=1, regrow_end=10,
                             reinit_regrown=reinit)
    layer.weight.grad = torch.tensor([[9.0, 0.1, 0.0, 0.2]])  # the dropped weight has the largest gradient
    report = s.step()
    assert (report.dropped, report.regrown) == (1, 1)
    assert s.mask_of("weight").tolist() == [[True, False, True, False]]
    # "new" (default): never really removed, so it keeps its value; "all": restarts at zero.
    assert layer.weight.tolist() == [[expected_w, 0.0, 3.0, 0.0]]


def _drop_regrow_case(reinit):
    """Active {0, 1, 2} with |w| 1, 2, 5; r = 0.67 drops floor(2.01) = 2 (indices 0 and 1).

    After one SGD step (lr 0, momentum 0.9) the momentum is 0.9 * m0 + g. Candidates {0, 1, 3, 4, 5}
    have |g| 9, 0, 0, 7, 0.5: index 0 (just dropped) and index 4 (inactive before) regrow.
    """
    layer = nn.Linear(6, 1, bias=False)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0, momentum=0.9)
    s = granet.create_sparsifier("rigl", layer, opt, density=0.5, drop_fraction=0.67, drop_decay="constant",
                                 update_interval=1, total_steps=10, reinit_regrown=reinit)
    s.set_masks({"weight": torch.tensor([[True, True, True, False, False, False]])})
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 5.0, 0.0, 0.0, 0.0]]))
    m0 = torch.tensor([[0.1, 0.2, 0.3, 0.0, 0.0, 0.0]])
    grad = torch.tensor([[9.0, 0.0, 0.0, 0.0, 7.0, 0.5]])
    opt.state[layer.weight]["momentum_buffer"] = m0.clone()
    layer.weight.grad = grad.clone()
    opt.step()
    momentum = m0.mul(0.9).add(grad)  # what SGD computed, in the same float32 operations
    report = s.step()
    return layer, opt, s, report, momentum


def test_reinit_new_keeps_value_and_state_of_dropped_then_regrown_weights():
    layer, opt, s, report, momentum = _drop_regrow_case("new")
    assert (report.dropped, report.regrown, report.pruned) == (2, 2, 0)
    assert report.layers == {"weight": {"pruned": 0, "dropped": 2, "regrown": 2}}
    assert s.mask_of("weight").tolist() == [[True, False, True, False, True, False]]
    assert s.counts == [3]
    assert layer.weight.tolist() == [[1.0, 0.0, 5.0, 0.0, 0.0, 0.0]]  # index 0 kept, index 4 new at 0
    buf = opt.state[layer.weight]["momentum_buffer"]
    expected = torch.zeros(1, 6)
    expected[0, 0], expected[0, 2] = momentum[0, 0], momentum[0, 2]  # kept; dropped 1 and new 4 zeroed
    assert torch.equal(buf, expected)


def test_reinit_all_resets_every_regrown_weight():
    layer, opt, s, report, momentum = _drop_regrow_case("all")
    assert (report.dropped, report.regrown, report.pruned) == (2, 2, 0)
    assert s.mask_of("weight").tolist() == [[True, False, True, False, True, False]]
    assert s.counts == [3]
    assert layer.weight.tolist() == [[0.0, 0.0, 5.0, 0.0, 0.0, 0.0]]
    expected = torch.zeros(1, 6)
    expected[0, 2] = momentum[0, 2]
    assert torch.equal(opt.state[layer.weight]["momentum_buffer"], expected)


def test_weight_pruned_and_regrown_in_one_update_restarts_at_zero():
    # GraNet-style update: the prune phase removes index 1 for good (it is zeroed); if the regrow
    # phase then picks it, it is a new weight, not one "never really removed".
    layer = nn.Linear(4, 1, bias=False)
    s = granet.create_sparsifier("granet", layer, None, density=0.5, init_density=0.75, distribution="uniform",
                                 prune_start=0, prune_end=1, update_interval=1, drop_fraction=0.5,
                                 drop_decay="constant", total_steps=10)
    s.set_masks({"weight": torch.tensor([[True, True, True, False]])})
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 1.0, 2.0, 0.0]]))
    layer.weight.grad = torch.tensor([[0.0, 5.0, 0.0, 4.0]])
    report = s.step()
    # Prune to 2 of 4: index 1 (|w| = 1) goes. Drop floor(0.5 * 2) = 1: index 2 (|w| = 2).
    # Candidates {1, 2, 3} have |g| 5, 0, 4: index 1 regrows, at zero.
    assert (report.pruned, report.dropped, report.regrown) == (1, 1, 1)
    assert s.mask_of("weight").tolist() == [[True, True, False, False]]
    assert layer.weight.tolist() == [[3.0, 0.0, 0.0, 0.0]]


def test_momentum_regrowth_hand_worked_and_state_zeroed():
    layer, opt, s = _one_layer([2.0, 0.0, -4.0, 0.0, 1.0, 0.0], [True, False, True, False, True, False], "snfs",
                               optimizer=True, density=0.5, drop_fraction=0.34, drop_decay="constant",
                               update_interval=1, regrow_end=10)
    layer.weight.grad = torch.zeros(1, 6)
    opt.state[layer.weight]["momentum_buffer"] = torch.tensor([[0.5, 0.3, 0.1, -0.7, 0.2, 0.6]])
    opt.step()  # lr 0: weights unchanged; momentum becomes 0.9 * m (no dampening) + grad 0
    report = s.step()
    # drop int(0.34 * 3) = 1: |w|=1 at index 4. Candidates {1, 3, 4, 5}: |m| 0.27, 0.63, 0.18, 0.54 -> 3.
    assert (report.dropped, report.regrown) == (1, 1)
    assert s.mask_of("weight").tolist() == [[True, False, True, True, False, False]]
    buf = opt.state[layer.weight]["momentum_buffer"]
    assert buf[0, 3] == 0.0  # regrown weight starts with zero momentum
    assert buf[0, 5] != 0.0  # SNFS keeps the momentum of inactive weights (its grow signal)


def test_random_regrowth_seeded_per_step_and_layer():
    def run(seed):
        layer, _, s = _one_layer([float(i + 1) for i in range(64)], [i % 2 == 0 for i in range(64)], "set",
                                 density=0.5, drop_fraction=0.25, drop_decay="constant", update_interval=1,
                                 regrow_end=10, seed=seed)
        masks = []
        for _ in range(3):
            s.step()
            masks.append(s.mask_of("weight").clone())
        return masks

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.equal(a[0], a[1])  # a new draw at every update step
    assert all(int(m.sum()) == 32 for m in a)


def test_gradient_regrowth_without_grad_is_a_clear_error():
    layer, _, s = _one_layer([1.0, 0.0, 3.0, 0.0], [True, False, True, False], "rigl", density=0.5,
                             drop_fraction=0.5, drop_decay="constant", update_interval=1, regrow_end=10)
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        s.step()


@pytest.mark.parametrize("n", [(1 << 16) + 3, (1 << 20) + 77])
@pytest.mark.parametrize("kind", ["continuous", "ties", "zeros"])
@pytest.mark.parametrize("fraction", [0.0001, 0.1, 0.5, 0.97])
def test_bracketed_selection_equals_plain_kthvalue(kind, fraction, n):
    g = torch.Generator().manual_seed(3)
    if kind == "continuous":
        scores = torch.rand(n, generator=g)
    elif kind == "ties":
        scores = torch.randint(0, 40, (n,), generator=g).float()
    else:
        scores = torch.where(torch.rand(n, generator=g) < 0.7, 0.0, torch.rand(n, generator=g))
    k = int(fraction * n)
    fast = criteria.select_top(scores, k, criteria.seeded_generator(0, "t"))
    plain = criteria.select_top_plain(scores, k, criteria.seeded_generator(0, "t"))
    assert int(torch.count_nonzero(fast)) == k
    assert torch.equal(fast, plain)
    threshold = scores[fast].min()
    assert bool((scores[~fast] <= threshold).all())
