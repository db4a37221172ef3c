"""The optimised selection and topology functions give exactly the masks of the plain definition.

The oracle is ``tests/frozen_topology.py``: full ``kthvalue`` threshold, ``randperm`` tie-breaking
over tied positions in index order, float score copies. Inputs are random, with heavy ties (zeros,
few distinct values, -1 "inactive" scores), on both sides of the sampled-bracket size threshold.
The last test runs the real sparsifier for every dynamic method and checks each update against the
frozen copy of the update algorithm, state injected at every update. Every test runs twice: with the
native kernels of ``granet.kernels.native`` (where they build) and with torch operations only.
"""
from __future__ import annotations

import frozen_topology as ref
import pytest
import torch
from torch import nn

import granet
from granet.kernels import native
from granet.kernels.topk import select_top_segments
from granet.sparsity import criteria, topology
from granet.sparsity.criteria import seeded_generator
from granet.sparsity.masking import pack_bits, set_bits, zero_outside
from granet.sparsity.topology import LOCAL, Problem, Segment

BELOW, ABOVE = 5_000, (1 << 16) + 37  # either side of the bracketed path's size threshold


@pytest.fixture(autouse=True, params=["native", "torch"])
def kernels(request):
    """Run the test with the native selection kernels and with torch operations only."""
    before = native.set_enabled(request.param == "native")
    yield request.param
    native.set_enabled(before)


