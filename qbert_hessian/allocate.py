"""Bits per block under a memory budget, solved exactly as a multiple-choice knapsack (HAWQ-V3's ILP).

For encoder blocks b (layers, or linears) and candidate widths k, with s_b the block's sensitivity and
e_{b,k} = ||Q_k(W_b) - W_b||^2 measured on the real weights with the chosen grouping,

    minimise   sum_b s_b * e_{b, k_b}
    subject to size(k_1 .. k_B) + size(embeddings) + size(everything kept FP32) <= budget

where s_b is Q-BERT's Omega = |mean lam| + std lam (top eigenvalue over data draws; the second-order bound
dL <= 1/2 lam ||dW||^2) or HAWQ-V2's average trace Tr(H_b) / n_b (the expected dL for an isotropic
perturbation). The embedding tables get their own fixed widths (Q-BERT: 8 bits); token types stay FP32.
``scipy.optimize.milp`` (HiGHS) solves it to optimality with a zero gap. Q-BERT's rank rule (bits monotone
in Omega) and uniform plans are here for comparison.

Everything runs on the ``quantization`` profile inside ``sensitivity.json``: no torch, no model.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any

import numpy as np

from .artifacts import BitPlan, SensitivityReport
from .config import _Config, _set_enum, check_bits, parse_groups
from .errors import QBHError

MIB = 2**20
SCALE_BYTES = 2  # float16 scale per group
ZERO_BYTES = 1  # uint8 zero point per group (asymmetric only)
ACT_BYTES = 4  # float32 activation range per quantized linear
# safetensors JSON header per tensor, besides its name: '"":{"dtype":"F32","shape":[..],"data_offsets":[a,b]},'
# is 48 fixed characters, the shape (~4 on average) and two offsets of about as many digits as the file has.
HEADER_FIXED_PER_TENSOR = 52


class Measure(str, Enum):
    """The sensitivity s_b that weighs each block's perturbation: Q-BERT's Omega or the average trace."""

    OMEGA = "omega"
    TRACE = "trace"


class Method(str, Enum):
    """``milp``: exact optimum; ``rank``: Q-BERT's rule (bits monotone in sensitivity); ``uniform``."""

    MILP = "milp"
    RANK = "rank"
    UNIFORM = "uniform"


@dataclasses.dataclass(frozen=True)
class Budget(_Config):
    """Exactly one of: ``max_mb`` (whole model, MiB), ``ratio`` (compression vs FP32), ``avg_bits`` (encoder)."""

    max_mb: float | None = None
    ratio: float | None = None
    avg_bits: float | None = None

    def __post_init__(self) -> None:
        given = {k: v for k, v in self.to_dict().items() if v is not None}
        if len(given) != 1:
            raise QBHError("give exactly one budget: --budget-mb, --ratio or --avg-bits")
        ((key, value),) = given.items()
        if not value > 0:
            raise QBHError(f"budget {key}={value} must be positive")


@dataclasses.dataclass(frozen=True)
class AllocConfig(_Config):
    """Allocator settings.

    Args:
        bits: candidate widths for the encoder blocks (Q-BERT: 2, 3, 4, 8).
        groups: grouping of every encoder matrix (1, heads, an integer, channel; Q-BERT: 128).
        measure: ``omega`` or ``trace``.
        method: ``milp``, ``rank`` or ``uniform``.
        embedding_bits: width of the word-embedding table (Q-BERT: 8).
        position_bits: width of the position table (default: ``embedding_bits``).
        embedding_groups: grouping of the embedding tables (``channel``: one scale per row).
        act_bits: activation width on quantized linears (None: FP32 activations).
    """

    bits: tuple[int, ...] = (2, 3, 4, 8)
    groups: int | str = 128
    measure: Measure = Measure.OMEGA
    method: Method = Method.MILP
    embedding_bits: int = 8
    position_bits: int | None = None
    embedding_groups: int | str = "channel"
    act_bits: int | None = 8

    def __post_init__(self) -> None:
        bits = tuple(sorted({check_bits(int(b)) for b in self.bits}))
        if not bits:
            raise QBHError("give at least one candidate bit width, e.g. --bits 2,3,4,8")
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "groups", parse_groups(self.groups))
        object.__setattr__(self, "embedding_groups", parse_groups(self.embedding_groups))
        check_bits(self.embedding_bits, "embedding bits")
        if self.position_bits is not None:
            check_bits(self.position_bits, "position bits")
        if self.act_bits is not None:
            check_bits(self.act_bits, "activation bits")
        _set_enum(self, "measure", Measure, "sensitivity measure")
        _set_enum(self, "method", Method, "allocation method")


