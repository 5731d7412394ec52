"""Uniform group-wise quantization: the one definition of rounding and grouping (Q-BERT, Q8BERT).

A weight W (out, in) is cut into a grid of ``row_groups x col_groups`` blocks; each block g gets its own scale
s_g (and, asymmetric, a zero point z_g):

    symmetric:   s_g = max|W_g| / ((2^b - 1) / 2),   q = clamp(round(W / s_g), -2^(b-1), 2^(b-1) - 1)
    asymmetric:  s_g = (max W_g - min W_g) / (2^b - 1), z_g = round(-min W_g / s_g),
                 q = clamp(round(W / s_g) + z_g, 0, 2^b - 1)
    Q(W) = (q - z_g) * s_g

Scales are rounded *up* to the nearest float16, the precision they are stored in, so the fake-quantized
weight, the packed checkpoint and its reload are bit-for-bit the same, and no weight inside the range moves
by more than s_g / 2. How the range is chosen (``max`` above, an MSE clipping search, or a learned LSQ step) is
``ranges.py``; every path here goes through it.

Groupings (Shen et al. 2020, Q-BERT Sec. 3.3): ``1`` one scale per matrix; ``heads`` one per attention head
(query/key/value: the rows of each head; attention output: the input columns of each head; FFN matrices:
``num_heads`` contiguous output-row buckets, so every matrix of a layer has as many groups); an integer G
(G groups per matrix as contiguous output-row buckets; for the attention output, when num_heads divides G,
G / num_heads row buckets inside each head's columns); ``channel`` one scale per output row. The grid of a
grouping (:func:`group_layout`) follows from the shape alone, so it lives torch-free in ``config.py``, where the
allocator sizes every matrix with it too; it is re-exported here.

Activations (Zafrir et al. 2019, Q8BERT): symmetric b-bit with a static range [-amax, amax] (an EMA of max|x|,
or a percentile or MSE clipping calibrated in ``ranges.py``), s = amax / (2^(b-1) - 1); or dynamic per token
(ZeroQuant, Yao et al. 2022): each row x_t of the last axis gets its own s_t = max|x_t| / ((2^b - 1) / 2) at run
time (the weights' symmetric convention, and compressed-tensors').
The straight-through estimator passes gradients unchanged inside the clipping range and zeroes them outside.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..config import Groups, check_bits, parse_groups
from ..config import Kind as Kind
from ..config import group_layout as group_layout
from .ranges import check_range_method, choose_range, code_range, decode, encode, fp16_up, learned_step

_fp16_up = fp16_up  # the name the rest of the package and its tests know


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one weight is quantized: ``bits`` (2..8), ``groups``, symmetric or asymmetric ranges, and how each
    group's range is chosen (``range_method``: ``max`` or ``mse``, see ``ranges.py``)."""

    bits: int
    groups: Groups = 1
    symmetric: bool = True
    range_method: str = "max"

    def __post_init__(self) -> None:
        check_bits(self.bits)
        object.__setattr__(self, "groups", parse_groups(self.groups))
        check_range_method(self.range_method)


