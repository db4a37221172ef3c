"""The fused mask re-application (one ``torch._foreach_mul_`` for every layer, the path of CUDA
devices) gives the same bits as the per-layer pass, and is one operation per step."""
import pytest
import torch
from helpers import AtenCalls, tiny_cnn, train_step

import granet
from granet.kernels import native
from granet.sparsity import masking

STEPS = 24


def run(method: str, optimizer: str, fused: bool, native_on: bool, monkeypatch) -> tuple[list, list, list]:
    monkeypatch.setattr(masking, "FUSED_APPLY_DEVICES", ("cpu",) if fused else ("cuda",))
    native.set_enabled(native_on)
    try:
        model = tiny_cnn(0).to(memory_format=torch.channels_last)
        opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4) if optimizer == "sgd"
               else torch.optim.Adam(model.parameters(), lr=1e-3))
        sparsifier = granet.create_sparsifier(method, model, opt, density=0.2, total_steps=STEPS, update_interval=5)
        for step in range(STEPS):
            train_step(model, opt, step)
            sparsifier.step()
        states = [t.clone() for p in model.parameters() for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
        return ([p.detach().clone() for p in model.parameters()], [m.clone() for m in sparsifier.masks.values()],
                states)
    finally:
        native.set_enabled(True)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


@pytest.mark.parametrize("native_on", [True, False])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("method", ["granet", "rigl", "snfs", "static"])
def test_fused_apply_gives_the_same_bits(method, optimizer, native_on, monkeypatch):
    per_layer = run(method, optimizer, False, native_on, monkeypatch)
    fused = run(method, optimizer, True, native_on, monkeypatch)
    for a_list, b_list in zip(per_layer, fused):
        assert len(a_list) == len(b_list)
        for a, b in zip(a_list, b_list):
            assert torch.equal(_bits(a), _bits(b))
    # Inactive weights are really zero (the comparison is not between two runs that zero nothing).
    weights, masks = fused[0], fused[1]
    sparse = [w for w in weights if w.dim() > 1]
    assert sum(int((w != 0).sum()) for w in sparse) <= sum(int(m.sum()) for m in masks)


def test_a_step_re_applies_every_mask_with_one_operation(monkeypatch):
    monkeypatch.setattr(masking, "FUSED_APPLY_DEVICES", ("cpu",))
    model = tiny_cnn(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier = granet.create_sparsifier("rigl", model, opt, density=0.2, total_steps=100, update_interval=50)
    train_step(model, opt, 0)
    sparsifier.step()  # the first apply makes the float masks
    train_step(model, opt, 1)
    with AtenCalls() as ops:
        assert sparsifier.step() is None  # step 2: no topology update, masks only re-applied
    # 4 sparsified layers x (weight + momentum) in one multiply; nothing per layer.
    assert ops.names == ["aten._foreach_mul_.List"]
    # After a topology update the float masks of the changed layers are made again, once.
    for step in range(2, 50):
        train_step(model, opt, step)
        sparsifier.step()
    assert sparsifier.last_update is not None and sparsifier.last_update.step == 50
    train_step(model, opt, 50)
    with AtenCalls() as ops:
        sparsifier.step()
    assert ops.names.count("aten._foreach_mul_.List") == 1
    conversions = [n for n in ops.names if n != "aten._foreach_mul_.List"]
    assert 0 < len(conversions) <= 4 * 3  # at most a view and a copy per changed layer
    train_step(model, opt, 51)
    with AtenCalls() as ops:
        sparsifier.step()
    assert ops.names == ["aten._foreach_mul_.List"]
