"""The run's config: each ``[[plans]]`` entry resolved once against ``[allocate]``, ``[qat]`` and ``[run]`` into a
typed plan, and resolved the same way again from the config ``run.json`` records (what the report reads)."""

from __future__ import annotations

import json

import pytest

from qbert_hessian.config import AllocConfig, Budget, PlanSpec, QATConfig
from qbert_hessian.errors import QBHError
from qbert_hessian.run_config import ResolvedPlan, parse_run_config, recorded_plans, resolve_plan

RUN = {
    "model": {"name": "minilm-l6", "task": "sst2"},
    "allocate": {"groups": 128, "bits": [2, 3, 4, 8], "embedding_bits": 8},
    "qat": {"epochs": 1, "seed": 7, "distill": True},
    "run": {"qat": True},
    "plans": [
        {"name": "u4", "uniform": 4, "qat": False},
        {"name": "mb", "budget_mb": 12.5, "bits": [2, 3], "groups": "heads", "seed": 3},
        {"name": "ratio", "ratio": 6.0, "distill": "hidden", "learn_scales": True, "rounding": "gptq", "damp": 0.05},
        {"name": "avg", "avg_bits": 2.5, "assign": "random", "assign_seed": 2},
    ],
}


def test_every_plan_is_resolved_against_allocate_qat_and_run_once_at_parse_time():
    plans = {p.name: p for p in parse_run_config(RUN).plans}
    assert all(isinstance(p, ResolvedPlan) for p in plans.values())
    u4, mb, ratio, avg = plans["u4"], plans["mb"], plans["ratio"], plans["avg"]
    # the budget under the allocator's own name (budget_mb is max_mb), none for a uniform plan
    assert u4.budget is None and u4.uniform == 4 and u4.alloc.bits == (4,)
    assert mb.budget == Budget(max_mb=12.5) and ratio.budget == Budget(ratio=6.0) and avg.budget == Budget(avg_bits=2.5)
    # [allocate] with the plan's own settings on top
    assert (mb.alloc.bits, mb.alloc.groups, mb.alloc.embedding_bits) == ((2, 3), "heads", 8)
    assert (ratio.alloc.rounding, ratio.alloc.damp, ratio.alloc.groups) == ("gptq", 0.05, 128)
    assert avg.alloc == AllocConfig(groups=128, bits=(2, 3, 4, 8))
    # the QAT recipe: none for a plan that is not trained, else [qat] with the plan's seed and recipe on top
    assert u4.qat is None
    assert (mb.qat.seed, mb.qat.distill, mb.qat.epochs) == (3, "logits", 1.0)
    assert (ratio.qat.seed, ratio.qat.distill, ratio.qat.learn_scales) == (7, "hidden", True)
    assert avg.qat == QATConfig(epochs=1, seed=7, distill="logits")
    assert ratio.own_recipe == {"distill": "hidden", "learn_scales": True} and mb.own_recipe == {}
    assert (avg.spec.assign, avg.spec.assign_seed) == ("random", 2)


def test_run_qat_false_trains_only_the_plans_that_ask():
    plans = parse_run_config({**RUN, "run": {"qat": False}}).plans
    assert [p.name for p in plans if p.qat is not None] == []
    asking = parse_run_config({**RUN, "run": {"qat": False}, "plans": [{"name": "a", "uniform": 2, "qat": True}]})
    assert asking.plans[0].qat == QATConfig(epochs=1, seed=7, distill="logits")


def test_the_plans_run_json_records_resolve_to_the_same_plans():
    config = parse_run_config(RUN)
    recorded = json.loads(json.dumps(config.to_dict()))  # as run.json holds it: lists, no unset plan keys
    assert "max_mb" not in json.dumps(recorded["plans"])  # the entries as written
    assert recorded_plans(recorded) == config.plans


def test_a_plan_recipe_that_does_not_fit_qat_is_refused_even_without_qat():
    spec = PlanSpec(name="a", uniform=4, qat=False, distill="teacher")
    with pytest.raises(QBHError, match="plan 'a': QATConfig.distill 'teacher' is not valid"):
        resolve_plan(spec, AllocConfig(), QATConfig())
    assert resolve_plan(spec, AllocConfig()).qat is None  # the plan command: no QAT recipe to resolve
