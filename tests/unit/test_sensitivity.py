from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from qbert_hessian.artifacts import SensitivityReport
from qbert_hessian.config import SensitivityConfig
from qbert_hessian.errors import QBHError
from qbert_hessian.hessian.sensitivity import draw_indices, estimate_sensitivity
from qbert_hessian.models import load_model
from qbert_hessian.tasks import load_task

FAST = SensitivityConfig(draws=3, batch_size=8, max_iters=15, tol=1e-3, trace_samples=3, max_length=16)


@pytest.fixture(scope="module")
def model_task(tiny_checkpoint, tiny_data):
    model, tok = load_model(str(tiny_checkpoint), num_labels=2)
    return model, load_task("sst2", tok, data_dir=tiny_data, max_length=16)


def test_sensitivity_omega_is_abs_mean_plus_std(model_task):
    model, task = model_task
    report = estimate_sensitivity(model, task, FAST, progress=False)
    assert [b.name for b in report.blocks] == ["embeddings", "encoder.0", "encoder.1"]
    assert report.complete
    for b in report.blocks:
        assert len(b.eigenvalues) == 3
        assert b.mean == pytest.approx(np.mean(b.eigenvalues))
        assert b.std == pytest.approx(np.std(b.eigenvalues, ddof=1))
        assert b.omega == pytest.approx(abs(b.mean) + b.std)
        assert b.trace is not None and b.trace.samples == 9
        assert b.normalized_trace == pytest.approx(b.trace.mean / b.num_params)
    assert report.block("encoder.0").num_params == sum(p.numel() for p in model.bert.encoder.layer[0].parameters())


def test_power_and_lanczos_agree_on_converged_blocks(model_task):
    model, task = model_task
    tight = dataclasses.replace(FAST, draws=2, tol=1e-6, max_iters=400, trace="none")
    a = estimate_sensitivity(model, task, tight, blocks=["embeddings"], progress=False)
    b = estimate_sensitivity(
        model, task, dataclasses.replace(tight, method="power"), blocks=["embeddings"], progress=False
    )
    assert all(a.blocks[0].converged) and all(b.blocks[0].converged)
    assert a.blocks[0].eigenvalues == pytest.approx(b.blocks[0].eigenvalues, rel=1e-3)


def test_sensitivity_is_reproducible_and_resumes(model_task):
    model, task = model_task
    seen = []
    full = estimate_sensitivity(model, task, FAST, progress=False, on_block=lambda r: seen.append(len(r.blocks)))
    assert seen == [1, 2, 3]  # written after every block
    partial = SensitivityReport.from_dict(full.to_dict())
    partial.blocks = partial.blocks[:1]
    partial.pending = ["encoder.0", "encoder.1"]
    resumed = estimate_sensitivity(model, task, FAST, progress=False, resume=partial)
    assert resumed.complete
    for a, b in zip(full.blocks, resumed.blocks):
        assert a.eigenvalues == pytest.approx(b.eigenvalues, rel=1e-6)
    assert resumed.blocks[0].seconds == full.blocks[0].seconds  # kept, not recomputed


def test_sensitivity_with_hutchpp_traces(model_task):
    model, task = model_task
    cfg = dataclasses.replace(FAST, trace_method="hutchpp", trace_samples=6)
    report = estimate_sensitivity(model, task, cfg, blocks=["encoder.0", "encoder.1"], progress=False)
    plain = estimate_sensitivity(model, task, FAST, blocks=["encoder.0", "encoder.1"], progress=False)
    assert report.config["trace_method"] == "hutchpp"
    for b, h in zip(report.blocks, plain.blocks):
        # per draw: a sketch of 2, H Q for 2, 2 residual probes; 3 draws
        assert b.trace.method == "hutchpp" and b.trace.products == 18 and b.trace.samples == 6
        assert h.trace.method == "hutchinson" and h.trace.products == 9
        assert 0 < b.trace.stderr and b.normalized_trace == pytest.approx(b.trace.mean / b.num_params)
        # two unbiased estimates of the same mean trace over the same draws
        assert abs(b.trace.mean - h.trace.mean) <= 4 * (b.trace.stderr**2 + h.trace.stderr**2) ** 0.5
        assert b.eigenvalues == pytest.approx(h.eigenvalues, rel=1e-6)  # the trace comes after the eigen-solver


def test_a_report_from_before_trace_method_resumes(model_task):
    model, task = model_task
    report = estimate_sensitivity(model, task, FAST, blocks=["encoder.0"], progress=False)
    del report.config["trace_method"]  # as written before the setting existed (Hutchinson's)
    resumed = estimate_sensitivity(model, task, FAST, blocks=["encoder.0", "encoder.1"], resume=report, progress=False)
    assert resumed.complete and resumed.blocks[0].seconds == report.blocks[0].seconds
    with pytest.raises(QBHError, match="cannot resume.*trace_method 'hutchinson' vs 'hutchpp'"):
        estimate_sensitivity(
            model,
            task,
            dataclasses.replace(FAST, trace_method="hutchpp", trace_samples=4),
            blocks=["encoder.0", "encoder.1"],
            resume=report,
            progress=False,
        )


def test_resume_refuses_other_settings(model_task):
    model, task = model_task
    report = estimate_sensitivity(model, task, FAST, blocks=["encoder.1"], progress=False)
    with pytest.raises(QBHError, match="cannot resume.*draws"):
        estimate_sensitivity(
            model, task, dataclasses.replace(FAST, draws=2), blocks=["encoder.1"], resume=report, progress=False
        )


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_sensitivity_options_topk_negative_shared(model_task, method):
    model, task = model_task
    cfg = dataclasses.replace(FAST, draws=2, top_k=2, most_negative=True, trace="shared", max_iters=200, method=method)
    report = estimate_sensitivity(
        model, task, cfg, blocks=["embeddings.word", "encoder.0.query", "encoder.1"], progress=False
    )
    assert any(all(b.converged) for b in report.blocks)
    for b in report.blocks:
        assert len(b.top_k) == 2 and [x[0] for x in b.top_k] == b.eigenvalues
        for topk, neg, ok in zip(b.top_k, b.most_negative, b.converged):
            # The ordering holds for converged eigenpairs above float32 noise (dense checks are in test_eigen).
            if ok and abs(topk[0]) > 1e-5:
                assert abs(topk[0]) >= abs(topk[1]) * (1 - 1e-2)
                assert neg <= topk[0] + 1e-6
        assert b.trace.samples == 6


def test_sensitivity_errors(model_task):
    model, task = model_task
    with pytest.raises(QBHError, match="encoder.7.*encoder.0..encoder.1"):
        estimate_sensitivity(model, task, FAST, blocks=["encoder.7"], progress=False)
    with pytest.raises(QBHError, match="overlap"):
        estimate_sensitivity(
            model,
            task,
            dataclasses.replace(FAST, trace="shared"),
            blocks=["encoder.0", "encoder.0.key"],
            progress=False,
        )
    with pytest.raises(QBHError, match="training examples"):
        draw_indices(10, dataclasses.replace(FAST, batch_size=16))


def test_draws_are_seeded_and_distinct():
    a = draw_indices(1000, FAST)
    assert a == draw_indices(1000, FAST)
    assert a != draw_indices(1000, dataclasses.replace(FAST, seed=1))
    assert len({tuple(x) for x in a}) == 3 and all(len(set(x)) == 8 for x in a)
