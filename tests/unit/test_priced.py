"""Priced measures (quant/profile.py, allocate.py): the quadratic measure equals the dense Hessian's
g.dW + 1/2 dW.H.dW, the measured one a plain re-evaluation of the loss, and allocation on a priced table equals
brute force over it; a plan refuses a table made for another measure or rounding."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import numpy as np
import pytest
import torch

from qbert_hessian.allocate import (
    AllocConfig,
    Budget,
    allocate_bits,
    build_problem,
    embedding_scales,
    solve_brute_force,
    solve_milp,
    uniform_plan,
)
from qbert_hessian.artifacts import BlockSensitivity, GroupCost, QuantProfile, SensitivityReport
from qbert_hessian.config import GPTQConfig
from qbert_hessian.errors import QBHError
from qbert_hessian.models import BlockMap
from qbert_hessian.packed_format import packed_bytes
from qbert_hessian.quant.functional import group_layout, quantize
from qbert_hessian.quant.profile import measure_priced_profile, measure_profile, profile_units, quantized_unit
from tests.helpers import dense_block_hessian, random_batch
from tests.unit.test_allocate import synthetic_report

UNIT = "encoder.0"
BITS = (2, 4)


def _draws(vocab: int) -> list[list[dict]]:
    """Two draws, each of two batches of different sizes (the weighting n_j / N is exercised)."""
    return [[random_batch(vocab, 4, 6, 3, seed=2 * d), random_batch(vocab, 2, 6, 3, seed=2 * d + 1)] for d in range(2)]


def _joint(batches: list[dict]) -> dict:
    """One batch holding the draw's examples: its mean loss is the draw's size-weighted loss."""
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _priced(model, measure: str, rounding: str) -> tuple[QuantProfile, list[list[dict]]]:
    draws = _draws(model.config.vocab_size)
    calib = [b for d in draws for b in d] if rounding == "gptq" else []
    gptq = GPTQConfig(calib_samples=4) if rounding == "gptq" else None
    profile = measure_priced_profile(
        model, [UNIT], draws, measure=measure, rounding=rounding, gptq=gptq, calibration=calib, bits=BITS, groups=(1,)
    )
    return profile, draws


def _quantized(model, bits: int, rounding: str, draws) -> dict[str, torch.Tensor]:
    calib = [b for d in draws for b in d] if rounding == "gptq" else []
    gptq = GPTQConfig(calib_samples=4) if rounding == "gptq" else None
    return quantized_unit(model, UNIT, bits, 1, rounding=rounding, gptq=gptq, calibration=calib)


def test_quantized_unit_nearest_is_the_functional_rounding(micro_bert):
    block_map = BlockMap(micro_bert)
    qw = quantized_unit(micro_bert, UNIT, 3, 1)
    assert len(qw) == 6
    for name, path in block_map.unit_modules(UNIT):
        w = micro_bert.get_submodule(path).weight
        grid = group_layout(tuple(w.shape), 1, kind="ffn", num_heads=2, name=name)
        assert torch.equal(qw[path], quantize(w, 3, grid, True, "mse").dequantize())


@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_quadratic_measure_equals_dense_hessian(micro_bert, rounding):
    profile, draws = _priced(micro_bert, "quadratic", rounding)
    assert (profile.measure, profile.rounding) == ("quadratic", rounding)
    params = BlockMap(micro_bert).parameters(UNIT)
    paths = {id(micro_bert.get_submodule(p).weight): p for _, p in BlockMap(micro_bert).unit_modules(UNIT)}
    for bits in BITS:
        qw = _quantized(micro_bert, bits, rounding, draws)
        dw = torch.cat(
            [(qw[paths[id(p)]] - p.detach() if id(p) in paths else torch.zeros_like(p)).reshape(-1) for p in params]
        ).double()
        want = []
        for batches in draws:
            joint = _joint(batches)
            H = dense_block_hessian(micro_bert, params, joint).double()
            g = torch.autograd.grad(micro_bert(**joint).loss, params)
            g = torch.cat([x.reshape(-1) for x in g]).double()
            want.append(float(g @ dw + 0.5 * dw @ H @ dw))
        got = profile.units[UNIT].groups["1"].error[str(bits)]
        assert got == pytest.approx(np.mean(want), rel=1e-4, abs=1e-7)
        # the gradient term matters here (a random model is far from a minimum): dropping it would fail the test
        assert abs(float(g @ dw)) > 1e-3 * abs(np.mean(want))


@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_measured_equals_plain_reevaluation(micro_bert, rounding):
    before = {k: v.clone() for k, v in micro_bert.state_dict().items()}
    profile, draws = _priced(micro_bert, "measured", rounding)
    for k, v in micro_bert.state_dict().items():  # the model is left exactly as it was
        assert torch.equal(v, before[k]), k
    for bits in BITS:
        qw = _quantized(micro_bert, bits, rounding, draws)
        q = copy.deepcopy(micro_bert)
        with torch.no_grad():
            for path, w in qw.items():
                q.get_submodule(path).weight.copy_(w)
            want = np.mean([float(q(**_joint(b)).loss - micro_bert(**_joint(b)).loss) for b in draws])
        got = profile.units[UNIT].groups["1"].error[str(bits)]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    # a random model is far from a minimum: quantizing may lower its loss, but every width prices differently
    assert profile.units[UNIT].groups["1"].error["2"] != profile.units[UNIT].groups["1"].error["4"]


def test_gptq_entries_differ_from_nearest(micro_bert):
    draws = _draws(micro_bert.config.vocab_size)
    near, gptq = _quantized(micro_bert, 2, "nearest", draws), _quantized(micro_bert, 2, "gptq", draws)
    assert any(not torch.equal(near[p], gptq[p]) for p in near)


def priced_report(seed: int, measure: str, rounding: str = "nearest"):
    """A synthetic report whose cost table is priced: random losses (some negative), falling with the width."""
    report, profile = synthetic_report(5, seed)
    rng = np.random.default_rng(seed + 100)
    units = {}
    for name, u in profile.units.items():
        if name.startswith("encoder."):
            base = rng.uniform(0.01, 1.0)
            error = {b: base * 3.0 ** (-int(b)) - rng.uniform(0, 0.002) for b in u.groups["1"].error}
            u = dataclasses.replace(u, groups={"1": GroupCost(u.groups["1"].scales, error)})
        units[name] = u
    gptq = GPTQConfig().to_dict() if rounding == "gptq" else None
    return report, dataclasses.replace(profile, units=units, measure=measure, rounding=rounding, gptq=gptq)


@pytest.mark.parametrize("measure", ["quadratic", "measured"])
@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
@pytest.mark.parametrize("seed", range(3))
def test_priced_allocation_equals_brute_force(measure, rounding, seed):
    report, profile = priced_report(seed, measure, rounding)
    config = AllocConfig(bits=(2, 4, 8), groups=1, measure=measure, rounding=rounding)
    problem, _ = build_problem(report, profile, config)
    np.testing.assert_array_equal(problem.sensitivity, 1.0)  # no sensitivity weight: the entries are the losses
    for avg_bits in (2.0, 3.0, 4.5, 8.0):
        budget = Budget(avg_bits=avg_bits)
        milp, brute = solve_milp(problem, budget), solve_brute_force(problem, budget)
        assert problem.objective(milp) == pytest.approx(problem.objective(brute), rel=1e-9, abs=1e-12)
        # the objective is the plain sum of the table's entries
        table = [[profile.units[u].groups["1"].error[str(b)] for b in (2, 4, 8)] for u in problem.units]
        assert problem.objective(brute) == pytest.approx(sum(table[i][k] for i, k in enumerate(brute)))
    plan = allocate_bits(report, profile, Budget(avg_bits=3.0), config)
    assert plan.measure == measure and "sensitivity" not in next(iter(plan.predicted["per_block"].values()))


def test_priced_reversed_control_orders_by_the_narrowest_loss():
    report, profile = priced_report(0, "quadratic")
    config = AllocConfig(bits=(2, 4, 8), groups=1, measure="quadratic", rounding="nearest")  # the table's rounding
    plan = allocate_bits(report, profile, Budget(avg_bits=4.0), config)
    rev = allocate_bits(report, profile, Budget(avg_bits=4.0), config, assign="reversed")
    assert rev.method == "milp-reversed" and rev.predicted["objective"] >= plan.predicted["objective"]
    narrow = {u: profile.units[u].groups["1"].error["2"] for u in plan.predicted["per_block"]}
    ranked = sorted(narrow, key=lambda u: -narrow[u])
    rev_bits = [rev.blocks[u]["bits"] for u in ranked]
    assert rev_bits == sorted(rev_bits)  # the most costly unit at 2 bits gets the fewest


@pytest.mark.parametrize(
    ("profile_measure", "profile_rounding", "plan_measure", "plan_rounding", "match"),
    [
        (None, "nearest", "quadratic", "nearest", "holds .*omega/trace table.* asks for measure quadratic"),
        ("quadratic", "nearest", "omega", "nearest", "holds measure quadratic .* asks for measure omega"),
        ("quadratic", "nearest", "measured", "nearest", "holds measure quadratic .* asks for measure measured"),
        ("quadratic", "nearest", "quadratic", "gptq", "nearest rounding but the plan asks .* gptq rounding"),
        ("measured", "gptq", "measured", "nearest", "gptq rounding but the plan asks .* nearest rounding"),
    ],
)
def test_plan_refuses_a_profile_of_another_measure_or_rounding(
    profile_measure, profile_rounding, plan_measure, plan_rounding, match
):
    if profile_measure is None:
        report, profile = synthetic_report(5, 0)
    else:
        report, profile = priced_report(0, profile_measure, profile_rounding)
    config = AllocConfig(bits=(2, 4, 8), groups=1, measure=plan_measure, rounding=plan_rounding)
    with pytest.raises(QBHError, match=match):
        allocate_bits(report, profile, Budget(avg_bits=3.0), config)


def test_plan_refuses_a_profile_of_other_gptq_settings():
    report, profile = priced_report(0, "quadratic", "gptq")
    config = AllocConfig(bits=(2, 4, 8), groups=1, measure="quadratic", rounding="gptq", damp=0.1)
    with pytest.raises(QBHError, match="gptq settings"):
        allocate_bits(report, profile, Budget(avg_bits=3.0), config)


def test_priced_profile_round_trips_and_weight_profile_json_is_unchanged(tmp_path):
    _, weights = synthetic_report(3, 0)
    assert not {"measure", "rounding", "gptq"} & set(weights.to_dict())  # reads as before priced measures
    _, priced = priced_report(0, "measured", "gptq")
    priced.save(tmp_path / "p.json")
    back = QuantProfile.load(tmp_path / "p.json")
    assert (back.measure, back.rounding, back.gptq) == ("measured", "gptq", GPTQConfig().to_dict())
    assert back.to_dict() == priced.to_dict()
    with pytest.raises(QBHError, match="not a priced measure"):
        dataclasses.replace(weights, measure="omega")


def test_uniform_and_combinations_cover_every_choice():
    # the brute force above enumerates every combination of the table (its own reference)
    report, profile = priced_report(1, "quadratic")
    config = AllocConfig(bits=(2, 4, 8), groups=1, measure="quadratic", rounding="nearest")  # the table's rounding
    problem, _ = build_problem(report, profile, config)
    every = list(itertools.product(range(3), repeat=5))
    assert problem.objective(solve_brute_force(problem, Budget(avg_bits=8.0))) == min(map(problem.objective, every))


EMBEDDINGS = ("embeddings.word", "embeddings.position")


@pytest.fixture(scope="module")
def micro_tables(micro_bert):
    """micro_bert's report (its one layer) and two cost tables of the same units: a priced one, which holds the
    encoder's grouping (1) only, and the omega table measured under every grouping the tests plan with."""
    block_map = BlockMap(micro_bert)
    units = profile_units(block_map, ["encoder.0"])
    draws = _draws(micro_bert.config.vocab_size)
    priced = measure_priced_profile(micro_bert, units, draws, measure="measured", bits=BITS, groups=(1,))
    weights = measure_profile(micro_bert, units, bits=BITS, groups=(1, "channel", 2, 7))
    n = sum(p.numel() for p in block_map.parameters(UNIT))
    block = BlockSensitivity(UNIT, n, [3.0], 3.0, 0.0, 3.0, [5], [True], 0.1, normalized_trace=0.3)
    report = SensitivityReport(model=weights.model, task="t", config={}, draws=[], blocks=[block], pending=[])
    return report, priced, weights


