"""Algebra on vectors stored as lists of tensors, one tensor per parameter (PyHessian's ``utils``, typed).

A "vector" is ``list[Tensor]`` shaped like a block's parameters; all functions are pure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

Vec = list[Tensor]


def dot(x: Sequence[Tensor], y: Sequence[Tensor]) -> float:
    """Inner product sum_i <x_i, y_i>: one BLAS dot per tensor (no copies), the partial sums added in float64."""
    return math.fsum(float(torch.dot(a.reshape(-1), b.reshape(-1))) for a, b in zip(x, y, strict=True))


def norm(x: Sequence[Tensor]) -> float:
    """Euclidean norm of the concatenated vector."""
    return dot(x, x) ** 0.5


def axpy(alpha: float, x: Sequence[Tensor], y: Sequence[Tensor]) -> Vec:
    """alpha * x + y."""
    return [torch.add(b, a, alpha=alpha) for a, b in zip(x, y, strict=True)]


def scale(alpha: float, x: Sequence[Tensor]) -> Vec:
    """alpha * x."""
    return [alpha * a for a in x]


def normalize(x: Sequence[Tensor]) -> Vec:
    """x / ||x||; a zero vector is returned unchanged."""
    n = norm(x)
    return list(x) if n == 0.0 else scale(1.0 / n, x)


def orthogonalize(x: Sequence[Tensor], basis: Sequence[Sequence[Tensor]]) -> Vec:
    """Remove from x its components along each (orthonormal) vector of ``basis`` (modified Gram-Schmidt)."""
    out = list(x)
    for b in basis:
        out = axpy(-dot(out, b), b, out)
    return out


def randn_like(params: Sequence[Tensor], generator: torch.Generator | None = None) -> Vec:
    """A standard normal vector shaped like ``params``."""
    return [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]


def rademacher_like(params: Sequence[Tensor], generator: torch.Generator | None = None) -> Vec:
    """A vector of independent +-1 entries shaped like ``params`` (Hutchinson's probe)."""
    return [
        (torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int8) * 2 - 1).to(p.dtype).to(p.device)
        for p in params
    ]


def flatten(x: Sequence[Tensor]) -> Tensor:
    """Concatenate into one 1-D tensor."""
    return torch.cat([a.reshape(-1) for a in x])


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> Vec:
    """Split a 1-D tensor into tensors shaped like ``like``."""
    out, i = [], 0
    for p in like:
        out.append(flat[i : i + p.numel()].view_as(p))
        i += p.numel()
    return out
