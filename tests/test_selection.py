"""Parameter-level selection and the coverage report on real models.

``transformers`` models are built from tiny configs (no downloads). Counts below are worked out by
hand from the configs: a GPT-2 block with width E has Conv1D weights E×3E, E×E, E×4E and 4E×E, so
``12·E²`` masked weights per block.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import granet
from granet.accounting.flops import layer_flops
from granet.sparsity.schedule_check import prune_steps, schedule_warnings
from granet.sparsity.schedules import DropFractionSchedule, PruningSchedule
from granet.sparsity.targets import fan_in_out, select_parameters

transformers = pytest.importorskip("transformers")

E, L, V, P = 16, 2, 97, 16  # GPT-2 width, blocks, vocabulary, positions
GPT2_MASKED = L * 12 * E * E
GPT2_NAMES = [
    f"transformer.h.{i}.{n}.weight" for i in range(L) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
]


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=V, n_positions=P, n_embd=E, n_layer=L, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    return transformers.BertForMaskedLM(config)


def llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


class AttnNet(nn.Module):
    def __init__(self, kdim: int | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, kdim=kdim, vdim=kdim, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def test_gpt2_conv1d_selected_and_tied_embedding_dense():
    model = gpt2()
    cov = granet.describe_sparsity(model)
    assert [e.name for e in cov.selected()] == GPT2_NAMES
    assert cov.masked_params == GPT2_MASKED == 6144
    tied = cov.entries[0]
    assert (tied.name, tied.aliases, tied.reason) == (
        "transformer.wte.weight", ("lm_head.weight",), "tied to embedding transformer.wte.weight")
    assert [(e.name, e.reason) for e in cov.dense()] == [
        ("transformer.wte.weight", "tied to embedding transformer.wte.weight"),
        ("transformer.wpe.weight", "embedding"),
    ]
    total = sum(p.numel() for p in model.parameters())
    assert cov.total_params == total
    assert cov.weights_2d == GPT2_MASKED + V * E + P * E
    assert cov.masked_fraction == GPT2_MASKED / total
    assert cov.unrequested_dense == 0 and cov.warning() is None
    assert "transformer.wte.weight = lm_head.weight  97x16   1,552  dense: tied to embedding" in str(cov)
    c_attn = model.transformer.h[0].attn.c_attn
    candidate = next(c for c in select_parameters(model).candidates if c.param is c_attn.weight)
    assert (candidate.kind, candidate.fan_in, candidate.fan_out) == ("conv1d_hf", E, 3 * E)


def test_gpt2_sparsifier_exact_density_and_every_name_of_the_tie_accepted():
    model = gpt2()
    s = granet.create_sparsifier("static", model, density=0.3, distribution="erk")
    assert s.names == GPT2_NAMES
    assert sum(s.counts) == round(0.3 * GPT2_MASKED)
    assert sum(int(torch.count_nonzero(p)) for p in s.params) == round(0.3 * GPT2_MASKED)
    assert int(torch.count_nonzero(model.lm_head.weight)) == V * E  # the tied embedding is untouched
    cov = s.coverage()
    assert cov.active_params == round(0.3 * GPT2_MASKED)
    for pattern in ("lm_head", "lm_head.weight", "transformer.wte"):
        kept = select_parameters(model, keep_dense=[pattern])
        assert kept.coverage().entries[0].reason == f"kept dense by pattern {pattern!r}"


def test_gpt2_tied_weight_masked_once_when_embeddings_allowed():
    model = gpt2()
    s = granet.create_sparsifier("static", model, density=0.5, distribution="uniform", dense_embeddings=False)
    assert s.names == ["transformer.wte.weight"] + GPT2_NAMES  # lm_head.weight is the same tensor: once
    assert model.lm_head.weight is model.transformer.wte.weight
    assert int(torch.count_nonzero(model.lm_head.weight)) == V * E // 2
    assert s.total == GPT2_MASKED + V * E
    wpe = next(e for e in s.coverage().entries if e.name == "transformer.wpe.weight")
    assert wpe.reason == "type not selected (Embedding)"


def test_gpt2_granet_reaches_target_density_exactly():
    model = gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    s = granet.create_sparsifier("granet", model, opt, density=0.2, total_steps=8, update_interval=2)
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(8):
        model(ids, labels=ids).loss.backward()
        opt.step()
        s.step()
        opt.zero_grad()
    assert sum(s.counts) == round(0.2 * GPT2_MASKED)
    assert sum(int(torch.count_nonzero(p)) for p in s.params) == sum(s.counts)


def test_bert_and_llama_coverage():
    cov = granet.describe_sparsity(bert())
    prefix = "bert.encoder.layer.0."
    assert [e.name for e in cov.selected()] == [
        prefix + n + ".weight" for n in ("attention.self.query", "attention.self.key", "attention.self.value",
                                         "attention.output.dense", "intermediate.dense", "output.dense")
    ] + ["cls.predictions.transform.dense.weight"]
    assert cov.masked_params == 4 * 256 + 2 * 512 + 256
    assert cov.entries[0].aliases == ("cls.predictions.decoder.weight",)
    assert cov.entries[0].reason == "tied to embedding bert.embeddings.word_embeddings.weight"
    cov = granet.describe_sparsity(llama())
    assert [e.name for e in cov.dense()] == ["model.embed_tokens.weight"]
    assert cov.masked_params == 256 + 128 + 128 + 256 + 3 * 512 + 800


def test_multihead_attention_in_proj_and_out_proj():
    model = AttnNet()
    sel = select_parameters(model)
    assert [n for n, _ in sel.selected] == ["attn.in_proj_weight", "attn.out_proj.weight", "head.weight"]
    only = select_parameters(model, layer_types=(nn.MultiheadAttention,))
    assert [n for n, _ in only.selected] == ["attn.in_proj_weight", "attn.out_proj.weight"]
    assert fan_in_out("mha_in_proj", (48, 16)) == (16, 48)
    separate = select_parameters(AttnNet(kdim=8), layer_types=(nn.MultiheadAttention,))
    assert [n for n, _ in separate.selected] == [
        "attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight", "attn.out_proj.weight"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    s = granet.create_sparsifier("rigl", model, opt, density=0.25, total_steps=6, update_interval=2)
    x = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(1))
    for _ in range(6):
        model(x).sum().backward()
        opt.step()
        s.step()
        opt.zero_grad()
    assert s.total == 48 * 16 + 16 * 16 + 3 * 16
    assert sum(s.counts) == round(0.25 * s.total)
    for p, m in zip(s.params, s.masks.values()):
        assert torch.equal(p != 0, m & (p != 0)) and int(torch.count_nonzero(p)) <= int(m.sum())
        assert not bool(p[~m].any())


def test_lstm_dense_by_default_with_warning_and_selected_when_asked(caplog):
    model = LSTMNet()
    with caplog.at_level(logging.WARNING, logger="granet.sparsity.coverage"):
        s = granet.create_sparsifier("static", model, density=0.5)
    assert s.names == ["head.weight"]
    lstm_2d = 4 * 16 * 8 + 3 * 4 * 16 * 16
    cov = s.coverage()
    assert cov.unrequested_dense == lstm_2d
    assert cov.warning() in caplog.text
    assert cov.warning().startswith(f"{lstm_2d / (lstm_2d + 48):.1%} of the model's 2-D weights stay dense")
    s = granet.create_sparsifier("static", LSTMNet(), density=0.5, layer_types=(nn.Linear, nn.LSTM))
    assert s.names == ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l1", "lstm.weight_hh_l1",
                       "head.weight"]
    assert sum(s.counts) == round(0.5 * (lstm_2d + 48))
    only_hh = select_parameters(LSTMNet(), include=["*.weight_hh_l*"])
    assert [n for n, _ in only_hh.selected] == ["lstm.weight_hh_l0", "lstm.weight_hh_l1"]
    no_l1 = select_parameters(LSTMNet(), layer_types=(nn.LSTM,), exclude=["*_l1"])
    assert [n for n, _ in no_l1.selected] == ["lstm.weight_ih_l0", "lstm.weight_hh_l0"]


def test_refusals_name_the_reason():
    class Emb(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4, sparse=True)
            self.fc = nn.Linear(4, 2)

    with pytest.raises(ValueError, match=r"Embedding 'emb' has sparse=True, so its gradient is a torch.sparse"):
        select_parameters(Emb(), layer_types=(nn.Embedding, nn.Linear), dense_embeddings=False)
    assert [n for n, _ in select_parameters(Emb()).selected] == ["fc.weight"]
    with pytest.raises(ValueError, match=r"layer_types entry LayerNorm has no weight the sparsifier can mask"):
        select_parameters(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), layer_types=(nn.Linear, nn.LayerNorm))
    with pytest.raises(ValueError, match=r"'nope' match no name of any weight of the selected layer types \(LSTM\)"):
        select_parameters(LSTMNet(), layer_types=(nn.LSTM,), keep_dense=["nope"])
    with pytest.raises(ValueError, match=r"no sparsifiable weights: selected layer types LSTM; dense 2-D weights: "
                                         r"0.weight: type not selected \(Linear\)"):
        granet.create_sparsifier("static", nn.Sequential(nn.Linear(4, 4)), density=0.5, layer_types=(nn.LSTM,))


def test_conv1d_flops_and_erk_orientation():
    model = gpt2()
    flops = layer_flops(model, torch.zeros(1, 8, dtype=torch.long))
    assert flops.layers["transformer.h.0.attn.c_attn.weight"] == 2 * 8 * E * 3 * E
    assert flops.layers["transformer.h.1.mlp.c_proj.weight"] == 2 * 8 * 4 * E * E
    # ERK depends on sum(shape)/prod(shape): Conv1D's in×out gives the Linear (out×in) counts.
    shapes = [(E, 3 * E), (4 * E, E), (E, E)]
    assert granet.layer_counts("erk", shapes, 0.3) == granet.layer_counts("erk", [s[::-1] for s in shapes], 0.3)


def test_schedule_warnings_say_what_happens(caplog):
    once = PruningSchedule(1.0, 0.1, start=0, end=25, interval=1000)
    assert prune_steps(once) == [25]
    assert prune_steps(PruningSchedule(1.0, 0.1, start=0, end=25, interval=12)) == [12, 24, 25]
    regrow = DropFractionSchedule(0.5, 0.0, start=0, end=50, interval=1000)
    assert schedule_warnings(once, regrow, 50) == [
        "pruning happens once, at step 25 (update_interval=1000, pruning window 0..25): this is one-shot pruning; "
        "set update_interval <= 12 for gradual pruning",
        "no drop-and-regrow update happens in 50 steps (update_interval=1000, regrowth window 0..50); "
        "set update_interval <= 49 for at least one",
    ]
    gradual = PruningSchedule(1.0, 0.1, start=0, end=25, interval=12)
    assert schedule_warnings(gradual, DropFractionSchedule(0.5, 0.0, 0, 50, 12), 50) == []
    with caplog.at_level(logging.WARNING, logger="granet.sparsity.sparsifier"):
        granet.create_sparsifier("granet", nn.Sequential(nn.Linear(4, 4)), density=0.5, total_steps=50)
    assert "pruning happens once, at step 25" in caplog.text
    assert "never be updated" not in caplog.text


def test_multihead_attention_flops_attributed_to_its_weights():
    flops = layer_flops(AttnNet(), torch.zeros(1, 5, 16))
    assert flops.layers == {"attn.in_proj_weight": 2 * 5 * 16 * 48, "attn.out_proj.weight": 2 * 5 * 16 * 16,
                            "head.weight": 2 * 16 * 3}


def test_include_names_custom_parameters_and_report_round_trips_to_json():
    import json

    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.randn(6, 5))
            self.fc = nn.Linear(5, 2)

    model = Custom()
    default = select_parameters(model)
    assert [n for n, _ in default.selected] == ["fc.weight"]
    assert default.coverage().entries[0].reason == "not a layer weight (Custom)"
    chosen = select_parameters(model, include=["table", "fc.weight"])
    assert [n for n, _ in chosen.selected] == ["table", "fc.weight"]
    assert (chosen.candidates[0].kind, chosen.candidates[0].fan_in) == ("other", None)
    s = granet.create_sparsifier("static", model, density=0.5, include=["table"])
    report = granet.describe_sparsity(model, s)
    data = json.loads(json.dumps(report.to_dict()))
    assert (data["masked_params"], data["active_params"], data["total_params"]) == (30, 15, 30 + 10 + 2)
    assert [p["reason"] for p in data["parameters"]] == ["", "not matched by include", "1-D (bias / norm)"]
