"""Property and integration tests of the sparsifier over models x densities x methods."""
import io
import math

import pytest
import torch
from helpers import batch, tiny_cnn, tiny_mlp, train_step
from torch import nn

import granet
from granet.baselines.saliency import needs_init_scoring

METHODS = granet.list_methods()
STEPS = 60


def make(method, model_fn=tiny_cnn, density=0.2, optimizer="sgd", seed=0, **options):
    model = model_fn(seed)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    else:
        opt = optimizer(model.parameters())
    defaults = dict(total_steps=STEPS, update_interval=5)
    if method != "dense":
        defaults["density"] = density
    defaults.update(options)
    sparsifier = granet.create_sparsifier(method, model, opt, **defaults)
    if needs_init_scoring(method):
        granet.prune_at_init(sparsifier, model, [batch(0)])
    return model, opt, sparsifier


def state_tensors(opt, p):
    return [v for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.shape == p.shape]


@pytest.mark.parametrize("model_fn", [tiny_cnn, tiny_mlp])
@pytest.mark.parametrize("density", [0.05, 0.3])
@pytest.mark.parametrize("method", METHODS)
def test_invariants_over_training(method, density, model_fn):
    model, opt, s = make(method, model_fn, density)
    target = 1.0 if method == "dense" else density
    final_count = round(target * s.total)
    tf = s.pruning.end if s.pruning else 0
    constant = s.pruning is None
    updates = 0
    for t in range(1, STEPS + 1):
        old = [m.clone() for m in s.masks.values()]
        train_step(model, opt, t)
        report = s.step()
        assert s.step_count == t
        for i, (p, m) in enumerate(zip(s.params, s.masks.values())):
            assert m.dtype == torch.bool
            assert int(m.sum()) == s.counts[i]
            assert torch.count_nonzero(p[~m]) == 0, "inactive weights must be exactly zero"
            if s.config.mask_optimizer_state:
                for buf in state_tensors(opt, p):
                    assert torch.count_nonzero(buf[~m]) == 0
        if constant:
            assert sum(s.counts) == final_count
        if report is None:
            assert all(torch.equal(a, b) for a, b in zip(old, s.masks.values()))
            continue
        updates += 1
        assert not report.skipped
        delta = sum(s.counts) - sum(int(m.sum()) for m in old)
        assert delta == report.regrown - report.pruned - report.dropped
        if s.config.redistribute == "none":
            for name, layer in report.layers.items():
                assert layer["regrown"] == layer["dropped"], name
        assert report.regrown == report.dropped  # zero-cost: density unchanged by regrowth
        for p, m, o in zip(s.params, s.masks.values(), old):
            grown = m & ~o
            assert torch.count_nonzero(p[grown]) == 0, "regrown weights start at zero"
            for buf in state_tensors(opt, p):
                assert torch.count_nonzero(buf[grown]) == 0, "regrown weights start with zero optimizer state"
        if s.pruning is not None and t == tf:
            assert sum(s.counts) == final_count, "final density must be hit exactly at tf"
    assert updates == sum(s.is_update_step(t) for t in range(1, STEPS + 1))
    if s.pruning is not None or s.regrowth is not None:
        assert updates > 0
    assert sum(s.counts) == final_count
    assert s.density() == final_count / s.total
    rate = s.exploration_rate()
    assert s.density() <= rate <= 1.0


@pytest.mark.parametrize("method", ["static", "rigl", "set", "snfs"])
@pytest.mark.parametrize("distribution", ["uniform", "er", "erk", "global"])
def test_initial_masks_exact(method, distribution):
    _, _, s = make(method, tiny_cnn, 0.1, distribution=distribution)
    assert sum(s.counts) == round(0.1 * s.total)
    assert all(0 <= c <= n for c, n in zip(s.counts, s.sizes))
    if distribution != "global":
        assert s.counts == granet.layer_counts(distribution, [tuple(p.shape) for p in s.params], 0.1)


def test_granet_st_starts_at_half_erk_and_gmp_starts_dense():
    _, _, s = make("granet-st", density=0.1)
    assert sum(s.counts) == round(0.5 * s.total)
    assert s.counts == granet.layer_counts("erk", [tuple(p.shape) for p in s.params], 0.5)
    _, _, g = make("gmp", density=0.1)
    assert g.density() == 1.0


