"""Pruning at initialisation: SNIP, GraSP and SynFlow scores on hand-worked and tiny models, exact masks."""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import batch, tiny_cnn, train_step
from torch import nn
from torch.func import functional_call

import granet
from granet.baselines import saliency
from granet.sparsity import criteria

CE = nn.functional.cross_entropy


def hand_mlp() -> nn.Module:
    """f(x) = W2 relu(W1 x), no biases, float64, with the weights of the worked example below."""
    model = nn.Sequential(nn.Linear(3, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -1.0, 0.5], [0.5, 1.0, -1.0]]))
        model[2].weight.copy_(torch.tensor([[1.0, -2.0]]))
    return model


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


X = torch.tensor([[1.0, 2.0, 0.0], [2.0, 0.0, 1.5]], dtype=torch.float64)
Y = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
NAMES = ["0.weight", "2.weight"]
# Worked by hand. Pre-activations a1 = (-1, 2.5), a2 = (2.75, -0.5); hidden h1 = (0, 2.5), h2 = (2.75, 0);
# outputs f = (-5, 2.75); residuals r = f - y = (-5, 1.75). L = mean(r^2), so dL/df_i = r_i.
# dL/dW2 = sum_i r_i h_i = -5 (0, 2.5) + 1.75 (2.75, 0) = (4.8125, -12.5).
# dL/dh_i = r_i W2 gated by a_i > 0: (0, 10) and (1.75, 0); dL/dW1 = sum_i dh_i x_i^T:
#   row 0 = 1.75 (2, 0, 1.5) = (3.5, 0, 2.625), row 1 = 10 (1, 2, 0) = (10, 20, 0).
# SNIP |g * w|: W1 -> [[3.5, 0, 1.3125], [5, 20, 0]], W2 -> [[4.8125, 25]]. Every value is dyadic, so
# float64 arithmetic is exact in any order.
SNIP_W1 = torch.tensor([[3.5, 0.0, 1.3125], [5.0, 20.0, 0.0]], dtype=torch.float64)
SNIP_W2 = torch.tensor([[4.8125, 25.0]], dtype=torch.float64)


def test_snip_scores_equal_the_hand_worked_example() -> None:
    model = hand_mlp()
    scores = saliency.snip_scores(model, NAMES, (X, Y), mse)
    assert torch.equal(scores[0], SNIP_W1) and torch.equal(scores[1], SNIP_W2)
    # Two batches of one example: the mean of the per-batch gradients is the same gradient here.
    split = saliency.snip_scores(model, NAMES, [(X[:1], Y[:1]), (X[1:], Y[1:])], mse)
    assert torch.equal(split[0], SNIP_W1) and torch.equal(split[1], SNIP_W2)


def test_snip_mask_keeps_the_exact_top_k() -> None:
    masks = saliency.snip(hand_mlp(), NAMES, (X, Y), mse, density=0.5)
    # 8 weights, keep 4: the scores 25, 20, 5 and 4.8125.
    assert torch.equal(masks["0.weight"], torch.tensor([[False, False, False], [True, True, False]]))
    assert torch.equal(masks["2.weight"], torch.tensor([[True, True]]))
    # Keep 7: one of the two zero scores, drawn by the seeded generator, the same on every call.
    a = saliency.snip(hand_mlp(), NAMES, (X, Y), mse, density=7 / 8, seed=3)
    b = saliency.snip(hand_mlp(), NAMES, (X, Y), mse, density=7 / 8, seed=3)
    assert sum(int(m.sum()) for m in a.values()) == 7
    assert all(torch.equal(a[n], b[n]) for n in NAMES)
    dropped = ~a["0.weight"]
    assert int(dropped.sum()) == 1 and bool(dropped[0, 1] | dropped[1, 2])


