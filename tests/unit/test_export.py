"""export.py: exact bit packing for every width, packed checkpoints that reload to the same logits and size."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qbert_hessian.allocate import AllocConfig, Budget, allocate_bits
from qbert_hessian.artifacts import BitPlan, BlockSensitivity, PackedManifest, SensitivityReport
from qbert_hessian.errors import QBHError
from qbert_hessian.export import file_sizes, fp32_safetensors_bytes, load_packed, save_packed
from qbert_hessian.models import BlockMap
from qbert_hessian.packed_format import pack_bits, unpack_bits
from qbert_hessian.quant.apply import calibrate_activations, quant_modules, quantize_model
from qbert_hessian.quant.modules import ActQuant
from qbert_hessian.quant.profile import measure_profile, profile_units
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


@pytest.mark.parametrize(
    ("symmetric", "range_method"), [(True, "max"), (False, "max"), (True, "mse"), (False, "mse")], ids=str
)
def test_packed_checkpoint_reloads_to_the_same_logits(tiny_checkpoint, tmp_path, symmetric, range_method):
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
    plan = BitPlan(model=dict(MODEL, hidden_size=16), blocks=blocks, symmetric=symmetric, range_method=range_method)
    q = quantize_model(model, plan)
    batch = random_batch(model.config.vocab_size, batch_size=4, seq_len=9)
    calibrate_activations(q, [batch])
    save_packed(q, tmp_path / "packed", plan=plan)
    reloaded = load_packed(tmp_path / "packed")
    assert torch.equal(_logits(reloaded, batch), _logits(q, batch))
    manifest = json.loads((tmp_path / "packed" / "quantization.json").read_text())
    entry = manifest["tensors"]["bert.encoder.layer.0.attention.self.query.weight"]
    assert (entry["bits"], entry["grid"], entry["block"]) == (2, [4, 1], "encoder.0.query")
    assert entry["range_method"] == manifest["plan"]["range_method"] == range_method
    assert PackedManifest.load(tmp_path / "packed" / "quantization.json").plan.range_method == range_method
    assert not (tmp_path / "packed.saving").exists()


@pytest.mark.parametrize("range_method", ["max", "mse"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_packed_size_matches_the_plan_prediction_to_the_byte(tiny_checkpoint, tmp_path, symmetric, range_method):
    """The allocator predicts the packed file from packed_format alone; export writes it: same bytes."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint).eval()
    bm = BlockMap(model)
    blocks = [BlockSensitivity(f"encoder.{i}", 1, [1.0 + i], 1.0 + i, 0.0, 1.0 + i, [3], [True], 0.0) for i in range(2)]
    report = SensitivityReport(
        model=dict(MODEL, hidden_size=16, name="tiny"), task="t", config={}, draws=[], blocks=blocks, pending=[]
    )
    groups = (1, "heads", 2, "channel")
    units = profile_units(bm, ["encoder.0", "encoder.1"])
    profile = measure_profile(
        model, units, groups=groups, bits=(2, 3, 4, 8), symmetric=symmetric, range_method=range_method
    )
    batch = random_batch(model.config.vocab_size, batch_size=4, seq_len=9)
    available = [g for g in groups if str(g) in profile.units["encoder.0"].groups]
    assert len(available) >= 2  # the tiny model's FFN (37 rows) takes no per-head or 2-row grouping
    # nearest rounding, as quantize_model alone applies it (the sizes are a rounding's either way)
    near = {"rounding": "nearest", "range_method": range_method}
    cases = [(Budget(avg_bits=3), AllocConfig(bits=(2, 3, 4), groups=g, **near)) for g in available]
    no_act = AllocConfig(bits=(2, 8), groups=1, embedding_bits=4, act_bits=None, **near)
    cases.append((Budget(avg_bits=5), no_act))
    for budget, config in cases:
        plan = allocate_bits(report, profile, budget, config)
        assert plan.range_method == profile.range_method == range_method
        q = quantize_model(model, plan)
        calibrate_activations(q, [batch])
        save_packed(q, tmp_path / "p", plan=plan)
        on_disk = file_sizes(tmp_path / "p")["weights_bytes"]
        assert on_disk == plan.predicted["bytes"], (config.groups, symmetric, range_method)
        # Q-BERT's Table 1 columns: the encoder's and the embedding table's packed bytes, read from the file.
        parts = _packed_part_bytes(tmp_path / "p" / "model.safetensors")
        for part in ("encoder", "embeddings"):
            assert plan.predicted[part]["bytes"] == parts[part], (part, config.groups, symmetric)
        assert plan.predicted["encoder"]["fp32_bytes"] == 4 * sum(
            m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and ".layer." in _name(model, m)
        )
        assert torch.equal(_logits(load_packed(tmp_path / "p"), batch), _logits(q, batch))


