"""Activation ranges (quant/ranges.py, quant/modules.ActQuant, quant/apply.calibrate_activations) on the tiny random
BERT: percentile and MSE ranges against plain numpy on the very inputs each site saw, per-token dynamic fake
quantization against a plain loop, and the EMA of max|x| unchanged."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qbert_hessian.artifacts import BitPlan
from qbert_hessian.config import AllocConfig, PlanSpec
from qbert_hessian.errors import QBHError
from qbert_hessian.quant.apply import calibrate_activations, quant_modules, quantize_model
from qbert_hessian.quant.functional import fake_quantize_activation, fake_quantize_activation_dynamic
from qbert_hessian.quant.modules import ActQuant
from qbert_hessian.quant.ranges import ACT_PERCENTILE, activation_errors, clip_ratios, mse_amax, percentile_amax
from tests.helpers import random_batch

MODEL = {"num_layers": 2, "num_heads": 4, "hidden_size": 32}
BLOCKS = {"encoder.0": {"bits": 8, "groups": 1}, "encoder.1": {"bits": 4, "groups": 1}}


def plan(act_range: str, **kw) -> BitPlan:
    return BitPlan(model=dict(MODEL), blocks=dict(BLOCKS), act_range=act_range, **kw)


def batches(tiny_bert, n: int = 2) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        b = random_batch(tiny_bert.config.vocab_size, batch_size=3, seq_len=5, seed=i)
        out.append({k: v for k, v in b.items() if k != "labels"})
    return out


def np_percentile(values: np.ndarray) -> float:
    return float(np.percentile(values, ACT_PERCENTILE, method="inverted_cdf"))


def np_mse_amax(values: np.ndarray, peak: float, bits: int = 8) -> float:
    """Plain numpy: every clipping ratio tried in turn, the first of the least errors kept."""
    qmax = 2 ** (bits - 1) - 1
    v = values.astype(np.float32)
    best, best_err = None, math.inf
    for r in clip_ratios().numpy():
        amax = np.float32(r) * np.float32(peak)
        s = np.float32(max(amax, np.float32(1e-8)) / np.float32(qmax))
        q = np.clip(np.round(v / s), -qmax, qmax).astype(np.float32) * s
        err = float(((q - v).astype(np.float64) ** 2).sum())
        if err < best_err:
            best, best_err = amax, err
    return float(best)


def site_inputs(model, batch_list) -> dict[str, np.ndarray]:
    """|x| at every quantized linear's input over the batches, recorded by hooks (FP32 activations upstream)."""
    seen: dict[str, list[np.ndarray]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, []).append(args[0].abs()))
        for name, m in quant_modules(model)
    ]
    try:
        with torch.no_grad():
            for b in batch_list:
                model(**b)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat([t.flatten() for t in v]).numpy() for k, v in seen.items()}


@pytest.mark.parametrize("act_range", ["percentile", "mse"])
def test_static_ranges_equal_numpy_on_the_inputs_each_site_saw(tiny_bert, act_range):
    q = quantize_model(tiny_bert, plan(act_range))
    data = batches(tiny_bert)
    calibrate_activations(q, data)
    # the sites' inputs with every range switched off (what calibration saw: weights quantized, activations FP32)
    ref = quantize_model(tiny_bert, plan("max", act_bits=None))
    values = site_inputs(ref, data)
    assert len(values) == 12  # 6 linears in each of 2 layers
    for name, m in quant_modules(q):
        v = values[name]
        assert v.size < 2**18  # every value kept: no sampling on the tiny model
        want = np_percentile(v) if act_range == "percentile" else np_mse_amax(v, float(v.max()))
        assert float(m.act.amax) == pytest.approx(want, rel=1e-6), name


def test_mse_range_never_has_more_error_than_the_peak_and_ties_keep_the_larger():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=g).abs()
    x[:3] = torch.tensor([40.0, 35.0, 30.0])  # outliers, as BERT's channels have
    peak = x.max()
    amax = mse_amax(x, peak, 8)
    err = activation_errors(x, torch.stack([amax, peak]), 8)
    assert amax < peak and err[0] < err[1]
    const = torch.full((100,), 2.0)  # r = 1 quantizes it exactly: no smaller range does as well
    assert float(mse_amax(const, torch.tensor(2.0), 8)) == 2.0


def test_percentile_matches_numpy_inverted_cdf():
    g = torch.Generator().manual_seed(1)
    for n in (1, 7, 12345, 100003):
        x = torch.rand(n, generator=g) * 3
        assert float(percentile_amax(x)) == np_percentile(x.numpy())


def test_sampling_keeps_at_most_the_budget_and_is_seeded(tiny_bert):
    act = ActQuant(8, range_method="percentile")
    x = torch.randn(4, 50, 30)
    ranges = []
    for _ in range(2):
        act.begin_sampling(per_batch=1000, seed=[3, 1])
        act(x)
        assert sum(t.numel() for t in act._sample) == 1000
        act.end_sampling()
        ranges.append(float(act.amax))
    assert ranges[0] == ranges[1] and 0 < ranges[0] <= float(x.abs().max())


