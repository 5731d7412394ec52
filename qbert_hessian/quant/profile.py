"""The allocator's cost table: ||Q_b(W) - W||^2 per allocation unit, bit width and grouping, plus sizes; or the
loss each (unit, width, rounding) will really cost.

HAWQ-V3 and Q-BERT weigh each block's sensitivity s_b by the perturbation that quantizing it causes; the
allocator (``allocate.py``) minimises sum_b s_b * ||Q_{k_b}(W_b) - W_b||^2 under a size budget. This module is
the only producer of that table: :func:`measure_profile` quantizes the real weights with the one rounding path
(``quant/functional.py``) and records, besides the errors, every tensor of the state dict (name, dtype, shape),
so the allocator predicts the packed file's exact size from ``packed_format.py`` without torch or the model.

After second-order rounding (GPTQ) ||dW||^2 grows while the loss falls, so that table misprices every layer.
:func:`measure_priced_profile` prices each entry by the loss itself, with dW = Q(W) - W the unit quantized alone
at that width and grouping by the plan's own rounding (:func:`quantized_unit`: ``quantize_model``, then
``round_gptq_`` for ``gptq``), on the sensitivity report's draws d = 1..D (each a list of batches whose loss is
L_d = sum_j (n_j / N) L_j, as :class:`~qbert_hessian.hessian.hvp.BlockHessian` weighs them):

    quadratic:  (1/D) sum_d  g_d^T dW + 1/2 dW^T H_d dW     g_d, H_d: gradient and Hessian of L_d over the unit's
                                                            parameters (one Hessian-vector product per entry and draw;
                                                            the gradient term matters away from a minimum)
    measured:   (1/D) sum_d  L_d(W + dW) - L_d(W)           the loss re-evaluated with only that unit quantized
                                                            (OBC's database, Frantar & Alistarh 2022)

Weights only: activations stay FP32 while an entry is priced.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..artifacts import BitPlan, GroupCost, QuantProfile, UnitProfile
from ..config import DEFAULT_RANGE_METHOD, GPTQConfig, Measure, check_range_method, check_rounding
from ..errors import QBHError
from ..hessian.hvp import Batch, BlockHessian, LossFn, curvature_mode, grads_enabled, loss_weight, model_loss
from ..models import BlockMap, curvature_kernels
from .apply import block_modules, quantize_model
from .functional import group_layout, parse_groups, quant_error
from .rounding import round_gptq_

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


def quantized_unit(
    model: nn.Module,
    unit: str,
    bits: int,
    groups: int | str,
    *,
    symmetric: bool = True,
    range_method: str = DEFAULT_RANGE_METHOD,
    rounding: str = "nearest",
    gptq: GPTQConfig | None = None,
    calibration: Sequence[Batch] = (),
    block_map: BlockMap | None = None,
) -> dict[str, Tensor]:
    """Q(W) of every matrix of ``unit`` with only ``unit`` quantized (weights only), by the path a plan takes:
    :func:`~.apply.quantize_model` on a one-unit plan, then for ``gptq`` :func:`~.rounding.round_gptq_` on
    ``calibration`` (so a layer's linears see its own already-rounded linears, the layers below stay FP32).

    Returns:
        ``{module path: Q(W)}`` (each shaped like the weight, on its device).
    """
    block_map = BlockMap(model) if block_map is None else block_map
    check_rounding(rounding)
    if rounding == "gptq" and gptq is None:
        gptq = GPTQConfig()
    plan = BitPlan(
        model=block_map.describe("model"),
        blocks={unit: {"bits": bits, "groups": groups}},
        act_bits=None,
        symmetric=symmetric,
        range_method=range_method,
        rounding=rounding,
        gptq=gptq.to_dict() if rounding == "gptq" and gptq is not None else None,
    )
    q = quantize_model(model, plan)
    if rounding == "gptq":
        round_gptq_(q, calibration, gptq or GPTQConfig())
    out = {}
    with torch.no_grad():
        for _, path, _ in block_modules(block_map, unit):
            w = model.get_submodule(path).weight
            out[path] = q.get_submodule(path).quantized().dequantize().to(device=w.device, dtype=w.dtype)
    return out


def draw_loss(model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn | None = None) -> float:
    """L = sum_j (n_j / N) L_j over ``batches`` (no gradients; the model's mode as it is), the weighting of
    :class:`~qbert_hessian.hessian.hvp.BlockHessian`."""
    loss_fn = loss_fn or model_loss
    device = next(model.parameters()).device
    sizes = [loss_weight(b) for b in batches]
    total = sum(sizes)
    if not total:
        raise QBHError("no data: pricing a plan's losses needs at least one labelled batch")
    with torch.no_grad():
        terms = [
            n / total * float(loss_fn(model, {k: v.to(device) for k, v in b.items()}))
            for n, b in zip(sizes, batches)
            if n
        ]
    return math.fsum(terms)


def priced_losses(
    model: nn.Module,
    entries: Mapping[tuple[str, str, int], Mapping[str, Tensor]],
    draws: Sequence[Sequence[Batch]],
    measure: Measure | str,
    *,
    loss_fn: LossFn | None = None,
    block_map: BlockMap | None = None,
    progress: bool = False,
) -> dict[tuple[str, str, int], float]:
    """The priced loss of every entry, averaged over ``draws`` (see the module docstring for the formulas).

    Args:
        model: the FP32 model (left as it was: weights restored exactly, mode restored).
        entries: ``{(unit, groups, bits): {module path: Q(W)}}`` (:func:`quantized_unit`).
        draws: the sensitivity draws, each a list of batches.
        measure: ``quadratic`` or ``measured``.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default the model's own loss.
        block_map: the model's, when the caller has it.
        progress: a progress bar over draws x entries.

    Returns:
        ``{(unit, groups, bits): loss change}``.
    """
    from tqdm.auto import tqdm

    measure = Measure(measure)
    if not measure.priced:
        raise QBHError(f"measure {measure.value} weighs ||Q(W)-W||^2 by a sensitivity; it prices no loss")
    if not draws:
        raise QBHError("no data: pricing a plan's losses needs at least one draw of batches")
    block_map = BlockMap(model) if block_map is None else block_map
    units = list(dict.fromkeys(u for u, _, _ in entries))
    params = {u: block_map.parameters(u) for u in units}
    union = list({id(p): p for ps in params.values() for p in ps}.values())
    total = {key: 0.0 for key in entries}
    bar = tqdm(total=len(draws) * len(entries), desc=f"pricing ({measure.value})", unit="entry", disable=not progress)
    with curvature_kernels(model), curvature_mode(model):
        for batches in draws:
            if measure == Measure.MEASURED:
                for key, value in _measured(model, entries, batches, loss_fn, bar).items():
                    total[key] += value
                continue
            with grads_enabled(union):
                hess = BlockHessian(model, union, batches, loss_fn, keep_gradient=True)
                try:
                    for (unit, g, b), qw in entries.items():
                        view = hess.block(params[unit])
                        by_id = {id(model.get_submodule(path).weight): w for path, w in qw.items()}
                        # dW: Q(W) - W on the unit's matrices, zero on its biases and LayerNorms
                        v = [by_id[id(p)] - p.detach() if id(p) in by_id else torch.zeros_like(p) for p in view.params]
                        hv = view(v)
                        first = math.fsum(
                            float((gi.double() * vi.double()).sum()) for gi, vi in zip(view.gradient(), v)
                        )
                        second = math.fsum(float((hi.double() * vi.double()).sum()) for hi, vi in zip(hv, v))
                        total[(unit, g, b)] += first + 0.5 * second
                        bar.update(1)
                finally:
                    hess.free()
    bar.close()
    return {key: value / len(draws) for key, value in total.items()}


def _measured(
    model: nn.Module,
    entries: Mapping[tuple[str, str, int], Mapping[str, Tensor]],
    batches: Sequence[Batch],
    loss_fn: LossFn | None,
    bar: object,
) -> dict[tuple[str, str, int], float]:
    """L(W + dW) - L(W) on one draw for every entry, each with only its unit's matrices set to Q(W)."""
    base = draw_loss(model, batches, loss_fn)
    out = {}
    for key, qw in entries.items():
        weights = {path: model.get_submodule(path).weight for path in qw}
        saved = {path: w.detach().clone() for path, w in weights.items()}
        try:
            with torch.no_grad():
                for path, w in weights.items():
                    w.copy_(qw[path])
            out[key] = draw_loss(model, batches, loss_fn) - base
        finally:
            with torch.no_grad():
                for path, w in weights.items():
                    w.copy_(saved[path])  # exactly the FP32 weights again
        bar.update(1)  # type: ignore[attr-defined]
    return out


def measure_priced_profile(
    model: nn.Module,
    units: Sequence[str],
    draws: Sequence[Sequence[Batch]],
    *,
    measure: Measure | str,
    rounding: str = "nearest",
    gptq: GPTQConfig | None = None,
    calibration: Sequence[Batch] = (),
    bits: Sequence[int] = (2, 3, 4, 8),
    groups: Sequence[int | str] = (128,),
    symmetric: bool = True,
    range_method: str = DEFAULT_RANGE_METHOD,
    model_name: str = "model",
    inputs: dict | None = None,
    block_map: BlockMap | None = None,
    loss_fn: LossFn | None = None,
    progress: bool = False,
) -> QuantProfile:
    """The cost table of ``units`` priced by the loss: one entry per encoder unit, grouping and width (module
    docstring); the embedding units carry their scales only (the allocator sizes them, never prices them).

    Args:
        model: the FP32 model (eager attention or one with second-order attention kernels).
        units: allocation units (:func:`profile_units`).
        draws: the sensitivity report's draws, each its list of batches (same indices and batching).
        measure: ``quadratic`` or ``measured``.
        rounding: ``nearest`` or ``gptq``: how each entry's weights round (the plan's rounding).
        gptq: the GPTQ settings (``rounding = gptq``; None: the defaults).
        calibration: ``gptq``: the calibration batches the plan's weights will be rounded on.
        bits, groups, symmetric, range_method, model_name, inputs, block_map: as :func:`measure_profile`.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default the model's own loss.
        progress: progress bars.

    Returns:
        A :class:`~qbert_hessian.artifacts.QuantProfile` with ``measure``, ``rounding`` (and ``gptq``) set.
    """
    measure = Measure(measure)
    check_rounding(rounding)
    if rounding == "gptq":
        gptq = gptq or GPTQConfig()
        if not calibration:
            raise QBHError("pricing gptq-rounded entries needs calibration batches; pass the plan's calibration data")
    block_map = BlockMap(model) if block_map is None else block_map
    base = measure_profile(
        model,
        units,
        bits=bits,
        groups=groups,
        symmetric=symmetric,
        range_method=range_method,
        model_name=model_name,
        inputs=inputs,
        block_map=block_map,
    )
    entries: dict[tuple[str, str, int], dict[str, Tensor]] = {}
    for unit, prof in base.units.items():
        if not unit.startswith("encoder."):
            continue
        for g in prof.groups:
            for b in bits:
                entries[(unit, g, b)] = quantized_unit(
                    model,
                    unit,
                    b,
                    parse_groups(g),
                    symmetric=symmetric,
                    range_method=range_method,
                    rounding=rounding,
                    gptq=gptq,
                    calibration=calibration,
                    block_map=block_map,
                )
    losses = priced_losses(model, entries, draws, measure, loss_fn=loss_fn, block_map=block_map, progress=progress)
    units_out = {}
    for unit, prof in base.units.items():
        costs = {
            g: GroupCost(c.scales, {str(b): losses[(unit, g, b)] for b in bits} if unit.startswith("encoder.") else {})
            for g, c in prof.groups.items()
        }
        units_out[unit] = dataclasses.replace(prof, groups=costs)
    return dataclasses.replace(
        base,
        units=units_out,
        measure=measure.value,
        rounding=rounding,
        gptq=gptq.to_dict() if rounding == "gptq" and gptq is not None else None,
    )