def to_groups(w: Tensor, grid: tuple[int, int]) -> Tensor:
    """(out, in) -> (row_groups * col_groups, group size), one row per group."""
    rg, cg = grid
    out_f, in_f = w.shape
    # (rg, out/rg, cg, in/cg) -> (rg, cg, out/rg, in/cg)
    return w.reshape(rg, out_f // rg, cg, in_f // cg).permute(0, 2, 1, 3).reshape(rg * cg, -1)


def from_groups(g: Tensor, shape: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """Inverse of :func:`to_groups`."""
    rg, cg = grid
    out_f, in_f = shape
    return g.reshape(rg, cg, out_f // rg, in_f // cg).permute(0, 2, 1, 3).reshape(out_f, in_f)


@dataclasses.dataclass
class Quantized:
    """Integer codes of a grouped weight and what it takes to rebuild it.

    ``codes`` (groups, group size) int16; ``scale`` (groups,) float32 holding float16 values; ``zero``
    (groups,) int16 or None (symmetric); ``shape`` and ``grid`` of the original weight.
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor | None
    bits: int
    shape: tuple[int, int]
    grid: tuple[int, int]

    def dequantize(self) -> Tensor:
        q = self.codes.float()
        if self.zero is not None:
            q = q - self.zero.float()[:, None]
        return from_groups(q * self.scale[:, None], self.shape, self.grid)


def quantize(
    w: Tensor,
    bits: int,
    grid: tuple[int, int],
    symmetric: bool = True,
    range_method: str = "max",
    ratio: Tensor | None = None,
) -> Quantized:
    """Quantize ``w`` (out, in) with one scale per cell of ``grid``, the range chosen by ``range_method``
    (or clipped by a given per-group ``ratio``, see :func:`~.ranges.choose_range`)."""
    g = to_groups(w.detach().float(), grid)
    scale, zero = choose_range(g, bits, symmetric, range_method, ratio)
    return _encode(g, scale, zero, bits, tuple(w.shape), grid)  # type: ignore[arg-type]


def quantize_with(w: Tensor, scale: Tensor, zero: Tensor | None, bits: int, grid: tuple[int, int]) -> Quantized:
    """Quantize ``w`` with given per-group scales (rounded up to fp16 here) and zero points (None: symmetric),
    as a learned step (LSQ) is exported."""
    g = to_groups(w.detach().float(), grid)
    return _encode(g, fp16_up(scale.detach().float()), zero, bits, tuple(w.shape), grid)  # type: ignore[arg-type]


def fake_quantize_with(w: Tensor, scale: Tensor, zero: Tensor | None, bits: int, grid: tuple[int, int]) -> Tensor:
    """Q(w) on a fixed grid (the value of :func:`quantize_with`), identity gradient to every weight (STE); the
    scales are not trained. What a module rounded by GPTQ trains on: its grid stays the one the codes were
    chosen on."""
    q = quantize_with(w, scale, zero, bits, grid).dequantize().to(w.dtype)
    return w + (q - w).detach()


def _encode(
    g: Tensor, scale: Tensor, zero: Tensor | None, bits: int, shape: tuple[int, int], grid: tuple[int, int]
) -> Quantized:
    qmin, qmax = code_range(bits, zero is None)
    codes = encode(g, scale, zero, qmin, qmax).to(torch.int16)
    return Quantized(codes, scale, None if zero is None else zero.to(torch.int16), bits, shape, grid)


def fake_quantize(
    w: Tensor,
    bits: int,
    grid: tuple[int, int],
    symmetric: bool = True,
    range_method: str = "max",
    ratio: Tensor | None = None,
) -> Tensor:
    """Q(w) in the forward pass, identity gradient in the backward pass (straight-through estimator).

    The scales come from the weight itself (its max, or a clipped range); the gradient passes unchanged to every
    weight, clipped ones included.
    """
    q = quantize(w, bits, grid, symmetric, range_method, ratio).dequantize().to(w.dtype)
    return w + (q - w).detach()


def fake_quantize_learned(
    w: Tensor, scale: Tensor, zero: Tensor | None, bits: int, grid: tuple[int, int], grad_scale: float
) -> Tensor:
    """Q(w) with a learned per-group step (LSQ, Esser et al. 2020), equal in value to :func:`quantize_with`.

    With v = w / s (+ z): Q = (clamp(round(v), qmin, qmax) - z) * s, the round passed straight through, so

        dQ/dw = 1 inside the range, 0 outside;   dQ/ds = round(v) - v inside, qmin - z or qmax - z outside,

    and the gradient to s is scaled by ``grad_scale`` (:func:`~.ranges.lsq_grad_scale`). The forward uses
    fp16_up(s), the stored precision. ``scale`` (groups,), ``zero`` (groups,) or None (symmetric).
    """
    qmin, qmax = code_range(bits, zero is None)
    s = learned_step(scale, grad_scale)  # (groups,)
    g = to_groups(w.float(), grid)  # (groups, n)
    v = g / s[:, None]
    if zero is not None:
        v = v + zero[:, None]
    v_clamped = v.clamp(qmin, qmax)
    with torch.no_grad():
        codes = encode(g, s, zero, qmin, qmax)  # the exact codes quantize_with stores
    # value: the exact codes; gradient: that of clamp(v) (straight through the round)
    codes = codes + (v_clamped - v_clamped.detach())
    return from_groups(decode(codes, s, zero), tuple(w.shape), grid).to(w.dtype)  # type: ignore[arg-type]


def quant_error(
    w: Tensor, bits: int, grid: tuple[int, int], symmetric: bool = True, range_method: str = "max"
) -> float:
    """||Q(w) - w||^2, the perturbation the allocator weighs by sensitivity (HAWQ-V3)."""
    with torch.no_grad():
        return float((quantize(w, bits, grid, symmetric, range_method).dequantize() - w.float()).pow(2).sum())


def fake_quantize_activation(x: Tensor, amax: Tensor, bits: int = 8) -> Tensor:
    """Symmetric fake quantization of an activation with range [-amax, amax] (Q8BERT).

    Values beyond the range are clipped; the straight-through estimator zeroes their gradient.
    """
    qmax = 2 ** (bits - 1) - 1
    scale = amax.clamp(min=1e-8) / qmax
    q = torch.clamp(torch.round(x / scale), -qmax, qmax) * scale
    inside = x.abs() <= amax
    x_ste = torch.where(inside, x, x.detach())
    return x_ste + (q - x_ste).detach()


def fake_quantize_activation_dynamic(x: Tensor, bits: int = 8) -> Tensor:
    """Symmetric per-token fake quantization (ZeroQuant): each row of the last axis gets its own range.

    x (..., features): s_t = max|x_t| / ((2^b - 1) / 2) per row t (0 -> float32 eps), codes
    clamp(round(x_t / s_t), -2^(b-1), 2^(b-1) - 1), Q(x_t) = codes * s_t: the symmetric convention of the weights
    here and of compressed-tensors' dynamic ``token`` strategy, so its reload computes the same numbers; the ONNX
    export writes the same float operations (``deploy/onnx.py``). Nothing is clipped but the half step above the
    top level, so the straight-through gradient is the identity.
    """
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = x.detach().abs().amax(dim=-1, keepdim=True) / ((2**bits - 1) / 2)
    scale = torch.where(scale == 0, torch.finfo(scale.dtype).eps, scale)
    q = torch.clamp(torch.round(x.detach() / scale), qmin, qmax) * scale
    return q + (x - x.detach())  # the value is q exactly; the gradient is the identity