def test_dynamic_per_token_equals_a_plain_loop():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 16, generator=g) * torch.linspace(0.1, 20, 16)  # one outlier channel
    x[1, 3] = 0.0  # a zero row: scale eps, quantizes to 0
    out = fake_quantize_activation_dynamic(x, 8)
    ref = torch.empty_like(x)
    for idx in np.ndindex(*x.shape[:-1]):
        row = x[idx]
        s = row.abs().max() / 127.5
        s = s if s > 0 else torch.tensor(torch.finfo(torch.float32).eps)
        ref[idx] = torch.clamp(torch.round(row / s), -128, 127) * s
    assert torch.equal(out, ref)
    assert torch.equal(out[1, 3], torch.zeros(16))
    # each token's own range: a token of small values keeps its precision, a static range would not
    static = fake_quantize_activation(x, x.abs().max(), 8)
    assert (out - x).abs()[0, 0].max() < (static - x).abs()[0, 0].max()
    # the straight-through gradient is the identity
    xg = x.clone().requires_grad_(True)
    fake_quantize_activation_dynamic(xg, 8).sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(x))


def test_dynamic_model_needs_no_calibration_and_stores_no_range(tiny_bert):
    q = quantize_model(tiny_bert, plan("dynamic"))
    b = batches(tiny_bert, 1)[0]
    with torch.no_grad():
        out = q(**b).logits
    assert torch.isfinite(out).all()
    assert not any(k.endswith("act.amax") for k in q.state_dict())
    # QAT's forward: gradients reach the master weights
    q.train()
    q(**random_batch(tiny_bert.config.vocab_size, batch_size=3, seq_len=5)).loss.backward()
    assert q.bert.encoder.layer[0].output.dense.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("act_range", ["percentile", "mse"])
def test_static_ranges_hold_in_training_and_need_calibration(tiny_bert, act_range):
    q = quantize_model(tiny_bert, plan(act_range))
    b = random_batch(tiny_bert.config.vocab_size, batch_size=3, seq_len=5)
    q.train()
    with pytest.raises(QBHError, match="not calibrated"):
        q(**b)
    calibrate_activations(q, batches(tiny_bert))
    before = {n: m.act.amax.clone() for n, m in quant_modules(q)}
    q.train()
    q(**b).loss.backward()  # STE through the held range
    assert all(torch.equal(m.act.amax, before[n]) for n, m in quant_modules(q))
    assert q.bert.encoder.layer[1].output.dense.weight.grad.abs().sum() > 0


def test_max_is_still_the_ema_of_max(tiny_bert):
    q = quantize_model(tiny_bert, plan("max"))
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, args, name=name: seen.setdefault(name, []).append(args[0].abs().amax().float())
        )
        for name, m in quant_modules(q)
    ]
    calibrate_activations(q, batches(tiny_bert, 3))
    for h in hooks:
        h.remove()
    for name, m in quant_modules(q):
        first, *rest = seen[name]
        ema = first.clone()
        for v in rest:
            ema.mul_(0.9).add_((1 - 0.9) * v)
        assert torch.equal(m.act.amax, ema), name


def test_settings_are_checked_new_plans_are_dynamic_and_old_records_read_max():
    from qbert_hessian.run_config import recorded_plans

    assert AllocConfig().act_range == "dynamic"  # the default: per-token ranges at run time
    assert AllocConfig().protocol()["act_range"] == "dynamic"  # recorded, so no folder made with max passes for it
    assert PlanSpec("p", uniform=8).alloc_config(AllocConfig()).act_range == "dynamic"
    # a plan, packed manifest or run ledger without the key was made with max, whatever the default now is
    old = BitPlan(model=dict(MODEL), blocks=dict(BLOCKS), act_range="max").to_dict()
    del old["act_range"]
    assert BitPlan.from_dict(old).act_range == "max" and BitPlan(model=dict(MODEL), blocks={}).act_range == "max"
    assert "act_range" not in AllocConfig(act_range="max").protocol()  # run folders made before the setting match
    ledger = {"allocate": {"bits": [2, 4], "groups": 128, "act_bits": 8}, "plans": [{"name": "u", "uniform": 8}]}
    (recorded,) = recorded_plans(ledger)
    assert (recorded.alloc.act_range, recorded.alloc.rounding) == ("max", "nearest")
    assert AllocConfig(act_range="mse").protocol()["act_range"] == "mse"
    for bad in ("p99", "", None):
        with pytest.raises(QBHError, match="max, percentile, mse, dynamic"):
            BitPlan(model=dict(MODEL), blocks={}, act_range=bad)
        with pytest.raises(QBHError, match="act_range"):
            AllocConfig(act_range=bad)
    assert PlanSpec("p", uniform=8, act_range="max").alloc_config(AllocConfig()).act_range == "max"
