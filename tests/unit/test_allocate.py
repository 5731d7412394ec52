"""allocate.py on synthetic reports (no torch, no model): MILP = brute force, monotone in the budget, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from qbert_hessian.allocate import (
    MIB,
    AllocConfig,
    Budget,
    allocate_bits,
    build_problem,
    frontier,
    solve_brute_force,
    solve_milp,
    solve_rank,
    uniform_plan,
)
from qbert_hessian.artifacts import BitPlan, BlockSensitivity, GroupCost, QuantProfile, SensitivityReport, UnitProfile
from qbert_hessian.errors import QBHError

BITS = (2, 3, 4, 5, 6, 7, 8)


def synthetic_report(num_blocks: int = 5, seed: int = 0, *, sizes=None) -> tuple[SensitivityReport, QuantProfile]:
    """A report and its cost table with random sizes, sensitivities and errors that fall with the width."""
    rng = np.random.default_rng(seed)
    sizes = sizes or [int(rng.integers(1, 40)) * 96 for _ in range(num_blocks)]
    blocks, units, tensors = [], {}, []
    for i, n in enumerate(sizes):
        name = f"encoder.{i}"
        omega = float(rng.uniform(0.1, 50))
        blocks.append(
            BlockSensitivity(name, n, [omega], omega, 0.0, omega, [5], [True], 0.1, normalized_trace=omega / 10)
        )
        base = float(rng.uniform(0.5, 2.0)) * n
        keys = [f"enc.{i}.a.weight", f"enc.{i}.b.weight"]
        units[name] = UnitProfile(
            weights=keys,
            shapes=[[n // 96, 48], [n // 96, 48]],
            linear=[True, True],
            groups={"1": GroupCost([1, 1], {str(b): base * 4.0 ** (-b) for b in BITS})},
            unavailable={"128": f"{name}.query: groups=128 do not divide"},
        )
        tensors += [[k, "F32", [n // 96, 48]] for k in keys] + [[f"enc.{i}.a.bias", "F32", [n // 96]]]
    units["embeddings.word"] = UnitProfile(
        weights=["emb.weight"],
        shapes=[[20, 32]],
        linear=[False],
        groups={
            "channel": GroupCost([20], {str(b): 1.0 for b in BITS}),
            "1": GroupCost([1], {str(b): 1.0 for b in BITS}),
        },
    )
    tensors += [["emb.weight", "F32", [20, 32]], ["head.weight", "F32", [2, 32]]]
    model = {"name": "synthetic", "num_layers": num_blocks, "num_heads": 4, "hidden_size": 32}
    profile = QuantProfile(
        model=model, symmetric=True, bits=list(BITS), tensors=tensors, units=units, range_method="mse"
    )
    report = SensitivityReport(model=model, task="t", config={}, draws=[], blocks=blocks, pending=[])
    return report, profile


CFG = AllocConfig(bits=(2, 4, 8), groups=1)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("avg_bits", [2.0, 2.7, 3.5, 5.0, 8.0])
def test_milp_equals_brute_force(seed, avg_bits):
    problem, _ = build_problem(*synthetic_report(5, seed), CFG)
    budget = Budget(avg_bits=avg_bits)
    milp, brute = solve_milp(problem, budget), solve_brute_force(problem, budget)
    assert problem.objective(milp) == pytest.approx(problem.objective(brute), rel=1e-9, abs=1e-12)
    assert problem.avg_bits(milp) <= avg_bits + 1e-9


@pytest.mark.parametrize("seed", range(4))
def test_milp_equals_brute_force_under_a_size_budget(seed):
    report = synthetic_report(5, seed)
    problem, _ = build_problem(*report, CFG)
    lo, hi = problem.size([0] * 5), problem.size([2] * 5)
    for frac in (0.0, 0.2, 0.5, 0.9):
        budget = Budget(max_mb=(lo + frac * (hi - lo)) / MIB)
        milp, brute = solve_milp(problem, budget), solve_brute_force(problem, budget)
        assert problem.objective(milp) == pytest.approx(problem.objective(brute), rel=1e-9, abs=1e-12)
        assert problem.size(milp) <= budget.max_mb * MIB


@pytest.mark.parametrize("seed", range(3))
def test_objective_never_rises_as_the_budget_grows(seed):
    report = synthetic_report(6, seed)
    objectives = [allocate_bits(*report, Budget(avg_bits=a), CFG).predicted["objective"] for a in np.linspace(2, 8, 13)]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(objectives, objectives[1:]))
    assert objectives[-1] < objectives[0]


def test_rank_rule_is_monotone_in_sensitivity_and_never_beats_milp():
    report = synthetic_report(6, 3)
    problem, _ = build_problem(*report, CFG)
    budget = Budget(avg_bits=3.4)
    rank, milp = solve_rank(problem, budget), solve_milp(problem, budget)
    order = np.argsort(problem.sensitivity)
    widths = [problem.bits[rank[b]] for b in order]
    assert widths == sorted(widths)
    assert problem.objective(milp) <= problem.objective(rank) + 1e-12


def test_predicted_size_adds_up():
    report = synthetic_report(3, 1, sizes=[960, 960, 1920])
    # static ranges, so the file stores one per quantized linear (dynamic ones store nothing)
    plan = uniform_plan(*report, 4, AllocConfig(bits=(2, 4, 8), groups=1, act_range="max"))
    problem, _ = build_problem(*report, AllocConfig(bits=(4,), groups=1, act_range="max"))
    codes = sum(n // 2 * 4 // 8 * 2 for n in (960, 960, 1920))
    scales = 2 * 2 * 3
    act_ranges = 4 * 2 * 3
    assert problem.cost.sum() == codes + scales + act_ranges
    assert plan.predicted["bytes"] == problem.file_bytes([0, 0, 0]) <= problem.size([0, 0, 0])
    assert plan.predicted["encoder_avg_bits"] == 4.0
    assert plan.blocks["encoder.2"] == {"bits": 4, "groups": 1}
    assert plan.blocks["embeddings.word"] == {"bits": 8, "groups": "channel"}


def test_infeasible_budget_names_the_smallest_reachable_size():
    report = synthetic_report(4, 0)
    with pytest.raises(QBHError, match=r"infeasible: the smallest plan with bits 2,4,8 is [0-9.]+ MiB"):
        allocate_bits(*report, Budget(avg_bits=1.5), CFG)
    with pytest.raises(QBHError, match="infeasible"):
        allocate_bits(*report, Budget(max_mb=1e-6), CFG)


def test_budget_above_fp32_gives_the_widest_plan_with_a_note():
    report = synthetic_report(4, 0)
    plan = allocate_bits(*report, Budget(ratio=0.5), CFG)
    assert all(e["bits"] == 8 for b, e in plan.blocks.items() if b.startswith("encoder."))
    assert any("every block at 8 bits" in n for n in plan.notes)


def test_budget_needs_exactly_one_value():
    with pytest.raises(QBHError, match="exactly one budget"):
        Budget()
    with pytest.raises(QBHError, match="exactly one budget"):
        Budget(max_mb=3, avg_bits=3)
    with pytest.raises(QBHError, match="must be a positive finite number"):
        Budget(ratio=-2)
    with pytest.raises(QBHError, match="must be a positive finite number"):
        Budget(avg_bits=float("inf"))


def test_unavailable_grouping_is_reported_with_its_reason():
    with pytest.raises(QBHError, match="groups=128 do not divide"):
        build_problem(*synthetic_report(3, 0), AllocConfig(groups=128))
    with pytest.raises(QBHError, match="no errors for groups=heads"):
        build_problem(*synthetic_report(3, 0), AllocConfig(groups="heads"))


def test_trace_measure_needs_the_trace():
    report = synthetic_report(3, 0)
    report[0].blocks[1].normalized_trace = None
    with pytest.raises(QBHError, match="no trace"):
        allocate_bits(*report, Budget(avg_bits=3), AllocConfig(groups=1, measure="trace"))


def test_report_without_profile_is_refused():
    report, _ = synthetic_report(3, 0)
    with pytest.raises(QBHError, match="allocate needs the quantization profile"):
        allocate_bits(report, None, Budget(avg_bits=3), CFG)


@pytest.mark.parametrize("omega", [-1.0, float("nan"), float("inf"), None, "3"])
def test_a_bad_omega_is_refused(omega):
    report, profile = synthetic_report(3, 0)
    report.blocks[1].omega = omega
    with pytest.raises(QBHError, match="encoder.1 has Omega"):
        allocate_bits(report, profile, Budget(avg_bits=3), CFG)


def test_an_unscored_layer_is_refused_not_left_in_fp32():
    report, profile = synthetic_report(4, 0)
    report.blocks = [b for b in report.blocks if b.name != "encoder.2"]
    with pytest.raises(QBHError, match="does not score encoder.2, which a plan would leave in FP32"):
        allocate_bits(report, profile, Budget(avg_bits=3), CFG)
    report.pending = ["encoder.2"]
    with pytest.raises(QBHError, match="partial"):
        allocate_bits(report, profile, Budget(avg_bits=3), CFG)


def test_a_block_the_profile_lacks_is_refused():
    report, profile = synthetic_report(3, 0)
    del profile.units["encoder.1"]
    with pytest.raises(QBHError, match="the report scores encoder.1, which the quantization profile lacks"):
        allocate_bits(report, profile, Budget(avg_bits=3), CFG)


def test_a_profile_of_another_range_method_is_refused_and_plans_name_their_method():
    report, profile = synthetic_report(3, 0)
    plan = allocate_bits(report, profile, Budget(avg_bits=3), CFG)
    assert CFG.range_method == profile.range_method == plan.range_method == "mse"
    max_cfg = AllocConfig(bits=(2, 4, 8), groups=1, range_method="max")
    for make in (
        lambda: allocate_bits(report, profile, Budget(avg_bits=3), max_cfg),
        lambda: uniform_plan(report, profile, 4, max_cfg),
        lambda: frontier(report, profile, max_cfg),
    ):
        with pytest.raises(QBHError, match="measured with mse ranges but the plan asks for max"):
            make()
    profile.range_method = "max"  # the same errors, declared as measured with max: planned with max
    assert allocate_bits(report, profile, Budget(avg_bits=3), max_cfg).range_method == "max"
    with pytest.raises(QBHError, match="AllocConfig.range_method 'minmax' is not known; use one of max, mse"):
        AllocConfig(range_method="minmax")
    with pytest.raises(QBHError, match="profile range_method 'l1' is not known"):
        QuantProfile.from_dict({**profile.to_dict(), "range_method": "l1"})
    old = profile.to_dict()
    del old["range_method"]  # a profile.json written before range methods: measured with max
    assert QuantProfile.from_dict(old).range_method == "max"


def test_frontier_is_monotone_and_marks_uniform_plans():
    front = frontier(*synthetic_report(5, 2), CFG, num_points=9)
    objs = [p["objective"] for p in front.points]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(objs, objs[1:]))
    assert [u["bits"] for u in front.uniform] == [2, 4, 8]
    assert front.points[0]["objective"] == pytest.approx(front.uniform[0]["objective"])


def test_plan_round_trips_and_refuses_bad_entries():
    plan = allocate_bits(*synthetic_report(3, 0), Budget(avg_bits=3), CFG)
    assert BitPlan.from_dict(plan.to_dict()) == plan
    for bad, msg in [
        ({"encoder.0": {"bits": 9}}, "bits 9"),
        ({"encoder.0": {"bits": 1}}, "bits 1"),
        ({"encoder.0": {"groups": 4}}, "needs a 'bits'"),
        ({"encoder.0": {"bits": 4, "group": 4}}, "unknown key"),
    ]:
        with pytest.raises(QBHError, match=msg):
            BitPlan(model={}, blocks=bad)


def test_brute_force_covers_every_combination():
    problem, _ = build_problem(*synthetic_report(3, 0), CFG)
    budget = Budget(avg_bits=3.5)
    feasible = [c for c in itertools.product(range(3), repeat=3) if problem.avg_bits(c) <= 3.5 + 1e-9]
    assert problem.objective(solve_brute_force(problem, budget)) == min(map(problem.objective, feasible))
    assert solve_brute_force(problem, Budget(avg_bits=8)) == [2, 2, 2]


def test_deploy_onnx_restricts_the_widths_and_refuses_what_onnx_runtime_cannot_run():
    from qbert_hessian.config import Deploy

    assert AllocConfig(deploy="onnx").bits == (2, 4, 8)  # 3 has no ONNX Runtime kernel
    assert AllocConfig(deploy="onnx").deploy == Deploy.ONNX
    for bad in [dict(bits=(3,)), dict(bits=(2, 4), embedding_bits=6), dict(bits=(4,), position_bits=3)]:
        with pytest.raises(QBHError, match="ONNX Runtime has kernels for 2, 4, 8 bits only"):
            AllocConfig(deploy="onnx", **bad)
    with pytest.raises(QBHError, match="deploy target"):
        AllocConfig(deploy="tflite")
    # The default leaves the config's dict (and so every run's fingerprints) as before the setting existed.
    assert "deploy" not in AllocConfig().to_dict()
    assert AllocConfig.from_dict(AllocConfig(deploy="onnx").to_dict()).deploy == Deploy.ONNX


def test_deploy_onnx_prices_the_onnx_file_and_records_it():
    report, profile = synthetic_report(3, sizes=[96 * 32] * 3)
    packed = uniform_plan(report, profile, 4, AllocConfig(groups=1))
    plan = uniform_plan(report, profile, 4, AllocConfig(groups=1, deploy="onnx"))
    assert "deploy" not in packed.predicted
    pred = plan.predicted
    assert pred["deploy"] == "onnx" and pred["packed_bytes"] == packed.predicted["bytes"]
    assert pred["bytes"] > pred["onnx_initializer_bytes"] > 0  # float32 scales per block: not the packed size
    # A budget is held against the ONNX file's size.
    budget = allocate_bits(report, profile, Budget(max_mb=pred["mib"]), AllocConfig(groups=1, deploy="onnx"))
    assert budget.predicted["bytes"] <= pred["bytes"]


def test_deploy_onnx_refuses_column_groups_no_onnx_block_fits():
    report, profile = synthetic_report(1, sizes=[96 * 32])
    keys = [f"enc.0.{p}.weight" for p in range(6)]  # a layer's six linears; the fourth is the attention output
    error = profile.units["encoder.0"].groups["1"].error
    profile.units["encoder.0"] = UnitProfile(keys, [[32, 48]] * 6, [True] * 6, {"heads": GroupCost([4] * 6, error)})
    profile.tensors += [[k, "F32", [32, 48]] for k in keys]  # 4 heads: per-head columns 12 wide (< 16)
    with pytest.raises(QBHError, match="column groups are 12 wide, but ONNX Runtime's blocks are 16..256"):
        uniform_plan(report, profile, 4, AllocConfig(groups="heads", deploy="onnx"))
    uniform_plan(report, profile, 4, AllocConfig(groups="heads"))  # the packed format takes any grouping