def test_layerwise_gmp_hits_per_layer_targets():
    model, opt, s = make("gmp-layerwise", density=0.1, prune_end=30)
    for t in range(1, 31):
        train_step(model, opt, t)
        s.step()
    assert s.counts == granet.layer_counts("uniform", [tuple(p.shape) for p in s.params], 0.1)


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-2),
    lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-1),
    lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, weight_decay=1e-2),
    lambda p: torch.optim.Adagrad(p, lr=1e-2, weight_decay=1e-2),
], ids=["sgd-nesterov-wd", "sgd-wd", "adam", "adamw", "rmsprop", "adagrad"])
def test_pruned_weights_stay_zero_for_every_optimizer(make_opt):
    model, opt, s = make("rigl", optimizer=make_opt, update_interval=7)
    for t in range(1, 30):
        train_step(model, opt, t)
        s.step()
        for p, m in zip(s.params, s.masks.values()):
            assert torch.count_nonzero(p[~m]) == 0
            for buf in state_tensors(opt, p):
                assert torch.count_nonzero(buf[~m]) == 0
    assert sum(s.counts) == round(0.2 * s.total)


def _checkpoint(model, opt, s):
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sparsifier": s.state_dict()}, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("method", ["granet", "granet-st", "rigl", "set", "snfs", "gmp"])
def test_resume_is_bit_exact(method):
    model, opt, s = make(method)
    for t in range(1, STEPS + 1):
        train_step(model, opt, t)
        s.step()
    ref_weights = [p.detach().clone() for p in model.parameters()]
    ref_masks = [m.clone() for m in s.masks.values()]

    model, opt, s = make(method)
    for t in range(1, 23):
        train_step(model, opt, t)
        s.step()
    ckpt = torch.load(_checkpoint(model, opt, s), weights_only=True)
    model2, opt2, s2 = make(method, seed=123)  # fresh objects, different init: all replaced by the load
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    s2.load_state_dict(ckpt["sparsifier"])
    assert s2.step_count == 22
    for t in range(23, STEPS + 1):
        train_step(model2, opt2, t)
        s2.step()
    assert all(torch.equal(a, b) for a, b in zip(ref_masks, s2.masks.values()))
    assert all(torch.equal(a, b.detach()) for a, b in zip(ref_weights, model2.parameters()))
    model3, opt3, s3 = make(method)
    for t in range(1, STEPS + 1):
        train_step(model3, opt3, t)
        s3.step()
    assert s2.exploration_rate() == s3.exploration_rate()


def test_state_dict_round_trip_and_mismatch_errors():
    _, _, s = make("rigl")
    state = s.state_dict()
    assert all(m.dtype == torch.bool for m in state["masks"].values())
    _, _, other = make("rigl", seed=5)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(s.masks.values(), other.masks.values()))

    wider = nn.Sequential(nn.Flatten(), nn.Linear(108, 41), nn.ReLU(), nn.Linear(41, 24), nn.ReLU(), nn.Linear(24, 5))
    _, _, mlp = make("rigl", tiny_mlp)
    target = granet.create_sparsifier("rigl", wider, None, density=0.2, total_steps=10)
    with pytest.raises(ValueError, match=r"shape mismatch: 1\.weight .*3\.weight"):
        target.load_state_dict(mlp.state_dict())
    with pytest.raises(ValueError, match=r"missing in the state: 1\.weight.*not sparsified in this model: 0\.weight"):
        target.load_state_dict(s.state_dict())


def test_grad_scaler_skipped_step_does_not_count():
    model, opt, s = make("rigl", update_interval=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = batch(0)
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    s.params[0].grad[0].fill_(float("inf"))
    before = [m.clone() for m in s.masks.values()]
    scaler.step(opt)  # inf found: optimizer.step() is skipped
    scaler.update()
    assert s.step() is None and s.step_count == 0
    assert all(torch.equal(a, b) for a, b in zip(before, s.masks.values()))
    for t in (1, 2):
        x, y = batch(t)
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        report = s.step()
    assert s.step_count == 2 and report is not None
    # Zero-cost regrowth at step 2 drops floor(r_2 * active) in every sparse layer, and regrows as many.
    expected = sum(int(report.drop_fraction * c) for c, n in zip(s.counts, s.sizes) if c < n)
    assert report.drop_fraction == s.regrowth.fraction(2) and report.dropped == report.regrown == expected > 0


def test_non_finite_gradients_skip_the_update():
    model, _, _ = make("rigl")
    s = granet.create_sparsifier("rigl", model, None, density=0.2, update_interval=1, total_steps=10)
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    s.params[1].grad[0, 0, 0, 0] = float("nan")
    before = [m.clone() for m in s.masks.values()]
    report = s.step()
    assert report.skipped and s.skipped_updates == 1 and s.step_count == 1
    assert all(torch.equal(a, b) for a, b in zip(before, s.masks.values()))
    assert s.stats()["last_update"]["skipped"] is True


def test_gradient_accumulation_micro_steps_do_not_count():
    model, opt, s = make("rigl", update_interval=2)
    accumulation = 4
    for micro in range(1, 13):
        x, y = batch(micro)
        (nn.functional.cross_entropy(model(x), y) / accumulation).backward()
        if micro % accumulation == 0:
            opt.step()
        report = s.step()  # called every micro-step on purpose
        if micro % accumulation == 0:
            opt.zero_grad()
        assert s.step_count == micro // accumulation
        if micro == 8:
            assert report is not None and report.step == 2
        elif micro % accumulation != 0:
            assert report is None


def test_keep_dense_and_wrapped_names():
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, x):
            return self.module(x)

    model = Wrapper(tiny_cnn())
    s = granet.create_sparsifier("static", model, density=0.3, keep_dense=["0", "*9.weight"])
    assert s.names == ["3.weight", "7.weight"]
    with pytest.raises(ValueError, match="'nope' match no name of any weight of the selected layer types \\(Linear, Conv\\*"):
        granet.create_sparsifier("static", model, density=0.3, keep_dense=["nope"])


