"""Native selection kernels (granet.kernels.native): each output equals the torch expression it replaces,
bit for bit, on inputs with ties, signed zeros, infinities and NaN, at every instruction-set level
the CPU runs; whole GraNet runs are identical with the kernels and without them. The kernels are
built by the install (setup.py), loaded without running any program, refused when stale or when
their self-test fails (a wrong byte order), and only ever handed contiguous CPU tensors; without
them the torch path runs and says so once."""
from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Optional

import pytest
import torch
from torch import nn

import granet
import granet.sparsity.criteria  # the modules the tests below call through granet.sparsity
import granet.sparsity.masking
from granet.kernels import native

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "granet" / "kernels" / "_native.c"


def _compiler() -> Optional[list[str]]:
    """The C compiler command setuptools would build the kernels with, where it exists."""
    command = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    return command if command and shutil.which(command[0]) else None


# Where a compiler is present, the install built the kernels: their absence is then a failure.
pytestmark = pytest.mark.skipif(not native.available() and _compiler() is None,
                                reason="granet installed without its native kernels and no C compiler here")

SIZES = [0, 1, 7, 255, 256, 257, 10_007]


def _cpu_levels() -> list[int]:
    lib = native.library()
    assert lib is not None
    bits = lib.granet_kernels_levels()
    return [level for level in range(len(native._LEVELS)) if bits >> level & 1]


@pytest.fixture(autouse=True)
def _native_on():
    before = native.set_enabled(True)
    assert native.library() is not None, "a C compiler is present, so `pip install -e .` must have built the kernels"
    yield
    native.set_enabled(before)


@pytest.fixture(params=range(len(native._LEVELS)), ids=list(native._LEVELS))
def level(request):
    """Run the test with the kernels of one instruction-set level (each one this CPU runs)."""
    lib = native.library()
    if request.param not in _cpu_levels():
        pytest.skip(f"this CPU does not run the {native._LEVELS[request.param]} kernels")
    assert lib.granet_kernels_use(request.param) == request.param
    yield request.param
    lib.granet_kernels_use(-1)


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
def test_band_equals_the_torch_expression(n, level):
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


def test_band_keeps_nan_where_the_torch_expression_does(level):
    x = torch.tensor([float("nan"), 0.7, -float("nan"), 0.1, 0.9])
    for hi, lo in ((0.8, 0.05), (0.8, None), (None, 0.05)):
        above = torch.empty(5, dtype=torch.bool) if hi is not None else None
        n_above, index, values = native.band(x, True, None, False, hi, lo, above, 5)
        want = _band_reference(x, True, None, False, hi, lo)
        assert n_above == want[1] and index.tolist() == want[2].tolist()
        assert torch.equal(values.isnan(), want[3].isnan()) and torch.equal(values.nan_to_num(), want[3].nan_to_num())


@pytest.mark.parametrize("n", SIZES)
def test_compact_equals_nonzero_and_gather(n, level):
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
def test_zero_outside_equals_multiplying_by_the_float_mask(n, level):
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
        # granet.sparsity.masking.zero_outside gives the same bits with and without the kernel
        for flag in (True, False):
            again = [t.clone() for t in tensors]
            _with_native(flag, granet.sparsity.masking.zero_outside, again, mask, also=positions)
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
    granet.sparsity.masking.zero_outside([weight, half], mask)
    assert torch.equal(weight, want[0]) and torch.equal(half, want[1])
    assert weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("n", [1, 2, 7, 257, 10_007])
def test_kth_smallest_equals_kthvalue(n, level):
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