def _name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _packed_part_bytes(path) -> dict[str, int]:
    """Bytes of the quantized tensors (codes, scales, zeros, activation ranges) of the encoder layers and the
    word embeddings, from the safetensors header."""
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    out = {"encoder": 0, "embeddings": 0}
    for name, t in header.items():
        if name == "__metadata__" or not name.endswith((".codes", ".scale", ".zero", ".act.amax")):
            continue
        part = "encoder" if ".layer." in name else "embeddings"
        out[part] += t["data_offsets"][1] - t["data_offsets"][0]
    return out


def test_fp32_size_is_the_safetensors_file(tiny_checkpoint):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint).eval()
    assert fp32_safetensors_bytes(model) == (tiny_checkpoint / "model.safetensors").stat().st_size


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_quantize_and_export_from_a_model_on_cuda(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint).eval()
    plan = BitPlan(model={}, blocks={"encoder.0": {"bits": 3, "groups": 1}}, act_bits=8)
    batch = random_batch(model.config.vocab_size, batch_size=4, seq_len=9)
    q_cpu = quantize_model(model, plan)
    calibrate_activations(q_cpu, [batch])
    q_gpu = quantize_model(model.cuda(), plan)
    calibrate_activations(q_gpu, [{k: v.cuda() for k, v in batch.items()}])
    save_packed(q_cpu, tmp_path / "cpu", plan=plan)
    save_packed(q_gpu, tmp_path / "gpu", plan=plan)
    a, b = load_packed(tmp_path / "cpu"), load_packed(tmp_path / "gpu")
    assert torch.allclose(_logits(a, batch), _logits(b, batch), atol=1e-4)


def test_load_packed_refuses_a_mismatched_manifest(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint).eval()
    plan = BitPlan(model={}, blocks={"encoder.0": {"bits": 4, "groups": 1}}, act_bits=None)
    q = quantize_model(model, plan)
    save_packed(q, tmp_path / "p", plan=plan)
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
    plan = BitPlan(model={}, blocks={"encoder.0": {"bits": 4, "groups": 1}})
    with pytest.raises(QBHError, match="not quantized"):
        save_packed(model, tmp_path / "p", plan=plan)
    q = quantize_model(model, plan)
    with pytest.raises(QBHError, match="not calibrated"):
        save_packed(q, tmp_path / "p", plan=plan)
    calibrate_activations(q, [random_batch(model.config.vocab_size, batch_size=2, seq_len=5)])
    other = dataclasses.replace(plan, range_method="mse")  # the manifest would misdescribe the stored scales
    with pytest.raises(QBHError, match="quantized with max symmetric ranges, the plan says mse symmetric"):
        save_packed(q, tmp_path / "p", plan=other)
    assert not (tmp_path / "p").exists()
    save_packed(q, tmp_path / "p", plan=plan)
    assert PackedManifest.load(tmp_path / "p" / "quantization.json").plan == plan


def test_reload_keeps_the_attention_kernel_it_was_saved_with(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint, attn_implementation="eager").eval()
    plan = BitPlan(model={}, blocks={"encoder.1": {"bits": 3, "groups": 1}}, act_bits=None)
    q = quantize_model(model, plan)
    save_packed(q, tmp_path / "p", plan=plan)
    reloaded = load_packed(tmp_path / "p")
    assert reloaded.config._attn_implementation == "eager"
    batch = random_batch(model.config.vocab_size, batch_size=3, seq_len=5)
    assert torch.equal(_logits(reloaded, batch), _logits(q, batch))
    assert load_packed(tmp_path / "p", eager=False).config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", ["token", "qa"])