def test_stats_and_reports():
    model, opt, s = make("granet", density=0.1, prune_end=30, update_interval=10)
    reports, counts_after = [], []
    for t in range(1, STEPS + 1):
        train_step(model, opt, t)
        r = s.step()
        if r is not None:
            reports.append(r)
            counts_after.append(s.counts)
    # Pruning at 10, 20, 30 (tf); regrowth at multiples of ΔT in [0, T): none at the last step.
    assert [r.step for r in reports] == [10, 20, 30, 40, 50]
    assert reports[0].target_density == 0.1 + (1.0 - 0.1) * (1.0 - 10 / 30) ** 3  # cubic from dense at t0 = 0
    active = s.total
    for r in reports:  # regrowth is zero-cost, so only pruning moves the count
        assert r.pruned == active - round(r.target_density * s.total)
        active -= r.pruned
    assert [r.pruned for r in reports][3:] == [0, 0] and active == round(0.1 * s.total)
    for r, counts in zip(reports, counts_after):
        assert r.drop_fraction == 0.005 + 0.5 * 0.495 * (1.0 + math.cos(math.pi * (r.step / STEPS)))
        for name, c, n in zip(s.names, counts, s.sizes):
            # floor(r_t * active) per sparse layer; dense layers are left alone.
            assert r.layers[name]["dropped"] == r.layers[name]["regrown"] == (int(r.drop_fraction * c) if c < n else 0)
        assert r.dropped == sum(v["dropped"] for v in r.layers.values()) > 0
    stats = s.stats()
    assert stats["step"] == STEPS and stats["active_weights"] == round(0.1 * s.total)
    assert stats["density"] + stats["sparsity"] == 1.0
    assert set(stats["layer_density"]) == set(s.names)
    total = sum(d * n for d, n in zip(stats["layer_density"].values(), s.sizes))
    assert round(total) == stats["active_weights"]
    assert stats["exploration_rate"] == 1.0  # dense start: every weight was active once
    assert stats["last_update"]["step"] == reports[-1].step


@pytest.mark.parametrize("options, message", [
    (dict(method="bogus"), "unknown method 'bogus'; valid: dense, gmp"),
    (dict(density=0.0), r"density must be a number in \(0, 1\]"),
    (dict(density=1.2), r"density must be a number in \(0, 1\]"),
    (dict(method="granet-st", density=0.8), "above the initial density"),
    (dict(method="granet", prune_start=40, prune_end=20), r"prune_start \(t0=40\) must be before prune_end"),
    (dict(method="granet", total_steps=None), "needs total_steps"),
    (dict(method="rigl", init_density=0.5), "must equal density"),
    (dict(method="rigl", grow="bogus"), "unknown grow 'bogus'"),
    (dict(method="rigl", distribution="bogus"), "unknown distribution 'bogus'"),
    (dict(method="rigl", colour="red"), "unknown sparsity option"),
    (dict(method="dense", density=0.5), "requires density=1.0"),
])
def test_bad_input_errors(options, message):
    options = dict(options)
    method = options.pop("method", "rigl")
    base = dict(density=0.1, total_steps=100)
    base.update(options)
    if method == "dense" and "density" not in options:
        base.pop("density")
    with pytest.raises(ValueError, match=message):
        granet.create_sparsifier(method, tiny_mlp(), None, **{k: v for k, v in base.items() if v is not None or k != "total_steps"})


def test_no_sparsifiable_weights_and_momentum_requirement():
    with pytest.raises(ValueError, match="no sparsifiable weights"):
        granet.create_sparsifier("rigl", nn.Sequential(nn.BatchNorm1d(3)), density=0.1, total_steps=10)
    model = tiny_mlp()
    with pytest.raises(ValueError, match="momentum > 0"):
        granet.create_sparsifier("snfs", model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.1, total_steps=10)