def test_kth_smallest_leaves_nan_to_torch(level):
    assert native.kth_smallest(torch.tensor([1.0, float("nan"), 0.0]), 2) is None
    # select_top then orders NaN last, as torch does.
    scores = torch.tensor([0.3, float("nan"), 0.1, 0.2] * 20_000)
    assert torch.equal(granet.sparsity.criteria.select_top(scores, 30_000), _with_native(False, granet.sparsity.criteria.select_top,
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



# --- building, loading and refusing the kernels -------------------------------------------------


def test_the_installed_kernels_are_in_use_at_the_widest_level_this_cpu_runs():
    origin = importlib.util.find_spec("granet.kernels._native_kernels").origin
    assert native.available() and native.library()._name == origin
    assert native.status() == f"in use ({native._LEVELS[max(_cpu_levels())]})"


def test_every_level_this_cpu_runs_passes_the_self_test():
    lib = native.library()
    levels = _cpu_levels()
    assert levels[0] == 0  # the portable kernels run everywhere
    try:
        for level in range(len(native._LEVELS) + 1):
            if level in levels:
                assert lib.granet_kernels_use(level) == level
                assert lib.granet_kernels_self_test() == 0, native._LEVELS[level]
            else:  # a level the CPU (or the build) lacks is refused, and the one in use stays
                assert lib.granet_kernels_use(level) == -1
                assert lib.granet_kernels_self_test() == 0
    finally:
        assert lib.granet_kernels_use(-1) == max(levels)


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


_SPAWN_EVENTS = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                 "os.startfile"}


def test_loading_and_using_the_kernels_runs_no_program():
    """No compiler (or any other program) at import or run time: every way Python starts a process
    raises an audit event, and none is raised while granet is imported and selects with the kernels."""
    code = f"""if True:
        import sys, torch
        events = []
        def hook(event, args):
            if event in {sorted(_SPAWN_EVENTS)!r}:
                events.append(event)
            elif event == "ctypes.dlopen":
                events.append("dlopen " + str(args[0]))
        sys.addaudithook(hook)
        from granet.kernels import native
        from granet.sparsity import criteria
        s = torch.rand(100_000, generator=torch.Generator().manual_seed(0))
        print(int(criteria.select_top(s, 777).sum()), native.status())
        print(events)
    """
    out = _python(code, {})
    assert out.returncode == 0, out.stderr
    selected, events = out.stdout.splitlines()
    assert selected == f"777 {native.status()}"
    assert events == repr([f"dlopen {native.library()._name}"])  # the kernels' library, and nothing run


def test_the_environment_switch_turns_them_off_and_is_not_a_missing_build():
    code = ("import logging, torch; logging.basicConfig(level=logging.INFO); from granet.kernels import native; "
            "from granet.sparsity import criteria; "
            "s = torch.rand(100_000, generator=torch.Generator().manual_seed(0)); "
            "print(int(criteria.select_top(s, 777).sum()), native.available(), native.status())")
    for value in ("0", " Off "):
        off = _python(code, {"GRANET_NATIVE": value})
        assert off.returncode == 0, off.stderr
        assert off.stdout.strip() == "777 False off (GRANET_NATIVE=0)"
        assert off.stderr == ""  # turned off on purpose: no warning
    bad = _python(code, {"GRANET_NATIVE": "maybe"})
    assert bad.stdout.strip() == f"777 True {native.status()}"
    assert ("GRANET_NATIVE='maybe' is not one of 1/0, true/false, yes/no, on/off: the native kernels stay on"
            in bad.stderr)


def test_set_enabled_reports_itself_in_the_status():
    assert native.set_enabled(False) is True
    assert native.status() == "off (set_enabled(False))" and not native.available()
    assert native.library() is None
    assert native.set_enabled(True) is False
    assert native.status().startswith("in use (")


def _pretend_not_built(monkeypatch) -> None:
    """This process as if granet had been installed without a C compiler."""
    monkeypatch.setattr(native._LIBRARY, "module", "granet._no_such_kernels")
    monkeypatch.setattr(native._LIBRARY, "loaded", False)
    monkeypatch.setattr(native._LIBRARY, "lib", None)
    monkeypatch.setattr(native._LIBRARY, "state", "")
    monkeypatch.setattr(native, "_warned", False)


def test_without_the_built_kernels_the_torch_path_runs_and_warns_once(monkeypatch, caplog):
    scores = torch.rand(100_000, generator=torch.Generator().manual_seed(0))
    want = granet.sparsity.criteria.select_top(scores, 777)  # with the kernels
    _pretend_not_built(monkeypatch)
    # Tensors the kernels could never take do not even look for them (nor warn).
    assert not native.supports([torch.empty(3, device="meta")]) and not native._LIBRARY.loaded
    assert not native.supports([torch.empty(3, dtype=torch.float64)]) and not native._LIBRARY.loaded
    with caplog.at_level(logging.INFO, logger="granet.kernels.native"):
        got = [granet.sparsity.criteria.select_top(scores, 777) for _ in range(2)]
    assert all(torch.equal(g, want) for g in got)
    assert not native.available() and native.status() == native._NOT_BUILT == \
        "not built (no working C compiler when granet was installed)"
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(
        logging.WARNING,
        "granet's native selection kernels are not built (no working C compiler when granet was installed): "
        "topology updates on the CPU run torch operations instead (the same masks, about 2x slower). Reinstall "
        "granet where a C compiler is available to build them.")]
    with pytest.raises(RuntimeError, match=r"the kernels are not built \(no working C compiler"):
        native.compact(torch.ones(3, dtype=torch.bool), 3)