def tanh_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def test_grasp_hessian_gradient_equals_autograd_hvp() -> None:
    model = tanh_mlp()
    names = ["0.weight", "2.weight"]
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
               for _ in range(2)]
    temperature = 2.0
    weights = tuple(model.get_parameter(n).detach() for n in names)

    def loss(*ws: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, ws))
        return sum(CE(functional_call(model, params, (x,)) / temperature, y) for x, y in batches) / len(batches)

    ws = [w.clone().requires_grad_() for w in weights]
    expected_g = torch.autograd.grad(loss(*ws), ws)
    _, expected_hg = torch.autograd.functional.hvp(loss, weights, v=tuple(expected_g))
    got_g, got_hg = saliency.grasp_hessian_gradient(model, names, batches, CE, temperature=temperature)
    for a, b in zip(got_g, expected_g):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    for a, b in zip(got_hg, expected_hg):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert any(bool(h.abs().max() > 1e-6) for h in got_hg), "Hg must not vanish, or the test proves nothing"
    scores = saliency.grasp_scores(model, names, batches, CE, temperature=temperature)
    for s, w, h in zip(scores, weights, got_hg):
        assert torch.equal(s, -(w * h))
    # GraSP removes the highest scores: every kept score is <= every removed one, exact count.
    masks = saliency.grasp(model, names, batches, CE, density=0.4, temperature=temperature)
    flat_s = torch.cat([s.reshape(-1) for s in scores])
    flat_m = torch.cat([masks[n].reshape(-1) for n in names])
    assert int(flat_m.sum()) == round(0.4 * flat_s.numel())
    assert flat_s[flat_m].max() <= flat_s[~flat_m].min()


def bias_free_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 4, bias=False),
                         nn.ReLU(), nn.Linear(4, 3, bias=False))


def test_synflow_conserves_synaptic_saliency_per_layer() -> None:
    model = bias_free_mlp()
    names = ["1.weight", "3.weight", "5.weight"]
    w = [model.get_parameter(n).detach().double().abs() for n in names]
    # R = 1^T |W3| |W2| |W1| 1 (with |w| every ReLU passes its input); each layer's score sums to R.
    r = float(torch.ones(3, dtype=torch.float64) @ w[2] @ w[1] @ w[0] @ torch.ones(6, dtype=torch.float64))
    scores = saliency.synflow_scores(model, names, (6,))
    sums = [float(s.sum()) for s in scores]
    for value in sums:
        assert value == pytest.approx(r, rel=1e-12)
    # The same holds on a masked network (R of the masked network).
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) > 0.3
             for i, (n, p) in enumerate(zip(names, w))}
    wm = [p * masks[n] for n, p in zip(names, w)]
    r_masked = float(torch.ones(3, dtype=torch.float64) @ wm[2] @ wm[1] @ wm[0] @ torch.ones(6, dtype=torch.float64))
    for s in saliency.synflow_scores(model, names, (6,), masks):
        assert float(s.sum()) == pytest.approx(r_masked, rel=1e-12)


def test_synflow_matches_an_in_place_absolute_copy_with_batchnorm_in_eval_mode() -> None:
    model = tiny_cnn(0)
    model.train()
    with torch.no_grad():  # non-trivial running statistics, so eval-mode batch norm matters
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    names = [n for n, _ in granet.sparsifiable_parameters(model)]
    # Independent reference: the original recipe, abs_() on a float64 deep copy of the whole state.
    ref = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for t in ref.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    ref(torch.ones(1, 3, 6, 6, dtype=torch.float64)).sum().backward()
    expected = [(ref.get_parameter(n).grad * ref.get_parameter(n)).abs() for n in names]
    got = saliency.synflow_scores(model, names, (3, 6, 6))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0.0)
    assert model.training and model[1].training


def test_synflow_iterates_on_the_exponential_schedule() -> None:
    model = tiny_cnn(1)
    names = [n for n, _ in granet.sparsifiable_parameters(model)]
    total = sum(model.get_parameter(n).numel() for n in names)
    density, rounds = 0.1, 3
    masks = None
    for j in range(1, rounds + 1):
        scores = saliency.synflow_scores(model, names, (3, 6, 6), masks)
        flat = torch.cat([(s if masks is None else torch.where(masks[n], s, -1.0)).reshape(-1)
                          for n, s in zip(names, scores)])
        keep = criteria.select_top(flat, round(density ** (j / rounds) * total),
                                   criteria.seeded_generator(0, "synflow", j))
        masks = {n: k.view(s.shape) for n, k, s in zip(names, keep.split([s.numel() for s in scores]), scores)}
    got = saliency.synflow(model, names, (3, 6, 6), density, rounds=rounds)
    assert all(torch.equal(got[n], masks[n]) for n in names)
    assert sum(int(m.sum()) for m in got.values()) == round(density * total)