@dataclasses.dataclass
class Problem:
    """The knapsack over the report: per unit the cost (bytes) and loss of each candidate width."""

    units: list[str]
    bits: tuple[int, ...]
    sensitivity: np.ndarray  # (B,)
    error: np.ndarray  # (B, K) ||Q_k(W_b) - W_b||^2
    cost: np.ndarray  # (B, K) bytes of unit b at width k, scales included
    weights: np.ndarray  # (B,) number of weights per unit
    fixed_bytes: int  # embeddings, FP32 tensors, activation ranges, header
    fp32_bytes: int

    @property
    def loss(self) -> np.ndarray:
        return self.sensitivity[:, None] * self.error

    def size(self, choice: Sequence[int]) -> int:
        return int(self.fixed_bytes + sum(self.cost[b, k] for b, k in enumerate(choice)))

    def objective(self, choice: Sequence[int]) -> float:
        return float(sum(self.loss[b, k] for b, k in enumerate(choice)))

    def avg_bits(self, choice: Sequence[int]) -> float:
        return float(sum(self.weights[b] * self.bits[k] for b, k in enumerate(choice)) / self.weights.sum())


def _sensitivity(report: SensitivityReport, unit: str, measure: Measure) -> float:
    block = report.block(unit)
    if measure == Measure.OMEGA:
        return float(block.omega)
    if block.normalized_trace is None:
        raise QBHError(f"block {unit} has no trace in the report; rerun sensitivity with --trace block or use omega")
    # A negative trace estimate (noise around a flat block) must not reward perturbation.
    return max(float(block.normalized_trace), 0.0)


def _group_entry(profile: Mapping[str, Any], unit: str, groups: int | str) -> dict[str, Any]:
    units = profile["units"]
    if unit not in units:
        raise QBHError(f"the report's quantization profile has no unit {unit}; rerun plan with --model to rebuild it")
    entry = units[unit]
    key = str(groups)
    if key not in entry["groups"]:
        why = entry.get("unavailable", {}).get(key)
        if why:
            raise QBHError(why)
        raise QBHError(
            f"the report has no quantization errors for groups={groups}; pass --model so plan can measure them"
        )
    return entry["groups"][key]


def unit_bytes(profile: Mapping[str, Any], unit: str, bits: int, groups: int | str) -> int:
    """Bytes of one unit at ``bits``: bit-packed codes per matrix, fp16 scales (and zeros) per group."""
    entry = profile["units"][unit]
    g = _group_entry(profile, unit, groups)
    per_group = SCALE_BYTES + (0 if profile.get("symmetric", True) else ZERO_BYTES)
    return sum(math.ceil(n * bits / 8) for n in entry["matrices"]) + g["num_scales"] * per_group