def test_masks_use_one_byte_per_weight():
    _, _, s = make("rigl")
    assert sum(m.element_size() * m.numel() for m in s.masks.values()) == s.total
    assert sum(e.numel() for e in s.ever_active) == sum(math.ceil(n / 8) for n in s.sizes)


@pytest.mark.parametrize("method", ["granet", "granet-st"])
def test_granet_drop_fraction_decays_over_the_whole_run_when_t0_is_late(method):
    # t0 at a fifth of the run: r_t still follows the cosine over [0, T] from step 0, while the updates
    # begin at t0 (none at step 10).
    T = 100

    def closed_form(t):
        return 0.005 + 0.5 * (0.5 - 0.005) * (1.0 + math.cos(math.pi * (t / T)))

    model = tiny_mlp()
    s = granet.create_sparsifier(method, model, None, density=0.1, total_steps=T, prune_start=0.2,
                                 update_interval=10)
    assert (s.regrowth.start, s.regrowth.end, s.pruning.start, s.pruning.end) == (0, T, 20, 50)
    assert s.regrowth.fraction(50) == closed_form(50) == 0.005 + 0.5 * 0.495 * (1.0 + math.cos(math.pi / 2))
    fractions = {}
    for t in range(1, T + 1):
        x, y = batch(t)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        report = s.step()
        if report is not None:
            fractions[report.step] = report.drop_fraction
    assert fractions == {t: closed_form(t) for t in range(20, T, 10)}


def _snfs_run(channels_last: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 64, 3), nn.ReLU(), nn.Conv2d(64, 128, 3), nn.Flatten(), nn.LazyLinear(10))
    model(torch.randn(2, 16, 8, 8))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    s = granet.create_sparsifier("snfs", model, opt, density=0.05, total_steps=8, update_interval=2)
    g = torch.Generator().manual_seed(2)
    for _ in range(8):
        x, y = torch.randn(4, 16, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        s.step()
    return list(s.masks.values()), [opt.state[p]["momentum_buffer"].contiguous() for p in s.params]


def test_snfs_resets_momentum_at_regrown_positions_in_channels_last_state():
    masks_a, moms_a = _snfs_run(channels_last=False)
    masks_b, moms_b = _snfs_run(channels_last=True)
    assert all(torch.equal(a, b) for a, b in zip(masks_a, masks_b))
    # Regrown weights start with zero momentum in both layouts (SNFS keeps the rest of the state).
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(moms_a, moms_b))


def _same_state(a, b) -> bool:
    """Two sparsifier state dicts hold the same values (tensors compared with torch.equal and dtype)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("method", ["snfs", "granet"])
def test_pickle_keeps_the_state_and_detaches_from_the_model(method):
    import copy
    import pickle

    model, opt, s = make(method)
    for t in range(1, 13):
        train_step(model, opt, t)
        s.step()
    assert s.last_update is not None and s.last_update.step == 10
    restored = pickle.loads(pickle.dumps(s))
    expected = s.state_dict()
    assert _same_state(restored.state_dict(), expected)
    assert restored.stats() == s.stats() and repr(restored) == repr(s)
    assert restored.names == s.names and restored.sizes == s.sizes and restored.total == s.total
    assert restored.counts == s.counts and restored.exploration_rate() == s.exploration_rate()
    assert all(torch.equal(restored.mask_of(n), m) for n, m in s.masks.items())
    assert restored.config == s.config and restored.step_count == 12 and restored.last_update == s.last_update
    assert (restored.init_counts, restored.final_counts) == (s.init_counts, s.final_counts)
    assert restored.optimizer is None and not restored.distributed
    # Pickled again (and deep-copied), the same state.
    assert _same_state(pickle.loads(pickle.dumps(restored)).state_dict(), expected)
    assert _same_state(copy.deepcopy(s).state_dict(), expected)
    # What touches weights refuses, naming the way back to training.
    for call in (restored.step, restored.apply_masks, lambda: restored.params, restored.coverage,
                 lambda: restored.load_state_dict(expected), lambda: restored.set_masks(dict(s.masks))):
        with pytest.raises(RuntimeError, match=r"^this sparsifier was restored from a pickle: .* build a sparsifier "
                                               r"on the model and load_state_dict\(restored.state_dict\(\)\)$"):
            call()
    # The way back: a sparsifier on a model, loaded from the restored state, trains on exactly as the original.
    ckpt = torch.load(_checkpoint(model, opt, restored), weights_only=True)
    model2, opt2, s2 = make(method, seed=5)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    s2.load_state_dict(ckpt["sparsifier"])
    for t in range(13, 25):
        train_step(model, opt, t)
        s.step()
        train_step(model2, opt2, t)
        s2.step()
    assert _same_state(s2.state_dict(), s.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
