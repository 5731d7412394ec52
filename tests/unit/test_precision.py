"""Product precision: bf16 products against float32 ones, certified (``mixed``) eigenvalues against dense Hessians,
the certificate against a deliberately poor Ritz vector, bf16 traces against the dense trace, and ``fp32`` leaving
protocols and reports as they were."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch

from qbert_hessian.config import Precision, SensitivityConfig
from qbert_hessian.errors import QBHError
from qbert_hessian.hessian import vec
from qbert_hessian.hessian.eigen import certified_lanczos_eigenvalues, lanczos_eigenvalues, residual_bound
from qbert_hessian.hessian.hvp import BlockHessian, autocast_products, grads_enabled
from qbert_hessian.hessian.trace import hutchinson_trace
from qbert_hessian.models import BlockMap, curvature_kernels, load_model
from qbert_hessian.sensitivity import estimate_sensitivity
from qbert_hessian.tasks import load_task
from tests.helpers import dense_block_hessian, random_batch

FAST = SensitivityConfig(draws=2, batch_size=8, max_iters=40, tol=1e-3, trace="none", max_length=16)


def counted(hvp):
    """``hvp`` and a list whose length is the number of products it made."""
    calls: list[int] = []

    def run(v):
        calls.append(1)
        return hvp(v)

    return run, calls


def matrix_hvp(A: torch.Tensor):
    return lambda v: [(A @ v[0].reshape(-1)).reshape(v[0].shape)]


def sym_with_spectrum(values: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ Q.T


@pytest.mark.parametrize("kernels", [True, False], ids=["curvature-kernels", "stock"])
@pytest.mark.parametrize("block", ["embeddings", "encoder.0", "encoder.1"])
def test_bf16_products_agree_with_fp32_to_bf16_rounding(tiny_bert, kernels, block):
    batch = random_batch(tiny_bert.config.vocab_size, batch_size=8, seq_len=12)
    params = BlockMap(tiny_bert).parameters(block)
    with curvature_kernels(tiny_bert) if kernels else contextlib.nullcontext(), grads_enabled(params):
        H = BlockHessian(tiny_bert, params, [batch])
        v = vec.normalize(vec.randn_like(H.like, torch.Generator().manual_seed(0)))
        exact = vec.flatten(H(v))
        low = autocast_products(H)(v)
        again = vec.flatten(H(v))  # the float32 graph is untouched by a bf16 product
    assert all(x.dtype == torch.float32 and x.shape == y.shape for x, y in zip(low, v))
    err = float((vec.flatten(low) - exact).norm() / exact.norm())
    # bf16 keeps 8 bits of mantissa (2^-8 = 0.4%); errors of the matrix products add up to about 1%
    assert 1e-4 < err < 3e-2
    assert torch.equal(again, exact)


@pytest.mark.parametrize("block", ["encoder.0", "embeddings"])
def test_mixed_eigenvalues_match_the_dense_hessian(micro_bert, block):
    batch = random_batch(micro_bert.config.vocab_size, num_labels=3, seq_len=6)
    params = BlockMap(micro_bert).parameters(block)
    exact = torch.linalg.eigvalsh(dense_block_hessian(micro_bert, params, batch).double())
    dominant = float(exact[exact.abs().argmax()])
    tol = 1e-3
    with curvature_kernels(micro_bert):
        H = BlockHessian(micro_bert, params, [batch])
        hvp, calls = counted(H)
        res = certified_lanczos_eigenvalues(
            autocast_products(H), hvp, params, tol=tol, max_iters=300, generator=torch.Generator().manual_seed(0)
        )
    assert res.converged == [True]
    assert abs(res.values[0] - dominant) <= tol * abs(dominant)
    assert len(calls) >= 1 and res.iters[0] > len(calls)  # bf16 products did the search


def test_certification_accepts_a_good_ritz_vector_with_one_exact_product():
    A = sym_with_spectrum([10.0, 6.0, 3.0, 1.0, 0.5, -0.2, *np.linspace(0.1, 0.01, 30)])
    E = 1e-4 * sym_with_spectrum(list(np.linspace(-1, 1, 36)), seed=3)  # a bf16-sized perturbation
    exact, calls = counted(matrix_hvp(A))
    res = certified_lanczos_eigenvalues(
        matrix_hvp(A + E), exact, [torch.zeros(36, dtype=torch.float64)], tol=1e-4, max_iters=36,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert len(calls) == 1
    assert res.values[0] == pytest.approx(10.0, rel=1e-4)


def test_certification_covers_top_k_and_the_most_negative_value():
    values = [10.0, -8.0, 6.0, 3.0, 1.0, -4.0, *np.linspace(0.1, 0.01, 30)]
    A = sym_with_spectrum(values)
    E = 1e-5 * sym_with_spectrum(list(np.linspace(-1, 1, 36)), seed=3)
    exact, calls = counted(matrix_hvp(A))
    res = certified_lanczos_eigenvalues(
        matrix_hvp(A + E), exact, [torch.zeros(36, dtype=torch.float64)], k=2, most_negative=True, tol=1e-5,
        max_iters=36, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert len(calls) == 2  # one certificate per watched value: the top two, the second also the most negative
    assert res.values == pytest.approx([10.0, -8.0], rel=1e-5)
    assert res.smallest == pytest.approx(-8.0, rel=1e-5)
    assert res.converged == [True, True]
    k1, calls1 = counted(matrix_hvp(A))
    res = certified_lanczos_eigenvalues(
        matrix_hvp(A + E), k1, [torch.zeros(36, dtype=torch.float64)], most_negative=True, tol=1e-5,
        max_iters=36, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert len(calls1) == 2 and res.values == pytest.approx([10.0], rel=1e-5)
    assert res.smallest == pytest.approx(-8.0, rel=1e-5)
    assert res.converged == [True]


def test_certification_catches_a_poor_ritz_vector_and_continues_exactly():
    A = sym_with_spectrum([10.0, 9.0, 3.0, 1.0, 0.5, -0.2, *np.linspace(0.1, 0.01, 30)])
    # A low-precision operator whose top eigenvector is another direction: its Ritz vector is a poor one for A.
    u = torch.randn(36, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    u /= u.norm()
    poor = A + 20.0 * torch.outer(u, u)
    exact, calls = counted(matrix_hvp(A))
    res = certified_lanczos_eigenvalues(
        matrix_hvp(poor), exact, [torch.zeros(36, dtype=torch.float64)], tol=1e-6, max_iters=36,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert len(calls) > 2  # the certificate failed and Lanczos went on with exact products
    assert res.converged == [True]
    assert res.values[0] == pytest.approx(10.0, rel=1e-6)
    low = lanczos_eigenvalues(matrix_hvp(poor), [torch.zeros(36, dtype=torch.float64)], tol=1e-6, max_iters=36)
    assert abs(low.values[0] - 10.0) > 5.0  # uncertified, the poor operator's value would have been returned


def test_certification_catches_a_poor_ritz_vector_of_a_bert_block(micro_bert):
    batch = random_batch(micro_bert.config.vocab_size, num_labels=3, seq_len=6)
    params = BlockMap(micro_bert).parameters("encoder.0")
    exact = torch.linalg.eigvalsh(dense_block_hessian(micro_bert, params, batch).double())
    dominant = float(exact[exact.abs().argmax()])
    H = BlockHessian(micro_bert, params, [batch])
    u = vec.normalize(vec.randn_like(params, torch.Generator().manual_seed(7)))

    def injected(v):  # bf16 products plus a spike along u: the search converges to u, a poor vector for H
        return vec.axpy(3.0 * abs(dominant) * vec.dot(u, v), u, autocast_products(H)(v))

    hvp, calls = counted(H)
    res = certified_lanczos_eigenvalues(
        injected, hvp, params, tol=1e-3, max_iters=300, generator=torch.Generator().manual_seed(0)
    )
    assert len(calls) > 2
    assert abs(res.values[0] - dominant) <= 1e-3 * abs(dominant)


def test_residual_bound_is_kato_temple_only_past_the_residual():
    assert residual_bound(0.1, 0.0) == 0.1
    assert residual_bound(0.1, 0.05) == 0.1  # a gap below the residual proves nothing more
    assert residual_bound(0.1, 1.0) == pytest.approx(0.01)
    # the bound holds: a 2x2 with gap 1, a vector tilted by angle t
    t = 0.05
    A = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
    y = torch.tensor([np.cos(t), np.sin(t)], dtype=torch.float64)
    rho = float(y @ A @ y)
    r = float((A @ y - rho * y).norm())
    assert abs(2.0 - rho) <= residual_bound(r, abs(rho - 1.0)) + 1e-15


def test_bf16_traces_against_the_dense_trace(micro_bert):
    """What bf16 does to a Hutchinson trace: the same probes give samples within about 1% of the float32 ones, so
    the mean moves by far less than its standard error; both lie within 4 standard errors of the dense trace."""
    batch = random_batch(micro_bert.config.vocab_size, num_labels=3, seq_len=6)
    params = BlockMap(micro_bert).parameters("encoder.0")
    dense = float(torch.trace(dense_block_hessian(micro_bert, params, batch).double()))
    with curvature_kernels(micro_bert):
        H = BlockHessian(micro_bert, params, [batch])
        fp32 = hutchinson_trace(H, params, min_samples=64, max_samples=64, generator=torch.Generator().manual_seed(0))
        bf16 = hutchinson_trace(
            autocast_products(H), params, min_samples=64, max_samples=64, generator=torch.Generator().manual_seed(0)
        )
    for t in (fp32, bf16):
        assert abs(t.mean - dense) <= 4 * t.stderr
    paired = np.abs(np.array(bf16.samples) - np.array(fp32.samples))
    assert paired.max() <= 3e-2 * np.abs(fp32.samples).max()
    assert abs(bf16.mean - fp32.mean) < 0.25 * fp32.stderr
    assert bf16.stderr == pytest.approx(fp32.stderr, rel=0.1)


@pytest.fixture(scope="module")
def model_task(tiny_checkpoint, tiny_data):
    model, tok = load_model(str(tiny_checkpoint), num_labels=2)
    return model, load_task("sst2", tok, data_dir=tiny_data, max_length=16)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_sensitivity_mixed_is_within_tol_of_the_fp32_engine(model_task, method):
    """The whole protocol (warm starts, shared graph, curvature kernels): ``mixed`` gives the float32 engine's values
    to the tolerance; ``bf16`` to its rounding. (On this tiny model a warm start can settle on another eigenvalue than
    the top one, in float32 as well; the dense tests above check the top eigenvalue itself.)"""
    model, task = model_task
    cfg = dataclasses.replace(FAST, method=method, max_iters=40 if method == "lanczos" else 300)
    ref = estimate_sensitivity(model, task, cfg, progress=False)
    mixed = estimate_sensitivity(model, task, dataclasses.replace(cfg, precision="mixed"), progress=False)
    bf16 = estimate_sensitivity(model, task, dataclasses.replace(cfg, precision="bf16"), progress=False)
    assert mixed.config["precision"] == "mixed" and bf16.config["precision"] == "bf16"
    # Lanczos: twice the tolerance (each within tol of the same eigenvalue); power iteration stops on its own
    # change rule, in float32 from the bf16 vector, whose error is not bounded by tol
    slack = 2 if method == "lanczos" else 10
    for r, m, b in zip(ref.blocks, mixed.blocks, bf16.blocks):
        assert all(m.converged) and all(r.converged)
        want = np.array(r.eigenvalues)
        assert np.all(np.abs(np.array(m.eigenvalues) - want) <= slack * FAST.tol * np.abs(want))
        assert np.all(np.abs(np.array(b.eigenvalues) - want) <= 3e-2 * np.abs(want))


def test_precision_enters_the_protocol_only_when_not_fp32():
    assert SensitivityConfig().precision is Precision.FP32
    assert "precision" not in SensitivityConfig().protocol()
    assert SensitivityConfig(precision="fp32").protocol() == SensitivityConfig().protocol()
    assert SensitivityConfig(precision="mixed").protocol()["precision"] == "mixed"
    assert SensitivityConfig.from_dict({"precision": "bf16"}).precision is Precision.BF16
    with pytest.raises(QBHError, match="unknown precision 'fp16'; choose one of fp32, bf16, mixed"):
        SensitivityConfig(precision="fp16")


def test_a_report_from_before_precision_resumes_and_fp32_numbers_are_unchanged(model_task):
    model, task = model_task
    cfg = dataclasses.replace(FAST, trace="block", trace_samples=2)
    report = estimate_sensitivity(model, task, cfg, blocks=["encoder.0"], progress=False)
    assert "precision" not in report.config  # written as before the setting existed
    explicit = estimate_sensitivity(
        model, task, dataclasses.replace(cfg, precision="fp32"), blocks=["encoder.0"], progress=False
    )
    assert explicit.blocks[0].eigenvalues == report.blocks[0].eigenvalues
    assert explicit.blocks[0].trace == report.blocks[0].trace
    resumed = estimate_sensitivity(model, task, cfg, blocks=["encoder.0", "encoder.1"], resume=report, progress=False)
    assert resumed.complete and resumed.blocks[0].seconds == report.blocks[0].seconds
    with pytest.raises(QBHError, match="cannot resume.*precision 'fp32' vs 'mixed'"):
        estimate_sensitivity(
            model,
            task,
            dataclasses.replace(cfg, precision="mixed"),
            blocks=["encoder.0", "encoder.1"],
            resume=report,
            progress=False,
        )


def test_bf16_densities_say_so_and_keep_their_moments(model_task):
    from qbert_hessian import stages
    from qbert_hessian.config import DensityConfig

    model, task = model_task
    cfg = DensityConfig(steps=12, batch_size=8)
    fp32 = stages.density(model, task, ["encoder.0"], cfg).densities[0]
    bf16 = stages.density(model, task, ["encoder.0"], dataclasses.replace(cfg, precision="bf16")).densities[0]
    assert "precision" not in fp32 and bf16["precision"] == "bf16"

    def mean_eigenvalue(d):  # the quadrature's first moment, (1/n) tr(H)
        return sum(w * x for w, x in zip(d["weights"][0], d["nodes"][0]))

    assert mean_eigenvalue(bf16) == pytest.approx(mean_eigenvalue(fp32), rel=3e-2)
    assert mean_eigenvalue(bf16) != mean_eigenvalue(fp32)
    with pytest.raises(QBHError, match="precision 'mixed' certifies eigenvalues"):
        DensityConfig(precision="mixed")
