"""The allocator's cost table: ||Q_b(W) - W||^2 per allocation unit, bit width and grouping, plus sizes.

HAWQ-V3 and Q-BERT weigh each block's sensitivity s_b by the perturbation that quantizing it causes; the
allocator (``allocate.py``) minimises sum_b s_b * ||Q_{k_b}(W_b) - W_b||^2 under a size budget. This module is
the only producer of that table: :func:`measure_profile` quantizes the real weights with the one rounding path
(``quant/functional.py``) and records, besides the errors, every tensor of the state dict (name, dtype, shape),
so the allocator predicts the packed file's exact size from ``packed_format.py`` without torch or the model.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..artifacts import GroupCost, QuantProfile, UnitProfile
from ..config import DEFAULT_RANGE_METHOD, check_range_method
from ..errors import QBHError
from ..models import BlockMap
from .apply import block_modules
from .functional import group_layout, parse_groups, quant_error

DEFAULT_PROFILE_BITS = (2, 3, 4, 5, 6, 7, 8)
DEFAULT_PROFILE_GROUPS: tuple[int | str, ...] = (1, "heads", 128, "channel")
EMBEDDING_UNITS = ("embeddings.word", "embeddings.position", "embeddings.token_type")
_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32", "uint8": "U8"}
_DTYPES |= {"bool": "BOOL", "float64": "F64", "int16": "I16", "int8": "I8"}


def profile_units(block_map: BlockMap, report_blocks: Sequence[str]) -> list[str]:
    """The allocation units of a report: its encoder blocks (which must not overlap), plus the embedding tables."""
    enc = [b for b in report_blocks if b.startswith("encoder.")]
    block_map.check_disjoint(enc, "report blocks {a} and {b} overlap; score either layers or linears, not both")
    return enc + [u for u in EMBEDDING_UNITS if u.split(".")[1] in block_map.embedding_parts]


def check_groups(model: nn.Module, units: Sequence[str], groups: object) -> None:
    """Every matrix of ``units`` divides into ``groups`` (the :func:`group_layout` message otherwise), checked
    before a cost table is measured for a plan that asks for them."""
    block_map = BlockMap(model)
    heads = block_map.num_heads
    g = parse_groups(groups)
    for unit in units:
        for n, p, k in block_modules(block_map, unit):
            group_layout(tuple(block_map.model.get_submodule(p).weight.shape), g, kind=k, num_heads=heads, name=n)


def state_tensors(model: nn.Module) -> list[list[object]]:
    """``[name, dtype, shape]`` of every tensor of the model's state dict, as safetensors names dtypes."""
    out = []
    for name, t in model.state_dict().items():
        dtype = _DTYPES.get(str(t.dtype).removeprefix("torch."))
        if dtype is None:
            raise QBHError(f"tensor {name} has dtype {t.dtype}, which the packed format does not store")
        out.append([name, dtype, list(t.shape)])
    return out


def measure_profile(
    model: nn.Module,
    units: Sequence[str],
    *,
    bits: Sequence[int] = DEFAULT_PROFILE_BITS,
    groups: Sequence[int | str] = DEFAULT_PROFILE_GROUPS,
    symmetric: bool = True,
    range_method: str = DEFAULT_RANGE_METHOD,
    model_name: str = "model",
    inputs: dict | None = None,
    block_map: BlockMap | None = None,
) -> QuantProfile:
    """The cost table of ``units`` (canonical blocks: ``encoder.3``, ``encoder.3.query``, ``embeddings.word``).

    Args:
        model: the FP32 model whose weights are measured (any device).
        units: allocation units; see :func:`profile_units` for a report's.
        bits: widths to measure.
        groups: groupings to measure (1, ``heads``, an integer G, ``channel``); one that does not divide some
            matrix of a unit is recorded under the unit's ``unavailable`` with the reason.
        symmetric: symmetric (no zero points) or asymmetric quantization.
        range_method: how each group's range is chosen, ``max`` or ``mse`` (``ranges.py``); the profile records
            it, and a plan is only made from a profile of its own range method.
        model_name: the model's name as artifacts record it.
        inputs: provenance to store (e.g. the model's fingerprint).
        block_map: the model's :class:`~qbert_hessian.models.BlockMap`, when the caller has it.

    Returns:
        A :class:`~qbert_hessian.artifacts.QuantProfile`.
    """
    check_range_method(range_method)
    block_map = BlockMap(model) if block_map is None else block_map
    heads = block_map.num_heads
    out: dict[str, UnitProfile] = {}
    for unit in units:
        mats = [(n, p, block_map.model.get_submodule(p).weight, k) for n, p, k in block_modules(block_map, unit)]
        costs: dict[str, GroupCost] = {}
        unavailable: dict[str, str] = {}
        for g in dict.fromkeys(map(parse_groups, groups)):
            try:
                grids = [group_layout(tuple(w.shape), g, kind=k, num_heads=heads, name=n) for n, _, w, k in mats]
            except QBHError as exc:
                unavailable[str(g)] = str(exc)
                continue
            error = {
                str(b): sum(quant_error(w, b, grid, symmetric, range_method) for (_, _, w, _), grid in zip(mats, grids))
                for b in bits
            }
            costs[str(g)] = GroupCost([r * c for r, c in grids], error)
        out[unit] = UnitProfile(
            weights=[f"{p}.weight" for _, p, _, _ in mats],
            shapes=[list(w.shape) for _, _, w, _ in mats],
            linear=[k != "embedding" for _, _, _, k in mats],
            groups=costs,
            unavailable=unavailable,
        )
    return QuantProfile(
        model=block_map.describe(model_name),
        symmetric=symmetric,
        bits=list(bits),
        tensors=state_tensors(model),
        units=out,
        range_method=range_method,
        inputs=dict(inputs or {}),
    )
