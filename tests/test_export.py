"""Compressed sparse export: bit packing, bit-identical round trips, exact file sizes, runs, bad input."""
import argparse
import errno
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("safetensors")
import safetensors.torch as st  # noqa: E402

import granet  # noqa: E402
from granet.cli import export as cli_export  # noqa: E402
from granet.cli import main as granet_main  # noqa: E402
from granet.deploy.export import (  # noqa: E402
    FORMAT_NAME,
    LAYOUTS,
    SparseExportError,
    export_run,
    export_sparse,
    load_masks,
    load_sparse,
    pack_bits,
    read_metadata,
    unpack_bits,
)
from granet.errors import GranetError  # noqa: E402
from granet.models import create_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as integers (so -0.0 != +0.0 and NaN payloads count)."""
    return t.view(_INT_VIEW[t.dtype]) if t.dtype in _INT_VIEW else t


def _assert_bit_identical(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(_bits(a[k]), _bits(b[k])), k


def _header_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def _masked_state(dtype: torch.dtype, seed: int = 0) -> tuple[dict, dict]:
    """A state dict with a sparse Linear and a sparse conv weight (as training leaves them: -0.0 at
    inactive negative weights, an active exact zero, an active NaN and inf), a dense bias, an int
    buffer and a bool buffer."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 10, generator=g)
    c = torch.randn(6, 3, 3, 3, generator=g)
    mw, mc = torch.rand(12, 10, generator=g) < 0.2, torch.rand(6, 3, 3, 3, generator=g) < 0.1
    mw[0, :3] = True
    w[0, 0], w[0, 1], w[0, 2] = 0.0, float("nan"), float("inf")
    state = {"fc.weight": (w.to(dtype) * mw), "fc.bias": torch.randn(12, generator=g).to(dtype),
             "conv.weight": (c.to(dtype) * mc), "bn.num_batches_tracked": torch.tensor(7),
             "flags": torch.tensor([True, False, True])}
    return state, {"fc.weight": mw, "conv.weight": mc}


def test_pack_bits_hand_worked_and_numpy_order():
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.bool)
    packed = pack_bits(mask)
    assert packed.tolist() == [0b00001101, 0b00000001]
    assert torch.equal(unpack_bits(packed, 9), mask)
    big = torch.rand(5, 13, generator=torch.Generator().manual_seed(0)) < 0.5
    assert np.array_equal(pack_bits(big).numpy(), np.packbits(big.numpy().reshape(-1), bitorder="little"))
    with pytest.raises(ValueError, match="padding"):
        unpack_bits(torch.tensor([0b00001101, 0b00000011], dtype=torch.uint8), 9)
    with pytest.raises(TypeError, match="torch.bool"):
        pack_bits(torch.ones(3))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_round_trip_is_bit_identical(dtype, layout, tmp_path):
    state, masks = _masked_state(dtype)
    assert bool(torch.signbit(state["fc.weight"][~masks["fc.weight"]]).any())  # -0.0 present
    path = tmp_path / "m.safetensors"
    info = export_sparse(state, masks, path, metadata={"note": "x", "n": [1, 2]}, layout=layout)
    _assert_bit_identical(load_sparse(path), state)
    restored_masks = load_masks(path)
    assert list(restored_masks) == ["fc.weight", "conv.weight"]
    assert all(torch.equal(restored_masks[k], masks[k]) for k in masks)
    assert read_metadata(path) == {"note": "x", "n": [1, 2]}
    assert info.active_weights == int(masks["fc.weight"].sum() + masks["conv.weight"].sum())
    assert info.total_weights == 120 + 162 and info.sparse_tensors == 2 and info.file_bytes == path.stat().st_size


def _data_bytes(path: Path) -> int:
    return path.stat().st_size - 8 - _header_bytes(path)


def test_tied_and_non_contiguous_dense_tensors_round_trip(tmp_path):
    state, masks = _masked_state(torch.float32)
    table = torch.randn(4, 6)
    state.update({"emb.weight": table, "head.weight": table, "t": torch.randn(6, 4).t(), "row": table[1]})
    info = export_sparse(state, masks, tmp_path / "m.safetensors")
    restored = load_sparse(tmp_path / "m.safetensors")
    _assert_bit_identical(restored, state)
    assert restored["head.weight"] is restored["emb.weight"]  # tied again, as exported
    with st.safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        meta, stored = f.metadata(), set(f.keys())
    assert meta["format_version"] == "2" and json.loads(meta["tied"]) == {"head.weight": "emb.weight"}
    assert "head.weight" not in stored and "emb.weight" in stored and "row" in stored  # a view is not a tie
    # Stored once: exactly one copy of the table (4 x 6 float32) less than the same tensors untied.
    untied = dict(state, **{"head.weight": table.clone()})
    plain = export_sparse(untied, masks, tmp_path / "plain.safetensors")
    assert _data_bytes(tmp_path / "plain.safetensors") - _data_bytes(tmp_path / "m.safetensors") == 4 * 6 * 4
    assert plain.dense_bytes - info.dense_bytes == 4 * 6 * 4
    with st.safe_open(str(tmp_path / "plain.safetensors"), framework="pt") as f:
        assert f.metadata()["format_version"] == "1" and "tied" not in f.metadata()


