"""How a group's quantization range is chosen: its max, an MSE clipping search, or a learned step (LSQ).

One place for the step s_g (and zero point z_g) of every group, used by ``functional.py`` (fake quantization and
the allocator's error table) and by QAT. Every scale is rounded *up* to float16, the precision it is stored in,
so a fake-quantized weight, its packed checkpoint and the reload are bit-for-bit the same.

``max`` (Q-BERT): the range is the group's own extent, nothing is clipped.

    symmetric:   s = fp16_up(max|W_g| / ((2^b - 1) / 2))
    asymmetric:  s = fp16_up((max W_g - min W_g) / (2^b - 1)),  z = round(-min W_g / s)

``mse``: the range shrunk by the clipping ratio r in a grid of ``NUM_RATIOS`` values in [``MIN_RATIO``, 1] that
minimises the group's squared error, evaluated with the exact fp16 scale it would store:

    r*_g = argmin_r || Q(W_g; s_g(r)) - W_g ||^2,   s_g(r) = s_g of ``max`` with max -> r * max, min -> r * min

r = 1 (the ``max`` range) is in the grid and ties keep the larger ratio, so no group ever does worse than
``max``. This is the grid search of GPTQ's ``quant.py`` (``mse=True``, Frantar et al. 2023) and of ACIQ-style
clipping (Banner et al. 2019): at 2-3 bits clipping a few outliers buys a finer step for the bulk of the weights.

The search (:func:`search_ratios`) chooses exactly what quantizing the group at all 100 ratios chooses
(:func:`search_ratios_dense`, the reference), bit for bit, at a fraction of the cost: a lower bound from the
group's extreme values (the clipped values' error alone) rules out the ratios that cannot beat r = 1, and with
few levels the rest are scored from the sorted group in O(2^b log n) each (per level: count, sum and sum of
squares from prefix sums), so that only the ratios within a margin far above float rounding of the best are
quantized. On MiniLM-L6 (one CPU thread) a layer's cost table at 128 groups and widths 2, 3, 4, 8 takes 0.4 s
instead of 2-4 s (``benchmarks/range_search.py``), the whole model's (4 groupings, widths 2-8) 45 s instead of 337 s.

Activation ranges (a linear's input x, symmetric, s = amax / (2^(b-1) - 1), ``modules.ActQuant``), static ones
chosen from the |x| the calibration batches give the site (a seeded sample of at most ``ACT_SAMPLES`` values when
there are more; every value otherwise) and their exact maximum, the peak:

    percentile:  amax = the ``ACT_PERCENTILE``-th percentile of |x| (the smallest value with at least that share of
                 the values at or below it: numpy's ``inverted_cdf``), :func:`percentile_amax`
    mse:         amax = r* peak, r* = argmin_r sum_x (Q(x; r peak) - x)^2 over the ``NUM_RATIOS`` ratios of
                 :func:`clip_ratios` (r = 1, the peak, first; ties keep the larger), :func:`mse_amax`

BERT's activations have a few outlier channels (Bondarenko et al. 2021, "Understanding and Overcoming the
Challenges of Efficient Transformer Quantization"): a range that holds them leaves the bulk of the values a few
of the 255 levels; clipping them trades their error against a finer step for everything else.

Learned (LSQ, Esser et al., ICLR 2020): the step is a trainable parameter initialised from one of the above;
the forward uses fp16_up(s), the backward the LSQ gradient with the gradient scale
g = 1 / sqrt(numel_per_group * qmax) (:func:`learned_step`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

# The names of the range methods, the default and the check live in the torch-free config.py (plans and
# profiles validate them too); they are re-exported here beside the methods themselves.
from ..config import ACT_PERCENTILE, DEFAULT_RANGE_METHOD, RANGE_METHODS, check_range_method  # noqa: F401

NUM_RATIOS = 100
# The most values of |x| an activation site keeps from its calibration batches to choose a static range from (the
# percentile a ``percentile`` range keeps, ACT_PERCENTILE, lives in config.py with the names of the methods).
ACT_SAMPLES = 2**18
MIN_RATIO = 0.05
# Smallest normal float16: a scale below it would lose precision when stored.
MIN_SCALE = 2.0**-14
# Elements of one (ratios, groups, group size) block of the search: ~5 temporaries of 4 MiB, which stay in the
# CPU's cache (blocks of 2**22 ran 3-5x slower, memory-bound).
CHUNK_ELEMENTS = 2**20
# Values from each end of a group whose clipping bounds a ratio's error from below (:func:`clip_bound`), and the
# relative margin above float rounding (~1e-6 for these sums) by which the bound must exceed the error at
# ratios[0] before a ratio is skipped, so skipping never changes the choice.
TOP_K = 32
PRUNE_MARGIN = 1e-4
# The cost of the binned search against quantizing, in units of quantizing one value at one ratio (measured on
# one CPU thread): sorting a value and its prefix sums, and scoring one level of one ratio by binary search.
SORT_COST = 12
LEVEL_COST = 30


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """``(qmin, qmax)``: [-2^(b-1), 2^(b-1)-1] symmetric, [0, 2^b-1] asymmetric."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def fp16_up(scale: Tensor) -> Tensor:
    """Round a float32 scale up to a float16-representable value (as float32)."""
    s = scale.clamp(min=MIN_SCALE, max=60000.0)
    h = s.half()
    h = torch.where(h.float() < s, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return h.float()


def encode(g: Tensor, scale: Tensor, zero: Tensor | None, qmin: int, qmax: int) -> Tensor:
    """Integer codes (as floats) of grouped values: clamp(round(g / s) + z, qmin, qmax).

    ``g`` (..., groups, n); ``scale`` and ``zero`` (..., groups).
    """
    v = torch.round(g / scale[..., None])
    if zero is not None:
        v = v + zero[..., None]
    return v.clamp_(qmin, qmax)


def decode(codes: Tensor, scale: Tensor, zero: Tensor | None) -> Tensor:
    """(codes - z) * s, the dequantized values; shapes as in :func:`encode`."""
    q = codes if zero is None else codes - zero[..., None]
    return q * scale[..., None]


def clipped_range(lo: Tensor, hi: Tensor, ratio: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor | None]:
    """The fp16 scale and zero point of the range [r * lo, r * hi] (symmetric: [-r * hi, r * hi]).

    ``lo`` and ``hi`` (groups,) are min(min W_g, 0) and max(max W_g, 0), or -max|W_g| and max|W_g| when symmetric;
    ``ratio`` broadcasts against them (r = 1 gives the ``max`` range exactly).
    """
    if symmetric:
        return fp16_up(ratio * hi / ((2**bits - 1) / 2)), None
    qmin, qmax = code_range(bits, symmetric)
    scale = fp16_up((ratio * hi - ratio * lo) / (2**bits - 1))
    zero = torch.clamp(torch.round(-(ratio * lo) / scale), qmin, qmax)
    return scale, zero


def group_extent(g: Tensor, symmetric: bool) -> tuple[Tensor, Tensor]:
    """``(lo, hi)`` per group of ``g`` (groups, n): the range that clips nothing."""
    if symmetric:
        amax = g.abs().amax(dim=1)
        return -amax, amax
    return g.amin(dim=1).clamp(max=0), g.amax(dim=1).clamp(min=0)


def clip_ratios(num: int = NUM_RATIOS, lowest: float = MIN_RATIO) -> Tensor:
    """The candidate ratios, largest first: 1.0 (``max``) down to ``lowest``."""
    return torch.linspace(1.0, lowest, num)


def squared_errors(g: Tensor, scale: Tensor, zero: Tensor | None, bits: int, symmetric: bool) -> Tensor:
    """||Q(g) - g||^2 per group under the given scales: g (groups, n), scale (..., groups) -> (..., groups)."""
    qmin, qmax = code_range(bits, symmetric)
    return (decode(encode(g, scale, zero, qmin, qmax), scale, zero) - g).pow_(2).sum(dim=-1)


def clip_bound(top: Tensor, bottom: Tensor, scale: Tensor, zero: Tensor | None, bits: int, symmetric: bool) -> Tensor:
    """A lower bound on ||Q(g) - g||^2 from a group's k largest and k smallest values alone.

    Every value above the top level m_hi s rounds to it (below the bottom level m_lo s: to that), so its error
    is exactly (w - m_hi s)^2; summing that over the values among the k largest (smallest) that lie beyond
    leaves out only other values' errors, all >= 0:

        ||Q(g) - g||^2  >=  sum_{top k} relu(w - m_hi s)^2 + sum_{bottom k} relu(m_lo s - w)^2

    Args:
        top, bottom: (groups, k) the k largest values and the negated k smallest (``topk(-g)``).
        scale, zero: (R, groups) candidate scales and zero points (None: symmetric).
        bits, symmetric: the code range.

    Returns:
        (R, groups) the bound for each candidate.
    """
    qmin, qmax = code_range(bits, symmetric)
    z = zero if zero is not None else torch.zeros_like(scale)
    high = (top - ((qmax - z) * scale)[..., None]).clamp_(min=0).pow_(2).sum(dim=-1)  # (R, groups, k) -> (R, groups)
    low = (bottom + ((qmin - z) * scale)[..., None]).clamp_(min=0).pow_(2).sum(dim=-1)
    return high + low


def sorted_sums(g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each group's values sorted (float32), with their prefix sums and prefix sums of squares (float64).

    ``g`` (groups, n) -> ``v`` (groups, n), ``p1`` and ``p2`` (groups, n + 1) with ``p[:, 0] = 0``. On the CPU
    numpy sorts (its SIMD sort is ~7x torch's here).
    """
    if g.device.type == "cpu":
        v = torch.from_numpy(np.sort(g.detach().numpy(), axis=1))
    else:
        v = torch.sort(g, dim=1).values
    zero = torch.zeros(v.shape[0], 1, dtype=torch.float64, device=v.device)
    v64 = v.double()
    return v, torch.cat([zero, v64.cumsum(1)], dim=1), torch.cat([zero, v64.square_().cumsum(1)], dim=1)


def binned_errors(
    v: Tensor, p1: Tensor, p2: Tensor, scale: Tensor, zero: Tensor | None, bits: int, symmetric: bool
) -> Tensor:
    """||Q(g) - g||^2 per group under each of R candidate scales, from the sorted values (:func:`sorted_sums`).

    Q maps every value to the nearest level m s (m = code - z): the values that meet level m lie between the
    half-way points (m -/+ 1/2) s (the outer levels take everything beyond). A binary search finds those points
    in the sorted values, and the prefix sums give each level's count n_m, sum S1_m and sum of squares S2_m:

        ||Q(g) - g||^2 = sum_m  S2_m - 2 (m s) S1_m + n_m (m s)^2

    O(2^b log n) per group and scale instead of the O(n) of quantizing. It equals :func:`squared_errors` up to
    rounding: the sums are float64, a value exactly half-way costs (s/2)^2 on either side (the rule for ties
    does not matter), and one within float32 rounding of a half-way point moves the sum by as little.

    Args:
        v, p1, p2: :func:`sorted_sums` of the groups: (groups, n), (groups, n + 1), (groups, n + 1).
        scale, zero: (R, groups) candidate fp16 scales and zero points (None: symmetric).
        bits, symmetric: the code range.

    Returns:
        (R, groups) float64 errors.
    """
    qmin, qmax = code_range(bits, symmetric)
    levels = qmax - qmin + 1
    R, G = scale.shape
    s = scale.double().T  # (G, R)
    m0 = qmin - (zero.double().T if zero is not None else torch.zeros_like(s))  # the lowest level's m
    m = m0[..., None] + torch.arange(levels, dtype=torch.float64, device=v.device)  # (G, R, levels)
    halfway = ((m[..., :-1] + 0.5) * s[..., None]).to(v.dtype)  # (G, R, levels - 1)
    below = torch.searchsorted(v, halfway.reshape(G, -1)).view(G, R, levels - 1)  # values under each point
    edges = torch.cat([below.new_zeros(G, R, 1), below, below.new_full((G, R, 1), v.shape[1])], dim=-1)
    at = edges.view(G, -1)  # (G, R * (levels + 1))
    s1 = p1.gather(1, at).view(G, R, levels + 1).diff(dim=-1)  # (G, R, levels): each level's sum
    s2 = p2.gather(1, at).view(G, R, levels + 1).diff(dim=-1)
    q = m * s[..., None]  # the levels' values
    return (s2 - 2 * q * s1 + edges.diff(dim=-1) * q * q).sum(dim=-1).T


@torch.no_grad()
def search_ratios(g: Tensor, bits: int, symmetric: bool, ratios: Tensor | None = None) -> Tensor:
    """Per-group clipping ratio with the least squared error over ``ratios``, all groups at once (chunked).

    The choice of trying every ratio by quantizing (:func:`search_ratios_dense`: the first of the least float32
    errors, in the order given), bit for bit, quantizing only the ratios that can win:

    1. A ratio whose :func:`clip_bound` (a lower bound on its error) exceeds the error at ``ratios[0]`` by more
       than ``PRUNE_MARGIN`` is worse than ``ratios[0]``; each group keeps its ratios up to its last one that
       is not (at 8 bits on 128 groups of a BERT matrix ~10 of the 100, at 2 bits nearly all).
    2. Of those, a chunk of groups either quantizes every one (O(n) each), or, where it costs less
       (``SORT_COST``, ``LEVEL_COST``: few levels, large groups), scores them by :func:`binned_errors` (exact up
       to float64 rounding) and quantizes only the ratios within ``PRUNE_MARGIN`` of its least of those.

    ``PRUNE_MARGIN`` (1e-4) is far above the float32 rounding of an error (~1e-6), so neither shortcut drops a
    ratio the dense search could choose. As there, no group does worse than ``ratios[0]`` (r = 1: ``max``).

    Args:
        g: grouped weights (groups, n), float32.
        bits: width b.
        symmetric: symmetric or asymmetric ranges.
        ratios: candidate ratios (default :func:`clip_ratios`); put 1.0 first to never do worse than ``max``.

    Returns:
        The chosen ratio per group (groups,); :func:`clipped_range` turns it into the scale and zero point.
    """
    ratios = (clip_ratios() if ratios is None else ratios).to(g.device, g.dtype)
    lo, hi = group_extent(g, symmetric)
    best_ratio = ratios[:1].expand(g.shape[0]).clone()
    first = squared_errors(g, *clipped_range(lo, hi, best_ratio, bits, symmetric), bits, symmetric)
    n, k = max(1, g.shape[1]), min(TOP_K, g.shape[1])
    block = max(1, CHUNK_ELEMENTS // 4)  # float64 / int64 temporaries of the binned path: ~10 of this size
    rows = max(1, block // max(n, len(ratios) * k))
    for r0 in range(0, g.shape[0], rows):
        sl = slice(r0, r0 + rows)
        gs = g[sl]
        scale, zero = clipped_range(lo[sl], hi[sl], ratios[:, None], bits, symmetric)  # (R, groups)
        bound = clip_bound(gs.topk(k, dim=1).values, (-gs).topk(k, dim=1).values, scale, zero, bits, symmetric)
        alive = bound[1:] <= first[sl] * (1 + PRUNE_MARGIN)  # (R - 1, groups): may beat ratios[0]
        count = torch.where(alive.any(dim=0), len(alive) - alive.flip(0).int().argmax(dim=0), 0)  # (groups,)
        tried = 1 + int(count.max())  # ratios[:tried] hold every group's candidates
        dense_cost = n * int(count.sum())
        binned_cost = gs.shape[0] * (SORT_COST * n + tried * (2**bits + 1) * LEVEL_COST)
        if binned_cost <= dense_cost:
            best_ratio[sl] = _search_binned(gs, scale[:tried], zero, ratios, bits, symmetric, block)
        else:
            best_ratio[sl] = _search_pruned(gs, scale, zero, ratios, count, first[sl], bits, symmetric)
    return best_ratio


def _search_binned(
    g: Tensor, scale: Tensor, zero: Tensor | None, ratios: Tensor, bits: int, symmetric: bool, block: int
) -> Tensor:
    """Step 2 by :func:`binned_errors` over ``scale`` (the first T candidates), then quantizing the near-best."""
    v, p1, p2 = sorted_sums(g)
    per = max(1, block // (g.shape[0] * (2**bits + 1)))
    zero = None if zero is None else zero[: len(scale)]
    err = torch.cat(
        [
            binned_errors(v, p1, p2, scale[j : j + per], None if zero is None else zero[j : j + per], bits, symmetric)
            for j in range(0, len(scale), per)
        ]
    )  # (T, groups)
    # Each error is ~2^b differences of prefix sums over n values: its rounding is at most this (worst case).
    slack = 2 * (2**bits + 1) * g.shape[1] * torch.finfo(torch.float64).eps * p2[:, -1]
    near = err <= err.min(dim=0).values * (1 + PRUNE_MARGIN) + slack
    group, index = near.T.nonzero().unbind(dim=1)  # (P,) pairs, by group then ratio
    exact = torch.empty(len(group), dtype=g.dtype, device=g.device)
    step = max(1, CHUNK_ELEMENTS // g.shape[1])
    for p0 in range(0, len(group), step):
        gi, ri = group[p0 : p0 + step], index[p0 : p0 + step]
        zr = None if zero is None else zero[ri, gi]
        exact[p0 : p0 + step] = squared_errors(g[gi], scale[ri, gi], zr, bits, symmetric)
    least = exact.new_full((g.shape[0],), float("inf")).scatter_reduce(0, group, exact, "amin")
    hit = exact == least[group]  # the first such ratio per group: the dense search's choice
    return ratios[index.new_full((g.shape[0],), len(ratios)).scatter_reduce(0, group[hit], index[hit], "amin")]


def _search_pruned(
    g: Tensor,
    scale: Tensor,
    zero: Tensor | None,
    ratios: Tensor,
    count: Tensor,
    first: Tensor,
    bits: int,
    symmetric: bool,
) -> Tensor:
    """Step 2 by quantizing each group's ratios 1..count (``first``: the errors at ratios[0])."""
    best_ratio = ratios[:1].expand(g.shape[0]).clone()
    best = first.clone()
    j = 1
    while j < len(ratios):
        idx = (count >= j).nonzero()[:, 0]  # the groups with ratios left to try
        if not len(idx):
            break
        per = max(1, CHUNK_ELEMENTS // (g.shape[1] * len(idx)))
        sub = g if len(idx) == g.shape[0] else g[idx]
        zr = None if zero is None else zero[j : j + per, idx]
        err = squared_errors(sub, scale[j : j + per, idx], zr, bits, symmetric)  # (per, groups left)
        err_min, at = err.min(dim=0)  # the first of equal errors: the largest ratio
        better = err_min < best[idx]
        best[idx] = torch.where(better, err_min, best[idx])
        best_ratio[idx] = torch.where(better, ratios[j + at], best_ratio[idx])
        j += per
    return best_ratio


@torch.no_grad()
def search_ratios_dense(g: Tensor, bits: int, symmetric: bool, ratios: Tensor | None = None) -> Tensor:
    """The reference of :func:`search_ratios`: every candidate evaluated by quantizing the group, O(n) each.

    Same arguments and result; ties keep the earlier (larger) ratio.
    """
    ratios = (clip_ratios() if ratios is None else ratios).to(g.device, g.dtype)
    lo, hi = group_extent(g, symmetric)
    best_ratio = ratios[:1].expand(g.shape[0]).clone()
    best = squared_errors(g, *clipped_range(lo, hi, best_ratio, bits, symmetric), bits, symmetric)
    n = max(1, g.shape[1])
    rows = max(1, CHUNK_ELEMENTS // n)
    for r0 in range(0, g.shape[0], rows):
        sl = slice(r0, r0 + rows)
        per = max(1, CHUNK_ELEMENTS // (n * g[sl].shape[0]))
        for k in range(1, len(ratios), per):
            r = ratios[k : k + per, None]  # (R, 1) against (groups,) -> (R, groups)
            err = squared_errors(g[sl], *clipped_range(lo[sl], hi[sl], r, bits, symmetric), bits, symmetric)
            err_min, idx = err.min(dim=0)  # the first of equal errors: the largest ratio
            better = err_min < best[sl]
            best[sl] = torch.where(better, err_min, best[sl])
            best_ratio[sl] = torch.where(better, r[idx, 0], best_ratio[sl])
    return best_ratio


def mse_range(g: Tensor, bits: int, symmetric: bool, ratios: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The fp16 scale (groups,) and zero (groups,) or None of the MSE-best clipping ratio of each group."""
    lo, hi = group_extent(g, symmetric)
    return clipped_range(lo, hi, search_ratios(g, bits, symmetric, ratios), bits, symmetric)


def choose_range(
    g: Tensor, bits: int, symmetric: bool, method: str = "max", ratio: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """The fp16 scale (groups,) and zero point (groups,) or None of grouped weights ``g`` (groups, n).

    ``ratio`` (groups,), when given, is a clipping ratio already searched (QAT holds it while the weight trains).
    """
    if method != "max":
        check_range_method(method)
    lo, hi = group_extent(g, symmetric)
    if ratio is None and method == "mse":
        ratio = search_ratios(g, bits, symmetric)
    if ratio is None:
        ratio = torch.ones((), dtype=g.dtype, device=g.device)
    return clipped_range(lo, hi, ratio, bits, symmetric)


def percentile_amax(values: Tensor, percentile: float = ACT_PERCENTILE) -> Tensor:
    """The ``percentile``-th percentile of ``values`` (|x|, 1-D): its k-th smallest, k = ceil(percentile / 100 * n)
    (numpy's ``method="inverted_cdf"``)."""
    n = values.numel()
    if n == 0:
        raise ValueError("no values to take a percentile of")
    k = min(n, max(1, math.ceil(percentile / 100 * n)))
    return values.float().kthvalue(k).values


@torch.no_grad()
def activation_errors(values: Tensor, amax: Tensor, bits: int) -> Tensor:
    """sum (Q(x; amax) - x)^2 over ``values`` (|x|, 1-D) for each candidate range in ``amax`` (R,): the activation
    quantizer's own float32 arithmetic (``functional.fake_quantize_activation``), summed in float64."""
    qmax = 2 ** (bits - 1) - 1
    v = values.float()
    out = torch.empty(len(amax), dtype=torch.float64, device=v.device)
    per = max(1, CHUNK_ELEMENTS // max(1, v.numel()))
    for j in range(0, len(amax), per):
        scale = (amax[j : j + per].float().clamp(min=1e-8) / qmax)[:, None]  # (R, 1)
        q = torch.clamp(torch.round(v / scale), -qmax, qmax) * scale  # (R, n)
        out[j : j + per] = (q - v).double().pow_(2).sum(dim=1)
    return out


def mse_amax(values: Tensor, peak: Tensor | float, bits: int, ratios: Tensor | None = None) -> Tensor:
    """The clipped range r* ``peak`` of least squared quantization error over ``values`` (|x|, 1-D); ``ratios``
    default :func:`clip_ratios` (1.0 first: the peak itself; of equal errors the first, the larger, wins)."""
    ratios = (clip_ratios() if ratios is None else ratios).to(values.device, torch.float32)
    amax = ratios * torch.as_tensor(peak, dtype=torch.float32, device=values.device)
    return amax[int(activation_errors(values, amax, bits).argmin())]


def lsq_grad_scale(group_size: int, bits: int, symmetric: bool) -> float:
    """LSQ's gradient scale g = 1 / sqrt(numel_per_group * qmax) (Esser et al. 2020, Sec. 2.2)."""
    return 1.0 / math.sqrt(group_size * code_range(bits, symmetric)[1])


def learned_step(scale: Tensor, grad_scale: float) -> Tensor:
    """The step the forward uses: fp16_up(s) exactly in value, d/ds = ``grad_scale`` in the backward.

    Written as ``value + (x - x.detach())`` so the value is bit-exact (``(s - s*g).detach() + s*g`` can differ
    from s in the last bit), which is what makes a trained model equal its packed reload.
    """
    sg = scale * grad_scale
    return fp16_up(scale.detach()) + (sg - sg.detach())
