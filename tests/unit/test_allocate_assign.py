"""The allocation test's controls (issue 10): a solved plan's widths reassigned among units of one size, reversed
against the sensitivity ranking or at random. Synthetic reports, no torch: exact sizes, exact orders, and the
MILP's objective as a lower bound on every reassignment."""

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
    reassign,
    size_classes,
    solve_milp,
)
from qbert_hessian.artifacts import BitPlan, GroupCost
from qbert_hessian.config import PlanSpec
from qbert_hessian.errors import QBHError
from qbert_hessian.stages import make_plan
from tests.unit.test_allocate import synthetic_report

CFG = AllocConfig(bits=(2, 4, 8), groups=1)
EQUAL = [960] * 6  # six units of one size, like BERT's layers (offsets keep their digits: see the header test)
MIXED = [960, 1920, 960, 1920, 960, 1920]  # two size classes


def _widths(plan: BitPlan) -> dict[str, int]:
    return {b: e["bits"] for b, e in plan.blocks.items() if b.startswith("encoder.")}


def _by_sensitivity(plan: BitPlan, report) -> list[int]:
    """The plan's widths along the ranking, most sensitive unit first."""
    ranked = sorted((b for b in report.blocks if b.name.startswith("encoder.")), key=lambda b: -b.omega)
    return [plan.blocks[b.name]["bits"] for b in ranked]


def _equal_errors(report, profile):
    """The same ||Q_k(W) - W||^2 in every unit: the loss differs by sensitivity alone, so the MILP's widths rise
    with it and the rearrangement inequality makes the reversed plan the worst of all permutations."""
    first = profile.units["encoder.0"].groups["1"]
    for name, unit in profile.units.items():
        if name.startswith("encoder."):
            unit.groups["1"] = GroupCost(list(first.scales), dict(first.error))
    return report, profile


BUDGETS = [Budget(avg_bits=3.0), Budget(avg_bits=5.0), Budget(avg_bits=6.0)]


@pytest.mark.parametrize("sizes", [EQUAL, MIXED], ids=["one-size", "two-sizes"])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("assign", ["reversed", "random"])
def test_reassigned_plan_has_the_solver_plans_size_to_the_byte(sizes, seed, assign):
    report = synthetic_report(6, seed, sizes=sizes)
    problem, _ = build_problem(*report, CFG)
    for budget in [*BUDGETS, Budget(max_mb=(problem.size([0] * 6) + problem.size([1] * 6)) / 2 / MIB)]:
        solver = allocate_bits(*report, budget, CFG)
        control = allocate_bits(*report, budget, CFG, assign=assign, assign_seed=seed if assign == "random" else None)
        assert control.predicted["bytes"] == solver.predicted["bytes"]
        assert control.predicted["encoder_avg_bits"] == solver.predicted["encoder_avg_bits"]
        assert sum(e["bytes"] for e in control.predicted["per_block"].values()) == sum(
            e["bytes"] for e in solver.predicted["per_block"].values()
        )
        assert not any("packed file is" in n for n in control.notes)
        # Widths move only between units of one size: each class keeps its multiset of widths.
        mine, theirs = _widths(control), _widths(solver)
        for members in size_classes(problem):
            units = [problem.units[b] for b in members]
            assert sorted(mine[u] for u in units) == sorted(theirs[u] for u in units)


def test_size_classes_group_units_of_equal_weights_and_bytes():
    problem, _ = build_problem(*synthetic_report(6, 0, sizes=MIXED), CFG)
    assert size_classes(problem) == [[0, 2, 4], [1, 3, 5]]
    problem, _ = build_problem(*synthetic_report(6, 0, sizes=EQUAL), CFG)
    assert size_classes(problem) == [list(range(6))]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("avg_bits", [3.0, 5.0, 6.0])
def test_reversed_gives_the_fewest_bits_to_the_most_sensitive_units(seed, avg_bits):
    report = synthetic_report(6, seed, sizes=EQUAL)
    solver = allocate_bits(*report, Budget(avg_bits=avg_bits), CFG)
    control = allocate_bits(*report, Budget(avg_bits=avg_bits), CFG, assign="reversed")
    along = _by_sensitivity(control, report[0])
    assert along == sorted(_by_sensitivity(solver, report[0]))  # most sensitive first: the smallest widths first
    assert control.method == "milp-reversed"


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("avg_bits", [3.0, 5.0, 6.0])
def test_reversed_is_the_exact_mirror_of_a_plan_monotone_in_sensitivity_and_the_worst_permutation(seed, avg_bits):
    report = _equal_errors(*synthetic_report(6, seed, sizes=EQUAL))
    problem, _ = build_problem(*report, CFG)
    solver = allocate_bits(*report, Budget(avg_bits=avg_bits), CFG)
    control = allocate_bits(*report, Budget(avg_bits=avg_bits), CFG, assign="reversed")
    theirs, mine = _by_sensitivity(solver, report[0]), _by_sensitivity(control, report[0])
    assert theirs == sorted(theirs, reverse=True)  # the MILP gives the most bits to the most sensitive
    assert mine == theirs[::-1]  # rank i gets the width of rank n-1-i
    assert len(set(theirs)) > 1  # the budget forces a mix: the test has teeth
    # With equal errors, the reversed plan has the largest loss of every assignment of these widths.
    choice = [problem.bits.index(_widths(solver)[u]) for u in problem.units]
    worst = max(problem.objective(p) for p in set(itertools.permutations(choice)))
    assert control.predicted["objective"] == pytest.approx(worst, rel=1e-12)


