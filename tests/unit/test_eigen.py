"""Power iteration against exact spectra: dense matrices, then the dense Hessian of a tiny BERT block."""

from __future__ import annotations

import pytest
import torch

from qbert_hessian.hessian.eigen import lanczos_eigenvalues, most_negative_eigenvalue, top_eigenvalues
from qbert_hessian.hessian.hvp import BlockHessian
from qbert_hessian.hessian.lanczos import lanczos
from qbert_hessian.models import BlockMap
from tests.helpers import dense_block_hessian, random_batch


def matrix_hvp(A: torch.Tensor):
    return lambda v: [(A @ v[0].reshape(-1)).reshape(v[0].shape)]


def sym_with_spectrum(values: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ Q.T


def test_eigen_finds_largest_magnitude_with_sign():
    A = sym_with_spectrum([-9.0, 4.0, 2.0, 1.0, 0.5, -0.3])
    res = top_eigenvalues(
        matrix_hvp(A),
        [torch.zeros(6, dtype=torch.float64)],
        tol=1e-10,
        max_iters=2000,
        generator=torch.Generator().manual_seed(0),
    )
    assert res.values[0] == pytest.approx(-9.0, rel=1e-6)
    assert res.converged == [True]


def test_eigen_deflation_gives_top_k_in_magnitude_order():
    A = sym_with_spectrum([10.0, -7.0, 5.0, 1.0, 0.2])
    res = top_eigenvalues(
        matrix_hvp(A),
        [torch.zeros(5, dtype=torch.float64)],
        k=3,
        tol=1e-12,
        max_iters=5000,
        generator=torch.Generator().manual_seed(1),
    )
    assert res.values == pytest.approx([10.0, -7.0, 5.0], rel=1e-6)
    v = torch.stack([x[0] for x in res.vectors])
    assert torch.allclose(v @ v.T, torch.eye(3, dtype=torch.float64), atol=1e-5)


def test_eigen_warm_start_converges_in_few_steps():
    A = sym_with_spectrum([3.0, 2.9, 1.0, 0.1])
    params = [torch.zeros(4, dtype=torch.float64)]
    cold = top_eigenvalues(matrix_hvp(A), params, tol=1e-9, max_iters=5000, generator=torch.Generator().manual_seed(0))
    warm = top_eigenvalues(matrix_hvp(A), params, tol=1e-9, max_iters=5000, init=cold.vectors)
    assert warm.values[0] == pytest.approx(3.0, rel=1e-6)
    assert warm.iters[0] < cold.iters[0]


def test_eigen_iteration_cap_reports_not_converged():
    A = sym_with_spectrum([1.0, 0.999, 0.5])
    res = top_eigenvalues(
        matrix_hvp(A),
        [torch.zeros(3, dtype=torch.float64)],
        tol=1e-14,
        max_iters=3,
        generator=torch.Generator().manual_seed(0),
    )
    assert res.iters == [3] and res.converged == [False]


def test_most_negative_eigenvalue_by_shift():
    A = sym_with_spectrum([6.0, 3.0, 0.5, -1.5, -2.0])
    params = [torch.zeros(5, dtype=torch.float64)]
    top = top_eigenvalues(matrix_hvp(A), params, tol=1e-12, max_iters=5000, generator=torch.Generator().manual_seed(0))
    neg = most_negative_eigenvalue(
        matrix_hvp(A),
        params,
        shift=top.values[0],
        tol=1e-12,
        max_iters=5000,
        generator=torch.Generator().manual_seed(0),
    )
    assert neg.values[0] == pytest.approx(-2.0, rel=1e-5)


def test_most_negative_is_the_top_one_when_that_is_negative():
    A = sym_with_spectrum([-9.0, 4.0, 2.0, -3.0])
    params = [torch.zeros(4, dtype=torch.float64)]
    calls = []
    neg = most_negative_eigenvalue(lambda v: calls.append(1) or matrix_hvp(A)(v), params, shift=-9.0)
    assert neg.values == [-9.0] and not calls


@pytest.mark.parametrize("block", ["encoder.0", "embeddings", "encoder.0.query", "embeddings.word"])
def test_eigen_matches_dense_hessian_of_tiny_bert(micro_bert, block):
    batch = random_batch(micro_bert.config.vocab_size, num_labels=3, seq_len=6)
    params = BlockMap(micro_bert).parameters(block)
    H = dense_block_hessian(micro_bert, params, batch)
    exact = torch.linalg.eigvalsh(H.double())
    dominant = float(exact[exact.abs().argmax()])
    hvp = BlockHessian(micro_bert, params, [batch])
    res = top_eigenvalues(hvp, params, tol=1e-7, max_iters=3000, generator=torch.Generator().manual_seed(0))
    assert res.values[0] == pytest.approx(dominant, rel=1e-3)
    # The Rayleigh quotient of the returned vector agrees with the dense matrix too.
    v = torch.cat([x.reshape(-1) for x in res.vectors[0]]).double()
    assert float(v @ H.double() @ v) == pytest.approx(dominant, rel=1e-3)


def test_lanczos_extremes_of_dense_matrix():
    A = sym_with_spectrum([7.0, 6.5, 3.0, 1.0, 0.0, -2.0, -4.5], seed=2)
    res = lanczos_eigenvalues(
        matrix_hvp(A),
        [torch.zeros(7, dtype=torch.float64)],
        k=2,
        tol=1e-10,
        most_negative=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert res.values == pytest.approx([7.0, 6.5], rel=1e-8)
    assert res.smallest == pytest.approx(-4.5, rel=1e-8)
    # A 7-dimensional space is exhausted within 7 steps: the Ritz values are then exact.
    assert res.iters[0] <= 7 and res.converged[0]
    v = res.vectors[0][0]
    assert torch.allclose(A @ v, 7.0 * v, atol=1e-6)


def test_lanczos_needs_fewer_products_than_power_iteration():
    values = [10.0, 9.5, 9.0] + [float(x) for x in torch.linspace(-3, 8, 197)]
    A = sym_with_spectrum(values, seed=3)
    params = [torch.zeros(200, dtype=torch.float64)]
    power = top_eigenvalues(matrix_hvp(A), params, tol=1e-6, max_iters=5000, generator=torch.Generator().manual_seed(0))
    lanc = lanczos_eigenvalues(
        matrix_hvp(A), params, tol=1e-6, max_iters=200, generator=torch.Generator().manual_seed(0)
    )
    assert lanc.values[0] == pytest.approx(10.0, rel=1e-5)
    assert lanc.iters[0] < power.iters[0] / 3


def test_lanczos_recurrence_reproduces_tridiagonal():
    A = sym_with_spectrum([5.0, 2.0, 1.0, -1.0, 0.5], seed=4)
    res = lanczos(matrix_hvp(A), [torch.ones(5, dtype=torch.float64)], max_steps=4)
    Q = torch.stack([q[0] for q in res.basis], 1)
    T = Q.T @ A @ Q
    assert torch.allclose(Q.T @ Q, torch.eye(4, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(torch.diag(T), torch.tensor(res.alpha), atol=1e-10)
    assert torch.allclose(torch.diag(T, 1), torch.tensor(res.beta), atol=1e-10)


@pytest.mark.parametrize("block", ["encoder.0", "embeddings"])
def test_lanczos_matches_dense_hessian_of_tiny_bert(micro_bert, block):
    batch = random_batch(micro_bert.config.vocab_size, num_labels=3, seq_len=6)
    params = BlockMap(micro_bert).parameters(block)
    exact = torch.linalg.eigvalsh(dense_block_hessian(micro_bert, params, batch).double())
    dominant = float(exact[exact.abs().argmax()])
    res = lanczos_eigenvalues(
        BlockHessian(micro_bert, params, [batch]),
        params,
        tol=1e-8,
        max_iters=300,
        most_negative=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert res.values[0] == pytest.approx(dominant, rel=1e-3)
    assert res.smallest == pytest.approx(float(exact[0]), rel=1e-3)


def test_ritz_residuals_are_the_true_residuals():
    """beta_m |s_mj| (no product needed) equals ||A y_j - theta_j y_j|| computed with A."""
    A = sym_with_spectrum([9.0, 4.0, 3.0, 1.0, -2.0, 0.5, 0.25, -1.5], seed=5)
    res = lanczos(matrix_hvp(A), [torch.ones(8, dtype=torch.float64)], max_steps=4)
    for j, theta in enumerate(res.ritz_values):
        y = res.vector(j)[0]
        assert torch.linalg.vector_norm(A @ y - theta * y).item() == pytest.approx(res.residuals[j], rel=1e-8)


@pytest.mark.parametrize("seed", range(8))
def test_lanczos_stops_within_tol_of_the_top_eigenvalue(seed):
    """The error-estimate rule stops early but inside the tolerance, on spectra with small and large gaps."""
    g = torch.Generator().manual_seed(seed)
    bulk = (torch.rand(150, generator=g, dtype=torch.float64) * 2 - 1).tolist()
    top = 1.0 + 0.02 * (seed + 1)  # relative gaps 2% .. 16%
    A = sym_with_spectrum([top, 1.0, *bulk], seed=seed)
    for tol in (1e-2, 1e-3, 1e-4):
        res = lanczos_eigenvalues(
            matrix_hvp(A),
            [torch.zeros(152, dtype=torch.float64)],
            tol=tol,
            max_iters=150,
            generator=torch.Generator().manual_seed(seed),
        )
        assert res.converged[0] and res.iters[0] < 150
        assert abs(res.values[0] - top) <= tol * top


def test_power_iteration_does_not_accept_a_start_whose_estimates_merely_agree():
    """With eigenvalues +1 and -1 every iterate of (0.8, 0.6) has Rayleigh quotient 0.28: the change rule
    alone would accept 0.28 after two products; the residual (0.96) says it is no eigenvector."""
    A = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    start = [[torch.tensor([0.8, 0.6], dtype=torch.float64)]]
    res = top_eigenvalues(matrix_hvp(A), [torch.zeros(2, dtype=torch.float64)], init=start, tol=1e-3, max_iters=20)
    assert not res.converged[0] and res.iters[0] == 20
    B = torch.diag(torch.tensor([1.0, -0.9], dtype=torch.float64))  # a gap: converges to the true top, not 0.28
    res = top_eigenvalues(matrix_hvp(B), [torch.zeros(2, dtype=torch.float64)], init=start, tol=1e-6, max_iters=500)
    assert res.converged[0] and res.values[0] == pytest.approx(1.0, rel=1e-5)
