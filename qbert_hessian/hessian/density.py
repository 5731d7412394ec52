"""Hessian eigenvalue density by stochastic Lanczos quadrature (Lin, Saad & Yang 2016; Ghorbani et al. 2019;
PyHessian's ``density``).

For a unit probe v (Rademacher, normalised), m Lanczos steps give T_m = Y diag(theta) Y^T; the nodes theta_i and
weights w_i = Y_{1i}^2 form an m-point Gauss quadrature of the spectral measure of H seen from v:

    v^T f(H) v  ~=  sum_i w_i f(theta_i)          (exact for polynomials f of degree <= 2m - 1)

Averaged over probes, sum_i w_i delta(t - theta_i) estimates the normalised density phi(t) = (1/n) sum_j
delta(t - lambda_j); a Gaussian kernel of width sigma makes it a curve. The weights of each probe sum to one, so
the density's mass is one. Memory is the Lanczos basis only (m vectors, kept for full re-orthogonalisation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from . import vec
from .hvp import HVP
from .lanczos import lanczos


@dataclasses.dataclass
class DensityResult:
    """Quadrature nodes and weights per probe, and the smoothed density on a grid.

    ``nodes`` and ``weights`` are lists (one array per probe; a probe can stop early on an invariant subspace);
    ``grid`` and ``density`` the kernel-smoothed curve (it integrates to about one over the grid).
    """

    nodes: list[np.ndarray]
    weights: list[np.ndarray]
    grid: np.ndarray
    density: np.ndarray
    sigma: float
    steps: int

    @property
    def extremes(self) -> tuple[float, float]:
        """The smallest and largest Ritz values over all probes (they approach lambda_min and lambda_max)."""
        return float(min(n.min() for n in self.nodes)), float(max(n.max() for n in self.nodes))

    def moment(self, k: int) -> float:
        """The quadrature estimate of (1/n) tr(H^k)."""
        return float(np.mean([np.sum(w * n**k) for n, w in zip(self.nodes, self.weights)]))

    def to_dict(self) -> dict:
        return {
            "nodes": [n.tolist() for n in self.nodes],
            "weights": [w.tolist() for w in self.weights],
            "grid": self.grid.tolist(),
            "density": self.density.tolist(),
            "sigma": self.sigma,
            "steps": self.steps,
        }


def gaussian_density(
    nodes: Sequence[np.ndarray], weights: Sequence[np.ndarray], *, num_points: int = 1000, sigma: float | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Smooth the quadrature with Gaussian kernels; ``sigma`` defaults to 1/100 of the spectrum's width."""
    lo = min(float(n.min()) for n in nodes)
    hi = max(float(n.max()) for n in nodes)
    width = max(hi - lo, 1e-12)
    sigma = sigma if sigma is not None else width / 100
    grid = np.linspace(lo - 3 * sigma, hi + 3 * sigma, num_points)
    density = np.zeros_like(grid)
    for n, w in zip(nodes, weights):
        density += (w[None, :] * np.exp(-((grid[:, None] - n[None, :]) ** 2) / (2 * sigma**2))).sum(1)
    density /= len(nodes) * np.sqrt(2 * np.pi) * sigma
    return grid, density, sigma


def slq_density(
    hvp: HVP,
    params: Sequence[Tensor],
    *,
    steps: int = 80,
    num_probes: int = 1,
    sigma: float | None = None,
    num_points: int = 1000,
    generator: torch.Generator | None = None,
) -> DensityResult:
    """The eigenvalue density of the operator ``hvp`` by stochastic Lanczos quadrature.

    Args:
        hvp: ``v -> H v`` over ``params``.
        params: tensors giving the shapes of the vectors.
        steps: Lanczos steps per probe (PyHessian: 100); memory holds this many vectors.
        num_probes: Rademacher probes averaged (PyHessian: 1).
        sigma: kernel width (default: 1/100 of the spectrum's width).
        num_points: grid points of the smoothed curve.
        generator: seeds the probes.

    Returns:
        A :class:`DensityResult`.
    """
    nodes, weights = [], []
    for _ in range(num_probes):
        probe = vec.rademacher_like(params, generator)
        res = lanczos(hvp, probe, max_steps=steps)  # tol 0: run every step (stops only on an invariant subspace)
        nodes.append(np.asarray(res.ritz_values, dtype=np.float64))
        weights.append(np.asarray(res.ritz_vectors[0, :], dtype=np.float64) ** 2)
    grid, density, sigma = gaussian_density(nodes, weights, num_points=num_points, sigma=sigma)
    return DensityResult(nodes, weights, grid, density, sigma, steps)


def smooth_alike(results: Sequence[DensityResult], *, fraction: float = 1 / 200, num_points: int = 1000) -> None:
    """Re-smooth several densities with one kernel width (``fraction`` of their joint spectrum's width), in place,
    so their curves can be compared on one plot."""
    lo = min(r.extremes[0] for r in results)
    hi = max(r.extremes[1] for r in results)
    sigma = max(hi - lo, 1e-12) * fraction
    for r in results:
        r.grid, r.density, r.sigma = gaussian_density(r.nodes, r.weights, num_points=num_points, sigma=sigma)