def test_reassign_reversed_of_a_known_ranking():
    report = synthetic_report(4, 0, sizes=[960] * 4)
    for block, omega in zip(report[0].blocks, [5.0, 1.0, 9.0, 3.0]):
        block.omega = omega
    problem, _ = build_problem(*report, CFG)
    # Solver widths (indices into 2, 4, 8): encoder.0..3 -> 4, 2, 8, 2; ranking: encoder.2, .0, .3, .1.
    assert reassign(problem, [1, 0, 2, 0], "reversed") == [0, 2, 0, 1]
    # Ties in sensitivity keep unit order: the earlier unit counts as the more sensitive.
    for block in report[0].blocks:
        block.omega = 1.0
    problem, _ = build_problem(*report, CFG)
    assert reassign(problem, [1, 0, 2, 0], "reversed") == [0, 0, 1, 2]


@pytest.mark.parametrize("sizes", [EQUAL, MIXED], ids=["one-size", "two-sizes"])
def test_random_is_seeded_deterministic_and_a_permutation_within_each_class(sizes):
    report = synthetic_report(6, 1, sizes=sizes)
    problem, _ = build_problem(*report, CFG)
    choice = solve_milp(problem, Budget(avg_bits=5.0))
    assert len(set(choice)) > 1  # widths to move
    for seed in range(5):
        first = reassign(problem, choice, "random", seed)
        assert first == reassign(problem, choice, "random", seed)  # the same seed, the same plan
        # The reference: numpy's default_rng(seed) permutation of each class, classes in order.
        rng, expected = np.random.default_rng(seed), list(choice)
        for members in size_classes(problem):
            for b, src in zip(members, rng.permutation(len(members))):
                expected[b] = choice[members[src]]
        assert first == expected
    plan = allocate_bits(*report, Budget(avg_bits=5.0), CFG, assign="random", assign_seed=3)
    again = allocate_bits(*report, Budget(avg_bits=5.0), CFG, assign="random", assign_seed=3)
    assert plan.to_dict() == again.to_dict()
    assert allocate_bits(*report, Budget(avg_bits=5.0), CFG, assign="random").source["reassigned_from"]["seed"] == 0


def test_random_reaches_every_arrangement_of_the_widths():
    report = synthetic_report(6, 0, sizes=EQUAL)
    problem, _ = build_problem(*report, CFG)
    choice = [0, 0, 0, 1, 1, 1]  # 20 distinct arrangements of three 2-bit and three 4-bit units
    seen = {tuple(reassign(problem, choice, "random", seed)) for seed in range(400)}
    assert seen == set(itertools.permutations(choice))


@pytest.mark.parametrize("sizes", [EQUAL, MIXED], ids=["one-size", "two-sizes"])
@pytest.mark.parametrize("seed", range(4))
def test_the_milp_objective_is_a_lower_bound_on_every_reassignment(sizes, seed):
    report = synthetic_report(6, seed, sizes=sizes)
    problem, _ = build_problem(*report, CFG)
    for budget in BUDGETS:
        choice = solve_milp(problem, budget)
        best = problem.objective(choice)
        # Every assignment of the same widths within the size classes (at most 6! = 720).
        classes = size_classes(problem)
        for perms in itertools.product(*(itertools.permutations(m) for m in classes)):
            other = list(choice)
            for members, perm in zip(classes, perms):
                for b, src in zip(members, perm):
                    other[b] = choice[src]
            assert best <= problem.objective(other) * (1 + 1e-9)
        for assign, s in [("reversed", None), ("random", 0), ("random", 1)]:
            plan = allocate_bits(*report, budget, CFG, assign=assign, assign_seed=s)
            assert plan.predicted["objective"] >= best * (1 - 1e-9)


