"""The Lanczos process on a Hessian given as ``hvp(v) -> H v`` (Lanczos 1950; Golub & Van Loan, Sec. 10.1).

From a unit start vector q_1, m steps build an orthonormal Krylov basis Q_m = [q_1..q_m] and the tridiagonal
T_m = Q_m^T H Q_m (diagonal alpha, off-diagonal beta). The eigenvalues of T_m (Ritz values) approach H's
extreme eigenvalues far faster than power iteration at the same number of products: the error decays like
a Chebyshev polynomial in the gap rather than like |lam_2 / lam_1|^m (Kaniel-Paige theory). Every new
vector is re-orthogonalised against the whole basis, so memory grows as m vectors of the block's size.

When to stop: the Ritz pair (theta_j, y_j = Q_m s_j) has the residual ||H y_j - theta_j y_j|| = beta_m |s_mj|
(beta_m is the norm of the next Lanczos vector before normalising), so some eigenvalue of H lies within that
residual of theta_j, and within residual^2 / gap when theta_j is at distance ``gap`` from the rest of the
spectrum (Kato-Temple; Parlett, *The Symmetric Eigenvalue Problem*, Sec. 11.7). The run stops when that error
estimate, with the gap read off the other Ritz values, is at most ``tol`` times |theta_j| for every watched
value. The estimate costs nothing (it comes from T_m) and, unlike "the value moved less than tol since the
last step", it does not ask for one more product once the value has already converged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from . import vec
from .hvp import HVP

Select = Callable[[np.ndarray], np.ndarray]  # ascending Ritz values -> indices of the watched ones


@dataclasses.dataclass
class LanczosResult:
    """Ritz values of the final T_m (ascending), the tridiagonal itself, the basis, and the steps taken.

    The basis is kept flat, one row per Lanczos vector: ``Q`` (m, n), so re-orthogonalisation and Ritz
    vectors are matrix-vector products rather than loops over the basis.
    """

    ritz_values: np.ndarray
    ritz_vectors: np.ndarray  # (m, m): eigenvectors of T_m, columns
    alpha: np.ndarray
    beta: np.ndarray
    Q: Tensor  # (m, n)
    like: list[Tensor]
    steps: int
    converged: bool
    next_beta: float = 0.0  # the norm of the next Lanczos vector before normalising (beta_m)

    @property
    def residuals(self) -> np.ndarray:
        """||H y_j - theta_j y_j|| of every Ritz pair: beta_m |s_mj|, read off T_m without a product."""
        return np.abs(self.next_beta * self.ritz_vectors[-1, :])

    @property
    def basis(self) -> list[list[Tensor]]:
        """The Lanczos vectors q_1..q_m, shaped like the parameters."""
        return [vec.unflatten(q, self.like) for q in self.Q]

    def vector(self, j: int) -> list[Tensor]:
        """The Ritz vector Q_m y_j of the j-th Ritz value (unit norm)."""
        y = torch.as_tensor(self.ritz_vectors[:, j], dtype=self.Q.dtype, device=self.Q.device)
        return vec.normalize(vec.unflatten(self.Q.T @ y, self.like))


def tridiagonal_eigh(alpha: Sequence[float], beta: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of the symmetric tridiagonal matrix with diagonal alpha and off-diagonal beta."""
    m = len(alpha)
    T = np.diag(np.asarray(alpha, dtype=np.float64))
    if m > 1:
        off = np.asarray(beta[: m - 1], dtype=np.float64)
        T += np.diag(off, 1) + np.diag(off, -1)
    return np.linalg.eigh(T)


def ritz_errors(evals: np.ndarray, evecs: np.ndarray, beta: float, which: np.ndarray) -> np.ndarray:
    """Error estimates of the Ritz values ``evals[which]``: min(r, r^2 / gap) with r = beta |s_mj| and the
    gap to the nearest other Ritz value (r alone while there is no other Ritz value)."""
    out = np.empty(len(which))
    for i, j in enumerate(which):
        r = abs(beta * evecs[-1, j])
        others = np.delete(evals, j)
        gap = float(np.min(np.abs(others - evals[j]))) if others.size else 0.0
        out[i] = min(r, r * r / gap) if gap > 0 else r
    return out


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
        tol: stop once the error estimate (:func:`ritz_errors`) of every watched Ritz value is at most
            ``tol`` times its magnitude (0: run all steps, as stochastic Lanczos quadrature wants).
        watch: picks the indices of the watched Ritz values in the ascending array (default: none, so only
            the cap or an invariant subspace stops the run).

    Returns:
        A :class:`LanczosResult`.
    """
    like = list(start)
    q = vec.flatten(vec.normalize(start))
    # A growing buffer of basis rows (doubling), so the basis is one matrix without a copy per step.
    Q = torch.empty((min(max_steps, 8), q.numel()), dtype=q.dtype, device=q.device)
    Q[0] = q
    m = 1
    alpha: list[float] = []
    beta: list[float] = []
    converged = False
    evals, evecs = np.zeros(0), np.zeros((0, 0))
    for step in range(1, max_steps + 1):
        w = vec.flatten(hvp(vec.unflatten(q, like)))
        a = float(torch.dot(q, w))
        alpha.append(a)
        # Full re-orthogonalisation against the whole basis, twice (classical Gram-Schmidt twice is as
        # accurate as modified Gram-Schmidt: Giraud et al. 2005); it subsumes the three-term recurrence.
        basis = Q[:m]
        for _ in range(2):
            w -= basis.T @ (basis @ w)
        b = float(torch.linalg.vector_norm(w))
        evals, evecs = tridiagonal_eigh(alpha, beta)
        if b <= 1e-10 * max(1.0, abs(a)):  # the Krylov space is invariant: the Ritz values are exact
            converged = True
            break
        if watch is not None and tol > 0:
            which = watch(evals)
            if np.all(ritz_errors(evals, evecs, b, which) <= tol * np.abs(evals[which])):
                converged = True
                break
        if step < max_steps:
            beta.append(b)
            q = w / b
            if m == Q.shape[0]:
                grown = torch.empty((min(max_steps, 2 * m), Q.shape[1]), dtype=Q.dtype, device=Q.device)
                grown[:m] = Q
                Q = grown
            Q[m] = q
            m += 1
    steps = len(alpha)
    return LanczosResult(
        evals, evecs, np.asarray(alpha), np.asarray(beta[: steps - 1]), Q[:steps], like, steps, converged, b
    )


def randn_start(params: Sequence[Tensor], generator: torch.Generator | None = None) -> list[Tensor]:
    """A random unit start vector."""
    return vec.normalize(vec.randn_like(params, generator))
