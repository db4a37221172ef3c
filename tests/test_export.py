"""Compressed sparse export: bit packing, bit-identical round trips, exact file sizes, runs, bad input."""
import argparse
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("safetensors")
import safetensors.torch as st  # noqa: E402

import granet  # noqa: E402
from granet.cli import export as cli_export  # noqa: E402
from granet.export import LAYOUTS, export_run, export_sparse, load_masks, load_sparse, pack_bits, read_metadata, unpack_bits  # noqa: E402,E501
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


def test_tied_and_non_contiguous_dense_tensors_round_trip(tmp_path):
    state, masks = _masked_state(torch.float32)
    table = torch.randn(4, 6)
    state.update({"emb.weight": table, "head.weight": table, "t": torch.randn(6, 4).t(), "row": table[1]})
    export_sparse(state, masks, tmp_path / "m.safetensors")
    _assert_bit_identical(load_sparse(tmp_path / "m.safetensors"), state)


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
    with pytest.raises(ValueError, match=r"does not fit the model: missing \['bias', 'weight'\]"):
        load_sparse(tmp_path / "m.safetensors", model=nn.Linear(3, 3))
    wider = create_model("mlp", num_classes=11, in_channels=1, input_size=8)
    with pytest.raises(ValueError, match="does not fit the model: Error.* size mismatch") as exc:
        load_sparse(tmp_path / "m.safetensors", model=wider)
    assert "\n" not in str(exc.value)


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
    with pytest.raises(ValueError, match="layout must be one of bitmask, csr, got 'coo'"):
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
    assert out.strip() == "granet export needs the safetensors package: pip install granet[export]"


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
    (tmp_path / "model.pt").write_bytes(b"")
    torch.save({"model": {}, "masks": {}, "hook": argparse.Namespace(a=1)}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="is not a readable granet model file") as exc:
        export_run(tmp_path)
    assert "\n" not in str(exc.value)
    torch.save({"weights": {}}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="needs 'model' and 'masks' entries"):
        export_run(tmp_path)
    assert granet.export_run is export_run
