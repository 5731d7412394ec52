"""export.py: exact bit packing for every width, packed checkpoints that reload to the same logits and size."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qbert_hessian.allocate import AllocConfig, Budget, allocate_bits
from qbert_hessian.artifacts import BitPlan, BlockSensitivity, SensitivityReport
from qbert_hessian.errors import QBHError
from qbert_hessian.export import file_sizes, load_packed, pack_bits, save_packed, unpack_bits
from qbert_hessian.models import BlockMap
from qbert_hessian.quant.apply import calibrate_activations, profile_units, quant_profile, quantize_model
from tests.helpers import random_batch

MODEL = {"num_layers": 2, "num_heads": 4, "hidden_size": 32}


@settings(max_examples=80, deadline=None)
@given(st.integers(2, 8), st.integers(0, 101), st.integers(0, 2**16))
def test_pack_unpack_is_exact_for_every_width_and_length(bits, n, seed):
    values = np.random.default_rng(seed).integers(0, 2**bits, size=n, dtype=np.uint8)
    packed = pack_bits(values, bits)
    assert packed.dtype == np.uint8 and packed.size == math.ceil(n * bits / 8)
    assert np.array_equal(unpack_bits(packed, bits, n), values)


def test_pack_bits_layout_is_little_endian():
    assert pack_bits(np.array([1, 2, 3, 0], dtype=np.uint8), 2).tolist() == [0b00111001]
    assert pack_bits(np.array([5, 7, 6], dtype=np.uint8), 3).tolist() == [0b10111101, 0b00000001]
    with pytest.raises(ValueError, match="does not fit"):
        pack_bits(np.array([4], dtype=np.uint8), 2)


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_packed_checkpoint_reloads_to_the_same_logits(tiny_checkpoint, tmp_path, symmetric):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint).eval()
    blocks = {
        "embeddings.word": {"bits": 6, "groups": "channel"},
        "embeddings.position": {"bits": 8, "groups": 1},
        "encoder.0": {"bits": 3, "groups": "channel"},
        "encoder.0.query": {"bits": 2, "groups": "heads"},
        "encoder.1": {"bits": 5, "groups": 1},
        "encoder.1.attn_out": {"bits": 7, "groups": "heads"},
    }
    plan = BitPlan(model=dict(MODEL, hidden_size=16), blocks=blocks, symmetric=symmetric)
    q = quantize_model(model, plan)
    batch = random_batch(model.config.vocab_size, batch_size=4, seq_len=9)
    calibrate_activations(q, [batch])
    save_packed(q, tmp_path / "packed")
    reloaded = load_packed(tmp_path / "packed")
    assert torch.equal(_logits(reloaded, batch), _logits(q, batch))
    manifest = json.loads((tmp_path / "packed" / "quantization.json").read_text())
    entry = manifest["tensors"]["bert.encoder.layer.0.attention.self.query.weight"]
    assert (entry["bits"], entry["grid"], entry["block"]) == (2, [4, 1], "encoder.0.query")
    assert not (tmp_path / "packed.saving").exists()


def test_packed_size_matches_the_plan_prediction(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint).eval()
    bm = BlockMap(model)
    blocks = [BlockSensitivity(f"encoder.{i}", 1, [1.0 + i], 1.0 + i, 0.0, 1.0 + i, [3], [True], 0.0) for i in range(2)]
    report = SensitivityReport(
        model=dict(MODEL, hidden_size=16, name="tiny"),
        task="t",
        config={},
        draws=[],
        blocks=blocks,
        pending=[],
        quantization=quant_profile(model, profile_units(bm, ["encoder.0", "encoder.1"]), groups=(1, "channel")),
    )
    batch = random_batch(model.config.vocab_size, batch_size=4, seq_len=9)
    for budget, config in [
        (Budget(avg_bits=3), AllocConfig(bits=(2, 3, 4), groups="channel")),
        (Budget(avg_bits=5), AllocConfig(bits=(2, 8), groups=1, embedding_bits=4, act_bits=None)),
    ]:
        plan = allocate_bits(report, budget, config)
        q = quantize_model(model, plan)
        calibrate_activations(q, [batch])
        save_packed(q, tmp_path / "p")
        on_disk = file_sizes(tmp_path / "p")["weights_bytes"]
        assert on_disk == pytest.approx(plan.predicted["bytes"], rel=0.01)


def test_load_packed_refuses_a_mismatched_manifest(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint).eval()
    q = quantize_model(model, BitPlan(model={}, blocks={"encoder.0": {"bits": 4, "groups": 1}}, act_bits=None))
    save_packed(q, tmp_path / "p")
    manifest_path = tmp_path / "p" / "quantization.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["plan"]["blocks"]["encoder.1"] = {"bits": 4, "groups": 1}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(QBHError, match="does not match its model: .*encoder.layer.1.* missing from the checkpoint"):
        load_packed(tmp_path / "p")
    with pytest.raises(QBHError, match="not a packed checkpoint"):
        load_packed(tiny_checkpoint)


def test_save_packed_needs_a_quantized_calibrated_model(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint).eval()
    with pytest.raises(QBHError, match="not quantized"):
        save_packed(model, tmp_path / "p")
    q = quantize_model(model, BitPlan(model={}, blocks={"encoder.0": {"bits": 4, "groups": 1}}))
    with pytest.raises(QBHError, match="not calibrated"):
        save_packed(q, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_reload_keeps_the_attention_kernel_it_was_saved_with(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint, attn_implementation="eager").eval()
    q = quantize_model(model, BitPlan(model={}, blocks={"encoder.1": {"bits": 3, "groups": 1}}, act_bits=None))
    save_packed(q, tmp_path / "p")
    reloaded = load_packed(tmp_path / "p")
    assert reloaded.config._attn_implementation == "eager"
    batch = random_batch(model.config.vocab_size, batch_size=3, seq_len=5)
    assert torch.equal(_logits(reloaded, batch), _logits(q, batch))
    assert load_packed(tmp_path / "p", eager=False).config._attn_implementation == "sdpa"