def test_the_kernel_functions_refuse_tensors_they_cannot_take():
    """A GPU (here: meta) tensor's pointer must never reach C, whatever the caller checked."""
    meta, flat = torch.empty(8, device="meta"), torch.randn(8)
    mask = torch.rand(8, generator=torch.Generator().manual_seed(0)) < 0.5
    strided = torch.randn(16)[::2]
    cases = [
        (lambda: native.band(meta, True, None, False, 0.5, 0.1, None, 8), "x must be a contiguous CPU torch.float32"),
        (lambda: native.band(flat, True, mask.to("meta"), False, 0.5, 0.1, None, 8), "valid must be"),
        (lambda: native.band(flat, True, None, False, 0.5, 0.1, torch.empty(7, dtype=torch.bool), 8),
         r"above must be a contiguous CPU torch.bool tensor of 8 entries, got torch.bool of shape \(7,\) on cpu"),
        (lambda: native.kth_smallest(strided, 1), "x must be"),
        (lambda: native.kth_smallest(meta, 1), "x must be"),
        (lambda: native.compact(mask, 3, x=meta), "x must be"),
        (lambda: native.compact(mask.to("meta"), 3), "mask must be"),
        (lambda: native.zero_outside([meta], mask), "each tensor must be"),
        (lambda: native.zero_outside([flat.double()], mask), "each tensor must be"),
        (lambda: native.zero_outside([flat], mask, torch.tensor([1], dtype=torch.int32)), "also must be"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    for j in (0, 9):
        with pytest.raises(ValueError, match=f"j={j} for 8 entries"):
            native.kth_smallest(flat, j)


@pytest.mark.parametrize("positions", [[5], [-6], [2, 9], [0, 2, 4, -5, -1, 100]])
def test_zero_outside_rejects_positions_out_of_range_on_both_paths(positions, level):
    mask = torch.tensor([True, False, True, True, False])
    bad = next(p for p in positions if not -5 <= p < 5)
    also = torch.tensor(positions)
    for flag in (True, False):
        tensors = [torch.randn(5, generator=torch.Generator().manual_seed(c)) for c in range(2)]
        before = [t.clone() for t in tensors]
        with pytest.raises(IndexError, match=f"^index {bad} is out of bounds for dimension 0 with size 5$"):
            _with_native(flag, granet.sparsity.masking.zero_outside, tensors, mask, also=also)
        assert all(_bits(a) == _bits(b) for a, b in zip(tensors, before)), flag  # nothing written
        if flag:
            with pytest.raises(IndexError):
                native.zero_outside(tensors, mask, also)


def test_zero_outside_counts_negative_positions_from_the_end_as_torch_does(level):
    mask = torch.tensor([True, True, False, True, True])
    tensors = [torch.randn(5, generator=torch.Generator().manual_seed(c)) for c in range(2)]
    also = torch.tensor([-1, -5, 1])
    want = [t * torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0]) for t in tensors]
    for flag in (True, False):
        got = [t.clone() for t in tensors]
        _with_native(flag, granet.sparsity.masking.zero_outside, got, mask, also=also)
        assert all(_bits(a) == _bits(b) for a, b in zip(got, want)), flag


def test_a_library_built_from_another_source_is_refused(tmp_path):
    origin = native.library()._name
    assert native._open(origin, str(SOURCE))[1] == native.status()
    edited = tmp_path / "_native.c"
    edited.write_bytes(SOURCE.read_bytes() + b"\n/* edited after the build */\n")
    assert native._open(origin, str(edited)) == (
        None, f"stale ({origin} was built from an older _native.c: reinstall granet)")
    assert native._open(str(tmp_path / "missing.so"), None)[1].startswith(f"unusable ({tmp_path / 'missing.so'}: ")


