"""Our quantized weights in other runtimes' layouts, exactly: pure tensor functions, no runtime imported.

A packed weight W (out, in) holds integer codes q and one scale s_g (and zero z_g) per cell of a
``row_groups x col_groups`` grid (``quant/functional.py``). Its value is (q - z_g) * s_g everywhere. The targets:

ONNX Runtime ``MatMulNBits`` (contrib op, ``com.microsoft``): B is (N=out, K=in) cut along K into blocks of
``block_size`` (a power of two, at least 16); each (row, block) has one float scale and one zero point, the
default zero 2^(b-1); codes are unsigned, packed little-endian in bytes, b in {2, 4, 8}. Our cell scale is repeated
over the rows and the K-blocks it covers, so a block must never straddle two column groups: with per-head column
groups (attention output) the block divides the head size. Symmetric codes q in [-2^(b-1), 2^(b-1) - 1] are
stored as q + 2^(b'-1) under the default zero; asymmetric codes as they are, with the zero points packed
per row. ONNX Runtime has no 3-bit kernel: a 3-bit weight is stored at b' = 4 with the same values (4/3 the bytes).

``GatherBlockQuantized`` (the embedding tables): the same codes and packing, blocks along the hidden dimension,
scales (rows, hidden / block).

compressed-tensors ``pack-quantized``: signed codes q - 2^(b-1) (asymmetric: zero z - 2^(b-1) too) packed densely
into int32 words along the input dimension, ``block`` strategy with ``block_structure`` = the cell size, so each
of our cells keeps its one scale; scales stored in float32, in which (q - z) * s is exact.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import Tensor

from ..errors import QBHError
from ..onnx_format import choose_block, onnx_bits
from ..packed_format import pack_bits
from ..quant.functional import Quantized, from_groups


def cell_grid(q: Quantized, values: Tensor) -> Tensor:
    """Per-group ``values`` (groups,) as the (row_groups, col_groups) grid of cells."""
    return values.reshape(q.grid)


def signed_codes(q: Quantized) -> Tensor:
    """The codes of ``q`` as its weight's (out, in) matrix (int32; symmetric ones signed)."""
    return from_groups(q.codes.to(torch.int32), q.shape, q.grid)


def per_row(q: Quantized, values: Tensor) -> Tensor:
    """Per-group ``values`` spread to (out, col_groups): each row gets its row group's cells."""
    rows = q.shape[0] // q.grid[0]
    return cell_grid(q, values).repeat_interleave(rows, dim=0)


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``codes`` (rows, n) < 2^bits packed little-endian per row: (rows, ceil(n * bits / 8)) uint8."""
    return np.stack([pack_bits(r, bits) for r in codes]) if len(codes) else np.zeros((0, 0), np.uint8)


def block_size(in_features: int, col_groups: int, bits: int, *, symmetric: bool, name: str, tile: bool = False) -> int:
    """The block along ``in`` (K): :func:`~qbert_hessian.onnx_format.choose_block` (the allocator prices the
    same one).

    Raises:
        QBHError: a column group whose width has no power-of-two divisor of at least 16 (no valid block).
    """
    block = choose_block(in_features, col_groups, bits, symmetric=symmetric, tile=tile)
    if block is None:
        raise QBHError(
            f"{name}: its rows or column groups are {in_features // col_groups} wide, but ONNX Runtime's blocks are "
            "16..256 values (a power of two) inside one group; quantize it with row groups (an integer or channel) "
            "or export with --format compressed-tensors"
        )
    return block


@dataclasses.dataclass
class NBits:
    """One weight in ``MatMulNBits`` / ``GatherBlockQuantized`` layout.

    ``data`` (rows, blocks, block * bits / 8) uint8; ``scales`` (rows, blocks) float32; ``zero_points``
    (rows, ceil(blocks * bits / 8)) uint8, or None (symmetric: the default zero 2^(bits-1)).
    """

    data: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int

    def dequantize(self, in_features: int) -> np.ndarray:
        """The (rows, in_features) float32 values the runtime computes with (the reference for tests)."""
        rows, blocks, _ = self.data.shape
        bs, b = self.block_size, self.bits
        codes = np.unpackbits(self.data.reshape(rows, -1)[..., None], axis=-1, bitorder="little")
        codes = codes.reshape(rows, -1, 8 // b if b < 8 else 1, b if b < 8 else 8)
        weights = (1 << np.arange(codes.shape[-1])).astype(np.int32)
        q = (codes.astype(np.int32) * weights).sum(-1).reshape(rows, blocks * bs)
        if self.zero_points is None:
            zero = np.full((rows, blocks), 2 ** (b - 1), np.int32)
        else:
            zbits = np.unpackbits(self.zero_points[..., None], axis=-1, bitorder="little")
            zbits = zbits.reshape(rows, -1, b)
            zero = (zbits.astype(np.int32) * (1 << np.arange(b))).sum(-1)[:, :blocks]
        w = (q - np.repeat(zero, bs, axis=1)).astype(np.float32) * np.repeat(self.scales, bs, axis=1)
        return w[:, :in_features]


def to_nbits(q: Quantized, *, symmetric: bool, bits: int | None = None, block: int) -> NBits:
    """``q`` in the blocked layout at width ``bits`` (default :func:`onnx_bits`), blocks of ``block`` along in.

    Exact: every block's (q - z) * s equals the stored weight's. Padding beyond ``in`` holds the zero point.
    """
    bits = bits or onnx_bits(q.bits)
    if bits < q.bits:
        raise QBHError(f"a {q.bits}-bit weight cannot be stored at {bits} bits")
    out_f, in_f = q.shape
    blocks = math.ceil(in_f / block)
    codes = signed_codes(q)  # (out, in)
    col_width = in_f // q.grid[1]
    cell_of_block = (torch.arange(blocks) * block).clamp(max=in_f - 1) // col_width  # (blocks,)
    scales = per_row(q, q.scale.float())[:, cell_of_block]  # (out, blocks)
    if symmetric:
        unsigned = codes + 2 ** (bits - 1)
        pad_value = torch.full((out_f, 1), 2 ** (bits - 1), dtype=torch.int32)
        zero_points = None
    else:
        assert q.zero is not None
        unsigned = codes
        zero = per_row(q, q.zero.to(torch.int32))[:, cell_of_block]  # (out, blocks)
        pad_value = zero[:, -1:]
        zero_points = pack_rows(zero.numpy().astype(np.uint8), bits)
    padded = torch.cat([unsigned, pad_value.expand(out_f, blocks * block - in_f)], dim=1)
    data = pack_rows(padded.numpy().astype(np.uint8), bits).reshape(out_f, blocks, block * bits // 8)
    return NBits(data, scales.numpy().astype(np.float32), zero_points, bits, block)


def ct_pack_int32(signed: np.ndarray, bits: int) -> np.ndarray:
    """compressed-tensors' dense packing of signed ``bits``-bit values (rows, n): value j of a row occupies bits
    j*b .. j*b+b-1 of the row's little-endian int32 words, stored as q + 2^(b-1); (rows, ceil(n * b / 32)) int32."""
    rows, n = signed.shape
    unsigned = (signed.astype(np.int32) + 2 ** (bits - 1)).astype(np.uint8)
    padded = np.zeros((rows, math.ceil(n / 32) * 32), np.uint8)
    padded[:, :n] = unsigned
    words = pack_rows(padded, bits).view("<i4")  # 32 values of b bits fill exactly b words
    return np.ascontiguousarray(words[:, : math.ceil(n * bits / 32)])