def _fixed_bytes(profile: Mapping[str, Any], units: Sequence[str], emb: Mapping[str, int], config: AllocConfig) -> int:
    """Everything but the encoder units: FP32 tensors, quantized embeddings, activation ranges, header."""
    quantized = [*units, *emb]
    fp32_rest = profile["state_bytes"] - 4 * sum(profile["units"][u]["num_weights"] for u in quantized)
    emb_bytes = sum(unit_bytes(profile, u, b, config.embedding_groups) for u, b in emb.items())
    linears = sum(profile["units"][u]["linears"] for u in units)
    act_tensors = linears if config.act_bits else 0  # one float32 range per quantized linear
    symmetric = profile.get("symmetric", True)
    # Header names: each quantized weight "W" becomes "W.codes" and "W.scale" (and "W.zero"); each range is
    # "<module>.act.amax" (the weight's name, less ".weight", plus ".act.amax").
    names = profile.get("name_bytes", 0)
    tensors = profile["num_tensors"] + act_tensors
    for u in quantized:
        n_mat, w_names = len(profile["units"][u]["matrices"]), profile["units"][u].get("name_bytes", 0)
        names += w_names + 12 * n_mat + (w_names + 5 * n_mat if not symmetric else 0)
        tensors += n_mat * (1 if symmetric else 2)
    names += (
        sum(profile["units"][u].get("name_bytes", 0) + 2 * profile["units"][u]["linears"] for u in units)
        if act_tensors
        else 0
    )
    act = ACT_BYTES * act_tensors
    digits = len(str(profile["state_bytes"] // 8))  # a packed file is of the order of FP32 / 8
    header = 8 + names + (HEADER_FIXED_PER_TENSOR + 2 * digits) * tensors + 80  # + the metadata entry
    return int(fp32_rest + emb_bytes + act + header)


def build_problem(report: SensitivityReport, config: AllocConfig) -> tuple[Problem, dict[str, int]]:
    """The knapsack of ``report`` under ``config``, and the embedding widths it fixes."""
    profile = report.quantization
    if not profile:
        raise QBHError(
            "the sensitivity report has no quantization profile; rerun plan with --model MODEL to measure it"
        )
    units = [b.name for b in report.blocks if b.name.startswith("encoder.") and b.name in profile["units"]]
    if not units:
        raise QBHError("the sensitivity report scores no encoder blocks; run sensitivity on the default blocks")
    measured = _group_entry(profile, units[0], config.groups)["error"]
    missing = [str(b) for b in config.bits if str(b) not in measured]
    if missing:
        raise QBHError(f"the report's profile has no errors at bits {', '.join(missing)}; pass --model to measure them")
    emb = {"embeddings.word": config.embedding_bits}
    if "embeddings.position" in profile["units"]:
        emb["embeddings.position"] = config.position_bits or config.embedding_bits
    emb = {u: b for u, b in emb.items() if u in profile["units"]}
    error = np.array([[_group_entry(profile, u, config.groups)["error"][str(b)] for b in config.bits] for u in units])
    cost = np.array([[unit_bytes(profile, u, b, config.groups) for b in config.bits] for u in units])
    problem = Problem(
        units=units,
        bits=config.bits,
        sensitivity=np.array([_sensitivity(report, u, config.measure) for u in units]),
        error=error,
        cost=cost,
        weights=np.array([profile["units"][u]["num_weights"] for u in units], dtype=np.float64),
        fixed_bytes=_fixed_bytes(profile, units, emb, config),
        fp32_bytes=int(profile["state_bytes"]),
    )
    return problem, emb


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
    size = problem.size(smallest)
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
    # Scaled so HiGHS's absolute tolerances mean the same on any model; ties broken towards smaller plans.
    c = loss / max(loss.max(), 1e-300) + 1e-9 * problem.cost.ravel() / problem.cost.max()
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
    order = np.argsort(problem.sensitivity, kind="stable")  # least sensitive first
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


def _plan(
    report: SensitivityReport,
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
    size = problem.size(choice)
    return BitPlan(
        model={k: report.model.get(k) for k in ("name", "family", "num_layers", "num_heads", "hidden_size")},
        blocks=blocks,
        act_bits=config.act_bits,
        symmetric=bool(report.quantization.get("symmetric", True)),  # type: ignore[union-attr]
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
            "objective": problem.objective(choice),
            "per_block": {
                u: {
                    "sensitivity": float(problem.sensitivity[b]),
                    "error": float(problem.error[b, k]),
                    "loss": float(problem.loss[b, k]),
                    "bytes": int(problem.cost[b, k]),
                }
                for b, (u, k) in enumerate(zip(problem.units, choice))
            },
        },
        notes=notes,
    )


def allocate_bits(
    report: SensitivityReport,
    budget: Budget,
    config: AllocConfig = AllocConfig(),
    *,
    source: Mapping[str, Any] | None = None,
) -> BitPlan:
    """The bit plan of least predicted loss within ``budget``.

    Args:
        report: a sensitivity report carrying its ``quantization`` profile.
        budget: ``Budget(max_mb=...)``, ``Budget(ratio=...)`` or ``Budget(avg_bits=...)``.
        config: candidate widths, grouping, measure, method, embedding and activation widths.
        source: provenance stored in the plan (report path and sha256).

    Returns:
        The :class:`BitPlan` with its predicted size, compression, average bits and objective.

    Raises:
        QBHError: an infeasible budget (the message gives the smallest reachable size), a report without the
            profile or trace the measure needs.

    Example:
        >>> plan = allocate_bits(report, Budget(avg_bits=2.5))  # doctest: +SKIP
    """
    if config.method == Method.UNIFORM:
        raise QBHError("use uniform_plan(report, bits, config) for a uniform plan; it takes no budget")
    problem, emb = build_problem(report, config)
    notes: list[str] = []
    row, rhs, _ = _constraint(problem, budget)
    top = len(problem.bits) - 1
    if row.reshape(problem.cost.shape)[:, top].sum() <= rhs:
        notes.append(
            f"the budget admits every block at {problem.bits[top]} bits (the widest candidate): nothing to trade off"
        )
    choice = solve_milp(problem, budget) if config.method == Method.MILP else solve_rank(problem, budget)
    return _plan(
        report,
        problem,
        emb,
        choice,
        config,
        method=config.method.value,
        budget={k: v for k, v in budget.to_dict().items() if v is not None},
        source=source,
        notes=notes,
    )


def uniform_plan(
    report: SensitivityReport,
    bits: int,
    config: AllocConfig = AllocConfig(),
    *,
    source: Mapping[str, Any] | None = None,
) -> BitPlan:
    """Every encoder block at ``bits`` (embeddings and activations as ``config``), with its predicted size."""
    config = dataclasses.replace(config, bits=(bits,))
    problem, emb = build_problem(report, config)
    choice = [0] * len(problem.units)
    return _plan(report, problem, emb, choice, config, method="uniform", budget={"bits": bits}, source=source, notes=[])


def frontier(report: SensitivityReport, config: AllocConfig = AllocConfig(), *, num_points: int = 25) -> dict[str, Any]:
    """The size/objective Pareto frontier: MILP plans over a sweep of average-bit budgets, and uniform plans.

    Returns:
        ``{"schema", "groups", "measure", "bits", "points": [{avg_bits_budget, mib, objective, bits: {unit: b}}],
        "uniform": [{bits, mib, objective}], "rank": [...]}``.
    """
    problem, _ = build_problem(report, config)
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
                "mib": problem.size(choice) / MIB,
                "objective": problem.objective(choice),
                "bits": {u: problem.bits[k] for u, k in zip(problem.units, choice)},
                "rank_mib": problem.size(rank) / MIB if rank else None,
                "rank_objective": problem.objective(rank) if rank else None,
                "new": key not in seen,
            }
        )
        seen.add(key)
    uniform = [
        {
            "bits": b,
            "mib": problem.size([k] * len(problem.units)) / MIB,
            "objective": problem.objective([k] * len(problem.units)),
        }
        for k, b in enumerate(problem.bits)
    ]
    return {
        "schema": "qbert_hessian.frontier/1",
        "groups": str(config.groups),
        "measure": config.measure.value,
        "bits": list(problem.bits),
        "fp32_mib": problem.fp32_bytes / MIB,
        "points": points,
        "uniform": uniform,
    }
