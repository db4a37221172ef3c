"""Native selection kernels (granet.native): each output equals the torch expression it replaces,
bit for bit, on inputs with ties, signed zeros, infinities and NaN; whole GraNet runs are identical
with the kernels and without them; the fallback without a compiler works and leaves no files."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
from torch import nn

import granet
from granet import native

pytestmark = pytest.mark.skipif(not native._compilers(), reason="no C compiler on this machine")

SIZES = [0, 1, 7, 255, 256, 257, 10_007]


@pytest.fixture(autouse=True)
def _native_on():
    before = native.set_enabled(True)
    assert native.library() is not None, "a C compiler is present, so the kernels must build"
    yield
    native.set_enabled(before)


def _values(n: int, seed: int) -> torch.Tensor:
    """Signed values with ties, zeros of both signs, infinities (and no NaN)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g).round(decimals=1)  # many ties
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-38, -1e-38])
    where = torch.randint(0, max(n, 1), (min(n, 12),), generator=g)
    x[where] = special[torch.randint(0, 6, (where.numel(),), generator=g)]
    return x


def _bits(t: torch.Tensor) -> list[int]:
    return t.view(torch.int32).tolist()


def _band_reference(x, absolute, valid, invert, hi, lo):
    v = x.abs() if absolute else x
    ok = torch.ones_like(x, dtype=torch.bool) if valid is None else (~valid if invert else valid)
    above = (v > hi) & ok if hi is not None else torch.zeros_like(ok)
    band = ok & ~above if hi is not None else ok.clone()
    if lo is not None:
        band &= v > lo
    index = band.nonzero().squeeze(1)
    return above, int(above.sum()), index, v[index]


@pytest.mark.parametrize("n", SIZES)
def test_band_equals_the_torch_expression(n):
    x = _values(n, seed=n)
    g = torch.Generator().manual_seed(n + 1)
    valid = torch.rand(n, generator=g) < 0.6
    for absolute in (False, True):
        for mask, invert in ((None, False), (valid, False), (valid, True)):
            for hi, lo in ((0.5, -0.2), (0.5, None), (None, 0.3), (0.0, 0.0), (float("inf"), -float("inf"))):
                above = torch.empty(n, dtype=torch.bool) if hi is not None else None
                for capacity in (1, n + 1):  # too small: the kernel runs again with the size it found
                    n_above, index, values = native.band(x, absolute, mask, invert, hi, lo, above, capacity)
                    want = _band_reference(x, absolute, mask, invert, hi, lo)
                    case = (n, absolute, mask is not None, invert, hi, lo, capacity)
                    assert n_above == want[1], case
                    if above is not None:
                        assert torch.equal(above, want[0]), case
                    assert index.tolist() == want[2].tolist(), case
                    assert _bits(values) == _bits(want[3]), case


def test_band_keeps_nan_where_the_torch_expression_does():
    x = torch.tensor([float("nan"), 0.7, -float("nan"), 0.1, 0.9])
    for hi, lo in ((0.8, 0.05), (0.8, None), (None, 0.05)):
        above = torch.empty(5, dtype=torch.bool) if hi is not None else None
        n_above, index, values = native.band(x, True, None, False, hi, lo, above, 5)
        want = _band_reference(x, True, None, False, hi, lo)
        assert n_above == want[1] and index.tolist() == want[2].tolist()
        assert torch.equal(values.isnan(), want[3].isnan()) and torch.equal(values.nan_to_num(), want[3].nan_to_num())


@pytest.mark.parametrize("n", SIZES)
def test_compact_equals_nonzero_and_gather(n):
    g = torch.Generator().manual_seed(n)
    x = _values(n, seed=n + 3)
    for density in (0.0, 0.03, 0.5, 1.0):
        mask = torch.rand(n, generator=g) < density
        for invert in (False, True):
            want = (~mask if invert else mask).nonzero().squeeze(1)
            index, values = native.compact(mask, want.numel(), invert=invert)
            assert index.tolist() == want.tolist() and values is None
            for absolute in (False, True):
                index, values = native.compact(mask, want.numel(), invert, x, absolute)
                assert index.tolist() == want.tolist()
                assert _bits(values) == _bits(x.abs()[want] if absolute else x[want])


def test_compact_rejects_a_wrong_count():
    mask = torch.tensor([True, False, True, True])
    with pytest.raises(ValueError, match="has 3 set entries, not 2"):
        native.compact(mask, 2)


@pytest.mark.parametrize("n", SIZES)
def test_zero_outside_equals_multiplying_by_the_float_mask(n):
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(n, generator=g) < 0.3
    also = torch.randperm(n, generator=g)[: n // 5]
    tensors = [_values(n, seed=n + c) for c in range(3)]
    if n:
        tensors[0][0] = float("nan")
    for positions in (None, also):
        keep = mask.float()
        if positions is not None:
            keep[positions] = 0.0
        want = [t * keep for t in tensors]
        got = [t.clone() for t in tensors]
        native.zero_outside(got, mask, positions)
        assert all(_bits(a) == _bits(b) for a, b in zip(got, want)), positions is None  # -0.0 and NaN too
        # granet.masking.zero_outside gives the same bits with and without the kernel
        for flag in (True, False):
            again = [t.clone() for t in tensors]
            _with_native(flag, granet.masking.zero_outside, again, mask, also=positions)
            assert all(_bits(a) == _bits(b) for a, b in zip(again, want)), flag


def test_zero_outside_counts_as_an_in_place_write_for_autograd():
    w = torch.randn(6, 5, requires_grad=True)
    out = (w * w).sum()  # saves w for backward
    with torch.no_grad():
        native.zero_outside([w], torch.rand(6, 5, generator=torch.Generator().manual_seed(0)) < 0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_zero_outside_leaves_other_dtypes_and_layouts_to_torch():
    mask = torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)) < 0.5
    weight = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    half = torch.randn(4, 3, 5, 5).half()
    want = [weight * mask, half * mask]
    granet.masking.zero_outside([weight, half], mask)
    assert torch.equal(weight, want[0]) and torch.equal(half, want[1])
    assert weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("n", [1, 2, 7, 257, 10_007])