def _compile(tmp_path: Path, name: str, *flags: str) -> str:
    """_native.c compiled alone (no Python module), for the byte-order paths."""
    compiler = _compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    target = tmp_path / f"{name}.so"
    subprocess.run([*compiler, "-DGRANET_NO_PYTHON", *flags, "-O1", "-shared", "-fPIC", "-o", str(target),
                    str(SOURCE)], check=True, capture_output=True, timeout=120)
    return str(target)


@pytest.mark.skipif(sys.byteorder != "little", reason="the wrong byte order is tested on little-endian machines")
def test_a_library_built_for_the_other_byte_order_fails_its_self_test_and_is_refused(tmp_path):
    path = _compile(tmp_path, "big", "-DGRANET_BYTE_ORDER=2")
    # Positions come out mirrored within each 8-byte word: the compaction (bit 0) and band (bit 1) parts fail.
    assert native._open(path, None) == (
        None, f"unusable ({path} fails its self-test (0x3): built for another byte order?)")


@pytest.fixture(scope="module")
def byte_at_a_time(tmp_path_factory) -> ctypes.CDLL:
    """The kernels as built where the byte order is unknown (one byte of flags at a time)."""
    path = _compile(tmp_path_factory.mktemp("unknown"), "unknown", "-DGRANET_BYTE_ORDER=0")
    lib, state = native._open(path, None)
    assert lib is not None and state.startswith("in use (")
    return lib


@pytest.mark.parametrize("n", SIZES)
def test_the_byte_at_a_time_scan_for_an_unknown_byte_order_gives_the_same_results(n, byte_at_a_time, monkeypatch):
    monkeypatch.setattr(native._LIBRARY, "lib", byte_at_a_time)
    x = _values(n, seed=n)
    valid = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.6
    for absolute in (False, True):
        above = torch.empty(n, dtype=torch.bool)
        n_above, index, values = native.band(x, absolute, valid, False, 0.5, -0.2, above, n + 1)
        want = _band_reference(x, absolute, valid, False, 0.5, -0.2)
        assert (n_above, index.tolist(), _bits(values)) == (want[1], want[2].tolist(), _bits(want[3]))
        assert torch.equal(above, want[0])
        index, values = native.compact(valid, int((~valid).sum()), True, x, absolute)
        assert index.tolist() == (~valid).nonzero().squeeze(1).tolist()
        assert _bits(values) == _bits(x.abs()[~valid] if absolute else x[~valid])


def _copy_project(tmp_path: Path) -> Path:
    """What setup.py needs to build the kernels: itself, pyproject.toml, the README and the source."""
    project = tmp_path / "project"
    (project / "src" / "granet" / "kernels").mkdir(parents=True)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copy(SOURCE, project / "src" / "granet" / "kernels" / "_native.c")
    (project / "src" / "granet" / "__init__.py").write_text("")
    (project / "src" / "granet" / "kernels" / "__init__.py").write_text("")
    return project


@pytest.mark.slow
def test_setup_builds_the_kernels_and_without_a_compiler_succeeds_and_removes_a_stale_build(tmp_path):
    if _compiler() is None:
        pytest.skip("no C compiler")
    project = _copy_project(tmp_path)
    build = [sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--build-temp", str(tmp_path / "temp")]
    built = subprocess.run(build, cwd=project, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    library = project / "src" / "granet" / "kernels" / Path(native.library()._name).name
    lib, state = native._open(str(library), str(project / "src" / "granet" / "kernels" / "_native.c"))
    assert lib is not None and state == native.status()
    assert [p.name for p in (project / "build").glob("lib*/granet/kernels/*")] == [library.name]
    # No compiler: the build warns and succeeds, and removes the libraries it could not rebuild, in
    # place and in the build directory (where a wheel would take it from).
    none = subprocess.run([*build, "--force"], cwd=project, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CC": str(tmp_path / "no-such-cc"), "PATH": str(tmp_path)})
    assert none.returncode == 0, none.stderr
    assert "WARNING: granet's native kernels were not built (" in none.stderr
    assert not library.exists()
    assert list((project / "build").glob("lib*/granet/kernels/*")) == []


def test_version_and_summary_say_whether_the_kernels_ran(tmp_path, capsys):
    from granet.cli import main

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"granet {granet.__version__} (native kernels: {native.status()})"
    assert main(["train", "--model", "mlp", "--epochs", "1", "--max-steps", "2", "--progress", "log",
                 "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["native_kernels"] == native.status() and summary["native_kernels"].startswith("in use (")
