"""The ONNX export's on-disk size, without torch: ONNX Runtime's widths and blocks, and the file a plan becomes.

``deploy/onnx.py`` stores each quantized weight (out, in) as ``MatMulNBits`` / ``GatherBlockQuantized``
initializers (``deploy/layout.py``): at the stored width b' (:func:`onnx_bits`) and block B along ``in``
(:func:`choose_block`), with n = ceil(in / B) blocks per row,

    data         out * n * B * b' / 8 bytes   (codes, padded to whole blocks)
    scales       out * n * 4                  (float32, the group's scale repeated per row and block)
    zero_points  out * ceil(n * b' / 8)       (asymmetric only; symmetric codes use the default zero)

Every other floating-point tensor of the state dict is an FP32 initializer as it is. Each initializer costs its
data plus its protobuf framing (dims, type, name: the exporter's name for it is known) and its name once more as a
node's input. The rest of the file, the graph itself (nodes, value infos, shape constants), does not depend on the
plan: a fixed part and a part per encoder layer by family (:data:`GRAPH_BYTES`), plus the position ids as a
constant of 8 bytes per position (BERT, DistilBERT), measured on tiny models from ``torch.onnx.export``
(TorchScript exporter, opset 17). :func:`onnx_file_bytes` is therefore exact in the initializers and within
:func:`graph_tolerance` bytes of the file (1 KiB + 1 % of the graph). Measured: within 1 byte on tiny BERT,
RoBERTa and DistilBERT models of 2-4 layers for every grouping (tests/unit/test_deploy_size.py), 121 bytes on
MiniLM-L6 (18.7 MB file).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from .config import ONNX_KERNEL_BITS as ONNX_BITS

ONNX_PREFIX = "model."  # deploy/onnx.py wraps the HF model as the attribute ``model``
# The graph beyond its initializers and their names: (once, per encoder layer) bytes by model family, measured
# on tiny models of 2-4 layers (torch 2.x TorchScript exporter, opset 17); independent of the hidden size. The
# position-ids constant (8 bytes per position) and each initializer's name as a node input come on top.
GRAPH_BYTES = {"bert": (11_916, 17_035), "roberta": (13_836, 17_035), "distilbert": (13_188, 17_786)}
GRAPH_BYTES["xlm-roberta"] = GRAPH_BYTES["roberta"]
# Families whose graph holds the position ids (1, max_positions) int64 as a constant (RoBERTa derives them from
# the input ids instead).
POSITION_IDS_CONSTANT = ("bert", "distilbert")
GRAPH_TOLERANCE = 1024  # + GRAPH_TOLERANCE_SHARE of the graph: the stated bound on |prediction - file|
GRAPH_TOLERANCE_SHARE = 0.01


def onnx_bits(bits: int) -> int:
    """The width ONNX Runtime stores a ``bits``-bit weight at: 2, 4, 8 as they are, 3 as 4, 5-7 as 8."""
    return next(b for b in ONNX_BITS if b >= bits)


def block_candidates(in_features: int, col_groups: int, *, tile: bool = False) -> list[int]:
    """The blocks (powers of two, 16..256) a weight may use: inside one column group (per-head columns), and
    dividing every row when ``tile`` (``GatherBlockQuantized``); empty when none fits."""
    sizes = [2**k for k in range(4, 9)]
    if col_groups > 1 or tile:
        width = in_features // col_groups
        sizes = [b for b in sizes if width % b == 0]
    return sizes


def choose_block(in_features: int, col_groups: int, bits: int, *, symmetric: bool, tile: bool = False) -> int | None:
    """Among :func:`block_candidates`, the block with the fewest bytes (codes padded to whole blocks, a float
    scale and a zero point per block), larger on ties; None when no block fits."""

    def cost(b: int) -> float:
        blocks = math.ceil(in_features / b)
        return blocks * b * bits / 8 + blocks * 4 + (0 if symmetric else blocks * bits / 8)

    sizes = block_candidates(in_features, col_groups, tile=tile)
    return min(sizes, key=lambda b: (cost(b), -b)) if sizes else None


def _varint(n: int) -> int:
    return max(1, math.ceil(n.bit_length() / 7))


def _field(n: int) -> int:
    """A length-delimited protobuf field of ``n`` bytes (one-byte tag)."""
    return 1 + _varint(n) + n


def initializer_bytes(name: str, dims: Iterable[int], nbytes: int) -> int:
    """One ``TensorProto`` as a graph initializer: dims, data type, name and raw data, with its own framing."""
    body = sum(1 + _varint(d) for d in dims) + 2 + _field(len(name.encode())) + _field(nbytes)
    return _field(body)


def nbits_tensors(
    key: str, shape: tuple[int, int], bits: int, col_groups: int, *, symmetric: bool, embedding: bool
) -> list[tuple[str, tuple[int, ...], int]]:
    """``(name, dims, bytes)`` of the initializers ``deploy/onnx.py`` writes for the weight ``key`` (out, in)."""
    rows, cols = shape
    stored = onnx_bits(bits)
    block = choose_block(cols, col_groups, stored, symmetric=symmetric, tile=embedding)
    if block is None:
        raise ValueError(f"{key}: no ONNX Runtime block fits its column groups")
    n = math.ceil(cols / block)
    base = ONNX_PREFIX + key.removesuffix(".weight")
    row_bytes = n * block * stored // 8
    zp_bytes = math.ceil(n * stored / 8)
    if embedding:
        out = [(f"{base}.data", (rows, row_bytes), rows * row_bytes), (f"{base}.scales", (rows, n), rows * n * 4)]
        zp = (f"{base}.zero_points", (rows, zp_bytes), rows * zp_bytes)
    else:
        data = (f"{base}.data", (rows, n, block * stored // 8), rows * row_bytes)
        out = [data, (f"{base}.scales", (rows * n,), rows * n * 4)]
        zp = (f"{base}.zero_points", (rows * zp_bytes,), rows * zp_bytes)
    return out if symmetric else [*out, zp]


def onnx_initializers(
    fp32: Iterable[tuple[str, str, tuple[int, ...]]],
    quantized: Mapping[str, tuple[tuple[int, int], int, int, bool]],
    *,
    symmetric: bool,
) -> list[tuple[str, tuple[int, ...], int]]:
    """``(name, dims, data bytes)`` of every initializer of the export (int8 mode).

    Args:
        fp32: the state dict's tensors ``(name, dtype, shape)`` (safetensors dtype names); the floating-point ones
            not in ``quantized`` stay FP32 initializers, integer buffers become graph constants.
        quantized: per quantized weight key ``(shape, bits, col_groups, is_embedding)``.
        symmetric: symmetric codes (no zero points).
    """
    out = [(ONNX_PREFIX + n, tuple(s), 4 * math.prod(s)) for n, d, s in fp32 if n not in quantized and d == "F32"]
    for key, (shape, bits, col_groups, embedding) in quantized.items():
        out += nbits_tensors(key, shape, bits, col_groups, symmetric=symmetric, embedding=embedding)
    return out


def onnx_file_bytes(
    fp32: Iterable[tuple[str, str, tuple[int, ...]]],
    quantized: Mapping[str, tuple[tuple[int, int], int, int, bool]],
    *,
    symmetric: bool,
    num_layers: int,
    family: str = "bert",
) -> tuple[int, int]:
    """The predicted size of ``onnx/model.onnx`` (int8 mode) and its initializers' exact part (arguments as
    :func:`onnx_initializers`; ``num_layers`` and ``family`` size the graph).

    The exporter shares one initializer between tensors of equal contents (e.g. two weights whose scales or zero
    points coincide): the file is then smaller than predicted by the shared tensors, never larger.
    """
    fp32 = list(fp32)
    tensors = onnx_initializers(fp32, quantized, symmetric=symmetric)
    inits = sum(initializer_bytes(*t) for t in tensors)
    tables = [s[0] for n, _, s in fp32 if n.endswith("position_embeddings.weight")]
    positions = max(tables, default=0) if family in POSITION_IDS_CONSTANT else 0
    uses = sum(_field(len(name.encode())) for name, _, _ in tensors)  # each is one node's input, by name
    return inits + uses + graph_bytes(num_layers, positions, family), inits


def graph_bytes(num_layers: int, positions: int = 0, family: str = "bert") -> int:
    """The graph beyond its initializers: once, per encoder layer (:data:`GRAPH_BYTES`; families not measured
    use BERT's), and the ``position_ids`` constant."""
    fixed, per_layer = GRAPH_BYTES.get(family, GRAPH_BYTES["bert"])
    return fixed + per_layer * num_layers + 8 * positions


def graph_tolerance(num_layers: int, family: str = "bert") -> int:
    """The stated bound on |predicted - actual| bytes of a file for a model of ``num_layers`` encoder layers
    (beyond tensors the exporter shares, which only make the file smaller)."""
    return int(GRAPH_TOLERANCE + GRAPH_TOLERANCE_SHARE * graph_bytes(num_layers, 0, family))