def test_kth_smallest_equals_kthvalue(n):
    for seed, kind in enumerate(("ties", "continuous", "constant")):
        if kind == "ties":
            x = _values(n, seed)
        elif kind == "continuous":
            x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 1e6
        else:
            x = torch.full((n,), -2.5)
        for j in sorted(j for j in {1, 2, n // 3, n // 2, n - 1, n} if 1 <= j <= n):
            got, want = native.kth_smallest(x, j), x.kthvalue(j).values
            assert got is not None and got.dtype == torch.float32
            # Equal as numbers (a tie between -0.0 and 0.0 may return either; they compare equal).
            assert bool(got == want), (kind, n, j, float(got), float(want))
            if float(want) != 0.0:
                assert _bits(got.reshape(1)) == _bits(want.reshape(1)), (kind, n, j)


def test_kth_smallest_leaves_nan_to_torch():
    assert native.kth_smallest(torch.tensor([1.0, float("nan"), 0.0]), 2) is None
    # select_top then orders NaN last, as torch does.
    scores = torch.tensor([0.3, float("nan"), 0.1, 0.2] * 20_000)
    assert torch.equal(granet.criteria.select_top(scores, 30_000), _with_native(False, granet.criteria.select_top,
                                                                                   scores, 30_000))


def _with_native(flag: bool, fn, *args, **kwargs):
    before = native.set_enabled(flag)
    try:
        return fn(*args, **kwargs)
    finally:
        native.set_enabled(before)


def _granet_run(method: str, steps: int = 14) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int],
                                                        Optional[list[torch.Tensor]]]:
    """A method on layers above the bracketed-selection size (one training thread: identical floats)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 400), nn.ReLU(), nn.Linear(400, 300), nn.ReLU(), nn.Linear(300, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    s = granet.create_sparsifier(method, model, opt, density=0.05, total_steps=steps, update_interval=2,
                                 prune_end=10, track_exploration=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(32, 300, generator=g), torch.randint(0, 10, (32,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        s.step()
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in s.params]
    return list(s.masks.values()), [p.detach().clone() for p in s.params], list(s.counts), momentum


@pytest.mark.parametrize("method", ["granet", "granet-st", "rigl", "snfs", "set"])
def test_training_is_identical_with_and_without_the_kernels(method, two_threads):
    masks_n, weights_n, counts_n, mom_n = _with_native(True, _granet_run, method)
    masks_t, weights_t, counts_t, mom_t = _with_native(False, _granet_run, method)
    assert counts_n == counts_t == [int(m.sum()) for m in masks_n]
    assert all(torch.equal(a, b) for a, b in zip(masks_n, masks_t))
    assert all(torch.equal(a, b) for a, b in zip(weights_n, weights_t))
    assert all(torch.equal(a, b) for a, b in zip(mom_n, mom_t))


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    full = {**os.environ, "PYTHONPATH": str(root / "src"), **env}
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)


def test_build_leaves_no_files_and_the_environment_switch_turns_it_off(tmp_path):
    code = ("from granet import native; import os, tempfile; lib = native.library(); "
            "print(lib is not None, sorted(os.listdir(tempfile.gettempdir())))")
    out = _python(code, {"TMPDIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "[]"]
    off = _python(code, {"TMPDIR": str(tmp_path), "GRANET_NATIVE": "0"})
    assert off.stdout.split() == ["False", "[]"]
    assert _python(code, {"TMPDIR": str(tmp_path), "GRANET_NATIVE": " Off "}).stdout.split() == ["False", "[]"]
    bad = _python(code, {"TMPDIR": str(tmp_path), "GRANET_NATIVE": "maybe"})
    assert bad.stdout.split() == ["True", "[]"]
    assert ("GRANET_NATIVE='maybe' is not one of 1/0, true/false, yes/no, on/off: the native kernels stay on"
            in bad.stderr)


def test_without_a_compiler_the_torch_path_runs_and_says_so(tmp_path):
    code = ("import logging, torch; logging.basicConfig(level=logging.INFO); from granet import native, criteria; "
            "print(native.library() is None); s = torch.rand(100_000, generator=torch.Generator().manual_seed(0)); "
            "print(int(criteria.select_top(s, 777).sum()))")
    out = _python(code, {"PATH": str(tmp_path), "CC": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "777"]
    assert "native selection kernels unavailable (no C compiler found); using torch operations" in out.stderr


def test_a_noexec_temporary_directory_falls_back_to_the_users_cache(tmp_path):
    """Clusters often mount /tmp noexec: the library is then built under ~/.cache/granet."""
    mount = tmp_path / "noexec"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "noexec,size=16m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs a noexec mount (root)")
    try:
        code = ("import logging; logging.basicConfig(level=logging.DEBUG); from granet import native; "
                "print(native.library() is not None)")
        out = _python(code, {"TMPDIR": str(mount), "HOME": str(tmp_path / "home"), "XDG_RUNTIME_DIR": ""})
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["True"]
        assert f"native selection kernels built in {tmp_path / 'home' / '.cache' / 'granet'}" in out.stderr
        assert os.listdir(mount) == [] and os.listdir(tmp_path / "home" / ".cache" / "granet") == []
        assert (tmp_path / "home" / ".cache" / "granet").stat().st_mode & 0o777 == 0o700
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