def _plan_config(profile: QuantProfile, embedding_groups: object) -> AllocConfig:
    """A plan of ``profile``'s measure (nearest rounding): encoder groups 1, embeddings under ``embedding_groups``."""
    measure = profile.measure or "omega"
    return AllocConfig(bits=BITS, groups=1, measure=measure, rounding="nearest", embedding_groups=embedding_groups)


@pytest.mark.parametrize("embedding_groups", ["channel", 2])
def test_priced_table_sizes_the_embeddings_under_any_grouping(micro_tables, embedding_groups):
    """The embeddings' size under their grouping follows from their shapes: a priced table, which holds none of
    their grouping, gives the same embedding bytes and the same predicted file, choice by choice, as the omega
    table measured under that grouping; both are the packed format's bytes of the shapes' grid."""
    report, priced, weights = micro_tables
    assert all(str(embedding_groups) not in priced.units[u].groups for u in EMBEDDINGS)
    p, _ = build_problem(report, priced, _plan_config(priced, embedding_groups))
    w, _ = build_problem(report, weights, _plan_config(weights, embedding_groups))
    emb_bytes = 0
    for u in EMBEDDINGS:
        ((rows, cols),) = priced.units[u].shapes
        scales = rows if embedding_groups == "channel" else embedding_groups
        assert weights.units[u].groups[str(embedding_groups)].scales == [scales]  # what measure_profile records
        assert embedding_scales(priced, u, embedding_groups) == [scales]
        emb_bytes += packed_bytes(rows * cols, 8) + 2 * scales  # 8-bit codes, one fp16 scale per group
    assert p.emb_bytes == w.emb_bytes == emb_bytes
    assert p.fixed_bytes == w.fixed_bytes
    np.testing.assert_array_equal(p.cost, w.cost)
    assert [p.packed_bytes([k]) for k in range(len(BITS))] == [w.packed_bytes([k]) for k in range(len(BITS))]
    plans = [uniform_plan(report, t, 2, _plan_config(t, embedding_groups)) for t in (priced, weights)]
    assert plans[0].predicted["bytes"] == plans[1].predicted["bytes"]
    assert plans[0].predicted["embeddings"] == plans[1].predicted["embeddings"]
    assert plans[0].blocks["embeddings.word"]["groups"] == embedding_groups


def test_an_embedding_grouping_that_does_not_divide_a_table_is_refused(micro_tables):
    """7 divides neither table (30 and 16 rows): any table refuses the plan in the line measure_profile records."""
    report, priced, weights = micro_tables
    for table in (priced, weights):
        with pytest.raises(QBHError) as info:
            build_problem(report, table, _plan_config(table, 7))
        assert str(info.value) == weights.units["embeddings.word"].unavailable["7"]
        assert str(info.value) == (
            "embeddings.word: groups=7 do not divide its 30x8 weight into a 7x1 grid; choose a divisor of its 30 rows "
            "or channel"
        )
        with pytest.raises(QBHError, match="embeddings.word: groups 'heads' needs attention heads"):
            build_problem(report, table, _plan_config(table, "heads"))