def test_tied_output_layer_of_a_language_model_is_stored_once(tmp_path):
    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(50, 16)
            self.body = nn.Linear(16, 16)
            self.lm_head = nn.Linear(16, 50, bias=False)
            self.lm_head.weight = self.wte.weight

    torch.manual_seed(0)
    model = TinyLM()
    mask = torch.rand(16, 16) < 0.25
    with torch.no_grad():
        model.body.weight.mul_(mask)
    export_sparse(model, {"body.weight": mask}, tmp_path / "lm.safetensors")
    fresh = TinyLM()
    load_sparse(tmp_path / "lm.safetensors", model=fresh)
    assert fresh.lm_head.weight is fresh.wte.weight
    _assert_bit_identical(fresh.state_dict(), model.state_dict())
    assert load_masks(tmp_path / "lm.safetensors").keys() == {"body.weight"}


@pytest.mark.parametrize("tied, message", [
    ({"emb": "head"}, "its 'tied' entry 'emb' -> 'head' does not name an earlier, untied tensor"),
    ({"head": "nope"}, "its 'tied' entry 'head' -> 'nope' does not name an earlier, untied tensor"),
    ({"head": "emb", "emb": "b"}, "its 'tied' entry 'head' -> 'emb' does not name an earlier, untied tensor"),
    ({}, "its 'tied' metadata is not a non-empty mapping"),
    ("[1", "its 'tied' metadata is missing or not JSON"),
])
def test_crafted_tied_metadata_is_refused_in_one_line(tied, message, tmp_path):
    path = tmp_path / "t.safetensors"
    meta = {"format": FORMAT_NAME, "format_version": "2", "layout": "bitmask", "keys": json.dumps(["b", "emb", "head"]),
            "sparse": "{}", "user": "{}", "tied": tied if isinstance(tied, str) else json.dumps(tied)}
    st.save_file({"b": torch.ones(2), "emb": torch.ones(3, 2)}, str(path), metadata=meta)
    with pytest.raises(SparseExportError) as info:
        load_sparse(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_tied_tensor_that_is_also_stored_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    meta = {"format": FORMAT_NAME, "format_version": "2", "layout": "bitmask", "keys": json.dumps(["emb", "head"]),
            "sparse": "{}", "user": "{}", "tied": json.dumps({"head": "emb"})}
    st.save_file({"emb": torch.ones(3, 2), "head": torch.ones(3, 2)}, str(path), metadata=meta)
    with pytest.raises(SparseExportError, match="tied tensor 'head' is also stored"):
        load_sparse(path)


def test_drop_zero_signs_restores_plus_zero_and_saves_exactly_the_sign_planes(tmp_path):
    state, masks = _masked_state(torch.float32)
    exact = export_sparse(state, masks, tmp_path / "a.safetensors")
    small = export_sparse(state, masks, tmp_path / "b.safetensors", keep_zero_signs=False)
    restored = load_sparse(tmp_path / "b.safetensors")
    for k in state:
        if state[k].is_floating_point():
            nan = torch.isnan(state[k])
            assert torch.equal(restored[k][~nan], state[k][~nan])  # -0.0 == +0.0 as values
    assert not bool(torch.signbit(restored["fc.weight"][~masks["fc.weight"]]).any())
    planes = math.ceil(120 / 8) + (math.ceil(162 / 8) if torch.signbit(state["conv.weight"][~masks["conv.weight"]]).any() else 0)
    data = lambda p: p.stat().st_size - 8 - _header_bytes(p)  # noqa: E731
    assert data(tmp_path / "a.safetensors") - data(tmp_path / "b.safetensors") == planes
    assert exact.file_bytes > small.file_bytes


def _sparse_linear_state(density_count: int) -> tuple[dict, dict]:
    """Linear(400 -> 500) with exactly ``density_count`` positive-or-negative active weights, +0.0 elsewhere."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(500, 400, generator=g)
    mask = torch.zeros(200_000, dtype=torch.bool)
    mask[torch.randperm(200_000, generator=g)[:density_count]] = True
    mask = mask.view(500, 400)
    return {"weight": torch.where(mask, w, torch.zeros(())), "bias": torch.randn(500, generator=g)}, {"weight": mask}


@pytest.mark.parametrize("layout, data_bytes", [
    # bitmask: 10,000 float32 values + 200,000 bits + dense bias (500 float32)
    ("bitmask", 10_000 * 4 + 200_000 // 8 + 500 * 4),
    # csr: values + int16 column indices (rows of 400) + 501 int32 row pointers + bias
    ("csr", 10_000 * 4 + 10_000 * 2 + 501 * 4 + 500 * 4),
])
def test_size_at_95_percent_sparsity_is_exactly_the_format(layout, data_bytes, tmp_path):
    state, masks = _sparse_linear_state(10_000)  # density 0.05
    path = tmp_path / "m.safetensors"
    info = export_sparse(state, masks, path, layout=layout)
    assert path.stat().st_size == 8 + _header_bytes(path) + data_bytes
    assert info.dense_bytes == 200_500 * 4
    assert _header_bytes(path) < 1000
    assert info.ratio <= 0.1  # 0.0835 (bitmask) / 0.0798 (csr) + header
    assert info.ratio == (8 + _header_bytes(path) + data_bytes) / 802_000


def test_load_into_model_gives_identical_outputs(tmp_path):
    model = create_model("mlp", num_classes=10, in_channels=1, input_size=8)
    masks = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                masks[name] = torch.rand(p.shape, generator=torch.Generator().manual_seed(len(masks))) < 0.05
                p.mul_(masks[name])
    export_sparse(model, masks, tmp_path / "m.safetensors")
    fresh = create_model("mlp", num_classes=10, in_channels=1, input_size=8)
    load_sparse(tmp_path / "m.safetensors", model=fresh)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(fresh(x), model(x))
    keys = list(model.state_dict())
    with pytest.raises(ValueError) as exc:
        load_sparse(tmp_path / "m.safetensors", model=nn.Linear(3, 3))
    assert str(exc.value) == (f"{tmp_path / 'm.safetensors'} does not fit the model (missing 'weight', 'bias'; "
                              f"unexpected {', '.join(repr(k) for k in keys[:3])} and {len(keys) - 3} more); "
                              f"the model is unchanged")
    wider = create_model("mlp", num_classes=11, in_channels=1, input_size=8)
    head_w, head_b = keys[-2:]
    with pytest.raises(ValueError) as exc:
        load_sparse(tmp_path / "m.safetensors", model=wider)
    w = model.state_dict()[head_w]
    assert str(exc.value) == (
        f"{tmp_path / 'm.safetensors'} does not fit the model ('{head_w}' is float32 {[10, w.shape[1]]} in the file, "
        f"float32 {[11, w.shape[1]]} in the model; '{head_b}' is float32 [10] in the file, float32 [11] in the "
        f"model); the model is unchanged")


@pytest.mark.parametrize("change, error, message", [
    (lambda s, m: m.update({"fc.weight": m["fc.weight"][:, :5]}), ValueError, r"'fc.weight' has shape \(12, 5\) but the tensor has shape \(12, 10\)"),  # noqa: E501
    (lambda s, m: m.update({"fc.weight": m["fc.weight"].float()}), TypeError, "'fc.weight' must be a torch.bool tensor, got torch.float32"),  # noqa: E501
    (lambda s, m: m.update({"fc2.weight": m["fc.weight"]}), ValueError, "mask 'fc2.weight' names no tensor"),
    (lambda s, m: s["fc.weight"].fill_(1.0), ValueError, r"'fc.weight' has \d+ non-zero values outside its mask"),
    (lambda s, m: s.update({"step": 3}), TypeError, "'step' must be a dense tensor, got int"),
    (lambda s, m: s.update({"a::b": torch.ones(1)}), ValueError, "without '::'"),
])
def test_bad_inputs_are_one_line_errors(change, error, message, tmp_path):
    state, masks = _masked_state(torch.float32)
    change(state, masks)
    with pytest.raises(error, match=message) as exc:
        export_sparse(state, masks, tmp_path / "m.safetensors")
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "m.safetensors").exists()


def test_bad_options_are_one_line_errors(tmp_path):
    state, masks = _masked_state(torch.float32)
    with pytest.raises(ValueError, match="layout must be one of bitmask, csr, fan-in, got 'coo'"):
        export_sparse(state, masks, tmp_path / "m", layout="coo")
    with pytest.raises(TypeError, match="metadata must be a JSON-serialisable mapping"):
        export_sparse(state, masks, tmp_path / "m", metadata={"x": object()})
    with pytest.raises(TypeError, match="needs an nn.Module or a state dict, got list"):
        export_sparse([1], masks, tmp_path / "m")


def test_foreign_corrupt_and_missing_files_are_one_clear_error(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    foreign = tmp_path / "dense.safetensors"
    st.save_file({"w": torch.ones(3)}, str(foreign))
    state, masks = _masked_state(torch.float32)
    good = tmp_path / "good.safetensors"
    export_sparse(state, masks, good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-40])
    # A well-formed safetensors file whose values no longer match the mask: one value dropped.
    tensors, meta = st.load_file(str(good)), None
    with st.safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    tensors["fc.weight::values"] = tensors["fc.weight::values"][:-1]
    tampered = tmp_path / "tampered.safetensors"
    st.save_file(tensors, str(tampered), metadata=meta)
    for path, message in ((junk, "is not a readable safetensors file"), (foreign, "is not a granet sparse export"),
                          (truncated, "is not a readable safetensors file"), (tampered, "is a corrupt granet sparse export")):
        with pytest.raises(ValueError, match=message) as exc:
            load_sparse(path)
        assert "\n" not in str(exc.value)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_sparse(tmp_path / "missing.safetensors")


def test_import_granet_without_safetensors_names_the_extra():
    code = ("import sys; sys.modules['safetensors'] = None\n"
            "import granet\n"
            "try:\n    granet.export_sparse({}, {}, 'x')\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")}).stdout
    assert out.strip() == ("granet export needs the safetensors package: pip install -c constraints.txt "
                           '-e ".[export]" in the granet checkout (or pip install safetensors)')


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real (3-step) granet run at density 0.05."""
    from granet.train import TrainConfig, train

    out = tmp_path_factory.mktemp("run")
    config = TrainConfig.from_dict(dict(model="mlp", method="static", density=0.05, epochs=1, max_steps=3,
                                        batch_size=32, out=str(out), progress="log"))
    config.validate()
    train(config)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_run_restores_the_trained_model(run_dir, layout, tmp_path):
    artifact = torch.load(run_dir / "model.pt", weights_only=True)
    info = export_run(run_dir, tmp_path / "m.safetensors", layout=layout)
    _assert_bit_identical(load_sparse(tmp_path / "m.safetensors"), artifact["model"])
    assert all(torch.equal(load_masks(tmp_path / "m.safetensors")[k], v) for k, v in artifact["masks"].items())
    meta = read_metadata(tmp_path / "m.safetensors")
    assert meta["config"] == artifact["config"] and meta["step"] == artifact["step"] == 3
    assert meta["layer_density"] == artifact["layer_density"]
    assert info.active_weights == sum(int(m.sum()) for m in artifact["masks"].values())
    assert info.active_weights / info.total_weights == pytest.approx(0.05, abs=1e-4)


@pytest.mark.slow
def test_cli_export_prints_sizes_and_ratio(run_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="granet")
    cli_export.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "m.safetensors"
    args = parser.parse_args(["export", str(run_dir), "--out", str(out), "--format", "csr"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out.splitlines()
    size, dense = out.stat().st_size, (run_dir / "model.pt").stat().st_size
    assert printed[0] == f"wrote {out} (csr, {size:,} bytes)"
    assert printed[2] == f"size ratio {size / dense:.4f} vs the dense checkpoint {run_dir / 'model.pt'} ({dense:,} bytes)"
    assert load_masks(out).keys() == torch.load(run_dir / "model.pt", weights_only=True)["masks"].keys()
    args = parser.parse_args(["export", str(tmp_path / "nothing")])
    assert args.func(args) == 2
    assert capsys.readouterr().err == f"granet export: error: {tmp_path / 'nothing'} has no model.pt (is it a granet run directory?)\n"  # noqa: E501
    with pytest.raises(SystemExit):
        parser.parse_args(["export", str(run_dir), "--format", "coo"])


def test_export_run_refuses_pickled_objects(tmp_path):
    torch.save({"model": {}, "masks": {}, "hook": argparse.Namespace(a=1)}, tmp_path / "model.pt")
    with pytest.raises(SparseExportError, match="refused to load .*: it holds Python objects other than") as exc:
        export_run(tmp_path)
    assert "\n" not in str(exc.value) and isinstance(exc.value, ValueError)
    torch.save({"weights": {}}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="needs 'model' and 'masks' entries"):
        export_run(tmp_path)
    assert not (tmp_path / "model.sparse.safetensors").exists()
    assert granet.export_run is export_run


# ---------------------------------------------------------------------------- run files, output paths, the CLI

def _fake_run(root: Path) -> Path:
    """A run directory as training leaves it: model.pt (a small masked model), checkpoint.pt, config.yaml."""
    root.mkdir(exist_ok=True)
    state, masks = _masked_state(torch.float32)
    torch.save({"model": state, "masks": masks, "config": {"model": "tiny"}, "epoch": 1, "step": 3}, root / "model.pt")
    torch.save({"format": 2, "progress": {"epoch": 1, "step": 3}}, root / "checkpoint.pt")
    (root / "config.yaml").write_text("model: tiny\n")
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def _cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run the real ``granet`` command; (exit status, stderr). A traceback would escape as an exception."""
    code = granet_main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name", ["model.pt", "checkpoint.pt", "config.yaml"])
def test_export_never_replaces_a_file_of_the_run(name, tmp_path, capsys):
    run = _fake_run(tmp_path / "run")
    before = _files(run)
    code, err = _cli(["export", str(run), "--out", str(run / name)], capsys)
    assert code == 2
    assert err == (f"granet export: error: output file {run / name} is one of the files of the run in {run}: "
                   f"writing it would destroy the run; choose another file name\n")
    assert _files(run) == before  # byte-identical, and no temporary file left
    # The library refuses the same (a link to the file counts as the file).
    state, masks = _masked_state(torch.float32)
    link = tmp_path / "link.safetensors"
    link.symlink_to(run / name)
    for target in (run / name, link):
        with pytest.raises(SparseExportError, match="is one of the files of the run"):
            export_sparse(state, masks, target)
    assert _files(run) == before
    # The default output goes beside the run's files and leaves them as they were.
    code, err = _cli(["export", str(run)], capsys)
    assert (code, err) == (0, "")
    after = _files(run)
    assert set(after) == set(before) | {"model.sparse.safetensors"} and {k: after[k] for k in before} == before
    _assert_bit_identical(load_sparse(run / "model.sparse.safetensors"), torch.load(run / "model.pt")["model"])


@pytest.mark.parametrize("out, reason", [
    ("missing/m.safetensors", "cannot write {out}: directory {parent} does not exist"),
    ("adir", "cannot write {out}: it is a directory (give a file name)"),
])
def test_cli_bad_out_is_one_line(out, reason, tmp_path, capsys):
    run = _fake_run(tmp_path / "run")
    (tmp_path / "adir").mkdir()
    out = tmp_path / out
    code, err = _cli(["export", str(run), "--out", str(out)], capsys)
    assert code == 2
    assert err == f"granet export: error: {reason.format(out=out, parent=out.parent)}\n"
    assert not (tmp_path / "missing").exists() and list((tmp_path / "adir").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "run"]  # no temporary file beside --out


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0o555; the file-size-limit test covers it")
def test_cli_read_only_directory_is_one_line(tmp_path, capsys):
    run = _fake_run(tmp_path / "run")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, err = _cli(["export", str(run), "--out", str(ro / "m.safetensors")], capsys)
    finally:
        ro.chmod(0o755)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"granet export: error: cannot write {ro / 'm.safetensors'}: ") and "ermission denied" in err
    assert list(ro.iterdir()) == []


def test_cli_read_only_file_system_is_one_line(tmp_path, capsys, monkeypatch):
    """EROFS as the operating system reports it (root ignores chmod, so it is raised where safetensors writes)."""
    run = _fake_run(tmp_path / "run")

    def read_only(tensors: dict, filename: str, metadata: Optional[dict] = None) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), filename)

    monkeypatch.setattr(st, "save_file", read_only)
    out = tmp_path / "m.safetensors"
    code, err = _cli(["export", str(run), "--out", str(out)], capsys)
    assert (code, err) == (2, f"granet export: error: cannot write {out}: {os.strerror(errno.EROFS)}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_cli_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path):
    """A file-size limit (``ulimit -f``) fails the write like a full disk: safetensors raises its own error type."""
    run = _fake_run(tmp_path / "run")
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"previous export")
    code = ("import resource, sys\n"
            "from granet.cli import main\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))\n"
            "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, "export", str(run), "--out", str(out)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"granet export: error: cannot write {out}: ")
    assert "File too large" in proc.stderr and proc.stderr.endswith("(the previous version is intact)\n")
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "run"]


def test_cli_unreadable_model_file_is_one_line(tmp_path, capsys):
    run = _fake_run(tmp_path)
    for content in (b"", b"PK\x03\x04 cut short"):
        (run / "model.pt").write_bytes(content)
        code, err = _cli(["export", str(run)], capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"granet export: error: {run / 'model.pt'} is not a readable granet model file (")
        assert not (run / "model.sparse.safetensors").exists()


# ---------------------------------------------------------------------------- crafted files

def _craft(path: Path, tensors: dict, sparse: dict, layout: str, keys: Optional[list] = None) -> Path:
    """A safetensors file with granet metadata written by hand (shapes need not match the pieces)."""
    meta = {"format": FORMAT_NAME, "format_version": "1", "layout": layout,
            "keys": json.dumps(keys if keys is not None else list(dict.fromkeys(k.split("::")[0] for k in tensors))),
            "sparse": json.dumps(sparse), "user": "{}"}
    st.save_file(tensors, str(path), metadata=meta)
    return path


def _tampered(good: Path, out: Path, key: str, **changes) -> Path:
    """``good`` with ``key``'s entry of the 'sparse' metadata changed (the stored pieces unchanged)."""
    with st.safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    sparse = json.loads(meta["sparse"])
    sparse[key].update(changes)
    meta["sparse"] = json.dumps(sparse)
    st.save_file(st.load_file(str(good)), str(out), metadata=meta)
    return out


def _small_export(tmp_path: Path, layout: str) -> Path:
    """``w`` (1, 10) with 3 active values (and -0.0 at two inactive ones), ``b`` (1,) dense."""
    w = torch.tensor([[0.5, -0.0, 0.0, -1.5, 0.0, 2.0, -0.0, 0.0, 0.0, 0.0]])
    path = tmp_path / f"{layout}.safetensors"
    export_sparse({"w": w, "b": torch.ones(1)}, {"w": w != 0}, path, layout=layout)
    return path


_MEASURE = """
import json, resource, sys, time
import torch
from torch import nn
from granet.deploy.export import load_sparse
results = []
for path, model_shapes in json.loads(sys.argv[1]):
    model = None
    if model_shapes is not None:
        model = nn.Module()
        for name, shape in model_shapes.items():
            model.register_buffer(name, torch.zeros(shape))
    peak, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    try:
        load_sparse(path, model=model)
        message = None
    except ValueError as exc:
        message = str(exc)
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) * 1024
    results.append([message, grew, time.perf_counter() - start])
print(json.dumps(results))
"""


def test_huge_declared_shapes_are_refused_before_anything_is_allocated(tmp_path):
    """The audit's files: a CSR export of a (1, 10) tensor whose header declares (1, 2**28) or (1, 2**31)
    took 2.5 / 10 GB and 5-15 s to refuse (the same with int32 column indices, where only the sign
    plane's size gives it away); a consistent CSR file declaring a tensor larger than any machine; a
    consistent (1, 2**28) file loaded into a model whose tensor is (1, 10)."""
    good = _small_export(tmp_path, "csr")
    wide = _tampered(good, tmp_path / "wide.safetensors", "w", shape=[1, 2**28])
    wider = _tampered(good, tmp_path / "wider.safetensors", "w", shape=[1, 2**31])
    i32 = torch.int32
    with st.safe_open(str(good), framework="pt") as f:
        meta = json.loads(f.metadata()["sparse"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["w"]["shape"] = [1, 2**28]
    signs = _craft(tmp_path / "signs.safetensors", {**tensors, "w::col": tensors["w::col"].to(i32)}, meta, "csr")
    huge = _craft(tmp_path / "huge.safetensors",  # 1024 rows of 2**31 float64: 16 TiB
                  {"w::values": torch.zeros(0, dtype=torch.float64), "w::crow": torch.zeros(1025, dtype=i32),
                   "w::col": torch.zeros(0, dtype=i32)},
                  {"w": {"shape": [1024, 2**31], "dtype": "float64", "nnz": 0}}, "csr")
    consistent = _craft(tmp_path / "consistent.safetensors",
                        {"w::values": torch.zeros(0), "w::crow": torch.zeros(2, dtype=i32),
                         "w::col": torch.zeros(0, dtype=i32), "b": torch.ones(1)},
                        {"w": {"shape": [1, 2**28], "dtype": "float32", "nnz": 0}}, "csr")
    cases = [(str(wide), None), (str(wider), None), (str(signs), None), (str(huge), None),
             (str(consistent), {"w": [1, 10], "b": [1]})]
    proc = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(cases)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert [r[0] for r in results] == [
        f"{wide} is a corrupt granet sparse export ('w::col' is int16 [3], but shape [1, 268435456] with 3 active "
        f"values needs int32 [3])",
        f"{wider} is a corrupt granet sparse export ('w::col' is int16 [3], but shape [1, 2147483648] with 3 active "
        f"values needs int32 [3])",
        f"{signs} is a corrupt granet sparse export ('w::negzero' is uint8 [2], but shape [1, 268435456] with 3 active "
        f"values needs uint8 [33554432])",
        f"{huge} declares tensors larger than this machine's {memory:,} bytes of memory (e.g. 'w': float64 "
        f"[1024, 2147483648]); a corrupt or crafted file?",
        f"{consistent} does not fit the model ('w' is float32 [1, 268435456] in the file, float32 [1, 10] in the "
        f"model); the model is unchanged",
    ]
    for message, grew, seconds in results:
        assert grew < 32 * 2**20 and seconds < 1.0, (message, grew, seconds)


_LONG = "x" * 100_000
_CUT = "'" + "x" * 56 + "..."  # short_repr of _LONG: 60 characters


@pytest.mark.parametrize("layout, change, detail", [
    ("bitmask", dict(shape=[2**14, 2**14]),
     "'w::mask' is uint8 [2], but shape [16384, 16384] with 3 active values needs uint8 [33554432]"),
    ("csr", dict(shape=[4, 2]), "'w::crow' is int32 [2], but shape [4, 2] with 3 active values needs int32 [5]"),
    ("csr", dict(shape=[1, 2**40]), "'w' declares shape [1, 1099511627776]: rows too long for CSR column indices"),
    ("bitmask", dict(nnz=11), "'w' declares 11 active values in shape [1, 10]"),
    ("csr", dict(nnz=2), "'w::values' is float32 [3], but shape [1, 10] with 2 active values needs float32 [2]"),
    ("bitmask", dict(dtype="float64"),
     "'w::values' is float32 [3], but shape [1, 10] with 3 active values needs float64 [3]"),
    ("bitmask", dict(dtype=_LONG), f"'w' declares unknown dtype {_CUT}"),
    ("csr", dict(shape=[1, -10]), "'w' declares shape [1, -10] and nnz 3: not non-negative integers"),
    ("csr", dict(shape=[True, 10]), "'w' declares shape [True, 10] and nnz 3: not non-negative integers"),
    ("bitmask", dict(nnz=[_LONG]), f"'w' declares shape [1, 10] and nnz ['{'x' * 55}...: not non-negative integers"),
])
def test_inconsistent_declarations_are_refused_in_one_short_line(layout, change, detail, tmp_path):
    bad = _tampered(_small_export(tmp_path, layout), tmp_path / "bad.safetensors", "w", **change)
    for load in (load_sparse, load_masks):
        with pytest.raises(SparseExportError) as exc:
            load(bad)
        assert str(exc.value) == f"{bad} is a corrupt granet sparse export ({detail})"
        assert isinstance(exc.value, ValueError) and isinstance(exc.value, GranetError)


def test_stray_and_missing_tensors_are_refused_in_one_short_line(tmp_path):
    values, crow, col = torch.ones(1), torch.tensor([0, 1], dtype=torch.int32), torch.zeros(1, dtype=torch.int16)
    sparse = {"w": {"shape": [1, 4], "dtype": "float32", "nnz": 1}}
    stray = _craft(tmp_path / "stray.safetensors", {"w::values": values, "w::crow": crow, "w::col": col,
                                                    "w::extra": torch.ones(1), "zzz": torch.ones(1)}, sparse, "csr",
                   keys=["w"])
    unstored = _craft(tmp_path / "unstored.safetensors", {"w::values": values, "w::crow": crow, "w::col": col},
                      sparse, "csr", keys=["w", _LONG])
    no_piece = _craft(tmp_path / "no_piece.safetensors", {"w::values": values, "w::crow": crow}, sparse, "csr")
    for path, detail in ((stray, "2 stored tensors belong to no key, e.g. 'w::extra'"),
                         (unstored, f"tensor {_CUT} is not stored"),
                         (no_piece, "'w' has no stored 'col' piece")):
        with pytest.raises(SparseExportError) as exc:
            load_sparse(path)
        assert str(exc.value) == f"{path} is a corrupt granet sparse export ({detail})"


def _three_layers(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 3))


def _corrupt_last_sparse_tensor(path: Path, layout: str) -> Path:
    """``path`` with the stored data (not the header) of ``2.weight`` made inconsistent."""
    with st.safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = st.load_file(str(path))
    if layout == "bitmask":
        mask = tensors["2.weight::mask"]
        mask[0] = int(mask[0]) ^ 1  # position (0, 0) inactive: one active position fewer than values
    else:
        tensors["2.weight::crow"][-1] += 1
    st.save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_into_a_model_applies_completely_or_not_at_all(layout, tmp_path):
    source = _three_layers(0)
    masks = {f"{i}.weight": torch.rand(source[i].weight.shape, generator=torch.Generator().manual_seed(i)) < 0.5
             for i in range(3)}
    masks["2.weight"][0, 0] = True  # the corrupted bit below is active
    state = {k: v.detach() * masks[k] if k in masks else v.detach() for k, v in source.state_dict().items()}
    target = _three_layers(1)
    before = {k: v.clone() for k, v in target.state_dict().items()}

    def export(name: str, **changes: torch.Tensor) -> Path:
        export_sparse({**state, **changes}, masks, tmp_path / name, layout=layout)
        return tmp_path / name

    cases = [  # the problem is in the last of six tensors, or the last sparse one
        (export("shape.st", **{"2.bias": torch.zeros(4)}),
         "does not fit the model ('2.bias' is float32 [4] in the file, float32 [3] in the model); "
         "the model is unchanged"),
        (export("int.st", **{"2.bias": torch.arange(3, dtype=torch.int32)}),
         "does not fit the model ('2.bias' is int32 [3] in the file, float32 [3] in the model); "
         "the model is unchanged"),
        (export("double.st", **{"2.weight": state["2.weight"].double()}),
         "does not fit the model ('2.weight' is float64 [3, 4] in the file, float32 [3, 4] in the model); "
         "the model is unchanged"),
        (_corrupt_last_sparse_tensor(export("corrupt.st"), layout),
         "is a corrupt granet sparse export (" + ("mask has {} active positions for {} values".format(
             int(masks["2.weight"].sum()) - 1, int(masks["2.weight"].sum())) if layout == "bitmask"
             else "bad CSR row pointers") + ")"),
    ]
    for path, message in cases:
        with pytest.raises(SparseExportError) as exc:
            load_sparse(path, model=target)
        assert str(exc.value) == f"{path} {message}"
        after = target.state_dict()
        assert list(after) == list(before)
        assert all(after[k].dtype == before[k].dtype and torch.equal(_bits(after[k]), _bits(before[k])) for k in before)
    load_sparse(export("good.st"), model=target)
    _assert_bit_identical(target.state_dict(), state)


# Files written by granet before the fan-in layout (format versions 1 and 2), kept byte for byte: a
# (2, 4) float32 weight with 4 active values and -0.0 at two inactive places, a dense bias, and (the
# "tied" file) a token embedding shared with an output layer.
_OLD_FILES = {
    "bitmask": (
        "yAEAAAAAAAB7Il9fbWV0YWRhdGFfXyI6eyJmb3JtYXRfdmVyc2lvbiI6IjEiLCJsYXlvdXQiOiJiaXRtYXNrIiwia2V5cyI6Iltc"
        "IndcIiwgXCJiXCJdIiwiZm9ybWF0IjoiZ3JhbmV0LXNwYXJzZSIsInVzZXIiOiJ7XCJtYWRlXCI6IFwidjFcIn0iLCJzcGFyc2Ui"
        "OiJ7XCJ3XCI6IHtcInNoYXBlXCI6IFsyLCA0XSwgXCJkdHlwZVwiOiBcImZsb2F0MzJcIiwgXCJubnpcIjogNH19In0sImIiOnsi"
        "ZHR5cGUiOiJGMzIiLCJzaGFwZSI6WzJdLCJkYXRhX29mZnNldHMiOlswLDhdfSwidzo6dmFsdWVzIjp7ImR0eXBlIjoiRjMyIiwi"
        "c2hhcGUiOls0XSwiZGF0YV9vZmZzZXRzIjpbOCwyNF19LCJ3OjptYXNrIjp7ImR0eXBlIjoiVTgiLCJzaGFwZSI6WzFdLCJkYXRh"
        "X29mZnNldHMiOlsyNCwyNV19LCJ3OjpuZWd6ZXJvIjp7ImR0eXBlIjoiVTgiLCJzaGFwZSI6WzFdLCJkYXRhX29mZnNldHMiOlsy"
        "NSwyNl19fSAgICAgICAAAIA/AACAvwAAAD8AAMC/AAAAQAAAgD6pQg=="
    ),
    "csr": (
        "AAIAAAAAAAB7Il9fbWV0YWRhdGFfXyI6eyJzcGFyc2UiOiJ7XCJ3XCI6IHtcInNoYXBlXCI6IFsyLCA0XSwgXCJkdHlwZVwiOiBc"
        "ImZsb2F0MzJcIiwgXCJubnpcIjogNH19IiwiZm9ybWF0X3ZlcnNpb24iOiIxIiwiZm9ybWF0IjoiZ3JhbmV0LXNwYXJzZSIsInVz"
        "ZXIiOiJ7XCJtYWRlXCI6IFwidjFcIn0iLCJsYXlvdXQiOiJjc3IiLCJrZXlzIjoiW1wid1wiLCBcImJcIl0ifSwiYiI6eyJkdHlw"
        "ZSI6IkYzMiIsInNoYXBlIjpbMl0sImRhdGFfb2Zmc2V0cyI6WzAsOF19LCJ3Ojp2YWx1ZXMiOnsiZHR5cGUiOiJGMzIiLCJzaGFw"
        "ZSI6WzRdLCJkYXRhX29mZnNldHMiOls4LDI0XX0sInc6OmNyb3ciOnsiZHR5cGUiOiJJMzIiLCJzaGFwZSI6WzNdLCJkYXRhX29m"
        "ZnNldHMiOlsyNCwzNl19LCJ3Ojpjb2wiOnsiZHR5cGUiOiJJMTYiLCJzaGFwZSI6WzRdLCJkYXRhX29mZnNldHMiOlszNiw0NF19"
        "LCJ3OjpuZWd6ZXJvIjp7ImR0eXBlIjoiVTgiLCJzaGFwZSI6WzFdLCJkYXRhX29mZnNldHMiOls0NCw0NV19fSAgICAgIAAAgD8A"
        "AIC/AAAAPwAAwL8AAABAAACAPgAAAAACAAAABAAAAAAAAwABAAMAQg=="
    ),
    "tied": (
        "WAIAAAAAAAB7Il9fbWV0YWRhdGFfXyI6eyJsYXlvdXQiOiJjc3IiLCJrZXlzIjoiW1wid1wiLCBcImJcIiwgXCJlbWJcIiwgXCJo"
        "ZWFkXCJdIiwic3BhcnNlIjoie1wid1wiOiB7XCJzaGFwZVwiOiBbMiwgNF0sIFwiZHR5cGVcIjogXCJmbG9hdDMyXCIsIFwibm56"
        "XCI6IDR9fSIsImZvcm1hdF92ZXJzaW9uIjoiMiIsImZvcm1hdCI6ImdyYW5ldC1zcGFyc2UiLCJ1c2VyIjoie30iLCJ0aWVkIjoi"
        "e1wiaGVhZFwiOiBcImVtYlwifSJ9LCJiIjp7ImR0eXBlIjoiRjMyIiwic2hhcGUiOlsyXSwiZGF0YV9vZmZzZXRzIjpbMCw4XX0s"
        "ImVtYiI6eyJkdHlwZSI6IkYzMiIsInNoYXBlIjpbMiwyXSwiZGF0YV9vZmZzZXRzIjpbOCwyNF19LCJ3Ojp2YWx1ZXMiOnsiZHR5"
        "cGUiOiJGMzIiLCJzaGFwZSI6WzRdLCJkYXRhX29mZnNldHMiOlsyNCw0MF19LCJ3Ojpjcm93Ijp7ImR0eXBlIjoiSTMyIiwic2hh"
        "cGUiOlszXSwiZGF0YV9vZmZzZXRzIjpbNDAsNTJdfSwidzo6Y29sIjp7ImR0eXBlIjoiSTE2Iiwic2hhcGUiOls0XSwiZGF0YV9v"
        "ZmZzZXRzIjpbNTIsNjBdfSwidzo6bmVnemVybyI6eyJkdHlwZSI6IlU4Iiwic2hhcGUiOlsxXSwiZGF0YV9vZmZzZXRzIjpbNjAs"
        "NjFdfX0gICAAAIA/AACAvwAAgD8AAADAAABAQAAAAAAAAAA/AADAvwAAAEAAAIA+AAAAAAIAAAAEAAAAAAADAAEAAwBC"
    ),
}


@pytest.mark.parametrize("name", list(_OLD_FILES))
def test_files_of_earlier_versions_still_load_and_are_written_byte_for_byte(name, tmp_path):
    import base64

    old = tmp_path / f"{name}.safetensors"
    old.write_bytes(base64.b64decode(_OLD_FILES[name]))
    w = torch.tensor([[0.5, -0.0, 0.0, -1.5], [0.0, 2.0, -0.0, 0.25]])
    emb = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    state = {"w": w, "b": torch.tensor([1.0, -1.0])}
    if name == "tied":
        state.update(emb=emb, head=emb)
    restored = load_sparse(old)
    _assert_bit_identical(restored, state)
    assert torch.equal(load_masks(old)["w"], w != 0)
    with st.safe_open(str(old), framework="pt") as f:
        assert f.metadata()["format_version"] == ("2" if name == "tied" else "1")
    if name == "tied":
        assert restored["head"] is restored["emb"]
    else:
        assert read_metadata(old) == {"made": "v1"}
    # This granet writes the layouts of those versions as before: the same header (safetensors orders
    # the metadata differently in every process) and the same data bytes.
    new = tmp_path / f"{name}.new.safetensors"
    export_sparse(state, {"w": w != 0}, new, metadata=None if name == "tied" else {"made": "v1"},
                  layout="csr" if name == "tied" else name)

    def split(path: Path) -> tuple[dict, bytes]:
        data = path.read_bytes()
        size = struct.unpack("<Q", data[:8])[0]
        return json.loads(data[8:8 + size]), data[8 + size:]

    assert split(new) == split(old) and new.stat().st_size == old.stat().st_size


def test_cli_exports_a_fan_in_run_condensed_and_loads_it_back_bit_identically(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "fanin.safetensors"
    assert granet_main(["train", "--method", "rigl", "--model", "mlp", "--structure", "fan-in", "--density", "0.1",
                        "--epochs", "1", "--out", str(run), "--progress", "log"]) == 0
    assert granet_main(["export", str(run), "--format", "fan-in", "--out", str(out)]) == 0
    trained = torch.load(run / "model.pt", weights_only=True)
    weights = trained["model"] if "model" in trained else trained
    loaded = granet.load_sparse(str(out))
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    masks = torch.load(run / "checkpoint.pt", weights_only=True)["sparsifier"]["masks"]
    with st.safe_open(str(out), "pt") as f:  # stored condensed: per output unit, its k inputs' indices
        for name, mask in masks.items():
            k = int(mask.sum(1)[0])
            assert tuple(f.get_slice(f"{name}::index").get_shape()) == (mask.shape[0], k), name
            assert f.get_slice(f"{name}::values").get_shape()[0] == mask.shape[0] * k, name
