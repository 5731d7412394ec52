"""Hessian traces by Hutchinson's estimator (Hutchinson 1989; Avron & Toledo 2011; HAWQ-V2, PyHessian) and by
Hutch++ (Meyer, Musco, Musco & Woodruff 2021, "Hutch++: Optimal Stochastic Trace Estimation", Algorithm 1).

Tr(H) = E[v^T H v] for v with independent Rademacher (+-1) entries; the estimate is the mean of m samples,
with standard error s / sqrt(m) (s the sample standard deviation). HAWQ-V2 scores a block by Tr(H_bb) / n_b.
The variance of one sample is 2 (||H||_F^2 - sum_i H_ii^2): large when a few eigenvalues dominate.

Hutch++ takes those eigenvalues out first. With k Gaussian sketch vectors S (d x k) it forms Q = orth(H S),
whose span holds H's top eigenvectors approximately, and splits

    Tr(H) = Tr(Q^T H Q) + Tr((I - QQ^T) H (I - QQ^T))

The first term is computed exactly (k products H q_j); the second by Hutchinson with Rademacher g projected
off Q, g' = (I - QQ^T) g: samples g'^T H g' (one product each). The split is an identity for every Q, so
the estimate is unbiased, and its variance is that of the residual Hutchinson part alone: the sketch moves no
mean, it only shrinks the residual's Frobenius norm (when H has rank <= k, to zero: the estimate is exact).
Hence the **standard error**: s_res / sqrt(n) from the n residual samples' standard deviation. Given the
sketch it is the usual Hutchinson standard error; and since E[estimate | S] = Tr(H) for every S, the
estimator's total variance is E_S[Var(residual mean | S)], of which s_res^2 / n is an unbiased estimate.
Products: k (H S) + k (H Q) + n; at m products the paper's split is k = m // 3, n = m - 2k. It wins over
Hutchinson when H's spectrum is dominated by a few eigenvalues (error O(1/m) instead of O(1/sqrt(m))) and
loses up to a factor 3 in variance when the spectrum is flat (only a third of the products probe).

The shared variant reads every block's trace off one full-model product: for v = (v_1..v_B),
v_b^T (H v)_b = v_b^T H_bb v_b + sum_{c != b} v_b^T H_bc v_c, and the cross terms have mean zero because
v_b and v_c are independent with mean zero. One product per sample then serves all blocks, at the price
of extra variance (the cross terms), which the reported standard error includes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import QBHError
from . import vec
from .hvp import HVP


@dataclasses.dataclass
class TraceResult:
    """A trace estimate: ``mean`` +- ``stderr``, from the random ``samples``.

    For Hutchinson the samples are v^T H v and ``mean`` is their mean. For Hutch++ they are the residual
    samples g'^T H g', ``low_rank`` is the exactly computed Tr(Q^T H Q) and ``sketch_products`` the products
    spent on H S and H Q; ``mean`` is low_rank + the samples' mean. :attr:`products` counts every product.
    """

    mean: float
    stderr: float
    samples: list[float]
    low_rank: float = 0.0
    sketch_products: int = 0

    @property
    def products(self) -> int:
        """Hessian-vector products the estimate cost."""
        return self.sketch_products + len(self.samples)


def summarize(samples: Sequence[float], *, low_rank: float = 0.0, sketch_products: int = 0) -> TraceResult:
    """``low_rank`` + the mean of ``samples``, and its standard error s / sqrt(n) (inf with fewer than two
    samples)."""
    x = np.asarray(samples, dtype=np.float64)
    if x.size == 0:
        raise QBHError("no trace samples to summarise; raise the sample count")
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.inf
    return TraceResult(float(low_rank + x.mean()), se, [float(s) for s in x], float(low_rank), sketch_products)


def pool_estimates(results: Sequence[TraceResult]) -> TraceResult:
    """Independent estimates t_d +- se_d of the traces of D matrices (one per data draw) -> their mean.

    mean = (1/D) sum_d t_d and stderr = sqrt(sum_d se_d^2) / D: the standard error of the mean trace over these
    draws from the probes' randomness (not from which data were drawn). The samples are concatenated and the
    products added.
    """
    if not results:
        raise QBHError("no trace estimates to pool; raise the number of draws")
    d = len(results)
    return TraceResult(
        math.fsum(r.mean for r in results) / d,
        math.sqrt(math.fsum(r.stderr**2 for r in results)) / d,
        [s for r in results for s in r.samples],
        math.fsum(r.low_rank for r in results) / d,
        sum(r.sketch_products for r in results),
    )


def hutchinson_trace(
    hvp: HVP,
    params: Sequence[Tensor],
    *,
    min_samples: int = 16,
    max_samples: int = 256,
    rtol: float = 1e-2,
    generator: torch.Generator | None = None,
) -> TraceResult:
    """Estimate Tr(H) with Rademacher probes.

    Sampling stops once ``min_samples`` are taken and stderr <= rtol * |mean|, or at ``max_samples``.

    Args:
        hvp: ``v -> H v`` over ``params``.
        params: tensors giving the shapes of the probes.
        min_samples: floor on the number of probes (the stderr of very few samples is itself unreliable).
        max_samples: cap on the number of probes.
        rtol: target relative standard error.
        generator: seeds the probes.

    Returns:
        A :class:`TraceResult`.
    """
    if min_samples < 1 or max_samples < min_samples:
        raise QBHError(f"need 1 <= min_samples <= max_samples, got {min_samples} and {max_samples}")
    samples: list[float] = []
    while len(samples) < max_samples:
        v = vec.rademacher_like(params, generator)
        samples.append(vec.dot(v, hvp(v)))
        if len(samples) >= min_samples:
            res = summarize(samples)
            if res.stderr <= rtol * abs(res.mean):
                return res
    return summarize(samples)


def hutchinson_block_traces(
    hvp: HVP,
    params: Sequence[Tensor],
    block_slices: Sequence[slice],
    *,
    num_samples: int = 16,
    generator: torch.Generator | None = None,
) -> list[TraceResult]:
    """Every block's trace from the same full-model products (the shared, cheaper estimator).

    Args:
        hvp: ``v -> H v`` over all of ``params`` (the union of the blocks).
        params: the parameters, each block a contiguous run of them.
        block_slices: for each block, the slice of ``params`` it owns; slices must not overlap.
        num_samples: full-model probes.
        generator: seeds the probes.

    Returns:
        One :class:`TraceResult` per block, in the order of ``block_slices``.
    """
    if num_samples < 2:
        raise QBHError(f"the shared trace needs at least 2 samples for a standard error, got {num_samples}")
    owned = [i for s in block_slices for i in range(len(params))[s]]
    if len(owned) != len(set(owned)):
        raise QBHError("the shared trace needs disjoint blocks (e.g. not encoder.3 and encoder.3.query together)")
    samples: list[list[float]] = [[] for _ in block_slices]
    for _ in range(num_samples):
        v = vec.rademacher_like(params, generator)
        hv = hvp(v)
        for b, s in enumerate(block_slices):
            samples[b].append(vec.dot(v[s], hv[s]))
    return [summarize(s) for s in samples]


def _orthonormal_basis(columns: Sequence[Sequence[Tensor]], like: Sequence[Tensor]) -> list[list[Tensor]]:
    """An orthonormal basis Q of span(columns) (Householder QR of the d x k matrix), as vectors like ``like``.

    When the columns are rank-deficient, QR still returns k orthonormal columns; the extra ones span directions
    outside H's range, which the split Tr(Q^T H Q) + Tr((I - QQ^T) H (I - QQ^T)) = Tr(H) allows (it holds for
    any orthonormal Q). At most d columns come back.
    """
    Y = torch.stack([vec.flatten(c) for c in columns], dim=1)  # (d, k)
    Q, _ = torch.linalg.qr(Y, mode="reduced")  # (d, min(d, k))
    return [vec.unflatten(Q[:, j].contiguous(), like) for j in range(Q.shape[1])]


def hutchpp_trace(
    hvp: HVP,
    params: Sequence[Tensor],
    *,
    min_samples: int = 16,
    max_samples: int = 256,
    rtol: float = 1e-2,
    sketch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> TraceResult:
    """Estimate Tr(H) by Hutch++: the trace on a sketched top subspace exactly, Hutchinson on the rest.

    The budget counts products as :func:`hutchinson_trace` counts probes, so ``min_samples = max_samples = m``
    compares the two at equal cost: ``sketch_size`` k for H S, up to k for H Q, the rest residual probes.
    Sampling stops once ``min_samples`` products are spent and stderr <= rtol * |mean|, or at ``max_samples``.
    The standard error comes from the residual samples (see the module docstring): it needs at least two.

    Args:
        hvp: ``v -> H v`` over ``params``.
        params: tensors giving the shapes of the probes.
        min_samples: floor on the products (at least 2 * sketch_size + 2).
        max_samples: cap on the products.
        rtol: target relative standard error.
        sketch_size: k, the number of Gaussian sketch vectors (default ``min_samples // 3``, the paper's split
            of a fixed budget into thirds).
        generator: seeds the sketch and the probes.

    Returns:
        A :class:`TraceResult` with ``low_rank`` = Tr(Q^T H Q) and the residual samples.

    Raises:
        QBHError: a budget too small for the sketch plus two residual probes.
    """
    k = min_samples // 3 if sketch_size is None else sketch_size
    if k < 1:
        raise QBHError(f"Hutch++ needs a sketch of at least 1 vector, got {k}; raise min_samples to 4 or more")
    if min_samples < 2 * k + 2 or max_samples < min_samples:
        raise QBHError(
            f"Hutch++ with a sketch of {k} needs {2 * k + 2} <= min_samples <= max_samples (2 x {k} sketch products "
            f"and 2 residual probes for a standard error), got {min_samples} and {max_samples}"
        )
    HS = [hvp(vec.randn_like(params, generator)) for _ in range(k)]  # the sketch itself is not kept
    Q = _orthonormal_basis(HS, params)
    del HS
    low_rank = math.fsum(vec.dot(q, hvp(q)) for q in Q)
    spent = k + len(Q)
    samples: list[float] = []
    while spent + len(samples) < max_samples:
        g = vec.orthogonalize(vec.rademacher_like(params, generator), Q)  # (I - QQ^T) g
        samples.append(vec.dot(g, hvp(g)))
        if spent + len(samples) >= min_samples:
            res = summarize(samples, low_rank=low_rank, sketch_products=spent)
            if res.stderr <= rtol * abs(res.mean):
                return res
    return summarize(samples, low_rank=low_rank, sketch_products=spent)
