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

Learned (LSQ, Esser et al., ICLR 2020): the step is a trainable parameter initialised from one of the above;
the forward uses fp16_up(s), the backward the LSQ gradient with the gradient scale
g = 1 / sqrt(numel_per_group * qmax) (:func:`learned_step`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# The names of the range methods, the default and the check live in the torch-free config.py (plans and
# profiles validate them too); they are re-exported here beside the methods themselves.
from ..config import DEFAULT_RANGE_METHOD, RANGE_METHODS, check_range_method  # noqa: F401

NUM_RATIOS = 100
MIN_RATIO = 0.05
# Smallest normal float16: a scale below it would lose precision when stored.
MIN_SCALE = 2.0**-14
# Elements of one (ratios, groups, group size) block of the search: bounds its memory (~5 temporaries of 16 MiB).
CHUNK_ELEMENTS = 2**22


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


@torch.no_grad()
def search_ratios(g: Tensor, bits: int, symmetric: bool, ratios: Tensor | None = None) -> Tensor:
    """Per-group clipping ratio with the least squared error, all groups at once (chunked to bound memory).

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