def test_the_plan_records_how_it_was_made():
    report = synthetic_report(6, 2, sizes=EQUAL)
    problem, _ = build_problem(*report, CFG)
    solver = allocate_bits(*report, Budget(avg_bits=5.0), CFG, source={"sensitivity": "s.json"})
    plan = allocate_bits(*report, Budget(avg_bits=5.0), CFG, source={"sensitivity": "s.json"}, assign="reversed")
    assert plan.method == "milp-reversed" and solver.method == "milp"
    origin = plan.source["reassigned_from"]
    assert plan.source["sensitivity"] == "s.json"
    assert origin["assign"] == "reversed" and origin["seed"] is None and origin["method"] == "milp"
    assert origin["bits"] == _widths(solver)
    assert origin["objective"] == solver.predicted["objective"] and origin["bytes"] == solver.predicted["bytes"]
    assert plan.notes[0].startswith("not the solver's assignment: the milp plan's widths reversed against the omega")
    # The objective and the per-block terms are the new assignment's, recomputed.
    choice = [problem.bits.index(_widths(plan)[u]) for u in problem.units]
    assert plan.predicted["objective"] == problem.objective(choice) != solver.predicted["objective"]
    for b, u in enumerate(problem.units):
        assert plan.predicted["per_block"][u]["loss"] == problem.loss[b, choice[b]]
    assert BitPlan.from_dict(plan.to_dict()) == plan  # the record survives plan.json
    rank = allocate_bits(*report, Budget(avg_bits=5.0), AllocConfig(bits=(2, 4, 8), groups=1, method="rank"))
    rank_random = allocate_bits(
        *report, Budget(avg_bits=5.0), AllocConfig(bits=(2, 4, 8), groups=1, method="rank"), assign="random"
    )
    assert rank_random.method == "rank-random" and rank_random.source["reassigned_from"]["bits"] == _widths(rank)


def test_a_plan_with_one_width_is_its_own_reassignment_and_says_so():
    report = synthetic_report(6, 0, sizes=EQUAL)
    solver = allocate_bits(*report, Budget(avg_bits=2.0), CFG)
    plan = allocate_bits(*report, Budget(avg_bits=2.0), CFG, assign="reversed")
    assert plan.blocks == solver.blocks and plan.predicted["objective"] == solver.predicted["objective"]
    assert "no width moved, this plan is the solver's" in plan.notes[0]


def test_a_safetensors_header_that_changes_length_is_noted():
    """Equal data can still differ in the header: an offset in its JSON can gain a digit (here around 10^4)."""
    report = synthetic_report(4, 0, sizes=[3744] * 4)
    config = AllocConfig(bits=(2, 8), groups=1, act_range="max")  # stored ranges: the header holds their offsets
    problem, _ = build_problem(*report, config)
    choices = [c for c in itertools.product(range(2), repeat=4) if sum(c) == 2]
    assert len({problem.file_bytes(c) for c in choices}) == 2  # the case exists
    for seed in range(20):
        plan = allocate_bits(*report, Budget(avg_bits=5.0), config, assign="random", assign_seed=seed)
        origin = plan.source["reassigned_from"]
        noted = [n for n in plan.notes if "packed file is" in n]
        if plan.predicted["bytes"] != origin["bytes"]:
            assert noted == [
                f"the packed file is {plan.predicted['bytes'] - origin['bytes']:+d} bytes against the solver's plan: "
                "the tensor data are the same size, the safetensors header's offsets are not"
            ]
            break
        assert not noted
    else:
        pytest.fail("no seed moved the header's length")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"uniform": 4, "assign": "reversed"}, "a uniform plan gives every block the same width; drop assign"),
        ({"avg_bits": 3.0, "assign": "sorted"}, "assign 'sorted' is not known; use reversed or random"),
        ({"avg_bits": 3.0, "assign_seed": 1}, 'assign_seed seeds assign = "random"; add assign = "random"'),
        ({"avg_bits": 3.0, "assign": "reversed", "assign_seed": 1}, 'assign_seed seeds assign = "random"'),
        ({"avg_bits": 3.0, "assign": "random", "assign_seed": -1}, "assign_seed must be an integer >= 0"),
        ({"avg_bits": 3.0, "assign": "random", "method": "uniform"}, "use method milp or rank, or drop assign"),
    ],
    ids=["uniform", "unknown", "seed-alone", "seed-reversed", "seed-negative", "method-uniform"],
)
def test_senseless_assignments_are_refused_in_one_line(settings, message):
    with pytest.raises(QBHError, match=message) as err:
        PlanSpec.from_dict({"name": "p", **settings})
    assert "plan 'p'" in str(err.value) and "\n" not in str(err.value)


def test_the_library_call_refuses_them_too_and_make_plan_passes_the_spec_on():
    report = synthetic_report(6, 0, sizes=EQUAL)
    with pytest.raises(QBHError, match="assign 'mirror' is not known"):
        allocate_bits(*report, Budget(avg_bits=3.0), CFG, assign="mirror")
    with pytest.raises(QBHError, match="assign_seed seeds assign='random'"):
        allocate_bits(*report, Budget(avg_bits=3.0), CFG, assign_seed=2)
    spec = PlanSpec.from_dict({"name": "ctl", "avg_bits": 3.0, "assign": "random", "assign_seed": 5})
    made = make_plan(*report, spec, CFG)
    assert made.to_dict() == allocate_bits(*report, Budget(avg_bits=3.0), CFG, assign="random", assign_seed=5).to_dict()