def test_packed_checkpoint_rebuilds_its_task_head(tiny_checkpoint, tmp_path, family):
    from qbert_hessian.models import load_model

    num_labels = 3 if family == "token" else 2
    model, _ = load_model(str(tiny_checkpoint), task_family=family, num_labels=num_labels, new_head=True)
    # the tiny checkpoint's architectures say sequence classification; the model in memory is the task's
    plan = BitPlan(model=dict(MODEL, hidden_size=16), blocks={"encoder.0": {"bits": 4, "groups": "channel"}})
    q = quantize_model(model, plan)
    batch = {k: v for k, v in random_batch(model.config.vocab_size, batch_size=3, seq_len=7).items() if k != "labels"}
    calibrate_activations(q, [batch])
    save_packed(q, tmp_path / "p", plan=plan)
    reloaded = load_packed(tmp_path / "p")
    assert type(reloaded) is type(model)  # BertForTokenClassification / BertForQuestionAnswering
    with torch.no_grad():
        a, b = q(**batch), reloaded(**batch)
    key = "logits" if family == "token" else "start_logits"
    assert torch.equal(a[key], b[key])


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("range_method", ["max", "mse"])
def test_low_bit_word_embeddings_pack_and_reload_exactly(tiny_checkpoint, tmp_path, bits, range_method):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint).eval()
    blocks = {"embeddings.word": {"bits": bits, "groups": "channel"}, "encoder.0": {"bits": 4, "groups": 1}}
    plan = BitPlan(model={}, blocks=blocks, range_method=range_method)
    q = quantize_model(model, plan)
    batch = random_batch(model.config.vocab_size, batch_size=4, seq_len=9)
    calibrate_activations(q, [batch])
    emb = q.bert.embeddings.word_embeddings
    table = emb.quantized()
    assert table.scale.numel() == model.config.vocab_size  # one scale per row
    assert all(len(torch.unique(row)) <= 2**bits for row in emb.qweight())
    save_packed(q, tmp_path / "p", plan=plan)
    reloaded = load_packed(tmp_path / "p")
    assert torch.equal(_logits(reloaded, batch), _logits(q, batch))
    assert torch.equal(reloaded.bert.embeddings.word_embeddings.weight, emb.qweight())
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "p" / "model.safetensors"))
    codes = stored["bert.embeddings.word_embeddings.weight.codes"]
    assert codes.numel() == math.ceil(emb.weight.numel() * bits / 8)  # bits per weight, packed
    assert stored["bert.embeddings.word_embeddings.weight.scale"].dtype == torch.float16


def test_allocator_accepts_two_bit_embeddings(tiny_checkpoint):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint).eval()
    bm = BlockMap(model)
    blocks = [BlockSensitivity(f"encoder.{i}", 1, [1.0 + i], 1.0 + i, 0.0, 1.0 + i, [3], [True], 0.0) for i in range(2)]
    units = profile_units(bm, ["encoder.0", "encoder.1"])
    report = SensitivityReport(
        model=dict(MODEL, hidden_size=16, name="tiny"), task="t", config={}, draws=[], blocks=blocks, pending=[]
    )
    profile = measure_profile(model, units, groups=(1, "channel"))
    plan = allocate_bits(report, profile, Budget(avg_bits=3), AllocConfig(bits=(2, 4), groups=1, embedding_bits=2))
    assert plan.blocks["embeddings.word"] == {"bits": 2, "groups": "channel"}
    assert quantize_model(model, plan).bert.embeddings.word_embeddings.quantized().bits == 2


