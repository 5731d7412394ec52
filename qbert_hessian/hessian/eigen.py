"""Extreme Hessian eigenvalues by power iteration with deflation (Yao et al. 2020, PyHessian; Q-BERT Sec. 3).

Power iteration v_{t+1} = H v_t / ||H v_t|| converges to the eigenvector of the largest-magnitude eigenvalue
at the rate |lam_2 / lam_1|; the Rayleigh quotient lam_t = v_t^T H v_t estimates it with its sign (a negative
top eigenvalue means the point is not a minimum along that direction: a finding, not an error). It stops when
|lam_t - lam_{t-1}| <= tol * |lam_t| (PyHessian's rule) and the residual ||H v_t - lam_t v_t|| is at most
sqrt(tol) |lam_t|, or after ``max_iters`` products. A converged iterate meets the residual bound anyway (its
angle to the eigenvector is about sqrt(tol)); it is there for a warm start that is no eigenvector but whose
first two estimates happen to agree, which the change rule alone would accept (seen on a GPU: 0.27 reported
for an eigenvalue of -6.3 after two products). The next eigenvalues come from the same
iteration with every iterate orthogonalised against the eigenvectors already found (deflation).

The most negative eigenvalue is the dominant eigenvalue of the shifted operator H - sigma I with sigma the
top (positive) eigenvalue: its spectrum lies in [lam_min - sigma, 0], so power iteration finds
lam_min - sigma, and lam_min follows.

:func:`lanczos_eigenvalues` answers the same questions from the Ritz values of a Lanczos run, in far fewer
products; it stops when the residual-based error estimate of the wanted values is at most tol relative
(:mod:`.lanczos`), and gives the most negative eigenvalue from the same run.

Certified low-precision eigenvalues (:func:`certified_lanczos_eigenvalues`): Lanczos runs on a cheap operator
H~ (bf16 products, about 1% off H), then each wanted Ritz vector y (unit) is checked with one product of the
exact operator H: the Rayleigh quotient rho = y^T H y and the residual r = ||H y - rho y||. For symmetric H some
eigenvalue lies within r of rho, and within r^2 / delta when the rest of the spectrum is at least delta > r away
from rho (Kato-Temple; Parlett, *The Symmetric Eigenvalue Problem*, Sec. 10.5 and 11.7). The quotient is
accurate to second order in the vector's error, so a vector from H~ gives rho to about (1%)^2 relative. The gap
delta is read off H~'s other Ritz values, each moved towards rho by its own residual and by what separates H~
from H along y (|theta - rho| + r~ + r): an estimate, as in the stopping rule. When the bound misses
``tol`` |rho|, Lanczos continues on H from y until its own rule holds, so every value returned meets the exact
operator's criterion.

The functions take an ``hvp(v) -> H v`` callable and never see a model or a batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from . import vec
from .hvp import HVP
from .lanczos import lanczos, randn_start


@dataclasses.dataclass
class EigenResult:
    """Eigenvalues (largest magnitude first), their unit eigenvectors, steps taken and convergence flags."""

    values: list[float]
    vectors: list[list[Tensor]]
    iters: list[int]
    converged: list[bool]
    smallest: float | None = None  # the most negative eigenvalue, when asked for


def _power_iteration(
    hvp: HVP,
    v: list[Tensor],
    deflate: Sequence[list[Tensor]],
    max_iters: int,
    tol: float,
) -> tuple[float, list[Tensor], int, bool]:
    """One eigenpair of the operator ``hvp`` restricted to the complement of ``deflate``."""
    v = vec.normalize(vec.orthogonalize(v, deflate))
    lam: float | None = None
    for it in range(1, max_iters + 1):
        hv = vec.orthogonalize(hvp(v), deflate)
        lam_new = vec.dot(v, hv)  # Rayleigh quotient of the unit vector v
        hv_norm = vec.norm(hv)
        if hv_norm == 0.0:  # v lies in the null space: the eigenvalue is 0, exactly
            return 0.0, v, it, True
        # ||H v - lam v||^2 = ||H v||^2 - lam^2 for a unit v: the residual comes free.
        residual = max(hv_norm**2 - lam_new**2, 0.0) ** 0.5
        v = vec.scale(1.0 / hv_norm, hv)
        if lam is not None and abs(lam_new - lam) <= tol * abs(lam_new) and residual <= tol**0.5 * abs(lam_new):
            return lam_new, v, it, True
        lam = lam_new
    assert lam is not None
    return lam, v, max_iters, False


def top_eigenvalues(
    hvp: HVP,
    params: Sequence[Tensor],
    *,
    k: int = 1,
    max_iters: int = 100,
    tol: float = 1e-3,
    init: Sequence[list[Tensor]] | None = None,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """The ``k`` largest-magnitude eigenvalues of the Hessian, each with its sign.

    Args:
        hvp: ``v -> H v`` over ``params``.
        params: tensors giving the shapes of the vectors.
        k: number of eigenpairs (deflation after each).
        max_iters: cap on products per eigenvalue.
        tol: relative change of the Rayleigh quotient between steps at which an eigenvalue is accepted (its
            residual must also be at most sqrt(tol) times its magnitude).
        init: optional start vectors (e.g. last draw's eigenvectors: a warm start); random ones otherwise.
        generator: seeds the random start vectors.

    Returns:
        An :class:`EigenResult` with ``k`` entries.

    Example:
        >>> res = top_eigenvalues(BlockHessian(model, params, [batch]), params, k=2)
        >>> res.values  # e.g. [41.2, -3.1]
    """
    values, vectors, iters, converged = [], [], [], []
    for i in range(k):
        start = list(init[i]) if init is not None and i < len(init) else vec.randn_like(params, generator)
        lam, v, it, ok = _power_iteration(hvp, start, vectors, max_iters, tol)
        values.append(lam)
        vectors.append(v)
        iters.append(it)
        converged.append(ok)
    return EigenResult(values, vectors, iters, converged)


def most_negative_eigenvalue(
    hvp: HVP,
    params: Sequence[Tensor],
    *,
    shift: float,
    max_iters: int = 100,
    tol: float = 1e-3,
    init: list[Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """The smallest (most negative) eigenvalue, by power iteration on ``H - shift * I``.

    Args:
        hvp: ``v -> H v`` over ``params``.
        params: tensors giving the shapes of the vectors.
        shift: the largest-magnitude eigenvalue (from :func:`top_eigenvalues`). If it is negative it is
            already the most negative eigenvalue and is returned as is, with ``init`` (pass the top eigenvector
            there, or the returned vector is only a random unit vector) and no products.
        max_iters, tol, init, generator: as in :func:`top_eigenvalues`.

    Returns:
        An :class:`EigenResult` with one entry.
    """
    if shift <= 0:
        # The largest-magnitude eigenvalue is negative, so it is the most negative one: no products needed.
        v = vec.normalize(init if init is not None else vec.randn_like(params, generator))
        return EigenResult([shift], [v], [0], [True])
    shifted: HVP = lambda v: vec.axpy(-shift, v, hvp(v))  # noqa: E731  (H - sigma I) v
    start = init if init is not None else vec.randn_like(params, generator)
    mu, v, it, ok = _power_iteration(shifted, start, [], max_iters, tol)
    return EigenResult([mu + shift], [v], [it], [ok])


def lanczos_eigenvalues(
    hvp: HVP,
    params: Sequence[Tensor],
    *,
    k: int = 1,
    max_iters: int = 100,
    tol: float = 1e-3,
    most_negative: bool = False,
    init: list[Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """The ``k`` largest-magnitude eigenvalues (and optionally the smallest) from one Lanczos run.

    The run stops when the error estimate of each watched Ritz value (the ``k`` of largest magnitude, plus the
    smallest when ``most_negative``) is at most ``tol`` relative to its magnitude
    (:func:`~qbert_hessian.hessian.lanczos.ritz_errors`), or after ``max_iters`` products. The returned
    vectors are the Ritz vectors (unit norm), fit for a warm start.

    Args:
        hvp: ``v -> H v`` over ``params``.
        params: tensors giving the shapes of the vectors.
        k: number of largest-magnitude eigenvalues.
        max_iters: cap on products (and on the basis kept in memory).
        tol: relative error estimate at which the watched Ritz values are accepted.
        most_negative: also return the smallest eigenvalue in ``EigenResult.smallest``.
        init: start vector (e.g. last draw's top eigenvector); random otherwise.
        generator: seeds the random start vector.

    Returns:
        An :class:`EigenResult` whose ``iters`` holds the number of products for every entry.
    """

    def top_k(evals: np.ndarray) -> np.ndarray:
        order = np.argsort(-np.abs(evals), kind="stable")[:k]
        return np.union1d(order, [0]) if most_negative else order

    start = list(init) if init is not None else randn_start(params, generator)
    res = lanczos(hvp, start, max_steps=max_iters, tol=tol, watch=top_k)
    order = np.argsort(-np.abs(res.ritz_values), kind="stable")[:k]
    return EigenResult(
        values=[float(res.ritz_values[j]) for j in order],
        vectors=[res.vector(int(j)) for j in order],
        iters=[res.steps] * len(order),
        converged=[res.converged] * len(order),
        smallest=float(res.ritz_values[0]) if most_negative else None,
    )


@dataclasses.dataclass
class Certificate:
    """One exact product's verdict on an approximate unit eigenvector y: the Rayleigh quotient ``value`` =
    y^T H y, the ``residual`` ||H y - value y||, and ``product`` = H y."""

    value: float
    residual: float
    product: list[Tensor]


def rayleigh_check(hvp: HVP, y: list[Tensor]) -> Certificate:
    """The :class:`Certificate` of the unit vector ``y``: one product of ``hvp``."""
    hy = hvp(y)
    rho = vec.dot(y, hy)
    return Certificate(rho, vec.norm(vec.axpy(-rho, y, hy)), hy)


def residual_bound(residual: float, gap: float) -> float:
    """A bound on |lambda - rho| for the eigenvalue lambda nearest rho: the residual r, or r^2 / gap when the
    rest of the spectrum is at least ``gap`` > r away from rho (Kato-Temple)."""
    return min(residual, residual * residual / gap) if gap > residual else residual


def certified_lanczos_eigenvalues(
    hvp_low: HVP,
    hvp: HVP,
    params: Sequence[Tensor],
    *,
    k: int = 1,
    max_iters: int = 100,
    tol: float = 1e-3,
    most_negative: bool = False,
    init: list[Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """:func:`lanczos_eigenvalues` on the cheap operator ``hvp_low``, every returned value certified on ``hvp``.

    Lanczos runs on ``hvp_low`` (e.g. bf16 products) as :func:`lanczos_eigenvalues` would. Each watched Ritz
    vector (the ``k`` of largest magnitude, and the smallest with ``most_negative``) then costs one product of
    ``hvp``: its Rayleigh quotient is the value returned when :func:`residual_bound`, with the gap read off
    the other Ritz values (module docstring), is at most ``tol`` times its magnitude for every watched value.
    Otherwise Lanczos continues on ``hvp`` from the top Ritz vector (its product reused) until its own rule
    holds, and returns that run's values: either way within ``tol`` of ``hvp``'s (by the estimates the
    float32 engine stops on).

    Args:
        hvp_low: the cheap ``v -> H~ v`` the search runs on.
        hvp: the exact ``v -> H v`` that certifies.
        params, k, max_iters, tol, most_negative, init, generator: as in :func:`lanczos_eigenvalues`
            (``max_iters`` caps each of the two runs).

    Returns:
        An :class:`EigenResult` whose ``iters`` holds every product made (both operators) for every entry.
    """

    def watched(evals: np.ndarray) -> np.ndarray:
        order = np.argsort(-np.abs(evals), kind="stable")[:k]
        return np.union1d(order, [0]) if most_negative else order

    start = list(init) if init is not None else randn_start(params, generator)
    res = lanczos(hvp_low, start, max_steps=max_iters, tol=tol, watch=watched)
    theta, low_residuals = res.ritz_values, res.residuals
    top = np.argsort(-np.abs(theta), kind="stable")[:k]
    products = res.steps
    certs: dict[int, tuple[list[Tensor], Certificate]] = {}
    missed: list[int] = []
    for j in dict.fromkeys([*top.tolist(), *([0] if most_negative else [])]):
        y = res.vector(j)
        c = rayleigh_check(hvp, y)
        products += 1
        certs[j] = (y, c)
        # H~'s other Ritz values, each moved towards rho by its own residual and by H~'s distance from H along y
        slack = abs(theta[j] - c.value) + low_residuals[j] + c.residual
        others = np.delete(np.abs(theta - c.value) - low_residuals, j)
        gap = float(others.min()) - slack if others.size else 0.0
        if residual_bound(c.residual, gap) > tol * abs(c.value):
            missed.append(j)
    if not missed:
        by_value = sorted(top.tolist(), key=lambda j: -abs(certs[j][1].value))
        return EigenResult(
            values=[certs[j][1].value for j in by_value],
            vectors=[certs[j][0] for j in by_value],
            iters=[products] * len(by_value),
            converged=[True] * len(by_value),
            smallest=certs[0][1].value if most_negative else None,
        )
    # fp32 Lanczos from the top vector plus every vector that missed (a start along the top vector alone holds
    # only bf16 noise of a missed most-negative one); H is linear, so the start's product is the sum of theirs
    parts = [certs[j] for j in dict.fromkeys([int(top[0]), *missed])]
    y = [sum(ts) for ts in zip(*(v for v, _ in parts))]
    size = vec.norm(y)  # Lanczos normalises its start, so the known product is scaled with it
    y = vec.scale(1.0 / size, y)
    known = [vec.scale(1.0 / size, [sum(ts) for ts in zip(*(c.product for _, c in parts))])]

    def exact(v: list[Tensor]) -> list[Tensor]:  # the first product is y's, already made
        return known.pop() if known else hvp(v)

    out = lanczos_eigenvalues(
        exact, params, k=k, max_iters=max_iters, tol=tol, most_negative=most_negative, init=y, generator=generator
    )
    out.iters = [products + out.iters[0] - 1] * len(out.iters)
    return out
