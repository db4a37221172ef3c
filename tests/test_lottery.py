"""Lottery tickets / IMP with rewinding: exact counts, exact rewinding, FLOPs over all rounds, bit-exact resume."""
from __future__ import annotations

import io

import pytest
import torch
from helpers import batch, tiny_cnn
from torch import nn

import granet
from granet.accounting.flops import TrainingFlopsLedger, inference_flops, layer_flops
from granet.baselines.lottery import LotteryTicket

STEPS = 8  # iterations per round (the schedule length T)


def make(seed: int = 0, rounds: int = 2, rewind_step: int | None = 3, p: float = 0.3, ledger: bool = True):
    model = tiny_cnn(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    led = TrainingFlopsLedger(layer_flops(model, torch.zeros(1, 3, 6, 6))) if ledger else None
    return model, opt, LotteryTicket(model, opt, rounds=rounds, prune_fraction=p, rewind_step=rewind_step,
                                     ledger=led)


def train_to(model: nn.Module, opt: torch.optim.Optimizer, ticket: LotteryTicket, stop: int = STEPS,
             on_step=None) -> None:
    """Train the current round until ``ticket.iteration == stop``; data depends on (round, iteration)."""
    while ticket.iteration < stop:
        x, y = batch(100 * ticket.round + ticket.iteration)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ticket.step()
        if on_step is not None:
            on_step()


def test_rewinding_restores_the_iteration_k_values_of_the_survivors() -> None:
    model, opt, ticket = make(rewind_step=3)
    saved = {}

    def capture() -> None:
        if ticket.round == 0 and ticket.iteration == 3:
            saved.update({k: v.clone() for k, v in model.state_dict().items()})

    train_to(model, opt, ticket, on_step=capture)
    trained = {n: p.detach().clone() for n, p in zip(ticket.sparsifier.names, ticket.sparsifier.params)}
    ticket.next_round()
    assert ticket.round == 1 and ticket.iteration == 3 and len(opt.state) == 0
    s = ticket.sparsifier
    for name, p, m in zip(s.names, s.params, s.masks.values()):
        assert torch.equal(p[m], saved[name][m])
        assert torch.count_nonzero(p[~m]) == 0
    for key, value in model.state_dict().items():  # biases, batch norm and its statistics rewound too
        if key not in s.names:
            assert torch.equal(value, saved[key]), key
    # Pruned by global magnitude of the trained weights: every survivor >= every pruned weight.
    kept = torch.cat([trained[n][m].abs() for n, m in zip(s.names, s.masks.values())])
    gone = torch.cat([trained[n][~m].abs() for n, m in zip(s.names, s.masks.values())])
    assert kept.min() >= gone.max()
    # The ticket's own view of its masks: the sparsifier's, by parameter name.
    assert list(ticket.masks) == list(s.names)
    assert all(ticket.masks[n] is m for n, m in s.masks.items())


def test_rewind_step_zero_is_the_initialisation_and_none_keeps_trained_values() -> None:
    model, opt, ticket = make(rewind_step=0)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    train_to(model, opt, ticket)
    ticket.next_round()
    assert ticket.iteration == 0
    for name, p, m in zip(ticket.sparsifier.names, ticket.sparsifier.params, ticket.sparsifier.masks.values()):
        assert torch.equal(p[m], init[name][m])
    model, opt, ticket = make(rewind_step=None, rounds=1)
    train_to(model, opt, ticket)
    trained = [p.detach().clone() for p in ticket.sparsifier.params]
    ticket.next_round()
    for p, t, m in zip(ticket.sparsifier.params, trained, ticket.sparsifier.masks.values()):
        assert torch.equal(p[m], t[m]) and torch.count_nonzero(p[~m]) == 0


def test_counts_are_exact_every_round_and_masks_only_shrink() -> None:
    rounds, p = 3, 0.2
    model, opt, ticket = make(rounds=rounds, p=p, rewind_step=1)
    n = ticket.sparsifier.total
    previous = [m.clone() for m in ticket.sparsifier.masks.values()]
    while not ticket.done:
        fixed = [m.clone() for m in ticket.sparsifier.masks.values()]
        train_to(model, opt, ticket, on_step=lambda: None)
        assert all(torch.equal(a, b) for a, b in zip(fixed, ticket.sparsifier.masks.values())), "mask moved in a round"
        for q, m in zip(ticket.sparsifier.params, ticket.sparsifier.masks.values()):
            assert torch.count_nonzero(q[~m]) == 0
        summary = ticket.next_round({"accuracy": 0.5})
        r = summary["round"]
        assert summary["active"] == round((1 - p) ** r * n) and summary["accuracy"] == 0.5
        masks = ticket.sparsifier.masks.values()
        assert all(bool((b & ~a).sum() == 0) for a, b in zip(previous, masks))  # nested: nothing regrows
        previous = [m.clone() for m in masks]
    assert [h["round"] for h in ticket.history] == [0, 1, 2, 3]
    assert sum(ticket.sparsifier.counts) == round((1 - p) ** rounds * n)
    assert ticket.density() == ticket.final_density == round(0.8 ** 3 * n) / n
    with pytest.raises(RuntimeError, match="finished"):
        ticket.step()


def test_ledger_adds_up_the_flops_of_all_rounds() -> None:
    model, opt, ticket = make(rounds=2, rewind_step=2)
    flops = ticket.ledger.flops
    expected = 0.0
    while not ticket.done:
        density = ticket.sparsifier.layer_density()
        start = ticket.iteration
        train_to(model, opt, ticket)
        expected += (STEPS - start) * 3 * inference_flops(flops, density)
        ticket.next_round()
    # Round 0 runs 8 steps dense, rounds 1 and 2 run from the rewind iteration 2 to 8.
    assert ticket.ledger.steps == STEPS + 2 * (STEPS - 2)
    assert [h["steps"] for h in ticket.history] == [8, 6, 6]
    assert ticket.ledger.total == pytest.approx(expected, rel=1e-12)
    assert sum(h["round_flops"] for h in ticket.history) == pytest.approx(ticket.ledger.total, rel=1e-12)
    assert ticket.history[-1]["training_flops"] == ticket.ledger.total
    dense_round = 3 * flops.dense * STEPS
    assert ticket.history[0]["round_flops"] == pytest.approx(dense_round, rel=1e-12)
    assert ticket.history[1]["round_flops"] < ticket.history[0]["round_flops"]


def roundtrip(obj: object) -> object:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def run_all(model, opt, ticket) -> None:
    while not ticket.done:
        train_to(model, opt, ticket)
        ticket.next_round({"accuracy": float(ticket.round)})


@pytest.mark.parametrize("stop_round, stop_iteration", [(0, 2), (0, 5), (1, 6)])
def test_resume_mid_round_is_bit_exact(stop_round: int, stop_iteration: int) -> None:
    ref_model, ref_opt, ref = make(rounds=2, rewind_step=4)
    run_all(ref_model, ref_opt, ref)
    # Interrupted run: stop mid-round, save, rebuild everything from another seed, load, continue.
    model, opt, ticket = make(rounds=2, rewind_step=4)
    while ticket.round < stop_round:
        train_to(model, opt, ticket)
        ticket.next_round({"accuracy": float(ticket.round)})
    train_to(model, opt, ticket, stop=stop_iteration)
    state = roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "ticket": ticket.state_dict()})
    model2, opt2, ticket2 = make(seed=9, rounds=2, rewind_step=4)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    ticket2.load_state_dict(state["ticket"])
    run_all(model2, opt2, ticket2)
    for (k, a), b in zip(ref_model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(torch.equal(a, b) for a, b in zip(ref.sparsifier.masks.values(), ticket2.sparsifier.masks.values()))
    assert ticket2.history == ref.history and len(ref.history) == 3
    assert ticket2.ledger.total == ref.ledger.total and ticket2.ledger.steps == ref.ledger.steps
    assert ticket2.density() == ref.final_density


def test_bad_input_is_named() -> None:
    model = tiny_cnn(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="rounds must be"):
        LotteryTicket(model, opt, rounds=0)
    with pytest.raises(ValueError, match="prune_fraction must be"):
        LotteryTicket(model, opt, rounds=1, prune_fraction=1.0)
    with pytest.raises(ValueError, match="rewind_step must be"):
        LotteryTicket(model, opt, rounds=1, rewind_step=-1)
    with pytest.raises(ValueError, match="leave no weight"):
        LotteryTicket(model, opt, rounds=60, prune_fraction=0.9)
    with pytest.raises(TypeError, match="ledger must be"):
        LotteryTicket(model, opt, rounds=1, ledger={})
    model, opt, ticket = make(rewind_step=50)
    train_to(model, opt, ticket, stop=3)
    with pytest.raises(RuntimeError, match="before rewind_step=50"):
        ticket.next_round()
    other = make(rounds=3)[2]
    with pytest.raises(ValueError, match="rounds"):
        other.load_state_dict(ticket.state_dict())
    with pytest.raises(ValueError, match="not a granet LotteryTicket state"):
        other.load_state_dict({"masks": {}})
    assert isinstance(granet.LotteryTicket, type)


def test_final_density_derives_the_fraction_and_is_exact() -> None:
    model = tiny_cnn(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ticket = LotteryTicket(model, opt, rounds=3, density=0.1, rewind_step=0)
    n = ticket.sparsifier.total
    assert ticket.prune_fraction == 1 - 0.1 ** (1 / 3)
    assert [ticket.target_count(r) for r in range(3)] == [round((1 - ticket.prune_fraction) ** r * n) for r in range(3)]
    assert ticket.target_count(3) == round(0.1 * n) and ticket.final_density == round(0.1 * n) / n
    run_all(model, opt, ticket)
    assert sum(ticket.sparsifier.counts) == round(0.1 * n)
    # Both given: they must end at the same count (0.5^2 = 0.25 does).
    both = LotteryTicket(tiny_cnn(0), None, rounds=2, prune_fraction=0.5, density=0.25)
    assert both.target_count(2) == round(0.25 * n)
    with pytest.raises(ValueError, match=rf"prune_fraction=0.2 over 2 rounds keeps {round(0.64 * n)} of {n} weights"):
        LotteryTicket(tiny_cnn(0), None, rounds=2, prune_fraction=0.2, density=0.25)
    with pytest.raises(ValueError, match="density must be a number in \\(0, 1\\), got 1.0"):
        LotteryTicket(tiny_cnn(0), None, rounds=2, density=1.0)
    other = LotteryTicket(tiny_cnn(0), None, rounds=3, prune_fraction=ticket.prune_fraction, rewind_step=0)
    with pytest.raises(ValueError, match="density \\(state 0.1, here None\\)"):
        other.load_state_dict(ticket.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lottery_round_on_cuda() -> None:
    model = tiny_cnn(0).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ticket = LotteryTicket(model, opt, rounds=1, prune_fraction=0.5, rewind_step=0)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    while ticket.iteration < 4:
        x, y = batch(ticket.iteration)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.cuda()), y.cuda()).backward()
        opt.step()
        ticket.step()
    ticket.next_round()
    s = ticket.sparsifier
    assert sum(s.counts) == round(0.5 * s.total)
    for name, p, m in zip(s.names, s.params, s.masks.values()):
        assert m.device == p.device and torch.equal(p[m], init[name][m]) and torch.count_nonzero(p[~m]) == 0
    restored = LotteryTicket(model, opt, rounds=1, prune_fraction=0.5, rewind_step=0)
    restored.load_state_dict(roundtrip(ticket.state_dict()))
    assert all(torch.equal(a, b) for a, b in zip(restored.sparsifier.masks, s.masks.values()))