@pytest.mark.parametrize("act_range", ["max", "percentile", "mse", "dynamic"])
def test_every_activation_range_reloads_bit_exactly_at_the_predicted_size(tiny_checkpoint, tmp_path, act_range):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint).eval()
    blocks = [BlockSensitivity(f"encoder.{i}", 1, [1.0 + i], 1.0 + i, 0.0, 1.0 + i, [3], [True], 0.0) for i in range(2)]
    report = SensitivityReport(
        model=dict(MODEL, hidden_size=16, name="tiny"), task="t", config={}, draws=[], blocks=blocks, pending=[]
    )
    profile = measure_profile(
        model, profile_units(BlockMap(model), ["encoder.0", "encoder.1"]), groups=(1, "channel"), bits=(2, 4)
    )
    config = AllocConfig(bits=(2, 4), groups=1, act_range=act_range, rounding="nearest")  # as quantize_model rounds
    plan = allocate_bits(report, profile, Budget(avg_bits=3), config)
    assert plan.act_range == act_range
    q = quantize_model(model, plan)
    batches = [random_batch(model.config.vocab_size, batch_size=4, seq_len=9, seed=s) for s in range(2)]
    if act_range != "dynamic":
        calibrate_activations(q, batches)
    save_packed(q, tmp_path / "p", plan=plan)
    assert file_sizes(tmp_path / "p")["weights_bytes"] == plan.predicted["bytes"]  # dynamic: no stored ranges
    manifest = json.loads((tmp_path / "p" / "quantization.json").read_text())
    assert manifest["plan"]["act_range"] == act_range
    reloaded = load_packed(tmp_path / "p")
    acts = [m for m in reloaded.modules() if isinstance(m, ActQuant)]
    assert acts and all(a.range_method == act_range for a in acts)
    for b in batches:
        assert torch.equal(_logits(reloaded, b), _logits(q, b))
    # the plan must say how the model's ranges were set
    other = "max" if act_range != "max" else "mse"
    with pytest.raises(QBHError, match=f"input range was set by {act_range}, the plan says {other}"):
        save_packed(q, tmp_path / "p2", plan=dataclasses.replace(plan, act_range=other))
    assert not (tmp_path / "p2").exists()


def test_a_default_plan_rounds_by_gptq_and_is_saved_only_once_rounded(tiny_checkpoint, tiny_data, tmp_path):
    """The default plan says gptq: quantize_model alone (nearest codes) is refused at save time with the fix and
    nothing written; quantize_calibrated (GPTQ on the task's training data) saves, and the file reloads exactly."""
    from qbert_hessian.models import load_model
    from qbert_hessian.quant.apply import calibration_batches, quantize_calibrated
    from qbert_hessian.tasks import load_task

    model, tok = load_model(str(tiny_checkpoint))
    task = load_task("sst2", tok, data_dir=tiny_data, max_length=16)
    blocks = [BlockSensitivity(f"encoder.{i}", 1, [1.0 + i], 1.0 + i, 0.0, 1.0 + i, [3], [True], 0.0) for i in range(2)]
    report = SensitivityReport(
        model=dict(MODEL, hidden_size=16, name="tiny"), task="t", config={}, draws=[], blocks=blocks, pending=[]
    )
    profile = measure_profile(
        model, profile_units(BlockMap(model), ["encoder.0", "encoder.1"]), groups=(1, "channel"), bits=(2, 4)
    )
    plan = allocate_bits(report, profile, Budget(avg_bits=3), AllocConfig(bits=(2, 4), groups=1, calib_samples=16))
    assert plan.rounding == "gptq" and plan.gptq_config.calib_samples == 16
    nearest = quantize_model(model, plan)  # what the quick start did before the default moved
    calibrate_activations(nearest, calibration_batches(task, 2, 8))
    with pytest.raises(QBHError, match="rounded to nearest, the plan says gptq; apply the plan with quantize_calibrat"):
        save_packed(nearest, tmp_path / "p", plan=plan)
    assert not (tmp_path / "p").exists()
    q = quantize_calibrated(model, plan, task, num_batches=2, batch_size=8)
    assert {m.rounding for _, m in quant_modules(q) if m.kind != "embedding"} == {"gptq"}
    save_packed(q, tmp_path / "p", plan=plan)
    batch = task.batch("dev", list(range(8)))
    assert torch.equal(_logits(load_packed(tmp_path / "p"), batch), _logits(q, batch))


def test_a_manifest_written_before_activation_ranges_reads_as_max(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint).eval()
    plan = BitPlan(model=dict(MODEL, hidden_size=16), blocks={"encoder.0": {"bits": 4, "groups": 1}})
    q = quantize_model(model, plan)
    batch = random_batch(model.config.vocab_size, batch_size=4, seq_len=9)
    calibrate_activations(q, [batch])
    save_packed(q, tmp_path / "p", plan=plan)
    path = tmp_path / "p" / "quantization.json"
    manifest = json.loads(path.read_text())
    del manifest["plan"]["act_range"]  # as written before the setting existed (the checksum covers the weights)
    path.write_text(json.dumps(manifest))
    reloaded = load_packed(tmp_path / "p")
    assert reloaded.bert.encoder.layer[0].output.dense.act.range_method == "max"
    assert torch.equal(_logits(reloaded, batch), _logits(q, batch))
