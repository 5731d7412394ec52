"""qat.py: the distillation loss, the config's checks, and QAT lowering the loss of a 2-bit tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from qbert_hessian.artifacts import BitPlan
from qbert_hessian.errors import QBHError
from qbert_hessian.evaluate import evaluate
from qbert_hessian.qat import QATConfig, distillation_loss, train_qat
from qbert_hessian.quant.apply import calibrate_activations, calibration_batches, quantize_model
from qbert_hessian.quant.modules import QuantLinear


def test_distillation_loss_limits():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    y = torch.tensor([0, 1, 2, 1, 0])
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.allclose(distillation_loss(s, t, y, temperature=2.0, alpha=0.0), ce)
    assert float(distillation_loss(s, s, y, temperature=3.0, alpha=1.0)) == pytest.approx(0.0, abs=1e-6)
    # KL by hand: T^2 * mean over the batch of sum_c p_t (log p_t - log p_s)
    T = 2.0
    pt, ls = torch.softmax(t / T, -1), torch.log_softmax(s / T, -1)
    kl = (pt * (torch.log(pt) - ls)).sum(-1).mean() * T**2
    assert torch.allclose(distillation_loss(s, t, y, temperature=T, alpha=1.0), kl, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 1.5}, "alpha must lie"),
        ({"quant_noise": 1.0}, "quant_noise must lie"),
        ({"lr": 0}, "lr must be a positive number"),
        ({"eval_steps": -1}, "eval_steps"),
    ],
)
def test_qat_config_refuses_bad_values(kwargs, message):
    with pytest.raises(QBHError, match=message):
        QATConfig(**kwargs)


@pytest.fixture(scope="module")
def tiny_task(tiny_checkpoint, tiny_data):
    from qbert_hessian.models import load_model
    from qbert_hessian.tasks import load_raw_task, tokenize_task

    model, tok = load_model(str(tiny_checkpoint), num_labels=2)
    return model, tokenize_task(load_raw_task("sst2", data_dir=tiny_data), tok, max_length=16)


def test_qat_lowers_the_loss_of_a_two_bit_model(tiny_task, tmp_path):
    model, task = tiny_task
    plan = BitPlan(model={}, blocks={f"encoder.{i}": {"bits": 2, "groups": "channel"} for i in range(2)})
    q = quantize_model(model, plan)
    calibrate_activations(q, calibration_batches(task, 2, 16))
    before = evaluate(q, task, split="train")["loss"]
    master = q.bert.encoder.layer[0].intermediate.dense.weight.detach().clone()
    amax = float(q.bert.encoder.layer[0].intermediate.dense.act.amax)
    cfg = QATConfig(epochs=8, lr=3e-3, batch_size=16, warmup_ratio=0.0, distill=True, alpha=0.3, quant_noise=0.25)
    result = train_qat(q, task, cfg, work_dir=tmp_path / "w", teacher=model, progress=False)
    after = evaluate(q, task, split="train")["loss"]
    assert after < before - 0.01, (before, after)
    layer = q.bert.encoder.layer[0].intermediate.dense
    assert isinstance(layer, QuantLinear) and not torch.equal(layer.weight, master)  # master weights trained
    assert float(layer.act.amax) != amax  # EMA ranges follow the training activations
    assert layer.noise == 0.0 and not q.training
    assert result["steps"] == 8 * math.ceil(96 / 16) and not (tmp_path / "w").exists()
    assert all(p.requires_grad for p in model.parameters())  # the teacher is left as it was


def test_qat_needs_a_quantized_model_and_a_teacher_for_distillation(tiny_task, tmp_path):
    model, task = tiny_task
    with pytest.raises(QBHError, match="no quantized modules"):
        train_qat(model, task, QATConfig(), work_dir=tmp_path)
    q = quantize_model(model, BitPlan(model={}, blocks={"encoder.0": {"bits": 4, "groups": 1}}, act_bits=None))
    with pytest.raises(QBHError, match="teacher"):
        train_qat(q, task, QATConfig(distill=True), work_dir=tmp_path)