def _scores(kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "continuous":
        return torch.rand(n, generator=g)
    if kind == "few_values":  # every value tied with thousands of others
        return torch.randint(0, 7, (n,), generator=g).float()
    if kind == "zeros":  # a mass of zeros (just-regrown weights, dead units' gradients)
        return torch.where(torch.rand(n, generator=g) < 0.8, 0.0, torch.rand(n, generator=g))
    if kind == "inactive":  # -1 marks inactive entries, as in the prune and grow scores
        return torch.where(torch.rand(n, generator=g) < 0.6, -1.0, torch.rand(n, generator=g).round(decimals=2))
    if kind == "duplicates":  # each value exactly twice, in random order
        half = torch.rand(n // 2 + 1, generator=g)
        return torch.cat([half, half])[torch.randperm(2 * (n // 2 + 1), generator=g)][:n]
    raise AssertionError(kind)


@pytest.mark.parametrize("n", [BELOW, ABOVE])
@pytest.mark.parametrize("kind", ["continuous", "few_values", "zeros", "inactive", "duplicates"])
def test_select_top_equals_definition(kind, n):
    scores = _scores(kind, n, seed=n)
    for k in (0, 1, 3, n // 100, n // 3, n // 2, (4 * n) // 5, n - n // 20, n - 1, n, n + 5):
        for tag in (None, "t"):
            got = criteria.select_top(scores, k, None if tag is None else seeded_generator(k, tag))
            want = ref.select_top(scores, k, None if tag is None else seeded_generator(k, tag))
            assert got.dtype == torch.bool and got.shape == scores.shape
            assert torch.equal(got, want), (kind, n, k, tag)
            assert int(got.sum()) == min(max(k, 0), n)


def test_select_top_keeps_shape_and_reads_strided_input():
    scores = _scores("few_values", 2 * ABOVE, seed=1).view(2, -1).t()  # non-contiguous
    for k in (10, scores.numel() // 2):
        got = criteria.select_top(scores, k, seeded_generator(0, "s"))
        assert got.shape == scores.shape
        assert torch.equal(got, ref.select_top(scores, k, seeded_generator(0, "s")))


def _layer(n_out: int, n_in: int, density: float, zero_frac: float, seed: int):
    """A weight with some exact zeros among its active entries, and a random mask."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g)
    w[torch.rand(n_out, n_in, generator=g) < zero_frac] = 0.0
    w = w.round(decimals=2)  # magnitude ties
    mask = torch.rand(n_out, n_in, generator=g) < density
    return w * mask, mask


@pytest.mark.parametrize("shape", [(40, 50), (300, 260)])
@pytest.mark.parametrize("density", [0.05, 0.5, 1.0])
def test_keep_largest_and_grow_layer_equal_definition(shape, density):
    w, mask = _layer(*shape, density, zero_frac=0.3, seed=shape[0])
    active = int(mask.sum())
    for keep in (0, 1, active // 3, active // 2, active - 1, active, active + 7):
        got = topology.keep_largest(w, mask, keep, seeded_generator(0, "drop", keep))
        want = ref.keep_largest(w, mask, keep, seeded_generator(0, "drop", keep))
        assert torch.equal(got, want), (shape, density, keep)
        known = topology.keep_largest(w, mask, keep, seeded_generator(0, "drop", keep), active=active)
        assert torch.equal(known, want), (shape, density, keep)
    kept = ref.keep_largest(w, mask, active // 2, seeded_generator(0, "kept"))
    g = torch.Generator().manual_seed(5)
    grads = torch.randn(shape, generator=g).round(decimals=1).abs()  # many ties, many zeros
    signed = torch.randn(shape, generator=g) * 3  # a custom criterion's scores may go below -1
    free = kept.numel() - int(kept.sum())
    for scores in (grads, signed):
        for n_grow in (0, 1, free // 10, free // 2, free - 1, free, free + 3):
            got = topology.grow_layer(scores, kept, n_grow, seeded_generator(1, "grow", n_grow))
            want = ref.grow_layer(scores, kept, n_grow, seeded_generator(1, "grow", n_grow))
            assert torch.equal(got, want), (shape, density, n_grow)
            # Positions straight from the signed source (|.| read in place), with the candidate count known.
            source = scores if scores is grads else -scores
            magnitude = ref.grow_layer(source.abs(), kept, n_grow, seeded_generator(1, "grow", n_grow))
            positions = topology.grow_positions(source, kept, n_grow, seeded_generator(1, "grow", n_grow),
                                                free=free, magnitude=True)
            assert positions.dtype == torch.int64 and positions.unique().numel() == positions.numel()
            assert positions.sort().values.tolist() == magnitude.reshape(-1).nonzero().squeeze(1).tolist()


def test_sparse_layer_selections_equal_definition():
    """A layer at density 0.1 above the bracket threshold: the drop gathers the active weights, the
    regrowth brackets the many candidates; every drop and grow size, with and without known counts."""
    w, mask = _layer(400, 300, 0.1, zero_frac=0.2, seed=9)
    active = int(mask.sum())
    for fraction in (0.01, 0.05, 0.3, 0.5, 0.9):
        n_drop = int(fraction * active)
        kept = topology.keep_largest(w, mask, active - n_drop, seeded_generator(3, "d", n_drop), active=active)
        assert torch.equal(kept, ref.keep_largest(w, mask, active - n_drop, seeded_generator(3, "d", n_drop)))
        grads = torch.randn(w.shape, generator=torch.Generator().manual_seed(n_drop)).round(decimals=1)
        want = ref.grow_layer(grads.abs(), kept, n_drop, seeded_generator(3, "g", n_drop))
        got = topology.grow_positions(grads, kept, n_drop, seeded_generator(3, "g", n_drop),
                                      free=w.numel() - active + n_drop, magnitude=True)
        assert got.sort().values.tolist() == want.reshape(-1).nonzero().squeeze(1).tolist(), fraction


@pytest.mark.parametrize("kind", ["continuous", "few_values", "zeros"])
def test_segment_positions_equal_segment_masks(kind):
    sizes = [ABOVE, 1000, 3 * ABOVE]
    values = [_scores(kind, n, seed=n).abs() for n in sizes]
    g = torch.Generator().manual_seed(4)
    valids = [torch.rand(n, generator=g) < d for n, d in zip(sizes, (0.9, 0.5, 0.95))]
    m = sum(int(v.sum()) for v in valids)
    for k in (1, m // 50, m // 12, m // 5, m // 2, m - 3):
        args = ([(lambda v=v: v) for v in values], [(lambda i, v=v: v[i]) for v in values], valids, sizes, k)
        masks = select_top_segments(*args, seeded_generator(k, "s"))
        want = ref.select_top(torch.cat([torch.where(v, x, -1.0) for v, x in zip(valids, values)]), k,
                              seeded_generator(k, "s"))
        assert torch.equal(torch.cat(masks), want), (kind, k)
        positions = select_top_segments(*args, seeded_generator(k, "s"), as_index=True,
                                        competitors=[int(v.sum()) for v in valids])
        for mask, pos in zip(masks, positions):
            assert pos.sort().values.tolist() == mask.nonzero().squeeze(1).tolist(), (kind, k)


def _definition(values: torch.Tensor, absolute: bool, among, outside: bool) -> torch.Tensor:
    """A segment's scores as the definition ranks them, written out here (not Segment.definition)."""
    v = values.abs() if absolute else values
    if among is None:
        return v.clone()
    return torch.where(among, -1.0, v) if outside else torch.where(among, v, -1.0)


@pytest.mark.parametrize("n", [BELOW, ABOVE])
def test_local_select_solves_every_problem_kind_as_the_definition(n):
    """Every kind of problem the update policy states (keep among active / grow outside the kept
    mask, magnitudes or a criterion's scores, one layer or one threshold over several, counts known
    or not, masks or positions) gives the definition's selection."""
    g = torch.Generator().manual_seed(n)
    signed = (torch.randn(n, generator=g) * 4).round()  # magnitudes with heavy ties, some zeros
    scores = torch.randint(0, 9, (n,), generator=g).float()  # a criterion's non-negative scores, ties
    among = torch.rand(n, generator=g) < 0.4
    cases = [(signed, True), (scores, False)]
    for (values, absolute), outside in [(c, o) for c in cases for o in (False, True)]:
        competing = n - int(among.sum()) if outside else int(among.sum())
        for k in (0, 1, competing // 7, competing // 2, competing - 1, competing):
            want = ref.select_top(_definition(values, absolute, among, outside), k, seeded_generator(k, "p"))
            for count, positions in ((None, False), (competing, False), (competing, True)):
                segment = Segment(values, absolute=absolute, among=among, outside=outside, count=count)
                problem = Problem(k, seeded_generator(k, "p"), [segment], n, positions=positions)
                (got,) = LOCAL([problem])[0]
                if got.dtype != torch.bool:
                    assert positions and outside  # positions only where regrowth asked for them
                    got = torch.zeros(n, dtype=torch.bool).index_fill_(0, got, True)
                assert torch.equal(got, want), (absolute, outside, k, count, positions)
    # One threshold over several segments (a global prune, a global random initial mask).
    parts = [(signed[: n // 3].view(-1, 1), True), (scores[n // 3:], False)]
    masks = [among[: n // 3].view(-1, 1), among[n // 3:]]
    for k in (1, n // 10, int(among.sum()) - 2):
        want = ref.select_top(torch.cat([_definition(v, a, m, False).reshape(-1) for (v, a), m in zip(parts, masks)]),
                              k, seeded_generator(k, "q"))
        problem = Problem(k, seeded_generator(k, "q"), [Segment(v, absolute=a, among=m) for (v, a), m in zip(parts, masks)], n)
        got = LOCAL([problem])[0]
        assert [m.shape for m in got] == [v.shape for v, _ in parts]
        assert torch.equal(torch.cat([m.reshape(-1) for m in got]), want), k
        everything = Problem(k, None, [Segment(v) for v, _ in parts], n)  # no competitors marked: all compete
        want = ref.select_top(torch.cat([v.reshape(-1) for v, _ in parts]), k)
        assert torch.equal(torch.cat([m.reshape(-1) for m in LOCAL([everything])[0]]), want), k


@pytest.mark.parametrize("density", [1.0, 0.5, 0.1])
def test_prune_global_equals_definition(density):
    layers = [_layer(300, 250, density, 0.2, 1), _layer(8, 27, density, 0.5, 2), _layer(120, 90, density, 0.0, 3)]
    params = [w for w, _ in layers]
    masks = [m for _, m in layers]
    active = sum(int(m.sum()) for m in masks)
    for target in (0, 5, active // 10, active // 2, active - 1, active, active + 11):
        got = topology.prune_global(params, masks, target, seeded_generator(2, "prune", target))
        want = ref.prune_global(params, masks, target, seeded_generator(2, "prune", target))
        assert all(torch.equal(a, b) for a, b in zip(got, want)), (density, target)


def test_momentum_shares_and_random_masks_equal_definition():
    model = nn.Sequential(nn.Linear(30, 40, bias=False), nn.Linear(40, 20, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 30)).sum().backward()
    opt.step()
    params = [model[0].weight, model[1].weight]
    kept = [torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) < 0.3 for i, p in enumerate(params)]
    assert topology.momentum_shares(params, opt, kept, [50, 30]) == ref.momentum_shares(params, opt, kept, [50, 30])
    assert topology.momentum_shares(params, opt, [None, kept[1]], [0, 30]) == ref.momentum_shares(
        params, opt, [None, kept[1]], [0, 30])
    # Known counts (the native gather of |m|): the same shares; drops sized so that rounding decides.
    counts = [int(k.sum()) for k in kept]
    for drops in ([50, 30], [7, 93], [1, 0]):
        assert topology.momentum_shares(params, opt, kept, drops, counts) == ref.momentum_shares(params, opt, kept, drops)
    big = [torch.empty(300, 260), torch.empty(16, 3, 3, 3), torch.empty(10, 300)]
    for distribution in ("erk", "uniform", "global"):
        got = topology.random_masks(big, distribution, 0.2, seed=4)
        want = ref.random_masks(big, distribution, 0.2, seed=4)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), distribution


def _model() -> nn.Module:
    """Two layers above the bracket threshold (70,400 weights each), a conv and a small head."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(64, 1100), nn.ReLU(), nn.Linear(1100, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 3, 4, 4, generator=g)
    x[:, :, :2] = 0.0  # zero inputs: exact zero gradients (ties) for the weights that read them
    return x, torch.randint(0, 10, (16,), generator=g)


@pytest.mark.parametrize("method", ["granet", "granet-st", "rigl", "set", "snfs", "gmp", "gmp-layerwise"])
def test_sparsifier_updates_equal_frozen_algorithm(method):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    options = dict(density=0.2, total_steps=24, update_interval=3)
    if method.startswith("gmp"):
        options["prune_end"] = 18
    s = granet.create_sparsifier(method, model, opt, track_exploration=True, **options)
    cfg = s.config
    seen = [m.clone() for m in s.masks.values()]  # every position ever active
    initial = ref.random_masks(list(s.params), cfg.distribution, cfg.effective_init_density, cfg.seed,
                               cfg.erk_power_scale)
    assert all(torch.equal(a, b) for a, b in zip(s.masks.values(), initial))
    grow_score = criteria.get_grow_criterion(cfg.grow).score
    changed = 0
    for step in range(1, 24):
        x, y = _batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if not s.is_update_step(step):
            s.step()
            continue
        before = [m.clone() for m in s.masks.values()]
        weights = [p.detach().clone() for p in s.params]
        bufs = [opt.state[p]["momentum_buffer"].clone() for p in s.params]
        want, reset = ref.reference_update(s, step, before, s.counts, grow_score)
        report = s.step()
        assert report is not None and not report.skipped
        for i, (name, p) in enumerate(zip(s.names, s.params)):
            assert torch.equal(s.masks[name], want[i]), (method, step, name)
            assert s.counts[i] == int(want[i].sum())
            keep = want[i] if reset[i] is None else want[i] & ~reset[i]
            assert torch.equal(p.detach(), weights[i] * keep)
            if cfg.mask_optimizer_state:
                assert torch.equal(opt.state[p]["momentum_buffer"], bufs[i] * keep)
            elif reset[i] is not None:
                assert torch.equal(opt.state[p]["momentum_buffer"], bufs[i].masked_fill(reset[i], 0.0))
        changed += sum(not torch.equal(a, b) for a, b in zip(before, s.masks.values()))
        for i, m in enumerate(s.masks.values()):
            seen[i] |= m
            assert torch.equal(s.ever_active[i], pack_bits(seen[i])), (method, step, i)
    assert changed >= 3  # the updates did change the topology


def _pack_bits_plain(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (flat.view(-1, 8).to(torch.uint8) * weights).sum(dim=1, dtype=torch.uint8)


def test_pack_bits_equals_plain_packing():
    assert pack_bits(torch.tensor([True, False, True, True, False, False, False, True])).tolist() == [0b10001101]
    g = torch.Generator().manual_seed(0)
    for shape in [(8,), (64, 9), (3, 5, 7), (1000, 24)]:
        for density in (0.0, 0.5, 1.0):
            mask = torch.rand(shape, generator=g) < density
            assert torch.equal(pack_bits(mask), _pack_bits_plain(mask)), (shape, density)
    base = torch.rand(4000, generator=g) < 0.5
    for view in (base[3:3 + 800], base.view(50, 80)[:, :40]):  # offset and strided views
        assert torch.equal(pack_bits(view), _pack_bits_plain(view))


def test_zero_outside_is_bitwise_a_bool_multiply():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 260, generator=g)
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    mask = torch.rand(300, 260, generator=g) < 0.3
    mask[0, :4] = False
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        a, b = x.to(dtype), x.to(dtype).clone()
        c = a.clone()
        zero_outside([a, c], mask)
        b.mul_(mask)
        for got in (a, c):  # same bits: signs of zeros, NaN where x was inf or NaN
            assert torch.equal(got.isnan(), b.isnan())
            assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(b))
            assert torch.equal(torch.signbit(got), torch.signbit(b))
    positions = torch.tensor([5, 77, 300 * 260 - 1, 1000])  # active there: zeroed as if masked out
    mask.view(-1)[positions] = True
    a, b = x.clone(), x.clone()
    zero_outside([a], mask, also=positions)
    keep = mask.clone()
    keep.view(-1)[positions] = False
    b.mul_(keep)
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(torch.signbit(a), torch.signbit(b))
    assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


def test_set_bits_equals_packing_the_union():
    g = torch.Generator().manual_seed(3)
    for n in (8, 64 * 9, 1000 * 24, 13):
        before = torch.rand(n, generator=g) < 0.3
        packed = pack_bits(before)
        positions = torch.randperm(n, generator=g)[: max(1, n // 7)]  # some already set, several per byte
        grown = torch.zeros(n, dtype=torch.bool)
        grown[positions] = True
        set_bits(packed, positions)
        assert torch.equal(packed, pack_bits(before | grown)), n
        set_bits(packed, positions[:0])  # nothing to set
        assert torch.equal(packed, pack_bits(before | grown))
