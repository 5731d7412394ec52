"""Priced measures as typed: ``plan --measure quadratic|measured`` and ``[allocate] measure`` in a run, on the tiny
checkpoint. The run holds experiments/sst2_minilm_measures.toml's own plans (the allocation test under every
measure and rounding), so the experiment the lead runs is checked end to end here."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from qbert_hessian.artifacts import BitPlan, QuantProfile, RunRecord
from qbert_hessian.cli import main
from qbert_hessian.config import AllocConfig
from tests.helpers import TINY_RUN_HEAD

EXPERIMENT = Path(__file__).resolve().parents[2] / "experiments" / "sst2_minilm_measures.toml"

HEAD = (
    TINY_RUN_HEAD
    + """
[allocate]
groups = 1              # one scale per encoder matrix; embeddings per row (channel): two groupings, as there
calib_samples = 16

[run]
qat = false
calibration_batches = 2
batch_size = 8
"""
)


# The experiment's rows run here (all seven were checked once on the tiny model; two keep the test short): one priced
# measure with nearest rounding, the other with GPTQ's (omega's plans are every other run test's).
ROWS = {("quadratic", "nearest"), ("measured", "gptq")}


def _experiment_rounding() -> str:
    """How the experiment's plans that name no rounding round: its [allocate]'s, else the default (gptq)."""
    allocate = tomllib.loads(EXPERIMENT.read_text(encoding="utf-8")).get("allocate", {})
    return allocate.get("rounding", AllocConfig().rounding)


def _experiment_plans() -> str:
    """The experiment's [[plans]] tables of :data:`ROWS`, as written there."""
    out = []
    for plan in tomllib.loads(EXPERIMENT.read_text(encoding="utf-8"))["plans"]:
        if (plan["measure"], plan.get("rounding", _experiment_rounding())) in ROWS:
            out.append("\n[[plans]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in plan.items()))
    return "".join(out)


@pytest.fixture(scope="module")
def run_dir(tiny_checkpoint, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("priced")
    head = HEAD.format(model=tiny_checkpoint, data=tiny_data)
    head = head.replace("calib_samples = 16\n", f'calib_samples = 16\nrounding = "{_experiment_rounding()}"\n')
    (root / "run.toml").write_text(head + _experiment_plans())
    assert main(["run", str(root / "run.toml"), "--out", str(root / "out"), "--quiet"]) == 0
    return root


def test_experiment_holds_the_allocation_test_under_every_measure():
    plans = tomllib.loads(EXPERIMENT.read_text(encoding="utf-8"))["plans"]
    rows = {(p["measure"], p.get("rounding", _experiment_rounding())) for p in plans}
    assert rows == {
        ("omega", "nearest"),
        ("trace", "nearest"),
        ("quadratic", "nearest"),
        ("measured", "nearest"),
        ("omega", "gptq"),
        ("quadratic", "gptq"),
        ("measured", "gptq"),
    }
    direct = [p for p in plans if not p.get("qat")]
    for row in rows:  # the solver's plan, reversed, two random orders: all at one size
        mine = [p for p in direct if (p["measure"], p.get("rounding", _experiment_rounding())) == row]
        assert sorted(p.get("assign", "milp") for p in mine) == ["milp", "random", "random", "reversed"]
        assert {(p["avg_bits"], tuple(p["bits"])) for p in mine} == {(2.5, (2, 3))}
    # after QAT: a direct plan of the test again, trained at three seeds, each named after it
    names = {p["name"]: p for p in direct}
    for p in (p for p in plans if p.get("qat")):
        base = names[re.sub(r"-qat(-seed\d)?$", "", p["name"])]
        assert {k: v for k, v in p.items() if k not in ("name", "qat", "seed")} == {
            k: v for k, v in base.items() if k != "name"
        }
        assert p["name"].endswith(f"-seed{p['seed']}" if p.get("seed") else "-qat")


def test_run_prices_plans_by_their_measure_and_rounding(run_dir):
    out = run_dir / "out"
    sens = out / "sensitivity"
    names = sorted(p.name for p in sens.glob("profile-*.json"))
    # GPTQ's settings are not the defaults (calib_samples = 16): their hash names the table
    assert len(names) == 2 and names[1] == "profile-quadratic-nearest.json"
    assert re.fullmatch(r"profile-measured-gptq-[0-9a-f]{8}\.json", names[0])
    for name in names:
        prof = QuantProfile.load(sens / name)
        measure, rounding = name.split("-")[1:3]
        assert (prof.measure, prof.rounding) == (measure, rounding.removesuffix(".json"))
        assert set(prof.units["encoder.0"].groups["1"].error) == {"2", "3"}
        assert prof.units["embeddings.word"].groups["1"].error == {}  # sized under the encoder's grouping only
    weights = json.loads((sens / "profile.json").read_text())
    assert not {"measure", "rounding", "gptq"} & set(weights)  # the omega/trace table reads as before
    sizes = {}
    for plan_file in (out / "plans").glob("*.json"):
        if plan_file.name == "frontier.json":
            continue
        plan = BitPlan.load(plan_file)
        tag = plan_file.stem.split("-2-3-")[1]
        measure, _, rounding = tag.partition("-")
        assert plan.measure == measure and plan.rounding == (rounding or _experiment_rounding())
        if measure in ("quadratic", "measured"):
            want = rf"sensitivity/profile-{measure}-{plan.rounding}(-[0-9a-f]{{8}})?\.json"
            assert re.fullmatch(want, plan.source["profile"])
        sizes.setdefault(tag, set()).add(plan.predicted["bytes"])
        result = json.loads((out / "results" / plan_file.stem / "direct.json").read_text())
        assert result["stage"] == "direct"
    assert len(sizes) == len(ROWS) and all(len(s) == 1 for s in sizes.values())  # equal bytes within each measure


def test_run_reuses_everything_and_recomputes_a_priced_plan_when_its_measure_changes(run_dir, tmp_path):
    out = run_dir / "out"
    args = ["run", str(run_dir / "run.toml"), "--out", str(out), "--quiet"]
    assert main(args) == 0
    record = RunRecord.load(out / "run.json")
    for key, entry in record.stages.items():
        if key.startswith("plan:"):  # a priced plan depends on its table; omega plans' inputs read as before
            assert "priced" in entry["inputs"], key
    assert "priced" not in record.stages["frontier"]["inputs"]  # the frontier is [allocate]'s: omega
    before = (out / "plans" / "milp-2-3-quadratic.json").read_bytes()
    cfg = tmp_path / "run.toml"
    text = (run_dir / "run.toml").read_text()
    old = 'name = "milp-2-3-quadratic"\navg_bits = 2.5\nbits = [2, 3]\nmeasure = "quadratic"'
    assert old in text
    cfg.write_text(text.replace(old, old.replace('measure = "quadratic"', 'measure = "measured"')))
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    after = BitPlan.load(out / "plans" / "milp-2-3-quadratic.json")
    assert after.measure == "measured" and (out / "plans" / "milp-2-3-quadratic.json").read_bytes() != before
    assert main(args) == 0  # back as it was
    assert (out / "plans" / "milp-2-3-quadratic.json").read_bytes() == before


def test_plan_cli_prices_then_reuses_the_table(run_dir, tiny_checkpoint, tiny_data, tmp_path):
    import shutil

    report = shutil.copytree(run_dir / "out" / "sensitivity", tmp_path / "report")
    for f in report.glob("profile-*.json"):
        f.unlink()
    plan = ["plan", "--report", str(report), "--avg-bits", "2.5", "--bits", "2,3", "--groups", "1", "--quiet"]
    priced = [*plan, "--measure", "measured", "--rounding", "gptq", "--calib-samples", "16"]
    model = ["--model", str(tiny_checkpoint), "--data", str(tiny_data)]
    assert main([*priced, *model, "--out", str(tmp_path / "a.json")]) == 0
    (table,) = report.glob("profile-measured-gptq-*.json")
    assert main([*priced, "--out", str(tmp_path / "b.json")]) == 0  # the table is there: no model needed
    a, b = BitPlan.load(tmp_path / "a.json"), BitPlan.load(tmp_path / "b.json")
    assert a.blocks == b.blocks and (a.measure, a.rounding) == ("measured", "gptq")
    # the run priced the same entries from the same draws and calibration sequences
    ran = QuantProfile.load(run_dir / "out" / "sensitivity" / table.name)
    mine = QuantProfile.load(table)
    for u in ("encoder.0", "encoder.1"):
        want = ran.units[u].groups["1"].error
        assert mine.units[u].groups["1"].error == pytest.approx(want, rel=1e-6, abs=1e-9)
