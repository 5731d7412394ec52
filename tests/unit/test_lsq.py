"""Learned step sizes (LSQ): the forward equals the exported quantization bit for bit, the gradients are LSQ's,
and a model trained with learned steps reloads from its packed checkpoint to identical logits."""

from __future__ import annotations

import math

import pytest
import torch

from qbert_hessian.artifacts import BitPlan, PackedManifest
from qbert_hessian.export import file_sizes, load_packed, save_packed
from qbert_hessian.packed_format import QuantizedWeight, TensorSpec, file_bytes, packed_specs
from qbert_hessian.quant.apply import calibrate_activations, quant_modules, quantize_model
from qbert_hessian.quant.functional import fake_quantize_learned, quantize, quantize_with, to_groups
from qbert_hessian.quant.modules import SCALE_PARAM, QuantLinear
from qbert_hessian.quant.profile import state_tensors
from qbert_hessian.quant.ranges import code_range, lsq_grad_scale
from tests.helpers import random_batch


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_learned_forward_equals_quantize_with_and_gradients_are_lsq(symmetric):
    gen = torch.Generator().manual_seed(0)
    bits, grid = 3, (4, 1)
    w0 = torch.randn(8, 6, generator=gen)
    init = quantize(w0, bits, grid, symmetric, "mse")
    # An off-fp16 step: the forward must use its fp16 rounding, as the export does.
    scale = (init.scale * 0.9137).requires_grad_()
    zero = None if init.zero is None else init.zero.float()
    w = w0.clone().requires_grad_()
    g = lsq_grad_scale(12, bits, symmetric)
    out = fake_quantize_learned(w, scale, zero, bits, grid, g)
    ref = quantize_with(w0, scale.detach(), zero, bits, grid)
    assert torch.equal(out.detach(), ref.dequantize())
    upstream = torch.randn(8, 6, generator=gen)
    (out * upstream).sum().backward()
    # LSQ by hand (Esser et al. 2020, Eq. 3), with v = w / s (+ z) in the fp16 step s:
    qmin, qmax = code_range(bits, symmetric)
    s = ref.scale[:, None]
    v = to_groups(w0, grid) / s + (0 if zero is None else zero[:, None])
    inside = (v >= qmin) & (v <= qmax)
    z = 0 if zero is None else zero[:, None]
    d_s = torch.where(inside, torch.round(to_groups(w0, grid) / s) - to_groups(w0, grid) / s, v.clamp(qmin, qmax) - z)
    up = to_groups(upstream, grid)
    assert torch.allclose(scale.grad, g * (d_s * up).sum(dim=1), rtol=1e-4, atol=1e-6)
    assert torch.allclose(to_groups(w.grad, grid), torch.where(inside, up, torch.zeros_like(up)), rtol=1e-6, atol=0)
    assert bool((~inside).any()) and bool(inside.any())  # both branches were exercised


def test_lsq_grad_scale_is_one_over_sqrt_of_group_size_times_qmax():
    assert lsq_grad_scale(96, 2, True) == pytest.approx(1 / math.sqrt(96 * 1))
    assert lsq_grad_scale(96, 4, False) == pytest.approx(1 / math.sqrt(96 * 15))


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.mark.parametrize(
    ("symmetric", "range_method"), [(True, "mse"), (False, "mse"), (True, "max")], ids=["sym-mse", "asym-mse", "max"]
)
def test_lsq_trained_model_reloads_bit_exactly(tiny_checkpoint, tmp_path, symmetric, range_method):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint).eval()
    blocks = {"encoder.0": {"bits": 2, "groups": "channel"}, "encoder.1": {"bits": 3, "groups": 1}}
    blocks["encoder.0.query"] = {"bits": 2, "groups": "heads"}
    blocks["embeddings.word"] = {"bits": 4, "groups": "channel"}
    plan = BitPlan(model={}, blocks=blocks, symmetric=symmetric, range_method=range_method)
    q = quantize_model(model, plan)
    batch = random_batch(model.config.vocab_size, batch_size=4, seq_len=9)
    calibrate_activations(q, [batch])
    layer = q.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer, QuantLinear)
    before = _logits(q, batch)
    for _, m in quant_modules(q):
        m.learn_scales()
    assert torch.equal(_logits(q, batch), before)  # the learned steps start at the plan's range exactly
    start = layer.weight_scale.detach().clone()
    opt = torch.optim.SGD(q.parameters(), lr=0.05)
    q.train()
    for _ in range(3):
        opt.zero_grad()
        q(**batch).loss.backward()
        assert layer.weight_scale.grad is not None and float(layer.weight_scale.grad.abs().sum()) > 0
        opt.step()
    q.eval()
    assert not torch.equal(layer.weight_scale.detach(), start)
    assert not torch.equal(layer.weight_scale.detach().half().float(), layer.weight_scale.detach())  # not fp16 now
    assert f"bert.encoder.layer.0.attention.self.query.{SCALE_PARAM}" in q.state_dict()  # a trained parameter
    save_packed(q, tmp_path / "packed", plan=plan)
    reloaded = load_packed(tmp_path / "packed")
    assert torch.equal(_logits(reloaded, batch), _logits(q, batch))
    # The learned steps are stored once, as each weight's fp16 scale: no parameter leaks into the file, whose
    # size is what packed_format predicts from the FP32 model and the plan alone.
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "packed" / "model.safetensors"))
    assert not [k for k in stored if k.endswith(SCALE_PARAM)]
    assert torch.equal(
        stored["bert.encoder.layer.0.attention.self.query.weight.scale"].float(), layer.quantized().scale
    )
    quantized = {
        f"{p}.weight": QuantizedWeight(m.spec.bits, m.weight.numel(), m.quantized().scale.numel(), symmetric)
        for p, m in quant_modules(q)
    }
    acts = [f"{p}.weight" for p, m in quant_modules(q) if isinstance(m, QuantLinear) and m.act is not None]
    fp32 = [TensorSpec(n, d, tuple(s)) for n, d, s in state_tensors(model)]
    assert file_sizes(tmp_path / "packed")["weights_bytes"] == file_bytes(packed_specs(fp32, quantized, acts))
    entries = PackedManifest.load(tmp_path / "packed" / "quantization.json").tensors
    assert all(e["learned_scale"] and e["range_method"] == range_method for e in entries.values())
    for _, m in quant_modules(q):  # the training forward (the LSQ STE path, with grad) equals evaluation
        m.training = True  # the weight path only: activation ranges stay fixed
    train_logits = q(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert train_logits.requires_grad
    for _, m in quant_modules(q):
        m.training = False
    assert torch.equal(train_logits.detach(), _logits(q, batch))