def score(method: str, model: nn.Module, names: list[str], density: float, **kw: object) -> dict:
    if method == "snip":
        return saliency.snip(model, names, [batch(0), batch(1)], CE, density, **kw)
    if method == "grasp":
        return saliency.grasp(model, names, [batch(0), batch(1)], CE, density, **kw)
    return saliency.synflow(model, names, (3, 6, 6), density, rounds=5)


@pytest.mark.parametrize("method", saliency.SCORING_METHODS)
@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
def test_exact_global_counts(method: str, density: float) -> None:
    model = tiny_cnn(0)
    names = [n for n, _ in granet.sparsifiable_parameters(model)]
    masks = score(method, model, names, density)
    total = sum(model.get_parameter(n).numel() for n in names)
    assert list(masks) == names
    assert all(m.dtype == torch.bool and m.shape == model.get_parameter(n).shape for n, m in masks.items())
    assert sum(int(m.sum()) for m in masks.values()) == round(density * total)


@pytest.mark.parametrize("method", saliency.SCORING_METHODS)
@pytest.mark.parametrize("train_mode", [False, True])
def test_model_and_rng_unchanged_by_scoring(method: str, train_mode: bool) -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(64, 5))
    model.train()
    model[3].eval()  # mixed modes must come back exactly as they were
    names = ["0.weight", "5.weight"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    kw = {} if method == "synflow" else {"train_mode": train_mode}
    masks = score(method, model, names, 0.3, **kw)
    assert sum(int(m.sum()) for m in masks.values()) == round(0.3 * (108 + 320))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("method", saliency.SCORING_METHODS)
def test_prune_at_init_mask_stays_fixed_during_training(method: str) -> None:
    model = tiny_cnn(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    s = granet.create_sparsifier(method, model, opt, density=0.1, update_interval=5, total_steps=20)
    assert s.density() == 1.0, "scored methods start dense so the scores see the initial weights"
    init = [p.detach().clone() for p in s.params]
    masks = granet.prune_at_init(s, model, [batch(0), batch(1)], loss_fn=CE)
    fixed = [m.clone() for m in s.masks.values()]
    assert all(torch.equal(masks[n], m) for n, m in zip(s.names, fixed))
    assert sum(s.counts) == round(0.1 * s.total)
    for p, w, m in zip(s.params, init, fixed):  # survivors keep their initial values
        assert torch.equal(p[m], w[m]) and torch.count_nonzero(p[~m]) == 0
    assert s.exploration_rate() == s.density()
    for t in range(1, 21):
        train_step(model, opt, t)
        s.step()
        for p, m, f in zip(s.params, s.masks.values(), fixed):
            assert torch.equal(m, f)
            assert torch.count_nonzero(p[~m]) == 0
            assert torch.count_nonzero(opt.state[p]["momentum_buffer"][~m]) == 0
    assert any(not torch.equal(p[m], w[m]) for p, w, m in zip(s.params, init, fixed)), "training moved nothing"


def test_prune_at_init_bad_input() -> None:
    model = tiny_cnn(0)
    s = granet.create_sparsifier("grasp", model, None, density=0.1)
    with pytest.raises(ValueError, match="pass batches"):
        granet.prune_at_init(s, model)
    with pytest.raises(ValueError, match="batch 0 must be an"):
        granet.prune_at_init(s, model, [torch.zeros(2, 3, 6, 6)])
    s.step()  # without an optimizer every call is a step
    with pytest.raises(ValueError, match="at step 1"):
        granet.prune_at_init(s, model, [batch(0)])
    static = granet.create_sparsifier("static", tiny_cnn(0), None, density=0.1)
    with pytest.raises(ValueError, match="not 'static'"):
        granet.prune_at_init(static, model, [batch(0)])
    with pytest.raises(ValueError, match="density must be"):
        saliency.snip(model, ["0.weight"], batch(0), CE, density=1.5)
    with pytest.raises(ValueError, match="nope.weight"):
        saliency.snip(model, ["nope.weight"], batch(0), CE, density=0.5)
    with pytest.raises(ValueError, match="rounds must be"):
        saliency.synflow(model, ["0.weight"], (3, 6, 6), 0.5, rounds=0)
    with pytest.raises(ValueError, match="requires prune_end=1"):
        granet.create_sparsifier("snip", tiny_cnn(0), None, density=0.1, prune_end=0.5, total_steps=10)


def test_set_masks_installs_exactly_and_checks_its_input() -> None:
    model = tiny_cnn(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    s = granet.create_sparsifier("dense", model, opt)
    train_step(model, opt, 1)
    s.step()
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(p.shape, generator=g) < 0.25 for n, p in zip(s.names, s.params)}
    s.set_masks(masks)
    assert s.counts == [int(m.sum()) for m in masks.values()]
    for n, p, m in zip(s.names, s.params, s.masks.values()):
        assert torch.equal(m, masks[n])
        assert torch.count_nonzero(p[~m]) == 0 and torch.count_nonzero(opt.state[p]["momentum_buffer"][~m]) == 0
    with pytest.raises(ValueError, match="missing"):
        s.set_masks({s.names[0]: masks[s.names[0]]})
    with pytest.raises(ValueError, match="torch.bool"):
        s.set_masks({n: m.float() for n, m in masks.items()})


def test_training_a_scored_method_without_scoring_raises_and_a_resume_does_not() -> None:
    model = tiny_cnn(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    granet.create_sparsifier("snip", model, opt, density=0.1)
    with pytest.raises(RuntimeError, match="call granet.prune_at_init"):
        train_step(model, opt, 1)
    # A resumed run restores the scored mask with load_state_dict instead of scoring again.
    scored_model = tiny_cnn(0)
    scored = granet.create_sparsifier("snip", scored_model, None, density=0.1)
    granet.prune_at_init(scored, scored_model, [batch(0)])
    model = tiny_cnn(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    s = granet.create_sparsifier("snip", model, opt, density=0.1)
    s.load_state_dict(scored.state_dict())
    train_step(model, opt, 1)
    s.step()
    assert all(torch.equal(a, b) for a, b in zip(s.masks.values(), scored.masks.values()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", saliency.SCORING_METHODS)
def test_scoring_on_cuda_keeps_model_and_rngs(method: str) -> None:
    model = tiny_cnn(0).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    s = granet.create_sparsifier(method, model, opt, density=0.1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state()
    x, y = batch(0)
    masks = saliency.snip(model, s, (x.cuda(), y.cuda()), CE, 0.1) if method == "snip" else (
        saliency.grasp(model, s, (x.cuda(), y.cuda()), CE, 0.1) if method == "grasp"
        else saliency.synflow(model, s, (3, 6, 6), 0.1, rounds=10))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), cpu_rng) and torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    assert all(m.device == p.device for m, p in zip(masks.values(), s.params))
    assert sum(int(m.sum()) for m in masks.values()) == round(0.1 * s.total)
    s.set_masks(masks)
    for t in range(1, 6):
        x, y = batch(t)
        opt.zero_grad()
        CE(model(x.cuda()), y.cuda()).backward()
        opt.step()
        s.step()
    assert all(torch.equal(a, masks[n]) for n, a in zip(s.names, s.masks.values()))
    assert all(torch.count_nonzero(p[~m]) == 0 for p, m in zip(s.params, s.masks.values()))


def test_non_finite_scores_are_an_error_not_a_mask() -> None:
    model = hand_mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="SNIP scores are not finite"):
        saliency.snip(model, NAMES, (X, Y), mse, density=0.5)
