"""The Lanczos process on a Hessian given as ``hvp(v) -> H v`` (Lanczos 1950; Golub & Van Loan, Sec. 10.1).

From a unit start vector q_1, m steps build an orthonormal Krylov basis Q_m = [q_1..q_m] and the tridiagonal
T_m = Q_m^T H Q_m (diagonal alpha, off-diagonal beta). The eigenvalues of T_m (Ritz values) approach H's
extreme eigenvalues far faster than power iteration at the same number of products: the error decays like
a Chebyshev polynomial in the gap rather than like |lam_2 / lam_1|^m (Kaniel-Paige theory). Every new
vector is re-orthogonalised against the whole basis, so memory grows as m vectors of the block's size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from . import vec
from .hvp import HVP

Select = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass
class LanczosResult:
    """Ritz values of the final T_m (ascending), the tridiagonal itself, the basis, and the steps taken."""

    ritz_values: np.ndarray
    ritz_vectors: np.ndarray  # (m, m): eigenvectors of T_m, columns
    alpha: np.ndarray
    beta: np.ndarray
    basis: list[list[Tensor]]
    steps: int
    converged: bool

    def vector(self, j: int) -> list[Tensor]:
        """The Ritz vector Q_m y_j of the j-th Ritz value (unit norm)."""
        y = self.ritz_vectors[:, j]
        out = vec.scale(float(y[0]), self.basis[0])
        for coef, q in zip(y[1:], self.basis[1:]):
            out = vec.axpy(float(coef), q, out)
        return vec.normalize(out)


def tridiagonal_eigh(alpha: Sequence[float], beta: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of the symmetric tridiagonal matrix with diagonal alpha and off-diagonal beta."""
    m = len(alpha)
    T = np.diag(np.asarray(alpha, dtype=np.float64))
    if m > 1:
        off = np.asarray(beta[: m - 1], dtype=np.float64)
        T += np.diag(off, 1) + np.diag(off, -1)
    return np.linalg.eigh(T)


def lanczos(
    hvp: HVP,
    start: Sequence[Tensor],
    *,
    max_steps: int,
    tol: float = 0.0,
    watch: Select | None = None,
) -> LanczosResult:
    """Run up to ``max_steps`` Lanczos steps with full re-orthogonalisation.

    Args:
        hvp: ``v -> H v``.
        start: the start vector (normalised here); a good guess of the wanted eigenvector shortens the run.
        max_steps: cap on products.
        tol: stop once every watched Ritz value changed by at most ``tol`` times its magnitude since the
            previous step (0: run all steps, as stochastic Lanczos quadrature wants).
        watch: picks the watched Ritz values from the ascending array (default: none, so only the cap or
            an invariant subspace stops the run).

    Returns:
        A :class:`LanczosResult`.
    """
    q = vec.normalize(start)
    basis: list[list[Tensor]] = [q]
    alpha: list[float] = []
    beta: list[float] = []
    previous: np.ndarray | None = None
    converged = False
    evals, evecs = np.zeros(0), np.zeros((0, 0))
    for step in range(1, max_steps + 1):
        w = hvp(q)
        a = vec.dot(q, w)
        alpha.append(a)
        w = vec.axpy(-a, q, w)
        if len(basis) > 1:
            w = vec.axpy(-beta[-1], basis[-2], w)
        # Full re-orthogonalisation (twice is enough: Giraud et al. 2005) keeps ghost eigenvalues away.
        w = vec.orthogonalize(vec.orthogonalize(w, basis), basis)
        b = vec.norm(w)
        evals, evecs = tridiagonal_eigh(alpha, beta)
        if watch is not None and tol > 0:
            current = watch(evals)
            if (
                previous is not None
                and previous.shape == current.shape
                and np.all(np.abs(current - previous) <= tol * np.abs(current))
            ):
                converged = True
                break
            previous = current
        if b <= 1e-10 * max(1.0, abs(a)):  # the Krylov space is invariant: the Ritz values are exact
            converged = True
            break
        if step < max_steps:
            beta.append(b)
            q = vec.scale(1.0 / b, w)
            basis.append(q)
    steps = len(alpha)
    return LanczosResult(
        evals, evecs, np.asarray(alpha), np.asarray(beta[: steps - 1]), basis[:steps], steps, converged
    )


def randn_start(params: Sequence[Tensor], generator: torch.Generator | None = None) -> list[Tensor]:
    """A random unit start vector."""
    return vec.normalize(vec.randn_like(params, generator))
