from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qbert_hessian.errors import QBHError
from qbert_hessian.hessian.hvp import BlockHessian
from qbert_hessian.hessian.trace import (
    TraceResult,
    hutchinson_block_traces,
    hutchinson_trace,
    hutchpp_trace,
    pool_estimates,
    summarize,
)
from qbert_hessian.models import BlockMap
from tests.helpers import dense_block_hessian, random_batch


def test_trace_exact_for_diagonal_matrix():
    # Rademacher probes give v^T D v = Tr(D) exactly for a diagonal D: zero variance.
    d = torch.tensor([3.0, -1.0, 2.5, 0.5])
    res = hutchinson_trace(lambda v: [d * v[0]], [d], min_samples=4, max_samples=4)
    assert res.mean == pytest.approx(5.0) and res.stderr == pytest.approx(0.0)


def test_trace_of_tiny_bert_block_within_three_stderr(micro_bert):
    batch = random_batch(micro_bert.config.vocab_size, num_labels=3)
    params = BlockMap(micro_bert).parameters("encoder.0")
    exact = float(torch.trace(dense_block_hessian(micro_bert, params, batch)))
    res = hutchinson_trace(
        BlockHessian(micro_bert, params, [batch]),
        params,
        min_samples=64,
        max_samples=64,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(res.samples) == 64
    assert abs(res.mean - exact) <= 3 * res.stderr


def test_trace_stops_at_min_samples_when_precise():
    d = torch.ones(10)
    res = hutchinson_trace(lambda v: [d * v[0]], [d], min_samples=5, max_samples=100, rtol=1e-2)
    assert len(res.samples) == 5


def test_shared_block_traces_within_three_stderr(micro_bert):
    batch = random_batch(micro_bert.config.vocab_size, num_labels=3)
    bm = BlockMap(micro_bert)
    names = ["embeddings", "encoder.0"]
    blocks = [bm.parameters(n) for n in names]
    params = blocks[0] + blocks[1]
    slices = [slice(0, len(blocks[0])), slice(len(blocks[0]), len(params))]
    results = hutchinson_block_traces(
        BlockHessian(micro_bert, params, [batch]),
        params,
        slices,
        num_samples=96,
        generator=torch.Generator().manual_seed(0),
    )
    for p, res in zip(blocks, results):
        exact = float(torch.trace(dense_block_hessian(micro_bert, p, batch)))
        assert abs(res.mean - exact) <= 3 * res.stderr


def test_trace_argument_errors():
    with pytest.raises(QBHError, match="min_samples"):
        hutchinson_trace(lambda v: v, [torch.ones(2)], min_samples=5, max_samples=2)
    with pytest.raises(QBHError, match="disjoint"):
        hutchinson_block_traces(lambda v: v, [torch.ones(2)], [slice(0, 1), slice(0, 1)])
    with pytest.raises(QBHError, match="no trace samples"):
        summarize([])


# ------------------------------------------------------------------------------------------------- Hutch++


def _matrix(eigenvalues, seed: int = 0) -> torch.Tensor:
    """A symmetric matrix with these eigenvalues and random orthonormal eigenvectors (float64)."""
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
    d = lam.numel()
    U, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return U @ torch.diag(lam) @ U.T


class Counted:
    """``v -> A v`` on vectors split as a (5, 4) matrix and the rest (two tensors, as a block's parameters are),
    counting the products."""

    def __init__(self, A: torch.Tensor) -> None:
        self.A, self.calls = A, 0
        self.params = [torch.zeros(5, 4, dtype=A.dtype), torch.zeros(A.shape[0] - 20, dtype=A.dtype)]

    def __call__(self, v: list[torch.Tensor]) -> list[torch.Tensor]:
        self.calls += 1
        out = self.A @ torch.cat([x.reshape(-1) for x in v])
        return [out[:20].reshape(5, 4), out[20:]]


def _low_rank(d: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return _matrix(torch.cat([torch.randn(r, dtype=torch.float64, generator=g) * 5, torch.zeros(d - r)]), seed)


@pytest.mark.parametrize("rank", [1, 3, 4], ids=lambda r: f"rank{r}")
def test_hutchpp_is_exact_when_the_rank_is_within_the_sketch(rank):
    # Q = orth(A S) spans A's range, so the residual (I - QQ^T) A (I - QQ^T) is zero: exact, zero stderr.
    for seed in range(5):
        A = _low_rank(32, rank, seed)
        hvp = Counted(A)
        g = torch.Generator().manual_seed(seed)
        res = hutchpp_trace(hvp, hvp.params, min_samples=12, max_samples=12, sketch_size=4, generator=g)
        scale = float(torch.linalg.matrix_norm(A))
        assert res.mean == pytest.approx(float(torch.trace(A)), abs=1e-10 * scale)
        assert res.low_rank == pytest.approx(float(torch.trace(A)), abs=1e-10 * scale)
        assert res.stderr <= 1e-10 * scale
        assert hvp.calls == res.products == 12 and len(res.samples) == 4


def test_hutchpp_is_not_exact_beyond_the_sketch():
    # The same matrices with one more direction than the sketch holds: the residual has variance again.
    A = _low_rank(32, 6, 0)
    hvp = Counted(A)
    res = hutchpp_trace(hvp, hvp.params, min_samples=12, max_samples=12, sketch_size=4)
    assert res.stderr > 1e-3


def test_hutchpp_sketch_wider_than_the_matrix_is_exact():
    # d = 22 < 2 x sketch: QR gives at most d columns, the products spent are counted as they happen.
    A = _matrix(torch.linspace(-3, 5, 22))
    hvp = Counted(A)
    res = hutchpp_trace(hvp, hvp.params, min_samples=60, max_samples=60, sketch_size=25)
    assert res.mean == pytest.approx(float(torch.trace(A)), abs=1e-9)
    assert res.sketch_products == 25 + 22 and hvp.calls == res.products == 60


SPECTRA = {
    "psd-decaying": [1.0 / (i + 1) ** 2 for i in range(40)],
    "indefinite-decaying": [(-1.0) ** i * 3.0 / (i + 1) ** 1.5 for i in range(40)],
    "indefinite-flat": [(-1.0) ** i for i in range(40)],
}


def _estimates(estimator, A: torch.Tensor, budget: int, seeds: int) -> tuple[np.ndarray, np.ndarray]:
    hvp = Counted(A)
    means, variances = [], []
    for seed in range(seeds):
        res = estimator(
            hvp, hvp.params, min_samples=budget, max_samples=budget, generator=torch.Generator().manual_seed(seed)
        )
        means.append(res.mean)
        variances.append(res.stderr**2)
    assert hvp.calls == seeds * budget  # equal products for both estimators
    return np.array(means), np.array(variances)


@pytest.mark.parametrize("spectrum", list(SPECTRA), ids=list(SPECTRA))
def test_hutchpp_is_unbiased_and_its_stderr_is_calibrated(spectrum):
    A = _matrix(SPECTRA[spectrum], seed=3)
    exact = float(torch.trace(A))
    R = 400
    means, stated = _estimates(hutchpp_trace, A, 12, R)
    spread = means.std(ddof=1)
    assert abs(means.mean() - exact) <= 4 * spread / math.sqrt(R)  # unbiased (4 sigma of the mean of R)
    # The stated variance s_res^2 / n is unbiased for the estimator's variance: its average over R seeds and
    # the spread of the R estimates agree (each within 10-20% at R = 400: the samples are heavy-tailed).
    assert 0.6 < stated.mean() / spread**2 < 1.6
    # A 95% t-interval on the 4 residual probes (12 products: sketch 4, H Q 4) covers the trace about as often.
    covered = np.abs(means - exact) <= 3.18 * np.sqrt(stated)  # t_{3, 0.975}
    assert covered.mean() > 0.85, covered.mean()


def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum_and_loses_on_a_flat_one():
    R, m = 200, 12
    for spectrum, hutchpp_wins in [("psd-decaying", True), ("indefinite-decaying", True), ("indefinite-flat", False)]:
        A = _matrix(SPECTRA[spectrum], seed=5)
        h, _ = _estimates(hutchinson_trace, A, m, R)
        hpp, _ = _estimates(hutchpp_trace, A, m, R)
        ratio = hpp.var(ddof=1) / h.var(ddof=1)
        # decaying: the sketch removes most of ||A||_F^2 (ratio 0.02-0.07); flat: a third of the probes (~3)
        assert (ratio < 0.5) if hutchpp_wins else (ratio > 1.5), (spectrum, ratio)


def test_hutchpp_of_tiny_bert_block_within_its_stated_error(micro_bert):
    batch = random_batch(micro_bert.config.vocab_size, num_labels=3)
    params = BlockMap(micro_bert).parameters("encoder.0")
    exact = float(torch.trace(dense_block_hessian(micro_bert, params, batch)))
    hvp = BlockHessian(micro_bert, params, [batch])
    res = hutchpp_trace(hvp, params, min_samples=48, max_samples=48, generator=torch.Generator().manual_seed(0))
    assert hvp.num_products == res.products == 48 and res.sketch_products == 32
    assert 0 < res.stderr and abs(res.mean - exact) <= 3 * res.stderr


def test_hutchpp_stops_early_when_precise():
    # A rank-2 matrix: exact after the sketch, so the first check after min_samples stops it.
    A = _low_rank(32, 2, 1)
    hvp = Counted(A)
    res = hutchpp_trace(hvp, hvp.params, min_samples=8, max_samples=100, rtol=1e-6)
    assert res.products == 8 and hvp.calls == 8


def test_pool_estimates_averages_draws():
    a = TraceResult(10.0, 3.0, [1.0, 2.0], low_rank=8.0, sketch_products=4)
    b = TraceResult(20.0, 4.0, [3.0], low_rank=19.0, sketch_products=4)
    pooled = pool_estimates([a, b])
    assert pooled.mean == 15.0 and pooled.stderr == pytest.approx(2.5)  # sqrt(9 + 16) / 2
    assert pooled.products == 11 and pooled.samples == [1.0, 2.0, 3.0]


def test_hutchpp_argument_errors():
    hvp = Counted(torch.eye(24, dtype=torch.float64))
    with pytest.raises(QBHError, match="at least 1 vector"):
        hutchpp_trace(hvp, hvp.params, min_samples=2, max_samples=4)
    with pytest.raises(QBHError, match="sketch of 3 needs 8 <= min_samples"):
        hutchpp_trace(hvp, hvp.params, min_samples=6, max_samples=12, sketch_size=3)
    with pytest.raises(QBHError, match="min_samples <= max_samples"):
        hutchpp_trace(hvp, hvp.params, min_samples=12, max_samples=8)
    with pytest.raises(QBHError, match="no trace estimates"):
        pool_estimates([])
