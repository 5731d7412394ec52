"""quant/modules.py and quant/apply.py on the tiny random BERT: module swap, exactness, calibration, STE."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qbert_hessian.artifacts import BitPlan, QuantProfile
from qbert_hessian.errors import QBHError
from qbert_hessian.models import BlockMap
from qbert_hessian.quant.apply import (
    calibrate_activations,
    plan_targets,
    quant_modules,
    quantize_model,
)
from qbert_hessian.quant.functional import group_layout, quant_error
from qbert_hessian.quant.modules import QuantEmbedding, QuantLinear
from qbert_hessian.quant.profile import measure_profile, profile_units
from tests.helpers import random_batch

MODEL = {"num_layers": 2, "num_heads": 4, "hidden_size": 32}


def plan(blocks, **kw) -> BitPlan:
    return BitPlan(model=dict(MODEL), blocks=blocks, **kw)


def logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.fixture
def batch(tiny_bert):
    return random_batch(tiny_bert.config.vocab_size, batch_size=4, seq_len=6)


def test_empty_plan_is_the_identity(tiny_bert, batch):
    q = quantize_model(tiny_bert, plan({}))
    assert not list(quant_modules(q))
    assert torch.equal(logits(q, batch), logits(tiny_bert, batch))


def test_plan_swaps_the_named_modules_and_never_the_head(tiny_bert):
    blocks = {
        "encoder.0": {"bits": 4, "groups": 1},
        "encoder.0.query": {"bits": 2, "groups": "heads"},
        "embeddings.word": {"bits": 8, "groups": "channel"},
    }
    q = quantize_model(tiny_bert, plan(blocks))
    mods = dict(quant_modules(q))
    layer0 = "bert.encoder.layer.0"
    assert set(mods) == {
        "bert.embeddings.word_embeddings",
        *(
            f"{layer0}.{p}"
            for p in (
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
                "attention.output.dense",
                "intermediate.dense",
                "output.dense",
            )
        ),
    }
    query = mods[f"{layer0}.attention.self.query"]
    assert isinstance(query, QuantLinear) and isinstance(query, nn.Linear)
    assert (query.spec.bits, query.grid) == (2, (4, 1))  # the finer block overrides its layer
    assert mods[f"{layer0}.attention.output.dense"].grid == (1, 1)
    assert isinstance(mods["bert.embeddings.word_embeddings"], QuantEmbedding)
    assert type(q.classifier) is nn.Linear and type(q.bert.pooler.dense) is nn.Linear
    assert type(tiny_bert.bert.encoder.layer[0].attention.self.query) is nn.Linear  # the original is untouched


def test_eight_bit_plan_stays_close_and_two_bit_moves_more(tiny_bert, batch):
    ref = logits(tiny_bert, batch)
    every = {f"encoder.{i}": {"bits": 8, "groups": "channel"} for i in range(2)}
    q8 = quantize_model(tiny_bert, plan(every, act_bits=None))
    q2 = quantize_model(tiny_bert, plan({k: {"bits": 2, "groups": 1} for k in every}, act_bits=None))
    d8, d2 = (logits(q8, batch) - ref).abs().max(), (logits(q2, batch) - ref).abs().max()
    assert 0 < d8 < 1e-2 * ref.abs().max()
    assert d2 > 10 * d8


def test_fake_quant_forward_uses_exactly_the_dequantized_codes(tiny_bert):
    q = quantize_model(tiny_bert, plan({"encoder.1": {"bits": 3, "groups": "channel"}}, act_bits=None))
    lin = q.bert.encoder.layer[1].attention.self.value
    x = torch.randn(5, 32)
    expected = x @ lin.quantized().dequantize().T + lin.bias
    assert torch.allclose(lin(x), expected, atol=1e-6)


def test_unknown_block_and_foreign_plan_and_bad_grouping_are_refused(tiny_bert):
    with pytest.raises(QBHError, match=r"block 'encoder\.7' does not exist; this model has encoder.0..encoder.1"):
        plan_targets(tiny_bert, plan({"encoder.7": {"bits": 4}}))
    with pytest.raises(QBHError, match="plan was made for another model"):
        plan_targets(tiny_bert, BitPlan(model={"num_layers": 12}, blocks={"encoder.0": {"bits": 4}}))
    with pytest.raises(QBHError, match=r"encoder\.1\.ffn_in: groups=heads do not divide its 37x32"):
        quantize_model(tiny_bert, plan({"encoder.1": {"bits": 4, "groups": "heads"}}))


def test_activations_need_calibration_and_calibration_sets_ranges(tiny_bert, batch):
    q = quantize_model(tiny_bert, plan({"encoder.0": {"bits": 8, "groups": 1}}, act_range="max"))  # static ranges
    with pytest.raises(QBHError, match="not calibrated"):
        logits(q, batch)
    assert calibrate_activations(q, [batch]) == 1
    act = q.bert.encoder.layer[0].intermediate.dense.act
    assert act.calibrated and act.amax > 0
    assert not q.training
    out = logits(q, batch)
    assert torch.allclose(out, logits(tiny_bert, batch), atol=0.05)


def test_straight_through_gradients_reach_the_master_weights(tiny_bert, batch):
    q = quantize_model(tiny_bert, plan({"encoder.0": {"bits": 2, "groups": 1}}))
    calibrate_activations(q, [batch])
    q.train()
    q.zero_grad()
    q(**batch).loss.backward()
    w = q.bert.encoder.layer[0].output.dense.weight
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert isinstance(w, nn.Parameter) and w.dtype == torch.float32


@pytest.mark.parametrize("range_method", ["max", "mse"])
def test_quant_profile_matches_direct_computation(tiny_bert, range_method):
    bm = BlockMap(tiny_bert)
    units = profile_units(bm, ["embeddings", "encoder.0", "encoder.1"])
    assert units == ["encoder.0", "encoder.1", "embeddings.word", "embeddings.position", "embeddings.token_type"]
    prof = measure_profile(tiny_bert, units, bits=(2, 4), groups=(1, "heads", "channel"), range_method=range_method)
    assert prof.range_method == range_method
    enc = prof.units["encoder.1"]
    assert "heads" in enc.unavailable  # intermediate 37 rows do not split into 4 heads
    assert enc.num_weights == 4 * 32 * 32 + 2 * 37 * 32
    assert enc.groups["channel"].num_scales == 4 * 32 + 37 + 32
    layer = tiny_bert.bert.encoder.layer[1]
    mats = [
        (layer.attention.self.query, "qkv"),
        (layer.attention.self.key, "qkv"),
        (layer.attention.self.value, "qkv"),
        (layer.attention.output.dense, "attn_out"),
        (layer.intermediate.dense, "ffn"),
        (layer.output.dense, "ffn"),
    ]
    expected = sum(
        quant_error(m.weight, 2, group_layout(tuple(m.weight.shape), 1, kind=k, num_heads=4), True, range_method)
        for m, k in mats
    )
    assert enc.groups["1"].error["2"] == pytest.approx(expected, rel=1e-6)
    assert enc.groups["1"].error["4"] < enc.groups["1"].error["2"]
    assert QuantProfile.from_dict(prof.to_dict()) == prof
    assert prof.state_bytes == sum(
        t.numel() * 4 for t in tiny_bert.state_dict().values() if t.is_floating_point()
    ) + sum(t.numel() * t.element_size() for t in tiny_bert.state_dict().values() if not t.is_floating_point())
