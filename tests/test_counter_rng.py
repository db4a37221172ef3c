"""The counter-based random numbers of rng="device": the definition, exact top-k ties, whole runs."""
import copy

import pytest
import torch
from helpers import batch, tiny_mlp

import granet
from granet.kernels.counter_rng import CounterGenerator, permutation, splitmix64_reference, uniform
from granet.sparsity import criteria

KEYS = [0, 1, 7, (1 << 63) - 1, (1 << 64) - 1, 0x0123456789ABCDEF]


@pytest.mark.parametrize("key", KEYS)
def test_the_stream_is_splitmix64_bit_for_bit(key):
    bits = CounterGenerator(key).bits(3000)
    assert bits.dtype == torch.int64
    assert [b % (1 << 64) for b in bits.tolist()] == splitmix64_reference(key, 3000)


def test_floats_are_the_top_24_bits_and_a_permutation_orders_the_stream():
    g = CounterGenerator(12345)
    reference = splitmix64_reference(12345, 1000)
    values = g.rand((10, 100))
    assert values.dtype == torch.float32 and values.shape == (10, 100)
    assert values.flatten().tolist() == [(r >> 40) / (1 << 24) for r in reference]
    assert 0.0 <= float(values.min()) and float(values.max()) < 1.0
    signed = [r - (1 << 64) if r >= 1 << 63 else r for r in reference]
    assert g.randperm(1000).tolist() == sorted(range(1000), key=lambda i: signed[i])
    assert torch.equal(permutation(1000, g), g.randperm(1000))
    assert torch.equal(uniform((10, 100), g), values)
    assert CounterGenerator(12346).rand((10, 100)).ne(values).float().mean() > 0.99  # another key, another stream


def test_the_generator_defaults_are_unchanged():
    cpu = torch.Generator().manual_seed(3)
    assert torch.equal(uniform((5, 7), cpu), torch.rand((5, 7), generator=torch.Generator().manual_seed(3)))
    assert torch.equal(permutation(50, torch.Generator().manual_seed(3)),
                       torch.randperm(50, generator=torch.Generator().manual_seed(3)))
    a, b = criteria.seeded_generator(0, "grow", 5, 1), criteria.seeded_generator(0, "grow", 5, 1, counter=True)
    assert isinstance(a, torch.Generator) and isinstance(b, CounterGenerator)
    assert a.initial_seed() == b.initial_seed()  # one key per (seed, purpose, step, layer), either way


@pytest.mark.parametrize("n, k", [(1000, 300), (200_000, 50_000), (300_000, 1)])
def test_exact_top_k_breaks_ties_by_the_counter_stream_on_every_path(n, k):
    # Mostly tied scores: the fast paths (sampled bracket, band) must pick the ties the definition
    # picks with the same stream, as they do with a CPU generator.
    scores = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(n)).float()
    fast = criteria.select_top(scores, k, CounterGenerator(99))
    plain = criteria.select_top_plain(scores, k, CounterGenerator(99))
    assert int(fast.sum()) == k and torch.equal(fast, plain)
    assert not torch.equal(plain, criteria.select_top_plain(scores, k, torch.Generator().manual_seed(99)))


def _run(rng: str, method: str = "set", steps: int = 40, state=None):
    """``steps`` steps of ``method`` on the tiny MLP; the state after half of them (or, given
    ``state``, continuing from it)."""
    model = tiny_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = granet.create_sparsifier(method, model, optimizer, density=0.2, update_interval=5,
                                          total_steps=steps, rng=rng)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sparsifier.load_state_dict(state["sparsifier"])
    saved = None
    for step in range(sparsifier.step_count, steps):
        if state is None and step == steps // 2:
            saved = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "sparsifier": sparsifier.state_dict()})
        x, y = batch(step)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        sparsifier.step()
    return sparsifier, model, saved


@pytest.mark.parametrize("method", ["set", "rigl", "granet-st"])
def test_a_run_with_device_randomness_keeps_exact_counts_and_differs_from_the_cpu_stream(method):
    device, _, _ = _run("device", method)
    cpu, _, _ = _run("cpu", method)
    assert sum(device.counts) == sum(cpu.counts) == round(device.target_density() * device.total)  # exact budgets
    if method != "granet-st":  # constant-density methods keep every layer's count; global pruning moves them
        assert device.counts == cpu.counts
    assert device.config.rng == "device"
    differing = [n for n in device.names if not torch.equal(device.masks[n], cpu.masks[n])]
    assert differing  # the initial masks, at least, come from another stream


def test_device_randomness_needs_no_state_to_resume_bit_identically():
    whole, whole_model, saved = _run("device", "set", steps=40)
    resumed, resumed_model, _ = _run("device", "set", steps=40, state=copy.deepcopy(saved))
    assert all(torch.equal(whole.masks[n], resumed.masks[n]) for n in whole.names)
    assert all(torch.equal(a, b) for a, b in zip(whole_model.state_dict().values(), resumed_model.state_dict().values()))


def test_a_bad_rng_is_refused_naming_the_value():
    with pytest.raises(ValueError, match=r"^unknown rng 'gpu'; valid: cpu, device$"):
        granet.method_config("set", rng="gpu")
