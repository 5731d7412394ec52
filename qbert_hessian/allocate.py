"""Bits per block under a memory budget, solved exactly as a multiple-choice knapsack (HAWQ-V3's ILP).

For encoder blocks b (layers, or linears) and candidate widths k, with s_b the block's sensitivity and
e_{b,k} = ||Q_k(W_b) - W_b||^2 measured on the real weights with the chosen grouping,

    minimise   sum_b s_b * e_{b, k_b}
    subject to size(k_1 .. k_B) + size(embeddings) + size(everything kept FP32) <= budget

where s_b is Q-BERT's Omega = |mean lam| + std lam (top eigenvalue over data draws; the second-order bound
dL <= 1/2 lam ||dW||^2) or HAWQ-V2's average trace Tr(H_b) / n_b (the expected dL for an isotropic
perturbation). The embedding tables get their own fixed widths (Q-BERT: 8 bits), sized from their shapes under
their own grouping (never priced, so any cost table serves any embedding grouping); token types stay FP32.
``scipy.optimize.milp`` (HiGHS) solves it to optimality with a zero gap. Q-BERT's rank rule (bits monotone
in Omega) and uniform plans are here for comparison.

Priced measures. After second-order rounding (GPTQ) ||dW||^2 grows while the loss falls, so s_b * e_{b,k} with
round-to-nearest errors misprices every layer. With ``measure = quadratic`` or ``measured`` the cost table's entry
e_{b,k} is itself the predicted loss change of quantizing unit b alone at width k with the plan's rounding
(``quant/profile.py``: the second-order estimate g^T dW + 1/2 dW^T H dW on the sensitivity draws, or the measured
loss increase), and the allocator minimises

    sum_b e_{b, k_b}        (no sensitivity weight: s_b = 1)

under the same budget. Entries may be negative (quantizing can lower the loss of a model away from its minimum).
The sum assumes the units' losses add (no cross terms), as the weighted objective does. Such a table is made for
one measure and one rounding (and GPTQ settings): a plan is only made from a table of its own, else refused.
The rank rule and the ``reversed`` control then order the units by their priced loss at the narrowest candidate
width.

The allocation test (issue 10) needs controls of exactly the same size: :func:`reassign` permutes a solved
plan's widths among units of the same size (every BERT layer), ``reversed`` (the fewest bits to the most
sensitive units, the most to the least sensitive) or seeded ``random``. The packed tensors keep their size to
the byte, and the MILP's objective is a lower bound on every such permutation's (it is optimal at that size).

Everything runs on the report and its cost table (:class:`~qbert_hessian.artifacts.QuantProfile`, made by
``quant/profile.py``): no torch, no model. Sizes come from ``packed_format.py``, the format export writes, so a
plan's predicted size is the packed file's size to the byte.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .artifacts import BitPlan, Frontier, QuantProfile, SensitivityReport
from .config import AllocConfig, Assign, Budget, Deploy, Measure, Method, check_bits, group_layout
from .errors import QBHError
from .names import LINEAR_PARTS
from .onnx_format import (
    graph_tolerance,
    initializer_bytes,
    nbits_tensors,
    onnx_file_bytes,
    onnx_initializers,
)
from .packed_format import QuantizedWeight, TensorSpec, file_bytes, packed_bytes, packed_specs

MIB = 2**20


@dataclasses.dataclass
class Problem:
    """The knapsack over the report: per unit the cost (bytes) and loss of each candidate width.

    ``cost`` counts each unit's tensor data (packed codes, fp16 scales, zeros, activation ranges);
    ``fixed_bytes`` everything else with the largest header any choice can need, so a plan within the
    budget under this cost is within it on disk. :meth:`file_bytes` is the exact size of one choice.
    """

    units: list[str]
    bits: tuple[int, ...]
    sensitivity: np.ndarray  # (B,) s_b (ones under a priced measure)
    error: np.ndarray  # (B, K) ||Q_k(W_b) - W_b||^2, or under a priced measure the priced loss change
    cost: np.ndarray  # (B, K) data bytes of unit b at width k
    weights: np.ndarray  # (B,) number of weights per unit
    fixed_bytes: int  # embeddings, FP32 tensors, the header (its largest size over all choices)
    fp32_bytes: int  # the FP32 safetensors file
    layout: Any = None  # (choice) -> the packed file's tensor specs
    emb_bytes: int = 0  # the quantized embedding tables' data (part of fixed_bytes)
    emb_weights: int = 0  # their number of weights
    deployed: Any = None  # deploy = onnx: (choice) -> (the ONNX file's predicted bytes, its initializer bytes)
    deploy_tolerance: int = 0  # deploy = onnx: the stated bound on |predicted - file| bytes
    onnx_tensors: Any = None  # deploy = onnx: (choice) -> the initializers' (name, dims, data bytes)
    ranking: np.ndarray | None = None  # (B,) how sensitive each unit is, for the rank rule (None: sensitivity)

    @property
    def loss(self) -> np.ndarray:
        return self.sensitivity[:, None] * self.error

    @property
    def rank_key(self) -> np.ndarray:
        """The order of the rank rule and the ``reversed`` control: the sensitivity, or under a priced measure
        the priced loss at the narrowest candidate width."""
        return self.sensitivity if self.ranking is None else self.ranking

    def size(self, choice: Sequence[int]) -> int:
        """The budget's view of a choice's size (an upper bound on :meth:`file_bytes`, tight to the header)."""
        return int(self.fixed_bytes + sum(self.cost[b, k] for b, k in enumerate(choice)))

    def file_bytes(self, choice: Sequence[int]) -> int:
        """The size of the file the plan is priced for: the packed ``model.safetensors`` (exact), or under
        ``deploy = onnx`` the ONNX export (``onnx_format.onnx_file_bytes``)."""
        return self.deployed(choice)[0] if self.deployed else self.packed_bytes(choice)

    def packed_bytes(self, choice: Sequence[int]) -> int:
        """The exact size of the packed ``model.safetensors`` of a choice."""
        return file_bytes(self.layout(choice))

    def objective(self, choice: Sequence[int]) -> float:
        return float(sum(self.loss[b, k] for b, k in enumerate(choice)))

    def avg_bits(self, choice: Sequence[int]) -> float:
        return float(sum(self.weights[b] * self.bits[k] for b, k in enumerate(choice)) / self.weights.sum())


def _sensitivity(report: SensitivityReport, unit: str, measure: Measure) -> float:
    block = report.block(unit)
    if measure == Measure.OMEGA:
        omega = block.omega
        if isinstance(omega, bool) or not isinstance(omega, (int, float)) or not math.isfinite(omega) or omega < 0:
            raise QBHError(
                f"block {unit} has Omega {omega!r} in the report; Omega = |mean| + std is a finite number >= 0: "
                "regenerate the report with qbert-hessian sensitivity"
            )
        return float(omega)
    if block.normalized_trace is None:
        raise QBHError(f"block {unit} has no trace in the report; rerun sensitivity with --trace block or use omega")
    if not math.isfinite(block.normalized_trace):
        raise QBHError(f"block {unit} has a non-finite trace in the report; regenerate the report")
    # A negative trace estimate (noise around a flat block) must not reward perturbation.
    return max(float(block.normalized_trace), 0.0)


def check_report_coverage(report: SensitivityReport, num_layers: int | None = None) -> None:
    """The report is complete and scores every encoder layer (as a layer or as all six linears), so a plan
    leaves none in FP32; checked before anything is measured for it.

    Raises:
        QBHError: a partial report, no encoder blocks, or a layer left unscored.
    """
    if not report.complete:
        raise QBHError(f"the sensitivity report is partial ({', '.join(report.pending)} pending); finish it first")
    units = [b.name for b in report.blocks if b.name.startswith("encoder.")]
    if not units:
        raise QBHError("the sensitivity report scores no encoder blocks; run sensitivity on the default blocks")
    layers = num_layers or report.model.get("num_layers")
    covered = set(units)
    missing = [
        f"encoder.{i}"
        for i in range(int(layers or 0))
        if f"encoder.{i}" not in covered and not all(f"encoder.{i}.{p}" in covered for p in LINEAR_PARTS)
    ]
    if missing:
        raise QBHError(
            f"the report does not score {', '.join(missing)}, which a plan would leave in FP32; run sensitivity "
            "on every layer (the default blocks, or --blocks layers / linears)"
        )


def _check_coverage(report: SensitivityReport, profile: QuantProfile) -> None:
    """The report covers every layer (:func:`check_report_coverage`), every scored block known to the profile."""
    check_report_coverage(report, profile.model.get("num_layers"))
    unknown = [b.name for b in report.blocks if b.name.startswith("encoder.") and b.name not in profile.units]
    if unknown:
        raise QBHError(
            f"the report scores {', '.join(unknown)}, which the quantization profile lacks; measure the profile "
            "from this report (plan --model MODEL) or use the report it was made with"
        )


def check_profile_measure(profile: QuantProfile, config: AllocConfig) -> None:
    """The cost table was made for the plan's measure: the nearest-rounding ||Q(W)-W||^2 table for ``omega`` and
    ``trace`` (whatever the plan's rounding; its notes say so), a priced table of the same measure, rounding and
    GPTQ settings for ``quadratic`` and ``measured``.

    Raises:
        QBHError: a table made for another measure or rounding, in one line naming both and the fix.
    """
    want = config.measure
    if not want.priced:
        if profile.measure is None:
            return
        fix = "use the profile.json made beside the sensitivity report"
    else:
        gptq = config.gptq_config().to_dict() if config.rounding == "gptq" else None
        if (profile.measure, profile.rounding, profile.gptq) == (want.value, config.rounding, gptq):
            return
        fix = f"measure one for it (plan --measure {want.value} --rounding {config.rounding} --model MODEL)"
        if profile.measure == want.value and profile.rounding == config.rounding:  # only the GPTQ settings differ
            raise QBHError(
                f"the cost table was made with gptq settings {profile.gptq} but the plan rounds with {gptq}: its "
                f"entries would not be the plan's losses; {fix}"
            )
    plan = f"measure {want.value}" + (f" with {config.rounding} rounding" if want.priced else "")
    raise QBHError(
        f"the cost table holds {profile.made_with} but the plan asks for {plan}: its entries would not be the "
        f"plan's costs; {fix}"
    )


def embedding_scales(profile: QuantProfile, unit: str, groups: object) -> list[int]:
    """The number of scales of each matrix of embedding table ``unit`` under ``groups``: r_g * c_g of its
    :func:`~qbert_hessian.config.group_layout` grid (``channel``: one per row). A table's size follows from its
    shape alone, so every cost table sizes it under every grouping: a priced table (which holds the encoder's
    grouping only) as well as ``measure_profile``'s, whose recorded scales are these counts.

    Raises:
        QBHError: ``groups`` does not divide the table, or is ``heads``, in one line naming the table and the fix.
    """
    return [
        rg * cg
        for rg, cg in (group_layout((r, c), groups, kind="embedding", name=unit) for r, c in profile.unit(unit).shapes)
    ]


def build_problem(
    report: SensitivityReport, profile: QuantProfile, config: AllocConfig
) -> tuple[Problem, dict[str, int]]:
    """The knapsack of ``report`` and its cost table ``profile`` under ``config``, and the embedding widths.

    The encoder units' costs and sizes come from the table at ``config.groups``; the embedding tables are sized
    from their shapes at ``config.embedding_groups`` (:func:`embedding_scales`), whatever groupings the table holds.
    """
    if not isinstance(profile, QuantProfile):
        raise QBHError(
            "allocate needs the quantization profile: measure_profile(model, profile_units(...)) or profile.json"
        )
    if profile.range_method != config.range_method:
        raise QBHError(
            f"the quantization profile was measured with {profile.range_method} ranges but the plan asks for "
            f"{config.range_method}: its errors would not be the plan's; measure it with {config.range_method} "
            f"(plan --weight-range {config.range_method} --model MODEL) or plan with --weight-range "
            f"{profile.range_method}"
        )
    check_profile_measure(profile, config)
    units = [b.name for b in report.blocks if b.name.startswith("encoder.")]
    if not units:
        raise QBHError("the sensitivity report scores no encoder blocks; run sensitivity on the default blocks")
    _check_coverage(report, profile)
    measured = profile.unit(units[0]).cost(config.groups).error
    missing = [str(b) for b in config.bits if str(b) not in measured]
    if missing:
        raise QBHError(f"the profile has no errors at bits {', '.join(missing)}; pass --model to measure them")
    emb = {"embeddings.word": config.embedding_bits}
    if "embeddings.position" in profile.units:
        emb["embeddings.position"] = config.position_bits or config.embedding_bits
    emb = {u: b for u, b in emb.items() if u in profile.units}
    act = config.act_bits is not None and config.act_range != "dynamic"  # a stored range per linear's input
    scale_bytes = 2 + (0 if profile.symmetric else 1)

    def scales(unit: str, groups: object) -> list[int]:
        if unit in emb:  # sized, never priced: from its shape, under any grouping
            return embedding_scales(profile, unit, groups)
        return profile.unit(unit).cost(groups).scales

    def data_bytes(unit: str, bits: int, groups: object) -> int:
        u = profile.unit(unit)
        codes = sum(packed_bytes(r * c, bits) for r, c in u.shapes)
        return codes + sum(scales(unit, groups)) * scale_bytes + (4 * u.num_linears if act else 0)

    def quantized(unit: str, bits: int, groups: object) -> dict[str, QuantizedWeight]:
        u = profile.unit(unit)
        return {
            k: QuantizedWeight(bits, r * c, n, profile.symmetric)
            for k, (r, c), n in zip(u.weights, u.shapes, scales(unit, groups))
        }

    fp32 = [TensorSpec(n, d, tuple(s)) for n, d, s in profile.tensors]
    emb_q: dict[str, QuantizedWeight] = {}
    for u, b in emb.items():
        emb_q |= quantized(u, b, config.embedding_groups)

    def layout(choice: Sequence[int]) -> list[TensorSpec]:
        q = dict(emb_q)
        for u, k in zip(units, choice):
            q |= quantized(u, config.bits[k], config.groups)
        acts = (
            [w for u in units for w, lin in zip(profile.unit(u).weights, profile.unit(u).linear) if lin] if act else []
        )
        return packed_specs(fp32, q, acts)

    error = np.array([[profile.unit(u).cost(config.groups).error[str(b)] for b in config.bits] for u in units])
    cost = np.array([[data_bytes(u, b, config.groups) for b in config.bits] for u in units])
    quantized_keys = {w for u in [*units, *emb] for w in profile.unit(u).weights}
    rest = sum(t.nbytes for t in fp32 if t.name not in quantized_keys)
    emb_bytes = sum(data_bytes(u, b, config.embedding_groups) for u, b in emb.items())
    # The header's largest size: every unit at the widest candidate gives the longest shapes and offsets.
    widest = layout([len(config.bits) - 1] * len(units))
    header = file_bytes(widest) - sum(t.nbytes for t in widest)
    priced = config.measure.priced
    problem = Problem(
        units=units,
        bits=config.bits,
        sensitivity=np.ones(len(units))
        if priced
        else np.array([_sensitivity(report, u, config.measure) for u in units]),
        error=error,
        cost=cost,
        weights=np.array([profile.unit(u).num_weights for u in units], dtype=np.float64),
        fixed_bytes=int(rest + emb_bytes + header),
        fp32_bytes=file_bytes(fp32, {"format": "pt"}),
        layout=layout,
        emb_bytes=int(emb_bytes),
        emb_weights=sum(profile.unit(u).num_weights for u in emb),
        ranking=error[:, 0].copy() if priced else None,
    )
    if config.deploy == Deploy.ONNX:
        _price_onnx(problem, profile, units, emb, config)
    return problem, emb


def _weight_kinds(unit: str, profile: QuantProfile) -> list[str]:
    """The kind of each matrix of ``unit`` in profile order (``quant/apply.block_modules``'s order)."""
    parts, n = unit.split("."), len(profile.unit(unit).weights)
    if parts[0] == "embeddings":
        return ["embedding"] * n
    if len(parts) == 3:
        return [parts[2]] * n
    return list(LINEAR_PARTS) if n == len(LINEAR_PARTS) else ["linear"] * n  # a layer's six, else no per-head columns


def _price_onnx(
    problem: Problem, profile: QuantProfile, units: Sequence[str], emb: Mapping[str, int], config: AllocConfig
) -> None:
    """Reprice ``problem`` for the ONNX export: per unit and width the initializers' bytes (codes padded to
    blocks, float32 scales repeated per row and block, zero points; with their protobuf framing), the rest
    (FP32 tensors, the embedding tables, the graph) fixed; ``deployed`` predicts the file."""
    heads = profile.model.get("num_heads")
    layers = int(profile.model.get("num_layers") or 0)
    family = str(profile.model.get("family") or "bert")

    def weights(unit: str, bits: int, groups: object) -> dict[str, tuple[tuple[int, int], int, int, bool]]:
        u = profile.unit(unit)
        out = {}
        for key, shape, kind in zip(u.weights, u.shapes, _weight_kinds(unit, profile), strict=True):
            cols = group_layout(shape, groups, kind=kind, num_heads=heads, name=key)[1]  # type: ignore[arg-type]
            out[key] = ((int(shape[0]), int(shape[1])), bits, cols, kind == "embedding")
        return out

    def unit_bytes(unit: str, bits: int, groups: object) -> int:
        total = 0
        for key, (shape, b, cols, is_emb) in weights(unit, bits, groups).items():
            try:
                tensors = nbits_tensors(key, shape, b, cols, symmetric=profile.symmetric, embedding=is_emb)
            except ValueError:
                raise QBHError(
                    f"{unit}: with groups={groups} its column groups are {shape[1] // cols} wide, but ONNX Runtime's "
                    "blocks are 16..256 values (a power of two) inside one group; choose other groups or deploy "
                    "the packed checkpoint (deploy packed, the default)"
                ) from None
            total += sum(initializer_bytes(n, d, nb) for n, d, nb in tensors)
        return total

    fixed_q: dict[str, tuple[tuple[int, int], int, int, bool]] = {}
    for u, b in emb.items():
        fixed_q |= weights(u, b, config.embedding_groups)
    fp32 = [(n, d, tuple(s)) for n, d, s in profile.tensors]

    def quantized(choice: Sequence[int]) -> dict[str, tuple[tuple[int, int], int, int, bool]]:
        q = dict(fixed_q)
        for u, k in zip(units, choice):
            q |= weights(u, config.bits[k], config.groups)
        return q

    def deployed(choice: Sequence[int]) -> tuple[int, int]:
        return onnx_file_bytes(fp32, quantized(choice), symmetric=profile.symmetric, num_layers=layers, family=family)

    def tensors(choice: Sequence[int]) -> list[tuple[str, tuple[int, ...], int]]:
        return onnx_initializers(fp32, quantized(choice), symmetric=profile.symmetric)

    problem.cost = np.array([[unit_bytes(u, b, config.groups) for b in config.bits] for u in units])
    problem.emb_bytes = sum(unit_bytes(u, b, config.embedding_groups) for u, b in emb.items())
    smallest = [0] * len(units)
    problem.fixed_bytes = deployed(smallest)[0] - int(problem.cost[np.arange(len(units)), smallest].sum())
    problem.deployed, problem.onnx_tensors = deployed, tensors
    problem.deploy_tolerance = graph_tolerance(layers, family)


def _constraint(problem: Problem, budget: Budget) -> tuple[np.ndarray, float, str]:
    """The budget as ``row @ x <= rhs`` over the one-hot choice variables x (B*K)."""
    if budget.avg_bits is not None:
        row = (problem.weights[:, None] * np.array(problem.bits)[None, :]).ravel()
        return row, float(budget.avg_bits * problem.weights.sum()), f"average {budget.avg_bits:g} bits on the encoder"
    max_bytes = budget.max_mb * MIB if budget.max_mb is not None else problem.fp32_bytes / budget.ratio  # type: ignore[operator]
    return problem.cost.ravel().astype(np.float64), float(max_bytes - problem.fixed_bytes), f"{max_bytes / MIB:.3f} MiB"


def _check_feasible(problem: Problem, budget: Budget) -> None:
    smallest = [0] * len(problem.units)
    row, rhs, what = _constraint(problem, budget)
    if row.reshape(problem.cost.shape)[:, 0].sum() <= rhs + 1e-9:
        return
    size = problem.file_bytes(smallest)
    raise QBHError(
        f"budget {what} is infeasible: the smallest plan with bits {','.join(map(str, problem.bits))} is "
        f"{size / MIB:.3f} MiB (average {problem.avg_bits(smallest):.2f} bits, ratio "
        f"{problem.fp32_bytes / size:.2f}x); raise the budget or allow fewer bits"
    )


def solve_milp(problem: Problem, budget: Budget) -> list[int]:
    """The exact optimum: one width per unit, minimum total loss within the budget (``scipy.optimize.milp``)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    _check_feasible(problem, budget)
    B, K = problem.cost.shape
    row, rhs, _ = _constraint(problem, budget)
    loss = problem.loss.ravel()
    # Scaled so HiGHS's absolute tolerances mean the same on any model (a priced loss can be negative); ties
    # broken towards smaller plans.
    c = loss / max(np.abs(loss).max(), 1e-300) + 1e-9 * problem.cost.ravel() / problem.cost.max()
    one_hot = np.kron(np.eye(B), np.ones(K))
    scale = max(abs(rhs), 1.0)
    res = milp(
        c,
        constraints=[LinearConstraint(one_hot, 1, 1), LinearConstraint(row[None, :] / scale, -np.inf, rhs / scale)],
        integrality=np.ones(B * K),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 0.0},
    )
    if res.x is None:
        raise QBHError(f"the allocator found no plan ({res.message}); raise the budget")
    choice = [int(np.argmax(res.x[b * K : (b + 1) * K])) for b in range(B)]
    if (row.reshape(B, K)[np.arange(B), choice]).sum() > rhs * (1 + 1e-9) + 1e-6:
        raise QBHError("the MILP solution exceeds the budget (solver tolerance); raise the budget slightly")
    return choice


def solve_rank(problem: Problem, budget: Budget) -> list[int]:
    """Q-BERT's rule: widths non-decreasing in sensitivity; the feasible such plan of least loss."""
    _check_feasible(problem, budget)
    B, K = problem.cost.shape
    row, rhs, _ = _constraint(problem, budget)
    row = row.reshape(B, K)
    order = np.argsort(problem.rank_key, kind="stable")  # least sensitive first
    best: tuple[float, list[int]] | None = None
    for ks in itertools.combinations_with_replacement(range(K), B):  # non-decreasing along ``order``
        choice = [0] * B
        for pos, b in enumerate(order):
            choice[b] = ks[pos]
        if sum(row[b, k] for b, k in enumerate(choice)) <= rhs + 1e-9:
            obj = problem.objective(choice)
            if best is None or obj < best[0]:
                best = (obj, choice)
    assert best is not None  # the all-smallest plan is feasible
    return best[1]


def solve_brute_force(problem: Problem, budget: Budget) -> list[int]:
    """Every combination (K^B): the reference the tests hold the MILP to."""
    B, K = problem.cost.shape
    row, rhs, _ = _constraint(problem, budget)
    row = row.reshape(B, K)
    feasible = (
        c for c in itertools.product(range(K), repeat=B) if sum(row[b, k] for b, k in enumerate(c)) <= rhs + 1e-9
    )
    return list(min(feasible, key=problem.objective))


def size_classes(problem: Problem) -> list[list[int]]:
    """The units that can trade widths without changing the packed data: the same number of weights and the same
    bytes at every candidate width (BERT: all layers; linears as units: query/key/value/attn_out, and ffn_in with
    ffn_out). Each class lists unit indices in unit order; classes in order of their first unit."""
    classes: dict[tuple[float, tuple[int, ...]], list[int]] = {}
    for b in range(len(problem.units)):
        classes.setdefault((float(problem.weights[b]), tuple(int(c) for c in problem.cost[b])), []).append(b)
    return list(classes.values())


def reassign(problem: Problem, choice: Sequence[int], assign: Assign | str, seed: int | None = None) -> list[int]:
    """The widths of ``choice`` permuted within each :func:`size_classes` class: the same widths, the same bytes.

    Args:
        problem: the knapsack ``choice`` solves.
        choice: one width index per unit (the solver's plan).
        assign: ``reversed``: within a class, rank the units by sensitivity, most sensitive first (ties keep unit
            order); the unit of rank i gets the class's i-th smallest width, so the most bits go to the least
            sensitive units. For a plan whose widths rise with sensitivity (Q-BERT's rule; usually the MILP's)
            this is the mirror image: rank i gets the width of rank n-1-i. ``random``: a permutation of each
            class drawn by ``numpy.random.default_rng(seed)``, classes in order.
        seed: seeds ``random`` (None: 0); ignored by ``reversed``.

    Returns:
        The new width index per unit. Each class's multiset of widths, hence the packed data's size and the
        average bits, equals ``choice``'s.
    """
    assign = Assign(assign)
    rng = np.random.default_rng(0 if seed is None else seed)
    new = list(choice)
    for members in size_classes(problem):
        if assign == Assign.REVERSED:
            ranked = sorted(members, key=lambda b: -problem.rank_key[b])  # stable: ties keep unit order
            # Index order is width order (AllocConfig sorts the candidate bits).
            for b, k in zip(ranked, sorted(choice[m] for m in members)):
                new[b] = k
        else:
            for b, src in zip(members, rng.permutation(len(members))):
                new[b] = choice[members[src]]
    return new


def _reassigned(
    problem: Problem, choice: Sequence[int], assign: Assign, seed: int | None, method: str, measure: str
) -> tuple[list[int], dict[str, Any], list[str]]:
    """:func:`reassign` with the plan's record of it: the provenance entry (the solver's plan) and the notes."""
    new = reassign(problem, choice, assign, seed)
    solver, mine = problem.objective(choice), problem.objective(new)
    how = (
        f"reversed against the {measure} ranking (no unit has more bits than a less sensitive one)"
        if assign == Assign.REVERSED
        else f"permuted at random (seed {0 if seed is None else seed})"
    )
    ratio = f" (x{mine / solver:.3g})" if solver > 0 else ""
    notes = [
        f"not the solver's assignment: the {method} plan's widths {how} among units of the same size; objective "
        f"{mine:.6g} against the solver's {solver:.6g}{ratio}"
        if new != list(choice)
        else f"the {method} plan's widths {how} among units of the same size: no width moved, this plan is the solver's"
    ]
    size, solver_size = problem.file_bytes(new), problem.file_bytes(choice)
    if size != solver_size:  # equal data; a tensor offset in the safetensors header gained or lost a digit
        notes.append(
            f"the packed file is {size - solver_size:+d} bytes against the solver's plan: the tensor data are the "
            "same size, the safetensors header's offsets are not"
        )
    source = {
        "assign": assign.value,
        "seed": (0 if seed is None else seed) if assign == Assign.RANDOM else None,
        "method": method,
        "objective": solver,
        "bytes": solver_size,
        "bits": {u: problem.bits[k] for u, k in zip(problem.units, choice)},
    }
    return new, source, notes


def _plan(
    report: SensitivityReport,
    profile: QuantProfile,
    problem: Problem,
    emb: Mapping[str, int],
    choice: Sequence[int],
    config: AllocConfig,
    *,
    method: str,
    budget: dict[str, Any],
    source: Mapping[str, Any] | None,
    notes: list[str],
) -> BitPlan:
    blocks: dict[str, dict[str, Any]] = {u: {"bits": b, "groups": config.embedding_groups} for u, b in emb.items()}
    blocks.update({u: {"bits": problem.bits[k], "groups": config.groups} for u, k in zip(problem.units, choice)})
    size = problem.file_bytes(choice)
    enc_bytes = int(sum(problem.cost[b, k] for b, k in enumerate(choice)))
    parts = {"encoder": (enc_bytes, int(4 * problem.weights.sum()))}
    if problem.emb_weights:
        parts["embeddings"] = (problem.emb_bytes, 4 * problem.emb_weights)
    return BitPlan(
        model={k: report.model.get(k) for k in ("name", "family", "num_layers", "num_heads", "hidden_size")},
        blocks=blocks,
        act_bits=config.act_bits,
        symmetric=profile.symmetric,
        range_method=config.range_method,  # the profile's: build_problem refuses any other
        rounding=config.rounding,
        gptq=config.gptq_config().to_dict() if config.rounding == "gptq" else None,
        act_range=config.act_range,
        method=method,
        budget=budget,
        measure=config.measure.value,
        source=dict(source or {}),
        predicted={
            "bytes": size,
            "mib": size / MIB,
            "fp32_bytes": problem.fp32_bytes,
            "fp32_mib": problem.fp32_bytes / MIB,
            "compression": problem.fp32_bytes / size,
            "encoder_avg_bits": problem.avg_bits(choice),
            # Q-BERT's Table 1 reports the encoder weights' compression apart from the embedding table's.
            **{
                part: {"bytes": q, "fp32_bytes": f, "compression": f / q if q else float("inf")}
                for part, (q, f) in parts.items()
            },
            **_deploy_entry(problem, choice),
            "objective": problem.objective(choice),
            "per_block": {
                u: {
                    **(
                        {}
                        if config.measure.priced
                        else {"sensitivity": float(problem.sensitivity[b]), "error": float(problem.error[b, k])}
                    ),
                    "loss": float(problem.loss[b, k]),
                    "bytes": int(problem.cost[b, k]),
                }
                for b, (u, k) in enumerate(zip(problem.units, choice))
            },
        },
        notes=[*notes, *_rounding_notes(config)],
    )


def _rounding_notes(config: AllocConfig) -> list[str]:
    if config.measure.priced:
        return [
            f"each block's cost is its priced loss change ({config.measure.value}, {config.rounding} rounding, "
            "that block quantized alone); the objective is their sum"
        ]
    if config.rounding == "nearest":
        return []
    return [
        f"weights round by {config.rounding} ({config.calib_samples} calibration sequences, damp {config.damp}); the "
        "errors and objective above are round-to-nearest's (the cost table's), not the rounding's own"
    ]


def _deploy_entry(problem: Problem, choice: Sequence[int]) -> dict[str, Any]:
    """Under ``deploy = onnx`` what ``bytes`` is the size of, the packed file's size beside it (the packed
    checkpoint is still what ``quantize`` writes), the ONNX initializers' exact bytes and the stated bound on the
    rest; nothing for the default (plans made before the setting existed read the same)."""
    if problem.deployed is None:
        return {}
    _, inits = problem.deployed(choice)
    return {
        "deploy": Deploy.ONNX.value,
        "packed_bytes": problem.packed_bytes(choice),
        "onnx_initializer_bytes": inits,
        "onnx_tolerance_bytes": problem.deploy_tolerance,
    }


def allocate_bits(
    report: SensitivityReport,
    profile: QuantProfile,
    budget: Budget,
    config: AllocConfig = AllocConfig(),
    *,
    source: Mapping[str, Any] | None = None,
    assign: Assign | str | None = None,
    assign_seed: int | None = None,
) -> BitPlan:
    """The bit plan of least predicted loss within ``budget`` (or, with ``assign``, a control of its size).

    Args:
        report: a complete sensitivity report scoring every encoder layer (as layers or linears).
        profile: the cost table of the report's model (:func:`~qbert_hessian.quant.profile.measure_profile`).
        budget: ``Budget(max_mb=...)``, ``Budget(ratio=...)`` or ``Budget(avg_bits=...)``.
        config: candidate widths, grouping, measure, method, embedding and activation widths.
        source: provenance stored in the plan (report path and sha256).
        assign: ``reversed`` or ``random``: solve as usual, then :func:`reassign` the widths among units of the
            same size. The plan's ``method`` becomes e.g. ``milp-reversed``, ``source["reassigned_from"]``
            holds the solver's widths, objective and size, a note says it is not the solver's assignment; its
            size is the solver's plan's and its objective is recomputed (None: the solver's assignment).
        assign_seed: seeds ``assign="random"`` (None: 0).

    Returns:
        The :class:`BitPlan` with its predicted size, compression, average bits and objective.

    Raises:
        QBHError: an infeasible budget (the message gives the smallest reachable size), a partial report, a
            layer left unscored, a profile without the grouping or widths, a missing trace or a bad Omega, an
            unknown ``assign`` or a seed without ``assign="random"``.

    Example:
        >>> plan = allocate_bits(report, profile, Budget(avg_bits=2.5))  # doctest: +SKIP
    """
    if config.method == Method.UNIFORM:
        raise QBHError(
            "method 'uniform' gives every block one width and takes no budget; ask for the width instead "
            "(plan --uniform BITS, or uniform = BITS in [[plans]]), or use method milp or rank with a budget"
        )
    if assign is not None and assign not in [a.value for a in Assign]:
        raise QBHError(f"assign {assign!r} is not known; use reversed or random, or None for the solver's own")
    if assign_seed is not None and assign != Assign.RANDOM.value:
        raise QBHError("assign_seed seeds assign='random'; pass assign='random' or drop the seed")
    problem, emb = build_problem(report, profile, config)
    notes: list[str] = []
    row, rhs, _ = _constraint(problem, budget)
    top = len(problem.bits) - 1
    if row.reshape(problem.cost.shape)[:, top].sum() <= rhs:
        notes.append(
            f"the budget admits every block at {problem.bits[top]} bits (the widest candidate): nothing to trade off"
        )
    choice = solve_milp(problem, budget) if config.method == Method.MILP else solve_rank(problem, budget)
    method, source = config.method.value, dict(source or {})
    if assign is not None:
        how = Assign(assign)
        choice, source["reassigned_from"], more = _reassigned(
            problem, choice, how, assign_seed, method, config.measure.value
        )
        method, notes = f"{method}-{how.value}", [*more, *notes]
    return _plan(
        report,
        profile,
        problem,
        emb,
        choice,
        config,
        method=method,
        budget={k: v for k, v in budget.to_dict().items() if v is not None},
        source=source,
        notes=notes,
    )


def uniform_plan(
    report: SensitivityReport,
    profile: QuantProfile,
    bits: int,
    config: AllocConfig = AllocConfig(),
    *,
    source: Mapping[str, Any] | None = None,
) -> BitPlan:
    """Every encoder block at ``bits`` (embeddings and activations as ``config``), with its predicted size."""
    config = dataclasses.replace(config, bits=(check_bits(bits, "uniform bits"),))
    problem, emb = build_problem(report, profile, config)
    choice = [0] * len(problem.units)
    return _plan(
        report, profile, problem, emb, choice, config, method="uniform", budget={"bits": bits}, source=source, notes=[]
    )


def frontier(
    report: SensitivityReport, profile: QuantProfile, config: AllocConfig = AllocConfig(), *, num_points: int = 25
) -> Frontier:
    """The size/objective Pareto frontier: MILP plans over a sweep of average-bit budgets, uniform plans, and
    Q-BERT's rank rule at each budget (sizes are the packed files' exact sizes)."""
    problem, _ = build_problem(report, profile, config)
    lo, hi = min(problem.bits), max(problem.bits)
    points, seen = [], set()
    for a in np.linspace(lo, hi, num_points):
        budget = Budget(avg_bits=float(a) + 1e-9)
        choice = solve_milp(problem, budget)
        key = tuple(choice)
        rank = solve_rank(problem, budget) if len(problem.units) <= 24 else None
        points.append(
            {
                "avg_bits_budget": float(a),
                "avg_bits": problem.avg_bits(choice),
                "mib": problem.file_bytes(choice) / MIB,
                "objective": problem.objective(choice),
                "bits": {u: problem.bits[k] for u, k in zip(problem.units, choice)},
                "rank_mib": problem.file_bytes(rank) / MIB if rank else None,
                "rank_objective": problem.objective(rank) if rank else None,
                "new": key not in seen,
            }
        )
        seen.add(key)
    uniform = [
        {
            "bits": b,
            "mib": problem.file_bytes([k] * len(problem.units)) / MIB,
            "objective": problem.objective([k] * len(problem.units)),
        }
        for k, b in enumerate(problem.bits)
    ]
    return Frontier(
        groups=str(config.groups),
        measure=config.measure.value,
        bits=list(problem.bits),
        fp32_mib=problem.fp32_bytes / MIB,
        points=points,
        uniform=uniform,
    )
