"""The packed checkpoint's on-disk format, without torch: bit packing, tensor key names and the exact file size.

A packed folder holds ``model.safetensors``: every FP32 tensor of the model as it is, except that each
quantized weight ``W`` (state-dict key ``<module>.weight``) becomes

    "<module>.weight.codes"   uint8, the b-bit codes packed little-endian (ceil(n * b / 8) bytes)
    "<module>.weight.scale"   float16, one per group
    "<module>.weight.zero"    uint8, one per group (asymmetric quantization only)

and each quantized linear with 8-bit inputs adds its activation range ``"<module>.act.amax"`` (float32, a
scalar). ``quantization.json`` beside it holds the plan and one entry per quantized weight.

``export.py`` writes with these names, and ``allocate.py`` predicts the file's size from them, byte for byte:
a safetensors file is an 8-byte little-endian header length, a JSON header (``__metadata__`` first, then the
tensors ordered by dtype, widest first, then by name; padded with spaces to a multiple of 8) and the tensor
data back to back in the same order.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "quantization.json"
PACKED_SCHEMA = "qbert_hessian.packed/1"
METADATA = {"format": "pt", "qbert_hessian": PACKED_SCHEMA}
SCALE_DTYPE, CODES_DTYPE, ZERO_DTYPE, ACT_DTYPE = "F16", "U8", "U8", "F32"

# safetensors orders tensors by dtype (its Dtype enum, descending), then by name.
_DTYPE_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64"]
_DTYPE_ORDER += ["I64", "U64"]
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2}
DTYPE_BYTES |= {"I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}


def codes_key(weight_key: str) -> str:
    return f"{weight_key}.codes"


def scale_key(weight_key: str) -> str:
    return f"{weight_key}.scale"


def zero_key(weight_key: str) -> str:
    return f"{weight_key}.zero"


def act_key(weight_key: str) -> str:
    """The activation range of the linear whose weight is ``weight_key`` (``m.weight`` -> ``m.act.amax``)."""
    return f"{weight_key.removesuffix('.weight')}.act.amax"


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes of ``numel`` codes of ``bits`` bits each, packed."""
    return math.ceil(numel * bits / 8)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers < 2^bits into bytes, ``bits`` bits each, little-endian within and across bytes.

    ``n`` values take exactly ceil(n * bits / 8) bytes (3-bit codes too).
    """
    values = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return values.copy()
    if values.size and int(values.max()) >= 2**bits:
        raise ValueError(f"a value does not fit in {bits} bits")
    bit_matrix = np.unpackbits(values[:, None], axis=1, bitorder="little")[:, :bits]  # (n, bits)
    return np.packbits(bit_matrix.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` values."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return packed[:count].copy()
    bit_matrix = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    padded = np.zeros((count, 8), dtype=np.uint8)
    padded[:, :bits] = bit_matrix
    return np.packbits(padded, axis=1, bitorder="little")[:, 0]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A tensor as safetensors stores it: name, dtype (``F32``, ``F16``, ``U8`` ...) and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return DTYPE_BYTES[self.dtype] * math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """What a quantized weight stores: its width, element count, number of groups and zero points."""

    bits: int
    numel: int
    num_scales: int
    symmetric: bool = True


def packed_specs(
    fp32: Iterable[TensorSpec], quantized: Mapping[str, QuantizedWeight], act_ranges: Iterable[str] = ()
) -> list[TensorSpec]:
    """The tensors of a packed checkpoint: ``fp32`` (the model's state dict) with every weight in ``quantized``
    replaced by its codes, scales (and zeros), plus one activation range per weight key in ``act_ranges``."""
    fp32 = list(fp32)
    missing = sorted(set(quantized) - {t.name for t in fp32})
    if missing:
        raise KeyError(f"quantized weights not in the state dict: {missing[:3]}")
    out = [t for t in fp32 if t.name not in quantized]
    for key, q in quantized.items():
        out.append(TensorSpec(codes_key(key), CODES_DTYPE, (packed_bytes(q.numel, q.bits),)))
        out.append(TensorSpec(scale_key(key), SCALE_DTYPE, (q.num_scales,)))
        if not q.symmetric:
            out.append(TensorSpec(zero_key(key), ZERO_DTYPE, (q.num_scales,)))
    out += [TensorSpec(act_key(k), ACT_DTYPE, ()) for k in act_ranges]
    return out


def _ordered(specs: Sequence[TensorSpec]) -> list[TensorSpec]:
    return sorted(specs, key=lambda t: (-_DTYPE_ORDER.index(t.dtype), t.name))


def safetensors_header(specs: Sequence[TensorSpec], metadata: Mapping[str, str] = METADATA) -> bytes:
    """The JSON header safetensors writes for these tensors (padded with spaces to a multiple of 8)."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for t in _ordered(specs):
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)


def file_bytes(specs: Sequence[TensorSpec], metadata: Mapping[str, str] = METADATA) -> int:
    """The exact size of the safetensors file holding ``specs``."""
    return 8 + len(safetensors_header(specs, metadata)) + sum(t.nbytes for t in specs)
