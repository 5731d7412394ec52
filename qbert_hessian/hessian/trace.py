"""Hessian traces by Hutchinson's estimator (Hutchinson 1989; Avron & Toledo 2011; HAWQ-V2, PyHessian).

Tr(H) = E[v^T H v] for v with independent Rademacher (+-1) entries; the estimate is the mean of m samples,
with standard error s / sqrt(m) (s the sample standard deviation). HAWQ-V2 scores a block by Tr(H_bb) / n_b.

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
    """Mean of the samples v^T H v, its standard error, and the samples."""

    mean: float
    stderr: float
    samples: list[float]


def summarize(samples: Sequence[float]) -> TraceResult:
    """Mean and standard error of trace samples (stderr is inf with fewer than two samples)."""
    x = np.asarray(samples, dtype=np.float64)
    if x.size == 0:
        raise QBHError("no trace samples to summarise; raise the sample count")
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.inf
    return TraceResult(float(x.mean()), se, [float(s) for s in x])


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
